"""pyflanneld as installed: the daemon, which also runs the thin CNI client's calls with the CNI plugin's own code.
The daemon and the CNI plugin never import each other; this is where the two meet."""
from __future__ import annotations

from pyflannel.cni.main import run as run_cni
from pyflannel.daemon.main import main as run_daemon


def main(argv: list[str] | None = None) -> int:
    return run_daemon(argv, cni=run_cni)
