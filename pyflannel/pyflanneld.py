"""pyflanneld as installed: the daemon, which also runs the thin CNI client's calls with the CNI plugin's own code.
The daemon and the CNI plugin never import each other; this is where the two meet."""
from __future__ import annotations

from pyflannel.daemon.main import main as run_daemon


def run_cni(environ: dict, stdin: bytes) -> tuple[int, str]:
    """The CNI plugin's `run`, imported at the first thin-client call: a host that only runs Docker never loads
    it (what that saves: docs/benchmarks.md)."""
    from pyflannel.cni.main import run
    return run(environ, stdin)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, cni=run_cni)
