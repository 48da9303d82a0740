"""pyflanneld on a 3-host lab: leases, kernel programming and container traffic, for each backend."""
from __future__ import annotations

import ipaddress
import json
import re
import signal
import time
import urllib.error

import pytest

from lab import ping, wait_until

pytestmark = pytest.mark.lab

MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# the cross-host tests run against both etcd APIs; a v3 lab's etcd has the v2 API off (as etcd >= 3.5)
BOTH_APIS = pytest.mark.parametrize("etcd_api", ["v2", "v3"])


def start_hosts(make_lab, backend: dict, hosts: int = 3, etcd_api: str = "v2"):
    lab = make_lab(hosts, etcd_api=etcd_api)
    return lab.start_network({"Network": "10.5.0.0/16", "Backend": backend}, containers_per_host=2)


def kernel_entries(host) -> dict:
    return {
        "routes": host.sh("ip", "route", "show", "proto", "77"),
        "neigh": host.sh("ip", "neigh", "show", "dev", "flannel.1", check=False),
        "fdb": host.sh("bridge", "fdb", "show", "dev", "flannel.1", check=False),
    }


def all_pairs_ping(lab) -> list[tuple[str, str]]:
    failures = []
    for src_host in lab.hosts:
        for dst_host in lab.hosts:
            if dst_host is src_host:
                continue
            for src in src_host.containers:
                for dst in dst_host.containers:
                    if not ping(src.ns, dst.ip):
                        failures.append((src.ip, dst.ip))
    return failures


@pytest.mark.parametrize("backend, etcd_api", [({"Type": "vxlan"}, "v2"), ({"Type": "host-gw"}, "v2"),
                                               ({"Type": "vxlan"}, "v3")], ids=["vxlan", "host-gw", "vxlan-v3"])
def test_every_container_reaches_every_other_host(make_lab, backend, etcd_api):
    lab = start_hosts(make_lab, backend, etcd_api=etcd_api)
    leases = lab.leases()
    assert len(leases) == 3
    for host in lab.hosts:
        env = host.subnet_env()
        lease = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network
        assert ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).ip == lease.network_address + 1
        assert f"{lease.network_address}-{lease.prefixlen}" in leases
        expected_mtu = 1450 if backend["Type"] == "vxlan" else 1500
        assert env["FLANNEL_MTU"] == str(expected_mtu)
        # every other host's subnet is routed here
        routes = host.sh("ip", "route", "show", "proto", "77")
        for other in lab.hosts:
            if other is not host:
                other_lease = ipaddress.IPv4Interface(other.subnet_env()["FLANNEL_SUBNET"]).network
                assert str(other_lease) in routes
    failures = all_pairs_ping(lab)
    assert not failures, f"unreachable pairs: {failures}\n{lab.logs()}"
    pairs = len(lab.hosts) * 2 * (len(lab.hosts) - 1) * 2
    print(f"\n{backend['Type']}, etcd {etcd_api}: {pairs} cross-host container pairs ping")


@BOTH_APIS
def test_etcd_records_match_flannel_format(make_lab, etcd_api):
    lab = start_hosts(make_lab, {"Type": "vxlan", "VNI": 1}, hosts=2, etcd_api=etcd_api)
    for key, node in lab.leases().items():
        assert re.fullmatch(r"10\.5\.\d+\.0-24", key)
        # flannel's value: its key order, BackendData with VNI and VtepMAC; no PublicIPv6 without IPv6 (flannel
        # writes null there, which Go reads as the absent key)
        assert list(node["attrs"]) == ["PublicIP", "BackendType", "BackendData"]
        assert node["value"].startswith('{"PublicIP":"192.0.2.1')
        attrs = node["attrs"]
        assert attrs["BackendType"] == "vxlan"
        assert list(attrs["BackendData"]) == ["VNI", "VtepMAC"] and attrs["BackendData"]["VNI"] == 1
        assert MAC.match(attrs["BackendData"]["VtepMAC"])
        assert 23 * 3600 < node["ttl"] <= 24 * 3600  # v3: the TTL of the etcd lease the key is attached to
    if etcd_api == "v3":
        with pytest.raises(urllib.error.HTTPError, match="404"):
            lab.etcd_get("/v2/keys/")  # this etcd has no v2 API: the daemons found v3 by themselves
    for host in lab.hosts:
        text = host.subnet_file.read_text()
        assert re.fullmatch(r"FLANNEL_NETWORK=10\.5\.0\.0/16\nFLANNEL_SUBNET=10\.5\.\d+\.1/24\n"
                            r"FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", text)
        link = host.sh("ip", "-d", "link", "show", "flannel.1")
        assert "vxlan id 1 " in link and "dstport 8472" in link and "nolearning" in link
        assert "mtu 1450" in link


