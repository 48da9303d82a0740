"""The driver's HTTP API, called the way Docker calls it, with kernel effects checked in a throwaway namespace."""
from __future__ import annotations

import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.driver_support import (FLANNEL_MTU, GATEWAY, LEASE, DockerSide, docker, ip_forward, link,  # noqa: F401
                                  netns_name, network_request, new_id, our_links, state_dir, subnet_file,
                                  write_subnet_env)

pytestmark = pytest.mark.lab

HOW_TO = "docker network create -d pyflannel --ipam-driver pyflannel NAME"


# --- handshake and transport ---------------------------------------------------------------------------------------

def test_activate_and_capabilities(docker):
    assert docker.ok("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert docker.ok("NetworkDriver.GetCapabilities") == {"Scope": "local", "ConnectivityScope": "global"}
    assert docker.ok("IpamDriver.GetCapabilities") == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
    spaces = docker.ok("IpamDriver.GetDefaultAddressSpaces")
    assert set(spaces) == {"LocalDefaultAddressSpace", "GlobalDefaultAddressSpace"}


def test_bodiless_methods_ignore_whatever_body_comes(docker):
    for body in (b"", b"{}", b"{garbage", b"null"):
        assert docker.raw("Plugin.Activate", body)[0] == 200


def test_unknown_method_is_404_with_json(docker):
    status, reply = docker.call("NetworkDriver.SomethingNew", {})
    assert status == 404 and "NetworkDriver.SomethingNew" in reply["Err"]
    status, reply = docker.call("IpamDriver.SomethingNew", {})
    assert status == 404 and reply["Error"] == reply["Err"]
    status, reply = docker.raw("a/b/c")
    assert status == 404 and reply["Err"]


def test_get_is_405_with_json(docker):
    status, reply = docker.raw("Plugin.Activate", http_method="GET")
    assert status == 405 and "POST" in reply["Err"]


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"null", "empty"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object, got a list"),
    (b'"text"', "JSON object, got a string"),
    (b"42", "JSON object, got a number"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, ""),
])
def test_malformed_bodies_are_400(docker, data, words):
    for method in ("NetworkDriver.CreateNetwork", "NetworkDriver.Join", "IpamDriver.RequestPool"):
        status, reply = docker.raw(method, data)
        assert status == 400, (method, reply)
        assert words in reply["Err"]


def test_huge_body_is_refused(docker):
    status, reply = docker.raw("NetworkDriver.CreateNetwork", b'{"x": "' + b"a" * (2 << 20) + b'"}')
    assert status in (400, 413) and reply["Err"]


NID, EID = "0123456789ab" * 2, "ba9876543210" * 2

