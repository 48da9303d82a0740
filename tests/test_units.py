"""The systemd units (systemd/, installed by `make install-host`): systemd's own checker accepts them as rendered,
and the order they encode is the one a host needs at boot: network -> pyflanneld -> the driver (its socket from
early boot) -> dockerd. Running them under a real systemd is left to the hosts; the driver's socket activation
itself is tested in test_driver_restart.py."""
import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.lab import REPO, VENV_BIN

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")


@pytest.fixture
def units(tmp_path) -> Path:
    subprocess.run(["make", "-s", "units", f"UNITDIR={tmp_path}", f"BINDIR={VENV_BIN}"], cwd=REPO, check=True)
    return tmp_path


def unit(folder: Path, name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(folder / name)
    return parser


def test_systemd_accepts_the_units(units):
    names = sorted(p.name for p in units.iterdir())
    assert names == ["pyflannel-driver.service", "pyflannel-driver.socket", "pyflanneld.service"]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in names)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    assert f"ExecStart={VENV_BIN}/pyflanneld" in (units / "pyflanneld.service").read_text()


def test_the_units_encode_the_boot_order(units):
    daemon, driver, sock = (unit(units, n) for n in ("pyflanneld.service", "pyflannel-driver.service",
                                                      "pyflannel-driver.socket"))
    assert "network-online.target" in daemon["Unit"]["After"] and "network-online.target" in daemon["Unit"]["Wants"]
    assert {"pyflannel-driver.service", "docker.service"} <= set(daemon["Unit"]["Before"].split())
    assert {"pyflanneld.service", "pyflannel-driver.socket"} <= set(driver["Unit"]["After"].split())
    assert "docker.service" in driver["Unit"]["Before"] and driver["Unit"]["Requires"] == "pyflannel-driver.socket"
    assert sock["Socket"]["ListenStream"] == "/run/docker/plugins/pyflannel.sock"
    assert sock["Socket"]["SocketMode"] == "0660" and sock["Install"]["WantedBy"] == "sockets.target"
    assert daemon["Service"]["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE"
    # started once the lease is held (READY=1): the driver and dockerd, ordered after it, find subnet.env
    assert (daemon["Service"]["Type"], daemon["Service"]["NotifyAccess"]) == ("notify", "main")
    assert driver["Service"]["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW"
    for service in (daemon, driver):
        assert service["Service"]["ProtectSystem"] == "strict" and service["Service"]["Restart"] in ("always",
                                                                                                  "on-failure")
