"""Links by name, the one home of link operations: through netlink (pyroute2), bridges, veth pairs (also with one
end in another namespace), VXLAN devices, their addresses and routes, their state for checks, deletion; through
ethtool and /proc, a device's checksum offload and router advertisements; and the MAC addresses pyflannel gives
them.

The operations on an open netlink socket (an IPRoute) are pyflanneld's, through its Kernel's socket; the others,
the driver's and the CNI plugin's, open their own, in the calling thread's namespace unless given a namespace fd."""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from . import namespaces
from .entries import MAIN_TABLE
from .errors import KernelError

log = logging.getLogger(__name__)

RT_SCOPE_UNIVERSE = 0
TX_CHECKSUM = "tx-checksum-ip-generic"


def mac_for(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Docker's scheme: 02:42 + the IPv4 address (an IPv6 address's last four bytes); unique because leases are
    disjoint across hosts."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed[-4:])


def random_mac() -> str:
    """A random unicast, locally administered MAC."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


# --- on an open netlink socket --------------------------------------------------------------------------------
def lookup(ipr: IPRoute, name: str) -> int | None:
    link = get(ipr, name)
    return link["index"] if link else None


def get(ipr: IPRoute, name: str):
    """The link `name` (one RTM_GETLINK by name), None if there is none (or the name is longer than a link's can
    be, as flannel-v6.<VNI> of a large VNI)."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ERANGE):
            return None
        raise


def by_index(ipr: IPRoute, index: int):
    return ipr.get_links(index)[0]


def kind(link) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def vxlan_attrs(link) -> dict:
    """A VXLAN device's IFLA_VXLAN_* attributes; empty for any other kind of link."""
    if kind(link) != "vxlan":
        return {}
    return dict((k, v) for k, v in link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")["attrs"]
                if k.startswith("IFLA_VXLAN"))


def add_vxlan(ipr: IPRoute, name: str, vni: int, port: int, local: str, link_index: int, mac: str, mtu: int) -> int:
    """A VXLAN device, up; its index. Over IPv4 without the outer UDP checksum the kernel adds by default (IPv4
    allows a zero one, and every receiver, flannel's too, accepts it): more TCP throughput (docs/benchmarks.md).
    IPv6 needs the checksum."""
    local_attrs = ({"vxlan_local6": local} if ":" in local else {"vxlan_local": local, "vxlan_udp_csum": 0})
    try:
        ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port, vxlan_link=link_index,
                 vxlan_learning=0, address=mac, mtu=mtu, **local_attrs)
    except NetlinkError as e:
        if e.code in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT):
            raise KernelError("the kernel has no VXLAN support: load the vxlan module (`modprobe vxlan`) "
                              "or use the host-gw backend") from None
        if e.code == errno.EEXIST:
            raise KernelError(f"cannot create {name}: a device with VNI {vni} on UDP port {port} exists "
                              f"already (another flanneld?)") from None
        raise
    index = lookup(ipr, name)
    set_up(ipr, index)
    return index


def set_up(ipr: IPRoute, index: int) -> None:
    ipr.link("set", index=index, state="up")


def set_mtu(ipr: IPRoute, index: int, mtu: int) -> None:
    ipr.link("set", index=index, mtu=mtu)


def set_mac(ipr: IPRoute, index: int, mac: str) -> None:
    ipr.link("set", index=index, address=mac)


def remove(ipr: IPRoute, index: int) -> None:
    """Delete the link `index`; one already gone is no error."""
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def keep_only_address(ipr: IPRoute, index: int, address, family: int) -> None:
    """The link's addresses of `family` are `address` alone (none if None); IPv6 link-local addresses stay, and an
    IPv6 address is added without duplicate address detection (usable at once)."""
    want = {(str(address.ip), address.network.prefixlen)} if address is not None else set()
    have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=family)
            if family == socket.AF_INET or a["scope"] == RT_SCOPE_UNIVERSE}
    for addr, plen in have - want:  # e.g. the gateway of a former lease
        ipr.addr("del", index=index, address=addr, prefixlen=plen)
    for addr, plen in want - have:
        try:
            ipr.addr("add", index=index, address=addr, prefixlen=plen,
                     **({"flags": IFA_F_NODAD} if family == socket.AF_INET6 else {}))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


# --- by name, outside netlink -----------------------------------------------------------------------------------
def disable_ipv6_ra(name: str) -> None:
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
            f.write("0")
    except OSError:
        pass  # IPv6 disabled on the host: nothing to turn off


def tx_checksum_offload(name: str) -> bool | None:
    """tx-checksum-ip-generic of a device (the SIOCETHTOOL ioctl, through pyroute2); None when unreadable."""
    try:
        ethtool = IoctlEthtool(name)
        try:
            features = ethtool.get_features()
            return bool(features[TX_CHECKSUM]) if TX_CHECKSUM in features else None
        finally:
            ethtool.close()
    except (OSError, KeyError):
        return None


