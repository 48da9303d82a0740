"""The native attach for a "bridge" delegate with host-local IPAM (flannel's default), through pyroute2.

    host namespace                                         container namespace (CNI_NETNS)
    cni0  bridge, the lease's gateway (10.5.34.1/24), up
      └─ vpf<hash>  veth host end, on the bridge, up  ───── <CNI_IFNAME> 10.5.34.2/24, up
                                                              routes: ipam.routes via the gateway (flannel: the
                                                              Network), default via it with isDefaultGateway

Dual stack (ipam.ranges [[IPv4 range], [IPv6 range]], as flannel hands it over): one address of each range, the
bridge holds both gateways (fd00:5:0:27::1/64 too, IPv6 enabled on it), the container both addresses, and each
route goes via the gateway of its family (isDefaultGateway: a default route per family); IPv6 addresses are added
without DAD (IFA_F_NODAD), so they work at once. An IPv6-only network has just the IPv6 range.

It does what the bridge plugin does for the same config, with the same IPAM files, so the two are interchangeable.
Differences, on purpose: the host end's name is derived from the container id and ifname, so a DEL without a
namespace (CNI_NETNS="", as ctr sends) still finds and removes it (the bridge plugin leaks it); ipMasq is one
MASQUERADE rule per lease for traffic leaving the flannel Network (ip6tables for the IPv6 lease), not a chain per
container.
Delegate configs with keys this module does not implement go to the real plugin (netconf.why_not_native).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass

from pyflannel.addresses import AddressRange, IPAddress
from pyflannel.kernel import forwarding, iptables, links, namespaces
from pyflannel.kernel.errors import KernelError, reraised_as
from pyflannel.kernel.links import mac_for

from .hostlocal import HostLocalStore, address_range
from .netconf import DEFAULT_BRIDGE
from .protocol import CHECK_FAILED, INVALID_CONFIG, KERNEL_REFUSED, UNKNOWN_CONTAINER, CniError

HOST_VETH_PREFIX = "vpf"


def host_veth_name(container_id: str, ifname: str) -> str:
    return HOST_VETH_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


DEFAULT_ROUTES = {4: ipaddress.IPv4Network("0.0.0.0/0"), 6: ipaddress.IPv6Network("::/0")}


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: IPAddress


@dataclass(frozen=True)
class BridgeConf:
    network: str              # the config's name: the IPAM folder
    bridge: str
    mtu: int
    ranges: tuple[AddressRange, ...]  # range set i: ipam.ranges[i]; one, or an IPv4 and an IPv6 one
    routes: tuple[Route, ...]
    hairpin: bool
    ip_masq: bool
    ipam_dir: str

    @property
    def gateways(self) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
        """The bridge's addresses: each range's gateway with the range's prefix."""
        return tuple(ipaddress.ip_interface(f"{r.gateway}/{r.subnet.prefixlen}") for r in self.ranges)

    @property
    def ipv6(self) -> bool:
        return any(r.subnet.version == 6 for r in self.ranges)

    @classmethod
    def from_delegate(cls, delegate: dict) -> "BridgeConf":
        """For a delegate that why_not_native() accepted; every error names the field."""
        def flag(key: str) -> bool:
            value = delegate.get(key, False)
            if not isinstance(value, bool):
                raise CniError(INVALID_CONFIG, f"delegate.{key} must be true or false, got {value!r}")
            return value

        bridge = delegate.get("bridge", DEFAULT_BRIDGE)
        if not isinstance(bridge, str) or not 0 < len(bridge) <= 15 or "/" in bridge or bridge.strip() != bridge:
            raise CniError(INVALID_CONFIG, f"delegate.bridge {bridge!r} is not a valid interface name")
        mtu = delegate.get("mtu", 1500)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:
            raise CniError(INVALID_CONFIG, f"delegate.mtu {mtu!r} is not an MTU between 576 and 65535")
        ipam = delegate["ipam"]
        ranges = tuple(address_range(range_set[0]) for range_set in ipam["ranges"])
        gateways = {r.subnet.version: r.gateway for r in ranges}
        routes = [_route(route, gateways) for route in ipam.get("routes", [])]
        if flag("isDefaultGateway"):
            routes += [Route(DEFAULT_ROUTES[version], gateway) for version, gateway in gateways.items()]
        data_dir = ipam.get("dataDir", "")
        if not isinstance(data_dir, str):
            raise CniError(INVALID_CONFIG, f"ipam.dataDir must be a path, got {data_dir!r}")
        return cls(network=delegate["name"], bridge=bridge, mtu=mtu, ranges=ranges, routes=tuple(routes),
                   hairpin=flag("hairpinMode"), ip_masq=flag("ipMasq"), ipam_dir=data_dir)


