"""Lease acquisition and watching against a real etcd (v2 API): flannel's order, CAS, TTLs, re-acquiring."""
import ipaddress
import json
import random
import time
from urllib.parse import urlparse

import pytest
from etcd3gw.client import Etcd3Client

from pyflannel.daemon.config import parse
from pyflannel.daemon.errors import NoFreeSubnet
from pyflannel.daemon.lease import LeaseManager, LeaseWatcher
from pyflannel.daemon.model.lease import Lease, LeaseEvent
from pyflannel.daemon.store.base import LeaseExists, LeaseNotFound, LeaseTaken, StoreError
from pyflannel.daemon.store.etcdv2 import EtcdV2Store
from pyflannel.daemon.store.etcdv3 import EtcdV3Store

pytestmark = pytest.mark.lab

N = ipaddress.IPv4Network
DATA = {"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"}


@pytest.fixture
def store(etcd_url, etcd_prefix):
    s = EtcdV2Store([etcd_url], etcd_prefix)
    s.client.write(f"{etcd_prefix}/config", '{"Network": "10.5.0.0/16"}')
    return s


def manager(store, ip="192.0.2.11", config='{"Network": "10.5.0.0/16"}', seed=1):
    return LeaseManager(store, parse(config), ip, "vxlan", DATA, rng=random.Random(seed))


def raw(store, subnet):
    return store.client.read(f"{store.prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}")


def test_new_lease_is_created_with_ttl_and_flannel_value(store):
    lease = manager(store).acquire()
    node = raw(store, lease.subnet)
    assert 86000 < node.ttl <= 86400
    # flannel's LeaseAttrs with no IPv6: no PublicIPv6 key (flannel writes null; Go reads both as nil)
    assert node.value == json.dumps({"PublicIP": "192.0.2.11", "BackendType": "vxlan", "BackendData": DATA},
                                    separators=(",", ":"))
    assert lease.subnet.prefixlen == 24 and lease.subnet.subnet_of(N("10.5.0.0/16"))
    assert lease.subnet != N("10.5.0.0/24")  # SubnetMin skips the first subnet


def test_our_public_ips_lease_is_reused_before_the_subnet_file(store):
    first = manager(store).acquire()
    again = manager(store, seed=99).acquire(preferred=N("10.5.77.0/24"))
    assert again.subnet == first.subnet
    assert len(store.leases()[0]) == 1


def test_previous_subnet_file_is_used_when_free_and_in_range(store):
    assert manager(store).acquire(preferred=N("10.5.77.0/24")).subnet == N("10.5.77.0/24")
    other = manager(store, ip="192.0.2.12").acquire(preferred=N("10.5.77.0/24"))
    assert other.subnet != N("10.5.77.0/24")  # taken: a random free one instead
    out_of_range = manager(store, ip="192.0.2.13").acquire(preferred=N("10.6.1.0/24"))
    assert out_of_range.subnet.subnet_of(N("10.5.0.0/16"))


def test_reservation_without_ttl_stays_a_reservation(store):
    key = f"{store.prefix}/subnets/10.5.9.0-24"
    store.client.write(key, json.dumps({"PublicIP": "192.0.2.11", "BackendType": "vxlan"}))
    lease = manager(store).acquire()
    assert lease.subnet == N("10.5.9.0/24")
    node = store.client.read(key)
    assert node.ttl is None and json.loads(node.value)["BackendData"] == DATA


def test_compare_and_swap_refuses_a_taken_subnet(store):
    lease = Lease(N("10.5.3.0/24"), "192.0.2.11", "vxlan", DATA)
    store.create_lease(lease, 60)
    with pytest.raises(LeaseExists):
        store.create_lease(Lease(N("10.5.3.0/24"), "192.0.2.12", "vxlan", DATA), 60)
    assert json.loads(raw(store, N("10.5.3.0/24")).value)["PublicIP"] == "192.0.2.11"


def test_no_free_subnet_is_a_clear_error(store):
    config = '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.2.0"}'
    manager(store, "192.0.2.11", config).acquire()
    manager(store, "192.0.2.12", config).acquire()
    with pytest.raises(NoFreeSubnet, match="no free subnet: all 2 leases between SubnetMin 10.5.1.0 and "
                                           "SubnetMax 10.5.2.0 are taken"):
        manager(store, "192.0.2.13", config).acquire()


