"""Containers that reach the world and can be reached, on real dockerd (20.10 and 26.1) managing its own iptables:
egress masquerade by default (never between flannel addresses), published ports (-p, /udp, ranges, -P) from
other machines, from the host itself and by hairpin, their survival across driver and dockerd restarts, and
--internal networks that get neither. The lab's "internet" is a namespace at 203.0.113.1 (lab/__init__.py)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from lab import IMAGE, OUTSIDE_IP, Lab, inside, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.docker]
HELLO = "hello from pyflannel"
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")
MASQ_OFF = "com.docker.network.bridge.enable_ip_masquerade=false"
UDP_ECHO = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 53))\n"
            "while True:\n    data, peer = s.recvfrom(512); s.sendto(b'echo ' + data, peer)\n")


@pytest.fixture(scope="module")
def ports_lab(docker_engine):
    with Lab(2) as lab:
        lab.outside_ns = lab.add_outside()
        yield lab.start_docker(docker_engine)


def make_network(lab, *options: str) -> None:
    for host in lab.hosts:
        host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", *options, "overlay0")


def our_rules(host) -> list[str]:
    """The rules in the driver's chains (the hooks into the built-in chains are not counted)."""
    rules = host.sh("iptables", "-t", "nat", "-S").splitlines() + host.sh("iptables", "-S").splitlines()
    return [r for r in rules if r.startswith(("-A PYFLANNEL-NAT-OUT", "-A PYFLANNEL-PORTS", "-A PYFLANNEL-ISOLATION",
                                              "-A PYFLANNEL-INPUT"))]


@pytest.fixture
def clean(ports_lab):
    """Whatever a test leaves (containers, overlay0) is removed, and with it every rule of the driver's."""
    yield ports_lab
    for host in ports_lab.hosts:
        host.docker_clear()
    for host in ports_lab.hosts:
        assert our_rules(host) == [], f"rules left on {host.name}"


def ip_of(host, name: str) -> str:
    return json.loads(host.docker("inspect", name))[0]["NetworkSettings"]["Networks"]["overlay0"]["IPAddress"]


def fetch(ns: str, url: str, timeout: int = 3) -> str:
    """busybox wget in a lab namespace (a host's or the outside's); "" when it fails. (Debian's static busybox
    crashes on wget -T: the time limit comes from timeout(1).)"""
    done = subprocess.run(["ip", "netns", "exec", ns, "timeout", str(timeout), "busybox", "wget", "-q", "-O-", url],
                          capture_output=True, text=True, timeout=timeout + 10)
    return done.stdout if done.returncode == 0 else ""


def in_container(host, name: str, *command: str) -> str:
    return host.docker("exec", name, *command, check=False)


def get_from(host, name: str, url: str, timeout: int = 3) -> str:
    """wget in a container; "" when it fails."""
    return in_container(host, name, "timeout", str(timeout), "wget", "-q", "-O-", url)


def caller(cgi_output: str) -> str:
    """/cgi-bin/ip's answer as an IPv4 address (busybox httpd on a dual-stack socket says [::ffff:a.b.c.d])."""
    return cgi_output.strip().removeprefix("[::ffff:").removesuffix("]")


def test_egress_is_masqueraded_and_overlay_traffic_is_not(clean):
    h1, h2 = clean.hosts
    make_network(clean)
    h1.docker("run", "-d", "--name", "c1", "--network", "overlay0", IMAGE, "sleep", "300")
    h2.docker("run", "-d", "--name", "web", "--network", "overlay0", IMAGE, *HTTPD)
    seen_outside = caller(get_from(h1, "c1", f"http://{OUTSIDE_IP}/cgi-bin/ip"))
    seen_by_peer = caller(get_from(h1, "c1", f"http://{ip_of(h2, 'web')}/cgi-bin/ip"))
    print(f"\nthe internet sees {seen_outside}; a container on h2 sees {seen_by_peer}")
    assert seen_outside == h1.ip
    assert seen_by_peer == ip_of(h1, "c1")


def test_masquerade_can_be_turned_off_per_network(clean):
    h1 = clean.hosts[0]
    make_network(clean, "-o", MASQ_OFF)
    h1.docker("run", "-d", "--name", "c1", "--network", "overlay0", IMAGE, "sleep", "300")
    assert not [r for r in our_rules(h1) if "MASQUERADE" in r and "! -d" in r]
    assert get_from(h1, "c1", f"http://{OUTSIDE_IP}/cgi-bin/ip") == ""


