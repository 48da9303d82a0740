"""pyflanneld's logic on in-memory fakes (tests/fakes.py): lease acquisition, renewal and watching, the
reconciler's diff, and the VXLAN backend's device and entries. No root, no etcd, no namespaces: milliseconds.
The same behaviours are proven against a real etcd (test_lease.py, test_etcdv3.py) and kernel (test_multihost.py)."""
import dataclasses
import ipaddress
import random
import threading
import time

import pytest

from pyflannel.daemon.backend.vxlan import VxlanBackend
from pyflannel.daemon.config import parse
from pyflannel.daemon.errors import Stopped
from pyflannel.daemon.iface import ExternalInterface
from pyflannel.daemon import lease as lease_module
from pyflannel.daemon.feed import Feed
from pyflannel.daemon.lease import LeaseManager, LeaseWatcher
from pyflannel.daemon.model.lease import Lease, LeaseEvent
from pyflannel.daemon.store.base import HistoryLost
from pyflannel.localapi import DEFAULT_NETWORK
from pyflannel.daemon.reconciler import Reconciler
from pyflannel.kernel.netlink import FdbEntry, Neighbor, Route
from tests.fakes import FakeKernel, MemoryStore

pytestmark = pytest.mark.unit

N = ipaddress.IPv4Network
CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'
EXT = ExternalInterface("eth0", 2, 1500, ipaddress.IPv4Interface("192.0.2.11/24"), "192.0.2.11")


def manager(store, ip="192.0.2.11", seed=1):
    return LeaseManager(store, parse(CONFIG), ip, "vxlan", {"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"},
                        rng=random.Random(seed))


def peer(subnet: str, ip: str, mac: str = "0e:00:00:00:00:02") -> Lease:
    return Lease(N(subnet), ip, "vxlan", {"VNI": 1, "VtepMAC": mac})


# --- leases --------------------------------------------------------------------------------------------------------

def test_acquire_takes_a_free_subnet_and_reuses_our_public_ips_lease():
    store = MemoryStore(CONFIG)
    first = manager(store).acquire()
    assert first.subnet.prefixlen == 24 and first.subnet != N("10.5.0.0/24") and first.expiration is not None
    assert manager(store, seed=2).acquire().subnet == first.subnet
    assert len(store.data) == 1


def test_acquire_prefers_the_old_subnet_when_free_and_retries_a_lost_race():
    store = MemoryStore(CONFIG)
    assert manager(store).acquire(preferred=N("10.5.77.0/24")).subnet == N("10.5.77.0/24")
    other = MemoryStore(CONFIG)
    create = other.create_lease

    def racing_create(lease, ttl):  # another host takes the subnet between our listing and our create
        other.data[lease.subnet] = peer(str(lease.subnet), "192.0.2.99")
        other.create_lease = create
        return create(lease, ttl)

    other.create_lease = racing_create
    won = manager(other).acquire()
    assert other.data[won.subnet].public_ip == "192.0.2.11" and len(other.data) == 2


def test_renew_takes_a_deleted_lease_again_on_the_same_subnet():
    store = MemoryStore(CONFIG)
    mgr = manager(store)
    lease = mgr.acquire()
    store.delete_lease(lease)
    assert mgr.renew().subnet == lease.subnet and lease.subnet in store.data


def test_a_reservation_without_ttl_stays_one():
    store = MemoryStore(CONFIG)
    store.data[N("10.5.9.0/24")] = Lease(N("10.5.9.0/24"), "192.0.2.11", "vxlan", {})
    lease = manager(store).acquire()
    assert lease.subnet == N("10.5.9.0/24") and lease.expiration is None
    assert manager(store).renew_due(margin=None) is None
    mgr = manager(store)
    mgr.acquire()
    mgr.backend_data = {"PublicKey": "new key", "Port": 51820}  # what `pyflannel rotate-key` publishes
    assert mgr.renew().expiration is None and store.data[N("10.5.9.0/24")].backend_data["PublicKey"] == "new key"


