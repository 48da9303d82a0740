"""The managed (v2) Docker plugin on real engines: `docker plugin create/set/enable` on two lab hosts gives one
overlay across them; settings change with `docker plugin set`; the host's `pyflannel` (copied out of the plugin)
reaches the plugin's daemon and state; a dying child restarts the plugin; disable + rm leave nothing behind; etcd
over TLS with the certificates on the etcd-tls mount. Prints the plugin's size and its enable → usable time."""
from __future__ import annotations

import gzip
import ipaddress
import json
import os
import signal
import subprocess
import time

import pytest

from pyflannel import firewall
from pyflannel.driver.state import STATE_FILE
from lab import IMAGE, OUTSIDE_DNS, OUTSIDE_IP, SWITCH_IP, Lab, wait_until
from tests.test_faults import make_certs

pytestmark = [pytest.mark.lab, pytest.mark.docker]
PLUGIN = "pyflannel:latest"  # dockerd registers a managed driver under its full reference, tag included


def du(path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def subnet_env(host) -> dict:
    """subnet.env as the host sees it: the plugin writes it through its host-run mount."""
    text = (host.workdir / "run" / "flannel" / "subnet.env").read_text()
    return dict(line.split("=", 1) for line in text.split())


def lease(host) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(subnet_env(host)["FLANNEL_SUBNET"]).network


def plugin_processes(host) -> dict[int, str]:
    """pid -> command of the plugin's processes, which run in the host's network namespace."""
    found = {}
    for pid in host.sh("ip", "netns", "pids", host.ns).split():
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        if "pyflannel" in command:
            found[int(pid)] = command
    return found


def host_pyflannel(host, *args: str) -> subprocess.CompletedProcess:
    """`pyflannel ARGS` on the plugin's host, installed as the README says: plugin/pyflannel-host copied out of the
    plugin's rootfs; it finds the plugin through DOCKER_HOST, as docker does."""
    command = host.workdir / "bin" / "pyflannel"
    if not command.exists():
        root = host.docker("info", "-f", "{{.DockerRootDir}}").strip()
        plugin_id = host.docker("plugin", "inspect", "-f", "{{.Id}}", "pyflannel").strip()
        command.parent.mkdir(exist_ok=True)
        subprocess.run(["install", "-m", "0755", f"{root}/plugins/{plugin_id}/rootfs/usr/share/pyflannel/"
                        "pyflannel-host", str(command)], check=True)
    return subprocess.run(["ip", "netns", "exec", host.ns, "env", f"DOCKER_HOST=unix://{host.docker_sock}",
                           str(command), *args], capture_output=True, text=True, timeout=60)


def enable(host) -> float:
    """Enable the plugin and create overlay0; the seconds from `enable` until the network exists."""
    start = time.monotonic()
    host.docker("plugin", "enable", "pyflannel", timeout=60)
    host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "overlay0")
    return time.monotonic() - start


def install(host, plugin_build, engine: str) -> None:
    """A dockerd of `engine` on `host`, with the plugin from `plugin_build` created and set (not enabled)."""
    host.start_dockerd(engine)
    (host.workdir / "run").mkdir()
    (host.workdir / "var-lib").mkdir()
    host.docker("plugin", "create", "pyflannel", str(plugin_build / "pyflannel"), timeout=120)
    host.docker("plugin", "set", "pyflannel", f"FLANNELD_ETCD_ENDPOINTS={host.lab.etcd_url}",
                "FLANNELD_IFACE=eth0", f"FLANNELD_DNS_UPSTREAM={OUTSIDE_DNS}",
                f"host-run.source={host.workdir / 'run'}", f"host-var-lib.source={host.workdir / 'var-lib'}",
                f"docker-sock.source={host.docker_sock}")


@pytest.fixture(scope="module")
def plugin_lab(plugin_build, docker_engine):
    """Two hosts with a dockerd each and the plugin installed from build/plugin/pyflannel, overlay0 on both."""
    with Lab(2) as lab:
        lab.set_config()
        lab.add_outside()
        lab.enable_seconds = []
        for host in lab.hosts:
            install(host, plugin_build, docker_engine)
            lab.enable_seconds.append(enable(host))
        yield lab


