"""Tests for gateway.routing.router and gateway.routing.paths: which route a host and path pick, and the target the
upstream receives."""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable, Sequence
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Route, Upstream
from gateway.routing.paths import PathRefused, routing_path
from gateway.routing.router import Router, host_without_port, prefix_matches, upstream_target

UPSTREAM = Upstream(name="u", scheme="http", host="127.0.0.1", port=8081, base_path=b"")


def route(name: str, prefix: str = "/", host: str | None = None, **kwargs: object) -> Route:
    return Route(name=name, host=host, path_prefix=prefix.encode("ascii"), upstream=UPSTREAM, **kwargs)  # type: ignore[arg-type]


def chosen(routes: Sequence[Route], host: str | None, path: bytes) -> str | None:
    found = Router(routes).match(host, path)
    return None if found is None else found.name


# --- host precedence -----------------------------------------------------------------------------------------


def test_exact_host_beats_wildcard() -> None:
    """A route naming the host wins over a wildcard route even when the wildcard's prefix is longer."""
    routes = [route("wild", "/api/v1", "*.example.com"), route("exact", "/", "api.example.com")]
    assert chosen(routes, "api.example.com", b"/api/v1/x") == "exact"


def test_wildcard_beats_any_host() -> None:
    """A wildcard route wins over a route without a host even when the latter's prefix is longer."""
    routes = [route("any", "/api/v1"), route("wild", "/", "*.example.com")]
    assert chosen(routes, "api.example.com", b"/api/v1/x") == "wild"


def test_exact_host_beats_any_host() -> None:
    """A route naming the host wins over a route without a host even when the latter's prefix is longer."""
    routes = [route("any", "/api/v1"), route("exact", "/", "api.example.com")]
    assert chosen(routes, "api.example.com", b"/api/v1/x") == "exact"


def test_host_route_without_matching_path_falls_back() -> None:
    """When no route of the request's host matches the path, a wildcard and then a host-less route may."""
    routes = [route("exact", "/admin", "api.example.com"), route("wild", "/w", "*.example.com"), route("any", "/")]
    assert chosen(routes, "api.example.com", b"/w/1") == "wild"
    assert chosen(routes, "api.example.com", b"/other") == "any"


def test_more_specific_wildcard_wins() -> None:
    """Among wildcard routes, the one with the longer suffix wins, whatever the order listed."""
    routes = [route("broad", "/", "*.example.com"), route("narrow", "/", "*.eu.example.com")]
    assert chosen(routes, "api.eu.example.com", b"/x") == "narrow"
    assert chosen(list(reversed(routes)), "api.eu.example.com", b"/x") == "narrow"
    assert chosen(routes, "api.us.example.com", b"/x") == "broad"


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("aexample.com", False),
        ("example.com.evil.org", False),
        ("other.org", False),
    ],
)
def test_wildcard_host(host: str, matches: bool) -> None:
    """ "*.example.com" matches any name below example.com, never example.com itself or look-alikes."""
    assert (chosen([route("wild", "/", "*.example.com")], host, b"/") == "wild") is matches


def test_exact_host_must_equal() -> None:
    """A route naming a host does not match another host, nor a subdomain of it."""
    routes = [route("exact", "/", "api.example.com")]
    assert chosen(routes, "api.example.com", b"/") == "exact"
    assert chosen(routes, "x.api.example.com", b"/") is None
    assert chosen(routes, "example.com", b"/") is None


def test_no_host_matches_only_hostless_routes() -> None:
    """A request without a Host matches only routes that name no host."""
    routes = [route("exact", "/", "api.example.com"), route("wild", "/", "*.example.com")]
    assert chosen(routes, None, b"/") is None
    assert chosen([*routes, route("any", "/public")], None, b"/public/x") == "any"


def test_no_match_is_none() -> None:
    """A path outside every prefix matches no route."""
    assert chosen([route("a", "/a"), route("b", "/b")], "x", b"/c") is None


def test_empty_router_matches_nothing() -> None:
    """A router without routes matches nothing."""
    assert Router([]).match("x", b"/") is None


# --- path precedence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["short-first", "long-first"])
def test_longest_prefix_wins(reverse: bool) -> None:
    """Among routes of one host class the longest matching prefix wins, whatever the order listed."""
    routes = [route("root", "/"), route("api", "/api"), route("v1", "/api/v1")]
    if reverse:
        routes.reverse()
    assert chosen(routes, "x", b"/api/v1/users") == "v1"
    assert chosen(routes, "x", b"/api/v2") == "api"
    assert chosen(routes, "x", b"/static") == "root"


