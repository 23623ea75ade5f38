"""Tests for gateway.auth.settings, through gateway.config: consumers, the four kinds of method, [admission], each
route's admission, their defaults, the credentials file, key files, and every error naming file, key and reason."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from gateway import config
from gateway.auth.apikeys import hash_key
from gateway.auth.settings.model import (
    ANONYMOUS,
    Admission,
    ApiKeyMethod,
    BasicMethod,
    Consumer,
    ForwardMethod,
    IdentityHeaders,
    JwtMethod,
    KeyHeader,
    RateLimit,
    RateLimits,
    RouteAdmission,
)
from gateway.config import Config, ConfigError, parse
from tests.support.mutations import Mutation, delete_at, set_at

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "gateway.toml"
SOURCE = "test.toml"
KEY = "gwk_settings-test-key"
PASSWORD_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode("ascii")
JWKS_URL = "https://id.example.com/.well-known/jwks.json"


def minimal() -> dict[str, Any]:
    """A valid config with one method of every kind, one consumer, a public route and a protected one."""
    return {
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "upstreams": {"app": {"url": "http://127.0.0.1:8081"}},
        "auth": {
            "keys": {"type": "api_key"},
            "login": {"type": "basic"},
            "corp": {
                "type": "jwt",
                "issuer": "https://id.example.com/",
                "audiences": ["gateway"],
                "algorithms": ["RS256"],
                "jwks_url": JWKS_URL,
            },
            "sso": {"type": "forward", "url": "http://127.0.0.1:9000/check"},
        },
        "consumers": {"alice": {"api_keys": [hash_key(KEY)], "password": PASSWORD_HASH, "scopes": ["read"]}},
        "routes": [
            {"name": "public", "auth": "anonymous", "path_prefix": "/public", "upstream": "app"},
            {"name": "api", "auth": ["keys", "login", "corp", "sso"], "path_prefix": "/api", "upstream": "app"},
        ],
    }


def error_of(data: dict[str, Any], source: Path | str = SOURCE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, source=source)
    return info.value


def _both(*mutations: Mutation) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for m in mutations:
            m(data)

    return mutate


# --- the example file ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> Config:
    return config.load(EXAMPLE)


def test_example_still_loads_with_its_admission(example: Config) -> None:
    """etc/gateway.toml loads: one API-key method, the demo consumer holding the demo key, the default limits."""
    admission = example.admission
    assert admission.realm == "gateway"
    assert admission.methods == {
        "keys": ApiKeyMethod(
            name="keys", headers=(KeyHeader(b"authorization", b"bearer"), KeyHeader(b"x-api-key", None))
        )
    }
    demo = admission.consumers["demo-app"]
    assert hash_key("gwk_demo-key-for-the-example-config-only") in demo.api_key_hashes
    assert demo.scopes == frozenset({"reports:read"})
    assert admission.identity == IdentityHeaders()
    assert admission.rate_limits == RateLimits(failed_auth=RateLimit(requests=10, period=60.0, burst=10))
    assert admission.max_concurrent is None


def test_example_routes_admission(example: Config) -> None:
    """The example's first three routes are public; "demo-api" takes keys and needs reports:read."""
    assert [r.admission for r in example.routes[:3]] == [ANONYMOUS] * 3
    assert example.routes[3].admission == RouteAdmission(methods=("keys",), scopes_any=frozenset({"reports:read"}))


# --- a valid config and its defaults -------------------------------------------------------------------------


def test_minimal_config_with_every_kind_of_method() -> None:
    """A config with one method of each type yields one method object of each class, named as in the file."""
    admission = parse(minimal(), source=SOURCE).admission
    assert {name: type(m) for name, m in admission.methods.items()} == {
        "keys": ApiKeyMethod,
        "login": BasicMethod,
        "corp": JwtMethod,
        "sso": ForwardMethod,
    }
    assert {name: m.type for name, m in admission.methods.items()} == {
        "keys": "api_key",
        "login": "basic",
        "corp": "jwt",
        "sso": "forward",
    }


def test_method_defaults() -> None:
    """Methods given only their required keys get every documented default."""
    methods = parse(minimal(), source=SOURCE).admission.methods
    keys = methods["keys"]
    assert isinstance(keys, ApiKeyMethod)
    assert keys.headers == (KeyHeader(b"authorization", b"bearer"), KeyHeader(b"x-api-key", None))
    assert methods["login"] == BasicMethod(name="login", realm=None, threads=None, max_pending=256, cache_ttl=30.0)
    corp = methods["corp"]
    assert isinstance(corp, JwtMethod)
    assert (corp.issuer, corp.audiences, corp.algorithms, corp.jwks_url) == (
        "https://id.example.com/",
        ("gateway",),
        ("RS256",),
        JWKS_URL,
    )
    assert (corp.public_key_pem, corp.secret, corp.jwks) == (None, None, None)
    assert (corp.jwks_refresh_interval, corp.jwks_max_age, corp.jwks_fetch_timeout, corp.leeway) == (
        60.0,
        3600.0,
        5.0,
        30.0,
    )
    assert corp.require_exp is True
    assert corp.consumer_claim == "sub"
    assert corp.scope_claims == ("scope", "scp")
    assert corp.claim_headers == ()
    assert corp.cache_size == 10000
    assert methods["sso"] == ForwardMethod(
        name="sso",
        url="http://127.0.0.1:9000/check",
        timeout=5.0,
        request_headers=(b"authorization", b"cookie"),
        copy_headers=(),
        consumer_header=None,
        scopes_header=None,
        credential_headers=(b"authorization",),
        max_connections=64,
        max_body=64 * 1024,
    )


def test_admission_defaults_without_an_admission_table() -> None:
    """Without [admission]: realm "gateway", the X-Consumer-ID/-Scopes/X-Auth-Method headers, 10 failed
    authentications a minute, no other rate limit and no concurrency cap."""
    admission = parse(minimal(), source=SOURCE).admission
    assert admission.realm == "gateway"
    assert admission.identity == IdentityHeaders(
        consumer=b"X-Consumer-ID", scopes=b"X-Consumer-Scopes", method=b"X-Auth-Method"
    )
    assert admission.rate_limits == RateLimits(
        consumer=None, anonymous=None, failed_auth=RateLimit(requests=10, period=60.0, burst=10)
    )
    assert admission.max_concurrent is None


def test_empty_admission_table_takes_the_defaults() -> None:
    """An empty [admission] table gives the same settings as none."""
    data = minimal()
    data["admission"] = {}
    assert parse(data, source=SOURCE).admission == parse(minimal(), source=SOURCE).admission


def test_no_auth_sections_at_all() -> None:
    """A config of public routes needs no [auth], [consumers] or [admission]."""
    data = minimal()
    del data["auth"], data["consumers"]
    data["routes"] = data["routes"][:1]
    admission = parse(data, source=SOURCE).admission
    assert admission == Admission()


def test_consumer_is_read_with_hashes_scopes_and_limits() -> None:
    """A consumer keeps its key hashes, bcrypt hash (bytes), scopes, own rate limit and own concurrency cap."""
    data = minimal()
    other = hash_key("gwk_older-key")
    data["consumers"]["alice"].update(
        api_keys=[hash_key(KEY), other],
        scopes=["read", "reports:write"],
        rate_limit={"rate": "20/s", "burst": 40},
        max_concurrent=10,
    )
    alice = parse(data, source=SOURCE).admission.consumers["alice"]
    assert alice == Consumer(
        name="alice",
        scopes=frozenset({"read", "reports:write"}),
        api_key_hashes=frozenset({hash_key(KEY), other}),
        password_hash=PASSWORD_HASH.encode("ascii"),
        rate_limit=RateLimit(requests=20, period=1.0, burst=40),
        max_concurrent=10,
    )


def test_consumer_defaults() -> None:
    """A consumer table may be empty: no scopes, no credentials, no limits of its own."""
    data = minimal()
    data["consumers"]["bob"] = {}
    assert parse(data, source=SOURCE).admission.consumers["bob"] == Consumer(name="bob")


def test_client_certificate_forms() -> None:
    """Each entry of client_certificates is read as (field, value): the field in any case (today's "DNS:",
    "URI:", "email:" and "IP:" unchanged), a bare DN as "dn:"; DNS names and email addresses in lower case, IP
    addresses in their usual form, CNs and URIs exactly as written."""
    data = minimal()
    data["consumers"]["alice"]["client_certificates"] = [
        "cn:Billing Service",
        "CN:billing",
        "dn:CN=billing,O=Example",
        "CN=ops,O=Example",
        "DNS:Billing.Internal",
        "dns:b.internal",
        "email:Ops@Example.com",
        "URI:spiffe://example.org/Billing",
        "IP:10.0.0.5",
        "ip:2001:DB8::0:1",
    ]
    consumer = parse(data, source=SOURCE).admission.consumers["alice"]
    assert consumer.client_certificates == {
        ("cn", "Billing Service"),
        ("cn", "billing"),
        ("dn", "CN=billing,O=Example"),
        ("dn", "CN=ops,O=Example"),
        ("dns", "billing.internal"),
        ("dns", "b.internal"),
        ("email", "ops@example.com"),
        ("uri", "spiffe://example.org/Billing"),
        ("ip", "10.0.0.5"),
        ("ip", "2001:db8::1"),
    }


def _subject(*attributes: tuple[x509.ObjectIdentifier, str]) -> str:
    """A certificate subject (most general first, as in the certificate) as the gateway writes it."""
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes]).rfc4514_string()