def _route(route, gateways: dict[int, IPAddress]) -> Route:
    """An ipam.routes entry; without "gw", via the gateway of the range of its family."""
    try:
        dst = ipaddress.ip_network(route["dst"])
        gw = ipaddress.ip_address(route["gw"]) if "gw" in route else gateways.get(dst.version)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise CniError(INVALID_CONFIG, f"ipam.routes: {route!r} is not a route "
                                       f"({{\"dst\": \"10.0.0.0/8\", optional \"gw\"}})") from None
    if gw is None or gw.version != dst.version:
        raise CniError(INVALID_CONFIG, f"ipam.routes: {route!r}: no IPv{dst.version} gateway for it "
                                       f"({'its gw is of the other family' if gw else 'no range of its family'})")
    return Route(dst, gw)


# A kernel-layer failure that no step named leaves the command as a CniError all the same.
_kernel_errors = reraised_as(lambda fn, e: CniError(KERNEL_REFUSED, f"{fn.__name__}: the kernel refused a network "
                                                                    f"change: {e}"))


@contextlib.contextmanager
def _netns_fd(path: str):
    try:
        with namespaces.opened(path) as fd:
            yield fd
    except namespaces.NamespaceMissing as e:
        raise CniError(UNKNOWN_CONTAINER, str(e)) from None


def _ensure_bridge(conf: BridgeConf) -> links.LinkState:
    """The bridge, created or repaired (with forwarding through it, IPv6 forwarding too for an IPv6 range) only when
    it is not as wanted (the common case of an existing bridge costs one netlink read and no iptables run)."""
    gateways, v6 = conf.gateways, conf.ipv6
    found = links.state(conf.bridge, v6=v6)
    if (found and found.kind == "bridge" and found.mtu == conf.mtu and found.up
            and all(gateway in found.addresses for gateway in gateways)):
        return found
    by_family = {gateway.version: gateway for gateway in gateways}
    gateway4 = by_family.get(4)  # None: an IPv6-only bridge, its MAC from the IPv6 gateway
    links.ensure_bridge(conf.bridge, gateway4, conf.mtu, mac=None if gateway4 else mac_for(by_family[6].ip))
    if v6:
        forwarding.enable_ipv6(conf.bridge)  # a host may disable IPv6 on new links
        links.ensure_gateway6(conf.bridge, by_family[6])
    forwarding.allow(conf.bridge, v6=v6)
    return links.state(conf.bridge, v6=v6)


MASQUERADE_RECHECK_SECONDS = 10.0
_masquerade_seen: dict[tuple, float] = {}  # rule -> when it was last found or made (time.monotonic)


def _ensure_masquerade(lease: ipaddress.IPv4Network | ipaddress.IPv6Network,
                       network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """The lease's MASQUERADE rule, checked at most every MASQUERADE_RECHECK_SECONDS by one process: pyflanneld
    runs the thin client's ADDs one after another, and running iptables on each (an exec) was most of an ADD's
    work. A rule deleted by hand is back at the first ADD after that."""
    v6 = lease.version == 6
    rule = ["-s", str(lease), "!", "-d", str(network), "-m", "comment", "--comment", f"pyflannel-cni {lease}",
            "-j", "MASQUERADE"]
    key = (v6, *rule)
    if time.monotonic() - _masquerade_seen.get(key, -MASQUERADE_RECHECK_SECONDS) < MASQUERADE_RECHECK_SECONDS:
        return
    program = "ip6tables" if v6 else "iptables"
    if not iptables.available(v6=v6):
        raise CniError(INVALID_CONFIG, f"ipMasq is on but {program} is not installed",
                       f"install {program}, or set \"ipMasq\": false in the delegate")
    try:
        iptables.ensure("nat", "POSTROUTING", rule, v6=v6)
    except KernelError as e:
        raise CniError(KERNEL_REFUSED, f"ipMasq: the MASQUERADE rule: {e}") from None
    _masquerade_seen[key] = time.monotonic()


@_kernel_errors
def add(conf: BridgeConf, container_id: str, ifname: str, netns: str,
        flannel_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | None, ...]) -> dict:
    """Attach the container; on failure undo what this call did. Returns the 1.0.0 result. `flannel_networks`:
    the flannel Network of each family (for ipMasq: traffic leaving it is masqueraded)."""
    host_end = host_veth_name(container_id, ifname)
    with _netns_fd(netns) as fd, HostLocalStore(conf.ipam_dir, conf.network) as store:
        ips = store.allocate(container_id, ifname, conf.ranges)
        addresses = [ipaddress.ip_interface(f"{ip}/{r.subnet.prefixlen}") for ip, r in zip(ips, conf.ranges)]
        created = False
        try:
            bridge = _ensure_bridge(conf)
            try:
                host_mac = links.add_veth_into(host_end, ifname, fd, conf.mtu, mac_for(ips[0]), conf.bridge,
                                               conf.hairpin)
            except links.LinkExists:
                raise CniError(KERNEL_REFUSED, f"cannot create the veth pair {host_end}/{ifname}: {host_end} "
                                               f"exists here or {ifname} exists in {netns}") from None
            created = True
            links.configure(ifname, addresses[0], [(str(r.dst), str(r.gw)) for r in conf.routes], netns_fd=fd,
                            more_addresses=tuple(addresses[1:]))
            macs = {conf.bridge: bridge.mac, host_end: host_mac, ifname: mac_for(ips[0])}
            if conf.ip_masq:
                networks = {network.version: network for network in flannel_networks if network is not None}
                for r in conf.ranges:
                    _ensure_masquerade(r.subnet, networks[r.subnet.version])
        except BaseException:
            store.release(container_id, ifname)
            if created:
                with contextlib.suppress(CniError):
                    _delete_host_end(host_end)
            raise
    return {
        "interfaces": [{"name": conf.bridge, "mac": macs[conf.bridge]},
                       {"name": host_end, "mac": macs[host_end]},
                       {"name": ifname, "mac": macs[ifname], "sandbox": netns}],
        "ips": [{"address": str(address), "gateway": str(r.gateway), "interface": 2}
                for address, r in zip(addresses, conf.ranges)],
        "routes": [{"dst": str(r.dst), "gw": str(r.gw)} for r in conf.routes],
        "dns": {},
    }


