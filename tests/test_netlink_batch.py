"""Kernel.apply: many changes per netlink send, each answered on its own; the deletion monitor (real kernel, a lab
namespace)."""
import errno
import ipaddress
import random
import threading
import time

import pytest

from pyflannel.kernel.netlink import BATCH, Change, Kernel, Neighbor, Route, watch_deletions
from lab import Lab, inside, wait_until


@pytest.fixture
def host():
    lab = Lab(1, etcd=False)
    try:
        host = lab.hosts[0]
        host.sh("ip", "link", "add", "br-t", "type", "bridge")
        host.sh("ip", "addr", "add", "10.77.0.1/24", "dev", "br-t")
        host.sh("ip", "link", "set", "br-t", "up")
        yield host
    finally:
        lab.close()


def routes(count: int, oif: int) -> list[Route]:
    return [Route(ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.80.0.0")) + 256 * i, 24)), "10.77.0.5", oif)
            for i in range(count)]


@pytest.mark.lab
def test_batches_apply_in_order_and_report_only_real_refusals(host):
    with inside(host.ns):
        kernel = Kernel()
        index = kernel.link_index("br-t")
        wanted = routes(BATCH + 44, index)  # more than one batch
        neighbor = Neighbor(index, "10.77.0.9", "0e:00:00:00:00:09")
        bogus = Route(ipaddress.IPv4Network("10.79.0.0/24"), "10.77.0.5", 9999)  # no such device
        absent = Route(ipaddress.IPv4Network("10.78.0.0/24"), "10.77.0.5", index)  # deleting it is no error
        changes = [Change(True, neighbor), *(Change(True, r) for r in wanted), Change(True, bogus),
                   Change(False, absent)]
        refused = kernel.apply(changes)
        assert [change.entry for change, _ in refused] == [bogus]
        assert refused[0][1].errno in (errno.ENODEV, errno.ENETUNREACH)  # the kernel's own answer, not a timeout
        assert kernel.routes() == set(wanted)
        assert kernel.neighbors(index) == {neighbor}

        assert kernel.apply([Change(False, r) for r in wanted] + [Change(False, neighbor)]) == []
        assert kernel.routes() == set()
        assert kernel.neighbors(index) == set()
    assert "10.80.0.0" not in host.sh("ip", "route", "show", "proto", "77")


@pytest.mark.unit
def test_patched_requests_are_byte_for_byte_pyroute2s():
    """Requests copied from a shape's template and patched equal pyroute2's whole encoding, for every shape."""
    from pyflannel.kernel.encoding import Requests, _encode
    from pyflannel.kernel.entries import FdbEntry
    rng = random.Random(7)

    def ip4():
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))

    def ip6():
        return str(ipaddress.IPv6Address(rng.getrandbits(128)))

    def mac():
        return ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))

    requests = Requests()
    for seq in range(1, 400):
        plen4, plen6 = rng.choice((8, 16, 24, 28, 32)), rng.choice((48, 64, 80, 128))
        entries = [Route(ipaddress.IPv4Network((ip4(), plen4), strict=False), ip4(), rng.randrange(1, 1 << 31),
                         onlink=rng.random() < 0.5),
                   Route(ipaddress.IPv6Network((ip6(), plen6), strict=False), ip6(),
                         rng.randrange(1, 1 << 31), onlink=True),
                   Neighbor(rng.randrange(1, 1 << 31), rng.choice((ip4(), ip6())), mac()),
                   FdbEntry(rng.randrange(1, 1 << 31), mac(), rng.choice((ip4(), ip6())))]
        for entry in entries:
            change = Change(rng.random() < 0.7, entry)
            assert requests.encode(change, seq) == _encode(change, seq), change
    assert all(requests._templates.values()), "every shape is patched, none falls back to whole encoding"


@pytest.mark.lab
def test_the_deletion_monitor_sees_ours_and_not_the_kernels_own_entries(host):
    """The kernel puts IPv6 multicast neighbours (ff02::…, NOARP) on every new device and its neighbour GC deletes
    them a minute later, in every namespace at once: that is no cause for a full diff. Deleting one of ours is."""
    host.sh("ip", "link", "add", "flannel.9", "type", "vxlan", "id", "9", "dstport", "8472", "nolearning")
    host.sh("ip", "link", "set", "flannel.9", "up")
    wait_until("the kernel's own neighbours on flannel.9", lambda: "ff02::" in host.sh(
        "ip", "-6", "neigh", "show", "nud", "all", "dev", "flannel.9"), timeout=10, interval=0.2)
    own = host.sh("ip", "-6", "neigh", "show", "nud", "all", "dev", "flannel.9").split()[0]
    host.sh("ip", "neigh", "add", "10.5.3.0", "lladdr", "0e:00:00:00:00:03", "dev", "flannel.9", "nud", "permanent")
    index = int(host.sh("cat", "/sys/class/net/flannel.9/ifindex"))
    touched, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=lambda: _in(host.ns, watch_deletions, touched, (index,), stop), daemon=True)
    watcher.start()
    time.sleep(0.5)  # subscribed
    host.sh("ip", "-6", "neigh", "del", own, "dev", "flannel.9")
    time.sleep(0.5)
    assert not touched.is_set(), f"the kernel's own {own} read as one of ours"
    host.sh("ip", "neigh", "del", "10.5.3.0", "dev", "flannel.9")
    wait_until("the deletion of ours seen", touched.is_set, timeout=5, interval=0.05)
    stop.set()
    host.sh("ip", "neigh", "add", "10.5.4.0", "lladdr", "0e:00:00:00:00:04", "dev", "flannel.9", "nud", "permanent")
    watcher.join(5)


def _in(ns: str, fn, *args):
    with inside(ns):
        fn(*args)