def test_the_watcher_turns_history_into_events_and_resyncs_after_compaction():
    store = MemoryStore(CONFIG)
    a = peer("10.5.1.0/24", "192.0.2.12")
    store.create_lease(a, 60)
    watcher = LeaseWatcher(store, {}, 1)
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(0)] == [(LeaseEvent.ADDED, a.subnet)]
    assert watcher.poll(0) == []
    store.delete_lease(a)
    b = peer("10.5.2.0/24", "192.0.2.13")
    store.create_lease(b, 60)
    store.compact()
    watcher.position = 1  # behind the compaction: the watcher re-lists and diffs
    events = watcher.poll(0)
    assert {(e.kind, e.lease.subnet) for e in events} == {(LeaseEvent.REMOVED, a.subnet), (LeaseEvent.ADDED, b.subnet)}
    assert set(watcher.known) == {b.subnet}


class ListingThatSkipsALease(MemoryStore):
    """The start race of etcd v2 before its fix: the listing's position was read after another host's lease was
    written, so that lease was in neither the listing nor the watch from there."""

    def leases(self):
        listed = list(self.data.values())
        self.create_lease(peer("10.5.7.0/24", "192.0.2.17"), 60)
        return listed, self.revision


def test_the_audit_finds_a_lease_the_watch_never_gave():
    store = ListingThatSkipsALease(CONFIG)
    listed, position = store.leases()
    watcher = LeaseWatcher(store, {}, position)
    assert listed == [] and watcher.poll(0) == []  # missed
    store.leases = lambda: MemoryStore.leases(store)
    assert watcher.audit() is False
    watcher.next_audit = 0
    watcher.audit_if_due()  # the next poll re-lists, and says what it found
    events = watcher.poll(0)
    assert [(e.kind, str(e.lease.subnet)) for e in events] == [(LeaseEvent.ADDED, "10.5.7.0/24")]
    assert watcher.take_missed() == events and watcher.take_missed() == []
    assert watcher.audit() is True and set(watcher.known) == {N("10.5.7.0/24")}


def test_the_audit_waits_for_changes_on_their_way_then_settles_them():
    store, now = MemoryStore(CONFIG), [0.0]
    watcher = LeaseWatcher(store, {}, store.revision, clock=lambda: now[0], rng=random.Random(1))
    store.create_lease(peer("10.5.1.0/24", "192.0.2.12"), 60)  # not polled yet: on its way, not missed
    watcher.audit_if_due()
    assert watcher.unsettled == 0  # not due before AUDIT_SOON_SECONDS
    now[0] = lease_module.AUDIT_SOON_SECONDS
    assert watcher.audit() is None
    watcher.audit_if_due()
    assert watcher.unsettled == 1 and not watcher.relist.is_set()
    assert [e.lease.subnet for e in watcher.poll(0)] == [N("10.5.1.0/24")]
    now[0] += lease_module.AUDIT_SOON_SECONDS
    watcher.audit_if_due()
    assert watcher.unsettled == 0 and not watcher.relist.is_set()  # delivered: they agree
    assert lease_module.AUDIT_SECONDS * 0.8 <= watcher.next_audit - now[0] <= lease_module.AUDIT_SECONDS * 1.2
    store.data.pop(N("10.5.1.0/24"))  # a removal the watch never gives: settled by a re-listing at last
    for _ in range(lease_module.AUDIT_TRIES):
        now[0] = watcher.next_audit
        watcher.audit_if_due()
    assert watcher.relist.is_set()
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(0)] == [(LeaseEvent.REMOVED, N("10.5.1.0/24"))]
    assert watcher.known == {}


# --- the VXLAN backend ---------------------------------------------------------------------------------------------

def vxlan(kernel, tmp_path, **extra) -> VxlanBackend:
    backend = VxlanBackend(parse(CONFIG if not extra else '{"Network": "10.5.0.0/16", "Backend": '
                                 '{"Type": "vxlan", "DirectRouting": true}}'), EXT, kernel, str(tmp_path))
    backend.prepare()
    return backend


