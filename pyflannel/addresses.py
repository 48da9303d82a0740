"""The one address allocator: a range of a subnet (IPv4 or IPv6), the gateway skipped, behind a store interface.
The search starts after the address the store gives as its last: host-local's round robin (a just-released address
is not reused at once), or, with no last address, the lowest free one (Docker's IPAM).

Stores: the Docker driver's state file (driver/ipam.py, lowest free first), host-local's on-disk layout
(cni/hostlocal.py), and MemoryStore for tests.
"""
from __future__ import annotations

import abc
import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RangeError(ValueError):
    """A range that cannot be; `field` is start, end, gateway or subnet, and the message says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


@dataclass(frozen=True)
class AddressRange:
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    start: IPAddress
    end: IPAddress
    gateway: IPAddress

    @classmethod
    def of(cls, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, start: IPAddress | None = None,
           end: IPAddress | None = None, gateway: IPAddress | None = None) -> "AddressRange":
        """host-local's defaults: start network + 1, end broadcast - 1 (IPv6, which has no broadcast: the last
        address), gateway network + 1."""
        if subnet.num_addresses < 4:
            raise RangeError("subnet", f"{subnet} is too small for a gateway and containers")
        first, last = subnet.network_address + 1, subnet.broadcast_address - (1 if subnet.version == 4 else 0)
        found = cls(subnet, start or first, end or last, gateway or first)
        for name in ("start", "end", "gateway"):
            if getattr(found, name) not in subnet:
                raise RangeError(name, f"{getattr(found, name)} is outside the subnet {subnet}")
        return found

    def candidates(self, after: IPAddress | None):
        """Addresses to try, starting after `after` (if it is in the range) and wrapping around; never the
        gateway."""
        count = int(self.end) - int(self.start) + 1
        inside = after is not None and after.version == self.start.version and self.start <= after <= self.end
        offset = int(after) - int(self.start) + 1 if inside else 0
        for i in range(count):
            ip = self.start + (offset + i) % count
            if ip != self.gateway:
                yield ip


class AddressStore(abc.ABC):
    """Where allocations live. `reserve` must be atomic with respect to other allocators of the same store (the
    caller holds the store's lock)."""

    @abc.abstractmethod
    def last(self) -> IPAddress | None:
        """The address handed out last."""

    @abc.abstractmethod
    def reserve(self, ip: IPAddress, owner: str) -> bool:
        """Record `ip` for `owner`; False if it is taken."""

    @abc.abstractmethod
    def set_last(self, ip: IPAddress) -> None:
        """Remember `ip` as the address handed out last."""


def allocate(addresses: AddressRange, store: AddressStore, owner: str = "") -> IPAddress | None:
    """The next free address of the range, reserved for `owner`; None when all are taken."""
    for ip in addresses.candidates(store.last()):
        if store.reserve(ip, owner):
            store.set_last(ip)
            return ip
    return None


class MemoryStore(AddressStore):
    """Allocations in a dict: address -> owner."""

    def __init__(self):
        self.held: dict[IPAddress, str] = {}
        self._last: IPAddress | None = None

    def last(self) -> IPAddress | None:
        return self._last

    def reserve(self, ip: IPAddress, owner: str) -> bool:
        if ip in self.held:
            return False
        self.held[ip] = owner
        return True

    def set_last(self, ip: IPAddress) -> None:
        self._last = ip

    def release(self, ip: IPAddress) -> None:
        self.held.pop(ip, None)
