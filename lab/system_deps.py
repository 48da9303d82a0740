"""`make system-deps`: the apt packages the tests, the demo and a host install need, installed only where nothing
provides them yet. A Docker or containerd from elsewhere (Docker's own docker-ce and containerd.io, a static
build) is used as it is when new enough, never replaced by Debian's, which conflict with it.

    python3 lab/system_deps.py [--print] PACKAGE...     (system python3: runs before the venv exists)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# Packages whose programs may come from other packages than Debian's: the commands that stand for them.
PROVIDED_BY_COMMANDS = {
    "docker.io": ("dockerd", "docker"),
    "containerd": ("containerd", "ctr"),  # containerd.io ships both
    "runc": ("runc",),
    "docker-compose": ("docker-compose",),
    "iptables": ("iptables", "ip6tables", "iptables-restore"),
    "wireguard-go": ("wireguard-go",),
}
OLDEST_DOCKER = (20, 10)  # the oldest dockerd the driver is tested with


class TooOld(Exception):
    """An installed program older than pyflannel needs, which make will not replace."""


def dpkg_installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.endswith(" installed")


def dockerd_version() -> tuple[int, int] | None:
    try:
        out = subprocess.run(["dockerd", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"version (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def missing(packages: list[str], installed=dpkg_installed, which=shutil.which, docker_version=dockerd_version
            ) -> list[str]:
    """The packages to install: neither installed as packages nor provided by commands on PATH. TooOld when a
    dockerd found on PATH is older than OLDEST_DOCKER."""
    needed = []
    for package in packages:
        if installed(package):
            continue
        commands = PROVIDED_BY_COMMANDS.get(package)
        if commands and all(which(c) for c in commands):
            if package == "docker.io":
                version = docker_version()
                if version is not None and version < OLDEST_DOCKER:
                    raise TooOld(f"dockerd {version[0]}.{version[1]} on this machine is older than "
                                 f"{OLDEST_DOCKER[0]}.{OLDEST_DOCKER[1]}; upgrade it (make never replaces a Docker "
                                 f"it did not install)")
            continue
        needed.append(package)
    return needed


def main(argv: list[str]) -> int:
    only_print = argv[:1] == ["--print"]
    packages = argv[1:] if only_print else argv
    try:
        needed = missing(packages)
    except TooOld as e:
        print(f"system-deps: {e}", file=sys.stderr)
        return 1
    if only_print:
        print(" ".join(needed))
    if only_print or not needed:
        return 0
    print(f"installing with apt-get: {' '.join(needed)}", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *needed], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
