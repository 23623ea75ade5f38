"""gateway: a streaming HTTP API gateway on Twisted."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gateway")
    """The installed distribution's version: pyproject.toml is the one place it is written."""
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
