"""Hosts that join a fresh network at the same moment (issue 25): three pyflanneld started together, round after
round, on a network without a lease folder, on etcd v2 and v3. Each host must route to both others within 1 s of
the last one being ready, and the watch's safety net must find nothing to repair.

The daemons reach etcd through a relay that holds each chunk RELAY_DELAY s each way, as a distant etcd would: the
time between one host's listing and its watch then spans the others' writes, and the race of issue 25 (a lease
written between two reads of a v2 listing) happens in most rounds without the fix instead of by luck."""
from __future__ import annotations

import ipaddress
import shutil
import signal
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import REPO, SWITCH_IP, VENV_BIN, _b64, inside, wait_until

pytestmark = pytest.mark.lab
ROUNDS = 20
PORT = 9472
RELAY = f"{SWITCH_IP}:2479"
RELAY_DELAY = 0.02


def subnet_of(host) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(host.subnet_env()["FLANNEL_SUBNET"]).network


def routed(host) -> set[ipaddress.IPv4Network]:
    return {ipaddress.IPv4Network(line.split()[0]) for line in host.sh("ip", "route", "show", "proto", "77")
            .splitlines() if line.strip()}


def fresh_network(lab) -> None:
    """Every daemon stopped, the lease folder gone, each host without its old subnet, device or routes."""
    for host in lab.hosts:
        host.daemon.kill(signal.SIGTERM)
    if lab.etcd_api == "v2":
        lab.etcd_request("DELETE", f"{lab.prefix_key}/subnets", recursive="true")
    else:
        prefix = f"{lab.prefix_key}/subnets/"
        lab.etcd_v3("kv/deleterange", {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")})
    for host in lab.hosts:
        host.subnet_file.unlink(missing_ok=True)
        shutil.rmtree(host.state_dir, ignore_errors=True)
        host.sh("ip", "link", "del", "flannel.1", check=False)


def audit_repairs(lab, host) -> float:
    with inside(lab.switch):
        with urllib.request.urlopen(f"http://{host.ip}:{PORT}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "pyflannel_lease_audit_repairs_total")


@pytest.mark.parametrize("etcd_api", ["v2", "v3"])
def test_hosts_that_start_together_route_to_each_other_at_once(make_lab, etcd_api):
    lab = make_lab(3, etcd_api=etcd_api)
    lab.set_config()
    lab.spawn("etcd-relay", [str(VENV_BIN / "python"), str(REPO / "lab" / "slow_relay.py"), RELAY,
                             f"{SWITCH_IP}:2379", str(RELAY_DELAY)], ns=lab.switch)
    lab.etcd_endpoints = f"http://{RELAY}"
    waits = []
    for round_ in range(ROUNDS):
        if round_:
            fresh_network(lab)
        for host in lab.hosts:  # all three at once: each lists the fresh network while the others write
            host.start_daemon("-healthz-ip", host.ip, "-healthz-port", str(PORT), wait_ready=False)
        wait_until("every subnet.env", lambda: all(h.subnet_file.exists() for h in lab.hosts) or
                   not all(h.daemon.alive() for h in lab.hosts), timeout=30)
        assert all(h.daemon.alive() for h in lab.hosts), lab.logs()
        ready = time.monotonic()
        subnets = {host.name: subnet_of(host) for host in lab.hosts}
        wanted = {host.name: {s for name, s in subnets.items() if name != host.name} for host in lab.hosts}
        try:
            wait_until("every host's route to both others", lambda: all(
                wanted[h.name] <= routed(h) for h in lab.hosts), timeout=1.0, interval=0.02)
        except AssertionError:
            missing = {h.name: wanted[h.name] - routed(h) for h in lab.hosts}
            pytest.fail(f"round {round_ + 1}: routes missing 1 s after start: {missing}")
        waits.append(time.monotonic() - ready)
    # the last round runs on until the audit after start has run on every host: it must have found nothing
    time.sleep(3)
    assert [audit_repairs(lab, host) for host in lab.hosts] == [0, 0, 0]
    print(f"{etcd_api}: {ROUNDS}/{ROUNDS} rounds, routes complete {max(waits) * 1000:.0f} ms at most after the "
          f"last host was ready (median {sorted(waits)[len(waits) // 2] * 1000:.0f} ms)")
