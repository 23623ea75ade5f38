"""Tests for gateway.redis.protocol: RESP2 encoding and parsing, and one pipelined connection over a
StringTransport."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.redis.protocol import RedisError, RedisProtocol, Reply, RespParser, RespProtocolError, encode

_sync = SynchronousTestCase()

CASES: list[tuple[bytes, Reply]] = [
    (b"+OK\r\n", "OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$2\r\nab\r\n*2\r\n:2\r\n$-1\r\n", [1, b"ab", [2, None]]),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
]


def test_encode_is_an_array_of_bulk_strings() -> None:
    """Every argument, whatever its type, is sent as a bulk string."""
    assert encode("EVALSHA", b"ab", 2, 0.5) == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n0.5\r\n"


@pytest.mark.parametrize(("wire", "reply"), CASES)
def test_parse_whole_and_byte_by_byte(wire: bytes, reply: Reply) -> None:
    """Each reply type parses the same whether it comes at once or one byte at a time."""
    assert RespParser().feed(wire) == [reply]
    parser = RespParser()
    seen: list[Reply] = []
    for i in range(len(wire)):
        seen += parser.feed(wire[i : i + 1])
    assert seen == [reply]


def test_several_replies_in_one_read() -> None:
    """Replies that arrive together come out in order, and a partial one waits for its rest."""
    parser = RespParser()
    assert parser.feed(b"+OK\r\n:1\r\n$3\r\nab") == ["OK", 1]
    assert parser.feed(b"c\r\n") == [b"abc"]


def test_errors() -> None:
    """An error reply is a RedisError value, with its kind; inside an array it stays in place."""
    (error,) = RespParser().feed(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(error, RedisError) and error.kind == "NOSCRIPT"
    (array,) = RespParser().feed(b"*2\r\n-ERR x\r\n:1\r\n")
    assert isinstance(array, list) and isinstance(array[0], RedisError) and array[1] == 1


@pytest.mark.parametrize("wire", [b"?x\r\n", b":x\r\n", b"$x\r\n", b"$2\r\nabcd\r\n", b"$999999999\r\n"])
def test_not_resp(wire: bytes) -> None:
    """Bytes that are not RESP2 (or a reply larger than any the store expects) are refused."""
    with pytest.raises(RespProtocolError):
        RespParser().feed(wire)


def connected() -> tuple[RedisProtocol, StringTransport]:
    protocol = RedisProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_pipeline_in_one_write_answered_in_order() -> None:
    """Commands sent together go out in one write; replies answer them in order."""
    protocol, transport = connected()
    first, second = protocol.send([("GET", "a"), ("INCR", "b")])
    assert transport.value() == encode("GET", "a") + encode("INCR", "b")
    assert protocol.pending == 2
    protocol.dataReceived(b"$1\r\nx\r\n:")
    assert _sync.successResultOf(first) == b"x"
    _sync.assertNoResult(second)
    protocol.dataReceived(b"3\r\n")
    assert _sync.successResultOf(second) == 3
    assert protocol.pending == 0


def test_error_reply_fails_only_its_command() -> None:
    """An error reply fails its own command's Deferred; the next command is answered normally."""
    protocol, _ = connected()
    first, second = protocol.send([("EVALSHA", "0"), ("PING",)])
    protocol.dataReceived(b"-NOSCRIPT x\r\n+PONG\r\n")
    assert _sync.failureResultOf(first, RedisError).value.kind == "NOSCRIPT"
    assert _sync.successResultOf(second) == "PONG"


def test_timed_out_command_keeps_its_place() -> None:
    """A command whose caller timed out still has its reply dropped in turn: later replies go to later commands."""
    clock = Clock()
    protocol, _ = connected()
    (slow,) = protocol.send([("GET", "a")])
    slow.addTimeout(0.005, clock)
    clock.advance(0.005)
    _sync.failureResultOf(slow, TimeoutError)
    (late,) = protocol.send([("GET", "b")])
    protocol.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n")
    assert _sync.successResultOf(late) == b"b"
    assert clock.getDelayedCalls() == []


def test_lost_connection_fails_every_waiting_command() -> None:
    """A lost connection fails what waits on it, fires `on_lost`, and refuses new commands at once."""
    protocol, _ = connected()
    waits = protocol.send([("PING",), ("PING",)])
    lost: Deferred[None] = Deferred()
    protocol.on_lost = lost
    protocol.connectionLost(Failure(ConnectionDone()))
    for d in waits:
        _sync.failureResultOf(d, ConnectionDone)
    _sync.successResultOf(lost)
    (after,) = protocol.send([("PING",)])
    _sync.failureResultOf(after, ConnectionError)


def test_garbage_closes_the_connection() -> None:
    """Bytes that are not RESP fail what waits and close the connection: replies can no longer be paired."""
    protocol, transport = connected()
    (d,) = protocol.send([("PING",)])
    protocol.dataReceived(b"!!\r\n")
    _sync.failureResultOf(d, RespProtocolError)
    assert transport.disconnecting


def test_unasked_reply_closes_the_connection() -> None:
    """A reply with no command waiting for it closes the connection."""
    protocol, transport = connected()
    protocol.dataReceived(b"+OK\r\n")
    assert transport.disconnecting
