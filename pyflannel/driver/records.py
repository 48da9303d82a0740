"""The driver's records, as its state file keeps them (state.py): a Docker network, an endpoint (a container's place
on one), a pool (this host's lease in a flannel network and the addresses handed out of it), each to and from its
JSON object. Addresses stay text, as in the file.

A field with a default may be absent from a state file: one written before the field existed (IPv6, enable_icc,
host_binding_ipv4), or, for an endpoint's ports, before its first Leave or publish; every other key must be there.
Keys no record knows are dropped.
"""
from __future__ import annotations

import dataclasses
import ipaddress

from pyflannel import firewall

IPV6_KEYS = ("pool6", "gateway6", "flannel_network6")  # written only for a network with --ipv6


def _from_json(cls, data):
    """`cls` from its JSON object; ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("is not an object")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return cls(**{f.name: data[f.name] for f in fields if f.name in data})


@dataclasses.dataclass
class NetworkRecord:
    """A Docker network: its bridge on this host's lease in a flannel network. On an IPv6-only network (Docker 28's
    --ipv4=false) pool, gateway and flannel_network are None; without --ipv6 their IPv6 twins are."""
    bridge: str                       # pfl-0123abcd
    pool: str | None                  # this host's lease, 10.5.34.0/24
    gateway: str | None               # its first address with its prefix, 10.5.34.1/24: held by the bridge
    flannel_network: str | None       # the flannel network's Network, 10.5.0.0/16
    mtu_option: int | None            # -o com.docker.network.driver.mtu
    masquerade: bool
    internal: bool
    flannel: str                      # the named flannel network; "" for the default one
    icc: bool = True                  # its containers reach one another on this host
    host_binding_ipv4: str = ""       # where -p without an address binds; "" for every address
    pool6: str | None = None
    gateway6: str | None = None
    flannel_network6: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> NetworkRecord:
        return _from_json(cls, data)

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if self.pool6 is not None or k not in IPV6_KEYS}

    @property
    def pools(self) -> set[str]:
        """The leases it uses: IPv4 and, with --ipv6, IPv6."""
        return {self.pool, self.pool6} - {None}

    @property
    def gateways(self) -> tuple[ipaddress.IPv4Interface | None, ipaddress.IPv6Interface | None]:
        """Its gateways with their leases' prefixes, IPv4 and IPv6; None for a family it lacks."""
        return (ipaddress.IPv4Interface(self.gateway) if self.gateway else None,
                ipaddress.IPv6Interface(self.gateway6) if self.gateway6 else None)

    def spec(self) -> firewall.NetworkSpec:
        """Its rules' input."""
        return firewall.NetworkSpec(
            self.bridge, ipaddress.IPv4Network(self.pool) if self.pool else None,
            ipaddress.IPv4Network(self.flannel_network) if self.pool else None, self.masquerade, self.internal,
            ipaddress.IPv6Network(self.pool6) if self.pool6 else None,
            ipaddress.IPv6Network(self.flannel_network6) if self.pool6 else None, self.icc)

    def lease_change(self, lease, lease6) -> str:
        """How this host's leases (IPv4, IPv6; None: none) differ from its pools, as "A to B"; "" when they do
        not."""
        return " and ".join(f"{pool} to {now or 'none'}" for pool, now in ((self.pool, lease), (self.pool6, lease6))
                            if pool and pool != str(now))


@dataclasses.dataclass
class EndpointRecord:
    """A container's endpoint on a network: its addresses, its MAC, its veth pair (made by Join), its ports."""
    network: str                      # the Docker network's id
    address: str                      # 10.5.34.7/24; "" without IPv4
    mac: str
    mac_generated: bool               # picked by the driver (and told to Docker), not given by Docker
    veth_host: str                    # pfv-0123456789
    veth_container: str               # pfc-0123456789, eth0 in the container
    joined: bool
    sandbox: str                      # the container's namespace, "" unless joined
    address6: str = ""                # fd00:5:0:27::7/64; "" without IPv6
    ports: list[firewall.Published] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> EndpointRecord:
        record = _from_json(cls, data)
        try:
            record.ports = [firewall.Published(**port) for port in record.ports]
        except TypeError as e:
            raise ValueError(f"has a port that is not one ({e})") from None
        return record

    def to_json(self) -> dict:
        return {**vars(self), "ports": [vars(port).copy() for port in self.ports]}


@dataclasses.dataclass
class PoolRecord:
    """This host's lease in a flannel network as Docker's pool: the addresses handed out (the gateway never is)."""
    pool: str                         # 10.5.34.0/24 or fd00:5:0:27::/64
    allocated: list[str]              # in address order
    flannel: str                      # the named flannel network; "" for the default one

    @classmethod
    def from_json(cls, data: dict) -> PoolRecord:
        return _from_json(cls, data)

    def to_json(self) -> dict:
        return {**vars(self), "allocated": list(self.allocated)}
