"""The etcd v3 API (flannel >= 0.18's schema) through etcd3gw, a client of etcd's grpc-gateway JSON API.

Same keys and values as v2. A lease key is attached to an etcd lease whose TTL is the subnet lease's (24 h), so etcd
deletes it on expiry; a key without an etcd lease is a reservation. Creating is `Txn(If version(key) == 0, Then put
with lease)`, renewing is a new etcd lease + put (as flannel does). etcd3gw makes the requests; the watch stream is
read here, because etcd3gw's watcher drops compaction and cancel notices and has no read timeout.
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

import requests
import urllib3
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from etcd3gw.lease import Lease as EtcdLease

from ..subnets import parse_lease_key
from ..model.lease import EXPIRY_NOT_READ, Lease, LeaseEvent
from .base import (PROBE_SECONDS, ConfigNotFound, HistoryLost, KeyChange, LeaseDigest, LeaseExists, LeaseNotFound,
                   LeaseTaken, Store, StoreError, answering_first, parse_endpoints)

log = logging.getLogger(__name__)

_UNREACHABLE = (ConnectionFailedError, ConnectionTimeoutError)
PAGE = 500  # keys per range request of a listing
_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"')(]+|certificate verify failed[^\"')(]*|Read timed out")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str | None) -> str:
    return base64.b64decode(b64 or "").decode()


def _reason(error: Etcd3Exception) -> str:
    """etcd's one-line message out of a gateway reply or a requests error."""
    text = error.detail_text or " ".join(map(str, error.args)) or type(error).__name__
    try:
        reply = json.loads(text)
        return reply.get("message") or reply.get("error") or text
    except (ValueError, AttributeError):
        found = _ERRNO.search(text)
        return found.group(0).strip() if found else text


