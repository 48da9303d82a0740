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

A transaction holds a thread lock (gunicorn threads) and an flock on state.lock (gunicorn worker processes), reads
the file, lets the caller change the dict, and writes it back only if it changed and the block raised nothing —
so a handler that fails half-way never leaves half a change on disk.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import threading
import time

from pyflannel import paths
from pyflannel.files import write_atomically

from .errors import DriverError, UnavailableError

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"


class StateError(DriverError):
    """The state file cannot be read or written; the message names the file."""


def empty_state() -> dict:
    return {"version": STATE_VERSION, "networks": {}, "endpoints": {}, "pools": {}, "leaving": []}


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

    def load(self) -> dict:
        """A snapshot of the state (no lock; for reads that tolerate a concurrent writer)."""
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return empty_state()
        except OSError as e:
            raise StateError(f"cannot read state file {self.path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise StateError(f"state file {self.path} is not valid JSON ({e}); move it away to start with an empty "
                             f"state (the driver then forgets its networks: remove and recreate them in Docker)") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateError(f"state file {self.path} has an unknown format (expected version {STATE_VERSION})")
        state = empty_state()
        for key, kind in (("networks", dict), ("endpoints", dict), ("pools", dict), ("leaving", list)):
            if not isinstance(data.get(key, kind()), kind):
                raise StateError(f"state file {self.path}: {key!r} must be {'an object' if kind is dict else 'a list'}")
            state[key] = data.get(key, kind())
        return state

    def _save(self, state: dict) -> None:
        write_atomically(self.path, json.dumps(state, indent=1, sort_keys=True) + "\n", mode=0o600,
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
                before = copy.deepcopy(state)
                yield state
                if state != before:
                    try:
                        self._save(state)
                    except OSError as e:
                        raise StateError(f"cannot write state file {self.path}: {e.strerror}") from None
            finally:
                os.close(fd)  # releases the flock
        finally:
            self._thread_lock.release()
