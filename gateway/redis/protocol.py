"""RESP2, the Redis wire protocol: commands encoded as arrays of bulk strings, replies parsed incrementally, and
a Twisted protocol that pipelines commands over one connection.

Rule: replies come back in the order commands were sent, so each connection keeps one queue of waiting
Deferreds and pops one per reply; a command whose caller stopped waiting (a timeout cancelled its Deferred) keeps
its place in the queue and its reply is dropped when it comes. A connection that is lost fails every command still
waiting on it. The parser holds at most one reply's bytes beyond what it has parsed.

Why our own: `txredisapi` (1.6) is one untyped 100 KiB module with its own reconnecting pool and no timeout per
command; the `redis` package's parsers live under its private `redis._parsers`. RESP2 is five reply types; the
protocol and its parser are smaller than the glue either library would need, typed, and testable over a
`StringTransport`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = ["MAX_REPLY", "Arg", "RedisError", "RedisProtocol", "Reply", "RespParser", "RespProtocolError", "encode"]

Arg = bytes | str | int | float
MAX_REPLY = 16 * 1024 * 1024
"""The largest bulk string or array accepted: the limit store's replies are a few dozen integers."""


class RedisError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`): the command was refused, the connection is fine."""

    @property
    def kind(self) -> str:
        """The error's first word (ERR, NOSCRIPT, WRONGPASS...)."""
        return str(self.args[0]).split(" ", 1)[0]


Reply: TypeAlias = bytes | int | str | list["Reply"] | RedisError | None
"""One parsed reply: a bulk string (bytes), an integer, a status line (str), nil (None), an array, or an error
inside an array (an error reply to a whole command fails its Deferred instead)."""


class RespProtocolError(Exception):
    """Bytes that are not RESP2: the connection can no longer be trusted to pair replies with commands."""


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return repr(value).encode("ascii")


def encode(*args: Arg) -> bytes:
    """One command as RESP2: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


class RespParser:
    """Turns bytes into replies, keeping what ends inside a reply for the next `feed`."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by `data`, in order."""
        self._buffer += data
        replies: list[Reply] = []
        while self._buffer:
            try:
                reply, end = self._parse(0)
            except _Incomplete:
                if len(self._buffer) > MAX_REPLY + 64:
                    raise RespProtocolError("reply too large") from None
                break
            replies.append(reply)
            self._buffer = self._buffer[end:]
        return replies

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            raise _Incomplete
        return self._buffer[start:end], end + 2

    def _length(self, text: bytes) -> int:
        try:
            length = int(text)
        except ValueError:
            raise RespProtocolError(f"bad length {text!r}") from None
        if length > MAX_REPLY:
            raise RespProtocolError(f"reply too large ({length})")
        return length

    def _parse(self, start: int) -> tuple[Reply, int]:
        if start >= len(self._buffer):
            raise _Incomplete
        kind = self._buffer[start : start + 1]
        line, end = self._line(start + 1)
        if kind == b"+":
            return line.decode("utf-8", "replace"), end
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace")), end
        if kind == b":":
            try:
                return int(line), end
            except ValueError:
                raise RespProtocolError(f"bad integer {line!r}") from None
        if kind == b"$":
            length = self._length(line)
            if length < 0:
                return None, end
            if len(self._buffer) < end + length + 2:
                raise _Incomplete
            if self._buffer[end + length : end + length + 2] != b"\r\n":
                raise RespProtocolError("bulk string without its CRLF")
            return self._buffer[end : end + length], end + length + 2
        if kind == b"*":
            count = self._length(line)
            if count < 0:
                return None, end
            items: list[Reply] = []
            for _ in range(count):
                item, end = self._parse(end)
                items.append(item)
            return items, end
        raise RespProtocolError(f"unknown reply type {kind!r}")


class RedisProtocol(Protocol):
    """One connection to Redis: `send` writes commands at once and answers each through its own Deferred."""

    def __init__(self) -> None:
        self._parser = RespParser()
        self._waiting: deque[Deferred[Reply]] = deque()
        self.lost = False
        self.on_lost: Deferred[None] | None = None
        """Fired (once) when the connection is lost, for whoever keeps this connection."""

    @property
    def pending(self) -> int:
        """Commands sent and not answered yet (for choosing the least busy connection)."""
        return len(self._waiting)

    def send(self, commands: Sequence[Sequence[Arg]]) -> list[Deferred[Reply]]:
        """Write `commands` in one write (a pipeline); one Deferred per command, failing with `RedisError` for an
        error reply and with the connection's loss if it goes first."""
        waits: list[Deferred[Reply]] = [Deferred() for _ in commands]
        if self.lost or self.transport is None:
            for d in waits:
                d.errback(Failure(ConnectionError("not connected to Redis")))
            return waits
        self._waiting.extend(waits)
        self.transport.write(b"".join(encode(*command) for command in commands))
        return waits

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except RespProtocolError as e:
            self._fail_all(Failure(e))
            if self.transport is not None:
                self.transport.loseConnection()
            return
        for reply in replies:
            if not self._waiting:
                self._fail_all(Failure(RespProtocolError("a reply nobody asked for")))
                if self.transport is not None:
                    self.transport.loseConnection()
                return
            d = self._waiting.popleft()
            if d.called:
                continue  # its caller stopped waiting (timed out or cancelled)
            if isinstance(reply, RedisError):
                d.errback(Failure(reply))
            else:
                d.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._fail_all(reason)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost.callback(None)

    def _fail_all(self, reason: Failure) -> None:
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            if not d.called:
                d.errback(reason)