def disable_tx_checksum_offload(name: str) -> None:
    """`ethtool -K <name> tx-checksum-ip-generic off`, as flannel does under -ip-masq (flannel #1279)."""
    ethtool = IoctlEthtool(name)
    try:
        features = ethtool.get_features()
        if TX_CHECKSUM in features and features[TX_CHECKSUM]:
            features[TX_CHECKSUM] = False
            ethtool.set_features(features)
    finally:
        ethtool.close()


# --- each on a socket of its own ---------------------------------------------------------------------------------
def netlink_error(what: str, e: Exception) -> KernelError:
    text = e.args[1] if isinstance(e, NetlinkError) and len(e.args) > 1 else str(e)
    return KernelError(f"{what}: {text}")


def with_prefix(prefixes: tuple[str, ...]) -> dict[str, dict]:
    """Links whose name starts with one of `prefixes`: name -> {index, kind, mtu, master, up, mac}."""
    out = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            if name and name.startswith(prefixes):
                out[name] = {"index": link["index"], "kind": kind(link), "mtu": link.get("mtu"),
                             "master": link.get("master"), "mac": link.get("address"), "up": bool(link["flags"] & 1)}
    return out


def routes_overlapping(network: ipaddress.IPv4Network) -> list[str]:
    """Main-table IPv4 routes that overlap `network`, as "dst dev name" (what Docker's overlap check sees)."""
    out = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        for route in ipr.route("dump", family=socket.AF_INET):
            dst = route.get("dst")
            if route.get("table") != MAIN_TABLE or dst is None or route["dst_len"] == 0:
                continue
            net = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
            if net.overlaps(network):
                out.append(f"{net} dev {names.get(route.get('oif'), '?')}")
    return out


def ensure_bridge(name: str, gateway: ipaddress.IPv4Interface | None, mtu: int, mac: str | None = None) -> None:
    """Create or repair a bridge: kind bridge, the gateway address (and no other IPv4; none on an IPv6-only bridge,
    which needs `mac`), MTU, up. Its MAC: `mac`, by default the gateway's (mac_for)."""
    created = False
    try:
        with IPRoute() as ipr:
            idx = lookup(ipr, name)
            if idx is None:
                # A fixed MAC, or the bridge would take the lowest port's MAC and change it as ports come and go.
                ipr.link("add", ifname=name, kind="bridge", address=mac or mac_for(gateway.ip), mtu=mtu)
                created = True
                idx = lookup(ipr, name)
                log.info("created bridge %s", name)
            else:
                found = kind(by_index(ipr, idx))
                if found != "bridge":
                    raise KernelError(f"interface {name} exists but is a {found or 'device'} and not a bridge: "
                                      f"remove it (ip link del {name})")
            set_mtu(ipr, idx, mtu)
            keep_only_address(ipr, idx, gateway, socket.AF_INET)
            set_up(ipr, idx)
    except NetlinkError as e:
        if created:  # do not leave half a bridge behind; never delete one we did not make here
            try:
                delete(name)
            except KernelError:
                pass
        raise netlink_error(f"cannot set up bridge {name} with {gateway}", e) from None


def ensure_gateway6(name: str, gateway: ipaddress.IPv6Interface) -> None:
    """Give the link `name` the IPv6 address `gateway`, without DAD, and no other global one (link-local addresses
    stay). The link must have IPv6 enabled (forwarding.enable_ipv6)."""
    try:
        with IPRoute() as ipr:
            idx = lookup(ipr, name)
            if idx is None:
                raise KernelError(f"{name} is missing")
            keep_only_address(ipr, idx, gateway, socket.AF_INET6)
    except NetlinkError as e:
        raise netlink_error(f"cannot give {name} the IPv6 address {gateway}", e) from None


def delete(name: str, netns_fd: int | None = None) -> bool:
    """Delete the link `name` (in the namespace `netns_fd`, else this thread's) if it exists; True if it did."""
    try:
        with namespaces.netlink(netns_fd) as ipr:
            idx = lookup(ipr, name)
            if idx is None:
                return False
            remove(ipr, idx)
            log.info("deleted %s", name)
            return True
    except NetlinkError as e:
        raise netlink_error(f"cannot delete {name}", e) from None


def ensure_veth(host: str, container: str, bridge: str, mtu: int, mac: str, hairpin: bool = False,
                isolated: bool = False) -> None:
    """Create or repair a veth pair: the host end on `bridge` and up (its port in hairpin mode if asked; isolated if
    asked: the bridge forwards nothing between two isolated ports, with or without br_netfilter), both ends at
    `mtu`, the other end's MAC.

    If the container end is already gone from this namespace, its runtime has moved it into the container (a
    repeated call): only the host end is repaired.
    """
    try:
        with IPRoute() as ipr:
            br = lookup(ipr, bridge)
            if br is None:
                raise KernelError(f"bridge {bridge} is missing")
            idx = lookup(ipr, host)
            if idx is None:
                stray = lookup(ipr, container)
                if stray is not None:
                    ipr.link("del", index=stray)
                ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                         peer={"ifname": container, "mtu": mtu, "address": mac})
                idx = lookup(ipr, host)
                log.info("created veth pair %s/%s on %s", host, container, bridge)
            else:
                found = kind(by_index(ipr, idx))
                if found != "veth":
                    raise KernelError(f"interface {host} exists but is a {found or 'device'} and not a veth: "
                                      f"remove it (ip link del {host})")
            ipr.link("set", index=idx, mtu=mtu, master=br)
            set_up(ipr, idx)
            ipr.brport("set", index=idx, mode=int(hairpin), isolated=int(isolated))
            peer = lookup(ipr, container)
            if peer is not None:
                ipr.link("set", index=peer, mtu=mtu, address=mac)
    except NetlinkError as e:
        raise netlink_error(f"cannot set up veth pair {host}/{container} on {bridge}", e) from None


