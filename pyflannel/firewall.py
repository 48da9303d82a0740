"""pyflannel's iptables rules, as data: the one definition of what isolates flannel networks, for the driver, the
CNI plugin and pyflanneld.

The driver's (and the CNI plugin's) rules: what each network and each published port needs, in chains of ours.

    nat    PYFLANNEL-NAT-OUT    (first in POSTROUTING)
             -s <lease> ! -d <flannel Network> -j MASQUERADE     egress: leaves with the host's address, unless
                                                                  -o com.docker.network.bridge.enable_ip_masquerade=false
             -o <bridge> -m addrtype --src-type LOCAL -j MASQUERADE          the host's own calls to a published port
             -o <bridge> -s <lease> -m conntrack --ctstate DNAT -j MASQUERADE  hairpin: a container calling a port
                                                                  published on this host, its own or another's
    nat    PYFLANNEL-PORTS      (PREROUTING and OUTPUT, for destinations local to the host)
             -p tcp [-d <host ip>] --dport <host port> -j DNAT --to-destination <container ip>:<port>
    filter PYFLANNEL-ISOLATION  (first in FORWARD)   flannel networks are isolated from each other (and from
             -o <bridge> ! -s <flannel Network> -m conntrack         whatever else routes to the bridge): nothing
                ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP         comes in from outside its Network but replies
                                                                     and published ports, on this host or any other;
             -i <bridge> -o flannel.+ ! -d <flannel Network> -j DROP   and nothing leaves through another flannel
             -i <bridge> -o flannel-wg+ ! -d <flannel Network> -j DROP network's device, VXLAN or WireGuard (egress
                                                                     NAT would give it an address of that network)
             --internal: nothing in or out but the flannel Network
             -i <bridge> ! -d <flannel Network> -j DROP ; -o <bridge> ! -s <flannel Network> -j DROP
             -o com.docker.network.bridge.enable_icc=false: the bridge's containers do not reach one another (the
             -i <bridge> -o <bridge> -m conntrack ! --ctstate DNAT -j DROP     bridge ports are isolated, so this
                                                                  is the routed way round, through the gateway);
                                                                  a port published on the host they do reach
    filter PYFLANNEL-INPUT      (first in INPUT)     the bridge gets route_localnet (for `curl localhost:PORT`);
             -i <bridge> -d 127.0.0.0/8 ! --ctstate RELATED,ESTABLISHED -j DROP    but its containers cannot open
                                                                  connections to the host's loopback
    raw    PYFLANNEL-SOURCES    (first in PREROUTING)  a container sends from its network's lease on this host only
             -i <bridge> -s <lease> -j RETURN                     (any address of it, as Docker's bridge allows),
             -i <bridge> -s fe80::/10 -j RETURN ; -s :: -j RETURN  and IPv6 link-local or unspecified ones for
             -i <bridge> -j DROP                                  neighbour discovery; in both families, whichever
                                                                  the network has (a spoofed source is dropped
                                                                  before conntrack, forwarded or for the host)

The CNI plugin's bridges get the same walls (sources and isolation, `cni_rules`) in chains of its own,
PYFLANNEL-CNI-SOURCES and PYFLANNEL-CNI-ISOLATION, hooked in the same places.

pyflanneld's rules, in one chain it rewrites atomically whenever the networks it serves change (`tunnel_rules`):

    raw    PYFLANNEL-TUNNEL     (first in PREROUTING)
             -s <Network> -p udp --dport <overlay port> -j DROP   containers send no tunnel packets (VXLAN ports,
                                                                  WireGuard ListenPorts), to any host, theirs too
             -s <Network> -d <etcd> -p tcp --dport <etcd port> -j DROP   containers do not talk to etcd
             -p udp --dport <VXLAN port> -m addrtype --dst-type LOCAL -m u32 --u32 <VNI>
                -m set --match-set pyflannel-vtep-<VNI> src -j RETURN     a network's VXLAN frames come from the
             -p udp --dport <VXLAN port> -m addrtype --dst-type LOCAL -j DROP  public addresses of its leases only
                                                                  (an ip set per network and family, kept by the
                                                                  lease events); nothing else reaches the port

A network with IPv6 (`--ipv6`) gets the same rules for its IPv6 lease and Network through ip6tables, in chains of
the same names: isolation (the devices above and flannel-v6.<VNI>), egress masquerade, hairpin, and a DNAT rule per
published port to the container's IPv6 address. Not PYFLANNEL-INPUT: IPv6 has no route_localnet (the kernel never
routes ::1 out of a link), so `[::1]:PORT` is not published.

Traffic between flannel addresses is never masqueraded (flannel's rule). At start the driver rewrites these chains
from its state, so a crash neither loses nor leaks a rule.

flannel's own rules, which pyflanneld keeps for the networks it serves (`masq_chain`, `forward_chain`): the default
network's in flannel v0.20's chains, hooks and comments, so that flanneld and pyflanneld find each other's set as
their own and a swap either way leaves one set; IPv4 and, through ip6tables, IPv6.

    nat    FLANNEL-POSTRTG      (-ip-masq; first in POSTROUTING:
                                 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG)
             -m mark --mark 0x4000/0x4000 -j RETURN               kube-proxy's marked packets: kube-proxy's to NAT
             -s <Network> -d <Network> -j RETURN                  inside the network: the source is kept
             -s <Network> ! -d 224.0.0.0/4 -j MASQUERADE --random-fully        the network to the world
             ! -s <Network> -d <lease> -j RETURN                  the world to this host's containers: kept
             ! -s <Network> -d <Network> -j MASQUERADE --random-fully          the host to other hosts' containers
             (each rule with -m comment --comment "flanneld masq"; IPv6: ff00::/8; --random-fully unless
             -ip-masq-fully-random-disable or iptables is older than 1.6.2)
    filter FLANNEL-FWD          (--iptables-forward-rules; in FORWARD: -m comment --comment "flanneld forward"
                                 -j FLANNEL-FWD, first but below PYFLANNEL-ISOLATION and PYFLANNEL-CNI-ISOLATION)
             -s <Network> -j ACCEPT ; -d <Network> -j ACCEPT       (each with -m comment --comment "flanneld forward")

A named network has no flanneld: its masquerade is the same rules, without the comment and the mark, in
PYFLANNEL-POSTRTG-<VNI> (hooked first in POSTROUTING by -j PYFLANNEL-POSTRTG-<VNI>), and no FLANNEL-FWD (the driver
accepts its bridges' traffic). FLANNEL-FWD accepts anything from or to the default Network, so it must come after
the isolation chains, which drop what crosses from one flannel network to another: flanneld (-I FORWARD) puts its
hook first, pyflanneld puts it back below them. The rules the default network's replace (`replaced_rules`):
flannel v0.13's, straight in POSTROUTING and FORWARD, and pyflannel's earlier PYFLANNEL-POSTRTG.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SOURCES = "PYFLANNEL-SOURCES"
TUNNEL = "PYFLANNEL-TUNNEL"
NAT_OUT = "PYFLANNEL-NAT-OUT"
PORTS = "PYFLANNEL-PORTS"
ISOLATION = "PYFLANNEL-ISOLATION"
INPUT = "PYFLANNEL-INPUT"
# the devices of every flannel network: VXLAN's flannel.<VNI>, WireGuard's flannel-wg and flannel-wg.<VNI>; IPv6
# also leaves through VXLAN's flannel-v6.<VNI> (over an IPv6 underlay; over an IPv4 one through flannel.<VNI>)
OVERLAY_DEVICES = ("flannel.+", "flannel-wg+")
OVERLAY_DEVICES6 = OVERLAY_DEVICES + ("flannel-v6.+",)
CHAINS = (("nat", NAT_OUT), ("nat", PORTS), ("filter", ISOLATION), ("filter", INPUT), ("raw", SOURCES))
# Where our chains are hooked in: (table, built-in chain, rule, first?)
HOOKS = (
    ("nat", "POSTROUTING", ("-j", NAT_OUT), True),
    ("nat", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", PORTS), False),
    ("nat", "OUTPUT", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", PORTS), False),
    ("filter", "FORWARD", ("-j", ISOLATION), True),
    ("filter", "INPUT", ("-j", INPUT), True),
    ("raw", "PREROUTING", ("-j", SOURCES), True),
)
TUNNEL_HOOK = ("raw", "PREROUTING", ("-j", TUNNEL), True)
# the CNI plugin's walls: the same rules in chains of its own
CNI_ISOLATION = "PYFLANNEL-CNI-ISOLATION"
CNI_SOURCES = "PYFLANNEL-CNI-SOURCES"
CNI_CHAINS = (("filter", CNI_ISOLATION), ("raw", CNI_SOURCES))
CNI_HOOKS = (("filter", "FORWARD", ("-j", CNI_ISOLATION), True), ("raw", "PREROUTING", ("-j", CNI_SOURCES), True))
LINK_LOCAL6 = ("fe80::/10", "::/128")  # IPv6 sources a container needs before it has an address (DAD, ND)


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    args: tuple[str, ...]
    v6: bool = False  # an ip6tables rule


@dataclass(frozen=True)
class NetworkSpec:
    """What a network's rules depend on; the IPv4 lease and Network but on an IPv6-only network, the IPv6 ones only
    with --ipv6."""
    bridge: str
    lease: ipaddress.IPv4Network | None
    flannel_network: ipaddress.IPv4Network | None
    masquerade: bool
    internal: bool
    lease6: ipaddress.IPv6Network | None = None
    flannel_network6: ipaddress.IPv6Network | None = None
    icc: bool = True  # its containers reach one another on this host


@dataclass(frozen=True)
class Published:
    """One published port of one container: to its IPv4 address (if it has one) unless the host address is an IPv6
    one, and to its IPv6 address (if it has one) unless the host address is an IPv4 one."""
    proto: str
    host_ip: str            # "" for every address of the host, IPv4 and IPv6
    host_port: int
    container_ip: str       # "" on an IPv6-only network
    port: int
    container_ip6: str = ""

    def describe(self) -> str:
        to = ", ".join(filter(None, (self.container_ip, f"[{self.container_ip6}]" if self.container_ip6 else "")))
        return f"{self.host_ip or '*'}:{self.host_port}/{self.proto} -> {to}:{self.port}"


def network_rules(net: NetworkSpec) -> list[Rule]:
    rules = source_rules(net.bridge, net.lease, net.lease6)
    if net.lease is not None:  # else an IPv6-only network
        rules += _family_rules(net, net.lease, net.flannel_network, OVERLAY_DEVICES, v6=False)
    if net.lease6 is not None:
        rules += _family_rules(net, net.lease6, net.flannel_network6, OVERLAY_DEVICES6, v6=True)
    if net.lease is not None and not net.internal:  # route_localnet is IPv4's alone
        rules.append(Rule("filter", INPUT, ("-i", net.bridge, "-d", "127.0.0.0/8", "-m", "conntrack", "!",
                                            "--ctstate", "RELATED,ESTABLISHED", "-j", "DROP")))
    return rules


def source_rules(bridge: str, lease: ipaddress.IPv4Network | None, lease6: ipaddress.IPv6Network | None,
                 chain: str = SOURCES) -> list[Rule]:
    """A container on `bridge` sends from the bridge's lease only, in both families (a family the network does not
    have: nothing but IPv6's link-local and unspecified sources, so no packet of that family is forwarded)."""
    rules = [Rule("raw", chain, ("-i", bridge, "-s", str(lease), "-j", "RETURN"))] if lease is not None else []
    rules.append(Rule("raw", chain, ("-i", bridge, "-j", "DROP")))
    allowed6 = ((str(lease6),) if lease6 is not None else ()) + LINK_LOCAL6
    rules += [Rule("raw", chain, ("-i", bridge, "-s", source, "-j", "RETURN"), v6=True) for source in allowed6]
    return rules + [Rule("raw", chain, ("-i", bridge, "-j", "DROP"), v6=True)]


