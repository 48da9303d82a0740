"""VXLAN: device flannel.<VNI> (and flannel-v6.<VNI> on a dual-stack network); per peer and address family a
neighbor entry, an FDB entry and an onlink route (flannel's order).

Better than flannel: the VTEP MACs are kept in the state dir and reused after a restart, so the FDB entries that
peers hold for us stay valid; IPv6 also works over an IPv4-only underlay. A device that flanneld left is adopted
with its MAC (see `_ensure_device`), so replacing flanneld changes nothing that peers see.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from pyflannel.files import write_atomically
from pyflannel.firewall import TunnelSpec
from pyflannel.kernel.links import random_mac
from pyflannel.kernel.entries import FdbEntry, Neighbor, Route
from pyflannel.kernel.netlink import vxlan_misfits

from ..model.lease import Lease
from ..model.peer import PeerEntries
from .base import Backend

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50


def vxlan_overhead(ipv6_underlay: bool) -> int:
    """Bytes VXLAN adds to a packet: 50 over IPv4, 20 more over IPv6 (its outer header is that much longer)."""
    return VXLAN_OVERHEAD + (20 if ipv6_underlay else 0)


def recorded_mac(state_dir: str, name: str) -> str | None:
    """The VTEP MAC kept in the state dir; None before the first start (or the first after flanneld)."""
    try:
        with open(os.path.join(state_dir, name)) as f:
            mac = f.read().strip().lower()
    except FileNotFoundError:
        return None
    return mac if len(mac) == 17 else None


@dataclass
class Vtep:
    """One VXLAN device of the network: flannel.<VNI> carries IPv4, flannel-v6.<VNI> IPv6 over the IPv6 underlay
    (each with a MAC of its own, as flannel has it). Over an IPv4-only underlay, flannel.<VNI> carries both (a
    second device could not share its VNI, port and local address)."""
    name: str
    mac_file: str
    local: str
    mac: str = ""
    index: int | None = None

    @property
    def overhead(self) -> int:
        return vxlan_overhead(":" in self.local)


class VxlanBackend(Backend):
    type = "vxlan"

    def __init__(self, *args):
        super().__init__(*args)
        vni, ext, c = self.config.vni, self.ext, self.config
        # the devices' local address is the interface's own, as flannel's (a -public-ip may be a NAT's address)
        local = str(ext.address.ip)
        local6 = str(ext.address6.ip) if ext.public_ipv6 and ext.address6 else ext.public_ipv6
        self.vtep = Vtep(f"flannel.{vni}", f"vtep-mac.{vni}", local) if c.enable_ipv4 else None
        # IPv6 over the IPv6 underlay when the host has one (flannel's only way), else over IPv4 (better than flannel)
        self.vtep6 = None
        if c.ipv6 is not None:
            self.vtep6 = (self.vtep if self.vtep and not local6 else
                          Vtep(f"flannel-v6.{vni}", f"vtep-mac-v6.{vni}", local6 or local))
        self.vteps = [self.vtep] if self.vtep else []  # the devices, each once
        if self.vtep6 is not None and self.vtep6 is not self.vtep:
            self.vteps.append(self.vtep6)
        self.device = self.vteps[0].name

    @property
    def mac(self) -> str:
        return self.vteps[0].mac

    @property
    def mtu(self) -> int:
        return min(self.ext.mtu - v.overhead for v in self.vteps)

    @property
    def overlay_devices(self) -> tuple[tuple[int, int], ...]:
        return tuple((v.index, family) for v, family in ((self.vtep, socket.AF_INET), (self.vtep6, socket.AF_INET6))
                     if v is not None and v.index is not None)

    def details(self) -> dict:
        if self.vtep6 is None:
            return {}
        return {"device_v6": self.vtep6.name, "vtep_mac_v6": self.vtep6.mac,
                "ipv6_underlay": "IPv6" if ":" in self.vtep6.local else "IPv4"}

    def tunnel(self) -> TunnelSpec:
        """Frames arrive at the VXLAN port over each device's local address family."""
        versions = sorted({6 if ":" in v.local else 4 for v in self.vteps})
        return TunnelSpec(self.networks(), (self.config.port,), self.config.vni, tuple(versions))

    def prepare(self) -> dict | None:
        for vtep in self.vteps:
            recorded = recorded_mac(self.state_dir, vtep.mac_file)
            vtep.index, vtep.mac = self._ensure_device(vtep, recorded)
            if vtep.mac != recorded:
                write_atomically(os.path.join(self.state_dir, vtep.mac_file), vtep.mac + "\n")
            self.kernel.disable_ipv6_ra(vtep.name)
        return {"VNI": self.config.vni, "VtepMAC": self.vtep.mac} if self.vtep else None

    @property
    def backend_v6_data(self) -> dict | None:
        return {"VNI": self.config.vni, "VtepMAC": self.vtep6.mac} if self.vtep6 else None

    def _ensure_device(self, vtep: Vtep, recorded: str | None) -> tuple[int, str]:
        """The device's ifindex and MAC. The MAC is the recorded one, else the one of the device found (flanneld's,
        adopted: peers' FDB entries for it stay valid), else a new one. The device found is kept when its VNI, port,
        local address and underlay fit (`vxlan_misfits`), its MAC and MTU set in place; otherwise it is made again,
        with that MAC. A recorded MAC wins over the device's (changed by hand?): our lease publishes it."""
        k, c = self.kernel, self.config
        mtu = self.ext.mtu - vtep.overhead
        index = k.link_index(vtep.name)
        mac = recorded
        if index is not None:
            attrs, link = k.vxlan_attrs(index), k.link(index)
            found_mac = link.get("IFLA_ADDRESS") if attrs else None
            mac = recorded or found_mac
            misfits = vxlan_misfits(attrs, c.vni, c.port, vtep.local, self.ext.index)
            if not misfits:
                if found_mac != mac:
                    k.set_mac(index, mac)
                if link.get("IFLA_MTU") != mtu:
                    k.set_mtu(index, mtu)
                k.set_up(index)
                if recorded:
                    log.info("reusing %s (VTEP MAC %s)", vtep.name, mac)
                else:
                    log.info("adopted %s left by flanneld: VNI %d, port %d, local %s, MAC %s", vtep.name, c.vni,
                             c.port, vtep.local, mac)
                return index, mac
            log.info("replacing %s (%s)%s", vtep.name, "; ".join(misfits),
                     f", keeping its MAC {mac}" if mac and mac == found_mac else "")
            k.delete_link(index)
        mac = mac or random_mac()
        index = k.create_vxlan(vtep.name, c.vni, c.port, vtep.local, self.ext.index, mac, mtu)
        log.info("created %s (VNI %d, port %d, local %s, VTEP MAC %s, MTU %d)", vtep.name, c.vni, c.port, vtep.local,
                 mac, mtu)
        return index, mac

    def attach(self, lease: Lease) -> None:
        if self.vtep:
            self.kernel.set_only_address(self.vtep.index, ipaddress.ip_interface(f"{lease.subnet.network_address}/32"))
        if self.vtep6 and lease.ipv6_subnet is not None:
            self.kernel.set_only_address(self.vtep6.index,
                                         ipaddress.ip_interface(f"{lease.ipv6_subnet.network_address}/128"))

    def remove(self) -> None:
        for vtep in self.vteps:
            if vtep.index is not None:
                self.kernel.delete_link(vtep.index)
                log.info("deleted %s", vtep.name)
                vtep.index = None

    def prepare_for_masquerade(self) -> None:
        """The kernel mangles checksums it offloads to a VXLAN device once --random-fully rewrites the port
        (flannel #1279, the "63 second delay"): compute them in software, as flannel does."""
        for vtep in self.vteps:
            self.kernel.disable_tx_checksum_offload(vtep.name)

    def entries_for(self, lease: Lease) -> PeerEntries | None:
        if lease.backend_type != self.type:
            return None
        route = neighbor = fdb = route6 = neighbor6 = fdb6 = None
        if self.vtep:
            if self.config.direct_routing and self.ext.on_link(lease.public_ip):
                route = self._direct_route(lease)
            elif lease.vtep_mac:
                route, neighbor, fdb = self._through(self.vtep, lease.subnet, lease.vtep_mac, lease.public_ip)
        if self.vtep6 and lease.ipv6_subnet is not None:
            remote = lease.public_ipv6 if ":" in self.vtep6.local else lease.public_ip
            if self.config.direct_routing and self._direct_route6(lease):
                route6 = self._direct_route6(lease)
            elif lease.vtep_mac_v6 and remote:
                route6, neighbor6, fdb6 = self._through(self.vtep6, lease.ipv6_subnet, lease.vtep_mac_v6, remote)
        if route is None and route6 is None:
            return None
        return PeerEntries(route, neighbor, fdb, route6=route6, neighbor6=neighbor6, fdb6=fdb6)

    @staticmethod
    def _through(vtep: Vtep, subnet, mac: str, remote: str) -> tuple[Route, Neighbor, FdbEntry]:
        """flannel's three entries to a peer's subnet over `vtep`: an onlink route via the subnet's network
        address, a neighbor entry giving that address the peer's VTEP MAC, an FDB entry sending the MAC to `remote`
        (the peer's underlay address)."""
        gateway, mac = str(subnet.network_address), mac.lower()
        return (Route(subnet, gateway, vtep.index, onlink=True), Neighbor(vtep.index, gateway, mac),
                FdbEntry(vtep.index, mac, remote))