@BOTH_APIS
def test_removed_lease_clears_peer_entries_everywhere(make_lab, etcd_api):
    lab = start_hosts(make_lab, {"Type": "vxlan"}, etcd_api=etcd_api)
    gone = lab.hosts[2]
    gone_lease = ipaddress.IPv4Interface(gone.subnet_env()["FLANNEL_SUBNET"]).network
    gone_mac = lab.leases()[f"{gone_lease.network_address}-24"]["attrs"]["BackendData"]["VtepMAC"]
    gone.daemon.kill()
    started = time.monotonic()
    lab.etcd_delete(f"{lab.prefix_key}/subnets/{gone_lease.network_address}-24")
    for host in lab.hosts[:2]:
        wait_until(f"{gone_lease} gone from {host.name}", lambda: not any(
            str(gone_lease.network_address) in v or gone_mac in v for v in kernel_entries(host).values()))
    elapsed = time.monotonic() - started
    entries = kernel_entries(lab.hosts[0])
    assert str(ipaddress.IPv4Interface(lab.hosts[1].subnet_env()["FLANNEL_SUBNET"]).network) in entries["routes"]
    print(f"\netcd {etcd_api}: lease removal reached both peers' kernels in {elapsed * 1000:.0f} ms")


@BOTH_APIS
def test_new_lease_reaches_peers_quickly(make_lab, etcd_api):
    lab = start_hosts(make_lab, {"Type": "vxlan"}, hosts=2, etcd_api=etcd_api)
    mac = "0e:11:22:33:44:55"
    lease = json.dumps({"PublicIP": "192.0.2.99", "PublicIPv6": None, "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": mac}}, separators=(",", ":"))
    started = time.monotonic()
    lab.etcd_put(f"{lab.prefix_key}/subnets/10.5.250.0-24", lease, ttl=600)
    for host in lab.hosts:
        wait_until(f"fake peer on {host.name}", lambda: "10.5.250.0/24" in kernel_entries(host)["routes"]
                   and mac in kernel_entries(host)["fdb"] and mac in kernel_entries(host)["neigh"],
                   interval=0.002)
    elapsed = time.monotonic() - started
    fdb = kernel_entries(lab.hosts[0])["fdb"]
    assert f"{mac} dst 192.0.2.99 self permanent" in fdb
    assert "10.5.250.0/24 via 10.5.250.0 dev flannel.1 onlink" in kernel_entries(lab.hosts[0])["routes"]
    print(f"\netcd {etcd_api}: new lease programmed on 2 peers (route, neighbor, FDB) within {elapsed * 1000:.0f} ms "
          "of the etcd write")


@BOTH_APIS
def test_sigkill_restart_keeps_subnet_and_vtep_mac(make_lab, etcd_api):
    lab = start_hosts(make_lab, {"Type": "vxlan"}, hosts=2, etcd_api=etcd_api)
    host = lab.hosts[0]
    before_env = host.subnet_env()["FLANNEL_SUBNET"]
    before_mac = host.sh("cat", "/sys/class/net/flannel.1/address").strip()
    before_lease = {k: v["attrs"] for k, v in lab.leases().items()}
    host.daemon.kill(signal.SIGKILL)
    host.start_daemon()
    wait_until("restarted daemon ready", lambda: "reusing lease" in host.daemon.log()
               or "acquired lease" in host.daemon.log())
    assert host.subnet_env()["FLANNEL_SUBNET"] == before_env
    assert host.sh("cat", "/sys/class/net/flannel.1/address").strip() == before_mac
    assert {k: v["attrs"] for k, v in lab.leases().items()} == before_lease
    assert ping(host.containers[0].ns, lab.hosts[1].containers[0].ip)


