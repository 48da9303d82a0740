"""Choosing the external interface, PublicIP and PublicIPv6, in flanneld's order: -iface (name or IP, repeatable),
then -iface-regex (repeatable), then -iface-can-reach, else the default route's interface; -public-ip and
-public-ipv6 override the addresses."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.netlink import Interface, Kernel

from .errors import UserError


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    mtu: int
    address: ipaddress.IPv4Interface  # the interface's own address (with its connected prefix)
    public_ip: str
    address6: ipaddress.IPv6Interface | None = None  # its global IPv6 address, if it has one
    public_ipv6: str | None = None  # None: dual-stack networks carry IPv6 over the IPv4 underlay

    def on_link(self, ip: str | None) -> bool:
        """True when `ip` (IPv4 or IPv6) is on one of the interface's directly connected subnets."""
        try:
            addr = ipaddress.ip_address(ip)
        except (ValueError, TypeError):
            return False
        own = self.address if addr.version == 4 else self.address6
        return own is not None and addr in own.network


def _matches(iface: Interface, spec: str, regex: bool) -> ipaddress.IPv4Interface | None:
    """The interface's IPv4 address when its name or one of its addresses (IPv4 or IPv6) matches `spec`."""
    if iface.addresses and not regex and _canonical(spec) in {str(a.ip) for a in iface.addresses6}:
        return iface.addresses[0]
    for addr in iface.addresses:
        if regex:
            if re.search(spec, iface.name) or re.search(spec, str(addr.ip)):
                return addr
        elif spec in (iface.name, str(addr.ip)):
            return addr
    return None


def _canonical(spec: str) -> str:
    try:
        return str(ipaddress.ip_address(spec))
    except ValueError:
        return spec


def _default_route_interface(kernel: Kernel, interfaces: list[Interface]) -> Interface | None:
    for route in kernel.all_routes():
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            return next((i for i in interfaces if i.index == route.get("RTA_OIF")), None)
    return None


def _underlay(iface: Interface) -> bool:
    """Whether the interface can carry the overlay: neither lo nor one of the overlay's own devices."""
    return iface.name != "lo" and not iface.name.startswith("flannel")


def _reaching(kernel: Kernel, interfaces: list[Interface], target: str) -> tuple[Interface, ipaddress.IPv4Interface]:
    """-iface-can-reach: the interface the kernel routes `target` through, with the route's source address (its
    first IPv4 address when the source is another one, or IPv6)."""
    try:
        index, source = kernel.route_to(ipaddress.ip_address(target))
    except ValueError:
        raise UserError(f"-iface-can-reach={target!r} is not an IP address") from None
    except KernelError as e:
        raise UserError(f"-iface-can-reach={target}: {e}") from None
    iface = next((i for i in interfaces if i.index == index), None)
    if iface is None or not _underlay(iface) or not iface.addresses:
        raise UserError(f"-iface-can-reach={target}: the route to it leaves through "
                        f"{iface.name if iface else f'interface {index}'}, not an interface with an IPv4 address to "
                        f"other hosts")
    return iface, next((a for a in iface.addresses if str(a.ip) == source), iface.addresses[0])


def choose(kernel: Kernel, ifaces: list[str], iface_regexes: list[str], public_ip: str | None,
           public_ipv6: str | None = None, can_reach: str | None = None) -> ExternalInterface:
    every = kernel.interfaces()
    interfaces = [i for i in every if _underlay(i)]
    chosen = None
    for spec, regex in [(s, False) for s in ifaces] + [(s, True) for s in iface_regexes]:
        chosen = next(((i, a) for i in interfaces if (a := _matches(i, spec, regex))), None)
        if chosen:
            break
    if chosen is None and can_reach:
        chosen = _reaching(kernel, every, can_reach)
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
    if public_ipv6 is not None:
        try:
            public_ipv6 = str(ipaddress.IPv6Address(public_ipv6))
        except ValueError:
            raise UserError(f"-public-ipv6={public_ipv6!r} is not an IPv6 address") from None
    addr6 = iface.addresses6[0] if iface.addresses6 else None
    return ExternalInterface(iface.name, iface.index, iface.mtu, addr, public_ip or str(addr.ip), addr6,
                             public_ipv6 or (str(addr6.ip) if addr6 else None))
