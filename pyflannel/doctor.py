"""`pyflannel doctor`: checks this host for the problems flannel users hit; one line per finding, with its fix.

The map — each check is one small function below, in this order:

    subnet-env  subnet.env exists, parses, and names the config's Network
    etcd        etcd answers and holds a valid network config (<prefix>/config)
    lease       our lease (FLANNEL_SUBNET) is in etcd with more than the renew margin left
    public-ip   no two leases share a PublicIP (autodetection picked the same NAT address on two hosts)
    routes      no foreign route inside the flannel Network is more specific than the Network: it steals traffic
    mtu         vxlan: flannel.<VNI> MTU == FLANNEL_MTU == underlay MTU - 50; host-gw: external MTU == FLANNEL_MTU;
                wireguard: flannel-wg MTU == FLANNEL_MTU == (Backend.MTU or external MTU) - 80
    offload     not both tx-checksum-ip-generic on flannel.<VNI> and MASQUERADE --random-fully (the 63 s delay)
    vxlan-port  UDP Backend.Port is not taken by another socket and not dropped by an iptables INPUT rule
    wireguard   flannel-wg works (wireguard-go answers), has a peer for every lease, and its ListenPort is not
                dropped by an iptables INPUT rule
    forwarding  ip_forward is on and FORWARD lets pyflannel's bridges through
    masquerade  every masqueraded Docker network of pyflannel's has its egress rule
    networks    pyflanneld serves every named flannel network it joined, and every one a Docker network is on
    flanneld    no network served here carries IPv6 over an IPv4 underlay (pyflannel-only) with a flanneld among
                its hosts (a lease without an IPv6 subnet: what a flanneld that cannot do IPv6 writes)
    dns         pyflanneld answers DNS (container names across hosts) on its -dns-address

A finding is a "problem" (exit code 1) or "unknown" (what could not be read; exit code unaffected).
No shell anywhere: `iptables` is run with argument lists of fixed words and a validated port; ethtool features
are read with the SIOCETHTOOL ioctl (pyroute2); routes and links through netlink.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from pyflannel import firewall, localapi, subnetenv
from pyflannel.daemon.backend.vxlan import vxlan_overhead
from pyflannel.daemon.backend.wireguard import WIREGUARD_OVERHEAD
from pyflannel.driver import state as driver_state
from pyflannel.driver.leases import lease_changed_error
from pyflannel.driver.plumbing import BRIDGE_PREFIX
from pyflannel.kernel import iptables, wireguard
from pyflannel.kernel.errors import KernelError
from pyflannel.kernel.links import TX_CHECKSUM
from pyflannel.kernel.entries import RTPROT_PYFLANNEL
from pyflannel.kernel.netlink import Kernel

PROBLEM, UNKNOWN = "problem", "unknown"
RTPROT_KERNEL = 2
PROTO_NAMES = {2: "kernel", 3: "boot", 4: "static", 16: "dhcp", RTPROT_PYFLANNEL: "pyflannel", 186: "bgp", 188: "ospf"}
ROUTE_TYPES = {1: "", 6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw"}


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str  # PROBLEM or UNKNOWN
    message: str
    fix: str = ""


@dataclass
class Facts:
    """What the checks share, read once: subnet.env, etcd (config + leases) and which backend this host runs."""
    subnet_file: str
    endpoints: list[str]
    prefix: str
    margin: timedelta
    env: subnetenv.SubnetEnv | None = None
    env_error: str = ""
    config: object | None = None  # daemon.config.NetworkConfig
    etcd_error: str = ""
    config_error: str = ""
    leases: list | None = None  # None: etcd could not be read
    backend: str | None = None  # "vxlan", "host-gw", "wireguard" or None (unknown)
    vni: int = 1
    port: int = 8472
    kernel: object = field(default=None, repr=False)
    driver_networks: dict | None = None  # pyflannel-driver's networks by id (its state file); None: unreadable
    daemon_networks: list | None = None  # the flannel networks pyflanneld serves (local API); None: no answer
    dns_address: str = ""
    daemon_error: str = ""
    allow_container_tunnels: bool = False  # pyflanneld's flag
    served: dict = field(default_factory=dict)  # name -> (config, leases) of each network served, the default too

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        return self.env.network if self.env else (self.config.network if self.config else None)

    @property
    def own_subnet(self) -> ipaddress.IPv4Network | None:
        return self.env.lease if self.env else None

    @property
    def device(self) -> str:
        if self.backend == "wireguard":
            return "flannel-wg"
        ipv6_only = self.config is not None and not self.config.enable_ipv4
        return f"flannel-v6.{self.vni}" if ipv6_only else f"flannel.{self.vni}"

    def own_lease(self):
        """Our lease in etcd: the one with subnet.env's subnet (its IPv6 subnet on an IPv6-only network)."""
        lease6 = self.env.lease6 if self.env else None
        return next((lease for lease in self.leases or () if lease.subnet == self.own_subnet
                     or lease6 is not None and lease.ipv6_subnet == lease6), None)


