"""The CNI plugin's pure logic for dual stack (issue 17): the delegate flannel builds from a dual-stack or IPv6-only
subnet.env, which delegates are done natively, two-range bridge configs, and host-local's files for two range sets,
also as the stock /usr/lib/cni/host-local writes and reads them. Files only: no root, no namespaces, no etcd."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import pytest

from pyflannel import subnetenv
from pyflannel.addresses import AddressRange, RangeError
from pyflannel.cni import bridge, netconf
from pyflannel.cni.hostlocal import HostLocalStore, address_range
from pyflannel.cni.protocol import ADDRESSES_EXHAUSTED, ALREADY_ATTACHED, INVALID_CONFIG, CniError, render_result

pytestmark = pytest.mark.unit

DUAL_ENV = """FLANNEL_NETWORK=10.5.0.0/16
FLANNEL_SUBNET=10.5.34.1/24
FLANNEL_IPV6_NETWORK=fd00:5::/48
FLANNEL_IPV6_SUBNET=fd00:5:0:27::1/64
FLANNEL_MTU=1430
FLANNEL_IPMASQ=true
"""
IPV6_ONLY_ENV = "\n".join(line for line in DUAL_ENV.splitlines() if "IPV6" in line or "MTU" in line or "MASQ" in line)
STOCK_HOST_LOCAL = "/usr/lib/cni/host-local"


def conflist_entry(**extra) -> netconf.FlannelConf:
    return netconf.parse({"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel", **extra})


def test_the_dual_stack_delegate_is_flannels():
    """flannel's cni-plugin getDelegateIPAM: a range set per family (the leases' networks), the conflist's own
    routes first, then one to FLANNEL_NETWORK and one to FLANNEL_IPV6_NETWORK."""
    conf = conflist_entry(ipam={"routes": [{"dst": "192.168.0.0/16"}]})
    delegate = netconf.build_delegate(conf, subnetenv.parse(DUAL_ENV))
    assert delegate == {
        "name": "pfnet", "cniVersion": "1.0.0", "type": "bridge", "ipMasq": False, "mtu": 1430, "isGateway": True,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.5.34.0/24"}], [{"subnet": "fd00:5:0:27::/64"}]],
                 "routes": [{"dst": "192.168.0.0/16"}, {"dst": "10.5.0.0/16"}, {"dst": "fd00:5::/48"}]}}
    assert netconf.why_not_native(delegate) is None
    only6 = netconf.build_delegate(conflist_entry(), subnetenv.parse(IPV6_ONLY_ENV))
    assert only6["ipam"]["ranges"] == [[{"subnet": "fd00:5:0:27::/64"}]]
    assert only6["ipam"]["routes"] == [{"dst": "fd00:5::/48"}]
    assert netconf.why_not_native(only6) is None
    ipv4 = netconf.build_delegate(conflist_entry(), subnetenv.parse(DUAL_ENV.split("FLANNEL_IPV6_NETWORK")[0]))
    assert ipv4["ipam"]["ranges"] == [[{"subnet": "10.5.34.0/24"}]] and ipv4["ipam"]["routes"] == [
        {"dst": "10.5.0.0/16"}]


@pytest.mark.parametrize("ranges, why", [
    ([[{"subnet": "10.5.34.0/24"}], [{"subnet": "10.6.34.0/24"}]], "two ranges of one address family"),
    ([[{"subnet": "fd00:5::/64"}], [{"subnet": "fd00:6::/64"}]], "two ranges of one address family"),
    ([[{"subnet": "10.5.34.0/24"}, {"subnet": "10.5.35.0/24"}]], "other than one range"),
    ([[{"subnet": "10.5.34.0/24"}], [{"subnet": "fd00:5::/64"}], [{"subnet": "10.6.0.0/24"}]], "other than one"),
])
def test_range_sets_the_native_attach_does_not_do_go_to_the_stock_plugin(ranges, why):
    delegate = {"type": "bridge", "name": "n", "isGateway": True, "ipam": {"type": "host-local", "ranges": ranges}}
    assert why in netconf.why_not_native(delegate)


def dual_delegate(**ipam) -> dict:
    return {"type": "bridge", "name": "pfnet", "isGateway": True, "isDefaultGateway": True, "mtu": 1430,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.5.34.0/24"}], [{"subnet": "fd00:5:0:27::/64"}]],
                     "routes": [{"dst": "10.5.0.0/16"}, {"dst": "fd00:5::/48"}], **ipam}}


def test_a_two_range_bridge_config_routes_each_family_via_its_gateway():
    conf = bridge.BridgeConf.from_delegate(dual_delegate())
    assert [str(g) for g in conf.gateways] == ["10.5.34.1/24", "fd00:5:0:27::1/64"] and conf.ipv6
    assert [(str(r.dst), str(r.gw)) for r in conf.routes] == [
        ("10.5.0.0/16", "10.5.34.1"), ("fd00:5::/48", "fd00:5:0:27::1"),
        ("0.0.0.0/0", "10.5.34.1"), ("::/0", "fd00:5:0:27::1")]  # isDefaultGateway: a default route per family
    assert conf.ranges[1].end == ipaddress.ip_address("fd00:5:0:27:ffff:ffff:ffff:ffff")  # host-local's IPv6 end
    only6 = bridge.BridgeConf.from_delegate({**dual_delegate(), "ipam": {
        "type": "host-local", "ranges": [[{"subnet": "fd00:5:0:27::/64"}]], "routes": [{"dst": "fd00:5::/48"}]}})
    assert [str(g) for g in only6.gateways] == ["fd00:5:0:27::1/64"]
    assert [str(r.dst) for r in only6.routes] == ["fd00:5::/48", "::/0"]


@pytest.mark.parametrize("ipam, text", [
    ({"ranges": [[{"subnet": "10.5.34.0/24"}]], "routes": [{"dst": "fd00:5::/48"}]}, "no IPv6 gateway for it"),
    ({"routes": [{"dst": "fd00:5::/48", "gw": "10.5.34.1"}]}, "its gw is of the other family"),
    ({"routes": [{"dst": "fd00:5::/480"}]}, "is not a route"),
    ({"ranges": [[{"subnet": "10.5.34.0/24"}], [{"subnet": "fd00:5:0:27::/127"}]]}, "too small"),
    ({"ranges": [[{"subnet": "10.5.34.0/24"}], [{"subnet": "fd00:5:0:27::1/64"}]]}, "not an IPv4 or IPv6 subnet"),
    ({"ranges": [[{"subnet": "fd00:5:0:27::/64", "gateway": "10.5.34.1"}]]}, "gateway 10.5.34.1 is outside"),
])
def test_a_bad_two_range_config_is_a_clear_error(ipam, text):
    with pytest.raises(CniError) as e:
        bridge.BridgeConf.from_delegate(dual_delegate(**ipam))
    assert e.value.code == INVALID_CONFIG and text in e.value.msg, e.value.msg


def test_results_for_older_cni_versions_say_each_ips_version():
    ips = [{"address": "10.5.34.2/24", "gateway": "10.5.34.1", "interface": 2},
           {"address": "fd00:5:0:27::2/64", "gateway": "fd00:5:0:27::1", "interface": 2}]
    old = render_result({"ips": ips}, "0.4.0")
    assert [ip["version"] for ip in old["ips"]] == ["4", "6"]


def test_ipv6_ranges_end_at_the_last_address_and_a_foreign_last_address_restarts():
    six = AddressRange.of(ipaddress.IPv6Network("fd00:5:0:27::/126"))
    assert [str(ip) for ip in six.candidates(None)] == ["fd00:5:0:27::2", "fd00:5:0:27::3"]  # ::1 is the gateway
    # last_reserved_ip of the other family (the range sets changed order): start at the beginning, as host-local
    assert [str(ip) for ip in six.candidates(ipaddress.ip_address("10.5.34.9"))][0] == "fd00:5:0:27::2"
    with pytest.raises(RangeError, match="too small"):
        AddressRange.of(ipaddress.IPv6Network("fd00:5:0:27::/127"))


def ranges(*subnets: str) -> tuple[AddressRange, ...]:
    return tuple(address_range({"subnet": s}) for s in subnets)


def test_two_range_sets_in_host_locals_layout(tmp_path):
    dual = ranges("10.5.34.0/29", "fd00:5:0:27::/64")
    with HostLocalStore(str(tmp_path), "pfnet") as store:
        first = store.allocate("c1", "eth0", dual)
        second = store.allocate("c2", "eth0", dual)
        assert [str(ip) for ip in first + second] == ["10.5.34.2", "fd00:5:0:27::2", "10.5.34.3", "fd00:5:0:27::3"]
        with pytest.raises(CniError) as e:
            store.allocate("c1", "eth0", dual)
        assert e.value.code == ALREADY_ATTACHED and "10.5.34.2, fd00:5:0:27::2" in e.value.msg
        assert store.addresses_of("c2", "eth0") == second
    folder = tmp_path / "pfnet"
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files == {"lock": b"", "10.5.34.2": b"c1\r\neth0", "fd00:5:0:27::2": b"c1\r\neth0",
                     "10.5.34.3": b"c2\r\neth0", "fd00:5:0:27::3": b"c2\r\neth0",
                     "last_reserved_ip.0": b"10.5.34.3", "last_reserved_ip.1": b"fd00:5:0:27::3"}
    with HostLocalStore(str(tmp_path), "pfnet") as store:
        assert sorted(map(str, store.release("c1", "eth0"))) == ["10.5.34.2", "fd00:5:0:27::2"]
    assert sorted(p.name for p in folder.iterdir() if p.name[0] in "1f") == ["10.5.34.3", "fd00:5:0:27::3"]


def test_a_full_range_set_gives_nothing_of_the_other(tmp_path):
    """All or none: when the IPv6 range is full, the IPv4 address just taken is given back."""
    tight = ranges("10.5.34.0/29", "fd00:5:0:27::/126")  # IPv6: ::2 and ::3 only
    with HostLocalStore(str(tmp_path), "pfnet") as store:
        store.allocate("c1", "eth0", tight)
        store.allocate("c2", "eth0", tight)
        with pytest.raises(CniError) as e:
            store.allocate("c3", "eth0", tight)
        assert e.value.code == ADDRESSES_EXHAUSTED and "fd00:5:0:27::/126" in e.value.msg
        assert store.addresses_of("c3", "eth0") == []


def stock_host_local(command: str, container_id: str, data_dir, subnets: list[str]) -> dict | None:
    config = {"cniVersion": "1.0.0", "name": "pfnet", "type": "bridge",
              "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": s}] for s in subnets]}}
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
           "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    done = subprocess.run([STOCK_HOST_LOCAL], input=json.dumps(config).encode(), env=env, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done
    return json.loads(done.stdout) if done.stdout.strip() else None


@pytest.mark.skipif(not os.access(STOCK_HOST_LOCAL, os.X_OK), reason="containernetworking-plugins not installed")
def test_our_files_and_the_stock_host_locals_for_both_ranges(tmp_path):
    """The stock host-local (containernetworking-plugins) and ours share the folder for two range sets: neither
    hands out the other's addresses, each continues after the other's last_reserved_ip.N, each releases the other's
    files."""
    subnets = ["10.5.34.0/24", "fd00:5:0:27::/64"]
    stock = stock_host_local("ADD", "stock1", tmp_path, subnets)
    assert [ip["address"] for ip in stock["ips"]] == ["10.5.34.2/24", "fd00:5:0:27::2/64"]
    assert [ip["gateway"] for ip in stock["ips"]] == ["10.5.34.1", "fd00:5:0:27::1"]
    with HostLocalStore(str(tmp_path), "pfnet") as store:
        assert [str(ip) for ip in store.addresses_of("stock1", "eth0")] == ["10.5.34.2", "fd00:5:0:27::2"]
        ours = store.allocate("ours1", "eth0", ranges(*subnets))
    assert [str(ip) for ip in ours] == ["10.5.34.3", "fd00:5:0:27::3"]  # after the stock plugin's last addresses
    stock = stock_host_local("ADD", "stock2", tmp_path, subnets)
    assert [ip["address"] for ip in stock["ips"]] == ["10.5.34.4/24", "fd00:5:0:27::4/64"]  # after ours
    stock_host_local("DEL", "ours1", tmp_path, subnets)  # the stock plugin releases what we wrote
    with HostLocalStore(str(tmp_path), "pfnet") as store:
        assert store.addresses_of("ours1", "eth0") == []
        assert sorted(map(str, store.release("stock2", "eth0"))) == ["10.5.34.4", "fd00:5:0:27::4"]
    assert (tmp_path / "pfnet" / "last_reserved_ip.1").read_text() == "fd00:5:0:27::4"


def test_masquerade_rule_is_checked_once_per_recheck_period(monkeypatch):
    """pyflanneld runs many ADDs in one process: iptables runs for the lease's rule at the first, then not again
    until MASQUERADE_RECHECK_SECONDS have passed (a rule deleted by hand is back then)."""
    runs, now = [], [1000.0]
    monkeypatch.setattr(bridge, "_masquerade_seen", {})
    monkeypatch.setattr(bridge.iptables, "available", lambda v6=False: True)
    monkeypatch.setattr(bridge.iptables, "ensure", lambda table, chain, rule, v6=False: runs.append((v6, rule[1])))
    monkeypatch.setattr(bridge.time, "monotonic", lambda: now[0])
    lease4, net4 = ipaddress.ip_network("10.5.34.0/24"), ipaddress.ip_network("10.5.0.0/16")
    lease6, net6 = ipaddress.ip_network("fd00:5:0:27::/64"), ipaddress.ip_network("fd00:5::/48")
    for step in (0, 1, 9):
        now[0] = 1000.0 + step
        bridge._ensure_masquerade(lease4, net4)
        bridge._ensure_masquerade(lease6, net6)
    assert runs == [(False, "10.5.34.0/24"), (True, "fd00:5:0:27::/64")]
    now[0] = 1000.0 + bridge.MASQUERADE_RECHECK_SECONDS
    bridge._ensure_masquerade(lease4, net4)
    bridge._ensure_masquerade(ipaddress.ip_network("10.5.35.0/24"), net4)  # another lease: its own rule
    assert runs[2:] == [(False, "10.5.34.0/24"), (False, "10.5.35.0/24")]
