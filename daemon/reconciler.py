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
from .netlink import Change, FdbEntry, Kernel, Neighbor, Route
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


KINDS = {Route: "route", Neighbor: "neighbor", FdbEntry: "fdb"}


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
        changes = self._removals(old, keep=entries) if old is not None else []
        if entries is None:
            self._apply(changes)
            self.programmed.pop(lease.subnet, None)
            log.info("peer %s (%s, %s) is not reachable with this backend", lease.subnet, lease.public_ip,
                     lease.backend_type)
            return
        self._apply(changes + self._additions(entries))
        self.programmed[lease.subnet] = entries
        log.info("peer %s via %s programmed", lease.subnet, lease.public_ip)

    def remove_peer(self, subnet: IPv4Network) -> None:
        old = self.programmed.pop(subnet, None)
        if old is not None:
            self._apply(self._removals(old))
            log.info("peer %s removed", subnet)

    def _apply(self, changes: list[Change]) -> list[Change]:
        """Make the changes in one batch; a refused one is logged and does not stop the others. Returns those made."""
        try:
            refused = self.kernel.apply(changes)
        except OSError as e:
            log.warning("could not make %d kernel changes: %s", len(changes), e)
            return []
        for change, error in refused:
            log.warning("could not %s %s %s: %s", "add" if change.add else "delete", KINDS[type(change.entry)],
                        change.entry, error)
        failed = {change for change, _ in refused}
        return [change for change in changes if change not in failed]

    @staticmethod
    def _additions(e: PeerEntries) -> list[Change]:
        """In flannel's order: neighbor, FDB, route."""
        return [Change(True, entry) for entry in (e.neighbor, e.fdb, e.route) if entry]

    @staticmethod
    def _removals(e: PeerEntries, keep: PeerEntries | None = None) -> list[Change]:
        """Route, FDB, neighbor; entries that `keep` still needs stay."""
        kept = {keep.route, keep.fdb, keep.neighbor} if keep else set()
        return [Change(False, entry) for entry in (e.route, e.fdb, e.neighbor) if entry and entry not in kept]

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
        changes = [Change(False, entry) for entry in (*(have_routes - want_routes), *(have_fdb - want_fdb),
                                                      *(have_neigh - want_neigh))]
        changes += [Change(True, entry) for entry in (*(want_neigh - have_neigh), *(want_fdb - have_fdb),
                                                      *(want_routes - have_routes))]
        for change in self._apply(changes):
            (repairs.added if change.add else repairs.removed)[KINDS[type(change.entry)]] += 1
        if repairs:
            log.info("reconcile: %d entries added, %d removed", repairs.added.total(), repairs.removed.total())
        return repairs