# --- gathering -------------------------------------------------------------------------------------------------
def gather(args) -> Facts:
    from pyflannel.daemon import config as netconfig
    from pyflannel.daemon import store as stores
    from pyflannel.daemon.errors import ConfigError
    from pyflannel.daemon.store.base import ConfigNotFound, StoreError

    facts = Facts(args.subnet_file, args.etcd_endpoints,
                  args.etcd_prefix.rstrip("/"), timedelta(minutes=args.subnet_lease_renew_margin), kernel=Kernel(),
                  dns_address=args.dns_address, allow_container_tunnels=args.allow_container_tunnels)
    try:
        facts.env = subnetenv.read(args.subnet_file)
    except subnetenv.SubnetEnvError as e:
        facts.env_error = str(e)
    try:
        store = stores.from_flags(args, timeout=3.0)
        facts.leases, _ = store.leases()
        facts.config = netconfig.parse(store.network_config())
    except ConfigNotFound:
        facts.config_error = f"no network config at {facts.prefix}/config"
    except ConfigError as e:
        facts.config_error = str(e)
    except (StoreError, ValueError) as e:
        facts.etcd_error = str(e)
        facts.leases = None
    try:  # none without a driver on this host
        facts.driver_networks = driver_state.read(os.path.join(args.driver_state_dir, driver_state.STATE_FILE)).networks
    except driver_state.StateError:
        facts.driver_networks = None
    try:
        facts.daemon_networks = localapi.Client(args.api_socket, timeout=3.0).networks()
    except localapi.DaemonError as e:
        facts.daemon_error = str(e)
    if facts.config is not None and facts.leases is not None:
        facts.served[localapi.DEFAULT_NETWORK] = (facts.config, facts.leases)
        for name in {n["name"] for n in facts.daemon_networks or ()} - {localapi.DEFAULT_NETWORK}:
            try:
                child = store.child(name)
                facts.served[name] = (netconfig.parse(child.network_config()), child.leases()[0])
            except (ConfigNotFound, ConfigError, StoreError, ValueError):
                pass  # the networks check says why it is not served
    if facts.config:
        facts.backend, facts.vni, facts.port = facts.config.backend_type, facts.config.vni, facts.config.port
        if facts.config.wireguard:
            facts.port = facts.config.wireguard.listen_port
    else:
        _backend_from_kernel(facts)
    return facts


def _backend_from_kernel(facts: Facts) -> None:
    """Without the config (etcd down), a flannel.<VNI> VXLAN device tells the backend, VNI and port; flannel-wg
    tells WireGuard (its port is the config's default, 51820, unless the config is read)."""
    for iface in facts.kernel.interfaces():
        name = iface.name or ""
        if name == "flannel-wg":
            facts.backend, facts.port = "wireguard", 51820
            return
        if name.startswith("flannel.") and name[8:].isdigit():
            attrs = facts.kernel.vxlan_attrs(iface.index)
            if attrs:
                facts.backend, facts.vni = "vxlan", int(name[8:])
                facts.port = attrs.get("IFLA_VXLAN_PORT") or facts.port
                return


# --- small readers (kernel, /proc, iptables, ethtool) ------------------------------------------------------------
def _iface_by_index(facts: Facts, index: int | None):
    return next((i for i in facts.kernel.interfaces() if i.index == index), None)


def _iface_with_ip(facts: Facts, ip: str):
    return next((i for i in facts.kernel.interfaces() if any(str(a.ip) == ip for a in i.addresses)), None)


def _external_iface(facts: Facts):
    """The interface holding our lease's PublicIP, else the default route's."""
    lease = facts.own_lease()
    return (_iface_with_ip(facts, lease.public_ip) if lease else None) or _default_route_iface(facts)


def _default_route_iface(facts: Facts):
    for r in facts.kernel.all_routes():
        if r["dst_len"] == 0 and r.get("RTA_OIF"):
            return _iface_by_index(facts, r.get("RTA_OIF"))
    return None


def iptables_rules(table: str, chain: str | None = None, v6: bool = False) -> list[list[str]] | str:
    """`iptables -t TABLE -S [CHAIN]` (ip6tables with `v6`) as token lists, or why it could not be read (a str)."""
    try:
        return iptables.listing(table, chain, v6=v6)
    except KernelError as e:
        return str(e)


