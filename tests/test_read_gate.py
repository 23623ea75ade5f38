"""`gateway.upstream._ReadGate`: pauses and resumes asked for while a read is parsed are settled at its end.

Agent pauses the upstream socket when a response head is complete and resumes it when the body gets a
protocol; the gateway gives it one in the same read, so the pair must cost nothing, while any other pause or
resume still reaches the socket.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from gateway.upstream import _ReadGate


class CountingSocket(StringTransport):
    """A socket that records the pauses and resumes it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        super().resumeProducing()


def test_between_reads_pause_and_resume_pass_through_at_once() -> None:
    socket = CountingSocket()
    gate = _ReadGate(socket)
    gate.pauseProducing()
    assert socket.calls == ["pause"]
    gate.resumeProducing()
    assert socket.calls == ["pause", "resume"]


def test_a_pause_undone_within_the_same_read_never_reaches_the_socket() -> None:
    socket = CountingSocket()
    gate = _ReadGate(socket)
    gate.parsing = True
    gate.pauseProducing()
    gate.resumeProducing()
    assert socket.calls == []
    gate.settle()
    assert socket.calls == []
    assert gate.parsing is False


def test_a_pause_left_at_the_end_of_a_read_is_applied_once() -> None:
    socket = CountingSocket()
    gate = _ReadGate(socket)
    gate.parsing = True
    gate.pauseProducing()
    gate.pauseProducing()
    assert socket.calls == []
    gate.settle()
    assert socket.calls == ["pause"]
    assert socket.producerState == "paused"
    gate.resumeProducing()
    assert socket.calls == ["pause", "resume"]


def test_a_resume_then_pause_within_a_read_leaves_a_paused_socket_paused() -> None:
    socket = CountingSocket()
    gate = _ReadGate(socket)
    gate.pauseProducing()
    gate.parsing = True
    gate.resumeProducing()
    gate.pauseProducing()
    gate.settle()
    assert socket.calls == ["pause"]


def test_a_stopped_gate_never_touches_the_socket_again() -> None:
    """Once Agent stops proxying (the response ended), a pending pause is dropped: the connection goes back to
    the pool reading, as Agent leaves it."""
    socket = CountingSocket()
    gate = _ReadGate(socket)
    gate.parsing = True
    gate.pauseProducing()
    gate.stopProxying()
    gate.settle()
    gate.resumeProducing()
    assert socket.calls == []
