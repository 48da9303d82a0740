"""Many isolated pyflannel networks in real Docker engines (issue 11): the default flannel network and two named
ones (`--ipam-opt pyflannel.network=NAME`, one of them --internal) on two hosts; every pair of containers on
different networks is cut off (ICMP, TCP, UDP, same host and across hosts, both directions), every pair on the same
network connects; leave and re-join; driver and daemon restarts."""
from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pyflannel.localapi import Client
from lab import IMAGE, OUTSIDE_IP, REPO, VENV_BIN, Lab, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.docker]
HELLO = "hello from pyflannel"
FRONT, BACK = "10.60.0.0/16", "10.61.0.0/16"
# Docker network name -> the `docker network create` arguments after -d/--ipam-driver
NETWORKS = {
    "overlay0": [],
    "front": ["--ipam-opt", "pyflannel.network=front", "--subnet", FRONT],
    "back": ["--ipam-opt", "pyflannel.network=back", "--subnet", BACK, "--internal"],
}
UDP_LISTENER = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('',int(sys.argv[1]))); "
                "print('ready', flush=True); s.settimeout(3); print(s.recvfrom(64)[0].decode())")


@pytest.fixture(scope="module")
def nets(docker_engine):
    with Lab(2) as lab:
        lab.add_outside()
        lab.start_docker(docker_engine)
        created = {}
        for host in lab.hosts:
            for name, args in NETWORKS.items():
                started = time.monotonic()
                host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", *args, name)
                created[(host.name, name)] = time.monotonic() - started
        print("docker network create, seconds:", {f"{h}/{n}": round(s, 3) for (h, n), s in created.items()})
        for host in lab.hosts:
            for name in NETWORKS:
                host.docker("run", "-d", "--name", f"{name}-{host.name}", "--network", name, IMAGE,
                            "httpd", "-f", "-p", "80", "-h", "/www")
        yield lab


def inspect(host, container: str) -> dict:
    return json.loads(host.docker("inspect", container))[0]


def address(host, container: str, network: str) -> str:
    return inspect(host, container)["NetworkSettings"]["Networks"][network]["IPAddress"]


def in_netns(pid: int, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """A command of the host's, run in a container's network namespace."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, timeout=timeout)


def reaches(src_pid: int, dst_pid: int, dst_ip: str, proto: str, port: int = 5353) -> bool:
    """Whether a ping, an HTTP GET (to the container's httpd) or a UDP datagram (to a listener on `port`, unique
    per probe) from one container arrives at another."""
    if proto == "icmp":
        return in_netns(src_pid, "ping", "-c", "1", "-W", "1", dst_ip).returncode == 0
    if proto == "tcp":
        return HELLO in in_netns(src_pid, "timeout", "2", "busybox", "wget", "-qO-", f"http://{dst_ip}/").stdout
    listener = subprocess.Popen(["nsenter", "-t", str(dst_pid), "-n", "python3", "-c", UDP_LISTENER, str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    listener.stdout.readline()  # bound (a busy machine takes its time to start python)
    token = f"token-{port}"
    for _ in range(3):
        in_netns(src_pid, "python3", "-c", "import socket; socket.socket(socket.AF_INET,socket.SOCK_DGRAM)"
                 f".sendto(b'{token}', ('{dst_ip}', {port}))")
        time.sleep(0.1)
    return token in listener.communicate(timeout=10)[0]


def containers(lab) -> dict[tuple[str, str], tuple[int, str]]:
    """(network, host) -> (the container's PID, its address)."""
    return {(name, host.name): (inspect(host, f"{name}-{host.name}")["State"]["Pid"],
                                address(host, f"{name}-{host.name}", name))
            for host in lab.hosts for name in NETWORKS}


def test_each_network_is_a_flannel_network_of_its_own(nets):
    h1, h2 = nets.hosts
    for host in nets.hosts:
        env = {name: host.subnet_env(name) for name in ("front", "back")}
        assert ipaddress.IPv4Interface(env["front"]["FLANNEL_SUBNET"]).network.subnet_of(ipaddress.IPv4Network(FRONT))
        for name in ("front", "back"):  # (`docker network inspect` shows the --subnet given: the cluster's)
            lease = ipaddress.IPv4Interface(env[name]["FLANNEL_SUBNET"]).network
            assert ipaddress.IPv4Address(address(host, f"{name}-{host.name}", name)) in lease
    assert {nets.network_config(n)["Backend"]["VNI"] for n in ("front", "back")} == {2, 3}
    links = h1.sh("ip", "-o", "link")
    assert "flannel.1" in links and "flannel.2" in links and "flannel.3" in links
    # one Docker network per flannel network per host
    with pytest.raises(RuntimeError) as refused:
        h1.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
                  "pyflannel.network=front", "front2")
    assert "already has a Docker network on flannel network front" in str(refused.value)


def test_networks_are_isolated_in_every_direction_and_protocol(nets):
    found = containers(nets)
    probes = [(src, dst, proto) for src in found for dst in found if src != dst for proto in ("icmp", "tcp", "udp")]
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: reaches(found[probes[i][0]][0], found[probes[i][1]][0],
                                                  found[probes[i][1]][1], probes[i][2], 20000 + i),
                                range(len(probes))))
    print(f"{len(probes)} probes in {time.monotonic() - started:.1f}s")
    wrong = [(src, dst, proto, ok) for (src, dst, proto), ok in zip(probes, results) if ok != (src[0] == dst[0])]
    assert wrong == [], f"expected: same network reaches, other networks do not; wrong: {wrong}"


