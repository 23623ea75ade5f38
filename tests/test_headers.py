"""Tests for gateway.headers: Connection parsing, hop-by-hop stripping, forwarding headers, Via and request ids."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.headers import (
    client_response_headers,
    connection_tokens,
    request_id_of,
    upstream_request_headers,
)
from gateway.http1.fields import Fields as Headers

# Written out here rather than imported, so a header quietly dropped from the module's list fails a test.
HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
]

NEW_ID = re.compile(r"[0-9a-f]{32}")


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers with each (name, value) added in order, so repeated names keep their order."""
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def names(h: Headers) -> set[bytes]:
    return {name.lower() for name, _ in h.getAllRawHeaders()}


def upstream(client: Headers, **overrides: object) -> Headers:
    """upstream_request_headers with typical arguments, any of which a test may override."""
    kwargs: dict[str, object] = {
        "client_ip": "192.0.2.7",
        "host": b"backend:8081",
        "client_host": b"gw.example.com",
        "proto": b"http",
        "via": b"gateway",
        "request_id": "rid-1",
    }
    kwargs.update(overrides)
    return upstream_request_headers(client, **kwargs)  # type: ignore[arg-type]


def response(upstream_headers: Headers, *, via: bytes = b"gateway", request_id: str = "rid-1") -> Headers:
    target = Headers()
    client_response_headers(upstream_headers, target, via=via, request_id=request_id)
    return target


# --- connection_tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"close"], {b"close"}),
        ([b"close, TE"], {b"close", b"te"}),
        ([b"close,TE"], {b"close", b"te"}),
        ([b"Keep-Alive ,\tX-Foo"], {b"keep-alive", b"x-foo"}),
        ([b"  upgrade  "], {b"upgrade"}),
        ([b"close", b"X-Bar"], {b"close", b"x-bar"}),
        ([b"CLOSE", b"close"], {b"close"}),
        ([b",,close,, ,"], {b"close"}),
        ([b"foo bar, baz"], {b"baz"}),
        ([b'x(y), ok, a=b, "q"'], {b"ok"}),
        ([b"", b" "], set()),
    ],
)
def test_connection_tokens(values: list[bytes], expected: set[bytes]) -> None:
    """Connection options are parsed as comma lists with optional whitespace, over every Connection header,
    lower-cased, ignoring anything that is not a token."""
    assert connection_tokens(headers(*((b"Connection", v) for v in values))) == expected


def test_connection_tokens_without_connection_header() -> None:
    """Without a Connection header there are no options."""
    assert connection_tokens(headers((b"Accept", b"close"))) == frozenset()


# --- upstream_request_headers: what is dropped ----------------------------------------------------------------


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_request_drops_hop_by_hop(name: bytes) -> None:
    """Every header of the fixed hop-by-hop list stays behind, whatever its case."""
    out = upstream(headers((name.upper(), b"x"), (b"Accept", b"*/*")))
    assert name.lower() not in names(out)
    assert out.getRawHeaders(b"accept") == [b"*/*"]


def test_request_drops_headers_named_in_connection() -> None:
    """A header the client names in Connection is hop-by-hop and stays behind; others pass."""
    out = upstream(headers((b"Connection", b"close, X-Secret"), (b"X-Secret", b"1"), (b"X-Other", b"2")))
    assert b"x-secret" not in names(out)
    assert b"connection" not in names(out)
    assert out.getRawHeaders(b"x-other") == [b"2"]


