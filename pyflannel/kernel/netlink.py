"""The overlay's kernel entries through netlink (pyroute2, no `ip` subprocesses): routes, blackholes, neighbours
and FDB entries (values of `entries`), applied in batches (requests from `encoding`), and a monitor of their
deletion. pyflanneld's Kernel, whose link methods are `links`' on its socket (the VXLAN device too); doctor and
`pyflannel status` read the kernel through it too.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pyroute2.iproute import IPRoute
from pyroute2.netlink import NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_NEIGH

from . import links
from .encoding import Requests
from .entries import (MAIN_TABLE, NUD_PERMANENT, RTNH_F_ONLINK, RTPROT_PYFLANNEL, Change, FdbEntry, Neighbor,
                      Route)
from .errors import KernelError
from .links import RT_SCOPE_UNIVERSE

RTN_BLACKHOLE = 6
# A blackhole route of ours (--ip-blackhole-route) has the worst metric there is, so any other route to the same
# subnet wins: the connected route of the bridge holding the lease (metric 0 for IPv4, 256 for IPv6) carries what
# goes to its containers, and only addresses no container holds reach the blackhole.
BLACKHOLE_METRIC = 0xFFFFFFFF
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id
ACK_TIMEOUT = 5.0  # seconds; the kernel answers in microseconds, this only keeps a lost ack from hanging us
BATCH = 256  # requests sent before their acks are read (the acks must fit the socket's receive buffer)


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface, ...]
    addresses6: tuple[ipaddress.IPv6Interface, ...] = ()  # global scope only: no link-local address


class Kernel:
    def __init__(self, ipr: IPRoute | None = None):
        self.ipr = ipr or IPRoute()
        self._batch_socket: socket.socket | None = None
        self._sequence = 1
        self._requests = Requests()

    def close(self) -> None:
        self.ipr.close()
        if self._batch_socket is not None:
            self._batch_socket.close()
            self._batch_socket = None

    # --- links: `links`' operations on this socket ------------------------------------------------------------
    def interfaces(self) -> list[Interface]:
        addrs: dict[int, list] = {}
        addrs6: dict[int, list] = {}
        for a in self.ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(a["index"], []).append(
                ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
        for a in self.ipr.get_addr(family=socket.AF_INET6):
            if a["scope"] == RT_SCOPE_UNIVERSE:
                addrs6.setdefault(a["index"], []).append(
                    ipaddress.IPv6Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
        return [Interface(link.get("IFLA_IFNAME"), link["index"], link.get("IFLA_MTU"),
                          tuple(addrs.get(link["index"], ())), tuple(addrs6.get(link["index"], ())))
                for link in self.ipr.get_links()]

    def link_index(self, name: str) -> int | None:
        return links.lookup(self.ipr, name)

    def link(self, index: int):
        return links.by_index(self.ipr, index)

    def link_kind(self, index: int) -> str | None:
        return links.kind(self.link(index))

    def vxlan_attrs(self, index: int) -> dict:
        return links.vxlan_attrs(self.link(index))

    def create_vxlan(self, name: str, vni: int, port: int, local: str, link_index: int, mac: str, mtu: int) -> int:
        return links.add_vxlan(self.ipr, name, vni, port, local, link_index, mac, mtu)

    def set_up(self, index: int) -> None:
        links.set_up(self.ipr, index)

    def delete_link(self, index: int) -> None:
        links.remove(self.ipr, index)

    def set_mac(self, index: int, mac: str) -> None:
        links.set_mac(self.ipr, index, mac)

    def set_mtu(self, index: int, mtu: int) -> None:
        links.set_mtu(self.ipr, index, mtu)

    def set_only_address(self, index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        """Make `address` the device's one address of its family (a lease change replaces the old one)."""
        links.keep_only_address(self.ipr, index, address, socket.AF_INET6 if address.version == 6 else socket.AF_INET)

    disable_ipv6_ra = staticmethod(links.disable_ipv6_ra)
    tx_checksum_offload = staticmethod(links.tx_checksum_offload)
    disable_tx_checksum_offload = staticmethod(links.disable_tx_checksum_offload)

    # --- neighbors and FDB -----------------------------------------------------------------------------------
    def neighbors(self, ifindex: int, family: int = socket.AF_INET) -> set[Neighbor]:
        """The device's permanent neighbour entries of one family (ARP, or NDP with AF_INET6)."""
        return {Neighbor(ifindex, n.get("NDA_DST"), n.get("NDA_LLADDR"))
                for n in self.ipr.neigh("dump", ifindex=ifindex, family=family)
                if n["state"] & NUD_PERMANENT and n.get("NDA_LLADDR")}

    def fdb(self, ifindex: int) -> set[FdbEntry]:
        return {FdbEntry(ifindex, f.get("NDA_LLADDR"), f.get("NDA_DST"))
                for f in self.ipr.fdb("dump", ifindex=ifindex)
                if f.get("NDA_DST") and f.get("NDA_LLADDR") != "00:00:00:00:00:00"}

    # --- routes ----------------------------------------------------------------------------------------------
    def routes(self, family: int = socket.AF_INET) -> set[Route]:
        """The routes of one family pyflannel installed (our protocol number, main table)."""
        found = set()
        for r in self.ipr.route("dump", family=family, table=MAIN_TABLE):
            if r["proto"] != RTPROT_PYFLANNEL or not r.get("RTA_GATEWAY"):
                continue
            found.add(Route(ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}"), r.get("RTA_GATEWAY"),
                            r.get("RTA_OIF"), bool(r["flags"] & RTNH_F_ONLINK)))
        return found

    def all_routes(self):
        return self.ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)

    def blackholes(self, family: int = socket.AF_INET) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The destinations of our blackhole routes of one family (our protocol number, main table)."""
        return {ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}")
                for r in self.ipr.route("dump", family=family, table=MAIN_TABLE)
                if r["proto"] == RTPROT_PYFLANNEL and r["type"] == RTN_BLACKHOLE}

    def keep_blackholes(self, within: tuple, subnets: tuple) -> None:
        """Our blackhole routes inside the networks `within` are those to `subnets` alone (none: they all go), each
        with BLACKHOLE_METRIC: --ip-blackhole-route, flannel's blackhole for the lease (a Canal host's pods have
        /32 routes and no bridge), so what no container holds is dropped instead of following the default route."""
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            ranges = [n for n in within if n.version == version]
            if not ranges:
                continue
            have = {n for n in self.blackholes(family) if any(n.subnet_of(r) for r in ranges)}
            wanted = {s for s in subnets if s.version == version}
            for dst, verb in [(d, "del") for d in have - wanted] + [(d, "replace") for d in wanted - have]:
                try:
                    self.ipr.route(verb, dst=str(dst), table=MAIN_TABLE, proto=RTPROT_PYFLANNEL,
                                   type=RTN_BLACKHOLE, priority=BLACKHOLE_METRIC, family=family)
                except NetlinkError as e:
                    if verb == "replace" or e.code not in (errno.ENOENT, errno.ESRCH):
                        raise KernelError(f"cannot {'add' if verb == 'replace' else 'delete'} the blackhole route "
                                          f"to {dst}: {os.strerror(e.code)}") from None

    def route_to(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, str | None]:
        """The output interface's index and the source address the kernel picks to reach `address` (`ip route
        get`)."""
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            found = self.ipr.route("get", dst=str(address), family=family)
        except NetlinkError as e:
            raise KernelError(f"no route to {address}: {os.strerror(e.code)}") from None
        return found[0].get("RTA_OIF"), found[0].get("RTA_PREFSRC")

    # --- batched changes ------------------------------------------------------------------------------------
    def apply(self, changes: list[Change]) -> list[tuple[Change, OSError]]:
        """Make many changes with up to BATCH requests in flight, instead of one round trip each.

        Returns the changes the kernel refused (each with its error); deleting something already gone is no error.
        """
        if self._batch_socket is None:
            self._batch_socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self._batch_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._batch_socket.bind((0, 0))
            self._batch_socket.settimeout(ACK_TIMEOUT)
        failed = []
        try:
            for start in range(0, len(changes), BATCH):
                chunk = changes[start:start + BATCH]
                first = self._sequence
                self._sequence = (first + len(chunk)) & 0xFFFFFFF
                self._batch_socket.sendall(b"".join(self._requests.encode(change, first + i)
                                                     for i, change in enumerate(chunk)))
                for i, code in self._acks(first, len(chunk)):
                    change = chunk[i]
                    if code and (change.add or code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV)):
                        failed.append((change, OSError(code, os.strerror(code))))
        except OSError:
            self._batch_socket.close()  # a fresh socket next time: no stale acks
            self._batch_socket = None
            raise
        return failed

    def _acks(self, first: int, count: int):
        """(position in the chunk, errno) of the acks to the `count` requests numbered from `first`."""
        remaining = count
        while remaining:
            data = self._batch_socket.recv(1 << 16)
            offset = 0
            while offset < len(data):
                length, kind, _, seq, _ = NLMSG_HEADER.unpack_from(data, offset)
                if length < NLMSG_HEADER.size:
                    break  # malformed: the rest of this datagram cannot be walked
                if kind == NLMSG_ERROR and 0 <= seq - first < count:
                    yield seq - first, -struct.unpack_from("i", data, offset + NLMSG_HEADER.size)[0]
                    remaining -= 1
                offset += (length + 3) & ~3


def vxlan_misfits(attrs: dict, vni: int, port: int, local: str, link_index: int) -> list[str]:
    """What of a device (its `Kernel.vxlan_attrs`) is not a VXLAN device with these attributes, which the kernel
    cannot change in place (as "port 4789, not 8472"); empty when it fits. The others do not matter: the outer UDP
    checksum, which flanneld's devices compute and ours do not (receivers accept either; nor can it be changed in
    place), learning (our FDB entries are permanent), TTL and TOS (flanneld's are ours). GBP does: receivers without
    it drop the frames it marks."""
    if not attrs:
        return ["not a VXLAN device"]
    local_key = "IFLA_VXLAN_LOCAL6" if ":" in local else "IFLA_VXLAN_LOCAL"
    compared = {"VNI": (attrs.get("IFLA_VXLAN_ID"), vni), "port": (attrs.get("IFLA_VXLAN_PORT"), port),
                "local": (attrs.get(local_key), local), "underlay ifindex": (attrs.get("IFLA_VXLAN_LINK"), link_index),
                "GBP": (bool(attrs.get("IFLA_VXLAN_GBP")), False)}
    return [f"{what} {have}, not {want}" for what, (have, want) in compared.items() if have != want]


def watch_deletions(touched: threading.Event, overlay_ifindexes: tuple[int, ...], stop: threading.Event) -> None:
    """Runs until `stop` is set and the next event comes (a thread): sets `touched` when a route with our protocol,
    or a neighbor or FDB entry on an overlay device, is deleted by anyone, and when the kernel dropped events we
    could not read in time."""
    monitor = IPRoute()
    monitor.bind(groups=RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_NEIGH)
    try:
        _watch(monitor, touched, overlay_ifindexes, stop)
    finally:
        monitor.close()


def _watch(monitor: IPRoute, touched: threading.Event, overlay_ifindexes: tuple[int, ...],
           stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            messages = monitor.get()
        except (OSError, NetlinkError):  # ENOBUFS: some events are lost, so anything may have changed
            touched.set()
            time.sleep(1)
            continue
        for msg in messages:
            event = msg.get("event")
            if (event == "RTM_DELROUTE" and msg.get("proto") == RTPROT_PYFLANNEL
                    or event == "RTM_DELNEIGH" and msg.get("ifindex") in overlay_ifindexes
                    and not _kernels_own(msg.get("NDA_DST"))):
                touched.set()


def _kernels_own(destination: str | None) -> bool:
    """A neighbour entry the kernel makes itself on any IPv6 device (ff02::1:ff…, ff02::2: multicast, NOARP), which
    its neighbour GC deletes a minute later, at the same moment in every namespace: never one of ours (a peer
    subnet's gateway, or a VTEP behind an FDB entry), so its deletion is no cause for a full diff."""
    try:
        address = ipaddress.ip_address(destination)
    except ValueError:
        return False
    return address.is_multicast or address.is_link_local
