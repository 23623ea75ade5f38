"""Random and mutated HTTP/1.1 request heads fed to the client-facing server protocol, in memory.

The gateway is the real factory, client connection, exchange and upstream pool on a `MemoryReactorClock`
(`tests.support.memory`). Each example starts from a valid request and mutates it the ways request smuggling and
parser-confusion attacks do (duplicate or conflicting framing, odd transfer codings, obs-fold, bare LF, NUL or CR
in values, whitespace before the colon, missing or duplicate Host, absolute-form targets, dot-segments, over-long
lines, random bytes), then delivers it in random pieces as TCP would. Every upstream connection the gateway opens
is answered and recorded. The properties (issue 4, "Proof"):

* nothing raises out of the server protocol, nothing is logged as a failure, and once every connection is gone
  and the pools are closed no timer is left;
* everything the client receives is a sequence of well-formed HTTP/1.1 responses, each with a status (an
  HTTP/1.0 request may be answered in HTTP/1.0, as Twisted does);
* nothing ambiguous is forwarded: every request an upstream receives has a well-formed head with one framing,
  one Host and an origin-form target without dot-segments, and it is a request the client sent unambiguously,
  as judged by a strict reference parser written here from RFC 9112: same method, the target its route maps it
  to, and a body that is a prefix of the client's (all of it, if the upstream was told the body is complete).

The smuggling classics in KNOWN_ATTACKS are tried on every run before the generated examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.logger import LogEvent, LogLevel, globalLogPublisher

from gateway.proxy.exchange import Exchange
from tests.support.clients import parse_response
from tests.support.memory import Client, MemoryGateway, Upstream, disconnect

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HOST = b"example.test"
HEADER_LIMIT = 4096
CONFIG: dict[str, Any] = {
    "listeners": [{"host": "127.0.0.1", "port": 0}],
    "upstreams": {
        "origin": {"url": "http://127.0.0.1:8081"},
        "api": {"url": "http://127.0.0.1:8082/v1"},
    },
    "routes": [
        {"name": "api", "auth": "anonymous", "path_prefix": "/api", "upstream": "api", "strip_prefix": True},
        {"name": "static", "auth": "anonymous", "path_prefix": "/static", "upstream": "origin"},
    ],
    "limits": {"max_header_bytes": HEADER_LIMIT, "max_header_count": 50},
}
ROUTES = ((b"/api", 8082, b"/v1", True), (b"/static", 8081, b"", False))
"""The routes of CONFIG, written out again for the reference: (prefix, upstream port, base path, strip)."""

UPSTREAM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
"""What every upstream answers: one request per upstream connection, so each connection's bytes are one request."""


# === a strict reference parser (RFC 9112) ================================================================

_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_TOKEN = re.compile(_TCHAR + rb"+")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) +([\x21-\x7e]+) (HTTP/1\.[01])")
"""RFC 9112 section 3 lets a recipient read a request line on whitespace boundaries; llhttp takes several spaces
between method and target (the gateway re-makes the line, so nothing is ambiguous)."""
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"((?i:https?))://([^/?#]*)([/?][\x21-\x7e]*)?")
_AUTHORITY = re.compile(rb"[A-Za-z0-9.-]+:[0-9]+")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR + rb"+|" + _QUOTED + rb"))?)*"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})" + _CHUNK_EXT)
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [^\r\n]*)?\r\n")


class Malformed(Exception):
    """The bytes are not an unambiguous HTTP/1.1 request: a recipient must refuse them (400) and close."""


class Incomplete(Exception):
    """The bytes end before the request head does."""


