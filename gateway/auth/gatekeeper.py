"""The admission checks of one request, in order: authenticate, authorise, limit. Decided on the request head.

Order, and why:
1. An anonymous route: only the per-address rate limit.
2. The first of the route's methods whose credential the request carries decides (none carried: 401 naming
   every method in WWW-Authenticate).
3. A credential whose failed-auth budget is spent gets 429 before it is checked (a brute-force attempt costs the
   gateway nothing, bcrypt included). Failures are counted twice: per client address and claimant (what the
   credential claims to be: a Basic user name, an API key's first characters, a JWT; for forward auth and
   malformed credentials, the method), so one user mistyping a password behind an office's NAT address locks
   out only themselves; and per client address alone, against a higher ceiling, so a client trying many names
   or keys is stopped all the same. Either spent is 429. With a shared store, a credential its method checks at
   once (`Authenticator.verifies_cheaply`: an API key, a certificate, a password or token the method remembers)
   is checked first and its budgets asked with its consumer's slot and rate, one round trip: a spent budget is
   429 all the same, before the scopes' 403 (which would tell a right guess).
4. The credential is verified: at once, or later through a Deferred (JWKS fetch, bcrypt, forward auth). A
   failure is 401 and counts against both budgets.
5. Scopes (403), then the consumer's request rate (429), then its concurrency cap (429; the slot is given back
   by `Allow.release` when the request ends, however it ends).

The verdict is an `Allow` or a `gateway.errors.Denied`, returned directly or through a Deferred; the request
decides what to do with it (`gateway.exchange`). Nothing here reads a body or writes a response.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.apikeys import ApiKeyAuthenticator
from gateway.auth.basic import BasicAuthenticator
from gateway.auth.credentials import challenge
from gateway.auth.identity import ANONYMOUS_IDENTITY, Authenticator, AuthFailure, AuthRequest, Identity
from gateway.auth.limits import LimitStore, MemoryLimitStore, RateDecision, once
from gateway.auth.scopes import missing_scopes, scopes_allow
from gateway.auth.settings.model import (
    Admission,
    ApiKeyMethod,
    BasicMethod,
    ForwardMethod,
    JwtMethod,
    Method,
    MtlsMethod,
    RateLimit,
    RouteAdmission,
)
from gateway.auth.shared_limits import Admitted, SharedLimits
from gateway.config.store import LimitStoreSettings
from gateway.errors import AuthServiceDenied, AuthUnavailable, Denied, Forbidden, TooManyRequests, Unauthorized
from gateway.headers import canonical_name

__all__ = ["Allow", "Gatekeeper", "Verdict", "build_authenticator"]

_log = Logger()

_MAX_FORWARDED = 20000
"""Identities whose upstream headers are remembered (as many as a few methods' caches of identities hold)."""
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


_LOOKS_UP_CONSUMERS = frozenset({"api_key", "basic", "mtls"})


def _basis(method: Method, admission: Admission) -> tuple[object, ...]:
    """What a method's running form is built from (`build_authenticator`): equal bases make equal methods."""
    consumers = admission.consumers if method.type in _LOOKS_UP_CONSUMERS else None
    return (method, admission.realm, consumers)


def build_authenticator(method: Method, admission: Admission, reactor: Any) -> Authenticator:
    """The running form of one configured method."""
    realm = admission.realm
    # By class, not by `method.type`: each type has its class, and only the class narrows `method` for mypy.
    if isinstance(method, ApiKeyMethod):
        return ApiKeyAuthenticator(method, admission.consumers, realm=realm)
    if isinstance(method, BasicMethod):
        return BasicAuthenticator(method, admission.consumers, reactor=reactor, realm=realm)
    if isinstance(method, JwtMethod):
        from gateway.auth.jwt import JwtAuthenticator

        return JwtAuthenticator(method, clock=reactor, reactor=reactor, realm=realm)
    if isinstance(method, MtlsMethod):
        from gateway.auth.mtls import MtlsAuthenticator

        return MtlsAuthenticator(method, admission.consumers)
    if isinstance(method, ForwardMethod):
        from gateway.auth.forward import ForwardAuthenticator

        return ForwardAuthenticator(method, reactor=reactor, realm=realm)
    raise ValueError(f"unknown method type {method.type!r}")


_Budgets = tuple[tuple[str, ...], Any, list[tuple[str, RateLimit]]]
"""The failed-auth budgets of a credential its method checks at once, asked with its consumer's limits: their
keys, the credential, and (key, limit) for the shared store."""


class Gatekeeper:
    """Runs the admission checks for every route of one configuration."""

    def __init__(
        self,
        admission: Admission,
        *,
        reactor: Any,
        store: LimitStore | None = None,
        shared: SharedLimits | None = None,
        authenticators: Mapping[str, Authenticator] | None = None,
        previous: Gatekeeper | None = None,
    ) -> None:
        self._admission = admission
        self._rates = admission.rate_limits
        self._store: LimitStore = store if store is not None else MemoryLimitStore(reactor)
        self._shared = shared
        """The Redis store when `[limits.store]` says so: then every limit is checked there (and `_store` is unused)."""
        self._handed_on: set[int] = set()
        """Ids of this gatekeeper's methods a reload's gatekeeper took over: they are its to close now."""
        if authenticators is None:
            authenticators = {}
            for name, method in admission.methods.items():
                kept = previous.hand_on(name, method, admission) if previous is not None else None
                authenticators[name] = kept or build_authenticator(method, admission, reactor)
        self._authenticators = dict(authenticators)
        self._chains: dict[tuple[str, ...], tuple[Authenticator, ...]] = {}
        rates = self._rates
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
        """The failed-auth budgets that are on, in the order of the keys `_failure_keys` gives a credential."""
        self._guessing: dict[str, dict[Any, int]] = {}
        """A failed-auth budget's key -> the guessable credentials (passwords) being checked that count against
        it, each with its number of requests; distinct ones count against the budget while they are checked."""
        identity = admission.identity
        self._consumer_header = canonical_name(identity.consumer) if identity.consumer else b""
        self._scopes_header = canonical_name(identity.scopes) if identity.scopes else b""
        self._method_header = canonical_name(identity.method) if identity.method else b""
        own = {h for h in (self._consumer_header, self._scopes_header, self._method_header) if h}
        for auth in self._authenticators.values():
            own |= {canonical_name(name) for name in auth.upstream_headers()}
        self.identity_headers: frozenset[bytes] = frozenset(own)
        """Canonical names of every header admission may set upstream: a client's copies are always removed."""
        self._anonymous = Allow(
            ANONYMOUS_IDENTITY, None, self._identity_headers(ANONYMOUS_IDENTITY), self.identity_headers
        )
        self._forwarded: dict[tuple[int, bool], tuple[Identity, list[tuple[bytes, bytes]], frozenset[bytes]]] = {}
        """(id of an identity, route forwards credentials) -> the headers to set and to remove for it. Methods
        hand out the same identity object for the same consumer or token (they cache them), so these are made
        once per identity rather than once per request."""

    # --- the checks -------------------------------------------------------------------------------------------

    def public(self, admission: RouteAdmission) -> Allow | None:
        """The verdict on any request to a route with `admission` when it checks nothing (anonymous, and no rate
        limit for anonymous clients), without looking at the request; None when `check` must look."""
        if admission.anonymous and self._rates.anonymous is None:
            return self._anonymous
        return None

    def check(self, admission: RouteAdmission, request: AuthRequest) -> Verdict | Deferred[Verdict]:
        """The verdict on one request to a route with `admission`."""
        peer = _address_key(request.client_address)
        if admission.anonymous:
            rate = self._rates.anonymous
            if rate is not None:
                key = "anonymous:" + peer
                if self._shared is not None:
                    taken = self._shared.take(key, rate, fail_closed=admission.limits_fail_closed)
                    return taken.addCallbacks(self._anonymous_decided, _denied, callbackArgs=(admission, rate))
                return self._anonymous_decided(self._store.take(key, rate), admission, rate)
            return self._anonymous
        chain = self._chain(admission)
        headers = request.headers
        for auth in chain:
            # A client certificate is the connection's, not a header's.
            credential = (
                request.client_certificate if getattr(auth, "from_connection", False) else auth.credential(headers)
            )
            if credential is not None:
                break
        else:
            if headers.hasHeader(b"authorization"):
                reason, detail = "unaccepted_credentials", "this route does not accept the credentials sent"
            else:
                reason, detail = "missing_credentials", "this route requires credentials"
            return Unauthorized(detail, reason=reason, headers=_challenges(chain))
        keys = self._failure_keys(peer, auth, credential)
        guessable = bool(keys) and getattr(auth, "guessable", False)
        if keys:
            if self._shared is not None and _verifies_cheaply(auth, credential):
                # Checked first (it costs next to nothing), its budgets then asked with its consumer's slot and
                # rate: one round trip to the shared store. A new password or token is not: its budgets are
                # peeked first, sparing the check (bcrypt, a signature, a call) when one is spent.
                return self._verify_then_budgets(auth, credential, keys, chain, admission, request)
            if self._shared is not None:
                checks = [(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)]
                peeked = self._shared.peek(checks, fail_closed=admission.limits_fail_closed)
                return peeked.addCallbacks(
                    self._budget_checked,
                    _denied,
                    callbackArgs=(keys, credential, guessable, auth, chain, admission, request),
                )
            peeks = [
                self._store.peek(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)
            ]
            refused = self._over_budget(keys, credential, guessable, peeks)
            if refused is not None:
                return refused
        return self._verify(auth, credential, guessable, keys, chain, admission, request)

    def _verify_then_budgets(
        self,
        auth: Authenticator,
        credential: Any,
        keys: tuple[str, ...],
        chain: tuple[Authenticator, ...],
        admission: RouteAdmission,
        request: AuthRequest,
    ) -> Verdict | Deferred[Verdict]:
        """A credential its method checks at once (an API key, a certificate, a password or token the method
        remembers), with a shared store: checked, then its failed-auth budgets asked in one round trip, with the
        consumer's slot and rate when it passed (a spent budget is still 429, whatever the check said), on their own
        when it failed (429 or 401, and counted). A remembered password is no guess: the count of guesses being
        checked (`_guessing`) is not asked."""
        checks = [(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)]
        assert self._shared is not None
        try:
            result = auth.verify(credential, request)
        except AuthFailure as failure:
            peeked = self._shared.peek(checks, fail_closed=admission.limits_fail_closed)
            return peeked.addCallbacks(
                self._failed_after_budgets, _denied, callbackArgs=(keys, credential, chain, auth, failure)
            )
        except Denied as denied:
            return denied
        budgets = (keys, credential, checks)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                self._authorise,
                self._verify_failed,
                callbackArgs=(admission, chain, budgets),
                errbackArgs=(chain, auth, keys, request.request_id),
            )
        return self._authorise(result, admission, chain, budgets)

    def _failed_after_budgets(
        self,
        decisions: list[RateDecision],
        keys: tuple[str, ...],
        credential: Any,
        chain: tuple[Authenticator, ...],
        auth: Authenticator,
        failure: AuthFailure,
    ) -> Verdict:
        refused = self._over_budget(keys, credential, False, decisions)
        if refused is not None:
            return refused
        return self._failed(chain, auth, failure, keys)

    def _anonymous_decided(self, decision: RateDecision, admission: RouteAdmission, rate: RateLimit) -> Verdict:
        if not decision.allowed:
            return _too_many("anonymous", rate, decision, "rate_limited_address", None)
        if admission.rate_limit_headers:
            return self._anonymous._replace(response_headers=_rate_headers("anonymous", rate, decision))
        return self._anonymous

    def _budget_checked(
        self,
        decisions: list[RateDecision],
        keys: tuple[str, ...],
        credential: Any,
        guessable: bool,
        auth: Authenticator,
        chain: tuple[Authenticator, ...],
        admission: RouteAdmission,
        request: AuthRequest,
    ) -> Verdict | Deferred[Verdict]:
        refused = self._over_budget(keys, credential, guessable, decisions)
        if refused is not None:
            return refused
        return self._verify(auth, credential, guessable, keys, chain, admission, request)

    def _verify(
        self,
        auth: Authenticator,
        credential: Any,
        guessable: bool,
        keys: tuple[str, ...],
        chain: tuple[Authenticator, ...],
        admission: RouteAdmission,
        request: AuthRequest,
    ) -> Verdict | Deferred[Verdict]:
        try:
            result = auth.verify(credential, request)
        except AuthFailure as failure:
            return self._failed(chain, auth, failure, keys)
        except Denied as denied:
            return denied
        if isinstance(result, Deferred):
            if guessable:
                self._guess_started(keys, credential)
                result.addBoth(self._guess_ended, keys, credential)
            return result.addCallbacks(
                self._authorise,
                self._verify_failed,
                callbackArgs=(admission, chain),
                errbackArgs=(chain, auth, keys, request.request_id),
            )
        return self._authorise(result, admission, chain)

    def _failure_keys(self, peer: str, auth: Authenticator, credential: object) -> tuple[str, ...]:
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

    def _over_budget(
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
        return _too_many(failure.policy, failure.limit, decision, failure.reason, None)

    def _guessing_over(self, key: str, credential: Any, remaining: int) -> bool:
        """Whether one more distinct password being checked against budget `key` would be over what it has left."""
        guessing = self._guessing.get(key)
        return guessing is not None and credential not in guessing and len(guessing) >= remaining

    def _guess_started(self, keys: Sequence[str], credential: Any) -> None:
        for key in keys:
            guessing = self._guessing.setdefault(key, {})
            guessing[credential] = guessing.get(credential, 0) + 1

    def _guess_ended(self, result: object, keys: Sequence[str], credential: Any) -> object:
        for key in keys:
            guessing = self._guessing.get(key)
            if guessing is not None:
                left = guessing.get(credential, 1) - 1
                if left > 0:
                    guessing[credential] = left
                else:
                    guessing.pop(credential, None)
                    if not guessing:
                        del self._guessing[key]
        return result

    def _chain(self, admission: RouteAdmission) -> tuple[Authenticator, ...]:
        chain = self._chains.get(admission.methods)
        if chain is None:
            chain = self._chains[admission.methods] = tuple(self._authenticators[n] for n in admission.methods)
        return chain

    def _failed(
        self, chain: Sequence[Authenticator], auth: Authenticator, failure: AuthFailure, keys: Sequence[str]
    ) -> Denied:
        self._count_failure(keys)
        return Unauthorized(
            failure.detail, reason=failure.reason, consumer=failure.consumer, headers=_challenges(chain, auth, failure)
        )

    def _count_failure(self, keys: Sequence[str]) -> None:
        if self._shared is not None:
            self._shared.count([(key, failure.limit) for key, failure in zip(keys, self._failure_limits, strict=True)])
            return
        for key, failure in zip(keys, self._failure_limits, strict=True):
            self._store.take(key, failure.limit)

    def _verify_failed(
        self,
        reason: Failure,
        chain: Sequence[Authenticator],
        auth: Authenticator,
        keys: Sequence[str],
        request_id: str,
    ) -> Verdict | Failure:
        value = reason.value
        if isinstance(value, AuthFailure):
            return self._failed(chain, auth, value, keys)
        if isinstance(value, Denied):
            if isinstance(value, AuthServiceDenied) and value.status == 401:
                self._count_failure(keys)
            return value
        if isinstance(value, CancelledError):
            return reason  # the client left; nobody is waiting for a verdict
        _log.failure("Admission check failed unexpectedly (request {request_id})", reason, request_id=request_id)
        return AuthUnavailable("the credentials could not be checked", reason="internal_error")

    def _authorise(
        self,
        identity: Identity,
        admission: RouteAdmission,
        chain: Sequence[Authenticator],
        budgets: _Budgets | None = None,
    ) -> Verdict | Deferred[Verdict]:
        """Scopes, then the consumer's slot and rate; with `budgets` (of a credential checked at once, shared store)
        those are asked in the same round trip, first, and before a 403 too."""
        if (admission.scopes_any or admission.scopes_all) and not scopes_allow(
            identity.scopes, any_of=admission.scopes_any, all_of=admission.scopes_all
        ):
            if budgets is not None and self._shared is not None:
                peeked = self._shared.peek(budgets[2], fail_closed=admission.limits_fail_closed)
                return peeked.addCallbacks(
                    self._forbidden_after_budgets, _denied, callbackArgs=(budgets, identity, admission, chain)
                )
            return self._forbidden(identity, admission, chain)
        name = identity.consumer
        release = None
        response_headers: Sequence[tuple[bytes, bytes]] = ()
        if budgets is not None and name is None and self._shared is not None:
            admitted = self._shared.admit(None, None, fail_closed=admission.limits_fail_closed, budgets=budgets[2])
            return admitted.addCallbacks(
                self._admitted, _denied, callbackArgs=(identity, admission, "", None, None, budgets)
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
                    self._admitted, _denied, callbackArgs=(identity, admission, name, cap, rate, budgets)
                )
            if cap is not None:
                key = "in-flight:" + counted
                if not self._store.acquire(key, cap):
                    return _too_many_concurrent(cap, name)
                release = once(partial(self._store.release, key))
            if rate is not None:
                decision = self._store.take("consumer:" + counted, rate)
                if not decision.allowed:
                    if release is not None:
                        release()  # refused: the slot taken for it goes back
                    return _too_many("consumer", rate, decision, "rate_limited_consumer", name)
                if admission.rate_limit_headers:
                    response_headers = _rate_headers("consumer", rate, decision)
        return self._allow(identity, admission, release, response_headers)

    def _admitted(
        self,
        admitted: Admitted,
        identity: Identity,
        admission: RouteAdmission,
        name: str,
        cap: int | None,
        rate: RateLimit | None,
        budgets: _Budgets | None = None,
    ) -> Verdict:
        """The verdict once the shared store checked a consumer's slot and rate together (and the budgets of its
        credential, when they were asked in the same call)."""
        if budgets is not None and admitted.budgets is not None:
            refused = self._over_budget(budgets[0], budgets[1], False, admitted.budgets)
            if refused is not None:
                if admitted.release is not None:
                    admitted.release()
                return refused
        if admitted.slot is False:
            return _too_many_concurrent(cap or 0, name)
        response_headers: Sequence[tuple[bytes, bytes]] = ()
        decision = admitted.rate
        if rate is not None and decision is not None:
            if not decision.allowed:
                return _too_many("consumer", rate, decision, "rate_limited_consumer", name)
            if admission.rate_limit_headers:
                response_headers = _rate_headers("consumer", rate, decision)
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
        budgets: _Budgets,
        identity: Identity,
        admission: RouteAdmission,
        chain: Sequence[Authenticator],
    ) -> Denied:
        """403 once the budgets of a credential checked at once are known not spent, 429 if one is: a credential
        refused before its check when a budget is spent must not be told right (by a 403) after it."""
        refused = self._over_budget(budgets[0], budgets[1], False, decisions)
        return refused if refused is not None else self._forbidden(identity, admission, chain)

    def _forbidden(self, identity: Identity, admission: RouteAdmission, chain: Sequence[Authenticator]) -> Denied:
        needed = missing_scopes(identity.scopes, any_of=admission.scopes_any, all_of=admission.scopes_all)
        headers = []
        auth = next((a for a in chain if a.name == identity.method), None)
        offered = auth.challenge(None) if auth is not None else None
        if offered is not None and offered.startswith(b"Bearer"):
            # RFC 6750 section 3.1: a token without the scope the resource needs.
            value = challenge("Bearer", realm=self._admission.realm, error="insufficient_scope", scope=" ".join(needed))
            headers.append((b"WWW-Authenticate", value))
        return Forbidden(
            f"this route requires the scope{'s' if len(needed) > 1 else ''} {', '.join(needed)}",
            reason="insufficient_scope",
            consumer=identity.consumer,
            headers=headers,
        )

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

    # --- lifecycle --------------------------------------------------------------------------------------------

    @property
    def store(self) -> LimitStore:
        """The rate and concurrency counts: a reload hands them to the next gatekeeper, so limits go on."""
        return self._store

    @property
    def shared(self) -> SharedLimits | None:
        """The shared (Redis) store, if the config names one: a reload with the same settings hands it on."""
        return self._shared

    def hand_on(self, name: str, method: Method, admission: Admission) -> Authenticator | None:
        """This gatekeeper's method `name` for a reload's gatekeeper, if what it was built from is unchanged
        (its settings, the realm, and the consumers for a method that looks them up), with its caches and
        connections (keys fetched, passwords verified, warm connections to an auth service); None otherwise.
        A method handed on is the new gatekeeper's to close."""
        auth = self._authenticators.get(name)
        old = self._admission.methods.get(name)
        if auth is None or old is None or _basis(old, self._admission) != _basis(method, admission):
            return None
        self._handed_on.add(id(auth))
        return auth

    def hand_on_shared(self, settings: LimitStoreSettings) -> SharedLimits | None:
        """This gatekeeper's shared store for a reload's gatekeeper, if it was made from equal settings (its
        connections and the leases of requests still in flight go on); None otherwise. It is then the new
        gatekeeper's to close."""
        if self._shared is None or self._shared.settings != settings:
            return None
        self._handed_on.add(id(self._shared))
        return self._shared

    def close(self) -> Deferred[Any]:
        """Release the threads and connections of every method, and the shared store, not handed on to a reload's
        gatekeeper."""
        closing: list[Deferred[Any]] = [
            d
            for d in (auth.close() for auth in self._authenticators.values() if id(auth) not in self._handed_on)
            if d is not None
        ]
        if self._shared is not None and id(self._shared) not in self._handed_on:
            closing.append(self._shared.close())
        return DeferredList(closing)