BAD_REQUESTS = [
    # method, body, field named in the error
    ("NetworkDriver.CreateNetwork", {"Options": {}, "IPv4Data": []}, "NetworkID"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": 7}, "NetworkID"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": "short"}, "NetworkID"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": "x/../../etc" * 3}, "NetworkID"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "Options": []}, "Options"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": {"Pool": LEASE}}, "IPv4Data"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": ["10.5.34.0/24"]}, "IPv4Data[0]"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": "10.5.34/24x"}]}, "IPv4Data[0].Pool"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Gateway": "10.5.34.1/24"}]}, "IPv4Data[0].Pool"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": LEASE, "Gateway": "10.5.34.1"}]},
     "IPv4Data[0].Gateway"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": LEASE, "AuxAddresses": [1]}]},
     "IPv4Data[0].AuxAddresses"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [], "IPv6Data": "no"}, "IPv6Data"),
    ("NetworkDriver.CreateNetwork", network_request(NID, **{"com.docker.network.enable_ipv6": "false"}),
     "com.docker.network.enable_ipv6"),
    ("NetworkDriver.CreateNetwork", network_request(NID, generic={"com.docker.network.driver.mtu": "big"}),
     "com.docker.network.driver.mtu"),
    ("NetworkDriver.CreateNetwork", network_request(NID, generic={"com.docker.network.driver.mtu": "40"}),
     "com.docker.network.driver.mtu"),
    ("NetworkDriver.CreateNetwork", network_request(NID, **{"com.docker.network.generic": "mtu=1400"}),
     "com.docker.network.generic"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": [{"Pool": LEASE}] * 17}, "IPv4Data"),
    ("NetworkDriver.DeleteNetwork", {}, "NetworkID"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID}, "EndpointID"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID, "Interface": "eth0"}, "Interface"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.5.34.7"}},
     "Interface.Address"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": 17}},
     "Interface.Address"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                      "Interface": {"Address": "10.5.34.7/24", "MacAddress": "zz:zz"}},
     "Interface.MacAddress"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                      "Interface": {"Address": "10.5.34.7/24", "AddressIPv6": "fd00::7"}},
     "Interface.AddressIPv6"),
    ("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": 5}, "SandboxKey"),
    ("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "Options": "x"}, "Options"),
    ("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": ["x"]}, "EndpointID"),
    ("NetworkDriver.DeleteEndpoint", {"EndpointID": EID}, "NetworkID"),
    ("NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": None}, "EndpointID"),
    ("NetworkDriver.ProgramExternalConnectivity", {"NetworkID": NID, "EndpointID": EID, "Options": 1}, "Options"),
    ("IpamDriver.RequestPool", {"Pool": 10}, "Pool"),
    ("IpamDriver.RequestPool", {"Pool": "ten/24"}, "Pool"),
    ("IpamDriver.RequestPool", {"SubPool": "x"}, "SubPool"),
    ("IpamDriver.RequestPool", {"V6": "no"}, "V6"),
    ("IpamDriver.RequestPool", {"Options": {"k": 1}}, "Options['k']"),
    ("IpamDriver.RequestPool", {"AddressSpace": "elsewhere"}, "AddressSpace"),
    ("IpamDriver.ReleasePool", {}, "PoolID"),
    ("IpamDriver.RequestAddress", {"Address": ""}, "PoolID"),
    ("IpamDriver.RequestAddress", {"PoolID": "pyflannel/10.5.34.0/24", "Address": "10.5.34"}, "Address"),
    ("IpamDriver.RequestAddress", {"PoolID": "pyflannel/10.5.34.0/24", "Options": []}, "Options"),
    ("IpamDriver.RequestAddress", {"PoolID": "nope", "Address": ""}, "PoolID"),
    ("IpamDriver.ReleaseAddress", {"PoolID": "pyflannel/10.5.34.0/24"}, "Address"),
    ("IpamDriver.ReleaseAddress", {"PoolID": 3, "Address": "10.5.34.2"}, "PoolID"),
]


@pytest.mark.parametrize("method, body, field", BAD_REQUESTS, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(BAD_REQUESTS)])
def test_bad_fields_are_400_naming_the_field(docker, method, body, field):
    err = docker.fails(method, body, status=400)
    assert field in err, err
    assert our_links() == []


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
KEYS = ["NetworkID", "EndpointID", "Options", "IPv4Data", "IPv6Data", "Interface", "SandboxKey", "PoolID", "Pool",
        "SubPool", "Address", "V6", "AddressSpace"]
METHODS = ["NetworkDriver.CreateNetwork", "NetworkDriver.DeleteNetwork", "NetworkDriver.CreateEndpoint",
           "NetworkDriver.EndpointOperInfo", "NetworkDriver.DeleteEndpoint", "NetworkDriver.Join",
           "NetworkDriver.Leave", "NetworkDriver.ProgramExternalConnectivity", "IpamDriver.RequestPool",
           "IpamDriver.ReleasePool", "IpamDriver.RequestAddress", "IpamDriver.ReleaseAddress"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS),
       body=JSON | st.dictionaries(st.sampled_from(KEYS), JSON | st.just(NID) | st.just(LEASE), max_size=6))
def test_any_json_gets_a_json_answer_and_never_a_500(docker, method, body):
    status, reply = docker.call(method, body)
    assert status in (200, 400, 409), (status, reply)
    if status != 200:
        assert reply["Err"] and "Traceback" not in reply["Err"]


# --- IPAM ----------------------------------------------------------------------------------------------------------

def request_pool(docker, **fields):
    body = {"AddressSpace": "pyflannel-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}
    body.update(fields)
    return docker.call("IpamDriver.RequestPool", body)


def test_pool_is_the_host_lease_and_stable(docker):
    status, first = request_pool(docker)
    assert status == 200
    assert first == {"PoolID": "pyflannel/10.5.34.0/24", "Pool": LEASE,
                     "Data": {"com.docker.network.gateway": "10.5.34.1/24"}}
    assert request_pool(docker) == (200, first)
    assert request_pool(docker, Pool=LEASE) == (200, first)
    assert request_pool(docker, AddressSpace="", Options=None) == (200, first)


def test_foreign_pool_is_refused_with_how_to(docker):
    status, reply = request_pool(docker, Pool="172.20.0.0/16")
    assert status == 409 and HOW_TO in reply["Err"] and reply["Error"] == reply["Err"]
    assert "10.5.34.0/24" in reply["Err"]
    assert HOW_TO in docker.fails("IpamDriver.RequestPool", {"Pool": LEASE, "SubPool": "10.5.34.128/25"}, 409)
    assert "IPv6" in docker.fails("IpamDriver.RequestPool", {"V6": True}, 409)


def test_missing_subnet_env_is_503_and_says_so(docker, subnet_file):
    import os
    os.unlink(subnet_file)
    err = docker.fails("IpamDriver.RequestPool", {}, 503)
    assert subnet_file in err and "pyflanneld" in err
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(new_id()), 503)
    assert subnet_file in err


