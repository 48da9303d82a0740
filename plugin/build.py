"""Build the managed plugin directory and the compose image's root filesystem (`make plugin`).

    python plugin/build.py [--out build/plugin]

1. PyInstaller (one-dir) freezes plugin/entrypoint.py, with the `pyflannel` package from this repository, into
   OUT/pyinstaller/dist/pyflannel: one multi-call binary.
2. Assembles OUT/pyflannel/rootfs: the frozen binary in /opt/pyflannel with the command symlinks in /usr/bin,
   iptables (nft) with its extensions, wireguard-go, every shared library these need (ldd) plus the dynamic loader, and the few
   /etc files and empty folders the processes and dockerd's bind mounts expect; plugin/pyflannel-host, which runs
   this rootfs's `pyflannel` on the plugin's host, in /usr/share/pyflannel.
3. Copies config.json beside it (OUT/pyflannel is what `docker plugin create` takes) and writes
   OUT/pyflannel-rootfs.tar (what `docker import` takes for the compose image).
Build-time only: it runs pyinstaller, ldd and tar on paths it computed itself.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("pyflanneld", "pyflannel-driver", "pyflannel", "pyflannel-plugin")
# gunicorn picks its worker and logger classes by name at run time: PyInstaller cannot see those imports.
HIDDEN_IMPORTS = ("gunicorn.workers.gthread", "gunicorn.workers.sync", "gunicorn.glogging")
EXCLUDED_MODULES = ("pytest", "_pytest", "readline", "tkinter", "pydoc", "lib2to3")
IPTABLES = Path("/usr/sbin/xtables-nft-multi")
IPTABLES_NAMES = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
                  "ip6tables-restore")
XTABLES_DIR = Path("/usr/lib/x86_64-linux-gnu/xtables")
WIREGUARD_GO = Path("/usr/bin/wireguard-go")  # the wireguard backend's device where the kernel has no module
HOST_COMMAND = "usr/share/pyflannel/pyflannel-host"  # `pyflannel` for the plugin's host, copied out of the rootfs
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\n",
    "etc/nsswitch.conf": "hosts: files dns\nprotocols: files\nservices: files\n",
    "etc/hosts": "",          # dockerd bind-mounts the host's over these two
    "etc/resolv.conf": "",
}
COPIED_FILES = ("/etc/protocols", "/etc/ssl/certs/ca-certificates.crt")
EMPTY_DIRS = ("proc", "sys", "dev", "root", "host/run", "host/var/lib", "etc/pyflannel/tls", "run/docker/plugins",
              "var/lib/pyflannel", "tmp")
LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def freeze(out: Path) -> Path:
    work = out / "pyinstaller"
    argv = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--onedir", "--strip", "--log-level", "WARN",
            "--name", "pyflannel", "--paths", str(REPO), "--distpath", str(work / "dist"),
            "--workpath", str(work / "work"), "--specpath", str(work)]
    for module in HIDDEN_IMPORTS:
        argv += ["--hidden-import", module]
    for module in EXCLUDED_MODULES:
        argv += ["--exclude-module", module]
    subprocess.run([*argv, str(REPO / "plugin" / "entrypoint.py")], check=True)
    return work / "dist" / "pyflannel"


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def shared_libraries(elves: list[Path], bundled: Path) -> set[Path]:
    """System libraries the ELF files load (the loader included). Libraries resolve to PyInstaller's bundled
    copies first, as they do at run time, and those copies are left out; the frozen binary itself (the
    bootloader) loads its own few (libz, …) from the system."""
    libs = set()
    for elf in elves:
        env = os.environ if elf.parent == bundled.parent else {**os.environ, "LD_LIBRARY_PATH": str(bundled)}
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, env=env).stdout
        for match in LDD_LINE.finditer(out):
            lib = Path(match.group(1))
            if bundled not in lib.parents:
                libs.add(lib)
    return libs


def install_file(rootfs: Path, source: Path, target: str) -> None:
    """Copy `source`'s content to `target` inside rootfs, the target's folder with symlinks resolved (/lib is
    usr/lib on Debian 12, and the rootfs repeats those links)."""
    folder = Path(os.path.realpath(Path(target).parent))
    dest = rootfs / folder.relative_to("/") / Path(target).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(source), dest)


def assemble_rootfs(rootfs: Path, frozen: Path) -> None:
    shutil.rmtree(rootfs, ignore_errors=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (rootfs / target).mkdir(parents=True, exist_ok=True)
        (rootfs / link).symlink_to(target)
    shutil.copytree(frozen, rootfs / "opt" / "pyflannel", symlinks=True)
    for name in COMMANDS:
        (rootfs / "usr" / "bin" / name).symlink_to("/opt/pyflannel/pyflannel")
    install_file(rootfs, IPTABLES, str(IPTABLES))
    for name in IPTABLES_NAMES:
        (rootfs / "usr" / "sbin" / name).symlink_to(IPTABLES.name)
    install_file(rootfs, WIREGUARD_GO, str(WIREGUARD_GO))
    extensions = [p for p in XTABLES_DIR.glob("lib*.so") if p.name.startswith(("libxt_", "libipt_", "libip6t_"))]
    for extension in extensions:
        install_file(rootfs, extension, str(extension))
    internal = rootfs / "opt" / "pyflannel" / "_internal"
    elves = [p for p in (rootfs / "opt").rglob("*") if p.is_file() and is_elf(p)] + [IPTABLES, WIREGUARD_GO,
                                                                                   *extensions]
    for lib in shared_libraries(elves, internal.resolve()):
        install_file(rootfs, lib, str(lib))
    for name, text in ETC_FILES.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_text(text)
    for name in COPIED_FILES:
        install_file(rootfs, Path(name), name)
    for name in EMPTY_DIRS:
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    (rootfs / HOST_COMMAND).parent.mkdir(parents=True)
    shutil.copy2(REPO / "plugin" / "pyflannel-host", rootfs / HOST_COMMAND)
    (rootfs / "tmp").chmod(0o1777)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "build" / "plugin")
    out = p.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    frozen = freeze(out)
    plugin_dir = out / "pyflannel"
    assemble_rootfs(plugin_dir / "rootfs", frozen)
    shutil.copy2(REPO / "config.json", plugin_dir / "config.json")
    subprocess.run(["tar", "-C", str(plugin_dir / "rootfs"), "-cf", str(out / "pyflannel-rootfs.tar"), "."],
                   check=True)
    print(f"plugin directory: {plugin_dir} (docker plugin create pyflannel {plugin_dir})")
    print(f"image rootfs: {out / 'pyflannel-rootfs.tar'} (docker import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
