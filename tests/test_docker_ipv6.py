"""The Docker driver's IPv6 (issue 17): `docker network create --ipv6` gets this host's IPv6 lease as its second
pool. First the driver's calls on the real kernel of a throwaway namespace (pools, addresses, the bridge's IPv6
gateway, ip6tables rules, errors, state across restarts); then real dockerd 20.10 and 26.1 on a lab with pyflanneld's
dual stack: ping6 and TCP between hosts, a published port and egress masquerade over IPv6, nothing left after
`docker network rm`."""
from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time

import pytest

from pyflannel.daemon.api import serve as serve_api
from pyflannel.driver.api import create_app
from lab import IMAGE, OUTSIDE_IP6, VENV_BIN, Lab, wait_until
from tests.driver_support import (GATEWAY6, LEASE, LEASE6, NETWORK6, DockerSide, FakeDaemon, link,  # noqa: F401
                                  netns_name, network_request, new_id, our_links, state_dir, write_subnet_env)
from tests.fakes import FakePlumbing

HELLO = "hello from pyflannel"
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")
DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:5::/48", "Backend": {"Type": "vxlan"}}
CHAINS = ("PYFLANNEL-NAT-OUT", "PYFLANNEL-PORTS", "PYFLANNEL-ISOLATION", "PYFLANNEL-INPUT")
GATEWAY_TYPE = {"RequestAddressType": "com.docker.network.gateway"}


def rules(program: str = "ip6tables") -> list[str]:
    """The rules in the driver's chains (not the hooks into the built-in chains), in this thread's namespace."""
    out = []
    for table in ("nat", "filter"):
        text = subprocess.run([program, "-w", "5", "-t", table, "-S"], capture_output=True, text=True).stdout
        out += [line for line in text.splitlines() if line.startswith(tuple(f"-A {c} " for c in CHAINS))]
    return out


def sysctl(path: str) -> str:
    with open(f"/proc/sys/net/{path}") as f:
        return f.read().strip()


@pytest.fixture
def dual_env(tmp_path):
    return write_subnet_env(tmp_path / "subnet.env", lease6=LEASE6)


@pytest.fixture
def docker(netns_name, dual_env, state_dir):
    """The driver on a dual-stack subnet.env, inside a throwaway namespace."""
    return DockerSide(create_app(state_dir, dual_env))


# --- the driver on the real kernel ---------------------------------------------------------------------------------