def test_gateway_request(docker):
    pid = docker.ok("IpamDriver.RequestPool", {})["PoolID"]
    gw = {"RequestAddressType": "com.docker.network.gateway"}
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "", "Options": gw})["Address"] == \
        "10.5.34.1/24"
    # idempotent: the gateway is never "taken"
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": GATEWAY, "Options": gw})["Address"] == \
        "10.5.34.1/24"
    assert "--gateway" in docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.5.34.9", "Options": gw}, 409)
    assert "gateway" in docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": GATEWAY}, 409)
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": GATEWAY})


def test_addresses_handed_out_lowest_free_first_and_released(docker):
    pid = docker.ok("IpamDriver.RequestPool", {})["PoolID"]
    got = [docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""})["Address"] for _ in range(3)]
    assert got == ["10.5.34.2/24", "10.5.34.3/24", "10.5.34.4/24"]
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.5.34.2"})
    # the lowest free one, as Docker's IPAM: a container stopped and started again gets its address back
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""})["Address"] == "10.5.34.2/24"
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.5.34.2"})
    # a specific address: once, then "in use"
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.5.34.2"})["Address"] == "10.5.34.2/24"
    assert "in use" in docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.5.34.2"}, 409)
    for outside in ("10.5.35.2", "10.5.34.0", "10.5.34.255"):
        assert "10.5.34.0/24" in docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": outside}, 409)
    # releasing twice, or something never handed out, or in an unknown pool: fine
    for _ in range(2):
        docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.5.34.3"})
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "10.5.34.200"})
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": "pyflannel/10.9.9.0/24", "Address": "10.9.9.9"})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": "pyflannel/10.9.9.0/24"})


def test_small_lease_runs_out_cleanly(docker, subnet_file):
    write_subnet_env(subnet_file, lease="10.5.34.0/29")
    pid = docker.ok("IpamDriver.RequestPool", {})["PoolID"]
    got = {docker.ok("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""})["Address"] for _ in range(5)}
    assert got == {f"10.5.34.{i}/29" for i in range(2, 7)}
    assert "no free address" in docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""}, 409)


def test_lease_change_is_reported(docker, subnet_file):
    pid = docker.ok("IpamDriver.RequestPool", {})["PoolID"]
    write_subnet_env(subnet_file, lease="10.5.77.0/24")
    err = docker.fails("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""}, 409)
    assert "10.5.77.0/24" in err and HOW_TO in err


def test_concurrent_requests_get_distinct_addresses(docker):
    pid = docker.ok("IpamDriver.RequestPool", {})["PoolID"]
    results, errors = [], []

    def worker():
        client = DockerSide(docker.app)
        for _ in range(10):
            status, reply = client.call("IpamDriver.RequestAddress", {"PoolID": pid, "Address": ""})
            (results if status == 200 else errors).append(reply)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r["Address"] for r in results}) == 60


# --- networks ------------------------------------------------------------------------------------------------------

def test_create_network_makes_the_bridge(docker):
    net = docker.create_network()
    br = link(net["bridge"])
    assert br == {**br, "kind": "bridge", "up": True, "mtu": FLANNEL_MTU, "ipv4": ["10.5.34.1/24"]}
    assert ip_forward() == "1"
    docker.ok("NetworkDriver.CreateNetwork", network_request(net["id"]))  # repeated: same answer
    assert our_links() == [net["bridge"]]
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert link(net["bridge"]) is None
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})  # repeated
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": new_id()})   # unknown


def test_ip_forward_is_only_touched_in_our_namespace(tmp_path):
    from pyflannel.driver.api import create_app
    from tests.driver_support import throwaway_netns
    root_value = ip_forward()
    with throwaway_netns():
        DockerSide(create_app(str(tmp_path / "state"), write_subnet_env(tmp_path / "subnet.env"))).create_network()
        assert ip_forward() == "1"
    assert ip_forward() == root_value


