"""CNI ADD/DEL latency: the `pyflannel` binary (pyinstaller) and its Python entry point against the stock bridge +
host-local plugins (/usr/lib/cni) given the same delegate config, each into a fresh namespace on one lab host.

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

from tests.lab import REPO, VENV_BIN, Lab, inside, sh

BINARY = REPO / "dist" / "cni" / "pyflannel"


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


def latency(results: dict, runs: int = 30) -> None:
    subprocess.run(["make", "-s", "cni"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    lab = Lab(1)
    try:
        lab.set_config()
        host = lab.hosts[0]
        host.start_daemon()
        ours = {"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel", "subnetFile": str(host.subnet_file),
                "dataDir": str(host.workdir / "cni-flannel"),
                "ipam": {"dataDir": str(host.workdir / "cni-networks")}}
        variants = {"binary": (str(BINARY), ours), "python": (str(VENV_BIN / "pyflannel-cni"), ours)}
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
        for name, plugin in (("binary", str(BINARY)), ("python", str(VENV_BIN / "pyflannel-cni"))):
            startup[name] = statistics.median(_run(plugin, "VERSION", {}, "", "") for _ in range(runs))
        results["cni"] = {"runs": runs, "binary_mb": Path(BINARY).stat().st_size / 2**20, "version_ms": startup,
                          **{f"{cmd.lower()}_ms": {name: _summary(t[cmd]) for name, t in times.items()}
                             for cmd in ("ADD", "DEL")}}
    finally:
        lab.close()


def table_lines(c: dict) -> list[str]:
    lines = []
    for cmd in ("add", "del"):
        stock = c[f"{cmd}_ms"]["stock"]
        for name in ("binary", "python"):
            ours = c[f"{cmd}_ms"][name]
            lines.append(f"{f'CNI {cmd.upper()} ms median/p99, {name} vs stock':44} "
                         f"{ours['median_ms']:6.1f}/{ours['p99_ms']:5.1f} {stock['median_ms']:6.1f}/"
                         f"{stock['p99_ms']:5.1f} {ours['median_ms'] / stock['median_ms']:7.2f}  (bridge + host-local)")
    v = c["version_ms"]
    lines.append(f"{'CNI VERSION ms (startup), binary vs python':44} {v['binary']:12.1f} {v['python']:12.1f} "
                 f"{v['binary'] / v['python']:7.2f}  (binary {c['binary_mb']:.1f} MB)")
    return lines
