"""Named flannel networks in etcd: find a network's config, or write it as the first host to use the name.

flannel's own multi-network layout: the default network is <prefix>/config + <prefix>/subnets/, a named one is
<prefix>/<NAME>/config + <prefix>/<NAME>/subnets/, so `flanneld -etcd-prefix <prefix>/<NAME>` can join it.

A new network gets the Network asked for (`--subnet`), or the first free /16 of AUTO_POOL, and the lowest VNI no
other network uses (VNI 1 stays the default network's). It is IPv4-only unless IPv6 is asked for: then (vxlan only)
it also gets the first free /48 of AUTO_POOL6 as its IPv6Network. IPv4-only is what every flanneld can serve: a
dual-stack network whose hosts have no IPv6 underlay carries IPv6 inside IPv4, in leases without PublicIPv6, which
only pyflannel reads (flanneld v0.14+ dereferences the missing address). Docker asks for the IPv4 pool before it
says the network has IPv6 (`--ipv6`: a second RequestPool), so IPv6 can also be added to a network's config later,
with a compare-and-swap, while this host is the only one serving it (`add_ipv6`).

Two hosts creating two networks at the same moment must not pick the same VNI or Network: each choice is claimed
first with a create-only key, <prefix>/_pyflannel/vni/<VNI>, <prefix>/_pyflannel/network/<a.b.c.d-len> and
<prefix>/_pyflannel/network6/<addr-len> (value: the network's name); a network name cannot start with "_", so the
claims never look like a network.
"""
from __future__ import annotations

import json
import logging
from typing import Iterator

from pyflannel.localapi import BACKENDS, DEFAULT_NETWORK, name_problem

from . import config as netconfig
from .errors import ConfigError, UserError
from .store.base import ConfigNotFound, Store
from .subnets import IPv4Network, IPv6Network

log = logging.getLogger(__name__)

AUTO_POOL = IPv4Network("10.128.0.0/9")  # Networks of named networks created without --subnet: 128 of /16
AUTO_PREFIX = 16
AUTO_POOL6 = IPv6Network("fd00:f1a0::/32")  # IPv6Networks of new named networks: 65536 ULA /48s
AUTO_PREFIX6 = 48
CLAIMS = "_pyflannel"
MAX_VNI = (1 << 24) - 1


class NetworkConflict(UserError):
    """The request contradicts etcd or another network (HTTP 409 in the local API)."""


def check_name(name: str) -> None:
    problem = name_problem(name)
    if problem or name == DEFAULT_NETWORK:
        raise UserError(problem or f"network name {name!r} names the default network")


def backend_config(backend: str, vni: int) -> dict:
    """A new named network's Backend. Its VNI numbers it on this host (device flannel.<VNI> or flannel-wg.<VNI>);
    WireGuard also needs a UDP port of its own beside the default network's 51820."""
    if backend == "vxlan":
        return {"Type": "vxlan", "VNI": vni}
    if backend == "wireguard":
        return {"Type": "wireguard", "VNI": vni, "ListenPort": netconfig.WIREGUARD_DEFAULT_PORT + vni - 1}
    raise UserError(f"backend {backend!r}: a named network can use {' or '.join(BACKENDS)}")


def _parsed(configs: dict[str, str]) -> dict[str, netconfig.NetworkConfig]:
    good = {}
    for name, text in configs.items():
        try:
            good[name] = netconfig.parse(text)
        except ConfigError as e:
            log.warning("ignoring the config of network %s: %s", name, e)
    return good


def _auto_networks() -> Iterator[IPv4Network]:
    return AUTO_POOL.subnets(new_prefix=AUTO_PREFIX)


def _claim_key(network) -> str:
    return f"network{'6' if network.version == 6 else ''}/{network.network_address}-{network.prefixlen}"


