"""API keys: minting them, hashing them, and the method that admits a request by one.

Rule: the gateway never holds a key, only its SHA-256. A minted key is 256 random bits, printed once; the config
keeps `sha256:<hex>`, and a request's key is hashed and looked up (one hash and one dict lookup per request, so
API-key auth costs next to nothing). Keys have no dots, so a bearer value that looks like a JWT is left to the JWT
methods of the route.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import cast

from twisted.internet.defer import Deferred

from gateway.auth.credentials import MALFORMED, Malformed, challenge, looks_like_jwt, split_authorization
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings.model import ApiKeyMethod, Consumer, KeyHeader
from gateway.http1.fields import HeaderLookup

__all__ = ["ApiKeyAuthenticator", "hash_key", "mint_key"]

KEY_PREFIX = "gwk_"
"""Minted keys start with this, so a leaked one is recognisable (secret scanners look for such prefixes)."""
_KEY = re.compile(rb"[\x21-\x7e]{1,512}")
CLAIMANT_CHARACTERS = 8
"""How much of a key tells its holder's failures apart from others' behind the same address: its first 8
characters ("gwk_" and 24 random bits of a minted key), and never more than half of a short key."""
_Key = tuple[KeyHeader, bytes | Malformed]
"""A credential: the header it came in and the key, or `MALFORMED` when that header was sent more than once."""


def mint_key() -> str:
    """A new API key: the prefix and 256 random bits, base64url."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str | bytes) -> str:
    """How the config stores `key`."""
    data = key.encode("ascii") if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ApiKeyAuthenticator:
    """Admits a request whose key (in the first of the method's headers that is present) hashes to a key of a
    declared consumer."""

    guessable = False  # keys are not passwords (see Authenticator.guessable)

    def __init__(self, method: ApiKeyMethod, consumers: Mapping[str, Consumer], *, realm: str) -> None:
        self.name = method.name
        self._headers = method.headers
        self._realm = realm
        self._by_hash = {
            bytes.fromhex(digest.removeprefix("sha256:")): consumer
            for consumer in consumers.values()
            for digest in consumer.api_key_hashes
        }
        """The SHA-256 digest of each key -> its consumer."""
        self._where = [(where.name.lower(), where) for where in self._headers]
        self._identities: dict[tuple[str, bytes], Identity] = {}
        """(consumer, header) -> its identity, made once: the same object every time, so what depends on it
        (the headers set upstream) is made once too."""

    def credential(self, headers: HeaderLookup) -> _Key | None:
        for name, where in self._where:
            values = headers.getRawHeaders(name)
            if not values:
                continue
            if len(values) != 1:
                return where, MALFORMED
            value = values[0]
            if where.scheme is None:
                return where, value.strip(b" \t")
            parts = split_authorization(value)
            if parts is None or parts[0] != where.scheme:
                continue  # another scheme (Basic, say): another method's credential
            if looks_like_jwt(parts[1]):
                continue  # a JWT: for the route's JWT methods
            return where, parts[1]
        return None

    def claimant(self, credential: object) -> bytes | None:
        """The key's first characters (`CLAIMANT_CHARACTERS`): a client with a revoked key is refused on its own,
        while one trying many keys runs into its address's ceiling."""
        _, key = cast(_Key, credential)  # what `credential` returned: the gatekeeper hands it back as it was
        if isinstance(key, Malformed):
            return None
        return b"api_key\0" + key[: min(CLAIMANT_CHARACTERS, len(key) // 2)]

    def verifies_cheaply(self, credential: object) -> bool:
        """True: any key is checked by one SHA-256 digest looked up."""
        return True

    def verify(self, credential: object, request: AuthRequest) -> Identity:
        where, key = cast(_Key, credential)  # what `credential` returned: the gatekeeper hands it back as it was
        if isinstance(key, Malformed) or not _KEY.fullmatch(key):
            raise AuthFailure(
                "malformed_key", "the API key header is malformed or sent more than once", bearer_error=_bearer(where)
            )
        consumer = self._by_hash.get(hashlib.sha256(key).digest())
        if consumer is None:
            raise AuthFailure("invalid_key", "the API key is not valid", bearer_error=_bearer(where, "invalid_token"))
        identity = self._identities.get((consumer.name, where.name))
        if identity is None:
            identity = self._identities[consumer.name, where.name] = Identity(
                consumer=consumer.name,
                scopes=consumer.scopes,
                method=self.name,
                credential_headers=(where.name,),
                declared=True,
            )
        return identity

    def challenge(self, failure: AuthFailure | None) -> bytes:
        where = self._headers[0]
        if where.scheme is not None:
            params = {"realm": self._realm}
            if failure is not None and failure.bearer_error:
                params["error"] = failure.bearer_error
                params["error_description"] = failure.detail
            return challenge(where.scheme.decode("ascii").capitalize(), **params)
        return challenge("ApiKey", realm=self._realm, header=where.name.decode("ascii"))

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset()

    def close(self) -> Deferred[None] | None:
        return None


def _bearer(where: KeyHeader, error: str = "invalid_request") -> str | None:
    return error if where.scheme == b"bearer" else None
