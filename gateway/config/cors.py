"""A route's `cors` table (`[routes.cors]`), read into the frozen `CorsPolicy` the request path applies
(`gateway.routing.cors`).

Rule: what the Fetch standard makes a browser ignore or refuse is a config error, not a policy that silently fails
in the browser: `*` among the origins with credentials, `*` exposing headers to credentialed requests, an origin
with a path, `null` as an origin (the opaque origin of sandboxed frames and local files, which any page can forge).
"""

from __future__ import annotations

import re

from gateway.config.values import Table, boolean, describe, positive_seconds
from gateway.routing.cors import CorsPolicy

__all__ = ["CORS_KEYS", "read_cors"]

CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers", "allow_credentials", "max_age")

DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
"""The methods a preflight may ask for when the table does not say: those of a REST API."""

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_ORIGIN = re.compile(rf"(https?)://(\*\.)?({_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::([0-9]{{1,5}}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be an array of {what}, got {describe(value)}")
    return value


def _origin(text: str) -> tuple[str, bool]:
    """One entry of allow_origins, as the serialised origin a browser sends (lower-cased, without its scheme's
    default port), and whether it is a `*.` pattern."""
    if text.lower() == "null":
        raise ValueError(
            '"null" cannot be allowed: it is the origin of sandboxed frames and local files, which any page can take on'
        )
    m = _ORIGIN.fullmatch(text.lower())
    if m is None:
        hint = ' (an origin has no path, not even a trailing "/")' if text.count("/") > 2 else ""
        raise ValueError(
            'each origin must be "*", a scheme, host and optional port such as "https://app.example.com" or '
            f'"http://localhost:3000", or a pattern such as "https://*.example.com"{hint}, got {text!r}'
        )
    scheme, wildcard, host, port = m.groups()
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"has a port out of range, got {text!r}")
    if wildcard and host.startswith("["):
        raise ValueError(f'a "*." pattern takes a host name, not an address, got {text!r}')
    keep_port = port is not None and int(port) != _DEFAULT_PORTS[scheme]
    return f"{scheme}://{'*.' if wildcard else ''}{host}{':' + str(int(port)) if keep_port else ''}", bool(wildcard)


def _origins(value: object) -> tuple[frozenset[bytes], re.Pattern[bytes] | None, bool]:
    texts = _strings(value, 'origins such as ["https://app.example.com"]')
    if not texts:
        raise ValueError('must name at least one origin (or "*"); a route without CORS has no cors table')
    if "*" in texts:
        if len(texts) > 1:
            raise ValueError('"*" allows every origin: it cannot be listed with others')
        return frozenset(), None, True
    exact, patterns = set(), []
    for text in texts:
        origin, wildcard = _origin(text)
        if wildcard:
            scheme, _, rest = origin.partition("://*.")
            patterns.append(re.escape(f"{scheme}://") + rf"{_LABEL}(?:\.{_LABEL})*\." + re.escape(rest))
        else:
            exact.add(origin.encode("ascii"))
    pattern = re.compile("|".join(f"(?:{p})" for p in patterns).encode("ascii")) if patterns else None
    return frozenset(exact), pattern, False


def _methods(value: object) -> frozenset[bytes]:
    texts = _strings(value, 'method names such as ["GET", "PUT"]')
    for text in texts:
        if text == "*":
            raise ValueError('"*" is not allowed here: list the methods (a credentialed request cannot use "*")')
        if not _TOKEN.fullmatch(text):
            raise ValueError(f"{text!r} is not a method name")
        if text.upper() in ("CONNECT", "TRACE", "TRACK"):
            raise ValueError(f"{text!r} is forbidden in browsers (the Fetch standard): a preflight never asks for it")
    return frozenset(text.encode("ascii") for text in texts)


def _request_headers(value: object) -> tuple[frozenset[bytes], bool]:
    """Header names, lower-cased, and whether the array is `["*"]`."""
    texts = _strings(value, 'header names such as ["Authorization", "Content-Type"]')
    if "*" in texts:
        if len(texts) > 1:
            raise ValueError('"*" stands for every header: it cannot be listed with others')
        return frozenset(), True
    for text in texts:
        if not _TOKEN.fullmatch(text):
            raise ValueError(f"{text!r} is not a header name")
    return frozenset(text.lower().encode("ascii") for text in texts), False


def _expose(value: object) -> bytes:
    texts = _strings(value, 'header names such as ["ETag", "RateLimit"]')
    if "*" in texts and len(texts) > 1:
        raise ValueError('"*" stands for every header: it cannot be listed with others')
    for text in texts:
        if text != "*" and not _TOKEN.fullmatch(text):
            raise ValueError(f"{text!r} is not a header name")
    return ", ".join(texts).encode("ascii")


def _max_age(value: object) -> int:
    seconds = positive_seconds(value)
    if seconds < 1:
        raise ValueError(f"must be at least one second (browsers count whole seconds), got {value!r}")
    return int(seconds)


def read_cors(t: Table) -> CorsPolicy | None:
    """The policy of a route's `cors` table; None when a value was refused (recorded)."""
    t.known(CORS_KEYS)
    origins = t.require("allow_origins", _origins)
    methods = t.get("allow_methods", _methods, frozenset(m.encode("ascii") for m in DEFAULT_METHODS))
    no_headers: tuple[frozenset[bytes], bool] = (frozenset(), False)
    headers = t.get("allow_headers", _request_headers, no_headers)
    expose = t.get("expose_headers", _expose, b"")
    credentials = t.get("allow_credentials", boolean, False)
    max_age = t.get("max_age", _max_age, 0) or None
    t.finish()
    if origins is None:
        return None
    exact, pattern, any_origin = origins
    if credentials and any_origin:
        t.report(
            "allow_origins",
            '"*" cannot be used with allow_credentials = true: the Fetch standard has browsers refuse a '
            "credentialed response that does not name its origin; list the origins",
        )
        return None
    if credentials and expose == b"*":
        t.report(
            "expose_headers",
            '"*" exposes nothing to a credentialed request (with allow_credentials = true browsers read it as a '
            "header named *); list the headers",
        )
        return None
    if t.failed():
        return None
    return CorsPolicy(
        origins=exact,
        origin_pattern=pattern,
        any_origin=any_origin,
        credentials=credentials,
        methods=methods,
        request_headers=headers[0],
        any_request_header=headers[1],
        expose_headers=expose,
        max_age=max_age,
    )
