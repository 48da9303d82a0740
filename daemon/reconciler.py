"""Keeps the kernel in step with the peers' leases.

Events take the fast path (`apply_peer` / `remove_peer` touch one peer's entries); `reconcile` is the safety net
that diffs everything the backend wants against everything of ours in the kernel and applies the difference:
it removes entries of peers that vanished while we were down and restores entries deleted by hand.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .backend import Backend, PeerEntries
from .netlink import Kernel
from .store.base import Lease
from .subnets import IPv4Network

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    """Entries a full reconcile changed, by kind: "route", "neighbor", "fdb"."""
    added: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)

    def __bool__(self):
        return any(self.added.values()) or any(self.removed.values())


def _attempt(what: str, fn, item) -> bool:
    """Run one kernel change; a failure is logged and does not stop the others."""
    try:
        fn(item)
        return True
    except Exception as e:  # noqa: BLE001 - every entry is attempted even if another fails
        log.warning("could not %s %s: %s", what, item, e)
        return False


class Reconciler:
    def __init__(self, kernel: Kernel, backend: Backend):
        self.kernel = kernel
        self.backend = backend
        self.programmed: dict[IPv4Network, PeerEntries] = {}

    # --- fast path -------------------------------------------------------------------------------------------
    def apply_peer(self, lease: Lease) -> None:
        entries = self.backend.entries_for(lease)
        old = self.programmed.get(lease.subnet)
        if old == entries:
            return
        if old is not None:
            self._remove(old, keep=entries)
        if entries is None:
            self.programmed.pop(lease.subnet, None)
            log.info("peer %s (%s, %s) is not reachable with this backend", lease.subnet, lease.public_ip,
                     lease.backend_type)
            return
        self._add(entries)
        self.programmed[lease.subnet] = entries
        log.info("peer %s via %s programmed", lease.subnet, lease.public_ip)

    def remove_peer(self, subnet: IPv4Network) -> None:
        old = self.programmed.pop(subnet, None)
        if old is not None:
            self._remove(old)
            log.info("peer %s removed", subnet)

    def _add(self, e: PeerEntries) -> None:
        k = self.kernel
        if e.neighbor:
            _attempt("add neighbor", k.add_neighbor, e.neighbor)
        if e.fdb:
            _attempt("add FDB entry", k.add_fdb, e.fdb)
        _attempt("add route", k.add_route, e.route)

    def _remove(self, e: PeerEntries, keep: PeerEntries | None = None) -> None:
        k = self.kernel
        if keep is None or keep.route != e.route:
            _attempt("delete route", k.delete_route, e.route)
        if e.fdb and (keep is None or keep.fdb != e.fdb):
            _attempt("delete FDB entry", k.delete_fdb, e.fdb)
        if e.neighbor and (keep is None or keep.neighbor != e.neighbor):
            _attempt("delete neighbor", k.delete_neighbor, e.neighbor)

    # --- full diff -------------------------------------------------------------------------------------------
    def reconcile(self, peers: Iterable[Lease]) -> Repairs:
        wanted = {}
        for lease in peers:
            entries = self.backend.entries_for(lease)
            if entries is not None:
                wanted[lease.subnet] = entries
        self.programmed = wanted
        k, repairs = self.kernel, Repairs()

        want_routes = {e.route for e in wanted.values()}
        have_routes = k.routes()
        index = self.backend.overlay_ifindex
        want_neigh = {e.neighbor for e in wanted.values() if e.neighbor}
        want_fdb = {e.fdb for e in wanted.values() if e.fdb}
        have_neigh = k.neighbors(index) if index else set()
        have_fdb = k.fdb(index) if index else set()

        # Stale first (route, FDB, neighbor), then missing in flannel's order (neighbor, FDB, route).
        for kind, fn, items in (("route", k.delete_route, have_routes - want_routes),
                                ("fdb", k.delete_fdb, have_fdb - want_fdb),
                                ("neighbor", k.delete_neighbor, have_neigh - want_neigh)):
            repairs.removed[kind] += sum(_attempt(f"delete {kind}", fn, item) for item in items)
        for kind, fn, items in (("neighbor", k.add_neighbor, want_neigh - have_neigh),
                                ("fdb", k.add_fdb, want_fdb - have_fdb),
                                ("route", k.add_route, want_routes - have_routes)):
            repairs.added[kind] += sum(_attempt(f"add {kind}", fn, item) for item in items)
        if repairs:
            log.info("reconcile: %d entries added, %d removed", repairs.added.total(), repairs.removed.total())
        return repairs
