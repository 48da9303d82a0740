"""Dual stack (issue 17): flannel's IPv6 config, lease format and flannel-v6.<VNI>, on a 3-host lab with namespace
containers; over an IPv6 underlay (flannel's way) and over an IPv4-only one, with both etcd APIs."""
from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import time

import pytest

from lab import VENV_BIN, ping, sh, wait_until

pytestmark = pytest.mark.lab

DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}}
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# flannel's ParseSubnetKey regex, with the IPv6 part required
FLANNEL_KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)&([a-f\d:]+)-(\d+)$")


def start(make_lab, config: dict, etcd_api: str = "v2", underlay_ipv6: bool = True, hosts: int = 3):
    lab = make_lab(hosts, etcd_api=etcd_api, underlay_ipv6=underlay_ipv6)
    return lab.start_network(config)


def pairs(lab) -> list[tuple[object, object]]:
    """Every (container, container on another host)."""
    return [(src, dst) for a in lab.hosts for b in lab.hosts if a is not b
            for src in a.containers for dst in b.containers]


def tcp_echo(src, dst_ip: str, port: int = 7007) -> str:
    """A line sent over TCP from container `src` to a listener in the container at `dst_ip` comes back."""
    dst = next(c for h in src.host.lab.hosts for c in h.containers if dst_ip in (c.ip, c.ip6))
    listener = src.host.lab.spawn(f"nc-{dst.ns}", ["busybox", "nc", "-l", "-p", str(port), "-e", "cat"], ns=dst.ns)
    try:
        wait_until("the listener", lambda: f":{port:04X}" in sh("cat", "/proc/net/tcp6", "/proc/net/tcp",
                                                                 ns=dst.ns), timeout=5)
        return sh("sh", "-c", f"echo hello-v6 | busybox nc -w 2 {dst_ip} {port}", ns=src.ns)
    finally:
        listener.kill()


@pytest.mark.parametrize("etcd_api, underlay", [("v2", "ipv6"), ("v3", "ipv6"), ("v3", "ipv4")])
def test_dual_stack_lease_format_devices_and_traffic(make_lab, etcd_api, underlay):
    lab = start(make_lab, DUAL, etcd_api, underlay_ipv6=underlay == "ipv6")
    leases = lab.leases()
    assert len(leases) == 3
    for host in lab.hosts:
        env = host.subnet_env()
        # subnet.env: flannel's keys in flannel's order
        assert list(env) == ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET",
                             "FLANNEL_MTU", "FLANNEL_IPMASQ"]
        v4, v6 = ipaddress.ip_interface(env["FLANNEL_SUBNET"]), ipaddress.ip_interface(env["FLANNEL_IPV6_SUBNET"])
        assert env["FLANNEL_IPV6_NETWORK"] == "fd00:5::/48" and v6.network.prefixlen == 64
        assert v6.ip == v6.network.network_address + 1 and v6.network.subnet_of(ipaddress.ip_network("fd00:5::/48"))
        # the lease: key 10.5.19.0-24&fd00:5:0:27::-64 (RFC 5952), value with PublicIPv6 and BackendV6Data
        key = f"{v4.network.network_address}-24&{v6.network.network_address}-64"
        assert key in leases, (key, list(leases))
        assert FLANNEL_KEY.fullmatch(key) and str(ipaddress.ip_address(key.split("&")[1][:-3])) == key.split("&")[1][:-3]
        attrs = leases[key]["attrs"]
        assert list(attrs) == ["PublicIP", *(["PublicIPv6"] if host.ip6 else []), "BackendType", "BackendData",
                               "BackendV6Data"]
        assert attrs["PublicIP"] == host.ip and attrs.get("PublicIPv6") == host.ip6
        assert attrs["BackendV6Data"]["VNI"] == 1 and MAC.match(attrs["BackendV6Data"]["VtepMAC"])
        # flannel-v6.1 over the IPv6 underlay (local its IPv6 address, a MAC of its own, as flannel has it); over
        # an IPv4 underlay flannel.1 carries IPv6 too. The device holds the lease's first address /128.
        device = "flannel-v6.1" if underlay == "ipv6" else "flannel.1"
        details = json.loads(host.sh("ip", "-d", "-j", "link", "show", device))[0]
        assert details["address"] == attrs["BackendV6Data"]["VtepMAC"]
        info = details["linkinfo"]["info_data"]
        assert (info.get("local6") or info.get("local")) == (host.ip6 or host.ip)
        if underlay == "ipv6":
            assert attrs["BackendV6Data"]["VtepMAC"] != attrs["BackendData"]["VtepMAC"]
        else:
            assert "PublicIPv6" not in attrs and "flannel-v6.1" not in host.sh("ip", "-o", "link")
        expected_mtu = 1430 if underlay == "ipv6" else 1450  # an IPv6 outer header costs 20 bytes more
        assert env["FLANNEL_MTU"] == str(expected_mtu) and details["mtu"] in (expected_mtu, 1450)
        assert f"{v6.network.network_address}/128" in host.sh("ip", "-6", "addr", "show", "dev", device)
        # every other host's IPv6 subnet: route, neighbour and FDB entry on the device
        routes6 = host.sh("ip", "-6", "route", "show", "proto", "77")
        fdb = host.sh("bridge", "fdb", "show", "dev", device)
        for other in lab.hosts:
            if other is not host:
                other6 = ipaddress.ip_interface(other.subnet_env()["FLANNEL_IPV6_SUBNET"]).network
                assert f"{other6} via {other6.network_address} dev {device}" in routes6
                assert f"dst {other.ip6 or other.ip} " in fdb
    failures6 = [(s.ip6, d.ip6) for s, d in pairs(lab) if not ping(s.ns, d.ip6)]
    failures4 = [(s.ip, d.ip) for s, d in pairs(lab) if not ping(s.ns, d.ip)]
    assert not failures6 and not failures4, f"unreachable: {failures6} {failures4}\n{lab.logs()}"
    a, b = lab.hosts[0].containers[0], lab.hosts[1].containers[0]
    assert tcp_echo(a, b.ip6).strip() == "hello-v6"
    rtt = sh("ping", "-c", "5", "-i", "0.2", "-q", b.ip6, ns=a.ns).splitlines()[-1]
    print(f"\nIPv6 over the {underlay} underlay, etcd {etcd_api}: {len(pairs(lab))} cross-host pairs ping "
          f"over IPv6 and IPv4, TCP over IPv6 echoes; ping6 {rtt}")


