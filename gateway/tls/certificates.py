"""Certificates read from PEM files and checked before anything uses them: a server's certificate, key and chain,
and CA bundles (for client certificates and for upstreams).

Rules:
* Refused, with the file and the reason, is only a set that cannot work: a file that cannot be read or parsed, a
  key that does not match the certificate, a chain out of order (each certificate must be issued by the next),
  a certificate that names no DNS name.
* Whether the chain verifies (every certificate valid now, the last one a trust anchor or issued by one: the
  system's roots, or a CA file the config names) is recorded on the set, in words, and served all the same: a
  company CA the system does not know, a missing intermediate or an expired certificate is a warning and a
  gauge, as nginx would start with it, unless the config asks for the refusal (`strict_certificates`).
* Pure (files and the clock only), so `--check` and a reload refuse a bad set before anything changes; nothing
  here touches the reactor.
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
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

_log = Logger(namespace="gateway.certificates")  # not the module's name: log lines keep the namespace they had

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
    chain_problem: str = ""
    """Why the chain does not verify, in words (what is missing or expired, and what to do), when loaded; empty
    when it verifies."""
    strict_problem: str = ""
    """What of `chain_problem` `strict_certificates` refuses: all of it, but for a chain that ends (valid) at a
    root of its own that nothing here trusts, which was accepted before the leniency and still is."""

    @property
    def chain_verified(self) -> bool:
        """The chain is whole, every certificate valid and the last a trust anchor or issued by one (when
        loaded)."""
        return not self.chain_problem

    @property
    def subject(self) -> str:
        return _subject(self.certificate)

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
    """One line per loaded certificate: what it is for, its names and its expiry; a warning when the expiry is
    close or the chain does not verify (saying what is missing)."""
    days = (certificate_set.not_after.timestamp() - clock.seconds()) / 86400
    fields = {
        "owner": owner,
        "names": ", ".join(certificate_set.names),
        "file": certificate_set.certificate_path,
        "subject": certificate_set.subject,
        "expiry": f"{certificate_set.not_after:%Y-%m-%dT%H:%M:%SZ}",
        "days": days,
    }
    if certificate_set.chain_problem:
        _log.warn(
            "TLS certificate for {owner}: {names} from {file} ({subject}), expires {expiry} ({days:.0f} days); "
            "its chain does not verify, used as given: {problem}",
            problem=certificate_set.chain_problem,
            **fields,
        )
        return
    (_log.warn if days < EXPIRY_WARNING_DAYS else _log.info)(
        "TLS certificate for {owner}: {names} from {file}, expires {expiry} ({days:.0f} days)", **fields
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
    # The loader's type also covers DH and X25519/X448 keys, which sign no certificate.
    return key  # type: ignore[return-value]


def _subject(certificate: x509.Certificate) -> str:
    return describe_name(certificate.subject) or "an empty subject"


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


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


def _validity_problem(certificate: x509.Certificate, now: datetime, what: str) -> str:
    """Why `certificate` is not valid at `now` ("" when it is)."""
    if now < certificate.not_valid_before_utc:
        return f"{what} ({_subject(certificate)}) is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}"
    if now > certificate.not_valid_after_utc:
        return f"{what} ({_subject(certificate)}) expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return ""


def _check_order(path: Path, certificates: Sequence[x509.Certificate]) -> None:
    """Each certificate is issued by the next (else no client could build the chain from what is sent)."""
    for position, (subject, issuer) in enumerate(pairwise(certificates), start=1):
        if not _issued_by(subject, issuer):
            raise CertificateError(
                path,
                f"the chain is out of order or broken: certificate {position} ({_subject(subject)}) is not issued "
                f"by certificate {position + 1} ({_subject(issuer)}); list the certificate first, then each "
                "issuer in turn",
            )


def _anchored(certificate: x509.Certificate, anchors: Sequence[x509.Certificate]) -> bool:
    """Whether `certificate` is a trust anchor or is issued by one."""
    return certificate in anchors or any(
        anchor.subject == certificate.issuer and _issued_by(certificate, anchor) for anchor in anchors
    )


def _trust_problem(certificates: Sequence[x509.Certificate], trusted_key: str) -> str:
    """Why a chain (in order) that reaches no trust anchor does not verify, in words, with what to do."""
    last = certificates[-1]
    if last.issuer == last.subject and _issued_by(last, last):
        untrusted = f"neither a system root nor in {trusted_key}" if trusted_key else "not a system root"
        if len(certificates) == 1:
            return f"the certificate ({_subject(last)}) is self-signed, and {untrusted}"
        advice = f"; for a company CA, set {trusted_key} to this root" if trusted_key else ""
        return f"the chain ends at the root {_subject(last)}, which is {untrusted}{advice}"
    trusted = f"a system root or in {trusted_key}" if trusted_key else "a system root"
    advice = f", and for a company CA set {trusted_key} to its root" if trusted_key else ""
    return (
        f"the chain is incomplete: {_subject(last)} is issued by {describe_name(last.issuer)}, which is neither in "
        f"the chain nor trusted ({trusted}); add the intermediate certificates (a fullchain.pem, or chain){advice}"
    )


def _chain_problems(
    certificates: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], now: datetime, trusted_key: str
) -> tuple[str, str]:
    """Why the chain (in order) does not verify now, every reason in turn ("" when it verifies), and the part of
    it `strict_certificates` refuses: all of it but a chain that ends, valid, at a root of its own that no anchor
    trusts (what was accepted before the leniency came; such a root is a company's, known to its clients).

    The chain is taken as a client builds it: up to the first certificate that is a trust anchor or is issued by
    one, so what the file sends past that (a cross-signed root, expired or not) does not count."""
    used = next(
        (position for position, certificate in enumerate(certificates, start=1) if _anchored(certificate, anchors)),
        None,
    )
    validity = [
        _validity_problem(certificate, now, "the certificate" if position == 1 else f"chain certificate {position}")
        for position, certificate in enumerate(certificates[:used], start=1)
    ]
    validity = [problem for problem in validity if problem]
    trust = _trust_problem(certificates, trusted_key) if used is None else ""
    last = certificates[-1]
    own_root = last.issuer == last.subject and _issued_by(last, last)
    strict = [*validity, *([trust] if trust and not own_root else [])]
    return "; ".join([*validity, *([trust] if trust else [])]), "; ".join(strict)


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names))


def load_certificate_set(
    certificate_path: Path | str,
    key_path: Path | str,
    chain_path: Path | str | None = None,
    *,
    trusted: Sequence[x509.Certificate] = (),
    trusted_key: str = "",
    now: datetime | None = None,
) -> CertificateSet:
    """Read and check one certificate set; `certificate_path` may hold the chain after the certificate itself
    (a fullchain.pem), and `chain_path` more of it.

    Raises `CertificateError` for what cannot work; whether the chain verifies, against the system's roots and
    `trusted` (the CA file of the config key `trusted_key`, named in the problem), is `chain_problem`."""
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
    _check_order(chain_file if chain_file is not None and len(certificates) > 1 else cert_file, certificates)
    chain_problem, strict_problem = _chain_problems(certificates, (*system_roots(), *trusted), now, trusted_key)
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
        chain_problem=chain_problem,
        strict_problem=strict_problem,
    )


def load_ca_bundle(path: Path | str, *, now: datetime | None = None) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a bundle (client certificates or upstreams are verified against them); expired
    ones are refused, since they would verify nothing."""
    now = now or datetime.now(UTC)
    bundle = Path(path)
    certificates = _certificates(bundle, what="one or more CA certificates")
    for position, certificate in enumerate(certificates, start=1):
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = certificate.issuer == certificate.subject
        if not is_ca:
            raise CertificateError(
                bundle, f"certificate {position} ({_subject(certificate)}) is not a CA certificate (basicConstraints)"
            )
        problem = _validity_problem(certificate, now, f"CA certificate {position}")
        if problem:
            raise CertificateError(bundle, problem)
    return tuple(certificates)