def test_network_from_another_ipam_driver_needs_the_lease(docker):
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), pool="172.18.0.0/16",
                                                                      gateway="172.18.0.1/16"), 409)
    assert HOW_TO in err and "10.5.34.0/24" in err
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), gateway="10.5.34.254/24"), 409)
    assert "without --gateway" in err
    assert our_links() == []
    net_id = new_id()
    docker.ok("NetworkDriver.CreateNetwork", network_request(net_id, gateway=None))  # default IPAM, --subnet=lease
    assert link("pfl-" + net_id[:8])["ipv4"] == ["10.5.34.1/24"]


@pytest.mark.parametrize("options, words", [
    ({"com.docker.network.enable_ipv6": True}, "IPv6"),
    ({"com.docker.network.enable_ipv4": False}, "IPv4"),
])
def test_unsupported_network_kinds_are_refused(docker, options, words):
    assert words in docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), **options), 409)
    body = network_request(new_id())
    body["IPv4Data"] = []
    assert "exactly one IPv4 pool" in docker.fails("NetworkDriver.CreateNetwork", body, 400)
    assert our_links() == []


def test_second_network_is_refused_and_the_first_unharmed(docker):
    first = docker.create_network()
    ep = docker.run_container(first)
    # docker network create #2 starts with RequestPool: refused there (answering the same pool again would make
    # dockerd loop, its bridge route overlaps the pool), with or without --subnet
    for pool in ("", LEASE):
        err = docker.fails("IpamDriver.RequestPool", {"Pool": pool}, 409)
        assert "already has a Docker network on the default flannel network" in err
        assert first["id"][:12] in err and first["bridge"] in err
    # with another IPAM driver, CreateNetwork refuses it
    err = docker.fails("NetworkDriver.CreateNetwork", network_request(new_id(), gateway=None), 409)
    assert "already has a Docker network on the default flannel network" in err
    # a stray rollback (ReleaseAddress of the gateway, ReleasePool) takes nothing from the first network
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": first["pool_id"], "Address": GATEWAY})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": first["pool_id"]})
    assert link(first["bridge"])["ipv4"] == ["10.5.34.1/24"]
    assert docker.ok("IpamDriver.RequestAddress", {"PoolID": first["pool_id"], "Address": ""})["Address"] != ep["address"]
    assert "in use" in docker.fails("IpamDriver.RequestAddress",
                                    {"PoolID": first["pool_id"], "Address": ep["address"].split("/")[0]}, 409)
    assert our_links() == sorted([first["bridge"], ep["host"], ep["container"]])


def test_pool_overlapping_a_route_is_refused_unless_named(docker):
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("add", ifname="other0", kind="bridge")
        idx = ipr.link_lookup(ifname="other0")[0]
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="10.5.0.0/16", oif=idx)
    err = docker.fails("IpamDriver.RequestPool", {"Pool": ""}, 409)
    assert "10.5.0.0/16 dev other0" in err and "--subnet 10.5.34.0/24" in err
    assert docker.ok("IpamDriver.RequestPool", {"Pool": LEASE})["Pool"] == LEASE  # Docker skips its check then


def test_a_requestpool_loop_is_broken(docker):
    from pyflannel.driver.ipam import POOL_LOOP_LIMIT
    for _ in range(POOL_LOOP_LIMIT):
        docker.ok("IpamDriver.RequestPool", {})
    assert "times in a row" in docker.fails("IpamDriver.RequestPool", {}, 409)
    for _ in range(POOL_LOOP_LIMIT):  # Docker's deferred releases come, and all is normal again
        docker.ok("IpamDriver.ReleasePool", {"PoolID": "pyflannel/10.5.34.0/24"})
    docker.ok("IpamDriver.RequestPool", {})


def test_network_rm_releases_the_pool(docker):
    net = docker.create_network()
    ep = docker.run_container(net)
    docker.stop_container(net, ep)
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": net["pool_id"], "Address": GATEWAY})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": net["pool_id"]})
    assert our_links() == []
    again = docker.create_network()  # a new network can be made now
    assert link(again["bridge"])["ipv4"] == ["10.5.34.1/24"]


# --- MTU -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, expected", [(None, FLANNEL_MTU), ("1400", 1400)])
def test_mtu_is_flannel_mtu_or_the_lower_option(docker, option, expected):
    net = docker.create_network(mtu=option)
    ep = docker.run_container(net)
    assert link(net["bridge"])["mtu"] == expected
    assert link(ep["host"])["mtu"] == expected
    assert link(ep["container"])["mtu"] == expected


