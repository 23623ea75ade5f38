"""Bearer JWTs of one issuer, verified with PyJWT: the method that admits a request by a signed token.

Rules:
* The token's header names its algorithm, and the token is refused unless the method allows that algorithm
  (never `none`; never HMAC on a public-key method: settings forbid mixing them); the key comes from
  `gateway.auth.jwks`, of the kind that algorithm needs. `iss`, `aud`, `exp` (required unless configured
  otherwise), `nbf` and the consumer claim are checked, with the method's leeway.
* A token is verified once: a verified token is remembered until it expires (for five minutes at most, and at
  most `cache_size` of them), so a client sending the same token on every request costs a dict lookup, not a
  signature check. Only successes are remembered.
* `verify` answers at once whenever the keys are at hand, and returns a Deferred only while the key set is being
  fetched.
* A token that fails says why in a short, fixed sentence (RFC 6750's `invalid_token`), never echoing the token
  or anything read from it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.auth.credentials import (
    MALFORMED,
    authorization,
    challenge,
    looks_like_jwt,
    split_authorization,
    token68,
    unverified_claims,
)
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.jwks import Fetch, KeySource, TreqFetcher
from gateway.auth.settings.model import JwtMethod
from gateway.errors import AuthUnavailable
from gateway.http1.fields import HeaderLookup

__all__ = ["MAX_CACHE_SECONDS", "JwtAuthenticator"]

_log = Logger()

MAX_CACHED_TOKEN = 4096
"""The longest token remembered (real ones are about 1 KiB): the cache holds at most `cache_size` times this."""
MAX_CACHE_SECONDS = 300.0
"""How long a verified token is remembered at most, even if it expires later: a key removed from the issuer's
set stops admitting its tokens within this time."""
MAX_HEADER_VALUE = 1024
"""The longest claim value sent upstream in a header; a longer one is left out."""

_VISIBLE = re.compile(r"[\x21-\x7e]{1,256}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")

# PyJWT's exceptions, most specific first (InvalidSignatureError is a DecodeError, and all are InvalidTokenErrors).
_FAILURES: tuple[tuple[type[jwt.InvalidTokenError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is not meant for this service"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token's issuer is not accepted"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature is not valid"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token_algorithm_refused", "the token's algorithm is not accepted"),
    (jwt.DecodeError, "malformed_token", "the token cannot be read"),
)


def _failure(reason: str, detail: str) -> AuthFailure:
    return AuthFailure(reason, detail, bearer_error="invalid_token")


def _refusal(error: jwt.InvalidTokenError) -> AuthFailure:
    """The AuthFailure for what PyJWT found wrong with a token."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        # The claim is one this method requires (or iss/aud), never a name the token chose.
        return _failure("missing_claim", f"the token lacks the {error.claim} claim")
    for kind, reason, detail in _FAILURES:
        if isinstance(error, kind):
            return _failure(reason, detail)
    return _failure("invalid_token", "the token is not valid")


