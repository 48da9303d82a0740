"""Container names across hosts: this host's names go to etcd with a TTL, every host's names come back for DNS.

pyflannel-driver hands pyflanneld the whole set of this host's containers on pyflannel networks (`publish`, through
the local API's PUT /v1/names) whenever Docker says something changed. Per network served, the book keeps them in
etcd as one key per container address,

    <network prefix>/names/<this host's PublicIP>/<address> = {"names": ["web", "www", ...], "address": "10.60.3.2"}

(with "address6": "fd00:f1a0:0:12::2" too for a container with an IPv6 address: DNS answers AAAA with it)

(<network prefix>: <prefix> for the default network, <prefix>/<NAME> for a named one), rewritten on every change and
every TTL/3 s on keys that expire after the TTL: the names of a host that died go by themselves. Every POLL_SECONDS
it reads the names of every host in each network served; `records` answers from that copy.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from .store.base import StoreError

log = logging.getLogger(__name__)

FOLDER = "names"
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Container:
    """One of this host's containers, as the driver sees it: its names and address on each flannel network."""
    id: str
    networks: dict  # flannel network name -> (address, names)
    addresses6: dict = field(default_factory=dict)  # flannel network name -> IPv6 address, on dual-stack networks


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
        self.written: set[str] = set()  # networks whose folder holds (or held) names of ours
        self.known: dict[str, dict[str, dict]] = {}  # network -> key (<host>/<address>) -> record
        self.index: dict[str, list[tuple[str, dict]]] = {}  # name -> (network, record) of every record with it

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

    # --- the loop: write ours, read everyone's --------------------------------------------------------------------
    def run(self) -> None:
        next_write = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if self.changed.is_set() or now >= next_write:
                self.changed.clear()
                if self._write():
                    next_write = now + self.ttl / 3
                else:
                    next_write = now + POLL_SECONDS  # etcd unreachable: again soon
            self._read()
            self.changed.wait(POLL_SECONDS)

    def _write(self) -> bool:
        own, ok = self._own(), True
        served = self.overlays()
        for network in (set(own) | self.written) & set(served):
            try:
                served[network].store.replace_keys(f"{FOLDER}/{self.public_ip}", own.get(network, {}), self.ttl)
            except StoreError as e:
                log.warning("names of network %s: %s", network, e)
                ok = False
                continue
            if own.get(network):
                self.written.add(network)
            else:
                self.written.discard(network)
        return ok

    def _read(self) -> None:
        known = {}
        for network, overlay in self.overlays().items():
            try:
                folder = overlay.store.read_folder(FOLDER)
            except StoreError:
                folder = None
            if folder is None:
                known[network] = self.known.get(network, {})  # keep what we had while etcd is away
                continue
            records = {}
            for key, text in folder.items():
                try:
                    record = json.loads(text)
                    records[key] = {"names": [str(n).lower() for n in record["names"]],
                                    "address": str(record["address"]), "host": key.split("/", 1)[0]}
                    if record.get("address6"):
                        records[key]["address6"] = str(record["address6"])
                except (ValueError, KeyError, TypeError):
                    continue  # not a record of ours
            known[network] = records
        index: dict[str, list[tuple[str, dict]]] = {}
        for network, records in sorted(known.items()):
            for _, record in sorted(records.items()):
                for name in record["names"]:
                    index.setdefault(name, []).append((network, record))
        self.known, self.index = known, index

    # --- answers ------------------------------------------------------------------------------------------------
    def records(self, name: str, networks: set[str] | None) -> list[dict]:
        """The records that give `name` on `networks` (None: all), in a stable order; none: the name is not known
        there."""
        return [record for network, record in self.index.get(name.lower(), ())
                if networks is None or network in networks]

    def listing(self) -> list[dict]:
        return [{"network": network, **record} for network, records in sorted(self.known.items())
                for _, record in sorted(records.items())]
