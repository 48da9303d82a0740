"""What an idle host costs etcd (issue 27), counted by etcd itself from its metrics, on etcd v2 and v3: hosts in the
default network and a named one, each publishing container names in both. At idle a host makes at most 0.1
requests/s, takes at most 1 KB/s from etcd (v3, whose metrics count bytes), and writes no key; a new name and a new
lease still reach every other host at once (through the one watch each host keeps)."""
from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from dnslib import DNSRecord

from pyflannel.localapi import Client
from lab import DNS_ADDRESS, inside, wait_until

pytestmark = pytest.mark.lab
IDLE_SECONDS = 30
REQUESTS_PER_SECOND = 0.1
BYTES_PER_SECOND = 1000


def etcd_metrics(lab) -> dict[str, float]:
    """etcd's counters of requests, key writes and bytes sent, summed over their labels."""
    with inside(lab.switch), urllib.request.urlopen(f"{lab.etcd_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {"requests": 0.0, "writes": 0.0, "sent_bytes": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        metric = name.split("{", 1)[0]
        if metric in ("grpc_server_started_total", "etcd_debugging_store_reads_total",
                      "etcd_debugging_store_watch_requests_total") or metric == "etcd_debugging_store_writes_total":
            found["requests"] += float(value)
        if metric in ("etcd_mvcc_put_total", "etcd_mvcc_delete_total") or (
                metric == "etcd_debugging_store_writes_total" and 'action="update"' not in name):
            found["writes"] += float(value)  # (a v2 TTL refresh is an "update": it writes no value, fires no watch)
        if metric == "etcd_network_client_grpc_sent_bytes_total":
            found["sent_bytes"] += float(value)
    return found


def publish(host, network: str, address: str, name: str) -> None:
    """One more container of `host` on `network`, handed to its pyflanneld with the others (as the driver does)."""
    host.published_names = getattr(host, "published_names", []) + [(network, address, name)]
    Client(str(host.api_sock)).publish([{"id": name, "networks": {n: {"address": a, "names": [name]}}}
                                        for n, a, name in host.published_names])


def resolves(host, name: str) -> list[str]:
    """The addresses the host's own DNS gives `name` (asked from the host: every network's names)."""
    with inside(host.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(DNSRecord.question(name).pack(), (DNS_ADDRESS, 53))
        reply = DNSRecord.parse(sock.recv(4096))
    return sorted(str(rr.rdata) for rr in reply.rr)


def address_in(host, network: str, index: int) -> str:
    gateway = (host.subnet_env(network) if network != "default" else host.subnet_env())["FLANNEL_SUBNET"]
    base, _ = gateway.split("/")
    return ".".join(base.split(".")[:3] + [str(10 + index)])


@pytest.mark.parametrize("etcd_api", ["v2", "v3"])
def test_an_idle_host_costs_etcd_next_to_nothing(make_lab, etcd_api):
    lab = make_lab(3, etcd_api=etcd_api)
    lab.set_config()
    for host in lab.hosts:
        host.start_daemon()
        Client(str(host.api_sock)).join("shop")
    for host in lab.hosts:
        for i, network in enumerate(("default", "shop", "default")):
            publish(host, network, address_in(host, network, i), f"{host.name}-{network}-{i}")
    h1, h2, h3 = lab.hosts
    wait_until("every name everywhere", lambda: all(resolves(h, f"{other.name}-shop-1") == [
        address_in(other, "shop", 1)] for h in lab.hosts for other in lab.hosts), timeout=15)
    time.sleep(5)  # the audits after start are done
    before = etcd_metrics(lab)
    time.sleep(IDLE_SECONDS)
    after = etcd_metrics(lab)
    per_host = {k: (after[k] - before[k]) / IDLE_SECONDS / len(lab.hosts) for k in before}
    print(f"\n{etcd_api}, idle, per host: {per_host['requests']:.3f} requests/s, {per_host['sent_bytes']:.0f} bytes/s "
          f"from etcd, {per_host['writes']:.3f} key writes/s")
    assert per_host["requests"] <= REQUESTS_PER_SECOND and per_host["writes"] == 0
    if etcd_api == "v3":
        assert per_host["sent_bytes"] <= BYTES_PER_SECOND
    # a change is one write that every host takes from its watch at once
    started = time.monotonic()
    publish(h1, "shop", address_in(h1, "shop", 5), "late")
    wait_until("the new name on h2 and h3", lambda: all(resolves(h, "late") == [address_in(h1, "shop", 5)]
                                                       for h in (h2, h3)), timeout=5, interval=0.01)
    print(f"a new name reached the other hosts' DNS in {(time.monotonic() - started) * 1000:.0f} ms")
