"""The admission settings: consumers and their credentials, authentication methods, identity headers, limits,
and what each route accepts; read from the config file (and the credentials file it names) into frozen objects.

Rules:
* No route is public by accident: every route says `auth = "anonymous"` or names the methods it accepts; a route
  that says neither is a config error, and so is a method name nobody defined.
* Secrets are never stored: API keys as SHA-256 hashes (`gateway-credentials api-key` mints them), passwords as
  bcrypt hashes. Key files are read and checked here, so `--check` and a reload fail on a bad one before anything
  changes; the runtime objects get the bytes, not the paths.
* An algorithm allow-list belongs to each JWT method and is checked against its key: `none` is never allowed,
  and an HMAC algorithm never shares a method with a public-key one (no algorithm confusion).
* A consumer claims client certificates by one field each ("cn:billing", "dns:billing.internal"), read into
  (field, value) so that no entry can match another field; no two consumers may claim the same one.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypedDict
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

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
    string,
    string_list,
)
from gateway.headers import HOP_BY_HOP

__all__ = [
    "ADMISSION_KEYS",
    "ANONYMOUS",
    "CERTIFICATE_FIELDS",
    "DEFAULT_ADMISSION",
    "FAILED_AUTH_ADDRESS_FACTOR",
    "GATEWAY_OWNED",
    "NOBODY",
    "ROUTE_ADMISSION_KEYS",
    "Admission",
    "ApiKeyMethod",
    "BasicMethod",
    "CertificateIdentity",
    "Consumer",
    "ForwardMethod",
    "IdentityHeaders",
    "JwtMethod",
    "KeyHeader",
    "Method",
    "MtlsMethod",
    "RateLimit",
    "RateLimits",
    "RouteAdmission",
    "parse_admission",
    "parse_route_admission",
]

API_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
"""How a stored API key looks: the SHA-256 of the key, in hex. Keys are random 256-bit values, so a fast hash is
the right one (as for GitHub's and Stripe's tokens): there is nothing to brute-force."""
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
GATEWAY_OWNED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-proto",
    b"x-forwarded-method",
    b"x-forwarded-uri",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-request-id",
}
"""Headers that frame or describe a request the gateway makes itself: never taken from a client for a forward-auth
question, and never a name admission may set upstream."""
"""An HTTP token: a header name, an auth scheme."""
CONSUMER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""A consumer's name: a bare TOML key (as `[consumers.NAME]` tables are read) of at most 128 characters."""
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
"""A scope token (RFC 6749 section 3.3): visible ASCII but space, quote and backslash."""

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
JWT_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_ALGORITHMS) | {"EdDSA"}
"""The algorithms a JWT method may allow. `none` is not one of them, whatever the config says."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """At most `requests` per `period` seconds on average, with up to `burst` of them at once."""

    requests: int
    period: float
    burst: int

    @property
    def interval(self) -> float:
        """Seconds between requests at the sustained rate."""
        return self.period / self.requests


CertificateIdentity = tuple[str, str]
"""A field of a client certificate and its value, normalised as `CERTIFICATE_FIELDS` reads it: ("cn", "billing")."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Consumer:
    """A known caller: its credentials (hashes only), the scopes it holds and its own limits."""

    name: str
    scopes: frozenset[str] = frozenset()
    api_key_hashes: frozenset[str] = frozenset()
    """"sha256:<hex>" of each API key the consumer may use (several, so keys can be rotated)."""
    password_hash: bytes | None = None
    """The bcrypt hash of its HTTP Basic password; the user name is the consumer's name."""
    rate_limit: RateLimit | None = None
    """Its own request rate, instead of `admission.rate_limits.consumer`."""
    max_concurrent: int | None = None
    """Its own cap on requests in flight, instead of `admission.max_concurrent`."""
    client_certificates: frozenset[CertificateIdentity] = frozenset()
    """Client certificates that prove this consumer (the `mtls` method), each as (field, value): ("cn", "billing"),
    ("dn", "CN=billing,O=Example"), ("dns", "billing.internal"), ("email", "ops@example.com"),
    ("uri", "spiffe://example.org/billing") or ("ip", "10.0.0.5"); each matches its own field of a certificate only.
    Written in the config as "cn:billing", "dn:CN=billing,O=Example"... (`CERTIFICATE_FIELDS`)."""


