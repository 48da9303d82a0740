"""flannel's CNI conflist entry -> the delegate config that does the work; saved per container for DEL.

    {"type": "pyflannel", "name": "pfnet", "cniVersion": "1.0.0",
     "network": "shop",                            optional: a named flannel network (default: <prefix>/config's)
     "backend": "wireguard",                       optional: a new "network"'s backend (vxlan by default)
     "ipv6": true,                                 optional: "network" is dual stack (IPv4-only by default)
     "daemonSocket": "/run/flannel/pyflanneld.sock",  optional: pyflanneld's local API, to join "network"
     "subnetFile": "/run/flannel/subnet.env",      optional, flannel's default
     "dataDir": "/var/lib/cni/flannel",            optional, where each container's delegate config is kept
     "delegate": {"hairpinMode": true, ...},       optional keys for the delegate (type defaults to "bridge")
     "ipam": {"routes": [...], "dataDir": ...}}    optional, completed from subnet.env

The delegate is built with flannel's rules (cni-plugin doCmdAdd): name from the config, type "bridge", ipMasq =
not FLANNEL_IPMASQ, mtu = FLANNEL_MTU, isGateway for a bridge, and host-local IPAM with a range set per family the
lease has, [[{"subnet": FLANNEL_SUBNET's network}], [{"subnet": FLANNEL_IPV6_SUBNET's network}]] (dual stack; just
one of them for an IPv4-only or an IPv6-only network), and routes to FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK. The
result is written to dataDir/<container id> before the attach, so that DEL works with the exact config ADD used,
also when subnet.env is gone or has changed.

With "network", the lease is the host's lease in that named flannel network (its subnet.env is
<subnetFile's folder>/networks/<network>.env); the first ADD on a host asks pyflanneld to join the network, which
writes the network's config to etcd if no host did yet (dual stack with "ipv6": true; without it a new network is
IPv4-only, as every flanneld can serve it). Its bridge defaults to cni-<network> (not cni0: each flannel
network needs a bridge of its own).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from pyflannel import localapi, paths, subnetenv
from pyflannel.files import write_atomically

from .protocol import INVALID_CONFIG, IO_FAILURE, TRY_AGAIN_LATER, CniError

DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
# What bridge.py implements; a delegate config with anything else is run by the real plugin from CNI_PATH.
NATIVE_KEYS = {"type", "name", "cniVersion", "bridge", "mtu", "isGateway", "isDefaultGateway", "hairpinMode",
               "ipMasq", "ipam", "runtimeConfig"}
NATIVE_IPAM_KEYS = {"type", "ranges", "routes", "dataDir"}
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True)
class FlannelConf:
    name: str
    version: str
    network: str          # "" for the default flannel network
    backend: str | None   # the named network's backend, when this host creates it
    ipv6: bool            # the named network must be dual stack
    daemon_socket: str
    subnet_file: str
    data_dir: str
    delegate: dict
    ipam: dict
    runtime_config: dict | None


def _field(config: dict, key: str, kind: type, default, what: str):
    value = config.get(key, default)
    if not isinstance(value, kind):
        raise CniError(INVALID_CONFIG, f"network config: {key!r} must be {what}, got {json.dumps(value)}")
    return value


def parse(config: dict) -> FlannelConf:
    name = _field(config, "name", str, "", "a string")
    if not NETWORK_NAME.match(name):
        raise CniError(INVALID_CONFIG, f"network config: 'name' {name!r} is not a valid network name",
                       "letters, digits, '_', '.' and '-', starting with a letter or digit")
    delegate = dict(_field(config, "delegate", dict, {}, "an object"))
    if "type" in delegate and not (isinstance(delegate["type"], str) and delegate["type"]):
        raise CniError(INVALID_CONFIG, "network config: 'delegate.type' must be a plugin name (a string)")
    for key in ("name", "ipam"):
        if key in delegate:
            raise CniError(INVALID_CONFIG, f"network config: 'delegate' must not have {key!r}: it is set by the "
                                           f"plugin (put IPAM options in the top-level 'ipam')")
    network = _field(config, "network", str, "", "a flannel network's name")
    network = "" if network == localapi.DEFAULT_NETWORK else network
    if network and localapi.name_problem(network):
        raise CniError(INVALID_CONFIG, f"network config: 'network': {localapi.name_problem(network)}")
    backend = _field(config, "backend", (str, type(None)), None, "vxlan or wireguard")
    if backend is not None and (backend not in localapi.BACKENDS or not network):
        raise CniError(INVALID_CONFIG, f"network config: 'backend' {backend!r}: use "
                                       f"{' or '.join(localapi.BACKENDS)}, with 'network' (the default network's "
                                       f"backend is in its etcd config)")
    ipv6 = _field(config, "ipv6", bool, False, "true or false")
    if ipv6 and not network:
        raise CniError(INVALID_CONFIG, "network config: 'ipv6' goes with 'network' (the default network's IPv6 is in "
                                       "its etcd config)")
    subnet_file = _field(config, "subnetFile", str, paths.SUBNET_FILE, "a path")
    data_dir = _field(config, "dataDir", str, DEFAULT_DATA_DIR, "a path")
    daemon_socket = _field(config, "daemonSocket", str, paths.DAEMON_SOCKET, "a path")
    for key, path in (("subnetFile", subnet_file), ("dataDir", data_dir), ("daemonSocket", daemon_socket)):
        if not os.path.isabs(path):
            raise CniError(INVALID_CONFIG, f"network config: {key!r} must be an absolute path, got {path!r}")
    if network:
        delegate.setdefault("bridge", bridge_for(network))
    return FlannelConf(name=name, version=config["cniVersion"], network=network, backend=backend, ipv6=ipv6,
                       daemon_socket=daemon_socket,
                       subnet_file=subnet_file, data_dir=data_dir,
                       delegate=delegate, ipam=dict(_field(config, "ipam", dict, {}, "an object")),
                       runtime_config=_field(config, "runtimeConfig", (dict, type(None)), None, "an object"))


DEFAULT_BRIDGE = "cni0"  # the bridge plugin's, for the default network


def bridge_for(network: str) -> str:
    """A named network's default bridge: cni-<network>, or cni-<hash> where the name is too long for a link."""
    name = f"cni-{network}"
    return name if len(name) <= 15 else f"cni-{hashlib.sha1(network.encode()).hexdigest()[:11]}"


