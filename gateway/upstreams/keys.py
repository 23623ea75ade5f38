"""What a request hashes to for `balance = "hash"`: its consumer, its client's address, a header or a cookie.
Pure; a request without it has no key (and is spread by round robin)."""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie

from twisted.web.http_headers import Headers

from gateway.http1.fields import Fields

__all__ = ["request_key"]


def request_key(hash_on: str, *, consumer: str | None, client: str, headers: Fields | Headers) -> bytes | None:
    """The key of a request for `hash_on` ("consumer", "client_address", "header:NAME", "cookie:NAME")."""
    if hash_on == "client_address":
        return client.encode() if client else None
    if hash_on == "consumer":
        return consumer.encode() if consumer else None
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        values = headers.getRawHeaders(name.encode("ascii"))
        return b",".join(values) if values else None
    for value in headers.getRawHeaders(b"cookie") or ():
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(value.decode("latin-1"))
        except CookieError:
            continue
        if name in jar:
            return jar[name].value.encode("latin-1")
    return None
