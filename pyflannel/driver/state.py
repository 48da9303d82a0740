"""The driver's persistent state: one JSON file, replaced atomically, changed only inside a locked transaction.

Docker replays nothing to a network driver after a restart (of dockerd or of the driver), so everything needed to
answer later calls and to clean up lives here:

    {
      "version": 1,
      "networks":  {NetworkID:  {"bridge": "pfl-0123abcd", "pool": "10.5.34.0/24", "gateway": "10.5.34.1/24",
                                 "flannel_network": "10.5.0.0/16", "mtu_option": 1400 | null,
                                 "masquerade": true, "internal": false, "flannel": "" | "shop",
                                 with --ipv6: "pool6": "fd00:5:0:27::/64", "gateway6": "fd00:5:0:27::1/64",
                                 "flannel_network6": "fd00:5::/48"}},   (IPv6-only: pool, gateway, flannel_network null)
      "endpoints": {EndpointID: {"network": NetworkID, "address": "10.5.34.7/24" | "", "mac": "02:42:...",
                                 "mac_generated": true, "veth_host": "pfv-...", "veth_container": "pfc-...",
                                 "joined": false, "sandbox": "", "address6": "fd00:5:0:27::7/64" | "",
                                 "ports": [{"proto", "host_ip", "host_port", "container_ip", "port",
                                            "container_ip6"}]}},
      "pools":     {PoolID:     {"pool": "10.5.34.0/24", "allocated": ["10.5.34.2", ...], "flannel": "" | "shop"}},
                                 (an IPv6 pool alike: "pyflannel/fd00:5:0:27::/64")
      "leaving":   ["shop", ...]    named flannel networks to leave, once pyflanneld answers
    }

The records are records.py's (a network, an endpoint, a pool), gathered in a DriverState. A transaction holds a
thread lock (gunicorn threads) and an flock on state.lock (gunicorn worker processes), reads the file, lets the
caller change the state, and writes it back only if it changed and the block raised nothing — so a handler that
fails half-way never leaves half a change on disk. pyflannel doctor reads the file with `read`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import threading
import time

from pyflannel import localapi, paths
from pyflannel.files import write_atomically

from .errors import DriverError, UnavailableError
from .records import EndpointRecord, NetworkRecord, PoolRecord

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"


class StateError(DriverError):
    """The state file cannot be read or written; the message names the file."""


@dataclasses.dataclass
class DriverState:
    """The state file's content: the records by id, and the named flannel networks to leave."""
    networks: dict[str, NetworkRecord] = dataclasses.field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = dataclasses.field(default_factory=dict)
    pools: dict[str, PoolRecord] = dataclasses.field(default_factory=dict)
    leaving: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> DriverState:
        """The state from the file's object, its version and shape checked (`read`); ValueError naming a record that
        is not one."""
        state = cls(leaving=data["leaving"])
        for key, record in (("networks", NetworkRecord), ("endpoints", EndpointRecord), ("pools", PoolRecord)):
            for rid, item in data[key].items():
                try:
                    getattr(state, key)[rid] = record.from_json(item)
                except ValueError as e:
                    raise ValueError(f"{key} {rid[:12]!r} {e}") from None
        return state

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, "leaving": list(self.leaving),
                **{key: {rid: record.to_json() for rid, record in getattr(self, key).items()}
                   for key in ("networks", "endpoints", "pools")}}

    def network_on(self, name: str) -> tuple[str, NetworkRecord] | None:
        """(id, record) of the Docker network on the flannel network `name` ("" for the default one); a host has
        one at most."""
        return next(((nid, net) for nid, net in self.networks.items() if net.flannel == name), None)

    def networks_using(self, pool: str) -> list[str]:
        """The ids of the Docker networks on the lease `pool`."""
        return [nid for nid, net in self.networks.items() if pool in net.pools]

    def drop_pool(self, pid: str, daemon: localapi.Client | None) -> None:
        """Forget a pool no network uses; a named network's host leaves it (pyflanneld deletes its lease and
        devices). Docker deletes its network whatever the driver answers, so when pyflanneld cannot be told now,
        the leave waits in the state for `leave_pending`."""
        name = self.pools.pop(pid).flannel
        if name:
            self.leave(name, daemon)

    def leave(self, name: str, daemon: localapi.Client | None) -> None:
        """Leave the flannel network `name` now, or at a later call if pyflanneld cannot be told now."""
        if daemon is not None and name not in self.leaving:
            self.leaving.append(name)
            self.leave_pending(daemon)

    def leave_pending(self, daemon: localapi.Client | None) -> None:
        """Leave the flannel networks that wait for it, unless a pool of theirs exists again. Called at start and by
        the calls that add or drop pools or start containers: pyflanneld may have been down when their last network
        went."""
        in_use = {pool.flannel for pool in self.pools.values()}
        for name in list(self.leaving):
            if name not in in_use and daemon is not None:
                try:
                    daemon.leave(name)
                except localapi.DaemonError as e:
                    log.warning("cannot leave flannel network %s yet (tried again at the next call): %s", name, e)
                    continue
                log.info("left flannel network %s", name)
            self.leaving.remove(name)


def read(path: str) -> DriverState:
    """The state file at `path` (no lock; for reads that tolerate a concurrent writer); absent, an empty state."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return DriverState()
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StateError(f"state file {path} is not valid JSON ({e}); move it away to start with an empty "
                         f"state (the driver then forgets its networks: remove and recreate them in Docker)") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise StateError(f"state file {path} has an unknown format (expected version {STATE_VERSION})")
    shape = {"networks": {}, "endpoints": {}, "pools": {}, "leaving": []}
    for key, empty in shape.items():
        if not isinstance(data.setdefault(key, empty), type(empty)):
            kind = "an object" if isinstance(empty, dict) else "a list"
            raise StateError(f"state file {path}: {key!r} must be {kind}")
    try:
        return DriverState.from_json(data)
    except ValueError as e:
        raise StateError(f"state file {path}: {e}") from None


class StateStore:
    def __init__(self, state_dir: str = paths.DRIVER_STATE_DIR, lock_timeout: float = 10.0):
        self.dir = os.path.abspath(state_dir)
        self.path = os.path.join(self.dir, STATE_FILE)
        self.lock_path = os.path.join(self.dir, LOCK_FILE)
        self.lock_timeout = lock_timeout
        self._thread_lock = threading.Lock()
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state dir {self.dir}: {e.strerror}") from None
        self.load()  # fail at startup, not at the first Docker call, if the file is unreadable

    def load(self) -> DriverState:
        """A snapshot of the state (no lock; for reads that tolerate a concurrent writer)."""
        return read(self.path)

    def _save(self, data: dict) -> None:
        write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode=0o600,
                         folder_mode=0o700)

    @contextlib.contextmanager
    def transaction(self):
        deadline = time.monotonic() + self.lock_timeout
        if not self._thread_lock.acquire(timeout=self.lock_timeout):
            raise UnavailableError(f"driver state is busy (lock not free after {self.lock_timeout:.0f}s); retry")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                            raise UnavailableError(f"driver state {self.lock_path} is locked by another process "
                                                   f"for more than {self.lock_timeout:.0f}s; retry") from None
                        time.sleep(0.01)
                state = self.load()
                before = state.to_json()  # a copy
                yield state
                after = state.to_json()
                if after != before:
                    try:
                        self._save(after)
                    except OSError as e:
                        raise StateError(f"cannot write state file {self.path}: {e.strerror}") from None
            finally:
                os.close(fd)  # releases the flock
        finally:
            self._thread_lock.release()