def test_flannels_forward_chain_stays_below_the_isolation_chains(nets):
    """FLANNEL-FWD accepts everything to and from the default Network (flanneld's rules, for a docker0 on the lease).
    Hooked above pyflannel's isolation chains, as flanneld inserts it, it lets another network's container in; the
    resync (-iptables-resync, 5 s) moves it back below them. Control: the same network still connects."""
    h1 = nets.hosts[0]
    found = containers(nets)
    front, overlay, front_h2 = found[("front", "h1")], found[("overlay0", "h1")], found[("front", "h2")]
    hook = ["-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]
    assert not reaches(front[0], overlay[0], overlay[1], "tcp")
    h1.sh("iptables", "-D", "FORWARD", *hook)
    h1.sh("iptables", "-I", "FORWARD", "1", *hook)
    assert reaches(front[0], overlay[0], overlay[1], "tcp"), "the attack: FLANNEL-FWD first lets front in"
    wait_until("FLANNEL-FWD moved back below the isolation chains",
               lambda: not h1.sh("iptables", "-S", "FORWARD").splitlines()[1].endswith("-j FLANNEL-FWD"), timeout=15)
    assert not reaches(front[0], overlay[0], overlay[1], "tcp")
    assert reaches(front[0], front_h2[0], front_h2[1], "tcp")


def sends(pid: int, source: str, dst_ip: str, port: int, token: str) -> None:
    """A UDP datagram from a container, from `source`: an address its network gave it, or one it took (spoofed)."""
    in_netns(pid, "ip", "addr", "add", f"{source}/32", "dev", "eth0")
    try:
        in_netns(pid, "python3", "-c", "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                 "s.bind((sys.argv[1],0)); [s.sendto(sys.argv[4].encode(), (sys.argv[2],int(sys.argv[3]))) for _ in "
                 "range(3)]", source, dst_ip, str(port), token)
    finally:
        in_netns(pid, "ip", "addr", "del", f"{source}/32", "dev", "eth0")


def listening(pid: int, port: int) -> subprocess.Popen:
    listener = subprocess.Popen(["nsenter", "-t", str(pid), "-n", str(VENV_BIN / "python"),
                                 str(REPO / "lab" / "listener.py"), str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.5)
    return listener


def heard(listener: subprocess.Popen) -> str:
    listener.kill()
    return listener.communicate(timeout=10)[0]


def test_a_container_neither_spoofs_nor_injects_vxlan(nets):
    """Issue 26 on Docker: a container of `front` sends from an overlay0 address to overlay0's container on its host
    (spoofing), and sends VXLAN frames of overlay0's VNI with such a source to the other host (injection). Neither
    arrives; the controls (another address of its own lease; the same frame from the host) do, and with the raw
    chains emptied both attacks do too."""
    h1, h2 = nets.hosts
    found = containers(nets)
    front, victim, remote = found[("front", "h1")], found[("overlay0", "h1")], found[("overlay0", "h2")]
    own_lease = ipaddress.IPv4Interface(h1.subnet_env("front")["FLANNEL_SUBNET"]).network
    spoofed = str(ipaddress.IPv4Interface(h1.subnet_env()["FLANNEL_SUBNET"]).network.network_address + 99)
    mac = next(n["attrs"]["BackendData"]["VtepMAC"] for n in nets.leases().values() if n["attrs"]["PublicIP"] == h2.ip)
    frame = [str(VENV_BIN / "python"), str(REPO / "lab" / "vxlan_frame.py"), h2.ip, "8472", "1", mac, spoofed,
             remote[1], "7001"]

    def attempt(tag: str) -> dict[str, bool]:
        near, far = listening(victim[0], 7000), listening(remote[0], 7001)
        sends(front[0], spoofed, victim[1], 7000, f"spoofed-{tag}")
        in_netns(front[0], *frame, f"injected-{tag}")
        h1.sh(*frame, f"control-{tag}")
        time.sleep(1)
        near_heard, far_heard = heard(near), heard(far)
        return {"spoofed": f"spoofed-{tag}" in near_heard, "injected": f"injected-{tag}" in far_heard,
                "control": f"control-{tag}" in far_heard}

    own = listening(found[("front", "h2")][0], 7003)
    sends(front[0], str(own_lease.network_address + 98), found[("front", "h2")][1], 7003, "own-lease")
    assert "own-lease" in heard(own)  # a container may send from any address of its network's lease
    assert attempt("guarded") == {"spoofed": False, "injected": False, "control": True}
    saved = h1.sh("iptables-save", "-t", "raw")
    try:
        for chain in ("PYFLANNEL-SOURCES", "PYFLANNEL-TUNNEL"):
            h1.sh("iptables", "-t", "raw", "-F", chain)
        assert attempt("unguarded") == {"spoofed": True, "injected": True, "control": True}
    finally:
        subprocess.run(["ip", "netns", "exec", h1.ns, "iptables-restore", "-T", "raw"], input=saved, text=True,
                       check=True)
    assert attempt("restored") == {"spoofed": False, "injected": False, "control": True}


def test_internal_network_has_no_way_out(nets):
    h1, h2 = nets.hosts
    found = containers(nets)
    for name, expected in (("front", True), ("back", False)):
        pid = found[(name, "h1")][0]
        got = in_netns(pid, "timeout", "3", "busybox", "wget", "-qO-", f"http://{OUTSIDE_IP}/cgi-bin/ip")
        assert (got.returncode == 0) == expected, (name, got)
    # -p on an --internal network publishes nothing (dockerd does not even ask the driver)
    h1.docker("run", "-d", "--name", "hidden", "--network", "back", "-p", "8099:80", IMAGE, "httpd", "-f", "-p", "80",
              "-h", "/www")
    assert "8099" not in h1.sh("iptables", "-t", "nat", "-S")
    assert HELLO not in h2.sh("timeout", "3", "busybox", "wget", "-qO-", f"http://{h1.ip}:8099/", check=False)
    h1.docker("rm", "-f", "hidden")


def test_network_rm_while_pyflanneld_is_down_leaves_once_it_is_back(nets):
    """dockerd removes its network whatever the driver answers: the driver removes everything of its own at once and
    leaves the flannel network at its next call after pyflanneld is back."""
    h1, _ = nets.hosts
    h1.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
              "pyflannel.network=spare", "spare")
    spare_bridge = "pfl-" + h1.docker("network", "inspect", "-f", "{{.Id}}", "spare").strip()[:8]
    before = h1.extra_links()
    h1.daemon.kill(signal.SIGTERM)
    h1.docker("network", "rm", "spare")
    assert before - h1.extra_links() == {spare_bridge}
    assert len(nets.leases("spare")) == 1  # pyflanneld was not there to leave
    h1.start_daemon()
    wait_until("pyflanneld serves spare again", lambda: any(
        n["name"] == "spare" and n["state"] == "ready" for n in Client(str(h1.api_sock)).networks()))
    h1.docker("run", "--rm", "--network", "overlay0", IMAGE, "echo")  # any call that starts a container
    assert nets.leases("spare") == {} and not h1.network_env("spare").exists()
    assert h1.extra_links() == before - {spare_bridge} - {f"flannel.{nets.network_config('spare')['Backend']['VNI']}"}


def test_leave_and_rejoin(nets):
    h1, h2 = nets.hosts
    lease = str(ipaddress.IPv4Interface(h2.subnet_env("front")["FLANNEL_SUBNET"]).network)
    h2.docker("rm", "-f", "front-h2")
    h2.docker("network", "rm", "front")
    assert [key.split("&")[0] for key in nets.leases("front")] == [  # (a dual-stack lease key has "&<IPv6 subnet>")
        str(ipaddress.IPv4Interface(h1.subnet_env("front")["FLANNEL_SUBNET"]).network).replace("/", "-")]
    assert "flannel.2" not in h2.sh("ip", "-o", "link") and not h2.network_env("front").exists()
    wait_until("h1 forgets h2's front subnet", lambda: lease not in h1.sh("ip", "route", "show", "proto", "77"))
    started = time.monotonic()
    h2.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", *NETWORKS["front"], "front")
    created = time.monotonic() - started
    h2.docker("run", "-d", "--name", "front-h2", "--network", "front", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www")
    running = time.monotonic() - started
    found = containers(nets)
    src, dst = found[("front", "h1")], found[("front", "h2")]
    wait_until("h1's front container reaches the new one", lambda: in_netns(
        src[0], "ping", "-c", "1", "-W", "0.2", dst[1]).returncode == 0, timeout=10, interval=0)
    print(f"re-join: network create {created:.2f}s, container running {running:.2f}s, reached from the other host "
          f"{time.monotonic() - started:.2f}s after the create began")


def vteps(host) -> dict[str, str]:
    """flannel.<VNI> -> its MAC, for every flannel device of the host."""
    return {name: host.sh("cat", f"/sys/class/net/{name}/address").strip()
            for name in host.sh("ls", "/sys/class/net").split() if name.startswith("flannel.")}


def test_restarts_keep_every_network(nets):
    """Leases, VNIs and VTEP MACs of every network survive pyflanneld, pyflannel-driver and dockerd restarts."""
    h1, h2 = nets.hosts
    before = {n: h1.subnet_env(n)["FLANNEL_SUBNET"] for n in ("front", "back")}
    macs = vteps(h1)
    assert len(macs) == 3
    h1.daemon.kill(signal.SIGTERM)
    h1.start_daemon()
    h1.driver.kill(signal.SIGKILL)
    h1.start_driver()
    wait_until("h1 serves front and back again", lambda: all(h1.network_env(n).exists() for n in before))
    h1.dockerd.kill(signal.SIGTERM, wait=30)
    h1.start_dockerd()
    h1.docker("start", *(f"{name}-h1" for name in NETWORKS))
    assert {n: h1.subnet_env(n)["FLANNEL_SUBNET"] for n in before} == before and vteps(h1) == macs
    assert {nets.network_config(n)["Backend"]["VNI"] for n in ("front", "back")} == {2, 3}
    found = containers(nets)
    for name in NETWORKS:
        assert reaches(found[(name, "h2")][0], found[(name, "h1")][0], found[(name, "h1")][1], "icmp"), name
    assert not reaches(found[("front", "h2")][0], found[("back", "h1")][0], found[("back", "h1")][1], "icmp")
    for host in nets.hosts:
        assert "Traceback" not in host.daemon.log() + host.driver.log()
