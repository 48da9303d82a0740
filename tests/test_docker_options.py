"""`docker network create` options on real dockerd 20.10 and 26.1 (issue 30): unknown and misplaced -o / --ipam-opt
keys refused with their exact errors and nothing left behind; `-o encrypted` on a WireGuard flannel network whose
container traffic is WireGuard on the underlay (captured), and refused on vxlan ones; enable_icc=false cutting a
network's containers on one host off from each other (a control network where they connect; across hosts they
still connect); host_binding_ipv4 where `-p` binds; the managed plugin's errors naming it pyflannel:latest."""
from __future__ import annotations

import re
import signal
import subprocess

import pytest

from pyflannel import firewall
from lab import IMAGE, Lab, wait_until
from tests.test_docker_networks import HELLO, in_netns, inspect, reaches
from tests.test_plugin import PLUGIN, plugin_lab  # noqa: F401 (a fixture: two hosts running the managed plugin)

pytestmark = [pytest.mark.lab, pytest.mark.docker]
CREATE = ["network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel"]
MARKER = b"pyflannel-secret"  # ping's payload pattern, which must not cross the underlay in the clear
HTTPD = [IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]


@pytest.fixture(scope="module")
def lab(docker_engine):
    with Lab(2) as lab:
        lab.start_docker(docker_engine)
        yield lab


def refused(host, *args: str) -> str:
    """The error of a `docker network create` that must fail."""
    with pytest.raises(RuntimeError) as error:
        host.docker(*CREATE, *args)
    return str(error.value)


def networks_of_the_driver(host) -> list[str]:
    return host.docker("network", "ls", "--filter", "driver=pyflannel", "--format", "{{.Name}}").split()


def test_unknown_and_misplaced_options_are_refused_and_leave_nothing(lab):
    h1, _ = lab.hosts
    links = h1.extra_links()
    assert ("-o pyflannel.network=shop: pyflannel.network is an option of --ipam-opt, not of -o: give it as "
            "`--ipam-opt pyflannel.network=shop` (with --ipam-driver pyflannel)") in refused(
        h1, "-o", "pyflannel.network=shop", "shop")
    assert ("-o com.docker.network.bridge.name=br9: pyflannel has no -o option 'com.docker.network.bridge.name'; its "
            "-o options are com.docker.network.driver.mtu, com.docker.network.bridge.enable_ip_masquerade, "
            "com.docker.network.bridge.enable_icc, com.docker.network.bridge.host_binding_ipv4, encrypted (and its "
            "--ipam-opt options pyflannel.network, pyflannel.backend, pyflannel.ipv6)") in refused(
        h1, "-o", "com.docker.network.bridge.name=br9", "n1")
    assert ("--ipam-opt encrypted: encrypted is an option of -o, not of --ipam-opt: give it as `-o encrypted` (with "
            "-d pyflannel)") in refused(h1, "--ipam-opt", "pyflannel.network=vault", "--ipam-opt", "encrypted", "n2")
    assert ("-o encrypted: the default flannel network uses the vxlan backend (its etcd config), which does not "
            "encrypt: give the network a flannel network of its own with the wireguard backend: `docker network "
            "create -d pyflannel --ipam-driver pyflannel --ipam-opt pyflannel.network=NAME --ipam-opt "
            "pyflannel.backend=wireguard -o encrypted NAME`") in refused(h1, "-o", "encrypted", "n3")
    assert "-o encrypted: flannel network plain uses the vxlan backend, which does not encrypt" in refused(
        h1, "--ipam-opt", "pyflannel.network=plain", "-o", "encrypted=true", "n4")
    wait_until("h1 leaves plain (Docker's rollback released its pool)", lambda: lab.leases("plain") == {})
    assert networks_of_the_driver(h1) == [] and h1.extra_links() == links
    assert not h1.network_env("vault").exists()  # refused before any join


def test_encrypted_network_carries_container_traffic_in_wireguard(lab):
    h1, h2 = lab.hosts
    for host in lab.hosts:
        host.docker(*CREATE, "--ipam-opt", "pyflannel.network=vault", "--ipam-opt", "pyflannel.backend=wireguard",
                    "-o", "encrypted", "vault")
        host.docker("run", "-d", "--name", f"vault-{host.name}", "--network", "vault", *HTTPD)
    port = lab.network_config("vault")["Backend"]["ListenPort"]
    src = inspect(h1, "vault-h1")["State"]["Pid"]
    dst = inspect(h2, "vault-h2")["NetworkSettings"]["Networks"]["vault"]["IPAddress"]
    wait_until("vault's containers reach each other", lambda: in_netns(src, "ping", "-c", "1", "-W", "1",
                                                                      dst).returncode == 0, timeout=20, interval=0.2)
    capture = lab.workdir / "vault.pcap"
    tcpdump = lab.spawn("tcpdump-vault", ["tcpdump", "-Z", "root", "-i", "port1", "-nn", "--immediate-mode", "-U",
                                          "-w", str(capture), f"ip and host {h1.ip} and host {h2.ip}"], ns=lab.switch)
    wait_until("tcpdump listening", lambda: "listening on" in tcpdump.log(), timeout=10)
    pinged = in_netns(src, "ping", "-c", "5", "-i", "0.2", "-s", "200", "-p", MARKER.hex(), dst)
    assert "5 received" in pinged.stdout, pinged
    tcpdump.kill(signal.SIGINT)
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(capture)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    print(f"vault between h1 and h2: {len(lines)} packets on the underlay, UDP {port}")
    assert len(lines) >= 10, tcpdump.log()
    hosts = rf"({re.escape(h1.ip)}|{re.escape(h2.ip)})\.{port}"
    assert all(re.search(rf"IP {hosts} > {hosts}: UDP", line) for line in lines), lines
    assert not any(".8472" in line for line in lines) and MARKER not in capture.read_bytes()