def isolation_rules(bridge: str, network, devices: tuple[str, ...], v6: bool, chain: str = ISOLATION) -> list[Rule]:
    """Nothing from outside the bridge's flannel Network comes in but replies and published ports, and nothing
    leaves through another flannel network's device."""
    network = str(network)
    return [Rule("filter", chain, ("-o", bridge, "!", "-s", network, "-m", "conntrack", "!", "--ctstate",
                                   "RELATED,ESTABLISHED,DNAT", "-j", "DROP"), v6),
            *(Rule("filter", chain, ("-i", bridge, "-o", device, "!", "-d", network, "-j", "DROP"), v6)
              for device in devices)]


def cni_rules(bridge: str, lease: ipaddress.IPv4Network | None, network: ipaddress.IPv4Network | None,
              lease6: ipaddress.IPv6Network | None = None, network6: ipaddress.IPv6Network | None = None) -> list[Rule]:
    """A CNI bridge's walls: the driver's source and isolation rules, in the CNI plugin's own chains (the driver
    rewrites its chains from its state at start)."""
    rules = source_rules(bridge, lease, lease6, CNI_SOURCES)
    if lease is not None:
        rules += isolation_rules(bridge, network, OVERLAY_DEVICES, False, CNI_ISOLATION)
    if lease6 is not None:
        rules += isolation_rules(bridge, network6, OVERLAY_DEVICES6, True, CNI_ISOLATION)
    return rules