class Catalog:
    def __init__(self, root: Store, prefix: str):
        self.root = root
        self.prefix = prefix

    def where(self, name: str) -> str:
        return f"{self.prefix}/{name}/config"

    def config(self, name: str, wanted: IPv4Network | None, create: bool, backend: str | None = None,
               ipv6: bool = False) -> str:
        """The raw config of network `name`, written first if absent and `create` (with `backend`, default vxlan,
        dual stack if `ipv6`); NetworkConflict when `wanted` or `backend` contradicts it, ConfigNotFound when absent
        and not `create`."""
        try:
            text = self.root.child(name).network_config()
        except ConfigNotFound:
            if not create:
                raise ConfigNotFound(f"network {name}: {self.where(name)} is not in etcd (deleted?); write it "
                                     f"again, or remove the Docker network and create it again") from None
            text = self._create(name, wanted, backend or "vxlan", ipv6)
        found = netconfig.parse(text)
        if backend is not None and found.backend_type != backend:
            raise NetworkConflict(f"network {name} uses the {found.backend_type} backend in etcd ({self.where(name)}); "
                                  f"the {backend} backend asked for contradicts it: ask for {found.backend_type}, or "
                                  f"for no backend")
        if wanted is not None and found.network != wanted:
            raise NetworkConflict(f"network {name} is {found.network} in etcd ({self.where(name)}); --subnet {wanted} "
                                  f"contradicts it: create the Docker network with --subnet {found.network}, or "
                                  f"without --subnet")
        return text

    def _others(self, name: str) -> dict[str, netconfig.NetworkConfig]:
        others = _parsed({n: t for n, t in self.root.named_configs().items() if n != name})
        try:
            others[DEFAULT_NETWORK] = netconfig.parse(self.root.network_config())
        except (ConfigNotFound, ConfigError):
            pass
        return others

    def add_ipv6(self, name: str, public_ip: str) -> str:
        """Network `name`'s config with IPv6 (`--ipv6` on a network created without it): an IPv6Network is claimed
        and written into the config by compare-and-swap, while no host but `public_ip` serves the network. Hosts
        already serving it would go on without IPv6 (they read the config at start), and a flanneld among them
        could not start again without an IPv6 underlay: then NetworkConflict says how to get IPv6 instead."""
        child = self.root.child(name)
        text = child.network_config()
        found = netconfig.parse(text)
        if found.ipv6 is not None:
            return text
        if found.backend_type != "vxlan":
            raise UserError(f"network {name} uses the {found.backend_type} backend, which pyflannel runs over IPv4 "
                            f"only: create a vxlan network for IPv6")
        others = sorted({lease.public_ip for lease in child.leases()[0] if lease.public_ip != public_ip})
        if others:
            raise NetworkConflict(
                f"network {name} is IPv4-only in etcd ({self.where(name)}) and host(s) {', '.join(others)} serve it "
                f"already: IPv6 is not added under them. Create another network with --ipv6 (or --ipam-opt "
                f"pyflannel.ipv6=true) from the start, or add \"EnableIPv6\": true and an \"IPv6Network\" to "
                f"{self.where(name)} and restart pyflanneld on each of its hosts")
        claimed = []
        try:
            network6 = self._claim_network6(name, self._others(name), claimed)
            config = json.loads(text)
            backend = {"Backend": config.pop("Backend")} if "Backend" in config else {}  # stays last, as written
            new = json.dumps({**config, "EnableIPv6": True, "IPv6Network": str(network6), **backend})
            if child.replace_key("config", new, text):
                log.info("network %s: IPv6 added in etcd: %s", name, new)
                return new
        except BaseException:
            self._release(claimed, name)
            raise
        self._release(claimed, name)  # the config changed meanwhile: try again from what it is now
        return self.add_ipv6(name, public_ip)

    def _create(self, name: str, wanted: IPv4Network | None, backend: str, ipv6: bool) -> str:
        if ipv6 and backend != "vxlan":
            raise UserError(f"IPv6: the {backend} backend runs over IPv4 only in pyflannel: use vxlan for IPv6")
        others = self._others(name)
        claimed = []
        try:
            network = self._claim_network(name, wanted, others, claimed)
            vni = self._claim_vni(name, others, claimed)
            config = {"Network": str(network)}
            if ipv6:
                config.update(EnableIPv6=True, IPv6Network=str(self._claim_network6(name, others, claimed)))
            text = json.dumps({**config, "Backend": backend_config(backend, vni)})
            if self.root.child(name).create_config(text):
                log.info("network %s created in etcd: %s", name, text)
                return text
            log.info("network %s was created by another host meanwhile: using its config", name)
            text = self.root.child(name).network_config()
        except BaseException:
            self._release(claimed, name)
            raise
        winner = netconfig.parse(text)  # it may use what we claimed (the other host found our claims to be its own)
        kept = {f"vni/{winner.vni}", _claim_key(winner.network)} | (
            {_claim_key(winner.ipv6.network)} if winner.ipv6 else set())
        self._release([key for key in claimed if key not in kept], name)
        return text

    def _claim(self, key: str, name: str, claimed: list) -> bool:
        """Claim `key` for `name`; True when it is ours (now, or from an earlier try). Only what this call created
        goes into `claimed`, to be released if the network is not created: a claim of another host creating the
        same name at the same moment stays."""
        if self.root.create_key(f"{CLAIMS}/{key}", name):
            claimed.append(key)
            return True
        return self.root.read_key(f"{CLAIMS}/{key}") == name

    def _release(self, claimed: list, name: str) -> None:
        for key in claimed:
            self.root.delete_key(f"{CLAIMS}/{key}", name)

    def _claim_network(self, name: str, wanted: IPv4Network | None, others: dict, claimed: list) -> IPv4Network:
        def clash(network: IPv4Network) -> str | None:
            return next((n for n, c in others.items() if c.network.overlaps(network)), None)

        if wanted is not None:
            if wanted.prefixlen > 28:
                raise UserError(f"--subnet {wanted} is too small for a flannel network: use /28 or wider")
            other = clash(wanted)
            if other is not None:
                raise NetworkConflict(f"--subnet {wanted} overlaps network {other} ({others[other].network}): "
                                      f"choose a Network of its own for {name}")
            if not self._claim(_claim_key(wanted), name, claimed):
                raise NetworkConflict(f"--subnet {wanted} is being claimed by another network right now: choose "
                                      f"another")
            return wanted
        for network in _auto_networks():
            if clash(network) is None and self._claim(_claim_key(network), name, claimed):
                return network
        raise NetworkConflict(f"every /{AUTO_PREFIX} of {AUTO_POOL} is in use: give network {name} a Network with "
                              f"--subnet")

    def _claim_network6(self, name: str, others: dict, claimed: list) -> IPv6Network:
        used = [c.ipv6.network for c in others.values() if c.ipv6]
        for network in AUTO_POOL6.subnets(new_prefix=AUTO_PREFIX6):
            if not any(network.overlaps(u) for u in used) and self._claim(_claim_key(network), name, claimed):
                return network
        raise NetworkConflict(f"every /{AUTO_PREFIX6} of {AUTO_POOL6} is in use")

    def _claim_vni(self, name: str, others: dict, claimed: list) -> int:
        used = {c.vni for c in others.values()} | {netconfig.VXLAN_DEFAULT_VNI}
        vni = netconfig.VXLAN_DEFAULT_VNI + 1
        while vni <= MAX_VNI:
            if vni not in used and self._claim(f"vni/{vni}", name, claimed):
                return vni
            vni += 1
        raise NetworkConflict("no VNI left")
