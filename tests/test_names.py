"""Names across hosts (issue 13), on real Docker engines (20.10 and 26.1): pyflannel-driver publishes its host's
containers, pyflanneld keeps them in etcd with a TTL and answers them over DNS on every host (dockerd runs with
--dns 169.254.53.53, the default -dns-address); other names go to the lab internet's resolver."""
from __future__ import annotations

import ipaddress
import json
import signal
import socket
import time

import pytest
from dnslib import DNSRecord

from pyflannel.localapi import Client
from lab import DNS_ADDRESS, IMAGE, OUTSIDE_IP, VENV_BIN, Lab, inside, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.docker]
HELLO = "hello from pyflannel"
TTL = 4  # -names-ttl: a dead host's names go after this


@pytest.fixture(scope="module")
def names_lab(docker_engine):
    with Lab(3) as lab:
        lab.add_outside()
        lab.set_config()
        for host in lab.hosts:
            host.start_daemon("-names-ttl", str(TTL))
            host.start_driver()
            host.start_dockerd(docker_engine)
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
                        "pyflannel.network=shop", "shop")
        h1 = lab.hosts[0]
        h1.docker("run", "-d", "--name", "client", "--network", "shop", IMAGE, "sleep", "100000")
        h1.docker("run", "-d", "--name", "outsider", "--network", "overlay0", IMAGE, "sleep", "100000")
        yield lab


def lookup(host, container: str, name: str) -> list[str]:
    """The addresses `name` resolves to inside `container` (busybox nslookup through Docker's embedded DNS)."""
    out = host.docker("exec", container, "nslookup", name, check=False)
    answer = out.split("Name:", 1)[1] if "Name:" in out else ""
    return sorted(line.split()[-1] for line in answer.splitlines() if line.startswith("Address"))


