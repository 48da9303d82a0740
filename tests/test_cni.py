"""The CNI plugin `pyflannel` as `make cni` builds it (the thin client, which hands calls to pyflanneld, and the
complete plugin beside it): the CNI contract and its errors, both paths, the kernel state ADD leaves and DEL removes,
CHECK, host-local interchangeability, a delegated plugin, and containerd's `ctr run --cni` on two lab hosts with
traffic between them. Dual stack (issue 17): the same on a 3-host lab over an IPv6 underlay (etcd v3), an IPv6-only
network, and named networks (dual stack by default) over an IPv4 underlay (etcd v2)."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab import REPO, VENV_BIN, Container, Lab, make, ping, sh, wait_until
from tests.test_ipv6 import DUAL, pairs, tcp_echo

pytestmark = pytest.mark.lab
HELLO = "hello from pyflannel"


@pytest.fixture(scope="session")
def binary() -> Path:
    """`make cni` (incremental): the thin client dist/cni/pyflannel, beside it dist/cni/pyflannel-inprocess."""
    make("cni")
    return REPO / "dist" / "cni" / "pyflannel"


@pytest.fixture(scope="module")
def lab():
    lab = Lab(2)
    try:
        lab.set_config()
        for host in lab.hosts:
            host.start_daemon()
        yield lab
    finally:
        lab.close()


def plugin_conf(host, **extra) -> dict:
    """The conflist's plugin entry as the runtime hands it over (name and cniVersion copied in); the thin client
    hands the calls to the host's pyflanneld."""
    return {"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel", "subnetFile": str(host.subnet_file),
            "dataDir": str(host.workdir / "cni-flannel"), "ipam": {"dataDir": str(host.workdir / "cni-networks")},
            "daemonSocket": str(host.api_sock), "delegate": {"hairpinMode": True, "isDefaultGateway": True},
            **extra}


def answer(done: subprocess.CompletedProcess) -> dict | None:
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return json.loads(done.stdout) if done.stdout.strip() else None


def ipam_files(host, network: str = "pfnet") -> dict[str, bytes]:
    """host-local's address files (IPv4 and IPv6) of the network: name -> content."""
    folder = host.workdir / "cni-networks" / network
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.name[0].isdigit() or ":" in p.name} if folder.exists() else {}


def start_containerd(lab, binary) -> None:
    """containerd on every host of `lab`, with a conflist of the plugin on the default network."""
    for host in lab.hosts:
        conflist = {"cniVersion": "1.0.0", "name": "pfnet", "plugins": [
            {k: v for k, v in plugin_conf(host).items() if k not in ("cniVersion", "name")}]}
        host.start_containerd(conflist, {"pyflannel": binary,
                                         "pyflannel-inprocess": binary.parent / "pyflannel-inprocess"})


def error(done: subprocess.CompletedProcess) -> dict:
    reply = answer(done)
    assert done.returncode == 1 and reply["cniVersion"] and isinstance(reply["code"], int), done
    return reply


def test_version_and_clear_errors(binary, tmp_path):
    run = lambda env, stdin=b"": subprocess.run([str(binary)], input=stdin, capture_output=True,  # noqa: E731
                                                env={"PATH": os.environ["PATH"], **env}, timeout=60)
    version = answer(run({"CNI_COMMAND": "VERSION"}))
    assert version == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    python = subprocess.run([str(VENV_BIN / "pyflannel-cni")], env={"CNI_COMMAND": "VERSION"}, capture_output=True)
    assert json.loads(python.stdout) == version  # the Python entry point is the same program

    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net"}
    good = {"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel", "subnetFile": str(tmp_path / "subnet.env"),
            "dataDir": str(tmp_path / "flannel")}
    cases = [
        ({"CNI_COMMAND": ""}, b"", 4, "CNI_COMMAND=''"),
        ({"CNI_NETNS": ""}, json.dumps(good).encode(), 4, "CNI_NETNS is not set"),
        ({"CNI_CONTAINERID": "../x"}, json.dumps(good).encode(), 4, "CNI_CONTAINERID='../x'"),
        ({}, b"{not json", 6, "not valid JSON"),
        ({}, json.dumps({**good, "cniVersion": "0.2.0"}).encode(), 1, "cniVersion '0.2.0' is not supported"),
        ({}, json.dumps({**good, "delegate": {"name": "x"}}).encode(), 7, "'delegate' must not have 'name'"),
        ({}, json.dumps({**good, "subnetFile": "subnet.env"}).encode(), 7, "'subnetFile' must be an absolute path"),
        ({}, json.dumps(good).encode(), 11, f"{tmp_path / 'subnet.env'} does not exist"),
    ]
    for extra, stdin, code, text in cases:
        reply = error(run({**env, **extra}, stdin))
        assert reply["code"] == code and text in reply["msg"], (extra, reply)
    print("VERSION and 8 error cases answered with CNI error JSON, exit 1, no traceback")


