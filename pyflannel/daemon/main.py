"""pyflanneld: serve the default flannel network and every named network this host has joined.

The default network (<prefix>/config) starts with the daemon, as flanneld's does, in the main thread. Named networks
(<prefix>/<NAME>/config) are joined and left through the local API (api.py) by pyflannel-driver and the CNI plugin;
each runs as an Overlay of its own (overlay.py). The names joined are kept in <state-dir>/networks.json, so a restart
serves them again with the same leases.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time

from pyflannel import paths
from pyflannel.files import remove_file, write_atomically
from pyflannel.kernel import links
from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.netlink import Kernel
from pyflannel.localapi import DEFAULT_NETWORK, JOIN_SECONDS, host_identity

from . import config as netconfig
from . import flags as cli_flags
from . import dns, iface, memory, notify
from . import store as stores
from .api import Unavailable, WrongHost, serve as serve_api
from .catalog import Catalog, NetworkConflict, check_name
from .errors import Stopped, UserError
from .feed import Feed
from .guard import TunnelGuard, etcd_addresses
from .health import Health, serve
from .names import Container, NameBook
from .overlay import Overlay, with_backoff
from .store.base import ConfigNotFound

log = logging.getLogger("pyflanneld")

JOINED = "networks.json"  # in --state-dir: the named networks this host has joined
FIRST_NAMES_SECONDS = 5.0  # DNS starts once the default network's names are read, or after this long anyway


class Unmeasured:
    """The metrics of a daemon without a healthz port: nobody can scrape them, so nothing is counted."""

    class _Nothing:
        def labels(self, *values):
            return self

        def inc(self, amount: float = 1) -> None:
            pass

        def observe(self, value: float) -> None:
            pass

    lease_events = apply_seconds = lease_changes = lease_audit_repairs = etcd_errors = dns_upstream_failures = \
        _Nothing()
    registry = None

    def count_reconcile(self, repairs) -> None:
        pass

    @staticmethod
    def counting(store):
        return store


class Daemon:
    def __init__(self, flags: cli_flags.Flags, cni=None):
        """`cni`: the CNI plugin's `run(environ, stdin) -> (exit code, stdout)`, to serve the thin CNI client's
        calls (pyflannel/pyflanneld.py hands it in: the daemon and the CNI plugin never import each other)."""
        self.flags = flags
        self.cni_plugin = cni
        self.host = host_identity()  # what a name publish from this host's driver says
        self.stop = threading.Event()
        self.health = Health()
        if flags.healthz_port:
            from .metrics import Metrics
            self.metrics = Metrics(self, flags.driver_socket)
        else:
            self.metrics = Unmeasured()
        self.store = self.metrics.counting(stores.from_flags(flags, peer_expiry=False))
        self.guard = TunnelGuard(etcd_addresses(flags.etcd_endpoints), flags.allow_container_tunnels,
                                 flags.allow_container_etcd)
        self.catalog = Catalog(self.store, flags.etcd_prefix)
        self.overlays: dict[str, Overlay] = {}
        self.failed: dict[str, str] = {}  # named networks joined before that could not be served again: why
        self.rejoining: dict[str, threading.Event] = {}  # set when the network joined before is served again
        self.lock = threading.Lock()  # joins and leaves, one at a time
        self.cni_lock = threading.Lock()
        self.default: Overlay | None = None
        self.names = NameBook(self._served, "", flags.names_ttl, self.stop)  # this host's PublicIP comes at start
        self.feed = Feed(self.store, self.stop, self.names.on_names, self.metrics.etcd_errors.labels("watch").inc)

    # --- start-up --------------------------------------------------------------------------------------------
    def start(self) -> None:
        f = self.flags
        if f.healthz_port:
            serve(self.health, f.healthz_ip, f.healthz_port, self.metrics.registry)
        kernel = Kernel()
        try:
            self.ext = iface.choose(kernel, f.iface, f.iface_regex, f.public_ip, f.public_ipv6, f.iface_can_reach)
        finally:
            kernel.close()
        log.info("external interface %s (%s), public IP %s, public IPv6 %s", self.ext.name, self.ext.address,
                 self.ext.public_ip, self.ext.public_ipv6 or "none (IPv6 overlays go over IPv4)")
        self.default = Overlay(DEFAULT_NETWORK, self.store, f, self.ext, self.metrics, self.guard, self.feed,
                               self.health)
        self.default.stop = self.stop  # the daemon's life is the default network's
        self.overlays[DEFAULT_NETWORK] = self.default
        self.api = serve_api(self, f.api_socket)
        self.default.start()
        self.names.public_ip = self.ext.public_ip
        self.names.host_addresses |= {self.ext.public_ip, f.dns_address}
        threading.Thread(target=self.names.run, name="names", daemon=True).start()
        if f.dns_address:
            self._serve_dns(f.dns_address)
        memory.release_freed()
        for name in self.joined():
            self.rejoining[name] = threading.Event()
            threading.Thread(target=self._rejoin, args=(name,), name=f"rejoin-{name}", daemon=True).start()

    def _served(self) -> dict[str, Overlay]:
        """The networks whose lease is held: where names are written and read."""
        return {name: overlay for name, overlay in list(self.overlays.items()) if overlay.ready.is_set()}

    def _serve_dns(self, address: str) -> None:
        """On the socket systemd holds (pyflanneld-dns.socket: no lookup fails while we restart), else on our own.
        The address stays on lo when we stop: lookups then wait in systemd's socket, or find nobody."""
        try:
            where = ipaddress.IPv4Address(address)
        except ValueError:
            raise UserError(f"-dns-address={address!r} is not an IPv4 address") from None
        upstreams = self.flags.dns_upstream or dns.upstreams_from(exclude=address)
        try:
            links.ensure_address("lo", ipaddress.IPv4Interface(f"{where}/32"))
            resolver = dns.Resolver(self.names, upstreams)
            resolver.count_upstream_failure = self.metrics.dns_upstream_failures.inc
            # answers start once the default network's names are read: before, a name of ours would be forwarded
            # and answered "no such name" (the queries of a restart, waiting in systemd's socket, come at once)
            deadline = time.monotonic() + FIRST_NAMES_SECONDS
            while DEFAULT_NETWORK not in self.names.listed and time.monotonic() < deadline:
                time.sleep(0.01)
            dns.serve(resolver, address, sock=dns.held_socket(address), stop=self.stop)
        except (OSError, KernelError) as e:  # the overlay matters more: it is served without DNS (doctor says so)
            log.error("no DNS for container names: cannot answer on %s:53: %s", address,
                      getattr(e, "strerror", None) or e)

    def publish(self, containers: list[dict], host: str | None = None) -> dict:
        """The driver's view of this host's containers: [{"id", "networks": {network: {"address", "names",
        optional "address6"}}}]; refused when `host` (localapi.host_identity() on the driver's side) is not this
        one's, as it would replace this host's containers with another's."""
        if host and self.host and host != self.host:
            raise WrongHost(f"names published from another host (network namespace {host}; this pyflanneld runs in "
                            f"{self.host}): that host's driver reaches this pyflanneld on its --daemon-socket; give "
                            f"each host's pyflanneld its own -api-socket")
        parsed = []
        for c in containers:
            networks = {(n or DEFAULT_NETWORK): (str(ipaddress.IPv4Address(e["address"])), tuple(map(str, e["names"])))
                        for n, e in c["networks"].items()}
            addresses6 = {(n or DEFAULT_NETWORK): str(ipaddress.IPv6Address(e["address6"]))
                          for n, e in c["networks"].items() if e.get("address6")}
            parsed.append(Container(str(c["id"]), networks, addresses6))
        self.names.publish(parsed)
        return {}

    def run(self) -> None:
        try:
            self.default.run()
        finally:
            self.request_stop()
            self.guard.close()

    def request_stop(self) -> None:
        """SIGTERM: every network finishes the etcd or kernel call in flight and starts nothing new."""
        with self.lock:
            self.stop.set()
            for overlay in self.overlays.values():
                overlay.stop.set()

    # --- named networks ---------------------------------------------------------------------------------------
    def joined(self) -> list[str]:
        try:
            with open(os.path.join(self.flags.state_dir, JOINED)) as f:
                return [n for n in json.load(f).get("networks", []) if isinstance(n, str)]
        except (OSError, ValueError, AttributeError):
            return []

    def _save_joined(self) -> None:
        names = sorted({n for n in self.overlays if n != DEFAULT_NETWORK} | set(self.failed))
        write_atomically(os.path.join(self.flags.state_dir, JOINED), json.dumps({"networks": names}) + "\n")

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

    def cni(self, environ: dict, stdin: bytes) -> tuple[int, str]:
        """A CNI call of the thin client, run here where pyroute2 is loaded; one at a time (the plugin's code was
        written for a process of its own)."""
        started = time.monotonic()
        with self.cni_lock:
            code, output = self.cni_plugin(environ, stdin)
        log.info("CNI %s %s: %s in %.1f ms", environ.get("CNI_COMMAND"), environ.get("CNI_CONTAINERID", "")[:12],
                 "done" if code == 0 else "error", (time.monotonic() - started) * 1000)
        return code, output

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


