"""pyflannel-plugin: the managed Docker plugin's entrypoint, running pyflanneld and pyflannel-driver side by side.

    pyflannel-plugin [--socket /run/docker/plugins/pyflannel.sock]

pyflanneld gets the FLANNELD_* environment (the plugin's settings), the driver a flag for each DRIVER_* one; an
empty one means "the flag's default", since `docker plugin set` cannot unset a variable. The two meet on the files
pyflanneld's settings name (subnet.env, its local API's socket, its state folder), which config.json puts on the
host's mounts, so that the host's own tools find them at their usual paths.

Both start at once: dockerd looks for the driver's socket 0.5 s after the start and then every 3 s, giving up after
9.5 s, and on a busy host the driver alone can take seconds to come up. A Docker call that needs the lease before
pyflanneld has written subnet.env waits for it (the driver's --lease-wait), so a network created right after
`docker plugin enable` returns still gets it; with etcd down, enable still succeeds, and the driver's answers and the
daemon's log say what is missing.

As PID 1 of the plugin container it passes SIGTERM/SIGINT on to both, reaps orphans, and when one of the two
ends on its own, stops the other and exits non-zero: dockerd then sees the plugin as stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from pyflannel import paths, version_line

STOP_TIMEOUT = 10.0
DRIVER_SETTING = "DRIVER_"  # the plugin's settings for pyflannel-driver's flags; FLANNELD_* are pyflanneld's

log = logging.getLogger("pyflannel-plugin")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyflannel-plugin",
                                description="Run pyflanneld and pyflannel-driver together (the managed plugin).")
    p.add_argument("--version", action="version", version=version_line("pyflannel-plugin"))
    p.add_argument("--socket", default=paths.DRIVER_SOCKET, help="the driver's socket (default %(default)s)")
    return p.parse_args(argv)


def daemon_environment(environ: dict) -> dict:
    """The environment minus empty FLANNELD_* settings, so that pyflanneld uses its defaults for them."""
    return {k: v for k, v in environ.items() if not (k.startswith("FLANNELD_") and v == "")}


def driver_argv(env: dict, socket_path: str) -> list[str]:
    """pyflannel-driver on pyflanneld's files (subnet.env, the local API, its state folder in the daemon's), and a
    flag for each non-empty DRIVER_<FLAG> setting (DRIVER_LOG_LEVEL=debug: --log-level debug)."""
    argv = ["pyflannel-driver", "--socket", socket_path,
            "--state-dir", paths.driver_state_dir(env.get("FLANNELD_STATE_DIR", paths.STATE_DIR)),
            "--subnet-file", env.get("FLANNELD_SUBNET_FILE", paths.SUBNET_FILE),
            "--daemon-socket", env.get("FLANNELD_API_SOCKET", paths.DAEMON_SOCKET)]
    for name, value in sorted(env.items()):
        if name.startswith(DRIVER_SETTING) and value:
            argv += ["--" + name[len(DRIVER_SETTING):].lower().replace("_", "-"), value]
    return argv


class Supervisor:
    def __init__(self, args: argparse.Namespace, env: dict):
        self.args = args
        self.env = env
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def on_signal(self, signum, _frame) -> None:
        self.stopping = True
        for child in self.children.values():
            if child.returncode is None:
                child.send_signal(signum)

    def start(self, argv: list[str]) -> None:
        log.info("starting %s", " ".join(argv))
        self.children[argv[0]] = subprocess.Popen(argv, env=self.env)

    def wait_first_exit(self) -> tuple[str, int]:
        """Block until one child ends; other processes that end meanwhile are orphans we reap as PID 1."""
        while True:
            for name, child in self.children.items():
                if child.returncode is not None:
                    return name, child.returncode
            pid, status = os.wait()
            for name, child in self.children.items():
                if child.pid == pid:
                    child.returncode = os.waitstatus_to_exitcode(status)

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for name, child in self.children.items():
            try:
                child.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", name, STOP_TIMEOUT)
                child.kill()
                child.wait()

    def run(self) -> int:
        self.start(["pyflanneld"])
        if not self.stopping:
            self.start(driver_argv(self.env, self.args.socket))
        name, code = self.wait_first_exit()
        self.stop_all()
        if self.stopping:
            return 0
        log.error("%s exited with status %d: stopping the plugin", name, code)
        return code or 1


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = Supervisor(args, daemon_environment(dict(os.environ)))
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        return supervisor.run()
    except OSError as e:
        log.error("cannot start %s: %s", e.filename or "a child", e.strerror)
        supervisor.stop_all()
        return 1


if __name__ == "__main__":
    sys.exit(main())