def udp_socket_inodes(port: int) -> list[int]:
    """Inodes of UDP sockets bound to `port` in this namespace (/proc/net/udp and udp6)."""
    inodes = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(int(cols[9]))
    return inodes


def socket_owner(inode: int) -> str:
    """'name (pid N)' of a process holding socket `inode`, or 'a kernel socket' / 'an unknown process'."""
    if inode == 0:
        return "a kernel socket"
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                with open(f"/proc/{pid}/comm") as f:
                    return f"{f.read().strip()} (pid {pid})"
        except OSError:
            continue
    return "an unknown process"


# --- the checks ----------------------------------------------------------------------------------------------
def check_subnet_env(facts: Facts) -> list[Finding]:
    if facts.env is None:
        return [Finding("subnet-env", PROBLEM, facts.env_error,
                        f"start pyflanneld with -subnet-file {facts.subnet_file} (it writes the file)")]
    stale = "restart pyflanneld (it rewrites subnet.env), then recreate the containers"
    c, env = facts.config, facts.env
    if c and c.enable_ipv4 and env.network != c.network:
        return [Finding("subnet-env", PROBLEM, f"FLANNEL_NETWORK={env.network} in {facts.subnet_file} but the "
                                               f"network config says Network={c.network}: it is stale", stale)]
    if c and env.ipv6_network != (c.ipv6.network if c.ipv6 else None):
        said = f"IPv6Network={c.ipv6.network}" if c.ipv6 else "no IPv6 (EnableIPv6 is not true)"
        return [Finding("subnet-env", PROBLEM, f"FLANNEL_IPV6_NETWORK={env.ipv6_network or '(none)'} in "
                                               f"{facts.subnet_file} but the network config says {said}: it is "
                                               f"stale", stale)]
    return []


def check_etcd(facts: Facts) -> list[Finding]:
    if facts.etcd_error:
        health = facts.endpoints[0].rstrip("/") + "/health" if facts.endpoints else "<endpoint>/health"
        errno_text = re.search(r"\[Errno -?\d+\] [^\"')(]+", facts.etcd_error)
        why = f"{', '.join(facts.endpoints)}: {errno_text.group(0).strip()}" if errno_text else facts.etcd_error
        return [Finding("etcd", PROBLEM, f"etcd unreachable at {why}",
                        f"start etcd or fix -etcd-endpoints; test with: curl {health}")]
    if facts.config_error:
        return [Finding("etcd", PROBLEM, facts.config_error,
                        f"etcdctl put {facts.prefix}/config '{{\"Network\": \"10.5.0.0/16\", "
                        f"\"Backend\": {{\"Type\": \"vxlan\"}}}}' (with your Network)")]
    return []


