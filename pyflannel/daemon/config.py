"""The network config in etcd (`<prefix>/config`), parsed and checked with flannel's defaults and rules."""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from .errors import ConfigError
from .subnets import IPv4Network, IPv6Network, Subnet

BACKEND_TYPES = ("vxlan", "host-gw", "wireguard")
VXLAN_DEFAULT_VNI = 1
VXLAN_DEFAULT_PORT = 8472
WIREGUARD_DEFAULT_PORT = 51820
WIREGUARD_MODES = ("separate", "auto", "ipv4")  # flannel's, but "ipv6" (an IPv6 underlay for all), not in pyflannel


@dataclass(frozen=True)
class WireGuardConfig:
    """flannel's wireguard backend keys: ListenPort, PSK, PersistentKeepaliveInterval (seconds), MTU (of the
    underlay; the device gets 80 less), Mode."""
    listen_port: int = WIREGUARD_DEFAULT_PORT
    psk: str | None = None
    keepalive: int = 0
    mtu: int | None = None


@dataclass(frozen=True)
class IPv6Config:
    """flannel's IPv6Network, IPv6SubnetLen, IPv6SubnetMin and IPv6SubnetMax, with its defaults."""
    network: IPv6Network
    subnet_len: int
    subnet_min: IPv6Network
    subnet_max: IPv6Network


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
    enable_ipv4: bool = True  # False: IPv6 only; the IPv4 subnet is still leased, as flannel's key format needs it
    ipv6: IPv6Config | None = None  # EnableIPv6


def _subnet_at(value, field_name: str, network: Subnet, subnet_len: int) -> Subnet:
    family = f"IPv{network.version}"
    try:
        addr = ipaddress.ip_address(value)
        if addr.version != network.version:
            raise ValueError
    except (ValueError, TypeError):
        raise ConfigError(field_name, value, f"not an {family} address")
    if addr not in network:
        raise ConfigError(field_name, value, f"not inside {'Network' if network.version == 4 else 'IPv6Network'} "
                                             f"{network}")
    try:
        return type(network)(f"{addr}/{subnet_len}")
    except ValueError:
        raise ConfigError(field_name, value, f"not on a /{subnet_len} boundary "
                                             f"({'SubnetLen' if network.version == 4 else 'IPv6SubnetLen'})")


def _range(raw: dict, network: Subnet, subnet_len: int, names: tuple[str, str]) -> tuple[Subnet, Subnet]:
    """SubnetMin and SubnetMax (or their IPv6 twins): given, or flannel's defaults, the second and the last
    subnet."""
    size = 1 << (network.max_prefixlen - subnet_len)
    kind = type(network)
    low, high = names
    first = kind((int(network.network_address) + size, subnet_len))
    last = kind((int(network.broadcast_address) + 1 - size, subnet_len))
    subnet_min = _subnet_at(raw[low], low, network, subnet_len) if low in raw else first
    subnet_max = _subnet_at(raw[high], high, network, subnet_len) if high in raw else last
    if subnet_min.network_address > subnet_max.network_address:
        raise ConfigError(low, str(subnet_min.network_address), f"is above {high} {subnet_max.network_address}")
    return subnet_min, subnet_max


def _subnet_len(raw: dict, network: Subnet, key: str, network_key: str) -> int:
    """flannel's rules for SubnetLen (IPv6SubnetLen): by default /24 (/64), or prefix + 2 for a network too small
    for that; at most /30 (/126); the network must hold four subnets."""
    usual, longest = (24, 30) if network.version == 4 else (64, 126)
    if key in raw:
        subnet_len = _int(raw, key, usual, 1, network.max_prefixlen, key)
    elif network.prefixlen <= usual - 2:
        subnet_len = usual
    elif network.prefixlen <= longest - 2:
        subnet_len = network.prefixlen + 2
    else:
        raise ConfigError(network_key, raw[network_key], f"too small: needs /{longest - 2} or wider to hold four "
                                                         f"subnets")
    if subnet_len > longest:
        raise ConfigError(key, subnet_len, f"must be /{longest} or shorter")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(key, subnet_len, f"must be at least /{network.prefixlen + 2} so that {network_key} "
                                           f"{network} holds four subnets")
    return subnet_len


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

    enable_ipv4, enable_ipv6 = raw.get("EnableIPv4", True), raw.get("EnableIPv6", False)
    for key, value in (("EnableIPv4", enable_ipv4), ("EnableIPv6", enable_ipv6)):
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4", False, "and EnableIPv6 is not true: the network would have no addresses")
    why = "" if enable_ipv4 else (" (also with EnableIPv4 false: flannel's lease keys begin with an IPv4 subnet, "
                                  "which pyflannel leases but does not route)")
    network, subnet_len, subnet_min, subnet_max = _family(raw, ("Network", "SubnetLen", "SubnetMin", "SubnetMax"),
                                                          "10.5.0.0/16", why)
    ipv6 = IPv6Config(*_family(raw, ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"),
                               "fd00:5::/48", " while EnableIPv6 is true")) if enable_ipv6 else None

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
    if ipv6 is not None and backend_type == "wireguard":
        raise ConfigError("EnableIPv6", True, "the wireguard backend carries IPv4 only in pyflannel: use vxlan or "
                                              "host-gw for a dual-stack network")
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend_type, vni, port, direct, wireguard, raw,
                         enable_ipv4, ipv6)


def _family(raw: dict, keys: tuple[str, str, str, str], example: str, why_needed: str) -> tuple:
    """One address family's Network, SubnetLen, SubnetMin and SubnetMax (or their IPv6 twins), checked."""
    key, len_key, low, high = keys
    kind = IPv4Network if key == "Network" else IPv6Network
    if key not in raw:
        raise ConfigError(key, None, f"missing{why_needed}: set it to the flannel network, e.g. \"{example}\"")
    try:
        network = kind(raw[key])
    except (ValueError, TypeError) as e:
        raise ConfigError(key, raw[key], f"not an IPv{4 if kind is IPv4Network else 6} network ({e})")
    subnet_len = _subnet_len(raw, network, len_key, key)
    return (network, subnet_len, *_range(raw, network, subnet_len, (low, high)))


def _wireguard(backend: dict) -> WireGuardConfig:
    from pyflannel.kernel.wireguard import key_problem
    psk = backend.get("PSK") or None
    if psk is not None and key_problem(psk):
        raise ConfigError("Backend.PSK", "(hidden)", key_problem(psk))
    mode = backend.get("Mode", "separate")
    if mode not in WIREGUARD_MODES:
        raise ConfigError("Backend.Mode", mode, f"must be one of {', '.join(WIREGUARD_MODES)} (pyflannel's "
                                                f"wireguard carries IPv4 only, over IPv4: no IPv6 modes)")
    mtu = _int(backend, "MTU", 1500, 1280, 65535, "Backend.MTU") if "MTU" in backend else None
    return WireGuardConfig(_int(backend, "ListenPort", WIREGUARD_DEFAULT_PORT, 1, 65535, "Backend.ListenPort"), psk,
                           _int(backend, "PersistentKeepaliveInterval", 0, 0, 65535,
                                "Backend.PersistentKeepaliveInterval"), mtu)
