"""The keys of one JWT method: a PEM key, an HMAC secret, a JWKS file, or a JWKS URL fetched with treq.

Rules:
* A key is used only for the algorithm family it belongs to: RSA keys for RS*/PS*, EC keys of the matching curve
  for ES*, OKP keys for EdDSA. A key set never supplies an HMAC secret (kty "oct" is ignored), a JWK whose `alg`
  names another algorithm or whose `use` is not "sig" is not used, and neither is a key PyJWT finds too short.
  So a token cannot choose how its signature is checked.
* A token without a `kid` is verified only when exactly one key of the set fits its algorithm.
* A JWKS URL is fetched without blocking the reactor (treq, never PyJWT's blocking `PyJWKClient`): on first use;
  again when a token names an unknown `kid`, but at most once per `jwks_refresh_interval` whatever the tokens
  say; and in the background once the keys are older than `jwks_max_age`. Waiting verifications share one fetch,
  and one of them leaving does not stop it for the others. A failed fetch keeps the keys there were: only a
  method that never had keys cannot decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives import serialization
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from gateway.auth.settings.model import HMAC_ALGORITHMS, JwtMethod, wrong_key_type

__all__ = ["MAX_JWKS_BYTES", "Fetch", "FetchFailed", "KeySource", "TreqFetcher"]

_log = Logger()

MAX_JWKS_BYTES = 1024 * 1024
"""The largest JWKS document taken: a key set is a few KiB; more is an endpoint gone wrong."""

Fetch = Callable[[str, float], "Deferred[bytes]"]
"""`fetch(url, timeout)`: the body of `url`, read within `timeout` seconds; errbacks on any failure (a status
other than 200 included)."""

_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
"""The JWK key type each algorithm family needs (by the algorithm's first two letters)."""


class FetchFailed(Exception):
    """The JWKS endpoint answered, but not with a key set we take (a status other than 200, a body too long)."""


# --- fetching -------------------------------------------------------------------------------------------------


class TreqFetcher:
    """The default `Fetch`: treq over a persistent pool of its own, no redirects, the body capped at
    `MAX_JWKS_BYTES`, the whole exchange (connecting included) bounded by the timeout. A fetch that is cancelled
    or times out drops its connection; `close` closes the pooled ones."""

    def __init__(self, reactor: Any, *, max_bytes: int = MAX_JWKS_BYTES) -> None:
        self._reactor = reactor
        self._max_bytes = max_bytes
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._pool.cachedConnectionTimeout = 30  # a key set is read every few minutes at most: don't hold sockets
        self._agent = Agent(reactor, pool=self._pool)

    def __call__(self, url: str, timeout: float) -> Deferred[bytes]:
        return ensureDeferred(self._fetch(url)).addTimeout(timeout, self._reactor)

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self._pool.closeCachedConnections()  # unannotated in Twisted
        return closed

    async def _fetch(self, url: str) -> bytes:
        # A client per fetch: treq's cookie jar would otherwise keep whatever the endpoint set.
        response = await HTTPClient(self._agent).get(url, allow_redirects=False, unbuffered=True)
        body = await _read_capped(response, self._max_bytes)
        if response.code != 200:
            raise FetchFailed(f"the JWKS endpoint answered {response.code}")
        return body


class _CappedBody(Protocol):
    """Collects a response body of at most `limit` bytes. Past that it stops reading (which drops the connection)
    and fails once the response is over, so a connection Agent pools again is in the pool by then; cancelling
    `finished` drops the connection at once."""

    def __init__(self, limit: int) -> None:
        self.finished: Deferred[bytes] = Deferred(self._cancel)
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._refused = False

    def refuse(self) -> None:
        self._refused = True
        self._parts = []
        self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.refuse()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if self._refused:
            self.finished.errback(FetchFailed(f"the JWKS document is over {self._limit} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._parts))
        else:
            self.finished.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            # Agent's proxy of the socket (IResponse.deliverBody): closes it (it has no abort)
            cast(IPushProducer, self.transport).stopProducing()


def _read_capped(response: IResponse, limit: int) -> Deferred[bytes]:
    body = _CappedBody(limit)
    response.deliverBody(body)
    if isinstance(response.length, int) and response.length > limit:
        body.refuse()  # the endpoint said how long it is: no need to read it to know
    return body.finished


# --- the keys ---------------------------------------------------------------------------------------------------


class KeySource:
    """Finds the key that verifies a token of one method, fetching the method's JWKS when it must.

    `key()` answers from what is at hand; when it has nothing, `may_refresh()` says whether a fetch may start (or
    is under way), and `refresh()` waits for it."""

    def __init__(self, method: JwtMethod, *, clock: IReactorTime, fetch: Fetch | None) -> None:
        self._method = method
        self._clock = clock
        self._fetch = fetch
        self._static: Any = None
        """The PEM public key or the HMAC secret, when the method has one."""
        self._jwks: dict[str | None, list[Mapping[str, Any]]] = {}
        """The usable JWKs by kid (None for keys without one)."""
        self._parsed: dict[tuple[int, str], Any] = {}
        """(id of a JWK of `_jwks`, algorithm) -> its key for that algorithm, or None if it does not fit."""
        self.fetched_at: float | None = None
        """When the JWKS URL was last read successfully (by the clock)."""
        self._attempted_at: float | None = None
        self._inflight: Deferred[bytes] | None = None
        self._waiters: list[Deferred[None]] = []
        self._closed = False
        if method.public_key_pem is not None:
            self._static = serialization.load_pem_public_key(method.public_key_pem)
        elif method.secret is not None:
            self._static = method.secret
        elif method.jwks is not None:
            self._load(method.jwks)
        if method.jwks_url is not None and fetch is None:
            raise ValueError("a method with a jwks_url needs a fetch function")

    @property
    def remote(self) -> bool:
        """Whether the keys come from a JWKS URL."""
        return self._method.jwks_url is not None

    @property
    def unavailable(self) -> bool:
        """Whether the keys come from a URL no key set was ever fetched from: the method cannot decide."""
        return self.remote and self.fetched_at is None

    @property
    def key_count(self) -> int:
        return 1 if self._static is not None else sum(map(len, self._jwks.values()))

    @property
    def waiting(self) -> int:
        """Verifications waiting for the fetch under way."""
        return len(self._waiters)

    def key(self, kid: str | None, algorithm: str) -> Any | None:
        """The key that verifies `algorithm` signatures for `kid`, or None if there is none (yet)."""
        if self._static is not None:
            return self._static
        if kid is None:
            fitting = [
                key for jwks in self._jwks.values() for jwk in jwks if (key := self._fits(jwk, algorithm)) is not None
            ]
            return fitting[0] if len(fitting) == 1 else None  # with several, which one did the issuer mean?
        for jwk in self._jwks.get(kid, ()):
            key = self._fits(jwk, algorithm)
            if key is not None:
                return key
        return None

    def may_refresh(self) -> bool:
        """Whether a token waiting for keys may wait: a fetch is under way, or one may start now (the keys come
        from a URL, and the last attempt is at least `jwks_refresh_interval` old)."""
        if not self.remote or self._closed:
            return False
        if self._inflight is not None:
            return True
        return self._attempted_at is None or (
            self._clock.seconds() - self._attempted_at >= self._method.jwks_refresh_interval
        )

    def refresh(self) -> Deferred[None]:
        """Fetch the keys, or join the fetch under way. Fires with None when it is over, whatever its outcome;
        cancelling the Deferred leaves the fetch running for everyone else."""
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        if self._inflight is None:
            self._start_fetch()
        return waiter

    def refresh_if_stale(self) -> None:
        """Start a background fetch when the keys are older than `jwks_max_age` (nobody waits for it)."""
        if (
            self.fetched_at is not None
            and self._inflight is None
            and self._clock.seconds() - self.fetched_at >= self._method.jwks_max_age
            and self.may_refresh()
        ):
            self._start_fetch()

    def close(self) -> None:
        """Stop the fetch under way (its waiters are answered) and start no other."""
        self._closed = True
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()

    # --- internals --------------------------------------------------------------------------------------------

    def _forget(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _start_fetch(self) -> None:
        assert self._fetch is not None and self._method.jwks_url is not None
        self._attempted_at = self._clock.seconds()
        url = self._method.jwks_url
        fetching: Deferred[bytes]
        try:
            fetching = self._fetch(url, self._method.jwks_fetch_timeout)
        except Exception:
            fetching = Deferred()
            fetching.errback(Failure())
        self._inflight = fetching
        fetching.addCallbacks(self._fetched, self._fetch_failed, callbackArgs=(url,), errbackArgs=(url,))
        fetching.addBoth(self._fetch_done, fetching)

    def _fetched(self, body: bytes, url: str) -> None:
        try:
            jwks = json.loads(body)
            if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                raise ValueError('not a JSON Web Key Set (an object with a "keys" array)')
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested thousands deep
            self._fetch_failed(Failure(e), url)
            return
        entries = _signing_keys(jwks)
        if not entries and self._jwks:
            # A set with no key that could verify anything: taken as a broken endpoint (a key rotation adds the
            # new key before removing the old one), not as an order to refuse every token.
            self._fetch_failed(Failure(ValueError("the key set holds no signing key")), url)
            return
        self._jwks, self._parsed = entries, {}
        self.fetched_at = self._clock.seconds()
        _log.info("JWKS fetched from {url}: {count} usable keys", url=url, count=self.key_count)

    def _fetch_failed(self, reason: Failure, url: str) -> None:
        if self._closed and reason.check(CancelledError):
            return  # stopped by close(): not a failure of the endpoint
        kept = "no keys are known yet" if self.fetched_at is None else "the keys fetched before stay in use"
        _log.warn(
            "JWKS fetch from {url} failed ({kept}): {reason}", url=url, kept=kept, reason=reason.getErrorMessage()
        )

    def _fetch_done(self, _: object, fetching: Deferred[Any]) -> None:
        if self._inflight is fetching:
            self._inflight = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _load(self, jwks: Mapping[str, Any]) -> None:
        self._jwks = _signing_keys(jwks)
        self._parsed = {}

    def _fits(self, jwk: Mapping[str, Any], algorithm: str) -> Any | None:
        """The key of `jwk` for `algorithm`, if it is of that algorithm's kind (parsed once per key set)."""
        cache_key = (id(jwk), algorithm)
        try:
            return self._parsed[cache_key]
        except KeyError:
            pass
        key = None
        if (
            algorithm not in HMAC_ALGORITHMS
            and jwk.get("kty") == _KTY.get(algorithm[:2])
            and jwk.get("alg", algorithm) == algorithm
        ):
            key = _parse(jwk, algorithm)
        self._parsed[cache_key] = key
        return key


def _parse(jwk: Mapping[str, Any], algorithm: str) -> Any | None:
    """The public key of `jwk` for `algorithm`, or None when it cannot be one (malformed, the wrong curve, shorter
    than PyJWT recommends: it would warn on every verification)."""
    try:
        parsed = jwt.PyJWK(dict(jwk), algorithm=algorithm)
        weak = parsed.Algorithm.check_key_length(parsed.key)
    except Exception:  # a key set is the endpoint's input: whatever PyJWK makes of a bad key, it is not used
        return None
    if weak or wrong_key_type(parsed.key, algorithm):
        return None
    return parsed.key


def _signing_keys(jwks: Mapping[str, Any]) -> dict[str | None, list[Mapping[str, Any]]]:
    """The JWKs of a set that may verify signatures, by kid (None for those without one)."""
    by_kid: dict[str | None, list[Mapping[str, Any]]] = {}
    for entry in jwks.get("keys", ()):
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # "oct" (an HMAC secret) never comes from a key set; unknown kinds are skipped
        if entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        by_kid.setdefault(kid if isinstance(kid, str) else None, []).append(entry)
    return by_kid