@pytest.mark.lab
def test_a_dual_stack_network_its_containers_and_their_rules(docker):
    subprocess.run(["ip6tables", "-w", "5", "-P", "FORWARD", "DROP"], check=True)  # as dockerd 27+ sets it
    pool6, gateway6 = docker.request_pool(v6=True)
    assert pool6 == {"PoolID": f"pyflannel/{LEASE6}", "Pool": LEASE6,
                     "Data": {"com.docker.network.gateway": f"{GATEWAY6}/64"}}
    assert gateway6["Address"] == f"{GATEWAY6}/64"
    net = docker.create_network(ipv6=True)
    bridge = link(net["bridge"])
    assert bridge["ipv4"] == ["10.5.34.1/24"] and bridge["ipv6"] == [f"{GATEWAY6}/64 nodad"]
    assert sysctl(f"ipv6/conf/{net['bridge']}/disable_ipv6") == "0" and sysctl("ipv6/conf/all/forwarding") == "1"
    assert sysctl(f"ipv6/conf/{net['bridge']}/accept_dad") == "0"  # its link-local address is never tentative
    forward = subprocess.run(["ip6tables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert all(f"-A FORWARD {way} {net['bridge']} -j ACCEPT" in forward for way in ("-i", "-o"))
    assert f"-A PYFLANNEL-NAT-OUT -s {LEASE6} ! -d {NETWORK6} -j MASQUERADE" in rules()
    assert f"-A PYFLANNEL-ISOLATION ! -d {NETWORK6} -i {net['bridge']} -o flannel-v6.+ -j DROP" in rules()
    assert not [r for r in rules() if "127.0.0.0/8" in r]

    ep = docker.run_container(net)
    assert ep["address"] == "10.5.34.2/24" and ep["address6"] == "fd00:5:0:27::2/64"
    assert ep["joined"]["Gateway"] == "10.5.34.1" and ep["joined"]["GatewayIPv6"] == GATEWAY6
    pinned = docker.run_container(net, ip6="fd00:5:0:27::99")  # docker run --ip6
    assert pinned["address6"] == "fd00:5:0:27::99/64"
    assert "already in use" in docker.fails("IpamDriver.RequestAddress", {"PoolID": net["pool_id6"],
                                                                          "Address": "fd00:5:0:27::99"}, 409)
    ref = {"NetworkID": net["id"], "EndpointID": ep["id"]}
    docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": {"com.docker.network.portmap": [
        {"Proto": 6, "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
        {"Proto": 6, "Port": 81, "HostIP": "2001:db8::11", "HostPort": 8081, "HostPortEnd": 8081}]}})
    assert "-A PYFLANNEL-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:5:0:27::2]:80" in rules()
    assert ("-A PYFLANNEL-PORTS -d 2001:db8::11/128 -p tcp -m tcp --dport 8081 -j DNAT --to-destination "
            "[fd00:5:0:27::2]:81") in rules()
    assert [r for r in rules("iptables") if "-j DNAT" in r] == [
        "-A PYFLANNEL-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.5.34.2:80"]

    for container in (ep, pinned):
        docker.stop_container(net, container)
    assert not [r for r in rules() if "-j DNAT" in r]
    assert docker.app.extensions["pyflannel"]["store"].load().pools[net["pool_id6"]].allocated == []
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert rules() == [] and rules("iptables") == [] and our_links() == []
    assert net["bridge"] not in subprocess.run(["ip6tables", "-S", "FORWARD"], capture_output=True, text=True).stdout


@pytest.mark.lab
def test_an_internal_dual_stack_network_gets_routes_to_both_flannel_networks(docker):
    net = docker.create_network(ipv6=True, **{"com.docker.network.internal": True})
    joined = docker.run_container(net)["joined"]
    assert joined["Gateway"] == "" and joined["GatewayIPv6"] == ""
    assert joined["StaticRoutes"] == [{"Destination": "10.5.0.0/16", "RouteType": 0, "NextHop": "10.5.34.1"},
                                      {"Destination": NETWORK6, "RouteType": 0, "NextHop": GATEWAY6}]
    assert sorted(rules()) == sorted([f"-A PYFLANNEL-ISOLATION ! -d {NETWORK6} -i {net['bridge']} -j DROP",
                                      f"-A PYFLANNEL-ISOLATION ! -s {NETWORK6} -o {net['bridge']} -j DROP"])


