"""What the lease manager needs from a store; one implementation per etcd API."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator
from urllib.parse import urlparse

import urllib3

from ..model.lease import Lease, LeaseEvent

LEASE_TTL_SECONDS = 24 * 3600


PROBE_SECONDS = 1.0  # a member that does not answer /version within this is taken as hung


def answers(base_url: str, http: urllib3.PoolManager) -> bool:
    """The etcd member at `base_url` answers GET /version (cheap, local to the member) within PROBE_SECONDS."""
    try:
        return http.request("GET", base_url.rstrip("/") + "/version", timeout=PROBE_SECONDS, retries=False,
                            preload_content=True).status == 200
    except (urllib3.exceptions.HTTPError, OSError):
        return False


def answering_first(members: list, answers_fn: Callable[[object], bool]) -> list:
    """`members` with those for which `answers_fn` is true first, each group in the given order (probed in
    parallel): a hung member would cost every first call its full timeout."""
    if len(members) < 2:
        return members
    with ThreadPoolExecutor(len(members)) as pool:
        ok = list(pool.map(answers_fn, members))
    return [m for m, up in zip(members, ok) if up] + [m for m, up in zip(members, ok) if not up]


def parse_endpoints(endpoints: list[str]) -> list[tuple[str, str, int]]:
    """-etcd-endpoints' URLs as (scheme, host, port); ValueError names a URL that is not http(s)://host[:port]."""
    parsed = []
    for url in endpoints:
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"-etcd-endpoints: {url!r} is not an http(s)://host:port URL")
        parsed.append((u.scheme, u.hostname, u.port or 2379))
    return parsed


class StoreError(Exception):
    """The store could not be reached or answered with an error; the caller retries."""


class LeaseExists(Exception):
    """compare-and-swap lost: somebody holds that subnet already."""


class LeaseNotFound(Exception):
    """The lease's key is not in the store (expired, deleted)."""


class LeaseTaken(Exception):
    """Our subnet's key holds another value than the one we wrote: another host took the subnet (ours lapsed)."""


class ConfigNotFound(Exception):
    """<prefix>/config is not in the store."""


class HistoryLost(Exception):
    """The watch fell behind the store's history (v2 index cleared, v3 compacted): re-list and diff."""


@dataclass(frozen=True, slots=True)
class LeaseDigest:
    """What one cheap read says of the leases: how many keys, and the store position (v2 index, v3 revision) of
    the newest change among them. A watcher that has applied every change up to that position must know as many."""
    count: int
    last_modified: int


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One change below a store's prefix, as its watch reports it."""
    key: str  # below the prefix: 'subnets/10.5.1.0-24', 'names/192.0.2.11/10.5.1.2', 'shop/subnets/…'
    value: str | None  # None: deleted or expired
    revision: int  # the store's position of the change
    lease: LeaseEvent | None = None  # a lease key's change, parsed (whichever network's it is)
    folder: bool = False  # v2: a whole folder went (a names folder's TTL ran out), every key below it too


