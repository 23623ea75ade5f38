"""Tests for gateway.auth.credentials: Authorization, Bearer and Basic parsing, the JWT shape and unverified claims,
and WWW-Authenticate challenges; table-driven cases plus hypothesis properties (parsing never raises)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.credentials import (
    MALFORMED,
    authorization,
    basic_credentials,
    challenge,
    looks_like_jwt,
    split_authorization,
    token68,
    unverified_claims,
)

_TCHARS = "!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

schemes = st.text(st.sampled_from(_TCHARS), min_size=1, max_size=20).map(lambda s: s.encode("ascii"))
b64url_parts = st.text(st.sampled_from(_B64URL), min_size=1, max_size=40).map(lambda s: s.encode("ascii"))


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwt_of(claims: object, header: object = None) -> bytes:
    """A JWT-shaped token with these claims (the signature is not a real one: nothing here verifies)."""
    head = b64url(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
    return head + b"." + b64url(json.dumps(claims).encode()) + b".c2lnbmF0dXJl"


def basic(user: str | bytes, password: bytes = b"pw") -> bytes:
    raw = user.encode("utf-8") if isinstance(user, str) else user
    return base64.b64encode(raw + b":" + password)


# --- authorization: the single Authorization value -----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, None),
        ([], None),
        ([b"Bearer x"], b"Bearer x"),
        ([b""], b""),
        ([b"Bearer x", b"Bearer x"], MALFORMED),
        ([b"Bearer x", b"Basic eA=="], MALFORMED),
        ([b"", b""], MALFORMED),
        ([b"a", b"b", b"c"], MALFORMED),
    ],
)
def test_authorization(values: Sequence[bytes] | None, expected: object) -> None:
    """No Authorization is None, one is its value, and two or more are MALFORMED."""
    assert authorization(values) == expected


def test_malformed_reads_as_its_name() -> None:
    """MALFORMED prints as MALFORMED and is a single object."""
    assert repr(MALFORMED) == "MALFORMED"
    assert authorization([b"a", b"b"]) is MALFORMED


# --- split_authorization -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Bearer abc", (b"bearer", b"abc")),
        (b"BEARER abc", (b"bearer", b"abc")),
        (b"  Basic   dXNlcjpwdw==  ", (b"basic", b"dXNlcjpwdw==")),
        (b"\tBearer abc\t", (b"bearer", b"abc")),
        (b"Bearer \t abc \t", (b"bearer", b"abc")),
        (b"Bearer", (b"bearer", b"")),
        (b"Bearer ", (b"bearer", b"")),
        (b"Bearer abc def", (b"bearer", b"abc def")),
        (b'Digest realm="x", nonce="y"', (b"digest", b'realm="x", nonce="y"')),
        (b"X-Custom.Scheme_1 v", (b"x-custom.scheme_1", b"v")),
        (b"", None),
        (b"   ", None),
        (b" \t ", None),
        (b"Bear(er abc", None),
        (b"Bearer\tabc", None),
        (b"B\xe9arer abc", None),
        (b"Bearer,x abc", None),
        (b'"Bearer" abc', None),
        (b"Bearer:abc", None),
    ],
)
def test_split_authorization(value: bytes, expected: tuple[bytes, bytes] | None) -> None:
    """A value is split at the first space into the lower-cased scheme and the stripped rest; no valid scheme is
    None."""
    assert split_authorization(value) == expected


@given(st.binary(max_size=200))
def test_split_authorization_never_raises(value: bytes) -> None:
    """Any bytes give None or a lower-cased token scheme and a rest without surrounding spaces or tabs."""
    result = split_authorization(value)
    if result is not None:
        scheme, rest = result
        assert re.fullmatch(rb"[!#$%&'*+.^_`|~0-9a-z-]+", scheme)
        assert rest == rest.strip(b" \t")


@given(schemes, st.binary(max_size=100).filter(lambda r: r == r.strip(b" \t")), st.sampled_from([b" ", b"   "]))
def test_split_authorization_round_trip(scheme: bytes, rest: bytes, gap: bytes) -> None:
    """A token scheme, spaces and a rest split back into the lower-cased scheme and that rest."""
    assert split_authorization(scheme + gap + rest) == (scheme.lower(), rest)


# --- token68 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [b"abc", b"a-b._~+/", b"YWJj", b"YQ==", b"x=", b"gwk_AbC-123", b"eyJ0.eyJ0.c2ln", b"0", b"/+/+"],
)
def test_token68_valid(rest: bytes) -> None:
    """A token68 (base64 or base64url characters, then optional "=" padding) is returned unchanged."""
    assert token68(rest) == rest


@pytest.mark.parametrize(
    "rest",
    [b"", b"a b", b"a=b", b"=", b"==", b"a,b", b'"abc"', b"\xff", b"abc\n", b"abc\t", b"a;b", b"a\x00", b"a%20"],
)
def test_token68_malformed(rest: bytes) -> None:
    """Anything that is not a token68 is MALFORMED."""
    assert token68(rest) is MALFORMED


@given(st.binary(min_size=1, max_size=100))
def test_token68_accepts_any_base64(data: bytes) -> None:
    """The standard and url-safe base64 of any bytes is a token68."""
    for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data), b64url(data)):
        assert token68(encoded) == encoded


@given(st.binary(max_size=100))
def test_token68_never_raises(rest: bytes) -> None:
    """Any bytes give themselves (when a token68) or MALFORMED."""
    result = token68(rest)
    assert result is MALFORMED or (result == rest and re.fullmatch(rb"[A-Za-z0-9\-._~+/]+=*", rest))


# --- basic_credentials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rest", "expected"),
    [
        (basic("alice", b"secret"), ("alice", b"secret")),
        (b"YWxpY2U6c2VjcmV0", ("alice", b"secret")),
        (basic("alice", b""), ("alice", b"")),
        (basic("alice", b"a:b:c"), ("alice", b"a:b:c")),
        (basic("José", b"pw"), ("José", b"pw")),
        (basic("alice", b"\xff\x00\n"), ("alice", b"\xff\x00\n")),
        (basic("a b", b"pw"), ("a b", b"pw")),
        (basic("svc.reports@example.com", b"pw"), ("svc.reports@example.com", b"pw")),
    ],
)
def test_basic_credentials(rest: bytes, expected: tuple[str, bytes]) -> None:
    """Basic's base64 of "user:password" gives the user (UTF-8) and the password bytes after the first colon."""
    assert basic_credentials(rest) == expected