def test_tie_goes_to_first_listed() -> None:
    """Two routes with the same host class and prefix: the one listed first wins."""
    assert chosen([route("first", "/a"), route("second", "/a")], "x", b"/a/1") == "first"
    assert chosen([route("second", "/a"), route("first", "/a")], "x", b"/a/1") == "second"


def test_tie_on_exact_host_goes_to_first_listed() -> None:
    """The first-listed rule holds within routes of one exact host too."""
    routes = [route("first", "/a", "h.example.com"), route("second", "/a", "h.example.com")]
    assert chosen(routes, "h.example.com", b"/a") == "first"


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        (b"/reports", b"/reports", True),
        (b"/reports", b"/reports/", True),
        (b"/reports", b"/reports/1", True),
        (b"/reports", b"/reports/1/2", True),
        (b"/reports", b"/reportsx", False),
        (b"/reports", b"/reports.csv", False),
        (b"/reports", b"/report", False),
        (b"/reports", b"/Reports", False),
        (b"/reports", b"/x/reports", False),
        (b"/api/", b"/api/", True),
        (b"/api/", b"/api/x", True),
        (b"/api/", b"/api", False),
        (b"/api/", b"/apix", False),
        (b"/", b"/", True),
        (b"/", b"/anything/at/all", True),
        (b"/caf%C3%A9", b"/caf%C3%A9/menu", True),
        (b"/caf%C3%A9", b"/caf%c3%a9/menu", False),
        (b"/caf%C3%A9", "/café/menu".encode(), False),
        (b"/a%2F", b"/a%2Fb", False),
    ],
)
def test_prefix_matches_whole_segments(prefix: bytes, path: bytes, matches: bool) -> None:
    """A prefix matches whole path segments, raw when it ends in "/", comparing the bytes without decoding."""
    assert prefix_matches(prefix, path) is matches


@pytest.mark.parametrize(
    ("path", "expected"),
    [(b"/reports", "reports"), (b"/reports/1", "reports"), (b"/reportsx", "root"), (b"/report", "root")],
)
def test_router_matches_whole_segments(path: bytes, expected: str) -> None:
    """The router picks "/reports" only for paths in that segment and falls back to "/" otherwise."""
    assert chosen([route("root", "/"), route("reports", "/reports")], "x", path) == expected


# --- host_without_port -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"a.b:80", "a.b"),
        (b"A.B", "a.b"),
        (b"API.Example.COM:8443", "api.example.com"),
        (b" a.b ", "a.b"),
        (b"127.0.0.1:8080", "127.0.0.1"),
        (b"127.0.0.1", "127.0.0.1"),
        (b"[::1]:80", "[::1]"),
        (b"[::1]", "[::1]"),
        (b"[2001:DB8::1]:443", "[2001:db8::1]"),
        (b"::1", "::1"),
        (b"", ""),
    ],
)
def test_host_without_port(value: bytes, expected: str) -> None:
    """host_without_port lower-cases the host and drops a port, leaving a bare IPv6 address whole."""
    assert host_without_port(value) == expected


# --- upstream_target -----------------------------------------------------------------------------------------


def target_route(prefix: str, *, strip: bool, base: bytes = b"") -> Route:
    upstream = Upstream(name="u", scheme="http", host="127.0.0.1", port=8081, base_path=base)
    return Route(name="r", host=None, path_prefix=prefix.encode("ascii"), upstream=upstream, strip_prefix=strip)


