"""Helpers for the driver tests: a throwaway network namespace for the test thread, kernel inspection, a client.

The driver creates bridges and veth pairs in the namespace of the calling thread, so every test that builds the app
first moves the test thread into a fresh namespace (pyroute2 pushns) and back out afterwards; the namespace is
removed in the fixture's finalizer, also when the test fails. Nothing is ever created in the root namespace: the
fixture refuses to yield if the move did not happen.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pyflannel import paths, subnetenv

ROOT_NETNS = os.readlink("/proc/thread-self/ns/net")
LEASE = "10.5.34.0/24"
NETWORK = "10.5.0.0/16"
GATEWAY = "10.5.34.1"
LEASE6 = "fd00:5:0:27::/64"       # the IPv6 lease of a dual-stack (or IPv6-only) network
NETWORK6 = "fd00:5::/48"
GATEWAY6 = "fd00:5:0:27::1"
FLANNEL_MTU = 1450
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"


def new_id(tag: str = "") -> str:
    """A Docker-like 64-hex-digit id."""
    return (tag.encode().hex() + uuid.uuid4().hex + uuid.uuid4().hex)[:64]


def current_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@contextlib.contextmanager
def throwaway_netns(tag: str = "drv"):
    """Create a namespace, move this thread into it, and always come back and remove it."""
    name = f"pfltest-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pr_netns.create(name)
    pushed = False
    try:
        pr_netns.pushns(name)
        pushed = True
        if current_netns() == ROOT_NETNS:
            raise RuntimeError("refusing to run driver tests: still in the root network namespace")
        yield name
    finally:
        if pushed:
            pr_netns.popns()
        pr_netns.remove(name)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def write_subnet_env(path, lease: str | None = LEASE, mtu: int = FLANNEL_MTU, lease6: str | None = None) -> str:
    """subnet.env as pyflanneld writes it: IPv4 `lease`, and the IPv6 `lease6` of a dual-stack network (`lease`
    None: an IPv6-only network)."""
    subnetenv.write(str(path), subnetenv.for_lease(NETWORK, lease, mtu, True, NETWORK6, lease6))
    return str(path)


# --- kernel inspection (in the current thread's namespace) ---------------------------------------------------------

def link(name: str) -> dict | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        msg = ipr.get_links(found[0])[0]
        master = msg.get("master")
        master_name = ipr.get_links(master)[0].get("ifname") if master else None
        return {"kind": msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"), "mtu": msg.get("mtu"),
                "mac": msg.get("address"), "up": bool(msg["flags"] & 1), "master": master_name,
                "ipv4": sorted(f"{a.get('address')}/{a['prefixlen']}"
                               for a in ipr.get_addr(index=found[0], family=socket.AF_INET)),
                "ipv6": sorted(f"{a.get('address')}/{a['prefixlen']}" + (" nodad" if a["flags"] & 0x02 else "")
                               for a in ipr.get_addr(index=found[0], family=socket.AF_INET6) if a["scope"] == 0)}


def our_links() -> list[str]:
    with IPRoute() as ipr:
        return sorted(l.get("ifname") for l in ipr.get_links() if l.get("ifname").startswith(("pfl-", "pfv-", "pfc-")))


def ip_forward() -> str:
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        return f.read().strip()


# --- a client speaking Docker's dialect ----------------------------------------------------------------------------

class DockerSide:
    """Calls the Flask app the way Docker does: POST, no Content-Type, JSON body (or none)."""

    def __init__(self, app):
        self.app = app
        self.client = app.test_client()

    def raw(self, method: str, data: bytes = b"", http_method: str = "POST"):
        resp = self.client.open("/" + method, method=http_method, data=data,
                                headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        assert resp.content_type == CONTENT_TYPE, resp.data
        return resp.status_code, json.loads(resp.data)

    def call(self, method: str, body=None):
        return self.raw(method, b"" if body is None else json.dumps(body).encode())

    def ok(self, method: str, body=None) -> dict:
        status, reply = self.call(method, body)
        assert status == 200 and not reply.get("Err"), (method, status, reply)
        return reply

    def fails(self, method: str, body=None, status: int | None = None) -> str:
        got, reply = self.call(method, body)
        assert got != 200 and reply.get("Err"), (method, got, reply)
        if status is not None:
            assert got == status, (method, got, reply)
        if method.startswith("IpamDriver."):
            assert reply.get("Error") == reply["Err"]
        assert "Traceback" not in reply["Err"]
        return reply["Err"]

    # Docker's call sequences -----------------------------------------------------------------------------------

    def request_pool(self, ipam_options: dict | None = None, v6: bool = False) -> tuple[dict, dict]:
        """RequestPool, then the gateway's RequestAddress (as dockerd 20.10 does): (pool reply, gateway reply)."""
        pool = self.ok("IpamDriver.RequestPool", {"AddressSpace": "pyflannel-local", "Pool": "", "SubPool": "",
                                                 "Options": ipam_options or {}, "V6": v6})
        gw = self.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                  "Options": {"RequestAddressType": "com.docker.network.gateway"}})
        return pool, gw

    def create_network(self, network_id: str | None = None, mtu: str | None = None,
                       ipam_options: dict | None = None, ipv6: bool = False, **options) -> dict:
        """`docker network create -d pyflannel --ipam-driver pyflannel [--ipv6] [-o mtu] [--ipam-opt K=V]`: pools,
        gateways, CreateNetwork (`options`: its further Options, e.g. com.docker.network.internal)."""
        network_id = network_id or new_id("n")
        pool, gw = self.request_pool(ipam_options)
        pool6, gw6 = self.request_pool(ipam_options, v6=True) if ipv6 else ({}, {})
        generic = {"com.docker.network.driver.mtu": mtu} if mtu else {}
        self.ok("NetworkDriver.CreateNetwork", network_request(
            network_id, gateway=gw["Address"], generic=generic, pool=pool["Pool"],
            ipv6=(pool6["Pool"], gw6["Address"]) if ipv6 else None, **options))
        return {"id": network_id, "pool_id": pool["PoolID"], "bridge": "pfl-" + network_id[:8],
                "pool_id6": pool6.get("PoolID")}

    def run_container(self, net: dict, endpoint_id: str | None = None, mac: str = "", ip6: str = "") -> dict:
        """`docker run --network X [--ip6 A]`: RequestAddress (for each pool of the network), CreateEndpoint,
        Join."""
        endpoint_id = endpoint_id or new_id("e")
        addr = self.ok("IpamDriver.RequestAddress", {"PoolID": net["pool_id"], "Address": "", "Options": {}})
        addr6 = self.ok("IpamDriver.RequestAddress", {"PoolID": net["pool_id6"], "Address": ip6, "Options": {}}) \
            if net.get("pool_id6") else {"Address": ""}
        created = self.ok("NetworkDriver.CreateEndpoint", {
            "NetworkID": net["id"], "EndpointID": endpoint_id, "Options": {},
            "Interface": {"Address": addr["Address"], "AddressIPv6": addr6["Address"], "MacAddress": mac}})
        joined = self.ok("NetworkDriver.Join", {"NetworkID": net["id"], "EndpointID": endpoint_id,
                                               "SandboxKey": f"/var/run/docker/netns/{endpoint_id[:12]}",
                                               "Options": {}})
        return {"id": endpoint_id, "address": addr["Address"], "address6": addr6["Address"], "created": created,
                "joined": joined, "host": "pfv-" + endpoint_id[:10], "container": "pfc-" + endpoint_id[:10]}

    def stop_container(self, net: dict, ep: dict) -> None:
        ref = {"NetworkID": net["id"], "EndpointID": ep["id"]}
        self.ok("NetworkDriver.RevokeExternalConnectivity", ref)
        self.ok("NetworkDriver.Leave", ref)
        self.ok("NetworkDriver.DeleteEndpoint", ref)
        self.ok("IpamDriver.ReleaseAddress", {"PoolID": net["pool_id"], "Address": ep["address"].split("/")[0]})
        if ep.get("address6"):
            self.ok("IpamDriver.ReleaseAddress", {"PoolID": net["pool_id6"], "Address": ep["address6"].split("/")[0]})


