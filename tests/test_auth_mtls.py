"""Tests for gateway.auth.mtls: which consumer a verified client certificate proves, by which of its fields, and
which consumer wins when several could; on certificates made in memory (the handshake is tests/test_tls.py's)."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.web.http_headers import Headers

from gateway.auth.identity import AuthRequest, Identity
from gateway.auth.mtls import MtlsAuthenticator
from gateway.config import parse
from gateway.errors import Forbidden
from gateway.tls.server import ClientCertificate
from tests.support.running import gateway_config

_KEY = ec.generate_private_key(ec.SECP256R1())
CN, ORG = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME


def certificate(
    *subject: tuple[x509.ObjectIdentifier, str], sans: tuple[x509.GeneralName, ...] = ()
) -> ClientCertificate:
    """What admission sees of a certificate with `subject` (most general attribute first, as in the certificate)
    and `sans`."""
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return ClientCertificate.of(builder.sign(_KEY, hashes.SHA256()))


def authenticator(**claims: list[str]) -> MtlsAuthenticator:
    """The mtls method of a config whose consumers (by name) claim the given `client_certificates`."""
    data = gateway_config(
        "http://127.0.0.1:8081",
        auth={"certs": {"type": "mtls", "identity_header": "X-Client-Subject"}},
        consumers={name: {"client_certificates": entries} for name, entries in claims.items()},
        route={"auth": ["certs"]},
    )
    admission = parse(data, source="test.toml").admission
    return MtlsAuthenticator(admission.methods["certs"], admission.consumers)  # type: ignore[arg-type]


def consumer_of(auth: MtlsAuthenticator, cert: ClientCertificate) -> str | None:
    """The consumer `cert` is admitted as, or None when it is refused (403)."""
    request = AuthRequest(b"GET", b"/", Headers(), "10.0.0.1", "rid", cert, True)
    try:
        identity = auth.verify(cert, request)
    except Forbidden as refused:
        assert refused.reason == "unknown_client_certificate"
        return None
    assert isinstance(identity, Identity)
    return identity.consumer


def test_a_certificate_carries_its_subject_cns_and_alt_names() -> None:
    """ClientCertificate: the subject as RFC 4514 text, every CN of it, every subjectAltName by kind."""
    cert = certificate(
        (ORG, "Example"),
        (CN, "billing"),
        (CN, "Billing Service"),
        sans=(
            x509.DNSName("Billing.Internal"),
            x509.UniformResourceIdentifier("spiffe://example.org/Billing"),
            x509.RFC822Name("Ops@Example.com"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        ),
    )
    assert cert.subject == "CN=Billing Service,CN=billing,O=Example"
    assert cert.common_names == {"billing", "Billing Service"}
    assert cert.names == {
        "DNS:billing.internal",
        "URI:spiffe://example.org/Billing",
        "email:ops@example.com",
        "IP:10.0.0.5",
    }


@pytest.mark.parametrize(
    ("claim", "cert", "admitted"),
    [
        # cn: the subject's CN, exactly; never a DNS name, a URI, an email address or a DN of the same text.
        ("cn:billing", certificate((ORG, "Example"), (CN, "billing")), True),
        ("cn:billing", certificate((CN, "other"), sans=(x509.DNSName("billing"),)), False),
        ("cn:billing", certificate((CN, "other"), sans=(x509.UniformResourceIdentifier("billing"),)), False),
        ("cn:Billing", certificate((CN, "billing")), False),
        ("cn:billing", certificate((ORG, "billing")), False),
        ("cn:CN=billing", certificate((CN, "billing")), False),
        # dns: a DNS subjectAltName, whatever its case; never the CN.
        ("dns:billing", certificate((CN, "other"), sans=(x509.DNSName("Billing"),)), True),
        ("DNS:Billing", certificate((CN, "other"), sans=(x509.DNSName("billing"),)), True),
        ("dns:billing", certificate((CN, "billing")), False),
        ("dns:billing", certificate((CN, "x"), sans=(x509.UniformResourceIdentifier("billing"),)), False),
        # email: an email subjectAltName, whatever its case; never a CN holding an address.
        ("email:ops@example.com", certificate((CN, "x"), sans=(x509.RFC822Name("OPS@example.com"),)), True),
        ("email:ops@example.com", certificate((CN, "ops@example.com")), False),
        ("email:ops@example.com", certificate((CN, "x"), sans=(x509.DNSName("ops@example.com"),)), False),
        # uri: a URI subjectAltName, exactly.
        (
            "uri:spiffe://e.org/a",
            certificate((CN, "x"), sans=(x509.UniformResourceIdentifier("spiffe://e.org/a"),)),
            True,
        ),
        (
            "uri:spiffe://e.org/A",
            certificate((CN, "x"), sans=(x509.UniformResourceIdentifier("spiffe://e.org/a"),)),
            False,
        ),
        ("uri:spiffe://e.org/a", certificate((CN, "spiffe://e.org/a")), False),
        # ip: an IP subjectAltName, in any spelling.
        ("ip:2001:db8::0:1", certificate((CN, "x"), sans=(x509.IPAddress(ipaddress.ip_address("2001:db8::1")),)), True),
        ("ip:10.0.0.5", certificate((CN, "10.0.0.5")), False),
        # dn: the whole subject, however the config spells it; never a part of it, never a CN of that text.
        ("dn:CN=billing,O=Example", certificate((ORG, "Example"), (CN, "billing")), True),
        ("cn=billing,o=Example", certificate((ORG, "Example"), (CN, "billing")), True),
        ("dn:CN=billing", certificate((ORG, "Example"), (CN, "billing")), False),
        ("dn:CN=billing,O=Example", certificate((CN, "CN=billing,O=Example")), False),
    ],
)
def test_each_form_matches_its_own_field_only(claim: str, cert: ClientCertificate, admitted: bool) -> None:
    """A consumer's claim matches the field it names and no other, even where another field holds its text."""
    assert consumer_of(authenticator(billing=[claim]), cert) == ("billing" if admitted else None)