def test_lost_lease_is_taken_again_with_the_same_subnet(store):
    m = manager(store)
    lease = m.acquire()
    store.delete_lease(lease)
    assert m.renew().subnet == lease.subnet
    assert json.loads(raw(store, lease.subnet).value)["PublicIP"] == "192.0.2.11"


def test_watcher_sees_adds_and_removals_and_resyncs_after_history_loss(store):
    leases, position = store.leases()
    watcher = LeaseWatcher(store, {}, position)
    peer = Lease(N("10.5.8.0/24"), "192.0.2.12", "vxlan", DATA)
    store.create_lease(peer, 60)
    events = watcher.poll(timeout=5)
    assert [(e.kind, e.lease.subnet, e.lease.vtep_mac) for e in events] == [
        (LeaseEvent.ADDED, peer.subnet, "0e:00:00:00:00:01")]
    store.delete_lease(peer)
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(timeout=5)] == [(LeaseEvent.REMOVED, peer.subnet)]
    # a position older than etcd's 1000-event window: re-list and diff instead of missing events
    other = Lease(N("10.5.9.0/24"), "192.0.2.13", "vxlan", DATA)
    store.create_lease(other, 60)
    for i in range(1001):
        store.client.write(f"{store.prefix}/noise", str(i))
    watcher.position = position
    events = watcher.poll(timeout=5)
    assert [(e.kind, e.lease.subnet) for e in events] == [(LeaseEvent.ADDED, other.subnet)]


def test_idle_watch_returns_no_events(store):
    _, position = store.leases()
    assert store.watch_leases(position, timeout=0.3) == ([], position)


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_a_create_whose_reply_was_lost_is_found_again_not_leaked(etcd_url, etcd_prefix, api):
    """etcd applied our create but the connection broke before its reply (etcd restarted, a reset): the next
    acquire finds that lease by our PublicIP and keeps it; no second lease is left behind for 24 h."""
    store = api_store(api, etcd_url, etcd_prefix)
    create = store.create_lease

    def create_then_lose_the_reply(lease, ttl):
        create(lease, ttl)
        raise StoreError("etcd: connection reset by peer")

    store.create_lease = create_then_lose_the_reply
    mgr = manager(store)
    with pytest.raises(StoreError):
        mgr.acquire()
    store.create_lease = create
    lease = manager(store, seed=7).acquire()
    leases = store.leases()[0]
    assert [l.subnet for l in leases] == [lease.subnet] and leases[0].public_ip == "192.0.2.11"


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_renewal_is_a_compare_and_swap_on_what_we_wrote(etcd_url, etcd_prefix, api):
    """A renewal writes only over the value we wrote: another host's value on our subnet gives LeaseTaken and stays."""
    store = EtcdV2Store([etcd_url], etcd_prefix) if api == "v2" else EtcdV3Store([etcd_url], etcd_prefix)
    ours = Lease(N("10.5.7.0/24"), "192.0.2.11", "vxlan", DATA)
    store.create_lease(ours, 60)
    written = ours.attrs_json()
    store.update_lease(Lease(N("10.5.7.0/24"), "192.0.2.11", "vxlan", DATA), 120, expected=written)  # ours: fine
    theirs = Lease(N("10.5.7.0/24"), "192.0.2.99", "vxlan", DATA)
    store.delete_lease(ours)
    store.create_lease(theirs, 60)
    with pytest.raises(LeaseTaken):
        store.update_lease(Lease(N("10.5.7.0/24"), "192.0.2.11", "vxlan", DATA), 120, expected=written)
    assert [l.public_ip for l in store.leases()[0]] == ["192.0.2.99"]
    store.delete_lease(ours)
    with pytest.raises(LeaseNotFound):
        store.update_lease(Lease(N("10.5.7.0/24"), "192.0.2.11", "vxlan", DATA), 120, expected=written)


