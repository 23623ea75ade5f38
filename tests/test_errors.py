"""Tests for gateway.errors: each error's status, and the problem+json answer built from it."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from gateway import errors
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ClientBodyTimeout,
    GatewayError,
    NoRoute,
    UpstreamBroken,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnreachable,
    problem,
)

EXPECTED_STATUS: list[tuple[type[GatewayError], int]] = [
    (BadRequest, 400),
    (NoRoute, 404),
    (errors.MethodNotAllowed, 405),
    (errors.NotSupported, 501),
    (ClientBodyTimeout, 408),
    (errors.HeadTimeout, 408),
    (errors.RequestLineTooLong, 414),
    (errors.HeadersTooLarge, 431),
    (errors.TooManyConnections, 503),
    (BodyTooLarge, 413),
    (UpstreamUnreachable, 502),
    (UpstreamBroken, 502),
    (errors.UpstreamTLSFailed, 502),
    (UpstreamSaturated, 503),
    (errors.UpstreamUnavailable, 503),
    (UpstreamTimeout, 504),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.TooManyRequests, 429),
    (errors.AuthUnavailable, 503),
    (errors.AuthTimeout, 504),
    (errors.LimitsUnavailable, 503),
    (errors.UpgradeRefused, 403),
    (errors.CorsRefused, 403),
]
BASES_AND_PASSED_THROUGH = {errors.Denied, errors.AuthServiceDenied, errors.HttpsRedirect}
"""`Denied` is the base of admission's refusals; `AuthServiceDenied` takes its status from the auth service;
`HttpsRedirect` is 301 or 308 by method (tests/test_tls.py)."""


def all_subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    """Every subclass defined in gateway.errors (test modules may define their own, which do not count)."""
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found.append(sub)
        found.extend(all_subclasses(sub))
    return found


def test_every_subclass_has_an_expected_status() -> None:
    """The table of expected statuses below covers every GatewayError subclass."""
    assert set(all_subclasses(GatewayError)) - BASES_AND_PASSED_THROUGH == {cls for cls, _ in EXPECTED_STATUS}


def test_auth_service_denial_is_passed_through_with_its_own_body() -> None:
    """A forward-auth service's 401 answers with its status, content type and body, not problem+json; one without
    a body or content type gets problem+json with that status."""
    denied = errors.AuthServiceDenied(401, b"text/plain", b"go away", [(b"WWW-Authenticate", b'Bearer realm="x"')])
    assert denied.render("rid") == (401, b"text/plain", b"go away")
    assert denied.extra_headers() == [(b"WWW-Authenticate", b'Bearer realm="x"')]
    status, content_type, body = errors.AuthServiceDenied(403, None, b"", []).render("rid")
    assert (status, content_type, json.loads(body)["status"]) == (403, b"application/problem+json", 403)


@pytest.mark.parametrize(("cls", "status"), EXPECTED_STATUS, ids=[cls.__name__ for cls, _ in EXPECTED_STATUS])
def test_problem_status_and_content_type(cls: type[GatewayError], status: int) -> None:
    """problem() answers each error with its status and the application/problem+json content type."""
    answer_status, content_type, _ = problem(cls("detail"), "rid")
    assert (answer_status, content_type) == (status, b"application/problem+json")


@pytest.mark.parametrize(("cls", "status"), EXPECTED_STATUS, ids=[cls.__name__ for cls, _ in EXPECTED_STATUS])
def test_problem_body(cls: type[GatewayError], status: int) -> None:
    """The body holds exactly type, title, status, detail and request_id, taken from the error and the request."""
    error = cls("no route matches host api.example.com and this path")
    _, _, body = problem(error, "0123456789abcdef0123456789abcdef")
    assert json.loads(body) == {
        "type": error.type_uri,
        "title": cls.title,
        "status": status,
        "detail": "no route matches host api.example.com and this path",
        "request_id": "0123456789abcdef0123456789abcdef",
    }


@pytest.mark.parametrize("cls", [cls for cls, _ in EXPECTED_STATUS], ids=lambda cls: cls.__name__)
def test_problem_body_is_compact(cls: type[GatewayError]) -> None:
    """The body is JSON with no whitespace between tokens."""
    _, _, body = problem(cls("detail, with: punctuation"), "rid")
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode("utf-8")
    assert b"\n" not in body


@pytest.mark.parametrize("cls", [cls for cls, _ in EXPECTED_STATUS], ids=lambda cls: cls.__name__)
def test_type_is_an_absolute_uri_naming_the_slug(cls: type[GatewayError]) -> None:
    """The problem type is an absolute URI that ends with the error's slug."""
    type_uri = cls("x").type_uri
    assert urlsplit(type_uri).scheme
    assert type_uri.endswith(cls.slug)