@pytest.mark.parametrize(
    "rest",
    [
        pytest.param(b"", id="empty"),
        pytest.param(base64.b64encode(b"alice"), id="no-colon"),
        pytest.param(base64.b64encode(b":secret"), id="empty-user"),
        pytest.param(base64.b64encode(b":"), id="colon-only"),
        pytest.param(b"YWxpY2U6cw", id="missing-padding"),
        pytest.param(b"YWxpY2U6cw=", id="short-padding"),
        pytest.param(base64.urlsafe_b64encode(b"alice?:>>>"), id="url-safe-alphabet"),
        pytest.param(b"YWxp Y2U6cw==", id="space"),
        pytest.param(b"!!!!", id="not-base64"),
        pytest.param(b"YWxpY2U6cw==\n", id="trailing-newline"),
        pytest.param(b"YQ==YQ==", id="padding-inside"),
        pytest.param(basic(b"\xff\xfe"), id="user-not-utf8"),
        pytest.param(basic(b"\xc3"), id="user-truncated-utf8"),
        pytest.param(basic("al\x00ice"), id="user-nul"),
        pytest.param(basic("al\tice"), id="user-tab"),
        pytest.param(basic("al\x1fice"), id="user-unit-separator"),
        pytest.param(basic("al\x7fice"), id="user-del"),
        pytest.param(basic("alice\r\n"), id="user-crlf"),
        pytest.param("YWxpY2U6cw==".encode("utf-16-le"), id="utf16"),
    ],
)
def test_basic_credentials_malformed(rest: bytes) -> None:
    """Basic credentials that are not base64 of "user:password" with a non-empty UTF-8 user without control
    characters are MALFORMED."""
    assert basic_credentials(rest) is MALFORMED


users = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=":\x7f"),
    min_size=1,
    max_size=30,
).filter(lambda u: all(ord(c) >= 0x20 for c in u))


@given(users, st.binary(max_size=60))
def test_basic_credentials_round_trip(user: str, password: bytes) -> None:
    """Any user without ":" and control characters, and any password bytes, come back out of their base64."""
    assert basic_credentials(basic(user, password)) == (user, password)


@given(st.binary(max_size=120))
def test_basic_credentials_never_raises(rest: bytes) -> None:
    """Any bytes give MALFORMED or a (non-empty user, password) pair."""
    result = basic_credentials(rest)
    assert result is MALFORMED or (isinstance(result, tuple) and result[0] and isinstance(result[1], bytes))


