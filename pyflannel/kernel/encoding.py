"""rtnetlink requests for batches of changes (Kernel.apply), without pyroute2's cost per message: each shape of
request (`_shape`) is encoded by pyroute2 once, and later requests of that shape are copies of it with their varying
fields patched (`Requests`)."""
from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWNEIGH, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .entries import (MAIN_TABLE, NTF_SELF, NUD_PERMANENT, RTN_UNICAST, RTNH_F_ONLINK, RTPROT_PYFLANNEL, Change,
                      FdbEntry, Neighbor, Route)


def _encode(change: Change, seq: int) -> bytes:
    """One rtnetlink request asking for an ack, encoded whole by pyroute2's message classes."""
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
    patch their varying fields (sequence number, addresses, MAC, interface), many times faster (figures in
    docs/benchmarks.md).

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
