"""Tests for gateway.config.store: the `[limits.store]` table, checked at load (so by `--check` and a reload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.config import ConfigError, parse
from gateway.config.store import LOCAL_STORE
from tests.test_config import minimal


def with_store(tmp_path: Path, store: dict[str, Any], **limits: Any) -> dict[str, Any]:
    data = minimal()
    data["limits"] = {"store": store, **limits}
    return data


def problems(tmp_path: Path, store: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(with_store(tmp_path, store), source=tmp_path / "gateway.toml")
    return [(p.key, p.reason) for p in info.value.errors]


def test_local_by_default(tmp_path: Path) -> None:
    """No [limits.store], or type = "local": the in-process store."""
    assert parse(minimal(), source=tmp_path / "g.toml").limit_store is LOCAL_STORE
    assert parse(with_store(tmp_path, {"type": "local"}), source=tmp_path / "g.toml").limit_store is LOCAL_STORE


def test_redis(tmp_path: Path) -> None:
    """A redis store: URL, password from a file beside the config (its newline dropped), every setting read."""
    (tmp_path / "redis.pass").write_text("s3cret\n")
    store = {
        "type": "redis",
        "url": "redis://10.0.0.5:6380/2",
        "username": "gateway",
        "password_file": "redis.pass",
        "timeout": "5ms",
        "connect_timeout": "2s",
        "pool_size": 4,
        "prefix": "gw:{eu}:",
        "lease_ttl": "1m",
    }
    settings = parse(with_store(tmp_path, store), source=tmp_path / "gateway.toml").limit_store
    assert settings.shared and not settings.tls
    assert (settings.host, settings.port, settings.db) == ("10.0.0.5", 6380, 2)
    assert (settings.username, settings.password) == ("gateway", "s3cret")
    assert settings.timeout == 0.005 and settings.connect_timeout == 2.0 and settings.pool_size == 4
    assert settings.prefix == "gw:{eu}:" and settings.lease_ttl == 60.0
    assert "s3cret" not in repr(settings)


def test_defaults(tmp_path: Path) -> None:
    """Only a URL: port 6379, database 0, a 10 ms timeout, two connections, 30 s leases."""
    settings = parse(with_store(tmp_path, {"type": "redis", "url": "redis://cache"}), source=tmp_path / "g.toml")
    store = settings.limit_store
    assert (store.host, store.port, store.db, store.password) == ("cache", 6379, 0, "")
    assert (store.timeout, store.pool_size, store.lease_ttl, store.prefix) == (0.01, 2, 30.0, "gateway:")


def test_tls_with_a_ca(tmp_path: Path) -> None:
    """rediss:// is TLS; ca_file is read and checked at load."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    store = {"type": "redis", "url": "rediss://redis.internal:6379", "ca_file": "ca.pem"}
    settings = parse(with_store(tmp_path, store), source=tmp_path / "g.toml").limit_store
    assert settings.tls and len(settings.ca) == 1 and settings.ca_path == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("store", "key", "reason"),
    [
        ({"type": "memcached"}, "limits.store.type", 'must be "local" or "redis"'),
        ({"type": "redis"}, "limits.store.url", "is required"),
        ({"type": "redis", "url": "http://x"}, "limits.store.url", "redis:// or rediss://"),
        ({"type": "redis", "url": "redis://:pw@x"}, "limits.store.url", "must not hold credentials"),
        ({"type": "redis", "url": "redis://x/db"}, "limits.store.url", "database number"),
        ({"type": "redis", "url": "redis://x:99999"}, "limits.store.url", "not a valid URL"),
        ({"type": "redis", "url": "redis://x", "password_file": "nope"}, "limits.store.password_file", "cannot read"),
        ({"type": "redis", "url": "redis://x", "username": "u"}, "limits.store.username", "needs password_file"),
        ({"type": "redis", "url": "redis://x", "timeout": 0}, "limits.store.timeout", "positive"),
        ({"type": "redis", "url": "redis://x", "pool_size": 0}, "limits.store.pool_size", "positive"),
        ({"type": "redis", "url": "redis://x", "prefix": "a b"}, "limits.store.prefix", "letters"),
        ({"type": "redis", "url": "redis://x", "lease_ttl": "100ms"}, "limits.store.lease_ttl", "at least 1s"),
        ({"type": "redis", "url": "redis://x", "ca_file": "ca.pem"}, "limits.store.ca_file", "rediss://"),
        ({"url": "redis://x"}, "limits.store.url", 'only with type = "redis"'),
        ({"type": "redis", "url": "redis://x", "tiemout": 1}, "limits.store.tiemout", 'did you mean "timeout"'),
    ],
)
def test_errors(tmp_path: Path, store: dict[str, Any], key: str, reason: str) -> None:
    """Each bad setting is refused at load with its key path and a reason."""
    if "ca_file" in store:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    found = problems(tmp_path, store)
    assert any(k == key and reason in r for k, r in found), found


def test_empty_password_file(tmp_path: Path) -> None:
    """A password file with nothing in it is refused."""
    (tmp_path / "empty").write_text("\n")
    found = problems(tmp_path, {"type": "redis", "url": "redis://x", "password_file": "empty"})
    assert any(k == "limits.store.password_file" and "one line" in r for k, r in found), found


def test_size_limits_still_read(tmp_path: Path) -> None:
    """[limits] keeps its own keys beside the store table."""
    data = with_store(tmp_path, {"type": "local"}, max_header_count=7)
    assert parse(data, source=tmp_path / "g.toml").limits.max_header_count == 7