def test_request_drops_headers_named_in_several_connection_headers() -> None:
    """Names from every Connection header count, compared without case."""
    client = headers(
        (b"Connection", b"x-a"),
        (b"Connection", b"X-B, keep-alive"),
        (b"X-A", b"1"),
        (b"x-b", b"2"),
        (b"X-C", b"3"),
    )
    out = upstream(client)
    assert names(out) & {b"x-a", b"x-b"} == set()
    assert out.getRawHeaders(b"x-c") == [b"3"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"Host", [b"backend:8081"]),
        (b"Content-Length", None),
        (b"Expect", None),
        (b"X-Forwarded-Proto", [b"http"]),
        (b"X-Forwarded-Host", [b"gw.example.com"]),
        (b"X-Request-ID", [b"rid-1"]),
    ],
)
def test_request_drops_client_copies_of_remade_headers(name: bytes, expected: list[bytes] | None) -> None:
    """The client's Host, Content-Length, Expect, X-Forwarded-Proto/-Host and X-Request-ID never reach the
    upstream; the gateway's own value (or none) does."""
    out = upstream(headers((name, b"from-client"), (name, b"again")))
    assert out.getRawHeaders(name) == expected


def test_request_without_client_host_sends_no_forwarded_host() -> None:
    """Without a client Host there is no X-Forwarded-Host, not even the client's own copy."""
    out = upstream(headers((b"X-Forwarded-Host", b"spoofed")), client_host=None)
    assert out.getRawHeaders(b"x-forwarded-host") is None


def test_request_does_not_change_client_headers() -> None:
    """Building the upstream headers leaves the client's headers as they were."""
    client = headers((b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"Host", b"gw"), (b"Via", b"1.0 p"))
    before = sorted(client.getAllRawHeaders())
    upstream(client)
    assert sorted(client.getAllRawHeaders()) == before


def test_fields_built_from_others_share_no_change_with_them() -> None:
    """The copies share their value lists with the fields they came from (`Fields.entries`); adding a value to a
    copy, or to the original, leaves the other as it was."""
    client = headers((b"X-A", b"1"), (b"Vary", b"Accept"), (b"Host", b"gw"))
    sent = upstream(client)
    sent.addRawHeader(b"x-a", b"2")
    client.addRawHeader(b"Vary", b"Origin")
    assert client.getRawHeaders(b"x-a") == [b"1"]
    assert sent.getRawHeaders(b"vary") == [b"Accept"]
    origin = headers((b"Vary", b"Accept"), (b"X-B", b"b"))
    relayed = response(origin)
    relayed.addRawHeader(b"Vary", b"Origin")  # as CORS or admission's headers do
    assert origin.getRawHeaders(b"vary") == [b"Accept"]
    assert relayed.getRawHeaders(b"vary") == [b"Accept", b"Origin"]


# --- upstream_request_headers: what is added ------------------------------------------------------------------


def test_request_sets_host() -> None:
    """The Host sent upstream is the one given, whatever the client sent."""
    assert upstream(headers((b"Host", b"gw.example.com")), host=b"10.0.0.5:9000").getRawHeaders(b"host") == [
        b"10.0.0.5:9000"
    ]


def test_request_forwarded_for_without_existing() -> None:
    """Without an X-Forwarded-For from the client, the header is the client's address."""
    assert upstream(headers()).getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]


def test_request_forwarded_for_appends() -> None:
    """The client's address is appended to every existing X-Forwarded-For value, joined by ", "."""
    client = headers((b"X-Forwarded-For", b"203.0.113.1"), (b"x-forwarded-for", b"198.51.100.2, 198.51.100.3"))
    assert upstream(client).getRawHeaders(b"x-forwarded-for") == [b"203.0.113.1, 198.51.100.2, 198.51.100.3, 192.0.2.7"]


def test_request_forwarded_for_ipv6() -> None:
    """An IPv6 client address is appended as is."""
    assert upstream(headers(), client_ip="2001:db8::1").getRawHeaders(b"x-forwarded-for") == [b"2001:db8::1"]


@pytest.mark.parametrize("proto", [b"http", b"https"])
def test_request_sets_forwarded_proto(proto: bytes) -> None:
    """X-Forwarded-Proto is the scheme the client used."""
    assert upstream(headers(), proto=proto).getRawHeaders(b"x-forwarded-proto") == [proto]


def test_request_sets_forwarded_host() -> None:
    """X-Forwarded-Host is the client's Host."""
    assert upstream(headers(), client_host=b"API.example.com:8443").getRawHeaders(b"x-forwarded-host") == [
        b"API.example.com:8443"
    ]


