"""`pyflannel status` on a lab host: the table and --json show leases, reachability and programmed routes."""
import json

import pytest

from pyflannel.localapi import Client
from lab import VENV_BIN

pytestmark = pytest.mark.lab


def test_status_shows_hosts_and_routes(make_lab):
    lab = make_lab(2)
    lab.set_config()
    for host in lab.hosts:
        host.start_daemon()
    h1, h2 = lab.hosts
    Client(str(h1.api_sock)).join("shop")
    common = ["-etcd-endpoints", lab.etcd_url, "-subnet-file", str(h1.subnet_file), "-api-socket", str(h1.api_sock)]
    report = json.loads(h1.sh(str(VENV_BIN / "pyflannel"), "status", "--json", *common))
    assert report["problems"] == [] and report["host"]["etcd"] == "reachable"
    assert [(n["name"], n["state"]) for n in report["networks"]] == [("default", "ready"), ("shop", "ready")]
    peer = next(h for h in report["hosts"] if not h["self"])
    h2_lease = h2.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    assert peer["subnet"] == h2_lease and peer["public_ip"] == "192.0.2.12"
    assert peer["programmed"] and peer["reachable"] and peer["backend"] == "vxlan" and peer["vtep_mac"]
    assert any(r.startswith(h2_lease) for r in report["routes"])
    table = h1.sh(str(VENV_BIN / "pyflannel"), "status", *common)
    assert "SUBNET" in table and "192.0.2.12" in table and "routes programmed" in table
    shop = next(line for line in table.splitlines() if line.strip().startswith("shop "))
    assert "10.128.0.0/16" in shop and "ready" in shop
    h2.sh("ip", "link", "set", "eth0", "down")  # h2 falls off the underlay
    report = json.loads(h1.sh(str(VENV_BIN / "pyflannel"), "status", "--json", *common))
    assert next(h for h in report["hosts"] if not h["self"])["reachable"] is False
