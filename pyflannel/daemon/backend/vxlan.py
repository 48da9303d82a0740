"""VXLAN: device flannel.<VNI>; per peer a neighbor entry, an FDB entry and an onlink route (flannel's order).

Better than flannel: the VTEP MAC is kept in the state dir and reused after a restart, so the FDB entries that
peers hold for us stay valid.
"""
from __future__ import annotations

import ipaddress
import logging
import os

from pyflannel.files import write_atomically
from pyflannel.kernel.links import random_mac
from pyflannel.kernel.netlink import FdbEntry, Neighbor, Route

from ..store.base import Lease
from .base import Backend, PeerEntries

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50


def load_or_create_mac(state_dir: str, vni: int) -> str:
    path = os.path.join(state_dir, f"vtep-mac.{vni}")
    try:
        with open(path) as f:
            mac = f.read().strip().lower()
        if len(mac) == 17:
            return mac
    except FileNotFoundError:
        pass
    mac = random_mac()
    write_atomically(path, mac + "\n")
    return mac


class VxlanBackend(Backend):
    type = "vxlan"

    def __init__(self, *args):
        super().__init__(*args)
        self.device = f"flannel.{self.config.vni}"
        self.mac = ""
        self._index: int | None = None

    @property
    def mtu(self) -> int:
        return self.ext.mtu - VXLAN_OVERHEAD

    @property
    def overlay_ifindex(self) -> int | None:
        return self._index

    def prepare(self) -> dict:
        self.mac = load_or_create_mac(self.state_dir, self.config.vni)
        self._index = self._ensure_device()
        self.kernel.disable_ipv6_ra(self.device)
        return {"VNI": self.config.vni, "VtepMAC": self.mac}

    def _ensure_device(self) -> int:
        k, c = self.kernel, self.config
        index = k.link_index(self.device)
        if index is not None:
            attrs = k.vxlan_attrs(index)
            wanted = {"IFLA_VXLAN_ID": c.vni, "IFLA_VXLAN_PORT": c.port, "IFLA_VXLAN_LOCAL": self.ext.public_ip,
                      "IFLA_VXLAN_LINK": self.ext.index, "IFLA_VXLAN_UDP_CSUM": 0}
            if all(attrs.get(key) == value for key, value in wanted.items()):
                link = k.link(index)
                if link.get("IFLA_ADDRESS") != self.mac:
                    k.set_mac(index, self.mac)
                if link.get("IFLA_MTU") != self.mtu:
                    k.set_mtu(index, self.mtu)
                log.info("reusing %s (VTEP MAC %s)", self.device, self.mac)
                return index
            log.info("replacing %s: its attributes differ from the config", self.device)
            k.delete_link(index)
        index = k.create_vxlan(self.device, c.vni, c.port, self.ext.public_ip, self.ext.index, self.mac, self.mtu)
        log.info("created %s (VNI %d, port %d, VTEP MAC %s, MTU %d)", self.device, c.vni, c.port, self.mac, self.mtu)
        return index

    def attach(self, lease: Lease) -> None:
        self.kernel.set_only_address(self._index, ipaddress.IPv4Interface(f"{lease.subnet.network_address}/32"))

    def remove(self) -> None:
        if self._index is not None:
            self.kernel.delete_link(self._index)
            log.info("deleted %s", self.device)
            self._index = None

    def prepare_for_masquerade(self) -> None:
        """The kernel mangles checksums it offloads to a VXLAN device once --random-fully rewrites the port
        (flannel #1279, the "63 second delay"): compute them in software, as flannel does."""
        self.kernel.disable_tx_checksum_offload(self.device)

    def entries_for(self, lease: Lease) -> PeerEntries | None:
        if lease.backend_type != self.type:
            return None
        if self.config.direct_routing and self.ext.on_link(lease.public_ip):
            return PeerEntries(self._direct_route(lease))
        if not lease.vtep_mac:
            return None
        vtep = str(lease.subnet.network_address)
        return PeerEntries(
            route=Route(lease.subnet, vtep, self._index, onlink=True),
            neighbor=Neighbor(self._index, vtep, lease.vtep_mac.lower()),
            fdb=FdbEntry(self._index, lease.vtep_mac.lower(), lease.public_ip),
        )