def _delete_host_end(name: str) -> None:
    try:
        links.delete(name)  # deleting one end of a veth pair deletes both, wherever the other is
    except KernelError as e:
        raise CniError(KERNEL_REFUSED, str(e)) from None


@_kernel_errors
def delete(conf: BridgeConf, container_id: str, ifname: str, netns: str) -> None:
    """Release the address and remove the veth pair; whatever is already gone is fine (DEL is idempotent)."""
    with HostLocalStore(conf.ipam_dir, conf.network) as store:
        store.release(container_id, ifname)
        _delete_host_end(host_veth_name(container_id, ifname))
        if netns and os.path.exists(netns):  # an interface made by another plugin (e.g. the stock bridge)
            with _netns_fd(netns) as fd:
                links.delete(ifname, netns_fd=fd)


@_kernel_errors
def check(conf: BridgeConf, container_id: str, ifname: str, netns: str, prev_result: dict | None) -> None:
    """The container's network is as ADD left it; else CniError(CHECK_FAILED) saying what differs."""
    def fail(what: str):
        raise CniError(CHECK_FAILED, what)

    host_end = host_veth_name(container_id, ifname)
    with HostLocalStore(conf.ipam_dir, conf.network) as store:
        held = store.addresses_of(container_id, ifname)
    addresses = []
    for r in conf.ranges:
        ip = next((ip for ip in held if ip in r.subnet), None)
        if ip is None:
            fail(f"container {container_id} holds no address of {r.subnet} for {ifname} in {store.dir}")
        addresses.append(ipaddress.ip_interface(f"{ip}/{r.subnet.prefixlen}"))
    if prev_result is not None:
        listed = [entry.get("address") for entry in prev_result.get("ips", []) if isinstance(entry, dict)]
        for address in addresses:
            if str(address) not in listed:
                fail(f"prevResult lists {listed}, but the container holds {address}")
    bridge = links.state(conf.bridge, v6=conf.ipv6)
    if bridge is None:
        fail(f"bridge {conf.bridge} is missing")
    for gateway in conf.gateways:
        if gateway not in bridge.addresses:
            fail(f"bridge {conf.bridge} lacks the gateway address {gateway}")
    host = links.state(host_end)
    if host is None:
        fail(f"host veth {host_end} is missing")
    if host.master != conf.bridge or not host.up:
        fail(f"host veth {host_end} is not up on {conf.bridge}")
    with _netns_fd(netns) as fd:
        container = links.state(ifname, fd, routes=True, v6=conf.ipv6)
    if container is None:
        fail(f"{ifname} is missing in {netns}")
    for address in addresses:
        if address not in container.addresses:
            fail(f"{ifname} in {netns} lacks its address {address}")
    if not container.up:
        fail(f"{ifname} in {netns} is down")
    for route in conf.routes:
        if (str(route.dst), str(route.gw)) not in container.routes:
            fail(f"route {route.dst} via {route.gw} is missing in {netns}")