def test_peer_gone_while_down_is_cleaned_at_start_and_hand_deletions_restored(make_lab):
    lab = start_hosts(make_lab, {"Type": "vxlan"})
    watcher, gone = lab.hosts[0], lab.hosts[2]
    gone_lease = ipaddress.IPv4Interface(gone.subnet_env()["FLANNEL_SUBNET"]).network
    watcher.daemon.kill(signal.SIGKILL)
    gone.daemon.kill(signal.SIGKILL)
    lab.etcd_request("DELETE", f"{lab.prefix_key}/subnets/{gone_lease.network_address}-24")
    assert str(gone_lease) in kernel_entries(watcher)["routes"]  # stale while the daemon is down
    watcher.start_daemon()
    wait_until("stale peer cleaned", lambda: str(gone_lease) not in kernel_entries(watcher)["routes"]
               and str(gone_lease.network_address) not in kernel_entries(watcher)["neigh"])
    # a hand-deleted route and FDB entry come back within one reconcile interval (default 10 s; 1 s here)
    watcher.daemon.kill(signal.SIGKILL)
    watcher.start_daemon("--reconcile-interval", "1")
    peer_lease = ipaddress.IPv4Interface(lab.hosts[1].subnet_env()["FLANNEL_SUBNET"]).network
    watcher.sh("ip", "route", "del", str(peer_lease))
    watcher.sh("bridge", "fdb", "del", kernel_entries(watcher)["fdb"].split()[0], "dev", "flannel.1")
    wait_until("route restored", lambda: str(peer_lease) in kernel_entries(watcher)["routes"], timeout=5)
    wait_until("fdb restored", lambda: "dst 192.0.2.12" in kernel_entries(watcher)["fdb"], timeout=5)


def test_direct_routing_uses_plain_routes_on_a_shared_segment(make_lab):
    lab = start_hosts(make_lab, {"Type": "vxlan", "DirectRouting": True}, hosts=2)
    h1, h2 = lab.hosts
    h2_lease = ipaddress.IPv4Interface(h2.subnet_env()["FLANNEL_SUBNET"]).network
    entries = kernel_entries(h1)
    assert f"{h2_lease} via 192.0.2.12 dev eth0" in entries["routes"]
    assert "dst 192.0.2.12" not in entries["fdb"] and not entries["neigh"].strip()
    assert ping(h1.containers[0].ns, h2.containers[1].ip)


@BOTH_APIS
def test_own_lease_deleted_is_taken_again_with_the_same_subnet(make_lab, etcd_api):
    lab = start_hosts(make_lab, {"Type": "vxlan"}, hosts=2, etcd_api=etcd_api)
    h1, h2 = lab.hosts
    key = ipaddress.IPv4Interface(h1.subnet_env()["FLANNEL_SUBNET"]).network
    key = f"{key.network_address}-{key.prefixlen}"
    before = lab.leases()[key]["attrs"]
    lab.etcd_delete(f"{lab.prefix_key}/subnets/{key}")
    wait_until("lease re-created", lambda: key in lab.leases(), timeout=10)
    assert lab.leases()[key]["attrs"] == before
    assert h1.daemon.alive()
    assert ping(h2.containers[0].ns, h1.containers[0].ip)


def test_own_lease_ttl_shortened_by_an_admin_is_renewed_at_once(make_lab):
    lab = start_hosts(make_lab, {"Type": "vxlan"}, hosts=1)
    key = ipaddress.IPv4Interface(lab.hosts[0].subnet_env()["FLANNEL_SUBNET"]).network
    key = f"{key.network_address}-{key.prefixlen}"
    lab.etcd_put(f"{lab.prefix_key}/subnets/{key}", lab.leases()[key]["value"], ttl=120)
    # 120 s is inside the renew margin (60 min): the daemon renews to a full 24 h at once
    wait_until("lease renewed to 24 h", lambda: lab.leases()[key]["ttl"] > 86000, timeout=10)
    print(f"TTL after the admin's 120 s: {lab.leases()[key]['ttl']} s")