@pytest.mark.parametrize(
    ("written", "subject"),
    [
        ("dn:CN=billing,O=Example", _subject((NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COMMON_NAME, "billing"))),
        ("cn=billing,o=Example", _subject((NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COMMON_NAME, "billing"))),
        ("dn:CN=a\\2cb,O=x", _subject((NameOID.ORGANIZATION_NAME, "x"), (NameOID.COMMON_NAME, "a,b"))),
        ("dn:CN=a\\,b,O=x", _subject((NameOID.ORGANIZATION_NAME, "x"), (NameOID.COMMON_NAME, "a,b"))),
        (
            "dn:emailAddress=ops@example.com,CN=ops",
            _subject((NameOID.COMMON_NAME, "ops"), (NameOID.EMAIL_ADDRESS, "ops@example.com")),
        ),
        (
            "dn:CN=ops,serialNumber=42,C=DE",
            _subject((NameOID.COUNTRY_NAME, "DE"), (NameOID.SERIAL_NUMBER, "42"), (NameOID.COMMON_NAME, "ops")),
        ),
        (
            "dn:CN=ann,GN=Ann,SN=Lee,title=Ops,postalCode=1000,organizationIdentifier=VATDE-1",
            _subject(
                (NameOID.ORGANIZATION_IDENTIFIER, "VATDE-1"),
                (NameOID.POSTAL_CODE, "1000"),
                (NameOID.TITLE, "Ops"),
                (NameOID.SURNAME, "Lee"),
                (NameOID.GIVEN_NAME, "Ann"),
                (NameOID.COMMON_NAME, "ann"),
            ),
        ),
    ],
)
def test_a_dn_is_read_as_a_certificate_writes_its_subject(written: str, subject: str) -> None:
    """A configured DN is parsed and written back, so it equals the subject of the certificate it names however
    it is escaped, whatever the case of its attribute names, and with the names OpenSSL's RFC 2253 output gives
    attributes cryptography writes as OIDs (emailAddress, serialNumber, GN, SN, title...)."""
    data = minimal()
    data["consumers"]["alice"]["client_certificates"] = [written]
    assert parse(data, source=SOURCE).admission.consumers["alice"].client_certificates == {("dn", subject)}


def test_one_value_in_two_fields_is_two_identities() -> None:
    """cn:billing and dns:billing are different identities: two consumers may claim one each."""
    data = minimal()
    data["consumers"]["alice"]["client_certificates"] = ["cn:billing"]
    data["consumers"]["bob"] = {"client_certificates": ["dns:billing", "uri:billing", "dn:CN=billing"]}
    consumers = parse(data, source=SOURCE).admission.consumers
    assert consumers["alice"].client_certificates == {("cn", "billing")}
    assert consumers["bob"].client_certificates == {("dns", "billing"), ("uri", "billing"), ("dn", "CN=billing")}


def test_a_certificate_claimed_in_the_credentials_file_too_names_that_file(tmp_path: Path) -> None:
    """A consumer of the credentials file claiming what a consumer of the config claims is an error of the
    credentials file."""
    path = _write_config(
        tmp_path, 'credentials_file = "consumers.toml"', '[consumers.alice]\nclient_certificates = ["DNS:b.internal"]\n'
    )
    creds = tmp_path / "consumers.toml"
    creds.write_text('[consumers.bob]\nclient_certificates = ["dns:B.internal"]\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (info.value.source, info.value.key) == (str(creds), "consumers.bob.client_certificates")
    assert info.value.reason == "dns:b.internal is claimed by consumer 'alice' too: a certificate proves one consumer"


def test_consumer_empty_lists() -> None:
    """Empty api_keys and scopes arrays are allowed and mean none."""
    data = minimal()
    data["consumers"]["bob"] = {"api_keys": [], "scopes": []}
    bob = parse(data, source=SOURCE).admission.consumers["bob"]
    assert (bob.api_key_hashes, bob.scopes) == (frozenset(), frozenset())


@pytest.mark.parametrize("name", ["a", "app.v2", "reports-app", "svc_1", "A" * 128])
def test_consumer_names_accepted(name: str) -> None:
    """Consumer names of letters, digits and -_. up to 128 characters are accepted."""
    data = minimal()
    data["consumers"][name] = {}
    assert parse(data, source=SOURCE).admission.consumers[name].name == name


@pytest.mark.parametrize("name", ["alice@example.com", "svc:reports"])
def test_consumer_names_may_not_hold_at_or_colon(name: str) -> None:
    """A consumer name is a bare TOML key: "@" and ":" are refused (as `gateway-credentials` refuses them)."""
    data = minimal()
    data["consumers"][name] = {}
    with pytest.raises(ConfigError) as info:
        parse(data, source=SOURCE)
    assert info.value.reason == "a name may contain only letters, digits and -_."


def test_every_key_of_every_method() -> None:
    """Every key of every method is read, with units, lower-casing of header names, and "" for no header."""
    data = minimal()
    data["auth"] = {
        "keys": {"type": "api_key", "headers": ["X-API-Key", "Authorization: ApiKey"]},
        "login": {"type": "basic", "realm": "reports area", "threads": 4, "max_pending": 8, "cache_ttl": "2m"},
        "corp": {
            "type": "jwt",
            "issuer": "https://id.example.com/",
            "audiences": ["gateway", "reports"],
            "algorithms": ["ES256", "ES384"],
            "jwks_url": "http://id.internal/jwks",
            "jwks_refresh_interval": "10s",
            "jwks_max_age": "2h",
            "jwks_fetch_timeout": "1500ms",
            "leeway": 0,
            "require_exp": False,
            "consumer_claim": "client_id",
            "scope_claims": ["roles"],
            "claim_headers": {"X-User-Email": "email", "X-Tenant": "https://example.com/tenant"},
            "cache_size": 5,
        },
        "sso": {
            "type": "forward",
            "url": "http://auth.internal:9000/check?x=1",
            "timeout": "750ms",
            "request_headers": ["Authorization", "Cookie", "X-Session"],
            "copy_headers": ["X-User", "X-Org"],
            "consumer_header": "X-User",
            "scopes_header": "",
            "credential_headers": ["Cookie"],
            "max_connections": 3,
            "max_body": "1KiB",
        },
    }
    methods = parse(data, source=SOURCE).admission.methods
    assert methods["keys"] == ApiKeyMethod(
        name="keys", headers=(KeyHeader(b"x-api-key", None), KeyHeader(b"authorization", b"apikey"))
    )
    assert methods["login"] == BasicMethod(
        name="login", realm="reports area", threads=4, max_pending=8, cache_ttl=120.0
    )
    assert methods["corp"] == JwtMethod(
        name="corp",
        issuer="https://id.example.com/",
        audiences=("gateway", "reports"),
        algorithms=("ES256", "ES384"),
        jwks_url="http://id.internal/jwks",
        jwks_refresh_interval=10.0,
        jwks_max_age=7200.0,
        jwks_fetch_timeout=1.5,
        leeway=0.0,
        require_exp=False,
        consumer_claim="client_id",
        scope_claims=("roles",),
        claim_headers=((b"X-User-Email", "email"), (b"X-Tenant", "https://example.com/tenant")),
        cache_size=5,
    )
    assert methods["sso"] == ForwardMethod(
        name="sso",
        url="http://auth.internal:9000/check?x=1",
        timeout=0.75,
        request_headers=(b"authorization", b"cookie", b"x-session"),
        copy_headers=(b"x-user", b"x-org"),
        consumer_header=b"x-user",
        scopes_header=None,
        credential_headers=(b"cookie",),
        max_connections=3,
        max_body=1024,
    )


def test_jwt_scope_claims_may_be_empty() -> None:
    """scope_claims = [] means a token's scopes are never read."""
    data = minimal()
    data["auth"]["corp"]["scope_claims"] = []
    corp = parse(data, source=SOURCE).admission.methods["corp"]
    assert isinstance(corp, JwtMethod)
    assert corp.scope_claims == ()


def test_jwt_jwks_url_may_be_https_or_http() -> None:
    """A JWKS URL may be https or http."""
    for url in ("https://id.example.com/jwks", "http://127.0.0.1:9000/jwks"):
        data = minimal()
        data["auth"]["corp"]["jwks_url"] = url
        corp = parse(data, source=SOURCE).admission.methods["corp"]
        assert isinstance(corp, JwtMethod)
        assert corp.jwks_url == url


def test_every_admission_key() -> None:
    """[admission] reads realm, identity headers ("" for none), every rate limit and the concurrency cap."""
    data = minimal()
    data["admission"] = {
        "realm": "my api",
        "identity_headers": {"consumer": "X-User", "scopes": "", "method": "X-Via-Auth"},
        "rate_limits": {
            "consumer": {"rate": "100/s", "burst": 200},
            "anonymous": {"rate": "50/s"},
            "failed_auth": {"rate": "5/10s", "burst": 2},
            "failed_auth_per_address": {"rate": "30/m", "burst": 40},
        },
        "max_concurrent": 7,
    }
    admission = parse(data, source=SOURCE).admission
    assert admission.realm == "my api"
    assert admission.identity == IdentityHeaders(consumer=b"X-User", scopes=b"", method=b"X-Via-Auth")
    assert admission.rate_limits == RateLimits(
        consumer=RateLimit(requests=100, period=1.0, burst=200),
        anonymous=RateLimit(requests=50, period=1.0, burst=50),
        failed_auth=RateLimit(requests=5, period=10.0, burst=2),
        failed_auth_per_address=RateLimit(requests=30, period=60.0, burst=40),
    )
    assert admission.max_concurrent == 7


def test_identity_headers_not_given_keep_their_defaults() -> None:
    """An [admission.identity_headers] naming one header keeps the default names of the others."""
    data = minimal()
    data["admission"] = {"identity_headers": {"scopes": "X-Scopes"}}
    identity = parse(data, source=SOURCE).admission.identity
    assert identity == IdentityHeaders(consumer=b"X-Consumer-ID", scopes=b"X-Scopes", method=b"X-Auth-Method")


def test_identity_headers_may_all_be_off() -> None:
    """Every identity header may be turned off with ""."""
    data = minimal()
    data["admission"] = {"identity_headers": {"consumer": "", "scopes": "", "method": ""}}
    assert parse(data, source=SOURCE).admission.identity == IdentityHeaders(consumer=b"", scopes=b"", method=b"")


# --- rates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "requests", "period"),
    [
        ("100/s", 100, 1.0),
        ("600/m", 600, 60.0),
        ("5/10s", 5, 10.0),
        ("1/h", 1, 3600.0),
        ("3/2h", 3, 7200.0),
        ("1/250ms", 1, 0.25),
        ("2/1.5s", 2, 1.5),
        ("2/.5s", 2, 0.5),
        (" 5 / 10 S ", 5, 10.0),
        ("10/M", 10, 60.0),
    ],
)
def test_rate(rate: str, requests: int, period: float) -> None:
    """A rate is "N/unit" or "N/<number><unit>" with ms, s, m or h; the burst defaults to N."""
    data = minimal()
    data["admission"] = {"rate_limits": {"consumer": {"rate": rate}}}
    limit = parse(data, source=SOURCE).admission.rate_limits.consumer
    assert limit is not None
    assert (limit.requests, limit.period, limit.burst) == (requests, pytest.approx(period), requests)
    assert limit.interval == pytest.approx(period / requests)