def set_verbosity(v: int, log_level: str = "info") -> None:
    """-log-level: the least severe messages logged (debug: pyflannel's own DEBUG messages, the libraries' stay at
    INFO). klog's -v above 0 wins over it, as detail on top of INFO: pyflannel's DEBUG messages from 1, every
    library's too from 5."""
    ours_debug = v >= 1 or log_level == "debug"
    logging.getLogger().setLevel(logging.DEBUG if v >= 5 else logging.INFO if ours_debug
                                 else getattr(logging, log_level.upper()))
    if ours_debug:
        for name in ("pyflannel", "pyflanneld"):
            logging.getLogger(name).setLevel(logging.DEBUG)


def watched_alive(daemon: Daemon) -> bool:
    """What systemd's watchdog is told: starting (systemd's start timeout bounds that), or the main loop turning."""
    return daemon.default is None or not daemon.default.ready.is_set() or daemon.health.healthy()[0]


def main(argv: list[str] | None = None, cni=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        flags = cli_flags.parse(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        log.error("%s", e)
        return 1
    set_verbosity(flags.v, flags.log_level)
    memory.limit_arenas()
    try:
        daemon = Daemon(flags, cni)
    except ValueError as e:
        log.error("%s", e)
        return 1

    def stopping():
        notify.notify("STOPPING=1")
        daemon.request_stop()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stopping).start())
    notify.start_watchdog(lambda: watched_alive(daemon), daemon.stop)
    try:
        daemon.start()
        notify.notify(f"READY=1\nSTATUS=lease {daemon.default.lease_text}")
        daemon.run()
    except (UserError, KernelError) as e:
        log.error("%s", e)
        return 1
    except (KeyboardInterrupt, Stopped):
        pass
    log.info("stopped; kernel state and lease kept for the next start (of every network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
