"""What a peer's lease puts in the kernel: the backend says it (backend/), the reconciler programs and diffs it."""
from __future__ import annotations

from dataclasses import dataclass

from pyflannel.kernel.entries import FdbEntry, Neighbor, Route
from pyflannel.kernel.wireguard import WireGuardPeer


@dataclass(frozen=True, slots=True)
class PeerEntries:
    """What one peer lease puts in the kernel: a WireGuard peer, then per address family a neighbor, an FDB entry
    and a route (IPv4's, then IPv6's on a dual-stack network)."""
    route: Route | None = None  # None on an IPv6-only network
    neighbor: Neighbor | None = None
    fdb: FdbEntry | None = None
    peer: WireGuardPeer | None = None
    route6: Route | None = None
    neighbor6: Neighbor | None = None
    fdb6: FdbEntry | None = None

    def in_order(self) -> list:
        """The entries in the order they go in (flannel's: neighbor, FDB, route); removal is the reverse."""
        return [e for e in (self.peer, self.neighbor, self.fdb, self.route, self.neighbor6, self.fdb6, self.route6)
                if e is not None]
