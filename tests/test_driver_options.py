"""`docker network create`'s -o and --ipam-opt options, through the driver's API over a fake plumbing and a fake
pyflanneld (tests/driver_support.py): unknown keys refused naming the flag that takes them, `-o encrypted` checked
against the flannel network's backend, enable_icc=false and host_binding_ipv4 carried to the plumbing and the rules,
and every suggested command naming the plugin as the user does. tests/test_docker_options.py runs them on real
dockerd 20.10 and 26.1."""
import ipaddress

import pytest

from pyflannel import firewall
from pyflannel.daemon.api import serve as serve_api
from pyflannel.driver.api import create_app
from tests.driver_support import DockerSide, FakeDaemon, network_request, new_id, write_subnet_env
from tests.fakes import FakePlumbing

pytestmark = pytest.mark.unit

KNOWN = ("its -o options are com.docker.network.driver.mtu, com.docker.network.bridge.enable_ip_masquerade, "
         "com.docker.network.bridge.enable_icc, com.docker.network.bridge.host_binding_ipv4, encrypted (and its "
         "--ipam-opt options pyflannel.network, pyflannel.backend, pyflannel.ipv6)")
KNOWN_IPAM = ("its --ipam-opt options are pyflannel.network, pyflannel.backend, pyflannel.ipv6 (and its -o options "
              "com.docker.network.driver.mtu, com.docker.network.bridge.enable_ip_masquerade, "
              "com.docker.network.bridge.enable_icc, com.docker.network.bridge.host_binding_ipv4, encrypted)")


class BackendDaemon(FakeDaemon):
    """A FakeDaemon that describes the networks it serves with their backends: the default network's is
    `default_backend`, a joined one's the backend its first join asked for (vxlan without one)."""

    def __init__(self, subnet_file, default_backend: str = "vxlan"):
        super().__init__(subnet_file)
        self.served = {"default": default_backend}

    def join(self, name, network, backend=None, ipv6=False) -> dict:
        self.served.setdefault(name, backend or "vxlan")
        return super().join(name, network, backend, ipv6)

    def describe(self) -> list:
        return [{"name": name, "backend": backend} for name, backend in self.served.items()]


@pytest.fixture
def driver(tmp_path):
    """(Docker's side, the plumbing, the fake pyflanneld) of a driver named `pyflannel`."""
    yield from started(tmp_path, "pyflannel")


@pytest.fixture
def managed(tmp_path):
    """The same, named as the managed plugin is."""
    yield from started(tmp_path, "pyflannel:latest")


def started(tmp_path, plugin_name: str, default_backend: str = "vxlan"):
    subnet_file, sock = write_subnet_env(tmp_path / "subnet.env"), str(tmp_path / "pyflanneld.sock")
    daemon, plumbing = BackendDaemon(subnet_file, default_backend), FakePlumbing()
    server = serve_api(daemon, sock)
    try:
        yield DockerSide(create_app(str(tmp_path / "state"), subnet_file, plumbing=plumbing, daemon_socket=sock,
                                    plugin_name=plugin_name)), plumbing, daemon
    finally:
        server.shutdown()
        server.server_close()
        create_app(str(tmp_path / "other"), subnet_file, plumbing=FakePlumbing())  # the name back to its default


def refused_network(docker, generic: dict, ipam_options: dict | None = None, status: int = 400) -> str:
    """`docker network create` with these -o options (`generic`) and --ipam-opt options: the error of its
    CreateNetwork, after its pool was given."""
    pool, gw = docker.request_pool(ipam_options)
    return docker.fails("NetworkDriver.CreateNetwork", network_request(new_id("n"), pool=pool["Pool"],
                                                                       gateway=gw["Address"], generic=generic), status)


def test_an_unknown_o_option_is_refused_listing_the_known_ones(driver):
    docker, plumbing, _ = driver
    assert refused_network(docker, {"com.docker.network.bridge.name": "br0"}) == (
        f"-o com.docker.network.bridge.name=br0: pyflannel has no -o option 'com.docker.network.bridge.name'; {KNOWN}")
    assert refused_network(docker, {"colour": ""}) == f"-o colour: pyflannel has no -o option 'colour'; {KNOWN}"
    assert plumbing.bridges == {} and plumbing.rules == []