def test_vxlan_device_is_created_once_with_a_kept_mac_and_replaced_when_it_differs(tmp_path):
    kernel = FakeKernel()
    first = vxlan(kernel, tmp_path)
    index = kernel.link_index("flannel.1")
    assert kernel.link(index)["IFLA_MTU"] == 1450 and kernel.link(index)["IFLA_ADDRESS"] == first.mac
    assert (tmp_path / "vtep-mac.1").read_text().strip() == first.mac
    again = vxlan(kernel, tmp_path)  # a restart: the same device, the same MAC
    assert (again.mac, kernel.link_index("flannel.1")) == (first.mac, index)
    kernel.links[index]["vxlan"]["IFLA_VXLAN_PORT"] = 4789  # changed by hand
    vxlan(kernel, tmp_path)
    assert kernel.link_index("flannel.1") != index and kernel.vxlan_attrs(kernel.link_index("flannel.1"))[
        "IFLA_VXLAN_PORT"] == 8472


def test_vxlan_entries_per_peer_and_direct_routing(tmp_path):
    backend = vxlan(FakeKernel(), tmp_path)
    i = backend.overlay_devices[0][0]
    entries = backend.entries_for(peer("10.5.3.0/24", "192.0.2.13", "0E:00:00:00:00:03"))
    assert entries.neighbor == Neighbor(i, "10.5.3.0", "0e:00:00:00:00:03")
    assert entries.fdb == FdbEntry(i, "0e:00:00:00:00:03", "192.0.2.13")
    assert entries.route == Route(N("10.5.3.0/24"), "10.5.3.0", i, onlink=True)
    assert backend.entries_for(Lease(N("10.5.4.0/24"), "192.0.2.14", "host-gw")) is None
    direct = vxlan(FakeKernel(), tmp_path, direct=True).entries_for(peer("10.5.3.0/24", "192.0.2.13"))
    assert direct.neighbor is None and direct.route.gateway == "192.0.2.13"


# --- the reconciler ------------------------------------------------------------------------------------------------

@pytest.fixture
def reconciler(tmp_path):
    kernel = FakeKernel()
    return Reconciler(kernel, vxlan(kernel, tmp_path), watch=lambda touched, index, stop: None)


def test_events_program_and_remove_one_peer_in_flannels_order(reconciler):
    k = reconciler.kernel
    p = peer("10.5.3.0/24", "192.0.2.13")
    reconciler.apply_peer(p)
    assert [type(c.entry).__name__ for c in k.applied[-1]] == ["Neighbor", "FdbEntry", "Route"]
    assert len(k.routes_) == len(k.neigh) == len(k.fdb_) == 1
    reconciler.apply_peer(p)  # the same lease again: nothing to do
    assert len(k.applied) == 1
    reconciler.remove_peer(p.subnet)
    assert [type(c.entry).__name__ for c in k.applied[-1]] == ["Route", "FdbEntry", "Neighbor"]
    assert not (k.routes_ or k.neigh or k.fdb_)


def test_a_full_diff_removes_stale_entries_and_restores_deleted_ones(reconciler):
    k = reconciler.kernel
    a, b = peer("10.5.3.0/24", "192.0.2.13"), peer("10.5.4.0/24", "192.0.2.14", "0e:00:00:00:00:04")
    reconciler.apply_peer(a)
    reconciler.apply_peer(b)
    k.routes_.discard(reconciler.programmed[a.subnet].route)  # deleted by hand
    repairs = reconciler.reconcile([a])  # b vanished while we were down
    assert repairs.added == {"route": 1} and repairs.removed == {"route": 1, "fdb": 1, "neighbor": 1}
    assert {r.dst for r in k.routes_} == {a.subnet}
    batches = len(k.applied)
    assert not reconciler.reconcile([a]) and len(k.applied) == batches  # nothing touched since: no dump, no change
    kept = reconciler.programmed[a.subnet]
    reconciler.kernel_touched.set()  # a deletion seen: a full diff, which keeps the entries it already holds
    assert not reconciler.reconcile([dataclasses.replace(a)]) and reconciler.programmed[a.subnet] is kept


