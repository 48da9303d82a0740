"""The etcd v2 API (flannel < 0.18's schema) through python-etcd."""
from __future__ import annotations

import copy
import logging
import re
import time
from datetime import datetime, timezone
from typing import Iterator

import urllib3

from pyflannel.imports import deferred, standing_in

with standing_in("dns.resolver", deferred("dns.resolver")):
    import etcd  # it imports dnspython's resolver for SRV discovery (`srv_domain`), which pyflannel never asks for

from ..subnets import parse_lease_key
from ..model.lease import Lease, LeaseEvent
from .base import (ConfigNotFound, HistoryLost, KeyChange, LeaseDigest, LeaseExists, LeaseNotFound, LeaseTaken, Store,
                   StoreError, answering_first, answers, parse_endpoints)

log = logging.getLogger(__name__)

_REMOVALS = ("delete", "expire", "compareAndDelete")


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?")


def _expiration(node) -> datetime | None:
    """etcd's RFC 3339 expiration (nanoseconds, Z) as an aware datetime; None for a key without TTL."""
    match = node.ttl is not None and node.expiration and _RFC3339.match(node.expiration)
    if not match:
        return None
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{match.group(1)}.{fraction}").replace(tzinfo=timezone.utc)


class _WatchIdle(Exception):
    """A long poll ended without an event."""