@given(st.binary(max_size=90))
def test_basic_credentials_never_raises_on_any_base64(decoded: bytes) -> None:
    """The base64 of any bytes gives MALFORMED or the user and password those bytes hold."""
    result = basic_credentials(base64.b64encode(decoded))
    if result is not MALFORMED:
        assert isinstance(result, tuple)
        user, password = result
        assert decoded == user.encode("utf-8") + b":" + password


# --- looks_like_jwt ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (b"a.b.c", True),
        (b"a.b.", True),
        (b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_", True),
        (jwt_of({"iss": "https://id/"}), True),
        (b"a.b", False),
        (b"a..c", False),
        (b".b.c", False),
        (b"a.b.c.d", False),
        (b"gwk_AbC-123_xyz", False),
        (b"a.b.c=", False),
        (b"a+b.c.d", False),
        (b"a/b.c.d", False),
        (b"a.b.c ", False),
        (b"", False),
        (b"..", False),
    ],
)
def test_looks_like_jwt(token: bytes, expected: bool) -> None:
    """A JWT is three base64url parts joined by dots, the third possibly empty; anything else is not one."""
    assert looks_like_jwt(token) is expected


@given(b64url_parts, b64url_parts, st.one_of(st.just(b""), b64url_parts))
def test_three_base64url_parts_look_like_a_jwt(header: bytes, payload: bytes, signature: bytes) -> None:
    """Any three base64url parts (the last may be empty) joined by dots look like a JWT."""
    assert looks_like_jwt(header + b"." + payload + b"." + signature)


@given(st.binary(max_size=100))
def test_looks_like_jwt_never_raises(token: bytes) -> None:
    """Any bytes give a bool, and True only with exactly two dots."""
    result = looks_like_jwt(token)
    assert isinstance(result, bool)
    if result:
        assert token.count(b".") == 2


# --- unverified_claims ---------------------------------------------------------------------------------------


def test_unverified_claims_of_a_jwt() -> None:
    """The claims of a JWT-shaped token are its payload's JSON object, whatever the signature."""
    claims = {"iss": "https://id.example.com/", "sub": "alice", "aud": ["gw"], "exp": 1, "n": None}
    assert unverified_claims(jwt_of(claims)) == claims


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (b"e30.e30.", {}),
        (b"e30.e30=.sig", {}),
        (b"x.eyJhIjoxfQ.y", {"a": 1}),
        (b"x.eyJhIjoxfQ==.y", {"a": 1}),
        (b"." + b64url(b'{"a": "\xc3\xa9"}') + b".", {"a": "é"}),
    ],
)
def test_unverified_claims_cases(token: bytes, expected: dict[str, object]) -> None:
    """Padded or unpadded base64url payloads holding a JSON object give that object."""
    assert unverified_claims(token) == expected


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"e30.e30", id="two-parts"),
        pytest.param(b"e30.e30.e30.e30", id="four-parts"),
        pytest.param(b"e30..sig", id="empty-payload"),
        pytest.param(b"e30." + b64url(b"[1, 2]") + b".sig", id="array"),
        pytest.param(b"e30." + b64url(b'"claims"') + b".sig", id="string"),
        pytest.param(b"e30." + b64url(b"42") + b".sig", id="number"),
        pytest.param(b"e30." + b64url(b"null") + b".sig", id="null"),
        pytest.param(b"e30." + b64url(b"{not json}") + b".sig", id="not-json"),
        pytest.param(b"e30." + b64url(b"\xff\xfe\xfd") + b".sig", id="not-utf8"),
        pytest.param(b"e30.a.sig", id="one-char-payload"),
        pytest.param(b"e30." + b64url(b"1" * 5000) + b".sig", id="huge-int"),
        pytest.param(b"e30." + b64url(b'{"a": 1') + b".sig", id="truncated"),
    ],
)
def test_unverified_claims_unreadable(token: bytes) -> None:
    """A token without three parts, or whose payload is not base64url of a JSON object, has no claims (None)."""
    assert unverified_claims(token) is None


def _payload_of_length(n: int) -> bytes:
    """A base64url payload of exactly n characters (n a multiple of 4) holding a JSON object."""
    decoded = n // 4 * 3
    data = b'{"x":"' + b"a" * (decoded - 8) + b'"}'
    payload = b64url(data)
    assert len(payload) == n
    return payload


def test_unverified_claims_payload_limit() -> None:
    """A payload of 16 KiB is read; a longer one is not even decoded."""
    assert unverified_claims(b"e30." + _payload_of_length(16 * 1024) + b".") is not None
    assert unverified_claims(b"e30." + _payload_of_length(16 * 1024 + 4) + b".") is None


