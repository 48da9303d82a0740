"""CNI ADD/DEL latency: the `pyflannel` thin client (calls run by pyflanneld), the complete plugin alone (the
pyinstaller binary, the thin client's fallback) and its Python entry point, against the stock bridge + host-local
plugins (/usr/lib/cni) given the same delegate config, each into a fresh namespace on one lab host.

The variants take turns in every round, so machine noise hits them alike. Plugins are started from a thread that is
inside the host's namespace (no `ip netns exec` in the figures). DEL gets the namespace path (the common CRI case),
as the stock plugin leaves the veth behind with CNI_NETNS="".
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from lab import REPO, VENV_BIN, Lab, inside, sh

THIN = REPO / "dist" / "cni" / "pyflannel"
BINARY = REPO / "dist" / "cni" / "pyflannel-inprocess"
GOAL = 1.5  # the thin client against the stock plugins, median and p99


def _run(plugin: str, command: str, config: dict, container_id: str, netns: str) -> float:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    started = time.monotonic()
    done = subprocess.run([plugin], input=json.dumps(config).encode(), capture_output=True, env=env, timeout=60)
    elapsed = (time.monotonic() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{plugin} {command} failed: {done.stdout.decode()} {done.stderr.decode()}")
    return elapsed


def _summary(values: list[float]) -> dict:
    return {"median_ms": statistics.median(values), "p99_ms": statistics.quantiles(values, n=100)[98]}


def latency(results: dict, runs: int = 60) -> None:
    subprocess.run(["make", "-s", "cni"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    lab = Lab(1)
    try:
        lab.set_config()
        host = lab.hosts[0]
        host.start_daemon()
        ours = {"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel", "subnetFile": str(host.subnet_file),
                "dataDir": str(host.workdir / "cni-flannel"),
                "ipam": {"dataDir": str(host.workdir / "cni-networks")}}
        variants = {"thin": (str(THIN), {**ours, "daemonSocket": str(host.api_sock)}), "binary": (str(BINARY), ours),
                    "python": (str(VENV_BIN / "pyflannel-cni"), ours)}
        times = {name: {"ADD": [], "DEL": []} for name in (*variants, "stock")}
        container = lab.add_ns("bench")
        netns = f"/run/netns/{container}"
        for i in range(runs + 1):  # round 0 warms caches and makes the bridge; it is not counted
            for name, (plugin, config) in list(variants.items()):
                sh("ip", "netns", "del", container)
                sh("ip", "netns", "add", container)
                cid = f"{name}-{i}"
                with inside(host.ns):
                    add = _run(plugin, "ADD", config, cid, netns)
                    if name == "binary" and "stock" not in variants:  # the delegate flannel would hand the bridge
                        saved = json.loads((host.workdir / "cni-flannel" / cid).read_text())
                        variants["stock"] = ("/usr/lib/cni/bridge", saved)
                    delete = _run(plugin, "DEL", config, cid, netns)
                if i:
                    times[name]["ADD"].append(add)
                    times[name]["DEL"].append(delete)
        startup = {}
        for name, (plugin, config) in variants.items():
            if name != "stock":
                startup[name] = statistics.median(_run(plugin, "VERSION", config, "", "") for _ in range(runs))
        results["cni"] = {"runs": runs, "binary_mb": Path(BINARY).stat().st_size / 2**20,
                          "thin_kb": Path(THIN).stat().st_size / 2**10, "version_ms": startup,
                          **{f"{cmd.lower()}_ms": {name: _summary(t[cmd]) for name, t in times.items()}
                             for cmd in ("ADD", "DEL")}}
    finally:
        lab.close()


def table_lines(c: dict) -> list[str]:
    lines = []
    for cmd in ("add", "del"):
        stock = c[f"{cmd}_ms"]["stock"]
        for name in ("thin", "binary", "python"):
            ours = c[f"{cmd}_ms"][name]
            ratio, p99_ratio = ours["median_ms"] / stock["median_ms"], ours["p99_ms"] / stock["p99_ms"]
            goal = (f"<= {GOAL}x (p99 {p99_ratio:.2f}x) {'met' if max(ratio, p99_ratio) <= GOAL else 'MISSED'}"
                    if name == "thin" else "(bridge + host-local)")
            lines.append(f"{f'CNI {cmd.upper()} ms median/p99, {name} vs stock':44} "
                         f"{ours['median_ms']:6.1f}/{ours['p99_ms']:5.1f} {stock['median_ms']:6.1f}/"
                         f"{stock['p99_ms']:5.1f} {ratio:7.2f}  {goal}")
    v = c["version_ms"]
    lines.append(f"{'CNI VERSION ms (startup), thin vs binary':44} {v['thin']:12.1f} {v['binary']:12.1f} "
                 f"{v['thin'] / v['binary']:7.2f}  (thin {c['thin_kb']:.0f} KB, binary {c['binary_mb']:.1f} MB, "
                 f"python {v['python']:.1f} ms)")
    return lines
