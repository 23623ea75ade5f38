"""What this gateway is: its version, those of what it runs on, and whether its request path runs compiled, for
`twistd gateway --version` and the `gateway_build_info` metric (the same facts, from one place)."""

from __future__ import annotations

import importlib.util
import platform

import OpenSSL
from OpenSSL import SSL

import twisted
from gateway import __version__

__all__ = ["build", "versions"]


def build() -> str:
    """ "compiled" when the request path runs as mypyc built it (setup.py: `pip install .` on a machine with a C
    compiler and Python's headers), else "interpreted" (the same behaviour, at about 1.3x the CPU per small
    request): an operator can tell which an install got without reading pip's warnings."""
    spec = importlib.util.find_spec("gateway.http1.server")
    origin = spec.origin if spec is not None else None
    return "interpreted" if origin is None or origin.endswith(".py") else "compiled"


def versions() -> dict[str, str]:
    """The gateway's version, Twisted's, Python's and OpenSSL's (the library TLS runs on), and its build, by
    name."""
    return {
        "version": __version__,
        "twisted": twisted.__version__,
        "python": platform.python_version(),
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
        "pyopenssl": OpenSSL.__version__,
        "build": build(),
    }