def test_the_idle_pass_works_nothing_out_again_while_the_leases_are_those_programmed(reconciler):
    k = reconciler.kernel
    a, b = peer("10.5.3.0/24", "192.0.2.13"), peer("10.5.4.0/24", "192.0.2.14", "0e:00:00:00:00:04")
    unreachable = Lease(N("10.5.5.0/24"), "192.0.2.15", "host-gw")
    reconciler.reconcile([a, b, unreachable])
    worked_out = []
    entries_for = reconciler.backend.entries_for
    reconciler.backend.entries_for = lambda lease: worked_out.append(lease) or entries_for(lease)
    assert not reconciler.reconcile([a, b, unreachable]) and worked_out == []
    moved = peer("10.5.4.0/24", "192.0.2.24", "0e:00:00:00:00:24")  # b's subnet, now another host's: a new lease
    assert reconciler.reconcile([a, moved, unreachable]).added == {"neighbor": 1, "fdb": 1} and len(worked_out) == 3
    assert {f.dst for f in k.fdb_} == {"192.0.2.13", "192.0.2.24"}
    worked_out.clear()
    reconciler.remove_peer(a.subnet)  # an event: the next pass is a look-up again
    assert not reconciler.reconcile([moved, unreachable]) and worked_out == []
    relisted = [dataclasses.replace(moved), dataclasses.replace(unreachable)]  # equal leases, new objects
    assert not reconciler.reconcile(relisted) and len(worked_out) == 2
    assert not reconciler.reconcile(relisted) and len(worked_out) == 2  # and then a look-up again


def test_a_refused_change_forces_the_next_full_diff(reconciler):
    k = reconciler.kernel
    a = peer("10.5.3.0/24", "192.0.2.13")
    reconciler.reconcile([])
    k.refuse.add(reconciler.backend.entries_for(a).route)
    reconciler.apply_peer(a)
    assert reconciler.kernel_touched.is_set() and not k.routes_
    k.refuse.clear()
    assert reconciler.reconcile([a]).added == {"route": 1}


def test_a_stopped_manager_starts_no_etcd_call():
    store = MemoryStore(CONFIG)
    mgr = manager(store)
    mgr.acquire()
    store.delete_lease(mgr.lease)
    mgr.stop.set()
    with pytest.raises(Stopped):
        mgr.renew()  # would re-acquire the deleted lease
    with pytest.raises(Stopped):
        mgr.acquire()
    assert store.data == {}


def test_a_renewal_never_overwrites_another_hosts_lease_on_our_subnet():
    """Split brain: our lease lapsed while we were cut off and another host took the subnet; our renewal must not
    write over it (compare-and-swap on the value we wrote): we take another subnet."""
    store = MemoryStore(CONFIG)
    mgr = manager(store)
    ours = mgr.acquire().subnet
    store.data[ours] = peer(str(ours), "192.0.2.99")  # the other host's lease, on our old subnet
    new = mgr.renew()
    assert new.subnet != ours and store.data[ours].public_ip == "192.0.2.99"
    assert store.data[new.subnet].public_ip == "192.0.2.11"


# --- dual stack ------------------------------------------------------------------------------------------------------

N6 = ipaddress.IPv6Network
DUAL = '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}}'
EXT6 = ExternalInterface("eth0", 2, 1500, ipaddress.IPv4Interface("192.0.2.11/24"), "192.0.2.11",
                         ipaddress.IPv6Interface("2001:db8::11/64"), "2001:db8::11")


def dual_manager(store, config=DUAL, seed=1):
    return LeaseManager(store, parse(config), "192.0.2.11", "vxlan", {"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"},
                        rng=random.Random(seed), public_ipv6="2001:db8::11",
                        backend_v6_data={"VNI": 1, "VtepMAC": "0e:00:00:00:06:01"})