def test_pyflanneld_runs_the_calls_and_without_it_the_plugin_does(lab, binary):
    """The thin client hands ADD and DEL to pyflanneld; with no pyflanneld on "daemonSocket" the complete plugin
    beside it does the same work; with neither, a clear error."""
    host = lab.hosts[0]
    results = {}
    for path, socket_path in (("daemon", str(host.api_sock)), ("in-process", str(host.workdir / "nobody.sock"))):
        container = lab.add_ns(f"thin{len(results)}")
        cid = f"thin-{path}"
        conf = plugin_conf(host, daemonSocket=socket_path)
        results[path] = answer(host.run_cni(binary, "ADD", conf, cid, f"/run/netns/{container}"))
        assert results[path]["ips"][0]["address"].startswith(host.subnet_env()["FLANNEL_SUBNET"].rsplit(".", 1)[0])
        assert "master cni0" in host.sh("ip", "-d", "link", "show", results[path]["interfaces"][1]["name"])
        assert host.run_cni(binary, "DEL", conf, cid, f"/run/netns/{container}").returncode == 0
        in_daemon = f"CNI ADD {cid}: done" in host.daemon.log() and f"CNI DEL {cid}: done" in host.daemon.log()
        assert in_daemon == (path == "daemon")
    alone = host.workdir / "alone"
    alone.mkdir()
    (alone / "pyflannel").write_bytes(binary.read_bytes())
    (alone / "pyflannel").chmod(0o755)
    missing = error(host.run_cni(alone / "pyflannel", "ADD", plugin_conf(host, daemonSocket="/nonexistent.sock"),
                                 "x", "/run/netns/x"))
    assert missing["code"] == 11 and "pyflannel-inprocess" in missing["msg"] and "is missing" in missing["msg"]


def test_add_check_del_leave_the_kernel_clean(lab, binary):
    host = lab.hosts[0]
    env = host.subnet_env()
    gateway = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"])
    container = lab.add_ns("h1x1")
    netns = f"/run/netns/{container}"
    conf = plugin_conf(host)

    done = host.run_cni(binary, "ADD", conf, "x1", netns)
    result = answer(done)
    assert done.returncode == 0, result
    address = ipaddress.IPv4Interface(result["ips"][0]["address"])
    assert result["cniVersion"] == "1.0.0" and address.network == gateway.network and address != gateway
    assert result["ips"][0]["gateway"] == str(gateway.ip) and result["interfaces"][2]["sandbox"] == netns
    host_end = result["interfaces"][1]["name"]
    link = host.sh("ip", "-d", "link", "show", host_end)
    assert "master cni0" in link and f"mtu {env['FLANNEL_MTU']}" in link and "hairpin on" in link
    inner = subprocess.run(["ip", "netns", "exec", container, "ip", "-4", "addr", "show", "eth0"],
                           capture_output=True, text=True).stdout
    assert str(address) in inner and f"mtu {env['FLANNEL_MTU']}" in inner
    routes = subprocess.run(["ip", "netns", "exec", container, "ip", "route"], capture_output=True, text=True).stdout
    assert f"default via {gateway.ip}" in routes and f"{env['FLANNEL_NETWORK']} via {gateway.ip}" in routes
    assert ipam_files(host)[str(address.ip)] == b"x1\r\neth0"  # host-local's format
    assert subprocess.run(["ip", "netns", "exec", host.ns, "ping", "-c1", "-W2", str(address.ip)]).returncode == 0

    done = host.run_cni(binary, "CHECK", {**conf, "prevResult": result}, "x1", netns)
    assert done.returncode == 0 and not done.stdout.strip(), done
    again = error(host.run_cni(binary, "ADD", conf, "x1", netns))
    assert again["code"] == 104 and str(address.ip) in again["msg"]
    subprocess.run(["ip", "netns", "exec", container, "ip", "route", "del", env["FLANNEL_NETWORK"]], check=True)
    broken = error(host.run_cni(binary, "CHECK", conf, "x1", netns))
    assert broken["code"] == 102 and f"route {env['FLANNEL_NETWORK']} via {gateway.ip} is missing" in broken["msg"]

    # DEL as ctr sends it (no namespace), with subnet.env gone: the saved delegate config is enough.
    moved = host.subnet_file.with_suffix(".away")
    host.subnet_file.rename(moved)
    try:
        missing = error(host.run_cni(binary, "ADD", conf, "x2", netns))
        assert missing["code"] == 11 and str(host.subnet_file) in missing["msg"]
        for _ in range(2):  # idempotent
            done = host.run_cni(binary, "DEL", conf, "x1", "")
            assert done.returncode == 0 and not done.stdout.strip(), done
    finally:
        moved.rename(host.subnet_file)
    assert str(address.ip) not in ipam_files(host)
    assert host_end not in host.sh("ip", "-br", "link")
    assert "eth0" not in subprocess.run(["ip", "netns", "exec", container, "ip", "-br", "link"], capture_output=True,
                                        text=True).stdout
    assert not (host.workdir / "cni-flannel" / "x1").exists()
    print(f"ADD gave {address} on cni0 (MTU {env['FLANNEL_MTU']}, hairpin), CHECK found a deleted route, "
          f"DEL with CNI_NETNS='' and no subnet.env freed the address and the veth")


