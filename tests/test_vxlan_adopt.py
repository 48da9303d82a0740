"""Replacing flanneld (issue 28): the VXLAN devices it left are adopted with their MACs, so no peer sees a change;
--ip-blackhole-route as flannel's. The backend's rule on a fake kernel (unit), then a real pyflanneld in a lab host
finding a device made as flanneld makes it."""
from __future__ import annotations

import ipaddress
import signal
import subprocess

import pytest

from pyflannel.daemon.backend.vxlan import VxlanBackend
from pyflannel.daemon.config import parse
from pyflannel.kernel import namespaces
from pyflannel.kernel.links import random_mac
from pyflannel.localapi import Client
from lab import ping, wait_until
from tests.fakes import FakeKernel
from tests.test_daemon_logic import CONFIG, EXT

DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}}


# --- the rule, on a fake kernel ---------------------------------------------------------------------------------

def flanneld_device(kernel: FakeKernel, port: int = 8472) -> tuple[int, str]:
    """flannel.1 as flanneld v0.20.2 leaves it: its own MAC, the outer UDP checksum on."""
    mac = random_mac()
    index = kernel.create_vxlan("flannel.1", 1, port, EXT.public_ip, EXT.index, mac, 1450)
    kernel.links[index]["vxlan"]["IFLA_VXLAN_UDP_CSUM"] = 1
    return index, mac


def start(kernel: FakeKernel, state_dir) -> VxlanBackend:
    backend = VxlanBackend(parse(CONFIG), EXT, kernel, str(state_dir))
    backend.prepare()
    return backend


@pytest.mark.unit
def test_a_device_that_fits_is_adopted_with_its_mac_and_the_mac_recorded(tmp_path):
    kernel = FakeKernel()
    index, mac = flanneld_device(kernel)
    kernel.links[index]["IFLA_MTU"] = 1400
    backend = start(kernel, tmp_path)
    assert (kernel.link_index("flannel.1"), backend.mac) == (index, mac)
    assert kernel.link(index)["IFLA_MTU"] == 1450 and kernel.link(index)["up"]  # changed in place
    assert (tmp_path / "vtep-mac.1").read_text() == mac + "\n"


@pytest.mark.unit
def test_a_device_that_does_not_fit_is_made_again_with_its_mac(tmp_path):
    kernel = FakeKernel()
    index, mac = flanneld_device(kernel, port=4789)
    backend = start(kernel, tmp_path)
    new = kernel.link_index("flannel.1")
    assert new != index and kernel.vxlan_attrs(new)["IFLA_VXLAN_PORT"] == 8472
    assert backend.mac == kernel.link(new)["IFLA_ADDRESS"] == mac
    assert (tmp_path / "vtep-mac.1").read_text() == mac + "\n"


@pytest.mark.unit
def test_a_recorded_mac_wins_over_the_devices(tmp_path):
    kernel = FakeKernel()
    index, _ = flanneld_device(kernel)
    ours = random_mac()
    (tmp_path / "vtep-mac.1").write_text(ours + "\n")
    backend = start(kernel, tmp_path)
    assert (kernel.link_index("flannel.1"), backend.mac, kernel.link(index)["IFLA_ADDRESS"]) == (index, ours, ours)


# --- a real pyflanneld in a lab host --------------------------------------------------------------------------

def make_like_flanneld(host, name: str, local: str, port: int | None = None) -> tuple[str, str]:
    """A VXLAN device as flanneld v0.20.2 makes it (vishvananda/netlink: VNI 1, eth0's index and address, learning,
    TTL and TOS off, no UDP checksum attribute: the kernel's default, on; no port: the kernel's, 8472; a random
    MAC; up), in the host's namespace. Returns its ifindex and MAC."""
    mac = random_mac()
    local_attrs = {"vxlan_local6": local} if ":" in local else {"vxlan_local": local}
    with namespaces.opened(f"/run/netns/{host.ns}") as fd, namespaces.netlink(fd) as ipr:
        underlay = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("add", ifname=name, kind="vxlan", vxlan_id=1, vxlan_link=underlay, vxlan_learning=0, vxlan_ttl=0,
                 vxlan_tos=0, address=mac, **local_attrs, **({"vxlan_port": port} if port else {}))
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, state="up")
    return str(index), mac


def device(host, name: str) -> tuple[str, str]:
    """The device's ifindex and MAC, as the host's kernel shows them."""
    return tuple(host.sh("cat", f"/sys/class/net/{name}/{what}").strip() for what in ("ifindex", "address"))


def own_lease(lab, host) -> dict:
    return next(n["attrs"] for n in lab.leases().values() if n["attrs"]["PublicIP"] == host.ip)


