"""Compose on two lab hosts, each with its own dockerd, in Debian's pairs: dockerd 20.10 with Compose v1
(`docker-compose` 1.29) and dockerd 26.1 with Compose v2 (2.26, `make engines`). docker-compose.yml brings up
pyflanneld and pyflannel-driver from the locally built image (`make images`), every setting from the env file, etcd
over TLS with the certificates mounted from the host; both demos run across the hosts, on compose-installed pyflannel
and, with Compose v2, on hosts running the managed plugin; `down` removes everything."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from lab import DOCKER_ENGINES, IMAGE, OUTSIDE_DNS, REPO, SWITCH_IP, Lab, inside, make, wait_until
from tests.test_faults import make_certs
from tests.test_plugin import PLUGIN, plugin_lab  # noqa: F401 (plugin_lab: the managed plugin's hosts, a fixture)

COMPOSE_V1 = Path("/usr/bin/docker-compose")
COMPOSE_V2 = DOCKER_ENGINES["26.1"] / "docker-compose"
COMPOSE_OF_ENGINE = {"20.10": COMPOSE_V1, "26.1": COMPOSE_V2}  # as Debian 12 and Debian 13 ship them
INFRA = REPO / "docker-compose.yml"
DEMO = REPO / "demo" / "docker-compose.yml"
SHOP = REPO / "demo" / "shop" / "docker-compose.yml"
RECORDS = (REPO / "demo" / "backend" / "records.txt").read_text()


def compose(binary: Path, host, file: Path, *args: str, **env: str) -> str:
    """`binary` (Compose v1 or v2) against this host's dockerd. No FLANNELD_* here: they come from the env file."""
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")},
                   "DOCKER_HOST": f"unix://{host.docker_sock}", "DEMO_IMAGE": IMAGE, **env}
    done = subprocess.run([str(binary), "-f", str(file), *args], env=environment, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name} {' '.join(args)} on {host.name} failed: {done.stderr.strip()}")
    return done.stdout


def infra_env(host) -> dict[str, str]:
    """docker-compose.yml's variables for a lab host: its env file, the lab's certificates, its own folders."""
    return {"PYFLANNEL_ENV_FILE": str(host.workdir / "pyflanneld.env"), "PYFLANNEL_TLS_DIR": str(host.lab.pki),
            "PYFLANNEL_RUN_DIR": str(host.workdir / "run-flannel"), "PYFLANNEL_STATE_DIR": str(host.workdir / "state"),
            "PYFLANNEL_PLUGIN_DIR": str(host.workdir / "plugins"), "PYFLANNEL_DOCKER_SOCK": str(host.docker_sock)}


