"""Credential headers, parsed: `Authorization` (RFC 9110 section 11.6.2), Bearer tokens (RFC 6750), Basic
(RFC 7617), and the challenges that invite them (WWW-Authenticate).

Rule: parsing never raises on client input. A value that is not a credential of the kind asked for is None;
one that claims the kind but is malformed is `MALFORMED`, so the method it names can refuse it with 401.
Pure functions over bytes; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Final

__all__ = [
    "MALFORMED",
    "Malformed",
    "authorization",
    "basic_credentials",
    "challenge",
    "looks_like_jwt",
    "split_authorization",
    "token68",
    "unverified_claims",
]


class Malformed:
    """A credential of the expected kind that cannot be read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED: Final = Malformed()

_SCHEME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_CLAIMS = 16 * 1024
"""The longest JWT payload whose claims are peeked at before verification (a header is at most 16 KiB anyway)."""


def authorization(values: Sequence[bytes] | None) -> bytes | Malformed | None:
    """The single Authorization value, None without one, `MALFORMED` when there are several (which one would
    the upstream believe?)."""
    if not values:
        return None
    if len(values) != 1:
        return MALFORMED
    return values[0]


def split_authorization(value: bytes) -> tuple[bytes, bytes] | None:
    """(lower-cased scheme, the rest stripped) of an Authorization value, or None if it has no valid scheme."""
    scheme, _, rest = value.strip(b" \t").partition(b" ")
    if not _SCHEME.fullmatch(scheme):
        return None
    return scheme.lower(), rest.strip(b" \t")


def token68(rest: bytes) -> bytes | Malformed:
    """The token68 of a credential (a Bearer token, Basic's base64), or `MALFORMED`."""
    return rest if _TOKEN68.fullmatch(rest) else MALFORMED


def basic_credentials(rest: bytes) -> tuple[str, bytes] | Malformed:
    """(user name, password) of a Basic credential (RFC 7617: base64 of "user:password", UTF-8), or `MALFORMED`."""
    if not _TOKEN68.fullmatch(rest):
        return MALFORMED
    try:
        decoded = base64.b64decode(rest, validate=True)
        user, sep, password = decoded.partition(b":")
        name = user.decode("utf-8")
    except (binascii.Error, ValueError):
        return MALFORMED
    if not sep or not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return MALFORMED
    return name, password


def looks_like_jwt(token: bytes) -> bool:
    """Whether a bearer token has a JWT's form (three base64url parts; minted API keys have no dots)."""
    return _JWT.fullmatch(token) is not None


def unverified_claims(token: bytes) -> dict[str, object] | None:
    """The claims of a JWT-shaped token, *not verified*: only to choose which method verifies it (by `iss`).
    None if the payload cannot be read."""
    parts = token.split(b".")
    if len(parts) != 3 or len(parts[1]) > _MAX_CLAIMS:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: "[[[[..." nested thousands deep
        return None
    return claims if isinstance(claims, dict) else None


_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _quoted(value: str) -> str:
    """`value` as a quoted-string (RFC 9110 section 5.6.4); control characters, which no header may carry, are
    dropped."""
    value = _UNQUOTABLE.sub("", value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(scheme: str, **params: str) -> bytes:
    """A WWW-Authenticate challenge: `scheme` and quoted parameters (`Bearer realm="api", error="invalid_token"`)."""
    if not params:
        return scheme.encode("ascii")
    text = ", ".join(f"{name}={_quoted(value)}" for name, value in params.items())
    return f"{scheme} {text}".encode("latin-1", "replace")