def test_an_ipam_option_given_with_o_says_to_use_ipam_opt(driver):
    docker, _, daemon = driver
    assert refused_network(docker, {"pyflannel.network": "shop"}) == (
        "-o pyflannel.network=shop: pyflannel.network is an option of --ipam-opt, not of -o: give it as "
        "`--ipam-opt pyflannel.network=shop` (with --ipam-driver pyflannel)")
    assert daemon.backends == []  # nothing was joined: the default network's pool


def test_an_o_option_given_with_ipam_opt_is_refused_before_any_join(driver):
    docker, _, daemon = driver
    request = {"AddressSpace": "", "Pool": "", "SubPool": "", "V6": False}
    assert docker.fails("IpamDriver.RequestPool", {**request, "Options": {
        "pyflannel.network": "shop", "encrypted": ""}}, 400) == (
        "--ipam-opt encrypted: encrypted is an option of -o, not of --ipam-opt: give it as `-o encrypted` (with -d "
        "pyflannel)")
    assert docker.fails("IpamDriver.RequestPool", {**request, "Options": {"pyflannel.netwrok": "shop"}}, 400) == (
        f"--ipam-opt pyflannel.netwrok=shop: pyflannel has no --ipam-opt option 'pyflannel.netwrok'; {KNOWN_IPAM}")
    assert daemon.backends == []


def test_errors_name_the_managed_plugin_as_the_user_does(managed):
    docker, _, _ = managed
    assert refused_network(docker, {"pyflannel.ipv6": "true"}).endswith(
        "give it as `--ipam-opt pyflannel.ipv6=true` (with --ipam-driver pyflannel:latest)")
    assert "pyflannel:latest has no -o option 'x'" in refused_network(docker, {"x": "1"})
    subpool = docker.fails("IpamDriver.RequestPool", {"Pool": "", "SubPool": "10.5.34.0/25", "Options": {}}, 409)
    assert subpool.endswith("Create the network without --ip-range: `docker network create -d pyflannel:latest "
                            "--ipam-driver pyflannel:latest NAME`")
    docker.create_network()
    second = docker.fails("IpamDriver.RequestPool", {"Pool": "", "Options": {}}, 409)
    assert ("create one on another flannel network with `docker network create -d pyflannel:latest --ipam-driver "
            "pyflannel:latest --ipam-opt pyflannel.network=NAME NAME`") in second


def test_the_options_docker_itself_sends_pass(driver):
    """dockerd's own keys sit beside the generic (-o) map, never in it; --internal, --ipv6 and the known -o keys."""
    docker, plumbing, _ = driver
    net = docker.create_network(mtu="1400", **{"com.docker.network.internal": True,
                                               "com.docker.network.enable_ipv4": True})
    assert plumbing.bridges[net["bridge"]][1] == 1400


ENCRYPTED_HOW = ("`docker network create -d pyflannel --ipam-driver pyflannel --ipam-opt pyflannel.network=NAME "
                 "--ipam-opt pyflannel.backend=wireguard -o encrypted NAME`")


@pytest.mark.parametrize("value", ["", "true"])
def test_encrypted_on_the_default_vxlan_network_says_how(driver, value):
    docker, plumbing, _ = driver
    assert refused_network(docker, {"encrypted": value}, status=409) == (
        "-o encrypted: the default flannel network uses the vxlan backend (its etcd config), which does not encrypt: "
        f"give the network a flannel network of its own with the wireguard backend: {ENCRYPTED_HOW}")
    assert plumbing.bridges == {}


def test_encrypted_on_a_vxlan_named_network_is_refused(driver):
    docker, plumbing, _ = driver
    assert refused_network(docker, {"encrypted": ""}, {"pyflannel.network": "shop"}, status=409) == (
        "-o encrypted: flannel network shop uses the vxlan backend, which does not encrypt (a flannel network's "
        "backend is chosen when it is first created): create the network on a new flannel network with the "
        f"wireguard backend: {ENCRYPTED_HOW}")
    assert plumbing.bridges == {}


