"""After authentication: whether the identity may use the route (its scopes: 403) and how much (its consumer's
request rate and concurrency cap: 429), then the `Allow` that admits the request with the identity headers it
carries upstream.

With a shared store, a consumer's slot and rate are asked in one round trip, together with the failed-auth budgets
of a credential its method checked at once when the gatekeeper hands them over: a spent budget is 429 before the
request is admitted, and before a 403 too (which would tell a right guess).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

from twisted.internet.defer import Deferred

from gateway.auth.budgets import CredentialBudgets, FailedAuthBudgets
from gateway.auth.denials import as_verdict, forbidden, rate_headers, too_many, too_many_concurrent
from gateway.auth.identity import ANONYMOUS_IDENTITY, Authenticator, Identity
from gateway.auth.limits import LimitStore, RateDecision, once
from gateway.auth.scopes import scopes_allow
from gateway.auth.settings.model import Admission, RateLimit, RouteAdmission
from gateway.auth.shared_limits import Admitted, SharedLimits
from gateway.errors import Denied
from gateway.headers import canonical_name

__all__ = ["Allow", "Authoriser", "Verdict"]

_MAX_FORWARDED = 20000
"""Identities whose upstream headers are remembered (as many as a few methods' caches of identities hold)."""


class Allow(NamedTuple):
    """Admitted: forward the request as `identity`, then call `release` (if any) when it ends. (A named tuple:
    one is made per admitted request, and a frozen dataclass costs a microsecond to make.)"""

    identity: Identity
    release: Callable[[], None] | None
    upstream_headers: Sequence[tuple[bytes, bytes]]
    """Identity headers to set upstream (canonical names, as `Headers` stores them)."""
    remove: frozenset[bytes]
    """Canonical names of the client headers to remove before forwarding: every header admission may set (so a
    client cannot spoof one), and the credential used (unless the route forwards credentials)."""
    response_headers: Sequence[tuple[bytes, bytes]] = ()
    """Headers for the client's response: the rate limit it was counted against (RateLimit-Policy, RateLimit)."""


Verdict = Allow | Denied


class Authoriser:
    """The checks after authentication for every route of one configuration, counted in `store`, or in `shared`
    when there is one; `upstream_headers`: the canonical names of every header the methods may set upstream."""

    def __init__(
        self,
        admission: Admission,
        *,
        store: LimitStore,
        shared: SharedLimits | None,
        budgets: FailedAuthBudgets,
        upstream_headers: set[bytes],
    ) -> None:
        self._admission = admission
        self._rates = admission.rate_limits
        self._store = store
        self._shared = shared
        self._budgets = budgets
        identity = admission.identity
        self._consumer_header = canonical_name(identity.consumer) if identity.consumer else b""
        self._scopes_header = canonical_name(identity.scopes) if identity.scopes else b""
        self._method_header = canonical_name(identity.method) if identity.method else b""
        own = {h for h in (self._consumer_header, self._scopes_header, self._method_header) if h}
        self.identity_headers: frozenset[bytes] = frozenset(own | upstream_headers)
        """Canonical names of every header admission may set upstream: a client's copies are always removed."""
        self.anonymous = Allow(
            ANONYMOUS_IDENTITY, None, self._identity_headers(ANONYMOUS_IDENTITY), self.identity_headers
        )
        """The verdict on an anonymous request (without rate-limit headers)."""
        self._forwarded: dict[tuple[int, bool], tuple[Identity, list[tuple[bytes, bytes]], frozenset[bytes]]] = {}
        """(id of an identity, route forwards credentials) -> the headers to set and to remove for it. Methods
        hand out the same identity object for the same consumer or token (they cache them), so these are made
        once per identity rather than once per request."""

    def authorise(
        self,
        identity: Identity,
        admission: RouteAdmission,
        chain: Sequence[Authenticator],
        budgets: CredentialBudgets | None = None,
    ) -> Verdict | Deferred[Verdict]:
        """Scopes, then the consumer's slot and rate; with `budgets` (of a credential checked at once, shared store)
        those are asked in the same round trip, first, and before a 403 too."""
        if (admission.scopes_any or admission.scopes_all) and not scopes_allow(
            identity.scopes, any_of=admission.scopes_any, all_of=admission.scopes_all
        ):
            if budgets is not None and self._shared is not None:
                peeked = self._shared.peek(budgets[2], fail_closed=admission.limits_fail_closed)
                return peeked.addCallbacks(
                    self._forbidden_after_budgets, as_verdict, callbackArgs=(budgets, identity, admission, chain)
                )
            return forbidden(identity, admission, chain, self._admission.realm)
        name = identity.consumer
        release = None
        response_headers: Sequence[tuple[bytes, bytes]] = ()
        if budgets is not None and name is None and self._shared is not None:
            admitted = self._shared.admit(None, None, fail_closed=admission.limits_fail_closed, budgets=budgets[2])
            return admitted.addCallbacks(
                self._admitted, as_verdict, callbackArgs=(identity, admission, "", None, None, budgets)
            )
        if name is not None:
            # A declared consumer's own limits apply to it alone; a token's subject or an auth service's name is
            # counted under its method, never as the declared consumer of the same name.
            consumer = self._admission.consumers.get(name) if identity.declared else None
            counted = name if identity.declared else f"{identity.method}/{name}"
            cap = (consumer.max_concurrent if consumer is not None else None) or self._admission.max_concurrent
            rate = (consumer.rate_limit if consumer is not None else None) or self._rates.consumer
            if self._shared is not None and (cap is not None or rate is not None or budgets is not None):
                admitted = self._shared.admit(
                    ("in-flight:" + counted, cap) if cap is not None else None,
                    ("consumer:" + counted, rate) if rate is not None else None,
                    fail_closed=admission.limits_fail_closed,
                    budgets=budgets[2] if budgets is not None else (),
                )
                return admitted.addCallbacks(
                    self._admitted, as_verdict, callbackArgs=(identity, admission, name, cap, rate, budgets)
                )
            if cap is not None:
                key = "in-flight:" + counted
                if not self._store.acquire(key, cap):
                    return too_many_concurrent(cap, name)
                release = once(partial(self._store.release, key))
            if rate is not None:
                decision = self._store.take("consumer:" + counted, rate)
                if not decision.allowed:
                    if release is not None:
                        release()  # refused: the slot taken for it goes back
                    return too_many("consumer", rate, decision, "rate_limited_consumer", name)
                if admission.rate_limit_headers:
                    response_headers = rate_headers("consumer", rate, decision)
        return self._allow(identity, admission, release, response_headers)

    def _admitted(
        self,
        admitted: Admitted,
        identity: Identity,
        admission: RouteAdmission,
        name: str,
        cap: int | None,
        rate: RateLimit | None,
        budgets: CredentialBudgets | None = None,
    ) -> Verdict:
        """The verdict once the shared store checked a consumer's slot and rate together (and the budgets of its
        credential, when they were asked in the same call)."""
        if budgets is not None and admitted.budgets is not None:
            refused = self._budgets.over_budget(budgets[0], budgets[1], False, admitted.budgets)
            if refused is not None:
                if admitted.release is not None:
                    admitted.release()
                return refused
        if admitted.slot is False:
            return too_many_concurrent(cap or 0, name)
        response_headers: Sequence[tuple[bytes, bytes]] = ()
        decision = admitted.rate
        if rate is not None and decision is not None:
            if not decision.allowed:
                return too_many("consumer", rate, decision, "rate_limited_consumer", name)
            if admission.rate_limit_headers:
                response_headers = rate_headers("consumer", rate, decision)
        return self._allow(identity, admission, admitted.release, response_headers)

    def _allow(
        self,
        identity: Identity,
        admission: RouteAdmission,
        release: Callable[[], None] | None,
        response_headers: Sequence[tuple[bytes, bytes]],
    ) -> Allow:
        forwarded = self._forwarded.get((id(identity), admission.forward_credentials))
        if forwarded is None or forwarded[0] is not identity:
            if len(self._forwarded) >= _MAX_FORWARDED:
                self._forwarded.clear()
            remove = self.identity_headers
            if not admission.forward_credentials:
                remove = remove.union(canonical_name(n) for n in identity.credential_headers)
            forwarded = (identity, self._identity_headers(identity), remove)
            self._forwarded[id(identity), admission.forward_credentials] = forwarded
        return Allow(identity, release, forwarded[1], forwarded[2], response_headers)

    def _forbidden_after_budgets(
        self,
        decisions: list[RateDecision],
        budgets: CredentialBudgets,
        identity: Identity,
        admission: RouteAdmission,
        chain: Sequence[Authenticator],
    ) -> Denied:
        """403 once the budgets of a credential checked at once are known not spent, 429 if one is: a credential
        refused before its check when a budget is spent must not be told right (by a 403) after it."""
        refused = self._budgets.over_budget(budgets[0], budgets[1], False, decisions)
        return refused if refused is not None else forbidden(identity, admission, chain, self._admission.realm)

    def _identity_headers(self, identity: Identity) -> list[tuple[bytes, bytes]]:
        out = []
        if self._consumer_header and identity.consumer is not None:
            out.append((self._consumer_header, identity.consumer.encode("ascii")))
        if self._scopes_header and identity.scopes:
            out.append((self._scopes_header, " ".join(sorted(identity.scopes)).encode("ascii")))
        if self._method_header:
            out.append((self._method_header, identity.method.encode("ascii")))
        out.extend((canonical_name(name), value) for name, value in identity.headers)
        return out