def test_request_sets_request_id() -> None:
    """X-Request-ID is the request's id."""
    assert upstream(headers(), request_id="abc123").getRawHeaders(b"x-request-id") == [b"abc123"]


def test_request_via_without_existing() -> None:
    """Without a Via from the client, Via is "1.1" and the gateway's name."""
    assert upstream(headers()).getRawHeaders(b"via") == [b"1.1 gateway"]


def test_request_via_after_existing() -> None:
    """The gateway's Via entry comes after every existing one."""
    client = headers((b"Via", b"1.0 fred"), (b"via", b"1.1 p.example.net (Proxy/1.0)"))
    assert upstream(client).getRawHeaders(b"via") == [b"1.0 fred, 1.1 p.example.net (Proxy/1.0), 1.1 gateway"]


def test_request_no_via_when_name_empty() -> None:
    """With an empty Via name the gateway adds no Via."""
    assert upstream(headers(), via=b"").getRawHeaders(b"via") is None


def test_request_client_via_passes_when_name_empty() -> None:
    """With an empty Via name the client's Via passes unchanged."""
    assert upstream(headers((b"Via", b"1.0 fred")), via=b"").getRawHeaders(b"via") == [b"1.0 fred"]


def test_request_end_to_end_headers_pass_unchanged_in_order() -> None:
    """Repeated end-to-end headers reach the upstream with every value, unchanged and in order."""
    client = headers(
        (b"Accept", b"text/csv"),
        (b"Authorization", b"Bearer abc"),
        (b"accept", b"application/json;q=0.5"),
        (b"Cookie", b"a=1"),
        (b"Cookie", b"b=2"),
        (b"X-Odd", b"  spaced ,value\t"),
    )
    out = upstream(client)
    assert out.getRawHeaders(b"accept") == [b"text/csv", b"application/json;q=0.5"]
    assert out.getRawHeaders(b"cookie") == [b"a=1", b"b=2"]
    assert out.getRawHeaders(b"authorization") == [b"Bearer abc"]
    assert out.getRawHeaders(b"x-odd") == [b"  spaced ,value\t"]


