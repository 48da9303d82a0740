"""The driver's kernel plumbing: its names for things, on top of pyflannel.kernel.

    host namespace                                               container sandbox (Docker's doing)
    pfl-<net id[:8]>   bridge, FLANNEL_SUBNET (10.5.34.1/24), up; with --ipv6 also FLANNEL_IPV6_SUBNET
                       (fd00:5:0:27::1/64, without DAD)
      └─ pfv-<ep id[:10]>  veth host end, on the bridge, up  ──── pfc-<ep id[:10]> → moved + renamed eth0 by Docker

Traffic to other hosts' subnets leaves the bridge through the host's routing table (pyflanneld's routes via
flannel.1 or host-gw); kernel.forwarding lets it through (IPv4 and, with --ipv6, IPv6 forwarding; FORWARD accept
rules where the policy is DROP).

Names: bridge 12 characters, veth ends 14 (the kernel allows 15). The prefixes mark interfaces as ours; at startup
the driver deletes any of them its state does not know (see network.NetworkDriver.reconcile). Plumbing is the seam
NetworkDriver and Ipam call, so a test can hand them another; a KernelError leaves it as a PlumbingError (500).
"""
from __future__ import annotations

import ipaddress

from pyflannel import firewall
from pyflannel.kernel import forwarding, iptables, links, ports
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
        self.chains = iptables.Chains(firewall.CHAINS, firewall.HOOKS)

    @staticmethod
    def links() -> dict[str, dict]:
        """Our interfaces in this namespace: name -> {index, kind, mtu, master, up, mac}."""
        return links.with_prefix(OUR_PREFIXES)

    @staticmethod
    def routes_overlapping(network: ipaddress.IPv4Network) -> list[str]:
        return links.routes_overlapping(network)

    @_as_plumbing_error
    def ensure_bridge(self, name: str, gateway: ipaddress.IPv4Interface | None,
                      gateway6: ipaddress.IPv6Interface | None, mtu: int) -> None:
        """Create or repair the bridge (kind, gateway addresses only, MTU, up; its MAC from the IPv4 gateway, or the
        IPv6 one on an IPv6-only network); then forwarding through it."""
        links.ensure_bridge(name, gateway, mtu, mac=links.mac_for((gateway or gateway6).ip))
        if gateway6 is not None:
            forwarding.enable_ipv6(name, self.proc_sys)
            links.ensure_gateway6(name, gateway6)
        forwarding.allow(name, self.proc_sys, v6=gateway6 is not None)

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
    def ensure_veth(host: str, container: str, bridge: str, mtu: int, mac: str, isolated: bool = False) -> None:
        """Hairpin mode on the port: a container reaching its own published port through the host's address comes
        back out of the port it went in by (dockerd's br_netfilter bridges the DNATed frame). `isolated` (-o
        com.docker.network.bridge.enable_icc=false): the bridge forwards nothing between isolated ports, so the
        network's containers cannot reach one another through it, whether br_netfilter is loaded or not."""
        links.ensure_veth(host, container, bridge, mtu, mac, hairpin=True, isolated=isolated)

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

    # --- firewall (firewall.py's rules) -------------------------------------------------------------------------

    @_as_plumbing_error
    def reset_rules(self, rules: list[firewall.Rule]) -> None:
        """Our chains hold exactly `rules` afterwards (at start: the state's rules, nothing else). ip6tables' chains
        too, where ip6tables exists (or is needed)."""
        self.chains.reset(rules)

    @_as_plumbing_error
    def add_rules(self, rules: list[firewall.Rule]) -> None:
        self.chains.add(rules)

    @_as_plumbing_error
    def remove_rules(self, rules: list[firewall.Rule]) -> None:
        self.chains.remove(rules)

    def route_localnet(self, bridge: str) -> None:
        forwarding.route_localnet(bridge, self.proc_sys)

    @staticmethod
    def port_in_use(proto: str, host_ip: str, port: int) -> bool:
        return ports.in_use(proto, host_ip, port)