def test_interchangeable_with_stock_host_local(lab, binary):
    """Our addresses and /usr/lib/cni/host-local's live in the same files: neither hands out the other's."""
    host = lab.hosts[1]
    ours_ns, stock_ns = lab.add_ns("h2x1"), lab.add_ns("h2x2")
    conf = plugin_conf(host)
    ours = answer(host.run_cni(binary, "ADD", conf, "ours", f"/run/netns/{ours_ns}"))
    delegate = json.loads((host.workdir / "cni-flannel" / "ours").read_text())  # what flannel would hand the plugin
    assert delegate["type"] == "bridge" and delegate["ipam"]["type"] == "host-local"
    stock = host.run_cni("/usr/lib/cni/bridge", "ADD", delegate, "stock", f"/run/netns/{stock_ns}")
    assert stock.returncode == 0, stock
    stock_ip = json.loads(stock.stdout)["ips"][0]["address"]
    assert stock_ip != ours["ips"][0]["address"]
    assert ipam_files(host)[stock_ip.split("/")[0]] == b"stock\r\neth0"
    assert subprocess.run(["ip", "netns", "exec", stock_ns, "ping", "-c1", "-W2",
                           ours["ips"][0]["address"].split("/")[0]]).returncode == 0  # same bridge
    assert host.run_cni(binary, "DEL", conf, "ours", "").returncode == 0
    assert host.run_cni("/usr/lib/cni/bridge", "DEL", delegate, "stock", f"/run/netns/{stock_ns}").returncode == 0
    assert ipam_files(host) == {}
    print(f"ours {ours['ips'][0]['address']}, stock bridge + host-local {stock_ip}, same IPAM folder")


def test_other_delegate_types_run_the_plugin(lab, binary):
    host = lab.hosts[1]
    container = lab.add_ns("h2x3")
    conf = plugin_conf(host, delegate={"type": "ptp"})
    done = host.run_cni(binary, "ADD", conf, "p1", f"/run/netns/{container}")
    result = answer(done)
    assert done.returncode == 0, result
    ip = result["ips"][0]["address"].split("/")[0]
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(host.subnet_env()["FLANNEL_SUBNET"], strict=False)
    assert "cni0" not in [i["name"] for i in result["interfaces"]]  # ptp: a veth and routes, no bridge
    assert ipam_files(host)[ip] == b"p1\r\neth0"
    assert host.run_cni(binary, "DEL", conf, "p1", "").returncode == 0
    assert ip not in ipam_files(host)
    missing = error(host.run_cni(binary, "ADD", plugin_conf(host, delegate={"type": "nosuch"}), "p2",
                                 f"/run/netns/{container}"))
    assert missing["code"] == 103 and "'nosuch' not found in CNI_PATH /usr/lib/cni" in missing["msg"]
    print(f"delegate ptp via /usr/lib/cni/ptp: {ip}; a missing delegate plugin named in the error")


def test_containerd_ctr_run_cni_across_hosts(lab, binary):
    start_containerd(lab, binary)
    h1, h2 = lab.hosts
    ips = {}
    for host, name in ((h1, "c1"), (h2, "c2")):
        pid = host.ctr_run(name, "sh", "-c", "httpd -h /www -p 80; exec sleep 100000")
        out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-4", "-o", "addr", "show", "eth0"],
                             capture_output=True, text=True).stdout
        ips[name] = out.split()[3].split("/")[0]
        assert ipaddress.IPv4Address(ips[name]) in ipaddress.IPv4Network(host.subnet_env()["FLANNEL_SUBNET"],
                                                                          strict=False)
    wait_until("c1 pings c2", lambda: ", 0% packet loss" in h1.ctr(
        "tasks", "exec", "--exec-id", "p", "c1", "ping", "-c1", "-W2", ips["c2"], check=False), timeout=20)
    for host, src, dst in ((h1, "c1", "c2"), (h2, "c2", "c1")):
        page = wait_until(f"HTTP {src} -> {dst}", lambda: HELLO in host.ctr(
            "tasks", "exec", "--exec-id", "w", src, "wget", "-O-", f"http://{ips[dst]}/", check=False, timeout=20),
            timeout=20, interval=0.5)
        assert page
    # CHECK on what ctr set up (ctr names the container <namespace>-<id>).
    check = h1.run_cni(binary, "CHECK", plugin_conf(h1), "default-c1", f"/proc/{h1.ctr_task_pid('c1')}/ns/net")
    assert check.returncode == 0, check

    # `ctr run --rm --cni` calls DEL with CNI_NETNS="": the address and the veth go.
    before = ipam_files(h1)
    links = h1.sh("ip", "-br", "link")
    out = h1.ctr_run("once", "ip", "-4", "-o", "addr", "show", "eth0", rm=True)
    once_ip = out.split()[3].split("/")[0]
    assert once_ip not in before and once_ip != ips["c1"]
    assert ipam_files(h1) == before and h1.sh("ip", "-br", "link") == links

    # `ctr task kill` + `ctr c rm` never call DEL: the address stays until DEL is sent.
    h1.ctr("tasks", "kill", "-s", "SIGKILL", "c1")
    wait_until("c1 stopped", lambda: "STOPPED" in h1.ctr("tasks", "ls"))
    h1.ctr("tasks", "rm", "c1")
    h1.ctr("containers", "rm", "c1")
    assert ipam_files(h1)[ips["c1"]] == b"default-c1\r\neth0"
    done = h1.run_cni(binary, "DEL", plugin_conf(h1), "default-c1", "")
    assert done.returncode == 0 and ips["c1"] not in ipam_files(h1)
    assert "vpf" not in h1.sh("ip", "-br", "link")
    h2.ctr("tasks", "kill", "-s", "SIGKILL", "c2")
    wait_until("c2 stopped", lambda: "STOPPED" in h2.ctr("tasks", "ls"))
    h2.ctr("tasks", "rm", "c2")
    print(f"ctr run --cni: c1 {ips['c1']} on h1 <-> c2 {ips['c2']} on h2, ping and HTTP both ways; "
          f"ctr run --rm freed {once_ip}; DEL after ctr c rm freed {ips['c1']}")


