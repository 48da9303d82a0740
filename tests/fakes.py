"""In-memory stand-ins behind the seams that exist (the etcd Store, the daemon's Kernel), for fast unit tests of
pure logic. They replace nothing: every behaviour that touches etcd or the kernel is also proven by a lab test."""
from __future__ import annotations

import itertools
import socket
from datetime import datetime, timedelta, timezone

from pyflannel.daemon.model.lease import Lease, LeaseEvent
from pyflannel.daemon.store.base import (ConfigNotFound, HistoryLost, KeyChange, LeaseDigest, LeaseExists, LeaseNotFound,
                                         LeaseTaken, Store)
from pyflannel.kernel.netlink import Change, FdbEntry, Neighbor, Route


class MemoryStore(Store):
    """flannel's schema in a dict: one network config, leases by (IPv4) subnet, other keys (named networks' configs,
    names), and a history of changes with revisions (the watch); `compact()` forgets the history, as etcd's
    compaction does, and `expire(folder)` ends a folder's liveness, as an etcd lease or a TTL running out does."""

    def __init__(self, config: str = '{"Network": "10.5.0.0/16"}'):
        self.config = config
        self.data: dict = {}
        self.revision = 1
        self.history: list[KeyChange] = []
        self.modified: dict = {}  # subnet -> the revision that wrote its lease
        self.compacted = 0
        self.keys: dict[str, str] = {}  # other keys under the prefix: named networks' configs, names
        self.alive: set[str] = set()  # folders whose keys are kept alive
        self.keep_alives = 0

    def _changed(self, key: str, value: str | None, lease: LeaseEvent | None = None) -> None:
        self.history.append(KeyChange(key, value, self.revision, lease))

    def _event(self, kind: str, lease: Lease) -> None:
        self.revision += 1
        self.modified[lease.subnet] = self.revision
        event = LeaseEvent(kind, lease, self.revision)
        self._changed(f"subnets/{lease.key}", lease.attrs_json() if kind == LeaseEvent.ADDED else None, event)

    def compact(self) -> None:
        self.compacted, self.history = self.revision, []

    def network_config(self) -> str:
        if self.config is None:
            raise ConfigNotFound("no network config")
        return self.config

    def leases(self) -> tuple[list[Lease], int]:
        return list(self.data.values()), self.revision

    def lease_digest(self) -> LeaseDigest:
        return LeaseDigest(len(self.data), max((self.modified[subnet] for subnet in self.data), default=0))

    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        if must_exist and lease.subnet not in self.data:
            raise LeaseNotFound(lease.key)
        if expected is not None and self.data[lease.subnet].attrs_json() != expected:
            raise LeaseTaken(lease.key)
        if not must_exist and lease.subnet in self.data:
            raise LeaseExists(lease.key)
        lease.expiration = datetime.now(timezone.utc) + timedelta(seconds=ttl) if ttl else None
        self.data[lease.subnet] = lease
        self._event(LeaseEvent.ADDED, lease)
        return lease

    def delete_lease(self, lease: Lease) -> None:
        lease = self.data.pop(lease.subnet, None)
        if lease is not None:
            self._event(LeaseEvent.REMOVED, lease)

    def named_configs(self) -> dict[str, str]:
        return {key[:-len("/config")]: value for key, value in self.keys.items() if key.endswith("/config")}

    def create_key(self, key: str, value: str) -> bool:
        if key in self.keys:
            return False
        self.keys[key] = value
        return True

    def read_key(self, key: str) -> str | None:
        return self.keys.get(key)

    def delete_key(self, key: str, expected: str) -> None:
        if self.keys.get(key) == expected:
            del self.keys[key]

    def replace_key(self, key: str, value: str, expected: str) -> bool:
        if self.keys.get(key) != expected:
            return False
        self.keys[key] = value
        return True

    def list_folder(self, folder: str) -> tuple[dict[str, str], int]:
        top = folder + "/"
        return {key[len(top):]: value for key, value in self.keys.items() if key.startswith(top)}, self.revision

    def put_keys(self, folder: str, items: dict[str, str | None], ttl: int) -> None:
        self.alive.add(folder)
        for key, value in items.items():
            full = f"{folder}/{key}"
            if value is None and full not in self.keys:
                continue
            self.revision += 1
            if value is None:
                del self.keys[full]
            else:
                self.keys[full] = value
            self._changed(full, value)

    def keep_alive(self, folder: str, ttl: int) -> bool:
        self.keep_alives += 1
        return folder in self.alive

    def expire(self, folder: str) -> None:
        """The folder's liveness ran out: its keys go, each with a change."""
        self.alive.discard(folder)
        for key in [k for k in self.keys if k.startswith(folder + "/")]:
            self.revision += 1
            del self.keys[key]
            self._changed(key, None)

    def current_position(self) -> int:
        return self.revision

    def stream(self, position: int, idle: float):
        if position < self.compacted:
            raise HistoryLost(f"revision {position} is compacted")
        later = [change for change in self.history if change.revision > position]
        if later:
            yield later


