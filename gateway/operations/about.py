"""What this gateway is: its version and those of what it runs on, for `twistd gateway --version` and the
`gateway_build_info` metric (the same four, from one place)."""

from __future__ import annotations

import platform

import OpenSSL
from OpenSSL import SSL

import twisted
from gateway import __version__

__all__ = ["versions"]


def versions() -> dict[str, str]:
    """The gateway's version, Twisted's, Python's and OpenSSL's (the library TLS runs on), by name."""
    return {
        "version": __version__,
        "twisted": twisted.__version__,
        "python": platform.python_version(),
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
        "pyopenssl": OpenSSL.__version__,
    }
