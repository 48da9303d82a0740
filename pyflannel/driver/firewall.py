"""The driver's iptables rules, as data: what each network and each published port needs, in four chains of ours.

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
    filter PYFLANNEL-INPUT      (first in INPUT)     the bridge gets route_localnet (for `curl localhost:PORT`);
             -i <bridge> -d 127.0.0.0/8 ! --ctstate RELATED,ESTABLISHED -j DROP    but its containers cannot open
                                                                  connections to the host's loopback

Traffic between flannel addresses is never masqueraded (flannel's rule). At start the driver rewrites these chains
from its state, so a crash neither loses nor leaks a rule.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

NAT_OUT = "PYFLANNEL-NAT-OUT"
PORTS = "PYFLANNEL-PORTS"
ISOLATION = "PYFLANNEL-ISOLATION"
INPUT = "PYFLANNEL-INPUT"
# the devices of every flannel network: VXLAN's flannel.<VNI>, WireGuard's flannel-wg and flannel-wg.<VNI>
OVERLAY_DEVICES = ("flannel.+", "flannel-wg+")
CHAINS = (("nat", NAT_OUT), ("nat", PORTS), ("filter", ISOLATION), ("filter", INPUT))
# Where our chains are hooked in: (table, built-in chain, rule, first?)
HOOKS = (
    ("nat", "POSTROUTING", ("-j", NAT_OUT), True),
    ("nat", "PREROUTING", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", PORTS), False),
    ("nat", "OUTPUT", ("-m", "addrtype", "--dst-type", "LOCAL", "-j", PORTS), False),
    ("filter", "FORWARD", ("-j", ISOLATION), True),
    ("filter", "INPUT", ("-j", INPUT), True),
)


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class NetworkSpec:
    """What a network's rules depend on."""
    bridge: str
    lease: ipaddress.IPv4Network
    flannel_network: ipaddress.IPv4Network
    masquerade: bool
    internal: bool


@dataclass(frozen=True)
class Published:
    """One published port of one container."""
    proto: str
    host_ip: str            # "" for every address of the host
    host_port: int
    container_ip: str
    port: int

    def describe(self) -> str:
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}/{self.proto} -> {self.container_ip}:{self.port}"


def network_rules(net: NetworkSpec) -> list[Rule]:
    lease, network = str(net.lease), str(net.flannel_network)
    if net.internal:
        return [Rule("filter", ISOLATION, ("-i", net.bridge, "!", "-d", network, "-j", "DROP")),
                Rule("filter", ISOLATION, ("-o", net.bridge, "!", "-s", network, "-j", "DROP"))]
    rules = [Rule("nat", NAT_OUT, ("-s", lease, "!", "-d", network, "-j", "MASQUERADE"))] if net.masquerade else []
    return rules + [
        Rule("filter", ISOLATION, ("-o", net.bridge, "!", "-s", network, "-m", "conntrack", "!", "--ctstate",
                                   "RELATED,ESTABLISHED,DNAT", "-j", "DROP")),
        *(Rule("filter", ISOLATION, ("-i", net.bridge, "-o", devices, "!", "-d", network, "-j", "DROP"))
          for devices in OVERLAY_DEVICES),
        Rule("nat", NAT_OUT, ("-o", net.bridge, "-m", "addrtype", "--src-type", "LOCAL", "-j", "MASQUERADE")),
        Rule("nat", NAT_OUT, ("-o", net.bridge, "-s", lease, "-m", "conntrack", "--ctstate", "DNAT", "-j",
                              "MASQUERADE")),
        Rule("filter", INPUT, ("-i", net.bridge, "-d", "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate",
                               "RELATED,ESTABLISHED", "-j", "DROP")),
    ]


def port_rule(p: Published) -> Rule:
    where = ("-d", p.host_ip) if p.host_ip else ()
    return Rule("nat", PORTS, ("-p", p.proto, *where, "--dport", str(p.host_port), "-j", "DNAT",
                               "--to-destination", f"{p.container_ip}:{p.port}"))
