"""The keys of one JWT method: a PEM key, an HMAC secret, a JWKS file, or a JWKS URL fetched with treq.

Rules:
* A key is used only for the algorithm family it belongs to: RSA keys for RS*/PS*, EC keys of the matching curve
  for ES*, OKP keys for EdDSA; a JWKS never supplies an HMAC secret (kty "oct" is ignored), and a JWK whose
  `alg` or `use` says otherwise is not used. So a token cannot pick how its signature is checked.
* A JWKS URL is fetched without blocking the reactor (treq, never PyJWT's blocking `PyJWKClient`), on first
  use; again when a token names an unknown `kid`, but at most once per `jwks_refresh_interval` whatever the
  tokens say; and in the background when the keys are older than `jwks_max_age`. Waiting verifications share
  one fetch. A failed fetch keeps the keys there were: only a method that never had keys cannot decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import treq
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from gateway.auth.settings import HMAC_ALGORITHMS, JwtMethod, wrong_key_type

__all__ = ["Fetch", "KeySource", "treq_fetcher"]

_log = Logger()

MAX_JWKS_BYTES = 1024 * 1024
"""The largest JWKS document taken: a key set is a few KiB; more is an endpoint gone wrong."""

Fetch = Callable[[str, float], "Deferred[bytes]"]
"""Fetches a URL's body within a timeout; errbacks on any failure (status other than 200 included)."""

_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class FetchFailed(Exception):
    """The JWKS endpoint could not be read."""


class _TooLong(Exception):
    pass


