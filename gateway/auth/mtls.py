"""Client certificates as credentials: the `mtls` method maps the certificate a TLS handshake verified to a
declared consumer.

Rules:
* The certificate was verified by OpenSSL against the listener's client CA bundle before any byte of the request
  was read (one that does not verify fails the handshake), so this method only maps it, by (field, value) pairs:
  a consumer's "cn:billing" matches a CN of the subject and nothing else, "dns:billing" a DNS subjectAltName and
  nothing else (a CA that puts what it likes in one field cannot claim another's).
* One certificate, one consumer, whichever fields several consumers claim: the subject DN decides first, then
  the subject's CN (the smallest, if several), then the subjectAltNames in the order DNS, IP, URI, email (each by
  its smallest value). The config refuses two consumers claiming the same (field, value).
* A verified certificate no consumer claims is refused 403: it proves who the client is, and that client is not
  allowed. Nothing of the certificate but its subject goes upstream, and only in the configured header.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from twisted.internet.defer import Deferred

from gateway.auth.identity import AuthRequest, Identity
from gateway.auth.settings.model import CertificateIdentity, Consumer, MtlsMethod
from gateway.errors import Forbidden
from gateway.http1.fields import HeaderLookup
from gateway.tls.server import ClientCertificate

__all__ = ["MtlsAuthenticator"]


class MtlsAuthenticator:
    """Admits a request whose connection presented a client certificate that a consumer claims."""

    from_connection = True
    """Its credential is the connection's certificate, not a header (`Gatekeeper` hands it over)."""
    guessable = False

    def claimant(self, credential: object) -> None:
        """None: failures are counted under the method."""
        return None

    def verifies_cheaply(self, credential: object) -> bool:
        """True: the handshake checked the certificate; this method only maps it to a consumer."""
        return True

    def __init__(self, method: MtlsMethod, consumers: Mapping[str, Consumer]) -> None:
        self.name = method.name
        self._header = method.identity_header
        self._by_identity: dict[CertificateIdentity, Consumer] = {
            identity: consumer for consumer in consumers.values() for identity in consumer.client_certificates
        }
        """(field, value) -> the consumer claiming it (the config lets only one claim each)."""
        self._identities: dict[tuple[str, str], Identity] = {}
        """(consumer, subject) -> its identity, made once (what depends on it is then made once too)."""

    def credential(self, headers: HeaderLookup) -> None:
        return None  # never in the headers: see `from_connection`

    def verify(self, credential: object, request: AuthRequest) -> Identity:
        assert isinstance(credential, ClientCertificate)
        by_identity = self._by_identity
        consumer = next((by_identity[i] for i in _identities(credential) if i in by_identity), None)
        if consumer is None:
            raise Forbidden(
                "the client certificate is valid but no consumer is allowed to use it",
                reason="unknown_client_certificate",
            )
        identity = self._identities.get((consumer.name, credential.subject))
        if identity is None:
            headers = ((self._header, credential.subject.encode("utf-8")),) if self._header else ()
            identity = self._identities[consumer.name, credential.subject] = Identity(
                consumer=consumer.name,
                scopes=consumer.scopes,
                method=self.name,
                headers=headers,
                declared=True,
            )
        return identity

    def challenge(self, failure: object) -> None:
        return None  # a certificate is asked for in the handshake, not by a WWW-Authenticate challenge

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset({self._header.lower()}) if self._header else frozenset()

    def close(self) -> Deferred[None] | None:
        return None


def _identities(certificate: ClientCertificate) -> Iterator[CertificateIdentity]:
    """What `certificate` may be claimed by, as (field, value) normalised as the settings normalise a consumer's
    (`CERTIFICATE_FIELDS`), in the order that decides between consumers."""
    yield "dn", certificate.subject
    for name in sorted(certificate.common_names):
        yield "cn", name
    for name in sorted(certificate.names):  # "DNS:", "IP:", "URI:", "email:" (as `gateway.tls.server` writes them)
        kind, _, value = name.partition(":")
        yield kind.lower(), value
