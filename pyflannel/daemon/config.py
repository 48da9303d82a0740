"""The network config in etcd (`<prefix>/config`), parsed and checked with flannel's defaults and rules."""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from .errors import ConfigError
from .subnets import IPv4Network

BACKEND_TYPES = ("vxlan", "host-gw", "wireguard")
VXLAN_DEFAULT_VNI = 1
VXLAN_DEFAULT_PORT = 8472
WIREGUARD_DEFAULT_PORT = 51820
WIREGUARD_MODES = ("separate", "auto", "ipv4")  # flannel's; "ipv6" needs IPv6, which pyflannel has not yet


@dataclass(frozen=True)
class WireGuardConfig:
    """flannel's wireguard backend keys: ListenPort, PSK, PersistentKeepaliveInterval (seconds), MTU (of the
    underlay; the device gets 80 less), Mode."""
    listen_port: int = WIREGUARD_DEFAULT_PORT
    psk: str | None = None
    keepalive: int = 0
    mtu: int | None = None


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend_type: str
    vni: int = VXLAN_DEFAULT_VNI
    port: int = VXLAN_DEFAULT_PORT
    direct_routing: bool = False
    wireguard: WireGuardConfig | None = None
    raw: dict = field(default_factory=dict, compare=False)


def _subnet_at(value, field_name: str, network: IPv4Network, subnet_len: int) -> IPv4Network:
    try:
        addr = ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise ConfigError(field_name, value, "not an IPv4 address")
    if addr not in network:
        raise ConfigError(field_name, value, f"not inside Network {network}")
    try:
        return IPv4Network(f"{addr}/{subnet_len}")
    except ValueError:
        raise ConfigError(field_name, value, f"not on a /{subnet_len} boundary (SubnetLen)")


def _int(raw: dict, key: str, default, lo: int, hi: int, name: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(name, value, f"must be a whole number from {lo} to {hi}")
    return value


def parse(text: str) -> NetworkConfig:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("config", text[:60], f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(raw, dict):
        raise ConfigError("config", text[:60], "must be a JSON object")

    if raw.get("EnableIPv4", True) is not True:
        raise ConfigError("EnableIPv4", raw.get("EnableIPv4"), "pyflannel supports IPv4 networks only")
    if raw.get("EnableIPv6"):
        raise ConfigError("EnableIPv6", raw["EnableIPv6"], "IPv6 is not supported yet")
    if "Network" not in raw:
        raise ConfigError("Network", None, "missing: set it to the flannel network, e.g. \"10.5.0.0/16\"")
    try:
        network = IPv4Network(raw["Network"])
    except (ValueError, TypeError) as e:
        raise ConfigError("Network", raw["Network"], f"not an IPv4 network ({e})")

    if "SubnetLen" in raw:
        subnet_len = _int(raw, "SubnetLen", 24, 1, 32, "SubnetLen")
    elif network.prefixlen < 23:
        subnet_len = 24
    elif network.prefixlen <= 28:
        subnet_len = network.prefixlen + 2
    else:
        raise ConfigError("Network", raw["Network"], "too small: needs /28 or wider to hold four subnets")
    if subnet_len > 30:
        raise ConfigError("SubnetLen", subnet_len, "must be /30 or shorter")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError("SubnetLen", subnet_len, f"must be at least /{network.prefixlen + 2} so that "
                                                   f"Network {network} holds four subnets")

    size = 1 << (32 - subnet_len)
    first = IPv4Network((int(network.network_address) + size, subnet_len))
    last = IPv4Network((int(network.broadcast_address) + 1 - size, subnet_len))
    subnet_min = _subnet_at(raw["SubnetMin"], "SubnetMin", network, subnet_len) if "SubnetMin" in raw else first
    subnet_max = _subnet_at(raw["SubnetMax"], "SubnetMax", network, subnet_len) if "SubnetMax" in raw else last
    if subnet_min.network_address > subnet_max.network_address:
        raise ConfigError("SubnetMin", str(subnet_min.network_address),
                          f"is above SubnetMax {subnet_max.network_address}")

    backend = raw.get("Backend", {})
    if not isinstance(backend, dict):
        raise ConfigError("Backend", backend, "must be an object such as {\"Type\": \"vxlan\"}")
    backend_type = backend.get("Type", "vxlan")  # flannel's code falls back to udp; its docs (and we) say vxlan
    if backend_type not in BACKEND_TYPES:
        raise ConfigError("Backend.Type", backend_type, f"unsupported; pyflannel has {', '.join(BACKEND_TYPES)}")
    vni = _int(backend, "VNI", VXLAN_DEFAULT_VNI, 1, (1 << 24) - 1, "Backend.VNI")
    port = _int(backend, "Port", VXLAN_DEFAULT_PORT, 1, 65535, "Backend.Port")
    direct = backend.get("DirectRouting", False)
    if not isinstance(direct, bool):
        raise ConfigError("Backend.DirectRouting", direct, "must be true or false")
    wireguard = _wireguard(backend) if backend_type == "wireguard" else None
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend_type, vni, port, direct, wireguard, raw)


def _wireguard(backend: dict) -> WireGuardConfig:
    from pyflannel.kernel.wireguard import key_problem
    psk = backend.get("PSK") or None
    if psk is not None and key_problem(psk):
        raise ConfigError("Backend.PSK", "(hidden)", key_problem(psk))
    mode = backend.get("Mode", "separate")
    if mode not in WIREGUARD_MODES:
        raise ConfigError("Backend.Mode", mode, f"must be one of {', '.join(WIREGUARD_MODES)} (IPv6 modes need "
                                                f"IPv6, not supported yet)")
    mtu = _int(backend, "MTU", 1500, 1280, 65535, "Backend.MTU") if "MTU" in backend else None
    return WireGuardConfig(_int(backend, "ListenPort", WIREGUARD_DEFAULT_PORT, 1, 65535, "Backend.ListenPort"), psk,
                           _int(backend, "PersistentKeepaliveInterval", 0, 0, 65535,
                                "Backend.PersistentKeepaliveInterval"), mtu)