class _Unreachable(ConnectionFailedError):
    """A watch could not be opened on this endpoint: try the next one."""


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
        # one session for the main thread's requests, one for the watch thread's long reads
        self._sessions = [requests.Session(), requests.Session()]
        for session in self._sessions:
            session.trust_env = False  # REQUESTS_CA_BUNDLE, proxies and .netrc must not override the -etcd-* flags
            session.verify = cafile or True
            session.cert = (certfile, keyfile) if certfile else None
        self._clients, self._watch_clients = [], []
        for scheme, host, port in parse_endpoints(endpoints):
            for clients, session in zip((self._clients, self._watch_clients), self._sessions):
                clients.append(Etcd3Client(host, port, scheme, timeout=timeout, session=session))
        self._current = 0
        self._ordered = len(self._clients) < 2  # endpoints that answer come first, decided at the first call
        self._read_expiry = read_expiry
        self._expirations: dict[int, datetime] = {}  # etcd lease ID -> when it ends (an etcd lease's TTL only shrinks)
        self._folder_leases: dict[str, int] = {}  # put_keys' folder -> the etcd lease its keys are on
        # this host's etcd lease for its short-lived keys: one for every network's store (child() shares it)
        self._liveness = {"lock": threading.Lock(), "id": None, "kept": 0.0}

    # --- requests: failover across endpoints, authentication -------------------------------------------------
    def _call(self, fn, watch: bool = False):
        """fn(client) on the current endpoint, moving on while endpoints cannot be reached."""
        if not self._ordered:
            self._order_endpoints()
        clients = self._watch_clients if watch else self._clients
        unreachable = []
        for _ in clients:
            current = self._current
            client = clients[current]
            try:
                return self._authenticated(fn, client)
            except _UNREACHABLE as e:
                unreachable.append(f"{client.base_url}: {_reason(e)}")
                self._current = (current + 1) % len(clients)
            except Etcd3Exception as e:
                raise StoreError(f"etcd at {client.base_url}: {_reason(e)}") from None
            except (requests.RequestException, ValueError) as e:  # a reply that is not etcd's JSON
                raise StoreError(f"etcd at {client.base_url}: {e}") from None
        raise StoreError(f"etcd unreachable: {'; '.join(unreachable)}")

    def _order_endpoints(self) -> None:
        """Put the members that answer first."""
        order = answering_first(list(range(len(self._clients))), lambda i: self._answers(self._clients[i]))
        self._clients = [self._clients[i] for i in order]
        self._watch_clients = [self._watch_clients[i] for i in order]
        self._ordered = True

    def _authenticated(self, fn, client: Etcd3Client):
        if self._credentials is None:
            return fn(client)
        if self._auth_enabled and "Authorization" not in client.session.headers:
            self._authenticate(client)
        try:
            return fn(client)
        except Etcd3Exception as e:
            if not any(why in (e.detail_text or "") for why in ("invalid auth token", "user name is empty")):
                raise
        self._authenticate(client)  # tokens expire (--auth-token-ttl) and belong to the member that gave them
        return fn(client)

    def _authenticate(self, client: Etcd3Client) -> None:
        with self._auth_lock:
            for session in self._sessions:
                session.headers.pop("Authorization", None)
            try:
                token = client.post(client.get_url("/auth/authenticate"), json=self._credentials)["token"]
            except Etcd3Exception as e:
                if "authentication is not enabled" in (e.detail_text or ""):
                    self._auth_enabled = False  # -etcd-username given, but this etcd lets everyone in
                    return
                raise
            self._auth_enabled = True
            for session in self._sessions:
                session.headers["Authorization"] = token

    # --- keys --------------------------------------------------------------------------------------------------
    def _key(self, lease: Lease) -> str:
        return f"{self.prefix}/subnets/{lease.key}"

    @staticmethod
    def _range(client: Etcd3Client, key: str, **options) -> dict:
        return client.post(client.get_url("/kv/range"), json={"key": _b64(key), **options})

    def _listing(self, top: str) -> Iterator[tuple[list[dict], int]]:
        """Every key below `top`, PAGE keys at a time, all at the revision of the first page: each page and that
        revision. A large folder read in one reply would be decoded whole at once, and the heap it took would stay
        with the daemon."""
        start, options = top, {"range_end": _b64(top[:-1] + chr(ord(top[-1]) + 1)), "limit": PAGE}
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

    def _expiration(self, lease_id: int, watch: bool = False) -> datetime | None:
        if not lease_id:
            return None
        if lease_id not in self._expirations and not self._read_expiry:
            return EXPIRY_NOT_READ
        if lease_id not in self._expirations:
            ttl = self._call(lambda client: EtcdLease(lease_id, client).ttl(), watch)
            self._expirations[lease_id] = datetime.now(timezone.utc) + timedelta(seconds=max(ttl, 0))
        return self._expirations[lease_id]

    def _lease_from(self, kv: dict, watch: bool = False) -> Lease | None:
        key = _text(kv["key"])
        subnets = parse_lease_key(key)
        if subnets is None:
            return None
        try:
            return Lease.from_attrs(subnets[0], _text(kv.get("value")),
                                    self._expiration(int(kv.get("lease", 0)), watch), subnets[1])
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
        body = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0"), "keys_only": True, "limit": 1,
                "sort_order": "DESCEND", "sort_target": "MOD"}
        reply = self._call(lambda client: client.post(client.get_url("/kv/range"), json=body))
        kvs = reply.get("kvs", [])
        return LeaseDigest(int(reply.get("count", 0)), int(kvs[0]["mod_revision"]) if kvs else 0)

    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        key = self._key(lease)

        def write(client: Etcd3Client) -> int:
            granted = client.lease(ttl) if ttl else None
            put = {"key": _b64(key), "value": _b64(lease.attrs_json())}
            if granted:
                put["lease"] = granted.id
            if expected is not None:
                compare = {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
            else:
                compare = {"key": _b64(key), "target": "VERSION", "result": "GREATER" if must_exist else "EQUAL",
                           "version": 0}
            if client.transaction({"compare": [compare], "success": [{"request_put": put}]}).get("succeeded"):
                return granted.id if granted else 0
            if granted:
                granted.revoke()
            if expected is not None and self._range(client, key).get("kvs"):
                raise LeaseTaken(f"{key} holds another host's lease")
            raise (LeaseNotFound(f"{key} is gone") if must_exist else LeaseExists(f"{key} exists already"))

        lease_id = self._call(write)
        if lease_id:
            self._expirations[lease_id] = datetime.now(timezone.utc) + timedelta(seconds=ttl)
        lease.expiration = self._expirations.get(lease_id)
        return lease

    def delete_lease(self, lease: Lease) -> None:
        self._call(lambda client: client.delete(self._key(lease)))

    # --- named networks ---------------------------------------------------------------------------------------
    def child(self, name: str) -> "EtcdV3Store":
        child = copy.copy(self)
        child.prefix = f"{self.prefix}/{name}"
        child._expirations = {}
        child._folder_leases = {}
        return child

    def named_configs(self) -> dict[str, str]:
        top = f"{self.prefix}/"

        def keys(client: Etcd3Client) -> list[dict]:
            body = {"key": _b64(top), "range_end": _b64(top[:-1] + "0"), "keys_only": True}
            return client.post(client.get_url("/kv/range"), json=body).get("kvs", [])

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
        return bool(self._call(lambda client: client.transaction({"compare": [compare], "success": [put]}))
                    .get("succeeded"))

    def read_key(self, key: str) -> str | None:
        kvs = self._call(lambda client: self._range(client, f"{self.prefix}/{key}")).get("kvs")
        return _text(kvs[0].get("value")) if kvs else None

    def delete_key(self, key: str, expected: str) -> None:
        full = f"{self.prefix}/{key}"
        compare = {"key": _b64(full), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        delete = {"request_delete_range": {"key": _b64(full)}}
        self._call(lambda client: client.transaction({"compare": [compare], "success": [delete]}))

    def replace_key(self, key: str, value: str, expected: str) -> bool:
        full = f"{self.prefix}/{key}"
        compare = {"key": _b64(full), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        put = {"request_put": {"key": _b64(full), "value": _b64(value)}}
        return bool(self._call(lambda client: client.transaction({"compare": [compare], "success": [put]}))
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
                granted = self._call(lambda client: client.lease(ttl))
                self._liveness.update(id=granted.id, kept=time.monotonic())
            lease_id = self._liveness["id"]
        ops = [{"request_put": {"key": _b64(top + key), "value": _b64(value), "lease": lease_id}}
               if value is not None else {"request_delete_range": {"key": _b64(top + key)}}
               for key, value in items.items()]
        try:
            self._call(lambda client: client.transaction({"compare": [], "success": ops}))
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
            left = self._call(lambda client: EtcdLease(lease_id, client).refresh())
            if left <= 0:
                self._liveness["id"] = None
                return False
            self._liveness["kept"] = time.monotonic()
            return True

    # --- watch -------------------------------------------------------------------------------------------------
    def current_position(self) -> int:
        key = f"{self.prefix}/"
        body = {"key": _b64(key), "range_end": _b64(key[:-1] + "0"), "count_only": True}
        return int(self._call(lambda client: client.post(client.get_url("/kv/range"), json=body))["header"]["revision"])

    @staticmethod
    def _answers(client: Etcd3Client) -> bool:
        """The member answers GET /version (cheap, local to it) within PROBE_SECONDS."""
        try:
            return client.session.get(client.base_url + "/version", timeout=PROBE_SECONDS).status_code == 200
        except requests.RequestException:
            return False

    def watch_views(self) -> list["EtcdV3Store"]:
        if len(self.endpoints) < 2:
            return [self]
        return [self, EtcdV3Store(self.endpoints[1:] + self.endpoints[:1], self.prefix, **self._options)]

    def stream(self, position: int, idle: float) -> Iterator[list[KeyChange]]:
        """One watch of the whole prefix on the current member, read as long as events come. A member that breaks
        the stream, or stays quiet for `idle` s and does not answer GET /version either, is left for the next one
        (StoreError)."""
        top = f"{self.prefix}/"
        create = {"key": _b64(top), "range_end": _b64(top[:-1] + "0"), "start_revision": position + 1}
        client = self._watch_clients[self._current]

        def open_stream(c: Etcd3Client):
            nonlocal client
            client = c
            try:
                reply = c.session.post(c.get_url("/watch"), json={"create_request": create}, stream=True,
                                       timeout=(self.timeout, idle))
            except requests.exceptions.ConnectionError as e:
                raise _Unreachable(str(e)) from None
            if reply.status_code != 200:
                reply.close()
                raise Etcd3Exception(reply.text, reply.reason)
            return reply
        reply = self._call(open_stream, watch=True)
        try:
            for line in reply.iter_lines(chunk_size=None):
                if line.strip():
                    batch = self._changes(json.loads(line), top)
                    if batch:
                        yield batch
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as e:  # broken, or not JSON
            quiet = isinstance(e, requests.exceptions.ReadTimeout) or (
                isinstance(e, requests.exceptions.ConnectionError) and e.args
                and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError))
            if quiet and self._answers(client):
                return
            self._current = (self._current + 1) % len(self._watch_clients)
            raise StoreError(f"etcd at {client.base_url}: " + ("does not answer" if quiet else "watch broken"))
        finally:
            reply.close()
        self._current = (self._current + 1) % len(self._watch_clients)
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
                lease = self._lease_from(kv, watch=True)
                event = LeaseEvent(LeaseEvent.ADDED, lease, revision) if lease else None
            changes.append(KeyChange(key, None if deleted else _text(kv.get("value")), revision, event))
        return changes
