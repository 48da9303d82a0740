"""The etcd v3 store against a real etcd (loopback, v3 API): flannel >= 0.18's layout, CAS, etcd leases with TTL,
reservations, watch, compaction, failover; and -etcd-api's choice between v2 and v3."""
import ipaddress
import json
import os
import random
import signal
import subprocess
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease as EtcdLease

from pyflannel.daemon import flags as cli_flags
from pyflannel.daemon import store as stores
from pyflannel.daemon.config import parse
from pyflannel.daemon.lease import LeaseManager, LeaseWatcher
from pyflannel.daemon.main import main as daemon_main
from pyflannel.daemon.model.lease import EXPIRY_NOT_READ, Lease, LeaseEvent
from pyflannel.daemon.store.base import ConfigNotFound, HistoryLost, LeaseExists, LeaseNotFound, StoreError
from pyflannel.daemon.store.etcdv2 import EtcdV2Store
from pyflannel.daemon.store.etcdv3 import EtcdV3Store
from pyflannel.daemon.store.gateway import Gateway
from lab import VENV_BIN, wait_until
from tests.test_faults import make_certs

pytestmark = pytest.mark.lab

N = ipaddress.IPv4Network
DATA = {"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"}
CONFIG = '{"Network": "10.5.0.0/16"}'


@pytest.fixture
def etcd(etcd_url):
    """A plain etcd3gw client on the test etcd, to look at keys and etcd leases behind the store's back."""
    u = urlparse(etcd_url)
    return Etcd3Client(u.hostname, u.port)


@pytest.fixture
def store(etcd, etcd_url, etcd_prefix):
    etcd.put(f"{etcd_prefix}/config", CONFIG)
    return EtcdV3Store([etcd_url], etcd_prefix)


def manager(store, ip="192.0.2.11", seed=1):
    return LeaseManager(store, parse(CONFIG), ip, "vxlan", DATA, rng=random.Random(seed))


def raw(etcd, store, subnet) -> dict:
    """The key's value and metadata, plus `ttl`: its etcd lease's TTL (None when it has no etcd lease)."""
    found = etcd.get(f"{store.prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}", metadata=True)
    if not found:
        return {}
    value, meta = found[0]
    lease_id = int(meta.get("lease", 0))
    return {**meta, "value": json.loads(value), "ttl": EtcdLease(lease_id, etcd).ttl() if lease_id else None}


def etcd_lease_count(etcd) -> int:
    return len(etcd.post(etcd.get_url("/lease/leases"), json={}).get("leases", []))


def test_new_lease_is_a_key_on_an_etcd_lease_with_flannels_value(store, etcd):
    lease = manager(store).acquire()
    node = raw(etcd, store, lease.subnet)
    assert 86000 < node["ttl"] <= 86400
    assert node["value"] == {"PublicIP": "192.0.2.11", "BackendType": "vxlan", "BackendData": DATA}  # no PublicIPv6
    # the expiration comes from the etcd lease, in the write's answer and in a later listing
    for seen in (lease, store.leases()[0][0]):
        left = (seen.expiration - datetime.now(timezone.utc)).total_seconds()
        assert 86000 < left <= 86400


def test_daemon_store_reads_no_peer_expiry_but_knows_its_own(etcd, etcd_url, etcd_prefix):
    """pyflanneld's store: a listing costs one request, not one per etcd lease; reservations stay reservations."""
    etcd.put(f"{etcd_prefix}/config", CONFIG)
    writer = EtcdV3Store([etcd_url], etcd_prefix)
    writer.create_lease(Lease(N("10.5.7.0/24"), "192.0.2.12", "vxlan", DATA), 600)
    writer.create_lease(Lease(N("10.5.8.0/24"), "192.0.2.13", "vxlan", DATA), None)
    daemon_store = EtcdV3Store([etcd_url], etcd_prefix, read_expiry=False)
    ours = manager(daemon_store).acquire()
    assert 86000 < (ours.expiration - datetime.now(timezone.utc)).total_seconds() <= 86400
    by_subnet = {lease.subnet: lease.expiration for lease in daemon_store.leases()[0]}
    assert by_subnet[N("10.5.7.0/24")] == EXPIRY_NOT_READ
    assert by_subnet[N("10.5.8.0/24")] is None
    assert by_subnet[ours.subnet] == ours.expiration