@pytest.mark.parametrize(
    ("prefix", "strip", "base", "target", "expected"),
    [
        ("/api", True, b"", b"/api/report?size=1", b"/report?size=1"),
        ("/api", False, b"", b"/api/report?size=1", b"/api/report?size=1"),
        ("/api", True, b"", b"/api", b"/"),
        ("/api", True, b"", b"/api?x=1", b"/?x=1"),
        ("/api", True, b"", b"/api/", b"/"),
        ("/api/", True, b"", b"/api/x", b"/x"),
        ("/api/", True, b"", b"/api/", b"/"),
        ("/", True, b"", b"/x/y?z", b"/x/y?z"),
        ("/", False, b"", b"/", b"/"),
        ("/api", True, b"/base", b"/api/r?q=1", b"/base/r?q=1"),
        ("/api", False, b"/base", b"/api/r?q=1", b"/base/api/r?q=1"),
        ("/", False, b"/v2/svc", b"/users/7", b"/v2/svc/users/7"),
        ("/api", True, b"", b"/api/a%2Fb%20c?q=%2F&r=a+b", b"/a%2Fb%20c?q=%2F&r=a+b"),
        ("/api", False, b"", b"/api/a%2fb?%ZZ", b"/api/a%2fb?%ZZ"),
        ("/api", True, b"", b"/api/x?", b"/x?"),
        ("/api", True, b"", b"/api/x?a?b=/api", b"/x?a?b=/api"),
        ("/api", True, b"", b"/api//x", b"//x"),
        ("/api", True, b"", b"/api/x;p=1", b"/x;p=1"),
    ],
)
def test_upstream_target(prefix: str, strip: bool, base: bytes, target: bytes, expected: bytes) -> None:
    """The upstream target is base path + path (prefix stripped if asked) + query, byte for byte."""
    assert upstream_target(target_route(prefix, strip=strip, base=base), target) == expected


# --- the router against a brute-force reference of the documented rule ---------------------------------------


def _reference_host_rank(pattern: str | None, host: str | None) -> tuple[int, int] | None:
    """Smaller is more specific: exact host, then wildcards (longer suffix first), then any host."""
    if pattern is None:
        return (2, 0)
    if host is None:
        return None
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return (1, -len(suffix)) if host.endswith(suffix) and len(host) > len(suffix) else None
    return (0, 0) if pattern == host else None


def _reference_prefix(prefix: bytes, path: bytes) -> bool:
    if prefix.endswith(b"/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + b"/")


def reference_match(routes: Sequence[Route], host: str | None, path: bytes) -> Route | None:
    """The documented rule, by brute force over every route."""
    candidates = []
    for index, r in enumerate(routes):
        rank = _reference_host_rank(r.host, host)
        if rank is not None and _reference_prefix(r.path_prefix, path):
            candidates.append((rank, -len(r.path_prefix), index, r))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[:3])[3]


# Hosts overlap on purpose: "x.a.example.com" is matched by an exact route and by both wildcards.
ROUTE_HOSTS = [None, "example.com", "a.example.com", "x.a.example.com", "*.example.com", "*.a.example.com"]
REQUEST_HOSTS = [None, "example.com", "a.example.com", "x.a.example.com", "x.a.example.com", "b.example.com"]
PREFIXES = [b"/", b"/a", b"/a/", b"/ab", b"/a/b", b"/a/b/", b"/b"]
SUFFIXES = [b"", b"/", b"b", b"/b", b"x", b"/x/y", b"?q", b"//"]

# Paths built from the prefixes hit the interesting edges (equal, one segment more, a longer segment) often.
request_paths = st.builds(bytes.__add__, st.sampled_from(PREFIXES), st.sampled_from(SUFFIXES))


@st.composite
def route_lists(draw: st.DrawFn) -> list[Route]:
    specs = draw(st.lists(st.tuples(st.sampled_from(ROUTE_HOSTS), st.sampled_from(PREFIXES)), max_size=8))
    return [route(f"r{i}", prefix.decode("ascii"), host) for i, (host, prefix) in enumerate(specs)]


@settings(max_examples=300)
@given(routes=route_lists(), host=st.sampled_from(REQUEST_HOSTS), path=request_paths)
def test_router_agrees_with_reference(routes: list[Route], host: str | None, path: bytes) -> None:
    """For any routes, host and path, the router picks the route the documented rule picks."""
    assert Router(routes).match(host, path) is reference_match(routes, host, path)


# --- routing by the path an upstream resolves (routing_path) --------------------------------------------------

UNRESERVED = b"abcxyzABC019-._~"
SEPARATORS = [b"/", b"//", b"\\", b"%2F", b"%2f", b"%5C", b"%5c", b";p=1/"]