@dataclass
class ParsedRequest:
    """One request, as the strict reference parser reads it."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    """Whether the whole body is there (its framing says where it ends)."""
    broken: bool = False
    """The head was fine, the body framing went wrong part-way (a bad chunk): nothing after it is a request."""
    refused: str = ""
    """Why a gateway must not forward it although it is well framed (CONNECT, dot-segments...); "" if it may."""
    origin_form: bytes = b""
    """The target in origin-form (an absolute-form target converted), or b"" if it has none."""

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    @property
    def persistent(self) -> bool:
        tokens = {t.strip().lower() for v in self.values(b"connection") for t in v.split(b",")}
        if self.version == b"HTTP/1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens


def parse_requests(data: bytes) -> list[ParsedRequest]:
    """The requests in `data`, up to the first that is malformed, incomplete or ends the connection."""
    out: list[ParsedRequest] = []
    pos = 0
    while pos < len(data):
        if data.startswith(b"\r\n", pos):
            pos += 2  # RFC 9112 section 2.2: one empty line before a request line is ignored
        try:
            request, pos = parse_request(data, pos)
        except (Malformed, Incomplete):
            break
        out.append(request)
        if not request.complete or request.broken or not request.persistent:
            break
    return out


def parse_request(data: bytes, pos: int = 0) -> tuple[ParsedRequest, int]:
    """One request starting at `pos`, and where the next one starts."""
    lines, pos = _head_lines(data, pos)
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise Malformed(f"request line {lines[0][:80]!r}")
    method, target, version = m.groups()
    request = ParsedRequest(method, target, version, _fields(lines[1:]))
    _check_host(request)
    _check_target(request)
    chunked, length = _framing(request)
    if chunked:
        pos = _chunked_body(request, data, pos)
    else:
        request.body = data[pos : pos + length]
        request.complete = len(request.body) == length
        pos += length
    return request, pos


def _head_lines(data: bytes, pos: int) -> tuple[list[bytes], int]:
    lines: list[bytes] = []
    while True:
        end = data.find(b"\r\n", pos)
        if end == -1:
            if b"\n" in data[pos:] or b"\r" in data[pos:]:
                raise Malformed("a bare LF or CR in the head")
            raise Incomplete()
        line = data[pos:end]
        if b"\r" in line or b"\n" in line:
            raise Malformed("a bare LF or CR in the head")
        pos = end + 2
        if not line:
            if not lines:
                raise Malformed("an empty request line")
            return lines, pos
        lines.append(line)


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise Malformed("obs-fold")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise Malformed(f"field name {name[:40]!r} (whitespace before the colon, or no colon)")
        value = value.strip(b" \t")
        if any(c in value for c in (b"\x00", b"\r", b"\n")):
            raise Malformed("NUL, CR or LF in a field value")
        fields.append((name.lower(), value))
    return fields


def _check_host(request: ParsedRequest) -> None:
    hosts = request.values(b"host")
    if len(hosts) > 1 or (request.version == b"HTTP/1.1" and not hosts):
        raise Malformed("more than one Host, or none in an HTTP/1.1 request")
    if hosts and not _HOST.fullmatch(hosts[0]):
        raise Malformed(f"Host {hosts[0][:40]!r}")


def _check_target(request: ParsedRequest) -> None:
    target = request.target
    if target.startswith(b"/"):
        request.origin_form = target
    elif m := _ABSOLUTE.fullmatch(target):
        hosts = request.values(b"host")
        scheme = m.group(1).lower()
        if not hosts or _authority(scheme, m.group(2)) != _authority(scheme, hosts[0]):
            raise Malformed("an absolute-form target that disagrees with Host")
        rest = m.group(3) or b"/"
        request.origin_form = rest if rest.startswith(b"/") else b"/" + rest
    elif target == b"*" or _AUTHORITY.fullmatch(target):
        request.refused = "asterisk or authority form: the gateway is no forward proxy"
        return
    else:
        raise Malformed(f"request target {target[:40]!r}")
    if request.method in (b"CONNECT", b"TRACE"):
        request.refused = f"{request.method.decode()} is refused"
    elif has_dot_segment(request.origin_form):
        request.refused = "dot-segments could escape a route's prefix"


def _authority(scheme: bytes, authority: bytes) -> bytes:
    """`authority` lower-cased, without the scheme's default port (RFC 9110 section 4.2.3: the same origin)."""
    default = b":443" if scheme == b"https" else b":80"
    authority = authority.lower()
    return authority.removesuffix(default).removesuffix(b":")


def has_dot_segment(target: bytes) -> bool:
    """Whether the path has a "." or ".." segment in a spelling an upstream may resolve as one: "%2e" is ".",
    "%2F", "%5C" and "\\" separate segments, and path parameters (";x", "%3Bx") are not part of one."""
    path = re.sub(rb"%2[fF]|%5[cC]|\\\\", b"/", target.partition(b"?")[0])
    segments = (re.split(rb";|%3[bB]", s, maxsplit=1)[0] for s in path.split(b"/"))
    return any(re.sub(rb"%2[eE]", b".", s) in (b".", b"..") for s in segments)


def route_key(path: bytes) -> bytes:
    """`path` as an upstream may resolve it, to route by: escapes of unreserved characters decoded, "%2F", "%5C"
    and "\\" taken as "/", runs of "/" merged, path parameters dropped."""
    path = re.sub(rb"%2[fF]|%5[cC]|\\\\", b"/", path)
    path = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: _unreserved(m.group(0)), path)
    path = re.sub(rb"/+", b"/", path)
    return b"/".join(s.split(b";", 1)[0] for s in path.split(b"/"))


def _unreserved(escape: bytes) -> bytes:
    char = bytes((int(escape[1:], 16),))
    return char if re.fullmatch(rb"[A-Za-z0-9._~-]", char) else escape


def _framing(request: ParsedRequest) -> tuple[bool, int]:
    """(chunked, length) of the body; Malformed unless there is exactly one unambiguous framing."""
    lengths = request.values(b"content-length")
    codings = request.values(b"transfer-encoding")
    if codings:
        if request.version == b"HTTP/1.0":
            raise Malformed("Transfer-Encoding in HTTP/1.0 (RFC 9112 section 6.1)")
        if lengths:
            raise Malformed("both Content-Length and Transfer-Encoding")
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise Malformed(f"Transfer-Encoding {b', '.join(codings)[:40]!r}: only chunked is understood")
        return True, 0
    if not lengths:
        return False, 0
    if len(lengths) != 1 or not re.fullmatch(rb"[0-9]+", lengths[0]):
        raise Malformed(f"Content-Length {b', '.join(lengths)[:40]!r}")
    return False, int(lengths[0])