def test_plugin_size(plugin_build):
    rootfs = plugin_build / "pyflannel" / "rootfs"
    frozen = rootfs / "opt" / "pyflannel"
    tar = plugin_build / "pyflannel-rootfs.tar"
    compressed = len(gzip.compress(tar.read_bytes(), compresslevel=6))
    print(f"plugin rootfs {du(rootfs) / 1e6:.1f} MB ({compressed / 1e6:.1f} MB as tar.gz); frozen multi-call "
          f"binary {(frozen / 'pyflannel').stat().st_size / 1e6:.1f} MB + {du(frozen / '_internal') / 1e6:.1f} MB "
          f"of runtime and libraries")
    config = json.loads((plugin_build / "pyflannel" / "config.json").read_text())
    assert config["interface"]["types"] == ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]
    for command in ("pyflanneld", "pyflannel-driver", "pyflannel", "pyflannel-plugin"):
        assert os.readlink(rootfs / "usr" / "bin" / command) == "/opt/pyflannel/pyflannel"
    assert (rootfs / "usr" / "lib64" / "ld-linux-x86-64.so.2").exists()


def test_enabled_plugin_carries_traffic_across_hosts(plugin_lab):
    h1, h2 = plugin_lab.hosts
    print("enable -> overlay0 usable: " + ", ".join(f"{s:.2f} s" for s in plugin_lab.enable_seconds))
    leases = plugin_lab.leases()
    for host in plugin_lab.hosts:
        assert "true" in host.docker("plugin", "inspect", "-f", "{{.Enabled}}", "pyflannel")
        key = str(lease(host)).replace("/", "-")
        assert leases[key]["attrs"]["PublicIP"] == host.ip
        assert subnet_env(host)["FLANNEL_MTU"] == "1450"
    h2.docker("run", "-d", "--name", "web", "--network", "overlay0", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www")
    web_ip = json.loads(h2.docker("inspect", "web"))[0]["NetworkSettings"]["Networks"]["overlay0"]["IPAddress"]
    assert ipaddress.IPv4Address(web_ip) in lease(h2)
    out = h1.docker("run", "--rm", "--network", "overlay0", IMAGE, "sh", "-c",
                    f"ip -4 -o addr show eth0; ping -c 2 -W 2 {web_ip} >/dev/null && echo PING-OK; "
                    f"wget -O- http://{web_ip}/")
    assert ipaddress.IPv4Interface(out.splitlines()[0].split()[3]).ip in lease(h1)
    assert "PING-OK" in out and "hello from pyflannel" in out


def test_plugin_serves_a_named_network(plugin_lab):
    """The plugin's pyflanneld and driver share the local API inside it: a named flannel network on both hosts (on
    WireGuard: the plugin carries wireguard-go) carries traffic, is cut off from overlay0, its containers are found
    by name, and it is left when removed."""
    h1, h2 = plugin_lab.hosts
    try:
        for host in plugin_lab.hosts:
            host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--ipam-opt",
                        "pyflannel.network=shop", "--ipam-opt", "pyflannel.backend=wireguard", "shop")
        assert plugin_lab.network_config("shop")["Backend"]["Type"] == "wireguard"
        assert all("flannel-wg." in host.sh("ip", "link", "show") for host in plugin_lab.hosts)
        h2.docker("run", "-d", "--name", "shopweb", "--network", "shop", IMAGE, "httpd", "-f", "-p", "80", "-h",
                  "/www")
        web_ip = json.loads(h2.docker("inspect", "shopweb"))[0]["NetworkSettings"]["Networks"]["shop"]["IPAddress"]
        assert ipaddress.IPv4Address(web_ip) in ipaddress.IPv4Network(plugin_lab.network_config("shop")["Network"])
        probe = "timeout 3 wget -q -O- http://{}/ && echo REACHED"
        assert "REACHED" in h1.docker("run", "--rm", "--network", "shop", IMAGE, "sh", "-c", probe.format(web_ip))
        assert "REACHED" not in h1.docker("run", "--rm", "--network", "overlay0", IMAGE, "sh", "-c",
                                          probe.format(web_ip), check=False)
        # by name: published by the plugin's driver, answered by the plugin's daemon
        wait_until("shopweb found by name from h1", lambda: "REACHED" in h1.docker(
            "run", "--rm", "--network", "shop", IMAGE, "sh", "-c", probe.format("shopweb"), check=False),
            timeout=20, interval=0.5)
    finally:
        h2.docker("rm", "-f", "shopweb", check=False)
        for host in plugin_lab.hosts:
            host.docker("network", "rm", "shop", check=False)
    assert plugin_lab.leases("shop") == {}
    assert not any("flannel-wg." in host.sh("ip", "link", "show") for host in plugin_lab.hosts)
    assert not (h1.workdir / "run" / "flannel" / "networks" / "shop.env").exists()