class FakeKernel:
    """The daemon's Kernel as sets of entries and a dict of links; `refuse` holds entries whose change fails."""

    def __init__(self):
        self.routes_: set[Route] = set()
        self.neigh: set[Neighbor] = set()
        self.fdb_: set[FdbEntry] = set()
        self.links: dict[int, dict] = {}
        self.names: dict[str, int] = {}
        self.refuse: set = set()
        self.applied: list[list[Change]] = []
        self._indexes = itertools.count(10)

    # entries
    def routes(self, family: int = socket.AF_INET) -> set[Route]:
        return {r for r in self.routes_ if r.dst.version == (6 if family == socket.AF_INET6 else 4)}

    def neighbors(self, ifindex: int, family: int = socket.AF_INET) -> set[Neighbor]:
        return {n for n in self.neigh if n.ifindex == ifindex and (":" in n.ip) == (family == socket.AF_INET6)}

    def fdb(self, ifindex: int) -> set[FdbEntry]:
        return {f for f in self.fdb_ if f.ifindex == ifindex}

    def apply(self, changes: list[Change]):
        self.applied.append(list(changes))
        refused = []
        for change in changes:
            if change.entry in self.refuse:
                refused.append((change, OSError(1, "Operation not permitted")))
                continue
            table = {Route: self.routes_, Neighbor: self.neigh, FdbEntry: self.fdb_}[type(change.entry)]
            (table.add if change.add else table.discard)(change.entry)
        return refused

    # links (what the VXLAN backend uses)
    def link_index(self, name: str) -> int | None:
        return self.names.get(name)

    def create_vxlan(self, name, vni, port, local, link_index, mac, mtu) -> int:
        index = next(self._indexes)
        self.names[name] = index
        self.links[index] = {"name": name, "IFLA_ADDRESS": mac, "IFLA_MTU": mtu, "addresses": [],
                             "vxlan": {"IFLA_VXLAN_ID": vni, "IFLA_VXLAN_PORT": port, "IFLA_VXLAN_LOCAL": local,
                                       "IFLA_VXLAN_LINK": link_index, "IFLA_VXLAN_UDP_CSUM": 0}}
        return index

    def vxlan_attrs(self, index: int) -> dict:
        return dict(self.links[index]["vxlan"])

    def link(self, index: int) -> dict:
        return self.links[index]

    def delete_link(self, index: int) -> None:
        link = self.links.pop(index)
        del self.names[link["name"]]

    def set_mac(self, index: int, mac: str) -> None:
        self.links[index]["IFLA_ADDRESS"] = mac

    def set_mtu(self, index: int, mtu: int) -> None:
        self.links[index]["IFLA_MTU"] = mtu

    def set_up(self, index: int) -> None:
        self.links[index]["up"] = True

    def set_only_address(self, index: int, address) -> None:
        self.links[index]["addresses"] = [address]

    def disable_ipv6_ra(self, name: str) -> None:
        pass

    def disable_tx_checksum_offload(self, name: str) -> None:
        self.links[self.names[name]]["tx_checksum"] = False


class FakePlumbing:
    """The driver's Plumbing seam as dicts: bridges by name -> (gateway, mtu[, IPv6 gateway]), veth pairs by host end ->
    (container end, bridge, mtu, mac); `refuse` names operations that fail as the kernel would."""

    def __init__(self):
        self.bridges: dict[str, tuple] = {}
        self.veths: dict[str, tuple] = {}
        self.rules: list = []              # firewall.Rule, in order
        self.busy_ports: set[tuple] = set()  # (proto, host_ip, port) held by "another process"
        self.refuse: set[str] = set()
        self.isolated_ports: set[str] = set()  # host ends of veth pairs whose bridge port is isolated

    def _check(self, operation: str) -> None:
        if operation in self.refuse:
            from pyflannel.driver.errors import PlumbingError
            raise PlumbingError(f"cannot {operation}: Operation not permitted")

    def links(self) -> dict[str, dict]:
        found = {name: {"kind": "bridge"} for name in self.bridges}
        for host, (container, *_rest) in self.veths.items():
            found[host] = found[container] = {"kind": "veth"}
        return found

    @staticmethod
    def routes_overlapping(network) -> list[str]:
        return []

    def ensure_bridge(self, name, gateway, gateway6, mtu) -> None:
        self._check("ensure_bridge")
        self.bridges[name] = (gateway, mtu) if gateway6 is None else (gateway, mtu, gateway6)

    def delete_bridge(self, name) -> None:
        self.bridges.pop(name, None)

    def delete_link(self, name) -> bool:
        found = self.bridges.pop(name, None) or self.veths.pop(name, None)
        return found is not None

    def ensure_veth(self, host, container, bridge, mtu, mac, isolated=False) -> None:
        self._check("ensure_veth")
        self.veths[host] = (container, bridge, mtu, mac)
        self.isolated_ports = (self.isolated_ports - {host}) | ({host} if isolated else set())

    def delete_veth(self, host, container) -> None:
        self.veths.pop(host, None)

    @staticmethod
    def forwarding_bridges() -> set[str]:
        return set()

    def remove_forwarding(self, bridge) -> None:
        pass

    def reset_rules(self, rules) -> None:
        self.rules = list(rules)

    def add_rules(self, rules) -> None:
        self._check("add_rules")
        self.rules += [r for r in rules if r not in self.rules]

    def remove_rules(self, rules) -> None:
        self.rules = [r for r in self.rules if r not in rules]

    def route_localnet(self, bridge) -> None:
        pass

    def port_in_use(self, proto, host_ip, port) -> bool:
        return (proto, host_ip, port) in self.busy_ports

