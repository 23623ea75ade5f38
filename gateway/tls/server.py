"""TLS termination: the OpenSSL contexts of a listener's certificate sets, chosen by SNI from memory, swapped whole
on a reload; and the verified client certificate of a connection.

Rules:
* Modern defaults, as Mozilla's "intermediate" profile: TLS 1.2 at least (1.3 preferred, its suites OpenSSL's
  own), ECDHE key exchange with AES-GCM or ChaCha20 only on 1.2 (no RSA key exchange, no CBC), the server's
  cipher order, session resumption (an ID cache and tickets), ALPN offering http/1.1 only (there is no HTTP/2).
* SNI is a dictionary lookup: exact name, then the wildcard of its parent. An unknown name gets the default set
  (the first), never a look at the disk (Twisted's `tls:` endpoint rescans its directory for each one).
* A reload builds every context anew and swaps them in one assignment: new handshakes use the new sets, and an
  open connection keeps the context it was made with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport, ISystemHandle
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

from gateway.tls.certificates import CertificateSet, describe_name

__all__ = [
    "ALPN",
    "MODERN_CIPHERS",
    "ClientCertificate",
    "ServerContexts",
    "ServerTLSCreator",
    "client_certificate",
    "handshake_failure",
    "tls_parameters",
]

MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""TLS 1.2 suites (Mozilla's intermediate list without DHE, which needs parameters of its own); TLS 1.3 suites
are OpenSSL's defaults, all of them AEAD."""
ALPN = (b"http/1.1",)
"""What ALPN offers: h2 joins when the gateway speaks HTTP/2."""
_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientPolicy:
    """Whether a listener asks for client certificates, and whom it trusts to have issued them."""

    mode: str = "none"
    """"none", "request" (verified when sent) or "require" (no handshake without one)."""
    ca: tuple[x509.Certificate, ...] = ()


class ServerContexts:
    """One OpenSSL context per certificate set of a listener, and the SNI lookup between them."""

    def __init__(
        self,
        certificates: Sequence[CertificateSet],
        *,
        min_version: str = "1.2",
        clients: ClientPolicy = ClientPolicy(),
    ) -> None:
        self.certificates = tuple(certificates)
        self._exact: dict[str, tuple[CertificateSet, SSL.Context]] = {}
        self._wildcard: dict[str, tuple[CertificateSet, SSL.Context]] = {}
        """Name (a wildcard's by its parent) -> the first set naming it, with its context."""
        options = [self._options(s, min_version, clients, default=i == 0) for i, s in enumerate(self.certificates)]
        self.default = options[0]
        for certificate_set, option in zip(self.certificates, options, strict=True):
            entry = (certificate_set, option.getContext())
            for name in certificate_set.names:
                table = self._wildcard if name.startswith("*.") else self._exact
                table.setdefault(name.removeprefix("*."), entry)

    def _options(
        self, certificate_set: CertificateSet, min_version: str, clients: ClientPolicy, *, default: bool
    ) -> CertificateOptions:
        verify: dict[str, Any] = {}
        if clients.mode != "none":
            verify = {
                "verify": True,
                "caCerts": [crypto.X509.from_cryptography(ca) for ca in clients.ca],
                "requireCertificate": clients.mode == "require",
            }
        return CertificateOptions(
            # cryptography's objects: pyOpenSSL deprecates being handed its own X509 and PKey (Twisted takes
            # either, but annotates only pyOpenSSL's).
            privateKey=certificate_set.key,  # type: ignore[arg-type]
            certificate=certificate_set.certificate,  # type: ignore[arg-type]
            extraCertChain=list(certificate_set.chain),  # type: ignore[arg-type]
            raiseMinimumTo=_VERSIONS[min_version],
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
            acceptableProtocols=list(ALPN),
            enableSessions=True,
            enableSessionTickets=True,
            contextForServerName=self.context_for if default else None,
            **verify,
        )

    def _lookup(self, server_name: str | None) -> tuple[CertificateSet, SSL.Context] | None:
        """The set (and context) named `server_name`: exactly, else by the wildcard of its parent."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        entry = self._exact.get(name)
        if entry is None:
            parent = name.partition(".")[2]
            if parent:
                entry = self._wildcard.get(parent)
        return entry

    def context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """The context of the set named `server_name`; None (the default set's) for no name or an unknown one."""
        entry = self._lookup(server_name.decode("ascii", "replace") if server_name else None)
        return entry[1] if entry is not None else None

    def certificate_for(self, server_name: str | None) -> CertificateSet:
        """The set a client sending `server_name` gets (for tests and tools: the same lookup as handshakes)."""
        entry = self._lookup(server_name)
        return entry[0] if entry is not None else self.certificates[0]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSCreator:
    """What a TLS listener's `TLSMemoryBIOFactory` makes connections with: always from the current contexts."""

    def __init__(self, contexts: ServerContexts) -> None:
        self.contexts = contexts

    def update(self, contexts: ServerContexts) -> None:
        """New handshakes use `contexts` from now on (a reload); open connections keep theirs."""
        self.contexts = contexts

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.contexts.default.serverConnectionForTLS(tlsProtocol)


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The verified certificate a client presented: what admission maps to a consumer."""

    subject: str
    """RFC 4514 text ("CN=billing,O=Example")."""
    names: frozenset[str]
    """Its subjectAltNames, each as "DNS:name", "URI:uri", "email:address" or "IP:address"."""
    common_names: frozenset[str]
    """The values of its subject's CN attributes (usually one), as written."""

    @classmethod
    def of(cls, certificate: x509.Certificate) -> ClientCertificate:
        """What admission sees of `certificate`."""
        subject = certificate.subject
        return cls(
            subject=describe_name(subject),
            names=_alt_names(certificate),
            common_names=frozenset(
                a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)
            ),
        )