def network_request(network_id: str, pool: str = LEASE, gateway: str | None = GATEWAY + "/24",
                    generic: dict | None = None, ipv6: tuple[str, str | None] | None = None, **options) -> dict:
    """CreateNetwork's body; `ipv6`: (pool, gateway or None) of --ipv6."""
    ipv4 = {"AddressSpace": "pyflannel-local", "Pool": pool, "AuxAddresses": {}}
    if gateway is not None:
        ipv4["Gateway"] = gateway
    ipv6_data = []
    if ipv6 is not None:
        ipv6_data = [{"AddressSpace": "pyflannel-local", "Pool": ipv6[0], "AuxAddresses": {}}]
        if ipv6[1] is not None:
            ipv6_data[0]["Gateway"] = ipv6[1]
    opts = {"com.docker.network.generic": generic or {}, "com.docker.network.enable_ipv6": ipv6 is not None}
    opts.update(options)
    return {"NetworkID": network_id, "Options": opts, "IPv4Data": [ipv4], "IPv6Data": ipv6_data}


class FakeDaemon:
    """pyflanneld's side of the local API (its real server, pyflannel/daemon/api.py) over a fake: a join writes the
    named network's subnet.env, as pyflanneld does (with the IPv6 lease `lease6` too once a join asked for IPv6: a
    dual-stack network); joins' IPv6 asks and leaves are recorded."""

    def __init__(self, subnet_file, lease6: str | None = None):
        self.subnet_file, self.lease6 = str(subnet_file), lease6
        self.left: list[str] = []
        self.backends: list[str | None] = []
        self.ipv6: list[bool] = []

    def join(self, name: str, network: str | None, backend: str | None = None, ipv6: bool = False) -> dict:
        self.backends.append(backend)
        self.ipv6.append(ipv6)
        write_subnet_env(paths.network_env_file(self.subnet_file, name), lease="10.60.3.0/24",
                         lease6=self.lease6 if any(self.ipv6) else None)
        return {"name": name}

    def leave(self, name: str) -> dict:
        self.left.append(name)
        return {}

    def describe(self) -> list:
        return []


# --- fixtures (imported by the test modules) -----------------------------------------------------------------------

@pytest.fixture
def netns_name():
    with throwaway_netns() as name:
        yield name


@pytest.fixture
def subnet_file(tmp_path):
    return write_subnet_env(tmp_path / "subnet.env")


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def docker(netns_name, subnet_file, state_dir):
    """The driver app inside a throwaway namespace, and a Docker-like client for it."""
    from pyflannel.driver.api import create_app
    return DockerSide(create_app(state_dir, subnet_file))