def test_dual_stack_lease_takes_both_subnets_and_prefers_the_old_ones():
    store = MemoryStore(DUAL)
    lease = dual_manager(store).acquire(N("10.5.7.0/24"), N6("fd00:5:0:7::/64"))
    assert (lease.subnet, lease.ipv6_subnet, lease.key) == (N("10.5.7.0/24"), N6("fd00:5:0:7::/64"),
                                                            "10.5.7.0-24&fd00:5:0:7::-64")
    assert lease.attrs_json() == ('{"PublicIP":"192.0.2.11","PublicIPv6":"2001:db8::11","BackendType":"vxlan",'
                                  '"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"},'
                                  '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}}')
    assert dual_manager(store, seed=5).acquire().key == lease.key  # our PublicIP's lease is reused
    taken = {lease.ipv6_subnet}
    for i in range(20):  # other hosts never get a taken IPv6 subnet
        other = LeaseManager(store, parse(DUAL), f"192.0.2.{100 + i}", "vxlan", None, rng=random.Random(i))
        got = other.acquire()
        assert got.ipv6_subnet not in taken and got.ipv6_subnet.subnet_of(N6("fd00:5::/48"))
        taken.add(got.ipv6_subnet)


def test_turning_ipv6_on_replaces_our_key_and_keeps_the_ipv4_subnet():
    store = MemoryStore(CONFIG)
    old = manager(store).acquire()
    new = dual_manager(store).acquire()
    assert new.subnet == old.subnet and new.ipv6_subnet is not None
    assert [lease.key for lease in store.leases()[0]] == [new.key]
    watcher = LeaseWatcher(store, {old.subnet: old}, 2)  # a peer that knew the old key
    events = [event for _ in range(2) for event in watcher.poll(0)]
    assert [(e.kind, e.lease.key) for e in events] == [(LeaseEvent.REMOVED, old.key), (LeaseEvent.ADDED, new.key)]
    assert watcher.known[old.subnet].key == new.key


def test_a_stale_removal_of_a_replaced_key_is_dropped():
    store = MemoryStore(DUAL)
    watcher = LeaseWatcher(store, {}, 0)
    dual = peer("10.5.3.0/24", "192.0.2.13")
    dual.ipv6_subnet = N6("fd00:5:0:3::/64")
    watcher.known[dual.subnet] = dual
    store._event(LeaseEvent.REMOVED, peer("10.5.3.0/24", "192.0.2.13"))  # the old IPv4-only key, deleted late
    assert watcher.poll(0) == [] and watcher.known[dual.subnet] is dual


@pytest.mark.parametrize("ext, device6, remote", [(EXT6, "flannel-v6.1", "2001:db8::13"),
                                                  (EXT, "flannel.1", "192.0.2.13")], ids=["v6-underlay", "v4-underlay"])
def test_vxlan_ipv6_entries_over_either_underlay(tmp_path, ext, device6, remote):
    kernel = FakeKernel()
    backend = VxlanBackend(parse(DUAL), ext, kernel, str(tmp_path))
    assert backend.prepare() is not None and backend.backend_v6_data["VNI"] == 1
    i6 = kernel.link_index(device6)
    assert backend.overlay_devices[-1] == (i6, 10) and backend.mtu == (1430 if ext is EXT6 else 1450)
    lease = Lease(N("10.5.3.0/24"), "192.0.2.13", "vxlan", {"VNI": 1, "VtepMAC": "0e:00:00:00:00:03"},
                  ipv6_subnet=N6("fd00:5:0:3::/64"), public_ipv6="2001:db8::13" if ext is EXT6 else None,
                  backend_v6_data={"VNI": 1, "VtepMAC": "0E:00:00:00:06:03"})
    entries = backend.entries_for(lease)
    assert entries.route6 == Route(N6("fd00:5:0:3::/64"), "fd00:5:0:3::", i6, onlink=True)
    assert entries.neighbor6 == Neighbor(i6, "fd00:5:0:3::", "0e:00:00:00:06:03")
    assert entries.fdb6 == FdbEntry(i6, "0e:00:00:00:06:03", remote)
    assert entries.in_order()[-3:] == [entries.neighbor6, entries.fdb6, entries.route6]
    reconciler = Reconciler(kernel, backend, watch=lambda touched, indexes, stop: None)
    reconciler.reconcile([lease])
    assert entries.route6 in kernel.routes(10) and entries.neighbor6 in kernel.neighbors(i6, 10)
    reconciler.reconcile([])
    assert kernel.routes(10) == set() and kernel.neighbors(i6, 10) == set()


