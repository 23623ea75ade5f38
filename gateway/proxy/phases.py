"""The states of one proxied request, one enum per direction, and the response side's one transition table.

The response side (`Phase`) decides what can still be said to the client; the request side (`Body`) where the
request body's bytes go. The metrics count requests by phase.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

__all__ = ["ANSWERED", "FORWARDED", "TRANSITIONS", "Body", "Phase"]


class Phase(enum.Enum):
    """Where a request is in its life; the response side is what decides what can still be said."""

    HEAD = "head"
    """Its head is read; not decided yet."""
    ADMITTING = "admitting"
    """Routed; waiting for an admission verdict (a JWKS fetch, a bcrypt check, forward auth). The body is not
    read meanwhile, beyond what came with the head: the client's socket is paused at the first body byte."""
    WAITING = "waiting"
    """Admitted: waiting for an upstream slot, a connection or the response head (the body may be flowing)."""
    STREAMING = "streaming"
    """The upstream's response head has been written to the client; its body is being relayed."""
    TUNNEL = "tunnel"
    """The upstream switched protocols (WebSocket): its `101` was written to the client, and the two connections
    are a tunnel until one of them ends (`gateway.proxy.tunnel`)."""
    SENT = "sent"
    """The whole response has been written; `finish` waits for the end of the request body."""
    DONE = "done"
    """Finished cleanly."""
    ABORTED = "aborted"
    """The client connection was cut, because a complete response could no longer be given."""
    CLIENT_GONE = "client_gone"
    """The client went away first."""

    # Members are singletons: hash them by identity (C speed) rather than Enum's hash of the name (Python).
    __hash__ = object.__hash__


TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.HEAD: frozenset({Phase.ADMITTING, Phase.WAITING, Phase.SENT, Phase.CLIENT_GONE}),
    Phase.ADMITTING: frozenset({Phase.WAITING, Phase.SENT, Phase.CLIENT_GONE}),
    Phase.WAITING: frozenset({Phase.STREAMING, Phase.TUNNEL, Phase.SENT, Phase.CLIENT_GONE}),
    Phase.TUNNEL: frozenset({Phase.DONE, Phase.ABORTED, Phase.CLIENT_GONE}),
    Phase.STREAMING: frozenset({Phase.SENT, Phase.ABORTED, Phase.CLIENT_GONE}),
    Phase.SENT: frozenset({Phase.DONE, Phase.ABORTED, Phase.CLIENT_GONE}),
    Phase.DONE: frozenset(),
    Phase.ABORTED: frozenset(),
    Phase.CLIENT_GONE: frozenset(),
}


class Body(enum.Enum):
    """Where the request body is: the request side's state (`Phase` is the response side's)."""

    EXPECTED = "expected"
    """More is to be read; it goes to the upstream (held, while admission decides)."""
    DROPPED = "dropped"
    """More is to be read, and dropped: the upstream takes no more of it."""
    LINGERING = "lingering"
    """More is to be read, and dropped: the answer is complete and the lingering deadline runs."""
    READ = "read"
    """All of it has been read (or there was none)."""

    __hash__ = object.__hash__


FORWARDED: Final = frozenset({Body.EXPECTED, Body.READ})
"""Body states in which what was read (and held back while admission decided) goes to the upstream."""

ANSWERED: Final = frozenset({Phase.SENT, Phase.DONE})
"""Phases of a request whose whole response has been written."""
