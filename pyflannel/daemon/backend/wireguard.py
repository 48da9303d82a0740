"""WireGuard (flannel's `wireguard` backend): device flannel-wg, the lease's BackendData {"PublicKey", "Port"}; per
peer a WireGuard peer (its PublicIP:Port, AllowedIPs its subnet) and an onlink route to its subnet over the device.

Better than flannel: the private key is kept in the state dir (flannel's /run/flannel/wgkey is gone after a reboot,
and with it every peer's idea of us), and `rotate_key` replaces it while the host keeps its lease.
"""
from __future__ import annotations

import ipaddress
import logging
import os

from pyflannel.files import write_atomically
from pyflannel.firewall import TunnelSpec
from pyflannel.kernel import wireguard as wg
from pyflannel.kernel.entries import Route

from ..model.lease import Lease
from ..model.peer import PeerEntries
from .base import Backend

log = logging.getLogger(__name__)

WIREGUARD_OVERHEAD = 80  # outer IPv4 20 + UDP 8 + WireGuard header 16 + tag 16, rounded up as flannel does
KEY_FILE = "wireguard.key"


def load_or_create_key(path: str) -> str:
    try:
        with open(path) as f:
            key = f.read().strip()
        if not wg.key_problem(key):
            return key
        log.warning("%s does not hold a WireGuard key: making a new one", path)
    except FileNotFoundError:
        pass
    key = wg.generate_private_key()
    write_atomically(path, key + "\n", mode=0o600)
    return key


class WireGuardBackend(Backend):
    type = "wireguard"

    def __init__(self, *args):
        super().__init__(*args)
        self.settings = self.config.wireguard
        self.device = "flannel-wg" if self.config.vni == 1 else f"flannel-wg.{self.config.vni}"
        self.key_path = os.path.join(self.state_dir, KEY_FILE)
        self.public_key = ""
        self._device: wg.Device | None = None

    @property
    def mtu(self) -> int:
        return (self.settings.mtu or self.ext.mtu) - WIREGUARD_OVERHEAD

    @property
    def peer_device(self) -> wg.Device | None:
        return self._device

    def tunnel(self) -> TunnelSpec:
        return TunnelSpec(self.networks(), (self.settings.listen_port,))

    def details(self) -> dict:
        return {"public_key": self.public_key, "listen_port": self.settings.listen_port,
                "implementation": self._device.implementation if self._device else None}

    def prepare(self) -> dict:
        private = load_or_create_key(self.key_path)
        self._device = wg.open_device(self.kernel, self.device, self.mtu,
                                      os.path.join(self.state_dir, "wireguard-go.log"))
        self._device.configure(private, self.settings.listen_port)
        self.public_key = wg.public_key_of(private)
        self.kernel.disable_ipv6_ra(self.device)
        log.info("WireGuard %s: %s, port %d, public key %s, MTU %d", self.device, self._device.implementation,
                 self.settings.listen_port, self.public_key, self.mtu)
        return self.backend_data()

    def backend_data(self) -> dict:
        return {"PublicKey": self.public_key, "Port": self.settings.listen_port}

    def rotate_key(self) -> dict:
        """A new private key, on the device at once; returns the BackendData to publish. Peers' sessions with us
        end here and start again (one handshake) as soon as they read our lease with the new public key."""
        private = wg.generate_private_key()
        write_atomically(self.key_path, private + "\n", mode=0o600)
        self._device.configure(private)
        self.public_key = wg.public_key_of(private)
        log.info("WireGuard %s: new key, public key %s", self.device, self.public_key)
        return self.backend_data()

    def attach(self, lease: Lease) -> None:
        self.kernel.set_only_address(self._device.index,
                                     ipaddress.IPv4Interface(f"{lease.subnet.network_address}/32"))

    def remove(self) -> None:
        if self._device is not None:
            self._device.delete()
            log.info("deleted %s", self.device)
            self._device = None

    def entries_for(self, lease: Lease) -> PeerEntries | None:
        data = lease.backend_data or {}
        if lease.backend_type != self.type or wg.key_problem(data.get("PublicKey")):
            return None
        port = data.get("Port") or self.settings.listen_port  # flannel: a lease without Port uses ours
        peer = wg.WireGuardPeer(data["PublicKey"], f"{lease.public_ip}:{port}", (str(lease.subnet),),
                                self.settings.keepalive, self.settings.psk)
        gateway = str(lease.subnet.network_address)  # the peer's flannel-wg address; WireGuard routes by AllowedIPs
        return PeerEntries(route=Route(lease.subnet, gateway, self._device.index, onlink=True), peer=peer)
