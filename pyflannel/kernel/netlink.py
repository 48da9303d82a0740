"""The overlay's kernel entries through netlink (pyroute2, no `ip` subprocesses): the VXLAN device, routes,
neighbours and FDB entries, applied in batches, and a monitor of their deletion. pyflanneld's Kernel; doctor and
`pyflannel status` read the kernel through it too.

Kernel objects are read and written as small value types (Neighbor, FdbEntry, Route) so the reconciler can diff
sets of them. Routes we install carry our own routing protocol number, so `ip route show proto 77` lists exactly
pyflannel's routes and the reconciler never touches anybody else's.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pyroute2.iproute import IPRoute
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWNEIGH, RTM_NEWROUTE, RTMGRP_IPV4_ROUTE,
                                   RTMGRP_IPV6_ROUTE, RTMGRP_NEIGH)
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.ndmsg import states as nud_states
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .errors import KernelError

RTPROT_PYFLANNEL = 77
TX_CHECKSUM = "tx-checksum-ip-generic"
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = nud_states["permanent"]
NTF_SELF = 2
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
# A blackhole route of ours (--ip-blackhole-route) has the worst metric there is, so any other route to the same
# subnet wins: the connected route of the bridge holding the lease (metric 0 for IPv4, 256 for IPv6) carries what
# goes to its containers, and only addresses no container holds reach the blackhole.
BLACKHOLE_METRIC = 0xFFFFFFFF
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id
ACK_TIMEOUT = 5.0  # seconds; the kernel answers in microseconds, this only keeps a lost ack from hanging us
BATCH = 256  # requests sent before their acks are read (the acks must fit the socket's receive buffer)


@dataclass(frozen=True, slots=True)
class Neighbor:
    ifindex: int
    ip: str  # IPv4 (ARP) or IPv6 (NDP)
    mac: str


@dataclass(frozen=True, slots=True)
class FdbEntry:
    ifindex: int
    mac: str
    dst: str  # the remote VTEP: IPv4, or IPv6 for a VXLAN device over an IPv6 underlay


@dataclass(frozen=True, slots=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str
    oif: int
    onlink: bool = False


@dataclass(frozen=True, slots=True)
class Change:
    """Add (replace) or delete one kernel entry (a WireGuard peer too: kernel/wireguard.py applies those)."""
    add: bool
    entry: object


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface, ...]
    addresses6: tuple[ipaddress.IPv6Interface, ...] = ()  # global scope only: no link-local address


RT_SCOPE_UNIVERSE = 0


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

    # --- links -----------------------------------------------------------------------------------------------
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
        """Over IPv4 without the outer UDP checksum the kernel adds by default (IPv4 allows a zero one, and every
        receiver, flannel's too, accepts it): about 10 % more TCP throughput in the lab. IPv6 needs the checksum."""
        local_attrs = ({"vxlan_local6": local} if ":" in local else {"vxlan_local": local, "vxlan_udp_csum": 0})
        try:
            self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port, vxlan_link=link_index,
                          vxlan_learning=0, address=mac, mtu=mtu, **local_attrs)
        except NetlinkError as e:
            if e.code in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT):
                raise KernelError("the kernel has no VXLAN support: load the vxlan module (`modprobe vxlan`) "
                                "or use the host-gw backend") from None
            if e.code == errno.EEXIST:
                raise KernelError(f"cannot create {name}: a device with VNI {vni} on UDP port {port} exists "
                                f"already (another flanneld?)") from None
            raise
        index = self.link_index(name)
        self.set_up(index)
        return index

    def link_kind(self, index: int) -> str | None:
        info = self.link(index).get("IFLA_LINKINFO")
        return info.get("IFLA_INFO_KIND") if info else None

    def set_up(self, index: int) -> None:
        self.ipr.link("set", index=index, state="up")

    def delete_link(self, index: int) -> None:
        self.ipr.link("del", index=index)

    def set_mac(self, index: int, mac: str) -> None:
        self.ipr.link("set", index=index, address=mac)

    def set_mtu(self, index: int, mtu: int) -> None:
        self.ipr.link("set", index=index, mtu=mtu)

    def set_only_address(self, index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        """Make `address` the device's one address of its family (a lease change replaces the old one)."""
        keep_only_address(self.ipr, index, address, socket.AF_INET6 if address.version == 6 else socket.AF_INET)

    def disable_ipv6_ra(self, name: str) -> None:
        try:
            with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass  # IPv6 disabled on the host: nothing to turn off

    # --- neighbors and FDB -----------------------------------------------------------------------------------
    @staticmethod
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

    @staticmethod
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
                    or event == "RTM_DELNEIGH" and msg.get("ifindex") in overlay_ifindexes):
                touched.set()


