"""How the values of the admission tables are read: header names, scopes, rates, a realm, a wait that may be zero,
and a file a table names (relative to the config file). As `gateway.config.values`' readers do, each raises
ValueError with the reason; none does I/O but `named_file`.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.auth.settings.model import RateLimit
from gateway.config.values import (
    Invalid,
    Table,
    describe,
    nonempty_string,
    positive_int,
    positive_seconds,
    string,
    string_list,
)

__all__ = [
    "TOKEN",
    "header_names",
    "named_file",
    "optional_header_name",
    "rate_limit",
    "realm",
    "scope_set",
    "seconds_or_zero",
]

TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP token: a header name, an auth scheme."""
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
"""A scope token (RFC 6749 section 3.3): visible ASCII but space, quote and backslash."""


def _token(value: object) -> str:
    """An HTTP token (`TOKEN`): a header name, an auth scheme."""
    text = nonempty_string(value)
    if not TOKEN.fullmatch(text):
        raise ValueError(f"must be a header name (letters, digits and -), got {text!r}")
    return text


def _header_name(value: object) -> bytes:
    """A header name, as bytes, in the case it was written."""
    return _token(value).encode("ascii")


def header_names(value: object) -> tuple[bytes, ...]:
    """An array of header names, lower-cased."""
    if not isinstance(value, list):
        raise ValueError(f"must be an array of header names, got {describe(value)}")
    return tuple(_header_name(v).lower() for v in value)


def optional_header_name(value: object) -> bytes:
    """A header name, or "" for none."""
    text = string(value)
    return _header_name(text) if text else b""


def scope_set(value: object) -> frozenset[str]:
    """An array of scopes (an empty one too)."""
    items = string_list(value) if value != [] else ()
    for item in items:
        if not _SCOPE.fullmatch(item):
            raise ValueError(f"a scope is one word of visible characters (no spaces or quotes), got {item!r}")
    return frozenset(items)


_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(ms|s|m|h)\s*")


def _rate(value: object) -> tuple[int, float]:
    """A rate such as "100/s", "600/m", "5/10s"."""
    text = nonempty_string(value)
    m = _RATE.fullmatch(text.lower())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f'must be a rate such as "100/s", "600/m" or "5/10s", got {text!r}')
    count = int(m.group(1))
    period = float(m.group(2) or 1) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(3)]
    if period <= 0:
        raise ValueError(f"must have a positive period, got {text!r}")
    return count, period


def rate_limit(t: Table) -> RateLimit:
    """A rate-limit table: `rate` ("100/s"), and `burst` (the rate's count when not given)."""
    t.known(("rate", "burst"))
    rate = t.require("rate", _rate)
    burst = t.get("burst", positive_int, rate[0] if rate is not None else 1)
    t.finish()
    if rate is None:
        raise Invalid()
    return RateLimit(requests=rate[0], period=rate[1], burst=burst)


def realm(value: object) -> str:
    """The realm of a challenge: printable ASCII that needs no escaping in a quoted string."""
    text = nonempty_string(value)
    if not re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", text):
        raise ValueError(f"must be printable ASCII without quotes or backslashes, got {text!r}")
    return text


def seconds_or_zero(value: object) -> float:
    """Seconds as `positive_seconds` reads them, or zero (0, 0.0, "0s", "0ms"...) to turn a wait off."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and re.fullmatch(r"\s*0+(\.0+)?\s*(ms|s|m|h)\s*", value.lower()):
        return 0.0
    return positive_seconds(value)


def named_file(t: Table, key: str) -> tuple[Path, bytes]:
    """The path (relative to the config file's directory) and the bytes of a file the config names."""
    name = t.get(key, nonempty_string)
    path = Path(name)
    if not path.is_absolute():
        path = Path(t.source).parent / path
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise t.error(key, f"cannot read {path}: {e.strerror or e}") from None