def test_a_conflist_names_a_flannel_network(lab, binary):
    """"network": "shop": the first ADD on a host joins the named network through pyflanneld's API (the first host
    writes its config to etcd), on a bridge of its own; containers of it reach each other across hosts. With "ipv6":
    true the network is dual stack: each container also gets an address of the host's IPv6 lease (over this IPv4
    underlay)."""
    ips = {}
    for host in lab.hosts:
        conf = plugin_conf(host, network="shop", ipv6=True, daemonSocket=str(host.api_sock))
        container = lab.add_ns(f"{host.name}shop")
        done = host.run_cni(binary, "ADD", conf, f"shop-{host.name}", f"/run/netns/{container}")
        result = answer(done)
        assert done.returncode == 0, result
        ips[host.name] = (container, *(ipaddress.ip_interface(ip["address"]) for ip in result["ips"]))
        env = host.subnet_env("shop")
        lease, lease6 = (ipaddress.ip_interface(env[key]).network for key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"))
        assert ips[host.name][1].network == lease and lease.subnet_of(ipaddress.IPv4Network("10.128.0.0/9"))
        assert ips[host.name][2].network == lease6 and lease6.subnet_of(ipaddress.IPv6Network("fd00:f1a0::/32"))
        assert "master cni-shop" in host.sh("ip", "-d", "link", "show", result["interfaces"][1]["name"])
    assert lab.network_config("shop")["Backend"]["VNI"] == 2 and len(lab.leases("shop")) == 2
    (ns1, _, ip1v6), (ns2, ip2, _) = ips["h1"], ips["h2"]
    assert subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c1", "-W2", str(ip2.ip)]).returncode == 0
    assert ping(ns2, str(ip1v6.ip)), f"{ip1v6} unreachable from {ns2}\n{lab.logs()}"
    bad = error(lab.hosts[0].run_cni(binary, "ADD", plugin_conf(lab.hosts[0], network="a/b"), "x", "/run/netns/x"))
    assert bad["code"] == 7 and "'a/b' is not valid" in bad["msg"]
    for host in lab.hosts:
        done = host.run_cni(binary, "DEL", plugin_conf(host, network="shop"), f"shop-{host.name}", "")
        assert done.returncode == 0, done


SEND = ("import socket,sys; dst, port, token, proto, src = sys.argv[1:6]; "
        "s = socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET, "
        "socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM); s.settimeout(2); "
        "src and s.bind((src, 0)); "
        "(s.connect((dst, int(port))), s.sendall(token.encode() + b'\\n')) if proto == 'tcp' else "
        "[s.sendto(token.encode(), (dst, int(port))) for _ in range(3)]")


def probe(src_ns: str, dst_ip: str, proto: str, token: str, source: str = "") -> None:
    """A ping, a TCP line or UDP datagrams from a container namespace (from `source` when given)."""
    if proto == "icmp":
        subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", "2", "-W", "1", "-q", dst_ip],
                       capture_output=True)
    else:
        subprocess.run(["ip", "netns", "exec", src_ns, str(VENV_BIN / "python"), "-c", SEND, dst_ip, "7100", token,
                        proto, source], capture_output=True, timeout=10)


