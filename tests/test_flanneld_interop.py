"""pyflanneld as a drop-in for a real flanneld (issue 28), with flanneld on the other hosts: flanneld's exact command
line, a Type=notify readiness socket, docker0-style bridges on the leases under FORWARD DROP, and new connections
into the swapped host's container from the other hosts all along the swap and back.

Needs a flanneld binary (FLANNELD_BIN; /work/shared/tools/build-flanneld.sh builds v0.13.0, which speaks etcd v2,
or v0.20.2, etcd v3); skipped without one, as in CI. The figures are printed (pytest -rP) for the README."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab import REPO, VENV_BIN, Host, NotifySocket, ping, wait_until

FLANNELD = os.environ.get("FLANNELD_BIN", "")
pytestmark = [pytest.mark.lab, pytest.mark.skipif(not os.access(FLANNELD, os.X_OK),
                                                  reason="FLANNELD_BIN names no flanneld binary (see the docstring)")]
PORT = 8080
PROBE_SECONDS = 90


def speaks_v3(binary: str) -> bool:
    """flannel >= 0.18 talks to etcd v3 (and has -iface-can-reach); older ones talk v2."""
    usage = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    return "iface-can-reach" in usage.stdout + usage.stderr


def flannel_command_line(lab, host: Host, v3: bool) -> list[str]:
    """What a flannel package's unit runs, flags in flannel's spellings (both dash forms, `-v 1`)."""
    reach = ["--iface-can-reach=192.0.2.2"] if v3 else ["-iface=eth0"]
    return [f"-etcd-endpoints={lab.etcd_endpoints}", "-etcd-prefix", lab.prefix_key, *reach, "-ip-masq",
            f"--subnet-file={host.subnet_file}", "-v", "1", "--iptables-forward-rules=true", "-iptables-resync=5",
            "-healthz-port=0"]


def start(lab, host: Host, program: str, argv: list[str], notify: NotifySocket):
    """flanneld or pyflanneld on `host`, with flanneld's argv; pyflannel's own settings come from its environment
    (FLANNELD_*), as an /etc/default file gives them, so the unit's command line stays flanneld's."""
    env = {"NOTIFY_SOCKET": notify.path, "FLANNELD_STATE_DIR": str(host.state_dir),
           "FLANNELD_API_SOCKET": str(host.api_sock), "FLANNELD_DNS_ADDRESS": ""}
    binary = FLANNELD if program == "flanneld" else str(VENV_BIN / "pyflanneld")
    return lab.spawn(f"{host.name}-{program}", [binary, *argv], ns=host.ns, env=env)


def iptables_rules(host: Host, table: str, chain: str) -> list[str]:
    return host.sh("iptables", "-t", table, "-S", chain).splitlines()


def vtep(host: Host) -> dict:
    link = json.loads(host.sh("ip", "-j", "-d", "link", "show", "flannel.1"))[0]
    return {"index": link["ifindex"], "mac": link["address"]}


def leases(lab) -> dict:
    """Every lease's subnet, address and VTEP MAC: what its peers program (flanneld v0.20 writes "PublicIPv6": null
    and v0.13 no VNI in BackendData, where pyflanneld leaves out the one and writes the other)."""
    return {key: (node["attrs"]["PublicIP"], node["attrs"]["BackendData"]["VtepMAC"])
            for key, node in lab.leases().items()}


def longest_gap(lines: list[str], since: float, until: float) -> tuple[float, int, int]:
    """The longest time between two successful tries within [since, until], and the tries and failures there."""
    tries = [(float(t), outcome) for t, outcome in (line.split() for line in lines if line.count(" ") == 1)]
    tries = [(t, outcome) for t, outcome in tries if since <= t <= until]
    oks = [since] + [t for t, outcome in tries if outcome == "ok"] + [until]
    return max(b - a for a, b in zip(oks, oks[1:])), len(tries), sum(outcome == "fail" for _, outcome in tries)


def test_swap_flanneld_for_pyflanneld_and_back(make_lab, tmp_path):
    v3 = speaks_v3(FLANNELD)
    lab = make_lab(3, etcd_api="v3" if v3 else "v2")
    lab.set_config({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
    notify = {h.name: NotifySocket(tmp_path / f"{h.name}.notify") for h in lab.hosts}
    daemons = {}
    for host in lab.hosts:  # one after another: flanneld's own watch misses leases made while it starts
        daemons[host.name] = start(lab, host, "flanneld", flannel_command_line(lab, host, v3), notify[host.name])
        wait_until(f"flanneld's subnet.env on {host.name}", host.subnet_file.exists, timeout=30)
        time.sleep(2)
    for host in lab.hosts:
        for iptables in ("iptables", "ip6tables"):  # dockerd starts after flanneld and sets FORWARD's policy
            host.sh(iptables, "-P", "FORWARD", "DROP")
        host.add_bridge("docker0")  # dockerd --bip=$FLANNEL_SUBNET
        host.add_container("docker0")
    target = lab.hosts[1]
    others = [h for h in lab.hosts if h is not target]
    lab.spawn(f"{target.name}c1-listener", [sys.executable, str(REPO / "lab" / "listener.py"), str(PORT)],
              ns=target.containers[0].ns)
    for other in others:
        try:
            wait_until(f"{other.name} reaches {target.name}'s container under flanneld",
                       lambda: ping(other.containers[0].ns, target.containers[0].ip, tries=1))
        except AssertionError:
            for h in lab.hosts:
                print(h.name, h.sh("ip", "route"), h.sh("ip", "neigh", "show", "dev", "flannel.1"),
                      h.sh("bridge", "fdb", "show", "dev", "flannel.1"), h.sh("iptables", "-S"),
                      h.sh("ip", "-d", "link", "show", "flannel.1"), lab.leases())
            raise
    probers = {other.name: lab.spawn(f"{other.name}c1-prober", [
        sys.executable, str(REPO / "lab" / "prober.py"), target.containers[0].ip, str(PORT), str(PROBE_SECONDS)],
        ns=other.containers[0].ns) for other in others}
    time.sleep(2)
    before = vtep(target)
    lease_before = leases(lab)
    figures = {}

    def swap(to: str) -> None:
        old = daemons[target.name]
        started = time.time()
        old.kill(signal.SIGTERM, wait=15)
        if old.kind == "pyflanneld":
            assert "STOPPING=1" in notify[target.name].states(), notify[target.name].states()
        notify[target.name].received.clear()
        daemons[target.name] = start(lab, target, to, flannel_command_line(lab, target, v3), notify[target.name])
        wait_until(f"READY=1 from {to} on {target.name}", lambda: "READY=1" in notify[target.name].states()
                   or not daemons[target.name].alive(), timeout=30)
        assert daemons[target.name].alive(), daemons[target.name].log()
        ready = time.time()
        time.sleep(3)  # connections keep being opened after the start too
        for other in others:
            gap, tries, failed = longest_gap(probers[other.name].log().splitlines(), started - 1, time.time())
            figures[f"to {to}: {other.name} -> {target.name}"] = dict(
                longest_gap_s=round(gap, 3), tries=tries, failed=failed, ready_after_s=round(ready - started, 2))
            assert gap <= 1.0, f"{other.name}'s new connections to {target.name} stopped for {gap:.2f} s"
            if to == "pyflanneld":  # the device, MAC, lease and chains are kept: nothing to wait for
                assert failed == 0, f"{failed} of {other.name}'s {tries} connections to {target.name} failed"
        assert vtep(target) == before, "the VXLAN device or its MAC changed: every peer had to follow"
        assert leases(lab) == lease_before, "a lease moved, or its VTEP MAC changed"
        for table, chain, hook in (("nat", "POSTROUTING", "FLANNEL-POSTRTG"), ("filter", "FORWARD", "FLANNEL-FWD")):
            hooks = [r for r in iptables_rules(target, table, chain) if "-j " in r and "FLANNEL" in r]
            assert hooks == [h for h in hooks if hook in h] and len(hooks) == 1, f"{chain} after the swap: {hooks}"
        for other in others:
            assert ping(target.containers[0].ns, other.containers[0].ip), f"{target.name} -> {other.name}"

    swap("pyflanneld")
    assert daemons[target.name].alive()
    swap("flanneld")
    for prober in probers.values():
        prober.kill(signal.SIGTERM)
    print(json.dumps({"flanneld": os.path.basename(FLANNELD), "etcd": "v3" if v3 else "v2", **figures}, indent=1))
    for n in notify.values():
        n.close()



@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual-stack"])
def test_flanneld_joins_a_named_network_pyflannel_created(make_lab, tmp_path, ipv6):
    """`flanneld -etcd-prefix <prefix>/shop` on a network that pyflanneld hosts made: containers reach each other
    both ways (the leases pyflanneld writes are ones flanneld can read); dual stack over an IPv6 underlay too."""
    from pyflannel.localapi import Client
    v3 = speaks_v3(FLANNELD)
    if ipv6 and not v3:
        pytest.skip("flanneld before v0.18 has no IPv6")
    lab = make_lab(3, etcd_api="v3" if v3 else "v2", underlay_ipv6=ipv6)
    lab.set_config()
    pyflannel_hosts, flannel_host = lab.hosts[:2], lab.hosts[2]
    for host in pyflannel_hosts:
        host.start_daemon()
        Client(str(host.api_sock)).join("shop", ipv6=ipv6)
        host.add_bridge("shopbr", "shop")
        host.add_container("shopbr", "shop")
    argv = flannel_command_line(lab, flannel_host, v3)
    argv[argv.index("-etcd-prefix") + 1] = f"{lab.prefix_key}/shop"
    if ipv6:  # -iface-can-reach finds no IPv6 address in flanneld v0.20
        argv = ["-iface=eth0" if a.startswith("--iface-can-reach") else a for a in argv]
    start(lab, flannel_host, "flanneld", argv, NotifySocket(tmp_path / "h3.notify"))
    wait_until("flanneld's subnet.env", flannel_host.subnet_file.exists, timeout=30)
    flannel_host.add_bridge("docker0")
    flannel_host.add_container("docker0")
    theirs = flannel_host.containers[0]
    for host in pyflannel_hosts:
        ours = host.containers[0]
        for family in ("ip", "ip6") if ipv6 else ("ip",):
            there, here = (theirs.ip6, ours.ip6) if family == "ip6" else (theirs.ip, ours.ip)
            assert there and here, f"no {family} address: {theirs}, {ours}"
            wait_until(f"{flannel_host.name} (flanneld) reaches {host.name}'s container over {family}",
                       lambda: ping(theirs.ns, here, tries=1))
            assert ping(ours.ns, there), f"{host.name}'s container does not reach flanneld's host over {family}"
