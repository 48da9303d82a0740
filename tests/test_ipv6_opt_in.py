"""Issue 28, item 5: no lease a flanneld cannot read. A lease without IPv6 has no PublicIPv6 key; a named network is
IPv4-only unless IPv6 is asked for (at creation, or added later while one host serves it); `pyflannel doctor` names a
network that carries IPv6 over an IPv4 underlay when a host that cannot do IPv6 (a flanneld) is in it."""
from __future__ import annotations

import ipaddress
import json

import pytest

from pyflannel import doctor
from pyflannel.daemon.catalog import Catalog, NetworkConflict
from pyflannel.daemon.config import parse
from pyflannel.daemon.errors import UserError
from pyflannel.daemon.model.lease import Lease
from pyflannel.daemon.store.base import ConfigNotFound
from pyflannel.driver.api import create_app
from tests.driver_support import DockerSide, FakeDaemon, write_subnet_env
from tests.fakes import FakePlumbing, MemoryStore

pytestmark = pytest.mark.unit

N, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
DATA = {"VNI": 2, "VtepMAC": "02:00:00:00:00:11"}


# --- the lease's value ----------------------------------------------------------------------------------------------

def test_an_ipv4_lease_has_no_public_ipv6_key_and_a_dual_stack_one_has_it():
    v4 = Lease(N("10.5.34.0/24"), "192.0.2.11", "vxlan", DATA)
    assert v4.attrs_json() == '{"PublicIP":"192.0.2.11","BackendType":"vxlan","BackendData":' \
                              '{"VNI":2,"VtepMAC":"02:00:00:00:00:11"}}'
    dual = Lease(N("10.5.34.0/24"), "192.0.2.11", "vxlan", DATA, ipv6_subnet=N6("fd00:5:0:22::/64"),
                 public_ipv6="2001:db8::11", backend_v6_data=DATA)
    assert list(json.loads(dual.attrs_json())) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData",
                                                   "BackendV6Data"]
    # IPv6 over an IPv4 underlay (pyflannel only): BackendV6Data without PublicIPv6, never a null one
    over_v4 = Lease(N("10.5.34.0/24"), "192.0.2.11", "vxlan", DATA, ipv6_subnet=N6("fd00:5:0:22::/64"),
                    backend_v6_data=DATA)
    assert list(json.loads(over_v4.attrs_json())) == ["PublicIP", "BackendType", "BackendData", "BackendV6Data"]


def test_flannels_null_public_ipv6_is_read_and_rewritten_without_it():
    flannels = '{"PublicIP":"192.0.2.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1}}'
    lease = Lease.from_attrs(N("10.5.35.0/24"), flannels, None)
    assert lease.public_ipv6 is None and lease.extra == {}
    assert lease.attrs_json() == '{"PublicIP":"192.0.2.12","BackendType":"vxlan","BackendData":{"VNI":1}}'


# --- the catalog: IPv6 is asked for --------------------------------------------------------------------------------

class Prefix(MemoryStore):
    """The etcd prefix with named networks: `child(NAME)` is <prefix>/NAME, a MemoryStore whose config is its own."""

    def __init__(self):
        super().__init__()
        self.children: dict[str, MemoryStore] = {}

    def child(self, name: str) -> MemoryStore:
        if name not in self.children:
            store = self.children[name] = MemoryStore(config=None)
            store.create_key = lambda key, value, s=store: _create_config(s, key, value)
            store.replace_key = lambda key, value, expected, s=store: _replace_config(s, key, value, expected)
        return self.children[name]

    def named_configs(self) -> dict[str, str]:
        return {name: store.config for name, store in self.children.items() if store.config is not None}


def _create_config(store: MemoryStore, key: str, value: str) -> bool:
    assert key == "config"
    if store.config is not None:
        return False
    store.config = value
    return True


def _replace_config(store: MemoryStore, key: str, value: str, expected: str) -> bool:
    assert key == "config"
    if store.config != expected:
        return False
    store.config = value
    return True


