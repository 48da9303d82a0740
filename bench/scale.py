"""`make bench-scale`: what a cluster costs etcd and each host, measured with real daemons and a large keyspace.

H real daemons in lab namespaces (etcd v3) plus S simulated hosts whose leases (on one etcd lease, with a TTL, as
flannel writes them) and names are written straight to etcd (their PublicIPs are addresses of the benchmarking range
198.18.0.0/15 that no namespace holds: nothing is ever sent to them). Each size is run with every setup of SETUPS:
pyflanneld serving the default network and two named ones with C containers' names published in each; and, with
FLANNELD_BIN (a flanneld speaking etcd v3, >= 0.18), pyflanneld and flanneld each serving the default network alone,
on the same keyspace (leases only: flanneld has no names). The real daemons start one after another (flanneld's
watch can miss leases made while it starts).

Per real host at idle it prints etcd requests/s and bytes/s (etcd's own metrics), daemon CPU (its own and the
processes it ran, iptables among them) and RSS, each the mean and max of the hosts. The idle window opens once every
real daemon has every peer's route and its CPU time has stopped growing (below SETTLED_CPU over SETTLE_WINDOW), so
start-up work is not counted as idle. Then how long a new name and a new lease take to reach every real host (DNS
answer; the kernel route `<subnet> via <subnet>.0 dev flannel.1 onlink`), p50 and p99; and etcd's CPU beside it.

    BENCH_SCALE="H,S ..." [FLANNELD_BIN=path] python -m bench.scale      (default "10,0 10,1000")
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dnslib import DNSRecord
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.localapi import Client
from lab import DNS_ADDRESS, Lab, inside, wait_until

SECOND_OCTET = {"default": 5, "n1": 128, "n2": 129}  # their Networks: 10.5.0.0/16, 10.128.0.0/16, 10.129.0.0/16
CONTAINERS = int(os.environ.get("BENCH_SCALE_CONTAINERS", "10"))
IDLE_SECONDS = int(os.environ.get("BENCH_SCALE_IDLE_SECONDS", "30"))
FLANNELD_BIN = os.environ.get("FLANNELD_BIN", "")
SAMPLES = 20
SETTLE_WINDOW = 5      # seconds
SETTLED_CPU = 3.0      # % of a core over SETTLE_WINDOW, for every real daemon
SETTLE_TIMEOUT = 240   # seconds; a run that does not settle says so in its row
ROUTES_TIMEOUT = 120   # seconds for every real daemon to route every peer, at start and after each lease sample
SIM_LEASE_TTL = 7200   # seconds: the simulated hosts' etcd lease outlives any run


@dataclass(frozen=True)
class Setup:
    """What the real hosts run: `program` serving `networks` (the first is the default one), with `containers`
    names published per network on every host, simulated or real."""
    label: str
    program: str
    networks: tuple[str, ...]
    containers: int


SETUPS = [Setup("pyflanneld, 3 networks + names", "pyflanneld", ("default", "n1", "n2"), CONTAINERS)]
if FLANNELD_BIN:
    SETUPS += [Setup("pyflanneld, default network", "pyflanneld", ("default",), 0),
               Setup("flanneld, default network", "flanneld", ("default",), 0)]


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


def cpu_seconds(pid: int) -> float:
    """CPU seconds so far of a process and of the children it waited for (iptables, ip)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")) / 1024


