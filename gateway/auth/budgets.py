"""The failed-auth budgets of one configuration: how often a client address may fail to authenticate before its
credentials are refused unchecked (429), so a brute-force attempt costs the gateway nothing, bcrypt included.

Rule: failures are counted twice: per client address and claimant (what the credential claims to be: a Basic user
name, an API key's first characters, a JWT; for forward auth and malformed credentials, the method), so one user
mistyping a password behind an office's NAT address locks out only themselves; and per client address alone,
against a higher ceiling, so a client trying many names or keys is stopped all the same. Either spent is 429. A
password being checked counts against both until its verdict, so a burst of concurrent guesses is cut at the
budget rather than all passing before the first failure is counted.

The counts are kept in the gatekeeper's store: this process's `LimitStore`, or the shared one (`SharedLimits`),
whose peeks the gatekeeper makes itself (in one round trip with others when it can) and judges here.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple

from gateway.auth.denials import too_many
from gateway.auth.identity import Authenticator
from gateway.auth.limits import LimitStore, RateDecision
from gateway.auth.settings.model import RateLimit, RateLimits
from gateway.auth.shared_limits import SharedLimits
from gateway.errors import Denied

__all__ = ["CredentialBudgets", "FailedAuthBudgets"]

_CLAIMANT_KEY = secrets.token_bytes(32)
"""Keys the digest a claimant is counted by: the limit store holds no user name, key prefix or signature, nor
anything from which one could be found again. One per process, so counts survive a reload (the store is handed
on); with several workers each counts on its own anyway."""


class _FailureLimit(NamedTuple):
    """One of the failed-auth budgets (per claimant, per address) a credential counts against."""

    limit: RateLimit
    policy: str
    """Its name in the RateLimit-Policy header."""
    reason: str
    """The reason code of a refusal."""


CredentialBudgets = tuple[tuple[str, ...], Any, list[tuple[str, RateLimit]]]
"""The failed-auth budgets of a credential its method checks at once, asked with its consumer's limits: their
keys, the credential, and (key, limit) for the shared store."""


class FailedAuthBudgets:
    """The failed-auth budgets `rates` turn on, counted in `store`, or in `shared` when there is one."""

    def __init__(self, rates: RateLimits, store: LimitStore, shared: SharedLimits | None) -> None:
        self._rates = rates
        self._store = store
        self._shared = shared
        limits = []
        if rates.failed_auth is not None:
            limits.append(_FailureLimit(rates.failed_auth, "failed-auth", "too_many_failed_authentications"))
        if rates.failed_auth_per_address is not None:
            limits.append(
                _FailureLimit(
                    rates.failed_auth_per_address, "failed-auth-address", "too_many_failed_authentications_address"
                )
            )
        self._failure_limits = tuple(limits)
        """The failed-auth budgets that are on, in the order of the keys `keys` gives a credential."""
        self.guessing: dict[str, dict[Any, int]] = {}
        """A failed-auth budget's key -> the guessable credentials (passwords) being checked that count against
        it, each with its number of requests; distinct ones count against the budget while they are checked."""

    def keys(self, peer: str, auth: Authenticator, credential: object) -> tuple[str, ...]:
        """The limit-store keys of the failed-auth budgets `credential` counts against from `peer`, in the order
        of `_failure_limits`: its claimant's at that address (by a keyed digest of the claimant), then the
        address's own; () with both limits off."""
        if not self._failure_limits:
            return ()
        address = "failed:" + peer
        if self._rates.failed_auth is None:
            return (address,)
        claimant = getattr(auth, "claimant", None)
        tag = claimant(credential) if claimant is not None else None
        if tag is None:
            tag = b"method\0" + auth.name.encode("utf-8")
        claimed = address + "/" + hashlib.blake2b(tag, digest_size=12, key=_CLAIMANT_KEY).hexdigest()
        return (claimed, address) if self._rates.failed_auth_per_address is not None else (claimed,)

    def checks(self, keys: Sequence[str]) -> list[tuple[str, RateLimit]]:
        """The budgets of `keys` as the shared store asks them: (key, limit)."""
        return [(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)]

    def peek(self, keys: Sequence[str]) -> list[RateDecision]:
        """The budgets of `keys` in this process's store, as they are (nothing is counted)."""
        return [self._store.peek(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)]

    def over_budget(
        self, keys: Sequence[str], credential: Any, guessable: bool, decisions: Sequence[RateDecision]
    ) -> Denied | None:
        """429 when a budget is spent (the one the client must wait longest for, if several), else None.
        `decisions`: the store's peek of each of `keys`."""
        refused: tuple[_FailureLimit, RateDecision] | None = None
        for key, failure, decision in zip(keys, self._failure_limits, decisions, strict=True):
            # A password being checked counts against the budget until its verdict: otherwise a burst of
            # concurrent guesses would all pass this check before the first failure is counted.
            spent = not decision.allowed or (guessable and self._guessing_over(key, credential, decision.remaining))
            if spent and (refused is None or decision.retry_after > refused[1].retry_after):
                refused = (failure, decision)
        if refused is None:
            return None
        failure, decision = refused
        return too_many(failure.policy, failure.limit, decision, failure.reason, None)

    def _guessing_over(self, key: str, credential: Any, remaining: int) -> bool:
        """Whether one more distinct password being checked against budget `key` would be over what it has left."""
        guessing = self.guessing.get(key)
        return guessing is not None and credential not in guessing and len(guessing) >= remaining

    def guess_started(self, keys: Sequence[str], credential: Any) -> None:
        """A guessable `credential` is being checked: it counts against the budgets of `keys` until `guess_ended`."""
        for key in keys:
            guessing = self.guessing.setdefault(key, {})
            guessing[credential] = guessing.get(credential, 0) + 1

    def guess_ended(self, result: object, keys: Sequence[str], credential: Any) -> object:
        """The check `guess_started` counted has its verdict (`result`, passed on: a Deferred's callback)."""
        for key in keys:
            guessing = self.guessing.get(key)
            if guessing is not None:
                left = guessing.get(credential, 1) - 1
                if left > 0:
                    guessing[credential] = left
                else:
                    guessing.pop(credential, None)
                    if not guessing:
                        del self.guessing[key]
        return result

    def count(self, keys: Sequence[str]) -> None:
        """A failed authentication, counted against the budgets of `keys`."""
        if self._shared is not None:
            self._shared.count(self.checks(keys))
            return
        for key, failure in zip(keys, self._failure_limits, strict=True):
            self._store.take(key, failure.limit)