class EtcdV2Store(Store):
    def __init__(self, endpoints: list[str], prefix: str = "/coreos.com/network", *, certfile=None, keyfile=None,
                 cafile=None, username=None, password=None, timeout: float = 5.0):
        self.prefix = prefix.rstrip("/")
        self.endpoints = endpoints
        parsed = parse_endpoints(endpoints)
        scheme = parsed[-1][0] if parsed else "http"
        hosts = [(host, port) for _, host, port in parsed]
        cert = (certfile, keyfile) if certfile else None
        self._hosts = hosts
        self._kw = dict(protocol=scheme, cert=cert, ca_cert=cafile, username=username, password=password,
                        read_timeout=timeout)
        self._clients: tuple | None = None  # (client, watch client), made at the first call
        self._refreshed: dict[str, float] = {}  # keep_alive's folder -> when its TTL was last refreshed
        self._options = dict(certfile=certfile, keyfile=keyfile, cafile=cafile, username=username, password=password,
                             timeout=timeout)

    def _connect(self) -> tuple:
        """Both clients, on the endpoints that answer first. python-etcd asks its first endpoint for the members
        when created; it must not be a hung one (nor an etcd without the v2 API, which answers 404)."""
        cert, cafile, scheme = self._kw["cert"], self._kw["ca_cert"], self._kw["protocol"]
        http = urllib3.PoolManager(cert_file=cert[0] if cert else None, key_file=cert[1] if cert else None,
                                   ca_certs=cafile, cert_reqs="CERT_REQUIRED" if cafile else None)
        hosts = answering_first(self._hosts, lambda h: answers(f"{scheme}://{h[0]}:{h[1]}", http))
        where = dict(host=hosts[0][0], port=hosts[0][1]) if len(hosts) == 1 else dict(host=tuple(hosts))
        try:
            return tuple(etcd.Client(**where, **self._kw, allow_reconnect=len(hosts) > 1) for _ in range(2))
        except (etcd.EtcdException, urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreError(f"etcd at {', '.join(self.endpoints)}: {e}") from None

    @property
    def client(self):
        if self._clients is None:
            self._clients = self._connect()
        return self._clients[0]

    @property
    def _watch_client(self):
        self.client  # noqa: B018 - connects both
        return self._clients[1]

    def _key(self, lease: Lease) -> str:
        return f"{self.prefix}/subnets/{lease.key}"

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except etcd.EtcdWatchTimedOut:
            raise _WatchIdle() from None
        except etcd.EtcdKeyNotFound as e:
            raise LeaseNotFound(str(e)) from None
        except etcd.EtcdAlreadyExist as e:
            raise LeaseExists(str(e)) from None
        except etcd.EtcdCompareFailed as e:
            raise LeaseTaken(str(e)) from None
        except etcd.EtcdEventIndexCleared as e:
            raise HistoryLost(str(e)) from None
        except (etcd.EtcdException, urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreError(f"etcd at {', '.join(self.endpoints)}: {e}") from None

    def network_config(self) -> str:
        try:
            return self._call(self.client.read, f"{self.prefix}/config").value
        except LeaseNotFound:
            raise ConfigNotFound(f"{self.prefix}/config not found") from None

    def _lease_from(self, node) -> Lease | None:
        subnets = parse_lease_key(node.key)
        if subnets is None or node.dir:
            return None
        try:
            return Lease.from_attrs(subnets[0], node.value, _expiration(node), subnets[1])
        except ValueError as e:
            log.warning("ignoring lease %s: %s", node.key, e)
            return None

    def _leaves(self, key: str) -> tuple[list, int]:
        """The leaf nodes below `key` and etcd's index at that read, in one request. Without the key, the index
        is the one in etcd's not-found reply: any later read would be later, and a key created in between would be
        neither read nor watched from there (the start race of hosts on a fresh network)."""
        def read(client):
            try:
                result = client.read(key, recursive=True)
            except etcd.EtcdKeyNotFound as e:
                index = (e.payload or {}).get("index")
                if index is None:
                    raise etcd.EtcdException(f"{key}: not found, and the reply has no index")
                return [], int(index)
            return [node for node in result.leaves if not node.dir], result.etcd_index
        return self._call(read, self.client)

    def leases(self) -> tuple[list[Lease], int]:
        nodes, index = self._leaves(f"{self.prefix}/subnets")
        return [lease for lease in map(self._lease_from, nodes) if lease], index

    def lease_digest(self) -> LeaseDigest:
        """v2 has no count or modified index of a folder's children: one listing, without parsing the values."""
        nodes = [node for node in self._leaves(f"{self.prefix}/subnets")[0] if parse_lease_key(node.key)]
        return LeaseDigest(len(nodes), max((node.modifiedIndex for node in nodes), default=0))

    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        cas = {"prevValue": expected} if expected is not None else {"prevExist": must_exist}
        result = self._call(self.client.write, self._key(lease), lease.attrs_json(), ttl=ttl, **cas)
        lease.expiration = _expiration(result)
        return lease

    def delete_lease(self, lease: Lease) -> None:
        try:
            self._call(self.client.delete, self._key(lease))
        except LeaseNotFound:
            pass

    def watch_views(self) -> list["EtcdV2Store"]:
        if len(self.endpoints) < 2:
            return [self]
        return [self, EtcdV2Store(self.endpoints[1:] + self.endpoints[:1], self.prefix, **self._options)]

    def child(self, name: str) -> "EtcdV2Store":
        child = copy.copy(self)
        child.prefix = f"{self.prefix}/{name}"
        child._clients = None
        child._refreshed = {}
        return child

    def named_configs(self) -> dict[str, str]:
        try:
            result = self._call(self.client.read, self.prefix)
        except LeaseNotFound:
            return {}
        found = {}
        for node in result._children:
            name = node["key"].rsplit("/", 1)[-1]
            if node.get("dir") and name != "subnets":
                value = self.read_key(f"{name}/config")
                if value is not None:
                    found[name] = value
        return found

    def create_key(self, key: str, value: str) -> bool:
        try:
            self._call(self.client.write, f"{self.prefix}/{key}", value, prevExist=False)
            return True
        except LeaseExists:
            return False

    def read_key(self, key: str) -> str | None:
        try:
            return self._call(self.client.read, f"{self.prefix}/{key}").value
        except LeaseNotFound:
            return None

    def delete_key(self, key: str, expected: str) -> None:
        try:
            self._call(self.client.delete, f"{self.prefix}/{key}", prevValue=expected)
        except (LeaseNotFound, LeaseTaken):
            pass

    def replace_key(self, key: str, value: str, expected: str) -> bool:
        try:
            self._call(self.client.write, f"{self.prefix}/{key}", value, prevValue=expected)
            return True
        except (LeaseNotFound, LeaseTaken):
            return False

    # --- short-lived records: keys in a folder with a TTL, refreshed without a watch event -----------------------
    def list_folder(self, folder: str) -> tuple[dict[str, str], int]:
        top = f"{self.prefix}/{folder}/"
        nodes, index = self._leaves(top.rstrip("/"))
        return {node.key[len(top):]: node.value for node in nodes if node.key.startswith(top)}, index

    def put_keys(self, folder: str, items: dict[str, str | None], ttl: int) -> None:
        """The folder is made with the TTL if it is not there; its keys have none of their own."""
        top = f"{self.prefix}/{folder}"
        try:
            self._call(self.client.write, top, None, dir=True, ttl=ttl, prevExist=False)
            self._refreshed[folder] = time.monotonic()
        except LeaseExists:
            pass
        for key, value in items.items():
            if value is not None:
                self._call(self.client.write, f"{top}/{key}", value)
                continue
            try:
                self._call(self.client.delete, f"{top}/{key}")
            except LeaseNotFound:
                pass

    def keep_alive(self, folder: str, ttl: int) -> bool:
        """v2 refreshes one folder per request, so it does so only once per half TTL (every other call of the name
        book's, which comes each third): two requests per TTL and network."""
        if time.monotonic() - self._refreshed.get(folder, -ttl) < ttl / 2 - 1:
            return True
        try:
            self._call(self.client.write, f"{self.prefix}/{folder}", None, dir=True, ttl=ttl, refresh=True,
                       prevExist=True)
        except LeaseNotFound:
            self._refreshed.pop(folder, None)
            return False
        self._refreshed[folder] = time.monotonic()
        return True

    # --- watch -------------------------------------------------------------------------------------------------
    def current_position(self) -> int:
        return self._leaves(f"{self.prefix}/config")[1]

    def stream(self, position: int, idle: float) -> Iterator[list[KeyChange]]:
        """v2 reports one change per request (a long poll on the prefix, recursive). An etcd v2 watch sends nothing
        until a change: a quiet prefix and a hung member look alike, so after `idle` s the member is asked; one that
        does not answer is left for the others."""
        top = f"{self.prefix}/"
        while True:
            try:
                node = self._call(self._watch_client.read, self.prefix, recursive=True, wait=True,
                                  waitIndex=position + 1, timeout=idle)
            except _WatchIdle:
                client = self._watch_client
                if not answers(client.base_uri, client.http):
                    log.warning("etcd at %s does not answer: moving to another member", client.base_uri)
                    self._clients = None
                    raise StoreError(f"etcd at {client.base_uri} does not answer") from None
                return
            position = node.modifiedIndex
            key = node.key[len(top):] if node.key.startswith(top) else ""
            removed = node.action in _REMOVALS
            yield [KeyChange(key, None if removed else node.value, position, self._event(node, removed),
                          node.dir and removed)]

    def _event(self, node, removed: bool) -> LeaseEvent | None:
        subnets = parse_lease_key(node.key)
        if subnets is None or node.dir:
            return None
        if removed:
            return LeaseEvent(LeaseEvent.REMOVED, Lease(subnets[0], "", "", ipv6_subnet=subnets[1]), node.modifiedIndex)
        lease = self._lease_from(node)
        return LeaseEvent(LeaseEvent.ADDED, lease, node.modifiedIndex) if lease else None
