"""Tests for gateway.auth.mint (`gateway-credentials`): the printed key and config entries, and that the config
accepts them; bcrypt at cost 4 to stay fast."""

from __future__ import annotations

import getpass
import io
import re
import tomllib
from typing import Any

import bcrypt
import pytest
from twisted.web.http_headers import Headers

from gateway.auth.apikeys import ApiKeyAuthenticator, hash_key
from gateway.auth.identity import AuthRequest
from gateway.auth.mint import main
from gateway.auth.settings.model import ApiKeyMethod
from gateway.config import Config, parse


def config_with(entry: dict[str, Any]) -> Config:
    """A config whose consumers are the TOML entry printed by the tool."""
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "auth": {"keys": {"type": "api_key"}, "login": {"type": "basic"}},
        "routes": [{"name": "api", "auth": ["keys", "login"], "upstream": "http://127.0.0.1:8081"}],
        **entry,
    }
    return parse(data, source="test.toml")


def mint_api_key(capsys: pytest.CaptureFixture[str], name: str) -> tuple[str, str]:
    """(the key, the TOML entry) printed by `gateway-credentials api-key NAME`."""
    assert main(["api-key", name]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    key, _, entry = out.partition("\n")
    return key, entry


def hash_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, stdin: str
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `gateway-credentials password NAME --stdin --cost 4`."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(["password", name, "--stdin", "--cost", "4"])
    out, err = capsys.readouterr()
    return status, out, err


# --- api-key -------------------------------------------------------------------------------------------------


def test_api_key_prints_the_key_alone_on_the_first_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The first line is the minted key and nothing else (so `| head -1` captures it)."""
    key, entry = mint_api_key(capsys, "reports-app")
    assert re.fullmatch(r"gwk_[A-Za-z0-9_-]{43}", key)
    assert key not in entry


def test_api_key_entry_holds_the_hash_of_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    """The TOML after the key is the consumer's table with the key's hash and only that."""
    key, entry = mint_api_key(capsys, "reports-app")
    assert tomllib.loads(entry) == {"consumers": {"reports-app": {"api_keys": [hash_key(key)]}}}
    assert "shown only now" in entry


def test_api_key_entry_is_accepted_and_admits_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    """The printed entry, put in a config, declares a consumer that the printed key authenticates."""
    key, entry = mint_api_key(capsys, "reports-app")
    cfg = config_with(tomllib.loads(entry))
    consumer = cfg.admission.consumers["reports-app"]
    assert consumer.api_key_hashes == frozenset({hash_key(key)})
    method = cfg.admission.methods["keys"]
    assert isinstance(method, ApiKeyMethod)
    auth = ApiKeyAuthenticator(method, cfg.admission.consumers, realm=cfg.admission.realm)
    h = Headers({b"Authorization": [b"Bearer " + key.encode()]})
    identity = auth.verify(auth.credential(h), AuthRequest(b"GET", b"/", h, "10.0.0.1", "rid"))
    assert identity.consumer == "reports-app"  # type: ignore[union-attr]


def test_api_key_twice_gives_two_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """Each run mints a new key."""
    first, _ = mint_api_key(capsys, "a")
    second, _ = mint_api_key(capsys, "a")
    assert first != second


@pytest.mark.parametrize(("name", "header"), [("app.v2", '[consumers."app.v2"]'), ("svc_1-x", "[consumers.svc_1-x]")])
def test_api_key_table_is_quoted_when_needed(capsys: pytest.CaptureFixture[str], name: str, header: str) -> None:
    """A name that is not a bare TOML key is quoted in the table header, and the config reads it back."""
    _, entry = mint_api_key(capsys, name)
    assert header in entry.splitlines()
    assert name in config_with(tomllib.loads(entry)).admission.consumers


@pytest.mark.parametrize("name", ["alice", "app.v2", "svc_1-x", "A" * 128])
def test_api_key_entry_for_any_accepted_name_is_accepted_by_the_config(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Every consumer name the tool accepts gives an entry the config accepts."""
    key, entry = mint_api_key(capsys, name)
    assert tomllib.loads(entry) == {"consumers": {name: {"api_keys": [hash_key(key)]}}}
    assert name in config_with(tomllib.loads(entry)).admission.consumers


@pytest.mark.parametrize("name", ["", "a b", "a/b", 'a"b', "é", "x" * 129, "a\nb", "alice@example.com", "svc:x"])
def test_bad_consumer_name_is_a_usage_error(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """A consumer name the config would refuse is argparse's usage error (exit 2), and nothing is minted."""
    with pytest.raises(SystemExit) as info:
        main(["api-key", name])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "a consumer name may contain only letters, digits and -_. (at most 128)" in err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command the tool exits 2 with its usage."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: gateway-credentials" in capsys.readouterr().err


# --- password ------------------------------------------------------------------------------------------------


def _hash_of(out: str, name: str = "alice") -> bytes:
    entry = tomllib.loads(out)
    assert list(entry) == ["consumers"]
    assert list(entry["consumers"]) == [name]
    assert list(entry["consumers"][name]) == ["password"]
    return str(entry["consumers"][name]["password"]).encode("ascii")


def test_password_prints_a_bcrypt_hash_of_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`password NAME --stdin --cost 4` prints the consumer's table with a cost-4 bcrypt hash of the password."""
    status, out, err = hash_password(capsys, monkeypatch, "alice", "correct horse\n")
    assert (status, err) == (0, "")
    hashed = _hash_of(out)
    assert hashed.startswith(b"$2b$04$")
    assert bcrypt.checkpw(b"correct horse", hashed)
    assert not bcrypt.checkpw(b"correct horse\n", hashed)
    assert b"correct horse" not in out.encode()


def test_password_entry_is_accepted_by_the_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The printed entry, put in a config, gives the consumer that bcrypt hash."""
    _, out, _ = hash_password(capsys, monkeypatch, "alice", "s3cret")
    consumer = config_with(tomllib.loads(out)).admission.consumers["alice"]
    assert consumer.password_hash == _hash_of(out)
    assert consumer.password_hash is not None
    assert bcrypt.checkpw(b"s3cret", consumer.password_hash)


@pytest.mark.parametrize(
    ("stdin", "password"),
    [
        ("pw", b"pw"),
        ("pw\n\n", b"pw"),
        ("  pw with spaces  \n", b"  pw with spaces  "),
        ("p\u00e4ssw\u00f6rd", "p\u00e4ssw\u00f6rd".encode()),
        ("line1\nline2\n", b"line1\nline2"),
        ("x" * 72, b"x" * 72),
    ],
)
def test_password_from_stdin_loses_only_trailing_newlines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str, password: bytes
) -> None:
    """The password read from standard input is all of it but its trailing newlines, as UTF-8."""
    status, out, _ = hash_password(capsys, monkeypatch, "alice", stdin)
    assert status == 0
    assert bcrypt.checkpw(password, _hash_of(out))


@pytest.mark.parametrize("stdin", ["", "\n", "\n\n"])
def test_empty_password_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str
) -> None:
    """An empty password is refused with exit 1 and a message, and nothing is printed on stdout."""
    status, out, err = hash_password(capsys, monkeypatch, "alice", stdin)
    assert (status, out) == (1, "")
    assert err == "gateway-credentials: the password is empty\n"


def test_password_longer_than_bcrypt_takes_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password longer than bcrypt's 72 bytes is refused with exit 1 and a message, not a traceback."""
    status, out, err = hash_password(capsys, monkeypatch, "alice", "x" * 73)
    assert (status, out) == (1, "")
    assert err.startswith("gateway-credentials: ")


def test_password_with_a_bad_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad consumer name is a usage error for password too (exit 2), before any password is read."""
    with pytest.raises(SystemExit) as info:
        main(["password", "not valid", "--stdin", "--cost", "4"])
    assert info.value.code == 2
    assert "a consumer name may contain only" in capsys.readouterr().err


@pytest.mark.parametrize("cost", ["3", "16", "x"])
def test_cost_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str], cost: str) -> None:
    """A bcrypt cost outside 4..15 is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(["password", "alice", "--stdin", "--cost", cost])
    assert info.value.code == 2
    assert "--cost" in capsys.readouterr().err


def test_password_asked_twice_on_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --stdin the password is asked for twice, and the same answer both times is hashed."""
    prompts: list[str] = []

    def terminal(prompt: str = "") -> str:
        prompts.append(prompt)
        return "typed secret"

    monkeypatch.setattr(getpass, "getpass", terminal)
    assert main(["password", "alice", "--cost", "4"]) == 0
    assert prompts == ["Password for alice: ", "Again: "]
    assert bcrypt.checkpw(b"typed secret", _hash_of(capsys.readouterr().out))


def test_passwords_that_differ_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different answers on the terminal are refused with exit 1, and nothing is printed on stdout."""
    answers = iter(["first", "second"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert main(["password", "alice", "--cost", "4"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "gateway-credentials: the passwords differ\n"