@pytest.mark.lab
def test_ipv6_mistakes_are_refused_naming_what_is_wrong_and_change_nothing(netns_name, tmp_path, state_dir):
    v4_only = write_subnet_env(tmp_path / "v4.env")
    docker = DockerSide(create_app(state_dir, v4_only))
    # --ipv6 on a flannel network without IPv6
    for err in (docker.fails("IpamDriver.RequestPool", {"Pool": "", "V6": True}, 409),
                docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), ipv6=(LEASE6, None)), 409)):
        assert "FLANNEL_IPV6_SUBNET" in err and '"EnableIPv6": true' in err and '"IPv6Network"' in err
    plain = docker.create_network()
    ep = new_id("e")
    err = docker.fails("NetworkDriver.CreateEndpoint", {"NetworkID": plain["id"], "EndpointID": ep, "Interface": {
        "Address": "10.5.34.9/24", "AddressIPv6": "fd00:5:0:27::9/64"}}, 409)
    assert "created without --ipv6" in err
    docker.run_container(plain, endpoint_id=ep)
    err = docker.fails("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": plain["id"], "EndpointID": ep, "Options": {"com.docker.network.portmap": [
            {"Proto": 6, "Port": 80, "HostIP": "2001:db8::11", "HostPort": 8080}]}}, 409)
    assert "IPv6 address 2001:db8::11" in err and "without --ipv6" in err
    assert rules() == []

    # a dual-stack host: a foreign --subnet, --gateway or --ip6
    dual = DockerSide(create_app(str(tmp_path / "dual-state"), write_subnet_env(tmp_path / "dual.env",
                                                                                 lease6=LEASE6)))
    err = dual.fails("IpamDriver.RequestPool", {"Pool": "fd00:9:0:1::/64", "V6": True}, 409)
    assert f"subnet fd00:9:0:1::/64 is not this host's flannel IPv6 lease {LEASE6}" in err
    err = dual.fails("NetworkDriver.CreateNetwork", network_request(new_id(), ipv6=("fd00:9:0:1::/64", None)), 409)
    assert f"IPv6 lease {LEASE6}" in err
    err = dual.fails("NetworkDriver.CreateNetwork", network_request(new_id(), ipv6=(LEASE6, "fd00:5:0:27::fe/64")),
                     409)
    assert "gateway fd00:5:0:27::fe is not the first address of this host's IPv6 lease (fd00:5:0:27::1)" in err
    pool6, _ = dual.request_pool(v6=True)
    for address, words in (("fd00:6::5", "not a host address of this host's lease"),
                           (GATEWAY6, "is the gateway"), ("10.5.34.9", "not an IPv6 address of pool")):
        assert words in dual.fails("IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"], "Address": address}, 409)
    assert "AddressIPv6" in dual.fails("NetworkDriver.CreateEndpoint", {
        "NetworkID": new_id(), "EndpointID": new_id(), "Interface": {"AddressIPv6": "fd00:5:0:27::9"}}, 400)
    assert our_links() == [] and rules() == []  # (the second driver's start removed the first one's network)


@pytest.mark.lab
def test_an_ipv6_only_flannel_network_refuses_the_ipv4_pool_docker_asks_for(netns_name, tmp_path, state_dir):
    docker = DockerSide(create_app(state_dir, write_subnet_env(tmp_path / "subnet.env", lease=None, lease6=LEASE6)))
    err = docker.fails("IpamDriver.RequestPool", {"Pool": "", "V6": False}, 409)
    assert "IPv6-only" in err and '"EnableIPv4": false' in err and "Docker before 28" in err
    assert "--ipv4=false --ipv6" in err
    pool6, gateway6 = docker.request_pool(v6=True)  # Docker 28's --ipv4=false asks for the IPv6 pool alone
    assert pool6["Pool"] == LEASE6 and gateway6["Address"] == f"{GATEWAY6}/64"
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), ipv6=(LEASE6, None)), 409)
    assert "IPv6-only" in err
    assert our_links() == [] and rules() == []