def api_store(api: str, etcd_url: str, prefix: str):
    """A store of `api` on a prefix whose network config exists and that has no lease folder yet (a fresh network)."""
    store = EtcdV2Store([etcd_url], prefix) if api == "v2" else EtcdV3Store([etcd_url], prefix)
    if api == "v2":
        store.client.write(f"{prefix}/config", '{"Network": "10.5.0.0/16"}')
    else:
        u = urlparse(etcd_url)
        Etcd3Client(u.hostname, u.port).put(f"{prefix}/config", '{"Network": "10.5.0.0/16"}')
    return store


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_a_lease_written_just_after_the_listing_comes_from_the_watch(etcd_url, etcd_prefix, api):
    """The start race (issue 25): another host's lease is written the moment the listing's read is answered, on a
    fresh network (no lease folder). The watch from the listing's position must give it; etcd v2 used to take
    that position from a second read, after the lease."""
    store = api_store(api, etcd_url, etcd_prefix)
    other = EtcdV2Store([etcd_url], etcd_prefix) if api == "v2" else EtcdV3Store([etcd_url], etcd_prefix)
    theirs = Lease(N("10.5.7.0/24"), "192.0.2.17", "vxlan", DATA)
    reads = []

    def then_another_host_writes(read):
        def racing(*args, **kwargs):
            try:
                return read(*args, **kwargs)
            finally:
                if not reads:
                    reads.append(args)
                    other.create_lease(theirs, 60)
        return racing

    if api == "v2":
        store.client.read = then_another_host_writes(store.client.read)
    else:
        store._range = then_another_host_writes(store._range)
    listed, position = store.leases()
    assert listed == [] and len(reads) == 1
    watcher = LeaseWatcher(store, {}, position)
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(timeout=5)] == [(LeaseEvent.ADDED, theirs.subnet)]
    assert watcher.audit() is True


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_the_audit_finds_what_a_watch_skipped_on_real_etcd(etcd_url, etcd_prefix, api):
    """The safety net against etcd: a watcher moved past a lease it never saw re-lists and gives it; one that has
    seen everything agrees with one cheap read."""
    store = api_store(api, etcd_url, etcd_prefix)
    ours = Lease(N("10.5.1.0/24"), "192.0.2.11", "vxlan", DATA)
    store.create_lease(ours, 60)
    _, position = store.leases()
    watcher = LeaseWatcher(store, {ours.subnet: ours}, position)
    assert store.lease_digest().count == 1 and watcher.audit() is True
    skipped = Lease(N("10.5.2.0/24"), "192.0.2.12", "vxlan", DATA)
    store.create_lease(skipped, 60)
    assert watcher.audit() is None  # on its way: the watch has not given it yet
    watcher.position = store.leases()[1]  # as if the watch had moved past it without a word
    assert watcher.audit() is False
    watcher.next_audit = 0
    watcher.audit_if_due()
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(timeout=1)] == [(LeaseEvent.ADDED, skipped.subnet)]
    assert [e.lease.subnet for e in watcher.take_missed()] == [skipped.subnet]
    digest = store.lease_digest()
    assert digest.count == 2 and 0 < digest.last_modified <= watcher.position


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_names_live_with_the_host_without_being_rewritten(etcd_url, etcd_prefix, api):
    """Issue 27: a host's names in two networks, kept alive past their TTL with no write and no watch event (v3: one
    etcd lease for both networks, one keep-alive), a change writes only its key, and when the keep-alives stop the
    names go a TTL later."""
    store = api_store(api, etcd_url, etcd_prefix)
    shop = store.child("shop")
    store.put_keys("names/192.0.2.11", {"10.5.1.2": "a", "10.5.1.3": "b"}, 3)
    shop.put_keys("names/192.0.2.11", {"10.60.1.2": "c"}, 3)
    folder, position = store.list_folder("names")
    assert folder == {"192.0.2.11/10.5.1.2": "a", "192.0.2.11/10.5.1.3": "b"}
    for _ in range(5):
        time.sleep(1)
        assert store.keep_alive("names/192.0.2.11", 3) and shop.keep_alive("names/192.0.2.11", 3)
    assert list(store.stream(position, 0.5)) == []  # 5 s past the TTL: nothing written, no watch event
    assert shop.list_folder("names")[0] == {"192.0.2.11/10.60.1.2": "c"}
    store.put_keys("names/192.0.2.11", {"10.5.1.3": None}, 3)
    changes = next(store.stream(position, 5))
    assert [(c.key, c.value) for c in changes] == [("names/192.0.2.11/10.5.1.3", None)]
    time.sleep(4.5)  # no keep-alive: the TTL runs out
    assert store.list_folder("names")[0] == {} and shop.list_folder("names")[0] == {}
    assert not store.keep_alive("names/192.0.2.11", 3)
