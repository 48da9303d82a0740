"""DNS for container names: pyflanneld's resolver beside Docker's embedded DNS, queried from the same container.

On a 2-host lab (dockerd 20.10, --dns 169.254.53.53): `web` runs on host 2, `near` and the asker on host 1, all on
overlay0. From the asker's network namespace a load generator (bench/dns_load.py, run with nsenter) sends A queries:
  - pyflanneld directly (169.254.53.53) for `web`: our answer, a container on another host;
  - Docker's embedded DNS (127.0.0.11) for `near`: Docker's own answer, a container on the same host (the reference);
  - Docker's embedded DNS for `web`: what containers do, Docker forwarding to pyflanneld.
Each is measured one query at a time (latency p50/p99, queries/s) and with 8 queries in flight (queries/s),
ROUNDS times, the three taking turns: each figure is the median of its rounds (the machine is shared).
"""
from __future__ import annotations

import json
import statistics
import subprocess

from lab import IMAGE, REPO, VENV_BIN, Lab, wait_until

from pyflannel.daemon.flags import DNS_ADDRESS

LOAD = REPO / "bench" / "dns_load.py"
QUERIES = 2000
ROUNDS = 3


def measure(results: dict) -> None:
    with Lab(2) as lab:
        lab.start_docker("20.10")
        h1, h2 = lab.hosts
        for host in lab.hosts:
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        h2.docker("run", "-d", "--name", "web", "--network", "overlay0", IMAGE, "sleep", "100000")
        for name in ("near", "asker"):
            h1.docker("run", "-d", "--name", name, "--network", "overlay0", IMAGE, "sleep", "100000")
        wait_until("web resolves on host 1", lambda: "Name:" in h1.docker("exec", "asker", "nslookup", "web",
                                                                          check=False), timeout=20)
        pid = h1.docker("inspect", "-f", "{{.State.Pid}}", "asker").strip()
        rounds = {}
        for _ in range(ROUNDS):
            for label, server, name in (("pyflanneld, web (other host)", DNS_ADDRESS, "web"),
                                        ("docker embedded, near (same host)", "127.0.0.11", "near"),
                                        ("docker embedded -> pyflanneld, web", "127.0.0.11", "web")):
                out = subprocess.run(["nsenter", "-t", pid, "-n", str(VENV_BIN / "python"), str(LOAD), server, name,
                                      str(QUERIES)], capture_output=True, text=True, timeout=300, check=True).stdout
                rounds.setdefault(label, []).append(json.loads(out))
        results["dns"] = {label: {key: statistics.median(f[key] for f in found) for key in found[0]}
                          for label, found in rounds.items()}


def table_lines(figures: dict) -> list[str]:
    lines = []
    reference = figures["docker embedded, near (same host)"]
    for label, f in figures.items():
        lines.append(f"{'dns ' + label:44} p50/p99 {f['p50_ms']:.3f}/{f['p99_ms']:.3f} ms, {f['qps']:7.0f} q/s "
                     f"({f['qps_8']:7.0f} q/s x8); q/s vs Docker's own {f['qps'] / reference['qps']:.2f}x "
                     f"({f['qps_8'] / reference['qps_8']:.2f}x x8)")
    return lines