def _encode(change: Change, seq: int) -> bytes:
    """One rtnetlink request asking for an ack, encoded whole by pyroute2's message classes (about 55 µs)."""
    entry = change.entry
    if isinstance(entry, Route):
        msg = rtmsg()
        msg["family"] = socket.AF_INET6 if entry.dst.version == 6 else socket.AF_INET
        msg["dst_len"], msg["table"] = entry.dst.prefixlen, MAIN_TABLE
        msg["proto"], msg["type"] = RTPROT_PYFLANNEL, RTN_UNICAST
        msg["flags"] = RTNH_F_ONLINK if entry.onlink else 0
        msg["attrs"] = [("RTA_DST", str(entry.dst.network_address)), ("RTA_GATEWAY", entry.gateway),
                        ("RTA_OIF", entry.oif)]
        kind = RTM_NEWROUTE if change.add else RTM_DELROUTE
    else:
        is_fdb = isinstance(entry, FdbEntry)
        msg = ndmsg()
        msg["family"] = socket.AF_BRIDGE if is_fdb else socket.AF_INET6 if ":" in entry.ip else socket.AF_INET
        msg["ifindex"], msg["state"], msg["flags"] = entry.ifindex, NUD_PERMANENT, NTF_SELF if is_fdb else 0
        msg["attrs"] = [("NDA_DST", entry.dst if is_fdb else entry.ip), ("NDA_LLADDR", entry.mac)]
        kind = RTM_NEWNEIGH if change.add else RTM_DELNEIGH
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_REPLACE if change.add else 0)
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return msg.data


U32 = struct.Struct("=I")


def _shape(change: Change) -> tuple:
    """What decides a request's layout and its constant fields: requests of one shape differ only in the bytes of
    their `_varying` values."""
    e = change.entry
    if isinstance(e, Route):
        return Route, change.add, e.dst.version, e.dst.prefixlen, ":" in e.gateway, e.onlink
    return type(e), change.add, ":" in (e.dst if isinstance(e, FdbEntry) else e.ip)


# The fields of each kind of entry that vary between requests of one shape, and how each kind of value is encoded
VARYING = {Route: (("dst", "network"), ("gateway", "ip"), ("oif", "int")),
           Neighbor: (("ifindex", "int"), ("ip", "ip"), ("mac", "mac")),
           FdbEntry: (("ifindex", "int"), ("mac", "mac"), ("dst", "ip"))}
ENCODED = {"int": U32.pack, "network": lambda net: net.network_address.packed,
           "ip": lambda ip: socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip),
           "mac": lambda mac: bytes.fromhex(mac.replace(":", ""))}


def _varying(change: Change, seq: int) -> list[bytes]:
    """The encoded values of a request's varying fields: its sequence number, then the entry's own."""
    e = change.entry
    return [U32.pack(seq)] + [ENCODED[kind](getattr(e, name)) for name, kind in VARYING[type(e)]]


def _marked(change: Change, marks: list[int]) -> tuple[Change, int]:
    """`change` and a sequence number with each varying field made of bytes equal to its mark (0..255)."""
    def marked(kind: str, current, mark: int):
        if kind == "int":
            return mark * 0x01010101
        if kind == "mac":
            return ":".join([f"{mark:02x}"] * 6)
        if kind == "network":
            return ipaddress.ip_network((bytes([mark]) * (current.max_prefixlen // 8), current.prefixlen),
                                        strict=False)
        return str(ipaddress.ip_address(bytes([mark]) * (16 if ":" in current else 4)))

    e = change.entry
    fields = {name: marked(kind, getattr(e, name), mark) for (name, kind), mark in zip(VARYING[type(e)], marks[1:])}
    return Change(change.add, dataclasses.replace(e, **fields)), marked("int", 0, marks[0])


class Requests:
    """Encoded requests, each shape (`_shape`) encoded by pyroute2 once: later requests of that shape copy it and
    patch their varying fields (sequence number, addresses, MAC, interface): about 3 µs instead of 55.

    Where each field lies is learnt from pyroute2 itself, by encoding the shape with that field's bytes changed.
    The first request of each shape is also encoded whole and compared; a shape that does not match exactly is
    always encoded whole."""

    def __init__(self):
        self._templates: dict[tuple, tuple[bytes, tuple[int, ...]] | None] = {}

    def encode(self, change: Change, seq: int) -> bytes:
        shape = _shape(change)
        if shape not in self._templates:
            self._templates[shape] = _learn(change, seq)
        template = self._templates[shape]
        return _patched(template, change, seq) if template else _encode(change, seq)


def _patched(template: tuple[bytes, tuple[int, ...]], change: Change, seq: int) -> bytes:
    """The template's bytes with `change`'s varying values written at their offsets."""
    data, offsets = template
    message = bytearray(data)
    for offset, value in zip(offsets, _varying(change, seq)):
        message[offset:offset + len(value)] = value
    return bytes(message)


def _learn(change: Change, seq: int) -> tuple[bytes, tuple[int, ...]] | None:
    """The template of `change`'s shape and its fields' offsets; None if patching it would not give pyroute2's own
    encoding of `change`."""
    count = 1 + len(VARYING[type(change.entry)])
    base = _encode(*_marked(change, [1] * count))
    offsets = []
    for field in range(count):
        other = _encode(*_marked(change, [2 if i == field else 1 for i in range(count)]))
        moved = [i for i, (a, b) in enumerate(zip(base, other)) if a != b]
        if len(other) != len(base) or not moved:
            return None
        offsets.append(moved[0])
    template = (base, tuple(offsets))
    return template if _patched(template, change, seq) == _encode(change, seq) else None
