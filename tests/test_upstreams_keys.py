"""`gateway.upstreams.keys.request_key`: what a request hashes to for `balance = "hash"` (pure)."""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from gateway.upstreams.keys import request_key


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


@pytest.mark.parametrize(
    ("hash_on", "consumer", "client", "pairs", "key"),
    [
        ("client_address", None, "10.1.2.3", (), b"10.1.2.3"),
        ("consumer", "alice", "10.1.2.3", (), b"alice"),
        ("consumer", None, "10.1.2.3", (), None),
        ("header:x-tenant", None, "", ((b"X-Tenant", b"acme"),), b"acme"),
        ("header:x-tenant", None, "", ((b"X-Tenant", b"a"), (b"X-Tenant", b"b")), b"a,b"),
        ("header:x-tenant", None, "", (), None),
        ("cookie:session", None, "", ((b"Cookie", b"theme=dark; session=s-42"),), b"s-42"),
        ("cookie:session", None, "", ((b"Cookie", b"theme=dark"), (b"Cookie", b"session=s-7")), b"s-7"),
        ("cookie:session", None, "", ((b"Cookie", b"theme=dark"),), None),
        ("cookie:session", None, "", ((b"Cookie", b'"broken'),), None),
    ],
)
def test_request_key(
    hash_on: str, consumer: str | None, client: str, pairs: tuple[tuple[bytes, bytes], ...], key: bytes | None
) -> None:
    assert request_key(hash_on, consumer=consumer, client=client, headers=headers(*pairs)) == key
