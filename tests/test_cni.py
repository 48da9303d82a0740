"""The CNI plugin `pyflannel` as `make cni` builds it (the thin client, which hands calls to pyflanneld, and the
complete plugin beside it): the CNI contract and its errors, both paths, the kernel state ADD leaves and DEL removes,
CHECK, host-local interchangeability, a delegated plugin, and containerd's `ctr run --cni` on two lab hosts with
traffic between them."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.lab import REPO, VENV_BIN, Lab, sh, wait_until

pytestmark = pytest.mark.lab
HELLO = "hello from pyflannel"


@pytest.fixture(scope="session")
def binary() -> Path:
    """`make cni` (incremental): the thin client dist/cni/pyflannel, beside it dist/cni/pyflannel-inprocess."""
    subprocess.run(["make", "-s", "cni"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
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
    folder = host.workdir / "cni-networks" / network
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name[0].isdigit()} if folder.exists() else {}


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
    conflist = lambda h: {"cniVersion": "1.0.0", "name": "pfnet", "plugins": [  # noqa: E731
        {k: v for k, v in plugin_conf(h).items() if k not in ("cniVersion", "name")}]}
    for host in lab.hosts:
        host.start_containerd(conflist(host), {"pyflannel": binary,
                                               "pyflannel-inprocess": binary.parent / "pyflannel-inprocess"})
    h1, h2 = lab.hosts
    ips = {}
    for host, name in ((h1, "c1"), (h2, "c2")):
        pid = host.ctr_run(name, "sh", "-c", "httpd -h /www -p 80; exec sleep 100000")
        out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-4", "-o", "addr", "show", "eth0"],
                             capture_output=True, text=True).stdout
        ips[name] = out.split()[3].split("/")[0]
        assert ipaddress.IPv4Address(ips[name]) in ipaddress.IPv4Network(host.subnet_env()["FLANNEL_SUBNET"],
                                                                          strict=False)
    assert ", 0% packet loss" in h1.ctr("tasks", "exec", "--exec-id", "p", "c1", "ping", "-c1", "-W2", ips["c2"])
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
    writes its config to etcd), on a bridge of its own; containers of it reach each other across hosts."""
    ips = {}
    for host in lab.hosts:
        conf = plugin_conf(host, network="shop", daemonSocket=str(host.api_sock))
        container = lab.add_ns(f"{host.name}shop")
        done = host.run_cni(binary, "ADD", conf, f"shop-{host.name}", f"/run/netns/{container}")
        result = answer(done)
        assert done.returncode == 0, result
        ips[host.name] = (container, ipaddress.IPv4Interface(result["ips"][0]["address"]))
        lease = ipaddress.IPv4Interface(host.subnet_env("shop")["FLANNEL_SUBNET"]).network
        assert ips[host.name][1].network == lease and lease.subnet_of(ipaddress.IPv4Network("10.128.0.0/9"))
        assert "master cni-shop" in host.sh("ip", "-d", "link", "show", result["interfaces"][1]["name"])
    assert lab.network_config("shop")["Backend"]["VNI"] == 2 and len(lab.leases("shop")) == 2
    (ns1, ip1), (ns2, ip2) = ips["h1"], ips["h2"]
    assert subprocess.run(["ip", "netns", "exec", ns1, "ping", "-c1", "-W2", str(ip2.ip)]).returncode == 0
    bad = error(lab.hosts[0].run_cni(binary, "ADD", plugin_conf(lab.hosts[0], network="a/b"), "x", "/run/netns/x"))
    assert bad["code"] == 7 and "'a/b' is not valid" in bad["msg"]
    for host in lab.hosts:
        done = host.run_cni(binary, "DEL", plugin_conf(host, network="shop"), f"shop-{host.name}", "")
        assert done.returncode == 0, done


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
