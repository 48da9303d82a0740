"""host-gw: a plain route to each peer's subnet via its PublicIP; peers must share an L2 segment."""
from __future__ import annotations

from ..store.base import Lease
from .base import Backend, PeerEntries


class HostGwBackend(Backend):
    type = "host-gw"

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    def prepare(self) -> None:
        return None  # flannel's host-gw publishes no BackendData

    def entries_for(self, lease: Lease) -> PeerEntries | None:
        if lease.backend_type != self.type or not self.ext.on_link(lease.public_ip):
            return None
        return PeerEntries(self._direct_route(lease))