def test_compare_and_swap_refuses_a_taken_subnet_and_revokes_its_etcd_lease(store, etcd):
    store.create_lease(Lease(N("10.5.3.0/24"), "192.0.2.11", "vxlan", DATA), 60)
    leases_before = etcd_lease_count(etcd)
    with pytest.raises(LeaseExists):
        store.create_lease(Lease(N("10.5.3.0/24"), "192.0.2.12", "vxlan", DATA), 60)
    assert raw(etcd, store, N("10.5.3.0/24"))["value"]["PublicIP"] == "192.0.2.11"
    assert etcd_lease_count(etcd) == leases_before


def test_update_renews_on_a_new_etcd_lease_and_a_gone_key_is_not_found(store, etcd):
    lease = store.create_lease(Lease(N("10.5.4.0/24"), "192.0.2.11", "vxlan", DATA), 60)
    first = raw(etcd, store, lease.subnet)
    lease.backend_data = {"VNI": 1, "VtepMAC": "0e:00:00:00:00:02"}
    store.update_lease(lease, 3600)
    second = raw(etcd, store, lease.subnet)
    assert second["lease"] != first["lease"] and 3500 < second["ttl"] <= 3600
    assert second["value"]["BackendData"]["VtepMAC"] == "0e:00:00:00:00:02"
    store.delete_lease(lease)
    assert raw(etcd, store, lease.subnet) == {}
    with pytest.raises(LeaseNotFound):
        store.update_lease(lease, 60)
    assert raw(etcd, store, lease.subnet) == {}


def test_reservation_without_etcd_lease_stays_a_reservation(store, etcd):
    etcd.put(f"{store.prefix}/subnets/10.5.9.0-24", json.dumps({"PublicIP": "192.0.2.11", "BackendType": "vxlan"}))
    assert store.leases()[0][0].expiration is None
    lease = manager(store).acquire()
    assert lease.subnet == N("10.5.9.0/24") and lease.expiration is None
    node = raw(etcd, store, lease.subnet)
    assert node["ttl"] is None and node["value"]["BackendData"] == DATA


def test_our_public_ips_lease_is_reused(store):
    first = manager(store).acquire()
    again = manager(store, seed=99).acquire(preferred=N("10.5.77.0/24"))
    assert again.subnet == first.subnet and len(store.leases()[0]) == 1


def test_expired_etcd_lease_removes_the_key_and_the_watch_says_so(store, etcd):
    _, position = store.leases()
    watcher = LeaseWatcher(store, {}, position)
    store.create_lease(Lease(N("10.5.5.0/24"), "192.0.2.12", "vxlan", DATA), 2)
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(timeout=5)] == [(LeaseEvent.ADDED, N("10.5.5.0/24"))]
    events = wait_until("the expiry event", lambda: watcher.poll(timeout=5), timeout=15)
    assert [(e.kind, e.lease.subnet) for e in events] == [(LeaseEvent.REMOVED, N("10.5.5.0/24"))]
    assert raw(etcd, store, N("10.5.5.0/24")) == {} and store.leases()[0] == []


def test_watch_events_idle_watch_and_other_keys(store, etcd):
    _, position = store.leases()
    assert store.watch_leases(position, timeout=0.3) == ([], position)
    watcher = LeaseWatcher(store, {}, position)
    peer = Lease(N("10.5.8.0/24"), "192.0.2.12", "vxlan", DATA)
    store.create_lease(peer, 60)
    events = watcher.poll(timeout=5)
    assert [(e.kind, e.lease.subnet, e.lease.vtep_mac, e.lease.public_ip) for e in events] == [
        (LeaseEvent.ADDED, peer.subnet, "0e:00:00:00:00:01", "192.0.2.12")]
    assert events[0].lease.expiration is not None
    store.delete_lease(peer)
    assert [(e.kind, e.lease.subnet) for e in watcher.poll(timeout=5)] == [(LeaseEvent.REMOVED, peer.subnet)]
    etcd.put(f"{store.prefix}/subnets/not-a-subnet", "x")
    moved = watcher.position
    assert watcher.poll(timeout=5) == [] and watcher.position > moved  # skipped, but the position moves on


