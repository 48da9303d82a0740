"""IpamDriver: the address pool is this host's lease in a flannel network, read from that network's subnet.env.

    pool     = FLANNEL_SUBNET's network          e.g. 10.5.34.0/24
    gateway  = FLANNEL_SUBNET's address          e.g. 10.5.34.1 (the first address of the lease; lives on the bridge)
    PoolID   = "pyflannel/10.5.34.0/24"          stable: identical RequestPool calls get identical answers
               "pyflannel/shop/10.60.3.0/24"     (the named network shop)

Without options the network is the default flannel network (<prefix>/config, /run/flannel/subnet.env). With
`--ipam-opt pyflannel.network=NAME` it is the named network NAME: RequestPool asks pyflanneld to join it (the first
host to use NAME writes its config to etcd; `--subnet` is then NAME's cluster-wide Network) and answers with this
host's lease in it. When the last pool of a named network is dropped, pyflanneld is told to leave it.

Container addresses are handed out from the rest of the lease (network and broadcast addresses excluded), the
lowest free first as Docker's own IPAM does (a restarted container gets its address back; its MAC derives from the
address, so peers' ARP entries stay right), and persisted in the driver state. The gateway is never "allocated":
requesting it always succeeds and releasing it does nothing, so Docker's rollback of a refused `network create`
cannot take the gateway away from the network that uses it.

A pool's leftover allocations are dropped by ReleasePool only when no pyflannel network uses the lease any more.

IPv6 (`docker network create --ipv6`): Docker asks for a second pool (V6), answered with this host's IPv6 lease in
the same flannel network (FLANNEL_IPV6_SUBNET; its config needs EnableIPv6 and IPv6Network), gateway its first
address, PoolID "pyflannel/fd00:5:0:27::/64" ("pyflannel/shop/fd00:5:0:27::/64"). Addresses are handed out from it
as from the IPv4 lease. A named network is IPv4-only unless IPv6 is asked for (a flanneld cannot serve a dual-stack
network with hosts that carry IPv6 over an IPv4 underlay): the V6 RequestPool, which comes after the IPv4 one, joins
it with IPv6 (pyflanneld adds IPv6 to its config if this host alone serves it); `--ipam-opt pyflannel.ipv6=true`
asks for it in the IPv4 RequestPool already (a dual-stack flannel network for a Docker network without --ipv6, e.g.
for CNI containers on other hosts).

A flannel network without IPv4 (EnableIPv4 false) cannot answer the IPv4 pool Docker < 28 always asks for: that
RequestPool is refused, saying so; a V6 RequestPool alone (Docker 28's --ipv4=false) is answered.

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
import threading
import time

from pyflannel import localapi, subnetenv
from pyflannel.addresses import AddressRange, AddressStore, allocate

from . import validation as v
from .errors import RefusedError, UnavailableError, ValidationError, create_command
from .leases import (LeaseSource, existing_network_error, family_lease, ipv6_only_error, lease_changed_error,
                     no_ipv6_error)
from .records import PoolRecord
from .state import StateStore

log = logging.getLogger(__name__)

POOL_ID_PREFIX = "pyflannel/"
LOCAL_ADDRESS_SPACE = "pyflannel-local"
GLOBAL_ADDRESS_SPACE = "pyflannel-global"
POOL_LOOP_LIMIT = 16
POOL_LOOP_WINDOW = 10.0  # seconds


def pool_id(lease: ipaddress.IPv4Network | ipaddress.IPv6Network, name: str = "") -> str:
    return f"{POOL_ID_PREFIX}{name}/{lease}" if name else f"{POOL_ID_PREFIX}{lease}"


def parse_pool_id(pid: str) -> tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """(flannel network name, lease) of one of our pool ids, IPv4 or IPv6, or None."""
    if not pid.startswith(POOL_ID_PREFIX):
        return None
    name, _, cidr = pid[len(POOL_ID_PREFIX):].rpartition("/")
    name, _, address = name.rpartition("/")
    try:
        return name, ipaddress.ip_network(f"{address}/{cidr}")
    except ValueError:
        return None


class PoolAllocations(AddressStore):
    """A pool's addresses in the driver's state, as the allocator's store: `taken` is the set of its addresses (the
    caller writes it back to the pool's record). The lowest free address first, as Docker's own IPAM hands them out:
    a restarted container gets its address back unless another took it meanwhile."""

    def __init__(self, taken: set[str]):
        self.taken = taken

    def last(self) -> None:
        return None  # every search starts at the range's start

    def reserve(self, ip: ipaddress.IPv4Address, owner: str) -> bool:
        if str(ip) in self.taken:
            return False
        self.taken.add(str(ip))
        return True

    def set_last(self, ip: ipaddress.IPv4Address) -> None:
        pass


class Ipam:
    def __init__(self, store: StateStore, lease: LeaseSource, plumbing=None, daemon: localapi.Client | None = None):
        self.store = store
        self.lease = lease
        self.plumbing = plumbing          # plumbing.Plumbing, for the route-overlap check; None skips it
        self.daemon = daemon              # pyflanneld's local API, for named networks; None: default network only
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
        if req.address_space not in ("", LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE):
            raise ValidationError("AddressSpace", f"unknown address space {req.address_space!r} (pyflannel has "
                                                  f"{LOCAL_ADDRESS_SPACE!r} and {GLOBAL_ADDRESS_SPACE!r})")
        name = req.options.get(v.OPT_NETWORK, "")
        name = "" if name == localapi.DEFAULT_NETWORK else name
        if name and localapi.name_problem(name):
            raise ValidationError(f"Options[{v.OPT_NETWORK!r}]", localapi.name_problem(name))
        backend = req.options.get(v.OPT_BACKEND) or None
        if backend is not None and (backend not in localapi.BACKENDS or not name):
            raise ValidationError(f"Options[{v.OPT_BACKEND!r}]", f"{backend!r}: use {' or '.join(localapi.BACKENDS)}, "
                                  f"with --ipam-opt {v.OPT_NETWORK}=NAME (the default network's backend is in its etcd "
                                  f"config)")
        ipv6 = req.options.get(v.OPT_IPV6) or "false"
        if ipv6 not in ("true", "false") or ipv6 == "true" and not name:
            raise ValidationError(f"Options[{v.OPT_IPV6!r}]", f"{ipv6!r}: use true or false, with --ipam-opt "
                                  f"{v.OPT_NETWORK}=NAME (the default network's IPv6 is in its etcd config)")
        with self.store.transaction() as st:  # before joining: a refused call must not leave a lease behind
            known = st.network_on(name)
            if known is not None:
                raise existing_network_error(*known)
            if name in st.leaving:  # joined again before the leave could be done: nothing to leave
                st.leaving.remove(name)
            st.leave_pending(self.daemon)
        env = self._join(name, req, backend, ipv6 == "true" or req.v6) if name else self._default_lease(req)
        lease, gateway = family_lease(env, req.v6)
        problem = (no_ipv6_error(name) if req.v6 else ipv6_only_error(name)) if lease is None else None
        if problem is None and req.sub_pool is not None and req.sub_pool != lease:
            problem = RefusedError(f"SubPool {req.sub_pool} (--ip-range) is not supported: pyflannel hands out the "
                                   f"whole lease {lease}. Create the network without --ip-range: `{create_command()}`")
        # Docker's overlap check (and its RequestPool loop) concerns IPv4 pools it did not name
        overlaps = self.plumbing.routes_overlapping(lease) if (problem is None and req.pool is None and not req.v6
                                                               and self.plumbing) else []
        if overlaps:
            advice = "" if name else f", or name the pool explicitly with `{create_command('--subnet', str(lease))}`"
            problem = RefusedError(f"this host's lease {lease} overlaps the route(s) {', '.join(overlaps)}, so "
                                   f"Docker would refuse the pool: remove the overlapping route{advice}")
        if problem is not None:
            if name:  # joined for nothing: leave again (kept while a pool of the other family uses the network)
                with self.store.transaction() as st:
                    st.leave(name, self.daemon)
            raise problem
        pid = pool_id(lease, name)
        with self.store.transaction() as st:
            self._note_request(lease)
            st.pools.setdefault(pid, PoolRecord(str(lease), [], name))
        return {"PoolID": pid, "Pool": str(lease), "Data": {v.GATEWAY_TYPE: str(gateway)}}

    def _default_lease(self, req: v.RequestPool) -> subnetenv.SubnetEnv:
        env = self.lease.current()
        lease, _ = family_lease(env, req.v6)
        if req.pool is not None and lease is not None and req.pool != lease:
            raise RefusedError(
                f"subnet {req.pool} is not this host's flannel {'IPv6 ' if req.v6 else ''}lease {lease}: pyflannel "
                f"hands out only the lease pyflanneld got for this host. Create the network without --subnet: "
                f"`{create_command()}`")
        return env

    def _join(self, name: str, req: v.RequestPool, backend: str | None, ipv6: bool) -> subnetenv.SubnetEnv:
        """This host's lease in the named network, joined first (the pool of the request: its cluster-wide Network,
        --subnet, IPv4 or IPv6; `backend`: a new network's; `ipv6`: the network must have IPv6). Joining a network
        joined already changes nothing, unless it lacks the IPv6 asked for."""
        if self.daemon is None:
            raise RefusedError(f"--ipam-opt {v.OPT_NETWORK}={name}: this driver has no pyflanneld API to join it")
        network = req.pool if not req.v6 else None  # a new network's config is written with an IPv4 Network
        try:
            self.daemon.join(name, str(network) if network else None, backend, ipv6)
        except localapi.DaemonError as e:
            error = RefusedError if e.status in (400, 409) else UnavailableError
            raise error(f"cannot join flannel network {name}: {e}") from None
        env = self.lease.current(name)
        if req.v6 and req.pool is not None and env.ipv6_network is not None and req.pool != env.ipv6_network:
            with self.store.transaction() as st:
                st.leave(name, self.daemon)
            raise RefusedError(f"cannot join flannel network {name}: its IPv6Network is {env.ipv6_network} in etcd; "
                               f"--subnet {req.pool} contradicts it")
        return env

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
                    f"pool explicitly: `{create_command('--subnet', str(lease))}`")
            self._recent.append(now)

    def release_pool(self, req: v.PoolRef) -> dict:
        with self._recent_lock:
            self._recent.clear()
        with self.store.transaction() as st:
            pool = st.pools.get(req.pool_id)
            if pool is None:
                return {}
            users = st.networks_using(pool.pool)
            if users:
                # Docker's rollback of a refused second network releases the pool the first one still uses; and
                # dockerd 20.10 releases it before DeleteNetwork, which then drops it (network.delete_network).
                log.info("ReleasePool %s: kept while network %s uses it", req.pool_id, users[0][:12])
                return {}
            if pool.allocated:
                log.info("ReleasePool %s: dropping %d leftover address(es)", req.pool_id, len(pool.allocated))
            st.drop_pool(req.pool_id, self.daemon)
        return {}

    # --- addresses --------------------------------------------------------------------------------------------------

    def _current_pool(self, pid: str):
        """(lease, gateway address) of one of our pools, checked against subnet.env."""
        parsed = parse_pool_id(pid)
        if parsed is None:
            raise ValidationError("PoolID", f"unknown pool {pid[:80]!r} (pyflannel pool ids look like "
                                            f"'{POOL_ID_PREFIX}10.5.34.0/24')")
        name, lease = parsed
        now, gateway = family_lease(self.lease.current(name), lease.version == 6)
        if lease != now:
            with self.store.transaction() as st:
                users = st.networks_using(str(lease))
            raise lease_changed_error(name, f"{lease} to {now or 'none'}", users)
        return lease, gateway.ip

    def request_address(self, req: v.RequestAddress) -> dict:
        lease, gateway = self._current_pool(req.pool_id)
        if req.address is not None and req.address.version != lease.version:
            raise RefusedError(f"address {req.address} is not an IPv{lease.version} address of pool {lease}")
        if req.is_gateway:
            if req.address is not None and req.address != gateway:
                raise RefusedError(f"gateway {req.address} is not possible: the gateway of a pyflannel network is the "
                                   f"first address of this host's lease, {gateway}. Create the network without "
                                   f"--gateway: `{create_command()}`")
            return {"Address": f"{gateway}/{lease.prefixlen}", "Data": {}}
        with self.store.transaction() as st:
            pool = st.pools.setdefault(req.pool_id, PoolRecord(str(lease), [], parse_pool_id(req.pool_id)[0]))
            allocated = set(pool.allocated)
            if req.address is not None:
                ip = req.address
                if ip not in lease or ip in (lease.network_address, lease.broadcast_address):
                    raise RefusedError(f"address {ip} is not a host address of this host's lease {lease}")
                if ip == gateway:
                    raise RefusedError(f"address {ip} is the gateway of this host's lease {lease}")
                if str(ip) in allocated:
                    raise RefusedError(f"address {ip} is already in use")
            else:
                ip = allocate(AddressRange.of(lease, gateway=gateway), PoolAllocations(allocated))
                if ip is None:
                    raise RefusedError(f"no free address left in this host's lease {lease} "
                                       f"({len(allocated)} containers hold addresses)")
            pool.allocated = sorted(allocated | {str(ip)}, key=ipaddress.ip_address)
        return {"Address": f"{ip}/{lease.prefixlen}", "Data": {}}

    def release_address(self, req: v.ReleaseAddress) -> dict:
        with self.store.transaction() as st:
            pool = st.pools.get(req.pool_id)
            if pool is None:
                return {}
            if str(req.address) in pool.allocated:
                pool.allocated.remove(str(req.address))
        return {}
