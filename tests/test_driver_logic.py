"""The driver's API over a fake plumbing (tests/fakes.py): Docker's call sequences, the state they leave, and a
kernel refusal. No root, no namespaces. test_driver_api.py runs the same flows on the real kernel."""
import ipaddress
import json
import os
import threading
import time

import pytest

from pyflannel.daemon.api import serve as serve_api
from pyflannel.driver.api import create_app
from tests.driver_support import DockerSide, FakeDaemon, write_subnet_env
from tests.fakes import FakePlumbing

pytestmark = pytest.mark.unit


@pytest.fixture
def driver(tmp_path):
    plumbing = FakePlumbing()
    app = create_app(str(tmp_path / "state"), write_subnet_env(tmp_path / "subnet.env"), plumbing=plumbing)
    return DockerSide(app), plumbing, tmp_path / "state" / "state.json"


def test_a_container_lifecycle_programs_and_unprograms_the_plumbing(driver):
    docker, plumbing, state_file = driver
    net = docker.create_network(mtu="1400")
    assert plumbing.bridges == {net["bridge"]: (ipaddress.IPv4Interface("10.5.34.1/24"), 1400)}
    ep = docker.run_container(net)
    ip = ipaddress.IPv4Interface(ep["address"]).ip
    assert plumbing.veths[ep["host"]] == (ep["container"], net["bridge"], 1400, "02:42:" + ":".join(
        f"{b:02x}" for b in ip.packed))
    assert ep["joined"]["Gateway"] == "10.5.34.1" and ep["joined"]["InterfaceName"]["SrcName"] == ep["container"]
    docker.stop_container(net, ep)
    assert plumbing.veths == {}
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert plumbing.bridges == {}
    state = json.loads(state_file.read_text())
    assert state["networks"] == {} and state["endpoints"] == {}


def test_a_kernel_refusal_is_a_500_that_names_it_and_joins_nothing(driver):
    docker, plumbing, state_file = driver
    net = docker.create_network()
    plumbing.refuse.add("ensure_veth")
    addr = docker.ok("IpamDriver.RequestAddress", {"PoolID": net["pool_id"], "Address": "", "Options": {}})
    ref = {"NetworkID": net["id"], "EndpointID": "e" * 64}
    docker.ok("NetworkDriver.CreateEndpoint", {**ref, "Options": {}, "Interface": {"Address": addr["Address"]}})
    message = docker.fails("NetworkDriver.Join", {**ref, "SandboxKey": "/x", "Options": {}}, status=500)
    assert "cannot ensure_veth" in message
    assert json.loads(state_file.read_text())["endpoints"]["e" * 64]["joined"] is False


def test_a_call_waits_a_bounded_time_for_pyflanneld_to_write_subnet_env(tmp_path):
    """At boot dockerd may restart a container before pyflanneld wrote subnet.env: the call waits for it (up to
    --lease-wait) instead of failing the container; without it, the error comes after the wait."""
    subnet_env = tmp_path / "subnet.env"
    docker = DockerSide(create_app(str(tmp_path / "state"), str(subnet_env), plumbing=FakePlumbing(), lease_wait=3))
    writer = threading.Timer(0.5, write_subnet_env, (subnet_env,))
    writer.start()
    started = time.monotonic()
    pool = docker.ok("IpamDriver.RequestPool", {"Pool": "", "V6": False})
    assert pool["Pool"] == "10.5.34.0/24" and 0.4 < time.monotonic() - started < 3
    subnet_env.unlink()
    started = time.monotonic()
    assert "no flannel lease on this host" in docker.fails("IpamDriver.RequestPool", {"Pool": "", "V6": False}, 503)
    assert time.monotonic() - started >= 3


def test_a_pool_released_before_delete_network_goes_with_the_network(driver):
    """dockerd 20.10 calls ReleasePool before DeleteNetwork: no pool record (and no stale allocation) is left."""
    docker, _, state_file = driver
    net = docker.create_network()
    ep = docker.run_container(net)
    docker.ok("IpamDriver.ReleasePool", {"PoolID": net["pool_id"]})  # kept: the network still uses it
    assert json.loads(state_file.read_text())["pools"]
    docker.ok("NetworkDriver.Leave", {"NetworkID": net["id"], "EndpointID": ep["id"]})
    docker.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": net["id"], "EndpointID": ep["id"]})
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert json.loads(state_file.read_text())["pools"] == {}
    again = docker.create_network()  # a recreate starts from a clean pool
    assert docker.run_container(again)["address"] == "10.5.34.2/24"


def test_an_exhausted_lease_is_named_and_freeing_an_address_lets_containers_start(tmp_path):
    """A /29 lease holds 5 containers (the gateway takes one address): the 6th is refused naming the lease; one
    container gone, the next one starts."""
    docker = DockerSide(create_app(str(tmp_path / "state"), write_subnet_env(tmp_path / "subnet.env",
                                                                             lease="10.5.34.0/29"),
                                   plumbing=FakePlumbing()))
    net = docker.create_network()
    running = [docker.run_container(net) for _ in range(5)]
    err = docker.fails("IpamDriver.RequestAddress", {"PoolID": net["pool_id"], "Address": "", "Options": {}}, 409)
    assert "no free address left in this host's lease 10.5.34.0/29 (5 containers hold addresses)" in err
    docker.stop_container(net, running[2])
    assert docker.run_container(net)["address"] == running[2]["address"]


def test_named_networks_beside_the_default_one_and_a_leave_pyflanneld_missed(tmp_path):
    """A Docker network per flannel network; `docker network rm` while pyflanneld is down removes everything of the
    driver's at once (dockerd deletes its network whatever the driver answers) and the leave is done at the next
    call once pyflanneld answers."""
    subnet_file = write_subnet_env(tmp_path / "subnet.env")
    sock, fake = str(tmp_path / "pyflanneld.sock"), FakeDaemon(subnet_file)
    plumbing = FakePlumbing()
    docker = DockerSide(create_app(str(tmp_path / "state"), subnet_file, plumbing=plumbing, daemon_socket=sock))
    server = serve_api(fake, sock)
    try:
        default = docker.create_network()
        shop = docker.create_network(ipam_options={"pyflannel.network": "shop"})
        assert shop["pool_id"] == "pyflannel/shop/10.60.3.0/24" and default["pool_id"] == "pyflannel/10.5.34.0/24"
        again = docker.fails("IpamDriver.RequestPool", {"Pool": "", "Options": {"pyflannel.network": "shop"}}, 409)
        assert "already has a Docker network on flannel network shop" in again and shop["id"][:12] in again
        bad = docker.fails("IpamDriver.RequestPool", {"Pool": "", "Options": {"pyflannel.network": "a/b"}}, 400)
        assert "'a/b' is not valid" in bad
        for options in ({"pyflannel.network": "x", "pyflannel.backend": "udp"}, {"pyflannel.backend": "wireguard"}):
            refused = docker.fails("IpamDriver.RequestPool", {"Pool": "", "Options": options}, 400)
            assert "pyflannel.backend" in refused and "use vxlan or wireguard" in refused
        assert fake.backends == [None]
    finally:
        server.shutdown()
        server.server_close()
    os.unlink(sock)
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": shop["id"]})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": shop["pool_id"]})
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["leaving"] == ["shop"] and list(state["networks"]) == [default["id"]]
    assert list(plumbing.bridges) == [default["bridge"]]
    server = serve_api(fake, sock)
    try:
        docker.run_container(default)
    finally:
        server.shutdown()
        server.server_close()
    assert fake.left == ["shop"] and json.loads((tmp_path / "state" / "state.json").read_text())["leaving"] == []
