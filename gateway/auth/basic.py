"""HTTP Basic authentication against bcrypt hashes, verified off the reactor thread.

Rule: a bcrypt check costs milliseconds of CPU by design, so it never runs on the reactor thread, where it would
stall every stream in flight: it runs on a small thread pool of its own (bcrypt releases the GIL while it
hashes), with a bounded queue (beyond it 503 at once, so a flood of logins cannot queue without end). A success is
remembered for `cache_ttl` as a keyed hash of user and password (never the password), so a client sending the
same credentials on every request pays for one check. An unknown user costs a check against a dummy hash, as a
known one does, so timing does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from typing import Any, cast

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.auth.credentials import (
    MALFORMED,
    Malformed,
    authorization,
    basic_credentials,
    challenge,
    split_authorization,
)
from gateway.auth.identity import AuthFailure, AuthRequest, Identity
from gateway.auth.settings.model import BasicMethod, Consumer
from gateway.errors import AuthUnavailable
from gateway.http1.fields import HeaderLookup

__all__ = ["BasicAuthenticator"]

_DUMMY_HASH = b"$2b$12$Q99GCpW0/5SsB4Ax8Uwv/efDBSadSoUd5s8ScKpExhhjZlnwbdM0O"
"""A bcrypt hash (cost 12) of no one's password: unknown users are checked against it."""
_MAX_CACHED = 10000
MAX_PASSWORD_BYTES = 72
"""The longest password bcrypt hashes (bcrypt 5 refuses more rather than cutting it): a longer one never matches."""
_Login = tuple[str, bytes]
"""A Basic credential: (user name, password)."""


def _dummy_hash(hashes: list[bytes]) -> bytes:
    """A hash of no one's password with the cost most consumers' hashes have, so an unknown user takes as long."""
    costs = [int(h[4:6]) for h in hashes]
    cost = max(set(costs), key=costs.count) if costs else 12
    return _DUMMY_HASH if cost == 12 else bcrypt.hashpw(b"not a password of anyone", bcrypt.gensalt(rounds=cost))


