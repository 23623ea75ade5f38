"""TLS for `bench/run.py --tls`: one certificate made for the run, served by every peer with the same ciphers.

The gateway's own choices (gateway/tls/server.py) are the reference: TLS 1.2 and 1.3, its TLS 1.2 cipher list,
OpenSSL's default TLS 1.3 suites, the server's cipher preference, ALPN `http/1.1`, session resumption on. nginx
and HAProxy are configured to the same, with the same ECDSA P-256 certificate, so what differs is the proxy.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench.clients import TLS_NAME
from gateway.tls.server import MODERN_CIPHERS


@dataclass(frozen=True)
class BenchCertificate:
    """The run's certificate files, and a client context that trusts (only) its CA."""

    certificate: Path
    key: Path
    ca: Path
    """The CA's certificate: the chain each peer sends after the certificate (so all send the same bytes)."""
    full_chain: Path
    """Certificate then CA, as nginx wants them."""
    combined: Path
    """Certificate, CA and key in one PEM file, as HAProxy wants them."""

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.set_alpn_protocols(["http/1.1"])
        return context


def make_certificate(directory: Path) -> BenchCertificate:
    """Issue a certificate for TLS_NAME (`localhost`) and 127.0.0.1 from a CA made now, written into `directory`."""
    ca = trustme.CA()
    issued = ca.issue_cert(TLS_NAME, "127.0.0.1")
    files = BenchCertificate(
        certificate=directory / "bench-cert.pem",
        key=directory / "bench-key.pem",
        ca=directory / "bench-ca.pem",
        full_chain=directory / "bench-full-chain.pem",
        combined=directory / "bench-combined.pem",
    )
    leaf, key, root = issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes(), ca.cert_pem.bytes()
    files.certificate.write_bytes(leaf)
    files.key.write_bytes(key)
    files.ca.write_bytes(root)
    files.full_chain.write_bytes(leaf + root)
    files.combined.write_bytes(leaf + root + key)
    return files


def gateway_listener_tls(files: BenchCertificate) -> str:
    """The `[listeners.tls]` tables of the gateway's one listener (its defaults are the reference)."""
    return f"""
[listeners.tls]
min_version = "1.2"
trusted_ca = "{files.ca}"

[[listeners.tls.certificates]]
certificate = "{files.certificate}"
key = "{files.key}"
chain = "{files.ca}"
"""


def nginx_server_tls(files: BenchCertificate) -> str:
    """What an nginx `server` block needs to serve the same TLS as the gateway (`listen ... ssl` aside)."""
    return f"""ssl_certificate {files.full_chain};
        ssl_certificate_key {files.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {MODERN_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;"""


def haproxy_bind_tls(files: BenchCertificate) -> str:
    """What HAProxy's `bind` line needs to serve the same TLS as the gateway."""
    # HAProxy prefers the server's cipher order unless told `prefer-client-ciphers`.
    return f" ssl crt {files.combined} alpn http/1.1 ssl-min-ver TLSv1.2 ciphers {MODERN_CIPHERS}"
