"""docker-compose (1.29) on two lab hosts, each with its own dockerd: docker-compose.yml brings up pyflanneld and
pyflannel-driver from the locally built image (`make images`); demo/docker-compose.yml's web on host 1 answers with
the records of the backend on host 2, over overlay0; `down` removes everything."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.lab import IMAGE, OUTSIDE_DNS, REPO, Lab, inside, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.docker]
COMPOSE = "/usr/bin/docker-compose"
INFRA = REPO / "docker-compose.yml"
DEMO = REPO / "demo" / "docker-compose.yml"
NETWORKS_DEMO = REPO / "demo" / "shop" / "docker-compose.yml"
RECORDS = (REPO / "demo" / "backend" / "records.txt").read_text()


def compose(host, file: Path, *args: str, **env: str) -> str:
    """docker-compose against this host's dockerd; host folders inside the lab's work dir."""
    environment = {**os.environ, "DOCKER_HOST": f"unix://{host.docker_sock}",
                   "FLANNELD_ETCD_ENDPOINTS": host.lab.etcd_url, "FLANNELD_IFACE": "eth0",
                   "PYFLANNEL_RUN_DIR": str(host.workdir / "run-flannel"),
                   "PYFLANNEL_STATE_DIR": str(host.workdir / "state"),
                   "PYFLANNEL_PLUGIN_DIR": str(host.workdir / "plugins"), "DEMO_IMAGE": IMAGE,
                   "PYFLANNEL_DOCKER_SOCK": str(host.docker_sock), "FLANNELD_DNS_UPSTREAM": OUTSIDE_DNS, **env}
    done = subprocess.run([COMPOSE, "-f", str(file), *args], env=environment, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"docker-compose {' '.join(args)} on {host.name} failed: {done.stderr.strip()}")
    return done.stdout


def overlay_ip(host, container: str) -> str:
    return json.loads(host.docker("inspect", container))[0]["NetworkSettings"]["Networks"]["overlay0"]["IPAddress"]


def fetch(host, url: str) -> str:
    """An HTTP GET from the host's own namespace (it routes to overlay0 through the driver's bridge)."""
    with inside(host.ns), urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


@pytest.fixture(scope="module")
def compose_lab(plugin_build, docker_engine):
    """Two hosts running pyflannel with `docker-compose up -d`; dockerd finds the driver's socket through the
    lab's per-host spec file, which names the folder given to compose as PYFLANNEL_PLUGIN_DIR."""
    with Lab(2) as lab:
        lab.set_config()
        for host in lab.hosts:
            host.start_dockerd(docker_engine)
            subprocess.run(["make", "-s", "images"], cwd=REPO, check=True, capture_output=True,
                           env={**os.environ, "DOCKER_HOST": f"unix://{host.docker_sock}"})
            socket = host.workdir / "plugins" / "pyflannel.sock"
            (Path("/etc/netns") / host.ns / "docker" / "plugins" / "pyflannel.spec").write_text(f"unix://{socket}\n")
            compose(host, INFRA, "up", "-d")
        for host in lab.hosts:
            socket = host.workdir / "plugins" / "pyflannel.sock"
            wait_until(f"{host.name}'s subnet.env and driver socket", lambda: socket.exists() and (
                host.workdir / "run-flannel" / "subnet.env").exists(), timeout=60, interval=0.2)
        yield lab


def test_compose_runs_daemon_and_driver(compose_lab):
    leases = compose_lab.leases()
    for host in compose_lab.hosts:
        running = host.docker("ps", "--format", "{{.Names}} {{.Image}}").split("\n")
        assert {"pyflanneld pyflannel:latest", "pyflannel-driver pyflannel:latest"} <= set(running)
        env = dict(line.split("=", 1) for line in (host.workdir / "run-flannel" / "subnet.env").read_text().split())
        lease = str(ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network).replace("/", "-")
        assert leases[lease]["attrs"]["PublicIP"] == host.ip
        assert (host.workdir / "state" / "vtep-mac.1").exists()


def test_demo_web_answers_with_backend_records_across_hosts(compose_lab):
    h1, h2 = compose_lab.hosts
    compose(h2, DEMO, "up", "-d", "backend")
    compose(h1, DEMO, "up", "-d", "web")  # web finds `backend` by its service name: no address passed
    web = overlay_ip(h1, "demo-web")
    page = wait_until("the web's answer", lambda: RECORDS in (page := fetch(h1, f"http://{web}/cgi-bin/query"))
                      and page, timeout=30, interval=0.5)
    print(page)
    assert "got from backend backend:" in page
    assert "demo-backend" not in h1.docker("ps", "-a", "--format", "{{.Names}}")  # the data crossed hosts


def test_two_networks_app_front_public_back_internal(compose_lab):
    """demo/shop/docker-compose.yml: web on h1 (front, published on 8080, and back) fetches from backend on h2
    (back, --internal) across hosts; backend reaches nothing outside; `down` leaves both flannel networks."""
    h1, h2 = compose_lab.hosts
    compose(h2, NETWORKS_DEMO, "up", "-d", "backend")
    backend = json.loads(h2.docker("inspect", "shop-backend"))[0]["NetworkSettings"]["Networks"]["shop_back"]
    assert ipaddress.IPv4Address(backend["IPAddress"]) in ipaddress.IPv4Network("10.62.0.0/16")
    compose(h1, NETWORKS_DEMO, "up", "-d", "web")  # `backend` here is shop's, not the overlay0 demo's
    page = wait_until("the web's answer through its published port", lambda: RECORDS in (page := fetch(
        h2, f"http://{h1.ip}:8080/cgi-bin/query")) and page, timeout=30, interval=0.5)
    assert "got from backend backend:" in page
    assert h1.docker("exec", "shop-web", "nslookup", "backend", check=False).count(backend["IPAddress"]) == 1
    assert compose_lab.network_config("shop-back")["Network"] == "10.62.0.0/16"
    assert compose_lab.network_config("shop-front")["Network"].startswith("10.128.")
    out = h2.docker("exec", "shop-backend", "timeout", "3", "wget", "-qO-", f"http://{h1.ip}:8080/", check=False)
    assert "hello" not in out  # internal: not even the other host's published port
    for host in (h1, h2):
        compose(host, NETWORKS_DEMO, "down")
        assert not (host.workdir / "run-flannel" / "networks" / "shop-back.env").exists()
    assert compose_lab.leases("shop-back") == {} and compose_lab.leases("shop-front") == {}


def test_compose_down_removes_everything(compose_lab):
    for host in compose_lab.hosts:
        compose(host, DEMO, "down")
        assert "overlay0" not in host.docker("network", "ls", "--format", "{{.Name}}")
        assert host.extra_links() == set(), "bridge or veth left behind"
        compose(host, INFRA, "down")
        assert host.docker("ps", "-aq") == ""
        assert not (host.workdir / "plugins" / "pyflannel.sock").exists()