def test_lease_removal_removes_the_ipv6_entries(make_lab):
    lab = start(make_lab, DUAL, "v3")
    gone = lab.hosts[2]
    gone6 = ipaddress.ip_interface(gone.subnet_env()["FLANNEL_IPV6_SUBNET"]).network
    gone.daemon.kill()
    key = next(k for k in lab.leases() if k.endswith(f"&{gone6.network_address}-64"))
    started = time.monotonic()
    lab.etcd_delete(f"{lab.prefix_key}/subnets/{key}")
    for host in lab.hosts[:2]:
        wait_until(f"{host.name} drops {gone6}", lambda: str(gone6) not in host.sh(
            "ip", "-6", "route", "show", "proto", "77"), timeout=10)
        assert f"dst {gone.ip6}" not in host.sh("bridge", "fdb", "show", "dev", "flannel-v6.1")
        assert str(gone6.network_address) not in host.sh("ip", "-6", "neigh", "show", "dev", "flannel-v6.1")
    print(f"\nlease removal: the IPv6 route, neighbour and FDB entry gone from both peers within "
          f"{time.monotonic() - started:.2f} s")


def test_ipv6_only_network(make_lab):
    """EnableIPv4 false: the key keeps flannel's IPv4 part (leased, unrouted); no flannel.1, no IPv4 keys in
    subnet.env; containers reach each other over IPv6."""
    config = {**DUAL, "EnableIPv4": False}
    lab = make_lab(3, etcd_api="v2", underlay_ipv6=True)
    lab.start_network(config)
    for host in lab.hosts:
        env = host.subnet_env()
        assert list(env) == ["FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
        assert "flannel.1" not in host.sh("ip", "-o", "link") and "flannel-v6.1" in host.sh("ip", "-o", "link")
        assert host.sh("ip", "-4", "route", "show", "proto", "77") == ""
    assert all(FLANNEL_KEY.fullmatch(k) for k in lab.leases())
    assert all(node["attrs"]["BackendData"] is None for node in lab.leases().values())
    failures = [(s.ip6, d.ip6) for s, d in pairs(lab) if not ping(s.ns, d.ip6)]
    assert not failures, f"unreachable: {failures}\n{lab.logs()}"
    print(f"\nIPv6-only network: {len(pairs(lab))} cross-host pairs ping over IPv6")


def test_host_gw_ipv6_with_iface_given_by_ipv6_address_and_ip_masq(make_lab):
    """host-gw routes each peer's IPv6 subnet via its PublicIPv6; `-iface <IPv6 address>` picks the interface;
    -ip-masq writes flannel's rules to ip6tables too."""
    lab = make_lab(3, etcd_api="v2", underlay_ipv6=True)
    lab.set_config({**DUAL, "Backend": {"Type": "host-gw"}})
    for host in lab.hosts:
        host.start_daemon("-iface", host.ip6, "-ip-masq")
    for host in lab.hosts:
        host.add_bridge()
        host.add_container()
    for host in lab.hosts:
        routes6 = host.sh("ip", "-6", "route", "show", "proto", "77")
        for other in lab.hosts:
            if other is not host:
                other6 = ipaddress.ip_interface(other.subnet_env()["FLANNEL_IPV6_SUBNET"]).network
                assert f"{other6} via {other.ip6} dev eth0" in routes6
    rules = lab.hosts[0].sh("ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG")
    assert ('-A FLANNEL-POSTRTG -s fd00:5::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE '
            "--random-fully") in rules, rules
    assert "-j FLANNEL-POSTRTG" in lab.hosts[0].sh("ip6tables", "-t", "nat", "-S", "POSTROUTING")
    failures = [(s.ip6, d.ip6) for s, d in pairs(lab) if not ping(s.ns, d.ip6)]
    assert not failures, f"unreachable: {failures}\n{lab.logs()}"
    print(f"\nhost-gw over IPv6: {len(pairs(lab))} cross-host pairs ping")


def test_turning_ipv6_on_keeps_the_ipv4_subnet(make_lab):
    """An IPv4 network gets EnableIPv6: on restart each host keeps its IPv4 subnet and adds an IPv6 one (the old
    key is replaced by the dual-stack key), and peers follow."""
    lab = make_lab(2, etcd_api="v3", underlay_ipv6=True)
    lab.start_network({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
    before = {h.name: h.subnet_env()["FLANNEL_SUBNET"] for h in lab.hosts}
    lab.set_config(DUAL)
    for host in lab.hosts:
        host.daemon.kill(signal.SIGTERM)
        host.start_daemon()
    for host in lab.hosts:
        wait_until(f"{host.name}'s IPv6 lease", lambda: "FLANNEL_IPV6_SUBNET" in host.subnet_env(), timeout=15)
        assert host.subnet_env()["FLANNEL_SUBNET"] == before[host.name]
    leases = lab.leases()
    assert len(leases) == 2 and all("&" in k for k in leases), list(leases)
    a, b = lab.hosts
    b6 = ipaddress.ip_interface(b.subnet_env()["FLANNEL_IPV6_SUBNET"]).network
    wait_until("a's route to b's IPv6 subnet", lambda: str(b6) in a.sh("ip", "-6", "route", "show", "proto", "77"))
    b4 = ipaddress.ip_interface(before["h2"]).network
    assert str(b4) in a.sh("ip", "route", "show", "proto", "77")  # the IPv4 route survived the key's replacement


def test_status_and_doctor_show_dual_stack(make_lab):
    """`pyflannel status` lists the IPv6 subnets and routes; `doctor` is clean with flannel-v6.1's smaller MTU and
    names a stale subnet.env when IPv6 is turned off in etcd."""
    lab = make_lab(2, etcd_api="v2", underlay_ipv6=True)
    lab.set_config(DUAL)
    for host in lab.hosts:
        host.start_daemon()
    h1, h2 = lab.hosts
    common = ["-etcd-endpoints", lab.etcd_url, "-subnet-file", str(h1.subnet_file), "-api-socket", str(h1.api_sock)]
    report = json.loads(h1.sh(str(VENV_BIN / "pyflannel"), "status", "--json", *common))
    h2_lease6 = str(ipaddress.ip_interface(h2.subnet_env()["FLANNEL_IPV6_SUBNET"]).network)
    assert report["problems"] == [] and report["host"]["ipv6_network"] == "fd00:5::/48"
    peer = next(h for h in report["hosts"] if not h["self"])
    assert peer["ipv6_subnet"] == h2_lease6 and peer["programmed"] and peer["reachable"]
    assert any(r.startswith(f"{h2_lease6} via ") for r in report["routes"])
    assert "IPV6_SUBNET" in h1.sh(str(VENV_BIN / "pyflannel"), "status", *common)
    rc, doctor = doctor_report(h1, common)
    assert rc == 0 and doctor["problems"] == 0, doctor
    lab.set_config({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
    rc, doctor = doctor_report(h1, common)
    stale = [f for f in doctor["findings"] if f["check"] == "subnet-env"]
    assert rc == 1 and "FLANNEL_IPV6_NETWORK=fd00:5::/48" in stale[0]["message"], doctor
    print(f"\nstatus: peer {peer['subnet']} + {peer['ipv6_subnet']}; doctor clean, then names the stale subnet.env")


def doctor_report(host, common: list[str]) -> tuple[int, dict]:
    done = subprocess.run(["ip", "netns", "exec", host.ns, str(VENV_BIN / "pyflannel"), "doctor", "--json", *common],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)