def test_a_cn_and_a_dns_name_of_one_text_prove_two_consumers() -> None:
    """One consumer claims cn:billing and another dns:billing: a certificate whose CN is "billing" proves the
    first, one whose DNS name is "billing" the second."""
    auth = authenticator(by_cn=["cn:billing"], by_dns=["dns:billing"])
    assert consumer_of(auth, certificate((CN, "billing"))) == "by_cn"
    assert consumer_of(auth, certificate((CN, "other"), sans=(x509.DNSName("billing"),))) == "by_dns"


def test_precedence_dn_then_cn_then_alt_names_in_order() -> None:
    """When several consumers claim fields of one certificate: the subject DN wins, then the CN (the smallest of
    several), then the subjectAltNames: DNS, IP, URI, email, each by its smallest value."""
    cert = certificate(
        (ORG, "Example"),
        (CN, "zeta"),
        (CN, "alpha"),
        sans=(
            x509.RFC822Name("ops@example.com"),
            x509.UniformResourceIdentifier("spiffe://example.org/billing"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
            x509.DNSName("z.internal"),
            x509.DNSName("a.internal"),
        ),
    )
    claims: dict[str, list[str]] = {
        "dn": ["dn:CN=alpha,CN=zeta,O=Example"],
        "cn_alpha": ["cn:alpha"],
        "cn_zeta": ["cn:zeta"],
        "dns_a": ["dns:a.internal"],
        "dns_z": ["dns:z.internal"],
        "ip": ["ip:10.0.0.5"],
        "uri": ["uri:spiffe://example.org/billing"],
        "email": ["email:ops@example.com"],
    }
    order = []
    while claims:
        winner = consumer_of(authenticator(**claims), cert)
        assert winner is not None
        order.append(winner)
        del claims[winner]
    assert order == ["dn", "cn_alpha", "cn_zeta", "dns_a", "dns_z", "ip", "uri", "email"]


def test_a_certificate_is_cheap_to_verify() -> None:
    """The handshake verified it; the method only maps it, whether a consumer claims it or not."""
    auth = authenticator(billing=["cn:billing"])
    assert auth.verifies_cheaply(certificate((CN, "billing")))
    assert auth.verifies_cheaply(certificate((CN, "nobody")))


def test_the_subject_goes_upstream_in_the_identity_header() -> None:
    """The identity carries the certificate's subject in the configured header, whichever field mapped it."""
    auth = authenticator(billing=["cn:billing"])
    cert = certificate((ORG, "Example"), (CN, "billing"))
    identity: Any = auth.verify(cert, AuthRequest(b"GET", b"/", Headers(), "10.0.0.1", "rid", cert, True))
    assert identity.headers == ((b"X-Client-Subject", b"CN=billing,O=Example"),)
    assert auth.upstream_headers() == {b"x-client-subject"}
