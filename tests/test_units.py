"""The systemd units (systemd/, installed by `make install-host`): systemd's own checker accepts them as rendered,
and the order they encode is the one a host needs at boot: network -> pyflanneld -> the driver (its socket from
early boot) -> dockerd; what they keep through a restart of pyflanneld: its DNS socket, and wireguard-go. Running
them under a real systemd is left to the hosts; the sockets handed over as systemd does are tested in
test_driver_restart.py and test_dns_restart.py, wireguard-go through a restart in test_wireguard.py."""
import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import DNS_ADDRESS, REPO, VENV_BIN

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")]


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
    assert names == ["pyflannel-driver.service", "pyflannel-driver.socket", "pyflanneld-dns.socket",
                     "pyflanneld.service"]
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


def test_pyflanneld_restarts_keep_the_dns_socket_and_wireguard_go(units):
    daemon, dns = unit(units, "pyflanneld.service"), unit(units, "pyflanneld-dns.socket")
    # systemd holds the socket from boot (FreeBind: before the address is on lo) and hands it to each pyflanneld
    assert dns["Socket"]["ListenDatagram"] == f"{DNS_ADDRESS}:53" and dns["Socket"]["FreeBind"] == "yes"
    assert dns["Socket"]["Service"] == "pyflanneld.service" and dns["Install"]["WantedBy"] == "sockets.target"
    assert daemon["Service"]["Sockets"] == "pyflanneld-dns.socket" and "PartOf" not in dns["Unit"]  # not restarted
    # a stop signals pyflanneld only: wireguard-go, in the same cgroup, is left (test_wireguard.py restarts it so)
    assert daemon["Service"]["KillMode"] == "process"
    assert "pyflanneld-dns.socket" in (REPO / "Makefile").read_text().split("install-host:", 1)[1].split("\n\n")[0]
