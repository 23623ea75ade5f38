"""The path a request is routed by, computed from the path the client sent; pure functions over bytes.

Rule: a path is routed by what an upstream would resolve it to, and every step is a C-speed operation over the
whole path (regular expressions, `split`, `join`, `map` over a table), never a Python loop over its bytes: a
client chooses the path, and 8 KiB of escapes must cost a request no more Python work than "/". The rule for
what the routing path is and what is refused is in `gateway.routing.router`, which uses these functions; config
checks route prefixes with them too (it cannot import the router, which imports config).
"""

from __future__ import annotations

import operator
import re
from typing import Final, NoReturn

__all__ = ["PathRefused", "prefix_end", "routing_path"]

_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES: Final = frozenset(b"/\\")
_HEX_DIGITS: Final = "0123456789abcdefABCDEF"


def _escape_table() -> dict[bytes, bytes]:
    """What each escape ("%" and two hex digits, in any case; not %00) stands for in a routing path: the character
    when unreserved, "/" for a slash or backslash, else the escape upper-cased."""
    table = {}
    for high in _HEX_DIGITS:
        for low in _HEX_DIGITS:
            digits = (high + low).encode("ascii")
            value = int(digits, 16)
            if value == 0:
                continue  # %00 is refused: C code takes it as the end of the string
            if value in _UNRESERVED:
                table[digits] = bytes((value,))
            elif value in _SLASHES:
                table[digits] = b"/"
            else:
                table[digits] = b"%" + digits.upper()
    return table


_ESCAPES: Final = _escape_table()
_PLAIN: Final = re.compile(rb"(?:[^%\\;#/]++|/(?![/.]))*+")
"""A path without escapes, backslashes, parameters, a fragment, "//" or a segment that begins with a dot: its
routing path is itself. One match (compiled: one call), where its checks one by one would be several calls."""
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})|%00")
_TWO: Final = operator.itemgetter(slice(None, 2))
_AFTER_TWO: Final = operator.itemgetter(slice(2, None))
_PARAMETERS: Final = re.compile(rb";[^/]*")
_SLASH_RUN: Final = re.compile(rb"//+")
_DOT_SEGMENT: Final = re.compile(rb"/\.\.?(?:/|%3B|\Z)")
"""A "." or ".." segment, also with parameters after it: "..%3Bx" is still ".." to some upstreams."""

_SEPARATOR = rb"(?:[/\\]|%2[fF]|%5[cC])"
_IN_PARAMETERS = rb"(?:[^%/\\]++|%(?!2[fF]|5[cC])[0-9A-Fa-f]{2})*+"
_RAW_PIECE: Final = re.compile(
    rb"(?P<sep>" + _SEPARATOR + rb")(?:" + _SEPARATOR + rb"|;" + _IN_PARAMETERS + rb")*+"
    rb"|;" + _IN_PARAMETERS + rb"|%(?P<esc>[0-9A-Fa-f]{2})|.",
    re.DOTALL,
)
"""One step of a raw (valid) path: a separator with the separators and parameters it swallows, parameters, an
escape, or one byte."""


class PathRefused(ValueError):
    """A request path that must not be forwarded, and why (said to the client in a 400)."""


def routing_path(path: bytes) -> bytes:
    """The path to route `path` (a request path, without the query) by; raises `PathRefused` for a path that
    must not be forwarded. See `gateway.routing.router` for the rule."""
    if _PLAIN.fullmatch(path):
        return path
    # `bytes.find` rather than `in`: `b"#" in path` first tries the needle as an integer, and a bytes needle makes
    # that raise and clear a TypeError (about 250 ns).
    if path.find(b"#") != -1:
        raise PathRefused('the path has a "#" (a fragment is never sent, and upstreams cut the path there)')
    return _normalise(path)


def _normalise(path: bytes) -> bytes:
    # Each part after a "%" begins with the escape's two hex digits; "\\" is a separator to some upstreams.
    parts = path.replace(b"\\", b"/").split(b"%")
    escaped = parts[1:]
    try:
        decoded = list(map(_ESCAPES.__getitem__, map(_TWO, escaped)))
    except KeyError:
        _refuse_escape(path)  # a malformed escape, or %00, which the table leaves out
    pieces = [parts[0]] * (2 * len(escaped) + 1)
    pieces[1::2] = decoded
    pieces[2::2] = map(_AFTER_TWO, escaped)
    # Parameters run to the next separator, an encoded one too; then a run of separators is one.
    out = _SLASH_RUN.sub(b"/", _PARAMETERS.sub(b"", b"".join(pieces)))
    _check_segments(out)
    return out


def _refuse_escape(path: bytes) -> NoReturn:
    """Refuse `path` for its first escape that is malformed or encodes NUL."""
    bad = _BAD_ESCAPE.search(path)
    if bad is not None and bad.group() == b"%00":
        raise PathRefused("the path has an encoded NUL (%00)")
    raise PathRefused('the path has a malformed percent-escape (a "%" not followed by two hex digits)')


def _check_segments(path: bytes) -> None:
    if _DOT_SEGMENT.search(b"/" + path):
        raise PathRefused('the path has a "." or ".." segment (in some spelling); send the path the client resolved')


def prefix_end(path: bytes, prefix: bytes) -> int:
    """Where in raw `path` the part whose routing path is `prefix` (itself a routing path) ends; 0 when the
    routing path of `path` does not start with `prefix`.

    The walk costs one step per byte of `prefix` (a run of separators and parameters is one step), whatever
    the length of `path`."""
    if path.startswith(prefix):
        return len(prefix)  # already in routing form: the common case
    if not _normalise(path).startswith(prefix):
        return 0
    produced, at, after_slash, wanted = 0, 0, False, len(prefix)
    while True:
        step = _RAW_PIECE.match(path, at)
        assert step is not None  # every position starts some piece of a valid path
        at = step.end()
        if step.group("sep") is not None:
            if not after_slash:
                produced, after_slash = produced + 1, True
                if produced >= wanted:
                    return step.end("sep")
            continue
        text = step.group()
        if text[:1] == b";":
            continue  # parameters: not part of the routing path
        escape = step.group("esc")
        produced += len(_ESCAPES[escape]) if escape is not None else 1
        after_slash = False
        if produced >= wanted:
            return at
