"""The admission settings as frozen objects: consumers and their credentials (hashes only), the authentication
methods, identity headers, rate limits, and what each route accepts. What the gatekeeper and each method are built
from; read from the config by `gateway.auth.settings.admission`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.config.values import KiB
from gateway.headers import HOP_BY_HOP

__all__ = [
    "ANONYMOUS",
    "API_KEY_HASH",
    "CONSUMER_NAME",
    "DEFAULT_ADMISSION",
    "EC_ALGORITHMS",
    "FAILED_AUTH_ADDRESS_FACTOR",
    "GATEWAY_OWNED",
    "HMAC_ALGORITHMS",
    "JWT_ALGORITHMS",
    "NOBODY",
    "RSA_ALGORITHMS",
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
    "wrong_key_type",
]

API_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
"""How a stored API key looks: the SHA-256 of the key, in hex. Keys are random 256-bit values, so a fast hash is
the right one (as for GitHub's and Stripe's tokens): there is nothing to brute-force."""
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
CONSUMER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""A consumer's name: a bare TOML key (as `[consumers.NAME]` tables are read) of at most 128 characters."""
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
JWT_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_ALGORITHMS) | {"EdDSA"}
"""The algorithms a JWT method may allow. `none` is not one of them, whatever the config says."""


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
    characters, a JWT; see `gateway.auth.budgets`): over it, 429 before that identity's credentials are
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