def test_an_mtu_above_the_overlays_is_refused_naming_it(docker):
    body = network_request(NID, generic={"com.docker.network.driver.mtu": "9000"})
    err = docker.fails("NetworkDriver.CreateNetwork", body, 409)
    assert "mtu=9000 is above this overlay's MTU 1450" in err and "at most 1450" in err
    assert our_links() == []


def test_flannel_mtu_change_reaches_new_containers(docker, subnet_file):
    net = docker.create_network()
    write_subnet_env(subnet_file, mtu=1400)
    ep = docker.run_container(net)
    assert link(ep["container"])["mtu"] == 1400 and link(net["bridge"])["mtu"] == 1400


# --- endpoints -----------------------------------------------------------------------------------------------------

def test_container_lifecycle(docker):
    net = docker.create_network()
    ep = docker.run_container(net)
    mac = "02:42:0a:05:22:02"
    assert ep["address"] == "10.5.34.2/24"
    assert ep["created"] == {"Interface": {"MacAddress": mac}}
    assert ep["joined"] == {"InterfaceName": {"SrcName": ep["container"], "DstPrefix": "eth"},
                            "Gateway": GATEWAY, "GatewayIPv6": "", "DisableGatewayService": False}
    host, cont = link(ep["host"]), link(ep["container"])
    assert host["kind"] == "veth" and host["master"] == net["bridge"] and host["up"]
    assert cont["kind"] == "veth" and cont["mac"] == mac and cont["master"] is None
    assert len(ep["host"]) <= 15 and len(ep["container"]) <= 15 and len(net["bridge"]) <= 15
    info = docker.ok("NetworkDriver.EndpointOperInfo", {"NetworkID": net["id"], "EndpointID": ep["id"]})["Value"]
    assert info["bridge"] == net["bridge"] and info["address"] == ep["address"] and info["joined"] is True
    ref = {"NetworkID": net["id"], "EndpointID": ep["id"]}
    # repeated calls: same answers, no duplicates
    assert docker.ok("NetworkDriver.CreateEndpoint", {**ref, "Interface": {"Address": ep["address"]}}) == ep["created"]
    assert docker.ok("NetworkDriver.Join", {**ref, "SandboxKey": "/x"}) == ep["joined"]
    assert docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": {}}) == {}
    docker.stop_container(net, ep)
    assert link(ep["host"]) is None and link(ep["container"]) is None
    assert our_links() == [net["bridge"]]
    docker.ok("NetworkDriver.Leave", ref)
    docker.ok("NetworkDriver.DeleteEndpoint", ref)
    assert docker.ok("NetworkDriver.EndpointOperInfo", ref) == {"Value": {}}


def test_endpoint_reply_holds_only_fields_docker_left_empty(docker):
    net = docker.create_network()
    mine = "02:aa:bb:cc:dd:ee"
    ep = docker.run_container(net, mac=mine)
    assert ep["created"] == {"Interface": None}
    assert link(ep["container"])["mac"] == mine
    eid = new_id()
    reply = docker.ok("NetworkDriver.CreateEndpoint", {"NetworkID": net["id"], "EndpointID": eid, "Interface": None})
    assert reply == {"Interface": None}
    docker.ok("NetworkDriver.Join", {"NetworkID": net["id"], "EndpointID": eid, "SandboxKey": "/x"})
    info = docker.ok("NetworkDriver.EndpointOperInfo", {"NetworkID": net["id"], "EndpointID": eid})["Value"]
    assert link("pfc-" + eid[:10])["mac"] == info["mac"] and int(info["mac"][:2], 16) & 3 == 2  # unicast, local


def test_endpoint_errors(docker):
    net = docker.create_network()
    unknown = {"NetworkID": new_id(), "EndpointID": new_id()}
    assert "not known to pyflannel" in docker.fails("NetworkDriver.CreateEndpoint",
                                                    {**unknown, "Interface": {"Address": "10.5.34.9/24"}}, 409)
    assert "not known to pyflannel" in docker.fails("NetworkDriver.Join", {**unknown, "NetworkID": net["id"]}, 409)
    ref = {"NetworkID": net["id"], "EndpointID": new_id()}
    assert "not in the network's subnet" in docker.fails("NetworkDriver.CreateEndpoint",
                                                         {**ref, "Interface": {"Address": "10.6.0.9/24"}}, 409)
    assert "gateway" in docker.fails("NetworkDriver.CreateEndpoint", {**ref, "Interface": {"Address": "10.5.34.1/24"}}, 409)
    # unknown endpoints: Leave / DeleteEndpoint succeed (Docker cleans up stale sandboxes with them)
    docker.ok("NetworkDriver.Leave", unknown)
    docker.ok("NetworkDriver.DeleteEndpoint", unknown)
    assert our_links() == [net["bridge"]]


