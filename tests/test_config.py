"""Network config: flannel's defaults and rules; every error names the field and the value."""
import ipaddress

import pytest

from pyflannel.daemon.config import parse
from pyflannel.daemon.errors import ConfigError

pytestmark = pytest.mark.unit

N = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network


def test_defaults_follow_flannel():
    c = parse('{"Network": "10.5.0.0/16"}')
    assert c.subnet_len == 24
    assert c.subnet_min == N("10.5.1.0/24")  # the first subnet is skipped
    assert c.subnet_max == N("10.5.255.0/24")
    assert c.backend_type == "vxlan" and c.vni == 1 and c.port == 8472 and not c.direct_routing


@pytest.mark.parametrize("network,subnet_len", [("10.0.0.0/22", 24), ("10.0.0.0/23", 25), ("10.0.0.0/28", 30)])
def test_default_subnet_len_by_network_size(network, subnet_len):
    assert parse(f'{{"Network": "{network}"}}').subnet_len == subnet_len


def test_explicit_values_and_backend_options():
    c = parse('{"Network": "10.5.0.0/16", "SubnetLen": 26, "SubnetMin": "10.5.1.64", "SubnetMax": "10.5.2.0",'
              ' "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789, "DirectRouting": true}}')
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (26, N("10.5.1.64/26"), N("10.5.2.0/26"))
    assert (c.vni, c.port, c.direct_routing) == (42, 4789, True)
    assert parse('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}').backend_type == "host-gw"


@pytest.mark.parametrize("text,field,fragment", [
    ('not json', "config", "not valid JSON"),
    ('[1]', "config", "JSON object"),
    ('{}', "Network", "missing"),
    ('{"Network": "10.5.0.300/16"}', "Network", "not an IPv4 network"),
    ('{"Network": "10.5.0.0/30"}', "Network", "too small"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "SubnetLen", "/30 or shorter"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 17}', "SubnetLen", "four subnets"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "SubnetLen", "whole number"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"}', "SubnetMin", "not inside Network"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.7"}', "SubnetMin", "boundary"),
    ('{"Network": "10.5.0.0/16", "SubnetMax": "nope"}', "SubnetMax", "not an IPv4 address"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.2.0"}', "SubnetMin", "above"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}', "Backend.Type", "unsupported"),
    ('{"Network": "10.5.0.0/16", "Backend": "vxlan"}', "Backend", "must be an object"),
    ('{"Network": "10.5.0.0/16", "Backend": {"VNI": 0}}', "Backend.VNI", "from 1"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Port": 70000}}', "Backend.Port", "65535"),
    ('{"Network": "10.5.0.0/16", "Backend": {"DirectRouting": "yes"}}', "Backend.DirectRouting", "true or false"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "IPv6Network", "missing"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": "yes", "IPv6Network": "fd00:5::/48"}', "EnableIPv6", "true or false"),
    ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:5::/48"}', "Network", "lease keys"),
    ('{"Network": "10.5.0.0/16", "EnableIPv4": false}', "EnableIPv4", "no addresses"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "10.6.0.0/16"}', "IPv6Network", "not an IPv6"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/126"}', "IPv6Network", "too small"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "IPv6SubnetLen": 127}',
     "IPv6SubnetLen", "/126 or shorter"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "IPv6SubnetLen": 49}',
     "IPv6SubnetLen", "four subnets"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "IPv6SubnetMin": "fd00:6::"}',
     "IPv6SubnetMin", "not inside IPv6Network"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "IPv6SubnetMax": "fd00:5::1"}',
     "IPv6SubnetMax", "boundary"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "IPv6SubnetMin": "10.5.1.0"}',
     "IPv6SubnetMin", "not an IPv6 address"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48", "Backend": {"Type": '
     '"wireguard"}}', "EnableIPv6", "vxlan or host-gw"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "PSK": "secret"}}', "Backend.PSK", "base64"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "Mode": "ipv6"}}', "Backend.Mode", "IPv6"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "ListenPort": 0}}', "Backend.ListenPort", "from 1"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "MTU": 500}}', "Backend.MTU", "from 1280"),
])
def test_invalid_config_names_the_field(text, field, fragment):
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.field == field
    assert f"{field}=" in str(e.value) and fragment in str(e.value)


def test_ipv6_keys_and_defaults_follow_flannel():
    c = parse('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/48"}')
    assert c.enable_ipv4 and c.ipv6.network == N6("fd00:5::/48") and c.ipv6.subnet_len == 64
    assert c.ipv6.subnet_min == N6("fd00:5:0:1::/64")  # the first subnet is skipped, as for IPv4
    assert c.ipv6.subnet_max == N6("fd00:5:0:ffff::/64")
    assert parse('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/64"}').ipv6.subnet_len == 66
    c = parse('{"Network": "10.5.0.0/16", "EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:5::/48", '
              '"IPv6SubnetLen": 56, "IPv6SubnetMin": "fd00:5:0:100::", "IPv6SubnetMax": "fd00:5:0:200::"}')
    assert not c.enable_ipv4 and (c.ipv6.subnet_len, c.ipv6.subnet_min, c.ipv6.subnet_max) == (
        56, N6("fd00:5:0:100::/56"), N6("fd00:5:0:200::/56"))
    assert parse('{"Network": "10.5.0.0/16"}').ipv6 is None


def test_wireguard_keys_and_defaults_follow_flannel():
    c = parse('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard"}}')
    assert c.backend_type == "wireguard"
    assert (c.wireguard.listen_port, c.wireguard.psk, c.wireguard.keepalive, c.wireguard.mtu) == (51820, None, 0, None)
    psk = "A" * 43 + "="
    c = parse('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", "ListenPort": 51000, "PSK": "%s", '
              '"PersistentKeepaliveInterval": 25, "MTU": 9000, "Mode": "auto"}}' % psk)
    assert (c.wireguard.listen_port, c.wireguard.psk, c.wireguard.keepalive, c.wireguard.mtu) == (51000, psk, 25, 9000)
    assert "secret" not in str(ConfigError("Backend.PSK", "(hidden)", "x"))  # a bad PSK is never echoed
