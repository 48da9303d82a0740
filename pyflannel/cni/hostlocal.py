"""IPAM in host-local's on-disk layout, so that this plugin and /usr/lib/cni/host-local can follow each other.

    <ipam.dataDir, default /var/lib/cni/networks>/<network name>/
        lock                 flock()ed around every change
        10.5.34.2            one file per address held: "<container id>\r\n<ifname>"
        last_reserved_ip.0   the address handed out last; the next search starts after it (round robin, so a
                             just-released address is not reused at once)

The range is host-local's: the subnet's hosts from rangeStart (default network + 1) to rangeEnd (default broadcast
- 1), minus the gateway (default network + 1); the allocator is pyflannel.addresses', with these files as its store.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os

from pyflannel.addresses import AddressRange, AddressStore, RangeError, allocate

from .protocol import ADDRESSES_EXHAUSTED, ALREADY_ATTACHED, INVALID_CONFIG, IO_FAILURE, CniError

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_RESERVED = "last_reserved_ip.0"
LINE_BREAK = "\r\n"


def address_range(spec: dict) -> AddressRange:
    """One entry of ipam.ranges: {"subnet", optional "rangeStart", "rangeEnd", "gateway"}."""
    try:
        subnet = ipaddress.IPv4Network(spec["subnet"])
    except (KeyError, TypeError, ValueError):
        raise CniError(INVALID_CONFIG, f"ipam.ranges: {json.dumps(spec.get('subnet'))} is not an IPv4 "
                                       f"subnet") from None
    given, keys = {}, {"start": "rangeStart", "end": "rangeEnd", "gateway": "gateway", "subnet": "subnet"}
    for name, key in keys.items():
        if key in spec and name != "subnet":
            try:
                given[name] = ipaddress.IPv4Address(spec[key])
            except (TypeError, ValueError):
                raise CniError(INVALID_CONFIG, f"ipam.ranges: {key} {spec[key]!r} is not an IPv4 address") from None
    try:
        return AddressRange.of(subnet, **given)
    except RangeError as e:
        raise CniError(INVALID_CONFIG, f"ipam.ranges: {keys[e.field]} {e}") from None


class HostLocalStore(AddressStore):
    """Use as a context manager: the lock is held inside the `with` block."""

    def __init__(self, data_dir: str, network: str):
        self.dir = os.path.join(data_dir or DEFAULT_DATA_DIR, network)
        self._lock = None

    def __enter__(self) -> "HostLocalStore":
        try:
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            self._lock = open(os.path.join(self.dir, "lock"), "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot lock the IPAM store {self.dir}: {e.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # closing releases the flock

    def _held(self) -> dict[ipaddress.IPv4Address, str]:
        """address -> owner text, for every address file."""
        held = {}
        for name in os.listdir(self.dir):
            try:
                ip = ipaddress.IPv4Address(name)
                with open(os.path.join(self.dir, name), newline="") as f:  # keep the \r\n
                    held[ip] = f.read().strip()
            except (ValueError, OSError):
                continue  # lock, last_reserved_ip.*, a file removed meanwhile
        return held

    @staticmethod
    def _owned_by(owner: str, container_id: str, ifname: str) -> bool:
        # host-local before 0.8 wrote the container id alone
        return owner in (f"{container_id}{LINE_BREAK}{ifname}", container_id)

    def find(self, container_id: str, ifname: str) -> ipaddress.IPv4Address | None:
        for ip, owner in self._held().items():
            if self._owned_by(owner, container_id, ifname):
                return ip
        return None

    def allocate(self, container_id: str, ifname: str, addresses: AddressRange) -> ipaddress.IPv4Address:
        """The next free address; like host-local, a second address for the same container and ifname is refused."""
        held = self.find(container_id, ifname)
        if held is not None:
            raise CniError(ALREADY_ATTACHED, f"container {container_id} already holds {held} for {ifname}",
                           "DEL it first")
        ip = allocate(addresses, self, f"{container_id}{LINE_BREAK}{ifname}")
        if ip is None:
            raise CniError(ADDRESSES_EXHAUSTED, f"no free address left in {addresses.start}-{addresses.end} "
                                                f"(subnet {addresses.subnet})", f"IPAM store: {self.dir}")
        return ip

    # --- AddressStore: host-local's files -------------------------------------------------------------------------

    def last(self) -> ipaddress.IPv4Address | None:
        try:
            with open(os.path.join(self.dir, LAST_RESERVED)) as f:
                return ipaddress.IPv4Address(f.read().strip())
        except (OSError, ValueError):
            return None

    def reserve(self, ip: ipaddress.IPv4Address, owner: str) -> bool:
        try:
            fd = os.open(os.path.join(self.dir, str(ip)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot write to the IPAM store {self.dir}: {e.strerror}") from None
        with os.fdopen(fd, "w", newline="") as f:
            f.write(owner)
        return True

    def set_last(self, ip: ipaddress.IPv4Address) -> None:
        with open(os.path.join(self.dir, LAST_RESERVED), "w") as f:
            f.write(str(ip))

    def release(self, container_id: str, ifname: str) -> list[ipaddress.IPv4Address]:
        released = []
        for ip, owner in self._held().items():
            if self._owned_by(owner, container_id, ifname):
                try:
                    os.unlink(os.path.join(self.dir, str(ip)))
                    released.append(ip)
                except FileNotFoundError:
                    pass
        return released
