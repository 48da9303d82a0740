"""The etcd v3 API (flannel >= 0.18's schema) through etcd's grpc-gateway (JSON over HTTP: gateway.py).

Same keys and values as v2. A lease key is attached to an etcd lease whose TTL is the subnet lease's (24 h), so etcd
deletes it on expiry; a key without an etcd lease is a reservation. Creating is `Txn(If version(key) == 0, Then put
with lease)`, renewing is a new etcd lease + put (as flannel does). The watch is one stream over the whole prefix,
read with a timeout; compaction and cancel notices end it with an error.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Iterator

import urllib3

from ..subnets import parse_lease_key
from ..model.lease import EXPIRY_NOT_READ, Lease, LeaseEvent
from .base import (ConfigNotFound, HistoryLost, KeyChange, LeaseDigest, LeaseExists, LeaseNotFound,
                   LeaseTaken, Store, StoreError, answering_first, parse_endpoints)
from .gateway import Gateway, GatewayError, Unreachable

log = logging.getLogger(__name__)

PAGE = 500  # keys per range request of a listing
_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"')(]+|certificate verify failed[^\"')(]*|Read timed out")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The range_end that makes a range every key starting with `prefix` (its last byte plus one)."""
    return _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _grant(client: Gateway, ttl: int) -> int:
    """A new etcd lease of `ttl` seconds: its ID."""
    return int(client.post("lease/grant", {"TTL": ttl, "ID": 0})["ID"])


def _text(b64: str | None) -> str:
    return base64.b64decode(b64 or "").decode()


def _reason(error: GatewayError) -> str:
    """etcd's one-line message out of a gateway reply or an HTTP error."""
    text = error.text or type(error).__name__
    try:
        reply = json.loads(text)
        return reply.get("message") or reply.get("error") or text
    except (ValueError, AttributeError):
        found = _ERRNO.search(text)
        return found.group(0).strip() if found else text