def _chunked_body(request: ParsedRequest, data: bytes, pos: int) -> int:
    """Decode a chunked body into `request`; a bad chunk marks it broken (what came before it stands)."""
    body = bytearray()
    try:
        while True:
            end = data.find(b"\r\n", pos)
            if end == -1:
                return len(data)
            m = _CHUNK_LINE.fullmatch(data[pos:end])
            if m is None:
                raise Malformed("chunk size line")
            size, pos = int(m.group(1), 16), end + 2
            if size == 0:
                pos = _trailers(data, pos)
                request.complete = pos <= len(data)
                return pos
            body += data[pos : pos + size]
            pos += size
            if len(data) < pos + 2:
                return len(data)
            if data[pos : pos + 2] != b"\r\n":
                raise Malformed("no CRLF after chunk data")
            pos += 2
    except Malformed:
        request.broken = True
        return len(data)
    finally:
        request.body = bytes(body)


def _trailers(data: bytes, pos: int) -> int:
    """Skip the trailer section (field lines, then an empty line); past the end of `data` if it is not all there."""
    while True:
        end = data.find(b"\r\n", pos)
        if end == -1:
            if b"\n" in data[pos:] or b"\r" in data[pos:]:
                raise Malformed("a bare LF or CR in the trailers")
            return len(data) + 1
        line, pos = data[pos:end], end + 2
        if not line:
            return pos
        if b"\r" in line or b"\n" in line:
            raise Malformed("a bare LF or CR in the trailers")
        _fields([line])


# --- what the gateway may send upstream ----------------------------------------------------------------


def routed_to(target: bytes, port: int, forwarded: bytes) -> bool:
    """Whether CONFIG's routes may send origin-form `target` to upstream `port` as `forwarded`: the route whose
    prefix the path starts with (as an upstream resolves it), and the raw bytes after that prefix, after the
    upstream's base path if it strips the prefix."""
    path, sep, query = target.partition(b"?")
    for prefix, route_port, base, strip in ROUTES:
        if route_port != port:
            continue
        if not strip:
            if forwarded == target and _under(route_key(path), prefix):
                return True
            continue
        for k in range(min(len(path), 64) + 1):  # where the prefix ends in the raw path, however it is spelt
            rest = path[k:]
            sent = base + (rest if rest.startswith(b"/") else b"/" + rest) + sep + query
            if sent == forwarded and route_key(path[:k]) in (prefix, prefix + b"/") and _under(route_key(path), prefix):
                return True
    return False


def _under(path: bytes, prefix: bytes) -> bool:
    return path == prefix or path.startswith(prefix + b"/")


def well_formed_upstream_request(data: bytes) -> ParsedRequest:
    """The one request in `data`, an upstream's received bytes; AssertionError unless it is well-formed."""
    try:
        request, end = parse_request(data)
    except (Malformed, Incomplete) as e:
        raise AssertionError(f"upstream received a malformed head ({e}): {data[:300]!r}") from None
    assert request.version == b"HTTP/1.1", data[:200]
    assert request.target.startswith(b"/"), f"not origin-form: {request.target[:100]!r}"
    assert not has_dot_segment(request.target), f"dot-segments forwarded: {request.target[:100]!r}"
    assert not request.refused, f"{request.refused}: {data[:200]!r}"
    assert not request.broken, f"upstream received a broken chunked body: {data[:300]!r}"
    assert end >= len(data) or not request.complete, f"bytes after the request's end: {data[end : end + 100]!r}"
    return request


# === the in-memory run ===================================================================================