@pytest.mark.lab
def test_docker_28_makes_an_ipv6_only_network_that_carries_packets(netns_name, tmp_path, state_dir):
    """`docker network create --ipv4=false --ipv6` (Docker 28) on an IPv6-only flannel network: the bridge has the
    IPv6 gateway only, a container (its sandbox made here as dockerd makes it) pings it, its ports are published
    through ip6tables alone."""
    docker = DockerSide(create_app(state_dir, write_subnet_env(tmp_path / "subnet.env", lease=None, lease6=LEASE6)))
    pool6, gateway6 = docker.request_pool(v6=True)
    net_id, ep_id = new_id("n"), new_id("e")
    bridge, container_end = "pfl-" + net_id[:8], "pfc-" + ep_id[:10]
    body = network_request(net_id, ipv6=(LEASE6, gateway6["Address"]), **{"com.docker.network.enable_ipv4": False})
    docker.ok("NetworkDriver.CreateNetwork", {**body, "IPv4Data": []})
    assert link(bridge)["ipv4"] == [] and link(bridge)["ipv6"] == [f"{GATEWAY6}/64 nodad"]
    assert link(bridge)["mac"] == "02:42:00:00:00:01"
    assert rules("iptables") == [] and f"-A PYFLANNEL-NAT-OUT -s {LEASE6} ! -d {NETWORK6} -j MASQUERADE" in rules()
    address6 = docker.ok("IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"], "Address": ""})["Address"]
    ref = {"NetworkID": net_id, "EndpointID": ep_id}
    assert docker.ok("NetworkDriver.CreateEndpoint", {**ref, "Interface": {"Address": "", "AddressIPv6": address6}}) \
        == {"Interface": {"MacAddress": "02:42:00:00:00:02"}}
    joined = docker.ok("NetworkDriver.Join", {**ref, "SandboxKey": "/x"})
    assert joined["Gateway"] == "" and joined["GatewayIPv6"] == GATEWAY6
    sandbox = f"pfltest-sandbox-{ep_id[:8]}"
    subprocess.run(["ip", "netns", "add", sandbox], check=True)
    try:
        subprocess.run(["ip", "link", "set", container_end, "netns", sandbox], check=True)
        for command in (["ip", "link", "set", container_end, "up"],
                        ["ip", "addr", "add", address6, "dev", container_end, "nodad"],
                        ["ip", "-6", "route", "add", "default", "via", GATEWAY6]):
            subprocess.run(["ip", "netns", "exec", sandbox, *command], check=True)
        ping = subprocess.run(["ip", "netns", "exec", sandbox, "ping", "-6", "-c", "2", "-W", "2", GATEWAY6],
                              capture_output=True, text=True)
        assert "2 received" in ping.stdout, ping.stdout + ping.stderr
    finally:
        subprocess.run(["ip", "netns", "del", sandbox])
    err = docker.fails("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": {"com.docker.network.portmap": [
        {"Proto": 6, "Port": 80, "HostIP": "192.0.2.11", "HostPort": 8080}]}}, 409)
    assert "has no IPv4 address (its network was IPv6-only: created with --ipv4=false)" in err
    docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": {"com.docker.network.portmap": [
        {"Proto": 6, "Port": 80, "HostIP": "", "HostPort": 8080}]}})
    assert [r for r in rules() if "-j DNAT" in r] == [
        f"-A PYFLANNEL-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination [{address6.split('/')[0]}]:80"]
    assert rules("iptables") == []
    for call in ("NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"):
        docker.ok(call, ref)
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net_id})
    assert our_links() == [] and rules() == []


@pytest.mark.lab
def test_ipv6_pools_and_addresses_survive_a_restart_and_old_state_still_loads(netns_name, dual_env, state_dir):
    docker = DockerSide(create_app(state_dir, dual_env))
    net = docker.create_network(ipv6=True)
    first = docker.run_container(net)
    restarted = DockerSide(create_app(state_dir, dual_env))  # a new driver: reconciles, then serves
    assert link(net["bridge"])["ipv6"] == [f"{GATEWAY6}/64 nodad"]
    assert f"-A PYFLANNEL-NAT-OUT -s {LEASE6} ! -d {NETWORK6} -j MASQUERADE" in rules()
    second = restarted.run_container(net)
    assert second["address6"] == "fd00:5:0:27::3/64" and first["address6"] == "fd00:5:0:27::2/64"
    restarted.stop_container(net, first)
    assert restarted.run_container(net)["address6"] == "fd00:5:0:27::2/64"  # the lowest free, as Docker's IPAM