def lease_value(public_ip: str, vtep_mac: str) -> str:
    """A vxlan lease as flanneld writes and parses it."""
    return json.dumps({"PublicIP": public_ip, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": vtep_mac}})


def simulate(lab, setup: Setup, hosts: int, etcd_lease: str) -> None:
    """`hosts` simulated hosts: a lease (on `etcd_lease`) and the setup's names in every network, written in
    transactions of 100."""
    ops = []
    for network in setup.networks:
        top = lab.prefix_key if network == "default" else f"{lab.prefix_key}/{network}"
        subnets = list(ipaddress.IPv4Network(f"10.{SECOND_OCTET[network]}.0.0/16").subnets(new_prefix=28))[1000:]
        for i in range(hosts):  # (at most 3000: the /28s after the first 1000)
            public_ip = f"198.18.{i // 250}.{1 + i % 250}"
            subnet = subnets[i]
            value = lease_value(public_ip, f"0e:00:{i >> 8 & 255:02x}:{i & 255:02x}:00:01")
            key = f"{top}/subnets/{subnet.network_address}-28"
            ops.append({"request_put": {"key": _b64(key), "value": _b64(value), "lease": etcd_lease}})
            for c in range(setup.containers):
                address = str(subnet.network_address + 2 + c)
                record = json.dumps({"names": [f"sim{i}-{c}"], "address": address})
                ops.append({"request_put": {"key": _b64(f"{top}/names/{public_ip}/{address}"), "value": _b64(record)}})
    for start in range(0, len(ops), 100):
        lab.etcd_v3("kv/txn", {"success": ops[start:start + 100]})


class Routes:
    """A real host's routing table, read over a netlink socket opened in its namespace (fast enough to poll)."""

    def __init__(self, host):
        self.host = host
        with inside(host.ns):
            self.ipr = IPRoute()
        self.vtep = next(iter(self.ipr.link_lookup(ifname="flannel.1")), None)

    def has_peer(self, subnet: ipaddress.IPv4Network) -> bool:
        """Whether `<subnet> via <subnet>.0 dev flannel.1 onlink` routes the subnet."""
        try:
            found = tuple(self.ipr.route("get", dst=str(subnet.network_address + 1)))
        except NetlinkError:
            return False
        return any(r.get_attr("RTA_GATEWAY") == str(subnet.network_address) and
                   r.get_attr("RTA_OIF") == self.vtep for r in found)

    def peer_count(self, devices: list[str]) -> int:
        """Routes via a gateway on `devices` (the VXLAN devices): one per peer and network."""
        return sum(self.host.sh("ip", "-4", "route", "show", "dev", device, check=False).count(" via ")
                   for device in devices)

    def close(self) -> None:
        self.ipr.close()


def wait_routed(routes: list[Routes], subnet: ipaddress.IPv4Network, timeout: float = 30) -> bool:
    """Poll until every host routes `subnet`, asking again only the hosts that did not yet; False after `timeout`."""
    pending, deadline = list(routes), time.monotonic() + timeout
    while True:
        pending = [r for r in pending if not r.has_peer(subnet)]
        if not pending:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def resolves(host, name: str) -> bool:
    with inside(host.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(DNSRecord.question(name).pack(), (DNS_ADDRESS, 53))
        return bool(DNSRecord.parse(sock.recv(4096)).rr)


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def lease_address(host, network: str, offset: int) -> str:
    env = host.subnet_env("" if network == "default" else network)
    return str(ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network.network_address + offset)


def publish(host, setup: Setup, extra: list[tuple[str, str, str]] = ()) -> None:
    """The setup's containers of `host` in every network, and `extra` (network, address, name), as the driver
    would."""
    containers = [{"id": f"{network}-{c}", "networks": {network: {"address": lease_address(host, network, 2 + c),
                                                                  "names": [f"{host.name}-{network}-{c}"]}}}
                  for network in setup.networks for c in range(setup.containers)]
    containers += [{"id": name, "networks": {network: {"address": address, "names": [name]}}}
                   for network, address, name in extra]
    Client(str(host.api_sock)).publish(containers)


def start_daemon(lab, host, setup: Setup) -> None:
    """The setup's daemon on `host`, its subnet.env written before this returns."""
    if setup.program == "pyflanneld":
        host.start_daemon()
        return
    host.daemon = lab.spawn(f"{host.name}-flanneld", [
        FLANNELD_BIN, f"-etcd-endpoints={lab.etcd_endpoints}", f"-etcd-prefix={lab.prefix_key}", "-iface=eth0",
        f"-subnet-file={host.subnet_file}", "-ip-masq=false"], ns=host.ns)
    wait_until(f"flanneld's subnet.env on {host.name}", lambda: host.subnet_file.exists() or not host.daemon.alive(),
               timeout=60)
    assert host.daemon.alive(), f"flanneld on {host.name} exited:\n{host.daemon.log()}"


def settle(lab, setup: Setup, routes: list[Routes], peers: int) -> tuple[float, bool, int]:
    """Wait until every real daemon has a route to each of `peers` peers in every network (a daemon whose watch
    missed a lease never will: after ROUTES_TIMEOUT the routes still missing are counted) and its CPU time has
    stopped growing; the seconds it took, whether the daemons did settle before SETTLE_TIMEOUT, the routes missing."""
    started = time.monotonic()
    devices = [f"flannel.{vni}" for vni in range(1, len(setup.networks) + 1)]

    def missing() -> int:
        return sum(max(0, peers * len(devices) - r.peer_count(devices)) for r in routes)

    with contextlib.suppress(AssertionError):
        wait_until("every peer's route on every real host", lambda: missing() == 0, timeout=ROUTES_TIMEOUT,
                   interval=2)
    missed = missing()
    pids = [h.daemon.pid for h in lab.hosts]
    while time.monotonic() - started < SETTLE_TIMEOUT:
        before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(SETTLE_WINDOW)
        if all((cpu_seconds(pid) - before[pid]) / SETTLE_WINDOW * 100 < SETTLED_CPU for pid in pids):
            return time.monotonic() - started, True, missed
    return time.monotonic() - started, False, missed


def sample_subnets(lab) -> list[ipaddress.IPv4Network]:
    """SAMPLES /28s of 10.5.240.0/20 that no real host holds (the simulated ones stop below 10.5.125.0)."""
    held = {ipaddress.IPv4Interface(h.subnet_env()["FLANNEL_SUBNET"]).network for h in lab.hosts}
    return [s for s in ipaddress.IPv4Network("10.5.240.0/20").subnets(new_prefix=28) if s not in held][:SAMPLES]


def run(setup: Setup, real: int, simulated: int) -> dict:
    lab = Lab(real, etcd_api="v3")
    routes: list[Routes] = []
    try:
        for vni, network in enumerate(setup.networks, start=1):
            config = {"Network": f"10.{SECOND_OCTET[network]}.0.0/16", "SubnetLen": 28,
                      "Backend": {"Type": "vxlan", "VNI": vni}}
            if network == "default":
                lab.set_config(config)
            else:
                lab.etcd_put(f"{lab.prefix_key}/{network}/config", json.dumps(config))
        etcd_lease = lab.etcd_v3("lease/grant", {"TTL": SIM_LEASE_TTL})["ID"]
        simulate(lab, setup, simulated, etcd_lease)
        for host in lab.hosts:  # one after another, each routing the hosts before it before the next starts
            start_daemon(lab, host, setup)
            routes.append(Routes(host))
            with contextlib.suppress(AssertionError):
                wait_until(f"{host.name} routes every peer so far", lambda: routes[-1].peer_count(
                    ["flannel.1"]) >= len(routes) - 1 + simulated, timeout=ROUTES_TIMEOUT, interval=0.5)
        if setup.containers:
            for host in lab.hosts:
                for network in setup.networks[1:]:  # (a join answers "no lease yet" after 10 s: a busy host asks again)
                    wait_until(f"{host.name} joins {network}", lambda: Client(str(host.api_sock)).join(network),
                               timeout=300, interval=1)
                publish(host, setup)
            last = lab.hosts[-1]
            name = f"{last.name}-{setup.networks[-1]}-{setup.containers - 1}"
            wait_until("every name everywhere", lambda: all(resolves(h, name) for h in lab.hosts), timeout=120)
        settle_s, settled, missed = settle(lab, setup, routes, real - 1 + simulated)
        pids = {h.name: h.daemon.pid for h in lab.hosts}
        before, cpu = etcd_counters(lab), {n: cpu_seconds(p) for n, p in pids.items()}
        time.sleep(IDLE_SECONDS)
        after, cpu_after = etcd_counters(lab), {n: cpu_seconds(p) for n, p in pids.items()}
        daemon_cpu = [(cpu_after[n] - cpu[n]) / IDLE_SECONDS * 100 for n in pids]
        rss = [rss_mb(p) for p in pids.values()]
        figures = {"setup": setup.label, "real": real, "simulated": simulated, "networks": len(setup.networks),
                   "containers": setup.containers, "settle_s": settle_s, "settled": settled,
                   "routes_missing": missed,
                   "idle_requests_per_s_per_host": (after["requests"] - before["requests"]) / IDLE_SECONDS / real,
                   "idle_bytes_per_s_per_host": (after["sent_bytes"] - before["sent_bytes"]) / IDLE_SECONDS / real,
                   "idle_etcd_cpu_percent": (after["cpu_s"] - before["cpu_s"]) / IDLE_SECONDS * 100,
                   "idle_daemon_cpu_percent_mean": statistics.mean(daemon_cpu),
                   "idle_daemon_cpu_percent_max": max(daemon_cpu),
                   "daemon_rss_mb_mean": statistics.mean(rss), "daemon_rss_mb_max": max(rss)}
        first, others = lab.hosts[0], lab.hosts[1:]
        names, leases, extra, lost = [], [], [], 0
        for i, subnet in enumerate(sample_subnets(lab)):
            if setup.containers:
                extra.append((setup.networks[-1], lease_address(first, setup.networks[-1], 2 + i % 12), f"late{i}"))
                started = time.monotonic()
                publish(first, setup, extra)
                wait_until("the new name everywhere", lambda: all(resolves(h, f"late{i}") for h in others),
                           timeout=30, interval=0.005)
                names.append(time.monotonic() - started)
            started = time.monotonic()
            lab.etcd_v3("kv/put", {"key": _b64(f"{lab.prefix_key}/subnets/{subnet.network_address}-28"),
                                   "value": _b64(lease_value(f"198.19.0.{1 + i}", f"0e:00:ff:00:00:{i:02x}")),
                                   "lease": etcd_lease})
            if wait_routed(routes, subnet):
                leases.append(time.monotonic() - started)
            else:
                lost += 1
        figures["name_propagation_s"] = percentiles(names) if names else None
        figures["lease_propagation_s"] = percentiles(leases) if leases else None
        figures["leases_not_routed_in_30s"] = lost
        return figures
    finally:
        for r in routes:
            r.close()
        lab.close()


def row(r: dict) -> str:
    names = "-" if r["name_propagation_s"] is None else \
        f"{r['name_propagation_s'][0]:.3f}/{r['name_propagation_s'][1]:.3f}"
    leases = "-" if r["lease_propagation_s"] is None else \
        f"{r['lease_propagation_s'][0]:.3f}/{r['lease_propagation_s'][1]:.3f}"
    return (f"{r['setup']:31} {r['real']:>4} + {r['simulated']:<5} {r['idle_requests_per_s_per_host']:10.3f} "
            f"{r['idle_bytes_per_s_per_host']:9.0f} {r['idle_daemon_cpu_percent_mean']:6.2f}/"
            f"{r['idle_daemon_cpu_percent_max']:<6.2f} {r['daemon_rss_mb_mean']:5.1f}/{r['daemon_rss_mb_max']:<5.1f} "
            f"{r['idle_etcd_cpu_percent']:8.1f} "
            f"{names:>13} {leases:>15}"
            f"{'' if r['settled'] else '  (did not settle in %ds)' % SETTLE_TIMEOUT}"
            f"{'  (%d routes missing at idle)' % r['routes_missing'] if r['routes_missing'] else ''}"
            f"{'  (%d sample leases not routed everywhere in 30 s)' % r['leases_not_routed_in_30s'] if r['leases_not_routed_in_30s'] else ''}")


def table(rows: list[dict]) -> str:
    lines = [f"{'setup':31} {'real + sim':12} {'req/s/host':>10} {'B/s/host':>9} {'CPU % mean/max':>14} "
             f"{'RSS MB mean/max':>15} {'etcd CPU':>8} {'name p50/p99':>13} {'lease p50/p99 s':>15}"]
    lines += [row(r) for r in rows]
    lines.append("targets: <= 0.1 req/s and <= 1000 B/s per host at idle, daemon CPU <= 0.5 %, RSS <= 50 MB, "
                 "propagation p99 <= 1 s")
    if not FLANNELD_BIN:
        lines.append("flanneld: not measured (FLANNELD_BIN not given; ../shared/tools/build-flanneld.sh builds one)")
    return "\n".join(lines)


def main() -> int:
    if FLANNELD_BIN:
        version = subprocess.run([FLANNELD_BIN, "-version"], capture_output=True, text=True, timeout=10)
        print(f"flanneld: {FLANNELD_BIN} {(version.stdout + version.stderr).strip()}", flush=True)
    runs = [tuple(int(x) for x in spec.split(",")) for spec in os.environ.get("BENCH_SCALE", "10,0 10,1000").split()]
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for real, simulated in runs:
        for setup in SETUPS:
            print(f"... {setup.label}: {real} real daemons, {simulated} simulated hosts", flush=True)
            rows.append(run(setup, real, simulated))
            print(row(rows[-1]), flush=True)
            (out / "scale.json").write_text(json.dumps(rows, indent=2))  # after each run: a long bench keeps its rows
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
