"""Forwarding through a bridge: traffic between a host's container bridge and the other hosts is routed, so the
host must forward (net.ipv4.ip_forward=1), and where iptables' FORWARD policy is DROP (as dockerd sets it) each
bridge needs two ACCEPT rules (-i and -o). Best-effort: a host without iptables or a refused rule is logged, since
forwarding may be allowed in ways pyflannel does not see (nftables rules, another firewall)."""
from __future__ import annotations

import logging
import os
import re

from . import iptables
from .errors import KernelError

log = logging.getLogger(__name__)

PROC_SYS = "/proc/sys"


def _rules(bridge: str) -> list[list[str]]:
    return [["-i", bridge, "-j", "ACCEPT"], ["-o", bridge, "-j", "ACCEPT"]]


def enable_ip_forward(proc_sys: str = PROC_SYS) -> None:
    path = os.path.join(proc_sys, "net/ipv4/ip_forward")
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return
        with open(path, "w") as f:
            f.write("1\n")
        log.info("enabled IPv4 forwarding (%s)", path)
    except OSError as e:
        log.warning("cannot enable IPv4 forwarding via %s (%s): containers will not reach other hosts", path,
                    e.strerror)


def route_localnet(bridge: str, proc_sys: str = PROC_SYS) -> None:
    """Let packets from the host's loopback addresses be routed out of `bridge` (a published port reached as
    localhost:PORT is DNATed to a container there). Best-effort, like ip_forward: /proc/sys may be read-only."""
    path = os.path.join(proc_sys, "net/ipv4/conf", bridge, "route_localnet")
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as e:
        log.warning("cannot set %s (%s): published ports will not answer on the host's localhost", path,
                    e.strerror)


def allow(bridge: str, proc_sys: str = PROC_SYS) -> None:
    """Forwarding on, and the bridge's ACCEPT rules where the FORWARD policy is DROP."""
    enable_ip_forward(proc_sys)
    if not iptables.available() or iptables.policy("filter", "FORWARD") != "DROP":
        return
    for rule in _rules(bridge):
        try:
            if iptables.ensure("filter", "FORWARD", rule):
                log.info("iptables: FORWARD policy is DROP, accepted %s", " ".join(rule))
        except KernelError as e:
            log.warning("%s", e)


def revoke(bridge: str) -> None:
    """Remove the bridge's ACCEPT rules (all copies)."""
    if not iptables.available():
        return
    for rule in _rules(bridge):
        try:
            iptables.remove("filter", "FORWARD", rule)
        except KernelError as e:
            log.warning("%s", e)


def bridges_allowed(prefix: str) -> set[str]:
    """Bridges named `prefix…` that have ACCEPT rules (to find rules whose bridge is gone)."""
    if not iptables.available():
        return set()
    try:
        rules = iptables.listing("filter", "FORWARD")
    except KernelError as e:
        log.warning("%s", e)
        return set()
    pattern = re.compile(rf"^{re.escape(prefix)}\S+$")
    return {rule[3] for rule in rules
            if len(rule) == 6 and rule[2] in ("-i", "-o") and pattern.match(rule[3]) and rule[4:] == ["-j", "ACCEPT"]}