def test_enable_icc_false_cuts_containers_off_on_their_host_only(lab):
    h1, h2 = lab.hosts
    for name, options in (("closed", ["-o", "com.docker.network.bridge.enable_icc=false"]), ("open", [])):
        for host in lab.hosts:
            host.docker(*CREATE, "--ipam-opt", f"pyflannel.network={name}", *options, name)
        for tag, host in (("a", h1), ("b", h1), ("c", h2)):
            host.docker("run", "-d", "--name", f"{name}-{tag}", "--network", name, *HTTPD)
    found = {(name, tag): (inspect(host, f"{name}-{tag}")["State"]["Pid"],
                           inspect(host, f"{name}-{tag}")["NetworkSettings"]["Networks"][name]["IPAddress"])
             for name in ("closed", "open") for tag, host in (("a", h1), ("b", h1), ("c", h2))}

    def connects(name: str, src: str, dst: str, proto: str, port: int = 0) -> bool:
        return reaches(found[(name, src)][0], found[(name, dst)][0], found[(name, dst)][1], proto, port)

    wait_until("closed's containers reach the other host's", lambda: connects("closed", "a", "c", "icmp"),
               timeout=20, interval=0.2)
    assert {proto: connects("closed", "a", "b", proto, 21001) for proto in ("icmp", "tcp", "udp")} == {
        "icmp": False, "tcp": False, "udp": False}
    assert {proto: connects("open", "a", "b", proto, 21002) for proto in ("icmp", "tcp", "udp")} == {
        "icmp": True, "tcp": True, "udp": True}
    assert connects("closed", "c", "a", "tcp") and connects("closed", "b", "c", "udp", 21003)  # across hosts
    bridge = "pfl-" + h1.docker("network", "inspect", "-f", "{{.Id}}", "closed").strip()[:8]
    ports = h1.sh("bridge", "-d", "link", "show", "master", bridge)
    assert ports.count("isolated on") == 2, ports
    # the way round, through the gateway (a route a container could take with a raw socket): dropped in FORWARD
    gateway = inspect(h1, "closed-a")["NetworkSettings"]["Networks"]["closed"]["Gateway"]
    in_netns(found[("closed", "a")][0], "ip", "route", "add", f"{found[('closed', 'b')][1]}/32", "via", gateway)
    assert not connects("closed", "a", "b", "udp", 21004)
    rule = firewall.Rule("filter", firewall.ISOLATION, ("-i", bridge, "-o", bridge, "-m", "conntrack", "!",
                                                        "--ctstate", "DNAT", "-j", "DROP"))
    h1.sh("iptables", "-D", rule.chain, *rule.args)
    try:
        assert connects("closed", "a", "b", "udp", 21005)  # the control: the rule is what stops it
    finally:
        h1.sh("iptables", "-I", rule.chain, *rule.args)


def test_host_binding_ipv4_is_where_p_binds(lab):
    h1, h2 = lab.hosts
    h1.docker(*CREATE, "--ipam-opt", "pyflannel.network=bound", "-o",
              "com.docker.network.bridge.host_binding_ipv4=127.0.0.1", "bound")
    h1.docker("run", "-d", "--name", "bound-web", "--network", "bound", "-p", "8081:80", *HTTPD)
    assert "-d 127.0.0.1/32 -p tcp -m tcp --dport 8081" in h1.sh("iptables", "-t", "nat", "-S", firewall.PORTS)
    wait_until("the port answers on 127.0.0.1", lambda: HELLO in h1.sh(
        "timeout", "3", "busybox", "wget", "-qO-", "http://127.0.0.1:8081/", check=False), timeout=10)
    assert HELLO not in h1.sh("timeout", "3", "busybox", "wget", "-qO-", f"http://{h1.ip}:8081/", check=False)
    assert HELLO not in h2.sh("timeout", "3", "busybox", "wget", "-qO-", f"http://{h1.ip}:8081/", check=False)
    h1.docker("run", "-d", "--name", "bound-any", "--network", "bound", "-p", f"{h1.ip}:8082:80", *HTTPD)
    wait_until("a port with its own address answers there", lambda: HELLO in h2.sh(
        "timeout", "3", "busybox", "wget", "-qO-", f"http://{h1.ip}:8082/", check=False), timeout=10)


def test_the_managed_plugins_errors_name_it_as_users_do(plugin_lab):
    h1 = plugin_lab.hosts[0]
    managed = ["network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN]
    with pytest.raises(RuntimeError) as misplaced:  # (overlay0 holds the default network: a named one)
        h1.docker(*managed, "--ipam-opt", "pyflannel.network=cart", "-o", "pyflannel.ipv6=true", "cart")
    assert ("give it as `--ipam-opt pyflannel.ipv6=true` (with --ipam-driver pyflannel:latest)"
            in str(misplaced.value))
    with pytest.raises(RuntimeError) as second:
        h1.docker(*managed, "overlay1")
    assert ("create one on another flannel network with `docker network create -d pyflannel:latest --ipam-driver "
            "pyflannel:latest --ipam-opt pyflannel.network=NAME NAME`") in str(second.value)
