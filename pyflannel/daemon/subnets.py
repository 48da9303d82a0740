"""Subnet arithmetic: flannel's lease keys and the candidate subnets of a network."""
from __future__ import annotations

import ipaddress
import random
from typing import Iterable, Iterator

IPv4Network = ipaddress.IPv4Network


def lease_key(subnet: IPv4Network) -> str:
    """flannel's key name for a lease: 10.5.34.0/24 -> '10.5.34.0-24'."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_lease_key(name: str) -> IPv4Network | None:
    """The subnet a key names, or None for a key that is not an IPv4 lease (dual-stack keys keep their v4 part)."""
    v4 = name.rsplit("/", 1)[-1].split("&", 1)[0]
    addr, sep, plen = v4.partition("-")
    if not sep or not plen.isdigit():
        return None
    try:
        return IPv4Network(f"{addr}/{plen}")
    except ValueError:
        return None


def candidates(subnet_min: IPv4Network, subnet_max: IPv4Network) -> Iterator[IPv4Network]:
    """Every subnet from SubnetMin to SubnetMax inclusive, in order."""
    size = subnet_min.num_addresses
    start, end = int(subnet_min.network_address), int(subnet_max.network_address)
    for addr in range(start, end + 1, size):
        yield IPv4Network((addr, subnet_min.prefixlen))


def pick_free(subnet_min: IPv4Network, subnet_max: IPv4Network, taken: Iterable[IPv4Network],
              rng: random.Random | None = None, limit: int = 100) -> IPv4Network | None:
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
