"""TLS on both sides, in this process over real loopback sockets, with certificates made by trustme: SNI from
memory, old versions refused, certificates reloaded (a broken set keeps the old one), chains that do not verify
(a company CA, an expired certificate) served with a warning and a gauge unless strict_certificates, client
certificates mapped to consumers, https upstreams verified (untrusted and mismatched ones are a 502 naming the
class), and the plain-HTTP redirect and HSTS."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.threads import deferToThread

from gateway.auth.apikeys import hash_key
from gateway.config import ConfigError, load, parse
from gateway.operations.service import GatewayService
from gateway.tls.certificates import CertificateSet, describe_name, load_certificate_set
from tests.support.backpressure import held_back_then_whole
from tests.support.certs import client_options, expired, issue, write_ca
from tests.support.clients import connect, within
from tests.support.logs import captured, in_namespace
from tests.support.origin import Origin
from tests.support.running import gateway_config
from tests.support.scrape import admin_port, lines_logged, scrape, scraped_until
from tests.test_reload import toml

HOST = "api.example.com"
MiB = 1024 * 1024


def tls_config(origin_url: str, *sets: Any, **tls: Any) -> dict[str, Any]:
    data = gateway_config(origin_url, access_log={"path": ""})
    data["listeners"][0]["tls"] = {"certificates": [s.table() for s in sets], **tls}
    return data


async def get(port: int, options: Any, target: str = "/headers", host: str = HOST, extra: str = "") -> Any:
    client = await connect(port, tls=options, keep_all=True)
    client.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
    await within(client.closed)
    return client


def served_serial(client: Any) -> int:
    return client.transport.getPeerCertificate().to_cryptography().serial_number


@pytest_twisted.ensureDeferred
async def test_sni_picks_the_certificate_and_the_default_serves_unknown_names(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    ca = trustme.CA()
    api = issue(ca, tmp_path, HOST, stem="api")
    other = issue(ca, tmp_path, "*.other.test", stem="other")
    gateway = gateway_for(tls_config(origin.url, api, other))
    for name, expected in ((HOST, api), ("a.other.test", other)):
        client = await get(gateway.port, client_options(ca, name))
        assert client.response().status == 200
        assert served_serial(client) == expected.serial()
        assert json.loads(client.response().body)["headers"].count(["X-Forwarded-Proto", "https"]) == 1
    # An unknown name (and a wildcard's grandchild) gets the default set, from memory.
    contexts = gateway.service.listeners[0].tls.contexts
    assert contexts.certificate_for("nobody.test") is contexts.certificates[0]
    assert contexts.certificate_for("a.b.other.test") is contexts.certificates[0]
    assert contexts.context_for(b"a.b.other.test") is None


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_tls_version_and_cipher(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    """On a TLS listener each access-log line has the protocol version and cipher the handshake agreed on, and the
    Host the client sent."""
    ca = trustme.CA()
    data = tls_config(origin.url, issue(ca, tmp_path, HOST))
    data["access_log"] = {"path": str(tmp_path / "access.log")}
    gateway = gateway_for(data)
    client = await get(gateway.port, client_options(ca, HOST))
    assert client.response().status == 200
    [line] = await lines_logged(tmp_path / "access.log", 1)
    assert line["tls_version"] == "TLSv1.3"  # both ends offer it: the handshake agrees on it
    assert line["tls_cipher"] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256")
    assert line["host"] == HOST


@pytest_twisted.ensureDeferred
async def test_an_exact_name_wins_over_a_wildcard_in_any_order(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    ca = trustme.CA()
    wildcard = issue(ca, tmp_path, "*.example.com", stem="wildcard")
    exact = issue(ca, tmp_path, HOST, stem="exact")
    gateway = gateway_for(tls_config(origin.url, wildcard, exact))
    assert served_serial(await get(gateway.port, client_options(ca, HOST))) == exact.serial()
    sibling = await get(gateway.port, client_options(ca, "www.example.com"), host="www.example.com")
    assert served_serial(sibling) == wildcard.serial()


@pytest_twisted.ensureDeferred
async def test_backpressure_and_abort_pass_through_tls(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    """Over TLS too, a client that stops reading pauses the upstream (what is held is bounded by the socket and
    TLS buffers, not the body), reading again brings the body whole, and a client that aborts closes the
    upstream at once."""
    ca = trustme.CA()
    gateway = gateway_for(tls_config(origin.url, issue(ca, tmp_path, HOST)))
    size = 64 * MiB
    slow = await connect(gateway.port, tls=client_options(ca, HOST))
    slow.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    await within(slow.received_at_least(1))  # the handshake needs the client reading; then it stops
    slow.pause()
    await held_back_then_whole(slow, origin.seen[0], size)

    leaving = await connect(gateway.port, tls=client_options(ca, HOST))
    leaving.send(f"GET /bytes/{256 * MiB} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    await within(leaving.received_at_least(1 * MiB))
    leaving.abort()
    gone = origin.seen[1]
    await within(gone.connection_lost, 5)
    assert not gone.finished and gone.sent < 64 * MiB


@pytest.mark.parametrize(("over_tls", "limit"), [(False, 1024 * 1024), (True, 128 * 1024)], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_plain_client_socket_is_given_up_to_one_mib_per_send(
    tmp_path: Path, origin: Origin, gateway_for: Any, over_tls: bool, limit: int
) -> None:
    """The TCP socket of a plain client connection is given up to 1 MiB per `send`, one of the largest upstream
    reads, rather than Twisted's 128 KiB; under TLS it keeps Twisted's (the TLS layer writes in records)."""
    ca = trustme.CA()
    data = tls_config(origin.url, issue(ca, tmp_path, HOST)) if over_tls else gateway_config(origin.url)
    gateway = gateway_for(data)
    client = await connect(gateway.port, tls=client_options(ca, HOST) if over_tls else None)
    client.send(f"GET /bytes/10 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await within(client.received_at_least(10))
    (channel,) = gateway.service.factory.channels
    tcp = channel.transport.transport if over_tls else channel.transport
    assert limit == tcp.SEND_LIMIT


@pytest_twisted.ensureDeferred
async def test_a_proxy_protocol_header_comes_before_the_handshake(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    """Behind a TCP load balancer (`proxy_protocol = true` on an HTTPS listener) the PROXY header arrives in the
    clear, then the TLS handshake: the carried address and https reach the upstream."""
    ca = trustme.CA()
    data = tls_config(origin.url, issue(ca, tmp_path, HOST))
    data["listeners"][0]["proxy_protocol"] = True
    gateway = gateway_for(data)
    client = await connect(gateway.port, keep_all=True)
    client.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 56324 443\r\n")
    client.transport.startTLS(client_options(ca, HOST))  # what was written before goes out in the clear
    client.send(f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    await within(client.closed)
    assert client.response().status == 200, client.response()
    headers = json.loads(client.response().body)["headers"]
    assert [v for k, v in headers if k.lower() == "x-forwarded-for"] == ["203.0.113.9"], headers
    assert [v for k, v in headers if k.lower() == "x-forwarded-proto"] == ["https"], headers


@pytest_twisted.ensureDeferred
async def test_certificate_expiry_is_logged_and_exported(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    from datetime import UTC, datetime, timedelta

    ca = trustme.CA()
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    api = issue(ca, tmp_path, HOST, not_after=soon)
    data = tls_config(origin.url, api, trusted_ca=str(write_ca(ca, tmp_path / "company-ca.pem")))  # it verifies
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    with captured(in_namespace("gateway.certificates")) as events:
        gateway = gateway_for(data)
    warned = [e for e in events if e["log_level"].name == "warn" and e.get("names") == HOST]
    assert len(warned) == 1 and str(api.certificate) in str(warned[0]["file"]), events
    metrics = await scrape(admin_port(gateway))
    expiry = [
        (dict(labels), value)
        for (name, labels), value in metrics.samples.items()
        if name == "gateway_tls_certificate_expiry_timestamp_seconds"
    ]
    assert len(expiry) == 1, expiry
    labels, value = expiry[0]
    assert value == soon.timestamp()
    assert labels["names"] == HOST and labels["certificate"] == str(api.certificate), labels


def _served_serial_unverified(port: int, server_name: str) -> int:
    """The serial number of the certificate served for `server_name`, read by a client that verifies nothing."""
    import socket

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _old_client(port: int, version: ssl.TLSVersion) -> str:
    import socket
    import warnings

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")  # this client would speak the old versions itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                return f"accepted {tls.version()}"
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused {e}"


@pytest_twisted.ensureDeferred
async def test_tls_1_0_and_1_1_are_refused(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    api = issue(ca, tmp_path, HOST)
    gateway = gateway_for(tls_config(origin.url, api))
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        outcome = await deferToThread(_old_client, gateway.port, version)
        assert outcome.startswith("refused"), outcome
    assert (await deferToThread(_old_client, gateway.port, ssl.TLSVersion.TLSv1_2)) == "accepted TLSv1.2"


@pytest_twisted.ensureDeferred
async def test_reload_changes_new_handshakes_and_a_broken_set_keeps_the_old(
    tmp_path: Path, origin: Origin, running: list[GatewayService]
) -> None:
    ca = trustme.CA()
    first = issue(ca, tmp_path, HOST)
    path = tmp_path / "gateway.toml"
    path.write_text(toml(tls_config(origin.url, first)))
    service = GatewayService(load(path), reactor)
    service.startService()
    running.append(service)
    port = service.listeners[0].port.getHost().port
    # A download stays open on the first certificate across the reload.
    download = await connect(port, tls=client_options(ca, HOST))
    download.send(f"GET /bytes/{8 * 1024 * 1024} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    await within(download.received_at_least(1))
    download.pause()
    second = issue(ca, tmp_path, HOST)  # the same files, renewed
    assert service.reload() is True
    client = await get(port, client_options(ca, HOST))
    assert served_serial(client) == second.serial() != first.serial()
    download.resume()
    await within(download.closed, 30)
    assert download.clean_close and download.received > 8 * 1024 * 1024
    assert served_serial(download) == first.serial()
    # A key that does not match its certificate: refused, the second set still serves.
    other = issue(ca, tmp_path / "x", HOST)
    second.key.write_bytes(other.key.read_bytes())
    assert service.reload() is False
    assert served_serial(await get(port, client_options(ca, HOST))) == second.serial()


def _listener_set(entry: dict[str, str], **tls: Any) -> CertificateSet:
    """The certificate set a listener's `tls` table with this one entry loads."""
    data = gateway_config("http://127.0.0.1:1")
    data["listeners"][0]["tls"] = {"certificates": [entry], **tls}
    tls_settings = parse(data, source="test.toml").listeners[0].tls
    assert tls_settings is not None
    return tls_settings.certificates[0]