@st.composite
def spellings(draw: st.DrawFn, segments: list[bytes], verbatim: bytes | None = None) -> bytes:
    """The path of `segments` spelt as some client or attacker might: unreserved bytes percent-encoded (hex in
    either case), each "/" as "//", "\\", "%2F", "%5c" or after ";params"; a segment equal to `verbatim` as it is."""
    out = draw(st.sampled_from([b"/", b"//"]))
    for i, segment in enumerate(segments):
        if i:
            out += draw(st.sampled_from(SEPARATORS))
        if segment == verbatim:
            out += segment
            continue
        for byte in segment:
            if draw(st.booleans()):
                escape = b"%%%02X" % byte
                out += escape.lower() if draw(st.booleans()) else escape
            else:
                out += bytes((byte,))
    return out


SAFE_SEGMENTS = st.text(alphabet=UNRESERVED.decode(), min_size=1, max_size=4).filter(lambda s: s not in (".", ".."))
canonical_segments = st.lists(SAFE_SEGMENTS.map(str.encode), min_size=1, max_size=4)


@settings(max_examples=300)
@given(data=st.data(), segments=canonical_segments)
def test_every_spelling_of_a_path_routes_alike(data: st.DataObject, segments: list[bytes]) -> None:
    """A path routes as itself however it is spelt: escapes of unreserved bytes, merged or encoded slashes,
    backslashes and ";params" all give the same routing path, so the same route."""
    canonical = b"/" + b"/".join(segments)
    respelt = data.draw(spellings(segments))
    assert routing_path(canonical) == canonical
    assert routing_path(respelt) == canonical
    # A route for every leading part of the path, and one for the root: the longest must win either way.
    prefixes = [b"/" + b"/".join(segments[:n]) for n in range(1, len(segments) + 1)]
    router = Router([route("root", "/"), *(route(f"r{i}", p.decode()) for i, p in enumerate(prefixes))])
    found = router.match("x", routing_path(respelt))
    assert found is router.match("x", canonical)
    assert found is not None and found.path_prefix == canonical


DOT_SPELLINGS = [b".", b"..", b"%2e", b"%2E%2e", b".%2E", b"..;x", b".%3Bx", b"%2e%2e;", b"..%3b"]


@settings(max_examples=300)
@given(data=st.data(), segments=canonical_segments, dots=st.sampled_from(DOT_SPELLINGS))
def test_a_dot_segment_in_any_spelling_is_refused(data: st.DataObject, segments: list[bytes], dots: bytes) -> None:
    """A "." or ".." segment, however spelt and wherever in the path, makes the path refused."""
    where = data.draw(st.integers(min_value=0, max_value=len(segments)))
    path = data.draw(spellings([*segments[:where], dots, *segments[where:]], verbatim=dots))
    with pytest.raises(PathRefused):
        routing_path(path)


MESSY_PIECES = [
    b"/", b"//", b"\\", b"a", b"b", b"api", b"x", b".", b"..", b"%2e", b"%2F", b"%5c", b"%61", b"%41", b"%7E",
    b"%zz", b"%00", b";", b";p=1", b"%3B", b"~", b"%C3%A9", b"%c3%a9",
]  # fmt: skip
messy_paths = st.lists(st.sampled_from(MESSY_PIECES), max_size=8).map(lambda pieces: b"/" + b"".join(pieces))
TARGET_PREFIXES = ["/", "/a", "/api", "/a/b", "/api/", "/%61b", "/caf%c3%a9", "/x"]
BASES = [b"", b"/base", b"/v2/svc"]


@st.composite
def based_routes(draw: st.DrawFn) -> list[Route]:
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(TARGET_PREFIXES), st.booleans(), st.sampled_from(BASES)), min_size=1, max_size=6
        )
    )
    return [
        Route(
            name=f"r{i}",
            host=None,
            path_prefix=prefix.encode("ascii"),
            upstream=Upstream(name="u", scheme="http", host="127.0.0.1", port=8081, base_path=base),
            strip_prefix=strip,
        )
        for i, (prefix, strip, base) in enumerate(specs)
    ]


