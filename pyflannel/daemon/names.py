"""Container names across hosts: this host's names go to etcd, every host's names come back for DNS.

pyflannel-driver hands pyflanneld the whole set of this host's containers on pyflannel networks (`publish`, through
the local API's PUT /v1/names) whenever Docker says something changed. Per network served, the book keeps them in
etcd as one key per container address,

    <network prefix>/names/<this host's PublicIP>/<address> = {"names": ["web", "www", ...], "address": "10.60.3.2"}

(with "address6": "fd00:f1a0:0:12::2" too for a container with an IPv6 address: DNS answers AAAA with it)

(<network prefix>: <prefix> for the default network, <prefix>/<NAME> for a named one). A change writes only the keys
that changed, in that network only. The keys live as long as the host does: on etcd v3 they are on one etcd lease of
the host, on v2 in a folder with a TTL, kept alive every third of the TTL without being rewritten (no key written,
no watch event at idle); a host that died loses its names a TTL later. Every host's names come from the host's feed
(one watch: feed.py), after one read of each network's folder when it is served; `records` answers from that copy.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

from pyflannel.localapi import DEFAULT_NETWORK

from . import memory
from .store.base import KeyChange, StoreError

log = logging.getLogger(__name__)

FOLDER = "names"
RETRY_SECONDS = 1.0  # etcd failed: try again this soon


@dataclass(frozen=True, slots=True)
class NameRecord:
    """One container address of a host in a network, with its names: what DNS answers from (slotted: a large
    cluster has tens of thousands)."""
    network: str
    host: str
    names: tuple[str, ...]
    address: str
    address6: str | None = None

    def described(self) -> dict:
        found = {"network": self.network, "names": list(self.names), "address": self.address, "host": self.host}
        return found | ({"address6": self.address6} if self.address6 else {})


@dataclass(frozen=True)
class Container:
    """One of this host's containers, as the driver sees it: its names and address on each flannel network."""
    id: str
    networks: dict  # flannel network name -> (address, names)
    addresses6: dict = field(default_factory=dict)  # flannel network name -> IPv6 address, on dual-stack networks

    @classmethod
    def from_published(cls, item: dict) -> "Container":
        """One container as the driver publishes it (an item of localapi.names_body's list; network "": the default
        one); KeyError, TypeError, ValueError or AttributeError name what is malformed."""
        networks = {(n or DEFAULT_NETWORK): (str(ipaddress.IPv4Address(e["address"])), tuple(map(str, e["names"])))
                    for n, e in item["networks"].items()}
        addresses6 = {(n or DEFAULT_NETWORK): str(ipaddress.IPv6Address(e["address6"]))
                      for n, e in item["networks"].items() if e.get("address6")}
        return cls(str(item["id"]), networks, addresses6)