class LinkExists(KernelError):
    """A link of that name exists already."""


DEFAULT_DST = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}  # a route without RTA_DST: the default route


@dataclass(frozen=True)
class LinkState:
    """What a link looks like, for checks: its IPv4 addresses and the IPv4 routes through it (dst CIDR, gateway);
    asked for with `v6`, its global IPv6 addresses and IPv6 routes too."""
    name: str
    kind: str | None
    mtu: int
    up: bool
    master: str | None
    mac: str
    addresses: frozenset[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    routes: frozenset[tuple[str, str | None]]  # only when asked for


def state(name: str, netns_fd: int | None = None, routes: bool = False, v6: bool = False) -> LinkState | None:
    """The link `name` (in the namespace `netns_fd`, else this thread's), None if there is none. The routes
    through it only with `routes` (a dump of the routing table: cheap in a container, not on a busy host). With
    `v6` both families, in as many netlink requests."""
    family = socket.AF_UNSPEC if v6 else socket.AF_INET
    try:
        with namespaces.netlink(netns_fd) as ipr:
            link = get(ipr, name)
            if link is None:
                return None
            idx, master = link["index"], link.get("master")
            addresses = frozenset(ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}")
                                  for a in ipr.get_addr(index=idx, family=family)
                                  if a["family"] == socket.AF_INET or a["scope"] == 0)  # IPv6: not link-local
            through = frozenset((f"{r.get('RTA_DST') or DEFAULT_DST[r['family']]}/{r['dst_len']}",
                                 r.get("RTA_GATEWAY"))
                                for r in ipr.route("dump", family=family, oif=idx)
                                if r["family"] in DEFAULT_DST) if routes else frozenset()
            return LinkState(name, kind(link), link.get("mtu"), bool(link["flags"] & 1),
                             by_index(ipr, master).get("ifname") if master else None, link.get("address"),
                             addresses, through)
    except NetlinkError as e:
        raise netlink_error(f"cannot read {name}", e) from None


def add_veth_into(host: str, peer: str, netns_fd: int, mtu: int, peer_mac: str, bridge: str,
                  hairpin: bool = False) -> str:
    """A veth pair whose `peer` end is in the namespace `netns_fd`; the host end up on `bridge` (hairpin mode on
    its port if asked). Returns the host end's MAC. LinkExists if either name is taken."""
    try:
        with IPRoute() as ipr:
            br = lookup(ipr, bridge)
            if br is None:
                raise KernelError(f"bridge {bridge} is missing")
            try:  # on the bridge and up from its creation: one request
                ipr.link("add", ifname=host, kind="veth", mtu=mtu, master=br, state="up",
                         peer={"ifname": peer, "net_ns_fd": netns_fd, "mtu": mtu, "address": peer_mac})
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise LinkExists(f"cannot create the veth pair {host}/{peer}: {host} exists here or {peer} "
                                     f"exists in the other namespace") from None
                raise
            link = get(ipr, host)
            if hairpin:
                ipr.brport("set", index=link["index"], mode=1)
            return link.get("address")
    except NetlinkError as e:
        raise netlink_error(f"cannot set up the veth pair {host}/{peer} on {bridge}", e) from None


def configure(name: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, routes: list[tuple[str, str]],
              netns_fd: int | None = None,
              more_addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()) -> None:
    """Give the link `name` its address (and `more_addresses`; IPv6 ones without DAD, usable at once), bring it up,
    and add `routes` (dst CIDR, gateway) through it."""
    try:
        with namespaces.netlink(netns_fd) as ipr:
            idx = lookup(ipr, name)
            if idx is None:
                raise KernelError(f"{name} is missing")
            for each in (address, *more_addresses):
                ipr.addr("add", index=idx, address=str(each.ip), prefixlen=each.network.prefixlen,
                         **({"flags": IFA_F_NODAD} if each.version == 6 else {}))
            set_up(ipr, idx)
            for dst, gateway in routes:
                ipr.route("add", dst=dst, gateway=gateway)
    except NetlinkError as e:
        raise netlink_error(f"cannot configure {name} with {address}", e) from None


def ensure_address(name: str, address: ipaddress.IPv4Interface) -> bool:
    """Add `address` to the link `name` unless it has it; True when added."""
    try:
        with namespaces.netlink(None) as ipr:
            idx = lookup(ipr, name)
            if idx is None:
                raise KernelError(f"{name} is missing")
            have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
            if (str(address.ip), address.network.prefixlen) in have:
                return False
            ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
            return True
    except NetlinkError as e:
        raise netlink_error(f"cannot add {address} to {name}", e) from None
