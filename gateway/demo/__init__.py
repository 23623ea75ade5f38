"""The demo upstream (`python -m gateway.demo`): what it serves is in `endpoints`, its HTTP/1.1 server in `wire`.

Rule: it is a separate program and imports nothing of the gateway's.
"""

from gateway.demo.endpoints import make_factory, report_chunks

__all__ = ["make_factory", "report_chunks"]
