"""Prometheus metrics on the lab: scraped over the underlay (as a Prometheus server would) from the daemons' healthz
port, the numbers follow real events: leases, peers, lease removal, hand-deleted routes, an etcd outage, a network
that failed, a lookup no upstream answered, and the driver's calls from a real dockerd; every metric the shipped
dashboard and alert rules query is in a live scrape."""
from __future__ import annotations

import platform
import signal
import time
import urllib.request

import pytest
from dnslib import RCODE, DNSRecord
from prometheus_client.parser import text_string_to_metric_families

from pyflannel import __version__
from pyflannel.daemon.flags import DNS_ADDRESS
from pyflannel.daemon.metrics.prometheus import UnixHTTPConnection
from pyflannel.localapi import Client
from lab import IMAGE, Lab, inside, wait_until
from tests.test_monitoring import used_metric_names

pytestmark = pytest.mark.lab
PORT = 9471


@pytest.fixture(scope="module")
def lab():
    """3 hosts; h1 reconciles every second and has the driver's socket, h2 names a socket nobody serves."""
    lab = Lab(3)
    try:
        lab.set_config()
        h1, h2, h3 = lab.hosts
        h1.start_daemon("-healthz-port", str(PORT), "--reconcile-interval", "1", "--driver-socket", str(h1.driver_sock))
        h2.start_daemon("-healthz-port", str(PORT), "--driver-socket", str(h2.workdir / "nobody.sock"))
        h3.start_daemon("-healthz-port", str(PORT))
        yield lab
    finally:
        lab.close()


def scrape(lab, host) -> dict:
    """(sample name, labels) -> value, from GET http://<host's underlay IP>:PORT/metrics seen from the switch."""
    with inside(lab.switch):
        with urllib.request.urlopen(f"http://{host.ip}:{PORT}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def total(metrics: dict, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def test_gauges_count_leases_and_peers(lab):
    h1 = lab.hosts[0]
    m = wait_until("3 leases seen", lambda: (m := scrape(lab, h1)) and value(m, "pyflannel_leases", network="default") == 3 and m)
    assert value(m, "pyflannel_peers_programmed", network="default", backend="vxlan") == len(lab.hosts) - 1
    expiry = value(m, "pyflannel_lease_expiry_timestamp_seconds", network="default")
    assert 23 * 3600 < expiry - time.time() <= 24 * 3600
    assert value(m, "pyflannel_build_info", version=__version__, python=platform.python_version()) == 1
    assert value(m, "pyflannel_etcd_errors_total", operation="watch") == 0
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "pyflannel_network_up", network="default") == 1 and value(m, "pyflannel_etcd_reachable") == 1
    assert value(m, "pyflannel_reconcile_failures_total", kind="route") == 0


def test_removed_lease_lowers_the_gauges_and_counts_the_event(lab):
    h1, _, h3 = lab.hosts
    before = scrape(lab, h1)
    h3.daemon.kill(signal.SIGKILL)  # or it would take its lease again
    subnet = h3.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0-")
    lab.etcd_request("DELETE", f"{lab.prefix_key}/subnets/{subnet}")
    applied = value(before, "pyflannel_lease_event_apply_seconds_count") + 1
    m = wait_until("removal applied on h1", lambda: (m := scrape(lab, h1)) and
                   value(m, "pyflannel_lease_event_apply_seconds_count") == applied and m)
    assert value(m, "pyflannel_peers_programmed", network="default", backend="vxlan") == 1
    assert value(m, "pyflannel_leases", network="default") == 2
    assert value(m, "pyflannel_lease_events_total", type="removed") == value(
        before, "pyflannel_lease_events_total", type="removed") + 1

    h3.start_daemon("-healthz-port", str(PORT))
    m = wait_until("peer back", lambda: (m := scrape(lab, h1)) and
                   value(m, "pyflannel_peers_programmed", network="default", backend="vxlan") == 2 and m)
    assert value(m, "pyflannel_lease_events_total", type="added") > value(before, "pyflannel_lease_events_total",
                                                                         type="added")
    count, seconds = value(m, "pyflannel_lease_event_apply_seconds_count"), value(
        m, "pyflannel_lease_event_apply_seconds_sum")
    print(f"\nh1: {count:.0f} lease events applied to the kernel, mean {seconds / count * 1000:.2f} ms from etcd "
          f"read to kernel (pyflannel_lease_event_apply_seconds)")


