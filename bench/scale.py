"""`make bench-scale`: what a cluster costs etcd and each host, measured with real daemons and a large keyspace.

H real pyflanneld daemons in lab namespaces (etcd v3), each serving the default network and two named ones with
C containers' names published in each, plus S simulated hosts whose leases and names are written straight to etcd
(their PublicIPs are addresses of the benchmarking range 198.18.0.0/15 that no namespace holds: nothing is ever sent
to them). It prints, per real host at idle: etcd requests/s and bytes/s (etcd's own metrics), daemon CPU and RSS;
then how long a new name and a new lease take to reach every real host (DNS answer, kernel route), p50 and p99;
and etcd's CPU beside it. With FLANNELD_BIN, flanneld's figures on the same harness are meant to stand beside these
(see docs/benchmarks.md for what was run).

    BENCH_SCALE="H,S" python -m bench.scale      (default "10,0 10,1000")
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from dnslib import DNSRecord

from pyflannel.localapi import Client
from tests.lab import DNS_ADDRESS, Lab, inside, wait_until

NETWORKS = ("default", "n1", "n2")
SECOND_OCTET = {"default": 5, "n1": 128, "n2": 129}  # their Networks: 10.5.0.0/16, 10.128.0.0/16, 10.129.0.0/16
CONTAINERS = int(os.environ.get("BENCH_SCALE_CONTAINERS", "10"))
IDLE_SECONDS = int(os.environ.get("BENCH_SCALE_IDLE_SECONDS", "30"))
SAMPLES = 20


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def etcd_counters(lab) -> dict[str, float]:
    with inside(lab.switch), urllib.request.urlopen(f"{lab.etcd_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {"requests": 0.0, "sent_bytes": 0.0, "cpu_s": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        metric = name.split("{", 1)[0]
        key = {"grpc_server_started_total": "requests", "etcd_network_client_grpc_sent_bytes_total": "sent_bytes",
               "process_cpu_seconds_total": "cpu_s"}.get(metric)
        if key:
            found[key] += float(value)
    return found


def process_cpu_rss(pid: int) -> tuple[float, float]:
    """CPU seconds so far and RSS in MB of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return (int(fields[11]) + int(fields[12])) / ticks, rss_kb / 1024


def simulate(lab, hosts: int) -> None:
    """`hosts` simulated hosts: a lease and CONTAINERS names in every network, written in transactions of 100."""
    ops = []
    for network in NETWORKS:
        top = lab.prefix_key if network == "default" else f"{lab.prefix_key}/{network}"
        subnets = list(ipaddress.IPv4Network(f"10.{SECOND_OCTET[network]}.0.0/16").subnets(new_prefix=28))[1000:]
        for i in range(hosts):  # (at most 3000: the /28s after the first 1000, which the real hosts pick from)
            public_ip = f"198.18.{i // 250}.{1 + i % 250}"
            subnet = subnets[i]
            value = json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                                "BackendData": {"VNI": 1, "VtepMAC": f"0e:00:{i >> 8 & 255:02x}:{i & 255:02x}:00:01"}})
            key = f"{top}/subnets/{subnet.network_address}-28"
            ops.append({"request_put": {"key": _b64(key), "value": _b64(value)}})
            for c in range(CONTAINERS):
                address = str(subnet.network_address + 2 + c)
                record = json.dumps({"names": [f"sim{i}-{c}"], "address": address})
                ops.append({"request_put": {"key": _b64(f"{top}/names/{public_ip}/{address}"), "value": _b64(record)}})
    for start in range(0, len(ops), 100):
        lab.etcd_v3("kv/txn", {"success": ops[start:start + 100]})