@settings(max_examples=500)
@given(routes=based_routes(), path=messy_paths, query=st.sampled_from([b"", b"?", b"?q=../%00&r=%zz"]))
def test_an_admitted_target_stays_under_its_route(routes: list[Route], path: bytes, query: bytes) -> None:
    """For any path that is routed, the upstream target is the upstream's base path, then a path that resolves
    under the route's prefix (or, stripped, one that with the prefix put back resolves to the request's path),
    then the query byte for byte; it never resolves to a dot-segment."""
    try:
        routed = routing_path(path)
    except PathRefused:
        return
    found = Router(routes).match(None, routed)
    if found is None:
        return
    target = upstream_target(found, path + query)
    base = found.upstream.base_path
    assert target.startswith(base)
    assert target.endswith(query)
    sent_path = target[len(base) : len(target) - len(query)]
    prefix = routing_path(found.path_prefix)
    if found.strip_prefix:
        assert sent_path.startswith(b"/")
        assert routing_path(prefix + sent_path).rstrip(b"/") == routed.rstrip(b"/")
    else:
        assert sent_path == path
        assert prefix_matches(prefix, routing_path(sent_path))


@settings(max_examples=300)
@given(routes=route_lists(), host=st.sampled_from(REQUEST_HOSTS), path=messy_paths)
def test_routing_messy_paths_is_deterministic_and_by_whole_segments(
    routes: list[Route], host: str | None, path: bytes
) -> None:
    """For any spelling of a path, the router gives the same answer every time and on every instance, and it is
    the one the documented rule (whole segments, most specific wins) gives for the path's routing form."""
    try:
        routed = routing_path(path)
    except PathRefused:
        return
    first = Router(routes).match(host, routed)
    assert Router(routes).match(host, routed) is first
    assert first is reference_match(routes, host, routed)


# --- cost: C-speed operations, whatever the path --------------------------------------------------------------


def _python_calls(work: Callable[[], object]) -> int:
    """How many Python-level operations the gateway's own code does in `work`: lines of it run, and calls made
    from it (to Python functions or to builtins), each counted once. Frames outside gateway/ (a regex compiled
    again after another test filled `re`'s cache, a garbage collection's finalizers) are not counted, and the
    collector is off meanwhile, so the count does not depend on what ran before."""
    count = 0

    def ours(frame: FrameType) -> bool:
        return "/gateway/" in frame.f_code.co_filename

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        nonlocal count
        if not ours(frame):
            return None
        count += 1
        return trace

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event == "c_call" and ours(frame):
            count += 1

    collecting = gc.isenabled()
    gc.disable()
    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
        if collecting:
            gc.enable()
    return count


PATH_KINDS = {
    "escapes": (b"/", b"%41"),
    "reserved-escapes": (b"/a", b"%3b%2c"),
    "parameters": (b"/api;", b"v"),
    "slashes": (b"/api", b"/\\%2F"),
    "dot-like": (b"/a", b"/.x"),
}
"""Kinds of path, each as a head and a piece repeated after it."""


