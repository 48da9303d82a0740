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
import errno
import functools
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.driver.endpoint import Plumbing, mac_for
from pyflannel.driver.errors import PlumbingError

from .hostlocal import AddressRange, HostLocalStore
from .protocol import CHECK_FAILED, INVALID_CONFIG, KERNEL_REFUSED, UNKNOWN_CONTAINER, CniError

DEFAULT_BRIDGE = "cni0"
HOST_VETH_PREFIX = "vpf"
IPTABLES_TIMEOUT = 10  # seconds


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
        addresses = AddressRange.from_range(ipam["ranges"][0][0])
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


def _kernel_error(what: str, e: Exception) -> CniError:
    text = e.args[1] if isinstance(e, NetlinkError) and len(e.args) > 1 else str(e)
    return CniError(KERNEL_REFUSED, f"{what}: {text}")


def _kernel_errors(fn):
    """A netlink or Plumbing failure that no step named leaves `fn` as a CniError all the same."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NetlinkError, PlumbingError) as e:
            raise _kernel_error(f"{fn.__name__}: the kernel refused a network change", e) from None
    return wrapper


@contextlib.contextmanager
def _netns_fd(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CniError(UNKNOWN_CONTAINER, f"cannot open the container's network namespace {path}: "
                                          f"{e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _inside(fd: int):
    """A netlink socket in the namespace `fd`; this single-threaded process switches there for the block."""
    pr_netns.pushns(fd)
    try:
        with IPRoute() as ipr:
            yield ipr
    finally:
        pr_netns.popns()


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _has_address(ipr: IPRoute, index: int, address: ipaddress.IPv4Interface) -> bool:
    return any(a.get("address") == str(address.ip) and a["prefixlen"] == address.network.prefixlen
               for a in ipr.get_addr(index=index, family=socket.AF_INET))


def _bridge_index(ipr: IPRoute, conf: BridgeConf) -> int:
    """The bridge, created or repaired by the driver's Plumbing only when it is not as wanted (the common case
    of an existing bridge costs two netlink dumps and no iptables run)."""
    index = _lookup(ipr, conf.bridge)
    if index is not None:
        link = ipr.get_links(index)[0]
        if (link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge" and link.get("mtu") == conf.mtu
                and link["flags"] & 1 and _has_address(ipr, index, conf.gateway)):
            return index
    try:
        Plumbing().ensure_bridge(conf.bridge, conf.gateway, conf.mtu)
    except PlumbingError as e:
        raise CniError(KERNEL_REFUSED, str(e)) from None
    return _lookup(ipr, conf.bridge)


def _ensure_masquerade(lease: ipaddress.IPv4Network, network: ipaddress.IPv4Network) -> None:
    iptables = shutil.which("iptables")
    if iptables is None:
        raise CniError(INVALID_CONFIG, "ipMasq is on but iptables is not installed",
                       "install iptables, or set \"ipMasq\": false in the delegate")
    rule = ["POSTROUTING", "-s", str(lease), "!", "-d", str(network), "-m", "comment", "--comment",
            f"pyflannel-cni {lease}", "-j", "MASQUERADE"]
    try:
        if subprocess.run([iptables, "-w", "5", "-t", "nat", "-C", *rule], capture_output=True,
                          timeout=IPTABLES_TIMEOUT).returncode == 0:
            return
        done = subprocess.run([iptables, "-w", "5", "-t", "nat", "-A", *rule], capture_output=True, text=True,
                              timeout=IPTABLES_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CniError(KERNEL_REFUSED, f"ipMasq: iptables did not answer within {IPTABLES_TIMEOUT}s") from None
    if done.returncode != 0:
        raise CniError(KERNEL_REFUSED, f"ipMasq: iptables refused the MASQUERADE rule: {done.stderr.strip()}")


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
            with IPRoute() as ipr:
                bridge = _bridge_index(ipr, conf)
                try:
                    ipr.link("add", ifname=host_end, kind="veth", mtu=conf.mtu,
                             peer={"ifname": ifname, "net_ns_fd": fd, "mtu": conf.mtu, "address": mac_for(ip)})
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        raise CniError(KERNEL_REFUSED, f"cannot create the veth pair {host_end}/{ifname}: "
                                                       f"{host_end} exists here or {ifname} exists in {netns}")
                    raise _kernel_error(f"cannot create the veth pair {host_end}/{ifname}", e) from None
                created = True
                host = _lookup(ipr, host_end)
                ipr.link("set", index=host, master=bridge, state="up")
                if conf.hairpin:
                    ipr.brport("set", index=host, mode=1)
                macs = {conf.bridge: ipr.get_links(bridge)[0].get("address"),
                        host_end: ipr.get_links(host)[0].get("address")}
            with _inside(fd) as cipr:
                index = _lookup(cipr, ifname)
                cipr.addr("add", index=index, address=str(ip), prefixlen=address.network.prefixlen)
                cipr.link("set", index=index, state="up")
                for route in conf.routes:
                    cipr.route("add", dst=str(route.dst), gateway=str(route.gw))
                macs[ifname] = cipr.get_links(index)[0].get("address")
            if conf.ip_masq:
                _ensure_masquerade(conf.addresses.subnet, flannel_network)
        except BaseException as e:
            store.release(container_id, ifname)
            if created:
                with contextlib.suppress(CniError):
                    _delete_host_end(host_end)
            if isinstance(e, NetlinkError):
                raise _kernel_error(f"cannot attach {ifname} in {netns} to {conf.bridge}", e) from None
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
        Plumbing().delete_link(name)  # deleting one end of a veth pair deletes both, wherever the other is
    except PlumbingError as e:
        raise CniError(KERNEL_REFUSED, str(e)) from None


@_kernel_errors
def delete(conf: BridgeConf, container_id: str, ifname: str, netns: str) -> None:
    """Release the address and remove the veth pair; whatever is already gone is fine (DEL is idempotent)."""
    with HostLocalStore(conf.ipam_dir, conf.network) as store:
        store.release(container_id, ifname)
        _delete_host_end(host_veth_name(container_id, ifname))
        if netns and os.path.exists(netns):  # an interface made by another plugin (e.g. the stock bridge)
            with _netns_fd(netns) as fd, _inside(fd) as cipr:
                index = _lookup(cipr, ifname)
                if index is not None:
                    cipr.link("del", index=index)


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
    with IPRoute() as ipr:
        bridge = _lookup(ipr, conf.bridge)
        if bridge is None:
            fail(f"bridge {conf.bridge} is missing")
        if not _has_address(ipr, bridge, conf.gateway):
            fail(f"bridge {conf.bridge} lacks the gateway address {conf.gateway}")
        host = _lookup(ipr, host_end)
        if host is None:
            fail(f"host veth {host_end} is missing")
        link = ipr.get_links(host)[0]
        if link.get("master") != bridge or not link["flags"] & 1:
            fail(f"host veth {host_end} is not up on {conf.bridge}")
    with _netns_fd(netns) as fd, _inside(fd) as cipr:
        index = _lookup(cipr, ifname)
        if index is None:
            fail(f"{ifname} is missing in {netns}")
        if not _has_address(cipr, index, address):
            fail(f"{ifname} in {netns} lacks its address {address}")
        if not cipr.get_links(index)[0]["flags"] & 1:
            fail(f"{ifname} in {netns} is down")
        present = {(f"{r.get('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", r.get("RTA_GATEWAY"))
                   for r in cipr.route("dump", family=socket.AF_INET, oif=index)}
        for route in conf.routes:
            if (str(route.dst), str(route.gw)) not in present:
                fail(f"route {route.dst} via {route.gw} is missing in {netns}")
