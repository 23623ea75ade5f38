"""Request heads and body framing as bytes: pure functions, no I/O.

Rules: a head is one bytes object (one `write`, one TCP segment for a small request); header names and values go
out as given (the caller has checked them); the framing header (Content-Length, or Transfer-Encoding: chunked for
a body of unknown length) is the writer's, never the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["CRLF", "LAST_CHUNK", "chunk", "request_head"]

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
"""The end of a chunked body without trailers."""

_CONTENT_LENGTH_0: Final = frozenset({b"POST", b"PUT", b"PATCH"})
"""Methods whose bodiless requests still say `Content-Length: 0` (RFC 9110 section 8.6: a user agent should send
it for a method that defines a meaning for a body; servers wait for a body otherwise)."""


def request_head(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, Sequence[bytes]]],
    *,
    length: int | None,
    has_body: bool,
) -> bytes:
    """The head of an HTTP/1.1 request: the request line, `headers` (each name with its values, as
    `getAllRawHeaders` gives them) in order, then the framing of its body: `Content-Length: length` when the
    length is known, chunked when it is not (`length` None with a body), and nothing for a request without a body
    (but `Content-Length: 0` for POST, PUT and PATCH)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, values in headers:
        for value in values:
            # Four appends (compiled: four direct calls), where `parts += (...)` makes and drops a tuple per line.
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(CRLF)
    if has_body:
        parts.append(b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length)
    elif method in _CONTENT_LENGTH_0:
        parts.append(b"Content-Length: 0\r\n")
    parts.append(CRLF)
    return b"".join(parts)


def chunk(data: bytes) -> list[bytes]:
    """`data` as one chunk of a chunked body, in pieces for `writeSequence` (the data is not copied into a new
    bytes object); never empty: an empty chunk ends the body."""
    return [b"%x\r\n" % len(data), data, CRLF]
