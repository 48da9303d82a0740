"""Subnet arithmetic and flannel's key names."""
import ipaddress
import random

import pytest

from pyflannel.daemon.subnets import candidates, lease_key, parse_lease_key, pick_free

pytestmark = pytest.mark.unit

N = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network


def test_lease_key_round_trip():
    assert lease_key(N("10.5.34.0/24")) == "10.5.34.0-24"
    assert parse_lease_key("/coreos.com/network/subnets/10.5.34.0-24") == (N("10.5.34.0/24"), None)
    for junk in ("config", "10.5.34.0", "10.5.34.0-x", "10.5.34.7-24", "999.1.1.0-24", "10.5.34.0-24&fd00::1-64",
                 "10.5.34.0-24&", "10.5.34.0-24&10.6.0.0-24"):
        assert parse_lease_key(junk) is None


def test_dual_stack_key_is_flannels():
    """flannel's MakeSubnetKey: the IPv6 subnet after '&', its address in RFC 5952 form."""
    key = lease_key(N("10.5.19.0/24"), N6("fd00:0005:0000:0027:0000::/64"))
    assert key == "10.5.19.0-24&fd00:5:0:27::-64"
    assert parse_lease_key(f"/coreos.com/network/subnets/{key}") == (N("10.5.19.0/24"), N6("fd00:5:0:27::/64"))


def test_ipv6_candidates_and_pick():
    low, high = N6("fd00:5:0:1::/64"), N6("fd00:5:0:ffff::/64")
    assert list(candidates(low, N6("fd00:5:0:3::/64"))) == [N6(f"fd00:5:0:{i}::/64") for i in (1, 2, 3)]
    picks = {pick_free(low, high, [N6("fd00:5:0:1::/64")], random.Random(s)) for s in range(50)}
    assert N6("fd00:5:0:1::/64") not in picks and all(p.subnet_of(N6("fd00:5:0:0::/57")) for p in picks)


def test_candidates_cover_min_to_max():
    subnets = list(candidates(N("10.5.1.0/24"), N("10.5.4.0/24")))
    assert subnets == [N(f"10.5.{i}.0/24") for i in range(1, 5)]


def test_pick_free_skips_taken_and_is_random_among_the_first_hundred():
    taken = [N("10.5.1.0/24"), N("10.5.3.0/24")]
    picks = {pick_free(N("10.5.1.0/24"), N("10.5.4.0/24"), taken, random.Random(seed)) for seed in range(40)}
    assert picks == {N("10.5.2.0/24"), N("10.5.4.0/24")}
    far = {pick_free(N("10.5.1.0/24"), N("10.5.255.0/24"), [], random.Random(s)) for s in range(200)}
    assert max(int(s.network_address) for s in far) <= int(N("10.5.100.0/24").network_address)


def test_pick_free_when_full():
    assert pick_free(N("10.5.1.0/24"), N("10.5.2.0/24"), [N("10.5.1.0/24"), N("10.5.2.0/24")]) is None