class HungView:
    """A view whose member hangs: its watch never gives anything until released."""

    def __init__(self):
        self.release = threading.Event()

    def stream(self, position, idle):
        self.release.wait()
        return iter(())


class TwoViews(MemoryStore):
    """A store with several endpoints: it watches through a hung member and through itself."""

    def __init__(self, hung: HungView):
        super().__init__(CONFIG)
        self.hung = hung

    def watch_views(self):
        return [self.hung, self]


def test_the_feed_goes_on_through_the_other_member_when_one_hangs():
    hung, stop = HungView(), threading.Event()
    store = TwoViews(hung)
    names = []
    feed = Feed(store, stop, lambda network, changes: names.append((network, changes)), idle=0.1)
    try:
        subscription = feed.subscribe(DEFAULT_NETWORK)
        shop = feed.subscribe("shop")
        watcher = LeaseWatcher(store, {}, 1, subscription)
        store.create_lease(peer("10.5.3.0/24", "192.0.2.13"), 60)
        store.create_lease(peer("10.5.4.0/24", "192.0.2.14"), 60)
        store.put_keys("names/192.0.2.13", {"10.5.3.2": '{"names": ["web"], "address": "10.5.3.2"}'}, 60)
        store.put_keys("shop/names/192.0.2.13", {"10.60.3.2": '{"names": ["db"], "address": "10.60.3.2"}'}, 60)
        started = time.monotonic()
        events = []
        while len(events) < 2 and time.monotonic() - started < 5:
            events += watcher.poll(0.5)
        assert [e.lease.subnet for e in events] == [N("10.5.3.0/24"), N("10.5.4.0/24")]
        assert time.monotonic() - started < 1 and watcher.position == 3
        wait_until = time.monotonic() + 2
        while len(names) < 2 and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert [(network, [(c.key, c.revision) for c in changes]) for network, changes in names] == [
            (DEFAULT_NETWORK, [("192.0.2.13/10.5.3.2", 4)]), ("shop", [("192.0.2.13/10.60.3.2", 5)])]
        assert shop.watch_leases(0, 0.01) == ([], 0)  # nothing of the default network's leases went to shop
        assert watcher._take([store.history[0].lease], 2) == []  # a change the listing gave already: dropped
    finally:
        stop.set()
        hung.release.set()


class CompactedStore(MemoryStore):
    """A store whose history before its current revision is compacted, read first at revision 0: as a feed that
    comes back after a long break finds it."""

    def __init__(self):
        super().__init__(CONFIG)
        self.positions = [0]

    def current_position(self):
        return self.positions.pop() if self.positions else self.revision


def test_the_feed_tells_every_network_when_history_is_lost():
    stop = threading.Event()
    store = CompactedStore()
    store.create_lease(peer("10.5.3.0/24", "192.0.2.13"), 60)
    store.compact()
    lost = []
    feed = Feed(store, stop, lambda network, changes: lost.append(network) if changes is None else None, idle=0.05)
    try:
        subscription = feed.subscribe(DEFAULT_NETWORK)
        with pytest.raises(HistoryLost):
            subscription.watch_leases(0, 5)
        assert lost == [DEFAULT_NETWORK]
        watcher = LeaseWatcher(store, {}, 0, subscription)
        assert [e.lease.subnet for e in watcher.resync()] == [N("10.5.3.0/24")]
        store.create_lease(peer("10.5.4.0/24", "192.0.2.14"), 60)  # the feed goes on from the store's position
        assert [e.lease.subnet for e in watcher.poll(5)] == [N("10.5.4.0/24")]
    finally:
        stop.set()