def _family_rules(net: NetworkSpec, lease, network, devices: tuple[str, ...], v6: bool) -> list[Rule]:
    """The rules of one address family (iptables or ip6tables) but PYFLANNEL-INPUT's."""
    lease, network = str(lease), str(network)
    rules = [] if net.icc else [Rule("filter", ISOLATION, ("-i", net.bridge, "-o", net.bridge, "-m", "conntrack", "!",
                                                           "--ctstate", "DNAT", "-j", "DROP"), v6)]
    if net.internal:
        return rules + [Rule("filter", ISOLATION, ("-i", net.bridge, "!", "-d", network, "-j", "DROP"), v6),
                        Rule("filter", ISOLATION, ("-o", net.bridge, "!", "-s", network, "-j", "DROP"), v6)]
    if net.masquerade:
        rules.append(Rule("nat", NAT_OUT, ("-s", lease, "!", "-d", network, "-j", "MASQUERADE"), v6))
    return rules + isolation_rules(net.bridge, network, devices, v6) + [
        Rule("nat", NAT_OUT, ("-o", net.bridge, "-m", "addrtype", "--src-type", "LOCAL", "-j", "MASQUERADE"), v6),
        Rule("nat", NAT_OUT, ("-o", net.bridge, "-s", lease, "-m", "conntrack", "--ctstate", "DNAT", "-j",
                              "MASQUERADE"), v6),
    ]


