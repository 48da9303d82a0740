"""Kernel plumbing, through netlink (pyroute2) only: the network's bridge, the endpoints' veth pairs, forwarding.

    host namespace                                               container sandbox (Docker's doing)
    pfl-<net id[:8]>   bridge, FLANNEL_SUBNET (10.5.34.1/24), up
      └─ pfv-<ep id[:10]>  veth host end, on the bridge, up  ──── pfc-<ep id[:10]> → moved + renamed eth0 by Docker

Traffic to other hosts' subnets leaves the bridge through the host's routing table (pyflanneld's routes via
flannel.1 or host-gw), so the host must forward: ip_forward=1, and if the iptables FORWARD policy is DROP (as
Docker leaves it) two ACCEPT rules per bridge (-i and -o). iptables is the one external program used (argv list,
never a shell) and is best-effort: absent or failing iptables is logged, not fatal.

Names: bridge 12 characters, veth ends 14 (the kernel allows 15). The prefixes mark interfaces as ours; at startup
the driver deletes any of them its state does not know (see network.NetworkDriver.reconcile).
Each operation opens its own netlink socket, in the network namespace of the calling thread.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import PlumbingError

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "pfl-"
VETH_HOST_PREFIX = "pfv-"
VETH_CONTAINER_PREFIX = "pfc-"
OUR_PREFIXES = (BRIDGE_PREFIX, VETH_HOST_PREFIX, VETH_CONTAINER_PREFIX)
IPTABLES_TIMEOUT = 10  # seconds; a hung iptables must not hang Docker
MAIN_TABLE = 254


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + network_id[:8]


def veth_names(endpoint_id: str) -> tuple[str, str]:
    return VETH_HOST_PREFIX + endpoint_id[:10], VETH_CONTAINER_PREFIX + endpoint_id[:10]


def mac_for(ip: ipaddress.IPv4Address) -> str:
    """Docker's scheme: 02:42 + the IPv4 address; unique because leases are disjoint across hosts."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


def _kind(link) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