def address(host, container: str, network: str) -> str:
    return json.loads(host.docker("inspect", container))[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def test_a_container_on_another_host_by_name_and_alias(names_lab):
    h1, h2, _ = names_lab.hosts
    started = time.monotonic()
    h2.docker("run", "-d", "--name", "web", "--network", "shop", "--network-alias", "www", IMAGE, "httpd", "-f",
              "-p", "80", "-h", "/www")
    web = address(h2, "web", "shop")
    wait_until("web resolves on h1", lambda: lookup(h1, "client", "web") == [web], timeout=15, interval=0.2)
    print(f"a new container's name resolved on the other host {time.monotonic() - started:.2f} s after docker run")
    out = h1.docker("exec", "client", "sh", "-c", "ping -c1 -W2 web >/dev/null && echo PING-OK; wget -qO- http://www/")
    assert "PING-OK" in out and HELLO in out
    assert lookup(h1, "outsider", "web") == []  # overlay0 does not share shop: its names do not leak
    assert lookup(h1, "client", "www.example.test") == [OUTSIDE_IP]  # everything else: the upstream resolver
    listed = json.loads(h1.sh(str(VENV_BIN / "pyflannel"), "status", "--names", "--json", "-api-socket",
                              str(h1.api_sock)))
    record = next(r for r in listed if r["address"] == web)
    assert record["network"] == "shop" and record["host"] == h2.ip and {"web", "www"} <= set(record["names"])


def test_replicas_on_two_hosts_give_two_records(names_lab):
    """(Docker's embedded DNS answers a name it has on its own host by itself: the asker is on a third host.)"""
    h1, h2, h3 = names_lab.hosts
    for host, name in ((h2, "api1"), (h3, "api2")):
        host.docker("run", "-d", "--name", name, "--network", "shop", "--network-alias", "api", IMAGE, "sleep", "1000")
    both = sorted([address(h2, "api1", "shop"), address(h3, "api2", "shop")])
    wait_until("api gives both replicas", lambda: lookup(h1, "client", "api") == both, timeout=15, interval=0.2)


def test_a_stopped_containers_name_goes_within_seconds(names_lab):
    h1, h2, _ = names_lab.hosts
    h2.docker("run", "-d", "--name", "brief", "--network", "shop", IMAGE, "sleep", "1000")
    wait_until("brief resolves", lambda: lookup(h1, "client", "brief"), timeout=15, interval=0.2)
    started = time.monotonic()
    h2.docker("rm", "-f", "brief")
    wait_until("brief is gone", lambda: lookup(h1, "client", "brief") == [], timeout=10, interval=0.2)
    print(f"a removed container's name was gone on the other host {time.monotonic() - started:.2f} s later")


def test_a_dead_hosts_names_expire_after_the_ttl(names_lab):
    h1, h2, _ = names_lab.hosts
    h2.docker("run", "-d", "--name", "doomed", "--network", "shop", IMAGE, "sleep", "1000")
    wait_until("doomed resolves", lambda: lookup(h1, "client", "doomed"), timeout=15, interval=0.2)
    h2.daemon.kill(signal.SIGKILL)
    h2.driver.kill(signal.SIGKILL)
    started = time.monotonic()
    wait_until("h2's names expire", lambda: lookup(h1, "client", "doomed") == [], timeout=TTL + 10, interval=0.3)
    gone = time.monotonic() - started
    print(f"names of a host killed with SIGKILL gone after {gone:.1f} s (TTL {TTL} s)")
    assert gone >= TTL / 2  # they went by expiry, not by a goodbye
    h2.start_daemon("-names-ttl", str(TTL))
    h2.start_driver()
    wait_until("doomed is back", lambda: lookup(h1, "client", "doomed"), timeout=40, interval=0.5)


def test_a_restarted_pyflanneld_answers_names_again_within_seconds(names_lab):
    """A new pyflanneld knows none of its host's containers: the driver sees it and sends them again at once."""
    h1, h2, _ = names_lab.hosts
    h2.docker("run", "-d", "--name", "steady", "--network", "shop", IMAGE, "sleep", "1000")
    wait_until("steady resolves", lambda: lookup(h1, "client", "steady"), timeout=15, interval=0.2)
    h1.daemon.kill(signal.SIGTERM)
    h1.start_daemon("-names-ttl", str(TTL))
    started = time.monotonic()
    wait_until("steady resolves again", lambda: lookup(h1, "client", "steady"), timeout=15, interval=0.2)
    print(f"names answered again {time.monotonic() - started:.1f} s after a pyflanneld restart")


@pytest.mark.parametrize("etcd_api", ["v2", "v3"])
def test_names_in_etcd_come_and_go_with_their_host(make_lab, etcd_api):
    """Without Docker: names handed to pyflanneld's API on one host are answered over DNS on the other, on both etcd
    APIs (v3: keys on an etcd lease); withdrawn they go at once, and a killed host's go after the TTL."""
    lab = make_lab(2, etcd_api=etcd_api)
    lab.set_config()
    h1, h2 = lab.hosts
    for host in lab.hosts:
        host.start_daemon("-names-ttl", "3")
    address = str(ipaddress.IPv4Interface(h1.subnet_env()["FLANNEL_SUBNET"]).ip + 5)
    alpha = [{"id": "c1", "networks": {"": {"address": address, "names": ["alpha", "a1"]}}}]
    Client(str(h1.api_sock)).publish(alpha)
    wait_until("alpha answered on h2", lambda: resolve(h2, "alpha") == [address], timeout=10, interval=0.1)
    assert [r["names"] for r in Client(str(h2.api_sock)).names()] == [["a1", "alpha"]]
    Client(str(h1.api_sock)).publish([])
    wait_until("alpha withdrawn", lambda: resolve(h2, "alpha") == [], timeout=5, interval=0.1)
    Client(str(h1.api_sock)).publish(alpha)
    wait_until("alpha again", lambda: resolve(h2, "alpha") == [address], timeout=10, interval=0.1)
    h1.daemon.kill(signal.SIGKILL)
    started = time.monotonic()
    wait_until("alpha expired", lambda: resolve(h2, "alpha") == [], timeout=15, interval=0.2)
    assert time.monotonic() - started >= 1.0


def resolve(host, name: str) -> list[str]:
    """A query to the host's pyflanneld (its -dns-address), from the host's own namespace."""
    with inside(host.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(DNSRecord.question(name).pack(), (DNS_ADDRESS, 53))
        return sorted(str(rr.rdata) for rr in DNSRecord.parse(sock.recv(4096)).rr)