def port_rules(ports: list[Published]) -> list[Rule]:
    """The DNAT rules of published ports: IPv4 to the container's IPv4 address, IPv6 to its IPv6 address."""
    rules = []
    for p in ports:
        host_v6 = ":" in p.host_ip
        if p.container_ip and not host_v6:
            rules.append(_dnat(p, p.container_ip, v6=False))
        if p.container_ip6 and (host_v6 or not p.host_ip):
            rules.append(_dnat(p, f"[{p.container_ip6}]", v6=True))
    return rules


def _dnat(p: Published, container: str, v6: bool) -> Rule:
    where = ("-d", p.host_ip) if p.host_ip else ()
    return Rule("nat", PORTS, ("-p", p.proto, *where, "--dport", str(p.host_port), "-j", "DNAT",
                               "--to-destination", f"{container}:{p.port}"), v6)


# --- pyflanneld's tunnel guard -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelSpec:
    """One flannel network a host serves, as its tunnel guard sees it."""
    networks: tuple  # its Network and IPv6Network (ip_network values)
    udp_ports: tuple[int, ...]  # the UDP ports that carry it (VXLAN's Port, WireGuard's ListenPort)
    vni: int | None = None  # VXLAN: its VNI, matched in the VXLAN header
    vxlan_families: tuple[int, ...] = ()  # the IP versions its VXLAN frames arrive over (4; 6 on an IPv6 underlay)


