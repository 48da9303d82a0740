"""Keeps the kernel in step with the peers' leases.

Events take the fast path (`apply_peer` / `remove_peer` touch one peer's entries); `reconcile` is the safety net
that diffs everything the backend wants against everything of ours in the kernel and applies the difference:
it removes entries of peers that vanished while we were down and restores entries deleted by hand.

Dumping and decoding every entry is the costly part, so after the first full diff a netlink monitor watches for
deletions of our entries, and `reconcile` dumps only when one was seen, when the wanted entries differ from those
programmed, or every FULL_DIFF_SECONDS in any case. Even the wanted entries are not worked out again while the
leases are the very ones last programmed (the periodic pass at idle then costs a look-up per peer).
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.entries import Change, FdbEntry, Neighbor, Route
from pyflannel.kernel.netlink import Kernel, watch_deletions
from pyflannel.kernel.wireguard import WireGuardPeer

from . import memory
from .backend import Backend
from .model.lease import Lease
from .model.peer import PeerEntries
from .subnets import IPv4Network

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    """Entries a full reconcile changed, by kind: "route", "neighbor", "fdb", "wireguard-peer"; and those the kernel
    refused to change (logged; the next pass tries again)."""
    added: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)

    def __bool__(self):
        return any(self.added.values()) or any(self.removed.values())


KINDS = {Route: "route", Neighbor: "neighbor", FdbEntry: "fdb", WireGuardPeer: "wireguard-peer"}
FULL_DIFF_SECONDS = 300.0


class Reconciler:
    def __init__(self, kernel: Kernel, backend: Backend, watch=watch_deletions, stop: threading.Event | None = None):
        """`watch(touched, overlay_ifindexes, stop)` runs in a thread after the first full diff and sets `touched`
        when one of our entries is deleted (a netlink monitor; tests pass another), until `stop` is set."""
        self.kernel = kernel
        self.backend = backend
        self.watch = watch
        self.stop = stop or threading.Event()
        self.programmed: dict[IPv4Network, PeerEntries] = {}
        self.programmed_from: dict[IPv4Network, Lease] = {}  # the peers' leases it came from, reachable or not
        self.kernel_touched = threading.Event()  # set by the deletion monitor, which starts after the first diff
        self._last_full_diff: float | None = None

    def _as_programmed(self, peers: list[Lease]) -> bool:
        """Whether the kernel is as we left it and `peers` are the very lease objects `programmed` came from (the
        backend's devices do not change under a reconciler: its entries for them are the same)."""
        return (not self.kernel_touched.is_set() and self._last_full_diff is not None
                and time.monotonic() - self._last_full_diff < FULL_DIFF_SECONDS
                and len(peers) == len(self.programmed_from)
                and all(self.programmed_from.get(lease.subnet) is lease for lease in peers))

    # --- fast path -------------------------------------------------------------------------------------------
    def apply_peer(self, lease: Lease) -> None:
        entries = self.backend.entries_for(lease)
        old = self.programmed.get(lease.subnet)
        self.programmed_from[lease.subnet] = lease
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
        self.programmed_from.pop(subnet, None)
        if old is not None:
            self._apply(self._removals(old))
            log.info("peer %s removed", subnet)

    def _apply(self, changes: list[Change]) -> list[Change]:
        """Make the changes in batches, in order (rtnetlink's, the WireGuard device's); a refused one is logged and
        does not stop the others. Returns those made."""
        refused = []
        for target, run in itertools.groupby(changes, self._target):
            run = list(run)
            try:
                refused += target.apply(run)
            except OSError as e:
                refused += [(change, e) for change in run]
        for change, error in refused:
            log.warning("could not %s %s %s: %s", "add" if change.add else "delete", KINDS[type(change.entry)],
                        change.entry, error)
        if refused:
            self.kernel_touched.set()  # the kernel is not as `programmed` says: the next reconcile diffs in full
        failed = {change for change, _ in refused}
        return [change for change in changes if change not in failed]

    def _target(self, change: Change):
        return self.backend.peer_device if isinstance(change.entry, WireGuardPeer) else self.kernel

    @staticmethod
    def _additions(e: PeerEntries) -> list[Change]:
        """In flannel's order: (WireGuard peer,) neighbor, FDB, route, for IPv4 then IPv6."""
        return [Change(True, entry) for entry in e.in_order()]

    @staticmethod
    def _removals(e: PeerEntries, keep: PeerEntries | None = None) -> list[Change]:
        """The reverse: route, FDB, neighbor, …, WireGuard peer; entries that `keep` still needs stay."""
        kept = set(keep.in_order()) if keep else set()
        return [Change(False, entry) for entry in reversed(e.in_order()) if entry not in kept]

    # --- full diff -------------------------------------------------------------------------------------------
    def reconcile(self, peers: Iterable[Lease]) -> Repairs:
        peers, repairs = list(peers), Repairs()
        device = self.backend.peer_device
        if self._as_programmed(peers) and not device:
            return repairs
        wanted, programmed_from = {}, {}
        for lease in peers:
            entries, old = self.backend.entries_for(lease), self.programmed.get(lease.subnet)
            programmed_from[lease.subnet] = lease
            if entries is not None:
                wanted[lease.subnet] = old if old == entries else entries  # the kept ones: no new long-lived copy
        k = self.kernel
        # a WireGuard device's peers are read each time: no monitor tells of their removal, and reading them is cheap
        want_peers = {e.peer for e in wanted.values() if e.peer}
        have_peers = self._device_peers(device) if device else set()
        if (wanted == self.programmed and not self.kernel_touched.is_set() and self._last_full_diff is not None
                and time.monotonic() - self._last_full_diff < FULL_DIFF_SECONDS and have_peers == want_peers):
            self.programmed_from = programmed_from  # (new lease objects of the same leases, after a re-listing)
            return repairs  # nothing of ours was deleted and nothing new is wanted: the kernel is as we left it
        self.programmed, self.programmed_from = wanted, programmed_from
        self.kernel_touched.clear()  # before the dumps: a deletion from now on is seen now or next time

        entries = [entry for e in wanted.values() for entry in e.in_order()]
        want_routes = {e for e in entries if isinstance(e, Route)}
        want_neigh = {e for e in entries if isinstance(e, Neighbor)}
        want_fdb = {e for e in entries if isinstance(e, FdbEntry)}
        config = self.backend.config  # other networks' routes are other reconcilers'
        have_routes = {route for route in k.routes() if route.dst.subnet_of(config.network)}
        if config.ipv6 is not None:
            have_routes |= {route for route in k.routes(socket.AF_INET6) if route.dst.subnet_of(config.ipv6.network)}
        have_neigh, have_fdb = set(), set()
        for index, family in self.backend.overlay_devices:
            have_neigh |= k.neighbors(index, family)
            have_fdb |= k.fdb(index)

        # Stale first (route, FDB, neighbor, peer), then missing in flannel's order (peer, neighbor, FDB, route).
        changes = [Change(False, entry) for entry in (*(have_routes - want_routes), *(have_fdb - want_fdb),
                                                      *(have_neigh - want_neigh), *(have_peers - want_peers))]
        changes += [Change(True, entry) for entry in (*(want_peers - have_peers), *(want_neigh - have_neigh),
                                                      *(want_fdb - have_fdb), *(want_routes - have_routes))]
        made = set(self._apply(changes))
        for change in changes:
            counts = (repairs.added if change.add else repairs.removed) if change in made else repairs.failed
            counts[KINDS[type(change.entry)]] += 1
        if repairs:
            log.info("reconcile: %d entries added, %d removed", repairs.added.total(), repairs.removed.total())
        memory.release_freed()  # the dumps' decoded messages: the daemon's largest temporaries
        if self._last_full_diff is None:
            indexes = tuple(index for index, _ in self.backend.overlay_devices)
            threading.Thread(target=self.watch, args=(self.kernel_touched, indexes, self.stop), name="kernel-watch",
                             daemon=True).start()
        self._last_full_diff = time.monotonic()
        return repairs

    @staticmethod
    def _device_peers(device) -> set[WireGuardPeer]:
        """The device's peers; none when they cannot be read (every wanted one is then written again)."""
        try:
            return device.peers()
        except (OSError, KernelError) as e:
            log.warning("could not read the peers of %s: %s", device.name, e)
            return set()