def nat_rules() -> str:
    return subprocess.run(["iptables", "-w", "5", "-t", "nat", "-S"], capture_output=True, text=True).stdout


def test_published_ports_and_egress_nat_are_iptables_rules_that_go_with_them(docker):
    net = docker.create_network()
    assert "-A PYFLANNEL-NAT-OUT -s 10.5.34.0/24 ! -d 10.5.0.0/16 -j MASQUERADE" in nat_rules()
    ep = docker.run_container(net)
    ip = ep["address"].split("/")[0]
    ref = {"NetworkID": net["id"], "EndpointID": ep["id"]}
    ports = {"com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080},
                                            {"Proto": 17, "Port": 53, "HostIP": "127.0.0.1", "HostPort": 5353}],
             "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}]}
    docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": ports})
    docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": ports})  # repeated: no duplicate
    rules = nat_rules()
    assert rules.count(f"-A PYFLANNEL-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination {ip}:80") == 1
    assert f"-A PYFLANNEL-PORTS -d 127.0.0.1/32 -p udp -m udp --dport 5353 -j DNAT --to-destination {ip}:53" in rules
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j PYFLANNEL-PORTS" in rules
    other = docker.run_container(net)
    err = docker.fails("NetworkDriver.ProgramExternalConnectivity",
                       {"NetworkID": net["id"], "EndpointID": other["id"], "Options": ports}, 409)
    assert "cannot publish port 80/tcp on 0.0.0.0:8080/tcp: the port is published already" in err
    docker.stop_container(net, ep)
    assert "--dport 8080" not in nat_rules()
    docker.stop_container(net, other)
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert "PYFLANNEL-NAT-OUT -s" not in nat_rules()


def test_swarm_and_discovery_calls_are_harmless(docker):
    for method in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete", "NetworkDriver.FreeNetwork"):
        assert docker.ok(method, {"DiscoveryType": 1, "DiscoveryData": {}}) == {}
    assert docker.ok("NetworkDriver.AllocateNetwork", {"NetworkID": NID}) == {"Options": {}}


def test_delete_network_sweeps_leftover_endpoints(docker):
    net = docker.create_network()
    eps = [docker.run_container(net) for _ in range(3)]
    assert len(our_links()) == 7
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert our_links() == []
    for ep in eps:  # Docker's late cleanup finds nothing and is fine with that
        docker.ok("NetworkDriver.Leave", {"NetworkID": net["id"], "EndpointID": ep["id"]})
        docker.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": net["id"], "EndpointID": ep["id"]})


# --- firewall defaults ---------------------------------------------------------------------------------------------

def iptables(*args):
    import subprocess
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)


@pytest.mark.skipif(not __import__("shutil").which("iptables"), reason="iptables not installed")
def test_forward_drop_policy_gets_accept_rules_for_the_bridge(docker):
    assert iptables("-P", "FORWARD", "DROP").returncode == 0  # only in the test's namespace
    net = docker.create_network()
    rules = iptables("-S", "FORWARD").stdout.splitlines()
    assert f"-A FORWARD -i {net['bridge']} -j ACCEPT" in rules
    assert f"-A FORWARD -o {net['bridge']} -j ACCEPT" in rules
    docker.ok("NetworkDriver.CreateNetwork", network_request(net["id"]))  # repeated: no duplicate rules
    assert len([r for r in iptables("-S", "FORWARD").stdout.splitlines() if net["bridge"] in r]) == 2
    docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": net["id"]})
    assert iptables("-S", "FORWARD").stdout.splitlines() == ["-P FORWARD DROP", "-A FORWARD -j PYFLANNEL-ISOLATION"]


@pytest.mark.skipif(not __import__("shutil").which("iptables"), reason="iptables not installed")
def test_forward_accept_policy_adds_no_rules(docker):
    docker.create_network()
    assert iptables("-S", "FORWARD").stdout.splitlines() == ["-P FORWARD ACCEPT", "-A FORWARD -j PYFLANNEL-ISOLATION"]
