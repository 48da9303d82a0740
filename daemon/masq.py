"""-ip-masq: masquerade traffic leaving the flannel network, never traffic inside it (flannel's rules).

iptables is driven with argument lists built from parsed networks: no shell, no strings from outside.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess

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


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", "-t", "nat", *args], capture_output=True, text=True, check=check)


def install(network: ipaddress.IPv4Network, lease: ipaddress.IPv4Network) -> None:
    """(Re)write our chain and hook it into POSTROUTING once; idempotent."""
    if shutil.which("iptables") is None:
        raise UserError("-ip-masq needs iptables, which is not installed (apt-get install iptables)")
    try:
        _iptables("-N", CHAIN, check=False)
        _iptables("-F", CHAIN)
        for rule in rules(network, lease):
            _iptables("-A", CHAIN, *rule)
        if _iptables("-C", "POSTROUTING", "-j", CHAIN, check=False).returncode != 0:
            _iptables("-I", "POSTROUTING", "1", "-j", CHAIN)
    except subprocess.CalledProcessError as e:
        raise UserError(f"-ip-masq: iptables failed: {e.stderr.strip()}") from None
    log.info("ip-masq: masquerading traffic from %s that leaves it", network)