def resolves(host, name: str) -> bool:
    with inside(host.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(DNSRecord.question(name).pack(), (DNS_ADDRESS, 53))
        return bool(DNSRecord.parse(sock.recv(4096)).rr)


def routed(host, subnet: str) -> bool:
    return subnet in host.sh("ip", "route", "show", "proto", "77", "to", subnet)


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def lease_address(host, network: str, offset: int) -> str:
    env = host.subnet_env("" if network == "default" else network)
    return str(ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network.network_address + offset)


def publish(host, extra: list[tuple[str, str, str]] = ()) -> None:
    """CONTAINERS containers of `host` in every network, and `extra` (network, address, name), as the driver would."""
    containers = [{"id": f"{network}-{c}", "networks": {network: {"address": lease_address(host, network, 2 + c),
                                                                  "names": [f"{host.name}-{network}-{c}"]}}}
                  for network in NETWORKS for c in range(CONTAINERS)]
    containers += [{"id": name, "networks": {network: {"address": address, "names": [name]}}}
                   for network, address, name in extra]
    Client(str(host.api_sock)).publish(containers)


def run(real: int, simulated: int) -> dict:
    lab = Lab(real, etcd_api="v3")
    try:
        for vni, network in enumerate(NETWORKS, start=1):
            config = {"Network": f"10.{SECOND_OCTET[network]}.0.0/16", "SubnetLen": 28,
                      "Backend": {"Type": "vxlan", "VNI": vni}}
            if network == "default":
                lab.set_config(config)
            else:
                lab.etcd_put(f"{lab.prefix_key}/{network}/config", json.dumps(config))
        simulate(lab, simulated)
        for host in lab.hosts:
            host.start_daemon()
        for host in lab.hosts:
            for network in NETWORKS[1:]:
                Client(str(host.api_sock)).join(network)
            publish(host)
        last = lab.hosts[-1]
        wait_until("every name everywhere", lambda: all(resolves(h, f"{last.name}-n2-{CONTAINERS - 1}")
                                                        for h in lab.hosts), timeout=120)
        time.sleep(5)  # the audits after start are done
        before, cpu = etcd_counters(lab), {h.name: process_cpu_rss(h.daemon.pid) for h in lab.hosts}
        time.sleep(IDLE_SECONDS)
        after, cpu_after = etcd_counters(lab), {h.name: process_cpu_rss(h.daemon.pid) for h in lab.hosts}
        figures = {"real": real, "simulated": simulated, "networks": len(NETWORKS), "containers": CONTAINERS,
                   "idle_requests_per_s_per_host": (after["requests"] - before["requests"]) / IDLE_SECONDS / real,
                   "idle_bytes_per_s_per_host": (after["sent_bytes"] - before["sent_bytes"]) / IDLE_SECONDS / real,
                   "idle_etcd_cpu_percent": (after["cpu_s"] - before["cpu_s"]) / IDLE_SECONDS * 100,
                   "idle_daemon_cpu_percent": max((cpu_after[n][0] - cpu[n][0]) / IDLE_SECONDS * 100 for n in cpu),
                   "daemon_rss_mb": max(rss for _, rss in cpu_after.values())}
        first, others = lab.hosts[0], lab.hosts[1:]
        names, leases, extra = [], [], []
        for i in range(SAMPLES):
            extra.append(("n1", lease_address(first, "n1", 2 + i % 12), f"late{i}"))
            started = time.monotonic()
            publish(first, extra)
            wait_until("the new name everywhere", lambda: all(resolves(h, f"late{i}") for h in others), timeout=30,
                       interval=0.005)
            names.append(time.monotonic() - started)
            subnet = f"10.5.{240 + i // 16}.{i % 16 * 16}/28"
            started = time.monotonic()
            lab.etcd_put(f"{lab.prefix_key}/subnets/{subnet.replace('/', '-')}", json.dumps(
                {"PublicIP": f"198.19.0.{1 + i}", "PublicIPv6": None, "BackendType": "vxlan",
                 "BackendData": {"VNI": 1, "VtepMAC": f"0e:00:ff:00:00:{i:02x}"}}))
            wait_until("the new lease everywhere", lambda: all(routed(h, subnet) for h in lab.hosts), timeout=30,
                       interval=0.005)
            leases.append(time.monotonic() - started)
        figures["name_propagation_s"] = percentiles(names)
        figures["lease_propagation_s"] = percentiles(leases)
        return figures
    finally:
        lab.close()


def table(rows: list[dict]) -> str:
    lines = [f"{'real + simulated hosts':24} {'req/s/host':>10} {'B/s/host':>9} {'daemon CPU %':>12} {'RSS MB':>7} "
             f"{'etcd CPU %':>10} {'name p50/p99 s':>15} {'lease p50/p99 s':>16}"]
    for r in rows:
        lines.append(f"{r['real']:>6} + {r['simulated']:<15} {r['idle_requests_per_s_per_host']:10.3f} "
                     f"{r['idle_bytes_per_s_per_host']:9.0f} {r['idle_daemon_cpu_percent']:12.2f} "
                     f"{r['daemon_rss_mb']:7.1f} {r['idle_etcd_cpu_percent']:10.1f} "
                     f"{r['name_propagation_s'][0]:7.3f}/{r['name_propagation_s'][1]:.3f} "
                     f"{r['lease_propagation_s'][0]:8.3f}/{r['lease_propagation_s'][1]:.3f}")
    lines.append("targets: <= 0.1 req/s and <= 1000 B/s per host at idle, daemon CPU <= 0.5 %, RSS <= 50 MB, "
                 "propagation p99 <= 1 s")
    if not os.environ.get("FLANNELD_BIN"):
        lines.append("flanneld: not measured (FLANNELD_BIN not given; ../shared/tools/build-flanneld.sh builds one)")
    return "\n".join(lines)


def main() -> int:
    runs = [tuple(int(x) for x in spec.split(",")) for spec in os.environ.get("BENCH_SCALE", "10,0 10,1000").split()]
    rows = []
    for real, simulated in runs:
        print(f"... {real} real daemons, {simulated} simulated hosts", flush=True)
        rows.append(run(real, simulated))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
