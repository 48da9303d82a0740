"""The native attach for a "bridge" delegate with host-local IPAM (flannel's default), through pyroute2.

    host namespace                                         container namespace (CNI_NETNS)
    cni0  bridge, the lease's gateway (10.5.34.1/24), up
      └─ vpf<hash>  veth host end, on the bridge, up  ───── <CNI_IFNAME> 10.5.34.2/24, up
                                                              routes: ipam.routes via the gateway (flannel: the
                                                              Network), default via it with isDefaultGateway

It does what the bridge plugin does for the same config, with the same IPAM files, so the two are interchangeable.
Differences, on purpose: the host end's name is derived from the container id and ifname, so a DEL without a
namespace (CNI_NETNS="", as ctr sends) still finds and removes it (the bridge plugin leaks it); ipMasq is one
MASQUERADE rule per lease for traffic leaving the flannel Network, not a chain per container.
Delegate configs with keys this module does not implement go to the real plugin (netconf.why_not_native).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from pyflannel.addresses import AddressRange
from pyflannel.kernel import forwarding, iptables, links, namespaces
from pyflannel.kernel.errors import KernelError, reraised_as
from pyflannel.kernel.links import mac_for

from .hostlocal import HostLocalStore, address_range
from .protocol import CHECK_FAILED, INVALID_CONFIG, KERNEL_REFUSED, UNKNOWN_CONTAINER, CniError

DEFAULT_BRIDGE = "cni0"
HOST_VETH_PREFIX = "vpf"


def host_veth_name(container_id: str, ifname: str) -> str:
    return HOST_VETH_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network
    gw: ipaddress.IPv4Address


@dataclass(frozen=True)
class BridgeConf:
    network: str              # the config's name: the IPAM folder
    bridge: str
    mtu: int
    addresses: AddressRange
    routes: tuple[Route, ...]
    hairpin: bool
    ip_masq: bool
    ipam_dir: str

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.addresses.gateway}/{self.addresses.subnet.prefixlen}")

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
        addresses = address_range(ipam["ranges"][0][0])
        gateway = addresses.gateway
        routes = []
        for route in ipam.get("routes", []):
            try:
                routes.append(Route(ipaddress.IPv4Network(route["dst"]),
                                    ipaddress.IPv4Address(route.get("gw", str(gateway)))))
            except (KeyError, TypeError, AttributeError, ValueError):
                raise CniError(INVALID_CONFIG, f"ipam.routes: {route!r} is not an IPv4 route "
                                               f"({{\"dst\": \"10.0.0.0/8\", optional \"gw\"}})") from None
        if flag("isDefaultGateway"):
            routes.append(Route(ipaddress.IPv4Network("0.0.0.0/0"), gateway))
        data_dir = ipam.get("dataDir", "")
        if not isinstance(data_dir, str):
            raise CniError(INVALID_CONFIG, f"ipam.dataDir must be a path, got {data_dir!r}")
        return cls(network=delegate["name"], bridge=bridge, mtu=mtu, addresses=addresses, routes=tuple(routes),
                   hairpin=flag("hairpinMode"), ip_masq=flag("ipMasq"), ipam_dir=data_dir)


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
    """The bridge, created or repaired (with forwarding through it) only when it is not as wanted (the common
    case of an existing bridge costs one netlink read and no iptables run)."""
    found = links.state(conf.bridge)
    if found and found.kind == "bridge" and found.mtu == conf.mtu and found.up and conf.gateway in found.addresses:
        return found
    links.ensure_bridge(conf.bridge, conf.gateway, conf.mtu)
    forwarding.allow(conf.bridge)
    return links.state(conf.bridge)


def _ensure_masquerade(lease: ipaddress.IPv4Network, network: ipaddress.IPv4Network) -> None:
    if not iptables.available():
        raise CniError(INVALID_CONFIG, "ipMasq is on but iptables is not installed",
                       "install iptables, or set \"ipMasq\": false in the delegate")
    rule = ["-s", str(lease), "!", "-d", str(network), "-m", "comment", "--comment", f"pyflannel-cni {lease}",
            "-j", "MASQUERADE"]
    try:
        iptables.ensure("nat", "POSTROUTING", rule)
    except KernelError as e:
        raise CniError(KERNEL_REFUSED, f"ipMasq: the MASQUERADE rule: {e}") from None


@_kernel_errors
def add(conf: BridgeConf, container_id: str, ifname: str, netns: str,
        flannel_network: ipaddress.IPv4Network) -> dict:
    """Attach the container; on failure undo what this call did. Returns the 1.0.0 result."""
    host_end = host_veth_name(container_id, ifname)
    with _netns_fd(netns) as fd, HostLocalStore(conf.ipam_dir, conf.network) as store:
        ip = store.allocate(container_id, ifname, conf.addresses)
        address = ipaddress.IPv4Interface(f"{ip}/{conf.addresses.subnet.prefixlen}")
        created = False
        try:
            bridge = _ensure_bridge(conf)
            try:
                host_mac = links.add_veth_into(host_end, ifname, fd, conf.mtu, mac_for(ip), conf.bridge, conf.hairpin)
            except links.LinkExists:
                raise CniError(KERNEL_REFUSED, f"cannot create the veth pair {host_end}/{ifname}: {host_end} "
                                               f"exists here or {ifname} exists in {netns}") from None
            created = True
            links.configure(ifname, address, [(str(r.dst), str(r.gw)) for r in conf.routes], netns_fd=fd)
            macs = {conf.bridge: bridge.mac, host_end: host_mac, ifname: mac_for(ip)}
            if conf.ip_masq:
                _ensure_masquerade(conf.addresses.subnet, flannel_network)
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
        "ips": [{"address": str(address), "gateway": str(conf.addresses.gateway), "interface": 2}],
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
        ip = store.find(container_id, ifname)
    if ip is None:
        fail(f"container {container_id} holds no address for {ifname} in {store.dir}")
    address = ipaddress.IPv4Interface(f"{ip}/{conf.addresses.subnet.prefixlen}")
    if prev_result is not None:
        listed = [entry.get("address") for entry in prev_result.get("ips", []) if isinstance(entry, dict)]
        if str(address) not in listed:
            fail(f"prevResult lists {listed}, but the container holds {address}")
    bridge = links.state(conf.bridge)
    if bridge is None:
        fail(f"bridge {conf.bridge} is missing")
    if conf.gateway not in bridge.addresses:
        fail(f"bridge {conf.bridge} lacks the gateway address {conf.gateway}")
    host = links.state(host_end)
    if host is None:
        fail(f"host veth {host_end} is missing")
    if host.master != conf.bridge or not host.up:
        fail(f"host veth {host_end} is not up on {conf.bridge}")
    with _netns_fd(netns) as fd:
        container = links.state(ifname, fd, routes=True)
    if container is None:
        fail(f"{ifname} is missing in {netns}")
    if address not in container.addresses:
        fail(f"{ifname} in {netns} lacks its address {address}")
    if not container.up:
        fail(f"{ifname} in {netns} is down")
    for route in conf.routes:
        if (str(route.dst), str(route.gw)) not in container.routes:
            fail(f"route {route.dst} via {route.gw} is missing in {netns}")