def test_plugin_masquerades_egress_and_publishes_ports(plugin_lab):
    """The driver inside the plugin programs the host's iptables with the plugin's own iptables: containers reach
    the lab's internet as the host, and -p publishes on the host's address."""
    h1, h2 = plugin_lab.hosts
    h1.docker("run", "-d", "--name", "pub", "--network", "overlay0", "-p", "8080:80", IMAGE, "httpd", "-f", "-p", "80",
              "-h", "/www")
    seen = h1.docker("exec", "pub", "timeout", "3", "wget", "-q", "-O-", f"http://{OUTSIDE_IP}/cgi-bin/ip")
    assert seen.strip() == h1.ip
    page = h2.sh("timeout", "5", "busybox", "wget", "-q", "-O-", f"http://{h1.ip}:8080/")
    assert "hello from pyflannel" in page
    h1.docker("rm", "-f", "pub")
    assert "--dport 8080" not in h1.sh("iptables", "-t", "nat", "-S")


def test_host_pyflannel_reaches_the_plugins_daemon_and_state(plugin_lab):
    """The plugin's local API, subnet.env and state are on the host's mounts (the lab's stand-ins for /run and
    /var/lib): `pyflannel` on the host, with no flags, lists a container of the other host by name, joins and leaves
    a flannel network through the plugin's pyflanneld, and doctor reads the driver's state there."""
    h1, h2 = plugin_lab.hosts
    assert (h1.workdir / "run" / "flannel" / "pyflanneld.sock").is_socket()
    state = json.loads((h1.workdir / "var-lib" / "pyflannel" / "driver" / STATE_FILE).read_text())
    overlay0 = next(net for net in state["networks"].values() if net.get("pool"))
    try:
        h2.docker("run", "-d", "--name", "hostview", "--network", "overlay0", IMAGE, "sleep", "600")
        wait_until("hostview in h1's pyflannel status --names", lambda: "hostview" in host_pyflannel(
            h1, "status", "--names").stdout, timeout=20, interval=0.5)
        status = json.loads(host_pyflannel(h1, "status", "--json").stdout)
        assert status["host"]["etcd"] == "reachable" and status["host"]["subnet"] == str(lease(h1))
        assert {h["public_ip"] for h in status["hosts"]} >= {h1.ip, h2.ip}
        joined = host_pyflannel(h1, "join", "hostjoin")
        assert joined.returncode == 0, joined.stderr
        assert [lease["attrs"]["PublicIP"] for lease in plugin_lab.leases("hostjoin").values()] == [h1.ip]
        assert (h1.workdir / "run" / "flannel" / "networks" / "hostjoin.env").exists()
        assert host_pyflannel(h1, "leave", "hostjoin").returncode == 0
        assert plugin_lab.leases("hostjoin") == {}
        # doctor finds overlay0 in the driver's state: without its masquerade rule, it says so
        rule = ["-s", overlay0["pool"], "!", "-d", overlay0["flannel_network"], "-j", "MASQUERADE"]
        assert json.loads(host_pyflannel(h1, "doctor", "--json").stdout)["checks"]["masquerade"] == "ok"
        h1.sh("iptables", "-t", "nat", "-D", firewall.NAT_OUT, *rule)
        try:
            doctor = json.loads(host_pyflannel(h1, "doctor", "--json").stdout)
            assert [f["message"].split(" (")[0] for f in doctor["findings"] if f["check"] == "masquerade"] == [
                f"no masquerade rule for {overlay0['pool']}"]
        finally:
            h1.sh("iptables", "-t", "nat", "-A", firewall.NAT_OUT, *rule)
    finally:
        h2.docker("rm", "-f", "hostview", check=False)