@dataclass(frozen=True, slots=True)
class KeyHeader:
    """Where an API key is looked for: a header, and the auth scheme its value starts with, if any."""

    name: bytes
    """Lower-cased header name."""
    scheme: bytes | None
    """Lower-cased scheme ("bearer" for "Authorization: Bearer <key>"), or None when the whole value is the key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyMethod:
    """API keys of declared consumers, in one of `headers` (the first present is read)."""

    type: ClassVar[str] = "api_key"
    name: str
    headers: tuple[KeyHeader, ...] = (KeyHeader(b"authorization", b"bearer"), KeyHeader(b"x-api-key", None))


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtMethod:
    """Bearer JWTs of one issuer, verified with its keys and only with the algorithms listed."""

    type: ClassVar[str] = "jwt"
    name: str
    issuer: str
    audiences: tuple[str, ...]
    """The token's `aud` must name one of these."""
    algorithms: tuple[str, ...]
    public_key_pem: bytes | None = None
    """From `public_key_file` (a PEM public key or certificate), as a PEM public key."""
    secret: bytes | None = None
    """From `secret_file`, for HS256/384/512 only."""
    jwks: Mapping[str, object] | None = None
    """From `jwks_file`: a JSON Web Key Set."""
    jwks_url: str | None = None
    """Fetched with treq, cached, refetched on an unknown `kid`."""
    jwks_refresh_interval: float = 60.0
    """The least time between two fetches of `jwks_url` for an unknown `kid` (a flood of made-up kids costs one
    fetch per interval)."""
    jwks_max_age: float = 3600.0
    """Keys older than this are refetched (in the background; the old keys stay in use until the new ones arrive)."""
    jwks_fetch_timeout: float = 5.0
    leeway: float = 30.0
    """Clock skew allowed on `exp`, `nbf` and `iat`."""
    require_exp: bool = True
    consumer_claim: str = "sub"
    scope_claims: tuple[str, ...] = ("scope", "scp")
    """Claims holding scopes: a space-separated string (`scope`, RFC 8693) or an array (`scp`); all are merged."""
    claim_headers: tuple[tuple[bytes, str], ...] = ()
    """(upstream header, claim) pairs: the claim's value goes upstream in that header."""
    cache_size: int = 10000
    """Verified tokens remembered (until they expire), so a token is verified once, not on every request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicMethod:
    """HTTP Basic: the user name is a consumer's name, the password checked against its bcrypt hash, off the
    reactor thread."""

    type: ClassVar[str] = "basic"
    name: str
    realm: str | None = None
    """The realm named in the challenge; `admission.realm` when not set."""
    threads: int | None = None
    """Threads verifying bcrypt hashes: a burst of logins waits for them, streams in flight do not. None: one fewer
    than the machine's cores (at least 1), so bcrypt can never take every core from the reactor."""
    max_pending: int = 256
    """Verifications allowed to wait for a thread; more are answered 503 at once."""
    cache_ttl: float = 30.0
    """How long a verified user name and password are remembered (as a salted hash, never in clear)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardMethod:
    """Forward auth: an auth service is asked about each request (its method, path and chosen headers, no body)."""

    type: ClassVar[str] = "forward"
    name: str
    url: str
    """The auth service's URL (http); the request's path and query go in X-Forwarded-Uri, its method in
    X-Forwarded-Method."""
    timeout: float = 5.0
    """For the auth service's whole answer; beyond it 504 (fail closed)."""
    request_headers: tuple[bytes, ...] = (b"authorization", b"cookie")
    """Client headers sent to the auth service; the method applies when one of them is present."""
    copy_headers: tuple[bytes, ...] = ()
    """Headers of the auth service's 2xx answer sent upstream (a client copy is always removed first)."""
    consumer_header: bytes | None = None
    """A header of the 2xx answer that names the consumer."""
    scopes_header: bytes | None = None
    """A header of the 2xx answer holding space-separated scopes."""
    credential_headers: tuple[bytes, ...] = (b"authorization",)
    """Client headers removed before forwarding, once admitted (unless the route forwards credentials)."""
    max_connections: int = 64
    """Checks under way at once (each on a connection of its own); one more is answered 503 at once."""
    max_body: int = 64 * KiB
    """The largest 401/403 body of the auth service passed to the client; a longer one is 503."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MtlsMethod:
    """Client certificates, verified in the TLS handshake against the listener's CA bundle, mapped to declared
    consumers by subject or subjectAltName."""

    type: ClassVar[str] = "mtls"
    name: str
    identity_header: bytes = b""
    """A header that carries the certificate's subject upstream (b"" for none); a client's copy is removed."""


Method = ApiKeyMethod | JwtMethod | BasicMethod | ForwardMethod | MtlsMethod


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityHeaders:
    """Headers the gateway sets upstream for an admitted consumer (b"" sets none); a client's copies of these,
    and of every header a method sets, are removed from every request, so identity cannot be spoofed."""

    consumer: bytes = b"X-Consumer-ID"
    scopes: bytes = b"X-Consumer-Scopes"
    method: bytes = b"X-Auth-Method"


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """Request rates, each counted by its own key; None is no limit."""

    consumer: RateLimit | None = None
    """Per consumer (across routes), unless the consumer has its own."""
    anonymous: RateLimit | None = None
    """Per client address, on anonymous routes."""
    failed_auth: RateLimit | None = RateLimit(requests=10, period=60.0, burst=10)
    """Failed authentications per client address and claimed identity (a Basic user name, an API key's first
    characters, a JWT; see `gateway.auth.gatekeeper`): over it, 429 before that identity's credentials are
    checked from that address, while other users behind the same address (a NAT) go on."""
    failed_auth_per_address: RateLimit | None = RateLimit(requests=100, period=60.0, burst=100)
    """Failed authentications per client address, whatever identity they claim: the ceiling over `failed_auth`
    (a client trying many user names or keys). When not configured, `FAILED_AUTH_ADDRESS_FACTOR` times
    `failed_auth` (its requests and burst, over the same period)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """Everything the admission checks need that is not per route."""

    realm: str = "gateway"
    consumers: Mapping[str, Consumer] = field(default_factory=lambda: MappingProxyType({}))
    methods: Mapping[str, Method] = field(default_factory=lambda: MappingProxyType({}))
    identity: IdentityHeaders = IdentityHeaders()
    rate_limits: RateLimits = RateLimits()
    max_concurrent: int | None = None
    """Requests in flight per consumer (a stream counts until it ends), unless the consumer has its own."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteAdmission:
    """Who may use a route. The default admits nobody: a route built without it refuses every request (401)."""

    anonymous: bool = False
    methods: tuple[str, ...] = ()
    """Names of `Admission.methods`, tried in order: the first whose credential the request carries decides."""
    scopes_any: frozenset[str] = frozenset()
    """The consumer must hold at least one of these (if any are given)."""
    scopes_all: frozenset[str] = frozenset()
    """The consumer must hold every one of these."""
    forward_credentials: bool = False
    """Send the credential headers upstream too (normally removed once the request is admitted)."""
    rate_limit_headers: bool = True
    """Tell clients their rate limit on every response of the route (RateLimit-Policy and RateLimit), not only on
    a 429."""
    limits_fail_closed: bool = False
    """When the shared limit store (Redis) does not answer in time: refuse (503) rather than count in this
    process (`limit_store_failure = "closed"`)."""


ANONYMOUS = RouteAdmission(anonymous=True)
NOBODY = RouteAdmission()
"""What a route built in code without admission gets: every request refused (401)."""
DEFAULT_ADMISSION = Admission()
FAILED_AUTH_ADDRESS_FACTOR = 10
"""`failed_auth_per_address`, when not configured, is this many times `failed_auth`: ten people behind one NAT
address may each fail as often as one alone before the address as a whole is refused."""


# --- readers ----------------------------------------------------------------------------------------------


def _token(value: object) -> str:
    text = nonempty_string(value)
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"must be a header name (letters, digits and -), got {text!r}")
    return text


def _header_name(value: object) -> bytes:
    return _token(value).encode("ascii")


def _header_names(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of header names, got {describe(value)}")
    return tuple(_header_name(v).lower() for v in value)


def _optional_header_name(value: object) -> bytes:
    """A header name, or "" for none."""
    text = string(value)
    return _header_name(text) if text else b""


def _scopes(value: object) -> frozenset[str]:
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


def _rate_limit(t: Table) -> RateLimit:
    t.known(("rate", "burst"))
    rate = t.require("rate", _rate)
    burst = t.get("burst", positive_int, rate[0] if rate is not None else 1)
    t.finish()
    if rate is None:
        raise Invalid()
    return RateLimit(requests=rate[0], period=rate[1], burst=burst)


def _key_header(value: object) -> KeyHeader:
    """ "X-API-Key" (the whole value is the key) or "Authorization: Bearer" (the value after the scheme)."""
    text = nonempty_string(value)
    name, sep, scheme = text.partition(":")
    if not _TOKEN.fullmatch(name.strip()) or (sep and not _TOKEN.fullmatch(scheme.strip())):
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


def _api_key_hashes(value: object) -> frozenset[str]:
    hashes = string_list(value) if value != [] else ()
    for item in hashes:
        if not API_KEY_HASH.fullmatch(item):
            raise ValueError(
                'must hold hashes such as "sha256:9f86d0...", as `gateway-credentials api-key` prints them, never '
                "a key itself"
            )
    return frozenset(hashes)


def _password_hash(value: object) -> bytes:
    text = nonempty_string(value)
    if not _BCRYPT_HASH.fullmatch(text):
        raise ValueError(
            'must be a bcrypt hash ("$2b$12$..."), as `gateway-credentials password` prints it, never a password'
        )
    return text.encode("ascii")


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
        if not _TOKEN.fullmatch(header):
            t.report(header, "must be a header name")
            continue
        claim = t.require(header, _claim)
        if claim is not None:
            pairs.append((header.encode("ascii"), claim))
    t.finish()
    return tuple(pairs)


def _file(t: Table, key: str) -> tuple[Path, bytes]:
    """The path (relative to the config file's directory) and the bytes of a file the config names."""
    name = t.get(key, nonempty_string)
    path = Path(name)
    if not path.is_absolute():
        path = Path(t.source).parent / path
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise t.error(key, f"cannot read {path}: {e.strerror or e}") from None


def _public_key_pem(t: Table, key: str, algorithms: tuple[str, ...]) -> bytes:
    path, data = _file(t, key)
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


def wrong_key_type(public_key: object, algorithm: str) -> str:
    """ "" if `public_key` can verify `algorithm`, else what kind of key it is."""
    if algorithm in RSA_ALGORITHMS:
        ok = isinstance(public_key, rsa.RSAPublicKey)
    elif algorithm in EC_ALGORITHMS:
        ok = isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, EC_ALGORITHMS[algorithm]
        )
    else:
        ok = isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return "" if ok else f"a {type(public_key).__name__.removeprefix('_')} key"


