"""pyflanneld: serve the default flannel network and every named network this host has joined.

The default network (<prefix>/config) starts with the daemon, as flanneld's does, in the main thread. Named networks
(<prefix>/<NAME>/config) are joined and left through the local API (api.py) by pyflannel-driver and the CNI plugin;
networks.py keeps them. Beside the networks the daemon holds this host's container names (names.py) and answers them
over DNS (dns.py), and runs the thin CNI client's calls.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time

from pyflannel.kernel import links
from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.netlink import Kernel
from pyflannel.localapi import DEFAULT_NETWORK, host_identity

from . import flags as cli_flags
from . import dns, iface, memory, notify
from . import store as stores
from .api import WrongHost, serve as serve_api
from .catalog import Catalog
from .errors import Stopped, UserError
from .feed import Feed
from .guard import TunnelGuard, etcd_addresses
from .health import Health, serve
from .metrics import Unmeasured
from .names import Container, NameBook
from .networks import Networks

log = logging.getLogger("pyflanneld")

FIRST_NAMES_SECONDS = 5.0  # DNS starts once the default network's names are read, or after this long anyway


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
            from .metrics.prometheus import Metrics
            self.metrics = Metrics(self, flags.driver_socket)
        else:
            self.metrics = Unmeasured()
        self.store = self.metrics.counting(stores.from_flags(flags, peer_expiry=False))
        self.guard = TunnelGuard(etcd_addresses(flags.etcd_endpoints), flags.allow_container_tunnels,
                                 flags.allow_container_etcd)
        self.cni_lock = threading.Lock()
        # names are written and read in the networks served (this host's PublicIP comes at start)
        self.names = NameBook(lambda: self.networks.served(), "", flags.names_ttl, self.stop)
        self.feed = Feed(self.store, self.stop, self.names.on_names, self.metrics.etcd_errors.labels("watch").inc)
        self.networks = Networks(flags, self.store, Catalog(self.store, flags.etcd_prefix), self.metrics, self.guard,
                                 self.feed, self.names, self.stop)

    # --- start-up --------------------------------------------------------------------------------------------
    def start(self) -> None:
        f = self.flags
        if f.healthz_port:
            serve(self.health, f.healthz_ip, f.healthz_port, self.metrics.registry)
        kernel = Kernel()
        try:
            ext = iface.choose(kernel, f.iface, f.iface_regex, f.public_ip, f.public_ipv6, f.iface_can_reach)
        finally:
            kernel.close()
        log.info("external interface %s (%s), public IP %s, public IPv6 %s", ext.name, ext.address,
                 ext.public_ip, ext.public_ipv6 or "none (IPv6 overlays go over IPv4)")
        default = self.networks.add_default(ext, self.health)
        self.api = serve_api(self, f.api_socket)
        default.start()
        self.names.public_ip = ext.public_ip
        self.names.host_addresses |= {ext.public_ip, f.dns_address}
        threading.Thread(target=self.names.run, name="names", daemon=True).start()
        if f.dns_address:
            self._serve_dns(f.dns_address)
        memory.release_freed()
        self.networks.rejoin()

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
                if self.stop.wait(0.01):  # SIGTERM while starting: the names may never be read
                    return
            dns.serve(resolver, address, sock=dns.held_socket(address), stop=self.stop)
        except (OSError, KernelError) as e:  # the overlay matters more: it is served without DNS (doctor says so)
            log.error("no DNS for container names: cannot answer on %s:53: %s", address,
                      getattr(e, "strerror", None) or e)

    def run(self) -> None:
        try:
            self.networks.default.run()
        finally:
            self.request_stop()
            self.guard.close()

    def request_stop(self) -> None:
        """SIGTERM: every network finishes the etcd or kernel call in flight and starts nothing new."""
        self.networks.stop_all()

    # --- the local API's calls (api.py) -----------------------------------------------------------------------
    def join(self, name: str, network: str | None, backend: str | None = None, ipv6: bool = False) -> dict:
        return self.networks.join(name, network, backend, ipv6)

    def leave(self, name: str) -> dict:
        return self.networks.leave(name)

    def rotate_key(self, name: str) -> dict:
        return self.networks.rotate_key(name)

    def describe(self) -> list[dict]:
        return self.networks.describe()

    def publish(self, containers: list[dict], host: str | None = None) -> dict:
        """The driver's view of this host's containers (Container.from_published's items); refused when `host`
        (localapi.host_identity() on the driver's side) is not this one's, as it would replace this host's
        containers with another's."""
        if host and self.host and host != self.host:
            raise WrongHost(f"names published from another host (network namespace {host}; this pyflanneld runs in "
                            f"{self.host}): that host's driver reaches this pyflanneld on its --daemon-socket; give "
                            f"each host's pyflanneld its own -api-socket")
        self.names.publish([Container.from_published(c) for c in containers])
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
    default = daemon.networks.default
    return default is None or not default.ready.is_set() or daemon.health.healthy()[0]


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
        notify.notify(f"READY=1\nSTATUS=lease {daemon.networks.default.lease_text}")
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
