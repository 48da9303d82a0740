"""IpamDriver: the address pool is this host's flannel lease, read from subnet.env.

    pool     = FLANNEL_SUBNET's network          e.g. 10.5.34.0/24
    gateway  = FLANNEL_SUBNET's address          e.g. 10.5.34.1 (the first address of the lease; lives on the bridge)
    PoolID   = "pyflannel/10.5.34.0/24"          stable: identical RequestPool calls get identical answers

Container addresses are handed out from the rest of the lease (network and broadcast addresses excluded), in
round-robin order so a just-released address is not reused at once (stale ARP entries in peers), and persisted in
the driver state. The gateway is never "allocated": requesting it always succeeds and releasing it does nothing,
so Docker's rollback of a refused `network create` cannot take the gateway away from the network that uses it.

A pool's leftover allocations are dropped by ReleasePool only when no pyflannel network uses the lease any more.

RequestPool refuses (instead of answering the same pool again) in the cases where dockerd would otherwise loop
forever: for a local-scope network created without --subnet, Docker checks the pool against the host's routes and,
on overlap, calls RequestPool again and again expecting another pool. So RequestPool fails with a clear message
  - when this host already has a pyflannel network (its bridge route overlaps the lease: one network per host),
  - when another main-table route overlaps the lease (only checked when Docker did not name a Pool),
  - and, as a last resort, after POOL_LOOP_LIMIT requests within POOL_LOOP_WINDOW seconds with no ReleasePool.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import os
import threading
import time

from pyflannel import paths, subnetenv
from pyflannel.addresses import AddressRange, AddressStore, allocate

from . import validation as v
from .errors import RefusedError, UnavailableError, ValidationError
from .state import StateStore

log = logging.getLogger(__name__)

POOL_ID_PREFIX = "pyflannel/"
LOCAL_ADDRESS_SPACE = "pyflannel-local"
GLOBAL_ADDRESS_SPACE = "pyflannel-global"
HOW_TO_CREATE = "docker network create -d pyflannel --ipam-driver pyflannel NAME"
POOL_LOOP_LIMIT = 16
POOL_LOOP_WINDOW = 10.0  # seconds


def existing_network_error(network_id: str, net: dict) -> RefusedError:
    return RefusedError(
        f"this host already has a pyflannel network (id {network_id[:12]}, bridge {net['bridge']}, subnet "
        f"{net['pool']}): pyflannel supports one network per host, because a host has one flannel lease and one "
        f"bridge. Connect containers to that network, or remove it first. (If `docker network ls --no-trunc` does not "
        f"list it, the driver's state is stale: stop pyflannel-driver, delete its state.json, start it again.)")


class LeaseSource:
    """Reads subnet.env at every call, so the driver follows pyflanneld without a restart. While it does not exist
    (pyflanneld still starting: at boot dockerd may restart containers before it is up), a call waits up to `wait`
    seconds for it rather than failing the container at once."""

    def __init__(self, path: str = paths.SUBNET_FILE, wait: float = 0.0):
        self.path = path
        self.wait = wait

    def current(self, patient: bool = True) -> subnetenv.SubnetEnv:
        deadline = time.monotonic() + (self.wait if patient else 0.0)
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            env = subnetenv.read(self.path)
        except subnetenv.SubnetEnvError as e:
            raise UnavailableError(f"no flannel lease on this host: {e}") from None
        if env.lease.num_addresses < 4:
            raise UnavailableError(f"{self.path}: lease {env.lease} is too small to hold a gateway and containers")
        return env


def pool_id(lease: ipaddress.IPv4Network) -> str:
    return f"{POOL_ID_PREFIX}{lease}"


def gateway_data(env: subnetenv.SubnetEnv) -> dict:
    return {v.GATEWAY_TYPE: str(env.subnet)}


class PoolAllocations(AddressStore):
    """One pool's record in the driver's state, as the allocator's store: `taken` is the set of its addresses (the
    caller writes it back to the record), the record keeps the address given last."""

    def __init__(self, pool: dict, taken: set[str]):
        self.pool, self.taken = pool, taken

    def last(self) -> ipaddress.IPv4Address | None:
        return ipaddress.IPv4Address(self.pool["last"]) if self.pool["last"] else None

    def reserve(self, ip: ipaddress.IPv4Address, owner: str) -> bool:
        if str(ip) in self.taken:
            return False
        self.taken.add(str(ip))
        return True

    def set_last(self, ip: ipaddress.IPv4Address) -> None:
        self.pool["last"] = str(ip)


class Ipam:
    def __init__(self, store: StateStore, lease: LeaseSource, plumbing=None):
        self.store = store
        self.lease = lease
        self.plumbing = plumbing          # plumbing.Plumbing, for the route-overlap check; None skips it
        self._recent = collections.deque()  # times of RequestPool answers not followed by a ReleasePool
        self._recent_lock = threading.Lock()

    # --- capabilities ---------------------------------------------------------------------------------------------

    @staticmethod
    def capabilities() -> dict:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    @staticmethod
    def default_address_spaces() -> dict:
        return {"LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE, "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE}

    # --- pools ------------------------------------------------------------------------------------------------------

    def request_pool(self, req: v.RequestPool) -> dict:
        if req.v6:
            raise RefusedError("IPv6 is not supported by pyflannel: create the network without --ipv6")
        if req.address_space not in ("", LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE):
            raise ValidationError("AddressSpace", f"unknown address space {req.address_space!r} (pyflannel has "
                                                  f"{LOCAL_ADDRESS_SPACE!r} and {GLOBAL_ADDRESS_SPACE!r})")
        env = self.lease.current()
        if req.pool is not None and req.pool != env.lease:
            raise RefusedError(
                f"subnet {req.pool} is not this host's flannel lease {env.lease}: pyflannel hands out only the "
                f"lease pyflanneld got for this host. Create the network without --subnet: `{HOW_TO_CREATE}`")
        if req.sub_pool is not None and req.sub_pool != env.lease:
            raise RefusedError(f"SubPool {req.sub_pool} (--ip-range) is not supported: pyflannel hands out the "
                               f"whole lease {env.lease}. Create the network without --ip-range: `{HOW_TO_CREATE}`")
        pid = pool_id(env.lease)
        with self.store.transaction() as st:
            for nid, net in st["networks"].items():
                raise existing_network_error(nid, net)
            if req.pool is None and self.plumbing is not None:
                overlaps = self.plumbing.routes_overlapping(env.lease)
                if overlaps:
                    raise RefusedError(
                        f"this host's flannel lease {env.lease} overlaps the route(s) {', '.join(overlaps)}, so Docker "
                        f"would refuse the pool: remove the overlapping route, or name the pool explicitly with "
                        f"`docker network create -d pyflannel --ipam-driver pyflannel --subnet {env.lease} NAME`")
            self._note_request(env.lease)
            st["pools"].setdefault(pid, {"pool": str(env.lease), "allocated": [], "last": None})
        return {"PoolID": pid, "Pool": str(env.lease), "Data": gateway_data(env)}

    def _note_request(self, lease) -> None:
        with self._recent_lock:
            now = time.monotonic()
            while self._recent and now - self._recent[0] > POOL_LOOP_WINDOW:
                self._recent.popleft()
            if len(self._recent) >= POOL_LOOP_LIMIT:
                self._recent.clear()
                raise RefusedError(
                    f"Docker asked for the pool {lease} {POOL_LOOP_LIMIT} times in a row without using it: it rejects "
                    f"the pool, most likely because it overlaps a route or a nameserver of dockerd's host. Name the "
                    f"pool explicitly: `docker network create -d pyflannel --ipam-driver pyflannel --subnet {lease} NAME`")
            self._recent.append(now)

    def release_pool(self, req: v.PoolRef) -> dict:
        with self._recent_lock:
            self._recent.clear()
        with self.store.transaction() as st:
            pool = st["pools"].get(req.pool_id)
            if pool is None:
                return {}
            users = [nid for nid, n in st["networks"].items() if n.get("pool") == pool["pool"]]
            if users:
                # Docker's rollback of a refused second network releases the pool the first one still uses; and
                # dockerd 20.10 releases it before DeleteNetwork, which then drops it (network.delete_network).
                log.info("ReleasePool %s: kept while network %s uses it", req.pool_id, users[0][:12])
                return {}
            if pool["allocated"]:
                log.info("ReleasePool %s: dropping %d leftover address(es)", req.pool_id, len(pool["allocated"]))
            del st["pools"][req.pool_id]
        return {}

    # --- addresses --------------------------------------------------------------------------------------------------

    def _current_pool(self, pid: str) -> tuple[subnetenv.SubnetEnv, ipaddress.IPv4Network]:
        env = self.lease.current()
        if pid == pool_id(env.lease):
            return env, env.lease
        if pid.startswith(POOL_ID_PREFIX):
            raise RefusedError(f"pool {pid[len(POOL_ID_PREFIX):]} is no longer this host's flannel lease (now "
                               f"{env.lease}; did pyflanneld get a new lease?): remove the network and create it again "
                               f"with `{HOW_TO_CREATE}`")
        raise ValidationError("PoolID", f"unknown pool {pid[:80]!r} (pyflannel pool ids look like {pool_id(env.lease)!r})")

    def request_address(self, req: v.RequestAddress) -> dict:
        env, lease = self._current_pool(req.pool_id)
        prefix = lease.prefixlen
        if req.is_gateway:
            if req.address is not None and req.address != env.gateway:
                raise RefusedError(f"gateway {req.address} is not possible: the gateway of a pyflannel network is the "
                                   f"first address of this host's lease, {env.gateway}. Create the network without "
                                   f"--gateway: `{HOW_TO_CREATE}`")
            return {"Address": str(env.subnet), "Data": {}}
        with self.store.transaction() as st:
            pool = st["pools"].setdefault(req.pool_id, {"pool": str(lease), "allocated": [], "last": None})
            allocated = set(pool["allocated"])
            if req.address is not None:
                ip = req.address
                if ip not in lease or ip in (lease.network_address, lease.broadcast_address):
                    raise RefusedError(f"address {ip} is not a host address of this host's lease {lease}")
                if ip == env.gateway:
                    raise RefusedError(f"address {ip} is the gateway of this host's lease {lease}")
                if str(ip) in allocated:
                    raise RefusedError(f"address {ip} is already in use")
            else:
                ip = allocate(AddressRange.of(lease, gateway=env.gateway), PoolAllocations(pool, allocated))
                if ip is None:
                    raise RefusedError(f"no free address left in this host's lease {lease} "
                                       f"({len(allocated)} containers hold addresses)")
            pool["allocated"] = sorted(allocated | {str(ip)}, key=lambda a: ipaddress.IPv4Address(a))
        return {"Address": f"{ip}/{prefix}", "Data": {}}

    def release_address(self, req: v.ReleaseAddress) -> dict:
        with self.store.transaction() as st:
            pool = st["pools"].get(req.pool_id)
            if pool is None:
                return {}
            if str(req.address) in pool["allocated"]:
                pool["allocated"].remove(str(req.address))
        return {}
