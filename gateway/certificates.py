"""Certificates read from PEM files and checked before anything uses them: a server's certificate, key and chain,
and CA bundles (for client certificates and for upstreams).

Rule: a set is whole or refused, with the file and the reason: the key must match the certificate, every
certificate of the chain must be issued by the next one, the last must be a root (self-signed) or be issued by a
root this system trusts, and the certificate must be valid now. Pure (files and the clock only), so `--check` and a
reload refuse a bad set before anything changes; nothing here touches the reactor.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID, NameOID
from twisted.logger import Logger

_log = Logger()

EXPIRY_WARNING_DAYS = 14
"""A certificate expiring within this many days is logged as a warning (at start-up and on each reload)."""

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertificateError",
    "CertificateSet",
    "describe_name",
    "load_ca_bundle",
    "load_certificate_set",
    "log_certificate",
    "system_roots",
]


class CertificateError(ValueError):
    """A PEM file that cannot be used, with the file's path in the message."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True, eq=False, kw_only=True)
class CertificateSet:
    """A certificate with its private key and chain, checked; `names` are what SNI selects it by."""

    certificate_path: str
    key_path: str
    chain_path: str
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    """The intermediates (and, for a private CA, its root) sent after the certificate, in order."""
    names: tuple[str, ...]
    """Lower-cased DNS names of the certificate (its subjectAltName; the common name only when it has none),
    wildcards ("*.example.com") included."""

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def same_files(self, other: CertificateSet) -> bool:
        return (self.certificate_path, self.key_path, self.chain_path) == (
            other.certificate_path,
            other.key_path,
            other.chain_path,
        )


def log_certificate(owner: str, certificate_set: CertificateSet, clock: Any) -> None:
    """One line per loaded certificate: what it is for, its names and its expiry (a warning when close)."""
    days = (certificate_set.not_after.timestamp() - clock.seconds()) / 86400
    (_log.warn if days < EXPIRY_WARNING_DAYS else _log.info)(
        "TLS certificate for {owner}: {names} from {file}, expires {expiry} ({days:.0f} days)",
        owner=owner,
        names=", ".join(certificate_set.names),
        file=certificate_set.certificate_path,
        expiry=f"{certificate_set.not_after:%Y-%m-%dT%H:%M:%SZ}",
        days=days,
    )


def describe_name(name: x509.Name) -> str:
    """A distinguished name as RFC 4514 text ("CN=api.example.com,O=Example")."""
    return name.rfc4514_string()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertificateError(path, f"cannot read the file: {e.strerror or e}") from None


def _certificates(path: Path, *, what: str) -> list[x509.Certificate]:
    data = _read(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(path, f"holds no PEM certificate (expected {what})")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(path, f"is not a valid PEM certificate file ({e})") from None


def _private_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    data = _read(path)
    if b"PRIVATE KEY-----" not in data:
        raise CertificateError(path, "holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            path, "the private key is encrypted; give it unencrypted, in a file only the gateway can read"
        ) from None
    except ValueError as e:
        raise CertificateError(path, f"is not a valid PEM private key ({e})") from None
    return key  # type: ignore[return-value]


def _subject(certificate: x509.Certificate) -> str:
    return describe_name(certificate.subject) or "an empty subject"


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(subject: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        subject.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@lru_cache(maxsize=1)
def system_roots() -> tuple[x509.Certificate, ...]:
    """The root certificates this system trusts (its OpenSSL default bundle, or certifi's when it has none)."""
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile]
    try:
        import certifi

        candidates.append(certifi.where())
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            try:
                with warnings.catch_warnings():
                    # Some old roots of the system's bundle have serial numbers RFC 5280 no longer allows.
                    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                    return tuple(x509.load_pem_x509_certificates(Path(candidate).read_bytes()))
            except (OSError, ValueError):
                continue
    return ()


def _check_validity(path: Path, certificate: x509.Certificate, now: datetime, what: str) -> None:
    if now < certificate.not_valid_before_utc:
        raise CertificateError(
            path, f"{what} ({_subject(certificate)}) is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}"
        )
    if now > certificate.not_valid_after_utc:
        raise CertificateError(
            path, f"{what} ({_subject(certificate)}) expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )


def _check_chain(path: Path, certificates: Sequence[x509.Certificate], now: datetime) -> None:
    """Each certificate is issued by the next; the last is a root or issued by a root this system trusts."""
    for position, (subject, issuer) in enumerate(pairwise(certificates), start=1):
        if not _issued_by(subject, issuer):
            raise CertificateError(
                path,
                f"the chain is out of order or broken: certificate {position} ({_subject(subject)}) is not issued "
                f"by certificate {position + 1} ({_subject(issuer)}); list the certificate first, then each "
                "issuer in turn",
            )
        if position > 1:
            _check_validity(path, subject, now, f"chain certificate {position}")
    last = certificates[-1]
    if len(certificates) > 1:
        _check_validity(path, last, now, f"chain certificate {len(certificates)}")
    if last.issuer == last.subject and _issued_by(last, last):
        return  # a root ends the chain (a private CA's, most often)
    if any(root.subject == last.issuer and _issued_by(last, root) for root in system_roots()):
        return
    raise CertificateError(
        path,
        f"the chain is incomplete: {_subject(last)} is issued by {describe_name(last.issuer)}, which is neither in "
        "the chain nor a root this system trusts; add the intermediate certificates (a fullchain.pem), or for a "
        "private CA its root certificate, as the chain",
    )


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names))


def load_certificate_set(
    certificate_path: Path | str,
    key_path: Path | str,
    chain_path: Path | str | None = None,
    *,
    now: datetime | None = None,
) -> CertificateSet:
    """Read and check one certificate set; `certificate_path` may hold the chain after the certificate itself
    (a fullchain.pem), and `chain_path` more of it."""
    now = now or datetime.now(UTC)
    cert_file, key_file = Path(certificate_path), Path(key_path)
    certificates = _certificates(cert_file, what="the server certificate first, then its chain")
    chain_file = Path(chain_path) if chain_path else None
    if chain_file is not None:
        certificates += _certificates(chain_file, what="the intermediate certificates")
    key = _private_key(key_file)
    leaf = certificates[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertificateError(
            key_file, f"the private key does not match the certificate in {cert_file} ({_subject(leaf)})"
        )
    _check_validity(cert_file, leaf, now, "the certificate")
    _check_chain(chain_file if chain_file is not None and len(certificates) > 1 else cert_file, certificates, now)
    names = _dns_names(leaf)
    if not names:
        raise CertificateError(cert_file, f"the certificate ({_subject(leaf)}) names no DNS name to be chosen by")
    return CertificateSet(
        certificate_path=str(cert_file),
        key_path=str(key_file),
        chain_path=str(chain_file) if chain_file is not None else "",
        certificate=leaf,
        key=key,
        chain=tuple(certificates[1:]),
        names=names,
    )


def load_ca_bundle(path: Path | str, *, now: datetime | None = None) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a bundle (client certificates or upstreams are verified against them); expired
    ones are refused, since they would verify nothing."""
    now = now or datetime.now(UTC)
    bundle = Path(path)
    certificates = _certificates(bundle, what="one or more CA certificates")
    for position, certificate in enumerate(certificates, start=1):
        try:
            constraints = certificate.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = certificate.issuer == certificate.subject
        if not is_ca:
            raise CertificateError(
                bundle, f"certificate {position} ({_subject(certificate)}) is not a CA certificate (basicConstraints)"
            )
        _check_validity(bundle, certificate, now, f"CA certificate {position}")
    return tuple(certificates)
