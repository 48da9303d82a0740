"""The driver's kernel plumbing: its names for things, on top of pyflannel.kernel.

    host namespace                                               container sandbox (Docker's doing)
    pfl-<net id[:8]>   bridge, FLANNEL_SUBNET (10.5.34.1/24), up
      └─ pfv-<ep id[:10]>  veth host end, on the bridge, up  ──── pfc-<ep id[:10]> → moved + renamed eth0 by Docker

Traffic to other hosts' subnets leaves the bridge through the host's routing table (pyflanneld's routes via
flannel.1 or host-gw); kernel.forwarding lets it through (ip_forward, FORWARD accept rules where the policy is DROP).

Names: bridge 12 characters, veth ends 14 (the kernel allows 15). The prefixes mark interfaces as ours; at startup
the driver deletes any of them its state does not know (see network.NetworkDriver.reconcile). Plumbing is the seam
NetworkDriver and Ipam call, so a test can hand them another; a KernelError leaves it as a PlumbingError (500).
"""
from __future__ import annotations

import ipaddress

from pyflannel.kernel import forwarding, links
from pyflannel.kernel.errors import reraised_as

from .errors import PlumbingError

BRIDGE_PREFIX = "pfl-"
VETH_HOST_PREFIX = "pfv-"
VETH_CONTAINER_PREFIX = "pfc-"
OUR_PREFIXES = (BRIDGE_PREFIX, VETH_HOST_PREFIX, VETH_CONTAINER_PREFIX)


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + network_id[:8]


def veth_names(endpoint_id: str) -> tuple[str, str]:
    return VETH_HOST_PREFIX + endpoint_id[:10], VETH_CONTAINER_PREFIX + endpoint_id[:10]


_as_plumbing_error = reraised_as(lambda fn, e: PlumbingError(str(e)))


class Plumbing:
    def __init__(self, proc_sys: str = forwarding.PROC_SYS):
        self.proc_sys = proc_sys

    @staticmethod
    def links() -> dict[str, dict]:
        """Our interfaces in this namespace: name -> {index, kind, mtu, master, up, mac}."""
        return links.with_prefix(OUR_PREFIXES)

    @staticmethod
    def routes_overlapping(network: ipaddress.IPv4Network) -> list[str]:
        return links.routes_overlapping(network)

    @_as_plumbing_error
    def ensure_bridge(self, name: str, gateway: ipaddress.IPv4Interface, mtu: int) -> None:
        """Create or repair the bridge (kind, gateway address only, MTU, up); then forwarding through it."""
        links.ensure_bridge(name, gateway, mtu)
        forwarding.allow(name, self.proc_sys)

    @_as_plumbing_error
    def delete_bridge(self, name: str) -> None:
        links.delete(name)
        forwarding.revoke(name)

    @staticmethod
    @_as_plumbing_error
    def delete_link(name: str) -> bool:
        return links.delete(name)

    @staticmethod
    @_as_plumbing_error
    def ensure_veth(host: str, container: str, bridge: str, mtu: int, mac: str) -> None:
        links.ensure_veth(host, container, bridge, mtu, mac)

    @staticmethod
    @_as_plumbing_error
    def delete_veth(host: str, container: str) -> None:
        """Deleting either end deletes the pair, wherever the other end is."""
        links.delete(host)
        links.delete(container)

    @staticmethod
    def forwarding_bridges() -> set[str]:
        """Bridges of ours that have FORWARD rules (to find rules whose bridge is gone)."""
        return forwarding.bridges_allowed(BRIDGE_PREFIX)

    @staticmethod
    def remove_forwarding(bridge: str) -> None:
        forwarding.revoke(bridge)
