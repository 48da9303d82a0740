"""Request validation: turn Docker's JSON bodies into typed requests, or fail naming the bad field.

Nothing here touches the kernel or the state; the handlers in network.py and ipam.py only ever see the dataclasses
below. Docker's Go structs serialise nil maps/slices as null and omit a nil IPAMData.Gateway, so null is accepted
wherever Docker may send it, and means "empty".
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import ValidationError

MAX_BODY_BYTES = 1 << 20          # Docker's largest real request is a few kB
MAX_STRING = 4096
MAX_MAP_ENTRIES = 256
MAX_LIST_ITEMS = 16

# Option keys Docker puts in CreateNetwork's Options / generic options.
OPT_GENERIC = "com.docker.network.generic"
OPT_ENABLE_IPV6 = "com.docker.network.enable_ipv6"
OPT_ENABLE_IPV4 = "com.docker.network.enable_ipv4"
OPT_INTERNAL = "com.docker.network.internal"
OPT_MTU = "com.docker.network.driver.mtu"
OPT_PORTMAP = "com.docker.network.portmap"
OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
OPT_ICC = "com.docker.network.bridge.enable_icc"
OPT_HOST_BINDING_IPV4 = "com.docker.network.bridge.host_binding_ipv4"
OPT_ENCRYPTED = "encrypted"        # Docker's overlay option, a key alone (-o encrypted) or with true
# --ipam-opt keys (RequestPool's Options)
OPT_NETWORK = "pyflannel.network"  # the flannel network's name
OPT_BACKEND = "pyflannel.backend"  # a new flannel network's backend (vxlan, wireguard)
OPT_IPV6 = "pyflannel.ipv6"        # true: the flannel network is dual stack (IPv4-only otherwise)


@dataclass(frozen=True)
class OptionFlag:
    """A flag of `docker network create` that hands options to pyflannel: `flag KEY=VALUE` reaches the driver given
    to `driver_flag`."""
    flag: str
    keys: tuple[str, ...]
    driver_flag: str


# dockerd (20.10, 26.1) puts the -o map alone in CreateNetwork's generic options and the --ipam-opt map alone in
# RequestPool's: every key there is the user's, and one pyflannel does not know is refused rather than ignored.
DRIVER_OPTIONS = OptionFlag("-o", (OPT_MTU, OPT_MASQUERADE, OPT_ICC, OPT_HOST_BINDING_IPV4, OPT_ENCRYPTED), "-d")
IPAM_OPTIONS = OptionFlag("--ipam-opt", (OPT_NETWORK, OPT_BACKEND, OPT_IPV6), "--ipam-driver")


def swarm_commands(network: str, flannel: str, plugin: str = "", ipam_options: tuple[str, ...] = (),
                   options: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Docker's way to a swarm network for a local-scope driver, as two argv: on every node the config-only network
    `NETWORK-config` that holds pyflannel's IPAM on flannel network `flannel` (with `--ipam-opt` and `-o` KEY=VALUE
    `ipam_options` and `options`), on a manager the swarm network `network` made from it. Swarm's managers give a
    local-scope driver's network neither IPAM driver nor options: each node takes them from its config-only network.
    `pyflannel swarm-network` runs them; the driver's refusal of a swarm network made without them shows them."""
    plugin = plugin or errors.plugin_name
    config = f"{network}-config"
    return (["docker", "network", "create", "--config-only", "--ipam-driver", plugin, "--ipam-opt",
             f"{OPT_NETWORK}={flannel}", *(a for o in ipam_options for a in ("--ipam-opt", o)),
             *(a for o in options for a in ("-o", o)), config],
            ["docker", "network", "create", "-d", plugin, "--scope", "swarm", "--attachable", "--config-from", config,
             network])


PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}   # Docker's PortBinding.Proto numbers
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_TYPE = "com.docker.network.gateway"

_ID = re.compile(r"[0-9A-Za-z]{12,128}")   # always fullmatch: "$" would accept a trailing newline
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


# --- primitive checks ---------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def body_object(body: Any) -> dict:
    if body is None:
        raise ValidationError("", "request body is empty: expected a JSON object")
    if not isinstance(body, dict):
        raise ValidationError("", f"request body must be a JSON object, got {_type_name(body)}")
    return body


