"""The running methods of one configuration: each `[auth.NAME]` built into its `Authenticator`, or handed on by
the previous configuration's gatekeeper when what it was built from is unchanged (with its caches and connections:
keys fetched, passwords verified, warm connections to an auth service); the chain of methods each route tries;
closing what is no longer used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from gateway.auth.apikeys import ApiKeyAuthenticator
from gateway.auth.basic import BasicAuthenticator
from gateway.auth.identity import Authenticator
from gateway.auth.settings.model import (
    Admission,
    ApiKeyMethod,
    BasicMethod,
    ForwardMethod,
    JwtMethod,
    Method,
    MtlsMethod,
    RouteAdmission,
)
from gateway.headers import canonical_name

__all__ = ["Authenticators", "build_authenticator", "verifies_cheaply"]

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


def verifies_cheaply(auth: Authenticator, credential: object) -> bool:
    """Whether `auth` would check `credential` at once (`Authenticator.verifies_cheaply`; False when absent)."""
    cheaply = getattr(auth, "verifies_cheaply", None)
    return cheaply is not None and bool(cheaply(credential))


class Authenticators:
    """The methods of `admission`, by name: `given`, or each taken from `previous` if it can hand it on, else built."""

    def __init__(
        self,
        admission: Admission,
        reactor: Any,
        *,
        given: Mapping[str, Authenticator] | None = None,
        previous: Authenticators | None = None,
    ) -> None:
        self._admission = admission
        if given is None:
            given = {}
            for name, method in admission.methods.items():
                kept = previous.hand_on(name, method, admission) if previous is not None else None
                given[name] = kept or build_authenticator(method, admission, reactor)
        self.by_name: Mapping[str, Authenticator] = dict(given)
        """The methods, by their names in the config."""
        self._chains: dict[tuple[str, ...], tuple[Authenticator, ...]] = {}
        self._handed_on: set[int] = set()
        """Ids of these methods a reload's gatekeeper took over: they are its to close now."""

    def chain(self, admission: RouteAdmission) -> tuple[Authenticator, ...]:
        """The methods a route with `admission` tries, in its order."""
        chain = self._chains.get(admission.methods)
        if chain is None:
            chain = self._chains[admission.methods] = tuple(self.by_name[n] for n in admission.methods)
        return chain

    def upstream_headers(self) -> set[bytes]:
        """Canonical names of every header one of the methods may set upstream."""
        return {canonical_name(name) for auth in self.by_name.values() for name in auth.upstream_headers()}

    def hand_on(self, name: str, method: Method, admission: Admission) -> Authenticator | None:
        """The method `name` for a reload's gatekeeper, if what it was built from is unchanged (its settings, the
        realm, and the consumers for a method that looks them up), with its caches and connections; None
        otherwise. A method handed on is the new gatekeeper's to close."""
        auth = self.by_name.get(name)
        old = self._admission.methods.get(name)
        if auth is None or old is None or _basis(old, self._admission) != _basis(method, admission):
            return None
        self._handed_on.add(id(auth))
        return auth

    def close(self) -> list[Deferred[Any]]:
        """Release the threads and connections of every method not handed on; what to wait for."""
        return [
            d
            for d in (auth.close() for auth in self.by_name.values() if id(auth) not in self._handed_on)
            if d is not None
        ]