@pytest.mark.lab
def test_a_state_file_from_before_ipv6_loads_and_its_network_works(netns_name, dual_env, state_dir):
    """A network made by a driver without IPv6 (its records have no pool6/address6/container_ip6) keeps working
    as an IPv4 network when subnet.env gains IPv6."""
    import os
    net_id, ep_id = new_id("n"), new_id("e")
    bridge = "pfl-" + net_id[:8]
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump({"version": 1, "leaving": [], "networks": {net_id: {
            "bridge": bridge, "pool": LEASE, "gateway": "10.5.34.1/24", "mtu_option": None,
            "flannel_network": "10.5.0.0/16", "masquerade": True, "internal": False, "flannel": ""}},
            "endpoints": {ep_id: {"network": net_id, "address": "10.5.34.2/24", "mac": "02:42:0a:05:22:02",
                                  "mac_generated": True, "veth_host": "pfv-" + ep_id[:10],
                                  "veth_container": "pfc-" + ep_id[:10], "joined": False, "sandbox": "",
                                  "ports": [{"proto": "tcp", "host_ip": "", "host_port": 8080,
                                             "container_ip": "10.5.34.2", "port": 80}]}},
            "pools": {f"pyflannel/{LEASE}": {"pool": LEASE, "allocated": ["10.5.34.2"], "last": "10.5.34.2",
                                             "flannel": ""}}}, f)
    docker = DockerSide(create_app(state_dir, dual_env))
    assert link(bridge)["ipv4"] == ["10.5.34.1/24"] and link(bridge)["ipv6"] == []
    joined = docker.ok("NetworkDriver.Join", {"NetworkID": net_id, "EndpointID": ep_id, "SandboxKey": "/x"})
    assert joined["Gateway"] == "10.5.34.1" and joined["GatewayIPv6"] == ""
    assert rules() == []  # no IPv6 rule for a network without IPv6
    docker.ok("NetworkDriver.Leave", {"NetworkID": net_id, "EndpointID": ep_id})
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net_id})
    assert our_links() == [] and rules("iptables") == []


@pytest.mark.unit
def test_a_create_the_kernel_refuses_half_way_leaves_no_bridge_and_no_rule(tmp_path):
    plumbing = FakePlumbing()
    docker = DockerSide(create_app(str(tmp_path / "state"), write_subnet_env(tmp_path / "subnet.env", lease6=LEASE6),
                                   plumbing=plumbing))
    plumbing.refuse.add("add_rules")  # after the bridge was made
    pool, gateway = docker.request_pool()
    pool6, gateway6 = docker.request_pool(v6=True)
    body = network_request(new_id(), gateway=gateway["Address"], ipv6=(pool6["Pool"], gateway6["Address"]))
    assert "cannot add_rules" in docker.fails("NetworkDriver.CreateNetwork", body, 500)
    assert plumbing.bridges == {} and plumbing.rules == []
    plumbing.refuse.clear()
    docker.ok("NetworkDriver.CreateNetwork", body)  # Docker's retry
    assert len(plumbing.bridges) == 1 and any(rule.v6 for rule in plumbing.rules)


