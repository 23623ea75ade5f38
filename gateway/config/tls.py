"""The TLS tables of the config file: a listener's `[listeners.tls]` and an upstream's `[upstreams.NAME.tls]`.

Rule: certificate files are read and checked here (`gateway.tls.certificates`), so `--check` and a reload refuse a
missing file, a key that does not match or a chain out of order, naming the file and the key path, before
anything changes. A chain that does not verify (incomplete, untrusted, expired) is loaded with its problem, to be
warned about and exported, unless a listener sets `strict_certificates`. Paths are relative to the config file's
directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cryptography import x509

from gateway.config.values import Invalid, Table, boolean, nonempty_string
from gateway.tls.certificates import CertificateError, CertificateSet, load_ca_bundle, load_certificate_set

__all__ = ["ListenerTLS", "UpstreamTLS", "hsts_value", "listener_tls", "upstream_tls"]

CLIENT_MODES = ("none", "request", "require")


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerTLS:
    """HTTPS on a listener: its certificate sets (the first is the default), its minimum version, and whether
    it asks clients for certificates."""

    certificates: tuple[CertificateSet, ...]
    min_version: str = "1.2"
    client_certificates: str = "none"
    """"none"; "request" (verified against `client_ca` when sent, for routes whose admission accepts them);
    "require" (a handshake without a valid one fails)."""
    client_ca_path: str = ""
    client_ca: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    trusted_ca_path: str = ""
    """CA certificates (a company CA) the certificates' chains are checked against, besides the system's roots."""
    strict_certificates: bool = False
    """A set whose chain does not verify is refused (else it serves, with a warning and a gauge at 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTLS:
    """How the gateway verifies an https upstream, and the certificate it shows it (if any).

    Equal when the settings and the files' bytes are: a reload keeps the pool (and its warm connections) of an
    upstream whose TLS files did not change."""

    verify: bool = True
    """False only when written in the config, with a warning at every start."""
    ca_path: str = ""
    """A CA bundle to trust instead of the system's roots."""
    server_name: str = ""
    """The name sent in SNI and checked against the certificate; the URL's host when empty."""
    client: CertificateSet | None = field(default=None, compare=False, repr=False)
    """A client certificate shown to the upstream (mTLS towards it)."""
    ca: tuple[x509.Certificate, ...] = field(default=(), compare=False, repr=False)
    files_digest: str = ""
    """The SHA-256 of the files read, so that equality follows their content."""


def _path(t: Table, key: str) -> Path:
    text = t.get(key, nonempty_string)
    return Path(t.source).parent / text


def _set_files(t: Table) -> tuple[Path, Path, Path | None] | None:
    """The certificate, key and (optional) chain files a table names; None when one of them is missing or not a
    file name (reported)."""
    certificate = t.require("certificate", nonempty_string)
    key = t.require("key", nonempty_string)
    chain = t.require("chain", nonempty_string) if t.has("chain") else ""
    if certificate is None or key is None or chain is None:
        return None
    folder = Path(t.source).parent
    return folder / certificate, folder / key, (folder / chain if chain else None)


def _certificate_set(t: Table, trusted: tuple[x509.Certificate, ...], *, strict: bool) -> CertificateSet:
    t.known(("certificate", "key", "chain"))
    files = _set_files(t)
    t.finish()
    if files is None:
        raise Invalid()
    try:
        certificate_set = load_certificate_set(*files, trusted=trusted, trusted_key="trusted_ca")
    except CertificateError as e:
        raise t.error("", str(e)) from None
    if strict and certificate_set.strict_problem:
        raise t.error(
            "",
            f"{certificate_set.certificate_path}: {certificate_set.strict_problem} "
            "(strict_certificates = true refuses an expired certificate or an incomplete chain)",
        )
    return certificate_set


def _min_version(value: object) -> str:
    if value not in ("1.2", "1.3"):
        raise ValueError(f'must be "1.2" or "1.3" (older versions are never accepted), got {value!r}')
    return str(value)


def _client_mode(value: object) -> str:
    if value not in CLIENT_MODES:
        raise ValueError(f'must be "none", "request" or "require", got {value!r}')
    return str(value)


_LISTENER_TLS_KEYS = (
    "certificates",
    "min_version",
    "client_certificates",
    "client_ca",
    "trusted_ca",
    "strict_certificates",
)


def listener_tls(t: Table) -> ListenerTLS:
    """A listener's `tls` table; what cannot be read is reported (and left out), never raised."""
    t.known(_LISTENER_TLS_KEYS)
    strict = t.get("strict_certificates", boolean, False)
    trusted_path, trusted = _ca_bundle(t, "trusted_ca") if t.has("trusted_ca") else ("", ())
    # With its trusted CA refused, whether a chain is complete is not known: strict is not checked then.
    strict = strict and t.valid("trusted_ca")
    entries = t.tables("certificates", required=True)
    if not entries and t.valid("certificates"):
        t.report("certificates", "at least one certificate set is needed")
    sets = [entry.attempt(partial(_certificate_set, trusted=trusted, strict=strict)) for entry in entries]
    mode = t.get("client_certificates", _client_mode, "none")
    ca_path, ca = _ca_bundle(t, "client_ca") if t.has("client_ca") else ("", ())
    if mode != "none" and not ca and t.valid("client_ca"):
        t.report("client_ca", f'is required with client_certificates = "{mode}" (the CA bundle they chain to)')
    if mode == "none" and ca and t.valid("client_certificates"):
        t.report("client_certificates", 'must be "request" or "require" when client_ca is given')
    tls = ListenerTLS(
        certificates=tuple(s for s in sets if s is not None),
        min_version=t.get("min_version", _min_version, "1.2"),
        client_certificates=mode,
        client_ca_path=ca_path,
        client_ca=ca,
        trusted_ca_path=trusted_path,
        strict_certificates=strict,
    )
    t.finish()
    return tls


def _ca_bundle(t: Table, key: str) -> tuple[str, tuple[x509.Certificate, ...]]:
    """The CA bundle a key names: its path and certificates; none when it cannot be read (the error names the
    key, the file and why)."""
    try:
        path = _path(t, key)
    except Invalid:
        return "", ()
    try:
        return str(path), load_ca_bundle(path)
    except CertificateError as e:
        t.report(key, str(e))
        return "", ()


_UPSTREAM_TLS_KEYS = ("verify", "ca", "certificate", "key", "chain", "server_name")


def upstream_tls(t: Table | None) -> UpstreamTLS:
    """An https upstream's `tls` table (all defaults when there is none: verified against the system's roots);
    what cannot be read is reported (and left out), never raised."""
    if t is None:
        return UpstreamTLS()
    t.known(_UPSTREAM_TLS_KEYS)
    digest = hashlib.sha256()
    verify = t.get("verify", boolean, True)
    ca_path = ""
    ca: tuple[x509.Certificate, ...] = ()
    if t.has("ca"):
        if not verify:
            t.report("ca", "is used only to verify the upstream, and verify = false turns that off")
        ca_path, ca = _ca_bundle(t, "ca")
        if ca_path:
            digest.update(Path(ca_path).read_bytes())
    client = None
    files = _set_files(t) if t.has("certificate") or t.has("key") else None
    if files is not None:
        try:
            # Its chain is checked against the system's roots and `ca` (the CA file this table names); one that
            # does not verify is shown all the same, with a warning and a gauge at 0.
            client = load_certificate_set(*files, trusted=ca, trusted_key="ca" if ca else "")
        except CertificateError as e:
            t.report("certificate", str(e))
        if client is not None:
            for path in (client.certificate_path, client.key_path, client.chain_path):
                if path:
                    digest.update(Path(path).read_bytes())
    server_name = t.get("server_name", _server_name, "")
    tls = UpstreamTLS(
        verify=verify,
        ca_path=ca_path,
        server_name=server_name,
        client=client,
        ca=ca,
        files_digest=digest.hexdigest(),
    )
    t.finish()
    return tls


def _server_name(value: object) -> str:
    text = nonempty_string(value).lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", text):
        raise ValueError(f'must be a DNS name such as "billing.internal", got {value!r}')
    return text


_HSTS = re.compile(r"max-age=\d{1,10}(\s*;\s*includeSubDomains)?(\s*;\s*preload)?", re.IGNORECASE)


def hsts_value(value: object) -> bytes:
    """A route's `strict_transport_security`: the header value, checked for its form (RFC 6797)."""
    text = nonempty_string(value).strip()
    if not _HSTS.fullmatch(text):
        raise ValueError(
            f'must be a Strict-Transport-Security value such as "max-age=31536000; includeSubDomains", got {value!r}'
        )
    return text.encode("ascii")