class JwtAuthenticator:
    """Admits a request whose bearer JWT, of this method's issuer, verifies; remembers the tokens it verified.

    `fetch(url, timeout)` reads a JWKS document; without one, a method with a `jwks_url` uses a `TreqFetcher` on
    `reactor` (or `clock`), which `close` closes."""

    guessable = False  # signed tokens

    def __init__(
        self,
        method: JwtMethod,
        *,
        clock: IReactorTime,
        realm: str,
        fetch: Fetch | None = None,
        reactor: Any = None,
    ) -> None:
        self.name = method.name
        self._method = method
        self._clock = clock
        self._realm = realm
        self._fetcher: TreqFetcher | None = None
        if method.jwks_url is not None and fetch is None:
            self._fetcher = fetch = TreqFetcher(reactor if reactor is not None else clock)
        self.keys = KeySource(method, clock=clock, fetch=fetch)
        """Where the method's keys come from (read-only outside this class)."""
        if method.jwks_url is not None and urlsplit(method.jwks_url).scheme == "http":
            _log.warn(
                "JWT method {method} fetches its keys over plain http ({url}): whoever can change that traffic can "
                "make the gateway accept tokens they sign; use https outside a trusted network",
                method=method.name,
                url=method.jwks_url,
            )
        self._verified: dict[bytes, tuple[Identity, float]] = {}
        """Token -> (its identity, until when by the clock it is taken without verifying it again); oldest first."""
        self._require = list(dict.fromkeys([*(["exp"] if method.require_exp else []), method.consumer_claim]))
        self._audiences = list(method.audiences)

    # --- Authenticator ----------------------------------------------------------------------------------------

    def credential(self, headers: HeaderLookup) -> object | None:
        value = authorization(headers.getRawHeaders(b"authorization"))
        if not isinstance(value, bytes):
            return value  # None (no Authorization) or MALFORMED (several)
        parts = split_authorization(value)
        if parts is None or parts[0] != b"bearer":
            return None
        token = parts[1]
        if token in self._verified:
            return token  # verified before, so of this issuer: no need to read its claims again
        if token68(token) is MALFORMED or not looks_like_jwt(token):
            return None  # an API key, perhaps: another method's
        claims = unverified_claims(token)
        if claims is None or claims.get("iss") != self._method.issuer:
            return None  # another issuer's token is another method's
        return token

    def claimant(self, credential: object) -> bytes | None:
        """The token's signature: a client resending its expired token is refused on its own, not everyone
        behind its address (tokens cannot be guessed, so one budget per token costs nothing; a client making up
        tokens runs into its address's ceiling)."""
        if not isinstance(credential, bytes):
            return None
        return b"jwt\0" + credential.rpartition(b".")[2]

    def verifies_cheaply(self, credential: object) -> bool:
        """True for a token this method verified and still remembers (`verify` answers it from memory); any other
        costs a signature check, or a fetch of the keys."""
        if not isinstance(credential, bytes):
            return False
        cached = self._verified.get(credential)
        return cached is not None and cached[1] > self._clock.seconds()

    def verify(self, credential: object, request: AuthRequest) -> Identity | Deferred[Identity]:
        if credential is MALFORMED:
            raise AuthFailure("malformed_credentials", "send one Authorization header", bearer_error="invalid_request")
        if not isinstance(credential, bytes):
            raise _failure("malformed_token", "the token cannot be read")
        token = credential
        cached = self._verified.get(token)
        if cached is not None:
            if cached[1] > self._clock.seconds():
                return cached[0]
            del self._verified[token]
        algorithm, kid = self._header(token)
        keys = self.keys
        key = keys.key(kid, algorithm)
        if key is not None:
            keys.refresh_if_stale()
            return self._decode(token, key, algorithm)
        if not keys.may_refresh():
            raise self._no_key()
        return keys.refresh().addCallback(lambda _: self._after_refresh(token, kid, algorithm))

    def challenge(self, failure: AuthFailure | None) -> bytes:
        if failure is not None and failure.bearer_error:
            return challenge("Bearer", realm=self._realm, error=failure.bearer_error, error_description=failure.detail)
        return challenge("Bearer", realm=self._realm)

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset(name.lower() for name, _ in self._method.claim_headers)

    def close(self) -> Deferred[None] | None:
        self.keys.close()
        return self._fetcher.close() if self._fetcher is not None else None

    # --- internals --------------------------------------------------------------------------------------------

    def _header(self, token: bytes) -> tuple[str, str | None]:
        """The token's (allowed) algorithm and its kid, read before anything is verified."""
        try:
            header = jwt.get_unverified_header(token)  # also refuses a kid that is not a string
        except jwt.InvalidTokenError:
            raise _failure("malformed_token", "the token cannot be read") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._method.algorithms:
            raise _failure("token_algorithm_refused", "the token's algorithm is not accepted")
        return algorithm, header.get("kid")

    def _no_key(self) -> Exception:
        if self.keys.unavailable:
            return AuthUnavailable("the token's keys could not be fetched", reason="jwks_unavailable")
        return _failure("unknown_key", "the token's key is not known")

    def _after_refresh(self, token: bytes, kid: str | None, algorithm: str) -> Identity:
        key = self.keys.key(kid, algorithm)
        if key is None:
            raise self._no_key()
        return self._decode(token, key, algorithm)

    def _decode(self, token: bytes, key: Any, algorithm: str) -> Identity:
        method = self._method
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audiences,
                issuer=method.issuer,
                leeway=method.leeway,
                options={"require": self._require},
            )
        except jwt.InvalidTokenError as e:
            raise _refusal(e) from None
        except jwt.PyJWTError as e:  # InvalidKeyError: the configured key itself cannot be used
            _log.error(
                "JWT method {method}: its key cannot verify {alg}: {error}", method=self.name, alg=algorithm, error=e
            )
            raise AuthUnavailable("the token's key cannot be used", reason="jwt_key_unusable") from None
        identity = self._identity(claims)
        self._remember(token, identity, claims.get("exp"))
        return identity

    def _identity(self, claims: dict[str, Any]) -> Identity:
        method = self._method
        consumer = claims.get(method.consumer_claim)
        if not isinstance(consumer, str) or not _VISIBLE.fullmatch(consumer):
            raise _failure("missing_claim", f"the token lacks a usable {method.consumer_claim} claim")
        scopes: set[str] = set()
        for name in method.scope_claims:
            scopes.update(_scopes(claims.get(name)))
        headers = []
        for header, claim in method.claim_headers:
            text = _header_text(claims.get(claim))
            if text is not None:
                headers.append((header, text.encode("ascii")))
        return Identity(
            consumer=consumer,
            scopes=frozenset(scopes),
            method=self.name,
            headers=tuple(headers),
            credential_headers=(b"authorization",),
        )

    def _remember(self, token: bytes, identity: Identity, exp: object) -> None:
        lifetime = MAX_CACHE_SECONDS
        if exp is not None:
            try:
                expires = int(exp)  # type: ignore[call-overload]  # as PyJWT read it (it accepted the token)
            except (TypeError, ValueError, OverflowError):
                return
            # PyJWT judged exp by the wall clock, so the remaining lifetime is measured on it too, then kept on
            # the reactor's clock (which tests drive).
            lifetime = min(lifetime, expires - time.time())
        if lifetime <= 0 or len(token) > MAX_CACHED_TOKEN:
            return  # admitted within the leeway only, or too big to hold: verified again next time
        cache = self._verified
        if token not in cache and len(cache) >= self._method.cache_size:
            del cache[next(iter(cache))]  # the oldest entry
        cache[token] = (identity, self._clock.seconds() + lifetime)


def _scopes(value: object) -> Iterable[str]:
    """The scopes in a claim: a space-separated string (`scope`) or a list of strings (`scp`)."""
    if isinstance(value, str):
        words: Iterable[object] = value.split()
    elif isinstance(value, list):
        words = value
    else:
        return ()
    return (w for w in words if isinstance(w, str) and _VISIBLE.fullmatch(w))


def _scalar_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _header_text(value: object) -> str | None:
    """A claim as a header value: a string, a number or a boolean, or a list of them joined by commas; None for
    anything else, or anything a header cannot carry (control characters, non-ASCII, over 1 KiB)."""
    if isinstance(value, list):
        texts = [_scalar_text(v) for v in value]
        strings = [t for t in texts if t is not None]
        if len(strings) != len(texts):
            return None
        text: str | None = ",".join(strings)
    else:
        text = _scalar_text(value)
    if text is None or len(text) > MAX_HEADER_VALUE or not _HEADER_VALUE.fullmatch(text):
        return None
    return text