def test_cni_networks_are_walled_off_from_each_other(lab, binary):
    """Issue 26: the CNI plugin's networks (the default one and two named ones, dual stack) get the Docker driver's
    walls: every pair of containers on different networks is cut off (ICMP, TCP, UDP, IPv4 and IPv6, on one host
    and across hosts), every pair on the same network connects, and a container cannot send from another
    network's address."""
    members = {}  # (network, host) -> (namespace, IPv4 address, IPv6 address or None, listener)
    for host in lab.hosts:
        for network in ("", "ca", "cb"):
            conf = plugin_conf(host, name=f"walls-{network or 'default'}",
                               **({"network": network, "ipv6": True} if network else {}))
            ns = lab.add_ns(f"{host.name}w{network or 'd'}")
            result = answer(done := host.run_cni(binary, "ADD", conf, f"walls-{network}-{host.name}", f"/run/netns/{ns}"))
            assert done.returncode == 0, result
            ips = [str(ipaddress.ip_interface(ip["address"]).ip) for ip in result["ips"]]
            listener = lab.spawn(f"listen-{ns}", [str(VENV_BIN / "python"), str(REPO / "lab" / "listener.py"),
                                                  "7100"], ns=ns)
            members[(network, host.name)] = (ns, ips[0], ips[1] if len(ips) > 1 else None, listener)
    time.sleep(0.5)
    cases = []
    for src, (src_ns, *_rest) in members.items():
        for dst, (_, dst4, dst6, _) in members.items():
            if src != dst:
                cases += [(src, dst, address, proto) for address in (dst4, dst6 if members[src][2] else None)
                          if address for proto in ("icmp", "tcp", "udp")]

    def reached(i: int) -> bool:
        src, dst, address, proto = cases[i]
        token = f"probe-{i}"
        if proto == "icmp":
            return subprocess.run(["ip", "netns", "exec", members[src][0], "ping", "-c", "2", "-W", "1", "-q",
                                   address], capture_output=True).returncode == 0
        probe(members[src][0], address, proto, token)
        time.sleep(0.3)
        return token in members[dst][3].log()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(reached, range(len(cases))))
    wrong = [case for case, ok in zip(cases, results) if ok != (case[0][0] == case[1][0])]
    assert wrong == [], f"same network reaches, other networks do not; wrong: {wrong}"
    # spoofing: a container of ca sends from a cb address to cb's container on its host
    (ca_ns, *_), (_, cb4, _, cb_listener) = members[("ca", "h1")], members[("cb", "h1")]
    spoofed = str(ipaddress.ip_address(cb4) + 50)
    sh("ip", "addr", "add", f"{spoofed}/32", "dev", "eth0", ns=ca_ns)
    probe(ca_ns, cb4, "udp", "spoofed", source=spoofed)
    time.sleep(0.5)
    assert "spoofed" not in cb_listener.log()
    print(f"{len(cases)} probes between CNI networks, {sum(results)} reached (same network)")
    for (network, host_name), (ns, *_rest) in members.items():
        host = next(h for h in lab.hosts if h.name == host_name)
        conf = plugin_conf(host, name=f"walls-{network or 'default'}", **({"network": network} if network else {}))
        assert host.run_cni(binary, "DEL", conf, f"walls-{network}-{host_name}", f"/run/netns/{ns}").returncode == 0


def test_a_conflist_creates_a_wireguard_network(lab, binary):
    """"backend": "wireguard" with "network": the network is created on WireGuard; containers get its MTU (the
    underlay's less 80) and reach each other across hosts through flannel-wg.<VNI>."""
    ips = {}
    for host in lab.hosts:
        conf = plugin_conf(host, network="vault", backend="wireguard", daemonSocket=str(host.api_sock))
        container = lab.add_ns(f"{host.name}vault")
        result = answer(host.run_cni(binary, "ADD", conf, f"vault-{host.name}", f"/run/netns/{container}"))
        ips[host.name] = (container, ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        assert "mtu 1420" in sh("ip", "link", "show", "eth0", ns=container)
    backend = lab.network_config("vault")["Backend"]
    assert backend["Type"] == "wireguard" and backend["ListenPort"] == 51820 + backend["VNI"] - 1
    (ns1, _), (_, ip2) = ips["h1"], ips["h2"]
    assert subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c1", "-W2", str(ip2)]).returncode == 0
    bad = error(lab.hosts[0].run_cni(binary, "ADD", plugin_conf(lab.hosts[0], backend="wireguard"), "x", "/x"))
    assert bad["code"] == 7 and "'backend'" in bad["msg"]
    for host in lab.hosts:
        assert host.run_cni(binary, "DEL", plugin_conf(host, network="vault"), f"vault-{host.name}", "").returncode == 0


# --- dual stack (issue 17) -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dual_lab():
    """Three hosts over an IPv6 underlay (eth0 also 2001:db8:0:2::1N), etcd v3, the default network dual stack."""
    lab = Lab(3, etcd_api="v3", underlay_ipv6=True)
    try:
        lab.set_config(DUAL)
        for host in lab.hosts:
            host.start_daemon()
        yield lab
    finally:
        lab.close()


def gateways(host, network: str = "") -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    env = host.subnet_env(network)
    return ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]), ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"])


def ipv6_addresses(ns: str | None, device: str) -> dict[str, dict]:
    """The link's global IPv6 addresses as `ip -j` shows them: "address/prefix" -> details (flags: nodad, …)."""
    found = json.loads(sh("ip", "-6", "-j", "addr", "show", "dev", device, "scope", "global", ns=ns))
    return {f"{a['local']}/{a['prefixlen']}": a for link in found for a in link["addr_info"] if "local" in a}


