"""`make install-host` puts pyflannel's commands on PATH beside its units, and `make uninstall-host` takes all of it
away again (issue 29), installed into folders of the test (no systemd runs here, so nothing is started)."""
import os
import subprocess

import pytest

from lab import make

pytestmark = pytest.mark.lab


def test_install_host_links_the_commands_and_uninstall_host_removes_them(tmp_path):
    dirs = {"PREFIX": tmp_path / "opt", "UNITDIR": tmp_path / "units", "LINKDIR": tmp_path / "bin"}
    folders = [f"{k}={v}" for k, v in dirs.items()]
    make(*folders, "install-host")  # its pip builds in the tree, as `make cni` does
    for command in ("pyflanneld", "pyflannel-driver", "pyflannel"):
        link = dirs["LINKDIR"] / command
        assert os.readlink(link) == str(dirs["PREFIX"] / "bin" / command)
    usage = subprocess.run(["pyflannel", "--help"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PATH": f"{dirs['LINKDIR']}:{os.environ['PATH']}"}).stdout
    assert "docker-opts" in usage
    assert {"pyflanneld.service", "pyflannel-driver.socket"} <= set(os.listdir(dirs["UNITDIR"]))
    make(*folders, "uninstall-host")
    assert not dirs["PREFIX"].exists() and os.listdir(dirs["LINKDIR"]) == [] and os.listdir(dirs["UNITDIR"]) == []