def treq_fetcher(reactor: Any) -> tuple[Fetch, Callable[[], Deferred[None]]]:
    """A fetch function over treq with its own persistent pool, and the function that closes that pool."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    pool.cachedConnectionTimeout = 30

    async def fetch(url: str, timeout: float) -> bytes:
        client = treq.client.HTTPClient(Agent(reactor, connectTimeout=timeout, pool=pool))
        response = await client.get(url, timeout=timeout, allow_redirects=False)
        if response.code != 200:
            await treq.collect(response, lambda _: None)
            raise FetchFailed(f"the JWKS endpoint answered {response.code}")
        parts: list[bytes] = []
        size = 0

        def keep(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_JWKS_BYTES:
                raise _TooLong()
            parts.append(data)

        try:
            await treq.collect(response, keep)
        except _TooLong:
            raise FetchFailed(f"the JWKS document is over {MAX_JWKS_BYTES} bytes") from None
        return b"".join(parts)

    def start(url: str, timeout: float) -> Deferred[bytes]:
        return ensureDeferred(fetch(url, timeout)).addTimeout(timeout, reactor)

    return start, pool.closeCachedConnections


class KeySource:
    """Finds the key that verifies a token of one method, fetching the method's JWKS when it must."""

    def __init__(self, method: JwtMethod, *, clock: IReactorTime, fetch: Fetch | None) -> None:
        self._method = method
        self._clock = clock
        self._fetch = fetch
        self._static: Any = None
        """The PEM public key or HMAC secret, when the method has one."""
        self._jwks: dict[str | None, list[Mapping[str, Any]]] = {}
        """JWKs by kid (None for keys without one)."""
        self._parsed: dict[tuple[int, str], Any] = {}
        self.fetched_at: float | None = None
        """When the JWKS URL was last read successfully."""
        self._attempted_at: float | None = None
        self._inflight: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        if method.public_key_pem is not None:
            self._static = serialization.load_pem_public_key(method.public_key_pem)
        elif method.secret is not None:
            self._static = method.secret
        elif method.jwks is not None:
            self._load(method.jwks)

    @property
    def remote(self) -> bool:
        return self._method.jwks_url is not None

    @property
    def has_keys(self) -> bool:
        return self._static is not None or bool(self._jwks)

    def key(self, kid: str | None, algorithm: str) -> Any | None:
        """The key that verifies `algorithm` signatures for `kid`, or None if there is none (yet)."""
        if self._static is not None:
            return self._static
        candidates = self._jwks.get(kid)
        if kid is None and candidates is None:
            # No kid in the token: only unambiguous when the set has exactly one key (of any kid) that fits.
            fitting = [k for ks in self._jwks.values() for k in ks if self._fits(k, algorithm) is not None]
            return self._fits(fitting[0], algorithm) if len(fitting) == 1 else None
        for jwk_data in candidates or ():
            key = self._fits(jwk_data, algorithm)
            if key is not None:
                return key
        return None

    def may_refresh(self) -> bool:
        """Whether a fetch may start now (the URL is there, and the last attempt is old enough)."""
        if not self.remote:
            return False
        if self._inflight is not None:
            return True
        return self._attempted_at is None or self._clock.seconds() - self._attempted_at >= (
            self._method.jwks_refresh_interval
        )

    def refresh(self) -> Deferred[None]:
        """Fetch the keys (or join the fetch under way); fires when it is over, whatever its outcome."""
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        if self._inflight is None:
            self._start_fetch()
        return waiter

    def refresh_if_stale(self) -> None:
        """Start a background fetch when the keys are older than jwks_max_age (nobody waits for it)."""
        if (
            self.remote
            and self._inflight is None
            and self.fetched_at is not None
            and self._clock.seconds() - self.fetched_at >= self._method.jwks_max_age
            and self.may_refresh()
        ):
            self._start_fetch()

    def close(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()

    # --- internals --------------------------------------------------------------------------------------------

    def _start_fetch(self) -> None:
        assert self._fetch is not None and self._method.jwks_url is not None
        self._attempted_at = self._clock.seconds()
        url = self._method.jwks_url
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
        except ValueError as e:
            _log.warn("JWKS from {url} not used: {reason}", url=url, reason=str(e))
            return
        self._load(jwks)
        self.fetched_at = self._clock.seconds()
        _log.info("JWKS fetched from {url}: {count} keys", url=url, count=sum(map(len, self._jwks.values())))

    def _fetch_failed(self, reason: Failure, url: str) -> None:
        kept = "the keys fetched before stay in use" if self._jwks else "no keys are known yet"
        _log.warn(
            "JWKS fetch from {url} failed ({kept}): {reason}", url=url, kept=kept, reason=reason.getErrorMessage()
        )

    def _fetch_done(self, _: object, fetching: Deferred[None]) -> None:
        if self._inflight is fetching:
            self._inflight = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _load(self, jwks: Mapping[str, Any]) -> None:
        by_kid: dict[str | None, list[Mapping[str, Any]]] = {}
        for entry in jwks.get("keys", ()):
            if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
                continue  # "oct" (an HMAC secret) never comes from a key set; unknown kinds are skipped
            if entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            by_kid.setdefault(kid if isinstance(kid, str) else None, []).append(entry)
        self._jwks = by_kid
        self._parsed = {}

    def _fits(self, jwk_data: Mapping[str, Any], algorithm: str) -> Any | None:
        """The key of `jwk_data` for `algorithm`, if it is of that algorithm's kind."""
        cache_key = (id(jwk_data), algorithm)
        if cache_key in self._parsed:
            return self._parsed[cache_key]
        key = None
        if (
            algorithm not in HMAC_ALGORITHMS
            and jwk_data.get("kty") == _KTY.get(algorithm[:2])
            and jwk_data.get("alg", algorithm) == algorithm
        ):
            try:
                candidate = jwt.PyJWK(dict(jwk_data), algorithm=algorithm).key
            except (jwt.exceptions.PyJWKError, jwt.exceptions.InvalidKeyError, ValueError, TypeError):
                candidate = None
            if candidate is not None and not wrong_key_type(candidate, algorithm):
                key = candidate
        self._parsed[cache_key] = key
        return key

    def ready(self) -> Deferred[None]:
        """Fires once keys are at hand (at once if they are), after a fetch when there are none."""
        if self.has_keys or not self.may_refresh():
            return succeed(None)
        return self.refresh()