def test_hand_deleted_entries_raise_repairs(lab):
    h1, h2, _ = lab.hosts
    before = scrape(lab, h1)
    peer = h2.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    h1.sh("ip", "route", "del", peer)
    fdb = [line for line in h1.sh("bridge", "fdb", "show", "dev", "flannel.1").splitlines() if "dst 192.0.2.12" in line]
    h1.sh("bridge", "fdb", "del", fdb[0].split()[0], "dev", "flannel.1")

    def repairs(m, kind, action="added"):
        return value(m, "pyflannel_reconcile_repairs_total", kind=kind, action=action)

    m = wait_until("repairs counted", lambda: (m := scrape(lab, h1)) and repairs(m, "route") > repairs(before, "route")
                   and repairs(m, "fdb") > repairs(before, "fdb") and m, timeout=10)
    assert repairs(m, "route") == repairs(before, "route") + 1 and repairs(m, "fdb") == repairs(before, "fdb") + 1
    assert peer in h1.sh("ip", "route", "show", "proto", "77")
    assert value(m, "pyflannel_reconcile_runs_total") > value(before, "pyflannel_reconcile_runs_total")
    assert repairs(m, "route", "removed") == repairs(before, "route", "removed")


def test_a_network_that_failed_is_down(lab):
    """h2 joined shop; its config is deleted from etcd while h2 is down: served again at start, it fails."""
    h2 = lab.hosts[1]
    Client(str(h2.api_sock)).join("shop", "10.60.0.0/16")
    assert value(scrape(lab, h2), "pyflannel_network_up", network="shop") == 1
    h2.daemon.kill(signal.SIGKILL)
    lab.etcd_request("DELETE", f"{lab.prefix_key}/shop/config")
    h2.start_daemon("-healthz-port", str(PORT), "--driver-socket", str(h2.workdir / "nobody.sock"))
    m = wait_until("shop failed on h2", lambda: (m := scrape(lab, h2)) and
                   value(m, "pyflannel_network_up", network="shop") == 0 and m)
    assert value(m, "pyflannel_network_up", network="default") == 1
    assert [n["state"] for n in Client(str(h2.api_sock)).networks() if n["name"] == "shop"] == ["failed"]
    Client(str(h2.api_sock)).leave("shop")
    assert value(scrape(lab, h2), "pyflannel_network_up", network="shop") is None


def test_a_lookup_no_upstream_answers_is_counted(lab):
    """The lab has no route to its upstream resolver here (no outside network): the container gets SERVFAIL."""
    h3 = lab.hosts[2]
    before = value(scrape(lab, h3), "pyflannel_dns_upstream_failures_total")
    with inside(h3.ns):
        reply = DNSRecord.parse(DNSRecord.question("www.example.test").send(DNS_ADDRESS, 53, timeout=10))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert value(scrape(lab, h3), "pyflannel_dns_upstream_failures_total") == before + 1


def test_driver_absent_is_said_by_driver_up(lab):
    m = scrape(lab, lab.hosts[1])
    assert value(m, "pyflannel_driver_up") == 0
    assert not [name for name, _ in m if name.startswith("pyflannel_driver_requests")]


