"""One flannel network this host serves: store → lease manager → backend → reconciler, and its main loop.

The default network (<prefix>/config) and every named network (<prefix>/<NAME>/config) is an Overlay of its own,
with its own lease, device, subnet.env, state dir and threads: one main loop that owns its part of the kernel, and a
watcher that turns etcd's watch into lease events on a queue. Networks share nothing but the external interface.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timedelta, timezone

from pyflannel import paths, subnetenv
from pyflannel.files import remove_file, write_atomically
from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.netlink import Kernel
from pyflannel.localapi import DEFAULT_NETWORK

from . import backend as backends
from . import config as netconfig
from . import flannelrules
from .errors import Stopped, UserError
from .feed import Feed
from .guard import TunnelGuard
from .health import Health
from .iface import ExternalInterface
from .lease import WATCH_SECONDS, LeaseManager, LeaseWatcher
from .model.lease import EXPIRY_NOT_READ, Lease, LeaseEvent
from .reconciler import Reconciler
from .store.base import ConfigNotFound, StoreError
from .subnets import IPv4Network, IPv6Network

log = logging.getLogger("pyflanneld")

LOOP_CALL_SECONDS = 10.0
LAST_LEASE = "last-lease"  # in the state dir: the subnet we held last, preferred at start when subnet.env is gone
RENEW_RETRY = timedelta(minutes=1)
MAX_BACKOFF = 10.0


def with_backoff(what: str, fn, health: Health, stop: threading.Event):
    """Call fn until the store answers, saying what failed and when it is tried again; Stopped on stop."""
    delay = 0.5
    while True:
        if stop.is_set():
            raise Stopped()
        try:
            result = fn()
            health.etcd_ok = True
            return result
        except StoreError as e:
            health.etcd_ok = False
            log.warning("%s: %s; retrying in %.1fs", what, e, delay)
        if stop.wait(delay):
            raise Stopped()
        delay = min(delay * 2, MAX_BACKOFF)


class Overlay:
    def __init__(self, name: str, store, flags, ext: ExternalInterface, metrics, guard: TunnelGuard, feed: Feed,
                 health: Health | None = None, config: netconfig.NetworkConfig | None = None):
        """`config` None: read (and waited for) at start, as the default network's is. `guard`: the host's tunnel
        guard, told of the network and its peers; `feed`: the host's watch, which gives the network its events."""
        self.name = name
        self.named = name != DEFAULT_NETWORK
        self.store = store
        self.flags = flags
        self.ext = ext
        self.metrics = metrics
        self.health = health or Health()
        self.config = config
        self.subnet_file = paths.network_env_file(flags.subnet_file, name if self.named else "")
        self.state_dir = os.path.join(flags.state_dir, "networks", name) if self.named else flags.state_dir
        self.guard = guard
        self.feed = feed
        self.stop = threading.Event()
        self.ready = threading.Event()  # the lease is held and the kernel programmed
        self.error: str | None = None   # why a named network could not start
        self.events: queue.Queue = queue.Queue()
        self.kernel = Kernel()
        self.renew_margin = timedelta(minutes=flags.subnet_lease_renew_margin)
        self.next_renew: datetime | None = None
        self.backend = self.leases = self.watcher = self.reconciler = None
        self.thread: threading.Thread | None = None
        self.used_lease: str | None = None  # the lease the devices and subnet.env follow
        self.moved_from: str | None = None  # the lease held before pyflanneld had to take another one, in this run
        self.iptables = flannelrules.FlannelRules(name)  # -ip-masq, --iptables-forward-rules

    # --- start-up --------------------------------------------------------------------------------------------
    def load_config(self) -> netconfig.NetworkConfig:
        def read():
            try:
                return self.store.network_config()
            except ConfigNotFound:
                prefix = self.flags.etcd_prefix
                write = "ETCDCTL_API=2 etcdctl set" if self.flags.etcd_api == "v2" else "etcdctl put"
                raise StoreError(f"no network config at {prefix}/config; write one, e.g. "
                                 f"{write} {prefix}/config '{{\"Network\": \"10.5.0.0/16\"}}'")
        text = with_backoff("reading the network config", read, self.health, self.stop)
        return netconfig.parse(text)

    def previous_subnets(self) -> tuple[IPv4Network | None, IPv6Network | None]:
        """The subnets to ask for first: subnet.env's, else the ones kept in the state dir (after a reboot /run is
        empty, and flannel would take a random subnet once the lease expired, stranding the host's Docker
        networks)."""
        try:
            env = subnetenv.read(self.subnet_file)
            if env.lease is not None:
                return env.lease, env.lease6
        except subnetenv.SubnetEnvError:
            pass
        try:
            with open(os.path.join(self.state_dir, LAST_LEASE)) as f:
                words = f.read().split()
            return IPv4Network(words[0]), IPv6Network(words[1]) if len(words) > 1 else None
        except (OSError, ValueError, IndexError):
            return None, None

    def start(self) -> None:
        if self.config is None:
            self.config = self.load_config()
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.backend = backends.for_config(self.config, self.ext, self.kernel, self.state_dir)
        backend_data = self.backend.prepare()
        self.leases = LeaseManager(self.store, self.config, self.ext.public_ip, self.backend.type, backend_data,
                                   stop=self.stop, public_ipv6=self.backend.public_ipv6,
                                   backend_v6_data=self.backend.backend_v6_data)
        preferred = self.previous_subnets()
        subscription = with_backoff(f"network {self.name}: watching etcd", lambda: self.feed.subscribe(self.name),
                                    self.health, self.stop)  # before the listing: no change is lost between
        with_backoff(f"network {self.name}: acquiring a lease", lambda: self.leases.acquire(*preferred), self.health,
                     self.stop)
        peers, position = self.leases.listing  # our own lease, written after it, comes as a watch event
        self.watcher = LeaseWatcher(self.store, {p.subnet: p for p in peers}, position, subscription)
        self.guard.serve(self.name, self.backend.tunnel(), self.peers())
        self.use_lease()
        self.reconciler = Reconciler(self.kernel, self.backend, stop=self.stop)
        self.reconciler.reconcile(self.peers())  # programming the peers, not repairs: not counted in the metrics
        self.health.programmed = True
        self.ready.set()
        threading.Thread(target=self.watch_loop, name=f"watch-{self.name}", daemon=True).start()
        threading.Thread(target=self.audit_loop, name=f"audit-{self.name}", daemon=True).start()

    def use_lease(self) -> None:
        """Our lease is new or changed: devices, flannel's iptables rules and subnet.env follow it. subnet.env comes
        last: the driver and the CNI plugin take its presence to mean the host is ready."""
        lease, c = self.leases.lease, self.config
        self.backend.attach(lease)
        self.keep_blackholes()
        self.iptables.keep(*flannelrules.wanted(c, lease, self.flags, self.named))
        if self.flags.ip_masq:
            self.backend.prepare_for_masquerade()
        env = subnetenv.for_lease(c.network, lease.subnet if c.enable_ipv4 else None, self.backend.mtu,
                                  self.flags.ip_masq, c.ipv6 and c.ipv6.network, lease.ipv6_subnet)
        write_atomically(os.path.join(self.state_dir, LAST_LEASE),
                         " ".join(str(s) for s in (lease.subnet, lease.ipv6_subnet) if s) + "\n")
        subnetenv.write(self.subnet_file, env)
        self.health.lease = self.lease_text
        log.info("network %s: lease %s, subnet.env written to %s (MTU %d)", self.name, self.lease_text,
                 self.subnet_file, self.backend.mtu)
        if self.used_lease is not None and self.used_lease != self.lease_text:
            self.moved_from = self.used_lease
            self.metrics.lease_changes.inc()
            log.warning("network %s: this host's lease moved from %s to %s: Docker networks and containers on the "
                        "old one must be made again (`pyflannel doctor` names them and the steps)", self.name,
                        self.moved_from, self.lease_text)
        self.used_lease = self.lease_text

    @property
    def lease_text(self) -> str | None:
        """Our lease as `pyflannel status` shows it: '10.5.34.0/24', or '10.5.34.0/24 fd00:5:0:27::/64'."""
        lease = self.leases.lease if self.leases else None
        return " ".join(str(s) for s in (lease.subnet, lease.ipv6_subnet) if s) if lease else None

    def peers(self):
        own = self.leases.lease.subnet
        return [lease for subnet, lease in self.watcher.known.items() if subnet != own]

    # --- a named network's life: a thread of its own -----------------------------------------------------------
    def begin(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"network-{self.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.start()
            self.run()
        except (UserError, KernelError, OSError) as e:
            self.error = str(e)
            log.error("network %s: %s", self.name, e)
            self.feed.unsubscribe(self.name)  # nobody reads its share any more
        except Stopped:
            pass

    def _finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def halt(self) -> None:
        """Stop serving, leaving the lease, the kernel state and the files to the next Overlay of this network (one
        with a new config: IPv6 added)."""
        self._finish()
        self.kernel.close()

    def leave(self) -> None:
        """This host leaves the network: the lease is deleted (its subnet returns to the pool) and the device,
        routes, neighbours, FDB entries, masquerading, subnet.env and state dir go."""
        self._finish()
        self.feed.unsubscribe(self.name)
        try:  # every lease of ours, also one from before a restart that this run had not taken back yet
            for lease in self.store.leases()[0]:
                if lease.public_ip == self.ext.public_ip:
                    self.store.delete_lease(lease)
        except StoreError as e:
            log.warning("network %s: could not delete our lease (%s); it expires by itself", self.name, e)
        if self.reconciler is not None:
            self.reconciler.reconcile([])
        self.guard.leave(self.name)
        if self.backend is not None:
            self.backend.remove()
            self.keep_blackholes(leaving=True)
        self.iptables.remove()
        remove_file(self.subnet_file)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.kernel.close()
        log.info("network %s: left", self.name)

    def describe(self) -> dict:
        c, lease = self.config, self.leases.lease if self.leases else None
        return {"name": self.name, "network": str(c.network) if c else None,
                "ipv6_network": str(c.ipv6.network) if c and c.ipv6 else None,
                "vni": c.vni if c and c.backend_type == "vxlan" else None,
                "backend": c.backend_type if c else None, "device": getattr(self.backend, "device", None),
                **(self.backend.details() if self.backend else {}),
                "lease": str(lease.subnet) if lease else None, "moved_from": self.moved_from,
                "ipv6_lease": str(lease.ipv6_subnet) if lease and lease.ipv6_subnet else None,
                "peers": len(self.reconciler.programmed) if self.reconciler else 0,
                "subnet_file": self.subnet_file,
                "state": "ready" if self.ready.is_set() else "failed" if self.error else "starting",
                "error": self.error}

    # --- threads ---------------------------------------------------------------------------------------------
    def watch_loop(self) -> None:
        lost = False
        delay = 0.5
        while not self.stop.is_set():
            try:
                events = self.watcher.resync() if lost else self.watcher.poll(WATCH_SECONDS)
                if lost:
                    log.info("network %s: etcd is back: watch resumed", self.name)
                    self.watcher.audit_soon()
                missed = self.watcher.take_missed()
                lost, delay = False, 0.5
                self.health.etcd_ok = True
            except StoreError as e:
                if not lost:
                    log.warning("network %s: watch: %s; kernel state kept as is, retrying", self.name, e)
                lost = True
                self.health.etcd_ok = False
                self.stop.wait(delay)
                delay = min(delay * 2, 2.0)  # come back within 2 s of etcd's return
                continue
            for event in missed:
                log.warning("network %s: the watch missed the lease %s %s; the audit applies it now (a bug: please "
                            "report it)", self.name, event.lease.key, event.kind)
                self.metrics.lease_audit_repairs.labels(event.kind).inc()
            for event in events:
                self.events.put((time.monotonic(), event))

    def audit_loop(self) -> None:
        """The watch's safety net (LeaseWatcher.audit_if_due), in a thread of its own: its read may wait out a hung
        etcd member's timeout, which must not hold up the events."""
        while not self.stop.wait(self.watcher.until_audit()):
            try:
                self.watcher.audit_if_due()
            except StoreError as e:
                log.info("network %s: audit: %s; trying again soon", self.name, e)
                self.watcher.audit_soon()

    def run(self) -> None:
        next_reconcile = time.monotonic() + self.flags.reconcile_interval
        next_resync = time.monotonic() + self.flags.iptables_resync
        self.next_renew = self.leases.renew_due(self.renew_margin)
        while not self.stop.is_set():
            self.health.tick()
            now = time.monotonic()
            waits = [next_reconcile - now, next_resync - now, 1.0]
            if self.next_renew is not None:
                waits.append((self.next_renew - datetime.now(timezone.utc)).total_seconds())
            try:
                received, event = self.events.get(timeout=max(0.0, min(waits)))
            except queue.Empty:
                event = None
            if self.stop.is_set():
                break  # told to stop while waiting: no new action, not even for an event already read
            if callable(event):
                event()
            elif event is not None:
                self.handle(event, received)
                continue
            if self.next_renew is not None and datetime.now(timezone.utc) >= self.next_renew:
                self.next_renew = self.renew()
            if time.monotonic() >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + self.flags.reconcile_interval
            if time.monotonic() >= next_resync:
                self.iptables.resync()  # --iptables-resync
                next_resync = time.monotonic() + self.flags.iptables_resync

    def in_loop(self, fn):
        """fn's result, run by this network's loop (which alone touches its lease and kernel state)."""
        done = Future()

        def call():
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)
        self.events.put((time.monotonic(), call))
        return done.result(LOOP_CALL_SECONDS)

    def rotate_key(self) -> dict:
        """A new WireGuard key on our device, then in our lease: peers follow from the lease event."""
        if not hasattr(self.backend, "rotate_key"):
            raise UserError(f"network {self.name} uses the {self.config.backend_type} backend, which has no key: "
                            f"only wireguard networks have one")

        def rotate():
            self.leases.backend_data = self.backend.rotate_key()
            self.next_renew = self.renew()  # publishes the new key (or tries again within a minute)
            return self.describe()
        return self.in_loop(rotate)

    def handle(self, event: LeaseEvent, received: float) -> None:
        """Apply one watch event; `received` is when the watcher read it (time.monotonic())."""
        self.metrics.lease_events.labels(event.kind).inc()
        own = self.leases.lease
        if event.lease.subnet == own.subnet:
            if event.kind == LeaseEvent.REMOVED:
                if event.lease.key == own.key:
                    self.reacquire()  # else: the key we replaced (IPv6 turned on or off)
            elif event.lease.public_ip != self.leases.public_ip:
                self.lost_to(event.lease)
            elif event.lease.expiration != EXPIRY_NOT_READ:
                self.follow_own_expiration(event.lease.expiration)
            return
        if event.kind == LeaseEvent.ADDED:
            self.guard.admit(self.name, event.lease)
            self.reconciler.apply_peer(event.lease)
        else:
            self.reconciler.remove_peer(event.lease.subnet)
            self.guard.release(self.name, event.lease.subnet)
        self.metrics.apply_seconds.observe(time.monotonic() - received)

    def reacquire(self) -> None:
        before = self.leases.lease.key
        with_backoff("re-acquiring our lease", self.leases.reacquire, self.health, self.stop)
        if self.leases.lease.key != before:
            self.use_lease()
        self.reconcile()

    def lost_to(self, other: Lease) -> None:
        """Our subnet's key now names another host: it is that host's; we take another subnet and route the old one
        to its new owner."""
        with_backoff("taking a new lease", lambda: self.leases.replace(taken_by=other.public_ip), self.health,
                     self.stop)
        self.use_lease()
        self.next_renew = self.leases.renew_due(self.renew_margin)
        self.reconcile()  # the watcher knows `other` already: the full diff routes the old subnet to it

    def reconcile(self) -> None:
        """A full reconciliation after start: what it fixes is drift, counted as repairs."""
        self.metrics.count_reconcile(self.reconciler.reconcile(self.peers()))
        if self.flags.ip_blackhole_route:
            self.keep_blackholes()  # flanneld adds it again at each resync too

    def keep_blackholes(self, leaving: bool = False) -> None:
        """--ip-blackhole-route: a blackhole route to each of our lease's subnets, beneath any other route to it
        (kernel.netlink.BLACKHOLE_METRIC); none of this network's without the flag, or when leaving."""
        wanted = () if leaving or not self.flags.ip_blackhole_route else self.backend.own_subnets(self.leases.lease)
        try:
            self.kernel.keep_blackholes(self.backend.networks(), wanted)
        except KernelError as e:
            log.warning("network %s: %s", self.name, e)

    def follow_own_expiration(self, expiration: datetime | None) -> None:
        """Our key was rewritten (by our renewal, or by an admin who shortened its TTL or made it a reservation):
        renew by the expiration etcd now holds, not the one we wrote."""
        current = self.leases.lease.expiration
        if expiration == current or (expiration and current and abs(expiration - current) < RENEW_RETRY):
            return  # the echo of our own write
        log.info("our lease %s now expires %s", self.leases.lease.subnet, expiration or "never (reservation)")
        self.leases.lease.expiration = expiration
        self.next_renew = self.leases.renew_due(self.renew_margin)

    def renew(self):
        try:
            before = self.leases.lease.key
            self.leases.renew()
            if self.leases.lease.key != before:
                self.use_lease()
            return self.leases.renew_due(self.renew_margin)
        except StoreError as e:
            log.warning("renewing lease %s failed: %s; retrying in a minute", self.leases.lease.subnet, e)
            return datetime.now(timezone.utc) + RENEW_RETRY
