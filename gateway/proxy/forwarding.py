"""`Forwarding`: an admitted request on its way to its upstream and the upstream's answer on its way back, the
middle floor of an `Exchange` (`gateway.proxy.exchange`), over its state and endings (`gateway.proxy.endings`).

Rules this module keeps:
* An admitted request waits for a slot of its upstream's pool (`gateway.proxy.pool`), then goes out on a pooled
  connection; its body flows through the request pipe as it is read (`gateway.proxy.streaming`), and is never
  stored.
* The response head is relayed as soon as it is read, even while the request body still goes up (an upstream may
  answer an upload early); its body is relayed as it comes, the client's pace pausing the upstream socket.
* A response the client can no longer be given is dropped with its connection (it cannot go back to the pool);
  one whose framing a client could read its own way (`gateway.http1.framing`) is a broken upstream.
"""

from __future__ import annotations

from typing import Final

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.addresses import member_of
from gateway.auth.authorisation import Allow
from gateway.config import Route
from gateway.errors import UpstreamBroken
from gateway.headers import client_response_headers, switched_response_headers, upstream_request_headers
from gateway.http1.response import UpstreamResponse
from gateway.proxy.endings import Endings
from gateway.proxy.failures import length_too_large, upstream_error
from gateway.proxy.phases import Body, Phase
from gateway.proxy.streaming import ReadSizer, RequestBodyPipe, ResponseRelay
from gateway.proxy.tunnel import Tunnel
from gateway.routing.decision import Admit
from gateway.upstreams.keys import request_key

__all__ = ["Forwarding"]

_log = Logger(namespace="gateway.exchange")  # not the module's name: log lines keep the namespace they had

_NO_BODY_STATUSES: Final = frozenset({204, 304})


class _Drop(Protocol):
    """Takes a response nobody wants any more and closes its connection (it cannot go back to the pool)."""

    def connectionMade(self) -> None:
        IPushProducer(self.transport).stopProducing()


