"""gateway: a streaming HTTP API gateway on Twisted."""

__version__ = "0.1.0"
