"""host-gw: a plain route to each peer's subnet via its PublicIP (its IPv6 subnet via its PublicIPv6); peers must
share an L2 segment."""
from __future__ import annotations

from ..model.lease import Lease
from ..model.peer import PeerEntries
from .base import Backend


class HostGwBackend(Backend):
    type = "host-gw"

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    def prepare(self) -> None:
        return None  # flannel's host-gw publishes no BackendData

    def entries_for(self, lease: Lease) -> PeerEntries | None:
        if lease.backend_type != self.type:
            return None
        route = self._direct_route(lease) if self.config.enable_ipv4 and self.ext.on_link(lease.public_ip) else None
        route6 = self._direct_route6(lease)
        if route is None and route6 is None:
            return None
        return PeerEntries(route, route6=route6)
