"""Hostile VXLAN (issue 26): crafted frames into another network's VNI, sent by a container to another host and to
its own, and by a machine outside the cluster, are dropped; the same frame sent by a cluster host arrives (the
control), and every attack arrives once the guard's chain is emptied (so the frames are valid and the guard is what
stops them). The allow-list follows the leases, and nothing of the guard outlives a leave or a stop."""
from __future__ import annotations

import ipaddress
import itertools
import json
import signal
import subprocess
import time

import pytest

from pyflannel.localapi import Client
from lab import REPO, SWITCH_IP, VENV_BIN, sh, wait_until

pytestmark = pytest.mark.lab
VICTIM_PORT = 7000
TOKENS = itertools.count(1)


def sets(host) -> set[str]:
    out = host.sh(str(VENV_BIN / "python"), "-c", "from pyflannel.kernel import ipset; "
                  "print(sorted(ipset.names('pyflannel')))")
    return set(eval(out))  # noqa: S307 - our own printout of a list of names


def members(host, name: str) -> set[str]:
    return set(json.loads(host.sh(str(VENV_BIN / "python"), "-c", "import json; from pyflannel.kernel import ipset;"
                                  f" print(json.dumps(sorted(ipset.members({name!r}))))")))


class Attack:
    """Frames of network b's VNI to the victim, a container of b on h2, claiming a source inside b."""

    def __init__(self, lab, victim, listener):
        self.lab, self.victim, self.listener = lab, victim, listener
        self.vni = lab.network_config("b")["Backend"]["VNI"]
        leases = lab.leases("b")
        h1, h2 = lab.hosts[:2]
        self.mac = next(n["attrs"]["BackendData"]["VtepMAC"] for n in leases.values()
                        if n["attrs"]["PublicIP"] == h2.ip)
        h1_lease = next(key for key, n in leases.items() if n["attrs"]["PublicIP"] == h1.ip).split("&")[0]
        self.spoofed = str(ipaddress.IPv4Network(h1_lease.replace("-", "/")).network_address + 77)

    def send(self, ns: str, to: str) -> str:
        token = f"token-{next(TOKENS)}"
        sh(str(VENV_BIN / "python"), str(REPO / "lab" / "vxlan_frame.py"), to, "8472", str(self.vni), self.mac,
           self.spoofed, self.victim.ip, str(VICTIM_PORT), token, ns=ns)
        return token

    def arrived(self, token: str) -> bool:
        return token in self.listener.log()


def test_vxlan_frames_come_only_from_cluster_hosts(make_lab):
    lab = make_lab(3)
    outside = lab.add_outside()
    lab.set_config()
    h1, h2, h3 = lab.hosts
    for host in (h1, h2):
        host.start_daemon("-ip-masq")
        Client(str(host.api_sock)).join("b")
        host.add_bridge("cbr0")
        host.add_bridge("cbrb", network="b")
    attacker, local_attacker = h1.add_container("cbr0"), h2.add_container("cbr0")
    victim = h2.add_container("cbrb", network="b")
    listener = lab.spawn("victim", [str(VENV_BIN / "python"), str(REPO / "lab" / "listener.py"),
                                    str(VICTIM_PORT)], ns=victim.ns)
    attack = Attack(lab, victim, listener)
    time.sleep(0.5)

    control = attack.send(h1.ns, h2.ip)  # a cluster host of network b: the frame is good and arrives
    wait_until("the control frame from h1", lambda: attack.arrived(control), timeout=5)
    attacks = {"a container, to another host": (attacker.ns, h2.ip),
               "a container, to its own host": (local_attacker.ns, h2.ip),
               "a container, to its own host's gateway": (local_attacker.ns, h2.subnet_env()["FLANNEL_SUBNET"]
                                                          .split("/")[0]),
               "outside the cluster": (outside, h2.ip)}
    sent = {what: attack.send(ns, to) for what, (ns, to) in attacks.items()}
    later = attack.send(h1.ns, h2.ip)
    wait_until("the control sent after the attacks", lambda: attack.arrived(later), timeout=5)
    time.sleep(0.5)
    assert [what for what, token in sent.items() if attack.arrived(token)] == []

    # the allow-list follows the leases: h3 joins b, and its frames arrive within 1 s of its lease
    h3.start_daemon()
    Client(str(h3.api_sock)).join("b")
    joined = time.monotonic()
    wait_until("h3's frames", lambda: attack.arrived(attack.send(h3.ns, h2.ip)), timeout=1.0, interval=0.01)
    admitted = time.monotonic() - joined
    Client(str(h3.api_sock)).leave("b")  # its lease is deleted: within 1 s its frames are dropped
    left = time.monotonic()
    wait_until("h3 out of b's set on h2", lambda: h3.ip not in members(h2, f"pyflannel-vtep-{attack.vni}"),
               timeout=1.0, interval=0.02)
    dropped_after = time.monotonic() - left
    assert not attack.arrived(attack.send(h3.ns, h2.ip))
    print(f"h3's frames accepted {admitted * 1000:.0f} ms after its join returned; dropped "
          f"{dropped_after * 1000:.0f} ms after its leave")

    # without the guard's chain the same attacks arrive: the frames were valid, the guard stopped them
    for host in (h1, h2):
        host.sh("iptables", "-t", "raw", "-F", "PYFLANNEL-TUNNEL")
    again = {what: attack.send(ns, to) for what, (ns, to) in attacks.items()}
    wait_until("every attack, unguarded", lambda: all(attack.arrived(t) for t in again.values()), timeout=5)