def routes(ns: str, family: str) -> set[tuple[str, str | None]]:
    """(dst, gateway) of the namespace's main-table routes of `family` ("-4" or "-6")."""
    return {(r["dst"], r.get("gateway")) for r in json.loads(sh("ip", family, "-j", "route", ns=ns))}


def ms_in_daemon(host, command: str, container_id: str) -> float:
    """How long pyflanneld took for the call, from its log line `CNI ADD <id>: done in 11.2 ms`."""
    found = re.findall(rf"CNI {command} {re.escape(container_id[:12])}: done in ([0-9.]+) ms", host.daemon.log())
    assert found, f"no CNI {command} {container_id} in {host.name}'s log"
    return float(found[-1])


def test_dual_stack_add_check_del_across_three_hosts(dual_lab, binary):
    """ADD on three hosts (two through pyflanneld, one by the complete plugin alone): each container gets an address
    of both leases, both gateways and both families' routes; containers reach each other over IPv6 and IPv4 (ping,
    TCP), and beyond the flannel networks through the masquerade of both families. CHECK sees an IPv6 route go. DEL
    leaves no address file, veth or saved config."""
    lab = dual_lab
    h1, h2, h3 = lab.hosts
    h1.sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")  # the first ADD turns it on, with IPv4 forwarding
    h2.sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")  # new links without IPv6: ADD enables it on cni0
    added = {}
    try:
        for host, socket_path in ((h1, str(h1.api_sock)), (h2, str(h2.api_sock)), (h3, "/nonexistent.sock")):
            ns = lab.add_ns(f"{host.name}dual")
            conf = plugin_conf(host, daemonSocket=socket_path)
            done = host.run_cni(binary, "ADD", conf, f"dual-{host.name}", f"/run/netns/{ns}")
            added[host.name] = (ns, conf, answer(done))
            assert done.returncode == 0, added[host.name][2]
    finally:
        h2.sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0")
    assert h1.sh("sysctl", "-n", "net.ipv6.conf.all.forwarding").strip() == "1"
    assert h2.sh("sysctl", "-n", "net.ipv6.conf.cni0.disable_ipv6").strip() == "0"
    for host in lab.hosts:
        ns, conf, result = added[host.name]
        gw4, gw6 = gateways(host)
        cid = f"dual-{host.name}"
        a4, a6 = (ipaddress.ip_interface(ip["address"]) for ip in result["ips"])
        assert a4.network == gw4.network and a6.network == gw6.network and a6 != gw6
        assert result["ips"] == [{"address": str(a4), "gateway": str(gw4.ip), "interface": 2},
                                 {"address": str(a6), "gateway": str(gw6.ip), "interface": 2}]
        assert result["routes"] == [{"dst": "10.5.0.0/16", "gw": str(gw4.ip)}, {"dst": "fd00:5::/48", "gw": str(gw6.ip)},
                                    {"dst": "0.0.0.0/0", "gw": str(gw4.ip)}, {"dst": "::/0", "gw": str(gw6.ip)}]
        # the kernel: both gateways on cni0, the IPv6 one (and the container's) usable at once (no DAD)
        assert str(gw4) in host.sh("ip", "-4", "addr", "show", "dev", "cni0")
        bridge6 = ipv6_addresses(host.ns, "cni0")
        assert bridge6[str(gw6)].get("nodad") and not bridge6[str(gw6)].get("tentative"), bridge6
        inside6 = ipv6_addresses(ns, "eth0")
        assert inside6[str(a6)].get("nodad") and not inside6[str(a6)].get("tentative"), inside6
        assert str(a4) in sh("ip", "-4", "addr", "show", "dev", "eth0", ns=ns)
        assert {("default", str(gw6.ip)), ("fd00:5::/48", str(gw6.ip))} <= routes(ns, "-6")
        assert {("default", str(gw4.ip)), ("10.5.0.0/16", str(gw4.ip))} <= routes(ns, "-4")
        # host-local's layout: a file per address, a last_reserved_ip per range set
        assert ipam_files(host) == {str(a4.ip): f"{cid}\r\neth0".encode(), str(a6.ip): f"{cid}\r\neth0".encode()}
        folder = host.workdir / "cni-networks" / "pfnet"
        assert [(folder / f"last_reserved_ip.{i}").read_text() for i in (0, 1)] == [str(a4.ip), str(a6.ip)]
        # ipMasq (FLANNEL_IPMASQ is false here): one MASQUERADE rule per lease and family
        assert f"-s {gw6.network} ! -d fd00:5::/48" in host.sh("ip6tables", "-t", "nat", "-S", "POSTROUTING")
        assert f"-s {gw4.network} ! -d 10.5.0.0/16" in host.sh("iptables", "-t", "nat", "-S", "POSTROUTING")
        host.containers.append(Container(ns, str(a4.ip), host, str(a6.ip)))
    try:
        count = len(pairs(lab))
        failures6 = [(s.ip6, d.ip6) for s, d in pairs(lab) if not ping(s.ns, d.ip6)]
        failures4 = [(s.ip, d.ip) for s, d in pairs(lab) if not ping(s.ns, d.ip)]
        assert not failures6 and not failures4, f"unreachable: {failures6} {failures4}\n{lab.logs()}"
        a, b = h1.containers[0], h2.containers[0]
        assert tcp_echo(a, b.ip6).strip() == "hello-v6"
        rtt = sh("ping", "-c", "5", "-i", "0.2", "-q", b.ip6, ns=a.ns).splitlines()[-1]
        # the switch has no route to the flannel networks: its answers come back only through the masquerade
        assert "fd00:5" not in sh("ip", "-6", "route", ns=lab.switch)
        assert ping(a.ns, "2001:db8:0:2::2") and ping(a.ns, "192.0.2.2")
    finally:
        for host in lab.hosts:
            host.containers.clear()

    ns, conf, result = added["h1"]
    done = h1.run_cni(binary, "CHECK", {**conf, "prevResult": result}, "dual-h1", f"/run/netns/{ns}")
    assert done.returncode == 0 and not done.stdout.strip(), done
    gw6 = gateways(h1)[1]
    sh("ip", "-6", "route", "del", "default", ns=ns)
    broken = error(h1.run_cni(binary, "CHECK", conf, "dual-h1", f"/run/netns/{ns}"))
    assert broken["code"] == 102 and f"route ::/0 via {gw6.ip} is missing" in broken["msg"], broken

    for host in lab.hosts:
        ns, conf, result = added[host.name]
        done = host.run_cni(binary, "DEL", conf, f"dual-{host.name}", "")  # as ctr sends it: no namespace
        assert done.returncode == 0 and not done.stdout.strip(), done
        assert ipam_files(host) == {} and "vpf" not in host.sh("ip", "-br", "link")
        assert "eth0" not in sh("ip", "-br", "link", ns=ns)
        assert not (host.workdir / "cni-flannel" / f"dual-{host.name}").exists()
    add_ms = [ms_in_daemon(h, "ADD", f"dual-{h.name}") for h in (h1, h2)]
    print(f"\ndual stack on 3 hosts (IPv6 underlay, etcd v3): {count} cross-host pairs ping over IPv6 and IPv4, "
          f"TCP over IPv6 echoes, egress masqueraded in both families; ping6 {rtt}; first ADD (makes cni0) in "
          f"pyflanneld {add_ms[0]:.1f} / {add_ms[1]:.1f} ms")