@pytest.mark.unit
@pytest.mark.parametrize("ipv6", [True, False])
def test_a_named_network_answers_its_ipv6_lease_and_is_left_once_both_pools_are_gone(tmp_path, ipv6):
    subnet_file = write_subnet_env(tmp_path / "subnet.env", lease6=LEASE6)
    sock, fake = str(tmp_path / "pyflanneld.sock"), FakeDaemon(subnet_file, "fd00:60:0:3::/64" if ipv6 else None)
    docker = DockerSide(create_app(str(tmp_path / "state"), subnet_file, plumbing=FakePlumbing(),
                                   daemon_socket=sock))
    server = serve_api(fake, sock)
    try:
        shop = {"pyflannel.network": "shop"}
        pool, _ = docker.request_pool(shop)
        if not ipv6:  # the v4 pool stays; nothing is left while it exists
            err = docker.fails("IpamDriver.RequestPool", {"Pool": "", "V6": True, "Options": shop}, 409)
            assert "flannel network shop has no IPv6" in err and fake.left == []
            docker.ok("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
            assert fake.left == ["shop"]
            return
        pool6, gateway6 = docker.request_pool(shop, v6=True)
        assert pool6["PoolID"] == "pyflannel/shop/fd00:60:0:3::/64" and gateway6["Address"] == "fd00:60:0:3::1/64"
        err = docker.fails("IpamDriver.RequestPool", {"Pool": "fd00:61::/48", "V6": True, "Options": shop}, 409)
        assert "IPv6Network is fd00:5::/48 in etcd; --subnet fd00:61::/48 contradicts it" in err
        docker.ok("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
        assert fake.left == []  # the IPv6 pool still uses the network
        docker.ok("IpamDriver.ReleasePool", {"PoolID": pool6["PoolID"]})
        assert fake.left == ["shop"]
    finally:
        server.shutdown()
        server.server_close()


# --- real dockerd on a dual-stack lab ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dual_lab(docker_engine):
    started = time.monotonic()
    with Lab(3, underlay_ipv6=True) as lab:
        lab.outside_ns = lab.add_outside()
        lab.start_docker(docker_engine, DUAL)
        for host in lab.hosts:
            host.sh("ip6tables", "-w", "5", "-P", "FORWARD", "DROP")  # as dockerd 27+ sets it
        print(f"\ndual-stack lab with dockerd {docker_engine} up in {time.monotonic() - started:.1f} s")
        yield lab


def lease6(host) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Interface(host.subnet_env()["FLANNEL_IPV6_SUBNET"]).network


def addresses(host, name: str, network: str = "overlay0") -> tuple[str, str]:
    settings = json.loads(host.docker("inspect", name))[0]["NetworkSettings"]["Networks"][network]
    return settings["IPAddress"], settings["GlobalIPv6Address"]


def fetch(ns: str, url: str, timeout: int = 3) -> str:
    """busybox wget in a lab namespace; "" when it fails."""
    done = subprocess.run(["ip", "netns", "exec", ns, "timeout", str(timeout), "busybox", "wget", "-q", "-O-", url],
                          capture_output=True, text=True, timeout=timeout + 10)
    return done.stdout if done.returncode == 0 else ""


def our_ip6_rules(host) -> list[str]:
    """The driver's IPv6 rules on a lab host: its chains' rules and its bridges' FORWARD accepts."""
    text = host.sh("ip6tables-save")
    return [line for line in text.splitlines()
            if line.startswith(tuple(f"-A {c} " for c in CHAINS)) or ("pfl-" in line and "FORWARD" in line)]


def masquerade_findings(host) -> list[dict]:
    done = subprocess.run(["ip", "netns", "exec", host.ns, str(VENV_BIN / "pyflannel"), "doctor", "--json",
                           "-etcd-endpoints", host.lab.etcd_url, "-subnet-file", str(host.subnet_file),
                           "-api-socket", str(host.api_sock), "--driver-state-dir", str(host.workdir / "driver")],
                          capture_output=True, text=True, timeout=60)
    return [f for f in json.loads(done.stdout)["findings"] if f["check"] == "masquerade"]


@pytest.mark.lab
@pytest.mark.docker
def test_dual_stack_docker_networks_across_hosts(dual_lab):
    started = time.monotonic()
    h1, h2, h3 = dual_lab.hosts
    try:
        for host in dual_lab.hosts:
            host.docker("network", "create", "--ipv6", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
            ipam = json.loads(host.docker("network", "inspect", "overlay0"))[0]["IPAM"]["Config"]
            assert [c["Subnet"] for c in ipam] == [host.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/"),
                                                   str(lease6(host))]
        h2.docker("run", "-d", "--name", "web", "--network", "overlay0", "-p", "8080:80", IMAGE, *HTTPD)
        h3.docker("run", "-d", "--name", "web3", "--network", "overlay0", IMAGE, *HTTPD)
        web4, web6 = addresses(h2, "web")
        _, web3_v6 = addresses(h3, "web3")
        assert ipaddress.IPv6Address(web6) in lease6(h2) and ipaddress.IPv6Address(web3_v6) in lease6(h3)
        out = h1.docker("run", "--rm", "--network", "overlay0", IMAGE, "sh", "-c",
                        f"ip -6 -o addr show eth0 scope global; ip -6 route show default; "
                        f"ping -6 -c 5 -i 0.2 -W 2 {web6}; wget -q -O- http://[{web6}]/; "
                        f"ping -6 -c 2 -W 2 {web3_v6} >/dev/null && wget -q -O- http://[{web3_v6}]/ && echo H3-OK; "
                        f"ping -c 1 -W 2 {web4} >/dev/null && echo V4-OK")
        mine = ipaddress.IPv6Interface(out.split()[3])
        assert mine.ip in lease6(h1) and f"default via {lease6(h1).network_address + 1}" in out
        assert "5 packets received" in out and HELLO in out and "H3-OK" in out and "V4-OK" in out, out
        rtt, worst = re.search(r"min/avg/max = [\d.]+/([\d.]+)/([\d.]+)", out).groups()
        # at once: no packet waits for the bridges' link-local addresses to pass duplicate address detection
        assert float(worst) < 500, out
        # the published port over IPv6, from the other host and from the "internet", without source NAT
        url = f"http://[{h2.ip6}]:8080/"
        assert HELLO in fetch(h1.ns, url) and HELLO in fetch(dual_lab.outside_ns, url)
        assert fetch(h1.ns, f"http://[{h2.ip6}]:8080/cgi-bin/ip").strip() == f"[{h1.ip6}]"
        # egress over IPv6 is masqueraded to the host's address; between flannel addresses it is not
        h1.docker("run", "-d", "--name", "c1", "--network", "overlay0", IMAGE, "sleep", "300")
        _, c1_v6 = addresses(h1, "c1")
        seen_outside = h1.docker("exec", "c1", "wget", "-q", "-O-", f"http://[{OUTSIDE_IP6}]/cgi-bin/ip").strip()
        seen_by_web = h1.docker("exec", "c1", "wget", "-q", "-O-", f"http://[{web6}]/cgi-bin/ip").strip()
        assert seen_outside == f"[{h1.ip6}]" and seen_by_web == f"[{c1_v6}]"
        # `pyflannel doctor` checks the IPv6 masquerade rule as it checks the IPv4 one
        rule = ["-s", str(lease6(h1)), "!", "-d", DUAL["IPv6Network"], "-j", "MASQUERADE"]
        assert masquerade_findings(h1) == []
        h1.sh("ip6tables", "-w", "5", "-t", "nat", "-D", "PYFLANNEL-NAT-OUT", *rule)
        try:
            assert [f"no masquerade rule for {lease6(h1)}" in f["message"] for f in masquerade_findings(h1)] == [True]
        finally:
            h1.sh("ip6tables", "-w", "5", "-t", "nat", "-A", "PYFLANNEL-NAT-OUT", *rule)
        # the driver publishes web's IPv6 address beside its IPv4 one: pyflanneld's DNS answers AAAA with it
        wait_until("web's AAAA record on h1", lambda: web6 in h1.docker("exec", "c1", "nslookup", "web", check=False),
                   timeout=15, interval=0.3)
        # a restarted container gets both its addresses back, as with Docker's own IPAM
        h2.docker("restart", "-t", "0", "web")
        assert addresses(h2, "web") == (web4, web6)
        assert our_ip6_rules(h1)
        print(f"\nping6 {h1.name} -> {h2.name} container, just started: avg {rtt} ms, max {worst} ms; TCP over IPv6 to "
              f"{h2.name} and {h3.name}; the internet sees {seen_outside}, a container on {h2.name} sees "
              f"{seen_by_web}; {time.monotonic() - started:.1f} s")
    finally:
        for host in dual_lab.hosts:
            host.docker_clear()
    for host in dual_lab.hosts:
        wait_until(f"{host.name}'s network gone", lambda: not [n for n in host.extra_links() if n.startswith("pf")])
        assert our_ip6_rules(host) == [], f"ip6tables rules left on {host.name}"


@pytest.mark.lab
@pytest.mark.docker
def test_a_named_dual_stack_network_and_docker_run_ip6(dual_lab):
    """A named flannel network (made dual stack by pyflanneld) on every host; with --subnet for both leases,
    `docker run --ip6` picks the address."""
    h1, h2 = dual_lab.hosts[:2]
    try:
        for host in dual_lab.hosts:
            host.docker("network", "create", "--ipv6", "-d", "pyflannel", "--ipam-driver", "pyflannel",
                        "--ipam-opt", "pyflannel.network=shop", "shop")
        shop6 = ipaddress.IPv6Interface(h2.subnet_env("shop")["FLANNEL_IPV6_SUBNET"]).network
        h2.docker("run", "-d", "--name", "db", "--network", "shop", IMAGE, "sleep", "300")
        _, db6 = addresses(h2, "db", "shop")
        assert ipaddress.IPv6Address(db6) in shop6
        out = h1.docker("run", "--rm", "--network", "shop", IMAGE, "ping", "-6", "-c", "2", "-W", "2", db6)
        assert "2 packets received" in out, out
        h1.docker("network", "rm", "shop")
        env = h1.subnet_env()
        v4, v6 = env["FLANNEL_SUBNET"].replace(".1/", ".0/"), str(lease6(h1))
        h1.docker("network", "create", "--ipv6", "-d", "pyflannel", "--ipam-driver", "pyflannel", "--subnet", v4,
                  "--subnet", v6, "overlay0")
        pinned = str(lease6(h1).network_address + 0x99)
        out = h1.docker("run", "--rm", "--network", "overlay0", "--ip6", pinned, IMAGE, "ip", "-6", "-o", "addr",
                        "show", "eth0", "scope", "global")
        assert f"{pinned}/64" in out, out
    finally:
        for host in dual_lab.hosts:
            host.docker_clear()
            host.docker("network", "rm", "shop", check=False)


def create(host, name: str, *options: str, check: bool = True) -> str:
    return host.docker("network", "create", *options, "-d", "pyflannel", "--ipam-driver", "pyflannel", "--ipam-opt",
                       f"pyflannel.network={name}", name, check=check)


@pytest.mark.lab
@pytest.mark.docker
def test_a_named_network_is_dual_stack_only_when_asked(dual_lab):
    """Issue 28: a plain `docker network create` makes an IPv4-only flannel network in etcd (flanneld can serve it:
    no IPv6 key in its config or leases); `--ipv6` makes it dual stack although Docker asks for the IPv4 pool first
    (the IPv6 RequestPool adds IPv6 to the config, the IPv4 lease stays); `--ipv6` on a network other hosts serve
    IPv4-only is refused, naming them."""
    h1, h2, _ = dual_lab.hosts
    try:
        create(h1, "plain4")
        config = dual_lab.network_config("plain4")  # its Network and VNI: the next free in the module's lab
        assert set(config) == {"Network", "Backend"} and set(config["Backend"]) == {"Type", "VNI"}
        (key, node), = dual_lab.leases("plain4").items()
        assert "&" not in key and list(node["attrs"]) == ["PublicIP", "BackendType", "BackendData"]
        assert "FLANNEL_IPV6_SUBNET" not in h1.subnet_env("plain4")
        with pytest.raises(RuntimeError) as refused:
            create(h2, "plain4", "--ipv6")
        assert "network plain4 is IPv4-only in etcd" in str(refused.value)
        assert f"host(s) {h1.ip} serve it already" in str(refused.value)
        assert h2.docker("network", "ls", "-q", "-f", "name=plain4").strip() == ""
        assert "EnableIPv6" not in dual_lab.network_config("plain4")
        wait_until("h2 left plain4", lambda: len(dual_lab.leases("plain4")) == 1)

        for host in (h1, h2):
            create(host, "shop6", "--ipv6")
            env = host.subnet_env("shop6")
            ipam = json.loads(host.docker("network", "inspect", "shop6"))[0]["IPAM"]["Config"]
            assert [c["Subnet"] for c in ipam] == [str(ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network),
                                                   str(ipaddress.ip_interface(env["FLANNEL_IPV6_SUBNET"]).network)]
        config = dual_lab.network_config("shop6")
        assert config["EnableIPv6"] is True and ipaddress.IPv6Network(config["IPv6Network"]).subnet_of(
            ipaddress.IPv6Network("fd00:f1a0::/32"))
        leases = dual_lab.leases("shop6")
        assert len(leases) == 2 and all("&" in key and node["attrs"]["PublicIPv6"] for key, node in leases.items())
        h2.docker("run", "-d", "--name", "s2", "--network", "shop6", IMAGE, "sleep", "300")
        _, s2_v6 = addresses(h2, "s2", "shop6")
        out = h1.docker("run", "--rm", "--network", "shop6", IMAGE, "ping", "-6", "-c", "2", "-W", "2", s2_v6)
        assert "2 packets received" in out, out
    finally:
        for host in (h1, h2):
            host.docker_clear("shop6")
            host.docker("network", "rm", "plain4", check=False)
