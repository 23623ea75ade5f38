"""Rate and concurrency limits in Redis, shared by every worker process and every gateway host that uses it.

Rule: each check is one round trip: one `EVALSHA` of one Lua script (loaded once per connection; `EVAL` again
after a `NOSCRIPT`, as after a Redis restart) applies every operation the check needs atomically, so limits that
apply together (a consumer's concurrency slot and its rate) cost one round trip, and a refusal by one gives back
the slot taken by another within the same call. Time is Redis's own clock (`TIME` in the script), so gateways
whose clocks disagree still share one limit exactly. Every key is under one prefix and has a TTL: a rate key lives
until its burst is whole again, a set of leases until its last lease would expire.

Rates are GCRA, as in `MemoryLimitStore`, in integer microseconds. Concurrency slots are leases: members of a
sorted set scored by their expiry, renewed by their holder every third of their TTL while its requests run, so the
slots of a gateway that dies come free within one TTL. Failed-login counts are rates under their own keys
(`failed:...`), their window the rate's period.

The methods answer through Deferreds, which fail with the client's errors (`RedisUnavailable`,
`twisted.internet.defer.TimeoutError`, `RedisError`, a lost connection): what a failure means for a request is the
caller's choice (fail open or closed), not the store's.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.limits import RateDecision
from gateway.auth.settings.model import RateLimit
from gateway.redis.client import RedisClient
from gateway.redis.protocol import Arg, RedisError, Reply

__all__ = ["SCRIPT", "SCRIPT_SHA", "LimitOp", "RedisLimitStore"]

_log = Logger()

SCRIPT = """-- The gateway's limit operations, applied in one atomic call (gateway.auth.redis_store).
-- KEYS: one per operation. ARGV[1]: "1" = all or nothing (stop at the first refusal and give back the leases this
-- call took), "0" = each on its own. Then per operation its name and arguments:
--   take|peek INTERVAL TOLERANCE       GCRA in microseconds of Redis's own clock (one clock for every gateway)
--   acquire CAP TTL MEMBER             a lease: a member of a sorted set scored by its expiry
--   renew TTL MEMBER                   push a held lease's expiry on (never brings back a released one)
--   release MEMBER
-- Reply: one {allowed, remaining, retry_after_us, reset_us} per operation applied, in order.
-- Every key written gets a TTL: a rate key lives until its burst is whole again, a lease set until its last lease
-- would expire.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local all = ARGV[1] == '1'
local out = {}
local leases = {}
local a = 2

local function undo()
  for _, lease in ipairs(leases) do
    redis.call('ZREM', lease[1], lease[2])
  end
end

