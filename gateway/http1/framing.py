"""The numbers that frame an HTTP/1.1 body, read strictly on both sides of the gateway.

Rule: a length the next hop could read differently is no length. A C parser (nginx, HAProxy, most upstreams and
clients) either refuses a Content-Length of more digits than it holds or wraps it around to a small number: a
length of 2^64 + 3 is 3 to the one and a body without end to the other, the gap request smuggling lives in. Like
nginx and HAProxy, the gateway takes a Content-Length up to 2^63 - 1 (a signed 64-bit length) and refuses anything
larger: a request with 400, a response with 502. Chunk sizes are llhttp's to read (`gateway.http1`): it refuses
one over 2^64 - 1 on both sides; the gateway re-chunks every body it forwards, so a chunk size never crosses it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_BODY_LENGTH", "body_length"]

MAX_BODY_LENGTH: Final = 2**63 - 1
"""The largest Content-Length taken: a signed 64-bit length, as nginx (off_t) and HAProxy read it."""

_MAX_DIGITS: Final = len(str(MAX_BODY_LENGTH))


def body_length(text: bytes) -> int | None:
    """A decimal Content-Length value (1*DIGIT, within optional spaces) as a number, or None when it is no such
    value or over `MAX_BODY_LENGTH`. Never raises, and never turns the digits into an int of unbounded size
    (Python refuses to convert more than 4,300 digits at all); leading zeros do not count."""
    digits = text.strip(b" \t")
    if not digits.isdigit():
        return None
    significant = digits.lstrip(b"0")
    if len(significant) > _MAX_DIGITS:
        return None
    value = int(significant) if significant else 0
    return value if value <= MAX_BODY_LENGTH else None