def test_settings_change_with_plugin_set(plugin_lab):
    """-ip-masq through FLANNELD_IP_MASQ: iptables inside the plugin's rootfs programs the host; the lease and
    the VTEP MAC survive the disable/enable (state in the host's var-lib)."""
    h1 = plugin_lab.hosts[0]
    before, mac = lease(h1), h1.sh("cat", "/sys/class/net/flannel.1/address")
    assert "FLANNEL-POSTRTG" not in h1.sh("iptables", "-t", "nat", "-S")  # dockerd has its own for docker0
    h1.docker_clear()
    h1.docker("plugin", "disable", "pyflannel")
    h1.docker("plugin", "set", "pyflannel", "FLANNELD_IP_MASQ=true")
    enable(h1)
    nat = h1.sh("iptables", "-t", "nat", "-S")
    assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in nat
    assert (f"-A FLANNEL-POSTRTG -s {subnet_env(h1)['FLANNEL_NETWORK']} ! -d 224.0.0.0/4 -m comment --comment "
            '"flanneld masq" -j MASQUERADE') in nat
    assert subnet_env(h1)["FLANNEL_IPMASQ"] == "true"
    assert lease(h1) == before and h1.sh("cat", "/sys/class/net/flannel.1/address") == mac


def test_a_dead_child_restarts_the_plugin(plugin_lab):
    """SIGKILL of pyflanneld: the supervisor stops the driver and exits, dockerd starts the plugin again, and
    the network keeps working on the same lease."""
    h1 = plugin_lab.hosts[0]
    before = plugin_processes(h1)
    os.kill(next(pid for pid, command in before.items() if command == "pyflanneld"), signal.SIGKILL)
    wait_until("a new pyflanneld", lambda: any(command == "pyflanneld" and pid not in before
                                               for pid, command in plugin_processes(h1).items()), timeout=30,
               interval=0.2)
    out = wait_until("a container on overlay0", lambda: h1.docker(
        "run", "--rm", "--network", "overlay0", IMAGE, "ip", "-4", "-o", "addr", "show", "eth0"), timeout=30,
        interval=0.5)
    assert ipaddress.IPv4Interface(out.split()[3]).ip in lease(h1)
    assert not set(before) & set(plugin_processes(h1))


def test_disable_and_rm_leave_nothing_behind(plugin_lab):
    for host in plugin_lab.hosts:
        host.docker("run", "-d", "--network", "overlay0", IMAGE, "sleep", "600")
        assert host.extra_links()  # the network's bridge and the container's veth
        with pytest.raises(RuntimeError, match="in use"):
            host.docker("plugin", "disable", "pyflannel")
        host.docker_clear()
        host.docker("plugin", "disable", "pyflannel")
        host.docker("plugin", "rm", "pyflannel")
        assert host.docker("plugin", "ls", "-q") == ""
        assert plugin_processes(host) == {}
        assert host.extra_links() == set(), "bridge or veth left behind"
        assert not list((host.workdir / "docker" / "exec" / "plugins").glob("*/pyflannel.sock"))


def test_enable_with_etcd_unreachable_succeeds_and_says_why(plugin_lab, plugin_build):
    """The supervisor starts the driver beside pyflanneld, lease or not, so that `enable` succeeds within dockerd's
    socket deadline; a network create then waits --lease-wait for subnet.env and names it as missing."""
    h1 = plugin_lab.hosts[0]
    h1.docker("plugin", "create", "pyflannel", str(plugin_build / "pyflannel"), timeout=120)
    try:
        h1.docker("plugin", "set", "pyflannel", "FLANNELD_ETCD_ENDPOINTS=http://192.0.2.2:2999",
                  "FLANNELD_IFACE=eth0", "DRIVER_LEASE_WAIT=2", f"host-run.source={h1.workdir / 'run-no-etcd'}",
                  f"host-var-lib.source={h1.workdir / 'var-lib'}", f"docker-sock.source={h1.docker_sock}")
        (h1.workdir / "run-no-etcd").mkdir()
        h1.docker("plugin", "enable", "pyflannel", timeout=60)
        with pytest.raises(RuntimeError, match=r"subnet.env does not exist: is pyflanneld running"):
            h1.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "overlay0")
        assert "retrying" in h1.dockerd.log()  # pyflanneld's own account, in dockerd's log
    finally:
        h1.docker("plugin", "disable", "-f", "pyflannel", check=False)
        h1.docker("plugin", "rm", "pyflannel", check=False)