def test_unverified_claims_deeply_nested_payload() -> None:
    """A payload nesting JSON arrays thousands deep (well within 16 KiB) has no claims, rather than raising."""
    token = b"e30." + b64url(b"[" * 5000) + b".sig"
    assert looks_like_jwt(token)
    assert unverified_claims(token) is None


@given(st.binary(max_size=300))
def test_unverified_claims_never_raises(token: bytes) -> None:
    """Any bytes give None or a dict."""
    result = unverified_claims(token)
    assert result is None or isinstance(result, dict)


@given(st.binary(max_size=40), st.binary(max_size=200), st.binary(max_size=40))
def test_unverified_claims_never_raises_on_jwt_shapes(header: bytes, payload: bytes, signature: bytes) -> None:
    """Three dot-joined parts with any base64url-encoded payload bytes give None or a dict."""
    result = unverified_claims(b64url(header) + b"." + b64url(payload) + b"." + b64url(signature))
    assert result is None or isinstance(result, dict)


@settings(max_examples=50)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_unverified_claims_round_trip(claims: dict[str, object]) -> None:
    """The claims of a token built from any JSON object are that object."""
    assert unverified_claims(jwt_of(claims)) == claims


# --- challenge -----------------------------------------------------------------------------------------------

_PARAM = re.compile(
    r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)="((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"'
)


def parse_challenge(value: bytes) -> tuple[str, dict[str, str]]:
    """A challenge `scheme name="value", ...` read back by RFC 9110's grammar (quoted-string, quoted-pair)."""
    text = value.decode("latin-1")
    scheme, _, rest = text.partition(" ")
    assert re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", scheme)
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        assert m is not None, f"not an auth-param at {rest[pos:]!r}"
        params[m.group(1)] = re.sub(r"\\(.)", r"\1", m.group(2), flags=re.DOTALL)
        pos = m.end()
        if pos < len(rest):
            assert rest[pos : pos + 2] == ", "
            pos += 2
    return scheme, params


@pytest.mark.parametrize(
    ("scheme", "params", "expected"),
    [
        ("Bearer", {}, b"Bearer"),
        ("Bearer", {"realm": "api"}, b'Bearer realm="api"'),
        (
            "Bearer",
            {"realm": "api", "error": "invalid_token", "error_description": "the token expired"},
            b'Bearer realm="api", error="invalid_token", error_description="the token expired"',
        ),
        ("Basic", {"realm": "gateway", "charset": "UTF-8"}, b'Basic realm="gateway", charset="UTF-8"'),
        ("Basic", {"realm": 'say "hi"'}, b'Basic realm="say \\"hi\\""'),
        ("Basic", {"realm": "a\\b"}, b'Basic realm="a\\\\b"'),
        ("Basic", {"realm": '\\"'}, b'Basic realm="\\\\\\""'),
        ("Basic", {"realm": ""}, b'Basic realm=""'),
        ("Basic", {"realm": "café"}, b'Basic realm="caf\xe9"'),
        ("Basic", {"realm": "€"}, b'Basic realm="?"'),
        ("ApiKey", {"realm": "gateway", "header": "x-api-key"}, b'ApiKey realm="gateway", header="x-api-key"'),
    ],
)
def test_challenge(scheme: str, params: dict[str, str], expected: bytes) -> None:
    """A challenge is the scheme and its parameters as quoted strings, in the order given, with quotes and
    backslashes escaped."""
    assert challenge(scheme, **params) == expected


def test_challenge_with_quote_and_backslash_parses_back() -> None:
    """A value holding quotes and backslashes reads back unchanged by the quoted-string grammar."""
    value = 'a "quoted" \\ value\\'
    assert parse_challenge(challenge("Bearer", realm="r", error_description=value)) == (
        "Bearer",
        {"realm": "r", "error_description": value},
    )


param_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)


@given(
    schemes.map(lambda s: s.decode("ascii")),
    st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda n: n != "scheme"),
        param_values,
        max_size=4,
    ),
)
def test_challenge_parses_back(scheme: str, params: dict[str, str]) -> None:
    """Any scheme and any printable latin-1 parameter values give a valid challenge that parses back to them."""
    value = challenge(scheme, **params)
    if not params:
        assert value == scheme.encode("ascii")
    assert parse_challenge(value) == (scheme, params)


def test_challenge_drops_control_characters() -> None:
    """A CR, LF or other control character in a parameter never reaches the header (it could split it)."""
    assert challenge("Bearer", realm="a\r\nSet-Cookie: x\x00") == b'Bearer realm="aSet-Cookie: x"'