def _alt_names(certificate: x509.Certificate) -> frozenset[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    names = {f"DNS:{n.lower()}" for n in san.get_values_for_type(x509.DNSName)}
    names |= {f"URI:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier)}
    names |= {f"email:{n.lower()}" for n in san.get_values_for_type(x509.RFC822Name)}
    # cryptography types the values as addresses or networks; a SAN holds addresses (networks are a name
    # constraint's), and ip_address() turns one down all the same.
    names |= {f"IP:{ip_address(n)}" for n in san.get_values_for_type(x509.IPAddress)}  # type: ignore[arg-type]
    return frozenset(names)


def tls_parameters(transport: Any) -> tuple[str | None, str | None]:
    """The protocol version and cipher a TLS connection's handshake agreed on, or (None, None) for plain TCP or a
    handshake not done."""
    if not ISSLTransport.providedBy(transport):
        return (None, None)
    handle = cast(ISystemHandle, transport)  # a TLS transport provides it too: its handle is the pyOpenSSL connection
    connection = cast(SSL.Connection, handle.getHandle())
    version = connection.get_protocol_version_name()
    return (version if version and version != "Unknown" else None, connection.get_cipher_name())


def client_certificate(transport: Any) -> ClientCertificate | None:
    """The client certificate the TLS handshake of `transport` verified, or None (plain TCP, or none sent).

    The listener's verify mode guarantees that a certificate present here chains to its client CA bundle:
    one that does not fails the handshake."""
    if not ISSLTransport.providedBy(transport):
        return None
    peer = cast(crypto.X509 | None, transport.getPeerCertificate())  # pyOpenSSL's, as a TLS transport gives it
    if peer is None:
        return None
    return ClientCertificate.of(peer.to_cryptography())


_HANDSHAKE_FAILURES = (
    ("plain_http", ("http request", "https proxy request")),
    ("protocol_version", ("unsupported protocol", "wrong version number", "version too low", "unknown protocol")),
    ("no_shared_cipher", ("no shared cipher", "no suitable signature algorithm", "no shared group")),
    ("client_certificate", ("peer did not return a certificate", "certificate verify failed")),
    ("certificate_refused", ("alert unknown ca", "alert bad certificate", "alert certificate")),
)
"""OpenSSL's reason strings, by the bounded class a metric label may carry. certificate_refused: the client
sent an alert refusing the listener's certificate (it does not trust it, or it expired)."""


def handshake_failure(error: SSL.Error) -> str:
    """The class of a failed server handshake, from the reasons OpenSSL gave (never the details: they are the
    client's to send and would make a label without bound); "other" for the rest."""
    reasons = str(error).lower()  # pyOpenSSL's list of (library, function, reason) from OpenSSL's error queue
    for name, phrases in _HANDSHAKE_FAILURES:
        if any(phrase in reasons for phrase in phrases):
            return name
    return "other"