class Forwarding(Endings):
    """The upstream side of an exchange: `_start` once the request is admitted, then the pool's slot, the request
    sent (its body through a `RequestBodyPipe`), and the response relayed (its body through a `ResponseRelay`).
    The pool's connection answers here (`gateway.http1.response.ResponseReceiver`)."""

    __slots__ = ()

    def _start(self, decision: Admit, length: int | None, allow: Allow) -> None:
        route = self.route = decision.route
        gateway = self.gateway
        self._target = decision.upstream_target
        self.pool = gateway.pools[route.upstream.name]
        self._release = allow.release
        self._admitted_headers = allow.response_headers
        self.consumer = allow.identity.consumer
        self.decided_at = self._clock.seconds()
        if self._has_body:
            self._pipe = RequestBodyPipe(
                length=length,
                client=self._connection.transport,
                clock=self._clock,
                flow=route.flow_control,
                client_idle_timeout=route.timeouts.client_body_idle,
                upstream_stall_timeout=route.timeouts.upstream_send_stall,
                on_timeout=self._timed_out,
                on_sent=self._body_sent,
                on_stopped=self._body_refused,
            )
        host_entry = self.requestHeaders.entries.get(b"host")
        client_host = host_entry[1] if host_entry is not None else None
        host = client_host[0] if client_host and route.host_header == "client" else self.pool.request_host
        client_ip = getattr(self.client, "host", "unknown")
        trusted = gateway.server.trusted_proxies
        self._upstream_headers = upstream_request_headers(
            self.requestHeaders,
            client_ip=client_ip,
            keep_forwarded_for=bool(trusted) and member_of(trusted)(client_ip),
            host=host,
            client_host=client_host[0] if client_host else None,
            proto=b"https" if self._tls else b"http",
            via=gateway.via,
            request_id=self.request_id,
            received_version=self.clientproto[5:],  # b"HTTP/1.1" -> b"1.1"
            underscores=gateway.server.underscores_in_headers,
            remove=allow.remove,
            add=allow.upstream_headers,
            websocket=self._upgrade,
        )
        self._enter(Phase.WAITING)
        self.queued_at = self.decided_at
        if self.pool.try_acquire():
            self._got_slot(None)
            return
        self._waiting = self.pool.acquire()
        self._waiting.addCallbacks(self._got_slot, self.response_failed)

    def _got_slot(self, _: object) -> None:
        self._waiting = None
        self._slot_held = True
        self.slot_at = self._clock.seconds()
        if self.phase is not Phase.WAITING:
            self._release_slot()
            return
        route = self.route
        assert route is not None and self.pool is not None
        if self._pipe is None:
            # Armed first: the pool may answer at once (a connect that fails straight away).
            self._arm_timer(route.timeouts.response_headers, "response_headers")
        try:
            self._upstream_request = self.pool.send(
                self.method,
                self._target,
                self._upstream_headers,
                self._pipe,
                self,
                connect_timeout=route.timeouts.connect,
                on_connected=self._connected,
                retries=route.retries,
                key=self._balance_key() if self.pool.hashing else None,
            )
        except Exception:
            self.response_failed(Failure())

    def _balance_key(self) -> bytes | None:
        """What the request hashes to, for an upstream balanced by `hash`."""
        assert self.route is not None
        client = getattr(self.client, "host", "")
        headers = self.requestHeaders
        return request_key(self.route.upstream.hash_on, consumer=self.consumer, client=client, headers=headers)

    def _connected(self, address: str, tries: int) -> None:
        """The request is going out on an upstream connection (new or reused) to the server at `address`, in its
        `tries`-th try."""
        self.sent_at = self._clock.seconds()
        self.upstream_address = address
        self.attempts = tries

    def _body_sent(self) -> None:
        """The whole body is with the upstream: now it owes us a response head."""
        if self.phase is Phase.WAITING and self.route is not None:
            self._arm_timer(self.route.timeouts.response_headers, "response_headers")

    def _body_refused(self) -> None:
        """The upstream will take no more of the body (it closed, or answered early and closed)."""
        if self.body is Body.EXPECTED:
            self.body = Body.DROPPED  # the rest is read and dropped; the upstream end reports the failure, if any

    # --- the upstream's answer (gateway.http1.response.ResponseReceiver) ----------------------------------------

    def response_received(self, response: UpstreamResponse) -> None:
        """The upstream response head is read: relayed, its body streaming after it."""
        self._upstream_request = None
        self.response_at = self._clock.seconds()
        self._cancel_timer()
        if self.phase is not Phase.WAITING:
            self._release_slot()
            response.deliverBody(_Drop())
            return
        route = self.route
        assert route is not None
        broken = length_too_large(response)
        if broken:
            # A length a client's parser would read its own way (gateway.http1.framing): a broken upstream, whose
            # connection is closed unread (the response never began).
            _log.warn(
                "Upstream {upstream} sent {what}; closing its connection (request {request_id})",
                upstream=route.upstream.name,
                what=broken,
                request_id=self.request_id,
            )
            response.deliverBody(_Drop())
            self.response_failed(Failure(UpstreamBroken(f"the upstream sent {broken}")))
            return
        self._response_head(response, route)
        if response.code == 101:
            self._open_tunnel(response, route)
            return
        if self.method == b"HEAD" or response.code == 304:
            # No body follows, but Content-Length still describes the representation: it is relayed as sent.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                self.responseHeaders.setRawHeaders(b"Content-Length", length[-1:])
        elif response.length is not UNKNOWN_LENGTH and response.code not in _NO_BODY_STATUSES:
            # Keep the upstream's framing when it had one (its Content-Length header is dropped with the rest of the
            # framing: the connection writes its own).
            self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])  # type: ignore[str-format]  # an int: not UNKNOWN_LENGTH
        if self._has_body and self.body is not Body.READ:
            self._close_after_response()  # an early answer: the rest of the body must not be read as a request
        self._enter(Phase.STREAMING)
        self.write(b"")  # the head goes out now, even if the body is slow to come (server-sent events)
        self._response = response
        self._relay = ResponseRelay(
            self,
            self._clock,
            upstream_idle_timeout=route.timeouts.upstream_idle,
            client_stall_timeout=route.timeouts.client_send_stall,
            on_end=self._response_ended,
            on_timeout=self._timed_out,
            read_size=response.set_read_size,
            largest_read=ReadSizer.TLS_MAX if self._tls else ReadSizer.MAX,
            timer=self._connection.timer,
        )
        relay = self._relay
        response.deliverBody(relay)
        if relay.paused and not relay.stopped and relay.transport is not None:
            # deliverBody resumes the upstream socket after handing over what was read before it, even when that
            # filled the client's buffer and the relay paused it: pause it again.
            relay.transport.pauseProducing()

    # --- a switch to WebSocket ----------------------------------------------------------------------------------

    def _response_head(self, response: UpstreamResponse, route: Route) -> None:
        """The status and headers relayed to the client: the upstream's end-to-end ones, then the gateway's."""
        self._set_status(response.code, response.phrase)
        gateway = self.gateway
        client_response_headers(
            response.headers,
            self.responseHeaders,
            via=gateway.via,
            request_id=self.request_id,
            received_version=b"1.1" if response.version[2] == 1 else b"1.0",
            hidden=route.hide_response_headers,
            server=gateway.server_header,
        )
        if route.strict_transport_security and self._tls:
            self.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [route.strict_transport_security])
        for name, value in self._admitted_headers:
            self.responseHeaders.addRawHeader(name, value)
        if route.cors is not None:
            route.cors.respond(self.requestHeaders, self.responseHeaders)

    def _open_tunnel(self, response: UpstreamResponse, route: Route) -> None:
        """The upstream switched to WebSocket (which only a request that asked for it and was admitted takes, see
        `gateway.http1.exchange`): its `101` goes to the client, and the two connections become a tunnel."""
        self._release_slot()  # the upstream connection has left its pool: it holds no slot of the pool's
        switched_response_headers(response.headers, self.responseHeaders)
        self._connection.persistent = False
        self._enter(Phase.TUNNEL, "tunnel")
        self.write(b"")  # the 101, one write; nothing follows it but the tunnel's bytes
        settings = route.websocket
        tunnel = self._tunnel = Tunnel(
            self._clock,
            idle_timeout=settings.idle_timeout,
            max_lifetime=settings.max_lifetime,
            on_end=self._tunnel_ended,
        )
        upstream = response.switch_protocols(tunnel.from_upstream, tunnel.upstream_lost)
        client, held = self._connection.switch_protocols(tunnel.from_client)
        tunnel.attach(client, upstream)
        if held:
            tunnel.from_client(held)
        if response.tunnel_rest:
            tunnel.from_upstream(response.tunnel_rest)

    def _tunnel_ended(self, ending: str) -> None:
        """The tunnel ended (`ending` says how): the request ends with it, its bytes counted both ways."""
        tunnel = self._tunnel
        assert tunnel is not None
        self.body_bytes = tunnel.up_bytes
        self.sentLength = tunnel.down_bytes
        seconds = self._clock.seconds() - (self.response_at or self.began)
        _log.info(
            "WebSocket tunnel ended ({ending}) after {seconds:.1f} s: {up} bytes from the client, {down} from the "
            "upstream (route {route}, request {request_id})",
            ending=ending,
            seconds=seconds,
            up=tunnel.up_bytes,
            down=tunnel.down_bytes,
            route=self.route.name if self.route is not None else None,
            request_id=self.request_id,
        )
        if ending in ("client_closed", "upstream_closed"):
            phase = Phase.DONE
        elif ending == "client_reset":
            phase = Phase.CLIENT_GONE
        else:
            phase = Phase.ABORTED
        self._enter(phase, ending)

    def _response_ended(self, reason: Failure) -> None:
        self._relay = None
        if not self._disconnected:
            self.unregisterProducer()
        self._release_slot()
        if self.phase is not Phase.STREAMING:
            return
        # isinstance rather than Failure.check, which builds class names (a per-request cost in bench S5).
        value = reason.value
        complete = isinstance(value, ResponseDone) or (
            # A body framed by the connection's close is complete if the upstream closed, not if it reset.
            isinstance(value, PotentialDataLoss) and not self._response_reset()
        )
        if complete:
            self._enter(Phase.SENT, "completed")
            self._maybe_finish()
        else:
            _log.info(
                "Upstream response cut short; cutting the client connection: {reason} (request {request_id})",
                reason=reason.getErrorMessage(),
                request_id=self.request_id,
            )
            self._abort_client("upstream_truncated")

    def _response_reset(self) -> bool:
        return self._response is not None and self._response.reset

    def response_failed(self, failure: Failure) -> None:
        """No response came (or no slot, or no connection): answered with the error it maps to."""
        self._waiting = None
        self._upstream_request = None
        self._release_slot()
        if self.phase is not Phase.WAITING:
            return
        assert self.route is not None
        self._fail_before_response(upstream_error(failure, self.route, self.request_id))