@functools.lru_cache(maxsize=4096)
def _address_key(address: str) -> str:
    """What per-address limits count by: an IPv4 address, or an IPv6 address's /64 (a client usually holds a whole
    /64, and rotating addresses within it must not reset its limits)."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network((address, 64), strict=False).network_address) + "/64"
    except ValueError:
        return address


def _verifies_cheaply(auth: Authenticator, credential: object) -> bool:
    """Whether `auth` would check `credential` at once (`Authenticator.verifies_cheaply`; False when absent)."""
    cheaply = getattr(auth, "verifies_cheaply", None)
    return cheaply is not None and bool(cheaply(credential))


def _challenges(
    chain: Sequence[Authenticator], failed: Authenticator | None = None, failure: AuthFailure | None = None
) -> list[tuple[bytes, bytes]]:
    """WWW-Authenticate for every method of the route, one per scheme (the failed method's, with its error, wins
    its scheme: API keys and JWTs both invite a Bearer token)."""
    by_scheme: dict[bytes, bytes] = {}
    for auth in chain:
        value = auth.challenge(failure if auth is failed else None)
        if value is None:
            continue
        scheme = value.split(b" ", 1)[0].lower()
        if scheme not in by_scheme or auth is failed:
            by_scheme[scheme] = value
    return [(b"WWW-Authenticate", value) for value in by_scheme.values()]


def _too_many(
    name: str, limit: RateLimit, decision: RateDecision, reason: str, consumer: str | None
) -> TooManyRequests:
    """429 with Retry-After and the RateLimit-Policy / RateLimit headers (draft-ietf-httpapi-ratelimit-headers)."""
    retry = max(1, math.ceil(decision.retry_after))
    return TooManyRequests(
        f"over the {name} rate limit of {limit.requests} requests per {limit.period:g} s; retry in {retry} s",
        reason=reason,
        consumer=consumer,
        headers=[
            (b"Retry-After", b"%d" % retry),
            (b"RateLimit-Policy", _policy(name, limit)),
            (b"RateLimit", b'"%s";r=0;t=%d' % (name.encode("ascii"), retry)),
        ],
    )


def _too_many_concurrent(cap: int, consumer: str) -> TooManyRequests:
    return TooManyRequests(
        f"this consumer already has {cap} requests in flight",
        reason="too_many_concurrent",
        consumer=consumer,
        headers=[(b"Retry-After", b"1")],
    )


def _denied(reason: Failure) -> Denied | Failure:
    """A shared store's refusal to decide (`LimitsUnavailable`, on a route that fails closed) as a verdict."""
    return reason.value if isinstance(reason.value, Denied) else reason


def _policy(name: str, limit: RateLimit) -> bytes:
    return b'"%s";q=%d;w=%d' % (name.encode("ascii"), limit.requests, max(1, math.ceil(limit.period)))


def _rate_headers(name: str, limit: RateLimit, decision: RateDecision) -> list[tuple[bytes, bytes]]:
    """The RateLimit-Policy and RateLimit headers of an admitted request (draft-ietf-httpapi-ratelimit-headers):
    the policy it was counted against, the requests left now and the seconds until the whole quota is back."""
    return [
        (b"RateLimit-Policy", _policy(name, limit)),
        (b"RateLimit", b'"%s";r=%d;t=%d' % (name.encode("ascii"), decision.remaining, math.ceil(decision.reset))),
    ]