@pytest.mark.docker
def test_driver_calls_from_docker_are_counted_on_the_daemons_port(lab):
    h1 = lab.hosts[0]
    h1.start_driver()
    h1.start_dockerd()
    h1.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
    assert "hello" in h1.docker("run", "--rm", "--network", "overlay0", IMAGE, "echo", "hello")
    refused = h1.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "second",
                        check=False)
    assert "second" not in h1.docker("network", "ls", "--format", "{{.Name}}"), refused
    conn = UnixHTTPConnection(str(h1.driver_sock), 5)  # a junk call: counted, but under "other"
    try:
        conn.request("POST", "/NoSuch.Method", body=b"{}")
        assert conn.getresponse().status == 404
    finally:
        conn.close()

    def requests(m, endpoint, code="200"):
        return value(m, "pyflannel_driver_requests_total", endpoint=endpoint, code=code) or 0

    m = wait_until("endpoint deleted", lambda: (m := scrape(lab, h1)) and
                   requests(m, "NetworkDriver.DeleteEndpoint") == 1 and m)
    assert value(m, "pyflannel_driver_up") == 1
    for endpoint in ("NetworkDriver.CreateNetwork", "NetworkDriver.CreateEndpoint", "NetworkDriver.Join",
                     "NetworkDriver.Leave", "IpamDriver.RequestAddress"):
        assert requests(m, endpoint) == 1, endpoint
    assert requests(m, "IpamDriver.RequestPool", "409") >= 1  # the second network, refused
    assert requests(m, "other", "404") == 1
    for endpoint in ("NetworkDriver.CreateEndpoint", "other"):
        answered = sum(v for (n, labels), v in m.items()
                       if n == "pyflannel_driver_requests_total" and ("endpoint", endpoint) in labels)
        assert value(m, "pyflannel_driver_request_duration_seconds_count", endpoint=endpoint) == answered
    create = value(m, "pyflannel_driver_request_duration_seconds_sum", endpoint="NetworkDriver.CreateEndpoint")
    started = time.monotonic()
    for _ in range(20):
        scrape(lab, h1)
    print(f"\ndriver: {total(m, 'pyflannel_driver_requests_total'):.0f} calls counted; CreateEndpoint took "
          f"{create * 1000:.1f} ms; a scrape of h1 (driver's metrics included) took "
          f"{(time.monotonic() - started) / 20 * 1000:.1f} ms")
    h1.docker("network", "rm", "overlay0")


def test_every_metric_the_dashboard_and_alerts_query_is_scraped(lab):
    """Names parsed out of monitoring/'s PromQL, against h1's scrape with its driver serving and called once."""
    h1 = lab.hosts[0]
    if getattr(h1, "driver", None) is None or not h1.driver.alive():
        h1.start_driver()
    conn = UnixHTTPConnection(str(h1.driver_sock), 5)  # a call, so that the driver's labelled series exist
    try:
        conn.request("POST", "/NoSuch.Method", body=b"{}")
        conn.getresponse().read()
    finally:
        conn.close()
    m = wait_until("the driver's calls scraped", lambda: (m := scrape(lab, h1)) and value(m, "pyflannel_driver_up") == 1
                   and m)
    scraped = {name for name, _ in m}
    used = used_metric_names()
    assert len(used) >= 15 and not used - scraped, sorted(used - scraped)


def test_etcd_outage_counts_etcd_errors(lab):
    h1 = lab.hosts[0]
    before = total(scrape(lab, h1), "pyflannel_etcd_errors_total")
    lab.etcd.kill()
    try:
        m = wait_until("etcd errors counted", lambda: (m := scrape(lab, h1)) and
                       total(m, "pyflannel_etcd_errors_total") > before and m)
        assert value(m, "pyflannel_etcd_errors_total", operation="watch") + value(
            m, "pyflannel_etcd_errors_total", operation="leases") > 0
        assert value(m, "pyflannel_peers_programmed", network="default", backend="vxlan") == 2  # the kernel is kept as it is
        wait_until("etcd unreachable said", lambda: value(scrape(lab, h1), "pyflannel_etcd_reachable") == 0)
    finally:
        lab.start_etcd()
    wait_until("etcd reachable again", lambda: value(scrape(lab, h1), "pyflannel_etcd_reachable") == 1, timeout=30)
    counted = {dict(labels)["operation"]: v for (name, labels), v in m.items() if name == "pyflannel_etcd_errors_total"}
    print(f"\netcd killed: the first scrape showing errors on h1: {counted}")