def _subject(pem: trustme.Blob) -> str:
    """The subject of a PEM certificate (a CA's `cert_pem`, a leaf's `cert_chain_pems[0]`), as messages give it."""
    return describe_name(x509.load_pem_x509_certificate(pem.bytes()).subject)


def test_check_names_the_file_and_reason(tmp_path: Path) -> None:
    """What cannot work is refused, strict_certificates or not: a file that cannot be read, a key that does not
    match, a chain out of order."""
    ca = trustme.CA()
    good = issue(ca, tmp_path, HOST)
    mismatched = issue(ca, tmp_path, HOST, stem="mismatched")
    mismatched.key.write_bytes(good.key.read_bytes())
    broken = issue(ca, tmp_path, HOST, stem="broken")
    broken.chain.write_bytes(trustme.CA().cert_pem.bytes())  # not the issuer
    cases = {
        "mismatch": (mismatched.table(), "does not match the certificate"),
        "chain": (broken.table(), "is not issued by certificate 2"),
        "out-of-order": ({**good.table(), "chain": str(good.certificate)}, "is not issued by"),
        "missing": ({**good.table(), "key": str(tmp_path / "nope.key")}, "cannot read the file"),
    }
    for name, (entry, reason) in cases.items():
        for strict in ({}, {"strict_certificates": True}):
            with pytest.raises(ConfigError) as raised:
                _listener_set(entry, **strict)
            assert reason in str(raised.value), (name, str(raised.value))
            assert str(raised.value).startswith('test.toml: listeners["127.0.0.1:0"].tls.certificates[0]: '), name