class FuzzGateway(MemoryGateway):
    """A MemoryGateway that keeps its clients, so the exchanges they made can be matched with responses."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.clients: list[Client] = []

    @property
    def requests(self) -> list[Exchange]:
        return [exchange for client in self.clients for exchange in client.exchanges]

    def client(self) -> Client:
        client = super().client()
        client.transport._lenient = True  # a real transport ignores resumeProducing once closing
        self.clients.append(client)
        return client

    def next_upstream(self) -> Upstream | None:
        """Complete the next connection the gateway asked for, unless it gave up on it first: a real connection
        attempt that was stopped never completes."""
        if self.reactor.connectors[self._taken].stoppedConnecting:
            self._taken += 1
            return None
        return self.upstream()


@dataclass
class Outcome:
    """What happened when the gateway was fed one stream."""

    sent: bytes
    client_received: bytes = b""
    client_ended: bool = False
    head_requests: list[bool] = field(default_factory=list)
    upstream_requests: list[tuple[int, bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timers_left: list[str] = field(default_factory=list)


def _closed(transport: Any) -> bool:
    return bool(transport.disconnecting) or transport.producerState == "stopped"


class _Run:
    """Feeds one client stream to a fresh gateway and plays every upstream, as the kernel and the origins would."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.gw = FuzzGateway()
        self.pieces = list(pieces)
        self.client = self.gw.client()
        self.client_lost = False
        self.gateway_closed = False
        """Whether the gateway closed (or cut) the client connection, rather than the client leaving."""
        self.upstreams: list[tuple[Upstream, bool]] = []  # (connection, answered)
        self.lost: set[int] = set()

    def feed(self) -> bool:
        """Deliver the pieces the client transport will read now; whether any was."""
        fed = False
        transport = self.client.transport
        while self.pieces and not self.client_lost and not _closed(transport) and transport.producerState != "paused":
            self.client.send(self.pieces.pop(0))
            fed = True
        return fed

    def connect_upstreams(self) -> bool:
        fed = False
        while self.gw.pending_connections():
            upstream = self.gw.next_upstream()
            if upstream is not None:
                self.upstreams.append((upstream, False))
            fed = True
        return fed

    def answer_upstreams(self) -> None:
        for i, (upstream, answered) in enumerate(self.upstreams):
            if not answered and not _closed(upstream.transport):
                upstream.respond(UPSTREAM_ANSWER)
            self.upstreams[i] = (upstream, True)
            self.deliver_losses()

    def deliver_losses(self) -> None:
        """Tell each protocol whose transport was closed that its connection is gone, as TCP would."""
        transport = self.client.transport
        if not self.client_lost and _closed(transport):
            self.client_lost = self.gateway_closed = True
            reason = ConnectionAborted("aborted") if transport.aborted else ConnectionDone("closed")
            disconnect(transport, self.client.channel, reason)
        for upstream, answered in self.upstreams:
            if answered and id(upstream) not in self.lost:
                self.lost.add(id(upstream))
                disconnect(upstream.transport, upstream.protocol, ConnectionDone("upstream closed"))

    def run(self) -> None:
        for _ in range(len(self.pieces) + 20):
            progressed = self.feed()
            progressed = self.connect_upstreams() or progressed
            self.deliver_losses()
            if not progressed:
                self.answer_upstreams()
                if not self.feed() and not self.connect_upstreams():
                    break
        for _ in range(12):  # every timer the gateway may have set, head and idle timeouts included
            self.gw.advance(30)
            self.connect_upstreams()
            self.answer_upstreams()
            self.deliver_losses()
        if not self.client_lost:
            self.client_lost = True
            disconnect(self.client.transport, self.client.channel, ConnectionLost("client went away"))
        self.answer_upstreams()
        self.gw.close()
        self.deliver_losses()


def feed(pieces: list[bytes]) -> Outcome:
    """Run one stream through a fresh gateway, recording what came out; exceptions are recorded, not raised."""
    outcome = Outcome(sent=b"".join(pieces))

    def observe(event: LogEvent) -> None:
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            outcome.failures.append(str(event.get("log_format")) + ": " + repr(event.get("log_failure")))

    globalLogPublisher.addObserver(observe)
    run = None
    try:
        run = _Run(pieces)
        run.run()
    except Exception as e:
        outcome.errors.append(f"{type(e).__name__}: {e}")
    finally:
        globalLogPublisher.removeObserver(observe)
    if run is not None:
        outcome.client_received = run.client.received()
        outcome.client_ended = run.gateway_closed
        outcome.head_requests = [r.method == b"HEAD" for r in run.gw.requests]
        outcome.upstream_requests = [(u.transport.getPeer().port, u.received()) for u, _ in run.upstreams]
        outcome.timers_left = [repr(c) for c in run.gw.reactor.getDelayedCalls()]
    return outcome


# === generating request streams ==========================================================================


@dataclass
class Draft:
    """A request being built and mutated: its lines and their line endings, the body and anything after it."""

    lines: list[bytes]
    eols: list[bytes]
    body: bytes
    after: bytes = b""

    def serialize(self) -> bytes:
        head = b"".join(line + eol for line, eol in zip(self.lines, self.eols, strict=True))
        return head + b"\r\n" + self.body + self.after

    def header_indexes(self, name: bytes | None = None) -> list[int]:
        return [
            i
            for i, line in enumerate(self.lines)
            if i > 0 and (name is None or line.split(b":", 1)[0].strip().lower() == name)
        ]

    def set_header(self, name: bytes, value: bytes) -> None:
        found = self.header_indexes(name.lower())
        if found:
            self.lines[found[0]] = name + b": " + value
        else:
            self.add(name + b": " + value)

    def add(self, line: bytes, at: int | None = None) -> None:
        at = len(self.lines) if at is None else at
        self.lines.insert(at, line)
        self.eols.insert(at, b"\r\n")


METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"]
TARGETS = [
    b"/api/items/1",
    b"/api",
    b"/api/a%2Fb;p=1?q=1&r=%20",
    b"/static/x.css",
    b"/static/",
    b"/static?",
    b"/%61pi//items",
    b"/nowhere",
    b"/",
]
SMUGGLED = b"GET /static/smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
"""A request hidden in a body: if framing is misread, it is parsed as the next request."""


