"""`make bench`: pyflannel's figures beside a reference measured in the same run, on the lab.

Prints a table and writes bench/results/latest.json. Fake peers live in etcd only: their PublicIPs are lab
underlay addresses that no namespace holds, so nothing is ever sent outside the lab.
"""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pyroute2 import IPRoute

from bench import cni, dns
from pyflannel import localapi
from lab import DOCKER, IMAGE, Lab, inside, sh, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
SECONDS = int(os.environ.get("BENCH_IPERF_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_WIRE_ROUNDS", "3"))


def fake_lease(i: int) -> tuple[str, str]:
    """Lease i of a fake peer in 10.5.0.0/16 (subnets /28 so 5000 fit) with an underlay IP nobody holds."""
    subnet = 4096 + i  # skip the real hosts' range
    a, b = divmod(subnet * 16, 65536)
    key = f"10.{5 + a}.{b >> 8}.{b & 255}-28"
    value = json.dumps({"PublicIP": f"192.0.2.{200 + i % 50}", "PublicIPv6": None, "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": f"0e:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                                             f"{i & 255:02x}"}}, separators=(",", ":"))
    return key, value


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def netns(ns: str) -> list[str]:
    """The argv prefix that runs a command in a lab namespace."""
    return ["ip", "netns", "exec", ns]


def container_netns(host, name: str) -> tuple[list[str], str]:
    """The argv prefix that runs a command in a Docker container's network namespace, and its address."""
    pid = host.docker("inspect", "-f", "{{.State.Pid}}", name).strip()
    ip = host.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name).strip()
    return ["nsenter", "-t", pid, "-n"], ip


def iperf(server: list[str], client: list[str], server_ip: str) -> float:
    """TCP Gbit/s from `client` to `server` (argv prefixes); iperf3 runs from the host, as busybox has none."""
    listener = subprocess.Popen(server + ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(client + ["iperf3", "-c", server_ip, "-t", str(SECONDS), "-J"], capture_output=True,
                             text=True, timeout=SECONDS + 30).stdout
    finally:
        listener.kill()
        listener.wait()
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_latency(src: list[str], dst_ip: str, count: int = 200) -> list[float]:
    out = subprocess.run(src + ["ping", "-i", "0.005", "-c", str(count), dst_ip], capture_output=True,
                         text=True).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    return [statistics.median(times), percentile(times, 0.99)]


def wait_for_path(what: str, client: list[str], ip: str) -> None:
    """Until `client` (an argv prefix) gets a ping answered by `ip`."""
    wait_until(f"{what} path", lambda: subprocess.run(client + ["ping", "-c1", "-W1", ip],
                                                      capture_output=True).returncode == 0)


def compare_paths(paths: dict[str, tuple[list[str], list[str], str]], rounds: int = ROUNDS) -> dict:
    """iperf3 and ping over each path (name -> server prefix, client prefix, server IP).

    The paths take turns, round after round, so a burst of load from elsewhere hits them all alike; each
    throughput figure is the median of its rounds.
    """
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (server, client, ip) in paths.items():
            runs[name].append(iperf(server, client, ip))
    return {name: {"gbit_s": statistics.median(runs[name]), "gbit_s_runs": runs[name],
                   "ping_ms": ping_latency(client, ip)} for name, (server, client, ip) in paths.items()}


def wire_vxlan_and_swarm(results: dict) -> None:
    """Docker containers on two hosts: on pyflannel VXLAN (overlay0), on Docker's swarm overlay; and the underlay."""
    lab = Lab(2)
    try:
        lab.set_config({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
        h1, h2 = lab.hosts
        for host in lab.hosts:
            host.start_daemon()
            host.start_driver()
            host.start_dockerd()
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        h1.docker("swarm", "init", "--advertise-addr", h1.ip)
        h2.docker("swarm", "join", "--token", h1.docker("swarm", "join-token", "-q", "worker").strip(),
                  f"{h1.ip}:2377")
        h1.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", "10.98.0.0/24", "swarmnet")
        paths = {"underlay": (netns(h2.ns), netns(h1.ns), h2.ip)}
        for name, network in (("vxlan", "overlay0"), ("swarm overlay", "swarmnet")):
            for i, host in enumerate(lab.hosts, 1):
                host.docker("run", "-d", "--network", network, "--name", f"{network}-{i}", IMAGE, "sleep", "3600",
                            timeout=120)
            (client, _), (server, ip) = container_netns(h1, f"{network}-1"), container_netns(h2, f"{network}-2")
            wait_for_path(network, client, ip)
            paths[name] = (server, client, ip)
        results["wire"]["vxlan lab"] = compare_paths(paths)
    finally:
        lab.close()


def wire_hostgw_and_plain(results: dict) -> None:
    """Namespace containers on two hosts: on pyflannel host-gw; on the same veth+bridge path with hand-made static
    routes and no pyflannel (what the container path itself costs); and the underlay."""
    lab = Lab(2)
    try:
        lab.start_network({"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}})
        h1, h2 = lab.hosts
        plain = []
        for i, host in enumerate(lab.hosts, 1):
            gateway = f"10.99.{i}.1"
            host.sh("ip", "link", "add", "plainbr", "type", "bridge")
            host.sh("ip", "addr", "add", f"{gateway}/24", "dev", "plainbr")
            host.sh("ip", "link", "set", "plainbr", "up")
            ns = lab.add_ns(f"{host.name}plain")
            host.sh("ip", "link", "add", "vplain", "type", "veth", "peer", "name", "eth0", "netns", ns)
            host.sh("ip", "link", "set", "vplain", "master", "plainbr", "up")
            sh("ip", "addr", "add", f"10.99.{i}.2/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            sh("ip", "route", "add", "default", "via", gateway, ns=ns)
            host.sh("ip", "route", "add", f"10.99.{3 - i}.0/24", "via", lab.hosts[2 - i].ip)
            plain.append(ns)
        c1, c2 = h1.containers[0], h2.containers[0]
        wait_for_path("host-gw", netns(c1.ns), c2.ip)
        results["wire"]["host-gw lab"] = compare_paths({
            "underlay": (netns(h2.ns), netns(h1.ns), h2.ip),
            "host-gw": (netns(c2.ns), netns(c1.ns), c2.ip),
            "plain bridge": (netns(plain[1]), netns(plain[0]), "10.99.2.2")})
    finally:
        lab.close()


GUARD_HOOK = ("PREROUTING", "-j", "PYFLANNEL-TUNNEL")
ALLOWED_EXTRA = 1000


def wire_guard(results: dict) -> None:
    """What the tunnel guard costs on the wire: VXLAN between namespace containers on two hosts, each host's
    allow-list holding ALLOWED_EXTRA more addresses (198.18.0.0/15, the benchmarking range: set entries only, never
    a destination), with the guard hooked in and unhooked by turns in one run."""
    lab = Lab(2)
    try:
        lab.start_network({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
        h1, h2 = lab.hosts
        for host in lab.hosts:
            host.sh(sys.executable, "-c", "from pyflannel.kernel import ipset\n"
                    f"for i in range({ALLOWED_EXTRA}): ipset.add('pyflannel-vtep-1', f'198.18.{{i // 256}}.{{i % 256}}')")
        c1, c2 = h1.containers[0], h2.containers[0]
        wait_for_path("vxlan", netns(c1.ns), c2.ip)
        runs: dict[str, list[float]] = {"guarded": [], "unguarded": []}
        pings = {}
        for _ in range(ROUNDS):
            for state in runs:  # the hook is in place; "unguarded" takes it out for its run
                unhooked = lab.hosts if state == "unguarded" else []
                for host in unhooked:
                    host.sh("iptables", "-t", "raw", "-D", *GUARD_HOOK)
                runs[state].append(iperf(netns(c2.ns), netns(c1.ns), c2.ip))
                pings[state] = ping_latency(netns(c1.ns), c2.ip)
                for host in unhooked:
                    host.sh("iptables", "-t", "raw", "-I", *GUARD_HOOK)
        results["wire"]["guard lab"] = {state: {"gbit_s": statistics.median(r), "gbit_s_runs": r,
                                                "ping_ms": pings[state]} for state, r in runs.items()}
    finally:
        lab.close()


def wire_wireguard(results: dict) -> None:
    """Namespace containers on two hosts: on pyflannel wireguard (the default network; wireguard-go, as this kernel
    has no WireGuard module) and on a pyflannel VXLAN network of the same hosts; and the underlay."""
    lab = Lab(2)
    try:
        lab.start_network({"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard"}})
        for host in lab.hosts:
            localapi.Client(str(host.api_sock)).join("vx")
            host.add_bridge("cbrvx", network="vx")
            host.add_container("cbrvx", network="vx")
        h1, h2 = lab.hosts
        paths = {"underlay": (netns(h2.ns), netns(h1.ns), h2.ip)}
        for name, index in (("wireguard", 0), ("vxlan", 1)):
            c1, c2 = h1.containers[index], h2.containers[index]
            wait_for_path(name, netns(c1.ns), c2.ip)
            paths[name] = (netns(c2.ns), netns(c1.ns), c2.ip)
        results["wire"]["wireguard lab"] = compare_paths(paths)
    finally:
        lab.close()


def wire_ipv6(results: dict) -> None:
    """Namespace containers on two hosts of a dual-stack VXLAN network over an IPv6 underlay: IPv6 through
    flannel-v6.1, IPv4 through flannel.1, and the underlay in both families."""
    lab = Lab(2, underlay_ipv6=True)
    try:
        lab.start_network({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/48",
                           "Backend": {"Type": "vxlan"}})
        h1, h2 = lab.hosts
        c1, c2 = h1.containers[0], h2.containers[0]
        wait_for_path("IPv6", netns(c1.ns), c2.ip6)
        results["wire"]["ipv6 lab"] = compare_paths({
            "underlay v6": (netns(h2.ns), netns(h1.ns), h2.ip6),
            "vxlan v6": (netns(c2.ns), netns(c1.ns), c2.ip6),
            "underlay v4": (netns(h2.ns), netns(h1.ns), h2.ip),
            "vxlan v4": (netns(c2.ns), netns(c1.ns), c2.ip)})
    finally:
        lab.close()


def seed(lab: Lab, count: int) -> None:
    for i in range(count):
        key, value = fake_lease(i)
        lab.etcd_request("PUT", f"{lab.prefix_key}/subnets/{key}", value, ttl=3600)


def convergence(results: dict, peers: int, samples: int = 40) -> None:
    lab = Lab(1)
    try:
        lab.set_config({"Network": "10.0.0.0/8", "SubnetLen": 28})
        seed(lab, peers)
        host = lab.hosts[0]
        host.start_daemon()
        wait_until("seeded peers programmed", lambda: len(host.sh("ip", "route", "show", "proto", "77")
                                                          .splitlines()) >= peers, timeout=120)
        with inside(host.ns):
            monitor = IPRoute()
            monitor.bind()
        delays = []
        for i in range(peers, peers + samples):
            key, value = fake_lease(i)
            dst = key.rsplit("-", 1)[0]
            started = time.monotonic()
            lab.etcd_request("PUT", f"{lab.prefix_key}/subnets/{key}", value, ttl=3600)
            seen = set()
            deadline = started + 5
            while len(seen) < 3 and time.monotonic() < deadline:  # route, neighbor and FDB entry
                for msg in monitor.get():
                    event = msg.get("event")
                    if event == "RTM_NEWROUTE" and msg.get("RTA_DST") == dst:
                        seen.add("route")
                    elif event == "RTM_NEWNEIGH" and msg.get("NDA_DST") == dst:
                        seen.add("neighbor")
                    elif event == "RTM_NEWNEIGH" and msg.get("NDA_LLADDR") == json.loads(value)["BackendData"][
                            "VtepMAC"]:
                        seen.add("fdb")
            delays.append((time.monotonic() - started) * 1000)
        monitor.close()
        results["convergence"][str(peers)] = {"median_ms": statistics.median(delays),
                                              "p99_ms": percentile(delays, 0.99), "samples": samples}
    finally:
        lab.close()


# flanneld v0.17's figures on this kind of machine, from issue 18 (median of 3 rounds against the same etcd); no
# flanneld binary is on this machine, so they are the goals, and the kernel's own floor is measured in the same run
FLANNELD = {"1000": {"seconds_from_exec": 0.48, "rss_mb": 29.0}, "5000": {"seconds_from_exec": 2.21, "rss_mb": 32.0}}
RSS_GOAL_MB = 35.0


def kernel_floor_batches(host, peers: int) -> tuple[str, str]:
    """The neighbours and routes (for `ip -batch`) and FDB entries (for `bridge -batch`) pyflanneld programs for
    the fake peers, as files."""
    ip_lines, bridge_lines = [], []
    for i in range(peers):
        key, value = fake_lease(i)
        lease = json.loads(value)
        net, mac, public_ip = key.replace("-", "/"), lease["BackendData"]["VtepMAC"], lease["PublicIP"]
        gateway = net.split("/")[0]
        ip_lines += [f"neigh replace {gateway} dev flannel.1 lladdr {mac} nud permanent",
                     f"route replace {net} via {gateway} dev flannel.1 onlink proto 77"]
        bridge_lines.append(f"fdb replace {mac} dev flannel.1 dst {public_ip} self permanent")
    files = host.workdir / "floor-ip.batch", host.workdir / "floor-bridge.batch"
    for path, lines in zip(files, (ip_lines, bridge_lines)):
        path.write_text("\n".join(lines) + "\n")
    return str(files[0]), str(files[1])


def kernel_floor(host, batches: tuple[str, str]) -> float:
    """Seconds for `ip -batch` and `bridge -batch` to put the same entries on a fresh flannel.1: what the kernel
    and iproute2 need, with no etcd and no daemon."""
    host.sh("ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", host.ip, "dev", "eth0",
            "dstport", "8472", "nolearning")
    host.sh("ip", "link", "set", "flannel.1", "up")
    started = time.monotonic()
    sh("ip", "-n", host.ns, "-batch", batches[0])
    sh("bridge", "-n", host.ns, "-batch", batches[1])
    seconds = time.monotonic() - started
    host.sh("ip", "link", "del", "flannel.1")
    return seconds


def daemon_start(host, peers: int, idle_cpu: bool) -> dict:
    """pyflanneld started with `peers` leases in etcd: seconds from exec until all routes are programmed, the part
    inside the daemon (its log, from choosing its interface to its first reconcile), RSS, and idle CPU if asked.
    The daemon is then stopped and flannel.1 deleted, taking our entries with it."""
    started = time.monotonic()
    daemon = host.start_daemon(wait_ready=False)
    wait_until(f"{peers} peers programmed", lambda: len(host.sh("ip", "route", "show", "proto", "77")
                                                        .splitlines()) >= peers, timeout=300, interval=0.02)
    figure = {"seconds_from_exec": time.monotonic() - started}
    stamps = re.findall(r"^(\S+ \S+) INFO .*(external interface|reconcile: \d+ entries added)", daemon.log(), re.M)
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    figure["seconds_inside_daemon"] = (parse(stamps[-1][0]) - parse(stamps[-2][0])).total_seconds()
    time.sleep(2)
    if idle_cpu:
        stat = lambda: sum(int(x) for x in Path(f"/proc/{daemon.pid}/stat").read_text().split()[13:15])  # noqa
        before, t0 = stat(), time.monotonic()
        time.sleep(10)
        figure["idle_cpu_percent"] = 100 * (stat() - before) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
    figure["rss_mb"] = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{daemon.pid}/status").read_text())
                           .group(1)) / 1024
    daemon.kill(signal.SIGTERM)  # it keeps the kernel's entries and its lease for the next start
    host.sh("ip", "link", "del", "flannel.1")
    return figure


def scale(results: dict, peers: int, rounds: int = 3) -> None:
    """Cold start with `peers` fake leases, `rounds` times, taking turns with the kernel floor; medians."""
    lab = Lab(1)
    try:
        lab.set_config({"Network": "10.0.0.0/8", "SubnetLen": 28})
        seed(lab, peers)
        host = lab.hosts[0]
        batches = kernel_floor_batches(host, peers)
        starts, floors = [], []
        for i in range(rounds):
            starts.append(daemon_start(host, peers, idle_cpu=i == 0 and peers == 1000))
            floors.append(kernel_floor(host, batches))
        figure = {k: statistics.median(s[k] for s in starts) for k in starts[0] if k != "idle_cpu_percent"}
        figure.update(rounds=starts, kernel_floor_s=statistics.median(floors), kernel_floor_rounds=floors)
        if "idle_cpu_percent" in starts[0]:
            figure["idle_cpu_percent"] = starts[0]["idle_cpu_percent"]
        results["scale"][str(peers)] = figure
    finally:
        lab.close()


def lifecycle(results: dict, runs: int = 7, concurrent: int = 10) -> None:
    """`docker run --rm` on overlay0, on the built-in bridge driver and with --network none, on one host: one at a
    time (the networks take turns, median of `runs`), then `concurrent` started at once (wall time until all exit)."""
    lab = Lab(1)
    try:
        lab.set_config()
        host = lab.hosts[0]
        host.start_daemon()
        host.start_driver()
        host.start_dockerd()
        host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        host.docker("network", "create", "-d", "bridge", "--subnet", "172.31.250.0/24", "plainbr")
        networks = ("overlay0", "plainbr", "none")
        run_rm = lambda network: netns(host.ns) + [DOCKER, "-H", f"unix://{host.docker_sock}", "run", "--rm",  # noqa
                                                   "--network", network, IMAGE, "sh", "-c", "exit 0"]
        times: dict[str, list[float]] = {network: [] for network in networks}
        for _ in range(runs):
            for network in networks:
                started = time.monotonic()
                subprocess.run(run_rm(network), check=True, capture_output=True, timeout=60)
                times[network].append(time.monotonic() - started)
        together = {}
        for network in networks:
            started = time.monotonic()
            batch = [subprocess.Popen(run_rm(network), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for _ in range(concurrent)]
            failed = [p.stderr.read().decode() for p in batch if p.wait(120) != 0]
            together[network] = time.monotonic() - started
            if failed:
                raise RuntimeError(f"{len(failed)} of {concurrent} concurrent runs on {network} failed: {failed[0]}")
        results["lifecycle"] = {"docker_run_rm_median_s": {n: statistics.median(t) for n, t in times.items()},
                                "runs": runs, "concurrent": concurrent, "concurrent_wall_s": together}
    finally:
        lab.close()


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def table(r: dict) -> str:
    lines = [f"{'figure':44} {'pyflannel':>12} {'reference':>12} {'ratio':>7}  goal"]

    def compared(what: str, ours: float, ref: float, goal: str = "", fmt: str = "12.2f") -> None:
        lines.append(f"{what:44} {ours:{fmt}} {ref:{fmt}} {ours / ref:7.2f}  {goal}")

    for lab, candidates in (("vxlan lab", (("vxlan", "underlay", 0.85), ("vxlan", "swarm overlay", 1.0))),
                            ("host-gw lab", (("host-gw", "underlay", 0.95), ("host-gw", "plain bridge", None),
                                             ("plain bridge", "underlay", None))),
                            ("wireguard lab", (("wireguard", "underlay", None), ("wireguard", "vxlan", None))),
                            ("guard lab", (("guarded", "unguarded", 0.95),)),
                            ("ipv6 lab", (("vxlan v6", "underlay v6", 0.85), ("vxlan v6", "vxlan v4", None),
                                          ("vxlan v4", "underlay v4", 0.85)))):
        w = r["wire"].get(lab)
        if not w:
            continue
        for ours, ref, goal in candidates:
            ratio = w[ours]["gbit_s"] / w[ref]["gbit_s"]
            compared(f"iperf3 TCP Gbit/s, {ours} vs {ref}", w[ours]["gbit_s"], w[ref]["gbit_s"],
                     f">= {goal}x {verdict(ratio >= goal)}" if goal else "(reference)")
        for name, figure in w.items():
            lines.append(f"{'ping p50/p99 ms, ' + name:44} {figure['ping_ms'][0]:6.3f}/{figure['ping_ms'][1]:5.3f}")
    for peers, c in r["convergence"].items():
        met = c["median_ms"] <= 5 and c["p99_ms"] <= 20
        lines.append(f"{'convergence ms (median/p99), ' + peers + ' peers':44} {c['median_ms']:5.1f}/{c['p99_ms']:5.1f}"
                     f"{'':13} {'':7}  <= 5/20 {verdict(met)}")
    for peers, s in r["scale"].items():
        flanneld = FLANNELD[peers]
        compared(f"cold start s, {peers} peers, vs kernel floor", s["seconds_from_exec"], s["kernel_floor_s"],
                 f"<= flanneld's {flanneld['seconds_from_exec']} s "
                 f"{verdict(s['seconds_from_exec'] <= flanneld['seconds_from_exec'])} "
                 f"(in-daemon {s['seconds_inside_daemon']:.2f} s)")
        lines.append(f"{'daemon RSS MB, ' + peers + ' peers':44} {s['rss_mb']:12.1f} {flanneld['rss_mb']:12.1f} "
                     f"{s['rss_mb'] / flanneld['rss_mb']:7.2f}  reference: flanneld's"
                     + (f"; <= {RSS_GOAL_MB} MB {verdict(s['rss_mb'] <= RSS_GOAL_MB)}" if peers == "1000" else ""))
        if "idle_cpu_percent" in s:
            lines.append(f"{'daemon idle CPU %, ' + peers + ' peers':44} {s['idle_cpu_percent']:12.2f}{'':21}  "
                         f"< 1 % {verdict(s['idle_cpu_percent'] < 1)}")
    if "lifecycle" in r:
        d, wall = r["lifecycle"]["docker_run_rm_median_s"], r["lifecycle"]["concurrent_wall_s"]
        compared("docker run --rm s, overlay0 vs bridge", d["overlay0"], d["plainbr"],
                 f"<= 1.10x {verdict(d['overlay0'] / d['plainbr'] <= 1.10)} (--network none {d['none']:.3f}s)", "12.3f")
        compared(f"{r['lifecycle']['concurrent']} concurrent docker run --rm, wall s", wall["overlay0"], wall["plainbr"],
                 f"<= 1.10x {verdict(wall['overlay0'] / wall['plainbr'] <= 1.10)} (--network none "
                 f"{wall['none']:.3f}s)", "12.3f")
    if "cni" in r:
        lines.extend(cni.table_lines(r["cni"]))
    if "dns" in r:
        lines.extend(dns.table_lines(r["dns"]))
    return "\n".join(lines)


def main() -> int:
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}",
               "wire": {}, "convergence": {}, "scale": {}}
    steps = [("wire vxlan", lambda: wire_vxlan_and_swarm(results)),
             ("wire host-gw", lambda: wire_hostgw_and_plain(results)),
             ("wire wireguard", lambda: wire_wireguard(results)),
             ("wire guard", lambda: wire_guard(results)),
             ("wire ipv6", lambda: wire_ipv6(results)),
             ("convergence 10", lambda: convergence(results, 10)),
             ("convergence 1000", lambda: convergence(results, 1000)), ("scale 1000", lambda: scale(results, 1000)),
             ("scale 5000", lambda: scale(results, 5000)), ("lifecycle", lambda: lifecycle(results)),
             ("cni", lambda: cni.latency(results)), ("dns", lambda: dns.measure(results))]
    only = os.environ.get("BENCH_ONLY")  # e.g. BENCH_ONLY="wire host-gw,lifecycle" while working on one part
    for name, step in steps:
        if only and name not in only.split(","):
            continue
        started = time.monotonic()
        print(f"... {name}", flush=True)
        step()
        print(f"    done in {time.monotonic() - started:.0f}s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("partial.json" if only else "latest.json")).write_text(json.dumps(results, indent=2))
    print(f"\n{results['machine']}, {results['date']}\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
