"""`gateway.http1.heads`: request heads as one bytes object, with the framing of their body, and chunk framing."""

from __future__ import annotations

import httptools
import pytest

from gateway.http1.heads import LAST_CHUNK, chunk, request_head

HEADERS = [(b"Host", [b"backend:8081"]), (b"X-Odd", [b"  spaced ,value\t"]), (b"x-lower", [b"1", b"2"])]


def test_a_request_head_carries_its_headers_byte_for_byte_in_order() -> None:
    """Names keep their case, values their bytes, repeated names their order; the head ends with an empty line."""
    head = request_head(b"GET", b"/a%2Fb?x=1&y", HEADERS, length=None, has_body=False)
    assert head == (
        b"GET /a%2Fb?x=1&y HTTP/1.1\r\n"
        b"Host: backend:8081\r\nX-Odd:   spaced ,value\t\r\nx-lower: 1\r\nx-lower: 2\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("method", "length", "has_body", "framing"),
    [
        (b"GET", None, False, b""),
        (b"DELETE", None, False, b""),
        (b"POST", None, False, b"Content-Length: 0\r\n"),
        (b"PUT", None, False, b"Content-Length: 0\r\n"),
        (b"PATCH", None, False, b"Content-Length: 0\r\n"),
        (b"POST", 1234, True, b"Content-Length: 1234\r\n"),
        (b"PUT", None, True, b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_the_writer_frames_the_body(method: bytes, length: int | None, has_body: bool, framing: bytes) -> None:
    """A known length is a Content-Length, an unknown one chunked, no body nothing (but Content-Length: 0 where
    the method has a body to expect): the framing is the writer's, after the caller's headers."""
    head = request_head(method, b"/", [(b"Host", [b"h"])], length=length, has_body=has_body)
    assert head == method + b" / HTTP/1.1\r\nHost: h\r\n" + framing + b"\r\n"


def test_a_chunked_body_round_trips_through_llhttp() -> None:
    """What `chunk` and `LAST_CHUNK` write is read back by llhttp as the same body, then the end of the message."""
    seen: list[bytes] = []
    ended: list[bool] = []

    class Reader:
        def on_body(self, data: bytes) -> None:
            seen.append(data)

        def on_message_complete(self) -> None:
            ended.append(True)

    parser = httptools.HttpRequestParser(Reader())
    body = [b"a", b"x" * 4096, bytes(range(256))]
    head = request_head(b"POST", b"/", [(b"Host", [b"h"])], length=None, has_body=True)
    parser.feed_data(head + b"".join(b"".join(chunk(piece)) for piece in body) + LAST_CHUNK)
    assert b"".join(seen) == b"".join(body)
    assert ended == [True]