def chunked(data: bytes, sizes: list[int]) -> bytes:
    out, pos = bytearray(), 0
    for size in sizes:
        piece = data[pos : pos + size]
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
        pos += size
    if pos < len(data):
        out += b"%x\r\n%s\r\n" % (len(data) - pos, data[pos:])
    return bytes(out) + b"0\r\n\r\n"


@st.composite
def valid_drafts(draw: st.DrawFn) -> Draft:
    """A well-formed request: method, target, Host, a few headers, and no body, a Content-Length or chunked one."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    lines = [b"%s %s %s" % (method, target, version), b"Host: " + HOST]
    lines += draw(st.lists(st.sampled_from([b"Accept: */*", b"X-Trace: a, b", b"User-Agent: fuzz/1"]), max_size=3))
    draft = Draft(lines, [b"\r\n"] * len(lines), b"")
    body = draw(st.sampled_from([b"", b"hello", SMUGGLED, b"x" * 300]))
    framing = draw(st.sampled_from(["none", "length", "chunked"] if body else ["none", "length"]))
    if framing == "length":
        draft.add(b"Content-Length: %d" % len(body))
        draft.body = body
    elif framing == "chunked":
        draft.add(b"Transfer-Encoding: chunked")
        draft.body = chunked(body, draw(st.lists(st.integers(1, 200), max_size=3)))
    else:
        draft.after = body  # a body without framing is the next request, pipelined
    if draw(st.booleans()) and draw(st.booleans()):
        draft.add(b"Expect: 100-continue")
    return draft


TE_VALUES = [
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b"chunked ",
    b" chunked",
    b"\tchunked",
    b"identity",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked, identity",
    b"identity, chunked",
    b"chunked;q=1",
    b"x-chunked",
    b"chunk",
    b"",
]
CL_VALUES = [b"5", b"+5", b"5, 5", b" 5 ", b"0x5", b"-1", b"", b"5 5", b"05", b"99999999999999999999", b"\xb5"]
CHUNK_LINES = [b"0x3", b"-1", b"3 ", b" 3", b"3;", b'3;a="b', b"3;a=b;c", b"3 ; a = b", b"f" * 20, b"", b"g", b"3\x00"]
HOST_VALUES = [b"", b"a b", b"evil.test", b"example.test:8080", b"EXAMPLE.TEST", b"[::1]:80", b"ex\x7fample"]
DOT_SEGMENTS = [
    b"/..",
    b"/.",
    b"/%2e%2e",
    b"/%2E%2e",
    b"/.%2e",
    b"/%2e",
    b"/../..",
    b"/./.",
    b"/..%2f",
    b"/..;x",
    b"\\..",
]


def _mutate_content_length(draw: st.DrawFn, d: Draft) -> None:
    choice = draw(st.sampled_from(["duplicate", "differ", "value", "with-te"]))
    found = d.header_indexes(b"content-length")
    value = d.lines[found[0]].split(b":", 1)[1].strip() if found else b"%d" % len(d.body)
    if choice == "duplicate":
        d.add(b"Content-Length: " + value, draw(st.integers(1, len(d.lines))))
    elif choice == "differ":
        d.add(b"Content-Length: %d" % draw(st.integers(0, 400)), draw(st.integers(1, len(d.lines))))
    elif choice == "value":
        d.set_header(b"Content-Length", draw(st.sampled_from(CL_VALUES)))
    else:
        d.set_header(b"Transfer-Encoding", b"chunked")
        d.add(b"Content-Length: " + value)


def _mutate_transfer_encoding(draw: st.DrawFn, d: Draft) -> None:
    value = draw(st.sampled_from(TE_VALUES))
    name = draw(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING"]))
    if draw(st.booleans()):
        d.add(name + b": " + value, draw(st.integers(1, len(d.lines))))
    else:
        for i in d.header_indexes(b"transfer-encoding"):
            d.lines[i] = name + b": " + value
        if not d.header_indexes(b"transfer-encoding"):
            d.add(name + b": " + value)


def _mutate_line_ending(draw: st.DrawFn, d: Draft) -> None:
    eol = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    if draw(st.booleans()):
        d.eols = [eol] * len(d.eols)
    else:
        d.eols[draw(st.integers(0, len(d.eols) - 1))] = eol


def _mutate_value_bytes(draw: st.DrawFn, d: Draft) -> None:
    i = draw(st.integers(1, len(d.lines) - 1)) if len(d.lines) > 1 else 0
    line = d.lines[i]
    at = draw(st.integers(line.find(b":") + 1 if b":" in line else 0, len(line)))
    bad = draw(st.sampled_from([b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"\x0b", b"\xff", b"\r\n", b"\r\n "]))
    d.lines[i] = line[:at] + bad + line[at:]


def _mutate_colon(draw: st.DrawFn, d: Draft) -> None:
    indexes = d.header_indexes()
    if indexes:
        i = draw(st.sampled_from(indexes))
        name, _, value = d.lines[i].partition(b":")
        d.lines[i] = name + draw(st.sampled_from([b" ", b"\t", b"  "])) + b":" + value


def _mutate_host(draw: st.DrawFn, d: Draft) -> None:
    choice = draw(st.sampled_from(["drop", "duplicate", "second", "value"]))
    hosts = d.header_indexes(b"host")
    if choice == "drop":
        for i in reversed(hosts):
            del d.lines[i], d.eols[i]
    elif choice == "duplicate":
        d.add(b"Host: " + HOST, draw(st.integers(1, len(d.lines))))
    elif choice == "second":
        d.add(b"Host: " + draw(st.sampled_from(HOST_VALUES)), draw(st.integers(1, len(d.lines))))
    else:
        d.set_header(b"Host", draw(st.sampled_from(HOST_VALUES)))


def _request_line_parts(d: Draft) -> tuple[bytes, bytes, bytes]:
    method, target, version = [*d.lines[0].split(b" ", 2), b"", b""][:3]
    return method, target, version


def _mutate_target(draw: st.DrawFn, d: Draft) -> None:
    method, target, version = _request_line_parts(d)
    choice = draw(st.sampled_from(["absolute", "absolute-other", "authority", "asterisk", "dots"]))
    if choice == "absolute":
        scheme = draw(st.sampled_from([b"http", b"HTTP", b"https"]))
        target = scheme + b"://" + draw(st.sampled_from([HOST, b"EXAMPLE.test", HOST + b":80"])) + target
    elif choice == "absolute-other":
        target = b"http://" + draw(st.sampled_from([b"evil.test", b"127.0.0.1:22", b"", b"example.test@evil"])) + target
    elif choice == "authority":
        target = draw(st.sampled_from([b"example.test:443", b"127.0.0.1:8081"]))
        method = draw(st.sampled_from([method, b"CONNECT"]))
    elif choice == "asterisk":
        target = b"*"
    else:
        path, sep, query = target.partition(b"?")
        segments = path.split(b"/")
        at = draw(st.integers(1, len(segments)))
        dots = draw(st.sampled_from(DOT_SEGMENTS))
        target = b"/".join(segments[:at]) + dots + b"/" + b"/".join(segments[at:]) + sep + query
        target = target.replace(b"//", b"/")
    d.lines[0] = b" ".join(p for p in (method, target, version) if p)


def _mutate_request_line(draw: st.DrawFn, d: Draft) -> None:
    method, target, version = _request_line_parts(d)
    choice = draw(st.sampled_from(["method", "version", "spaces"]))
    if choice == "method":
        method = draw(st.sampled_from([b"CONNECT", b"TRACE", b"get", b"G\x00T", b"", b"GET\t", b"M-SEARCH"]))
    elif choice == "version":
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]))
    else:
        d.lines[0] = method + b"  " + target + b" " + version
        return
    d.lines[0] = method + b" " + target + b" " + version


def _mutate_long_line(draw: st.DrawFn, d: Draft) -> None:
    size = HEADER_LIMIT + draw(st.sampled_from([-40, -1, 0, 1, 2 * HEADER_LIMIT]))
    if draw(st.booleans()):
        method, target, version = _request_line_parts(d)
        d.lines[0] = method + b" " + target + b"a" * size + b" " + version
    else:
        d.add(b"X-Long: " + b"v" * size, draw(st.integers(1, len(d.lines))))


def _mutate_many_headers(draw: st.DrawFn, d: Draft) -> None:
    for n in range(draw(st.sampled_from([45, 49, 50, 51, 80]))):
        d.add(b"X-H%d: v" % n)


def _mutate_obs_fold(draw: st.DrawFn, d: Draft) -> None:
    line = draw(st.sampled_from([b" folded", b"\tfolded", b" ", b" Host: evil.test"]))
    d.add(line, draw(st.integers(1, len(d.lines))))


def _mutate_chunks(draw: st.DrawFn, d: Draft) -> None:
    if not d.header_indexes(b"transfer-encoding"):
        d.set_header(b"Transfer-Encoding", b"chunked")
        d.body = chunked(d.body, [])
    lines = d.body.split(b"\r\n")
    sizes = [i for i in range(0, len(lines), 2)]
    i = draw(st.sampled_from(sizes))
    if draw(st.booleans()):
        lines[i] = draw(st.sampled_from(CHUNK_LINES))
    elif i + 1 < len(lines):
        lines[i + 1] += b"X"  # chunk data longer than its size
    d.body = b"\r\n".join(lines)


def _mutate_pipeline(draw: st.DrawFn, d: Draft) -> None:
    d.after += draw(st.sampled_from([SMUGGLED, b"\r\n" + SMUGGLED, b"GET /api/2 HTTP/1.1\r\nHost: x\r\n\r\n", b"junk"]))


MUTATIONS: dict[str, Callable[[st.DrawFn, Draft], None]] = {
    "content-length": _mutate_content_length,
    "transfer-encoding": _mutate_transfer_encoding,
    "line-ending": _mutate_line_ending,
    "value-bytes": _mutate_value_bytes,
    "colon": _mutate_colon,
    "host": _mutate_host,
    "target": _mutate_target,
    "request-line": _mutate_request_line,
    "long-line": _mutate_long_line,
    "many-headers": _mutate_many_headers,
    "obs-fold": _mutate_obs_fold,
    "chunks": _mutate_chunks,
    "pipeline": _mutate_pipeline,
}


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid request with up to three mutations (one most often: each should be what decides), then maybe
    random bytes spliced in or the end cut off."""
    draft = draw(valid_drafts())
    count = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    for name in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=count, max_size=count)):
        MUTATIONS[name](draw, draft)
    data = draft.serialize()
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


