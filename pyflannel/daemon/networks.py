"""The flannel networks this host serves: the default one (<prefix>/config), as long as the daemon runs, and the named
ones (<prefix>/<NAME>/config) joined and left through the local API, each an Overlay of its own (overlay.py).

The names joined are kept in <state-dir>/networks.json, so a restart serves them again with the config etcd has and
the same leases. A network whose VNI, WireGuard port, Network or IPv6Network clashes with one served is refused.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from dataclasses import dataclass, field

from pyflannel import paths
from pyflannel.files import remove_file, write_atomically
from pyflannel.localapi import DEFAULT_NETWORK, JOIN_SECONDS

from . import config as netconfig
from .api import Unavailable
from .catalog import Catalog, NetworkConflict, check_name
from .errors import Stopped, UserError
from .feed import Feed
from .flags import Flags
from .guard import TunnelGuard
from .health import Health
from .iface import ExternalInterface
from .names import NameBook
from .overlay import Overlay, with_backoff
from .store.base import ConfigNotFound, Store

log = logging.getLogger("pyflanneld")

JOINED = "networks.json"  # in --state-dir: the named networks this host has joined


@dataclass(eq=False, repr=False)
class Networks:
    flags: Flags
    store: Store  # the default network's; a named one's is its child
    catalog: Catalog
    metrics: object  # Metrics, or Unmeasured
    guard: TunnelGuard
    feed: Feed
    names: NameBook  # a network left, its names go
    stop: threading.Event  # the daemon's: set, every network stops
    ext: ExternalInterface | None = None  # chosen when the daemon starts
    default: Overlay | None = None
    overlays: dict[str, Overlay] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # named networks joined before, not served again: why
    rejoining: dict[str, threading.Event] = field(default_factory=dict)  # set once served again after a restart
    lock: threading.Lock = field(default_factory=threading.Lock)  # joins and leaves, one at a time

    def add_default(self, ext: ExternalInterface, health: Health) -> Overlay:
        """The default network, not started yet: the daemon's life is its life."""
        self.ext = ext
        self.default = Overlay(DEFAULT_NETWORK, self.store, self.flags, ext, self.metrics, self.guard, self.feed,
                               health)
        self.default.stop = self.stop
        self.overlays[DEFAULT_NETWORK] = self.default
        return self.default

    def served(self) -> dict[str, Overlay]:
        """The networks whose lease is held: where names are written and read."""
        return {name: overlay for name, overlay in list(self.overlays.items()) if overlay.ready.is_set()}

    def stop_all(self) -> None:
        """Every network finishes the etcd or kernel call in flight and starts nothing new."""
        with self.lock:
            self.stop.set()
            for overlay in self.overlays.values():
                overlay.stop.set()

    # --- networks.json: joined before a restart ---------------------------------------------------------------
    def joined(self) -> list[str]:
        try:
            with open(os.path.join(self.flags.state_dir, JOINED)) as f:
                return [n for n in json.load(f).get("networks", []) if isinstance(n, str)]
        except (OSError, ValueError, AttributeError):
            return []

    def _save_joined(self) -> None:
        names = sorted({n for n in self.overlays if n != DEFAULT_NETWORK} | set(self.failed))
        write_atomically(os.path.join(self.flags.state_dir, JOINED), json.dumps({"networks": names}) + "\n")

    def rejoin(self) -> None:
        """Serve again, each in a thread of its own, the networks joined before the restart."""
        for name in self.joined():
            self.rejoining[name] = threading.Event()
            threading.Thread(target=self._rejoin, args=(name,), name=f"rejoin-{name}", daemon=True).start()

    def _rejoin(self, name: str) -> None:
        """After a restart: serve a network joined before, with the config etcd has (never a new one)."""
        try:
            text = with_backoff(f"network {name}: reading its config",
                                lambda: self.catalog.config(name, None, create=False), Health(), self.stop)
            self._begin(name, netconfig.parse(text))
        except (UserError, ConfigNotFound) as e:
            log.error("network %s: %s", name, e)
            with self.lock:
                self.failed[name] = str(e)
            remove_file(paths.network_env_file(self.flags.subnet_file, name))  # the driver must not use it
        except Stopped:
            pass
        finally:
            self.rejoining[name].set()

    def _settled(self, name: str) -> None:
        """A join or leave of a network being served again after a restart waits for that first."""
        if name in self.rejoining:
            self.rejoining[name].wait(JOIN_SECONDS)

    # --- join and leave ---------------------------------------------------------------------------------------
    def _begin(self, name: str, config: netconfig.NetworkConfig) -> Overlay:
        with self.lock:
            if name in self.overlays:  # another join of the same name got here first
                return self.overlays[name]
            if self.stop.is_set():
                raise Stopped()
            self._check_clash(name, config)
            overlay = Overlay(name, self.store.child(name), self.flags, self.ext, self.metrics, self.guard, self.feed,
                              config=config)
            self.overlays[name] = overlay
            self._save_joined()
            overlay.begin()
            return overlay

    def _check_clash(self, name: str, config: netconfig.NetworkConfig) -> None:
        """A network this host serves already has the VNI or overlaps the Network: refuse, breaking neither."""
        for other_name, other in self.overlays.items():
            c = other.config
            if other_name == name or c is None:
                continue
            if config.backend_type == c.backend_type and c.vni == config.vni:
                raise NetworkConflict(f"network {name} has VNI {config.vni} in etcd ({self.catalog.where(name)}), "
                                      f"which network {other_name} on this host uses already: give one of them "
                                      f"another Backend.VNI")
            if config.wireguard and c.wireguard and config.wireguard.listen_port == c.wireguard.listen_port:
                raise NetworkConflict(f"network {name} has WireGuard ListenPort {config.wireguard.listen_port} in "
                                      f"etcd ({self.catalog.where(name)}), which network {other_name} on this host "
                                      f"uses already: give one of them another Backend.ListenPort")
            if c.network.overlaps(config.network):
                raise NetworkConflict(f"network {name}'s Network {config.network} overlaps network {other_name}'s "
                                      f"{c.network}")
            if c.ipv6 and config.ipv6 and c.ipv6.network.overlaps(config.ipv6.network):
                raise NetworkConflict(f"network {name}'s IPv6Network {config.ipv6.network} overlaps network "
                                      f"{other_name}'s {c.ipv6.network}")

    def join(self, name: str, network: str | None, backend: str | None = None, ipv6: bool = False) -> dict:
        """Serve network `name` (written to etcd first if new, dual stack with `ipv6`); returns its description once
        its lease is held. `ipv6` on a network served IPv4-only: IPv6 is added to its config (catalog.add_ipv6), and
        its overlay starts again with it, keeping the IPv4 subnet Docker was already given."""
        if name == DEFAULT_NETWORK:
            if network or backend or ipv6:
                raise UserError(f"the default network's Network, Backend and IPv6 are in {self.flags.etcd_prefix}/"
                                f"config; --subnet, a backend and IPv6 are not asked for it")
            return self._ready(self.default)
        check_name(name)
        try:
            wanted = ipaddress.IPv4Network(network) if network else None
        except ValueError as e:
            raise UserError(f"--subnet {network!r} is not an IPv4 network ({e})") from None
        self._ready(self.default)  # etcd found, its API chosen
        self._settled(name)
        overlay = self.overlays.get(name)
        if overlay is not None and overlay.error or name in self.failed:  # failed before: try again from etcd
            self.leave(name)
            overlay = None
        if overlay is None:
            config = netconfig.parse(self.catalog.config(name, wanted, create=True, backend=backend, ipv6=ipv6))
            overlay = self.overlays.get(name) or self._begin(name, config)
        if ipv6 and overlay.config.ipv6 is None:
            self._ready(overlay)
            config = netconfig.parse(self.catalog.add_ipv6(name, self.ext.public_ip))
            with self.lock:
                if self.overlays.get(name) is overlay:
                    del self.overlays[name]
            overlay.halt()
            overlay = self._begin(name, config)
        if wanted is not None and overlay.config.network != wanted:
            raise NetworkConflict(f"network {name} is {overlay.config.network} in etcd; --subnet {wanted} "
                                  f"contradicts it")
        if backend is not None and overlay.config.backend_type != backend:
            raise NetworkConflict(f"network {name} uses the {overlay.config.backend_type} backend in etcd; the "
                                  f"{backend} backend asked for contradicts it")
        return self._ready(overlay)

    @staticmethod
    def _ready(overlay: Overlay) -> dict:
        if not overlay.ready.wait(JOIN_SECONDS):
            raise Unavailable(f"network {overlay.name}: {overlay.error or 'no lease yet (is etcd reachable?)'}")
        return overlay.describe()

    def leave(self, name: str) -> dict:
        if name == DEFAULT_NETWORK:
            raise UserError("the default network is served as long as pyflanneld runs")
        self._settled(name)
        with self.lock:
            overlay = self.overlays.pop(name, None)
            if overlay is not None:
                self.names.forget(name, overlay.store)
                overlay.leave()
            if overlay is not None or self.failed.pop(name, None) is not None:
                self._save_joined()
        return {}

    # --- one network served -----------------------------------------------------------------------------------
    def rotate_key(self, name: str) -> dict:
        overlay = self.default if name == DEFAULT_NETWORK else self.overlays.get(name)
        if overlay is None:
            raise UserError(f"this host does not serve network {name}")
        self._ready(overlay)
        return overlay.rotate_key()

    def describe(self) -> list[dict]:
        failed = {name: {"name": name, "state": "failed", "error": error} for name, error in self.failed.items()}
        return [described for _, described in sorted({**failed, **{name: overlay.describe() for name, overlay in
                                                                   self.overlays.items()}}.items())]