def test_published_ports_are_reachable_from_everywhere(clean):
    h1, h2 = clean.hosts
    make_network(clean)
    h1.docker("run", "-d", "--name", "web", "--network", "overlay0", "-p", "8080:80", IMAGE, *HTTPD)
    h1.docker("run", "-d", "--name", "other", "--network", "overlay0", IMAGE, "sleep", "300")
    url = f"http://{h1.ip}:8080/"
    reached = {
        "another host": fetch(h2.ns, url),
        "the internet": fetch(clean.outside_ns, url),
        "the host, by its address": fetch(h1.ns, url),
        "the host, as localhost": fetch(h1.ns, "http://127.0.0.1:8080/"),
        "a container on the host (hairpin)": get_from(h1, "other", url),
        "the container itself (hairpin)": get_from(h1, "web", url),
    }
    print("\n-p 8080:80 reached from: " + ", ".join(k for k, v in reached.items() if HELLO in v))
    assert all(HELLO in v for v in reached.values()), {k: v for k, v in reached.items() if HELLO not in v}
    # the server sees the other host's own address: DNAT only, no source NAT on the way in
    assert caller(fetch(h2.ns, f"http://{h1.ip}:8080/cgi-bin/ip")) == h2.ip
    # the same port again is refused, naming it
    with pytest.raises(RuntimeError) as refused:
        h1.docker("run", "-d", "--name", "clash", "--network", "overlay0", "-p", "8080:80", IMAGE, *HTTPD)
    assert "cannot publish port 80/tcp on 0.0.0.0:8080/tcp: the port is published already" in str(refused.value)


def test_udp_ranges_and_publish_all(clean):
    h1, h2 = clean.hosts
    make_network(clean)
    h1.docker("run", "-d", "--name", "dns", "--network", "overlay0", "-p", "5353:53/udp", IMAGE, "sleep", "300")
    pid = h1.docker("inspect", "-f", "{{.State.Pid}}", "dns").strip()
    echo = subprocess.Popen(["nsenter", "-t", pid, "-n", sys.executable, "-c", UDP_ECHO])
    try:
        def udp_reply():
            with inside(h2.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1)
                s.sendto(b"ping", (h1.ip, 5353))
                return s.recvfrom(512)[0]
        assert wait_until("a UDP answer through 5353/udp", udp_reply, timeout=10) == b"echo ping"
    finally:
        echo.kill()
        echo.wait()
    for name in ("r1", "r2"):
        h1.docker("run", "-d", "--name", name, "--network", "overlay0", "-p", "8090-8091:80", IMAGE, *HTTPD)
    assert HELLO in fetch(h2.ns, f"http://{h1.ip}:8090/") and HELLO in fetch(h2.ns, f"http://{h1.ip}:8091/")
    h1.docker("run", "-d", "--name", "all", "--network", "overlay0", "--expose", "80", "-P", IMAGE, *HTTPD)
    state = json.loads((h1.workdir / "driver" / "state.json").read_text())
    chosen = [p["host_port"] for ep in state["endpoints"].values() for p in ep.get("ports", [])
              if p["host_port"] >= 49153]
    assert len(chosen) == 1 and HELLO in fetch(h2.ns, f"http://{h1.ip}:{chosen[0]}/")
    print(f"\n5353/udp answered from h2; -p 8090-8091:80 twice -> 8090, 8091; -P -> {chosen[0]}")


def test_published_ports_survive_driver_and_dockerd_restarts(clean):
    h1, h2 = clean.hosts
    make_network(clean)
    h1.docker("run", "-d", "--name", "kept", "--restart", "always", "--network", "overlay0", "-p", "8081:80", IMAGE,
              *HTTPD)
    url = f"http://{h1.ip}:8081/"
    assert HELLO in fetch(h2.ns, url)
    h1.driver.kill(signal.SIGKILL)
    h1.start_driver()
    assert HELLO in fetch(h2.ns, url)
    assert len([r for r in our_rules(h1) if "--dport 8081" in r]) == 1
    h1.dockerd.kill(signal.SIGTERM, wait=30)
    h1.start_dockerd()
    wait_until("kept restarted and reachable", lambda: HELLO in fetch(h2.ns, url), timeout=60, interval=1)
    assert len([r for r in our_rules(h1) if "--dport 8081" in r]) == 1


def test_internal_network_reaches_its_overlay_only(clean):
    h1, h2 = clean.hosts
    make_network(clean, "--internal")
    h2.docker("run", "-d", "--name", "peer", "--network", "overlay0", IMAGE, "sleep", "300")
    h1.docker("run", "-d", "--name", "c1", "--network", "overlay0", "-p", "8082:80", IMAGE, *HTTPD)
    assert "1 packets received" in in_container(h1, "c1", "ping", "-c", "1", "-W", "2", ip_of(h2, "peer"))
    assert get_from(h1, "c1", f"http://{OUTSIDE_IP}/cgi-bin/ip") == ""
    assert fetch(h2.ns, f"http://{h1.ip}:8082/", timeout=2) == ""
    assert not [r for r in our_rules(h1) if "MASQUERADE" in r or "DNAT" in r]
