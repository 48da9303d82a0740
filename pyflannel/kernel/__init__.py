"""The kernel, as pyflannel's programs see it: the one home of kernel access that the daemon, the Docker driver,
the CNI plugin and doctor share.

    errors.py      KernelError: what the kernel or iptables refused, named; each program maps it to its own errors
    iptables.py    the one iptables runner (argv lists, -w, one timeout) and rule helpers
    links.py       links by name, the one home of link operations: bridges, veth pairs, VXLAN devices, addresses,
                   deletion, checksum offload, MACs (on pyflanneld's socket, or on one of their own)
    forwarding.py  forwarding through a bridge: IPv4/IPv6 forwarding, FORWARD accept rules, route_localnet, IPv6
                   on a link
    namespaces.py  network namespaces: open one, netlink inside one
    ports.py       whether a host port is free
    entries.py     the overlay's entries as values (Neighbor, FdbEntry, Route, Change) and their marks (proto 77)
    netlink.py     the overlay's entries in the kernel: routes, blackholes, neighbours, FDB; batched changes, a
                   monitor of deletions (pyflanneld's Kernel, its link methods `links`'; read by doctor and status)
    encoding.py    the batches' requests: one pyroute2 encoding per shape, copied and patched
    wireguard.py   WireGuard devices and peers: the kernel module, or wireguard-go over its UAPI socket

pyroute2 is imported module by module (`pyroute2.iproute`, `pyroute2.netlink...`), never through its package
`__init__`, which loads every subsystem it has (NDB, IPDB, conntrack, nl80211, ...: import time and memory that
none of pyflannel's programs use, docs/benchmarks.md); see `_light_pyroute2`. Importing this package
imports pyroute2.iproute, without the unittest package that it would load (`_pyroute2_without_unittest`).
"""
import importlib
import importlib.util
import sys

from pyflannel.imports import deferred, standing_in


def _light_pyroute2() -> None:
    """Register the pyroute2 package without running its `__init__`, so that importing a submodule loads only that
    submodule. A name only the full `__init__` defines (`from pyroute2 import NDB`, by code other than ours) runs
    it then, so nothing that expects the whole package breaks."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError:
            pass
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules["pyroute2"] = package


_light_pyroute2()


def _pyroute2_without_unittest() -> None:
    """pyroute2's iprsocket module does `from unittest import mock` and makes a `mock.Mock()` at class definition,
    for its select-based IPRSocket, which pyflannel never uses: the unittest package would cost every program
    memory. pyroute2.iproute is imported with stand-ins for both (pyflannel.imports)."""
    if "unittest" in sys.modules:
        return
    with (standing_in("unittest", deferred("unittest")),
          standing_in("unittest.mock", deferred("unittest.mock", instances=("Mock",)))):
        importlib.import_module("pyroute2.iproute")


_pyroute2_without_unittest()