def test_request_headers_exactly() -> None:
    """A typical request's upstream headers are exactly the end-to-end ones plus the forwarding set."""
    client = headers(
        (b"Host", b"gw.example.com"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Content-Length", b"3"),
        (b"Accept", b"*/*"),
    )
    out = upstream(client)
    assert sorted((n.lower(), v) for n, v in out.getAllRawHeaders()) == [
        (b"accept", [b"*/*"]),
        (b"host", [b"backend:8081"]),
        (b"via", [b"1.1 gateway"]),
        (b"x-forwarded-for", [b"192.0.2.7"]),
        (b"x-forwarded-host", [b"gw.example.com"]),
        (b"x-forwarded-proto", [b"http"]),
        (b"x-request-id", [b"rid-1"]),
    ]


# --- client_response_headers ------------------------------------------------------------------------------------


def test_response_drops_content_length() -> None:
    """The upstream's Content-Length header is not copied (the framing of the client response sets it)."""
    out = response(headers((b"Content-Length", b"10"), (b"Content-Type", b"text/csv")))
    assert out.getRawHeaders(b"content-length") is None
    assert out.getRawHeaders(b"content-type") == [b"text/csv"]


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_response_drops_hop_by_hop(name: bytes) -> None:
    """Every header of the fixed hop-by-hop list in a response stays behind."""
    out = response(headers((name, b"x"), (b"ETag", b'"1"')))
    assert name.lower() not in names(out)
    assert out.getRawHeaders(b"etag") == [b'"1"']


def test_response_drops_headers_named_in_connection() -> None:
    """A response header named in the upstream's Connection stays behind."""
    out = response(headers((b"Connection", b"keep-alive, X-Internal"), (b"X-Internal", b"1"), (b"X-Public", b"2")))
    assert b"x-internal" not in names(out)
    assert out.getRawHeaders(b"x-public") == [b"2"]


def test_response_keeps_set_cookie_values() -> None:
    """Several Set-Cookie headers all reach the client, unchanged and in order."""
    out = response(headers((b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2, c=3; HttpOnly")))
    assert out.getRawHeaders(b"set-cookie") == [b"a=1; Path=/", b"b=2, c=3; HttpOnly"]


def test_response_adds_request_id_when_absent() -> None:
    """Without an X-Request-ID from the upstream, the client gets the request's id."""
    assert response(headers(), request_id="abc").getRawHeaders(b"x-request-id") == [b"abc"]


def test_response_keeps_upstream_request_id() -> None:
    """An X-Request-ID from the upstream is passed on and not replaced."""
    out = response(headers((b"X-Request-ID", b"upstream-id")), request_id="abc")
    assert out.getRawHeaders(b"x-request-id") == [b"upstream-id"]


def test_response_via_after_existing() -> None:
    """The gateway's Via entry comes after the upstream's."""
    out = response(headers((b"Via", b"1.1 cache")))
    assert out.getRawHeaders(b"via") == [b"1.1 cache, 1.1 gateway"]


def test_response_via_without_existing() -> None:
    """Without a Via from the upstream, the client gets the gateway's entry only."""
    assert response(headers()).getRawHeaders(b"via") == [b"1.1 gateway"]


def test_response_no_via_when_name_empty() -> None:
    """With an empty Via name the gateway adds no Via to responses."""
    assert response(headers(), via=b"").getRawHeaders(b"via") is None


def test_response_keeps_headers_already_in_target() -> None:
    """Headers the gateway already set on the client response stay when the upstream does not send them."""
    target = headers((b"Connection", b"close"))
    client_response_headers(
        headers((b"Connection", b"keep-alive"), (b"Server", b"origin")), target, via=b"", request_id="r"
    )
    assert target.getRawHeaders(b"connection") == [b"close"]
    assert target.getRawHeaders(b"server") == [b"origin"]


# --- request_id_of ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"abc", b"f47ac10b-58cc-4372-a567-0e02b2c3d479", b"a" * 200, b"!~#$%&'*+.^_`|", b"x:y/z=1"],
)
def test_request_id_keeps_sane_client_id(value: bytes) -> None:
    """A client id of 1 to 200 visible ASCII characters is kept."""
    assert request_id_of(headers((b"X-Request-ID", value))) == value.decode("ascii")


@pytest.mark.parametrize(
    "value",
    [b"a" * 201, b"has space", b"tab\there", b"ctl\x01", b"del\x7f", b"caf\xc3\xa9", b""],
    ids=["201-bytes", "space", "tab", "control", "del", "non-ascii", "empty"],
)
def test_request_id_replaces_bad_client_id(value: bytes) -> None:
    """A client id that is too long, empty or not visible ASCII is replaced by a new 32-hex id."""
    request_id = request_id_of(headers((b"X-Request-ID", value)))
    assert NEW_ID.fullmatch(request_id)


def test_request_id_generated_when_absent() -> None:
    """Without a client id the request gets a new 32-hex id."""
    assert NEW_ID.fullmatch(request_id_of(headers()))


def test_request_ids_generated_are_distinct() -> None:
    """Two requests without ids get different ids."""
    assert request_id_of(headers()) != request_id_of(headers())


# --- properties over random header sets -----------------------------------------------------------------------

END_TO_END = [b"Accept", b"Cookie", b"Set-Cookie", b"Content-Type", b"X-A", b"X-B", b"X-C", b"Authorization"]
# Header names the gateway writes itself in each direction, whatever the input.
SET_ON_REQUEST = {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id", b"via"}
REMADE_ON_REQUEST = {b"content-length", b"expect"}
SET_ON_RESPONSE = {b"x-request-id", b"via"}
REMADE_ON_RESPONSE = {b"content-length"}

header_names = st.builds(
    lambda name, upper: name.upper() if upper else name.lower(),
    st.sampled_from(HOP_BY_HOP[1:] + END_TO_END + [b"Content-Length", b"Expect", b"Via", b"X-Request-ID"]),
    st.booleans(),
)
header_values = st.text(alphabet=string.ascii_letters + string.digits + " ,;=/-", max_size=12).map(str.encode)
# The names a Connection header may list, and how they are written in it.
connection_lists = st.lists(st.sampled_from(END_TO_END + HOP_BY_HOP[1:] + [b"close"]), max_size=3)
separators = st.sampled_from([b",", b", ", b" ,\t", b"\t,"])


@st.composite
def header_sets(draw: st.DrawFn) -> tuple[Headers, set[bytes]]:
    """Random headers, and the lower-cased names listed in its Connection headers."""
    pairs = draw(st.lists(st.tuples(header_names, header_values), max_size=12))
    listed: set[bytes] = set()
    for tokens in draw(st.lists(connection_lists, max_size=2)):
        listed.update(t.lower() for t in tokens)
        pairs.insert(draw(st.integers(0, len(pairs))), (b"Connection", draw(separators).join(tokens)))
    return headers(*pairs), listed


def check_forwarded(original: Headers, out: Headers, listed: set[bytes], set_: set[bytes], remade: set[bytes]) -> None:
    dropped = {n.lower() for n in HOP_BY_HOP} | listed
    for name in names(out) - set_:
        assert name not in dropped, name
        assert name not in remade, name
    for name in names(original) - dropped - set_ - remade:
        assert out.getRawHeaders(name) == original.getRawHeaders(name), name


@given(header_sets())
def test_request_property(case: tuple[Headers, set[bytes]]) -> None:
    """For any request headers, no hop-by-hop or Connection-listed header reaches the upstream, and every other
    client header does with its values unchanged."""
    client, listed = case
    check_forwarded(client, upstream(client), listed, SET_ON_REQUEST, REMADE_ON_REQUEST)


@given(header_sets())
def test_response_property(case: tuple[Headers, set[bytes]]) -> None:
    """For any response headers, no hop-by-hop or Connection-listed header reaches the client, and every other
    upstream header does with its values unchanged."""
    upstream_headers, listed = case
    check_forwarded(upstream_headers, response(upstream_headers), listed, SET_ON_RESPONSE, REMADE_ON_RESPONSE)


def test_request_removes_identity_headers_and_sets_the_gateways() -> None:
    """Headers named in `remove` (identity and credential headers) are dropped whatever the client's spelling,
    then those of `add` are set, each value kept."""
    client = headers((b"x-consumer-id", b"admin"), (b"Authorization", b"Bearer k"), (b"X-Team", b"a"))
    out = upstream(
        client,
        remove=frozenset({b"X-Consumer-Id", b"Authorization", b"X-Team"}),
        add=[(b"X-Consumer-Id", b"alice"), (b"X-Team", b"reports"), (b"X-Team", b"ops")],
    )
    assert out.getRawHeaders(b"x-consumer-id") == [b"alice"]
    assert out.getRawHeaders(b"authorization") is None
    assert out.getRawHeaders(b"x-team") == [b"reports", b"ops"]


PROXY_SET = [
    b"Forwarded",
    b"forwarded",
    b"X-Real-IP",
    b"x-real-ip",
    b"X-Client-IP",
    b"True-Client-IP",
    b"CF-Connecting-IP",
    b"Fastly-Client-IP",
    b"X-Cluster-Client-IP",
    b"X-Forwarded",
    b"Forwarded-For",
    b"X-Original-Forwarded-For",
    b"X-Forwarded-Port",
    b"X-Forwarded-Prefix",
    b"X-Forwarded-Server",
    b"X-Forwarded-Scheme",
    b"X-Forwarded-Ssl",
]


@pytest.mark.parametrize("name", PROXY_SET)
def test_request_drops_client_address_headers_from_a_peer_that_is_no_trusted_proxy(name: bytes) -> None:
    """Forwarded (RFC 7239), X-Real-IP and the other headers proxies set about the client (its address, port,
    scheme, the path prefix it used): from a peer that is no trusted proxy they are forged, and removed
    (X-Forwarded-For is replaced by the peer's address)."""
    client = headers((name, b"for=203.0.113.9"), (b"X-Forwarded-For", b"203.0.113.9"), (b"Accept", b"*/*"))
    out = upstream(client, keep_forwarded_for=False)
    assert name.lower() not in names(out)
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]
    assert out.getRawHeaders(b"accept") == [b"*/*"]


def test_request_keeps_a_trusted_proxys_client_address_headers_unchanged() -> None:
    """From a trusted proxy, every Forwarded and X-Real-IP value passes as it came; X-Forwarded-For is appended to."""
    client = headers(
        (b"Forwarded", b'for=203.0.113.9;proto=https, for="[2001:db8::1]"'),
        (b"Forwarded", b"for=198.51.100.1"),
        (b"X-Real-IP", b"203.0.113.9"),
        (b"X-Forwarded-For", b"203.0.113.9"),
    )
    out = upstream(client, keep_forwarded_for=True)
    assert out.getRawHeaders(b"forwarded") == [b'for=203.0.113.9;proto=https, for="[2001:db8::1]"', b"for=198.51.100.1"]
    assert out.getRawHeaders(b"x-real-ip") == [b"203.0.113.9"]
    assert out.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.9, 192.0.2.7"]


@pytest.mark.parametrize("keep_forwarded_for", [False, True])
def test_request_with_underscores_allowed_removes_underscored_forwarding_headers(keep_forwarded_for: bool) -> None:
    """With underscores_in_headers on, "X_Forwarded_For" would reach a CGI/WSGI upstream as X-Forwarded-For
    beside the gateway's own: every underscored spelling of a forwarding header the gateway sets or guards is
    removed, whoever sent it; other underscored headers pass."""
    client = headers(
        (b"X_Forwarded_For", b"6.6.6.6"),
        (b"x_forwarded-proto", b"https"),
        (b"X_Forwarded_Host", b"evil.example"),
        (b"X_Real_IP", b"6.6.6.6"),
        (b"X_Request_ID", b"forged"),
        (b"True_Client_IP", b"6.6.6.6"),
        (b"X_Forwarded_Prefix", b"/evil"),
        (b"X_Other", b"kept"),
    )
    out = upstream(client, underscores=True, keep_forwarded_for=keep_forwarded_for)
    assert {name for name in names(out) if b"_" in name} == {b"x_other"}
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]


def test_request_with_underscores_allowed_removes_underscored_spellings_of_removed_headers() -> None:
    """With underscores_in_headers on, "X_Consumer_ID" would reach a CGI/WSGI upstream as X-Consumer-ID: it is
    removed like X-Consumer-ID itself; other underscored headers still pass."""
    client = headers((b"X_Consumer_ID", b"admin"), (b"x_auth_method", b"none"), (b"X_Other", b"kept"))
    out = upstream(client, underscores=True, remove=frozenset({b"X-Consumer-Id", b"X-Auth-Method"}))
    assert names(out) >= {b"x_other"}
    assert not {b"x_consumer_id", b"x_auth_method"} & names(out)


def test_response_hides_the_named_headers_in_any_case() -> None:
    """`hidden` (lower-cased names) are not relayed, whatever case the upstream sent them in; the rest are."""
    source = headers((b"SERVER", b"Apache/2.4.1"), (b"x-powered-by", b"PHP/5.6"), (b"X-Kept", b"1"))
    out = Headers()
    client_response_headers(source, out, via=b"", request_id="rid", hidden=frozenset({b"server", b"x-powered-by"}))
    assert names(out) == {b"x-kept", b"x-request-id"}


def test_response_server_header_replaces_the_upstreams() -> None:
    """With the gateway's own Server, the upstream's (when not hidden anyway) is replaced, never joined."""
    source = headers((b"Server", b"Apache/2.4.1"))
    out = Headers()
    client_response_headers(source, out, via=b"", request_id="rid", server=b"gateway")
    assert out.getRawHeaders(b"server") == [b"gateway"]
