"""The one address allocator (pyflannel.addresses) and its three stores: the same sequence whichever store holds
the allocations. Pure logic and files: no root, no namespaces, no etcd."""
import ipaddress

import pytest

from pyflannel.addresses import AddressRange, MemoryStore, RangeError, allocate
from pyflannel.cni.hostlocal import HostLocalStore
from pyflannel.driver.ipam import PoolAllocations

pytestmark = pytest.mark.unit

A = ipaddress.IPv4Address
LEASE = ipaddress.IPv4Network("10.5.34.0/29")  # hosts .1-.6; .1 is the gateway


def hand_out(store, n: int) -> list[str | None]:
    addresses = AddressRange.of(LEASE)
    return [str(ip) if ip else None for ip in (allocate(addresses, store, f"c{i}") for i in range(n))]


def test_round_robin_skips_the_gateway_and_ends_when_full():
    assert hand_out(MemoryStore(), 6) == ["10.5.34.2", "10.5.34.3", "10.5.34.4", "10.5.34.5", "10.5.34.6", None]


def test_a_released_address_is_not_reused_at_once():
    store = MemoryStore()
    addresses = AddressRange.of(LEASE)
    first = allocate(addresses, store)
    store.release(first)
    assert allocate(addresses, store) == A("10.5.34.3")  # the search starts after the address given last
    for _ in range(3):
        allocate(addresses, store)
    assert allocate(addresses, store) == first  # wrapped around to the freed one


def test_the_three_stores_hand_out_the_same_sequence(tmp_path):
    with HostLocalStore(str(tmp_path), "net") as files:
        sequences = [hand_out(MemoryStore(), 6), hand_out(files.range_set(0), 6), hand_out(PoolAllocations(set()), 6)]
    assert sequences[0] == sequences[1] == sequences[2]
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == [
        "10.5.34.2", "10.5.34.3", "10.5.34.4", "10.5.34.5", "10.5.34.6", "last_reserved_ip.0", "lock"]


def test_the_driver_hands_out_the_lowest_free_address_as_dockers_ipam_does():
    """A restarted container gets its address back (Docker 20.10's own IPAM, measured: a container stopped and
    started again keeps its address unless another took it meanwhile, which takes the lowest free one)."""
    taken: set[str] = set()
    addresses = AddressRange.of(LEASE)
    first, second = (allocate(addresses, PoolAllocations(taken)) for _ in range(2))
    taken.discard(str(first))
    assert allocate(addresses, PoolAllocations(taken)) == first and str(second) in taken


@pytest.mark.parametrize("kw, field", [
    ({"start": A("10.5.35.1")}, "start"),
    ({"end": A("10.6.0.1")}, "end"),
    ({"gateway": A("192.0.2.1")}, "gateway"),
])
def test_a_range_outside_its_subnet_is_refused_naming_the_field(kw, field):
    with pytest.raises(RangeError) as e:
        AddressRange.of(LEASE, **kw)
    assert e.value.field == field and "outside the subnet 10.5.34.0/29" in str(e.value)


def test_a_subnet_too_small_is_refused():
    with pytest.raises(RangeError, match="too small"):
        AddressRange.of(ipaddress.IPv4Network("10.5.34.0/31"))
