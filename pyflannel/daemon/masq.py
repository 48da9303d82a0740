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


def rules(network: ipaddress.IPv4Network, lease: ipaddress.IPv4Network) -> list[list[str]]:
    n, s = str(network), str(lease)
    return [
        ["-s", n, "-d", n, "-j", "RETURN"],                                     # pod to pod: keep source
        ["-s", n, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"],  # pod to the world
        ["!", "-s", n, "-d", s, "-j", "RETURN"],                                # the world to our pods
        ["!", "-s", n, "-d", n, "-j", "MASQUERADE", "--random-fully"],          # host to remote pods
    ]


def chain_for(vni: int | None) -> str:
    """The default network's chain is flannel's; a named network's carries its VNI."""
    return CHAIN if vni is None else f"{CHAIN}-{vni}"


def install(network: ipaddress.IPv4Network, lease: ipaddress.IPv4Network, chain: str = CHAIN) -> None:
    """(Re)write the network's chain and hook it into POSTROUTING once; idempotent."""
    if not iptables.available():
        raise UserError("-ip-masq needs iptables, which is not installed (apt-get install iptables)")
    try:
        iptables.ensure_chain("nat", chain)
        iptables.must("nat", "-F", chain)
        for rule in rules(network, lease):
            iptables.must("nat", "-A", chain, *rule)
        iptables.ensure("nat", "POSTROUTING", ["-j", chain], first=True)
    except KernelError as e:
        raise UserError(f"-ip-masq: {e}") from None
    log.info("ip-masq: masquerading traffic from %s that leaves it", network)


def uninstall(chain: str) -> None:
    """The host left the network: its chain goes."""
    if iptables.available():
        iptables.remove("nat", "POSTROUTING", ["-j", chain])
        iptables.run("nat", "-F", chain)
        iptables.run("nat", "-X", chain)
