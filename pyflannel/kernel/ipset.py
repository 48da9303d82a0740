"""IP sets (the kernel's ip_set, through pyroute2's netlink client): sets of addresses that one iptables rule matches
at a cost that does not grow with the set (`-m set --match-set NAME src`).

A set is `hash:ip` of one address family. Members are added and deleted one by one (each change is atomic in the
kernel); `destroy` needs the rules that name the set gone first.
"""
from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2.ipset import IPSet, IPSetError

from .errors import KernelError

IPSET_ERR_NOT_MEMBER = 4103  # the kernel's "it's not added" (ipset.h: IPSET_ERR_EXIST)
NAME_MAX = 31


def _family(v6: bool) -> int:
    return socket.AF_INET6 if v6 else socket.AF_INET


def _request(what: str, fn, *args, **kwargs):
    with IPSet() as sets:
        try:
            return fn(sets, *args, **kwargs)
        except (IPSetError, OSError) as e:
            raise KernelError(f"ipset {what}: {e}") from None


def _listing(sets, name: str) -> list:
    """The set's netlink messages; none when there is no such set."""
    try:
        return list(sets.list(name))
    except (IPSetError, OSError) as e:
        if getattr(e, "code", None) == errno.ENOENT or getattr(e, "errno", None) == errno.ENOENT:
            return []
        raise


def ensure(name: str, *, v6: bool = False) -> None:
    """A `hash:ip` set of the family called `name`, empty if new."""
    _request(f"create {name}", lambda s: s.create(name, stype="hash:ip", family=_family(v6), exclusive=False))


def members(name: str) -> set[str]:
    """The addresses in set `name`; empty when there is no such set."""
    def read(sets):
        found = set()
        for message in _listing(sets, name):
            adt = message.get_attr("IPSET_ATTR_ADT")
            for data in adt.get_attrs("IPSET_ATTR_DATA") if adt else ():
                ip = data.get_attr("IPSET_ATTR_IP_FROM")
                address = ip and (ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6"))
                if address:
                    found.add(str(ipaddress.ip_address(address)))
        return found
    return _request(f"list {name}", read)


def add(name: str, address: str) -> None:
    v6 = ipaddress.ip_address(address).version == 6
    _request(f"add {name} {address}", lambda s: s.add(name, address, family=_family(v6), exclusive=False))


def delete(name: str, address: str) -> None:
    """Take `address` out of set `name` (not a member: fine)."""
    v6 = ipaddress.ip_address(address).version == 6

    def remove(sets):
        try:
            sets.delete(name, address, family=_family(v6), exclusive=True)
        except IPSetError as e:
            if e.code != IPSET_ERR_NOT_MEMBER:
                raise
    _request(f"del {name} {address}", remove)


def destroy(name: str) -> None:
    """Remove set `name` (none: fine); KernelError while a rule still names it."""
    def remove(sets):
        if not _listing(sets, name):
            return
        sets.destroy(name)
    _request(f"destroy {name}", remove)


def names(prefix: str) -> set[str]:
    """The sets whose name starts with `prefix`."""
    def read(sets):
        return {m.get_attr("IPSET_ATTR_SETNAME") for m in sets.list() if
                (m.get_attr("IPSET_ATTR_SETNAME") or "").startswith(prefix)}
    return _request("list", read)