class BasicAuthenticator:
    """Admits a request whose Basic user name is a consumer with a password hash and whose password matches it."""

    guessable = True
    """Passwords can be guessed: checks under way count against the failed-auth budgets of the client address
    and of the user name it tries."""

    def __init__(self, method: BasicMethod, consumers: Mapping[str, Consumer], *, reactor: Any, realm: str) -> None:
        self.name = method.name
        self._method = method
        self._realm = method.realm or realm
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._consumers = {name: c for name, c in consumers.items() if c.password_hash is not None}
        self._dummy = _dummy_hash([c.password_hash for c in self._consumers.values() if c.password_hash])
        self._pool: ThreadPool | None = None
        self._pending = 0
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        """Keyed hash of (user, password, stored hash) -> until when it counts as verified."""
        self._checking: dict[bytes, list[Deferred[Identity]]] = {}
        """Checks under way (or queued), by the same key -> the requests waiting for each: a browser sending the
        same credentials on 20 parallel requests costs one bcrypt check, not 20."""
        self._identities: dict[str, Identity] = {}
        self._closed = False

    def credential(self, headers: HeaderLookup) -> _Login | Malformed | None:
        value = authorization(headers.getRawHeaders(b"authorization"))
        if value is None:
            return None
        if isinstance(value, Malformed):
            return MALFORMED
        parts = split_authorization(value)
        if parts is None or parts[0] != b"basic":
            return None
        return basic_credentials(parts[1])

    def claimant(self, credential: object) -> bytes | None:
        """The user name: one user mistyping a password is refused on their own, not everyone behind their
        address."""
        login = cast(_Login | Malformed, credential)  # what `credential` returned: the gatekeeper hands it back
        if isinstance(login, Malformed):
            return None
        user, _ = login
        return b"basic\0" + user.encode("utf-8")

    def verifies_cheaply(self, credential: object) -> bool:
        """True for a login this method verified right within `cache_ttl` (`verify` answers it from memory, no
        bcrypt); any other costs a bcrypt check, or is refused without one (never verified right)."""
        login = cast(_Login | Malformed, credential)  # what `credential` returned: the gatekeeper hands it back
        if isinstance(login, Malformed):
            return False
        user, password = login
        consumer = self._consumers.get(user)
        if consumer is None or consumer.password_hash is None:
            return False
        return self._remembered(self._key(user, password, consumer.password_hash))

    def verify(self, credential: object, request: AuthRequest) -> Identity | Deferred[Identity]:
        login = cast(_Login | Malformed, credential)  # what `credential` returned: the gatekeeper hands it back
        if isinstance(login, Malformed):
            raise AuthFailure("malformed_credentials", "the Basic credentials are malformed")
        user, password = login
        consumer = self._consumers.get(user)
        if len(password) > MAX_PASSWORD_BYTES:
            known = user if consumer is not None else None
            raise AuthFailure("invalid_password", "the user name or password is wrong", consumer=known)
        stored = consumer.password_hash if consumer is not None else self._dummy
        assert stored is not None
        key = self._key(user, password, stored)
        if consumer is not None and self._remembered(key):
            return self._identity(consumer)
        waiters = self._checking.get(key)
        if waiters is None:
            if self._pending >= self._method.max_pending:
                raise AuthUnavailable("too many logins are being checked; try again shortly", reason="basic_saturated")
            waiters = self._checking[key] = []
            self._pending += 1
            checked = deferToThreadPool(self._reactor, self._threads(), self._check, password, stored)
            checked.addBoth(self._checked, key, consumer, user)
        # Each request waits on its own Deferred: one that is cancelled (its client left) stops waiting, while
        # the check itself runs to its end and still counts against max_pending until it has.
        waiter: Deferred[Identity] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(waiter)
        return waiter

    def _check(self, password: bytes, stored: bytes) -> bool:
        """In a pool thread: the bcrypt check, skipped once the method is closed (the gateway stops, or a reload
        retired it): a queued check then costs nothing, and closing waits only for those under way. A skipped
        check is no verdict on the password."""
        if self._closed:
            raise AuthUnavailable("the login could not be checked (the gateway is stopping)", reason="basic_closed")
        return bool(bcrypt.checkpw(password, stored))

    def _checked(self, result: object, key: bytes, consumer: Consumer | None, user: str) -> None:
        self._pending -= 1
        waiters = self._checking.pop(key, [])
        if result is True and consumer is not None:
            self._remember(key)
            outcome: Identity | Failure = self._identity(consumer)
        elif isinstance(result, Failure) and not result.check(ValueError):
            outcome = result
        else:
            # Known users only are named in the log: an unknown "user name" may be a password typed in its place.
            known = user if consumer is not None else None
            outcome = Failure(AuthFailure("invalid_password", "the user name or password is wrong", consumer=known))
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def challenge(self, failure: AuthFailure | None) -> bytes:
        return challenge("Basic", realm=self._realm, charset="UTF-8")

    def upstream_headers(self) -> frozenset[bytes]:
        return frozenset()

    def close(self) -> Deferred[None] | None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # joins the threads: queued checks are skipped, those under way finish (one each)
        return None

    def _threads(self) -> ThreadPool:
        if self._pool is None:
            threads = self._method.threads or max(1, (os.cpu_count() or 2) - 1)
            self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=f"basic-{self.name}")
            self._pool.start()
        return self._pool

    def _key(self, user: str, password: bytes, stored: bytes) -> bytes:
        """What a verified success is remembered by: a keyed hash (the key is this process's secret), never the
        password itself."""
        return hmac.digest(self._cache_key, b"\0".join([user.encode("utf-8"), password, stored]), hashlib.sha256)

    def _remembered(self, key: bytes) -> bool:
        """Whether the login of `key` was verified right within `cache_ttl` (an entry past it is dropped)."""
        until = self._verified.get(key)
        if until is None:
            return False
        if until > self._clock.seconds():
            return True
        del self._verified[key]
        return False

    def _identity(self, consumer: Consumer) -> Identity:
        identity = self._identities.get(consumer.name)
        if identity is None:
            identity = self._identities[consumer.name] = Identity(
                consumer=consumer.name,
                scopes=consumer.scopes,
                method=self.name,
                credential_headers=(b"authorization",),
                declared=True,
            )
        return identity

    def _remember(self, key: bytes) -> None:
        if self._method.cache_ttl <= 0:
            return
        now = self._clock.seconds()
        if len(self._verified) >= _MAX_CACHED:
            for stale in [k for k, until in self._verified.items() if until <= now]:
                del self._verified[stale]
            if len(self._verified) >= _MAX_CACHED:
                del self._verified[next(iter(self._verified))]
        self._verified[key] = now + self._method.cache_ttl