def test_a_company_ca_chain_loads_saying_what_is_missing(tmp_path: Path) -> None:
    """A certificate from a CA the system does not trust is loaded, not refused: its chain is marked as not
    verified, with what is missing; trusted_ca (the company's root) makes it verify."""
    root = trustme.CA(organization_name="Company Root")
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)  # the leaf, then the intermediate; chain: the root
    leaf_only = tmp_path / "leaf.pem"
    leaf_only.write_bytes(served.leaf.cert_chain_pems[0].bytes())
    trusted_ca = str(write_ca(root, tmp_path / "company-ca.pem"))
    intermediate, company_root = _subject(company.cert_pem), _subject(root.cert_pem)
    incomplete = (
        f"the chain is incomplete: {intermediate} is issued by {company_root}, which is neither in the chain nor "
        "trusted (a system root or in trusted_ca); add the intermediate certificates (a fullchain.pem, or chain), "
        "and for a company CA set trusted_ca to its root"
    )
    without_intermediate = f"is issued by {intermediate}, which is neither in the chain nor trusted"
    untrusted_root = f"the chain ends at the root {company_root}, which is neither a system root nor in trusted_ca"
    cases = [
        # (entry, tls settings, the problem, or "" for a chain that verifies)
        (served.table(chain=False), {}, incomplete),
        (served.table(chain=False), {"trusted_ca": trusted_ca}, ""),
        (served.table(), {}, untrusted_root),
        (served.table(), {"trusted_ca": trusted_ca}, ""),
        ({"certificate": str(leaf_only), "key": str(served.key)}, {"trusted_ca": trusted_ca}, without_intermediate),
    ]
    for entry, tls, problem in cases:
        loaded = _listener_set(entry, **tls)
        assert loaded.chain_verified is (problem == ""), (entry, tls, loaded.chain_problem)
        assert problem in loaded.chain_problem, (entry, tls, loaded.chain_problem)
        assert loaded.names == (HOST,)