def test_encrypted_on_a_wireguard_network_is_created(driver):
    docker, plumbing, daemon = driver
    net = docker.create_network(ipam_options={"pyflannel.network": "vault", "pyflannel.backend": "wireguard"},
                                **{"com.docker.network.generic": {"encrypted": ""}})
    assert daemon.backends == ["wireguard"] and net["bridge"] in plumbing.bridges
    assert refused_network(docker, {"encrypted": "maybe"}, {"pyflannel.network": "other"}) == (
        "-o encrypted: must be true or false, got 'maybe'")


def test_encrypted_on_a_wireguard_default_network_is_created(tmp_path):
    for docker, plumbing, _ in started(tmp_path, "pyflannel", default_backend="wireguard"):
        net = docker.create_network(**{"com.docker.network.generic": {"encrypted": "true"}})
        assert net["bridge"] in plumbing.bridges


def test_enable_icc_false_isolates_the_ports_and_drops_the_routed_way(driver):
    docker, plumbing, _ = driver
    closed = docker.create_network(**{"com.docker.network.generic": {
        "com.docker.network.bridge.enable_icc": "false"}})
    a, b = docker.run_container(closed), docker.run_container(closed)
    assert plumbing.isolated_ports == {a["host"], b["host"]}
    drop = firewall.Rule("filter", firewall.ISOLATION, ("-i", closed["bridge"], "-o", closed["bridge"], "-m",
                                                        "conntrack", "!", "--ctstate", "DNAT", "-j", "DROP"))
    assert drop in plumbing.rules


def test_icc_is_on_by_default(driver):
    docker, plumbing, _ = driver
    net = docker.create_network()
    docker.run_container(net)
    assert plumbing.isolated_ports == set()
    assert not [r for r in plumbing.rules if r.args[:4] == ("-i", net["bridge"], "-o", net["bridge"])]


def test_icc_rules_exist_in_both_families_and_on_internal_networks():
    spec = firewall.NetworkSpec("pfl-x", ipaddress.IPv4Network("10.5.34.0/24"), ipaddress.IPv4Network("10.5.0.0/16"),
                                True, True, ipaddress.IPv6Network("fd00:5:0:27::/64"),
                                ipaddress.IPv6Network("fd00:5::/48"), icc=False)
    same_bridge = [r for r in firewall.network_rules(spec) if r.args[:4] == ("-i", "pfl-x", "-o", "pfl-x")]
    assert [r.v6 for r in same_bridge] == [False, True]


def publish(docker, net: dict, ep: dict, host_ip: str = "") -> None:
    docker.ok("NetworkDriver.ProgramExternalConnectivity", {"NetworkID": net["id"], "EndpointID": ep["id"], "Options": {
        "com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostIP": host_ip, "HostPort": 8080,
                                        "HostPortEnd": 8080}]}})


def dnat_destinations(plumbing) -> list:
    return [r.args[r.args.index("-d") + 1] if "-d" in r.args else "*" for r in plumbing.rules
            if r.chain == firewall.PORTS]


def test_host_binding_ipv4_is_where_ports_without_an_address_bind(driver):
    docker, plumbing, _ = driver
    net = docker.create_network(**{"com.docker.network.generic": {
        "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1"}})
    plain, named = docker.run_container(net), docker.run_container(net)
    publish(docker, net, plain)
    assert dnat_destinations(plumbing) == ["127.0.0.1"]
    docker.ok("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": net["id"], "EndpointID": plain["id"]})
    publish(docker, net, named, "192.0.2.11")  # an address given with -p wins
    assert dnat_destinations(plumbing) == ["192.0.2.11"]


@pytest.mark.parametrize("value", ["0.0.0.0", ""])
def test_host_binding_ipv4_of_every_address_is_the_default(driver, value):
    docker, plumbing, _ = driver
    net = docker.create_network(**{"com.docker.network.generic": {
        "com.docker.network.bridge.host_binding_ipv4": value}})
    publish(docker, net, docker.run_container(net))
    assert dnat_destinations(plumbing) == ["*"]


def test_host_binding_ipv4_must_be_an_ipv4_address(driver):
    docker, _, _ = driver
    for value in ("::1", "localhost"):
        assert refused_network(docker, {"com.docker.network.bridge.host_binding_ipv4": value}) == (
            f"-o com.docker.network.bridge.host_binding_ipv4: must be an IPv4 address like 127.0.0.1, got {value!r}")