def test_a_new_named_network_is_ipv4_only_unless_ipv6_is_asked_for():
    root = Prefix()
    catalog = Catalog(root, "/coreos.com/network")
    assert json.loads(catalog.config("shop", None, create=True)) == {"Network": "10.128.0.0/16",
                                                                    "Backend": {"Type": "vxlan", "VNI": 2}}
    assert json.loads(catalog.config("crm", None, create=True, ipv6=True)) == {
        "Network": "10.129.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:f1a0::/48",
        "Backend": {"Type": "vxlan", "VNI": 3}}
    assert root.read_key("_pyflannel/network6/fd00:f1a0::-48") == "crm"
    assert json.loads(catalog.config("vpn", None, create=True, backend="wireguard"))["Backend"]["Type"] == "wireguard"
    with pytest.raises(UserError, match="wireguard backend runs over IPv4 only"):
        catalog.config("vpn6", None, create=True, backend="wireguard", ipv6=True)
    assert "vpn6" not in root.named_configs() and root.read_key("_pyflannel/vni/5") is None  # nothing left claimed


def test_ipv6_is_added_while_this_host_alone_serves_the_network_and_refused_under_others():
    root = Prefix()
    catalog = Catalog(root, "/coreos.com/network")
    catalog.config("shop", None, create=True)
    shop = root.child("shop")
    shop.create_lease(Lease(N("10.128.3.0/24"), "192.0.2.11", "vxlan", DATA), 3600)  # this host's own lease
    text = catalog.add_ipv6("shop", "192.0.2.11")
    assert json.loads(text) == {"Network": "10.128.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:f1a0::/48",
                                "Backend": {"Type": "vxlan", "VNI": 2}}
    assert shop.network_config() == text and parse(text).ipv6 is not None
    assert catalog.add_ipv6("shop", "192.0.2.11") == text  # asked again: nothing changes

    catalog.config("crm", None, create=True)
    crm = root.child("crm")
    crm.create_lease(Lease(N("10.129.7.0/24"), "192.0.2.12", "vxlan", DATA), 3600)  # another host serves it
    before = crm.network_config()
    with pytest.raises(NetworkConflict) as refused:
        catalog.add_ipv6("crm", "192.0.2.11")
    message = str(refused.value)
    assert "network crm is IPv4-only in etcd (/coreos.com/network/crm/config)" in message
    assert "host(s) 192.0.2.12 serve it" in message and "--ipv6" in message and '"EnableIPv6": true' in message
    assert crm.network_config() == before and root.read_key("_pyflannel/network6/fd00:f1a0:1::-48") is None

    with pytest.raises(ConfigNotFound):
        catalog.add_ipv6("gone", "192.0.2.11")


def test_ipv6_added_meanwhile_by_another_writer_is_taken_as_it_is():
    root = Prefix()
    catalog = Catalog(root, "/coreos.com/network")
    catalog.config("shop", None, create=True)
    shop = root.child("shop")
    operators = '{"Network": "10.128.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:99::/48", ' \
                '"Backend": {"Type": "vxlan", "VNI": 2}}'
    real_replace = shop.replace_key

    def operator_first(key, value, expected):
        shop.config = operators  # the operator's write lands between our read and our compare-and-swap
        return real_replace(key, value, expected)
    shop.replace_key = operator_first
    assert catalog.add_ipv6("shop", "192.0.2.11") == operators
    assert root.read_key("_pyflannel/network6/fd00:f1a0::-48") is None  # our claim is released


# --- the driver: which RequestPool asks for IPv6 -------------------------------------------------------------------