def test_an_expired_or_not_yet_valid_certificate_loads_saying_so(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    root = trustme.CA()
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)
    trusted = [x509.load_pem_x509_certificate(root.cert_pem.bytes())]
    valid = load_certificate_set(served.certificate, served.key, trusted=trusted, trusted_key="trusted_ca")
    assert valid.chain_verified and valid.chain_problem == ""
    later = load_certificate_set(served.certificate, served.key, trusted=trusted, now=datetime(3001, 1, 1, tzinfo=UTC))
    assert not later.chain_verified
    assert later.chain_problem.startswith("the certificate (")
    assert "expired on 3000-01-01 00:00 UTC; chain certificate 2 (" in later.chain_problem, later.chain_problem
    early = load_certificate_set(served.certificate, served.key, trusted=trusted, now=datetime(1999, 1, 1, tzinfo=UTC))
    assert "is not valid before 2000-01-01" in early.chain_problem, early.chain_problem
    old = _listener_set(expired(root, tmp_path, HOST).table())
    assert not old.chain_verified and "expired on" in old.chain_problem


def test_strict_certificates_refuses_a_chain_that_does_not_verify(tmp_path: Path) -> None:
    """The refusals from before the leniency, for those who want them: with strict_certificates = true an
    expired certificate or an incomplete chain is a config error naming the file, the key and the reason; one
    that verifies loads, and so does one that ends at a root of its own (accepted before, and still warned
    about: its clients must know that root)."""
    root = trustme.CA()
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)
    old = expired(root, tmp_path, HOST)
    trusted_ca = str(write_ca(root, tmp_path / "company-ca.pem"))
    cases = {
        "expired": (old.table(), {"trusted_ca": trusted_ca}, "expired on"),
        "incomplete": (served.table(chain=False), {}, "the chain is incomplete"),
    }
    for name, (entry, tls, reason) in cases.items():
        assert not _listener_set(entry, **tls).chain_verified, name
        with pytest.raises(ConfigError) as raised:
            _listener_set(entry, strict_certificates=True, **tls)
        message = str(raised.value)
        assert message.startswith(
            f'test.toml: listeners["127.0.0.1:0"].tls.certificates[0]: {entry["certificate"]}: '
        ), message
        assert reason in message and "strict_certificates = true" in message, (name, message)
    assert _listener_set(served.table(chain=False), strict_certificates=True, trusted_ca=trusted_ca).chain_verified
    own_root = _listener_set(served.table(), strict_certificates=True)
    assert not own_root.chain_verified and "the chain ends at the root" in own_root.chain_problem
    with pytest.raises(
        ConfigError, match=r'listeners\["127\.0\.0\.1:0"\]\.tls\.strict_certificates: must be true or false'
    ):
        _listener_set(served.table(), strict_certificates="yes")


