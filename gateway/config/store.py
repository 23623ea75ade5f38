"""The `[limits.store]` table: where rate and concurrency counts live, this process (`local`) or Redis (`redis`).

Rule: everything a connection to Redis needs is read and checked here, so `--check` and a reload refuse a bad URL,
a missing or empty password file or an unreadable CA bundle, naming the file and the key path, before anything
changes. The password is read from its own file (relative to the config file), never written in the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from gateway.config.values import Table, nonempty_string, positive_int, positive_seconds
from gateway.tls.certificates import CertificateError, load_ca_bundle

__all__ = ["LOCAL_STORE", "STORE_KEYS", "STORE_TYPES", "LimitStoreSettings", "limit_store"]

STORE_TYPES = ("local", "redis")
STORE_KEYS = (
    "type",
    "url",
    "username",
    "password_file",
    "ca_file",
    "timeout",
    "connect_timeout",
    "pool_size",
    "prefix",
    "lease_ttl",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitStoreSettings:
    """Where limit counts live. Equal settings (the password's and CA file's bytes included) keep the running
    store over a reload, with its connections and its leases."""

    type: str = "local"
    """"local": in each process, as before (a limit of N is N per worker); "redis": shared."""
    host: str = ""
    port: int = 6379
    db: int = 0
    tls: bool = False
    """A `rediss://` URL: TLS, verified against `ca_file` or the system's roots."""
    username: str = ""
    """An ACL user (Redis 6+); "" authenticates with the password alone (`requirepass`)."""
    password: str = field(default="", repr=False)
    ca_path: str = ""
    ca: tuple[x509.Certificate, ...] = field(default=(), compare=False, repr=False)
    ca_digest: bytes = b""
    timeout: float = 0.01
    """A reply must come this long after its command, or the check counts as failed (the route's
    `store_failure` decides what that means): the longest a request waits on Redis."""
    connect_timeout: float = 1.0
    pool_size: int = 2
    prefix: str = "gateway:"
    lease_ttl: float = 30.0
    """How long a concurrency slot stays taken after its gateway stopped renewing it (died)."""

    @property
    def shared(self) -> bool:
        return self.type == "redis"


LOCAL_STORE = LimitStoreSettings()


def _store_type(value: object) -> str:
    if value not in STORE_TYPES:
        raise ValueError(f'must be "local" or "redis", got {value!r}')
    assert isinstance(value, str)
    return value


def _prefix(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,64}", value):
        raise ValueError(f"must be 1 to 64 letters, digits and _.:{{}}- , got {value!r}")
    return value


def _url(value: object) -> tuple[str, int, int, bool]:
    """host, port, db and TLS of a redis:// or rediss:// URL."""
    if not isinstance(value, str):
        raise ValueError(f"must be a redis:// or rediss:// URL, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"must be a redis:// or rediss:// URL, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"names no host: {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials: give username and password_file instead")
    if parts.query or parts.fragment:
        raise ValueError("must have no query or fragment")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the path must be a database number (/0), got {parts.path!r}")
    return parts.hostname, port, int(path or 0), parts.scheme == "rediss"


def _password(t: Table, source: Path | str) -> str:
    path = t.get("password_file", nonempty_string, "")
    if not path:
        return ""
    full = Path(source).parent / path
    try:
        text = full.read_text("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        t.report("password_file", f"cannot read {str(full)!r}: {getattr(e, 'strerror', None) or e}")
        return ""
    if not text or "\n" in text:
        t.report("password_file", f"{str(full)!r} must hold the password alone, on one line")
    return text


def limit_store(t: Table | None, source: Path | str) -> LimitStoreSettings:
    """The settings of `[limits.store]` (the local store when there is no such table)."""
    if t is None:
        return LOCAL_STORE
    t.known(STORE_KEYS)
    kind = t.get("type", _store_type, "local")
    if kind == "local":
        for key in t.names():
            if key in STORE_KEYS and key != "type":
                t.report(key, 'only with type = "redis"')
        t.finish()
        return LOCAL_STORE
    address = t.require("url", _url)
    host, port, db, tls = address if address is not None else ("", 6379, 0, False)
    ca_path = t.get("ca_file", nonempty_string, "")
    ca: tuple[x509.Certificate, ...] = ()
    digest = b""
    if ca_path:
        full = Path(source).parent / ca_path
        if not tls and address is not None:
            t.report("ca_file", "only for a rediss:// URL (TLS)")
        try:
            ca = load_ca_bundle(full)
            digest = full.read_bytes()
        except (CertificateError, OSError) as e:
            t.report("ca_file", str(e))
        ca_path = str(full)
    settings = LimitStoreSettings(
        type=kind,
        host=host,
        port=port,
        db=db,
        tls=tls,
        username=t.get("username", nonempty_string, ""),
        password=_password(t, source),
        ca_path=ca_path,
        ca=ca,
        ca_digest=digest,
        timeout=t.get("timeout", positive_seconds, 0.01),
        connect_timeout=t.get("connect_timeout", positive_seconds, 1.0),
        pool_size=t.get("pool_size", positive_int, 2),
        prefix=t.get("prefix", _prefix, "gateway:"),
        lease_ttl=t.get("lease_ttl", positive_seconds, 30.0),
    )
    if settings.username and not settings.password and t.valid("password_file"):
        t.report("username", "needs password_file")
    if settings.lease_ttl < 1.0 and t.valid("lease_ttl"):
        t.report("lease_ttl", "must be at least 1s (leases are renewed every third of it)")
    t.finish()
    return settings