def string(obj: dict, key: str, path: str, *, required: bool = True, max_len: int = MAX_STRING) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise ValidationError(path, "is missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise ValidationError(path, f"must be a string, got {_type_name(value)}")
    if len(value) > max_len:
        raise ValidationError(path, f"is longer than {max_len} characters")
    return value


def boolean(obj: dict, key: str, path: str, default: bool = False) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(path, f"must be true or false, got {_type_name(value)}")
    return value


def option_bool(obj: dict, key: str, path: str, default: bool) -> bool:
    """A `-o key=value` option: Docker passes "true"/"false" strings (a JSON boolean is accepted too)."""
    value = obj.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise ValidationError(path, f"must be true or false, got {str(value)[:80]!r}")


def known_options(options: dict, given: OptionFlag, other: OptionFlag) -> None:
    """Every key of `options` is one of the `given` flag's; a key of the `other` flag is refused saying so."""
    for key, value in options.items():
        if key in given.keys:
            continue
        option = key[:80] + (f"={str(value)[:80]}" if value not in (None, "") else "")  # as the user wrote it
        if key in other.keys:
            raise ValidationError(f"{given.flag} {option}", f"{key} is an option of {other.flag}, not of "
                                  f"{given.flag}: give it as `{other.flag} {option}` (with {other.driver_flag} "
                                  f"{errors.plugin_name})")
        raise ValidationError(f"{given.flag} {option}", f"{errors.plugin_name} has no {given.flag} option "
                              f"{key[:80]!r}; its {given.flag} options are {', '.join(given.keys)} (and its "
                              f"{other.flag} options {', '.join(other.keys)})")


def mapping(obj: dict, key: str, path: str) -> dict:
    """An optional JSON object (null or absent = {}), bounded in size."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(path, f"must be an object, got {_type_name(value)}")
    if len(value) > MAX_MAP_ENTRIES:
        raise ValidationError(path, f"has more than {MAX_MAP_ENTRIES} entries")
    return value


def string_map(obj: dict, key: str, path: str) -> dict[str, str]:
    """A map of strings (Docker's map[string]string, e.g. -o key=value options)."""
    value = mapping(obj, key, path)
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValidationError(f"{path}[{k!r}]", f"must be a string, got {_type_name(v)}")
        if len(v) > MAX_STRING:
            raise ValidationError(f"{path}[{k!r}]", f"is longer than {MAX_STRING} characters")
    return value


def object_id(obj: dict, key: str) -> str:
    value = string(obj, key, key)
    if not _ID.fullmatch(value):
        raise ValidationError(key, f"must be a Docker object id (12-128 letters and digits), got {value[:80]!r}")
    return value


# Per IP version: the types and an example of each form, for error messages.
FAMILY = {
    4: (ipaddress.IPv4Network, ipaddress.IPv4Interface, "10.5.34.0/24", "10.5.34.7"),
    6: (ipaddress.IPv6Network, ipaddress.IPv6Interface, "fd00:5:0:27::/64", "fd00:5:0:27::7"),
}


def ip_network(value: str, path: str, version: int = 4):
    network_type, _, example, _ = FAMILY[version]
    try:
        return network_type(value, strict=False)
    except ValueError:
        raise ValidationError(path, f"must be an IPv{version} network like {example}, got {value[:80]!r}") from None


def ip_interface(value: str, path: str, version: int = 4):
    _, interface_type, network, address = FAMILY[version]
    problem = f"must be an IPv{version} address with prefix like {address}/{network.split('/')[1]}, got {value[:80]!r}"
    if "/" not in value:
        raise ValidationError(path, problem)
    try:
        return interface_type(value)
    except ValueError:
        raise ValidationError(path, problem) from None


def any_address(value: str, path: str, with_prefix: bool = False) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of either family (where the pool or the request says which one it must be); `with_prefix`: given
    as address/prefix."""
    try:
        return ipaddress.ip_interface(value).ip if with_prefix else ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(path, f"must be a plain IP address like 10.5.34.7 or fd00:5:0:27::7, got "
                                    f"{value[:80]!r}") from None


def mac_address(value: str, path: str) -> str:
    if not _MAC.fullmatch(value):
        raise ValidationError(path, f"must be a MAC address like 02:42:0a:05:22:07, got {value[:80]!r}")
    return value.lower()


# --- NetworkDriver requests ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IPAMData:
    address_space: str
    pool: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    aux_addresses: dict


@dataclass(frozen=True)
class CreateNetwork:
    network_id: str
    ipv4: list[IPAMData]
    ipv6: list[IPAMData]
    ipv6_requested: bool       # IPv6Data non-empty or enable_ipv6 set
    ipv4_disabled: bool
    internal: bool
    mtu_option: int | None     # -o com.docker.network.driver.mtu=N
    generic: dict
    masquerade: bool = True    # -o com.docker.network.bridge.enable_ip_masquerade=false turns egress NAT off
    icc: bool = True           # -o com.docker.network.bridge.enable_icc=false: containers on this host cut off
    host_binding_ipv4: ipaddress.IPv4Address | None = None  # -o ...host_binding_ipv4=IP: where -p binds by default
    encrypted: bool = False    # -o encrypted: the flannel network must carry its traffic in WireGuard


def _ipam_data(item: Any, path: str, version: int) -> IPAMData:
    if not isinstance(item, dict):
        raise ValidationError(path, f"must be an object, got {_type_name(item)}")
    pool = ip_network(string(item, "Pool", f"{path}.Pool"), f"{path}.Pool", version)
    gw_text = string(item, "Gateway", f"{path}.Gateway", required=False)
    gateway = ip_interface(gw_text, f"{path}.Gateway", version) if gw_text else None
    return IPAMData(address_space=string(item, "AddressSpace", f"{path}.AddressSpace", required=False),
                    pool=pool, gateway=gateway, aux_addresses=mapping(item, "AuxAddresses", f"{path}.AuxAddresses"))


def _ipam_list(body: dict, key: str) -> list:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(key, f"must be a list, got {_type_name(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise ValidationError(key, f"has more than {MAX_LIST_ITEMS} items")
    return value


def mtu_value(value: Any, path: str) -> int:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    # ASCII digits only, like Docker's strconv.Atoi (str.isdigit() takes "²" and other scripts' digits, which int()
    # refuses or reads as ASCII); short enough for int(), leading zeros allowed.
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or len(digits) > 5 or not 68 <= int(digits or "0") <= 65535:
        raise ValidationError(path, f"must be an MTU between 68 and 65535, got {repr(value)[:80]}")
    return int(digits)


def create_network(body: Any) -> CreateNetwork:
    body = body_object(body)
    network_id = object_id(body, "NetworkID")
    options = mapping(body, "Options", "Options")
    generic = mapping(options, OPT_GENERIC, f"Options[{OPT_GENERIC!r}]")
    mtu_option = None
    if generic.get(OPT_MTU) not in (None, "", 0):
        mtu_option = mtu_value(generic[OPT_MTU], f"Options[{OPT_GENERIC!r}][{OPT_MTU!r}]")
    ipv4 = [_ipam_data(item, f"IPv4Data[{i}]", 4) for i, item in enumerate(_ipam_list(body, "IPv4Data"))]
    ipv6 = [_ipam_data(item, f"IPv6Data[{i}]", 6) for i, item in enumerate(_ipam_list(body, "IPv6Data"))]
    enable_ipv6 = boolean(options, OPT_ENABLE_IPV6, f"Options[{OPT_ENABLE_IPV6!r}]")
    enable_ipv4 = boolean(options, OPT_ENABLE_IPV4, f"Options[{OPT_ENABLE_IPV4!r}]", default=True)
    internal = boolean(options, OPT_INTERNAL, f"Options[{OPT_INTERNAL!r}]")
    known_options(generic, DRIVER_OPTIONS, IPAM_OPTIONS)
    masquerade = option_bool(generic, OPT_MASQUERADE, f"-o {OPT_MASQUERADE}", default=True)
    icc = option_bool(generic, OPT_ICC, f"-o {OPT_ICC}", default=True)
    encrypted = option_bool(generic, OPT_ENCRYPTED, f"-o {OPT_ENCRYPTED}", default=OPT_ENCRYPTED in generic)
    return CreateNetwork(network_id=network_id, ipv4=ipv4, ipv6=ipv6, ipv6_requested=bool(ipv6) or enable_ipv6,
                         ipv4_disabled=not enable_ipv4, internal=internal, mtu_option=mtu_option, generic=generic,
                         masquerade=masquerade, icc=icc, host_binding_ipv4=host_binding(generic), encrypted=encrypted)


def host_binding(generic: dict) -> ipaddress.IPv4Address | None:
    """-o com.docker.network.bridge.host_binding_ipv4: the host address a port published without one is bound to;
    None for every address of the host (0.0.0.0 is Docker's default)."""
    path = f"-o {OPT_HOST_BINDING_IPV4}"
    text = string(generic, OPT_HOST_BINDING_IPV4, path, required=False)
    if not text:
        return None
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValidationError(path, f"must be an IPv4 address like 127.0.0.1, got {text[:80]!r}") from None
    return None if address.is_unspecified else address


@dataclass(frozen=True)
class NetworkRef:
    network_id: str


def network_ref(body: Any) -> NetworkRef:
    body = body_object(body)
    return NetworkRef(object_id(body, "NetworkID"))


@dataclass(frozen=True)
class EndpointInterface:
    address: ipaddress.IPv4Interface | None
    mac: str               # "" when Docker left it to the driver
    address6: ipaddress.IPv6Interface | None = None


@dataclass(frozen=True)
class CreateEndpoint:
    network_id: str
    endpoint_id: str
    interface: EndpointInterface | None   # None when Docker sent "Interface": null
    options: dict


def create_endpoint(body: Any) -> CreateEndpoint:
    body = body_object(body)
    network_id, endpoint_id = object_id(body, "NetworkID"), object_id(body, "EndpointID")
    options = mapping(body, "Options", "Options")
    iface = body.get("Interface")
    interface = None
    if iface is not None:
        if not isinstance(iface, dict):
            raise ValidationError("Interface", f"must be an object or null, got {_type_name(iface)}")
        addr_text = string(iface, "Address", "Interface.Address", required=False)
        v6_text = string(iface, "AddressIPv6", "Interface.AddressIPv6", required=False)
        mac_text = string(iface, "MacAddress", "Interface.MacAddress", required=False)
        interface = EndpointInterface(
            address=ip_interface(addr_text, "Interface.Address") if addr_text else None,
            mac=mac_address(mac_text, "Interface.MacAddress") if mac_text else "",
            address6=ip_interface(v6_text, "Interface.AddressIPv6", 6) if v6_text else None)
    return CreateEndpoint(network_id, endpoint_id, interface, options)


@dataclass(frozen=True)
class EndpointRef:
    network_id: str
    endpoint_id: str
    options: dict = field(default_factory=dict)


def endpoint_ref(body: Any) -> EndpointRef:
    """Leave, DeleteEndpoint, EndpointOperInfo, Program/RevokeExternalConnectivity."""
    body = body_object(body)
    return EndpointRef(object_id(body, "NetworkID"), object_id(body, "EndpointID"),
                       mapping(body, "Options", "Options"))


@dataclass(frozen=True)
class PortBinding:
    """One published port: -p [host_ip:]host_port[-host_port_end]:port[/proto]; host_port 0 means any (-P); no
    host_ip (or 0.0.0.0, ::) means every address of the host, of both families."""
    proto: str
    port: int
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    host_port: int
    host_port_end: int


def _port(obj: dict, key: str, path: str, allow_zero: bool) -> int:
    value = obj.get(key, 0)
    if value is None:
        value = 0
    if not isinstance(value, int) or isinstance(value, bool) or not (0 if allow_zero else 1) <= value <= 65535:
        raise ValidationError(path, f"must be a port number{' or 0' if allow_zero else ''}, got {value!r}"[:200])
    return value


def port_bindings(options: dict) -> list[PortBinding]:
    """ProgramExternalConnectivity's Options["com.docker.network.portmap"]."""
    items = options.get(OPT_PORTMAP) or []
    if not isinstance(items, list) or len(items) > MAX_MAP_ENTRIES:
        raise ValidationError(f"Options[{OPT_PORTMAP!r}]", f"must be a list of at most {MAX_MAP_ENTRIES} port bindings")
    found = []
    for i, item in enumerate(items):
        path = f"Options[{OPT_PORTMAP!r}][{i}]"
        if not isinstance(item, dict):
            raise ValidationError(path, f"must be an object, got {_type_name(item)}")
        proto = PROTOCOLS.get(item.get("Proto"))
        if proto is None:
            raise ValidationError(f"{path}.Proto", f"must be 6 (tcp), 17 (udp) or 132 (sctp), got {item.get('Proto')!r}"[:200])
        host_text = string(item, "HostIP", f"{path}.HostIP", required=False)
        host_ip = any_address(host_text, f"{path}.HostIP") if host_text else None
        if host_ip is not None and host_ip.is_unspecified:
            host_ip = None
        port = _port(item, "Port", f"{path}.Port", allow_zero=False)
        host_port = _port(item, "HostPort", f"{path}.HostPort", allow_zero=True)
        end = _port(item, "HostPortEnd", f"{path}.HostPortEnd", allow_zero=True) or host_port
        if end < host_port:
            raise ValidationError(f"{path}.HostPortEnd", f"{end} is below HostPort {host_port}")
        found.append(PortBinding(proto, port, host_ip, host_port, end))
    return found


@dataclass(frozen=True)
class Join:
    network_id: str
    endpoint_id: str
    sandbox_key: str
    options: dict


def join(body: Any) -> Join:
    body = body_object(body)
    return Join(object_id(body, "NetworkID"), object_id(body, "EndpointID"),
                string(body, "SandboxKey", "SandboxKey", required=False), mapping(body, "Options", "Options"))


# --- IpamDriver requests ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestPool:
    address_space: str
    pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    sub_pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    options: dict[str, str]
    v6: bool


def request_pool(body: Any) -> RequestPool:
    body = body_object(body)
    pool_text = string(body, "Pool", "Pool", required=False)
    sub_text = string(body, "SubPool", "SubPool", required=False)
    v6 = boolean(body, "V6", "V6")
    version = 6 if v6 else 4
    request = RequestPool(address_space=string(body, "AddressSpace", "AddressSpace", required=False),
                          pool=ip_network(pool_text, "Pool", version) if pool_text else None,
                          sub_pool=ip_network(sub_text, "SubPool", version) if sub_text else None,
                          options=string_map(body, "Options", "Options"), v6=v6)
    known_options(request.options, IPAM_OPTIONS, DRIVER_OPTIONS)
    return request


@dataclass(frozen=True)
class PoolRef:
    pool_id: str


def pool_ref(body: Any) -> PoolRef:
    body = body_object(body)
    return PoolRef(string(body, "PoolID", "PoolID"))


@dataclass(frozen=True)
class RequestAddress:
    pool_id: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    options: dict[str, str]

    @property
    def is_gateway(self) -> bool:
        return self.options.get(REQUEST_ADDRESS_TYPE) == GATEWAY_TYPE


def _plain_or_cidr(text: str, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # Docker sends a plain IP; accept one with a prefix too, it costs nothing. The pool says which family it must be.
    return any_address(text, path, with_prefix="/" in text)


def request_address(body: Any) -> RequestAddress:
    body = body_object(body)
    pool_id = string(body, "PoolID", "PoolID")
    text = string(body, "Address", "Address", required=False)
    return RequestAddress(pool_id, _plain_or_cidr(text, "Address") if text else None,
                          string_map(body, "Options", "Options"))


@dataclass(frozen=True)
class ReleaseAddress:
    pool_id: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


def release_address(body: Any) -> ReleaseAddress:
    body = body_object(body)
    pool_id = string(body, "PoolID", "PoolID")
    return ReleaseAddress(pool_id, _plain_or_cidr(string(body, "Address", "Address"), "Address"))