def _cross_signed(ca: trustme.CA, by: trustme.CA, *, expired: bool) -> bytes:
    """A copy of `ca`'s root certificate (its subject and key) issued by `by` instead: a cross-signature, as
    Let's Encrypt's long chain sent one for ISRG Root X1."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization

    subject = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer = x509.load_pem_x509_certificate(by.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(by.private_key_pem.bytes(), password=None)
    now = datetime.now(UTC)
    not_after = now - timedelta(days=1) if expired else now + timedelta(days=30)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject.subject)
        .issuer_name(issuer.subject)
        .public_key(subject.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_a_chain_counts_up_to_its_first_trusted_certificate(tmp_path: Path) -> None:
    """A chain is taken as a client builds it: up to the first certificate that is a trust anchor or issued by
    one. What the file sends past it (here an expired cross-signed copy of the trusted root) does not make it
    unverified, nor does strict_certificates refuse it; without that anchor the same file is incomplete."""
    root, other = trustme.CA(), trustme.CA()
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)
    cross = tmp_path / "cross.pem"
    cross.write_bytes(_cross_signed(root, other, expired=True))
    entry = {**served.table(chain=False), "chain": str(cross)}
    trusted_ca = str(write_ca(root, tmp_path / "root.pem"))
    anchored = _listener_set(entry, trusted_ca=trusted_ca, strict_certificates=True)
    assert anchored.chain_verified, anchored.chain_problem
    alone = _listener_set(entry)
    assert not alone.chain_verified
    assert "expired on" in alone.chain_problem and "the chain is incomplete" in alone.chain_problem, alone.chain_problem


def test_an_upstream_client_certificate_is_checked_against_the_system_and_its_ca(tmp_path: Path) -> None:
    root = trustme.CA()
    company = root.create_child_ca()
    mine = issue(company, tmp_path, "gateway.internal", stem="client")
    ca_file = str(write_ca(root, tmp_path / "internal-ca.pem"))
    for tls, verified in (({}, False), ({"ca": ca_file}, True)):
        data = gateway_config("https://billing.internal:8443", upstream={"tls": {**tls, **mine.table(chain=False)}})
        upstream_tls = parse(data, source="test.toml").routes[0].upstream.tls
        assert upstream_tls is not None and upstream_tls.client is not None
        assert upstream_tls.client.chain_verified is verified, upstream_tls.client.chain_problem
        if not verified:
            assert "the chain is incomplete" in upstream_tls.client.chain_problem
            assert "(a system root); add the intermediate certificates" in upstream_tls.client.chain_problem


def _warnings(events: list[Any]) -> dict[str, Any]:
    """The chain warnings among `events`, by owner."""
    return {e["owner"]: e for e in events if e["log_level"].name == "warn" and "problem" in e}


@pytest_twisted.ensureDeferred
async def test_a_chain_that_does_not_verify_is_warned_about_at_start_and_at_each_reload(
    tmp_path: Path, running: list[GatewayService]
) -> None:
    """For a listener's certificate and an upstream's client certificate: a warning naming what uses it, the
    file, the subject and what is missing, at start and at each reload, until the chain verifies."""
    root = trustme.CA(organization_name="Company Root")
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)
    mine = issue(company, tmp_path / "client", "gateway.internal", stem="client")
    ca_file = str(write_ca(root, tmp_path / "company-ca.pem"))
    data = gateway_config("https://127.0.0.1:9", access_log={"path": ""}, upstream={"tls": mine.table(chain=False)})
    data["listeners"][0]["tls"] = {"certificates": [served.table(chain=False)]}
    path = tmp_path / "gateway.toml"
    path.write_text(toml(data))
    with captured(in_namespace("gateway.certificates")) as events:
        service = GatewayService(load(path), reactor)
        service.startService()
        running.append(service)
    at_start = _warnings(events)
    assert set(at_start) == {"listener 127.0.0.1:0", "upstream origin"}, events
    for owner, issued in (("listener 127.0.0.1:0", served), ("upstream origin", mine)):
        warning = at_start[owner]
        assert warning["file"] == str(issued.certificate)
        assert warning["subject"] == _subject(issued.leaf.cert_chain_pems[0])
        assert warning["problem"].startswith(f"the chain is incomplete: {_subject(company.cert_pem)} is issued by"), (
            warning
        )
    with captured(in_namespace("gateway.certificates")) as events:
        assert service.reload() is True  # the same files: the upstream's pool is kept
    assert set(_warnings(events)) == {"listener 127.0.0.1:0", "upstream origin"}, events
    # Trusting the company's root: the chains verify, and the lines are plain info.
    data["listeners"][0]["tls"]["trusted_ca"] = ca_file
    data["upstreams"]["origin"]["tls"]["ca"] = ca_file
    path.write_text(toml(data))
    with captured(in_namespace("gateway.certificates")) as events:
        assert service.reload() is True
    assert _warnings(events) == {}, events
    assert {e["owner"] for e in events} == {"listener 127.0.0.1:0", "upstream origin"}, events


@pytest_twisted.ensureDeferred
async def test_chain_verification_is_exported_beside_the_expiry(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    """gateway_tls_certificate_chain_verified: 1 or 0 per loaded certificate, labelled as the expiry gauge is. An
    expired certificate is served all the same."""
    root = trustme.CA()
    company = root.create_child_ca()
    good = issue(company, tmp_path, HOST, stem="good")
    old = expired(root, tmp_path, "old.example.com")
    mine = issue(company, tmp_path / "client", "gateway.internal", stem="client")
    data = tls_config(origin.url, trusted_ca=str(write_ca(root, tmp_path / "company-ca.pem")))
    data["listeners"][0]["tls"]["certificates"] = [good.table(chain=False), old.table()]
    data["upstreams"]["other"] = {"url": "https://127.0.0.1:9", "tls": mine.table(chain=False)}  # no ca
    data["routes"].append({"name": "other", "path_prefix": "/other", "upstream": "other", "auth": "anonymous"})
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    gateway = gateway_for(data)
    assert (await get(gateway.port, client_options(root, HOST))).response().status == 200
    assert (await deferToThread(_served_serial_unverified, gateway.port, "old.example.com")) == old.serial()
    metrics = await scrape(admin_port(gateway))
    verified = {
        (dict(labels)["owner"], dict(labels)["certificate"], dict(labels)["names"]): value
        for labels, value in metrics.labelled("gateway_tls_certificate_chain_verified").items()
    }
    assert verified == {
        ("listener 127.0.0.1:0", str(good.certificate), HOST): 1.0,
        ("listener 127.0.0.1:0", str(old.certificate), "old.example.com"): 0.0,
        ("upstream other", str(mine.certificate), "gateway.internal"): 0.0,
    }, verified
    expiry = metrics.labelled("gateway_tls_certificate_expiry_timestamp_seconds")
    assert set(expiry) == set(metrics.labelled("gateway_tls_certificate_chain_verified"))


@pytest_twisted.ensureDeferred
async def test_a_company_ca_leaf_and_intermediate_are_served_to_a_client_trusting_its_root(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    """The usual company setup, with no trusted_ca: the certificate file holds the leaf and the intermediate,
    the gateway starts (warning that the chain does not verify against the system's roots) and sends both, and
    a client that trusts the company's root completes a request."""
    root = trustme.CA(organization_name="Company Root")
    company = root.create_child_ca()
    served = issue(company, tmp_path, HOST)
    data = tls_config(origin.url)
    data["listeners"][0]["tls"]["certificates"] = [served.table(chain=False)]
    gateway = gateway_for(data)
    assert not gateway.service.listeners[0].tls.contexts.certificates[0].chain_verified
    client = await get(gateway.port, client_options(root, HOST))
    assert client.response().status == 200, client.response()
    assert served_serial(client) == served.serial()


def _mtls_config(origin_url: str, server: Any, client_ca: Path, mode: str) -> dict[str, Any]:
    data = tls_config(origin_url, server, client_certificates=mode, client_ca=str(client_ca))
    data["auth"] = {"certs": {"type": "mtls", "identity_header": "X-Client-Subject"}, "keys": {"type": "api_key"}}
    data["consumers"] = {
        "billing": {"client_certificates": ["DNS:billing.internal"], "scopes": ["reports"]},
        "ops": {"api_keys": [hash_key("gwk_test")]},
    }
    data["routes"][0]["auth"] = ["certs", "keys"]
    return data


@pytest_twisted.ensureDeferred
async def test_client_certificates(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    ca, clients, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = issue(ca, tmp_path, HOST)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.cert_pem.bytes())
    billing = clients.issue_cert("billing.internal", common_name="billing")
    unknown = clients.issue_cert("nobody.internal")
    stranger = stranger_ca.issue_cert("billing.internal")
    gateway = gateway_for(_mtls_config(origin.url, server, client_ca, "request"))
    # Mapped: admitted as the consumer, the subject upstream, a client's copy of the header removed.
    client = await get(gateway.port, client_options(ca, HOST, billing), extra="X-Client-Subject: forged\r\n")
    headers = json.loads(client.response().body)["headers"]
    assert ["X-Consumer-Id", "billing"] in headers or ["X-Consumer-ID", "billing"] in headers, headers
    subjects = [value for name, value in headers if name.lower() == "x-client-subject"]
    assert len(subjects) == 1 and subjects[0].startswith("CN=billing,"), headers
    # None sent: the route's other method may decide; with no credential at all, 401.
    assert (await get(gateway.port, client_options(ca, HOST))).response().status == 401
    keyed = await get(gateway.port, client_options(ca, HOST), extra="X-Api-Key: gwk_test\r\n")
    assert keyed.response().status == 200
    # Valid but no consumer claims it: 403. From another CA: the handshake fails.
    assert (await get(gateway.port, client_options(ca, HOST, unknown))).response().status == 403
    refused = await get(gateway.port, client_options(ca, HOST, stranger))
    assert refused.received == 0 and refused.reason.check(SSL.Error), refused.reason


@pytest_twisted.ensureDeferred
async def test_client_certificates_mapped_by_common_name(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    """`cn:billing` admits a certificate whose subject's CN is "billing" (whatever its DNS names), and not one
    that has "billing" only as a DNS name: that one is `dns:billing`'s consumer. A CN is matched exactly."""
    ca, clients = trustme.CA(), trustme.CA()
    server = issue(ca, tmp_path, HOST)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.cert_pem.bytes())
    data = _mtls_config(origin.url, server, client_ca, "request")
    data["consumers"] = {
        "billing": {"client_certificates": ["cn:billing"]},
        "named": {"client_certificates": ["dns:billing"]},
    }
    gateway = gateway_for(data)
    cases = [
        (clients.issue_cert("pod-7.billing.internal", common_name="billing"), 200, "billing"),
        (clients.issue_cert("billing", common_name="someone-else"), 200, "named"),
        (clients.issue_cert("pod-8.billing.internal", common_name="Billing"), 403, None),
    ]
    for leaf, status, consumer in cases:
        response = (await get(gateway.port, client_options(ca, HOST, leaf))).response()
        assert response.status == status, response.body
        if consumer is not None:
            headers = {name.lower(): value for name, value in json.loads(response.body)["headers"]}
            assert headers["x-consumer-id"] == consumer


@pytest_twisted.ensureDeferred
async def test_required_client_certificate_refuses_the_handshake(
    tmp_path: Path, origin: Origin, gateway_for: Any
) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    server = issue(ca, tmp_path, HOST)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.cert_pem.bytes())
    gateway = gateway_for(_mtls_config(origin.url, server, client_ca, "require"))
    refused = await get(gateway.port, client_options(ca, HOST))
    assert refused.received == 0 and refused.reason.check(SSL.Error), refused.reason
    billing = clients.issue_cert("billing.internal")
    assert (await get(gateway.port, client_options(ca, HOST, billing))).response().status == 200