def test_compaction_is_history_lost_and_the_watcher_relists(store, etcd):
    _, position = store.leases()
    watcher = LeaseWatcher(store, {}, position)
    gone = Lease(N("10.5.10.0/24"), "192.0.2.13", "vxlan", DATA)
    store.create_lease(gone, 60)
    store.delete_lease(gone)
    kept = store.create_lease(Lease(N("10.5.11.0/24"), "192.0.2.14", "vxlan", DATA), 60)
    _, now = store.leases()
    etcd.post(etcd.get_url("/kv/compaction"), json={"revision": now, "physical": True})
    with pytest.raises(HistoryLost, match="compacted"):
        store.watch_leases(position, timeout=5)
    events = watcher.poll(timeout=5)  # re-lists and diffs: only what exists now
    assert [(e.kind, e.lease.subnet) for e in events] == [(LeaseEvent.ADDED, kept.subnet)]
    assert watcher.position == now


def test_unreachable_etcd_is_a_store_error_and_the_next_endpoint_is_used(etcd_url, etcd_prefix, etcd):
    etcd.put(f"{etcd_prefix}/config", CONFIG)
    dead = "http://127.0.0.1:1"
    with pytest.raises(StoreError, match=r"etcd unreachable: http://127.0.0.1:1: \[Errno 111\] Connection refused"):
        EtcdV3Store([dead], etcd_prefix).network_config()
    with pytest.raises(StoreError, match="unreachable"):
        EtcdV3Store([dead], etcd_prefix).watch_leases(1, timeout=1)
    both = EtcdV3Store([dead, etcd_url], etcd_prefix)
    assert json.loads(both.network_config()) == json.loads(CONFIG)
    assert both.create_lease(Lease(N("10.5.12.0/24"), "192.0.2.15", "vxlan", DATA), 60).expiration is not None


def flags_for(etcd_url, prefix, api="auto"):
    return SimpleNamespace(etcd_endpoints=[etcd_url], etcd_prefix=prefix, etcd_certfile=None, etcd_keyfile=None,
                           etcd_cafile=None, etcd_username=None, etcd_password=None, etcd_api=api)


def test_auto_picks_the_api_that_holds_the_config(etcd_url, etcd_prefix, etcd):
    v2 = EtcdV2Store([etcd_url], etcd_prefix)
    in_v2 = stores.from_flags(flags_for(etcd_url, etcd_prefix + "/a"))
    v2.client.write(f"{etcd_prefix}/a/config", CONFIG)
    assert in_v2.leases() == ([], in_v2.leases()[1]) and in_v2.chosen is in_v2.v2
    in_v3 = stores.from_flags(flags_for(etcd_url, etcd_prefix + "/b"))
    etcd.put(f"{etcd_prefix}/b/config", CONFIG)
    v2.client.write(f"{etcd_prefix}/b/config", CONFIG)  # in both: v3 wins
    in_v3.network_config()
    assert in_v3.chosen is in_v3.v3
    # in neither yet: v3, and asked again until the config appears
    later = stores.from_flags(flags_for(etcd_url, etcd_prefix + "/c"))
    with pytest.raises(ConfigNotFound):
        later.network_config()
    assert later.chosen is None and later.store() is later.v3
    v2.client.write(f"{etcd_prefix}/c/config", CONFIG)
    assert json.loads(later.network_config()) == json.loads(CONFIG) and later.chosen is later.v2
    with pytest.raises(StoreError, match="etcd unreachable"):  # etcd down: said, and asked again next time
        stores.from_flags(flags_for("http://127.0.0.1:1", etcd_prefix)).network_config()