def check_lease(facts: Facts) -> list[Finding]:
    if facts.leases is None or facts.env is None:
        return [Finding("lease", UNKNOWN, "not checked: " + ("etcd unreachable" if facts.leases is None
                                                              else "no subnet.env"))]
    subnet = facts.own_subnet
    lease = facts.own_lease()
    restart = "restart pyflanneld (it takes the lease again, the same subnet when free) and check its log"
    if lease is None:
        return [Finding("lease", PROBLEM, f"this host's subnet {subnet} (subnet.env) has no lease in etcd", restart)]
    if lease.expiration is None:
        return []  # a reservation: no TTL, never expires
    left = lease.expiration - datetime.now(timezone.utc)
    if left < facts.margin:
        minutes = int(facts.margin.total_seconds() // 60)
        return [Finding("lease", PROBLEM, f"lease {subnet} expires in {max(0, int(left.total_seconds()))} s, "
                                          f"less than the renew margin ({minutes} min): it is not being renewed",
                        restart)]
    return []


def check_public_ips(facts: Facts) -> list[Finding]:
    from pyflannel.daemon.subnets import lease_key
    if facts.leases is None:
        return [Finding("public-ip", UNKNOWN, "not checked: etcd unreachable")]
    by_ip: dict[str, list] = {}
    for lease in facts.leases:
        by_ip.setdefault(lease.public_ip, []).append(lease)
    findings = []
    for ip, leases in sorted(by_ip.items()):
        if len(leases) < 2:
            continue
        subnets = ", ".join(str(lease.subnet) for lease in leases)
        others = [lease for lease in leases if lease.subnet != facts.own_subnet] or leases
        keys = " ".join(f"{facts.prefix}/subnets/{lease_key(lease.subnet)}" for lease in others)
        findings.append(Finding(
            "public-ip", PROBLEM, f"{len(leases)} leases have PublicIP {ip} ({subnets}): traffic for all of them "
                                  f"goes to one host",
            f"give each host its own -public-ip or -iface, then remove the wrong lease: etcdctl rm {keys}"))
    return findings


def check_routes(facts: Facts) -> list[Finding]:
    """Routes inside the Network, more specific than it, that are neither ours (proto 77) nor our lease's bridge."""
    network = facts.network
    if network is None:
        return [Finding("routes", UNKNOWN, "not checked: the flannel Network is unknown (no subnet.env, no config)")]
    routes = list(facts.kernel.all_routes())
    ours = {(r.get("RTA_DST"), r["dst_len"]): r.get("RTA_PRIORITY", 0) for r in routes
            if r["proto"] == RTPROT_PYFLANNEL}
    findings = []
    for r in routes:
        if r["dst_len"] <= network.prefixlen or r["proto"] == RTPROT_PYFLANNEL:
            continue
        dst = ipaddress.IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}")
        if not dst.subnet_of(network):
            continue
        if r["proto"] == RTPROT_KERNEL and dst == facts.own_subnet:
            continue  # our lease's container bridge (connected route)
        if r.get("RTA_PRIORITY", 0) > ours.get((str(dst.network_address), dst.prefixlen), float("inf")):
            continue  # same destination as one of ours but a worse metric: ours wins
        kind = ROUTE_TYPES.get(r["type"], "")
        via = f" via {r.get('RTA_GATEWAY')}" if r.get("RTA_GATEWAY") else ""
        dev = _iface_by_index(facts, r.get("RTA_OIF"))
        spec = " ".join(filter(None, [kind, str(dst)])) + via + (f" dev {dev.name}" if dev else "")
        proto = PROTO_NAMES.get(r["proto"], str(r["proto"]))
        findings.append(Finding("routes", PROBLEM, f"route {spec} (proto {proto}) is inside the flannel Network "
                                                   f"{network} and not pyflannel's: it steals traffic for {dst}",
                                f"ip route del {spec}"))
    return findings


def check_mtu(facts: Facts) -> list[Finding]:
    if facts.env is None or facts.backend is None:
        return [Finding("mtu", UNKNOWN, "not checked: " + ("no subnet.env" if facts.env is None
                                                            else "backend unknown (no config, no flannel device)"))]
    env_mtu = facts.env.mtu
    if facts.backend == "host-gw":
        ext = _external_iface(facts)
        if ext and ext.mtu != env_mtu:
            return [Finding("mtu", PROBLEM, f"FLANNEL_MTU={env_mtu} in subnet.env but the external interface "
                                            f"{ext.name} has MTU {ext.mtu}",
                            "restart pyflanneld (it rewrites subnet.env), then recreate the containers")]
        return []
    index = facts.kernel.link_index(facts.device)
    if index is None:
        return [Finding("mtu", PROBLEM, f"{facts.device} does not exist: no {facts.backend} traffic leaves or "
                                        f"reaches this host", f"start pyflanneld (it creates {facts.device})")]
    devices = [(facts.device, index)]
    index6 = facts.kernel.link_index(f"flannel-v6.{facts.vni}") if facts.backend == "vxlan" else None
    if index6 is not None and index6 != index:
        devices.append((f"flannel-v6.{facts.vni}", index6))
    findings, expected_env = [], []
    for device, index in devices:
        mtu = facts.kernel.link(index).get("IFLA_MTU")
        expected, why = env_mtu, f"FLANNEL_MTU={env_mtu} in subnet.env"
        if facts.backend == "wireguard":
            configured = facts.config.wireguard.mtu if facts.config else None
            underlay = _external_iface(facts)
            if configured or underlay:
                base, what = (configured, "Backend.MTU") if configured else (underlay.mtu, f"{underlay.name} MTU")
                expected, why = base - WIREGUARD_OVERHEAD, f"{what} {base} - {WIREGUARD_OVERHEAD}"
        else:
            attrs = facts.kernel.vxlan_attrs(index)
            underlay = _iface_by_index(facts, attrs.get("IFLA_VXLAN_LINK"))
            overhead = vxlan_overhead(bool(attrs.get("IFLA_VXLAN_LOCAL6")))
            if underlay:
                expected, why = underlay.mtu - overhead, f"{underlay.name} MTU {underlay.mtu} - {overhead}"
        expected_env.append((expected, why))
        if mtu != expected:
            findings.append(Finding("mtu", PROBLEM, f"{device} MTU is {mtu}, expected {expected} ({why}; "
                                                    f"FLANNEL_MTU={env_mtu})", f"ip link set {device} mtu {expected}"))
    expected, why = min(expected_env)  # containers must fit every device their packets may take
    if env_mtu != expected:
        findings.append(Finding("mtu", PROBLEM, f"FLANNEL_MTU={env_mtu} in subnet.env, expected {expected} ({why}): "
                                                f"containers get the wrong MTU",
                                "restart pyflanneld (it rewrites subnet.env), then recreate the containers"))
    return findings


