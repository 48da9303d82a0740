"""Named flannel networks served by pyflanneld (issue 11), through its local API, on a lab with a real etcd (v2 and
v3) and kernel: flannel's multi-network layout in etcd, a device and a lease per network and host, traffic, leave
and re-join, restarts, a flanneld-style host on <prefix>/<NAME>, and the errors (conflicting --subnet, VNI clash,
config deleted) that break no other network."""
from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pyflannel.localapi import Client, DaemonError
from lab import VENV_BIN, ping, wait_until
from tests.test_metrics import PORT, scrape, value

pytestmark = pytest.mark.lab

SHOP = "10.60.0.0/16"
H1_FLAGS = ("-healthz-port", str(PORT))


def api(host) -> Client:
    return Client(str(host.api_sock))


def links(host) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in host.sh("ip", "-o", "link").splitlines()}


def lease_in(host, name: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(host.subnet_env(name)["FLANNEL_SUBNET"]).network


def restart_daemon(host, *flags: str) -> None:
    host.daemon.kill(signal.SIGTERM)
    host.start_daemon(*flags)


@pytest.mark.parametrize("etcd_api", ["v2", "v3"])
def test_named_networks_in_flannels_layout_joined_left_and_restarted(make_lab, etcd_api):
    lab = make_lab(4, etcd_api=etcd_api)
    h1, h2, h3, h4 = lab.hosts
    lab.set_config()
    h1.start_daemon(*H1_FLAGS)
    for host in (h2, h3):
        host.start_daemon()

    # the first host to use a name writes its config; the others join it; without --subnet, a /16 of 10.128/9
    started = time.monotonic()
    shop = api(h1).join("shop", SHOP)
    join_seconds = time.monotonic() - started
    assert shop["network"] == SHOP and shop["vni"] == 2 and shop["device"] == "flannel.2" and shop["state"] == "ready"
    for host in (h2, h3):
        assert api(host).join("shop")["network"] == SHOP
    crm = api(h2).join("crm", ipv6=True)
    assert crm["network"] == "10.128.0.0/16" and crm["vni"] == 3
    api(h1).join("crm")
    # a new named network is IPv4-only (flanneld hosts can share it); asked for IPv6, its own IPv6Network
    assert lab.network_config("shop") == {"Network": SHOP, "Backend": {"Type": "vxlan", "VNI": 2}}
    assert lab.network_config("crm")["IPv6Network"] == "fd00:f1a0::/48"
    assert len(lab.leases("shop")) == 3 and len(lab.leases("crm")) == 2 and len(lab.leases()) == 3
    assert {"flannel.1", "flannel.2", "flannel.3"} <= links(h1) and "flannel.3" not in links(h3)
    print(f"joining a new network on a host took {join_seconds * 1000:.0f} ms")

    # containers of each network reach each other across hosts
    for host in (h1, h2, h3):
        host.add_bridge("shopbr", "shop")
        host.add_container("shopbr", "shop")
    for host in (h1, h2):
        host.add_bridge("crmbr", "crm")
        host.add_container("crmbr", "crm")
    shop_c = {h.name: next(c for c in h.containers if ipaddress.IPv4Address(c.ip) in ipaddress.IPv4Network(SHOP))
              for h in (h1, h2, h3)}
    crm_c = {h.name: next(c for c in h.containers if c.ip.startswith("10.128.")) for h in (h1, h2)}
    assert ping(shop_c["h1"].ns, shop_c["h2"].ip) and ping(shop_c["h3"].ns, shop_c["h1"].ip)
    assert ping(crm_c["h1"].ns, crm_c["h2"].ip)

    # a flanneld-style host: its (default) network is <prefix>/shop, as `flanneld -etcd-prefix <prefix>/shop` runs
    h4.start_daemon("-etcd-prefix", f"{lab.prefix_key}/shop")
    assert len(lab.leases("shop")) == 4 and "flannel.2" in links(h4)
    h4.add_bridge()
    outsider = h4.add_container()
    assert ping(outsider.ns, shop_c["h1"].ip) and ping(shop_c["h2"].ns, outsider.ip)

    # the local API's listing, as `pyflannel status` shows it
    listed = {n["name"]: n for n in api(h1).networks()}
    assert set(listed) == {"default", "shop", "crm"}
    assert listed["shop"]["lease"] == str(lease_in(h1, "shop")) and listed["shop"]["peers"] == 3

    # /metrics, per network
    metrics = scrape(lab, h1)
    assert value(metrics, "pyflannel_peers_programmed", network="shop", backend="vxlan") == 3
    assert value(metrics, "pyflannel_leases", network="crm") == 2 and value(metrics, "pyflannel_leases",
                                                                           network="default") == 3

    # restart: the same leases and VTEP MACs, and traffic goes on
    before = {n: (str(lease_in(h1, n)), h1.sh("cat", f"/sys/class/net/flannel.{v}/address").strip())
              for n, v in (("shop", 2), ("crm", 3))}
    restart_daemon(h1, *H1_FLAGS)
    wait_until("h1 serves shop and crm again", lambda: all(
        n["state"] == "ready" for n in api(h1).networks()) and len(api(h1).networks()) == 3)
    after = {n: (str(lease_in(h1, n)), h1.sh("cat", f"/sys/class/net/flannel.{v}/address").strip())
             for n, v in (("shop", 2), ("crm", 3))}
    assert after == before
    assert ping(shop_c["h2"].ns, shop_c["h1"].ip) and ping(crm_c["h2"].ns, crm_c["h1"].ip)

    # leave: the lease goes back to the pool, the device and the peers' routes go; re-join works
    h2_crm = str(lease_in(h2, "crm"))
    assert h2.sh(str(VENV_BIN / "pyflannel"), "leave", "crm", "-api-socket", str(h2.api_sock)).strip() == "crm: left"
    assert f"{h2_crm.replace('/', '-')}" not in lab.leases("crm") and "flannel.3" not in links(h2)
    assert not h2.network_env("crm").exists()
    wait_until("h1 drops its route to h2's crm subnet",
               lambda: h2_crm not in h1.sh("ip", "route", "show", "proto", "77"))
    assert ping(shop_c["h1"].ns, shop_c["h2"].ip)  # shop is untouched
    api(h2).join("crm")
    assert "flannel.3" in links(h2) and len(lab.leases("crm")) == 2

    # errors: a --subnet that contradicts etcd, a bad name, a VNI clash written by hand; none breaks another network
    with pytest.raises(DaemonError) as e:
        api(h3).join("shop", "10.61.0.0/16")
    assert e.value.status == 409 and SHOP in str(e.value) and "10.61.0.0/16" in str(e.value)
    with pytest.raises(DaemonError) as e:
        api(h3).join("shop/x")
    assert e.value.status == 400 and "not valid" in str(e.value)
    lab.etcd_put(f"{lab.prefix_key}/clash/config", json.dumps({"Network": "10.70.0.0/16",
                                                               "Backend": {"Type": "vxlan", "VNI": 2}}))
    with pytest.raises(DaemonError) as e:
        api(h1).join("clash")
    assert e.value.status == 409 and "VNI 2" in str(e.value) and "shop" in str(e.value)
    assert ping(shop_c["h1"].ns, shop_c["h3"].ip)

    # a network whose config was deleted: a clear error after the restart, the others are served
    lab.etcd_delete(f"{lab.prefix_key}/crm/config")
    restart_daemon(h1, *H1_FLAGS)
    wait_until("h1 reports crm", lambda: {n["name"]: n["state"] for n in api(h1).networks()} == {
        "default": "ready", "shop": "ready", "crm": "failed"})
    failed = next(n for n in api(h1).networks() if n["name"] == "crm")
    assert f"{lab.prefix_key}/crm/config is not in etcd" in failed["error"]
    assert not h1.network_env("crm").exists()
    assert ping(shop_c["h1"].ns, shop_c["h2"].ip)
    doctor = subprocess.run(["ip", "netns", "exec", h1.ns, str(VENV_BIN / "pyflannel"), "doctor", "--json",
                             "-etcd-endpoints", lab.etcd_url, "-subnet-file", str(h1.subnet_file), "-api-socket",
                             str(h1.api_sock)], capture_output=True, text=True, timeout=60)
    finding = next(f for f in json.loads(doctor.stdout)["findings"] if f["check"] == "networks")
    assert doctor.returncode == 1 and "flannel network crm is not served" in finding["message"]
    for host in lab.hosts:
        assert "Traceback" not in host.daemon.log()


def test_hosts_creating_networks_at_once_get_distinct_vnis_and_networks(make_lab):
    """Three hosts each create networks at the same moment: every network gets a VNI and a Network of its own (the
    claims under <prefix>/_pyflannel), and every host that asks for one name joins the one config."""
    lab = make_lab(3)
    lab.set_config()
    for host in lab.hosts:
        host.start_daemon()
    names = [f"n{i}" for i in range(6)]
    jobs = [(host, name) for host in lab.hosts for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        joined = list(pool.map(lambda job: api(job[0]).join(job[1], ipv6=True), jobs))
    configs = {name: lab.network_config(name) for name in names}
    assert len({c["Backend"]["VNI"] for c in configs.values()}) == len(names)
    assert len({c["Network"] for c in configs.values()}) == len(names)
    assert len({c["IPv6Network"] for c in configs.values()}) == len(names)
    assert all(j["network"] == configs[j["name"]]["Network"] for j in joined)
    assert all(len(lab.leases(name)) == 3 for name in names)
    timings = []
    for i in range(6, 16):  # one host joins ten more networks, one after the other
        started = time.monotonic()
        api(lab.hosts[0]).join(f"n{i}")
        timings.append(time.monotonic() - started)
    print(f"joins: 18 at once, then 10 new networks one by one on a host in {min(timings) * 1000:.0f}-"
          f"{max(timings) * 1000:.0f} ms; {len(api(lab.hosts[0]).networks())} networks served")
    for i in range(16):
        api(lab.hosts[0]).leave(f"n{i}")
    assert [n["name"] for n in api(lab.hosts[0]).networks()] == ["default"]
    assert "flannel.2" not in lab.hosts[0].sh("ip", "-o", "link")


def test_ipv6_added_to_a_network_one_host_serves_keeps_its_ipv4_lease_and_mac(make_lab):
    """Issue 28: a network joined IPv4-only (as Docker's first RequestPool joins it) gains IPv6 when the same host
    asks for it (Docker's IPv6 RequestPool): the config gets an IPv6Network by compare-and-swap, the host keeps its
    IPv4 subnet and flannel.<VNI> (its MAC), its key becomes a dual-stack one; over this IPv4 underlay the lease has
    BackendV6Data and no PublicIPv6. A second host joins it dual stack; IPv6 flows between them. Asking again
    under a second host's feet is refused, naming it."""
    lab = make_lab(2, etcd_api="v3")
    lab.set_config()
    h1, h2 = lab.hosts
    for host in lab.hosts:
        host.start_daemon()
    solo = api(h1).join("solo")
    assert solo["ipv6_lease"] is None and "EnableIPv6" not in lab.network_config("solo")
    mac = h1.sh("cat", "/sys/class/net/flannel.2/address").strip()
    dual = api(h1).join("solo", ipv6=True)
    assert dual["lease"] == solo["lease"] and dual["ipv6_lease"] and dual["state"] == "ready"
    assert lab.network_config("solo")["IPv6Network"] == "fd00:f1a0::/48"
    assert h1.sh("cat", "/sys/class/net/flannel.2/address").strip() == mac
    (key, node), = lab.leases("solo").items()
    assert key == f"{solo['lease'].replace('/', '-')}&{dual['ipv6_lease'].replace('/', '-')}"
    assert list(node["attrs"]) == ["PublicIP", "BackendType", "BackendData", "BackendV6Data"]
    assert api(h2).join("solo")["ipv6_lease"]
    for host in lab.hosts:
        host.add_bridge("solobr", "solo")
        host.add_container("solobr", "solo")
    c1, c2 = h1.containers[-1], h2.containers[-1]
    assert ping(c1.ns, c2.ip6) and ping(c2.ns, c1.ip)

    api(h2).join("crm")
    with pytest.raises(DaemonError, match=f"network crm is IPv4-only in etcd .* host\\(s\\) {h2.ip} serve it"):
        api(h1).join("crm", ipv6=True)
    assert "EnableIPv6" not in lab.network_config("crm")
