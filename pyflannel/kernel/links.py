"""Links by name, through netlink (pyroute2): bridges, veth pairs (also with one end in another namespace), their
addresses and routes, their state for checks, deletion; and the MAC addresses pyflannel gives them. Calls work in
the calling thread's namespace unless given a namespace fd; each opens its own netlink socket."""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import namespaces
from .errors import KernelError
from .netlink import IFA_F_NODAD, MAIN_TABLE, keep_only_address

log = logging.getLogger(__name__)


def mac_for(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Docker's scheme: 02:42 + the IPv4 address (an IPv6 address's last four bytes); unique because leases are
    disjoint across hosts."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed[-4:])


def random_mac() -> str:
    """A random unicast, locally administered MAC."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def lookup(ipr: IPRoute, name: str) -> int | None:
    link = get(ipr, name)
    return link["index"] if link else None


def get(ipr: IPRoute, name: str):
    """The link `name` (one RTM_GETLINK by name), None if there is none."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def kind(link) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


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
                found = kind(ipr.get_links(idx)[0])
                if found != "bridge":
                    raise KernelError(f"interface {name} exists but is a {found or 'device'} and not a bridge: "
                                      f"remove it (ip link del {name})")
            ipr.link("set", index=idx, mtu=mtu)
            keep_only_address(ipr, idx, gateway, socket.AF_INET)
            ipr.link("set", index=idx, state="up")
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
            try:
                ipr.link("del", index=idx)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
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
                found = kind(ipr.get_links(idx)[0])
                if found != "veth":
                    raise KernelError(f"interface {host} exists but is a {found or 'device'} and not a veth: "
                                      f"remove it (ip link del {host})")
            ipr.link("set", index=idx, mtu=mtu, master=br)
            ipr.link("set", index=idx, state="up")
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
                             ipr.get_links(master)[0].get("ifname") if master else None, link.get("address"),
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
            ipr.link("set", index=idx, state="up")
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
