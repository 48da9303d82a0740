"""Lease manager: our own subnet (acquire in flannel's order, renew, re-acquire) and the peers' leases."""
from __future__ import annotations

import logging
import random
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from .config import NetworkConfig
from .errors import NoFreeSubnet, Stopped
from .store.base import (LEASE_TTL_SECONDS, HistoryLost, Lease, LeaseEvent, LeaseExists, LeaseNotFound, LeaseTaken,
                         Store, StoreError)
from .subnets import IPv4Network, pick_free

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 10


def _fits(subnet: IPv4Network, config: NetworkConfig) -> bool:
    return (subnet.prefixlen == config.subnet_len and subnet.subnet_of(config.network)
            and config.subnet_min.network_address <= subnet.network_address <= config.subnet_max.network_address)


class LeaseManager:
    def __init__(self, store: Store, config: NetworkConfig, public_ip: str, backend_type: str,
                 backend_data: dict | None, *, ttl: int = LEASE_TTL_SECONDS, rng: random.Random | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 stop: threading.Event | None = None):
        """`stop` set: no further etcd call is started (Stopped), so a stopping daemon takes no new action."""
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.backend_type = backend_type
        self.backend_data = backend_data
        self.ttl = ttl
        self.rng = rng or random.Random()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.lease: Lease | None = None
        self.listing: tuple[list[Lease], int] = ([], 0)  # the last listing acquire read: leases, etcd position

    def _ours(self, subnet: IPv4Network, previous: Lease | None = None) -> Lease:
        extra = previous.extra if previous else {}
        return Lease(subnet, self.public_ip, self.backend_type, self.backend_data, None, dict(extra))

    def acquire(self, preferred: IPv4Network | None = None) -> Lease:
        """flannel's order: our PublicIP's lease, then `preferred` (the old subnet file's) if free, then random."""
        for _ in range(CAS_ATTEMPTS):
            self._not_stopped()
            leases, _ = self.listing = self.store.leases()
            mine = [lease for lease in leases if lease.public_ip == self.public_ip and _fits(lease.subnet, self.config)]
            if mine:
                existing = mine[0]
                # A key without TTL is an admin reservation and stays one.
                ttl = self.ttl if existing.expiration is not None else None
                self._not_stopped()
                try:
                    self.lease = self.store.update_lease(self._ours(existing.subnet, existing), ttl)
                except LeaseNotFound:
                    continue
                log.info("reusing lease %s for %s", existing.subnet, self.public_ip)
                return self.lease
            taken = [lease.subnet for lease in leases]
            if preferred is not None and _fits(preferred, self.config) and not any(
                    preferred.overlaps(t) for t in taken):
                subnet = preferred
            else:
                subnet = pick_free(self.config.subnet_min, self.config.subnet_max, taken, self.rng)
            if subnet is None:
                raise NoFreeSubnet(f"no free subnet: all {len(taken)} leases between SubnetMin "
                                   f"{self.config.subnet_min.network_address} and SubnetMax "
                                   f"{self.config.subnet_max.network_address} are taken")
            self._not_stopped()
            try:
                self.lease = self.store.create_lease(self._ours(subnet), self.ttl)
            except LeaseExists:
                log.info("lost the race for %s, trying again", subnet)
                preferred = None
                continue
            log.info("acquired lease %s for %s", subnet, self.public_ip)
            return self.lease
        raise StoreError(f"could not acquire a lease after {CAS_ATTEMPTS} compare-and-swap attempts")

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
            self.lease = self.store.update_lease(self._ours(self.lease.subnet, self.lease), ttl,
                                                 expected=self.lease.attrs_json())
            log.info("renewed lease %s until %s", self.lease.subnet, self.lease.expiration)
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
        lost = self.lease.subnet
        log.warning("our lease %s is gone from etcd: acquiring again", lost)
        return self.acquire(preferred=lost)


class LeaseWatcher:
    """Turns the store's watch into ADDED/REMOVED events for peers, re-listing and diffing when history is lost."""

    def __init__(self, store: Store, known: dict[IPv4Network, Lease], position: int):
        self.store = store
        self.known = dict(known)
        self.position = position

    def poll(self, timeout: float) -> list[LeaseEvent]:
        try:
            events, self.position = self.store.watch_leases(self.position, timeout)
        except HistoryLost:
            log.info("watch fell behind etcd's history: re-listing leases")
            return self.resync()
        for event in events:
            if event.kind == LeaseEvent.ADDED:
                self.known[event.lease.subnet] = event.lease
            else:
                self.known.pop(event.lease.subnet, None)
        return events

    def resync(self) -> list[LeaseEvent]:
        leases, self.position = self.store.leases()
        current = {lease.subnet: lease for lease in leases}
        events = [LeaseEvent(LeaseEvent.REMOVED, lease) for subnet, lease in self.known.items()
                  if subnet not in current]
        events += [LeaseEvent(LeaseEvent.ADDED, lease) for subnet, lease in current.items()
                   if self.known.get(subnet) != lease]
        self.known = current
        return events
