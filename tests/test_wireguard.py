"""The wireguard backend on a 3-host lab (wireguard-go: this kernel has no WireGuard module): flannel's lease format,
container traffic encrypted on the underlay, keys kept across restarts, peers following leases, key rotation under
traffic."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyflannel.kernel import wireguard as wg
from pyflannel.localapi import Client, DaemonError
from lab import IMAGE, REPO, VENV_BIN, Lab, exited, ping, sh, wait_until

pytestmark = pytest.mark.lab

PSK = base64.b64encode(b"pyflannel-test-preshared-key-32b").decode()
CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "PSK": PSK, "PersistentKeepaliveInterval": 25}}
MARKER = b"pyflannel-secret"  # ping's payload pattern: 16 bytes, repeated through each packet


@pytest.fixture(scope="module")
def lab():
    with Lab(3) as lab:
        lab.start_network(CONFIG)
        yield lab


def peers(host) -> set[wg.WireGuardPeer]:
    code, pairs = wg.uapi_call(str(host.wireguard_dir / "flannel-wg.sock"), "get=1", [])
    assert code == 0
    return wg._peers_from_uapi(pairs)


def public_key(lab, host) -> str:
    return next(lease["attrs"]["BackendData"]["PublicKey"] for lease in lab.leases().values()
                if lease["attrs"]["PublicIP"] == host.ip)


def expected_peers(lab, host) -> set[wg.WireGuardPeer]:
    return {wg.WireGuardPeer(lease["attrs"]["BackendData"]["PublicKey"], f"{lease['attrs']['PublicIP']}:51820",
                             (key.replace("-", "/"),), 25, PSK)
            for key, lease in lab.leases().items() if lease["attrs"]["PublicIP"] != host.ip}


def test_leases_devices_and_peers_as_flannel_has_them(lab):
    leases = lab.leases()
    assert len(leases) == 3
    for host in lab.hosts:
        lease = next(lease for lease in leases.values() if lease["attrs"]["PublicIP"] == host.ip)
        assert lease["attrs"]["BackendType"] == "wireguard"
        assert set(lease["attrs"]["BackendData"]) == {"PublicKey", "Port"}
        assert lease["attrs"]["BackendData"]["Port"] == 51820
        key_file = host.state_dir / "wireguard.key"
        assert os.stat(key_file).st_mode & 0o777 == 0o600
        assert wg.public_key_of(key_file.read_text().strip()) == lease["attrs"]["BackendData"]["PublicKey"]
        assert host.subnet_env()["FLANNEL_MTU"] == "1420"  # the underlay's 1500 less WireGuard's 80
        assert "mtu 1420" in host.sh("ip", "link", "show", "flannel-wg")
        assert peers(host) == expected_peers(lab, host)
        routes = host.sh("ip", "route", "show", "proto", "77", "dev", "flannel-wg")
        assert len(routes.splitlines()) == 2
        assert "wireguard-go" in host.daemon.log()  # the implementation chosen is reported at start


def test_container_traffic_is_encrypted_on_the_underlay(lab):
    h1, h2, _ = lab.hosts
    capture = lab.workdir / "underlay.pcap"
    tcpdump = lab.spawn("tcpdump", ["tcpdump", "-Z", "root", "-i", "port1", "-nn", "--immediate-mode", "-U", "-w", str(capture),
                                    f"ip and host {h1.ip} and host {h2.ip}"], ns=lab.switch)
    wait_until("tcpdump listening", lambda: "listening on" in tcpdump.log(), timeout=10)
    src, dst = h1.containers[0], h2.containers[0]
    out = sh("ping", "-c", "5", "-i", "0.2", "-s", "200", "-p", MARKER.hex(), dst.ip, ns=src.ns)
    assert "5 received" in out and "PATTERN" in out
    tcpdump.kill(signal.SIGINT)
    packets = subprocess.run(["tcpdump", "-nn", "-r", str(capture)], capture_output=True, text=True,
                             check=True).stdout
    lines = packets.splitlines()
    print(f"underlay between {h1.name} and {h2.name}: {len(lines)} packets, all UDP 51820 <-> 51820")
    assert len(lines) >= 10, tcpdump.log()
    both = rf"({re.escape(h1.ip)}|{re.escape(h2.ip)})\.51820"
    assert all(re.search(rf"IP {both} > {both}: UDP", line) for line in lines), packets
    assert MARKER not in capture.read_bytes()


def test_a_peer_removed_by_hand_comes_back(lab):
    h1, h2, _ = lab.hosts
    gone = next(iter(peers(h1)))
    code, _ = wg.uapi_call(str(h1.wireguard_dir / "flannel-wg.sock"), "set=1",
                           [f"public_key={base64.b64decode(gone.public_key).hex()}", "remove=true"])
    assert code == 0 and gone not in peers(h1)
    started = time.monotonic()
    wait_until("the peer back", lambda: gone in peers(h1), timeout=15)  # the reconciler runs every 10 s
    print(f"a WireGuard peer removed by hand was back after {time.monotonic() - started:.1f} s")


def test_doctor_on_a_wireguard_host(lab):
    """Clean: nothing found (MTU 1500 - 80, every peer); an INPUT rule dropping UDP 51820 is named, with its fix."""
    h1 = lab.hosts[0]
    doctor = h1.with_own_run_wireguard(str(VENV_BIN / "pyflannel"), "doctor", "--json", "-etcd-endpoints",
                                       lab.etcd_url, "-subnet-file", str(h1.subnet_file), "-api-socket",
                                       str(h1.api_sock))
    report = json.loads(h1.sh(*doctor))
    assert report["problems"] == 0 and report["checks"]["wireguard"] == "ok" and report["checks"]["mtu"] == "ok"
    rule = ["INPUT", "-p", "udp", "-m", "udp", "--dport", "51820", "-j", "DROP"]
    h1.sh("iptables", "-I", *rule)
    try:
        done = subprocess.run(["ip", "netns", "exec", h1.ns, *doctor], capture_output=True, text=True, timeout=60)
        found = [f for f in json.loads(done.stdout)["findings"] if f["severity"] == "problem"]
        assert done.returncode == 1 and [f["check"] for f in found] == ["wireguard"], found
        assert "drops WireGuard (UDP 51820)" in found[0]["message"]
        assert found[0]["fix"] == "iptables -D " + " ".join(rule)
    finally:
        h1.sh("iptables", "-D", *rule)


def test_every_container_reaches_every_other(lab):
    failures = [(a.ip, b.ip) for x in lab.hosts for y in lab.hosts if x is not y
                for a in x.containers for b in y.containers if not ping(a.ns, b.ip)]
    assert failures == []


def test_restart_and_reboot_keep_the_key(lab):
    h1, h2, _ = lab.hosts
    key = public_key(lab, h1)
    h1.daemon.kill(signal.SIGTERM)
    h1.start_daemon()
    wait_until("h1 restarted", lambda: "reusing flannel-wg" in h1.daemon.log(), timeout=20)
    # a reboot: the device (and wireguard-go with it) and /run's subnet.env are gone; the state dir stays
    h1.daemon.kill(signal.SIGTERM)
    h1.sh("ip", "link", "del", "flannel-wg")
    h1.subnet_file.unlink()
    h1.start_daemon()
    assert "created flannel-wg (wireguard-go" in h1.daemon.log()
    assert public_key(lab, h1) == key
    wait_until("h2 reaches h1 again", lambda: ping(h2.containers[0].ns, h1.containers[0].ip, tries=1), timeout=20)
    assert peers(h2) == expected_peers(lab, h2)


def test_key_rotation_under_traffic(lab):
    h1, h2, h3 = lab.hosts
    old = public_key(lab, h1)
    interval, count = 0.01, 500
    pinger = subprocess.Popen(["ip", "netns", "exec", h2.containers[0].ns, "ping", "-q", "-i", str(interval), "-c",
                               str(count), "-W", "1", h1.containers[0].ip], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    rotated = subprocess.run([str(VENV_BIN / "pyflannel"), "rotate-key", "-api-socket", str(h1.api_sock)],
                             capture_output=True, text=True, timeout=30)
    assert rotated.returncode == 0, rotated.stderr
    new = public_key(lab, h1)
    assert new != old and new in rotated.stdout
    assert wg.public_key_of((h1.state_dir / "wireguard.key").read_text().strip()) == new
    summary = pinger.communicate(timeout=60)[0]
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", summary).groups())
    gap = (sent - received) * interval
    print(f"key rotation under traffic: {sent - received} of {sent} pings lost ({gap:.2f} s at {interval} s)")
    assert gap < 5.0  # less than one handshake retry (WireGuard's REKEY_TIMEOUT)
    for host in (h2, h3):
        assert peers(host) == expected_peers(lab, host)
        assert ping(host.containers[0].ns, h1.containers[0].ip)


def test_a_removed_lease_removes_the_peer(lab):
    h1, h2, h3 = lab.hosts
    key = public_key(lab, h3)
    h3.daemon.kill(signal.SIGTERM)
    lease = next(k for k, v in lab.leases().items() if v["attrs"]["PublicIP"] == h3.ip)
    lab.etcd_delete(f"{lab.prefix_key}/subnets/{lease}")
    for host in (h1, h2):
        wait_until(f"{host.name} drops h3's peer", lambda: all(p.public_key != key for p in peers(host)), timeout=10)
        assert lease.replace("-", "/") not in host.sh("ip", "route", "show", "proto", "77")
    h3.start_daemon()
    wait_until("h3's lease back", lambda: len(lab.leases()) == 3, timeout=20)
    wait_until("h3's peers back", lambda: all(peers(h) == expected_peers(lab, h) for h in lab.hosts), timeout=20)
    assert public_key(lab, h3) == key
    assert ping(h1.containers[0].ns, h3.containers[0].ip)


# --- Docker: the default network and a named one on wireguard ---------------------------------------------------------
@pytest.fixture(scope="module")
def docker_lab(docker_engine):
    with Lab(2) as lab:
        lab.start_docker(docker_engine, config=CONFIG)
        for host in lab.hosts:
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
                        "pyflannel.network=vault", "--ipam-opt", "pyflannel.backend=wireguard", "vault")
        yield lab
        for host in lab.hosts:  # removed at once: dockerd would give each 10 s to stop
            containers = host.docker("ps", "-aq").split()
            if containers:
                host.docker("rm", "-f", *containers)


@pytest.mark.docker
def test_docker_containers_reach_each_other_over_wireguard(docker_lab):
    h1, h2 = docker_lab.hosts
    vault = docker_lab.network_config("vault")
    assert vault["Backend"] == {"Type": "wireguard", "VNI": 2, "ListenPort": 51821}
    for host in docker_lab.hosts:
        assert "mtu 1420" in host.sh("ip", "link", "show", "flannel-wg.2")
        assert host.network_env("vault").exists()
    for network in ("overlay0", "vault"):
        h2.docker("run", "-d", "--name", f"target-{network}", "--network", network, IMAGE, "sleep", "600")
        ip = h2.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                       f"target-{network}").strip()
        out = h1.docker("run", "--rm", "--network", network, IMAGE, "sh", "-c",
                        f"cat /sys/class/net/eth0/mtu; ping -c 2 -W 2 {ip}", timeout=60)
        assert out.splitlines()[0] == "1420" and "2 packets received" in out, out
    leases = docker_lab.leases("vault")
    assert {lease["attrs"]["BackendData"]["Port"] for lease in leases.values()} == {51821}
    with pytest.raises(DaemonError) as refused:
        Client(str(h1.api_sock)).join("vault", backend="vxlan")
    assert refused.value.status == 409 and "uses the wireguard backend" in str(refused.value)


# --- a restart under systemd: wireguard-go stays ------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")  # this machine's cgroup v2 hierarchy (where systemd puts its units)


def cgroup_pids(cgroup: str) -> list[int]:
    return [int(pid) for pid in (CGROUP_ROOT / cgroup / "cgroup.procs").read_text().split()]


def systemd_stop(main_pid: int, cgroup: str, kill_mode: str) -> None:
    """`systemctl stop` as systemd.kill(5) has it: SIGTERM to every process of the unit's cgroup (KillMode=
    control-group), or to the main process only (process; mixed: the rest get SIGKILL once it is gone)."""
    for pid in cgroup_pids(cgroup) if kill_mode == "control-group" else [main_pid]:
        os.kill(pid, signal.SIGTERM)
    wait_until("the main process gone", lambda: exited(main_pid), timeout=15)
    if kill_mode == "mixed":
        for pid in cgroup_pids(cgroup):
            os.kill(pid, signal.SIGKILL)


def wireguard_go_in(cgroup: str) -> list[int]:
    return [pid for pid in cgroup_pids(cgroup) if Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go"]


@pytest.mark.skipif(not (CGROUP_ROOT / "cgroup.procs").exists(), reason="no cgroup v2 hierarchy")
def test_wireguard_go_outlives_a_restart_under_the_unit(make_lab, tmp_path):
    """pyflanneld in a cgroup of its own, as its unit runs it, stopped as systemd stops it with the unit's KillMode
    and started again: wireguard-go, started by the first pyflanneld into that cgroup, goes on and the next one
    adopts it; container traffic does not stop."""
    subprocess.run(["make", "-s", "units", f"UNITDIR={tmp_path}", f"BINDIR={VENV_BIN}"], cwd=REPO, check=True)
    kill_mode = next((line.split("=", 1)[1] for line in (tmp_path / "pyflanneld.service").read_text().splitlines()
                      if line.startswith("KillMode=")), "control-group")
    lab = make_lab(2)
    cgroup = f"{lab.tag}-pyflanneld.service"
    (CGROUP_ROOT / cgroup).mkdir()
    # `ip netns exec` mounts a /sys without cgroups: the wrapper mounts the hierarchy to join the unit's cgroup
    into_unit = ("sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && echo $$ > "/sys/fs/cgroup/$0/cgroup.procs" && '
                 'exec "$@"', cgroup)
    try:
        lab.set_config(CONFIG)
        h1, h2 = lab.hosts
        h1.start_daemon(wrapper=into_unit)
        h2.start_daemon()
        for host in lab.hosts:
            host.add_bridge()
            host.add_container()
        src, dst = h2.containers[0], h1.containers[0]
        wait_until("h2 reaches h1", lambda: ping(src.ns, dst.ip, tries=1), timeout=20)
        [wireguard_go] = wireguard_go_in(cgroup)
        interval, count = 0.01, 600
        pinger = subprocess.Popen(["ip", "netns", "exec", src.ns, "ping", "-q", "-i", str(interval), "-c",
                                   str(count), "-W", "1", dst.ip], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        systemd_stop(h1.daemon.pid, cgroup, kill_mode)
        survived = not exited(wireguard_go)
        h1.start_daemon(wrapper=into_unit)  # the log goes on in the same file: the second start's line
        wait_until("h1 serving again", lambda: h1.daemon.log().count(" flannel-wg (") == 2, timeout=20)
        summary = pinger.communicate(timeout=60)[0]
        sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", summary).groups())
        print(f"\nKillMode={kill_mode}: wireguard-go {'kept' if survived else 'killed'} through a restart, "
              f"{sent - received} of {sent} pings lost ({(sent - received) * interval:.2f} s at {interval} s)")
        assert kill_mode == "process" and survived and wireguard_go_in(cgroup) == [wireguard_go]
        assert "reusing flannel-wg" in h1.daemon.log() and sent - received == 0
    finally:
        for pid in cgroup_pids(cgroup):
            os.kill(pid, signal.SIGKILL)
        # (EBUSY until the killed processes are gone)
        wait_until("the unit's cgroup removed", lambda: (CGROUP_ROOT / cgroup).rmdir() is None, timeout=10)
