"""Lease manager: our own subnet (acquire in flannel's order, renew, re-acquire) and the peers' leases."""
from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from .config import NetworkConfig
from .errors import NoFreeSubnet, Stopped
from .model.lease import Lease, LeaseEvent
from .store.base import LEASE_TTL_SECONDS, HistoryLost, LeaseExists, LeaseNotFound, LeaseTaken, Store, StoreError
from .subnets import IPv4Network, IPv6Network, lease_key, pick_free

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 10
WATCH_SECONDS = 10.0  # the longest a poll waits (the watch loop's turn)
AUDIT_SECONDS = 300.0  # the watch's safety net runs this often (±20 %), and AUDIT_SOON_SECONDS after a (re)start
AUDIT_SOON_SECONDS = 2.0
AUDIT_TRIES = 3  # audits in a row that find changes on their way before a re-listing settles it


def _in_range(subnet, network, subnet_len: int, low, high) -> bool:
    return (subnet.prefixlen == subnet_len and subnet.subnet_of(network)
            and low.network_address <= subnet.network_address <= high.network_address)


def _fits(subnet: IPv4Network, config: NetworkConfig) -> bool:
    return _in_range(subnet, config.network, config.subnet_len, config.subnet_min, config.subnet_max)


def _fits6(subnet: IPv6Network | None, config: NetworkConfig) -> bool:
    """An IPv6 subnet inside IPv6Network's range when the network has IPv6; none when it has not."""
    v6 = config.ipv6
    if v6 is None or subnet is None:
        return v6 is None and subnet is None
    return _in_range(subnet, v6.network, v6.subnet_len, v6.subnet_min, v6.subnet_max)


