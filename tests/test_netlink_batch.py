"""Kernel.apply: many changes per netlink send, each answered on its own (real kernel, a lab namespace)."""
import errno
import ipaddress

import pytest

from pyflannel.kernel.netlink import BATCH, Change, Kernel, Neighbor, Route
from tests.lab import Lab, inside


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