def long_and_short(kind: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """An 8 KiB path of this kind, and a short one."""
    head, piece = kind
    return head + piece * (8192 // len(piece)), head + piece * 2


@pytest.mark.parametrize("kind", PATH_KINDS.values(), ids=PATH_KINDS.keys())
def test_routing_an_8_kib_path_costs_a_bounded_number_of_python_calls(kind: tuple[bytes, bytes]) -> None:
    """Routing an 8 KiB path makes no more Python-level calls than routing a short path of the same kind: the
    work over its bytes is done by C-speed operations, not a loop per byte or per escape."""
    path, short = long_and_short(kind)
    assert routing_path(path).startswith(routing_path(short)[:4])  # and warmed up
    assert _python_calls(lambda: routing_path(path)) <= _python_calls(lambda: routing_path(short)) <= 60


@pytest.mark.parametrize("kind", PATH_KINDS.values(), ids=PATH_KINDS.keys())
def test_stripping_a_prefix_from_an_8_kib_path_costs_a_bounded_number_of_python_calls(
    kind: tuple[bytes, bytes],
) -> None:
    """Cutting a route's prefix out of an 8 KiB path (spelt other than the prefix) takes a number of Python-level
    calls bounded by the prefix's length, not the path's."""
    path, short = long_and_short(kind)
    api = route("api", "/api", strip_prefix=True)
    for long_target, short_target in ((path, short), (b"/%61p%69" + path, b"/%61p%69" + short)):
        upstream_target(api, short_target)  # warmed up: what a first call does once is not what is measured
        calls = _python_calls(lambda: upstream_target(api, long_target))  # noqa: B023 (called at once)
        assert calls <= _python_calls(lambda: upstream_target(api, short_target)) <= 200  # noqa: B023
        routed = routing_path(long_target)
        if routed.startswith(b"/api"):
            assert routing_path(upstream_target(api, long_target)) == routing_path(b"/" + routed[len(b"/api") :])


def test_the_offset_mapping_is_built_only_for_a_prefix_spelt_otherwise() -> None:
    """A target that starts with the route's prefix as written, and a route that keeps its prefix, cost no
    normalisation of the path at all."""
    path, stripping, keeping = b"/api/" + b"%41" * 2730, route("api", "/api", strip_prefix=True), route("api", "/api")
    upstream_target(stripping, b"/")  # the route's prefix in routing form is cached from then on
    assert _python_calls(lambda: upstream_target(stripping, path)) <= 20
    assert _python_calls(lambda: upstream_target(keeping, b"/%61pi" + path)) <= 20


# --- the fast routing path agrees with a byte-by-byte reference -----------------------------------------------

_REF_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REF_HEX = frozenset(b"0123456789abcdefABCDEF")


def reference_normalise(path: bytes) -> tuple[bytes, list[int]]:
    """The routing path of `path` and, for each length k of it, where in `path` its first k bytes end; a plain
    loop over the bytes, one rule at a time (the module docstring's rule, and the implementation it replaced)."""
    if b"#" in path:
        raise PathRefused("fragment")
    out, ends, i, in_parameters = bytearray(), [0], 0, False
    while i < len(path):
        if path[i] == 0x25:  # "%"
            escape = path[i + 1 : i + 3]
            if len(escape) < 2 or not _REF_HEX.issuperset(escape):
                raise PathRefused("malformed percent-escape")
            value = int(escape, 16)
            if value == 0:
                raise PathRefused("encoded NUL")
            if value in _REF_UNRESERVED:
                piece = bytes((value,))
            else:
                piece = b"/" if value in (0x2F, 0x5C) else b"%" + escape.upper()
            i += 3
        else:
            piece = b"/" if path[i] == 0x5C else path[i : i + 1]
            i += 1
        if piece == b"/":
            in_parameters = False
            if out.endswith(b"/"):
                continue
        elif in_parameters or piece == b";":
            in_parameters = True
            continue
        out += piece
        ends.extend([i] * len(piece))
    for segment in bytes(out).split(b"/"):
        if re.split(rb";|%3B", segment, maxsplit=1)[0] in (b".", b".."):
            raise PathRefused('"." or ".." segment')
    return bytes(out), ends


def _reference_or_refusal(path: bytes) -> tuple[bytes, list[int]] | str:
    try:
        return reference_normalise(path)
    except PathRefused as e:
        return str(e)


_PIECES = [b"/", b"\\", b";", b".", b"a", b"B", b"%", b"2", b"f", b"F", b"5", b"c", b"3", b"b", b"e", b"E", b"0"]
_PIECES += [b"%2F", b"%2f", b"%5C", b"%3B", b"%3b", b"%2e", b"%2E", b"%41", b"%7e", b"%25", b"%00", b"%zz", b"#"]
tangled_paths = st.lists(st.sampled_from(_PIECES), max_size=14).map(lambda pieces: b"/" + b"".join(pieces))


@settings(max_examples=1500)
@given(path=tangled_paths, data=st.data())
def test_routing_path_and_prefix_stripping_agree_with_the_reference(path: bytes, data: st.DataObject) -> None:
    """For any path, routing_path gives the reference's routing path or refuses it for the same kind of reason,
    and a strip_prefix route cuts the raw path exactly where the reference's offsets say its prefix ends."""
    expected = _reference_or_refusal(path)
    try:
        got: bytes | str = routing_path(path)
    except PathRefused as e:
        assert isinstance(expected, str), (path, expected, e)
        assert expected.split()[-1] in str(e) or ('"."' in expected and '"."' in str(e)), (expected, str(e))
        return
    assert not isinstance(expected, str), (path, expected, got)
    routed, ends = expected
    assert got == routed
    length = data.draw(st.integers(1, len(routed)), label="prefix length")
    prefix = routed[:length]
    if _reference_or_refusal(prefix) == (prefix, list(range(length + 1))) and prefix_matches(prefix, routed):
        stripped = upstream_target(route("r", prefix.decode("latin-1"), strip_prefix=True), path)
        rest = path[ends[length] :]
        assert stripped == (rest if rest.startswith(b"/") else b"/" + rest)