for i, key in ipairs(KEYS) do
  local op = ARGV[a]
  if op == 'take' or op == 'peek' then
    local interval = tonumber(ARGV[a + 1])
    local tolerance = tonumber(ARGV[a + 2])
    a = a + 3
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    local early = tat - now
    if early > tolerance then
      out[i] = {0, 0, early - tolerance, early}
      if all then undo() return out end
    else
      if op == 'take' then
        tat = tat + interval
        early = tat - now
        redis.call('SET', key, tat, 'PX', math.ceil(early / 1000) + 1)
      end
      out[i] = {1, math.max(math.floor((tolerance - early) / interval) + 1, 0), 0, early}
    end
  elseif op == 'acquire' then
    local cap = tonumber(ARGV[a + 1])
    local ttl = tonumber(ARGV[a + 2])
    local member = ARGV[a + 3]
    a = a + 4
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < cap then
      redis.call('ZADD', key, now + ttl, member)
      redis.call('PEXPIRE', key, math.ceil(ttl / 1000) + 1)
      leases[#leases + 1] = {key, member}
      out[i] = {1, 0, 0, 0}
    else
      out[i] = {0, 0, 0, 0}
      if all then undo() return out end
    end
  elseif op == 'renew' then
    local ttl = tonumber(ARGV[a + 1])
    local member = ARGV[a + 2]
    a = a + 3
    local kept = redis.call('ZADD', key, 'XX', 'CH', now + ttl, member)
    if kept > 0 then redis.call('PEXPIRE', key, math.ceil(ttl / 1000) + 1) end
    out[i] = {kept, 0, 0, 0}
  elseif op == 'release' then
    local member = ARGV[a + 1]
    a = a + 2
    out[i] = {redis.call('ZREM', key, member), 0, 0, 0}
  else
    return redis.error_reply('ERR unknown limit operation ' .. tostring(op))
  end
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()
_US = 1_000_000
_RENEW_BATCH = 500
"""Leases renewed per script call (a call's arguments stay small however many requests are in flight)."""


class LimitOp(NamedTuple):
    """One operation of a check: its key (without the prefix) and its arguments after the name."""

    name: str
    key: str
    args: tuple[Arg, ...]


def _rate(limit: RateLimit) -> tuple[int, int]:
    """A limit's interval and tolerance in whole microseconds."""
    interval = max(1, round(limit.interval * _US))
    return interval, interval * (limit.burst - 1)


def _decision(reply: Reply) -> RateDecision:
    if not isinstance(reply, list) or len(reply) != 4 or not all(isinstance(n, int) for n in reply):
        raise RedisError(f"ERR unexpected reply from the limit script: {reply!r}")
    allowed, remaining, retry_after, reset = reply
    assert isinstance(allowed, int) and isinstance(remaining, int)
    assert isinstance(retry_after, int) and isinstance(reset, int)
    return RateDecision(allowed == 1, remaining, retry_after / _US, reset / _US)


class RedisLimitStore:
    """The limit operations over a `RedisClient`, under one key prefix."""

    def __init__(self, client: RedisClient, clock: IReactorTime, *, prefix: str = "gateway:", lease_ttl: float = 30.0):
        """`clock` times the renewal of leases; `lease_ttl` is how long a dead gateway's slots stay taken."""
        self._client = client
        self._prefix = prefix
        self._lease_ttl = max(1, round(lease_ttl * _US))
        self._owner = secrets.token_hex(8)
        self._count = 0
        self._leases: dict[str, list[str]] = {}
        """key -> the members of this store's leases held under it (the newest last)."""
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = clock
        self._renewal_period = lease_ttl / 3

    @property
    def client(self) -> RedisClient:
        return self._client

    def start(self) -> None:
        """Connect, and renew held leases every third of their TTL."""
        self._client.start()
        if not self._renewal.running:
            self._renewal.start(self._renewal_period, now=False)

    def close(self) -> Deferred[object]:
        """Stop renewing and close the connections. Leases still held are left to expire (a stopping gateway has
        drained its requests; a reload hands the store on instead of closing it)."""
        if self._renewal.running:
            self._renewal.stop()
        return self._client.close()

    # --- operations -------------------------------------------------------------------------------------------

    def run(self, ops: Sequence[LimitOp], *, all_or_nothing: bool = False) -> Deferred[list[RateDecision | None]]:
        """Apply `ops` atomically in one round trip; one decision per op (None for those not applied because an
        earlier one refused, with `all_or_nothing`: then the leases this call took are given back)."""
        keys = [self._prefix + op.key for op in ops]
        argv: list[Arg] = ["1" if all_or_nothing else "0"]
        for op in ops:
            argv.append(op.name)
            argv.extend(op.args)
        d = self._client.execute("EVALSHA", SCRIPT_SHA, len(keys), *keys, *argv)
        d.addErrback(self._noscript, keys, argv)
        return d.addCallback(self._decisions, len(ops))

    def _noscript(self, reason: Failure, keys: list[str], argv: list[Arg]) -> Deferred[Reply] | Failure:
        if isinstance(reason.value, RedisError) and reason.value.kind == "NOSCRIPT":
            return self._client.execute("EVAL", SCRIPT, len(keys), *keys, *argv)
        return reason

    @staticmethod
    def _decisions(reply: Reply, count: int) -> list[RateDecision | None]:
        if not isinstance(reply, list) or len(reply) > count:
            raise RedisError(f"ERR unexpected reply from the limit script: {reply!r}")
        decisions: list[RateDecision | None] = [_decision(r) for r in reply]
        return decisions + [None] * (count - len(decisions))

    def take_op(self, key: str, limit: RateLimit) -> LimitOp:
        return LimitOp("take", key, _rate(limit))

    def peek_op(self, key: str, limit: RateLimit) -> LimitOp:
        return LimitOp("peek", key, _rate(limit))

    def acquire_op(self, key: str, cap: int) -> LimitOp:
        """An acquire whose lease, when granted, must be recorded with `held` (as `acquire` does)."""
        self._count += 1
        return LimitOp("acquire", key, (cap, self._lease_ttl, f"{self._owner}:{self._count}"))

    def held(self, op: LimitOp) -> None:
        """Record the lease `op` (an acquire) was granted, so it is renewed and `release` gives it back."""
        member = op.args[2]
        assert isinstance(member, str)
        self._leases.setdefault(op.key, []).append(member)

    def take(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
        """Count one request under `key` if it conforms to `limit`."""
        return self.run([self.take_op(key, limit)]).addCallback(_only)

    def peek(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
        """Whether one more request under `key` would conform, without counting it."""
        return self.run([self.peek_op(key, limit)]).addCallback(_only)

    def acquire(self, key: str, cap: int) -> Deferred[bool]:
        """Take one of `cap` concurrency slots of `key` as a lease; False when all are taken."""
        op = self.acquire_op(key, cap)

        def granted(decisions: list[RateDecision | None]) -> bool:
            if _only(decisions).allowed:
                self.held(op)
                return True
            return False

        return self.run([op]).addCallback(granted)

    def release(self, key: str) -> Deferred[None]:
        """Give back a lease taken under `key` (at once here: a failure to tell Redis only leaves it to expire)."""
        members = self._leases.get(key)
        if not members:
            return succeed(None)
        member = members.pop()
        if not members:
            del self._leases[key]
        return self.run([LimitOp("release", key, (member,))]).addCallbacks(
            _nothing, self._release_failed, errbackArgs=(key,)
        )

    def leases(self) -> int:
        """Leases this store holds now (for tests and metrics)."""
        return sum(len(members) for members in self._leases.values())

    def _release_failed(self, reason: Failure, key: str) -> None:
        _log.warn(
            "A concurrency lease of {key} could not be given back ({reason}); it expires by itself",
            key=key,
            reason=reason.getErrorMessage(),
        )

    def _renew(self) -> None:
        held = [(key, member) for key, members in self._leases.items() for member in members]
        for start in range(0, len(held), _RENEW_BATCH):
            ops = [
                LimitOp("renew", key, (self._lease_ttl, member)) for key, member in held[start : start + _RENEW_BATCH]
            ]
            self.run(ops).addErrback(self._renew_failed)

    def _renew_failed(self, reason: Failure) -> None:
        _log.warn("Concurrency leases could not be renewed: {reason}", reason=reason.getErrorMessage())


def _nothing(_: object) -> None:
    return None


def _only(decisions: list[RateDecision | None]) -> RateDecision:
    (decision,) = decisions
    assert decision is not None
    return decision
