"""Choosing the external interface and PublicIP: -iface (name or IP, repeatable), -iface-regex, -public-ip."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyflannel.kernel.netlink import Interface, Kernel

from .errors import UserError


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    mtu: int
    address: ipaddress.IPv4Interface  # the interface's own address (with its connected prefix)
    public_ip: str

    def on_link(self, ip: str) -> bool:
        """True when `ip` is on the interface's directly connected subnet."""
        try:
            return ipaddress.IPv4Address(ip) in self.address.network
        except ValueError:
            return False


def _matches(iface: Interface, spec: str, regex: bool) -> ipaddress.IPv4Interface | None:
    for addr in iface.addresses:
        if regex:
            if re.search(spec, iface.name) or re.search(spec, str(addr.ip)):
                return addr
        elif spec in (iface.name, str(addr.ip)):
            return addr
    return None


def _default_route_interface(kernel: Kernel, interfaces: list[Interface]) -> Interface | None:
    for route in kernel.all_routes():
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            return next((i for i in interfaces if i.index == route.get("RTA_OIF")), None)
    return None


def choose(kernel: Kernel, ifaces: list[str], iface_regexes: list[str], public_ip: str | None) -> ExternalInterface:
    interfaces = [i for i in kernel.interfaces() if i.name != "lo" and not i.name.startswith("flannel.")]
    chosen = None
    for spec in ifaces:
        chosen = next(((i, a) for i in interfaces if (a := _matches(i, spec, False))), None)
        if chosen:
            break
    if chosen is None and not ifaces:
        for spec in iface_regexes:
            chosen = next(((i, a) for i in interfaces if (a := _matches(i, spec, True))), None)
            if chosen:
                break
    if chosen is None:
        if ifaces or iface_regexes:
            given = ", ".join([f"-iface={s}" for s in ifaces] + [f"-iface-regex={s}" for s in iface_regexes])
            names = ", ".join(f"{i.name} ({', '.join(str(a) for a in i.addresses) or 'no IPv4'})" for i in interfaces)
            raise UserError(f"no interface with an IPv4 address matches {given}; this host has: {names or 'none'}")
        iface = _default_route_interface(kernel, interfaces)
        if iface is None or not iface.addresses:
            raise UserError("no default route to pick the external interface from: pass -iface NAME or -iface IP")
        chosen = (iface, iface.addresses[0])
    iface, addr = chosen
    if public_ip is not None:
        try:
            ipaddress.IPv4Address(public_ip)
        except ValueError:
            raise UserError(f"-public-ip={public_ip!r} is not an IPv4 address") from None
    return ExternalInterface(iface.name, iface.index, iface.mtu, addr, public_ip or str(addr.ip))
