"""Forwarding through a bridge: traffic between a host's container bridge and the other hosts is routed, so the
host must forward (net.ipv4.ip_forward=1; for IPv6 also net.ipv6.conf.all.forwarding=1), and where iptables'
(ip6tables') FORWARD policy is DROP (as dockerd sets it) each bridge needs two ACCEPT rules (-i and -o).
Best-effort: a host without iptables or a refused rule is logged, since forwarding may be allowed in ways pyflannel
does not see (nftables rules, another firewall)."""
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


def enable_ip_forward(proc_sys: str = PROC_SYS, v6: bool = False) -> None:
    """IPv4 forwarding on; with `v6`, IPv6 forwarding (which also makes the host ignore router advertisements)."""
    family, relative = ("IPv6", "net/ipv6/conf/all/forwarding") if v6 else ("IPv4", "net/ipv4/ip_forward")
    path = os.path.join(proc_sys, relative)
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return
        with open(path, "w") as f:
            f.write("1\n")
        log.info("enabled %s forwarding (%s)", family, path)
    except OSError as e:
        log.warning("cannot enable %s forwarding via %s (%s): containers will not reach other hosts", family, path,
                    e.strerror)


def enable_ipv6(link: str, proc_sys: str = PROC_SYS) -> None:
    """IPv6 on `link` (net.ipv6.conf.<link>.disable_ipv6=0: a host may disable it for new links), without duplicate
    address detection (accept_dad=0): its link-local address is usable at once too. A router needs that: the
    neighbour solicitations for containers it forwards to are sent from it, and while it is tentative (up to 2 s after
    the bridge's first port came up) the packets wait. KernelError if either cannot be set."""
    for setting, value in (("disable_ipv6", "0"), ("accept_dad", "0")):
        path = os.path.join(proc_sys, "net/ipv6/conf", link, setting)
        try:
            with open(path, "w") as f:
                f.write(value + "\n")
        except OSError as e:
            raise KernelError(f"cannot enable IPv6 on {link} via {path}: {e.strerror}") from None


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


def _families(v6: bool) -> tuple[bool, ...]:
    """The `v6` flags of iptables' families to act on: IPv4, and IPv6 too if asked."""
    return (False, True) if v6 else (False,)


def allow(bridge: str, proc_sys: str = PROC_SYS, v6: bool = False) -> None:
    """Forwarding on, and the bridge's ACCEPT rules where the FORWARD policy is DROP; with `v6` for IPv6 as well."""
    for family in _families(v6):
        enable_ip_forward(proc_sys, v6=family)
        if not iptables.available(v6=family) or iptables.policy("filter", "FORWARD", v6=family) != "DROP":
            continue
        for rule in _rules(bridge):
            try:
                if iptables.ensure("filter", "FORWARD", rule, v6=family):
                    log.info("%s: FORWARD policy is DROP, accepted %s", "ip6tables" if family else "iptables",
                             " ".join(rule))
            except KernelError as e:
                log.warning("%s", e)


def revoke(bridge: str) -> None:
    """Remove the bridge's ACCEPT rules (all copies, both families)."""
    for family in _families(True):
        if not iptables.available(v6=family):
            continue
        for rule in _rules(bridge):
            try:
                iptables.remove("filter", "FORWARD", rule, v6=family)
            except KernelError as e:
                log.warning("%s", e)


def bridges_allowed(prefix: str) -> set[str]:
    """Bridges named `prefix…` that have ACCEPT rules, in either family (to find rules whose bridge is gone)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\S+$")
    found = set()
    for family in _families(True):
        if not iptables.available(v6=family):
            continue
        try:
            rules = iptables.listing("filter", "FORWARD", v6=family)
        except KernelError as e:
            log.warning("%s", e)
            continue
        found |= {rule[3] for rule in rules if len(rule) == 6 and rule[2] in ("-i", "-o") and pattern.match(rule[3])
                  and rule[4:] == ["-j", "ACCEPT"]}
    return found
