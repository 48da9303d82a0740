"""The overlay's kernel entries as values (Neighbor, FdbEntry, Route; a Change adds or deletes one), so the
reconciler can diff sets of them, and the marks pyflannel's entries carry in the kernel: routes in the main table
with our own routing protocol number, so `ip route show proto 77` lists exactly pyflannel's routes and the
reconciler never touches anybody else's."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2.netlink.rtnl.ndmsg import states as nud_states

RTPROT_PYFLANNEL = 77
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
RTN_UNICAST = 1
NUD_PERMANENT = nud_states["permanent"]
NTF_SELF = 2


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
