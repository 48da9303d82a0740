"""The tunnel guard: the overlay's UDP ports take only the cluster, and containers neither send tunnel packets nor
open connections to etcd.

`firewall.tunnel_rules` in raw PREROUTING (both families), rewritten atomically whenever the networks served change;
each VXLAN network's frames are accepted only from its leases' public addresses, an ip set per network and address
family kept in step with the lease events: a host's address goes in before its routes, and out after them. On stop
everything goes. A kernel without ip sets or iptables leaves the ports open, said once in the log (doctor says it
too): the overlay itself matters more.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading

from pyflannel import firewall
from pyflannel.kernel import iptables, ipset
from pyflannel.kernel.errors import KernelError

from .model.lease import Lease
from .store.base import parse_endpoints
from .subnets import IPv4Network

log = logging.getLogger(__name__)

SET_PREFIX = "pyflannel-vtep"


def etcd_addresses(endpoints: list[str]) -> list[tuple[str, int]]:
    """(address, port) of every etcd endpoint, host names resolved now (one that does not resolve is left out)."""
    found = []
    for _, host, port in parse_endpoints(endpoints):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            log.warning("tunnel guard: etcd endpoint %s does not resolve; containers are not kept from it", host)
            continue
        found += [(info[4][0], port) for info in infos]
    return sorted(set(found))


class TunnelGuard:
    def __init__(self, etcd: list[tuple[str, int]] = (), allow_container_tunnels: bool = False,
                 allow_container_etcd: bool = False):
        self.etcd = list(etcd)
        self.allow_container_tunnels = allow_container_tunnels
        self.allow_container_etcd = allow_container_etcd
        self.lock = threading.Lock()
        self.specs: dict[str, firewall.TunnelSpec] = {}
        self.members: dict[str, dict[IPv4Network, tuple[str, ...]]] = {}  # network -> subnet -> addresses in sets
        self.closed = False
        self.broken: str | None = None  # why the guard could not be put in place

    # --- what the networks call --------------------------------------------------------------------------------
    def serve(self, name: str, spec: firewall.TunnelSpec, peers: list[Lease]) -> None:
        """Network `name` starts: its sets hold its peers' addresses, then the rules include it."""
        with self.lock:
            if self.closed:
                return
            self.specs[name], self.members[name] = spec, {lease.subnet: self._addresses(spec, lease)
                                                          for lease in peers}
            self._guarded(f"network {name}", self._fill, name)
            self._guarded(f"network {name}", self._write)

    def admit(self, name: str, lease: Lease) -> None:
        """A peer's lease appeared or changed: its addresses are allowed (before its routes go in)."""
        with self.lock:
            spec = self.specs.get(name)
            if self.closed or spec is None or spec.vni is None:
                return
            before = self.members[name].get(lease.subnet, ())
            self.members[name][lease.subnet] = after = self._addresses(spec, lease)
            self._guarded(f"network {name}", self._change, name, set(after) - set(before), set(before) - set(after))

    def release(self, name: str, subnet: IPv4Network) -> None:
        """A peer's lease went (its routes are gone): its addresses are no longer allowed."""
        with self.lock:
            spec = self.specs.get(name)
            if self.closed or spec is None or spec.vni is None:
                return
            gone = self.members[name].pop(subnet, ())
            self._guarded(f"network {name}", self._change, name, set(), set(gone))

    def leave(self, name: str) -> None:
        """Network `name` is left: the rules without it, then its sets go."""
        with self.lock:
            if self.specs.pop(name, None) is None:
                return
            self.members.pop(name, None)
            self._guarded(f"network {name}", self._write)

    def close(self) -> None:
        """pyflanneld stops: no rule and no set of ours is left."""
        with self.lock:
            self.closed = True
            self.specs.clear()
            self.members.clear()
            self._guarded("stop", self._write)

    # --- the kernel ---------------------------------------------------------------------------------------------
    @staticmethod
    def _addresses(spec: firewall.TunnelSpec, lease: Lease) -> tuple[str, ...]:
        """The lease's public addresses that may send the network's VXLAN frames (one per underlay family)."""
        wanted = {4: lease.public_ip, 6: lease.public_ipv6}
        return tuple(wanted[v] for v in spec.vxlan_families if wanted[v]) if spec.vni is not None else ()

    def _sets(self, name: str) -> dict[int, str]:
        spec = self.specs[name]
        return {v: firewall.vtep_set(spec.vni, v) for v in spec.vxlan_families} if spec.vni is not None else {}

    def _fill(self, name: str) -> None:
        """The network's sets hold exactly its peers' addresses (members left by a run that was killed go)."""
        wanted = {a for addresses in self.members[name].values() for a in addresses}
        for version, set_name in self._sets(name).items():
            ipset.ensure(set_name, v6=version == 6)
            current = ipset.members(set_name)
            mine = {a for a in wanted if ipaddress.ip_address(a).version == version}
            for address in mine - current:
                ipset.add(set_name, address)
            for address in current - mine:
                ipset.delete(set_name, address)

    def _change(self, name: str, added: set[str], removed: set[str]) -> None:
        sets = self._sets(name)
        still = {a for addresses in self.members[name].values() for a in addresses}
        for address in added:
            ipset.add(sets[ipaddress.ip_address(address).version], address)
        for address in removed - still:
            ipset.delete(sets[ipaddress.ip_address(address).version], address)

    def _write(self) -> None:
        """The chain holds the rules of the networks served (hooked in); sets no network uses go. With no network
        served, neither chain nor hook remains."""
        rules = firewall.tunnel_rules(list(self.specs.values()), self.etcd, self.allow_container_tunnels,
                                      self.allow_container_etcd)
        table, chain, hook, first = firewall.TUNNEL_HOOK
        for v6 in (False, True):
            if not iptables.available(v6=v6):
                continue
            if self.specs:
                iptables.replace_chain(table, firewall.TUNNEL, [list(r.args) for r in rules if r.v6 == v6], v6=v6)
                iptables.ensure(table, chain, list(hook), first=first, v6=v6)
            else:
                iptables.remove(table, chain, list(hook), v6=v6)
                iptables.delete_chain(table, firewall.TUNNEL, v6=v6)
        wanted = {set_name for name in self.specs for set_name in self._sets(name).values()}
        for set_name in ipset.names(SET_PREFIX) - wanted:
            ipset.destroy(set_name)

    def _guarded(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except KernelError as e:
            if self.broken is None:
                log.error("tunnel guard (%s): %s; the overlay's UDP ports stay open to anyone", what, e)
            self.broken = str(e)
            return
        self.broken = None
