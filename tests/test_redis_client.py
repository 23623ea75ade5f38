"""Tests for gateway.redis.client against a real redis-server on loopback: the pool, AUTH, timeouts while Redis
is silent, and connections made again after Redis comes back."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.redis.client import RedisClient, RedisUnavailable, answered_within
from gateway.redis.protocol import Arg, RedisError
from tests.support.redis import RedisServer
from tests.support.scrape import until

_sync = SynchronousTestCase()


def client_for(server: RedisServer, *, setup: list[tuple[Arg, ...]] | None = None, **kwargs: float) -> RedisClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    client = RedisClient(reactor, endpoint, setup=setup or [], **kwargs)  # type: ignore[arg-type]
    client.start()
    return client


@pytest_twisted.ensureDeferred
async def test_pool_sends_and_answers(redis_server: RedisServer) -> None:
    """Every connection of the pool is made; commands are answered; close closes them all."""
    client = client_for(redis_server, pool_size=3, timeout=5.0)
    try:
        await until(lambda: client.ready == 3, "3 connections ready")
        assert await client.execute("SET", "k", "v") == "OK"
        answers = [client.execute("INCR", "n") for _ in range(10)]
        assert sorted([await d for d in answers]) == list(range(1, 11))
        assert await client.execute("GET", "k") == b"v"
    finally:
        await client.close()
    assert client.ready == 0


@pytest_twisted.ensureDeferred
async def test_no_connection_fails_at_once(redis_server: RedisServer) -> None:
    """Before any connection is ready a command fails at once with RedisUnavailable: nobody waits to connect."""
    client = client_for(redis_server)
    try:
        failed = False
        try:
            await client.execute("PING")
        except RedisUnavailable:
            failed = True
        assert failed
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_password(tmp_path: Path) -> None:
    """With the right password in the setup the pool becomes ready; with a wrong one it never does."""
    server = RedisServer(tmp_path, password="s3cret").start()
    good = client_for(server, setup=[("AUTH", "s3cret")], timeout=5.0)
    bad = client_for(server, setup=[("AUTH", "wrong")], timeout=5.0)
    try:
        await until(lambda: good.ready == 2 and bad.failed_attempts >= 2, "the good pool ready, the bad one retrying")
        assert await good.execute("PING") == "PONG"
        assert bad.ready == 0 and not bad.ever_ready
    finally:
        await good.close()
        await bad.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_error_reply(redis_server: RedisServer) -> None:
    """An error reply fails the command with RedisError and leaves the connection usable."""
    client = client_for(redis_server, timeout=5.0)
    try:
        await until(lambda: client.ready == 2, "2 connections ready")
        try:
            await client.execute("EVALSHA", "0" * 40, 0)
            raise AssertionError("EVALSHA of an unknown script succeeded")
        except RedisError as e:
            assert e.kind == "NOSCRIPT"
        assert await client.execute("PING") == "PONG"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_silent_redis_times_out(redis_server: RedisServer) -> None:
    """While Redis is stopped (SIGSTOP) a command fails with TimeoutError after the timeout; once it resumes the
    same connections answer again."""
    client = client_for(redis_server, timeout=0.05)
    try:
        await until(lambda: client.ready == 2, "2 connections ready")
        redis_server.pause()
        try:
            timed_out = False
            try:
                await client.execute("PING")
            except TimeoutError:
                timed_out = True
            assert timed_out
        finally:
            redis_server.resume()
        await until(lambda: client.ready == 2, "2 connections ready")
        assert await client.execute("PING", timeout=5.0) == "PONG"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_connections_made_again(redis_server: RedisServer) -> None:
    """When Redis goes away commands fail at once; when it comes back on its port the pool is made again."""
    client = client_for(redis_server, timeout=5.0)
    try:
        await until(lambda: client.ready == 2, "2 connections ready")
        redis_server.stop()
        await until(lambda: client.ready == 0, "0 connections ready")
        failed = False
        try:
            await client.execute("PING")
        except RedisUnavailable:
            failed = True
        assert failed
        redis_server.start()
        await until(lambda: client.ready == 2, "2 connections ready")
        assert await client.execute("PING") == "PONG"
    finally:
        await client.close()


class TurnClock(Clock):
    """A Clock that runs, as a reactor's turn does, only the calls due when the turn began: a call made during a
    turn waits for the next (`task.Clock.advance` would run it at once)."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def test_a_reply_read_in_the_turn_its_deadline_came_wins() -> None:
    """The timeout is judged one reactor turn after its deadline: a reply the reactor reads in the turn whose
    timers ran the deadline (it was busy: timers run before sockets are read) is the answer; with none by the next
    turn, TimeoutError."""
    clock = TurnClock()
    waiting: Deferred[object] = Deferred()
    answered = answered_within(waiting, 0.01, clock)
    clock.advance(0.01)  # the deadline's turn: its timers run first...
    waiting.callback(b"PONG")  # ...then the socket is read
    clock.advance(0)
    assert _sync.successResultOf(answered) == b"PONG"
    assert clock.getDelayedCalls() == []

    late: Deferred[object] = Deferred()
    failed = answered_within(late, 0.01, clock)
    clock.advance(0.01)
    clock.advance(0)
    _sync.failureResultOf(failed, TimeoutError)
    late.callback(b"PONG")  # a reply after the caller gave up goes nowhere
    assert clock.getDelayedCalls() == []
