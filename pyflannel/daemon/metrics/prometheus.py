"""pyflanneld's Prometheus metrics, served at /metrics on the healthz port (without one, nothing is counted: the
daemon holds the package's `Unmeasured` instead, and this module and prometheus_client are not imported).

Counters are bumped where things happen; gauges are read from the running daemon at each scrape; the driver's own
metrics are fetched from its plugin socket at each scrape and served alongside, so one scrape covers the host.
"""
from __future__ import annotations

import functools
import http.client
import logging
import math
import platform
import socket

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from pyflannel import __version__

from ..model.lease import LeaseEvent
from ..reconciler import Repairs
from ..store.base import Store, StoreError

log = logging.getLogger(__name__)

disable_created_metrics()  # a *_created series per counter would double the output and tell little
# The Store calls the daemon makes, each a value of the `operation` label (create/update share write_lease).
# The feed's watch (the stores' `stream`, read in the feed's threads) counts as "watch".
STORE_OPERATIONS = sorted((Store.__abstractmethods__ - {"write_lease", "stream"}) | {"create_lease", "update_lease",
                                                                                     "watch"})
REPAIR_KINDS = ("route", "neighbor", "fdb", "wireguard-peer")
# A peer's lease reaches the kernel in a few milliseconds (docs/benchmarks.md): buckets start well below that.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DRIVER_TIMEOUT = 2.0


class Metrics:
    """The daemon's registry (its own, not prometheus_client's global one) and the counters the daemon bumps."""

    def __init__(self, daemon, driver_socket: str):
        self.registry = registry = CollectorRegistry()
        self.reconcile_runs = Counter("pyflannel_reconcile_runs", "Reconciliation passes (kernel against leases) after start",
                                      registry=registry)
        self.repairs = Counter("pyflannel_reconcile_repairs",
                               "Kernel entries a reconciliation pass found missing (added) or stale (removed)",
                               ["kind", "action"], registry=registry)
        self.reconcile_failures = Counter("pyflannel_reconcile_failures",
                                          "Kernel entries a reconciliation pass could not add or remove (the kernel "
                                          "refused; logged, tried again at the next pass)", ["kind"],
                                          registry=registry)
        self.lease_events = Counter("pyflannel_lease_events", "Lease events from the etcd watch handled, by type",
                                    ["type"], registry=registry)
        self.lease_audit_repairs = Counter("pyflannel_lease_audit_repairs",
                                           "Leases the watch missed and its safety net (a periodic comparison with "
                                           "etcd) applied, by type: each one is a bug", ["type"], registry=registry)
        self.etcd_errors = Counter("pyflannel_etcd_errors", "etcd calls that failed, by store operation",
                                   ["operation"], registry=registry)
        self.lease_changes = Counter("pyflannel_lease_changes", "Times pyflanneld had to take another lease for this "
                                     "host while running (its lease expired or went to another host)",
                                     registry=registry)
        self.dns_upstream_failures = Counter("pyflannel_dns_upstream_failures",
                                             "Lookups forwarded to the upstream resolvers that none of them answered "
                                             "(the container got SERVFAIL)", registry=registry)
        self.apply_seconds = Histogram("pyflannel_lease_event_apply_seconds",
                                       "Time from a peer's lease event read from etcd to its kernel entries changed",
                                       buckets=APPLY_BUCKETS, registry=registry)
        Info("pyflannel_build", "pyflannel and Python versions", registry=registry).info(
            {"version": __version__, "python": platform.python_version()})
        # Every label value from the start, so a rate() or an alert sees 0 rather than nothing.
        for kind in REPAIR_KINDS:
            for action in ("added", "removed"):
                self.repairs.labels(kind, action)
            self.reconcile_failures.labels(kind)
        for kind in (LeaseEvent.ADDED, LeaseEvent.REMOVED):
            self.lease_events.labels(kind)
            self.lease_audit_repairs.labels(kind)
        for operation in STORE_OPERATIONS:
            self.etcd_errors.labels(operation)
        ProcessCollector(registry=registry)
        registry.register(DaemonState(daemon))
        registry.register(DriverMetrics(driver_socket))

    def count_reconcile(self, repairs: Repairs) -> None:
        self.reconcile_runs.inc()
        for action, counts in (("added", repairs.added), ("removed", repairs.removed)):
            for kind, count in counts.items():
                self.repairs.labels(kind, action).inc(count)
        for kind, count in repairs.failed.items():
            self.reconcile_failures.labels(kind).inc(count)

    def counting(self, store: Store) -> "CountingStore":
        return CountingStore(store, self.etcd_errors)


class CountingStore:
    """A store whose StoreErrors are counted by operation (the Store method that raised), then raised on."""

    def __init__(self, store: Store, errors: Counter):
        self._store = store
        self._errors = errors

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if name not in STORE_OPERATIONS:
            return attr

        @functools.wraps(attr)
        def counted(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except StoreError:
                self._errors.labels(name).inc()
                raise
        return counted


class DaemonState:
    """Gauges read from the daemon at scrape time, so nothing has to keep them in step."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        networks = self.daemon.networks
        every = list(networks.overlays.values())
        network_up = GaugeMetricFamily("pyflannel_network_up", "1 when this host holds the network's lease and has "
                                       "programmed its peers; 0 while it starts, or when it failed (pyflannel "
                                       "status says why)", labels=["network"])
        for o in every:
            network_up.add_metric([o.name], 1 if o.ready.is_set() else 0)
        for name in set(networks.failed) - {o.name for o in every}:
            network_up.add_metric([name], 0)
        yield network_up
        yield GaugeMetricFamily("pyflannel_etcd_reachable", "1 when pyflanneld's last call to etcd for the default "
                                "network succeeded, else 0", value=1 if self.daemon.health.etcd_ok else 0)
        overlays = [o for o in every if o.ready.is_set()]  # started ones only
        leases = GaugeMetricFamily("pyflannel_leases", "Subnet leases in etcd, ours included", labels=["network"])
        peers = GaugeMetricFamily("pyflannel_peers_programmed", "Peers whose entries this host has in the kernel",
                                  labels=["network", "backend"])
        expiry = GaugeMetricFamily("pyflannel_lease_expiry_timestamp_seconds",
                                   "When our lease expires, as a Unix time (+Inf: a reservation without TTL)",
                                   labels=["network"])
        for o in overlays:
            leases.add_metric([o.name], len(o.watcher.known))
            peers.add_metric([o.name, o.backend.type], len(o.reconciler.programmed))
            expiration = o.leases.lease.expiration
            expiry.add_metric([o.name], expiration.timestamp() if expiration else math.inf)
        if overlays:
            yield from (leases, peers, expiry)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class DriverMetrics:
    """pyflannel-driver's metrics, fetched from GET /metrics on its plugin socket at each scrape."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def fetch(self) -> list:
        conn = UnixHTTPConnection(self.socket_path, DRIVER_TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return list(text_string_to_metric_families(text))

    def collect(self):
        try:
            families, up = self.fetch(), 1
        except (OSError, http.client.HTTPException, ValueError) as e:
            log.debug("driver metrics from %s: %s", self.socket_path, e)
            families, up = [], 0
        return [GaugeMetricFamily("pyflannel_driver_up",
                                  "1 when pyflannel-driver answered on --driver-socket at this scrape, else 0",
                                  value=up), *families]
