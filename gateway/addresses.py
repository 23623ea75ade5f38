"""Client addresses: an IP in canonical form, and whether it belongs to a configured list of networks.

Pure and cached: these run on every connection or request, with the same few addresses and lists again and again.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

__all__ = ["Networks", "canonical_ip", "member_of"]

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
"""A config's list of networks (`server.trusted_proxies`, a listener's `proxy_protocol_from`)."""


@functools.lru_cache(maxsize=4096)
def canonical_ip(text: str) -> str | None:
    """`text` as an IP address in canonical form (IPv6 compressed, lower case; an IPv4-mapped IPv6 address as
    its IPv4 address), or None if it is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


_CHECKS: dict[int, tuple[Networks, Callable[[str], bool]]] = {}


def member_of(networks: Networks) -> Callable[[str], bool]:
    """The check of an address against `networks`, made once per list (found by the tuple's identity: hashing
    the networks on every request would cost more than the check), with an address cache of its own. An
    IPv4-mapped IPv6 address is checked as its IPv4 address; text that is no address is in no network."""
    found = _CHECKS.get(id(networks))
    if found is not None and found[0] is networks:
        return found[1]

    @functools.lru_cache(maxsize=4096)
    def member(address: str) -> bool:
        canonical = canonical_ip(address)
        if canonical is None:
            return False
        ip = ipaddress.ip_address(canonical)
        return any(ip in network for network in networks)

    if len(_CHECKS) > 64:
        _CHECKS.clear()  # lists of configs long gone (a reload each)
    _CHECKS[id(networks)] = (networks, member)
    return member
