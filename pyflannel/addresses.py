"""The one address allocator: a range of a subnet, the gateway skipped, handed out round robin (the search starts
after the address given last, so a just-released address is not reused at once), behind a store interface.

Stores: the Docker driver's state file (driver/ipam.py), host-local's on-disk layout (cni/hostlocal.py), and
MemoryStore for tests.
"""
from __future__ import annotations

import abc
import ipaddress
from dataclasses import dataclass

IPv4Address = ipaddress.IPv4Address


class RangeError(ValueError):
    """A range that cannot be; `field` is start, end, gateway or subnet, and the message says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


@dataclass(frozen=True)
class AddressRange:
    subnet: ipaddress.IPv4Network
    start: IPv4Address
    end: IPv4Address
    gateway: IPv4Address

    @classmethod
    def of(cls, subnet: ipaddress.IPv4Network, start: IPv4Address | None = None, end: IPv4Address | None = None,
           gateway: IPv4Address | None = None) -> "AddressRange":
        """host-local's defaults: start network + 1, end broadcast - 1, gateway network + 1."""
        if subnet.num_addresses < 4:
            raise RangeError("subnet", f"{subnet} is too small for a gateway and containers")
        first, last = subnet.network_address + 1, subnet.broadcast_address - 1
        found = cls(subnet, start or first, end or last, gateway or first)
        for name in ("start", "end", "gateway"):
            if getattr(found, name) not in subnet:
                raise RangeError(name, f"{getattr(found, name)} is outside the subnet {subnet}")
        return found

    def candidates(self, after: IPv4Address | None):
        """Addresses to try, starting after `after` and wrapping around; never the gateway."""
        count = int(self.end) - int(self.start) + 1
        offset = int(after) - int(self.start) + 1 if after is not None and self.start <= after <= self.end else 0
        for i in range(count):
            ip = self.start + (offset + i) % count
            if ip != self.gateway:
                yield ip


class AddressStore(abc.ABC):
    """Where allocations live. `reserve` must be atomic with respect to other allocators of the same store (the
    caller holds the store's lock)."""

    @abc.abstractmethod
    def last(self) -> IPv4Address | None:
        """The address handed out last."""

    @abc.abstractmethod
    def reserve(self, ip: IPv4Address, owner: str) -> bool:
        """Record `ip` for `owner`; False if it is taken."""

    @abc.abstractmethod
    def set_last(self, ip: IPv4Address) -> None:
        """Remember `ip` as the address handed out last."""


def allocate(addresses: AddressRange, store: AddressStore, owner: str = "") -> IPv4Address | None:
    """The next free address of the range, reserved for `owner`; None when all are taken."""
    for ip in addresses.candidates(store.last()):
        if store.reserve(ip, owner):
            store.set_last(ip)
            return ip
    return None


class MemoryStore(AddressStore):
    """Allocations in a dict: address -> owner."""

    def __init__(self):
        self.held: dict[IPv4Address, str] = {}
        self._last: IPv4Address | None = None

    def last(self) -> IPv4Address | None:
        return self._last

    def reserve(self, ip: IPv4Address, owner: str) -> bool:
        if ip in self.held:
            return False
        self.held[ip] = owner
        return True

    def set_last(self, ip: IPv4Address) -> None:
        self._last = ip

    def release(self, ip: IPv4Address) -> None:
        self.held.pop(ip, None)
