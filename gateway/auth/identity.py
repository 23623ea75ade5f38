"""What authentication yields and what every method provides: an `Identity`, an `AuthFailure`, and the
`Authenticator` interface each method implements.

Rule: a method looks only at the request head and its own state; it says whether the request carries its kind
of credential (`credential`), and if so who it proves (`verify`, at once or later through a Deferred) or why
not (`AuthFailure`, answered 401 and counted against the client address and against what the credential claims
to be, `claimant`; or a `Denied` such as 503 when it could not decide, which is not the client's fault). A
credential never leaves the method: not in an identity, a failure's detail, a log line or an upstream header;
`claimant` hands out a part of it that proves nothing (a user name, a key's first characters, a signature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred

from gateway.http1.fields import HeaderLookup

__all__ = ["AuthFailure", "AuthRequest", "Authenticator", "Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request comes from, as proved by one method."""

    consumer: str | None
    """The consumer's name (or a token's subject); None for an anonymous request."""
    scopes: frozenset[str]
    method: str
    """The name of the method that proved it ("anonymous" for none)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Headers to set upstream besides the consumer, scopes and method (chosen claims, forward-auth copies)."""
    credential_headers: tuple[bytes, ...] = ()
    """Lower-cased names of the request headers that held the credential: removed before forwarding unless
    the route forwards credentials."""
    declared: bool = False
    """Whether `consumer` is a `[consumers.NAME]` of the config (proved by its API key or password), so that its
    own limits apply. A JWT subject or an auth service's consumer is not: "alice" from a token is not the
    declared alice, and is counted apart, under its method."""


ANONYMOUS_IDENTITY = Identity(consumer=None, scopes=frozenset(), method="anonymous")


class AuthFailure(Exception):
    """A credential that does not prove an identity (wrong, expired, malformed...): answered 401.

    `reason` is a short code for logs and metrics ("invalid_key", "token_expired"); `detail` is safe to show the
    client and never contains the credential; `bearer_error` is the RFC 6750 error code ("invalid_token",
    "invalid_request") when the credential was a bearer token."""

    def __init__(
        self, reason: str, detail: str, *, bearer_error: str | None = None, consumer: str | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.bearer_error = bearer_error
        self.consumer = consumer
        """Who the credential claimed to be, for the log (never shown to the client)."""


class AuthRequest(NamedTuple):
    """What a method may know of the request it authenticates: its head and the client's address. (A named tuple:
    one is made for every request to a protected route, and a frozen dataclass costs a microsecond to make.)"""

    method: bytes
    target: bytes
    """As the client sent it (origin-form)."""
    headers: HeaderLookup
    client_address: str
    request_id: str
    client_certificate: Any = None
    """The `gateway.tls.server.ClientCertificate` the connection's TLS handshake verified, if any."""
    secure: bool = False
    """Whether the request came over TLS (an auth service is told so, as an upstream is)."""


class Authenticator(Protocol):
    """One configured authentication method, ready to check requests."""

    name: str
    guessable: bool
    """Whether its credentials can be guessed (passwords, not 256-bit keys or signatures): while one is being
    checked, it counts against the failed-auth budgets it would count against if it failed (optional; False
    when absent)."""

    def verifies_cheaply(self, credential: object) -> bool:
        """Whether `verify(credential)` would answer at once, at next to no cost (no thread, no signature, no
        call): a digest looked up, a certificate the handshake checked, a password or token this method verified
        and still remembers. With a shared limit store, such a credential's failed-auth budgets are asked in the
        same round trip as its consumer's slot and rate, after the check, instead of one round trip before it
        (that check is what a budget spares). A guessable method says so only of a credential it verified right:
        no guess (optional; False when absent)."""

    def claimant(self, credential: object) -> bytes | None:
        """Who `credential` claims to be, for counting its failures apart from other clients' behind the same
        address (a NAT): a Basic user name, an API key's first characters, a token's signature; None to count them
        under the method (optional; as None when absent). The gatekeeper keeps only a keyed digest of it."""

    def credential(self, headers: HeaderLookup) -> object | None:
        """This method's credential in the request headers, or None when the request carries none of its kind.

        A credential that is present but malformed is returned all the same (for `verify` to refuse): the
        request chose this method."""

    def verify(self, credential: object, request: AuthRequest) -> Identity | Deferred[Identity]:
        """The identity `credential` proves; raises (or errbacks with) `AuthFailure`, or a `gateway.errors.Denied`
        when the method cannot decide. A Deferred returned here may be cancelled (the client left)."""

    def challenge(self, failure: AuthFailure | None) -> bytes | None:
        """The WWW-Authenticate value inviting this method's credential (with the failure's details, if any),
        or None when the method has no challenge of its own."""

    def upstream_headers(self) -> frozenset[bytes]:
        """Lower-cased names of every header this method may set upstream: a client's copies are removed from
        every request."""

    def close(self) -> Deferred[None] | None:
        """Release what the method holds (threads, connections, timers); called when the gateway stops."""