@pytest.mark.lab
def test_a_device_flanneld_left_is_adopted_with_its_mac_and_carries_traffic(make_lab):
    lab = make_lab(2, etcd_api="v3")
    lab.set_config()
    h1, h2 = lab.hosts
    index, mac = make_like_flanneld(h1, "flannel.1", h1.ip)
    h1.start_daemon()
    h2.start_daemon()
    assert device(h1, "flannel.1") == (index, mac)
    assert " udpcsum " in h1.sh("ip", "-d", "link", "show", "flannel.1")  # flanneld's device, as it was
    assert (h1.state_dir / "vtep-mac.1").read_text().strip() == mac
    assert own_lease(lab, h1)["BackendData"]["VtepMAC"] == mac
    assert f"adopted flannel.1 left by flanneld: VNI 1, port 8472, local {h1.ip}, MAC {mac}" in h1.daemon.log()
    wait_until("h2's FDB entry for h1", lambda: f"{mac} dst {h1.ip}" in h2.sh("bridge", "fdb", "show", "dev",
                                                                              "flannel.1"))
    for host in lab.hosts:
        host.add_bridge()
        host.add_container()
    assert ping(h1.containers[0].ns, h2.containers[0].ip) and ping(h2.containers[0].ns, h1.containers[0].ip)
    h1.daemon.kill(signal.SIGTERM)  # the next start finds the MAC recorded: the device is ours now
    h1.start_daemon()
    wait_until("the restart", lambda: f"reusing flannel.1 (VTEP MAC {mac})" in h1.daemon.log())
    assert device(h1, "flannel.1") == (index, mac)


@pytest.mark.lab
def test_a_device_on_another_port_is_made_again_with_its_mac(make_lab):
    lab = make_lab(1)
    lab.set_config()
    h1 = lab.hosts[0]
    index, mac = make_like_flanneld(h1, "flannel.1", h1.ip, port=4789)
    h1.start_daemon()
    new_index, new_mac = device(h1, "flannel.1")
    assert new_index != index and new_mac == mac
    assert "dstport 8472" in h1.sh("ip", "-d", "link", "show", "flannel.1")
    assert f"replacing flannel.1 (port 4789, not 8472), keeping its MAC {mac}" in h1.daemon.log()
    assert (h1.state_dir / "vtep-mac.1").read_text().strip() == mac
    assert own_lease(lab, h1)["BackendData"]["VtepMAC"] == mac


@pytest.mark.lab
def test_the_ipv6_device_flanneld_left_is_adopted_too(make_lab):
    lab = make_lab(1, underlay_ipv6=True)
    lab.set_config(DUAL)
    h1 = lab.hosts[0]
    v4 = make_like_flanneld(h1, "flannel.1", h1.ip)
    v6 = make_like_flanneld(h1, "flannel-v6.1", h1.ip6)
    h1.start_daemon()
    assert (device(h1, "flannel.1"), device(h1, "flannel-v6.1")) == (v4, v6)
    assert (h1.state_dir / "vtep-mac-v6.1").read_text().strip() == v6[1]
    lease = own_lease(lab, h1)
    assert (lease["BackendData"]["VtepMAC"], lease["BackendV6Data"]["VtepMAC"]) == (v4[1], v6[1])
    assert f"adopted flannel-v6.1 left by flanneld: VNI 1, port 8472, local {h1.ip6}" in h1.daemon.log()


# --- --ip-blackhole-route -------------------------------------------------------------------------------------

def blackholes(host) -> str:
    return host.sh("ip", "route", "show", "proto", "77", "type", "blackhole") + host.sh(
        "ip", "-6", "route", "show", "proto", "77", "type", "blackhole")


@pytest.mark.lab
def test_blackhole_route_for_the_lease_beneath_the_bridge_and_gone_with_a_named_network(make_lab):
    lab = make_lab(2)
    lab.set_config()
    h1, h2 = lab.hosts
    for host in lab.hosts:
        host.sh("ip", "route", "add", "default", "via", "192.0.2.254")
    h1.start_daemon("--ip-blackhole-route")
    h2.start_daemon()
    lease = ipaddress.IPv4Interface(h1.subnet_env()["FLANNEL_SUBNET"]).network
    assert f"blackhole {lease} metric 4294967295" in blackholes(h1) and blackholes(h2) == ""
    unheld = str(lease.network_address + 200)
    dropped = subprocess.run(["ip", "netns", "exec", h1.ns, "ip", "route", "get", unheld], capture_output=True,
                             text=True)
    assert (dropped.returncode, dropped.stderr.strip()) == (2, "RTNETLINK answers: Invalid argument")  # a blackhole
    h2_unheld = str(ipaddress.IPv4Interface(h2.subnet_env()["FLANNEL_SUBNET"]).network.network_address + 200)
    assert "via 192.0.2.254" in h2.sh("ip", "route", "get", h2_unheld)  # without the flag: the default route
    for host in lab.hosts:
        host.add_bridge()
        host.add_container()
    container = h1.containers[0].ip
    assert "dev cbr0" in h1.sh("ip", "route", "get", container)  # the bridge's connected route wins
    assert ping(h2.containers[0].ns, container)
    # a named network has its own, which goes when the host leaves it; the default network's stays
    Client(str(h1.api_sock)).join("shop")
    shop = ipaddress.IPv4Interface(h1.subnet_env("shop")["FLANNEL_SUBNET"]).network
    assert f"blackhole {shop} " in blackholes(h1)
    Client(str(h1.api_sock)).leave("shop")
    assert f"blackhole {shop} " not in blackholes(h1) and f"blackhole {lease} " in blackholes(h1)
    # restarted without the flag: none
    h1.daemon.kill(signal.SIGTERM)
    h1.start_daemon()
    wait_until("no blackhole left", lambda: blackholes(h1) == "", timeout=10)