def check_offload(facts: Facts) -> list[Finding]:
    """flannel #1279: VXLAN checksum offload + MASQUERADE --random-fully drops packets (63 s connect delays)."""
    if facts.backend != "vxlan" or facts.kernel.link_index(facts.device) is None:
        return []  # no VXLAN device, nothing to offload
    offload = facts.kernel.tx_checksum_offload(facts.device)
    if offload is None:
        return [Finding("offload", UNKNOWN, f"{TX_CHECKSUM} of {facts.device} is unreadable (ethtool ioctl)")]
    if not offload:
        return []
    nat = iptables_rules("nat")
    if isinstance(nat, str):
        return [Finding("offload", UNKNOWN, f"{TX_CHECKSUM} is on; MASQUERADE rules unreadable: {nat}")]
    random_fully = [r for r in nat if "MASQUERADE" in r and "--random-fully" in r]
    if not random_fully:
        return []
    return [Finding("offload", PROBLEM, f"{TX_CHECKSUM} is on for {facts.device} and MASQUERADE --random-fully "
                                        f"is used ({shlex.join(random_fully[0])}): the kernel's checksum bug drops "
                                        f"VXLAN packets (63 s delays)",
                    f"ethtool -K {facts.device} {TX_CHECKSUM} off")]


def _covers_port(spec: str, port: int) -> bool:
    """iptables port spec ('8472', '8000:9000', multiport '4789,8472') contains `port`."""
    for part in spec.split(","):
        lo, sep, hi = part.partition(":")
        low = int(lo) if lo else 0
        high = (int(hi) if hi else 65535) if sep else low
        if low <= port <= high:
            return True
    return False