def network_ip(host, container: str, network: str) -> str:
    return json.loads(host.docker("inspect", container))[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def fetch(host, url: str) -> str:
    """An HTTP GET from the host's own namespace (it routes to the overlay through the driver's bridge)."""
    with inside(host.ns), urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def start_tls_etcd(lab: Lab) -> None:
    """etcd asking for client certificates on the underlay, the only address the hosts reach; plain HTTP on the
    switch's own loopback for the lab's helpers. The CA, the client certificate and key are in lab.pki."""
    lab.pki = lab.workdir / "pki"
    certs = make_certs(lab.pki, SWITCH_IP)
    local = "http://127.0.0.1:2379"

    def ready():
        with inside(lab.switch), urllib.request.urlopen(local + "/health", timeout=2) as reply:
            return json.loads(reply.read()).get("health") == "true"

    lab.start_etcd("--cert-file", certs["server.pem"], "--key-file", certs["server.key"], "--client-cert-auth",
                   "--trusted-ca-file", certs["ca.pem"], "--listen-client-urls", f"https://{SWITCH_IP}:2379,{local}",
                   scheme="https", ready=ready)
    lab.etcd_url = local


def create_shop_networks(host, driver: str) -> None:
    """demo/shop's external networks, as its file says: shop-front and shop-back, named flannel networks."""
    network = ["network", "create", "-d", driver, "--ipam-driver", driver]
    host.docker(*network, "--ipam-opt", "pyflannel.network=shop-front", "shop-front")
    host.docker(*network, "--ipam-opt", "pyflannel.network=shop-back", "--internal", "--subnet", "10.62.0.0/16",
                "shop-back")


def check_demos(lab: Lab, binary: Path) -> None:
    """Both demos across the lab's two hosts, their networks made by hand on each (overlay0 as the README says,
    create_shop_networks):
    demo/docker-compose.yml's web on h1 answers with the records of the backend on h2 over overlay0;
    demo/shop's web on h1 (shop-front, published on 8080, and shop-back) fetches from its backend on h2 (shop-back,
    --internal), which reaches nothing outside; after `down` and `docker network rm`, nothing is left."""
    h1, h2 = lab.hosts
    compose(binary, h2, DEMO, "up", "-d", "backend")
    compose(binary, h1, DEMO, "up", "-d", "web")  # web finds `backend` by its service name: no address passed
    web = network_ip(h1, "demo-web", "overlay0")
    page = wait_until("the demo web's answer", lambda: RECORDS in (page := fetch(h1, f"http://{web}/cgi-bin/query"))
                      and page, timeout=30, interval=0.5)
    assert "got from backend backend:" in page
    assert "demo-backend" not in h1.docker("ps", "-a", "--format", "{{.Names}}")  # the data crossed hosts
    for host in lab.hosts:
        compose(binary, host, DEMO, "down")
        assert "overlay0" in host.docker("network", "ls", "--format", "{{.Name}}")  # external: not compose's

    compose(binary, h2, SHOP, "up", "-d", "backend")
    backend = network_ip(h2, "shop-backend", "shop-back")
    assert ipaddress.IPv4Address(backend) in ipaddress.IPv4Network("10.62.0.0/16")
    compose(binary, h1, SHOP, "up", "-d", "web")  # `backend` here is shop's, not the overlay0 demo's
    page = wait_until("the shop web's answer through its published port", lambda: RECORDS in (page := fetch(
        h2, f"http://{h1.ip}:8080/cgi-bin/query")) and page, timeout=30, interval=0.5)
    assert "got from backend backend:" in page
    assert h1.docker("exec", "shop-web", "nslookup", "backend", check=False).count(backend) == 1
    assert lab.network_config("shop-back")["Network"] == "10.62.0.0/16"
    assert ipaddress.IPv4Network(lab.network_config("shop-front")["Network"]).subnet_of(
        ipaddress.IPv4Network("10.128.0.0/9"))  # the automatic pool
    out = h2.docker("exec", "shop-backend", "timeout", "3", "wget", "-qO-", f"http://{h1.ip}:8080/", check=False)
    assert "hello" not in out  # internal: not even the other host's published port
    for host in lab.hosts:
        compose(binary, host, SHOP, "down")
        host.docker("network", "rm", "overlay0", "shop-front", "shop-back")
        assert host.extra_links() == set(), "bridge or veth left behind"
    assert lab.leases("shop-back") == {} and lab.leases("shop-front") == {}


@pytest.fixture(scope="module")
def compose_lab(plugin_build, docker_engine):
    """Two hosts running pyflannel with `up -d` of the engine's Compose, every setting in the host's env file, etcd
    reached over TLS only; dockerd finds the driver's socket through the lab's per-host spec file, which names the
    folder given to compose as PYFLANNEL_PLUGIN_DIR."""
    binary = COMPOSE_OF_ENGINE[docker_engine]
    assert binary.exists(), f"{binary} is missing: run `make engines`"
    with Lab(2, etcd=False) as lab:
        start_tls_etcd(lab)
        lab.set_config()
        lab.compose = binary
        for host in lab.hosts:
            host.start_dockerd(docker_engine)
            make("images", env={**os.environ, "DOCKER_HOST": f"unix://{host.docker_sock}"})
            socket = host.workdir / "plugins" / "pyflannel.sock"
            (Path("/etc/netns") / host.ns / "docker" / "plugins" / "pyflannel.spec").write_text(f"unix://{socket}\n")
            # the TLS flags were never among the variables docker-compose.yml used to list: the env file alone
            (host.workdir / "pyflanneld.env").write_text(
                "# written as for a systemd host\n"
                f"FLANNELD_ETCD_ENDPOINTS=https://{SWITCH_IP}:2379\n"
                f"FLANNELD_ETCD_CAFILE={lab.pki / 'ca.pem'}\nFLANNELD_ETCD_CERTFILE={lab.pki / 'client.pem'}\n"
                f"FLANNELD_ETCD_KEYFILE={lab.pki / 'client.key'}\n"
                f"FLANNELD_IFACE=eth0\nFLANNELD_DNS_UPSTREAM={OUTSIDE_DNS}\n")
            compose(binary, host, INFRA, "up", "-d", **infra_env(host))
        for host in lab.hosts:
            socket = host.workdir / "plugins" / "pyflannel.sock"
            wait_until(f"{host.name}'s subnet.env and driver socket", lambda: socket.exists() and (
                host.workdir / "run-flannel" / "subnet.env").exists(), timeout=60, interval=0.2)
        yield lab


@pytest.mark.lab
@pytest.mark.docker
def test_compose_runs_daemon_and_driver_on_tls_etcd(compose_lab):
    """Each host's lease was taken over TLS with the client certificate: the env file named the files, the
    compose file mounted them at the same path."""
    leases = compose_lab.leases()
    version = subprocess.run([str(compose_lab.compose), "version"], capture_output=True, text=True).stdout
    print(f"\n{version.splitlines()[0]}: both hosts leased over TLS")
    for host in compose_lab.hosts:
        running = host.docker("ps", "--format", "{{.Names}} {{.Image}}").split("\n")
        assert {"pyflanneld pyflannel:latest", "pyflannel-driver pyflannel:latest"} <= set(running)
        env = dict(line.split("=", 1) for line in (host.workdir / "run-flannel" / "subnet.env").read_text().split())
        lease = str(ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network).replace("/", "-")
        assert leases[lease]["attrs"]["PublicIP"] == host.ip
        assert (host.workdir / "state" / "vtep-mac.1").exists()
        daemon_env = json.loads(host.docker("inspect", "pyflanneld"))[0]["Config"]["Env"]
        assert f"FLANNELD_ETCD_CERTFILE={compose_lab.pki / 'client.pem'}" in daemon_env


@pytest.mark.lab
@pytest.mark.docker
def test_wireguard_network_through_compose(compose_lab):
    """A WireGuard network: pyflanneld's container has /dev/net/tun for wireguard-go (used where the kernel has no
    WireGuard module)."""
    h1, h2 = compose_lab.hosts
    network = ["network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
               "pyflannel.network=wg", "--ipam-opt", "pyflannel.backend=wireguard", "wg"]
    try:
        for host in compose_lab.hosts:
            host.docker(*network)
        h2.docker("run", "-d", "--name", "wgweb", "--network", "wg", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www")
        web = network_ip(h2, "wgweb", "wg")
        out = h1.docker("run", "--rm", "--network", "wg", IMAGE, "sh", "-c", f"timeout 5 wget -qO- http://{web}/")
        assert "hello from pyflannel" in out
        devices = json.loads(h1.docker("inspect", "pyflanneld"))[0]["HostConfig"]["Devices"]
        assert [d["PathOnHost"] for d in devices] == ["/dev/net/tun"]
        used = "wireguard-go" if "with wireguard-go" in h1.docker("logs", "pyflanneld") else "the kernel module"
        print(f"\nWireGuard network through compose: {used}")
    finally:
        h2.docker("rm", "-f", "wgweb", check=False)
        for host in compose_lab.hosts:
            host.docker("network", "rm", "wg", check=False)
    assert compose_lab.leases("wg") == {}


@pytest.mark.lab
@pytest.mark.docker
def test_demos_on_compose_installed_pyflannel(compose_lab):
    for host in compose_lab.hosts:
        host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        create_shop_networks(host, "pyflannel")
    check_demos(compose_lab, compose_lab.compose)


@pytest.mark.lab
@pytest.mark.docker
def test_compose_down_removes_everything(compose_lab):
    for host in compose_lab.hosts:
        compose(compose_lab.compose, host, INFRA, "down", **infra_env(host))
        assert host.docker("ps", "-aq") == ""
        assert host.extra_links() == set(), "bridge or veth left behind"
        assert not (host.workdir / "plugins" / "pyflannel.sock").exists()


@pytest.mark.lab
@pytest.mark.docker
def test_demos_on_managed_plugin_hosts_with_compose_v2(plugin_lab):
    """Both demos with Compose v2 on hosts running the managed plugin (driver pyflannel:latest, overlay0 made as
    the README's plugin section says) instead of docker-compose.yml."""
    assert COMPOSE_V2.exists(), f"{COMPOSE_V2} is missing: run `make engines`"
    for host in plugin_lab.hosts:
        create_shop_networks(host, PLUGIN)
    check_demos(plugin_lab, COMPOSE_V2)


def rendered(file: Path, **env: str) -> dict:
    """The compose file as Compose v2 reads it (`config`: no dockerd asked)."""
    return json.loads(subprocess.run([str(COMPOSE_V2), "-f", str(file), "config", "--format", "json"],
                                     env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
                                     check=True).stdout)


@pytest.mark.unit
def test_compose_file_takes_env_file_tun_and_certificates(tmp_path):
    """Every FLANNELD_* of the env file reaches pyflanneld, /dev/net/tun is given, the certificates' folder is
    mounted read-only at its own path; the demos' networks are external. Compose v1 accepts the same files (the
    lab tests run them with it on dockerd 20.10)."""
    if not COMPOSE_V2.exists():
        pytest.skip(f"{COMPOSE_V2} is missing: run `make engines`")
    env_file = tmp_path / "pyflanneld"
    env_file.write_text("# FLANNELD_* lines, as systemd reads them\nFLANNELD_ETCD_ENDPOINTS=https://etcd.example:2379\n"
                        "FLANNELD_HEALTHZ_IP=127.0.0.1\nFLANNELD_ETCD_CERTFILE=/srv/tls/client.pem\n")
    env = {"PYFLANNEL_ENV_FILE": str(env_file), "PYFLANNEL_TLS_DIR": "/srv/tls"}
    daemon = rendered(INFRA, **env)["services"]["pyflanneld"]
    assert daemon["environment"] == {"FLANNELD_ETCD_ENDPOINTS": "https://etcd.example:2379",
                                     "FLANNELD_HEALTHZ_IP": "127.0.0.1",
                                     "FLANNELD_ETCD_CERTFILE": "/srv/tls/client.pem"}
    assert [d["source"] for d in daemon["devices"]] == ["/dev/net/tun"]
    tls = [v for v in daemon["volumes"] if v["source"] == "/srv/tls"]
    assert tls and tls[0]["target"] == "/srv/tls" and tls[0]["read_only"]
    for demo in (DEMO, SHOP):
        assert all(network["external"] for network in rendered(demo)["networks"].values())
    for file in (INFRA, DEMO, SHOP):
        subprocess.run([str(COMPOSE_V1), "-f", str(file), "config", "-q"], env={**os.environ, **env}, check=True,
                       capture_output=True, timeout=60)


@pytest.mark.unit
@pytest.mark.parametrize("binary", [COMPOSE_V1, COMPOSE_V2], ids=["v1", "v2"])
def test_missing_env_file_is_one_clear_line(binary, tmp_path):
    if not binary.exists():
        pytest.skip(f"{binary} is missing: run `make engines`")
    done = subprocess.run([str(binary), "-f", str(INFRA), "config", "-q"], capture_output=True, text=True,
                          env={**os.environ, "PYFLANNEL_ENV_FILE": str(tmp_path / "absent")}, timeout=60)
    assert done.returncode != 0 and str(tmp_path / "absent") in done.stderr and "Traceback" not in done.stderr
