"""The numbers that frame an HTTP/1.1 body, read strictly on both sides of the gateway.

Rule: a length the next hop could read differently is no length. Python's integers never overflow, so Twisted's
parsers take a Content-Length or a chunk size of any number of digits, where a C parser (nginx, HAProxy, llhttp,
most upstreams and clients) either refuses it or wraps it around to a small number: a chunk size of 2^64 + 3
is 3 to the one and a body without end to the other, the gap request smuggling lives in. Like nginx and HAProxy,
the gateway takes lengths up to 2^63 - 1 (a signed 64-bit length) and refuses anything larger: a request with 400,
a response with 502 (or a cut client connection once its head has gone out).

The chunked decoder here also refuses a malformed trailer line (no colon, a bad name, obs-fold) rather than
ignoring it: "0\\r\\nX\\r\\nGET /smuggled ...\\r\\n\\r\\n" would otherwise end the body, with the next request's
lines taken as trailers, where a stricter parser in front of the gateway sees a broken body.

The decoder hooks into twisted.web's server parser (its chunked decoder is private); the gateway's own HTTP/1.1
wire layer over llhttp (`gateway.http1`), which refuses sizes over 64 bits itself, replaces it as it replaced
Agent on the upstream side (where the gateway refuses a Content-Length over 2^63-1 on top of llhttp).
"""

from __future__ import annotations

import re

from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError

__all__ = ["MAX_BODY_LENGTH", "StrictChunkedDecoder", "body_length"]

MAX_BODY_LENGTH = 2**63 - 1
"""The largest Content-Length or chunk size taken: a signed 64-bit length, as nginx (off_t) and HAProxy read it."""

_MAX_DIGITS = len(str(MAX_BODY_LENGTH))
_TRAILER_FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00\r\n]*")


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


class StrictChunkedDecoder(_ChunkedTransferDecoder):
    """Twisted's chunked decoder, refusing a chunk size over `MAX_BODY_LENGTH` and a malformed trailer line.

    Both raise the error Twisted's own refusals raise, so the server channel handles them as it handles any broken
    chunked framing: it answers 400 and closes."""

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        read = bool(super()._dataReceived_CHUNK_LENGTH())
        if read and self.length > MAX_BODY_LENGTH:
            raise _MalformedChunkedDataError(f"chunk size over {MAX_BODY_LENGTH} (2^63 - 1)")
        return read

    def _dataReceived_TRAILER(self) -> bool:
        end = self._buffer.find(b"\r\n", self._start)
        if end > 0 and not _TRAILER_FIELD.fullmatch(self._buffer, 0, end):
            raise _MalformedChunkedDataError("malformed trailer field")
        return bool(super()._dataReceived_TRAILER())
