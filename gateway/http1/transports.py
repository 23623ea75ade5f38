"""What the wire layer's protocols use of their transport, as one type for mypy.

A TCP transport (`twisted.internet.tcp.Connection`) and a TLS one (`TLSMemoryBIOProtocol`) each provide
`ITransport`, `IPushProducer` and `IConsumer`, and have `abortConnection` and `disconnecting`, but no interface of
Twisted's names them together (Twisted's own `protocols.portforward` declares `_MakeTypesHappy` for the same
reason). For annotations only: no transport declares it, so never ask it `providedBy`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import Attribute

__all__ = ["IConnectionTransport"]


class IConnectionTransport(ITransport, IPushProducer, IConsumer):
    """A stream transport that is also the producer of what it reads and the consumer of what is written."""

    # An int, not a bool: Twisted's own transports (FileDescriptor) set 0 and 1, and the compiled request path
    # (setup.py) checks the type of what it reads.
    disconnecting: int = Attribute("Whether the connection is being closed (`loseConnection` was called).")

    def abortConnection() -> None:
        """Close the connection at once, dropping what is buffered (as `ITCPTransport.abortConnection`)."""