def test_nothing_of_the_guard_outlives_a_leave_or_a_stop(make_lab):
    lab = make_lab(2)
    lab.set_config()
    h1, h2 = lab.hosts
    for host in lab.hosts:
        host.start_daemon()
    Client(str(h1.api_sock)).join("b")
    vni = lab.network_config("b")["Backend"]["VNI"]
    assert sets(h1) == {"pyflannel-vtep-1", f"pyflannel-vtep-{vni}"}
    assert members(h1, "pyflannel-vtep-1") == {h2.ip}
    rules = h1.sh("iptables", "-t", "raw", "-S")
    assert "-A PREROUTING -j PYFLANNEL-TUNNEL" in rules and f"=0x{vni:x}" in rules
    Client(str(h1.api_sock)).leave("b")
    assert sets(h1) == {"pyflannel-vtep-1"} and f"=0x{vni:x}" not in h1.sh("iptables", "-t", "raw", "-S")
    # a peer whose lease goes leaves the set (after its routes)
    h2.daemon.kill(signal.SIGTERM)
    lab.etcd_delete(next(f"{lab.prefix_key}/subnets/{key}" for key, n in lab.leases().items()
                         if n["attrs"]["PublicIP"] == h2.ip))
    wait_until("h2 out of the set", lambda: members(h1, "pyflannel-vtep-1") == set(), timeout=2)
    assert h1.sh("ip", "route", "show", "proto", "77") == ""
    h1.daemon.kill(signal.SIGTERM)
    assert sets(h1) == set()
    for program in ("iptables", "ip6tables"):
        assert "PYFLANNEL" not in h1.sh(program, "-t", "raw", "-S")


def test_containers_cannot_reach_etcd_unless_allowed(make_lab):
    """A container cannot open a connection to the etcd endpoint pyflanneld uses; its host can (the control), and
    with -allow-container-etcd the container can too."""
    lab = make_lab(2)
    lab.set_config()
    for host in lab.hosts:  # (egress masqueraded: etcd's answer finds its way back to a container)
        host.start_daemon("-ip-masq")
        host.add_bridge()
        host.add_container()
    h1, h2 = lab.hosts
    connect = ("import socket,sys; s=socket.create_connection((sys.argv[1], 2379), timeout=2); "
               "s.sendall(b'GET /version HTTP/1.0\\r\\n\\r\\n'); print(s.makefile('rb').read().decode())")

    def reaches_etcd(ns: str) -> bool:
        done = subprocess.run(["ip", "netns", "exec", ns, str(VENV_BIN / "python"), "-c", connect, SWITCH_IP],
                              capture_output=True, text=True, timeout=20)
        return "etcdserver" in done.stdout

    assert reaches_etcd(h1.ns) and not reaches_etcd(h1.containers[0].ns)
    h2.daemon.kill(signal.SIGTERM)
    h2.subnet_file.unlink()
    h2.start_daemon("-ip-masq", "-allow-container-etcd")
    assert reaches_etcd(h2.containers[0].ns)
