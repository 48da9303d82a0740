"""Driver state: persistence across restarts, startup reconciliation, atomic and locked writes."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from pyflannel import firewall
from pyflannel.driver.errors import UnavailableError
from pyflannel.driver.api import create_app
from pyflannel.driver.records import PoolRecord
from pyflannel.driver.state import StateError, StateStore
from tests.driver_support import (DockerSide, docker, link, netns_name, our_links, state_dir,  # noqa: F401
                                  subnet_file, write_subnet_env)

STATE_V1 = Path(__file__).parent / "data" / "driver-state-v1.json"  # as the driver wrote it before its records


def restart(docker, state_dir, subnet_file) -> DockerSide:
    """A new driver process on the same state dir (as after `pyflannel-driver` or host restarts)."""
    return DockerSide(create_app(state_dir, subnet_file))


@pytest.mark.lab
def test_everything_survives_a_driver_restart(docker, state_dir, subnet_file):
    net = docker.create_network()
    running = docker.run_container(net)
    docker = restart(docker, state_dir, subnet_file)
    assert our_links() == sorted([net["bridge"], running["host"], running["container"]])
    # the allocation is remembered, the network too (second one still refused), and cleanup works
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": net["pool_id"], "Address": ""})["Address"] != running["address"]
    assert "already has a Docker network on the default flannel network" in docker.fails("NetworkDriver.CreateNetwork",
                                                  {"NetworkID": "f" * 64, "IPv4Data": [{"Pool": "10.5.34.0/24"}]})
    docker.stop_container(net, running)
    assert our_links() == [net["bridge"]]


@pytest.mark.lab
def test_reconcile_removes_what_nobody_owns(docker, state_dir, subnet_file):
    net = docker.create_network()
    joined = docker.run_container(net)
    left = docker.run_container(net)
    docker.ok("NetworkDriver.Leave", {"NetworkID": net["id"], "EndpointID": left["id"]})
    with IPRoute() as ipr:  # leftovers of a crashed driver: a bridge, a veth pair, a lone host end
        ipr.link("add", ifname="pfl-deadbeef", kind="bridge")
        ipr.link("add", ifname="pfv-0000000000", kind="veth", peer="pfc-0000000000")
        ipr.link("add", ifname="pfv-1111111111", kind="veth", peer="other-peer")
        ipr.link("add", ifname="pfc-" + left["id"][:10], kind="veth", peer="lone-peer")  # not joined: must go
        ipr.link("add", ifname="keep-me", kind="bridge")
    restart(docker, state_dir, subnet_file)
    assert our_links() == sorted([net["bridge"], joined["host"], joined["container"]])
    assert link("keep-me") is not None


@pytest.mark.lab
def test_reconcile_removes_leftover_firewall_rules(docker, state_dir, subnet_file):
    if subprocess.run(["iptables", "-w", "5", "-P", "FORWARD", "DROP"]).returncode != 0:
        pytest.skip("iptables not usable")
    net = docker.create_network()
    for flag in ("-i", "-o"):
        subprocess.run(["iptables", "-w", "5", "-A", "FORWARD", flag, "pfl-deadbeef", "-j", "ACCEPT"], check=True)
    restart(docker, state_dir, subnet_file)
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert "pfl-deadbeef" not in rules and f"-i {net['bridge']} -j ACCEPT" in rules


@pytest.mark.lab
def test_reconcile_repairs_a_lost_bridge(docker, state_dir, subnet_file):
    net = docker.create_network()
    with IPRoute() as ipr:  # as after a reboot
        ipr.link("del", index=ipr.link_lookup(ifname=net["bridge"])[0])
    restart(docker, state_dir, subnet_file)
    assert link(net["bridge"])["ipv4"] == ["10.5.34.1/24"]


@pytest.mark.lab
def test_join_repairs_a_damaged_bridge(docker):
    net = docker.create_network()
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=net["bridge"])[0]
        ipr.addr("del", index=idx, address="10.5.34.1", prefixlen=24)
        ipr.addr("add", index=idx, address="10.5.99.1", prefixlen=24)
        ipr.link("set", index=idx, state="down")
    docker.run_container(net)
    br = link(net["bridge"])
    assert br["ipv4"] == ["10.5.34.1/24"] and br["up"]


@pytest.mark.lab
def test_a_non_bridge_in_the_way_is_reported(docker):
    net_id = "abcdef0123" * 6 + "abcd"
    with IPRoute() as ipr:
        ipr.link("add", ifname="pfl-" + net_id[:8], kind="veth", peer="in-the-way")
    from tests.driver_support import network_request
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(net_id), 500)
    assert "not a bridge" in err
    assert link("pfl-" + net_id[:8])["kind"] == "veth"  # reported, not destroyed


@pytest.mark.lab
def test_lease_change_refuses_join_with_advice(docker, subnet_file):
    net = docker.create_network()
    write_subnet_env(subnet_file, lease="10.5.77.0/24")
    docker.ok("NetworkDriver.CreateEndpoint", {"NetworkID": net["id"], "EndpointID": "e" * 64, "Interface": None})
    err = docker.fails("NetworkDriver.Join", {"NetworkID": net["id"], "EndpointID": "e" * 64, "SandboxKey": "/x"}, 409)
    ref = net["id"][:12]  # every step, for this very network: its containers go first
    assert "10.5.34.0/24 to 10.5.77.0/24" in err and f"docker ps -aq --filter network={ref}" in err
    assert f"`docker network rm {ref}`" in err and "docker network create -d pyflannel --ipam-driver pyflannel" in err


# --- the store itself (no kernel involved) -------------------------------------------------------------------------

@pytest.mark.unit
def test_state_is_written_atomically_and_only_on_change(tmp_path):
    store = StateStore(str(tmp_path))
    with store.transaction() as st:
        pass
    assert not os.path.exists(store.path)  # nothing changed, nothing written
    with store.transaction() as st:
        st.pools["p"] = PoolRecord("10.5.34.0/24", [], "")
    assert json.load(open(store.path))["pools"] == {"p": {"pool": "10.5.34.0/24", "allocated": [], "flannel": ""}}
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.lock"]  # no temp files left


@pytest.mark.unit
def test_failed_transaction_changes_nothing(tmp_path):
    store = StateStore(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.transaction() as st:
            st.pools["p"] = PoolRecord("10.5.34.0/24", [], "")
            raise RuntimeError("half-way")
    assert store.load().pools == {}


@pytest.mark.unit
def test_corrupt_state_is_a_clear_startup_error(tmp_path):
    (tmp_path / "state.json").write_text("{half")
    with pytest.raises(StateError, match="not valid JSON.*move it away"):
        StateStore(str(tmp_path))
    (tmp_path / "state.json").write_text('{"version": 99}')
    with pytest.raises(StateError, match="unknown format"):
        StateStore(str(tmp_path))


@pytest.mark.unit
def test_lock_is_shared_with_other_processes_and_times_out(tmp_path):
    import fcntl
    store = StateStore(str(tmp_path), lock_timeout=0.3)
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another "worker" holds it
    try:
        with pytest.raises(UnavailableError, match="locked"):
            with store.transaction():
                pass
    finally:
        os.close(fd)
    with store.transaction() as st:
        st.pools["p"] = PoolRecord("10.5.34.0/24", [], "")


@pytest.mark.unit
def test_threads_do_not_lose_updates(tmp_path):
    store = StateStore(str(tmp_path))

    def bump():
        for _ in range(20):
            with store.transaction() as st:
                pool = st.pools.setdefault("n", PoolRecord("10.5.0.0/16", [], ""))
                pool.allocated.append(f"10.5.0.{len(pool.allocated) + 1}")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.load().pools["n"].allocated) == 80


@pytest.mark.unit
def test_a_state_file_as_the_driver_wrote_it_before_its_records_loads_and_is_written_back_alike(tmp_path):
    """The on-disk format is unchanged: every value comes back, and the file written back is the same but for
    "ports": [], written now for every endpoint (before, only after a Leave or a publish)."""
    (tmp_path / "state.json").write_bytes(STATE_V1.read_bytes())
    store = StateStore(str(tmp_path))
    state = store.load()
    expected = json.loads(STATE_V1.read_text())
    for endpoint in expected["endpoints"].values():
        endpoint.setdefault("ports", [])
    assert state.to_json() == expected
    with store.transaction() as st:
        st.leaving.append("shop2")
    expected["leaving"].append("shop2")
    assert (tmp_path / "state.json").read_text() == json.dumps(expected, indent=1, sort_keys=True) + "\n"
    assert store.load() == st
    dual, only6, shop = (state.networks[c * 64] for c in "a7e")
    assert [str(gateway) for gateway in dual.gateways] == ["10.5.34.1/24", "fd00:5:0:27::1/64"]
    assert only6.gateways[0] is None and only6.pools == {"fd00:5:0:28::/64"} and "pool6" not in shop.to_json()
    assert state.network_on("shop") == ("e" * 64, shop) and state.networks_using("10.5.34.0/24") == ["a" * 64]
    assert state.endpoints["b" * 64].ports[1] == firewall.Published("udp", "127.0.0.1", 49153, "10.5.34.2", 53,
                                                                    "fd00:5:0:27::2")


@pytest.mark.unit
def test_a_record_the_driver_never_wrote_is_a_clear_startup_error(tmp_path):
    data = json.loads(STATE_V1.read_text())
    del data["networks"]["e" * 64]["masquerade"]  # a record from before egress NAT: never released
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(StateError, match=r"state file .*: networks 'eeeeeeeeeeee' lacks masquerade"):
        StateStore(str(tmp_path))
    data["networks"]["e" * 64]["masquerade"] = False
    data["endpoints"]["b" * 64]["ports"] = [{"proto": "tcp"}]
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(StateError, match=r"endpoints 'bbbbbbbbbbbb' has a port that is not one"):
        StateStore(str(tmp_path))