def read_subnet_env(conf: FlannelConf) -> subnetenv.SubnetEnv:
    path = paths.network_env_file(conf.subnet_file, conf.network)
    if conf.network and not os.path.exists(path):
        try:
            localapi.Client(conf.daemon_socket).join(conf.network, backend=conf.backend, ipv6=conf.ipv6)
        except localapi.DaemonError as e:
            raise CniError(TRY_AGAIN_LATER, f"cannot join flannel network {conf.network}: {e}") from None
    try:
        return subnetenv.read(path)
    except subnetenv.SubnetEnvError as e:
        what = f"lease in flannel network {conf.network}" if conf.network else "flannel lease"
        raise CniError(TRY_AGAIN_LATER, f"no {what} on this host: {e}") from None


def build_delegate(conf: FlannelConf, env: subnetenv.SubnetEnv) -> dict:
    """flannel's delegate config for this host's lease."""
    delegate = {**conf.delegate, "name": conf.name, "cniVersion": conf.version}
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    routes = conf.ipam.get("routes", [])
    if not isinstance(routes, list):
        raise CniError(INVALID_CONFIG, f"network config: 'ipam.routes' must be a list, got {json.dumps(routes)}")
    leases = [lease for lease in (env.lease, env.lease6) if lease is not None]
    networks = [network for network in (env.network, env.ipv6_network) if network is not None]
    delegate["ipam"] = {"type": "host-local", **conf.ipam, "ranges": [[{"subnet": str(lease)}] for lease in leases],
                        "routes": [*routes, *({"dst": str(network)} for network in networks)]}
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    return delegate


def why_not_native(delegate: dict) -> str | None:
    """None when bridge.py implements every key of the delegate config, else what it does not implement."""
    ipam = delegate.get("ipam", {})
    if delegate.get("type") != "bridge":
        return f"delegate type {delegate.get('type')!r}"
    if not isinstance(ipam, dict) or ipam.get("type") != "host-local":
        return f"ipam type {ipam.get('type') if isinstance(ipam, dict) else ipam!r}"
    extra = sorted(set(delegate) - NATIVE_KEYS) + sorted(f"ipam.{k}" for k in set(ipam) - NATIVE_IPAM_KEYS)
    if extra:
        return f"key(s) {', '.join(extra)}"
    if delegate.get("isGateway") is not True and delegate.get("isDefaultGateway") is not True:
        return "isGateway false"
    ranges = ipam.get("ranges")
    if not (isinstance(ranges, list) and len(ranges) in (1, 2)
            and all(isinstance(s, list) and len(s) == 1 and isinstance(s[0], dict) for s in ranges)):
        return "ipam.ranges other than one range, or one IPv4 and one IPv6 range"
    if len({":" in str(s[0].get("subnet")) for s in ranges}) != len(ranges):  # an IPv6 subnet has a colon
        return "ipam.ranges: two ranges of one address family"
    return None


class SavedDelegates:
    """flannel's scratch configs: dataDir/<container id> holds the delegate config ADD used (mode 0600)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir

    def _path(self, container_id: str) -> str:
        return os.path.join(self.data_dir, container_id)

    def save(self, container_id: str, delegate: dict) -> None:
        """Not synced to disk, as flannel's plugin does not: after a crash the container is gone with it, and an
        fsync would be most of an ADD's tail latency."""
        try:
            write_atomically(self._path(container_id), json.dumps(delegate), mode=0o600, folder_mode=0o700,
                             durable=False)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot save the delegate config in {self.data_dir}: {e.strerror}") from None

    def load(self, container_id: str) -> dict | None:
        try:
            with open(self._path(container_id)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CniError(IO_FAILURE, f"cannot read the saved delegate config {self._path(container_id)}: "
                                       f"{getattr(e, 'strerror', None) or e}") from None

    def remove(self, container_id: str) -> None:
        try:
            os.unlink(self._path(container_id))
        except FileNotFoundError:
            pass