class EtcdV3Store(Store):
    def __init__(self, endpoints: list[str], prefix: str = "/coreos.com/network", *, certfile=None, keyfile=None,
                 cafile=None, username=None, password=None, timeout: float = 5.0, read_expiry: bool = True):
        self.prefix = prefix.rstrip("/")
        self.endpoints = endpoints
        self.timeout = timeout
        self._options = dict(certfile=certfile, keyfile=keyfile, cafile=cafile, username=username, password=password,
                             timeout=timeout, read_expiry=read_expiry)
        self._credentials = {"name": username, "password": password or ""} if username else None
        self._auth_lock = threading.Lock()
        self._auth_enabled = True  # until etcd says otherwise
        self._headers: dict[str, str] = {}  # the Authorization token, shared by every member's gateway
        self._clients = [Gateway(scheme, host, port, timeout=timeout, headers=self._headers, cafile=cafile,
                                 certfile=certfile, keyfile=keyfile)
                         for scheme, host, port in parse_endpoints(endpoints)]
        self._current = 0
        self._ordered = len(self._clients) < 2  # endpoints that answer come first, decided at the first call
        self._read_expiry = read_expiry
        self._expirations: dict[int, datetime] = {}  # etcd lease ID -> when it ends (an etcd lease's TTL only shrinks)
        self._folder_leases: dict[str, int] = {}  # put_keys' folder -> the etcd lease its keys are on
        # this host's etcd lease for its short-lived keys: one for every network's store (child() shares it)
        self._liveness = {"lock": threading.Lock(), "id": None, "kept": 0.0}

    # --- requests: failover across endpoints, authentication -------------------------------------------------
    def _call(self, fn):
        """fn(gateway) on the current endpoint, moving on while endpoints cannot be reached."""
        if not self._ordered:
            self._order_endpoints()
        unreachable = []
        for _ in self._clients:
            current = self._current
            client = self._clients[current]
            try:
                return self._authenticated(fn, client)
            except Unreachable as e:
                unreachable.append(f"{client.base_url}: {_reason(e)}")
                self._current = (current + 1) % len(self._clients)
            except GatewayError as e:
                raise StoreError(f"etcd at {client.base_url}: {_reason(e)}") from None
            except (KeyError, TypeError, ValueError) as e:  # a reply that is not etcd's
                raise StoreError(f"etcd at {client.base_url}: unexpected reply ({e!r})") from None
        raise StoreError(f"etcd unreachable: {'; '.join(unreachable)}")

    def _order_endpoints(self) -> None:
        """Put the members that answer first."""
        order = answering_first(list(range(len(self._clients))), lambda i: self._clients[i].answers())
        self._clients = [self._clients[i] for i in order]
        self._ordered = True

    def _authenticated(self, fn, client: Gateway):
        if self._credentials is None:
            return fn(client)
        if self._auth_enabled and "Authorization" not in self._headers:
            self._authenticate(client)
        try:
            return fn(client)
        except GatewayError as e:
            if isinstance(e, Unreachable) or not any(why in e.text for why in ("invalid auth token",
                                                                                 "user name is empty")):
                raise
        self._authenticate(client)  # tokens expire (--auth-token-ttl) and belong to the member that gave them
        return fn(client)

    def _authenticate(self, client: Gateway) -> None:
        with self._auth_lock:
            self._headers.pop("Authorization", None)
            try:
                token = client.post("auth/authenticate", self._credentials)["token"]
            except GatewayError as e:
                if "authentication is not enabled" in e.text:
                    self._auth_enabled = False  # -etcd-username given, but this etcd lets everyone in
                    return
                raise
            self._auth_enabled = True
            self._headers["Authorization"] = token

    # --- keys --------------------------------------------------------------------------------------------------
    def _key(self, lease: Lease) -> str:
        return f"{self.prefix}/subnets/{lease.key}"

    @staticmethod
    def _range(client: Gateway, key: str, **options) -> dict:
        return client.post("kv/range", {"key": _b64(key), **options})

    def _listing(self, top: str) -> Iterator[tuple[list[dict], int]]:
        """Every key below `top`, PAGE keys at a time, all at the revision of the first page: each page and that
        revision. A large folder read in one reply would be decoded whole at once, and the heap it took would stay
        with the daemon."""
        start, options = top, {"range_end": _prefix_end(top), "limit": PAGE}
        while True:
            reply = self._call(lambda client: self._range(client, start, **options))
            page = reply.get("kvs", [])
            options["revision"] = int(options.get("revision") or reply["header"]["revision"])
            yield page, options["revision"]
            if not reply.get("more") or not page:
                return
            start = _text(page[-1]["key"]) + "\0"

    def network_config(self) -> str:
        key = f"{self.prefix}/config"
        kvs = self._call(lambda client: self._range(client, key)).get("kvs")
        if not kvs:
            raise ConfigNotFound(f"{key} not found")
        return _text(kvs[0].get("value"))

    def _expiration(self, lease_id: int) -> datetime | None:
        if not lease_id:
            return None
        if lease_id not in self._expirations and not self._read_expiry:
            return EXPIRY_NOT_READ
        if lease_id not in self._expirations:
            ttl = int(self._call(lambda client: client.post("kv/lease/timetolive", {"ID": lease_id}))["TTL"])
            self._expirations[lease_id] = datetime.now(timezone.utc) + timedelta(seconds=max(ttl, 0))
        return self._expirations[lease_id]

    def _lease_from(self, kv: dict) -> Lease | None:
        key = _text(kv["key"])
        subnets = parse_lease_key(key)
        if subnets is None:
            return None
        try:
            return Lease.from_attrs(subnets[0], _text(kv.get("value")),
                                    self._expiration(int(kv.get("lease", 0))), subnets[1])
        except ValueError as e:
            log.warning("ignoring lease %s: %s", key, e)
            return None

    def leases(self) -> tuple[list[Lease], int]:
        leases, in_use, revision = [], set(), 0
        for kvs, revision in self._listing(f"{self.prefix}/subnets/"):
            in_use |= {int(kv.get("lease", 0)) for kv in kvs}
            leases += [lease for lease in map(self._lease_from, kvs) if lease]
        self._expirations = {i: t for i, t in self._expirations.items() if i in in_use}
        return leases, revision

    def lease_digest(self) -> LeaseDigest:
        """One range that returns no value: the count, and the key changed last (sorted by mod revision)."""
        prefix = f"{self.prefix}/subnets/"
        body = {"key": _b64(prefix), "range_end": _prefix_end(prefix), "keys_only": True, "limit": 1,
                "sort_order": "DESCEND", "sort_target": "MOD"}
        reply = self._call(lambda client: client.post("kv/range", body))
        kvs = reply.get("kvs", [])
        return LeaseDigest(int(reply.get("count", 0)), int(kvs[0]["mod_revision"]) if kvs else 0)

    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        key = self._key(lease)

        def write(client: Gateway) -> int:
            granted = _grant(client, ttl) if ttl else 0
            put = {"key": _b64(key), "value": _b64(lease.attrs_json())}
            if granted:
                put["lease"] = granted
            if expected is not None:
                compare = {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
            else:
                compare = {"key": _b64(key), "target": "VERSION", "result": "GREATER" if must_exist else "EQUAL",
                           "version": 0}
            if client.post("kv/txn", {"compare": [compare], "success": [{"request_put": put}]}).get("succeeded"):
                return granted
            if granted:
                client.post("kv/lease/revoke", {"ID": granted})
            if expected is not None and self._range(client, key).get("kvs"):
                raise LeaseTaken(f"{key} holds another host's lease")
            raise (LeaseNotFound(f"{key} is gone") if must_exist else LeaseExists(f"{key} exists already"))

        lease_id = self._call(write)
        if lease_id:
            self._expirations[lease_id] = datetime.now(timezone.utc) + timedelta(seconds=ttl)
        lease.expiration = self._expirations.get(lease_id)
        return lease

    def delete_lease(self, lease: Lease) -> None:
        self._call(lambda client: client.post("kv/deleterange", {"key": _b64(self._key(lease))}))

    # --- named networks ---------------------------------------------------------------------------------------
    def child(self, name: str) -> "EtcdV3Store":
        child = copy.copy(self)
        child.prefix = f"{self.prefix}/{name}"
        child._expirations = {}
        child._folder_leases = {}
        return child

    def named_configs(self) -> dict[str, str]:
        top = f"{self.prefix}/"

        def keys(client: Gateway) -> list[dict]:
            body = {"key": _b64(top), "range_end": _prefix_end(top), "keys_only": True}
            return client.post("kv/range", body).get("kvs", [])

        names = set()
        for kv in self._call(keys):
            name, _, rest = _text(kv["key"])[len(top):].partition("/")
            if rest == "config" and name != "subnets":
                names.add(name)
        found = {name: self.read_key(f"{name}/config") for name in sorted(names)}
        return {name: value for name, value in found.items() if value is not None}

    def create_key(self, key: str, value: str) -> bool:
        full = f"{self.prefix}/{key}"
        compare = {"key": _b64(full), "target": "VERSION", "result": "EQUAL", "version": 0}
        put = {"request_put": {"key": _b64(full), "value": _b64(value)}}
        return bool(self._call(lambda client: client.post("kv/txn", {"compare": [compare], "success": [put]}))
                    .get("succeeded"))

    def read_key(self, key: str) -> str | None:
        kvs = self._call(lambda client: self._range(client, f"{self.prefix}/{key}")).get("kvs")
        return _text(kvs[0].get("value")) if kvs else None

    def delete_key(self, key: str, expected: str) -> None:
        full = f"{self.prefix}/{key}"
        compare = {"key": _b64(full), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        delete = {"request_delete_range": {"key": _b64(full)}}
        self._call(lambda client: client.post("kv/txn", {"compare": [compare], "success": [delete]}))

    def replace_key(self, key: str, value: str, expected: str) -> bool:
        full = f"{self.prefix}/{key}"
        compare = {"key": _b64(full), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        put = {"request_put": {"key": _b64(full), "value": _b64(value)}}
        return bool(self._call(lambda client: client.post("kv/txn", {"compare": [compare], "success": [put]}))
                    .get("succeeded"))

    # --- short-lived records: one etcd lease of this host for all its folders, kept alive -------------------------
    def list_folder(self, folder: str) -> tuple[dict[str, str], int]:
        top = f"{self.prefix}/{folder}/"
        found, revision = {}, 0
        for kvs, revision in self._listing(top):
            found |= {_text(kv["key"])[len(top):]: _text(kv.get("value")) for kv in kvs}
        return found, revision

    def put_keys(self, folder: str, items: dict[str, str | None], ttl: int) -> None:
        """One transaction, the puts on the host's etcd lease (granted when there is none alive)."""
        top = f"{self.prefix}/{folder}/"
        with self._liveness["lock"]:
            if self._liveness["id"] is None:
                granted = self._call(lambda client: _grant(client, ttl))
                self._liveness.update(id=granted, kept=time.monotonic())
            lease_id = self._liveness["id"]
        ops = [{"request_put": {"key": _b64(top + key), "value": _b64(value), "lease": lease_id}}
               if value is not None else {"request_delete_range": {"key": _b64(top + key)}}
               for key, value in items.items()]
        try:
            self._call(lambda client: client.post("kv/txn", {"compare": [], "success": ops}))
        except StoreError as e:
            if "lease not found" in str(e):
                self._liveness["id"] = None  # it expired: the next call grants another, the caller rewrites
            raise
        self._folder_leases[folder] = lease_id

    def keep_alive(self, folder: str, ttl: int) -> bool:
        """One keep-alive request per third of the TTL, whatever the number of folders (networks) on the lease."""
        with self._liveness["lock"]:
            lease_id = self._liveness["id"]
            if lease_id is None or self._folder_leases.get(folder) != lease_id:
                return False
            if time.monotonic() - self._liveness["kept"] < ttl / 6:
                return True
            reply = self._call(lambda client: client.post("lease/keepalive", {"ID": lease_id}))
            left = int(reply["result"].get("TTL", -1))
            if left <= 0:
                self._liveness["id"] = None
                return False
            self._liveness["kept"] = time.monotonic()
            return True

    # --- watch -------------------------------------------------------------------------------------------------
    def current_position(self) -> int:
        key = f"{self.prefix}/"
        body = {"key": _b64(key), "range_end": _prefix_end(key), "count_only": True}
        return int(self._call(lambda client: client.post("kv/range", body))["header"]["revision"])

    def watch_views(self) -> list["EtcdV3Store"]:
        if len(self.endpoints) < 2:
            return [self]
        return [self, EtcdV3Store(self.endpoints[1:] + self.endpoints[:1], self.prefix, **self._options)]

    def stream(self, position: int, idle: float) -> Iterator[list[KeyChange]]:
        """One watch of the whole prefix on the current member, read as long as events come. A member that breaks
        the stream, or stays quiet for `idle` s and does not answer GET /version either, is left for the next one
        (StoreError)."""
        top = f"{self.prefix}/"
        create = {"key": _b64(top), "range_end": _prefix_end(top), "start_revision": position + 1}
        client = self._clients[self._current]

        def open_stream(c: Gateway) -> Iterator[dict]:
            nonlocal client
            client = c
            return c.stream("watch", {"create_request": create}, idle)
        messages = self._call(open_stream)
        try:
            for message in messages:
                batch = self._changes(message, top)
                if batch:
                    yield batch
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:  # broken, or not JSON
            quiet = isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
            if quiet and client.answers():
                return
            self._current = (self._current + 1) % len(self._clients)
            raise StoreError(f"etcd at {client.base_url}: " + ("does not answer" if quiet else "watch broken"))
        finally:
            messages.close()
        self._current = (self._current + 1) % len(self._clients)
        raise StoreError(f"etcd at {client.base_url}: the watch stream ended")

    def _changes(self, message: dict, top: str) -> list[KeyChange]:
        if "error" in message:
            raise StoreError(f"etcd watch: {json.dumps(message['error'])}")
        result = message.get("result", {})
        if int(result.get("compact_revision", 0)):
            raise HistoryLost(f"compacted: etcd keeps revisions from {result['compact_revision']} on")
        if result.get("canceled"):
            raise StoreError(f"etcd watch canceled: {result.get('cancel_reason') or 'no reason given'}")
        changes = []
        for item in result.get("events", []):
            kv = item["kv"]
            key, revision = _text(kv["key"])[len(top):], int(kv["mod_revision"])
            deleted = item.get("type") == "DELETE"
            subnets = parse_lease_key(key)
            event = None
            if subnets is not None and deleted:
                event = LeaseEvent(LeaseEvent.REMOVED, Lease(subnets[0], "", "", ipv6_subnet=subnets[1]), revision)
            elif subnets is not None:
                lease = self._lease_from(kv)
                event = LeaseEvent(LeaseEvent.ADDED, lease, revision) if lease else None
            changes.append(KeyChange(key, None if deleted else _text(kv.get("value")), revision, event))
        return changes