class NameBook:
    def __init__(self, overlays, public_ip: str, ttl: int, stop: threading.Event):
        """`overlays()`: the served networks, name -> Overlay (each with its store and Network)."""
        self.overlays = overlays
        self.public_ip = public_ip
        self.ttl = ttl
        self.stop = stop
        self.changed = threading.Event()
        self.lock = threading.Lock()
        self.containers: list[Container] = []
        self.host_addresses: set[str] = {public_ip}  # and the DNS address, given when DNS starts
        self.written: dict[str, dict[str, str]] = {}  # network -> {address: record JSON} of ours that etcd holds
        self.known: dict[str, dict[str, dict[str, NameRecord]]] = {}  # network -> host -> key's address -> record
        self.index: dict[str, tuple[NameRecord, ...]] = {}  # name -> every record with it, in a stable order
        self.generation = 0  # the index's changes, each counted once done: DNS uses no answer kept from before
        self.listed: dict[str, int] = {}  # network -> the revision its folder was read at
        self.pending: dict[str, list[KeyChange]] = {}  # the feed's changes of a network not read yet

    @property
    def folder(self) -> str:
        return f"{FOLDER}/{self.public_ip}"

    # --- this host's names --------------------------------------------------------------------------------------
    def publish(self, containers: list[Container]) -> None:
        with self.lock:
            self.containers = containers
        self.changed.set()

    def published(self) -> int:
        """How many of this host's containers the driver handed over (0 after a restart, until it does again)."""
        with self.lock:
            return len(self.containers)

    def _own(self) -> dict[str, dict[str, str]]:
        """network -> {address: record JSON} of this host's containers."""
        own: dict[str, dict[str, str]] = {}
        with self.lock:
            for container in self.containers:
                for network, (address, names) in container.networks.items():
                    record = {"names": sorted(names), "address": address}
                    if container.addresses6.get(network):
                        record["address6"] = container.addresses6[network]
                    own.setdefault(network, {})[address] = json.dumps(record)
        return own

    def networks_of(self, address: str) -> set[str] | None:
        """What the asker at `address` may look up:
        - a local container the driver published: the networks it is on (it asks from one address of them);
        - an address in a network's Network: that network (a container just started, not yet published, may ask
          for a name at once);
        - the host itself: every network, None (dockerd 28 forwards from the host's namespace; an address on lo
          asks from itself);
        - anyone else (a container of another driver): nothing."""
        with self.lock:
            for container in self.containers:
                if any(a == address for a, _ in container.networks.values()):
                    return set(container.networks)
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return set()
        inside = {name for name, overlay in self.overlays().items() if ip in overlay.config.network}
        if inside:
            return inside
        return None if address in self.host_addresses or ip.is_loopback else set()

    # --- the loop: write what changed, keep ours alive, read each network once ----------------------------------
    def run(self) -> None:
        next_keep = time.monotonic() + self.ttl / 3
        while not self.stop.is_set():
            self.changed.clear()
            ok = self._write()
            if time.monotonic() >= next_keep:
                next_keep = time.monotonic() + self.ttl / 3
                if not self._keep_alive():
                    continue  # write what expired again, now
            ok = self._read() and ok
            self.changed.wait(RETRY_SECONDS if not ok else max(0.0, next_keep - time.monotonic()))

    def _write(self) -> bool:
        """Each network's keys that differ from what etcd holds, written (or deleted) in one call per network."""
        own, ok = self._own(), True
        for network, overlay in self.overlays().items():
            want, have = own.get(network, {}), self.written.get(network, {})
            if want == have:
                continue
            items = {a: v for a, v in want.items() if have.get(a) != v} | {a: None for a in have.keys() - want}
            try:
                overlay.store.put_keys(self.folder, items, self.ttl)
            except StoreError as e:
                log.warning("names of network %s: %s", network, e)
                ok = False
                continue
            self.written[network] = want
        return ok

    def _keep_alive(self) -> bool:
        """False when some network's keys had expired (they are written again at once)."""
        alive, served = True, self.overlays()
        for network, have in list(self.written.items()):
            if not have or network not in served:
                continue
            try:
                if not served[network].store.keep_alive(self.folder, self.ttl):
                    log.warning("names of network %s expired in etcd: writing them again", network)
                    self.written[network] = {}
                    alive = False
            except StoreError as e:
                log.warning("names of network %s: keeping them alive: %s", network, e)
        return alive

    def forget(self, network: str, store) -> None:
        """This host leaves `network`: its names there go now (not a TTL later), and so does the copy."""
        have = self.written.pop(network, {})
        if have:
            try:
                store.put_keys(self.folder, {address: None for address in have}, self.ttl)
            except StoreError as e:
                log.warning("names of network %s: %s; they expire by themselves", network, e)
        with self.lock:
            self.listed.pop(network, None)
            self.pending.pop(network, None)
            self._drop(network)

    # --- every host's names: one read per network, then the feed's changes -------------------------------------
    def on_names(self, network: str, changes: list[KeyChange] | None) -> None:
        """The feed's changes of `network`'s names (keys below names/), or None: read the folder again."""
        with self.lock:
            if changes is None:
                self.listed.pop(network, None)
                self.pending.pop(network, None)
            elif network in self.listed:
                self._apply(network, changes)
            else:
                self.pending.setdefault(network, []).extend(changes)
        self.changed.set()

    def _read(self) -> bool:
        served, ok = self.overlays(), True
        for network, overlay in served.items():
            if network in self.listed:
                continue
            try:
                folder, revision = overlay.store.list_folder(FOLDER)
            except StoreError as e:
                log.warning("names of network %s: %s", network, e)
                ok = False
                continue
            with self.lock:
                self._drop(network)
                self.known[network] = {}
                for key, text in folder.items():
                    self._put(network, key, text)
                self.listed[network] = revision
                self._apply(network, self.pending.pop(network, []))
            del folder
            memory.release_freed()
        with self.lock:
            for network in set(self.known) - set(served):
                self._drop(network)
                self.listed.pop(network, None)
        return ok

    def _apply(self, network: str, changes: list[KeyChange]) -> None:
        """Changes after the network's read (under the lock)."""
        for change in changes:
            if change.revision <= self.listed[network]:
                continue
            if change.folder:  # a host's folder expired (v2): every key below it went
                for at in list(self.known[network].get(change.key, {})):
                    self._remove(network, change.key, at)
            elif change.value is None:
                host, _, at = change.key.partition("/")
                self._remove(network, host, at)
            else:
                self._put(network, change.key, change.value)

    def _put(self, network: str, key: str, text: str) -> None:
        """A record under names/<host>/<address>; the copy keeps no key, and one string for the address."""
        host, _, at = key.partition("/")
        try:
            raw = json.loads(text)
            names = tuple(sys.intern(str(n).lower()) for n in raw["names"])
            record = NameRecord(sys.intern(network), sys.intern(host), self._shared(names),
                                at if raw["address"] == at else str(raw["address"]),
                                str(raw["address6"]) if raw.get("address6") else None)
        except (ValueError, KeyError, TypeError):
            return  # not a record of ours
        self._remove(network, record.host, at)
        self.known[network].setdefault(record.host, {})[at] = record
        for name in record.names:
            self.index[name] = tuple(sorted(self.index.get(name, ()) + (record,), key=_order))
        self.generation += 1

    def _shared(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The tuple of a record with these very names, if the index has one (a container on several networks)."""
        for other in self.index.get(names[0], ()) if names else ():
            if other.names == names:
                return other.names
        return names

    def _drop(self, network: str) -> None:
        """Every record of `network` out of the copy and the index (under the lock)."""
        for host in list(self.known.get(network, {})):
            for at in list(self.known[network][host]):
                self._remove(network, host, at)
        self.known.pop(network, None)

    def _remove(self, network: str, host: str, at: str) -> None:
        """The record under names/<host>/<at>, if any, out of the copy and the index (under the lock)."""
        hosts = self.known.get(network, {})
        records = hosts.get(host, {})
        record = records.pop(at, None)
        if not records:
            hosts.pop(host, None)
        if record is None:
            return
        for name in record.names:
            entries = tuple(r for r in self.index.get(name, ()) if r is not record)
            if entries:
                self.index[name] = entries
            else:
                self.index.pop(name, None)
        self.generation += 1

    # --- answers ------------------------------------------------------------------------------------------------
    def records(self, name: str, networks: set[str] | None) -> list[NameRecord]:
        """The records that give `name` on `networks` (None: all), in a stable order; none: the name is not known
        there."""
        return [record for record in self.index.get(name.lower(), ())
                if networks is None or record.network in networks]

    def listing(self) -> list[dict]:
        with self.lock:
            return [record.described() for _, hosts in sorted(self.known.items())
                    for _, records in sorted(hosts.items()) for _, record in sorted(records.items())]


def _order(record: NameRecord) -> tuple[str, str, str]:
    return record.network, record.host, record.address