class Plumbing:
    def __init__(self, iptables: str = "iptables", proc_sys: str = "/proc/sys"):
        self.iptables = iptables
        self.ip_forward_path = os.path.join(proc_sys, "net/ipv4/ip_forward")

    # --- netlink helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _lookup(ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None

    @staticmethod
    def _fail(what: str, e: Exception):
        text = e.args[1] if isinstance(e, NetlinkError) and len(e.args) > 1 else str(e)
        return PlumbingError(f"{what}: {text}")

    def links(self) -> dict[str, dict]:
        """Our interfaces in this namespace: name -> {index, kind, mtu, master, up, mac}."""
        out = {}
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get("ifname")
                if name and name.startswith(OUR_PREFIXES):
                    out[name] = {"index": link["index"], "kind": _kind(link), "mtu": link.get("mtu"),
                                 "master": link.get("master"), "mac": link.get("address"),
                                 "up": bool(link["flags"] & 1)}
        return out

    def routes_overlapping(self, network: ipaddress.IPv4Network) -> list[str]:
        """Main-table IPv4 routes that overlap `network`, as "dst dev name" (what Docker's overlap check sees)."""
        out = []
        with IPRoute() as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            for route in ipr.route("dump", family=socket.AF_INET):
                dst = route.get("dst")
                if route.get("table") != MAIN_TABLE or dst is None or route["dst_len"] == 0:
                    continue
                net = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
                if net.overlaps(network):
                    out.append(f"{net} dev {names.get(route.get('oif'), '?')}")
        return out

    # --- bridge -------------------------------------------------------------------------------------------------

    def ensure_bridge(self, name: str, gateway: ipaddress.IPv4Interface, mtu: int) -> None:
        """Create or repair the bridge: kind bridge, gateway address (and no other IPv4), MTU, up; then forwarding."""
        created = False
        try:
            with IPRoute() as ipr:
                idx = self._lookup(ipr, name)
                if idx is None:
                    # A fixed MAC, or the bridge would take the lowest port's MAC and change it as ports come and go.
                    ipr.link("add", ifname=name, kind="bridge", address=mac_for(gateway.ip), mtu=mtu)
                    created = True
                    idx = self._lookup(ipr, name)
                    log.info("created bridge %s", name)
                else:
                    kind = _kind(ipr.get_links(idx)[0])
                    if kind != "bridge":
                        raise PlumbingError(f"interface {name} exists but is a {kind or 'device'} and not a bridge: "
                                            f"remove it (ip link del {name})")
                ipr.link("set", index=idx, mtu=mtu)
                want = (str(gateway.ip), gateway.network.prefixlen)
                have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
                for addr, plen in have - {want}:  # e.g. the gateway of a former lease
                    ipr.addr("del", index=idx, address=addr, prefixlen=plen)
                if want not in have:
                    try:
                        ipr.addr("add", index=idx, address=want[0], prefixlen=want[1])
                    except NetlinkError as e:
                        if e.code != errno.EEXIST:
                            raise
                ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            if created:  # do not leave half a bridge behind; never delete one we did not make here
                try:
                    self.delete_link(name)
                except PlumbingError:
                    pass
            raise self._fail(f"cannot set up bridge {name} with {gateway}", e) from None
        self.ensure_forwarding(name)

    def delete_bridge(self, name: str) -> None:
        self.delete_link(name)
        self.remove_forwarding(name)

    def delete_link(self, name: str) -> bool:
        try:
            with IPRoute() as ipr:
                idx = self._lookup(ipr, name)
                if idx is None:
                    return False
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise
                log.info("deleted %s", name)
                return True
        except NetlinkError as e:
            raise self._fail(f"cannot delete {name}", e) from None

    # --- veth pairs ---------------------------------------------------------------------------------------------

    def ensure_veth(self, host: str, container: str, bridge: str, mtu: int, mac: str) -> None:
        """Create or repair an endpoint's pair: host end on the bridge and up, both ends at `mtu`.

        If the container end is already gone from this namespace, Docker has moved it into the sandbox (a repeated
        Join): only the host end is repaired.
        """
        try:
            with IPRoute() as ipr:
                br = self._lookup(ipr, bridge)
                if br is None:
                    raise PlumbingError(f"bridge {bridge} is missing")
                idx = self._lookup(ipr, host)
                if idx is None:
                    stray = self._lookup(ipr, container)
                    if stray is not None:
                        ipr.link("del", index=stray)
                    ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                             peer={"ifname": container, "mtu": mtu, "address": mac})
                    idx = self._lookup(ipr, host)
                    log.info("created veth pair %s/%s on %s", host, container, bridge)
                else:
                    kind = _kind(ipr.get_links(idx)[0])
                    if kind != "veth":
                        raise PlumbingError(f"interface {host} exists but is a {kind or 'device'} and not a veth: "
                                            f"remove it (ip link del {host})")
                ipr.link("set", index=idx, mtu=mtu, master=br)
                ipr.link("set", index=idx, state="up")
                peer = self._lookup(ipr, container)
                if peer is not None:
                    ipr.link("set", index=peer, mtu=mtu, address=mac)
        except NetlinkError as e:
            raise self._fail(f"cannot set up veth pair {host}/{container} on {bridge}", e) from None

    def delete_veth(self, host: str, container: str) -> None:
        """Deleting either end deletes the pair, wherever the other end is."""
        self.delete_link(host)
        self.delete_link(container)

    # --- forwarding ---------------------------------------------------------------------------------------------

    def ensure_forwarding(self, bridge: str) -> None:
        self._enable_ip_forward()
        if self._forward_policy() == "DROP":
            for rule in self._rules(bridge):
                if not self._iptables("-C", "FORWARD", *rule, quiet=True):
                    self._iptables("-A", "FORWARD", *rule)
                    log.info("iptables: FORWARD policy is DROP, accepted %s", " ".join(rule))

    def remove_forwarding(self, bridge: str) -> None:
        if not self._iptables_path():
            return
        for rule in self._rules(bridge):
            for _ in range(8):  # duplicates, if someone added the rule twice
                if not self._iptables("-C", "FORWARD", *rule, quiet=True):
                    break
                self._iptables("-D", "FORWARD", *rule)

    def forwarding_bridges(self) -> set[str]:
        """Bridges of ours that have FORWARD rules (to find rules whose bridge is gone)."""
        out = self._iptables("-S", "FORWARD", quiet=True, output=True) or ""
        pattern = re.compile(rf"^-A FORWARD -[io] ({re.escape(BRIDGE_PREFIX)}\S+) -j ACCEPT$")
        return {m.group(1) for m in map(pattern.match, out.splitlines()) if m}

    @staticmethod
    def _rules(bridge: str) -> list[list[str]]:
        return [["-i", bridge, "-j", "ACCEPT"], ["-o", bridge, "-j", "ACCEPT"]]

    def _enable_ip_forward(self) -> None:
        try:
            with open(self.ip_forward_path) as f:
                if f.read().strip() == "1":
                    return
            with open(self.ip_forward_path, "w") as f:
                f.write("1\n")
            log.info("enabled IPv4 forwarding (%s)", self.ip_forward_path)
        except OSError as e:
            log.warning("cannot enable IPv4 forwarding via %s (%s): containers will not reach other hosts",
                        self.ip_forward_path, e.strerror)

    def _forward_policy(self) -> str | None:
        out = self._iptables("-S", "FORWARD", quiet=True, output=True) or ""
        for line in out.splitlines():
            if line.startswith("-P FORWARD "):
                return line.split()[2]
        return None

    def _iptables_path(self) -> str | None:
        return shutil.which(self.iptables)

    def _iptables(self, *args: str, quiet: bool = False, output: bool = False):
        """Run iptables -w (argv list). Returns stdout (output=True) or success; never raises."""
        path = self._iptables_path()
        if not path:
            log.debug("iptables not found; skipping iptables %s", " ".join(args))
            return None if output else False
        argv = [path, "-w", "5", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("iptables %s failed: %s", " ".join(args), e)
            return None if output else False
        if done.returncode != 0:
            if not quiet:
                log.warning("iptables %s failed: %s", " ".join(args), done.stderr.strip())
            return None if output else False
        return done.stdout if output else True