def test_problem_body_escapes_detail() -> None:
    """A detail with quotes, backslashes, control characters and non-ASCII survives as valid UTF-8 JSON."""
    detail = 'path "/caf\u00e9\\x"\n\ttab'
    _, _, body = problem(NoRoute(detail), "rid")
    body.decode("utf-8")
    assert json.loads(body)["detail"] == detail


def test_problem_status_is_a_json_number() -> None:
    """The status in the body is a number, not a string."""
    _, _, body = problem(UpstreamTimeout("slow"), "rid")
    assert b'"status":504' in body


def test_error_keeps_its_detail() -> None:
    """An error's detail is its message."""
    error = BodyTooLarge("too big")
    assert error.detail == "too big"
    assert str(error) == "too big"


def test_slugs_are_distinct() -> None:
    """Every GatewayError subclass has its own slug, different from the base class's."""
    slugs = [cls.slug for cls in all_subclasses(GatewayError)]
    assert len(set(slugs)) == len(slugs)
    assert GatewayError.slug not in slugs


def test_titles_are_distinct() -> None:
    """Every GatewayError subclass has its own title, so two errors with one status can be told apart."""
    titles = [cls.title for cls in all_subclasses(GatewayError)]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("cls", all_subclasses(GatewayError), ids=lambda cls: cls.__name__)
def test_status_is_4xx_or_5xx(cls: type[GatewayError]) -> None:
    """Every GatewayError subclass answers with a client or server error status."""
    assert 400 <= cls.status <= 599


@pytest.mark.parametrize("cls", all_subclasses(GatewayError), ids=lambda cls: cls.__name__)
def test_subclass_is_exported(cls: type[GatewayError]) -> None:
    """Every GatewayError subclass is a public name of gateway.errors."""
    assert cls.__name__ in errors.__all__


STANDARD_PHRASES = {
    301: b"Moved Permanently",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
"""RFC 9110's phrases (RFC 6585's for 429 and 431), for every status the gateway answers with itself."""


def test_every_status_the_gateway_answers_with_has_its_standard_reason_phrase() -> None:
    """Each status of an error class (and the redirects) has its RFC 9110 phrase whatever the Python version
    (before 3.13 `http.HTTPStatus` says "Request Entity Too Large" for 413), never Twisted's "Unknown Status"
    (which it sends for 429 and 431) nor RFC 2616's older spellings ("Request Time-out")."""
    statuses = {status for _, status in EXPECTED_STATUS} | {301, 308}
    assert statuses == set(STANDARD_PHRASES)
    assert {status: errors.reason_phrase(status) for status in statuses} == STANDARD_PHRASES


def test_upstream_saturated_says_to_retry_shortly() -> None:
    """A full queue (or a wait too long) for an upstream's slots: Retry-After 1, kept when the request names it."""
    assert UpstreamSaturated("x").naming("upstream billing").extra_headers() == [(b"Retry-After", b"1")]


def test_upstream_unavailable_says_when_to_retry_in_whole_seconds() -> None:
    """The fast 503 of an upstream no server of which can take a request: Retry-After rounded up, at least 1, and
    kept when the request names the upstream."""
    assert errors.UpstreamUnavailable("x", retry_after=2.1).extra_headers() == [(b"Retry-After", b"3")]
    assert errors.UpstreamUnavailable("x", retry_after=0).extra_headers() == [(b"Retry-After", b"1")]
    named = errors.UpstreamUnavailable("no server of {upstream}", retry_after=7).naming("upstream billing")
    assert (named.detail, named.extra_headers()) == ("no server of upstream billing", [(b"Retry-After", b"7")])
