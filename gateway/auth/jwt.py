"""Bearer JWTs of one issuer, verified with PyJWT: the method that admits a request by a signed token.

Rules:
* The token's header names its algorithm, and it is refused unless the method allows that algorithm (never
  `none`; never HMAC on a public-key method); the key comes from the method (`gateway.auth.jwks`), of the kind
  that algorithm needs. `iss`, `aud`, `exp` (required unless configured otherwise) and `nbf` are checked, with the
  method's leeway.
* A token is verified once: a verified token is remembered until it expires (for five minutes at most, and at
  most `cache_size` of them), so a client sending the same token on every request costs a dict lookup, not an
  RSA verification.
* A token that fails says why in a short, fixed sentence (RFC 6750's `invalid_token`), never echoing the token.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

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
from gateway.auth.jwks import Fetch, KeySource, treq_fetcher
from gateway.auth.settings import JwtMethod
from gateway.errors import AuthUnavailable

__all__ = ["JwtAuthenticator"]

MAX_CACHE_SECONDS = 300.0
"""How long a verified token is remembered at most, even if it expires later: a key removed from the issuer's
set stops admitting its tokens within this time."""
_VISIBLE = re.compile(r"[\x21-\x7e]{1,256}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{0,1024}")

# PyJWT's exceptions, most specific first (InvalidSignatureError is a DecodeError, and all are InvalidTokenErrors).
_FAILURES: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is not meant for this service"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token's issuer is not accepted"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature is not valid"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token_algorithm_refused", "the token's algorithm is not accepted"),
    (jwt.DecodeError, "malformed_token", "the token cannot be read"),
    (jwt.InvalidTokenError, "invalid_token", "the token is not valid"),
]


def _failure(reason: str, detail: str) -> AuthFailure:
    return AuthFailure(reason, detail, bearer_error="invalid_token")


class JwtAuthenticator:
    """Admits a request whose bearer JWT, of this method's issuer, verifies."""

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
        self._close_fetcher: Callable[[], Deferred[None]] | None = None
        if method.jwks_url is not None and fetch is None:
            fetch, self._close_fetcher = treq_fetcher(reactor if reactor is not None else clock)
        self._keys = KeySource(method, clock=clock, fetch=fetch)
        self._verified: dict[bytes, tuple[Identity, float]] = {}
        """Token -> (its identity, until when it is taken without verifying it again)."""
        self._require = ["exp"] if method.require_exp else []
        self._audiences = list(method.audiences)
        self._issuer = method.issuer.encode("utf-8")

    # --- Authenticator ----------------------------------------------------------------------------------------

    def credential(self, headers: Headers) -> bytes | object | None:
        value = authorization(headers.getRawHeaders(b"authorization"))
        if value is None or value is MALFORMED:
            return value
        parts = split_authorization(value)  # type: ignore[arg-type]
        if parts is None or parts[0] != b"bearer":
            return None
        token = parts[1]
        if token in self._verified:
            return token  # verified before, so of this issuer: skip reading its claims again
        if token68(token) is MALFORMED or not looks_like_jwt(token):
            return None  # an API key, perhaps: another method's
        claims = unverified_claims(token)
        if claims is None or claims.get("iss") != self._method.issuer:
            return None  # another issuer's token is another method's
        return token

    def verify(self, credential: object, request: AuthRequest) -> Identity | Deferred[Identity]:
        if credential is MALFORMED:
            raise AuthFailure("malformed_credentials", "send one Authorization header", bearer_error="invalid_request")
        assert isinstance(credential, bytes)
        token = credential
        cached = self._verified.get(token)
        if cached is not None:
            if cached[1] > self._clock.seconds():
                return cached[0]
            del self._verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _failure("malformed_token", "the token cannot be read") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._method.algorithms:
            raise _failure("token_algorithm_refused", "the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _failure("malformed_token", "the token cannot be read")
        keys = self._keys
        key = keys.key(kid, algorithm)
        if key is not None:
            keys.refresh_if_stale()
            return self._decode(token, key, algorithm)
        if not keys.may_refresh():
            if not keys.has_keys:
                raise AuthUnavailable("the token's keys could not be fetched", reason="jwks_unavailable")
            raise _failure("unknown_key", "the token's key is not known")
        return keys.refresh().addCallback(lambda _: self._after_refresh(token, kid, algorithm))

    def challenge(self, failure: AuthFailure | None) -> bytes:
        if failure is not None and failure.bearer_error:
            return challenge("Bearer", realm=self._realm, error=failure.bearer_error, error_description=failure.detail)
        return challenge("Bearer", realm=self._realm)

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset(name.lower() for name, _ in self._method.claim_headers)

    def close(self) -> Deferred[None] | None:
        self._keys.close()
        return self._close_fetcher() if self._close_fetcher is not None else None

    # --- internals --------------------------------------------------------------------------------------------

    def _after_refresh(self, token: bytes, kid: str | None, algorithm: str) -> Identity:
        key = self._keys.key(kid, algorithm)
        if key is None:
            if not self._keys.has_keys:
                raise AuthUnavailable("the token's keys could not be fetched", reason="jwks_unavailable")
            raise _failure("unknown_key", "the token's key is not known")
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
            for kind, reason, detail in _FAILURES:
                if isinstance(e, kind):
                    raise _failure(reason, detail) from None
            raise _failure("invalid_token", "the token is not valid") from None
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
            value = claims.get(name)
            if isinstance(value, str):
                scopes.update(value.split())
            elif isinstance(value, list):
                scopes.update(v for v in value if isinstance(v, str) and v and " " not in v)
        headers = []
        for header, claim in method.claim_headers:
            text = _header_text(claims.get(claim))
            if text is not None:
                headers.append((header, text.encode("ascii")))
        return Identity(
            consumer=consumer,
            scopes=frozenset(s for s in scopes if _VISIBLE.fullmatch(s)),
            method=self.name,
            headers=tuple(headers),
            credential_headers=(b"authorization",),
        )

    def _remember(self, token: bytes, identity: Identity, exp: object) -> None:
        lifetime = MAX_CACHE_SECONDS
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            lifetime = min(lifetime, exp - time.time())  # PyJWT judged exp by the wall clock; so does this
        if lifetime <= 0:
            return
        cache = self._verified
        if len(cache) >= self._method.cache_size:
            del cache[next(iter(cache))]  # the oldest entry
        cache[token] = (identity, self._clock.seconds() + lifetime)


def _header_text(value: object) -> str | None:
    """A claim as a header value: a string, a number or a boolean, or a list of them joined by commas; None for
    anything else or anything a header cannot carry."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        text = ",".join(str(v) for v in value)
    else:
        return None
    return text if _HEADER_VALUE.fullmatch(text) else None
