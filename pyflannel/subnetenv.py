"""subnet.env: flannel's hand-off file between the daemon and whatever wires containers.

Written atomically by pyflanneld, read by the Docker driver and the CNI plugin. The key order is flannel's.
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
    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Interface  # first usable address with the lease's prefix, e.g. 10.5.34.1/24
    mtu: int
    ipmasq: bool

    @property
    def lease(self) -> ipaddress.IPv4Network:
        return self.subnet.network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.ip

    def render(self) -> str:
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.subnet}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def for_lease(network, lease, mtu: int, ipmasq: bool) -> SubnetEnv:
    lease = ipaddress.IPv4Network(lease)
    return SubnetEnv(
        network=ipaddress.IPv4Network(network),
        subnet=ipaddress.IPv4Interface(f"{lease.network_address + 1}/{lease.prefixlen}"),
        mtu=mtu,
        ipmasq=ipmasq,
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

    def need(key):
        if key not in values:
            raise SubnetEnvError(f"{source}: {key} is missing")
        return values[key]

    try:
        network = ipaddress.IPv4Network(need("FLANNEL_NETWORK"))
    except ValueError as e:
        raise SubnetEnvError(f"{source}: FLANNEL_NETWORK={values['FLANNEL_NETWORK']!r} is not an IPv4 network ({e})")
    try:
        subnet = ipaddress.IPv4Interface(need("FLANNEL_SUBNET"))
    except ValueError as e:
        raise SubnetEnvError(f"{source}: FLANNEL_SUBNET={values['FLANNEL_SUBNET']!r} is not an address/prefix ({e})")
    mtu_text = values.get("FLANNEL_MTU", "1500")
    if not mtu_text.isdigit() or not 576 <= int(mtu_text) <= 65535:
        raise SubnetEnvError(f"{source}: FLANNEL_MTU={mtu_text!r} is not an MTU between 576 and 65535")
    return SubnetEnv(network, subnet, int(mtu_text), values.get("FLANNEL_IPMASQ", "false") == "true")


def read(path: str = SUBNET_FILE) -> SubnetEnv:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise SubnetEnvError(f"{path} does not exist: is pyflanneld running and does it use this -subnet-file?")
    except OSError as e:
        raise SubnetEnvError(f"cannot read {path}: {e.strerror}")
    return parse(text, path)