class LeaseManager:
    def __init__(self, store: Store, config: NetworkConfig, public_ip: str, backend_type: str,
                 backend_data: dict | None, *, ttl: int = LEASE_TTL_SECONDS, rng: random.Random | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 stop: threading.Event | None = None, public_ipv6: str | None = None,
                 backend_v6_data: dict | None = None):
        """`stop` set: no further etcd call is started (Stopped), so a stopping daemon takes no new action.
        `public_ipv6` and `backend_v6_data` go into a dual-stack lease (flannel's PublicIPv6, BackendV6Data)."""
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6
        self.backend_type = backend_type
        self.backend_data = backend_data
        self.backend_v6_data = backend_v6_data
        self.ttl = ttl
        self.rng = rng or random.Random()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.lease: Lease | None = None
        self.listing: tuple[list[Lease], int] = ([], 0)  # the last listing acquire read: leases, etcd position

    def _ours(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, previous: Lease | None = None) -> Lease:
        extra = previous.extra if previous else {}
        v6 = ipv6_subnet is not None
        return Lease(subnet, self.public_ip, self.backend_type, self.backend_data, None, dict(extra), ipv6_subnet,
                     self.public_ipv6 if v6 else None, self.backend_v6_data if v6 else None)

    def acquire(self, preferred: IPv4Network | None = None, preferred6: IPv6Network | None = None) -> Lease:
        """flannel's order: our PublicIP's lease, then `preferred` (the old subnet file's) if free, then random; on
        a dual-stack network the IPv6 subnet likewise."""
        for _ in range(CAS_ATTEMPTS):
            self._not_stopped()
            leases, _ = self.listing = self.store.leases()
            ours = [lease for lease in leases if lease.public_ip == self.public_ip]
            mine = [lease for lease in ours if _fits(lease.subnet, self.config) and _fits6(lease.ipv6_subnet,
                                                                                            self.config)]
            if mine:
                existing = mine[0]
                # A key without TTL is an admin reservation and stays one.
                ttl = self.ttl if existing.expiration is not None else None
                self._not_stopped()
                try:
                    self.lease = self.store.update_lease(self._ours(existing.subnet, existing.ipv6_subnet, existing),
                                                         ttl)
                except LeaseNotFound:
                    continue
                log.info("reusing lease %s for %s", existing.key, self.public_ip)
                return self.lease
            for stale in ours:  # ours, but not for this config (IPv6 turned on or off): its IPv4 subnet is kept
                if _fits(stale.subnet, self.config):
                    self._not_stopped()
                    self.store.delete_lease(stale)
                    log.info("replacing lease %s: it does not match the network's IPv6 config", stale.key)
                    preferred = preferred or stale.subnet
                    leases = [lease for lease in leases if lease is not stale]
            subnet = self._pick(preferred if preferred and _fits(preferred, self.config) else None,
                                [lease.subnet for lease in leases], self.config.subnet_min, self.config.subnet_max,
                                ("SubnetMin", "SubnetMax"))
            ipv6_subnet = None
            if self.config.ipv6 is not None:
                v6 = self.config.ipv6
                ipv6_subnet = self._pick(preferred6 if _fits6(preferred6, self.config) else None,
                                         [lease.ipv6_subnet for lease in leases if lease.ipv6_subnet],
                                         v6.subnet_min, v6.subnet_max, ("IPv6SubnetMin", "IPv6SubnetMax"))
            self._not_stopped()
            try:
                self.lease = self.store.create_lease(self._ours(subnet, ipv6_subnet), self.ttl)
            except LeaseExists:
                log.info("lost the race for %s, trying again", lease_key(subnet, ipv6_subnet))
                preferred = preferred6 = None
                continue
            log.info("acquired lease %s for %s", self.lease.key, self.public_ip)
            return self.lease
        raise StoreError(f"could not acquire a lease after {CAS_ATTEMPTS} compare-and-swap attempts")

    def _pick(self, preferred, taken: list, low, high, names: tuple[str, str]):
        """`preferred` if it is free, else a random free subnet between `low` and `high`."""
        if preferred is not None and not any(preferred.overlaps(t) for t in taken):
            return preferred
        subnet = pick_free(low, high, taken, self.rng)
        if subnet is None:
            raise NoFreeSubnet(f"no free subnet: all {len(taken)} leases between {names[0]} {low.network_address} "
                               f"and {names[1]} {high.network_address} are taken")
        return subnet

    def _not_stopped(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def renew_due(self, margin: timedelta) -> datetime | None:
        """When our lease must be renewed; None for a reservation (no TTL)."""
        if self.lease is None or self.lease.expiration is None:
            return None
        return self.lease.expiration - margin

    def renew(self) -> Lease:
        """Extend our lease (or write it again with new BackendData: a reservation stays one), if its key still holds
        what we wrote (compare-and-swap): if it is gone, take it again (the same subnet when still free); if another
        host holds it now, take another subnet."""
        self._not_stopped()
        ttl = self.ttl if self.lease.expiration is not None else None
        try:
            self.lease = self.store.update_lease(self._ours(self.lease.subnet, self.lease.ipv6_subnet, self.lease),
                                                 ttl, expected=self.lease.attrs_json())
            log.info("renewed lease %s until %s", self.lease.key, self.lease.expiration)
            return self.lease
        except LeaseNotFound:
            return self.reacquire()
        except LeaseTaken:
            return self.replace(taken_by=None)

    def replace(self, taken_by: str | None) -> Lease:
        """Another host holds our subnet (our lease lapsed while we could not reach etcd, and it took the subnet):
        never serve it beside that host; take another subnet."""
        lost = self.lease.subnet
        log.warning("our lease %s now belongs to another host%s: taking another subnet; containers on this host "
                    "must move to the new one", lost, f" ({taken_by})" if taken_by else "")
        return self.acquire()

    def reacquire(self) -> Lease:
        lost = self.lease
        log.warning("our lease %s is gone from etcd: acquiring again", lost.key)
        return self.acquire(preferred=lost.subnet, preferred6=lost.ipv6_subnet)


class LeaseWatcher:
    """Turns a watch (the store's, or the network's share of the host's feed) into ADDED/REMOVED events for peers,
    re-listing and diffing when history is lost. Changes carry the store's revision, so each is applied once, in
    order, and none that a listing already gave."""

    def __init__(self, store: Store, known: dict[IPv4Network, Lease], position: int, source=None, *,
                 watch_seconds: float = WATCH_SECONDS,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None):
        """`source`: where the events come from (`watch_leases(position, timeout)`), the store by default."""
        self.store = store
        self.source = source or store
        self.known = dict(known)
        self.position = position
        self.watch_seconds = watch_seconds
        self.clock = clock
        self.rng = rng or random.Random()
        self.next_audit = clock() + AUDIT_SOON_SECONDS
        self.unsettled = 0  # audits in a row that found changes still on their way
        self.relist = threading.Event()  # an audit found a difference: re-list at the next poll
        self.missed: list[LeaseEvent] = []  # what such a re-listing changed: the watch missed it (each one a bug)

    def poll(self, timeout: float) -> list[LeaseEvent]:
        events = []
        if not self.relist.is_set():
            try:
                events, position = self.source.watch_leases(self.position, timeout)
            except HistoryLost:
                log.info("watch fell behind etcd's history: re-listing leases")
                return self.resync()
            events = self._take(events, position)
        if not self.relist.is_set():
            return events
        self.relist.clear()
        found = self.resync()
        self.missed += found
        return events + found

    def _take(self, events: list[LeaseEvent], position: int) -> list[LeaseEvent]:
        """The events not applied yet, applied to `known`."""
        current = []
        for event in events:
            if event.revision and event.revision <= self.position:
                continue  # in the listing already
            subnet = event.lease.subnet
            if event.kind == LeaseEvent.ADDED:
                self.known[subnet] = event.lease
            elif subnet in self.known and self.known[subnet].key != event.lease.key:
                continue  # the removal of a key the subnet's holder has replaced (IPv6 turned on or off)
            else:
                self.known.pop(subnet, None)
            current.append(event)
        self.position = max(self.position, position, *(e.revision for e in events))
        return current

    # --- the safety net: a watch that missed a change (a bug) is caught by a cheap comparison ----------------------
    def until_audit(self) -> float:
        """How long until the next audit is due (at most a watch's time: audit_soon may bring it forward)."""
        return max(0.05, min(self.watch_seconds, self.next_audit - self.clock()))

    def audit_soon(self) -> None:
        """The watch was (re)established: check it shortly."""
        self.next_audit = self.clock() + AUDIT_SOON_SECONDS

    def audit(self) -> bool | None:
        """The store's digest against what the watch gave: True when they agree, False when they differ, None when
        a change is still on its way (ask again). Runs beside the polls (its read may wait on a slow member)."""
        digest = self.store.lease_digest()
        if digest.last_modified > self.position or digest.count < len(self.known):
            return None  # a write or a removal the watch has yet to deliver
        return digest.count == len(self.known)

    def audit_if_due(self) -> None:
        """When an audit is due (every AUDIT_SECONDS, jittered): a difference, or changes still on their way after
        AUDIT_TRIES audits, make the next poll re-list (and say what it found in `missed`)."""
        if self.clock() < self.next_audit:
            return
        verdict = self.audit()
        if verdict is None and self.unsettled < AUDIT_TRIES - 1:
            self.unsettled += 1
            self.next_audit = self.clock() + AUDIT_SOON_SECONDS
            return
        self.unsettled = 0
        self.next_audit = self.clock() + AUDIT_SECONDS * self.rng.uniform(0.8, 1.2)
        if verdict is not True:
            self.relist.set()
            getattr(self.source, "wake", lambda: None)()

    def take_missed(self) -> list[LeaseEvent]:
        missed, self.missed = self.missed, []
        return missed

    def resync(self) -> list[LeaseEvent]:
        leases, self.position = self.store.leases()
        current = {lease.subnet: lease for lease in leases}
        events = [LeaseEvent(LeaseEvent.REMOVED, lease) for subnet, lease in self.known.items()
                  if subnet not in current]
        events += [LeaseEvent(LeaseEvent.ADDED, lease) for subnet, lease in current.items()
                   if self.known.get(subnet) != lease]
        self.known = current
        return events
