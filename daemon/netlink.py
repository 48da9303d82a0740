"""Netlink helpers: the daemon's only door to the kernel (pyroute2, no `ip` subprocesses).

Kernel objects are read and written as small value types (Neighbor, FdbEntry, Route) so the reconciler can diff
sets of them. Routes we install carry our own routing protocol number, so `ip route show proto 77` lists exactly
pyflannel's routes and the reconciler never touches anybody else's.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states as nud_states

from .errors import UserError

RTPROT_PYFLANNEL = 77
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = nud_states["permanent"]
NTF_SELF = 2


@dataclass(frozen=True)
class Neighbor:
    ifindex: int
    ip: str
    mac: str


@dataclass(frozen=True)
class FdbEntry:
    ifindex: int
    mac: str
    dst: str


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network
    gateway: str
    oif: int
    onlink: bool = False


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface, ...]


class Kernel:
    def __init__(self, ipr: IPRoute | None = None):
        self.ipr = ipr or IPRoute()

    # --- links -----------------------------------------------------------------------------------------------
    def interfaces(self) -> list[Interface]:
        addrs: dict[int, list] = {}
        for a in self.ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(a["index"], []).append(
                ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
        return [Interface(link.get("IFLA_IFNAME"), link["index"], link.get("IFLA_MTU"),
                          tuple(addrs.get(link["index"], ())))
                for link in self.ipr.get_links()]

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def link(self, index: int):
        return self.ipr.get_links(index)[0]

    def vxlan_attrs(self, index: int) -> dict:
        info = self.link(index).get("IFLA_LINKINFO")
        if not info or info.get("IFLA_INFO_KIND") != "vxlan":
            return {}
        return dict((k, v) for k, v in info.get("IFLA_INFO_DATA")["attrs"] if k.startswith("IFLA_VXLAN"))

    def create_vxlan(self, name: str, vni: int, port: int, local: str, link_index: int, mac: str, mtu: int) -> int:
        try:
            self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port, vxlan_local=local,
                          vxlan_link=link_index, vxlan_learning=0, address=mac, mtu=mtu)
        except NetlinkError as e:
            if e.code in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT):
                raise UserError("the kernel has no VXLAN support: load the vxlan module (`modprobe vxlan`) "
                                "or use the host-gw backend") from None
            if e.code == errno.EEXIST:
                raise UserError(f"cannot create {name}: a device with VNI {vni} on UDP port {port} exists "
                                f"already (another flanneld?)") from None
            raise
        index = self.link_index(name)
        self.ipr.link("set", index=index, state="up")
        return index

    def delete_link(self, index: int) -> None:
        self.ipr.link("del", index=index)

    def set_mac(self, index: int, mac: str) -> None:
        self.ipr.link("set", index=index, address=mac)

    def set_mtu(self, index: int, mtu: int) -> None:
        self.ipr.link("set", index=index, mtu=mtu)

    def set_only_address(self, index: int, address: ipaddress.IPv4Interface) -> None:
        """Make `address` the device's one IPv4 address (a lease change replaces the old one)."""
        for a in self.ipr.get_addr(family=socket.AF_INET, index=index):
            current = ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            if current != address:
                self.ipr.addr("del", index=index, address=str(current.ip), prefixlen=current.network.prefixlen)
            else:
                return
        self.ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)

    def disable_ipv6_ra(self, name: str) -> None:
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass  # IPv6 disabled on the host: nothing to turn off

    # --- neighbors and FDB -----------------------------------------------------------------------------------
    def neighbors(self, ifindex: int) -> set[Neighbor]:
        return {Neighbor(ifindex, n.get("NDA_DST"), n.get("NDA_LLADDR"))
                for n in self.ipr.neigh("dump", ifindex=ifindex, family=socket.AF_INET)
                if n["state"] & NUD_PERMANENT and n.get("NDA_LLADDR")}

    def add_neighbor(self, n: Neighbor) -> None:
        self.ipr.neigh("replace", dst=n.ip, lladdr=n.mac, ifindex=n.ifindex, state=NUD_PERMANENT)

    def delete_neighbor(self, n: Neighbor) -> None:
        self._ignore_missing(self.ipr.neigh, "del", dst=n.ip, lladdr=n.mac, ifindex=n.ifindex)

    def fdb(self, ifindex: int) -> set[FdbEntry]:
        return {FdbEntry(ifindex, f.get("NDA_LLADDR"), f.get("NDA_DST"))
                for f in self.ipr.fdb("dump", ifindex=ifindex)
                if f.get("NDA_DST") and f.get("NDA_LLADDR") != "00:00:00:00:00:00"}

    def add_fdb(self, e: FdbEntry) -> None:
        self.ipr.fdb("replace", ifindex=e.ifindex, lladdr=e.mac, dst=e.dst, state=NUD_PERMANENT, flags=NTF_SELF)

    def delete_fdb(self, e: FdbEntry) -> None:
        self._ignore_missing(self.ipr.fdb, "del", ifindex=e.ifindex, lladdr=e.mac, dst=e.dst)

    # --- routes ----------------------------------------------------------------------------------------------
    def routes(self) -> set[Route]:
        """The routes pyflannel installed (our protocol number, main table)."""
        found = set()
        for r in self.ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
            if r["proto"] != RTPROT_PYFLANNEL or not r.get("RTA_GATEWAY"):
                continue
            found.add(Route(ipaddress.IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}"), r.get("RTA_GATEWAY"),
                            r.get("RTA_OIF"), bool(r["flags"] & RTNH_F_ONLINK)))
        return found

    def all_routes(self):
        return self.ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)

    def add_route(self, r: Route) -> None:
        self.ipr.route("replace", dst=str(r.dst), gateway=r.gateway, oif=r.oif, proto=RTPROT_PYFLANNEL,
                       flags=RTNH_F_ONLINK if r.onlink else 0, table=MAIN_TABLE)

    def delete_route(self, r: Route) -> None:
        self._ignore_missing(self.ipr.route, "del", dst=str(r.dst), gateway=r.gateway, oif=r.oif,
                             proto=RTPROT_PYFLANNEL, table=MAIN_TABLE)

    @staticmethod
    def _ignore_missing(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                raise