def test_the_v6_request_pool_or_the_ipam_option_asks_pyflanneld_for_ipv6(tmp_path):
    from pyflannel.daemon.api import serve as serve_api
    subnet_file = write_subnet_env(tmp_path / "subnet.env")
    sock, fake = str(tmp_path / "pyflanneld.sock"), FakeDaemon(subnet_file, "fd00:60:0:3::/64")
    docker = DockerSide(create_app(str(tmp_path / "state"), subnet_file, plumbing=FakePlumbing(),
                                   daemon_socket=sock))
    server = serve_api(fake, sock)
    try:
        docker.request_pool({"pyflannel.network": "shop"})  # docker network create --ipv6: IPv4 first, as plain
        assert fake.ipv6 == [False]
        pool6, _ = docker.request_pool({"pyflannel.network": "shop"}, v6=True)
        assert fake.ipv6 == [False, True] and pool6["Pool"] == "fd00:60:0:3::/64"
        docker.request_pool({"pyflannel.network": "crm", "pyflannel.ipv6": "true"})
        assert fake.ipv6[-1] is True
        for options, words in (({"pyflannel.network": "db", "pyflannel.ipv6": "yes"}, "'yes': use true or false"),
                               ({"pyflannel.ipv6": "true"}, "with --ipam-opt pyflannel.network=NAME")):
            assert words in docker.fails("IpamDriver.RequestPool", {"Pool": "", "Options": options}, 400)
    finally:
        server.shutdown()
        server.server_close()


# --- doctor ---------------------------------------------------------------------------------------------------------

def lease(subnet: str, ip: str, subnet6: str | None = None, ip6: str | None = None) -> Lease:
    return Lease(N(subnet), ip, "vxlan", DATA, ipv6_subnet=N6(subnet6) if subnet6 else None, public_ipv6=ip6,
                 backend_v6_data=DATA if subnet6 else None)


DUAL = parse('{"Network": "10.128.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:f1a0::/48", '
             '"Backend": {"Type": "vxlan", "VNI": 2}}')


def facts(served: dict) -> doctor.Facts:
    return doctor.Facts("/run/flannel/subnet.env", [], "/coreos.com/network", None, served=served)


def test_doctor_names_a_pyflannel_only_network_with_a_host_that_cannot_do_ipv6():
    over_v4 = lease("10.128.1.0/24", "192.0.2.11", "fd00:f1a0:0:1::/64")  # pyflannel: IPv6 inside IPv4
    flanneld = lease("10.128.2.0/24", "192.0.2.13")  # no IPv6 subnet on a dual-stack network: flanneld v0.13
    found = doctor.check_flanneld(facts({"shop": (DUAL, [over_v4, flanneld])}))
    assert len(found) == 1 and found[0].severity == doctor.PROBLEM
    assert found[0].message.startswith("network shop is pyflannel-only: host(s) 192.0.2.11 carry its IPv6 over an "
                                       "IPv4 underlay")
    assert "host(s) 192.0.2.13 hold a lease without an IPv6 subnet" in found[0].message
    assert "remove EnableIPv6 and IPv6Network from /coreos.com/network/shop/config" in found[0].fix

    with_ipv6_underlay = lease("10.128.3.0/24", "192.0.2.12", "fd00:f1a0:0:3::/64", "2001:db8::12")
    ipv4_only = parse('{"Network": "10.5.0.0/16"}')
    for served in ({"shop": (DUAL, [over_v4, with_ipv6_underlay])},  # all can do IPv6
                   {"shop": (DUAL, [with_ipv6_underlay, flanneld])},  # no IPv6 over IPv4: flanneld reads them all
                   {"default": (ipv4_only, [flanneld, lease("10.5.1.0/24", "192.0.2.11")])}):
        assert doctor.check_flanneld(facts(served)) == []
    found = doctor.check_flanneld(facts({"default": (DUAL, [over_v4, flanneld])}))
    assert found[0].message.startswith("the default network is pyflannel-only")
    assert "/coreos.com/network/config" in found[0].fix


def test_a_cni_conflist_asks_for_ipv6_with_ipv6_true():
    from pyflannel.cni import netconf
    from pyflannel.cni.protocol import CniError
    base = {"cniVersion": "1.0.0", "name": "pfnet", "type": "pyflannel"}
    assert netconf.parse({**base, "network": "shop"}).ipv6 is False
    assert netconf.parse({**base, "network": "shop", "ipv6": True}).ipv6 is True
    for extra, words in (({"ipv6": True}, "'ipv6' goes with 'network'"),
                         ({"network": "shop", "ipv6": "yes"}, "'ipv6' must be true or false")):
        with pytest.raises(CniError, match=words):
            netconf.parse({**base, **extra})