@pytest.mark.parametrize(
    ("rate", "reason"),
    [
        ("0/s", 'must be a rate such as "100/s", "600/m" or "5/10s", got \'0/s\''),
        ("abc", "must be a rate such as"),
        ("100", "must be a rate such as"),
        ("100/", "must be a rate such as"),
        ("5/10", "must be a rate such as"),
        ("-1/s", "must be a rate such as"),
        ("1.5/s", "must be a rate such as"),
        ("5/s/s", "must be a rate such as"),
        ("1/1e3s", "must be a rate such as"),
        ("5/d", "must be a rate such as"),
        ("5/0s", "must have a positive period, got '5/0s'"),
        ("5/0.0m", "must have a positive period"),
        ("", "must not be empty"),
        (100, "must be a string, got an integer"),
        (["100/s"], "must be a string, got an array"),
    ],
)
def test_bad_rate(rate: object, reason: str) -> None:
    """A rate that is not a positive count over a positive period is an error naming the rate key."""
    data = minimal()
    data["admission"] = {"rate_limits": {"anonymous": {"rate": rate}}}
    error = error_of(data)
    assert (error.source, error.key) == (SOURCE, "admission.rate_limits.anonymous.rate")
    assert error.reason.startswith(reason)


def test_burst_defaults_to_the_requests_and_may_beset_at() -> None:
    """burst is the rate's count unless given, and may be above or below it."""
    data = minimal()
    data["admission"] = {"rate_limits": {"consumer": {"rate": "10/s"}, "anonymous": {"rate": "10/s", "burst": 3}}}
    data["consumers"]["alice"]["rate_limit"] = {"rate": "10/m", "burst": 50}
    admission = parse(data, source=SOURCE).admission
    assert admission.rate_limits.consumer == RateLimit(requests=10, period=1.0, burst=10)
    assert admission.rate_limits.anonymous == RateLimit(requests=10, period=1.0, burst=3)
    assert admission.consumers["alice"].rate_limit == RateLimit(requests=10, period=60.0, burst=50)


@pytest.mark.parametrize("burst", [0, -1, 1.5, "10", True])
def test_bad_burst(burst: object) -> None:
    """A burst that is not a positive integer is an error naming the burst key."""
    data = minimal()
    data["admission"] = {"rate_limits": {"consumer": {"rate": "10/s", "burst": burst}}}
    error = error_of(data)
    assert error.key == "admission.rate_limits.consumer.burst"
    assert error.reason.startswith("must be a")


def test_failed_auth_false_disables_it() -> None:
    """failed_auth = false turns the brute-force limit off, its per-address ceiling with it (unless that is
    given); consumer and anonymous may be false too."""
    data = minimal()
    data["admission"] = {"rate_limits": {"failed_auth": False, "consumer": False, "anonymous": False}}
    assert parse(data, source=SOURCE).admission.rate_limits == RateLimits(
        consumer=None, anonymous=None, failed_auth=None, failed_auth_per_address=None
    )


def test_rate_limits_table_without_failed_auth_keeps_its_default() -> None:
    """A [admission.rate_limits] table that does not mention failed_auth keeps 10 a minute, and 100 a minute per
    address."""
    data = minimal()
    data["admission"] = {"rate_limits": {"consumer": {"rate": "1/s"}}}
    limits = parse(data, source=SOURCE).admission.rate_limits
    assert limits.failed_auth == RateLimit(requests=10, period=60.0, burst=10)
    assert limits.failed_auth_per_address == RateLimit(requests=100, period=60.0, burst=100)
    assert limits.anonymous is None


def test_the_per_address_ceiling_follows_failed_auth_unless_given() -> None:
    """failed_auth_per_address, when not given, is ten times failed_auth (its rate and burst, over its period);
    either may be false on its own: the ceiling alone counts per address only, as before claimants."""
    data = minimal()
    data["admission"] = {"rate_limits": {"failed_auth": {"rate": "5/10s", "burst": 2}}}
    limits = parse(data, source=SOURCE).admission.rate_limits
    assert limits.failed_auth_per_address == RateLimit(requests=50, period=10.0, burst=20)
    data["admission"] = {"rate_limits": {"failed_auth_per_address": False}}
    limits = parse(data, source=SOURCE).admission.rate_limits
    assert (limits.failed_auth, limits.failed_auth_per_address) == (RateLimit(requests=10, period=60.0, burst=10), None)
    data["admission"] = {"rate_limits": {"failed_auth": False, "failed_auth_per_address": {"rate": "20/m"}}}
    limits = parse(data, source=SOURCE).admission.rate_limits
    assert (limits.failed_auth, limits.failed_auth_per_address) == (None, RateLimit(requests=20, period=60.0, burst=20))


def test_rate_limit_interval() -> None:
    """A RateLimit's interval is its period over its requests."""
    assert RateLimit(requests=4, period=1.0, burst=4).interval == 0.25
    assert RateLimit(requests=10, period=60.0, burst=1).interval == 6.0


# --- route admission -----------------------------------------------------------------------------------------


def test_route_admission() -> None:
    """A public route gets ANONYMOUS; a protected one its methods in order, its scopes and forward_credentials."""
    data = minimal()
    data["routes"][1].update(
        auth=["corp", "keys"], scopes_any=["read", "admin"], scopes_all=["reports:read"], forward_credentials=True
    )
    public, api = parse(data, source=SOURCE).routes
    assert public.admission is ANONYMOUS
    assert public.admission == RouteAdmission(anonymous=True)
    assert api.admission == RouteAdmission(
        anonymous=False,
        methods=("corp", "keys"),
        scopes_any=frozenset({"read", "admin"}),
        scopes_all=frozenset({"reports:read"}),
        forward_credentials=True,
    )


def test_route_admission_defaults() -> None:
    """A protected route without scopes requires none and removes the credential before forwarding."""
    api = parse(minimal(), source=SOURCE).routes[1]
    assert api.admission == RouteAdmission(methods=("keys", "login", "corp", "sso"))
    assert api.admission.scopes_any == api.admission.scopes_all == frozenset()
    assert api.admission.forward_credentials is False


def test_anonymous_route_with_empty_scope_lists() -> None:
    """An anonymous route may carry empty scope arrays (nothing to check)."""
    data = minimal()
    data["routes"][0].update(scopes_any=[], scopes_all=[])
    assert parse(data, source=SOURCE).routes[0].admission is ANONYMOUS


@pytest.mark.parametrize("scope", ["reports:read", "a", "https://api.example.com/read", "x!#$%&'()*+,-./[]^_`{|}~"])
def test_scope_tokens_accepted(scope: str) -> None:
    """A scope may be any run of visible ASCII but quote and backslash."""
    data = minimal()
    data["routes"][1]["scopes_all"] = [scope]
    data["consumers"]["alice"]["scopes"] = [scope]
    cfg = parse(data, source=SOURCE)
    assert cfg.routes[1].admission.scopes_all == frozenset({scope})
    assert cfg.admission.consumers["alice"].scopes == frozenset({scope})


# --- errors: every one names the file, the key path and the reason -------------------------------------------

