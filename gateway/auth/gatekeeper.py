"""The admission checks of one request, in order: authenticate, authorise, limit. Decided on the request head.

Order, and why:
1. An anonymous route: only the per-address rate limit.
2. The first of the route's methods whose credential the request carries decides (none carried: 401 naming
   every method in WWW-Authenticate).
3. A credential whose failed-auth budget is spent gets 429 before it is checked (a brute-force attempt costs the
   gateway nothing, bcrypt included). Failures are counted twice, per client address and claimant and per client
   address alone (`gateway.auth.budgets`); either spent is 429. With a shared store, a credential its method checks at
   once (`Authenticator.verifies_cheaply`: an API key, a certificate, a password or token the method remembers)
   is checked first and its budgets asked with its consumer's slot and rate, one round trip: a spent budget is
   429 all the same, before the scopes' 403 (which would tell a right guess).
4. The credential is verified: at once, or later through a Deferred (JWKS fetch, bcrypt, forward auth). A
   failure is 401 and counts against both budgets.
5. Scopes (403), then the consumer's request rate (429), then its concurrency cap (429; the slot is given back
   by `Allow.release` when the request ends, however it ends).

The verdict is an `Allow` or a `gateway.errors.Denied`, returned directly or through a Deferred; the request
decides what to do with it (`gateway.proxy.exchange`). Nothing here reads a body or writes a response.

Here are the order and steps 1 to 4; step 5 and the `Allow` are `gateway.auth.authorisation`'s, the answers of a
refusal `gateway.auth.denials`', the running methods `gateway.auth.authenticators`'.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.authenticators import Authenticators, verifies_cheaply
from gateway.auth.authorisation import Allow, Authoriser, Verdict
from gateway.auth.budgets import FailedAuthBudgets
from gateway.auth.denials import as_verdict, challenges, rate_headers, too_many
from gateway.auth.identity import Authenticator, AuthFailure, AuthRequest
from gateway.auth.limits import LimitStore, MemoryLimitStore, RateDecision
from gateway.auth.settings.model import Admission, RateLimit, RouteAdmission
from gateway.auth.shared_limits import SharedLimits
from gateway.config.store import LimitStoreSettings
from gateway.errors import AuthServiceDenied, AuthUnavailable, Denied, Unauthorized

__all__ = ["Gatekeeper"]

_log = Logger()


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
        self._shared_handed_on = False
        """Whether a reload's gatekeeper took over the shared store: it is then its to close."""
        self._methods: Authenticators = Authenticators(
            admission, reactor, given=authenticators, previous=previous._methods if previous is not None else None
        )
        """The methods, each built or taken over from `previous` (a reload's gatekeeper before this one)."""
        self._budgets = FailedAuthBudgets(self._rates, self._store, shared)
        """The failed-auth budgets, counted where the other limits are."""
        self._authoriser = Authoriser(
            admission,
            store=self._store,
            shared=shared,
            budgets=self._budgets,
            upstream_headers=self._methods.upstream_headers(),
        )
        """Scopes and the consumer's limits, once a request is authenticated."""
        self.identity_headers: frozenset[bytes] = self._authoriser.identity_headers
        """Canonical names of every header admission may set upstream: a client's copies are always removed."""
        self._anonymous = self._authoriser.anonymous
        """The verdict on an anonymous request (without rate-limit headers)."""

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
                    return taken.addCallbacks(self._anonymous_decided, as_verdict, callbackArgs=(admission, rate))
                return self._anonymous_decided(self._store.take(key, rate), admission, rate)
            return self._anonymous
        chain = self._methods.chain(admission)
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
            return Unauthorized(detail, reason=reason, headers=challenges(chain))
        failed_auth = self._budgets
        keys = failed_auth.keys(peer, auth, credential)
        guessable = bool(keys) and getattr(auth, "guessable", False)
        if keys:
            if self._shared is not None and verifies_cheaply(auth, credential):
                # Checked first (it costs next to nothing), its budgets then asked with its consumer's slot and
                # rate: one round trip to the shared store. A new password or token is not: its budgets are
                # peeked first, sparing the check (bcrypt, a signature, a call) when one is spent.
                return self._verify_then_budgets(auth, credential, keys, chain, admission, request)
            if self._shared is not None:
                peeked = self._shared.peek(failed_auth.checks(keys), fail_closed=admission.limits_fail_closed)
                return peeked.addCallbacks(
                    self._budget_checked,
                    as_verdict,
                    callbackArgs=(keys, credential, guessable, auth, chain, admission, request),
                )
            refused = failed_auth.over_budget(keys, credential, guessable, failed_auth.peek(keys))
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
        checked (`FailedAuthBudgets.guessing`) is not asked."""
        checks = self._budgets.checks(keys)
        assert self._shared is not None
        try:
            result = auth.verify(credential, request)
        except AuthFailure as failure:
            peeked = self._shared.peek(checks, fail_closed=admission.limits_fail_closed)
            return peeked.addCallbacks(
                self._failed_after_budgets, as_verdict, callbackArgs=(keys, credential, chain, auth, failure)
            )
        except Denied as denied:
            return denied
        budgets = (keys, credential, checks)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                self._authoriser.authorise,
                self._verify_failed,
                callbackArgs=(admission, chain, budgets),
                errbackArgs=(chain, auth, keys, request.request_id),
            )
        return self._authoriser.authorise(result, admission, chain, budgets)

    def _failed_after_budgets(
        self,
        decisions: list[RateDecision],
        keys: tuple[str, ...],
        credential: Any,
        chain: tuple[Authenticator, ...],
        auth: Authenticator,
        failure: AuthFailure,
    ) -> Verdict:
        refused = self._budgets.over_budget(keys, credential, False, decisions)
        if refused is not None:
            return refused
        return self._failed(chain, auth, failure, keys)

    def _anonymous_decided(self, decision: RateDecision, admission: RouteAdmission, rate: RateLimit) -> Verdict:
        if not decision.allowed:
            return too_many("anonymous", rate, decision, "rate_limited_address", None)
        if admission.rate_limit_headers:
            return self._anonymous._replace(response_headers=rate_headers("anonymous", rate, decision))
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
        refused = self._budgets.over_budget(keys, credential, guessable, decisions)
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
                self._budgets.guess_started(keys, credential)
                result.addBoth(self._budgets.guess_ended, keys, credential)
            return result.addCallbacks(
                self._authoriser.authorise,
                self._verify_failed,
                callbackArgs=(admission, chain),
                errbackArgs=(chain, auth, keys, request.request_id),
            )
        return self._authoriser.authorise(result, admission, chain)

    def _failed(
        self, chain: Sequence[Authenticator], auth: Authenticator, failure: AuthFailure, keys: Sequence[str]
    ) -> Denied:
        self._budgets.count(keys)
        return Unauthorized(
            failure.detail, reason=failure.reason, consumer=failure.consumer, headers=challenges(chain, auth, failure)
        )

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
                self._budgets.count(keys)
            return value
        if isinstance(value, CancelledError):
            return reason  # the client left; nobody is waiting for a verdict
        _log.failure("Admission check failed unexpectedly (request {request_id})", reason, request_id=request_id)
        return AuthUnavailable("the credentials could not be checked", reason="internal_error")

    # --- lifecycle --------------------------------------------------------------------------------------------

    @property
    def store(self) -> LimitStore:
        """The rate and concurrency counts: a reload hands them to the next gatekeeper, so limits go on."""
        return self._store

    @property
    def shared(self) -> SharedLimits | None:
        """The shared (Redis) store, if the config names one: a reload with the same settings hands it on."""
        return self._shared

    def hand_on_shared(self, settings: LimitStoreSettings) -> SharedLimits | None:
        """This gatekeeper's shared store for a reload's gatekeeper, if it was made from equal settings (its
        connections and the leases of requests still in flight go on); None otherwise. It is then the new
        gatekeeper's to close."""
        if self._shared is None or self._shared.settings != settings:
            return None
        self._shared_handed_on = True
        return self._shared

    def close(self) -> Deferred[Any]:
        """Release the threads and connections of every method, and the shared store, not handed on to a reload's
        gatekeeper."""
        closing = self._methods.close()
        if self._shared is not None and not self._shared_handed_on:
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