class Store(abc.ABC):
    """Network config and subnet leases under one prefix (flannel's schema)."""

    @abc.abstractmethod
    def network_config(self) -> str:
        """The raw JSON of <prefix>/config; ConfigNotFound when absent."""

    @abc.abstractmethod
    def leases(self) -> tuple[list[Lease], int]:
        """All leases and the store position to watch from."""

    @abc.abstractmethod
    def lease_digest(self) -> LeaseDigest:
        """The leases' LeaseDigest, cheaper than a listing where the API allows (the watch's safety net)."""

    @abc.abstractmethod
    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        """Write the lease (with `ttl` seconds, None: no TTL) if its key exists (`must_exist`) or does not
        (compare-and-swap): LeaseNotFound or LeaseExists otherwise. With `expected`, the key must also hold exactly
        that value (what we wrote last): LeaseTaken when it holds another. Sets and returns its expiration."""

    def create_lease(self, lease: Lease, ttl: int | None) -> Lease:
        """Create only if the key does not exist; LeaseExists otherwise."""
        return self.write_lease(lease, ttl, must_exist=False)

    def update_lease(self, lease: Lease, ttl: int | None, expected: str | None = None) -> Lease:
        """Rewrite an existing lease (renewal); LeaseNotFound when it is gone, LeaseTaken when it is not `expected`."""
        return self.write_lease(lease, ttl, must_exist=True, expected=expected)

    @abc.abstractmethod
    def delete_lease(self, lease: Lease) -> None:
        """Delete the lease's key (none is fine)."""

    @abc.abstractmethod
    def current_position(self) -> int:
        """The store's position now (v2 index, v3 revision): a watch from there misses nothing written later."""

    @abc.abstractmethod
    def stream(self, position: int, idle: float) -> Iterator[list[KeyChange]]:
        """Batches of changes below the prefix after `position`, from one long-lived watch, as they come; it ends
        when `idle` s pass without one (the caller goes on from the last revision it got). HistoryLost when the
        store no longer has `position`, StoreError when the member fails."""

    def watch_leases(self, position: int, timeout: float) -> tuple[list[LeaseEvent], int]:
        """The lease events of the first batch after `position` (within `timeout` s) and the next position.
        HistoryLost when the store no longer has that position."""
        for batch in self.stream(position, timeout):
            events = [c.lease for c in batch if c.lease is not None and c.key.startswith("subnets/")]
            return events, max(position, *(c.revision for c in batch))
        return [], position

    def watch_views(self) -> list["Store"]:
        """Stores that watch the same leases through different etcd members, this one first: a watch on two
        members goes on at once when one of them hangs. A store with one endpoint has only itself."""
        return [self]

    # --- named networks: <prefix>/<NAME>/config beside the default network's <prefix>/config -------------------
    @abc.abstractmethod
    def named_configs(self) -> dict[str, str]:
        """{NAME: raw JSON} of every <prefix>/<NAME>/config."""

    @abc.abstractmethod
    def create_key(self, key: str, value: str) -> bool:
        """Write <prefix>/<key> if it does not exist (compare-and-swap); False when it exists."""

    @abc.abstractmethod
    def read_key(self, key: str) -> str | None:
        """The value of <prefix>/<key>, None when absent."""

    @abc.abstractmethod
    def delete_key(self, key: str, expected: str) -> None:
        """Delete <prefix>/<key> if it holds `expected`; nothing otherwise."""

    @abc.abstractmethod
    def replace_key(self, key: str, value: str, expected: str) -> bool:
        """Write <prefix>/<key> if it holds `expected` (compare-and-swap); False when it holds another value."""

    # --- short-lived records of one host: container names (names.py) -------------------------------------------
    @abc.abstractmethod
    def list_folder(self, folder: str) -> tuple[dict[str, str], int]:
        """{key below <prefix>/<folder>/: value} of every key under it, at any depth, and the store's position of
        that read (the watch goes on from there)."""

    @abc.abstractmethod
    def put_keys(self, folder: str, items: dict[str, str | None], ttl: int) -> None:
        """Write (a value) or delete (None) keys below <prefix>/<folder>/, kept alive with this host's liveness:
        they go `ttl` s after keep_alive stops (v3: one etcd lease of the host for all its folders; v2: the
        folder's TTL)."""

    @abc.abstractmethod
    def keep_alive(self, folder: str, ttl: int) -> bool:
        """Keep the folder's keys alive `ttl` s more without rewriting them (no watch event); False when they are
        gone already (expired): the caller writes them again."""

    def child(self, name: str) -> "Store":
        """The same etcd, API and credentials with the prefix <prefix>/<name>: the named network `name`."""
        raise NotImplementedError(type(self).__name__)

    def create_config(self, text: str) -> bool:
        return self.create_key("config", text)