def test_dual_stack_interchangeable_with_stock_bridge_and_host_local(dual_lab, binary):
    """The two-range delegate config flannel hands over works with the stock bridge + host-local as with ours, in the
    same IPAM folder: each continues after the other's last_reserved_ip.0 and .1 and hands out none of the other's
    addresses; the containers get the same routes, and reach each other over IPv6 on the one bridge."""
    host = dual_lab.hosts[1]
    names = {cid: dual_lab.add_ns(f"{host.name}{cid}") for cid in ("ours6", "stock6", "ours6b")}
    conf = plugin_conf(host)
    ours = answer(host.run_cni(binary, "ADD", conf, "ours6", f"/run/netns/{names['ours6']}"))
    delegate = json.loads((host.workdir / "cni-flannel" / "ours6").read_text())
    gw4, gw6 = gateways(host)
    assert delegate["ipam"]["ranges"] == [[{"subnet": str(gw4.network)}], [{"subnet": str(gw6.network)}]]
    stock = host.run_cni("/usr/lib/cni/bridge", "ADD", delegate, "stock6", f"/run/netns/{names['stock6']}")
    assert stock.returncode == 0, stock
    stock = json.loads(stock.stdout)
    again = answer(host.run_cni(binary, "ADD", conf, "ours6b", f"/run/netns/{names['ours6b']}"))
    given = {name: [ipaddress.ip_interface(ip["address"]).ip for ip in result["ips"]]
             for name, result in (("ours6", ours), ("stock6", stock), ("ours6b", again))}
    for family in (0, 1):  # each range set goes on where the other plugin stopped
        assert given["stock6"][family] == given["ours6"][family] + 1
        assert given["ours6b"][family] == given["stock6"][family] + 1
    assert ipam_files(host) == {str(ip): f"{cid}\r\neth0".encode() for cid, ips in given.items() for ip in ips}
    assert [ip["gateway"] for ip in stock["ips"]] == [str(gw4.ip), str(gw6.ip)]
    assert {r["dst"] for r in stock["routes"]} == {r["dst"] for r in ours["routes"]}
    for family in ("-4", "-6"):
        assert routes(names["stock6"], family) == routes(names["ours6"], family), family
    assert ping(names["stock6"], str(given["ours6"][1])) and ping(names["ours6b"], str(given["stock6"][1]))
    done = host.run_cni(binary, "CHECK", {**conf, "prevResult": again}, "ours6b", f"/run/netns/{names['ours6b']}")
    assert done.returncode == 0, done  # the stock plugin's changes to cni0 broke nothing of ours
    add_ms = ms_in_daemon(host, "ADD", "ours6b")
    for cid in ("ours6", "ours6b"):
        assert host.run_cni(binary, "DEL", conf, cid, "").returncode == 0
    done = host.run_cni("/usr/lib/cni/bridge", "DEL", delegate, "stock6", f"/run/netns/{names['stock6']}")
    assert done.returncode == 0, done
    assert ipam_files(host) == {}
    print(f"\nours {', '.join(map(str, given['ours6']))}, stock bridge + host-local "
          f"{', '.join(map(str, given['stock6']))}, ours again {', '.join(map(str, given['ours6b']))}: one IPAM "
          f"folder; a dual-stack ADD on an existing cni0 in pyflanneld {add_ms:.1f} ms")