@pytest_twisted.ensureDeferred
async def test_failed_handshakes_are_counted_by_reason(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    ca, clients, stranger_ca = trustme.CA(key_type=trustme.KeyType.RSA), trustme.CA(), trustme.CA()
    server = issue(ca, tmp_path, HOST)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(clients.cert_pem.bytes())
    data = _mtls_config(origin.url, server, client_ca, "require")
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    gateway = gateway_for(data)
    billing = clients.issue_cert("billing.internal")
    # Not counted: a handshake that succeeds, and a client that leaves before sending a byte.
    assert (await get(gateway.port, client_options(ca, HOST, billing))).response().status == 200
    idle = await connect(gateway.port)
    idle.transport.loseConnection()
    await within(idle.closed)
    # Nor a connection that fails with a TLS error after its handshake (a record that does not decrypt).
    broken = await connect(gateway.port, tls=client_options(ca, HOST, billing))
    broken.send(f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await within(broken.received_at_least(1))
    broken.transport.transport.write(b"\x17\x03\x03\x00\x20" + bytes(32))  # under the TLS layer: not sealed
    await within(broken.closed)
    # Counted, each under its class.
    assert (await deferToThread(_old_client, gateway.port, ssl.TLSVersion.TLSv1_1)).startswith("refused")
    plain = await connect(gateway.port, keep_all=True)
    plain.send(f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await within(plain.closed)
    for options in (client_options(ca, HOST), client_options(ca, HOST, stranger_ca.issue_cert("billing.internal"))):
        refused = await get(gateway.port, options)
        assert refused.received == 0 and refused.reason.check(SSL.Error), refused.reason
    distrusting = await get(gateway.port, client_options(stranger_ca, HOST, billing))
    assert distrusting.received == 0 and distrusting.reason.check(SSL.Error), distrusting.reason

    name = "gateway_tls_handshake_failures_total"
    listener = "127.0.0.1:0"  # the listener as configured (as the certificate-expiry metric names it)
    expected = {"protocol_version": 1.0, "plain_http": 1.0, "client_certificate": 2.0, "certificate_refused": 1.0}
    metrics = await scraped_until(
        admin_port(gateway), lambda s: sum(s.labelled(name).values()) >= 5, "five failed handshakes counted"
    )
    counted = {dict(labels)["reason"]: value for labels, value in metrics.labelled(name).items()}
    assert counted == expected, counted
    assert {dict(labels)["listener"] for labels in metrics.labelled(name)} == {listener}


def _https_origin(leaf: trustme.LeafCert, client_ca: trustme.CA | None = None) -> Origin:
    """An HTTPS test origin serving `leaf`; with `client_ca`, one that requires a client certificate from it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    mtls: dict[str, Any] = {}
    if client_ca is not None:
        mtls = {
            "verify": True,
            "requireCertificate": True,
            "caCerts": [Certificate.loadPEM(client_ca.cert_pem.bytes()).original],
        }
    options = CertificateOptions(
        privateKey=serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None),
        certificate=x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()),
        **mtls,
    )
    return Origin().start(tls=options)


async def _status_through(gateway: Any) -> Any:
    client = await connect(gateway.port, keep_all=True)
    client.send(b"GET /status/200 HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
    await within(client.closed)
    return client.response()


@pytest_twisted.ensureDeferred
async def test_https_upstreams(tmp_path: Path, gateway_for: Any, caplog: Any) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    origins = [_https_origin(ca.issue_cert("127.0.0.1")), _https_origin(trustme.CA().issue_cert("127.0.0.1"))]
    wrong_name = _https_origin(ca.issue_cert("elsewhere.test"))
    origins.append(wrong_name)
    try:
        trusted, self_signed, mismatched = origins
        cases = [
            (trusted, {"ca": str(ca_file)}, 200, None),
            (self_signed, {"ca": str(ca_file)}, 502, "untrusted certificate"),
            (mismatched, {"ca": str(ca_file)}, 502, "name mismatch"),
            (self_signed, {"verify": False}, 200, None),
        ]
        for origin, tls, status, reason in cases:
            data = gateway_config(origin.url, access_log={"path": ""}, upstream={"tls": tls})
            with captured(in_namespace("gateway.upstream")) as events:
                gateway = gateway_for(data)
            warnings = [e for e in events if "verification is OFF" in e["log_format"]]
            assert len(warnings) == (1 if tls.get("verify") is False else 0), events
            response = await _status_through(gateway)
            assert response.status == status, (tls, response.body)
            if reason is not None:
                problem = json.loads(response.body)
                assert problem["type"] == "urn:gateway:problem:upstream-tls-failed"
                assert problem["detail"].endswith(reason), problem
    finally:
        for origin in origins:
            await origin.stop()


@pytest_twisted.ensureDeferred
async def test_client_certificate_towards_an_upstream(tmp_path: Path, gateway_for: Any) -> None:
    """An upstream that requires a client certificate gets the configured one; without it the handshake fails
    (502, "handshake failed")."""
    ca, ours = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    strict = _https_origin(ca.issue_cert("127.0.0.1"), client_ca=ours)
    try:
        mine = issue(ours, tmp_path / "client", "gateway.internal", stem="gateway")
        with_certificate = {"ca": str(ca_file), **mine.table()}
        gateway = gateway_for(gateway_config(strict.url, access_log={"path": ""}, upstream={"tls": with_certificate}))
        assert (await _status_through(gateway)).status == 200
        without = gateway_for(
            gateway_config(strict.url, access_log={"path": ""}, upstream={"tls": {"ca": str(ca_file)}})
        )
        refused = await _status_through(without)
        assert refused.status == 502
        problem = json.loads(refused.body)
        assert problem["type"] == "urn:gateway:problem:upstream-tls-failed"
        assert problem["detail"].endswith("handshake failed"), problem
    finally:
        await strict.stop()


@pytest_twisted.ensureDeferred
async def test_redirect_and_hsts(tmp_path: Path, origin: Origin, gateway_for: Any) -> None:
    ca = trustme.CA()
    data = tls_config(origin.url, issue(ca, tmp_path, HOST))
    data["listeners"].append({"host": "127.0.0.1", "port": 0, "redirect_to_https": 8443})
    data["routes"][0]["strict_transport_security"] = "max-age=31536000; includeSubDomains"
    gateway = gateway_for(data)
    secure = (await get(gateway.port, client_options(ca, HOST))).response()
    assert secure.header(b"strict-transport-security") == b"max-age=31536000; includeSubDomains"
    plain_port = gateway.service.listeners[1].port.getHost().port
    for method, status in (("GET", 301), ("POST", 308)):
        client = await connect(plain_port, keep_all=True)
        client.send(
            f"{method} /a?b=1 HTTP/1.1\r\nHost: {HOST}:80\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await within(client.closed)
        response = client.response()
        assert response.status == status
        assert response.header(b"location") == f"https://{HOST}:8443/a?b=1".encode()
        assert response.header(b"strict-transport-security") is None  # never over plain HTTP


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("no shared cipher", "no_shared_cipher"),
        ("tlsv1 alert unknown ca", "certificate_refused"),
        ("peer did not return a certificate", "client_certificate"),
        ("unsupported protocol", "protocol_version"),
        ("bad record mac", "other"),
    ],
)
def test_handshake_failure_classes_are_bounded(reason: str, expected: str) -> None:
    from gateway.tls.server import handshake_failure

    assert handshake_failure(SSL.Error([("SSL routines", "", reason)])) == expected
