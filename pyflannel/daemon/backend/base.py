"""The backend interface: set up the host's devices, then say which kernel entries each peer lease needs."""
from __future__ import annotations

import abc
from typing import ClassVar

from pyflannel.firewall import TunnelSpec
from pyflannel.kernel.entries import Route
from pyflannel.kernel.netlink import Kernel
from pyflannel.kernel.wireguard import Device

from ..config import NetworkConfig
from ..iface import ExternalInterface
from ..model.lease import Lease
from ..model.peer import PeerEntries


class Backend(abc.ABC):
    type: ClassVar[str]

    def __init__(self, config: NetworkConfig, ext: ExternalInterface, kernel: Kernel, state_dir: str):
        self.config = config
        self.ext = ext
        self.kernel = kernel
        self.state_dir = state_dir

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """The MTU containers on this host must use."""

    @property
    def overlay_devices(self) -> tuple[tuple[int, int], ...]:
        """(ifindex, address family) of the devices whose neighbor and FDB tables belong to us."""
        return ()

    @property
    def public_ipv6(self) -> str | None:
        """flannel's PublicIPv6 of our lease: the IPv6 underlay address, when the network has IPv6 and uses it."""
        return self.ext.public_ipv6 if self.config.ipv6 is not None else None

    @property
    def backend_v6_data(self) -> dict | None:
        """flannel's BackendV6Data of our lease (after `prepare`), None when the backend publishes none."""
        return None

    @property
    def peer_device(self) -> Device | None:
        """The WireGuard device whose peers belong to us, if the backend has one."""
        return None

    def details(self) -> dict:
        """What `pyflannel status` shows of the backend beside its type and device."""
        return {}

    def tunnel(self) -> TunnelSpec:
        """What the tunnel guard needs of this network: its Networks and the UDP ports that carry it (none here)."""
        return TunnelSpec(self.networks(), ())

    def networks(self) -> tuple:
        """The network's Network, and its IPv6Network on a dual-stack one."""
        return (self.config.network,) + ((self.config.ipv6.network,) if self.config.ipv6 is not None else ())

    def own_subnets(self, lease: Lease) -> tuple:
        """Our lease's subnets of the address families the network carries."""
        return tuple(s for s in (lease.subnet if self.config.enable_ipv4 else None,
                                 lease.ipv6_subnet if self.config.ipv6 is not None else None) if s is not None)

    @abc.abstractmethod
    def prepare(self) -> dict | None:
        """Create or adopt the backend's devices; returns the BackendData to publish in our lease."""

    def attach(self, lease: Lease) -> None:
        """Our lease is known (or changed): give the devices their addresses."""

    def remove(self) -> None:
        """This host leaves the network: delete the backend's devices (the peers' entries are gone already)."""

    def prepare_for_masquerade(self) -> None:
        """-ip-masq is on: avoid what breaks under MASQUERADE --random-fully."""

    @abc.abstractmethod
    def entries_for(self, lease: Lease) -> PeerEntries | None:
        """The kernel entries that carry traffic to a peer, or None when this backend cannot reach it."""

    def _direct_route(self, lease: Lease) -> Route:
        return Route(lease.subnet, lease.public_ip, self.ext.index)

    def _direct_route6(self, lease: Lease) -> Route | None:
        """The peer's IPv6 subnet via its PublicIPv6, when both are there and it is on our link."""
        if lease.ipv6_subnet is None or self.config.ipv6 is None or not self.ext.on_link(lease.public_ipv6):
            return None
        return Route(lease.ipv6_subnet, lease.public_ipv6, self.ext.index)
