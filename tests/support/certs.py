"""Certificates made at test time with trustme, written as PEM files the way an operator keeps them, and TLS
client options for the test clients."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.ssl import Certificate, optionsForClientTLS


@dataclass(frozen=True)
class Issued:
    """One certificate set on disk: the certificate (followed by the intermediates, when an intermediate CA
    issued it), its key, and its chain (the root of the issuing CA)."""

    certificate: Path
    key: Path
    chain: Path
    leaf: trustme.LeafCert

    def table(self, *, chain: bool = True) -> dict[str, str]:
        """The `[[listeners.tls.certificates]]` entry for it; without `chain`, the certificate file alone (the
        leaf and its intermediates, as nginx and HAProxy take it)."""
        entry = {"certificate": str(self.certificate), "key": str(self.key)}
        return {**entry, "chain": str(self.chain)} if chain else entry

    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.leaf.cert_chain_pems[0].bytes()).serial_number


def issue(
    ca: trustme.CA,
    directory: Path,
    *names: str,
    stem: str = "server",
    common_name: str | None = None,
    not_after: datetime | None = None,
    not_before: datetime | None = None,
) -> Issued:
    """A certificate for `names` issued by `ca`, written to DIRECTORY/STEM.{pem,key,chain.pem}."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*names, common_name=common_name, not_after=not_after, not_before=not_before)
    certificate, key, chain = (directory / f"{stem}.pem", directory / f"{stem}.key", directory / f"{stem}.chain.pem")
    certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    chain.write_bytes(root_of(ca).cert_pem.bytes())
    return Issued(certificate, key, chain, leaf)


def root_of(ca: trustme.CA) -> trustme.CA:
    """The root CA above `ca` (an intermediate made by `create_child_ca`), or `ca` itself."""
    while ca.parent_cert is not None:
        ca = ca.parent_cert
    return ca


def expired(ca: trustme.CA, directory: Path, *names: str, stem: str = "expired") -> Issued:
    now = datetime.now(UTC)
    return issue(
        ca, directory, *names, stem=stem, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )


def write_ca(ca: trustme.CA, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ca.cert_pem.bytes())
    return path


def client_options(ca: trustme.CA, server_name: str, client: trustme.LeafCert | None = None) -> Any:
    """What a test client connects with: trusting `ca`, sending `server_name` (and checking it), and showing
    `client` when given."""
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    extra = {}
    if client is not None:
        extra = {
            "privateKey": serialization.load_pem_private_key(client.private_key_pem.bytes(), None),
            "certificate": x509.load_pem_x509_certificate(client.cert_chain_pems[0].bytes()),
        }
    return optionsForClientTLS(server_name, trust, extraCertificateOptions=extra)