def test_etcd_over_tls_with_the_certificates_on_the_etcd_tls_mount(plugin_lab, plugin_build):
    """An etcd that wants client certificates: the plugin reads them from the etcd-tls mount and takes a lease, and
    the host's `pyflannel status` reaches the same etcd with the same files, found through the mount's source."""
    lab, h1 = plugin_lab, plugin_lab.hosts[0]
    certs = make_certs(lab.workdir / "etcd-tls-files", SWITCH_IP)
    url = f"https://{SWITCH_IP}:2479"
    lab.spawn("etcd-tls", [
        "etcd", "--name", "tls", "--data-dir", str(lab.workdir / "etcd-tls"), "--listen-client-urls", url,
        "--advertise-client-urls", url, "--listen-peer-urls", f"http://{SWITCH_IP}:2480",
        "--initial-advertise-peer-urls", f"http://{SWITCH_IP}:2480", "--initial-cluster",
        f"tls=http://{SWITCH_IP}:2480", "--cert-file", certs["server.pem"], "--key-file", certs["server.key"],
        "--client-cert-auth", "--trusted-ca-file", certs["ca.pem"]], ns=lab.switch)
    etcdctl = ["ip", "netns", "exec", lab.switch, "etcdctl", "--endpoints", url, "--cacert", certs["ca.pem"],
               "--cert", certs["client.pem"], "--key", certs["client.key"]]
    wait_until("the TLS etcd", lambda: subprocess.run(
        [*etcdctl, "put", "/coreos.com/network/config", json.dumps({"Network": "10.5.0.0/16"})],
        capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}).returncode == 0, timeout=30, interval=0.3)
    run = h1.workdir / "run-tls"
    run.mkdir()
    h1.docker("plugin", "create", "pyflannel", str(plugin_build / "pyflannel"), timeout=120)
    h1.docker("plugin", "set", "pyflannel", f"FLANNELD_ETCD_ENDPOINTS={url}", "FLANNELD_ETCD_API=v3",
              "FLANNELD_ETCD_CAFILE=/etc/pyflannel/tls/ca.pem", "FLANNELD_ETCD_CERTFILE=/etc/pyflannel/tls/client.pem",
              "FLANNELD_ETCD_KEYFILE=/etc/pyflannel/tls/client.key", "FLANNELD_IFACE=eth0",
              f"etcd-tls.source={lab.workdir / 'etcd-tls-files'}", f"host-run.source={run}",
              f"host-var-lib.source={h1.workdir / 'var-lib'}", f"docker-sock.source={h1.docker_sock}")
    try:
        h1.docker("plugin", "enable", "pyflannel", timeout=60)
        wait_until("subnet.env from the TLS etcd", (run / "flannel" / "subnet.env").exists, timeout=20)
        keys = subprocess.run([*etcdctl, "get", "--prefix", "--keys-only", "/coreos.com/network/subnets/"],
                              capture_output=True, text=True, check=True).stdout.split()
        own = str(ipaddress.IPv4Interface(dict(
            line.split("=", 1) for line in (run / "flannel" / "subnet.env").read_text().split())["FLANNEL_SUBNET"]
        ).network).replace("/", "-")
        assert keys == [f"/coreos.com/network/subnets/{own}"]
        status = json.loads(host_pyflannel(h1, "status", "--json").stdout)
        assert status["host"]["etcd"] == "reachable", status["problems"]
        assert [h["public_ip"] for h in status["hosts"]] == [h1.ip]
    finally:
        h1.docker("plugin", "disable", "-f", "pyflannel", check=False)
        h1.docker("plugin", "rm", "pyflannel", check=False)
