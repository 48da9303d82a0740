"""subnet.env: flannel's hand-off file between the daemon and whatever wires containers.

Written atomically by pyflanneld, read by the Docker driver and the CNI plugin. The keys and their order are
flannel's: FLANNEL_NETWORK and FLANNEL_SUBNET when the network has IPv4, FLANNEL_IPV6_NETWORK and
FLANNEL_IPV6_SUBNET when it has IPv6 (dual stack: both), then FLANNEL_MTU and FLANNEL_IPMASQ.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .files import write_atomically
from .paths import SUBNET_FILE


class SubnetEnvError(Exception):
    """subnet.env is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class SubnetEnv:
    network: ipaddress.IPv4Network | None  # None: an IPv6-only network (EnableIPv4 false)
    subnet: ipaddress.IPv4Interface | None  # first usable address with the lease's prefix, e.g. 10.5.34.1/24
    mtu: int
    ipmasq: bool
    ipv6_network: ipaddress.IPv6Network | None = None  # None: no IPv6 (EnableIPv6 false)
    ipv6_subnet: ipaddress.IPv6Interface | None = None  # e.g. fd00:5:0:27::1/64

    @property
    def lease(self) -> ipaddress.IPv4Network | None:
        return self.subnet.network if self.subnet else None

    @property
    def gateway(self) -> ipaddress.IPv4Address | None:
        return self.subnet.ip if self.subnet else None

    @property
    def lease6(self) -> ipaddress.IPv6Network | None:
        return self.ipv6_subnet.network if self.ipv6_subnet else None

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return self.ipv6_subnet.ip if self.ipv6_subnet else None

    def render(self) -> str:
        lines = []
        if self.subnet is not None:
            lines += [f"FLANNEL_NETWORK={self.network}", f"FLANNEL_SUBNET={self.subnet}"]
        if self.ipv6_subnet is not None:
            lines += [f"FLANNEL_IPV6_NETWORK={self.ipv6_network}", f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet}"]
        lines += [f"FLANNEL_MTU={self.mtu}", f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}"]
        return "\n".join(lines) + "\n"


def _first_address(lease):
    """flannel's FLANNEL_SUBNET: the lease's first usable address with the lease's prefix length."""
    return ipaddress.ip_interface(f"{lease.network_address + 1}/{lease.prefixlen}")


def for_lease(network, lease, mtu: int, ipmasq: bool, ipv6_network=None, ipv6_lease=None) -> SubnetEnv:
    """`network`/`lease` None: IPv6 only; `ipv6_network`/`ipv6_lease` None: IPv4 only."""
    return SubnetEnv(
        network=ipaddress.IPv4Network(network) if lease is not None else None,
        subnet=_first_address(ipaddress.IPv4Network(lease)) if lease is not None else None,
        mtu=mtu,
        ipmasq=ipmasq,
        ipv6_network=ipaddress.IPv6Network(ipv6_network) if ipv6_lease is not None else None,
        ipv6_subnet=_first_address(ipaddress.IPv6Network(ipv6_lease)) if ipv6_lease is not None else None,
    )


def write(path: str, env: SubnetEnv) -> None:
    """Replace the file atomically."""
    write_atomically(path, env.render())


def parse(text: str, source: str = "subnet.env") -> SubnetEnv:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()

    def pair(network_key: str, subnet_key: str, network_type, interface_type, family: str):
        """Both keys of one address family, or (None, None) when neither is there."""
        if network_key not in values and subnet_key not in values:
            return None, None
        for key in (network_key, subnet_key):
            if key not in values:
                raise SubnetEnvError(f"{source}: {key} is missing")
        try:
            network = network_type(values[network_key])
        except ValueError as e:
            raise SubnetEnvError(f"{source}: {network_key}={values[network_key]!r} is not an {family} network ({e})")
        try:
            subnet = interface_type(values[subnet_key])
        except ValueError as e:
            raise SubnetEnvError(f"{source}: {subnet_key}={values[subnet_key]!r} is not an {family} address/prefix "
                                 f"({e})")
        return network, subnet

    network, subnet = pair("FLANNEL_NETWORK", "FLANNEL_SUBNET", ipaddress.IPv4Network, ipaddress.IPv4Interface,
                           "IPv4")
    network6, subnet6 = pair("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", ipaddress.IPv6Network,
                             ipaddress.IPv6Interface, "IPv6")
    if subnet is None and subnet6 is None:
        raise SubnetEnvError(f"{source}: FLANNEL_SUBNET is missing (and so is FLANNEL_IPV6_SUBNET)")
    mtu_text = values.get("FLANNEL_MTU", "1500")
    if not mtu_text.isdigit() or not 576 <= int(mtu_text) <= 65535:
        raise SubnetEnvError(f"{source}: FLANNEL_MTU={mtu_text!r} is not an MTU between 576 and 65535")
    return SubnetEnv(network, subnet, int(mtu_text), values.get("FLANNEL_IPMASQ", "false") == "true", network6,
                     subnet6)


def read(path: str = SUBNET_FILE) -> SubnetEnv:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise SubnetEnvError(f"{path} does not exist: is pyflanneld running and does it use this -subnet-file?")
    except OSError as e:
        raise SubnetEnvError(f"cannot read {path}: {e.strerror}")
    return parse(text, path)