ERROR_CASES: list[tuple[str, Mutation, str, str]] = [
    # routes
    (
        "route-without-auth",
        delete_at("routes.0.auth"),
        'routes["public"].auth',
        'is required: say auth = "anonymous" for a public route, or name the methods it accepts',
    ),
    (
        "route-unknown-method",
        set_at("routes.1.auth", ["keys", "nope"]),
        'routes["api"].auth',
        "no method named 'nope' (define it as [auth.nope]; known: corp, keys, login, sso)",
    ),
    (
        "route-method-none-defined",
        _both(delete_at("auth"), set_at("routes.1.auth", ["keys"])),
        'routes["api"].auth',
        "no method named 'keys' (define it as [auth.keys]; known: none are defined)",
    ),
    (
        "route-method-twice",
        set_at("routes.1.auth", ["keys", "corp", "keys"]),
        'routes["api"].auth',
        "names a method twice",
    ),
    (
        "route-auth-empty",
        set_at("routes.1.auth", []),
        'routes["api"].auth',
        'must be "anonymous" or a non-empty array of method names, got []',
    ),
    ("route-auth-other-string", set_at("routes.1.auth", "keys"), 'routes["api"].auth', 'must be "anonymous" or a non'),
    (
        "route-auth-anonymous-case",
        set_at("routes.0.auth", "Anonymous"),
        'routes["public"].auth',
        'must be "anonymous" or',
    ),
    ("route-auth-not-strings", set_at("routes.1.auth", ["keys", 1]), 'routes["api"].auth', 'must be "anonymous" or a'),
    ("route-auth-boolean", set_at("routes.1.auth", True), 'routes["api"].auth', 'must be "anonymous" or a non-empty'),
    (
        "anonymous-scopes_any",
        set_at("routes.0.scopes_any", ["read"]),
        'routes["public"].scopes_any',
        "an anonymous route has no scopes to check",
    ),
    (
        "anonymous-scopes_all",
        set_at("routes.0.scopes_all", ["read"]),
        'routes["public"].scopes_all',
        "an anonymous route has no scopes to check",
    ),
    ("route-scope-space", set_at("routes.1.scopes_any", ["a b"]), 'routes["api"].scopes_any', "a scope is one word"),
    ("route-scope-quote", set_at("routes.1.scopes_all", ['a"b']), 'routes["api"].scopes_all', "a scope is one word"),
    (
        "route-scope-backslash",
        set_at("routes.1.scopes_all", ["a\\b"]),
        'routes["api"].scopes_all',
        "a scope is one word",
    ),
    ("route-scope-non-ascii", set_at("routes.1.scopes_all", ["lé"]), 'routes["api"].scopes_all', "a scope is one word"),
    ("route-scope-empty", set_at("routes.1.scopes_any", [""]), 'routes["api"].scopes_any', "must not contain an empty"),
    (
        "route-scopes-string",
        set_at("routes.1.scopes_any", "read"),
        'routes["api"].scopes_any',
        "must be an array of str",
    ),
    (
        "route-forward-credentials",
        set_at("routes.1.forward_credentials", "yes"),
        'routes["api"].forward_credentials',
        "must be true or false, got a string",
    ),
    ("route-unknown-key", set_at("routes.1.scope_any", ["read"]), 'routes["api"].scope_any', "unknown key"),
    # methods of any type
    ("method-type-missing", delete_at("auth.keys.type"), "auth.keys.type", "is required"),
    (
        "method-type-unknown",
        set_at("auth.keys.type", "oauth"),
        "auth.keys.type",
        "unknown method type 'oauth' (known: api_key, mtls, jwt, basic, forward)",
    ),
    ("method-type-empty", set_at("auth.keys.type", ""), "auth.keys.type", "must not be empty"),
    ("method-name", set_at("auth.a b", {"type": "api_key"}), "auth.a b", "a name may contain only letters, digits"),
    ("method-not-table", set_at("auth.keys", "api_key"), "auth.keys", "must be a table, got a string"),
    ("auth-not-table", set_at("auth", ["keys"]), "auth", "must be a table, got an array"),
    # api_key
    ("api-key-unknown-key", set_at("auth.keys.realm", "x"), "auth.keys.realm", "unknown key"),
    ("api-key-headers-empty", set_at("auth.keys.headers", []), "auth.keys.headers", "must be a non-empty array"),
    ("api-key-headers-string", set_at("auth.keys.headers", "X-API-Key"), "auth.keys.headers", "must be a non-empty"),
    (
        "api-key-header-space",
        set_at("auth.keys.headers", ["X API Key"]),
        "auth.keys.headers",
        'must be a header name, optionally with a scheme ("Authorization: Bearer")',
    ),
    ("api-key-header-no-scheme", set_at("auth.keys.headers", ["Authorization:"]), "auth.keys.headers", "must be a he"),
    ("api-key-header-two-schemes", set_at("auth.keys.headers", ["A: B C"]), "auth.keys.headers", "must be a header"),
    ("api-key-header-not-string", set_at("auth.keys.headers", [1]), "auth.keys.headers", "must be a string"),
    # jwt
    ("jwt-algorithms-missing", delete_at("auth.corp.algorithms"), "auth.corp.algorithms", "is required"),
    ("jwt-algorithms-empty", set_at("auth.corp.algorithms", []), "auth.corp.algorithms", "must list at least one"),
    ("jwt-alg-none", set_at("auth.corp.algorithms", ["none"]), "auth.corp.algorithms", '"none" is never allowed'),
    (
        "jwt-alg-None-with-others",
        set_at("auth.corp.algorithms", ["RS256", "None"]),
        "auth.corp.algorithms",
        '"none" is never allowed: an unsigned token proves nothing',
    ),
    (
        "jwt-alg-unknown",
        set_at("auth.corp.algorithms", ["RS1"]),
        "auth.corp.algorithms",
        "unknown algorithm 'RS1' (known: ES256, ES384, ES512, EdDSA, HS256, HS384, HS512, PS256, PS384,",
    ),
    ("jwt-alg-lower-case", set_at("auth.corp.algorithms", ["rs256"]), "auth.corp.algorithms", "unknown algorithm 'rs"),
    (
        "jwt-alg-hs-with-rs",
        set_at("auth.corp.algorithms", ["HS256", "RS256"]),
        "auth.corp.algorithms",
        "HMAC algorithms (HS256/384/512) cannot be allowed with public-key ones in one method",
    ),
    (
        "jwt-alg-rs-with-hs",
        set_at("auth.corp.algorithms", ["RS256", "HS512"]),
        "auth.corp.algorithms",
        "cannot be allowed with public-key ones",
    ),
    ("jwt-alg-es-with-hs", set_at("auth.corp.algorithms", ["ES256", "HS256"]), "auth.corp.algorithms", "HMAC algori"),
    ("jwt-alg-string", set_at("auth.corp.algorithms", "RS256"), "auth.corp.algorithms", "must be an array of strings"),
    (
        "jwt-no-key-source",
        delete_at("auth.corp.jwks_url"),
        "auth.corp.public_key_file",
        "give exactly one of public_key_file, jwks_file and jwks_url (got: none)",
    ),
    (
        "jwt-two-key-sources",
        set_at("auth.corp.jwks_file", "jwks.json"),
        "auth.corp.public_key_file",
        "give exactly one of public_key_file, jwks_file and jwks_url (got: jwks_file, jwks_url)",
    ),
    (
        "jwt-three-key-sources",
        _both(set_at("auth.corp.jwks_file", "jwks.json"), set_at("auth.corp.public_key_file", "k.pem")),
        "auth.corp.public_key_file",
        "(got: public_key_file, jwks_file, jwks_url)",
    ),
    (
        "jwt-rs-with-secret-only",
        _both(delete_at("auth.corp.jwks_url"), set_at("auth.corp.secret_file", "secret")),
        "auth.corp.public_key_file",
        "give exactly one of public_key_file, jwks_file and jwks_url (got: secret_file)",
    ),
    (
        "jwt-rs-with-secret-too",
        set_at("auth.corp.secret_file", "secret"),
        "auth.corp.public_key_file",
        "(got: jwks_url, secret_file)",
    ),
    (
        "jwt-hs-without-secret",
        set_at("auth.corp.algorithms", ["HS256"]),
        "auth.corp.secret_file",
        "HMAC algorithms need secret_file (and no public key source)",
    ),
    (
        "jwt-hs-with-nothing",
        _both(set_at("auth.corp.algorithms", ["HS384"]), delete_at("auth.corp.jwks_url")),
        "auth.corp.secret_file",
        "HMAC algorithms need secret_file",
    ),
    (
        "jwt-hs-with-secret-and-key",
        _both(set_at("auth.corp.algorithms", ["HS256"]), set_at("auth.corp.secret_file", "secret")),
        "auth.corp.secret_file",
        "HMAC algorithms need secret_file (and no public key source)",
    ),
    (
        "jwt-audiences-empty",
        set_at("auth.corp.audiences", []),
        "auth.corp.audiences",
        "must list at least one audience",
    ),
    ("jwt-audiences-missing", delete_at("auth.corp.audiences"), "auth.corp.audiences", "is required"),
    ("jwt-audiences-string", set_at("auth.corp.audiences", "gateway"), "auth.corp.audiences", "must be an array of st"),
    ("jwt-audience-empty", set_at("auth.corp.audiences", [" "]), "auth.corp.audiences", "must not contain an empty"),
    ("jwt-issuer-missing", delete_at("auth.corp.issuer"), "auth.corp.issuer", "is required"),
    ("jwt-issuer-empty", set_at("auth.corp.issuer", ""), "auth.corp.issuer", "must not be empty"),
    ("jwt-jwks-url-ftp", set_at("auth.corp.jwks_url", "ftp://id/jwks"), "auth.corp.jwks_url", "must be an http or h"),
    (
        "jwt-jwks-url-credentials",
        set_at("auth.corp.jwks_url", "https://u:p@id.example.com/jwks"),
        "auth.corp.jwks_url",
        "must be an http or https URL without credentials",
    ),
    ("jwt-jwks-url-no-host", set_at("auth.corp.jwks_url", "https:///jwks"), "auth.corp.jwks_url", "must be an http"),
    ("jwt-jwks-url-port", set_at("auth.corp.jwks_url", "https://id:99999/j"), "auth.corp.jwks_url", "has an invalid p"),
    (
        "jwt-claim-header-name",
        set_at("auth.corp.claim_headers", {"X User": "email"}),
        "auth.corp.claim_headers.X User",
        "must be a header name",
    ),
    (
        "jwt-claim-header-claim",
        set_at("auth.corp.claim_headers", {"X-Email": "e mail"}),
        "auth.corp.claim_headers.X-Email",
        "must be a claim name, got 'e mail'",
    ),
    (
        "jwt-claim-header-not-string",
        set_at("auth.corp.claim_headers", {"X-Email": 1}),
        "auth.corp.claim_headers.X-Email",
        "must be a string",
    ),
    ("jwt-claim-headers-array", set_at("auth.corp.claim_headers", ["email"]), "auth.corp.claim_headers", "must be a t"),
    ("jwt-consumer-claim", set_at("auth.corp.consumer_claim", "a b"), "auth.corp.consumer_claim", "must be a claim na"),
    ("jwt-scope-claims-string", set_at("auth.corp.scope_claims", "scope"), "auth.corp.scope_claims", "must be an arr"),
    ("jwt-scope-claim-bad", set_at("auth.corp.scope_claims", ["sc ope"]), "auth.corp.scope_claims", "must be a claim"),
    ("jwt-leeway-negative", set_at("auth.corp.leeway", -1), "auth.corp.leeway", "must be a positive number of seconds"),
    ("jwt-refresh-zero", set_at("auth.corp.jwks_refresh_interval", 0), "auth.corp.jwks_refresh_interval", "must be a"),
    ("jwt-max-age-bad", set_at("auth.corp.jwks_max_age", "soon"), "auth.corp.jwks_max_age", "must be seconds"),
    ("jwt-fetch-timeout-0", set_at("auth.corp.jwks_fetch_timeout", "0s"), "auth.corp.jwks_fetch_timeout", "must be a"),
    ("jwt-require-exp", set_at("auth.corp.require_exp", "yes"), "auth.corp.require_exp", "must be true or false"),
    ("jwt-cache-size", set_at("auth.corp.cache_size", 0), "auth.corp.cache_size", "must be a positive integer, got 0"),
    ("jwt-unknown-key", set_at("auth.corp.public_key", "k.pem"), "auth.corp.public_key", "unknown key"),
    ("jwt-unknown-key-2", set_at("auth.corp.audience", "gateway"), "auth.corp.audience", "unknown key"),
    # basic
    (
        "basic-realm-quote",
        set_at("auth.login.realm", 'a"b'),
        "auth.login.realm",
        "must be printable ASCII without quotes or backslashes, got 'a\"b'",
    ),
    ("basic-realm-backslash", set_at("auth.login.realm", "a\\b"), "auth.login.realm", "must be printable ASCII"),
    ("basic-realm-non-ascii", set_at("auth.login.realm", "ré"), "auth.login.realm", "must be printable ASCII"),
    ("basic-realm-empty", set_at("auth.login.realm", ""), "auth.login.realm", "must not be empty"),
    ("basic-threads", set_at("auth.login.threads", 0), "auth.login.threads", "must be a positive integer"),
    ("basic-max-pending", set_at("auth.login.max_pending", "8"), "auth.login.max_pending", "must be an integer"),
    ("basic-cache-ttl", set_at("auth.login.cache_ttl", -5), "auth.login.cache_ttl", "must be a positive number of s"),
    ("basic-unknown-key", set_at("auth.login.headers", ["Authorization"]), "auth.login.headers", "unknown key"),
    # forward
    ("forward-url-missing", delete_at("auth.sso.url"), "auth.sso.url", "is required"),
    (
        "forward-url-https",
        set_at("auth.sso.url", "https://auth.example.com/check"),
        "auth.sso.url",
        "must be an http URL (https auth services come with the TLS work)",
    ),
    ("forward-url-ftp", set_at("auth.sso.url", "ftp://auth/check"), "auth.sso.url", "must be an http or https URL"),
    ("forward-url-relative", set_at("auth.sso.url", "/check"), "auth.sso.url", "must be an http or https URL"),
    ("forward-url-creds", set_at("auth.sso.url", "http://u:p@a/check"), "auth.sso.url", "must be an http or https"),
    ("forward-url-port", set_at("auth.sso.url", "http://auth:99999/"), "auth.sso.url", "has an invalid port"),
    ("forward-timeout", set_at("auth.sso.timeout", 0), "auth.sso.timeout", "must be a positive number of seconds"),
    (
        "forward-request-headers-empty",
        set_at("auth.sso.request_headers", []),
        "auth.sso.request_headers",
        "must name at least one header (the method applies when one is present)",
    ),
    (
        "forward-request-headers-bad",
        set_at("auth.sso.request_headers", ["Author ization"]),
        "auth.sso.request_headers",
        "must be a header name (letters, digits and -), got 'Author ization'",
    ),
    (
        "forward-request-headers-string",
        set_at("auth.sso.request_headers", "Cookie"),
        "auth.sso.request_headers",
        "must be an array of header names, got a string",
    ),
    ("forward-copy-headers", set_at("auth.sso.copy_headers", ["X:User"]), "auth.sso.copy_headers", "must be a head"),
    ("forward-consumer-header", set_at("auth.sso.consumer_header", "X User"), "auth.sso.consumer_header", "must be a"),
    ("forward-scopes-header", set_at("auth.sso.scopes_header", 1), "auth.sso.scopes_header", "must be a string"),
    ("forward-cred-headers", set_at("auth.sso.credential_headers", [""]), "auth.sso.credential_headers", "must not"),
    ("forward-max-conns", set_at("auth.sso.max_connections", 0), "auth.sso.max_connections", "must be a positive"),
    ("forward-max-body", set_at("auth.sso.max_body", "1XB"), "auth.sso.max_body", "must be bytes as an integer"),
    ("forward-unknown-key", set_at("auth.sso.realm", "x"), "auth.sso.realm", "unknown key"),
    # consumers
    (
        "consumer-name-space",
        set_at("consumers.a b", {}),
        "consumers.a b",
        "a name may contain only letters, digits and -_.",
    ),
    (
        "consumer-name-too-long",
        set_at("consumers." + "x" * 129, {}),
        "consumers." + "x" * 129,
        "a consumer name may contain only letters, digits and -_. (at most 128)",
    ),
    ("consumer-not-table", set_at("consumers.bob", "x"), "consumers.bob", "must be a table, got a string"),
    (
        "consumer-raw-key",
        set_at("consumers.alice.api_keys", [KEY]),
        "consumers.alice.api_keys",
        'must hold hashes such as "sha256:9f86d0...", as `gateway-credentials api-key` prints them, never a key',
    ),
    (
        "consumer-hash-upper-hex",
        set_at("consumers.alice.api_keys", [hash_key(KEY).upper()]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    (
        "consumer-hash-short",
        set_at("consumers.alice.api_keys", [hash_key(KEY)[:-1]]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    (
        "consumer-hash-long",
        set_at("consumers.alice.api_keys", [hash_key(KEY) + "0"]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    (
        "consumer-hash-other-algorithm",
        set_at("consumers.alice.api_keys", ["sha512:" + "0" * 64]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    (
        "consumer-hash-bare-hex",
        set_at("consumers.alice.api_keys", [hash_key(KEY).removeprefix("sha256:")]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    (
        "consumer-one-bad-hash",
        set_at("consumers.alice.api_keys", [hash_key(KEY), "sha256:zz"]),
        "consumers.alice.api_keys",
        "must hold hashes",
    ),
    ("consumer-keys-string", set_at("consumers.alice.api_keys", hash_key(KEY)), "consumers.alice.api_keys", "must be"),
    (
        "consumer-raw-password",
        set_at("consumers.alice.password", "secret"),
        "consumers.alice.password",
        'must be a bcrypt hash ("$2b$12$..."), as `gateway-credentials password` prints it, never a password',
    ),
    (
        "consumer-bcrypt-truncated",
        set_at("consumers.alice.password", PASSWORD_HASH[:-1]),
        "consumers.alice.password",
        "must be a bcrypt hash",
    ),
    (
        "consumer-bcrypt-cost-3",
        set_at("consumers.alice.password", "$2b$03$" + PASSWORD_HASH[7:]),
        "consumers.alice.password",
        "must be a bcrypt hash",
    ),
    (
        "consumer-bcrypt-cost-32",
        set_at("consumers.alice.password", "$2b$32$" + PASSWORD_HASH[7:]),
        "consumers.alice.password",
        "must be a bcrypt hash",
    ),
    (
        "consumer-bcrypt-variant",
        set_at("consumers.alice.password", "$2x$" + PASSWORD_HASH[4:]),
        "consumers.alice.password",
        "must be a bcrypt hash",
    ),
    (
        "consumer-bcrypt-bad-char",
        set_at("consumers.alice.password", PASSWORD_HASH[:-1] + "!"),
        "consumers.alice.password",
        "must be a bcrypt hash",
    ),
    ("consumer-password-empty", set_at("consumers.alice.password", ""), "consumers.alice.password", "must not be emp"),
    ("consumer-scope-space", set_at("consumers.alice.scopes", ["a b"]), "consumers.alice.scopes", "a scope is one w"),
    (
        "consumer-rate",
        set_at("consumers.alice.rate_limit", {"rate": "0/s"}),
        "consumers.alice.rate_limit.rate",
        "must be a rate such as",
    ),
    (
        "consumer-rate-missing",
        set_at("consumers.alice.rate_limit", {"burst": 5}),
        "consumers.alice.rate_limit.rate",
        "is required",
    ),
    (
        "consumer-rate-burst",
        set_at("consumers.alice.rate_limit", {"rate": "1/s", "burst": 0}),
        "consumers.alice.rate_limit.burst",
        "must be a positive integer, got 0",
    ),
    (
        "consumer-rate-unknown-key",
        set_at("consumers.alice.rate_limit", {"rate": "1/s", "per": "ip"}),
        "consumers.alice.rate_limit.per",
        "unknown key",
    ),
    (
        "consumer-rate-string",
        set_at("consumers.alice.rate_limit", "20/s"),
        "consumers.alice.rate_limit",
        "must be a table, got a string",
    ),
    ("consumer-max-concurrent", set_at("consumers.alice.max_concurrent", 0), "consumers.alice.max_concurrent", "must"),
    ("consumer-unknown-key", set_at("consumers.alice.scope", ["read"]), "consumers.alice.scope", "unknown key"),
    (
        "certificates-not-array",
        set_at("consumers.alice.client_certificates", "cn:billing"),
        "consumers.alice.client_certificates",
        'must be a non-empty array such as ["cn:billing"], ["dns:billing.internal", "dn:CN=billing,O=Example"], '
        "got a string",
    ),
    (
        "certificates-empty",
        set_at("consumers.alice.client_certificates", []),
        "consumers.alice.client_certificates",
        "must be a non-empty array",
    ),
    (
        "certificates-no-field",
        set_at("consumers.alice.client_certificates", ["billing"]),
        "consumers.alice.client_certificates",
        "'billing' names no certificate field: write cn:NAME (the subject's CN), dn:DN (the whole subject), "
        "dns:NAME, email:ADDRESS, uri:URI or ip:ADDRESS (a subjectAltName)",
    ),
    (
        "certificates-unknown-field",
        set_at("consumers.alice.client_certificates", ["spiffe://example.org/billing"]),
        "consumers.alice.client_certificates",
        "'spiffe://example.org/billing' names no certificate field",
    ),
    (
        "certificates-nothing-after",
        set_at("consumers.alice.client_certificates", ["CN:"]),
        "consumers.alice.client_certificates",
        "'CN:' names nothing after cn:",
    ),
    (
        "certificates-white-space",
        set_at("consumers.alice.client_certificates", ["cn: billing"]),
        "consumers.alice.client_certificates",
        "'cn: billing' has white space around its cn (it would never match)",
    ),
    (
        "certificates-dn-spaces",
        set_at("consumers.alice.client_certificates", ["dn:CN=billing, O=Example"]),
        "consumers.alice.client_certificates",
        "'CN=billing, O=Example' is not a subject DN in RFC 4514 form: most specific first, no spaces around "
        '"," or "=", such as "CN=billing,O=Example" (`openssl x509 -noout -subject -nameopt RFC2253` prints it so)',
    ),
    (
        "certificates-bare-dn-unknown-attribute",
        set_at("consumers.alice.client_certificates", ["XX=1,CN=billing"]),
        "consumers.alice.client_certificates",
        "'XX=1,CN=billing' is not a subject DN",
    ),
    (
        "certificates-ip",
        set_at("consumers.alice.client_certificates", ["IP:10.0.0.300"]),
        "consumers.alice.client_certificates",
        "'10.0.0.300' is not an IP address",
    ),
    (
        "certificates-claimed-twice",
        _both(
            set_at("consumers.alice.client_certificates", ["cn:billing"]),
            set_at("consumers.bob.client_certificates", ["dns:billing", "CN:billing"]),
        ),
        "consumers.bob.client_certificates",
        "cn:billing is claimed by consumer 'alice' too: a certificate proves one consumer",
    ),
    (
        "certificates-dn-claimed-twice-in-another-spelling",
        _both(
            set_at("consumers.alice.client_certificates", ["CN=billing,O=Example"]),
            set_at("consumers.bob.client_certificates", ["dn:cn=billing,o=Example"]),
        ),
        "consumers.bob.client_certificates",
        "dn:CN=billing,O=Example is claimed by consumer 'alice' too",
    ),
    # admission
    ("admission-not-table", set_at("admission", "x"), "admission", "must be a table, got a string"),
    ("admission-unknown-key", set_at("admission.realms", "x"), "admission.realms", "unknown key"),
    ("admission-realm-quote", set_at("admission.realm", 'a"'), "admission.realm", "must be printable ASCII without"),
    ("admission-realm-empty", set_at("admission.realm", ""), "admission.realm", "must not be empty"),
    ("admission-max-concurrent", set_at("admission.max_concurrent", -1), "admission.max_concurrent", "must be a pos"),
    (
        "admission-credentials-file-empty",
        set_at("admission.credentials_file", ""),
        "admission.credentials_file",
        "must not be empty",
    ),
    (
        "identity-header-space",
        set_at("admission.identity_headers.consumer", "X Consumer"),
        "admission.identity_headers.consumer",
        "must be a header name (letters, digits and -), got 'X Consumer'",
    ),
    (
        "identity-header-colon",
        set_at("admission.identity_headers.scopes", "X-Scopes:"),
        "admission.identity_headers.scopes",
        "must be a header name",
    ),
    (
        "identity-header-non-ascii",
        set_at("admission.identity_headers.method", "X-Méthode"),
        "admission.identity_headers.method",
        "must be a header name",
    ),
    (
        "identity-header-not-string",
        set_at("admission.identity_headers.method", False),
        "admission.identity_headers.method",
        "must be a string, got a boolean",
    ),
    (
        "identity-headers-unknown-key",
        set_at("admission.identity_headers.user", "X-User"),
        "admission.identity_headers.user",
        "unknown key",
    ),
    (
        "rate-limits-unknown-key",
        set_at("admission.rate_limits.per_consumer", {"rate": "1/s"}),
        "admission.rate_limits.per_consumer",
        "unknown key",
    ),
    (
        "rate-limit-unknown-key",
        set_at("admission.rate_limits.consumer", {"rate": "1/s", "burts": 2}),
        "admission.rate_limits.consumer.burts",
        "unknown key",
    ),
    (
        "failed-auth-true",
        set_at("admission.rate_limits.failed_auth", True),
        "admission.rate_limits.failed_auth",
        "must be a table, got a boolean",
    ),
    (
        "failed-auth-per-address-true",
        set_at("admission.rate_limits.failed_auth_per_address", True),
        "admission.rate_limits.failed_auth_per_address",
        "must be a table, got a boolean",
    ),
    (
        "failed-auth-per-address-rate",
        set_at("admission.rate_limits.failed_auth_per_address", {"rate": "100"}),
        "admission.rate_limits.failed_auth_per_address.rate",
        "must be a rate such as",
    ),
    (
        "anonymous-rate-string",
        set_at("admission.rate_limits.anonymous", "100/s"),
        "admission.rate_limits.anonymous",
        "must be a table, got a string",
    ),
    (
        "consumer-rate-missing-rate",
        set_at("admission.rate_limits.consumer", {}),
        "admission.rate_limits.consumer.rate",
        "is required",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "reason"), [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES]
)
def test_error_names_file_key_and_reason(mutate: Mutation, key: str, reason: str) -> None:
    """Every invalid admission setting raises a ConfigError naming the file, the key path and why."""
    data = minimal()
    mutate(data)
    error = error_of(data)
    assert (error.source, error.key) == (SOURCE, key)
    assert reason in error.reason
    assert str(error) == f"{SOURCE}: {key}: {error.reason}"


def test_route_without_auth_message() -> None:
    """A route without auth reads, in full, why auth is required and how to say it."""
    data = minimal()
    del data["routes"][0]["auth"]
    assert str(error_of(data)) == (
        'test.toml: routes["public"].auth: is required: say auth = "anonymous" for a public route, or name the methods '
        'it accepts, such as auth = ["keys"] (no route is public by accident)'
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("leeway", False), ("leeway", True)],
)
def test_jwt_leeway_refuses_a_boolean(key: str, value: bool) -> None:
    """A boolean leeway is an error, as it is for every other duration (false is not zero seconds)."""
    data = minimal()
    data["auth"]["corp"][key] = value
    error = error_of(data)
    assert error.key == f"auth.corp.{key}"
    assert error.reason == "must be a number of seconds, got a boolean"


def test_basic_cache_ttl_refuses_a_boolean() -> None:
    """cache_ttl = false is an error, as it is for every other duration (false is not zero seconds)."""
    data = minimal()
    data["auth"]["login"]["cache_ttl"] = False
    error = error_of(data)
    assert error.key == "auth.login.cache_ttl"
    assert error.reason == "must be a number of seconds, got a boolean"


@pytest.mark.parametrize("zero", [0, 0.0, "0s", "0ms"])
def test_zero_leeway_and_cache_ttl(zero: object) -> None:
    """leeway and cache_ttl may be zero, written as a number or as a duration string."""
    data = minimal()
    data["auth"]["corp"]["leeway"] = zero
    data["auth"]["login"]["cache_ttl"] = zero
    methods = parse(data, source=SOURCE).admission.methods
    assert isinstance(methods["corp"], JwtMethod)
    assert isinstance(methods["login"], BasicMethod)
    assert (methods["corp"].leeway, methods["login"].cache_ttl) == (0.0, 0.0)


def test_forward_url_scheme_is_case_insensitive() -> None:
    """An auth service URL written "HTTP://..." is an http URL (URL schemes are case-insensitive, RFC 3986)."""
    data = minimal()
    data["auth"]["sso"]["url"] = "HTTP://127.0.0.1:9000/check"
    assert isinstance(parse(data, source=SOURCE).admission.methods["sso"], ForwardMethod)


# --- key files: read relative to the config file, checked against the algorithms -----------------------------


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    """PEM files of every key type the methods can meet, and a self-signed certificate."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    p521 = ec.generate_private_key(ec.SECP521R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "id.example.com")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(rsa_key, hashes.SHA256())
    )
    return {
        "rsa": _spki(rsa_key.public_key()),
        "rsa-private": rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "p256": _spki(p256.public_key()),
        "p384": _spki(p384.public_key()),
        "p521": _spki(p521.public_key()),
        "ed25519": _spki(ed25519.Ed25519PrivateKey.generate().public_key()),
        "ed448": _spki(ed448.Ed448PrivateKey.generate().public_key()),
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "cert-key": _spki(rsa_key.public_key()),
    }


def _jwt_with(data: dict[str, Any], algorithms: list[str], **keys: str) -> dict[str, Any]:
    corp = data["auth"]["corp"]
    del corp["jwks_url"]
    corp["algorithms"] = algorithms
    corp.update(keys)
    return data


def _corp(cfg: Config) -> JwtMethod:
    corp = cfg.admission.methods["corp"]
    assert isinstance(corp, JwtMethod)
    return corp


@pytest.mark.parametrize(
    ("pem", "algorithms"),
    [
        ("rsa", ["RS256"]),
        ("rsa", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]),
        ("p256", ["ES256"]),
        ("p384", ["ES384"]),
        ("p521", ["ES512"]),
        ("ed25519", ["EdDSA"]),
        ("ed448", ["EdDSA"]),
    ],
)
def test_public_key_file(tmp_path: Path, pems: dict[str, bytes], pem: str, algorithms: list[str]) -> None:
    """A PEM public key of the right type for every algorithm is read, relative to the config file's directory."""
    (tmp_path / "key.pem").write_bytes(pems[pem])
    data = _jwt_with(minimal(), algorithms, public_key_file="key.pem")
    corp = _corp(parse(data, source=tmp_path / "gateway.toml"))
    assert corp.public_key_pem == pems[pem]
    assert corp.algorithms == tuple(algorithms)
    assert (corp.jwks, corp.jwks_url, corp.secret) == (None, None, None)


def test_public_key_file_absolute_path(tmp_path: Path, pems: dict[str, bytes]) -> None:
    """An absolute public_key_file is read where it says, whatever the config file's directory."""
    (tmp_path / "key.pem").write_bytes(pems["rsa"])
    data = _jwt_with(minimal(), ["RS256"], public_key_file=str(tmp_path / "key.pem"))
    assert _corp(parse(data, source="/nowhere/gateway.toml")).public_key_pem == pems["rsa"]


def test_certificate_pem_gives_its_public_key(tmp_path: Path, pems: dict[str, bytes]) -> None:
    """A PEM certificate is accepted as public_key_file and stored as its public key in PEM."""
    (tmp_path / "cert.pem").write_bytes(pems["cert"])
    data = _jwt_with(minimal(), ["RS256"], public_key_file="cert.pem")
    pem = _corp(parse(data, source=tmp_path / "gateway.toml")).public_key_pem
    assert pem == pems["cert-key"]
    assert pem is not None and pem.startswith(b"-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize(
    ("pem", "algorithms", "wrong"),
    [
        ("p256", ["RS256"], "a ECPublicKey key, which cannot verify RS256"),
        ("ed25519", ["PS256"], "a Ed25519PublicKey key, which cannot verify PS256"),
        ("rsa", ["ES256"], "a RSAPublicKey key, which cannot verify ES256"),
        ("p384", ["ES256"], "a ECPublicKey key, which cannot verify ES256"),
        ("p256", ["ES256", "ES384"], "a ECPublicKey key, which cannot verify ES384"),
        ("rsa", ["EdDSA"], "a RSAPublicKey key, which cannot verify EdDSA"),
        ("p256", ["EdDSA"], "a ECPublicKey key, which cannot verify EdDSA"),
        ("cert", ["ES512"], "a RSAPublicKey key, which cannot verify ES512"),
    ],
)
def test_public_key_of_the_wrong_type(
    tmp_path: Path, pems: dict[str, bytes], pem: str, algorithms: list[str], wrong: str
) -> None:
    """A key that cannot verify one of the method's algorithms is an error naming the file and what it holds."""
    path = tmp_path / "key.pem"
    path.write_bytes(pems[pem])
    data = _jwt_with(minimal(), algorithms, public_key_file="key.pem")
    source = tmp_path / "gateway.toml"
    error = error_of(data, source)
    assert (error.source, error.key) == (str(source), "auth.corp.public_key_file")
    assert error.reason == f"{path} holds {wrong}"


@pytest.mark.parametrize(
    "content",
    [
        b"not a key\n",
        b"",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "private",
    ],
)
def test_public_key_file_not_pem(tmp_path: Path, pems: dict[str, bytes], content: bytes | str) -> None:
    """A public_key_file that is not a PEM public key or certificate (a private key neither) is an error."""
    path = tmp_path / "key.pem"
    path.write_bytes(pems["rsa-private"] if content == "private" else content)  # type: ignore[arg-type]
    data = _jwt_with(minimal(), ["RS256"], public_key_file="key.pem")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.key == "auth.corp.public_key_file"
    assert error.reason == f"{path} is not a PEM public key or certificate"


def test_public_key_file_missing(tmp_path: Path) -> None:
    """A public_key_file that cannot be read is an error naming the resolved path and why."""
    data = _jwt_with(minimal(), ["RS256"], public_key_file="keys/missing.pem")
    error = error_of(data, tmp_path / "gateway.toml")
    assert (error.source, error.key) == (str(tmp_path / "gateway.toml"), "auth.corp.public_key_file")
    assert error.reason == f"cannot read {tmp_path / 'keys' / 'missing.pem'}: No such file or directory"


def test_public_key_file_is_a_directory(tmp_path: Path) -> None:
    """A public_key_file naming a directory is an error saying it cannot be read."""
    (tmp_path / "keys").mkdir()
    data = _jwt_with(minimal(), ["RS256"], public_key_file="keys")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.reason == f"cannot read {tmp_path / 'keys'}: Is a directory"


def test_jwks_file(tmp_path: Path) -> None:
    """A jwks_file holding a JSON Web Key Set is read into a mapping."""
    jwks = {"keys": [{"kty": "oct", "kid": "1", "k": "AAAA"}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    data = _jwt_with(minimal(), ["RS256"], jwks_file="jwks.json")
    corp = _corp(parse(data, source=tmp_path / "gateway.toml"))
    assert corp.jwks == jwks
    assert (corp.public_key_pem, corp.jwks_url, corp.secret) == (None, None, None)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "is not JSON: "),
        (b"", "is not JSON: "),
        (b"\xff\xfe\x00", "is not JSON: "),
        (b"[]", 'is not a JSON Web Key Set (an object with a "keys" array)'),
        (b'{"key": []}', 'is not a JSON Web Key Set (an object with a "keys" array)'),
        (b'{"keys": {}}', 'is not a JSON Web Key Set (an object with a "keys" array)'),
        (b'{"keys": null}', 'is not a JSON Web Key Set (an object with a "keys" array)'),
        (b'"keys"', 'is not a JSON Web Key Set (an object with a "keys" array)'),
    ],
)
def test_bad_jwks_file(tmp_path: Path, content: bytes, reason: str) -> None:
    """A jwks_file that is not JSON, or not an object with a "keys" array, is an error naming the file."""
    path = tmp_path / "jwks.json"
    path.write_bytes(content)
    data = _jwt_with(minimal(), ["ES256"], jwks_file="jwks.json")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.key == "auth.corp.jwks_file"
    assert error.reason.startswith(f"{path} {reason}")


def test_jwks_file_missing(tmp_path: Path) -> None:
    """A jwks_file that cannot be read is an error naming its path."""
    data = _jwt_with(minimal(), ["ES256"], jwks_file="nope.json")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.key == "auth.corp.jwks_file"
    assert error.reason == f"cannot read {tmp_path / 'nope.json'}: No such file or directory"


@pytest.mark.parametrize(("algorithms", "size"), [(["HS256"], 32), (["HS256", "HS384", "HS512"], 64)])
def test_secret_file(tmp_path: Path, algorithms: list[str], size: int) -> None:
    """An HMAC method reads its secret file, without surrounding whitespace."""
    (tmp_path / "secret").write_bytes(b"  " + b"s" * size + b"\n")
    data = _jwt_with(minimal(), algorithms, secret_file="secret")
    corp = _corp(parse(data, source=tmp_path / "gateway.toml"))
    assert corp.secret == b"s" * size
    assert (corp.public_key_pem, corp.jwks, corp.jwks_url) == (None, None, None)


@pytest.mark.parametrize("content", [b"s" * 31, b"s" * 31 + b"\n\n", b"", b" " * 40])
def test_secret_too_short(tmp_path: Path, content: bytes) -> None:
    """A secret of fewer than 32 bytes (whitespace not counted) is an error naming the secret file."""
    path = tmp_path / "secret"
    path.write_bytes(content)
    data = _jwt_with(minimal(), ["HS256"], secret_file="secret")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.key == "auth.corp.secret_file"
    assert error.reason == f"{path} must hold at least 32 bytes of secret for HS256"


@pytest.mark.parametrize(("algorithm", "size"), [("HS384", 48), ("HS512", 64)])
def test_secret_shorter_than_the_hash_is_refused(tmp_path: Path, algorithm: str, size: int) -> None:
    """An HMAC secret must be at least as long as its algorithm's hash (RFC 7518 section 3.2)."""
    path = tmp_path / "secret"
    path.write_bytes(b"s" * (size - 1))
    error = error_of(_jwt_with(minimal(), [algorithm], secret_file="secret"), tmp_path / "gateway.toml")
    assert error.reason == f"{path} must hold at least {size} bytes of secret for {algorithm}"


def test_a_pem_key_is_not_an_hmac_secret(tmp_path: Path) -> None:
    """A PEM file given as an HMAC secret is refused: it is a public key someone mixed up (algorithm confusion)."""
    path = tmp_path / "secret"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 64 + b"\n-----END PUBLIC KEY-----\n")
    error = error_of(_jwt_with(minimal(), ["HS256"], secret_file="secret"), tmp_path / "gateway.toml")
    assert error.reason == f"{path} holds a PEM key, not an HMAC secret"


def test_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    """An RSA public key under 2048 bits is refused when the config loads."""
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    path = tmp_path / "short.pem"
    path.write_bytes(short.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    error = error_of(_jwt_with(minimal(), ["RS256"], public_key_file="short.pem"), tmp_path / "gateway.toml")
    assert error.reason == f"{path} holds a 1024-bit RSA key; at least 2048 bits are needed"


def test_secret_file_missing(tmp_path: Path) -> None:
    """A secret_file that cannot be read is an error naming its path."""
    data = _jwt_with(minimal(), ["HS512"], secret_file="nope")
    error = error_of(data, tmp_path / "gateway.toml")
    assert error.key == "auth.corp.secret_file"
    assert error.reason == f"cannot read {tmp_path / 'nope'}: No such file or directory"


def test_key_files_are_relative_to_the_loaded_config(tmp_path: Path, pems: dict[str, bytes]) -> None:
    """load() resolves key files against the config file's directory, not the working directory."""
    conf = tmp_path / "etc"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "id.pem").write_bytes(pems["p256"])
    (conf / "gateway.toml").write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n'
        '[auth.corp]\ntype = "jwt"\nissuer = "https://id/"\naudiences = ["gw"]\nalgorithms = ["ES256"]\n'
        'public_key_file = "keys/id.pem"\n'
        '[[routes]]\nname = "a"\nauth = ["corp"]\nupstream = "http://127.0.0.1:8081"\n'
    )
    assert _corp(config.load(conf / "gateway.toml")).public_key_pem == pems["p256"]


# --- the credentials file ------------------------------------------------------------------------------------


def _write_config(directory: Path, admission: str = "", consumers: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.toml"
    path.write_text(
        '[[listeners]]\nhost = "127.0.0.1"\nport = 8080\n'
        '[auth.keys]\ntype = "api_key"\n'
        '[[routes]]\nname = "a"\nauth = ["keys"]\nupstream = "http://127.0.0.1:8081"\n'
        f"[admission]\n{admission}\n{consumers}"
    )
    return path


def test_credentials_file_relative_to_the_config_file(tmp_path: Path) -> None:
    """Consumers of the credentials file (relative to the config file's directory) join those of the config."""
    conf = tmp_path / "etc"
    path = _write_config(
        conf,
        'credentials_file = "secrets/consumers.toml"',
        f'[consumers.alice]\napi_keys = ["{hash_key("gwk_a")}"]\n',
    )
    (conf / "secrets").mkdir()
    (conf / "secrets" / "consumers.toml").write_text(
        f'[consumers.bob]\napi_keys = ["{hash_key("gwk_b")}"]\nscopes = ["read"]\n'
        f'[consumers.carol]\npassword = "{PASSWORD_HASH}"\n'
    )
    consumers = config.load(path).admission.consumers
    assert sorted(consumers) == ["alice", "bob", "carol"]
    assert consumers["bob"] == Consumer(
        name="bob", scopes=frozenset({"read"}), api_key_hashes=frozenset({hash_key("gwk_b")})
    )
    assert consumers["carol"].password_hash == PASSWORD_HASH.encode("ascii")


def test_credentials_file_absolute_path(tmp_path: Path) -> None:
    """An absolute credentials_file is read where it says."""
    creds = tmp_path / "elsewhere" / "consumers.toml"
    creds.parent.mkdir()
    creds.write_text("[consumers.bob]\n")
    path = _write_config(tmp_path / "etc", f'credentials_file = "{creds}"')
    assert list(config.load(path).admission.consumers) == ["bob"]


def test_credentials_file_may_be_empty(tmp_path: Path) -> None:
    """An empty credentials file adds no consumers."""
    path = _write_config(tmp_path, 'credentials_file = "consumers.toml"')
    (tmp_path / "consumers.toml").write_text("")
    assert dict(config.load(path).admission.consumers) == {}


def test_credentials_file_unreadable(tmp_path: Path) -> None:
    """A credentials file that cannot be read is an error of the config file's credentials_file key."""
    path = _write_config(tmp_path, 'credentials_file = "consumers.toml"')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    error = info.value
    assert (error.source, error.key) == (str(path), "admission.credentials_file")
    assert error.reason == f"cannot read {tmp_path / 'consumers.toml'}: No such file or directory"


@pytest.mark.parametrize(
    "content", [b"[consumers.bob\n", b"api_keys = \n", "[consumers.b\xc3\xb6b]\nx = \xff\n".encode("latin-1")]
)
def test_credentials_file_invalid_toml(tmp_path: Path, content: bytes) -> None:
    """A credentials file that is not valid UTF-8 TOML is an error naming the credentials file."""
    path = _write_config(tmp_path, 'credentials_file = "consumers.toml"')
    creds = tmp_path / "consumers.toml"
    creds.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    error = info.value
    assert (error.source, error.key) == (str(creds), "")
    assert error.reason.startswith("not valid TOML: ")
    assert str(error).startswith(f"{creds}: not valid TOML: ")


@pytest.mark.parametrize(
    ("content", "key", "reason"),
    [
        ('[consumers.bob]\napi_keys = ["gwk_raw"]\n', "consumers.bob.api_keys", "must hold hashes"),
        ("[consumers.bob]\nscope = []\n", "consumers.bob.scope", "unknown key"),
        ('[consumers."b o b"]\n', "consumers.b o b", "a name may contain only"),
        ('[auth.keys]\ntype = "api_key"\n', "auth", "unknown key"),
        ('[admission]\nrealm = "x"\n', "admission", "unknown key"),
        ('consumers = "bob"\n', "consumers", "must be a table, got a string"),
    ],
)
def test_credentials_file_errors_name_the_credentials_file(tmp_path: Path, content: str, key: str, reason: str) -> None:
    """An error inside the credentials file names that file and the key path in it; it may hold only consumers."""
    path = _write_config(tmp_path, 'credentials_file = "consumers.toml"')
    creds = tmp_path / "consumers.toml"
    creds.write_text(content)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (info.value.source, info.value.key) == (str(creds), key)
    assert reason in info.value.reason


def test_consumer_in_both_files(tmp_path: Path) -> None:
    """A consumer declared in the config and in the credentials file is an error naming the credentials file."""
    path = _write_config(tmp_path, 'credentials_file = "consumers.toml"', '[consumers.alice]\nscopes = ["a"]\n')
    creds = tmp_path / "consumers.toml"
    creds.write_text('[consumers.bob]\n[consumers.alice]\nscopes = ["b"]\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (info.value.source, info.value.key) == (str(creds), "consumers.alice")
    assert info.value.reason == "consumer 'alice' is declared twice (in the config and the credentials file)"


def test_credentials_file_with_parse(tmp_path: Path) -> None:
    """parse() resolves credentials_file against the directory of the source it is given."""
    (tmp_path / "consumers.toml").write_text('[consumers.bob]\nscopes = ["read"]\n')
    data = minimal()
    data["admission"] = {"credentials_file": "consumers.toml"}
    consumers = parse(data, source=tmp_path / "gateway.toml").admission.consumers
    assert sorted(consumers) == ["alice", "bob"]


def test_a_method_may_not_be_named_anonymous() -> None:
    """`[auth.anonymous]` is refused: a route naming it would read like a public one."""
    data = minimal()
    data["auth"]["anonymous"] = {"type": "api_key"}
    error = error_of(data)
    assert (error.key, error.reason) == (
        "auth.anonymous",
        '"anonymous" is what a public route says (auth = "anonymous"); give the method another name',
    )


@pytest.mark.parametrize("header", ["Host", "Content-Length", "Connection", "X-Forwarded-For", "X-Request-ID"])
def test_forward_request_headers_cannot_name_the_gateways_own(header: str) -> None:
    """A forward-auth method cannot list a framing, hop-by-hop or X-Forwarded-* header to send: those describe
    the gateway's own request to the auth service."""
    data = minimal()
    data["auth"]["sso"]["request_headers"] = ["Authorization", header]
    error = error_of(data)
    assert error.key == "auth.sso.request_headers"
    assert error.reason.startswith(f"{header.lower()} is never sent to the auth service")


def test_forward_url_must_be_ascii() -> None:
    """A forward-auth URL with non-ASCII characters is refused when the config loads, not when a request comes."""
    data = minimal()
    data["auth"]["sso"]["url"] = "http://127.0.0.1:9000/prüfen"
    assert error_of(data).key == "auth.sso.url"


@pytest.mark.parametrize(
    ("change", "key", "header"),
    [
        (lambda d: d["auth"]["sso"].update(copy_headers=["Authorization"]), "auth.sso.copy_headers", "authorization"),
        (lambda d: d["auth"]["sso"].update(copy_headers=["Host"]), "auth.sso.copy_headers", "host"),
        (lambda d: d["auth"]["sso"].update(copy_headers=["X-API-Key"]), "auth.sso.copy_headers", "x-api-key"),
        (
            lambda d: d.setdefault("admission", {}).update(identity_headers={"consumer": "X-Request-ID"}),
            "admission.identity_headers.consumer",
            "x-request-id",
        ),
        (
            lambda d: d["auth"]["corp"].update(claim_headers={"Cookie": "sub"}),
            "auth.corp.claim_headers.Cookie",
            "cookie",
        ),
    ],
    ids=["copy-authorization", "copy-host", "copy-api-key-header", "identity-request-id", "claim-cookie"],
)
def test_headers_set_upstream_cannot_be_the_gateways_own_or_credentials(change: Any, key: str, header: str) -> None:
    """A header admission sets upstream is removed from every client request on every route: one that is the
    gateway's own (Host, X-Request-ID) or a credential (Authorization, Cookie, an API-key header) is refused."""
    data = minimal()
    change(data)
    error = error_of(data)
    assert error.key == key
    assert error.reason.startswith(f"{header} cannot carry identity")


def test_a_claim_header_cannot_be_an_identity_header() -> None:
    """A claim header named like the consumer header would overwrite it: refused, naming both."""
    data = minimal()
    data["auth"]["corp"]["claim_headers"] = {"X-Consumer-ID": "email"}
    error = error_of(data)
    assert error.key == "auth.corp.claim_headers.X-Consumer-ID"
    assert error.reason == "x-consumer-id is already set by admission.identity_headers.consumer"


def test_two_jwt_methods_of_one_issuer_on_a_route_are_refused() -> None:
    """Two JWT methods of the same issuer on one route: the second could never decide, so the config says so."""
    data = minimal()
    data["auth"]["corp2"] = dict(data["auth"]["corp"])
    data["routes"][1]["auth"] = ["corp", "corp2"]
    error = error_of(data)
    assert error.key == 'routes["api"].auth'
    assert "same issuer" in error.reason


def test_forward_credentials_on_an_anonymous_route_is_refused() -> None:
    """An anonymous route has no credential to forward or remove: saying forward_credentials there is an error."""
    data = minimal()
    data["routes"][0]["forward_credentials"] = True
    assert error_of(data).key == 'routes["public"].forward_credentials'


# --- every error at once -----------------------------------------------------------------------------------------


def test_every_admission_error_is_reported_at_once() -> None:
    """A consumer, a method and a route each with an error: one ConfigError lists the three, the consumer and
    the method named by their tables' names and the route by its name."""
    data = minimal()
    data["consumers"]["alice"]["max_concurrent"] = 0
    data["auth"]["login"]["threads"] = "four"
    data["routes"][1]["scopes_any"] = ["a b"]
    error = error_of(data)
    assert str(error).splitlines() == [
        "test.toml: consumers.alice.max_concurrent: must be a positive integer, got 0",
        "test.toml: auth.login.threads: must be an integer, got a string",
        'test.toml: routes["api"].scopes_any: a scope is one word of visible characters (no spaces or quotes), '
        "got 'a b'",
    ]
    assert len(error.errors) == 3


def test_a_route_naming_a_method_that_could_not_be_read_says_nothing_more() -> None:
    """A method refused for its own error is not reported again as unknown by the routes that name it; a method
    nobody defined still is."""
    data = minimal()
    del data["auth"]["corp"]["issuer"]
    data["routes"][0] = {"name": "public", "auth": ["nope"], "upstream": "app"}
    assert [(e.key, e.reason) for e in error_of(data).errors] == [
        ("auth.corp.issuer", "is required"),
        ('routes["public"].auth', "no method named 'nope' (define it as [auth.nope]; known: keys, login, sso)"),
    ]


def test_a_misspelt_method_key_names_the_key_it_stands_for() -> None:
    """A JWT method with `issuer` written `isuer`: one error about `isuer` suggesting `issuer`; an unknown type's
    keys are not reported as unknown (which keys it may have is not known)."""
    data = minimal()
    data["auth"]["corp"]["isuer"] = data["auth"]["corp"].pop("issuer")
    data["auth"]["sso"]["type"] = "oauth"
    assert [(e.key, e.reason) for e in error_of(data).errors] == [
        ("auth.corp.isuer", 'unknown key; did you mean "issuer"?'),
        ("auth.sso.type", "unknown method type 'oauth' (known: api_key, mtls, jwt, basic, forward)"),
    ]