def test_explicit_api_and_bad_values(etcd_url, etcd_prefix, caplog):
    assert isinstance(stores.from_flags(flags_for(etcd_url, etcd_prefix, "v3")), EtcdV3Store)
    assert isinstance(stores.from_flags(flags_for(etcd_url, etcd_prefix, "v2")), EtcdV2Store)
    with pytest.raises(ValueError, match="-etcd-api: 'v4' is not one of auto, v2, v3"):
        stores.from_flags(flags_for(etcd_url, etcd_prefix, "v4"))
    assert cli_flags.parse([]).etcd_api == "auto"
    assert cli_flags.parse([], {"FLANNELD_ETCD_API": "v3"}).etcd_api == "v3"
    assert daemon_main(["--etcd-api", "3", "-etcd-endpoints", etcd_url]) == 1
    assert "-etcd-api: '3' is not one of auto, v2, v3" in caplog.text


def test_list_of_many_leases_with_etcd_lease_lookups(store):
    """Each etcd lease costs one TimeToLive request (as in flannel; etcd has no bulk call), then it is cached."""
    for i in range(200):
        store.create_lease(Lease(N(f"10.5.{i + 20}.0/24"), "192.0.2.20", "vxlan", DATA), 600)
    fresh = EtcdV3Store(store.endpoints, store.prefix)
    started = time.perf_counter()
    leases, _ = fresh.leases()
    cold = time.perf_counter() - started
    started = time.perf_counter()
    fresh.leases()
    warm = time.perf_counter() - started
    assert len(leases) == 200 and all(lease.expiration is not None for lease in leases)
    print(f"\nv3 listing of 200 leases: {cold * 1000:.0f} ms the first time (200 TTL lookups), "
          f"{warm * 1000:.0f} ms again (cached)")


def test_a_listing_larger_than_a_page_is_read_page_by_page_at_one_revision(store, etcd, monkeypatch):
    """Leases and names folders are read PAGE keys at a time, every page at the first page's revision: a key
    written while the pages are read is left to the watch, which starts after that revision."""
    import pyflannel.daemon.store.etcdv3 as etcdv3
    monkeypatch.setattr(etcdv3, "PAGE", 7)
    for i in range(30):
        store.create_lease(Lease(N(f"10.5.{i + 20}.0/24"), "192.0.2.20", "vxlan", DATA), None)
    store.put_keys("names/192.0.2.20", {f"10.5.20.{i}": f'{{"names": ["c{i}"]}}' for i in range(2, 25)}, 60)
    posts = []
    post = Gateway.post

    def counting(client, path, body):
        posts.extend([path] if path == "kv/range" else [])
        if len(posts) == 2 and path == "kv/range":  # before the second page: a key the listing must not see
            etcd.put(f"{store.prefix}/subnets/10.5.99.0-24", json.dumps({"PublicIP": "192.0.2.99"}))
        return post(client, path, body)
    monkeypatch.setattr(Gateway, "post", counting)
    leases, revision = store.leases()
    assert sorted(str(lease.subnet) for lease in leases) == sorted(f"10.5.{i + 20}.0/24" for i in range(30))
    assert len(posts) == 5 and revision < int(etcd.get(f"{store.prefix}/subnets/10.5.99.0-24", metadata=True)[0][1][
        "mod_revision"])
    posts.clear()
    folder, _ = store.list_folder("names")
    assert folder == {f"192.0.2.20/10.5.20.{i}": f'{{"names": ["c{i}"]}}' for i in range(2, 25)} and len(posts) == 4


# --- on the lab: etcd without the v2 API, with TLS client certificates and with username/password ------------------
def etcdctl(lab, *args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "netns", "exec", lab.switch, "etcdctl", "--endpoints", lab.etcd_url, *args],
                          capture_output=True, text=True, timeout=15, env={**os.environ, "ETCDCTL_API": "3"})
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout + done.stderr


