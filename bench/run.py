"""`make bench`: pyflannel's figures beside a reference measured in the same run, on the lab.

Prints a table and writes bench/results/latest.json. Fake peers live in etcd only: their PublicIPs are lab
underlay addresses that no namespace holds, so nothing is ever sent outside the lab.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pyroute2 import IPRoute

from tests.lab import IMAGE, Lab, inside, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
SECONDS = int(os.environ.get("BENCH_IPERF_SECONDS", "5"))


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


def iperf(lab: Lab, server_ns: str, client_ns: str, server_ip: str) -> float:
    server = lab.spawn("iperf3-server", ["iperf3", "-s", "-1"], ns=server_ns)
    time.sleep(0.5)
    out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", str(SECONDS), "-J"],
                         capture_output=True, text=True, timeout=SECONDS + 30).stdout
    server.kill()
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_latency(src_ns: str, dst_ip: str, count: int = 200) -> tuple[float, float]:
    out = subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-i", "0.005", "-c", str(count), dst_ip],
                         capture_output=True, text=True).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    return statistics.median(times), percentile(times, 0.99)


def wire(results: dict) -> None:
    for backend in ("vxlan", "host-gw"):
        lab = Lab(2)
        try:
            lab.set_config({"Network": "10.5.0.0/16", "Backend": {"Type": backend}})
            for host in lab.hosts:
                host.start_daemon()
                host.add_bridge()
                host.add_container()
            h1, h2 = lab.hosts
            c1, c2 = h1.containers[0], h2.containers[0]
            wait_until("path", lambda: subprocess.run(["ip", "netns", "exec", c1.ns, "ping", "-c1", "-W1", c2.ip],
                                                      capture_output=True).returncode == 0)
            if backend == "vxlan":
                results["wire"]["underlay"] = {"gbit_s": iperf(lab, h2.ns, h1.ns, h2.ip),
                                               "ping_ms": ping_latency(h1.ns, h2.ip)}
            results["wire"][backend] = {"gbit_s": iperf(lab, c2.ns, c1.ns, c2.ip),
                                        "ping_ms": ping_latency(c1.ns, c2.ip)}
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


def scale(results: dict, peers: int) -> None:
    lab = Lab(1)
    try:
        lab.set_config({"Network": "10.0.0.0/8", "SubnetLen": 28})
        seed(lab, peers)
        host = lab.hosts[0]
        started = time.monotonic()
        daemon = host.start_daemon(wait_ready=False)
        wait_until(f"{peers} peers programmed", lambda: len(host.sh("ip", "route", "show", "proto", "77")
                                                            .splitlines()) >= peers, timeout=300, interval=0.05)
        to_programmed = time.monotonic() - started
        log = daemon.log()
        stamps = re.findall(r"^(\S+ \S+) INFO .*(external interface|reconcile: \d+ entries added)", log, re.M)
        parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
        inside_daemon = (parse(stamps[-1][0]) - parse(stamps[0][0])).total_seconds() if len(stamps) >= 2 else None
        figure = {"seconds_from_exec": to_programmed, "seconds_inside_daemon": inside_daemon}
        if peers == 1000:
            stat = lambda: sum(int(x) for x in Path(f"/proc/{daemon.pid}/stat").read_text().split()[13:15])  # noqa
            time.sleep(2)
            before, t0 = stat(), time.monotonic()
            time.sleep(10)
            ticks = stat() - before
            figure["idle_cpu_percent"] = 100 * ticks / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
            rss = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{daemon.pid}/status").read_text())
            figure["rss_mb"] = int(rss.group(1)) / 1024
        results["scale"][str(peers)] = figure
    finally:
        lab.close()


def lifecycle(results: dict, runs: int = 7) -> None:
    lab = Lab(1)
    try:
        lab.set_config()
        host = lab.hosts[0]
        host.start_daemon()
        host.start_driver()
        host.start_dockerd()
        host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        host.docker("network", "create", "-d", "bridge", "--subnet", "172.31.250.0/24", "plainbr")
        figures = {}
        for network in ("overlay0", "plainbr", "none"):
            times = []
            for _ in range(runs):
                started = time.monotonic()
                host.docker("run", "--rm", "--network", network, IMAGE, "sh", "-c", "exit 0")
                times.append(time.monotonic() - started)
            figures[network] = statistics.median(times)
        results["lifecycle"] = {"docker_run_rm_median_s": figures, "runs": runs}
    finally:
        lab.close()


def table(r: dict) -> str:
    w, lines = r["wire"], []
    u = w["underlay"]["gbit_s"]
    lines.append(f"{'figure':44} {'pyflannel':>12} {'reference':>12} {'ratio':>7}  goal")
    for backend, goal in (("vxlan", 0.85), ("host-gw", 0.95)):
        g = w[backend]["gbit_s"]
        lines.append(f"{'iperf3 TCP Gbit/s, ' + backend + ' vs underlay':44} {g:12.2f} {u:12.2f} {g / u:7.2f}  "
                     f">= {goal}x {'met' if g / u >= goal else 'MISSED'}")
        p50, p99 = w[backend]["ping_ms"]
        lines.append(f"{'ping p50/p99 ms, ' + backend + ' vs underlay':44} {p50:5.3f}/{p99:5.3f} "
                     f"{w['underlay']['ping_ms'][0]:5.3f}/{w['underlay']['ping_ms'][1]:5.3f}")
    for peers, c in r["convergence"].items():
        met = c["median_ms"] <= 5 and c["p99_ms"] <= 20
        lines.append(f"{'convergence ms (median/p99), ' + peers + ' peers':44} {c['median_ms']:5.1f}/{c['p99_ms']:5.1f}"
                     f"{'':13} {'':7}  <= 5/20 {'met' if met else 'MISSED'}")
    for peers, s in r["scale"].items():
        goal = 0.2 if peers == "1000" else 5.0
        inner = s["seconds_inside_daemon"]
        in_daemon = f" (in-daemon {inner:.2f}s)" if inner is not None else ""
        lines.append(f"{'cold start to programmed s, ' + peers + ' peers':44} {s['seconds_from_exec']:12.2f}"
                     f"{'':21}  <= {goal} {'met' if s['seconds_from_exec'] <= goal else 'MISSED'}{in_daemon}")
        if "rss_mb" in s:
            lines.append(f"{'daemon RSS MB / idle CPU %, 1000 peers':44} {s['rss_mb']:6.1f}/{s['idle_cpu_percent']:4.2f}"
                         f"{'':21}  <= 50 MB, < 1 % {'met' if s['rss_mb'] <= 50 and s['idle_cpu_percent'] < 1 else 'MISSED'}")
    if "lifecycle" in r:
        d = r["lifecycle"]["docker_run_rm_median_s"]
        ratio = d["overlay0"] / d["plainbr"]
        lines.append(f"{'docker run --rm s, overlay0 vs bridge':44} {d['overlay0']:12.3f} {d['plainbr']:12.3f}"
                     f" {ratio:7.2f}  <= 1.10x {'met' if ratio <= 1.10 else 'MISSED'} (--network none {d['none']:.3f}s)")
    return "\n".join(lines)


def main() -> int:
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}",
               "wire": {}, "convergence": {}, "scale": {}}
    steps = [("wire", lambda: wire(results)), ("convergence 10", lambda: convergence(results, 10)),
             ("convergence 1000", lambda: convergence(results, 1000)), ("scale 1000", lambda: scale(results, 1000)),
             ("scale 5000", lambda: scale(results, 5000)), ("lifecycle", lambda: lifecycle(results))]
    for name, step in steps:
        started = time.monotonic()
        print(f"... {name}", flush=True)
        step()
        print(f"    done in {time.monotonic() - started:.0f}s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['machine']}, {results['date']}\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