VOCABULARY = [b"GET", b"POST", b" ", b"/api", b"/static", b"/", b"HTTP/1.1", b"\r\n", b"\n", b":", b"Host", b"x"]
VOCABULARY += [b"Content-Length", b"Transfer-Encoding", b"chunked", b"0", b"5", b"\r\n\r\n", b"\t", b"\x00", b"?"]
random_streams = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(VOCABULARY), max_size=40).map(b"".join),
)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` in the pieces TCP might deliver it in: whole, at random points, or one byte at a time."""
    how = draw(st.sampled_from(["whole", "random", "bytes"] if len(data) <= 600 else ["whole", "random"]))
    if how == "whole" or not data:
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[a:b]]


streams = st.one_of(*[mutated_streams()] * 4, random_streams).flatmap(split)

_OK = b"POST /api/items/1 HTTP/1.1\r\nHost: example.test\r\n"
KNOWN_ATTACKS = [
    _OK + b"Transfer-Encoding: identity\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
    _OK + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED,
    _OK + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    _OK + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
    _OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    _OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    _OK + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    _OK + b"Content-Length : 0\r\n\r\n" + SMUGGLED,
    _OK.replace(b"\r\n", b"\n") + b"Content-Length: 0\n\n" + SMUGGLED,
    _OK + b"X: a\rContent-Length: 0\r\n\r\n" + SMUGGLED,
    _OK + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    _OK + b"Transfer-Encoding: chunked\r\n\r\n5;\x00\r\nhello\r\n0\r\n\r\n",
    b"POST /api/items/1 HTTP/1.0\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /api/items/1 HTTP/1.1\r\n\r\n",
    b"GET /api/items/1 HTTP/1.1\r\nHost: example.test\r\nHost: evil.test\r\n\r\n",
    b"GET /api/items/1 HTTP/1.0\r\nHost: example.test\r\nHost: evil.test\r\n\r\n",
    b"GET /api/items/1 HTTP/1.1\r\nHost: ex\x7fample.test\r\n\r\n",
    b"GET /api/items/1 HTTP/1.1\r\nHost: example.test, evil.test\r\n\r\n",
    b"GET http://evil.test/api/items/1 HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"GET /api/../static/x HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"GET /api/%2e%2e/static/x HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"GET /api/..%2fstatic HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    b"HEAD /api/items/1 HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n",
]
"""Request smuggling and parser-confusion classics, tried on every run before the generated examples."""


def with_known_attacks(test: Callable[..., None]) -> Callable[..., None]:
    """`test` (a hypothesis test of a list of pieces) also run on each of KNOWN_ATTACKS, whole."""
    for data in reversed(KNOWN_ATTACKS):
        test = example([data])(test)
    return test


# === the properties ======================================================================================


@FUZZ
@given(streams)
@with_known_attacks
def test_fuzzed_heads_never_raise_log_a_failure_or_leave_a_timer(pieces: list[bytes]) -> None:
    """Whatever arrives, in whatever pieces, nothing raises out of the server protocol, nothing is logged as a
    failure, and once every connection is gone and the pools are closed no timer is left."""
    outcome = feed(pieces)
    assert outcome.errors == [], f"raised for {outcome.sent[:300]!r}"
    assert outcome.failures == [], f"logged for {outcome.sent[:300]!r}"
    assert outcome.timers_left == [], f"timers left for {outcome.sent[:300]!r}"


@FUZZ
@given(streams)
@with_known_attacks
def test_fuzzed_heads_get_only_well_formed_responses(pieces: list[bytes]) -> None:
    """Everything a client receives, whatever it sent, is a sequence of HTTP/1.1 responses, each with a status; only
    the last may be cut short, and only if the connection then ended."""
    outcome = feed(pieces)
    assert_responses(outcome.client_received, outcome.head_requests, ended=outcome.client_ended)


@FUZZ
@given(streams)
@with_known_attacks
def test_fuzzed_heads_never_forward_an_ambiguous_request(pieces: list[bytes]) -> None:
    """Every request an upstream receives is well-formed and is one the client sent unambiguously: the strict
    reference parser reads the same method, a target the route maps to the one forwarded, and a body the
    forwarded one is a prefix of (all of it if complete). Refused or malformed requests reach no upstream."""
    outcome = feed(pieces)
    client_requests = parse_requests(outcome.sent)
    candidates = iter([r for r in client_requests if not r.refused])
    for port, received in outcome.upstream_requests:
        if not received:
            continue  # connected, then cancelled before a byte was written
        forwarded = well_formed_upstream_request(received)
        for candidate in candidates:
            if corresponds(candidate, port, forwarded):
                break
        else:
            raise AssertionError(
                f"upstream {port} received {received[:300]!r}, which is none of the requests the client sent "
                f"unambiguously: {[(r.method, r.target) for r in client_requests]} in {outcome.sent[:300]!r}"
            )


def corresponds(client: ParsedRequest, port: int, forwarded: ParsedRequest) -> bool:
    """Whether `forwarded` (at upstream `port`) is `client`'s request as CONFIG's routes send it."""
    if client.method != forwarded.method or not routed_to(client.origin_form, port, forwarded.target):
        return False
    if not client.body.startswith(forwarded.body):
        return False
    return not forwarded.complete or (client.complete and client.body == forwarded.body)


def assert_responses(data: bytes, head_requests: list[bool], *, ended: bool) -> None:
    """`data` is a sequence of well-formed HTTP/1.1 responses; the n-th answers a HEAD if `head_requests[n]`."""
    n = 0
    while data:
        # An HTTP/1.0 request may be answered in HTTP/1.0 (RFC 9110 section 6.2), as Twisted does.
        assert _STATUS_LINE.match(data), f"not a status line: {data[:100]!r}"
        is_head = n < len(head_requests) and head_requests[n]
        try:
            parsed = parse_response(data, head_request=is_head)
        except ValueError as e:
            raise AssertionError(f"response {n} does not parse: {e}") from None
        if not parsed.complete:
            assert ended and not parsed.rest, f"response {n} is incomplete on a connection that goes on: {data[:200]!r}"
            return
        for name, value in parsed.headers:
            assert _TOKEN.fullmatch(name) and b"\r" not in value and b"\n" not in value, (name, value)
        data = parsed.rest
        n += 1


def test_the_harness_forwards_unambiguous_requests_and_matches_them() -> None:
    """The fuzz properties are not vacuous: pipelined valid requests, one with a chunked body, reach their
    upstreams, each forwarded request corresponds to the client's, and the client gets every answer."""
    sent = [
        b"POST /api/a%2Fb?q=1 HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET /static/x HTTP/1.1\r\nHost: example.test\r\n\r\n",
    ]
    outcome = feed([b"".join(sent)[:30], b"".join(sent)[30:]])
    assert outcome.errors == outcome.failures == outcome.timers_left == []
    client_requests = parse_requests(outcome.sent)
    assert [r.origin_form for r in client_requests] == [b"/api/a%2Fb?q=1", b"/static/x"]
    forwarded = [(port, well_formed_upstream_request(data)) for port, data in outcome.upstream_requests]
    assert [port for port, _ in forwarded] == [8082, 8081]
    assert all(corresponds(c, port, f) for c, (port, f) in zip(client_requests, forwarded, strict=True))
    assert forwarded[0][1].complete and forwarded[0][1].body == b"hello"
    assert_responses(outcome.client_received, outcome.head_requests, ended=outcome.client_ended)
    assert outcome.client_received.count(b"HTTP/1.1 200 OK\r\n") == 2


# === the reference parser, pinned ========================================================================


def _heads() -> Iterator[tuple[bytes, bool]]:
    ok = b"GET /api/1 HTTP/1.1\r\nHost: example.test\r\n"
    yield ok + b"\r\n", True
    yield ok + b"Content-Length: 5\r\n\r\nhello", True
    yield ok + b'Transfer-Encoding: Chunked \r\n\r\n5;a="b"\r\nhello\r\n0\r\n\r\n', True
    yield b"GET http://example.test/api/1 HTTP/1.1\r\nHost: example.test\r\n\r\n", True
    yield b"GET http://EXAMPLE.test:80/api/1 HTTP/1.1\r\nHost: example.test\r\n\r\n", True
    yield ok + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", False
    yield ok + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False
    yield ok + b"Transfer-Encoding: identity\r\n\r\n", False
    yield ok + b"Transfer-Encoding: gzip, chunked\r\n\r\n", False
    yield ok + b"X: a\r\n folded\r\n\r\n", False
    yield ok.replace(b"\r\n", b"\n") + b"\n", False
    yield ok + b"X: a\x00b\r\n\r\n", False
    yield ok + b"Content-Length : 5\r\n\r\nhello", False
    yield b"GET /api/1 HTTP/1.1\r\n\r\n", False
    yield ok + b"Host: example.test\r\n\r\n", False
    yield b"GET http://evil.test/api/1 HTTP/1.1\r\nHost: example.test\r\n\r\n", False
    yield b"GET /api/1 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False


def test_reference_parser_accepts_only_unambiguous_heads() -> None:
    """The reference parser reads the requests RFC 9112 allows and refuses the ambiguous ones the fuzzer makes."""
    for data, valid in _heads():
        assert bool(parse_requests(data)) is valid, data


def test_reference_parser_refuses_to_forward_dot_segments_and_forward_proxy_targets() -> None:
    """Well-framed requests a gateway must not forward are marked refused, and parsing goes on after them."""
    data = b"GET /api/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\nCONNECT x.test:443 HTTP/1.1\r\nHost: x.test\r\n\r\n"
    first, second = parse_requests(data)
    assert first.refused and second.refused