def _jwks_file(t: Table, key: str) -> Mapping[str, object]:
    path, data = _file(t, key)
    try:
        jwks = json.loads(data)
    except ValueError as e:
        raise t.error(key, f"{path} is not JSON: {e}") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise t.error(key, f'{path} is not a JSON Web Key Set (an object with a "keys" array)')
    return MappingProxyType(jwks)


# --- tables -----------------------------------------------------------------------------------------------


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
        "leeway": t.get("leeway", _seconds_or_zero, 30.0),
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
    path, secret = _file(t, "secret_file")
    secret = secret.strip()
    # RFC 7518 section 3.2: a key at least as long as the hash (PyJWT warns on every token otherwise).
    needed = max(_HMAC_KEY_BYTES[a] for a in algorithms)
    if len(secret) < needed:
        raise t.error("secret_file", f"{path} must hold at least {needed} bytes of secret for {'/'.join(algorithms)}")
    if b"-----BEGIN" in secret:
        raise t.error("secret_file", f"{path} holds a PEM key, not an HMAC secret")
    return secret


def _seconds_or_zero(value: object) -> float:
    """Seconds as `positive_seconds` reads them, or zero (0, 0.0, "0s", "0ms"...) to turn a wait off."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and re.fullmatch(r"\s*0+(\.0+)?\s*(ms|s|m|h)\s*", value.lower()):
        return 0.0
    return positive_seconds(value)


def _claims(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of claim names, got {describe(value)}")
    return tuple(_claim(v) for v in value)


def _basic_method(name: str, t: Table) -> BasicMethod:
    return BasicMethod(
        name=name,
        realm=t.require("realm", _realm) if t.has("realm") else None,
        threads=t.require("threads", positive_int) if t.has("threads") else None,
        max_pending=t.get("max_pending", positive_int, 256),
        cache_ttl=t.get("cache_ttl", _seconds_or_zero, 30.0),
    )


def _forward_method(name: str, t: Table) -> ForwardMethod:
    consumer = t.get("consumer_header", _optional_header_name, b"")
    scopes = t.get("scopes_header", _optional_header_name, b"")
    url = t.require("url", _plain_http_url)
    method = ForwardMethod(
        name=name,
        url=url or "",
        timeout=t.get("timeout", positive_seconds, 5.0),
        request_headers=t.get("request_headers", _header_names, (b"authorization", b"cookie")),
        copy_headers=t.get("copy_headers", _header_names, ()),
        consumer_header=consumer.lower() or None,
        scopes_header=scopes.lower() or None,
        credential_headers=t.get("credential_headers", _header_names, (b"authorization",)),
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
    return MtlsMethod(name=name, identity_header=t.get("identity_header", _optional_header_name, b""))


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


def _method(name: str, t: Table) -> Method:
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


def _realm(value: object) -> str:
    text = nonempty_string(value)
    if not re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", text):
        raise ValueError(f"must be printable ASCII without quotes or backslashes, got {text!r}")
    return text


_CONSUMER_KEYS = ("scopes", "api_keys", "password", "rate_limit", "max_concurrent", "client_certificates")


def _consumer(name: str, t: Table) -> Consumer:
    t.known(_CONSUMER_KEYS)
    if not CONSUMER_NAME.fullmatch(name):
        raise t.error("", "a consumer name may contain only letters, digits and -_. (at most 128)")
    rate = t.table("rate_limit")
    consumer = Consumer(
        name=name,
        scopes=t.get("scopes", _scopes, frozenset()),
        api_key_hashes=t.get("api_keys", _api_key_hashes, frozenset()),
        password_hash=t.require("password", _password_hash) if t.has("password") else None,
        rate_limit=rate.attempt(_rate_limit) if rate is not None else None,
        max_concurrent=t.require("max_concurrent", positive_int) if t.has("max_concurrent") else None,
        client_certificates=t.get("client_certificates", _certificate_identities, frozenset()),
    )
    t.finish()
    return consumer


class _AnyCase(Mapping[str, x509.ObjectIdentifier]):
    """Attribute type names of a DN, whatever their case (RFC 4514 section 3: "cn" is "CN"), with OpenSSL's names
    of the attributes cryptography writes as OIDs: for `x509.Name.from_rfc4514_string`."""

    _NAMES: ClassVar[dict[str, x509.ObjectIdentifier]] = {
        "CN": NameOID.COMMON_NAME,
        "L": NameOID.LOCALITY_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "STREET": NameOID.STREET_ADDRESS,
        "DC": NameOID.DOMAIN_COMPONENT,
        "UID": NameOID.USER_ID,
        "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
        "SERIALNUMBER": NameOID.SERIAL_NUMBER,
        # The other names OpenSSL's RFC 2253 output uses (cryptography writes these as OIDs, parsed the same).
        "GN": NameOID.GIVEN_NAME,
        "SN": NameOID.SURNAME,
        "TITLE": NameOID.TITLE,
        "INITIALS": NameOID.INITIALS,
        "GENERATIONQUALIFIER": NameOID.GENERATION_QUALIFIER,
        "DNQUALIFIER": NameOID.DN_QUALIFIER,
        "PSEUDONYM": NameOID.PSEUDONYM,
        "ORGANIZATIONIDENTIFIER": NameOID.ORGANIZATION_IDENTIFIER,
        "POSTALCODE": NameOID.POSTAL_CODE,
        "BUSINESSCATEGORY": NameOID.BUSINESS_CATEGORY,
        "JURISDICTIONC": NameOID.JURISDICTION_COUNTRY_NAME,
        "JURISDICTIONST": NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME,
        "JURISDICTIONL": NameOID.JURISDICTION_LOCALITY_NAME,
    }

    def __getitem__(self, name: str) -> x509.ObjectIdentifier:
        return self._NAMES[name.upper()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


_ANY_CASE = _AnyCase()


def _subject_dn(value: str) -> str:
    """A subject DN in the form a certificate's is compared in: parsed, then written back (so "CN=a\\2cb" and
    "CN=a\\,b", or "cn=" and "CN=", are one DN)."""
    try:
        return x509.Name.from_rfc4514_string(value, _ANY_CASE).rfc4514_string()
    except ValueError:
        raise ValueError(
            f'{value!r} is not a subject DN in RFC 4514 form: most specific first, no spaces around "," or '
            '"=", such as "CN=billing,O=Example" (`openssl x509 -noout -subject -nameopt RFC2253` prints it so)'
        ) from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


CERTIFICATE_FIELDS: Mapping[str, Callable[[str], str]] = MappingProxyType(
    {
        "cn": lambda value: value,
        "dn": _subject_dn,
        "dns": str.lower,
        "email": str.lower,
        "uri": lambda value: value,
        "ip": _ip,
    }
)
"""The fields a consumer's `client_certificates` may name ("cn:billing"), each with how its value is normalised:
a CN (of the subject; exact), the whole subject DN, and the subjectAltNames (DNS names and email addresses
whatever their case, URIs exact, IP addresses in their usual form). Each matches its own field only."""


def _certificate_identity(text: str) -> CertificateIdentity:
    """One entry of `client_certificates`: "field:value" (the field in any case, so "DNS:", "URI:" and "IP:" read
    as before), or a bare subject DN ("CN=billing,O=Example", read as "dn:")."""
    field, sep, value = text.partition(":")
    field = field.lower()
    if not sep or field not in CERTIFICATE_FIELDS:
        if "=" not in text:
            raise ValueError(
                f"{text!r} names no certificate field: write cn:NAME (the subject's CN), dn:DN (the whole subject), "
                "dns:NAME, email:ADDRESS, uri:URI or ip:ADDRESS (a subjectAltName)"
            )
        field, value = "dn", text
    if not value:
        raise ValueError(f"{text!r} names nothing after {field}:")
    if value != value.strip():
        raise ValueError(f"{text!r} has white space around its {field} (it would never match)")
    return field, CERTIFICATE_FIELDS[field](value)


def _certificate_identities(value: object) -> frozenset[CertificateIdentity]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            'must be a non-empty array such as ["cn:billing"], ["dns:billing.internal", '
            f'"dn:CN=billing,O=Example"], got {describe(value)}'
        )
    return frozenset(_certificate_identity(text) for text in value)


def _consumers(top: Table, into: dict[str, Consumer]) -> None:
    claimed = {identity: c.name for c in into.values() for identity in c.client_certificates}
    for name, table in top.named_tables("consumers"):
        if name in into:
            table.report("", f"consumer {name!r} is declared twice (in the config and the credentials file)")
            continue
        consumer = table.attempt(partial(_consumer, name))
        if consumer is None:
            continue
        into[name] = consumer
        for identity in sorted(consumer.client_certificates):
            other = claimed.setdefault(identity, name)
            if other != name:
                table.report(
                    "client_certificates",
                    f"{':'.join(identity)} is claimed by consumer {other!r} too: a certificate proves one consumer",
                )


def _credentials_file(t: Table, into: dict[str, Consumer]) -> None:
    try:
        path, data = _file(t, "credentials_file")
    except Invalid:
        return
    try:
        decoded = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        t.errors.add(path, "", f"not valid TOML: {e}")
        return
    top = Table(decoded, "", path, t.errors)
    top.known(("consumers",))
    _consumers(top, into)
    top.finish()


ADMISSION_KEYS = ("consumers", "auth", "admission")
"""The top-level keys of the config file that `parse_admission` reads."""
_ADMISSION_TABLE_KEYS = ("credentials_file", "identity_headers", "rate_limits", "realm", "max_concurrent")
_RATE_LIMIT_KEYS = ("consumer", "anonymous", "failed_auth", "failed_auth_per_address")
_IDENTITY_FIELDS = ("consumer", "scopes", "method")


def parse_admission(top: Table) -> Admission:
    """The `[admission]`, `[consumers.*]` and `[auth.*]` sections of the config file's top table; what cannot be
    read is reported and left out."""
    consumers: dict[str, Consumer] = {}
    _consumers(top, consumers)
    methods: dict[str, Method] = {}
    for name, table in top.named_tables("auth"):
        method = table.attempt(partial(_method, name))
        if method is not None:
            methods[name] = method
    t = top.table("admission")
    if t is None:
        _check_upstream_headers(top, IdentityHeaders(), methods, "admission.identity_headers")
        return Admission(consumers=MappingProxyType(consumers), methods=MappingProxyType(methods))
    t.known(_ADMISSION_TABLE_KEYS)
    if t.has("credentials_file"):
        _credentials_file(t, consumers)
    identity = IdentityHeaders()
    headers = t.table("identity_headers")
    if headers is not None:
        headers.known(_IDENTITY_FIELDS)
        identity = IdentityHeaders(
            consumer=headers.get("consumer", _optional_header_name, identity.consumer),
            scopes=headers.get("scopes", _optional_header_name, identity.scopes),
            method=headers.get("method", _optional_header_name, identity.method),
        )
        headers.finish()
    refused = [field for field in _IDENTITY_FIELDS if headers is not None and not headers.valid(field)]
    _check_upstream_headers(top, identity, methods, t.path_of("identity_headers"), refused)
    rates = RateLimits()
    limits = t.table("rate_limits")
    if limits is not None:
        limits.known(_RATE_LIMIT_KEYS)
        failed = _optional_rate(limits, "failed_auth", rates.failed_auth)
        rates = RateLimits(
            consumer=_optional_rate(limits, "consumer", None),
            anonymous=_optional_rate(limits, "anonymous", None),
            failed_auth=failed,
            failed_auth_per_address=_optional_rate(limits, "failed_auth_per_address", _address_ceiling(failed)),
        )
        limits.finish()
    admission = Admission(
        realm=t.get("realm", _realm, "gateway"),
        consumers=MappingProxyType(consumers),
        methods=MappingProxyType(methods),
        identity=identity,
        rate_limits=rates,
        max_concurrent=t.require("max_concurrent", positive_int) if t.has("max_concurrent") else None,
    )
    t.finish()
    return admission


_CREDENTIALS = frozenset({b"authorization", b"cookie", b"via"})


def _check_upstream_headers(
    top: Table, identity: IdentityHeaders, methods: Mapping[str, Method], key: str, refused: Sequence[str] = ()
) -> None:
    """Headers admission sets upstream are removed from every client request, on every route: none may be one the
    gateway sets itself, a credential, or another identity header (the one would silently overwrite the other).
    The identity headers whose value was `refused` are left out (their default stands in for them)."""
    reserved = set(GATEWAY_OWNED | _CREDENTIALS)
    for method in methods.values():
        if isinstance(method, ApiKeyMethod):
            reserved.update(where.name for where in method.headers)
        elif isinstance(method, ForwardMethod):
            reserved.update(method.request_headers)
    seen: dict[bytes, str] = {}
    named = [(f"{key}.{field}", getattr(identity, field).lower()) for field in _IDENTITY_FIELDS if field not in refused]
    for name, method in methods.items():
        if isinstance(method, JwtMethod):
            named += [(f"auth.{name}.claim_headers.{h.decode()}", h.lower()) for h, _ in method.claim_headers]
        elif isinstance(method, ForwardMethod):
            named += [(f"auth.{name}.copy_headers", h) for h in method.copy_headers]
        elif isinstance(method, MtlsMethod):
            named.append((f"auth.{name}.identity_header", method.identity_header.lower()))
    for where, header in named:
        if not header:
            continue
        if header in reserved:
            top.errors.add(
                top.source,
                where,
                f"{header.decode()} cannot carry identity: a header admission sets is removed from every request, "
                "and this one is the gateway's own or a credential; choose another name",
            )
            continue
        other = seen.get(header)
        if other is not None and not (other.startswith("auth.") and where.startswith("auth.")):
            top.errors.add(top.source, where, f"{header.decode()} is already set by {other}")
            continue
        seen[header] = where


def _address_ceiling(failed: RateLimit | None) -> RateLimit | None:
    """`failed_auth_per_address` when not configured: `FAILED_AUTH_ADDRESS_FACTOR` times `failed_auth` (none
    without it: `failed_auth = false` turns both off)."""
    if failed is None:
        return None
    factor = FAILED_AUTH_ADDRESS_FACTOR
    return RateLimit(requests=failed.requests * factor, period=failed.period, burst=failed.burst * factor)


def _optional_rate(t: Table, key: str, default: RateLimit | None) -> RateLimit | None:
    """A rate-limit table, or `false` for none."""
    if not t.has(key):
        return default
    if t.get(key, lambda v: v) is False:
        return None
    inner = t.table(key)  # None when it is not a table (reported)
    return inner.attempt(_rate_limit) if inner is not None else None


ROUTE_ADMISSION_KEYS = (
    "auth",
    "scopes_any",
    "scopes_all",
    "forward_credentials",
    "rate_limit_headers",
    "limit_store_failure",
)
"""The keys of a route that `parse_route_admission` reads."""


def _store_failure(value: object) -> str:
    if value not in ("open", "closed"):
        raise ValueError(f'must be "open" (count in this process) or "closed" (503), got {value!r}')
    assert isinstance(value, str)
    return value


def parse_route_admission(t: Table, admission: Admission) -> RouteAdmission:
    """A route's `auth` (required: "anonymous", or method names), `scopes_any`, `scopes_all`,
    `forward_credentials` and `rate_limit_headers`. A method that is defined but could not be read is not
    reported again here (the route is left out all the same)."""
    rate_headers = t.get("rate_limit_headers", boolean, True)
    fail_closed = t.get("limit_store_failure", _store_failure, "open") == "closed"
    scopes_any: frozenset[str] = t.get("scopes_any", _scopes, frozenset())
    scopes_all: frozenset[str] = t.get("scopes_all", _scopes, frozenset())
    forward = t.get("forward_credentials", boolean, False)
    if not t.has("auth"):
        raise t.error(
            "auth",
            'is required: say auth = "anonymous" for a public route, or name the methods it accepts, such as '
            'auth = ["keys"] (no route is public by accident)',
        )
    value = t.get("auth", lambda v: v)
    if value == "anonymous":
        if scopes_any or scopes_all:
            t.report("scopes_any" if scopes_any else "scopes_all", "an anonymous route has no scopes to check")
        if t.has("forward_credentials") and t.valid("forward_credentials"):
            t.report("forward_credentials", "an anonymous route has no credentials to remove or forward")
        if rate_headers and not fail_closed:
            return ANONYMOUS
        return RouteAdmission(anonymous=True, rate_limit_headers=rate_headers, limits_fail_closed=fail_closed)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise t.error("auth", f'must be "anonymous" or a non-empty array of method names, got {value!r}')
    missing = [name for name in value if name not in admission.methods]
    for name in missing:
        if not t.errors.about(t.source, f"auth.{name}"):
            known = ", ".join(sorted(admission.methods)) or "none are defined"
            t.report("auth", f"no method named {name!r} (define it as [auth.{name}]; known: {known})")
    if len(set(value)) != len(value):
        t.report("auth", "names a method twice")
    issuers: dict[str, str] = {}
    for name in value:
        method = admission.methods.get(name)
        if isinstance(method, JwtMethod):
            if method.issuer in issuers and issuers[method.issuer] != name:
                t.report(
                    "auth",
                    f"{issuers[method.issuer]!r} and {name!r} are JWT methods of the same issuer: the first decides "
                    "every token of that issuer, so the second would never be used",
                )
            issuers[method.issuer] = name
    if missing:
        raise Invalid()
    return RouteAdmission(
        methods=tuple(value),
        scopes_any=scopes_any,
        scopes_all=scopes_all,
        forward_credentials=forward,
        rate_limit_headers=rate_headers,
        limits_fail_closed=fail_closed,
    )