def test_ipv6_only_network(make_lab, binary):
    """EnableIPv4 false (etcd v2): one IPv6 range; the container and cni0 hold no IPv4 address, CHECK passes; the
    containers reach each other across hosts over IPv6."""
    lab = make_lab(2, etcd_api="v2", underlay_ipv6=True)
    lab.set_config({**DUAL, "EnableIPv4": False})
    for host in lab.hosts:
        host.start_daemon()
    added = {}
    for host in lab.hosts:
        gw6 = ipaddress.IPv6Interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"])
        ns = lab.add_ns(f"{host.name}v6")
        result = answer(host.run_cni(binary, "ADD", plugin_conf(host), f"v6-{host.name}", f"/run/netns/{ns}"))
        address = ipaddress.IPv6Interface(result["ips"][0]["address"])
        assert result["ips"] == [{"address": str(address), "gateway": str(gw6.ip), "interface": 2}]
        assert address.network == gw6.network
        assert result["routes"] == [{"dst": "fd00:5::/48", "gw": str(gw6.ip)}, {"dst": "::/0", "gw": str(gw6.ip)}]
        assert host.sh("ip", "-4", "addr", "show", "dev", "cni0") == ""
        assert sh("ip", "-4", "addr", "show", "dev", "eth0", ns=ns) == "" and routes(ns, "-4") == set()
        assert str(address) in ipv6_addresses(ns, "eth0") and str(gw6) in ipv6_addresses(host.ns, "cni0")
        assert list(ipam_files(host)) == [str(address.ip)]
        done = host.run_cni(binary, "CHECK", {**plugin_conf(host), "prevResult": result}, f"v6-{host.name}",
                            f"/run/netns/{ns}")
        assert done.returncode == 0, done
        added[host.name] = (ns, address.ip)
    (ns1, ip1), (ns2, ip2) = added.values()
    assert ping(ns1, str(ip2)) and ping(ns2, str(ip1)), lab.logs()
    rtt = sh("ping", "-c", "5", "-i", "0.2", "-q", str(ip2), ns=ns1).splitlines()[-1]
    for host in lab.hosts:
        assert host.run_cni(binary, "DEL", plugin_conf(host), f"v6-{host.name}", "").returncode == 0
        assert ipam_files(host) == {} and "vpf" not in host.sh("ip", "-br", "link")
    print(f"\nIPv6-only network: {ip1} on h1 <-> {ip2} on h2; ping6 {rtt}")


def test_containerd_dual_stack(dual_lab, binary):
    """`ctr run --cni` on the dual-stack network: the task's eth0 has both addresses, it pings a task on another
    host over IPv6; `ctr run --rm` frees both addresses."""
    h1, h2, _ = dual_lab.hosts
    start_containerd(dual_lab, binary)
    ips = {}
    for host, name in ((h1, "d1"), (h2, "d2")):
        pid = host.ctr_run(name, "sleep", "100000")
        out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "addr", "show", "eth0", "scope", "global"],
                             capture_output=True, text=True).stdout
        found = [ipaddress.ip_interface(line.split()[3]) for line in out.splitlines()]
        assert [a.network for a in found] == [g.network for g in gateways(host)], out
        ips[name] = found[1].ip
    assert ", 0% packet loss" in h1.ctr("tasks", "exec", "--exec-id", "p", "d1", "ping", "-c1", "-W2", str(ips["d2"]))
    before = ipam_files(h1)
    out = h1.ctr_run("once6", "ip", "-o", "addr", "show", "eth0", "scope", "global", rm=True)
    once = [line.split()[3] for line in out.splitlines()]
    assert len(once) == 2 and ipam_files(h1) == before
    for host, name in ((h1, "d1"), (h2, "d2")):
        host.ctr("tasks", "kill", "-s", "SIGKILL", name)
        wait_until(f"{name} stopped", lambda: "STOPPED" in host.ctr("tasks", "ls"))
        host.ctr("tasks", "rm", name)
        assert host.run_cni(binary, "DEL", plugin_conf(host), f"default-{name}", "").returncode == 0
        assert str(ips[name]) not in ipam_files(host)
    print(f"\nctr run --cni, dual stack: d1 {ips['d1']} on h1 -> d2 {ips['d2']} on h2 over IPv6; ctr run --rm "
          f"freed {', '.join(once)}")
