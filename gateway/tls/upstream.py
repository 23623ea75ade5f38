"""TLS towards https upstreams: how each connection is verified, and what a failed handshake is called.

Rules:
* Verified by default: against the system's roots (certifi's where the system has none) or a configured CA
  bundle, and the certificate must name the upstream (service_identity, through `optionsForClientTLS`); the
  name is sent in SNI. No ALPN is offered (HTTP/1.1 is all the gateway speaks upstream, as nginx's proxy
  does): a Twisted server with an ALPN factory but no protocols of its own aborts such handshakes.
  `verify = false` is honoured only when written, and warned about at every start.
* A failed handshake is answered 502 with its class ("untrusted certificate", "name mismatch", "handshake
  failed") in the problem detail: enough to tell the operator where to look, never the certificate itself.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Upstream
from gateway.config.tls import UpstreamTLS
from gateway.tls.certificates import system_roots

__all__ = ["client_creator", "tls_failure"]


def _system_trust() -> Any:
    """The system's roots when OpenSSL finds a bundle there, else certifi's (via `system_roots`)."""
    paths = ssl.get_default_verify_paths()
    if any(p and Path(p).is_file() for p in (paths.cafile, paths.openssl_cafile)):
        return platformTrust()
    roots = system_roots()
    if not roots:
        raise RuntimeError("no trusted roots: this system has no CA bundle and certifi is not installed")
    return trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in roots])


def _client_certificate(tls: UpstreamTLS) -> dict[str, Any]:
    """CertificateOptions arguments for the client certificate shown to the upstream, if any (cryptography's
    objects: pyOpenSSL deprecates being handed its own)."""
    if tls.client is None:
        return {}
    return {
        "privateKey": tls.client.key,
        "certificate": tls.client.certificate,
        "extraCertChain": list(tls.client.chain),
    }


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """`verify = false`: the upstream's certificate is not checked at all; SNI is still sent."""

    def __init__(self, hostname: str, options: CertificateOptions) -> None:
        self._name = None if isIPAddress(hostname) or isIPv6Address(hostname) else hostname.encode("idna")
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._name is not None:
            connection.set_tlsext_host_name(self._name)
        return connection


def client_creator(upstream: Upstream) -> IOpenSSLClientConnectionCreator:
    """What each TLS connection to `upstream` is made with."""
    tls = upstream.tls or UpstreamTLS()
    hostname = tls.server_name or upstream.host
    client = _client_certificate(tls)
    if not tls.verify:
        return _Unverified(hostname, CertificateOptions(**client))
    trust = (
        trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in tls.ca])
        if tls.ca
        else _system_trust()
    )
    return optionsForClientTLS(hostname, trust, extraCertificateOptions=client)


def _reasons(failure: Failure) -> list[Failure]:
    found = [failure]
    for reason in getattr(failure.value, "reasons", ()) or ():
        if isinstance(reason, Failure):
            found.extend(_reasons(reason))
    return found


def tls_failure(failure: Failure) -> str | None:
    """The class of a TLS failure behind an upstream request's failure, or None if it was not one."""
    for reason in _reasons(failure):
        if reason.check(VerificationError):
            return "name mismatch"
        if reason.check(SSL.Error):
            text = str(reason.value).lower()
            if "certificate verify failed" in text:
                return "untrusted certificate"
            return "handshake failed"
    return None
