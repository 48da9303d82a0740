"""IPAM in host-local's on-disk layout, so that this plugin and /usr/lib/cni/host-local can follow each other.

    <ipam.dataDir, default /var/lib/cni/networks>/<network name>/
        lock                 flock()ed around every change
        10.5.34.2            one file per address held, of any range set: "<container id>\r\n<ifname>"
        fd00:5:0:27::2       (IPv6 addresses in their RFC 5952 form, as Go writes them)
        last_reserved_ip.0   per range set (ipam.ranges[i]: .0, .1), the address it handed out last; its next search
        last_reserved_ip.1   starts after it (round robin, so a just-released address is not reused at once)

A container gets one address of each range set (flannel's dual stack: [[IPv4 lease], [IPv6 lease]]). A range is
host-local's: the subnet's hosts from rangeStart (default network + 1) to rangeEnd (default broadcast - 1; IPv6: the
last address), minus the gateway (default network + 1); the allocator is pyflannel.addresses', with these files as
its store.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os

from pyflannel.addresses import AddressRange, AddressStore, IPAddress, RangeError, allocate

from .protocol import ADDRESSES_EXHAUSTED, ALREADY_ATTACHED, INVALID_CONFIG, IO_FAILURE, CniError

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_RESERVED = "last_reserved_ip."
LINE_BREAK = "\r\n"


def address_range(spec: dict) -> AddressRange:
    """One entry of ipam.ranges: {"subnet", optional "rangeStart", "rangeEnd", "gateway"}."""
    try:
        subnet = ipaddress.ip_network(spec["subnet"])
    except (KeyError, TypeError, ValueError):
        raise CniError(INVALID_CONFIG, f"ipam.ranges: {json.dumps(spec.get('subnet'))} is not an IPv4 or IPv6 "
                                       f"subnet") from None
    given, keys = {}, {"start": "rangeStart", "end": "rangeEnd", "gateway": "gateway", "subnet": "subnet"}
    for name, key in keys.items():
        if key in spec and name != "subnet":
            try:
                given[name] = ipaddress.ip_address(spec[key])
            except (TypeError, ValueError):
                raise CniError(INVALID_CONFIG, f"ipam.ranges: {key} {spec[key]!r} is not an IP address") from None
    try:
        return AddressRange.of(subnet, **given)
    except RangeError as e:
        raise CniError(INVALID_CONFIG, f"ipam.ranges: {keys[e.field]} {e}") from None


class RangeSetFiles(AddressStore):
    """The allocator's store for range set `index`: the address files (which all range sets share) and its own
    last_reserved_ip.<index>."""

    def __init__(self, folder: str, index: int):
        self.folder = folder
        self.last_file = os.path.join(folder, f"{LAST_RESERVED}{index}")

    def last(self) -> IPAddress | None:
        try:
            with open(self.last_file) as f:
                return ipaddress.ip_address(f.read().strip())
        except (OSError, ValueError):
            return None

    def reserve(self, ip: IPAddress, owner: str) -> bool:
        try:
            fd = os.open(os.path.join(self.folder, str(ip)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot write to the IPAM store {self.folder}: {e.strerror}") from None
        with os.fdopen(fd, "w", newline="") as f:
            f.write(owner)
        return True

    def set_last(self, ip: IPAddress) -> None:
        with open(self.last_file, "w") as f:
            f.write(str(ip))


class HostLocalStore:
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

    def _held(self) -> dict[IPAddress, str]:
        """address -> owner text, for every address file."""
        held = {}
        for name in os.listdir(self.dir):
            try:
                ip = ipaddress.ip_address(name)
                with open(os.path.join(self.dir, name), newline="") as f:  # keep the \r\n
                    held[ip] = f.read().strip()
            except (ValueError, OSError):
                continue  # lock, last_reserved_ip.*, a file removed meanwhile
        return held

    @staticmethod
    def _owned_by(owner: str, container_id: str, ifname: str) -> bool:
        # host-local before 0.8 wrote the container id alone
        return owner in (f"{container_id}{LINE_BREAK}{ifname}", container_id)

    def addresses_of(self, container_id: str, ifname: str) -> list[IPAddress]:
        """The addresses the container holds for `ifname`, IPv4 first."""
        return sorted((ip for ip, owner in self._held().items() if self._owned_by(owner, container_id, ifname)),
                      key=lambda ip: (ip.version, ip))

    def range_set(self, index: int) -> RangeSetFiles:
        return RangeSetFiles(self.dir, index)

    def allocate(self, container_id: str, ifname: str, ranges: tuple[AddressRange, ...]) -> list[IPAddress]:
        """The next free address of each range (range set i: ranges[i]), all or none; like host-local, a container
        that holds an address for `ifname` already is refused."""
        held = self.addresses_of(container_id, ifname)
        if held:
            raise CniError(ALREADY_ATTACHED, f"container {container_id} already holds "
                                             f"{', '.join(map(str, held))} for {ifname}", "DEL it first")
        owner, allocated = f"{container_id}{LINE_BREAK}{ifname}", []
        try:
            for index, addresses in enumerate(ranges):
                ip = allocate(addresses, self.range_set(index), owner)
                if ip is None:
                    raise CniError(ADDRESSES_EXHAUSTED, f"no free address left in {addresses.start}-{addresses.end} "
                                                        f"(subnet {addresses.subnet})", f"IPAM store: {self.dir}")
                allocated.append(ip)
        except BaseException:
            self.release(container_id, ifname)
            raise
        return allocated

    def release(self, container_id: str, ifname: str) -> list[IPAddress]:
        released = []
        for ip, owner in self._held().items():
            if self._owned_by(owner, container_id, ifname):
                try:
                    os.unlink(os.path.join(self.dir, str(ip)))
                    released.append(ip)
                except FileNotFoundError:
                    pass
        return released