def vtep_set(vni: int, version: int) -> str:
    """The ip set of the public addresses that may send VXLAN frames of `vni` over IP `version`."""
    return f"pyflannel-vtep{'6' if version == 6 else ''}-{vni}"


def _vni_match(vni: int, version: int) -> tuple[str, ...]:
    """u32: the VNI, bytes 4-6 of the VXLAN header after the UDP header (IPv4: after IHL words; IPv6: at 40)."""
    at = "0>>22&0x3C@12" if version == 4 else "52"
    return ("-m", "u32", "--u32", f"{at}>>8={vni:#x}")


def tunnel_rules(specs: list[TunnelSpec], etcd: list[tuple[str, int]] = (), container_tunnels: bool = False,
                 container_etcd: bool = False) -> list[Rule]:
    """pyflanneld's PYFLANNEL-TUNNEL, both families: containers' tunnel packets and etcd connections dropped (unless
    allowed), then each VXLAN network's frames accepted from its set, then the VXLAN ports closed to the rest.
    `etcd`: (address, port) of each endpoint; a loopback address stands for every address of the host."""
    ports = sorted({port for spec in specs for port in spec.udp_ports})
    rules = []
    for version in (4, 6):
        v6 = version == 6
        networks = [str(n) for spec in specs for n in spec.networks if n.version == version]
        if not container_tunnels:
            rules += [Rule("raw", TUNNEL, ("-s", n, "-p", "udp", "--dport", str(p), "-j", "DROP"), v6)
                      for n in networks for p in ports]
        if not container_etcd:
            for address, port in etcd:
                ip = ipaddress.ip_address(address)
                if ip.version != version:
                    continue
                to = ("-m", "addrtype", "--dst-type", "LOCAL") if ip.is_loopback else ("-d", str(ip))
                rules += [Rule("raw", TUNNEL, ("-s", n, *to, "-p", "tcp", "--dport", str(port), "-j", "DROP"), v6)
                          for n in networks]
        local = ("-m", "addrtype", "--dst-type", "LOCAL")
        vxlan = [spec for spec in specs if spec.vni is not None and version in spec.vxlan_families]
        rules += [Rule("raw", TUNNEL, ("-p", "udp", "--dport", str(spec.udp_ports[0]), *local,
                                       *_vni_match(spec.vni, version), "-m", "set", "--match-set",
                                       vtep_set(spec.vni, version), "src", "-j", "RETURN"), v6) for spec in vxlan]
        rules += [Rule("raw", TUNNEL, ("-p", "udp", "--dport", str(port), *local, "-j", "DROP"), v6)
                  for port in sorted({spec.udp_ports[0] for spec in vxlan})]
    return rules


# --- flannel's rules: -ip-masq and --iptables-forward-rules ------------------------------------------------------

FLANNEL_MASQ = "FLANNEL-POSTRTG"
FLANNEL_FORWARD = "FLANNEL-FWD"
NAMED_MASQ = "PYFLANNEL-POSTRTG"  # a named network's: PYFLANNEL-POSTRTG-<VNI>; before issue 28 the default's too
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
# FORWARD's hooks that must run before FLANNEL-FWD's (which accepts the whole default Network)
ISOLATION_HOOKS = tuple(rule for table, chain, rule, _ in HOOKS + CNI_HOOKS if (table, chain) == ("filter", "FORWARD"))


