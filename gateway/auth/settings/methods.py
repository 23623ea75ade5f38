"""The `[auth.NAME]` tables: one reader per method type (`api_key`, `jwt`, `basic`, `forward`, `mtls`), each
giving its `Method`; a JWT method's key file is read and checked against its algorithms here, so `--check` and a
reload fail on a bad one before anything changes (the method gets the bytes, not the path).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypedDict
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from gateway.auth.settings.model import (
    GATEWAY_OWNED,
    HMAC_ALGORITHMS,
    JWT_ALGORITHMS,
    ApiKeyMethod,
    BasicMethod,
    ForwardMethod,
    JwtMethod,
    KeyHeader,
    Method,
    MtlsMethod,
    wrong_key_type,
)
from gateway.auth.settings.values import (
    TOKEN,
    header_names,
    named_file,
    optional_header_name,
    realm,
    seconds_or_zero,
)
from gateway.config.values import (
    Invalid,
    KiB,
    Table,
    boolean,
    describe,
    nonempty_string,
    positive_int,
    positive_seconds,
    positive_size,
    string_list,
)

__all__ = ["MIN_RSA_BITS", "read_method"]

_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048


def _key_header(value: object) -> KeyHeader:
    """ "X-API-Key" (the whole value is the key) or "Authorization: Bearer" (the value after the scheme)."""
    text = nonempty_string(value)
    name, sep, scheme = text.partition(":")
    if not TOKEN.fullmatch(name.strip()) or (sep and not TOKEN.fullmatch(scheme.strip())):
        raise ValueError(f'must be a header name, optionally with a scheme ("Authorization: Bearer"), got {text!r}')
    return KeyHeader(name.strip().lower().encode("ascii"), scheme.strip().lower().encode("ascii") if sep else None)


def _key_headers(value: object) -> tuple[KeyHeader, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'must be a non-empty array such as ["Authorization: Bearer", "X-API-Key"], got {value!r}')
    return tuple(_key_header(v) for v in value)


def _http_url(value: object) -> str:
    text = nonempty_string(value)
    if not text.isascii() or any(c.isspace() for c in text):
        raise ValueError(f"must be a URL of ASCII characters without spaces (percent-encode the rest), got {text!r}")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"must be an http or https URL without credentials, got {text!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ValueError(f"has an invalid port, got {text!r}") from None
    return text


def _plain_http_url(value: object) -> str:
    text = _http_url(value)
    if urlsplit(text).scheme != "http":
        raise ValueError(f"must be an http URL (https auth services come with the TLS work), got {text!r}")
    return text


def _algorithms(value: object) -> tuple[str, ...]:
    names = string_list(value)
    if not names:
        raise ValueError("must list at least one algorithm")
    for name in names:
        if name.lower() == "none":
            raise ValueError('"none" is never allowed: an unsigned token proves nothing')
        if name not in JWT_ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(JWT_ALGORITHMS))})")
    hmac = [n for n in names if n in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(names):
        raise ValueError(
            "HMAC algorithms (HS256/384/512) cannot be allowed with public-key ones in one method: a public key "
            "must never be usable as an HMAC secret (algorithm confusion); make a method for each"
        )
    return tuple(names)


def _claim(value: object) -> str:
    text = nonempty_string(value)
    if not re.fullmatch(r"[A-Za-z0-9_:./-]+", text):
        raise ValueError(f"must be a claim name, got {text!r}")
    return text


def _claim_headers(t: Table) -> tuple[tuple[bytes, str], ...]:
    pairs = []
    for header in t.names():
        if not TOKEN.fullmatch(header):
            t.report(header, "must be a header name")
            continue
        claim = t.require(header, _claim)
        if claim is not None:
            pairs.append((header.encode("ascii"), claim))
    t.finish()
    return tuple(pairs)


def _public_key_pem(t: Table, key: str, algorithms: tuple[str, ...]) -> bytes:
    path, data = named_file(t, key)
    public_key: PublicKeyTypes
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public_key = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
    except ValueError:
        raise t.error(key, f"{path} is not a PEM public key or certificate") from None
    for algorithm in algorithms:
        wrong = wrong_key_type(public_key, algorithm)
        if wrong:
            raise t.error(key, f"{path} holds {wrong}, which cannot verify {algorithm}")
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise t.error(key, f"{path} holds a {public_key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are needed")
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _jwks_file(t: Table, key: str) -> Mapping[str, object]:
    path, data = named_file(t, key)
    try:
        jwks = json.loads(data)
    except ValueError as e:
        raise t.error(key, f"{path} is not JSON: {e}") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise t.error(key, f'{path} is not a JSON Web Key Set (an object with a "keys" array)')
    return MappingProxyType(jwks)


def _api_key_method(name: str, t: Table) -> ApiKeyMethod:
    return ApiKeyMethod(name=name, headers=t.get("headers", _key_headers, ApiKeyMethod(name=name).headers))


_KEY_SOURCES = ("public_key_file", "jwks_file", "jwks_url", "secret_file")


class _JwtSettings(TypedDict):
    """The `JwtMethod` fields `_jwt_method` reads besides its name, issuer, audiences, algorithms and keys."""

    jwks_refresh_interval: float
    jwks_max_age: float
    jwks_fetch_timeout: float
    leeway: float
    require_exp: bool
    consumer_claim: str
    scope_claims: tuple[str, ...]
    claim_headers: tuple[tuple[bytes, str], ...]
    cache_size: int


def _jwt_method(name: str, t: Table) -> JwtMethod:
    algorithms = t.require("algorithms", _algorithms)
    keys = _jwt_keys(t, algorithms) if algorithms is not None else None
    if algorithms is None:
        t.skip(*_KEY_SOURCES)  # which source they need is not known
    audiences = t.require("audiences", string_list)
    if audiences == ():
        t.report("audiences", "must list at least one audience: a token for another service must not pass")
    claim_table = t.table("claim_headers")
    issuer = t.require("issuer", nonempty_string)
    settings: _JwtSettings = {
        "jwks_refresh_interval": t.get("jwks_refresh_interval", positive_seconds, 60.0),
        "jwks_max_age": t.get("jwks_max_age", positive_seconds, 3600.0),
        "jwks_fetch_timeout": t.get("jwks_fetch_timeout", positive_seconds, 5.0),
        "leeway": t.get("leeway", seconds_or_zero, 30.0),
        "require_exp": t.get("require_exp", boolean, True),
        "consumer_claim": t.get("consumer_claim", _claim, "sub"),
        "scope_claims": t.get("scope_claims", _claims, ("scope", "scp")),
        "claim_headers": _claim_headers(claim_table) if claim_table is not None else (),
        "cache_size": t.get("cache_size", positive_int, 10000),
    }
    if algorithms is None or keys is None or audiences is None or issuer is None:
        raise Invalid()
    return JwtMethod(name=name, issuer=issuer, audiences=audiences, algorithms=algorithms, **keys, **settings)


def _jwt_keys(t: Table, algorithms: tuple[str, ...]) -> dict[str, Any] | None:
    """Where a JWT method's keys come from: exactly one source, the one its algorithms need; None when that
    cannot be read (reported)."""
    sources = [k for k in _KEY_SOURCES if t.has(k)]
    hmac = algorithms[0] in HMAC_ALGORITHMS
    if hmac and sources != ["secret_file"]:
        t.report("secret_file", "HMAC algorithms need secret_file (and no public key source)")
        t.skip(*sources)
        return None
    if not hmac and (len(sources) != 1 or sources == ["secret_file"]):
        t.report(
            "public_key_file",
            f"give exactly one of public_key_file, jwks_file and jwks_url (got: {', '.join(sources) or 'none'})",
        )
        t.skip(*sources)
        return None
    try:
        if hmac:
            return {"secret": _secret(t, algorithms)}
        if sources == ["public_key_file"]:
            return {"public_key_pem": _public_key_pem(t, "public_key_file", algorithms)}
        if sources == ["jwks_file"]:
            return {"jwks": _jwks_file(t, "jwks_file")}
        return {"jwks_url": t.get("jwks_url", _http_url)}
    except Invalid:
        return None


def _secret(t: Table, algorithms: tuple[str, ...]) -> bytes:
    path, secret = named_file(t, "secret_file")
    secret = secret.strip()
    # RFC 7518 section 3.2: a key at least as long as the hash (PyJWT warns on every token otherwise).
    needed = max(_HMAC_KEY_BYTES[a] for a in algorithms)
    if len(secret) < needed:
        raise t.error("secret_file", f"{path} must hold at least {needed} bytes of secret for {'/'.join(algorithms)}")
    if b"-----BEGIN" in secret:
        raise t.error("secret_file", f"{path} holds a PEM key, not an HMAC secret")
    return secret


def _claims(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of claim names, got {describe(value)}")
    return tuple(_claim(v) for v in value)


def _basic_method(name: str, t: Table) -> BasicMethod:
    return BasicMethod(
        name=name,
        realm=t.require("realm", realm) if t.has("realm") else None,
        threads=t.require("threads", positive_int) if t.has("threads") else None,
        max_pending=t.get("max_pending", positive_int, 256),
        cache_ttl=t.get("cache_ttl", seconds_or_zero, 30.0),
    )


def _forward_method(name: str, t: Table) -> ForwardMethod:
    consumer = t.get("consumer_header", optional_header_name, b"")
    scopes = t.get("scopes_header", optional_header_name, b"")
    url = t.require("url", _plain_http_url)
    method = ForwardMethod(
        name=name,
        url=url or "",
        timeout=t.get("timeout", positive_seconds, 5.0),
        request_headers=t.get("request_headers", header_names, (b"authorization", b"cookie")),
        copy_headers=t.get("copy_headers", header_names, ()),
        consumer_header=consumer.lower() or None,
        scopes_header=scopes.lower() or None,
        credential_headers=t.get("credential_headers", header_names, (b"authorization",)),
        max_connections=t.get("max_connections", positive_int, 64),
        max_body=t.get("max_body", positive_size, 64 * KiB),
    )
    if not method.request_headers:
        t.report("request_headers", "must name at least one header (the method applies when one is present)")
    owned = [h for h in method.request_headers if h in GATEWAY_OWNED]
    if owned:
        t.report(
            "request_headers",
            f"{owned[0].decode()} is never sent to the auth service (the gateway frames its own request and sets "
            "the X-Forwarded-* headers itself)",
        )
    if url is None:
        raise Invalid()
    return method


def _mtls_method(name: str, t: Table) -> MtlsMethod:
    return MtlsMethod(name=name, identity_header=t.get("identity_header", optional_header_name, b""))


_METHOD_READERS: dict[str, Callable[[str, Table], Method]] = {
    "api_key": _api_key_method,
    "mtls": _mtls_method,
    "jwt": _jwt_method,
    "basic": _basic_method,
    "forward": _forward_method,
}


_METHOD_KEYS = {
    "api_key": ("headers",),
    "mtls": ("identity_header",),
    "jwt": (
        "algorithms",
        *_KEY_SOURCES,
        "audiences",
        "claim_headers",
        "issuer",
        "jwks_refresh_interval",
        "jwks_max_age",
        "jwks_fetch_timeout",
        "leeway",
        "require_exp",
        "consumer_claim",
        "scope_claims",
        "cache_size",
    ),
    "basic": ("realm", "threads", "max_pending", "cache_ttl"),
    "forward": (
        "url",
        "timeout",
        "request_headers",
        "copy_headers",
        "consumer_header",
        "scopes_header",
        "credential_headers",
        "max_connections",
        "max_body",
    ),
}
"""The keys of each method type's table, besides `type`."""


def read_method(name: str, t: Table) -> Method:
    # Until its type is known, a key of any type may be one of its own.
    t.known(("type", *(key for keys in _METHOD_KEYS.values() for key in keys)))
    if name == "anonymous":
        raise t.error("", '"anonymous" is what a public route says (auth = "anonymous"); give the method another name')
    kind = t.get("type", nonempty_string)
    reader = _METHOD_READERS.get(kind)
    if reader is None:
        raise t.error("type", f"unknown method type {kind!r} (known: {', '.join(_METHOD_READERS)})")
    method = reader(name, t)
    t.finish()
    return method
