"""The backend interface: set up the host's devices, then say which kernel entries each peer lease needs."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from pyflannel.kernel.netlink import FdbEntry, Kernel, Neighbor, Route
from pyflannel.kernel.wireguard import Device, WireGuardPeer

from ..config import NetworkConfig
from ..iface import ExternalInterface
from ..store.base import Lease


@dataclass(frozen=True)
class PeerEntries:
    """What one peer lease puts in the kernel, in the order it goes in (WireGuard peer, neighbor, FDB, route)."""
    route: Route
    neighbor: Neighbor | None = None
    fdb: FdbEntry | None = None
    peer: WireGuardPeer | None = None


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
    def overlay_ifindex(self) -> int | None:
        """The device whose neighbor and FDB tables belong to us, if the backend has one."""
        return None

    @property
    def peer_device(self) -> Device | None:
        """The WireGuard device whose peers belong to us, if the backend has one."""
        return None

    def details(self) -> dict:
        """What `pyflannel status` shows of the backend beside its type and device."""
        return {}

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
