"""Subnet arithmetic: flannel's lease keys and the candidate subnets of a network (IPv4 or IPv6)."""
from __future__ import annotations

import ipaddress
import random
from typing import Iterable, Iterator, Union

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
Subnet = Union[IPv4Network, IPv6Network]


def lease_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """flannel's key name for a lease: 10.5.34.0/24 -> '10.5.34.0-24'; dual stack, with the IPv6 subnet in RFC 5952
    form: '10.5.34.0-24&fd00:5:0:27::-64'."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def _subnet(text: str, network_type) -> Subnet | None:
    addr, sep, plen = text.partition("-")
    if not sep or not plen.isdigit():
        return None
    try:
        return network_type(f"{addr}/{plen}")
    except ValueError:
        return None


def parse_lease_key(name: str) -> tuple[IPv4Network, IPv6Network | None] | None:
    """The subnets a key names, (IPv4, IPv6 or None), or None for a key that is not a lease."""
    v4, dual, v6 = name.rsplit("/", 1)[-1].partition("&")
    subnet = _subnet(v4, IPv4Network)
    if subnet is None:
        return None
    if not dual:
        return subnet, None
    ipv6_subnet = _subnet(v6, IPv6Network)
    return (subnet, ipv6_subnet) if ipv6_subnet is not None else None


def candidates(subnet_min: Subnet, subnet_max: Subnet) -> Iterator[Subnet]:
    """Every subnet from SubnetMin to SubnetMax inclusive, in order."""
    size = subnet_min.num_addresses
    start, end = int(subnet_min.network_address), int(subnet_max.network_address)
    for addr in range(start, end + 1, size):
        yield type(subnet_min)((addr, subnet_min.prefixlen))


def pick_free(subnet_min: Subnet, subnet_max: Subnet, taken: Iterable[Subnet],
              rng: random.Random | None = None, limit: int = 100) -> Subnet | None:
    """flannel's choice: one at random among the first `limit` free subnets, or None when all are taken."""
    same_size, other = set(), []
    for t in taken:  # aligned subnets of one size overlap only when equal: a set lookup, not a scan
        if t.prefixlen == subnet_min.prefixlen:
            same_size.add(t)
        else:
            other.append(t)
    free = []
    for subnet in candidates(subnet_min, subnet_max):
        if subnet not in same_size and not any(subnet.overlaps(t) for t in other):
            free.append(subnet)
            if len(free) == limit:
                break
    if not free:
        return None
    return (rng or random).choice(free)