def _iface_matches(pattern: str, name: str) -> bool:
    """iptables -i: a trailing '+' matches every name with that beginning."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


PORT_MATCHES = ("--dport", "--dports", "--destination-port", "--destination-ports")
KNOWN_MATCHES = ("-p", "-s", "-d", "-i", "-m", "--comment", *PORT_MATCHES)


def input_verdict(rule: list[str], port: int, underlay: str | None) -> str | None:
    """'block', 'accept' or None (does not clearly apply) for VXLAN packets (udp dport `port` in on `underlay`).

    `rule` is one `iptables -S INPUT` line as tokens: ['-A', 'INPUT', '-p', 'udp', ..., '-j', 'DROP'].
    A rule with a match this reader does not know (negation, conntrack, sets, …) does not clearly apply."""
    for i in range(2, len(rule) - 1, 2):
        opt, value = rule[i], rule[i + 1]
        if opt == "-j":
            return {"DROP": "block", "REJECT": "block", "ACCEPT": "accept"}.get(value)
        if opt not in KNOWN_MATCHES:
            return None
        if opt == "-p" and value not in ("udp", "17"):
            return None
        if opt in PORT_MATCHES and not _covers_port(value, port):
            return None
        if opt == "-i" and underlay and not _iface_matches(value, underlay):
            return None
        if opt == "-m" and value not in ("udp", "multiport", "comment"):
            return None
    return None


def check_vxlan_port(facts: Facts) -> list[Finding]:
    if facts.backend != "vxlan":
        return []
    port = int(facts.port)
    findings = []
    index = facts.kernel.link_index(facts.device)
    if index is None:
        for inode in udp_socket_inodes(port):
            findings.append(Finding("vxlan-port", PROBLEM, f"UDP port {port} (Backend.Port) is taken by "
                                                           f"{socket_owner(inode)}: {facts.device} cannot be created",
                                    f"stop that process, or set another Backend.Port in {facts.prefix}/config"))
    underlay = _iface_by_index(facts, facts.kernel.vxlan_attrs(index).get("IFLA_VXLAN_LINK")) if index else None
    return findings + _input_drops("vxlan-port", "VXLAN", port, underlay)


def _input_drops(check: str, what: str, port: int, underlay) -> list[Finding]:
    """The iptables INPUT rule that drops UDP `port` (the overlay's packets) from the other hosts, if one does."""
    rules = iptables_rules("filter", "INPUT")
    if isinstance(rules, str):
        return [Finding(check, UNKNOWN, f"INPUT rules unreadable: {rules}")]
    for rule in rules:
        verdict = input_verdict(rule, port, underlay.name if underlay else None)
        if verdict == "accept":
            break
        if verdict == "block":
            return [Finding(check, PROBLEM, f"iptables rule `{shlex.join(rule)}` drops {what} (UDP {port}) from "
                                            f"the other hosts", shlex.join(["iptables", "-D", *rule[1:]]))]
    return []


def check_tunnel_guard(facts: Facts) -> list[Finding]:
    """pyflanneld's PYFLANNEL-TUNNEL (raw PREROUTING) closes the VXLAN port to all but the network's hosts and
    drops containers' tunnel packets (unless -allow-container-tunnels)."""
    if facts.backend != "vxlan" or facts.network is None:
        return []
    spec = firewall.TunnelSpec((facts.network,), (int(facts.port),), facts.vni, (4,))
    wanted = [r for r in firewall.tunnel_rules([spec], container_tunnels=facts.allow_container_tunnels)
              if not r.v6]
    table, chain, hook, first = firewall.TUNNEL_HOOK
    restart = "restart pyflanneld (it writes PYFLANNEL-TUNNEL when it starts serving a network)"
    try:
        missing = [r for r in wanted if not iptables.exists(table, r.chain, list(r.args))]
        hooked = iptables.exists(table, chain, list(hook))
    except KernelError as e:
        return [Finding("tunnel-guard", UNKNOWN, f"raw rules unreadable: {e}")]
    if missing and any("--match-set" in r.args for r in missing):
        return [Finding("tunnel-guard", PROBLEM, f"UDP {facts.port} takes VXLAN frames from any address (the "
                                                  f"allow-list of {facts.device}'s hosts is not in "
                                                  f"{firewall.TUNNEL}): anyone can inject into the overlay",
                        restart)]
    if missing:
        return [Finding("tunnel-guard", PROBLEM, f"containers on {facts.network} can send VXLAN frames (no "
                                                  f"`{shlex.join(missing[0].args)}` in {firewall.TUNNEL})", restart)]
    if not hooked:
        return [Finding("tunnel-guard", PROBLEM, f"{firewall.TUNNEL} is not hooked into raw {chain}: UDP "
                                                  f"{facts.port} takes VXLAN frames from any address",
                        shlex.join(["iptables", "-t", table, "-I", chain, "1", *hook]))]
    return []


def check_wireguard(facts: Facts) -> list[Finding]:
    if facts.backend != "wireguard":
        return []
    if facts.kernel.link_index(facts.device) is None:
        return [Finding("wireguard", PROBLEM, f"{facts.device} does not exist: no encrypted traffic leaves or "
                                              f"reaches this host", f"start pyflanneld (it creates {facts.device})")]
    device = wireguard.existing_device(facts.kernel, facts.device)
    if device is None:
        return [Finding("wireguard", PROBLEM, f"{facts.device} has no WireGuard behind it (wireguard-go gone? "
                                              f"{wireguard.uapi_path(facts.device)} does not answer)",
                        f"ip link del {facts.device}; restart pyflanneld (it starts wireguard-go again)")]
    findings = []
    try:
        have = {peer.public_key: peer for peer in device.peers()}
    except (OSError, KernelError) as e:
        return [Finding("wireguard", UNKNOWN, f"the peers of {facts.device} are unreadable: {e}")]
    for lease in facts.leases or ():
        key = (lease.backend_data or {}).get("PublicKey")
        if lease.subnet == facts.own_subnet or lease.backend_type != "wireguard" or not key:
            continue
        peer = have.get(key)
        if peer is None or str(lease.subnet) not in peer.allowed_ips:
            findings.append(Finding("wireguard", PROBLEM, f"{facts.device} has no peer for {lease.subnet} "
                                                          f"({lease.public_ip}, public key {key}): traffic to it is "
                                                          f"dropped", "wait for pyflanneld's reconciler "
                                                                      "(--reconcile-interval), or restart pyflanneld"))
    return findings + _input_drops("wireguard", "WireGuard", int(facts.port), _external_iface(facts))


def check_forwarding(facts: Facts) -> list[Finding]:
    """Container traffic is routed: ip_forward on, and where FORWARD's policy is DROP (Docker sets it; 28.0 always)
    each pyflannel bridge has its two ACCEPT rules."""
    findings = []
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read().strip() != "1":
                findings.append(Finding("forwarding", PROBLEM, "net.ipv4.ip_forward is 0: this host forwards no "
                                                               "container traffic to other hosts or the world",
                                        "sysctl -w net.ipv4.ip_forward=1"))
    except OSError as e:
        findings.append(Finding("forwarding", UNKNOWN, f"net.ipv4.ip_forward is unreadable: {e.strerror}"))
    bridges = sorted(i.name for i in facts.kernel.interfaces() if (i.name or "").startswith(BRIDGE_PREFIX))
    if not bridges or iptables.policy("filter", "FORWARD") != "DROP":
        return findings
    rules = iptables_rules("filter", "FORWARD")
    if isinstance(rules, str):
        return findings + [Finding("forwarding", UNKNOWN, f"FORWARD policy is DROP; its rules are unreadable: {rules}")]
    for bridge in bridges:
        for flag in ("-i", "-o"):
            if ["-A", "FORWARD", flag, bridge, "-j", "ACCEPT"] not in rules:
                findings.append(Finding("forwarding", PROBLEM, f"FORWARD policy is DROP and no rule accepts traffic "
                                                               f"{'from' if flag == '-i' else 'to'} {bridge}: its "
                                                               f"containers are cut off",
                                        f"iptables -A FORWARD {flag} {bridge} -j ACCEPT"))
    return findings


def check_masquerade(facts: Facts) -> list[Finding]:
    """Each Docker network of pyflannel's that masquerades (the default) has its egress rule, per address family
    (ip6tables for a network with --ipv6)."""
    if facts.driver_networks is None:
        return [Finding("masquerade", UNKNOWN, "pyflannel-driver's state file is unreadable (--driver-state-dir)")]
    wanted = [n for n in facts.driver_networks.values() if n.masquerade and not n.internal]
    findings = []
    for v6 in (False, True):
        nets = [(n.bridge, *((n.pool6, n.flannel_network6) if v6 else (n.pool, n.flannel_network))) for n in wanted]
        nets = [net for net in nets if all(net)]
        if not nets:
            continue
        rules = iptables_rules("nat", firewall.NAT_OUT, v6)
        rules = [] if isinstance(rules, str) else rules
        for bridge, pool, network in nets:
            rule = ["-A", firewall.NAT_OUT, "-s", pool, "!", "-d", network, "-j", "MASQUERADE"]
            if rule not in rules:
                findings.append(Finding("masquerade", PROBLEM, f"no masquerade rule for {pool} (bridge {bridge}): "
                                                               f"its containers reach nothing outside {network}",
                                        "restart pyflannel-driver (it rewrites its rules at start)"))
    return findings


def check_networks(facts: Facts) -> list[Finding]:
    if facts.daemon_networks is None:
        return [Finding("networks", UNKNOWN, f"not checked: {facts.daemon_error}")]
    served = {n["name"]: n for n in facts.daemon_networks}
    findings = []
    for n in facts.daemon_networks:
        if n["state"] == "failed":
            findings.append(Finding("networks", PROBLEM, f"flannel network {n['name']} is not served: {n['error']}",
                                    "fix its config in etcd and restart pyflanneld, or remove its Docker network"))
    for nid, net in (facts.driver_networks or {}).items():
        name = net.flannel
        if name and name not in served:
            findings.append(Finding("networks", PROBLEM, f"Docker network on bridge {net.bridge} uses flannel "
                                                         f"network {name}, which pyflanneld does not serve",
                                    f"remove the Docker network and create it again with --ipam-opt "
                                    f"pyflannel.network={name}"))
            continue
        now = served.get(name or localapi.DEFAULT_NETWORK, {})
        change = net.lease_change(now.get("lease"), now.get("ipv6_lease"))
        if now.get("state") == "ready" and change:
            steps = lease_changed_error(name, change, [nid])
            findings.append(Finding("networks", PROBLEM, f"Docker network {nid[:12]} (bridge {net.bridge}) "
                                                         f"is on a lease this host no longer holds",
                                    str(steps)))
    return findings


def check_flanneld(facts: Facts) -> list[Finding]:
    """A dual-stack network whose hosts have no IPv6 underlay carries IPv6 inside IPv4, in leases without PublicIPv6:
    pyflannel's alone (flanneld v0.14+ dereferences the missing address and programs none of the host's routes).
    flanneld's leases look like pyflannel's, but on a dual-stack network one without an IPv6 subnet is a host that
    cannot do IPv6: a flanneld (v0.13 or older; later ones refuse to start there without an IPv6 underlay)."""
    findings = []
    for name, (config, leases) in sorted(facts.served.items()):
        if config.ipv6 is None or not config.enable_ipv4:
            continue
        over_v4 = sorted({lease.public_ip for lease in leases if lease.ipv6_subnet and not lease.public_ipv6})
        no_v6 = sorted({lease.public_ip for lease in leases if lease.ipv6_subnet is None})
        if over_v4 and no_v6:
            default = name == localapi.DEFAULT_NETWORK
            where = f"{facts.prefix}/config" if default else f"{facts.prefix}/{name}/config"
            findings.append(Finding(
                "flanneld", PROBLEM,
                f"{'the default network' if default else f'network {name}'} is pyflannel-only: host(s) "
                f"{', '.join(over_v4)} carry its IPv6 over an IPv4 underlay (leases without PublicIPv6), which "
                f"flanneld cannot read; host(s) {', '.join(no_v6)} hold a lease without an IPv6 subnet, as a flanneld "
                f"writes (or a pyflanneld not restarted since IPv6 was added to {where})",
                f"run pyflanneld on {', '.join(no_v6)}, or make the network IPv4-only: remove EnableIPv6 and "
                f"IPv6Network from {where} and restart pyflanneld on its hosts"))
    return findings


def check_dns(facts: Facts) -> list[Finding]:
    if not facts.dns_address:
        return []  # -dns-address "": no DNS on purpose
    from dnslib import DNSError, DNSRecord
    query = DNSRecord.question("pyflannel-doctor.invalid")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(query.pack(), (facts.dns_address, 53))
            if DNSRecord.parse(sock.recv(4096)).header.id == query.header.id:
                return []
    except (OSError, DNSError):
        pass
    return [Finding("dns", PROBLEM, f"nothing answers DNS on {facts.dns_address}:53: containers on other hosts "
                                    f"cannot be found by name",
                    f"start pyflanneld with -dns-address {facts.dns_address} (port 53 must be free there), and give "
                    f"dockerd \"dns\": [\"{facts.dns_address}\"]")]


CHECKS = [
    ("subnet-env", "subnet.env exists and parses", check_subnet_env),
    ("etcd", "etcd answers and holds a valid network config", check_etcd),
    ("lease", "our lease is in etcd with more than the renew margin left", check_lease),
    ("public-ip", "no two leases share a PublicIP", check_public_ips),
    ("routes", "no foreign route inside the flannel Network steals its traffic", check_routes),
    ("mtu", "flannel device / subnet.env / underlay MTUs agree", check_mtu),
    ("offload", "no VXLAN checksum offload together with MASQUERADE --random-fully", check_offload),
    ("vxlan-port", "the VXLAN UDP port is free for us and not dropped by iptables", check_vxlan_port),
    ("tunnel-guard", "the VXLAN port takes only the cluster's hosts, and no container's frames", check_tunnel_guard),
    ("wireguard", "flannel-wg works, has every peer, and its UDP port is not dropped", check_wireguard),
    ("forwarding", "ip_forward is on and FORWARD lets pyflannel's bridges through", check_forwarding),
    ("masquerade", "every masqueraded Docker network of pyflannel's has its egress rule", check_masquerade),
    ("networks", "pyflanneld serves every named flannel network it joined or Docker uses", check_networks),
    ("flanneld", "no flanneld host in a network that carries IPv6 over an IPv4 underlay", check_flanneld),
    ("dns", "pyflanneld answers DNS for container names", check_dns),
]


def diagnose(facts: Facts) -> dict:
    findings, checks = [], {}
    for name, _, check in CHECKS:
        try:
            found = check(facts)
        except Exception as e:  # noqa: BLE001 - one broken reader must not hide the other checks
            found = [Finding(name, UNKNOWN, f"check failed: {type(e).__name__}: {e}")]
        findings += found
        checks[name] = PROBLEM if any(f.severity == PROBLEM for f in found) else UNKNOWN if found else "ok"
    return {"checks": checks, "findings": [asdict(f) for f in findings],
            "problems": sum(f.severity == PROBLEM for f in findings)}


def render(report: dict) -> str:
    lines = []
    for name, description, _ in CHECKS:
        found = [f for f in report["findings"] if f["check"] == name]
        if not found:
            lines.append(f"ok       {name:<11} {description}")
        for f in found:
            fix = f"  -> fix: {f['fix']}" if f["fix"] else ""
            lines.append(f"{f['severity'].upper():<8} {name:<11} {f['message']}{fix}")
    n = report["problems"]
    lines.append("no problems found" if n == 0 else f"{n} problem{'s' if n > 1 else ''} found")
    return "\n".join(lines)


def run(args) -> int:
    report = diagnose(gather(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["problems"] else 0
