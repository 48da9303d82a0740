"""-ip-masq: masquerade traffic leaving the flannel network, never traffic inside it (flannel's rules).

iptables is driven with argument lists built from parsed networks: no shell, no strings from outside.
"""
from __future__ import annotations

import ipaddress
import logging

from pyflannel.kernel import iptables
from pyflannel.kernel.errors import KernelError

from .errors import UserError

log = logging.getLogger(__name__)

CHAIN = "PYFLANNEL-POSTRTG"


def rules(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
          lease: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[list[str]]:
    """flannel's rules, for IPv4 or (with ip6tables) IPv6."""
    n, s = str(network), str(lease)
    multicast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    return [
        ["-s", n, "-d", n, "-j", "RETURN"],                                     # pod to pod: keep source
        ["-s", n, "!", "-d", multicast, "-j", "MASQUERADE", "--random-fully"],  # pod to the world
        ["!", "-s", n, "-d", s, "-j", "RETURN"],                                # the world to our pods
        ["!", "-s", n, "-d", n, "-j", "MASQUERADE", "--random-fully"],          # host to remote pods
    ]


def chain_for(vni: int | None) -> str:
    """The default network's chain is flannel's; a named network's carries its VNI."""
    return CHAIN if vni is None else f"{CHAIN}-{vni}"


def install(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
            lease: ipaddress.IPv4Network | ipaddress.IPv6Network, chain: str = CHAIN) -> None:
    """(Re)write the network's chain (in ip6tables for an IPv6 network) and hook it into POSTROUTING once;
    idempotent."""
    v6 = network.version == 6
    if not iptables.available(v6=v6):
        program = "ip6tables" if v6 else "iptables"
        raise UserError(f"-ip-masq needs {program}, which is not installed (apt-get install iptables)")
    try:
        iptables.ensure_chain("nat", chain, v6=v6)
        iptables.must("nat", "-F", chain, v6=v6)
        for rule in rules(network, lease):
            iptables.must("nat", "-A", chain, *rule, v6=v6)
        iptables.ensure("nat", "POSTROUTING", ["-j", chain], first=True, v6=v6)
    except KernelError as e:
        raise UserError(f"-ip-masq: {e}") from None
    log.info("ip-masq: masquerading traffic from %s that leaves it", network)


def uninstall(chain: str, v6: bool = False) -> None:
    """The host left the network: its chain goes."""
    if iptables.available(v6=v6):
        iptables.remove("nat", "POSTROUTING", ["-j", chain], v6=v6)
        iptables.run("nat", "-F", chain, v6=v6)
        iptables.run("nat", "-X", chain, v6=v6)