@dataclass(frozen=True)
class HookedChain:
    """A chain holding `rules` (in this order, nothing else) and its one hook: the rule `hook` of the built-in chain
    `builtin`, which jumps to it; inserted first in `builtin`, but after the rules in `below` if there are any."""
    table: str
    chain: str
    builtin: str
    hook: tuple[str, ...]
    rules: tuple[tuple[str, ...], ...]
    v6: bool = False
    below: tuple[tuple[str, ...], ...] = ()


def _flannels(rule: tuple[str, ...], comment: str) -> tuple[str, ...]:
    """`rule` as flanneld writes it: its comment before the target (where `iptables -S` shows it)."""
    target = rule.index("-j")
    return rule[:target] + ("-m", "comment", "--comment", comment) + rule[target:]


def _masquerade(network, lease, random_fully: bool) -> tuple[tuple[str, ...], ...]:
    """flannel's masquerade rules, as v0.13 had them (in POSTROUTING itself)."""
    n, s = str(network), str(lease)
    masquerade = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    return (("-s", n, "-d", n, "-j", "RETURN"),                          # inside the network: the source is kept
            ("-s", n, "!", "-d", MULTICAST[network.version], *masquerade),  # the network to the world
            ("!", "-s", n, "-d", s, "-j", "RETURN"),                     # the world to this host's containers: kept
            ("!", "-s", n, "-d", n, *masquerade))                        # the host to other hosts' containers


def masq_chain(network, lease, random_fully: bool, vni: int | None = None) -> HookedChain:
    """-ip-masq for one address family: flannel v0.20's FLANNEL-POSTRTG for the default network (`vni` None), the
    same rules unmarked in PYFLANNEL-POSTRTG-<VNI> for a named one."""
    rules, v6 = _masquerade(network, lease, random_fully), network.version == 6
    if vni is not None:
        chain = f"{NAMED_MASQ}-{vni}"
        return HookedChain("nat", chain, "POSTROUTING", ("-j", chain), rules, v6)
    rules = (("-m", "mark", "--mark", KUBE_PROXY_MARK, "-j", "RETURN"),) + rules
    return HookedChain("nat", FLANNEL_MASQ, "POSTROUTING", _flannels(("-j", FLANNEL_MASQ), "flanneld masq"),
                       tuple(_flannels(rule, "flanneld masq") for rule in rules), v6)


def forward_chain(network) -> HookedChain:
    """--iptables-forward-rules for one address family: FLANNEL-FWD, below the isolation chains' hooks."""
    n = str(network)
    return HookedChain("filter", FLANNEL_FORWARD, "FORWARD", _flannels(("-j", FLANNEL_FORWARD), "flanneld forward"),
                       tuple(_flannels(rule, "flanneld forward") for rule in (("-s", n, "-j", "ACCEPT"),
                                                                                ("-d", n, "-j", "ACCEPT"))),
                       network.version == 6, ISOLATION_HOOKS)


def replaced_rules(network, lease, masquerade: bool, forward: bool) -> list[Rule]:
    """What the default network's chains replace, to be deleted wherever found: flannel v0.13's rules (no chains:
    POSTROUTING's, with and without --random-fully, and FORWARD's) and the hook of pyflannel's earlier
    PYFLANNEL-POSTRTG."""
    n, v6 = str(network), network.version == 6
    rules = []
    if masquerade:
        v013 = dict.fromkeys(_masquerade(network, lease, False) + _masquerade(network, lease, True))
        rules += [Rule("nat", "POSTROUTING", args, v6) for args in (*v013, ("-j", NAMED_MASQ))]
    if forward:
        rules += [Rule("filter", "FORWARD", (flag, n, "-j", "ACCEPT"), v6) for flag in ("-s", "-d")]
    return rules