def test_v3_only_etcd_with_tls_client_certificates(make_lab):
    lab = make_lab(2, etcd=False, etcd_api="v3")
    certs = make_certs(lab.workdir / "pki", "192.0.2.2")
    tls = ["--cacert", certs["ca.pem"], "--cert", certs["client.pem"], "--key", certs["client.key"]]
    lab.start_etcd("--cert-file", certs["server.pem"], "--key-file", certs["server.key"], "--client-cert-auth",
                   "--trusted-ca-file", certs["ca.pem"], scheme="https",
                   ready=lambda: "is healthy" in etcdctl(lab, *tls, "endpoint", "health", check=False))
    etcdctl(lab, *tls, "put", f"{lab.prefix_key}/config", '{"Network": "10.5.0.0/16"}')
    h1, h2 = lab.hosts
    tls_flags = ["-etcd-api", "v3", "-etcd-cafile", certs["ca.pem"], "-etcd-certfile", certs["client.pem"],
                 "-etcd-keyfile", certs["client.key"]]
    h1.start_daemon(*tls_flags)
    lease = ipaddress.IPv4Interface(h1.subnet_env()["FLANNEL_SUBNET"]).network
    keys = etcdctl(lab, *tls, "get", "--prefix", "--keys-only", f"{lab.prefix_key}/subnets/").split()
    assert keys == [f"{lab.prefix_key}/subnets/{lease.network_address}-24"]
    # `pyflannel status` reads the same etcd, and the lease's expiry from its etcd lease
    report = json.loads(h1.sh(str(VENV_BIN / "pyflannel"), "status", "--json", "-etcd-endpoints", lab.etcd_url,
                              "-subnet-file", str(h1.subnet_file), "-api-socket", str(h1.api_sock), *tls_flags))
    assert report["host"]["etcd"] == "reachable" and [h["subnet"] for h in report["hosts"]] == [str(lease)]
    assert 23 * 3600 < int(report["hosts"][0]["expires_in"].rstrip("s")) <= 24 * 3600
    # without a client certificate the same etcd refuses, and the daemon says why instead of leasing
    bare = h2.start_daemon("-etcd-api", "v3", "-etcd-cafile", certs["ca.pem"], wait_ready=False)
    wait_until("a retry message", lambda: "retrying in" in bare.log(), timeout=15)
    assert not h2.subnet_file.exists() and "Traceback" not in bare.log() and "etcd unreachable" in bare.log()
    print(f"\netcd v3 only, TLS client certificates: lease {lease}; without a certificate: refused")


def test_v3_auth_with_expiring_tokens_and_a_wrong_password(make_lab):
    lab = make_lab(2, etcd=False, etcd_api="v3")
    lab.start_etcd("--auth-token-ttl", "1")  # simple tokens die after 1 s unused: the daemon must log in again
    lab.set_config()
    etcdctl(lab, "user", "add", "root:s3cret")
    etcdctl(lab, "auth", "enable")
    h1, h2 = lab.hosts
    h1.start_daemon("-etcd-username", "root", "-etcd-password", "s3cret")
    denied = h2.start_daemon("-etcd-username", "root", "-etcd-password", "wrong", wait_ready=False)
    time.sleep(3)  # h1's token expires while its watch waits
    etcdctl(lab, "--user", "root:s3cret", "put", f"{lab.prefix_key}/subnets/10.5.252.0-24", json.dumps(
        {"PublicIP": "192.0.2.99", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0e:aa:bb:cc:dd:01"}}))
    wait_until("the peer written after the token expired", lambda: "10.5.252.0/24" in h1.sh(
        "ip", "route", "show", "proto", "77"), timeout=10)
    assert "retrying" not in h1.daemon.log() and "Traceback" not in h1.daemon.log()
    wait_until("the wrong password to be reported", lambda: "authentication failed" in denied.log(), timeout=15)
    assert not h2.subnet_file.exists() and "Traceback" not in denied.log()
    # SIGTERM while the v3 watch waits: the daemon stops cleanly, the watch does not hold it
    os.kill(h1.daemon.pid, signal.SIGTERM)
    assert h1.daemon.popen.wait(timeout=10) == 0 and "stopped; kernel state and lease kept" in h1.daemon.log()
    print("\netcd v3 with auth: lease acquired, a peer seen after the 1 s token expired; wrong password refused")
