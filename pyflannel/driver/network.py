"""NetworkDriver: a Docker network per flannel network, bridged onto this host's lease in it.

Decisions (see docs/driver.md):
- One Docker network per flannel network per host. A host has one lease in each flannel network and the lease's
  gateway lives on one bridge, so a second Docker network on the same flannel network is refused with a message
  naming the existing one: by RequestPool (which Docker calls first; answering the same pool again would make dockerd
  loop, see ipam.py) and, for networks made with another IPAM driver, by CreateNetwork. Docker's rollback after a
  refused CreateNetwork cannot hurt the first network. Networks on different flannel networks (the default one and
  those named with `--ipam-opt pyflannel.network=NAME`) are isolated from each other (firewall.py).
- The network's subnet must be this host's lease and its gateway the lease's first address, whoever did the IPAM:
  with `--ipam-driver pyflannel` that is automatic; with another IPAM driver only `--subnet <lease>` is accepted.
- MTU: FLANNEL_MTU (the overlay's MTU), or the lower `-o com.docker.network.driver.mtu=N`; a higher option is
  refused, naming FLANNEL_MTU (bigger packets would not cross the overlay, and `docker network inspect` would show
  an MTU not in force). Read from subnet.env at each Join, so an MTU change by pyflanneld reaches new containers
  (the lower of the two, if FLANNEL_MTU drops below the option).
- Every handler is idempotent: a repeated Create/Join gives the same answer, Delete/Leave of an unknown id succeed.
- CreateEndpoint only records the endpoint (and picks a MAC); Join creates the veth pair, Leave deletes it.
- Like Docker's bridge: containers reach the world masqueraded (unless -o
  com.docker.network.bridge.enable_ip_masquerade=false), and -p/-P publish ports on the host's addresses (-o
  com.docker.network.bridge.host_binding_ipv4=IP: on IP alone, where -p names no address), with hairpin and localhost
  access (firewall.py). -o com.docker.network.bridge.enable_icc=false: the network's containers on this host do not
  reach one another (isolated bridge ports, and a FORWARD rule for the way round through the gateway); those of
  other hosts still do, arriving routed from the flannel device as every other host's containers do. An --internal
  network reaches the flannel Network only: no gateway, no NAT, no published ports.
- -o encrypted (Docker's overlay option): the flannel network must be a WireGuard one, else the network is refused.
- Every -o and --ipam-opt key pyflannel does not know is refused (validation.py), naming the flag that takes it.
- --ipv6: the same for the host's IPv6 lease in the flannel network (second pool, IPv6Data): the bridge holds both
  gateways, containers get both addresses and default routes (GatewayIPv6), the rules exist in ip6tables too.
  Docker 28's --ipv4=false --ipv6 makes an IPv6-only network: its record's pool, gateway, flannel_network are None.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re

from pyflannel import firewall, localapi
from pyflannel.kernel.links import mac_for, random_mac

from . import validation as v
from .errors import PlumbingError, RefusedError, UnavailableError, ValidationError, create_command
from .leases import (LeaseSource, describe_flannel, existing_network_error, ipv6_only_error, lease_changed_error,
                     no_ipv6_error)
from .plumbing import BRIDGE_PREFIX, VETH_CONTAINER_PREFIX, VETH_HOST_PREFIX, Plumbing, bridge_name, veth_names
from .records import EndpointRecord, NetworkRecord
from .state import DriverState, StateStore

log = logging.getLogger(__name__)

EPHEMERAL_PORTS = (49153, 65535)  # Docker's range for -P


def effective_mtu(flannel_mtu: int, option: int | None) -> int:
    return min(flannel_mtu, option) if option else flannel_mtu


# A swarm network's ID is made by swarm's managers: 25 lower-case letters and digits (dockerd's own are 64 hex).
SWARM_ID = re.compile(r"[0-9a-z]{25}")
DOCKER_ADDRESS_SPACES = ("LocalDefault", "GlobalDefault")  # the pools of Docker's default IPAM


def swarm_pool_error(pool) -> RefusedError:
    """A swarm network made without a config-only network: swarm gave it a pool of Docker's default IPAM."""
    config_only, swarm = (" ".join(argv) for argv in v.swarm_commands("NAME", "NAME"))
    return RefusedError(
        f"subnet {pool} comes from Docker's default IPAM: swarm gives a local-scope driver's network neither its "
        f"IPAM driver nor its options; each node takes them from a config-only network of its own. Remove this "
        f"network (`docker network rm NAME` on a manager, once no service uses it), then run `pyflannel "
        f"swarm-network NAME` on every node, also on a node that joins later; by hand: `{config_only}` on every "
        f"node, then `{swarm}` on a manager")


def check_pool(data: v.IPAMData, subnet: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
               network_id: str = "") -> None:
    """A CreateNetwork pool must be this host's lease (`subnet`: its first address, the gateway, with its prefix)."""
    family = "" if subnet.version == 4 else "IPv6 "
    if data.pool != subnet.network:
        if SWARM_ID.fullmatch(network_id) and data.address_space in DOCKER_ADDRESS_SPACES:
            raise swarm_pool_error(data.pool)
        raise RefusedError(
            f"subnet {data.pool} is not this host's flannel {family}lease {subnet.network}: a pyflannel network must "
            f"use the lease pyflanneld got for this host. Create it with `{create_command()}` (or, with another IPAM "
            f"driver, --subnet {subnet.network})")
    if data.gateway is not None and data.gateway.ip != subnet.ip:
        raise RefusedError(f"gateway {data.gateway.ip} is not the first address of this host's {family}lease "
                           f"({subnet.ip}): create the network without --gateway")


def without_family(version: int) -> str:
    """How a network came to lack an address family, for messages."""
    return "created without --ipv6" if version == 6 else "IPv6-only: created with --ipv4=false"


def check_address(field: str, address, pool: str | None, gateway: str | None) -> None:
    """An endpoint's address (of either family) must be in the network's pool of that family and not its gateway."""
    if pool is None:
        raise RefusedError(f"{field} {address}: the network has no IPv{address.version} pool (it was "
                           f"{without_family(address.version)})")
    if address.network != ipaddress.ip_network(pool):
        raise RefusedError(f"{field} {address} is not in the network's subnet {pool}")
    if address.ip == ipaddress.ip_interface(gateway).ip:
        raise RefusedError(f"{field} {address} is the network's gateway")


class NetworkDriver:
    def __init__(self, store: StateStore, lease: LeaseSource, plumbing: Plumbing,
                 daemon: localapi.Client | None = None):
        self.store = store
        self.lease = lease
        self.plumbing = plumbing
        self.daemon = daemon  # told to leave a named flannel network when its last pool goes
        self.reconcile_pending = False  # the start-up reconcile found no lease yet: done at the first Join

    @staticmethod
    def capabilities() -> dict:
        # Scope local: Docker keeps the network to this host (no swarm manager redirect); ConnectivityScope global:
        # containers of the same-named network on other hosts are reachable (through flannel).
        return {"Scope": "local", "ConnectivityScope": "global"}

    # --- networks ---------------------------------------------------------------------------------------------------

    def create_network(self, req: v.CreateNetwork) -> dict:
        if req.ipv4_disabled and not req.ipv6_requested:
            raise RefusedError("--ipv4=false needs --ipv6: a pyflannel network has IPv4, IPv6 or both")
        pools = req.ipv6 if req.ipv4_disabled else req.ipv4
        if len(pools) != 1:
            family, key = ("IPv6", "IPv6Data") if req.ipv4_disabled else ("IPv4", "IPv4Data")
            raise ValidationError(key, f"exactly one {family} pool is needed, got {len(pools)}: `{create_command()}`")
        name = next((p.flannel for p in self.store.load().pools.values() if p.pool == str(pools[0].pool)), "")
        env = self.lease.current(name)
        if not req.ipv4_disabled:
            if env.lease is None:
                raise ipv6_only_error(name)
            check_pool(req.ipv4[0], env.subnet, req.network_id)
        if req.ipv6_requested:
            if env.lease6 is None:
                raise no_ipv6_error(name)
            if len(req.ipv6) != 1:
                raise ValidationError("IPv6Data", f"--ipv6 needs exactly one IPv6 pool, got {len(req.ipv6)}: "
                                                  f"`{create_command('--ipv6')}`")
            check_pool(req.ipv6[0], env.ipv6_subnet, req.network_id)
        if req.mtu_option and req.mtu_option > env.mtu:  # `docker network inspect` would show an MTU not in force
            raise RefusedError(f"-o {v.OPT_MTU}={req.mtu_option} is above this overlay's MTU {env.mtu} "
                               f"(FLANNEL_MTU: the underlay's MTU less the encapsulation): bigger packets would not "
                               f"cross it. Use at most {env.mtu}, or leave the option out")
        if req.encrypted:
            self._check_encrypted(name)
        with self.store.transaction() as st:
            known = st.networks.get(req.network_id)
            if known is not None:  # repeated call: same answer, repair the bridge and rules if needed
                self._plug_network(known, env.mtu)
                return {}
            other = st.network_on(name)
            if other is not None:
                raise existing_network_error(*other)
            bridge = bridge_name(req.network_id)
            net = NetworkRecord(bridge=bridge, pool=None, gateway=None, flannel_network=None,
                                mtu_option=req.mtu_option, masquerade=req.masquerade, internal=req.internal,
                                flannel=name, icc=req.icc, host_binding_ipv4=str(req.host_binding_ipv4 or ""))
            if not req.ipv4_disabled:
                net.pool, net.gateway, net.flannel_network = str(env.lease), str(env.subnet), str(env.network)
            if req.ipv6_requested:
                net.pool6, net.gateway6, net.flannel_network6 = (str(env.lease6), str(env.ipv6_subnet),
                                                                 str(env.ipv6_network))
            existed = bridge in self.plumbing.links()  # e.g. a device in the way: reported, never deleted
            try:
                self._plug_network(net, env.mtu)
            except Exception:  # nothing of a network Docker will not have stays behind
                self._quietly(self.plumbing.remove_rules, firewall.network_rules(net.spec()))
                if not existed:
                    self._quietly(self.plumbing.delete_bridge, bridge)
                raise
            st.networks[req.network_id] = net
        log.info("network %s created on %s: bridge %s, %s", req.network_id[:12], describe_flannel(name), bridge,
                 ", ".join(str(gateway) for gateway in net.gateways if gateway))
        return {}

    def _check_encrypted(self, name: str) -> None:
        """-o encrypted: the flannel network must carry its traffic between hosts in WireGuard, or the Docker network
        is refused; never plaintext in silence. A flannel network's backend is chosen once, where it is created: the
        default network's in its etcd config, a named one's by the first join (--ipam-opt pyflannel.backend), which
        RequestPool made before this call, without the -o options (Docker gives IPAM none)."""
        option = f"-o {v.OPT_ENCRYPTED}"
        if self.daemon is None:
            raise RefusedError(f"{option}: this driver has no pyflanneld API to ask for the flannel network's backend")
        try:
            served = {n["name"]: n.get("backend") for n in self.daemon.networks()}
        except localapi.DaemonError as e:
            raise UnavailableError(f"{option}: cannot ask pyflanneld for the backend of {describe_flannel(name)}: "
                                   f"{e}") from None
        backend = served.get(name or localapi.DEFAULT_NETWORK)
        if backend == "wireguard":
            return
        if backend is None:
            raise UnavailableError(f"{option}: pyflanneld does not serve {describe_flannel(name)} (yet): see its log")
        how = create_command("--ipam-opt", f"{v.OPT_NETWORK}=NAME", "--ipam-opt", f"{v.OPT_BACKEND}=wireguard",
                             option)
        if name:
            raise RefusedError(f"{option}: flannel network {name} uses the {backend} backend, which does not encrypt "
                               f"(a flannel network's backend is chosen when it is first created): create the network "
                               f"on a new flannel network with the wireguard backend: `{how}`")
        raise RefusedError(f"{option}: the default flannel network uses the {backend} backend (its etcd config), which "
                           f"does not encrypt: give the network a flannel network of its own with the wireguard "
                           f"backend: `{how}`")

    def _plug_network(self, net: NetworkRecord, flannel_mtu: int) -> None:
        """The network's bridge and its iptables rules."""
        self._bridge_up(net, flannel_mtu)
        self.plumbing.add_rules(firewall.network_rules(net.spec()))

    def _bridge_up(self, net: NetworkRecord, flannel_mtu: int) -> None:
        self.plumbing.ensure_bridge(net.bridge, *net.gateways, effective_mtu(flannel_mtu, net.mtu_option))
        if not net.internal and net.gateway:
            self.plumbing.route_localnet(net.bridge)

    def delete_network(self, req: v.NetworkRef) -> dict:
        with self.store.transaction() as st:
            net = st.networks.get(req.network_id)
            if net is None:
                return {}
            unused = [pid for pid, pool in st.pools.items()  # no network left on it: its allocations are stale
                      if not set(st.networks_using(pool.pool)) - {req.network_id}]
            for pid in unused:
                st.drop_pool(pid, self.daemon)
            for eid, ep in list(st.endpoints.items()):
                if ep.network == req.network_id:  # Docker deletes endpoints first; these are leftovers
                    self.plumbing.remove_rules(firewall.port_rules(ep.ports))
                    self.plumbing.delete_veth(ep.veth_host, ep.veth_container)
                    del st.endpoints[eid]
            self.plumbing.remove_rules(firewall.network_rules(net.spec()))
            self.plumbing.delete_bridge(net.bridge)
            del st.networks[req.network_id]
        log.info("network %s deleted", req.network_id[:12])
        return {}

    # --- endpoints --------------------------------------------------------------------------------------------------

    @staticmethod
    def _network(st: DriverState, network_id: str) -> NetworkRecord:
        net = st.networks.get(network_id)
        if net is None:
            raise RefusedError(f"network {network_id[:12]} is not known to pyflannel (was the driver's state dir "
                               f"wiped?): remove the network and create it again")
        return net

    @staticmethod
    def _endpoint_reply(ep: EndpointRecord, req_interface: v.EndpointInterface | None) -> dict:
        # Only fields Docker left empty may be returned; nothing at all if Docker sent no Interface.
        if req_interface is None or not ep.mac_generated:
            return {"Interface": None}
        return {"Interface": {"MacAddress": ep.mac}}

    def create_endpoint(self, req: v.CreateEndpoint) -> dict:
        iface = req.interface
        with self.store.transaction() as st:
            net = self._network(st, req.network_id)
            known = st.endpoints.get(req.endpoint_id)
            if known is not None:
                if known.network != req.network_id:
                    raise RefusedError(f"endpoint {req.endpoint_id[:12]} already belongs to network "
                                       f"{known.network[:12]}")
                return self._endpoint_reply(known, iface)
            address = iface.address if iface else None
            if address is not None:
                check_address("Interface.Address", address, net.pool, net.gateway)
            address6 = iface.address6 if iface else None
            if address6 is not None:
                check_address("Interface.AddressIPv6", address6, net.pool6, net.gateway6)
            host, container = veth_names(req.endpoint_id)
            clash = [e for e, ep in st.endpoints.items() if ep.veth_host == host]
            if clash:
                raise RefusedError(f"endpoint {req.endpoint_id[:12]} would reuse interface name {host} of endpoint "
                                   f"{clash[0][:12]}; retry")
            if iface is not None and iface.mac:
                mac, generated = iface.mac, False
            else:
                known = address if address is not None else address6
                mac = mac_for(known.ip) if known is not None else random_mac()
                generated = True
            ep = EndpointRecord(network=req.network_id, address=str(address) if address else "", mac=mac,
                                mac_generated=generated, veth_host=host, veth_container=container, joined=False,
                                sandbox="", address6=str(address6) if address6 else "")
            st.endpoints[req.endpoint_id] = ep
            return self._endpoint_reply(ep, iface)

    def endpoint_oper_info(self, req: v.EndpointRef) -> dict:
        st = self.store.load()
        ep = st.endpoints.get(req.endpoint_id)
        if ep is None:
            return {"Value": {}}
        net = st.networks.get(ep.network)
        return {"Value": {"bridge": net.bridge if net else "", "veth_host": ep.veth_host, "address": ep.address,
                          "address6": ep.address6, "mac": ep.mac, "joined": ep.joined}}

    def _unplug(self, endpoint_id: str, then) -> dict:
        """Delete an endpoint's veth pair, then `then(state, endpoint)`; an unknown endpoint is no error."""
        with self.store.transaction() as st:
            ep = st.endpoints.get(endpoint_id)
            if ep is not None:
                self.plumbing.remove_rules(firewall.port_rules(ep.ports))
                self.plumbing.delete_veth(ep.veth_host, ep.veth_container)
                then(st, ep)
        return {}

    def delete_endpoint(self, req: v.EndpointRef) -> dict:
        return self._unplug(req.endpoint_id, lambda st, ep: st.endpoints.pop(req.endpoint_id))

    def join(self, req: v.Join) -> dict:
        if self.reconcile_pending:  # after a boot: the bridges and the rules of every network come back now
            self.reconcile()
        with self.store.transaction() as st:
            net = self._network(st, req.network_id)
            env = self.lease.current(net.flannel)
            st.leave_pending(self.daemon)
            ep = st.endpoints.get(req.endpoint_id)
            if ep is None or ep.network != req.network_id:
                raise RefusedError(f"endpoint {req.endpoint_id[:12]} is not known to pyflannel on network "
                                   f"{req.network_id[:12]} (CreateEndpoint was not called, or the state was lost)")
            change = net.lease_change(env.lease, env.lease6)
            if change:
                raise lease_changed_error(net.flannel, change, [req.network_id])
            gateway, gateway6 = net.gateways
            mtu = effective_mtu(env.mtu, net.mtu_option)
            self.plumbing.ensure_bridge(net.bridge, gateway, gateway6, mtu)
            try:
                self.plumbing.ensure_veth(ep.veth_host, ep.veth_container, net.bridge, mtu, ep.mac,
                                          isolated=not net.icc)
            except Exception:
                if not ep.joined:
                    self._quietly(self.plumbing.delete_veth, ep.veth_host, ep.veth_container)
                raise
            ep.joined = True
            ep.sandbox = req.sandbox_key
        reply = {"InterfaceName": {"SrcName": ep.veth_container, "DstPrefix": "eth"}}
        if net.internal:  # no default routes: the flannel Networks only, through the bridge
            routes = [(network, hop.ip) for network, hop in ((net.flannel_network, gateway),
                                                             (net.flannel_network6, gateway6)) if hop is not None]
            return {**reply, "Gateway": "", "GatewayIPv6": "", "DisableGatewayService": True, "StaticRoutes": [
                {"Destination": network, "RouteType": 0, "NextHop": str(hop)} for network, hop in routes]}
        return {**reply, "Gateway": str(gateway.ip) if gateway else "", "GatewayIPv6": str(gateway6.ip) if gateway6
                else "", "DisableGatewayService": False}

    def leave(self, req: v.EndpointRef) -> dict:
        def unjoined(st: DriverState, ep: EndpointRecord) -> None:
            ep.joined, ep.sandbox, ep.ports = False, "", []
        return self._unplug(req.endpoint_id, unjoined)

    def program_external_connectivity(self, req: v.EndpointRef) -> dict:
        """Publish the container's ports (-p, -P) on this host: a DNAT rule each; the host ports are chosen here."""
        bindings = v.port_bindings(req.options)
        if not bindings:
            return {}
        with self.store.transaction() as st:
            net = self._network(st, req.network_id)
            ep = st.endpoints.get(req.endpoint_id)
            if ep is None or not (ep.address or ep.address6):
                raise RefusedError(f"endpoint {req.endpoint_id[:12]} is not known to pyflannel (or has no address): "
                                   f"cannot publish its ports")
            if net.internal:
                raise RefusedError("an --internal pyflannel network publishes no ports: remove -p/-P, or use a "
                                   "network without --internal")
            if not ep.ports:  # a repeated call keeps the ports chosen the first time
                if net.host_binding_ipv4:  # -o ...host_binding_ipv4: where -p without an address binds
                    default = ipaddress.IPv4Address(net.host_binding_ipv4)
                    bindings = [b if b.host_ip else dataclasses.replace(b, host_ip=default) for b in bindings]
                ips = {version: str(ipaddress.ip_interface(address).ip) if address else ""
                       for version, address in ((4, ep.address), (6, ep.address6))}
                for b in bindings:  # a host address of one family needs a container address of that family
                    version = b.host_ip.version if b.host_ip is not None else None
                    if version is not None and not ips[version]:
                        raise RefusedError(f"cannot publish on the IPv{version} address {b.host_ip}: the container "
                                           f"has no IPv{version} address (its network was {without_family(version)})")
                taken = {(p.proto, p.host_ip, p.host_port): eid for eid, other in st.endpoints.items()
                         for p in other.ports}
                ep.ports = [self._choose(b, ips, taken, req.endpoint_id) for b in bindings]
            self.plumbing.add_rules(firewall.port_rules(ep.ports))
        log.info("endpoint %s publishes %s", req.endpoint_id[:12], ", ".join(p.describe() for p in ep.ports))
        return {}

    def _choose(self, b: v.PortBinding, container_ips: dict[int, str], taken: dict,
                endpoint_id: str) -> firewall.Published:
        """The binding's host port: the one asked for, the first free one of its range, or (-P) of Docker's.
        `container_ips`: the container's address by IP version ("" without one)."""
        host_ip = str(b.host_ip) if b.host_ip else ""
        first, last = (b.host_port, b.host_port_end) if b.host_port else EPHEMERAL_PORTS
        clash = None
        for port in range(first, last + 1):
            holders = [eid for (proto, ip, hp), eid in taken.items()
                       if proto == b.proto and hp == port and (not ip or not host_ip or ip == host_ip)]
            if holders:
                clash = clash or f"published already (endpoint {holders[0][:12]})"
                continue
            if self.plumbing.port_in_use(b.proto, host_ip, port):
                clash = clash or "held by a process on this host"
                continue
            chosen = firewall.Published(b.proto, host_ip, port, container_ips[4], b.port, container_ips[6])
            taken[(b.proto, host_ip, port)] = endpoint_id
            return chosen
        asked = f"{host_ip or '0.0.0.0'}:{first}" + (f"-{last}" if last != first else "") + f"/{b.proto}"
        if last == first:
            raise RefusedError(f"cannot publish port {b.port}/{b.proto} on {asked}: the port is {clash}; choose "
                               f"another host port")
        raise RefusedError(f"cannot publish port {b.port}/{b.proto} on {asked}: every port of the range is taken "
                           f"(the first {clash}); choose another range")

    def revoke_external_connectivity(self, req: v.EndpointRef) -> dict:
        with self.store.transaction() as st:
            ep = st.endpoints.get(req.endpoint_id)
            if ep is not None and ep.ports:
                self.plumbing.remove_rules(firewall.port_rules(ep.ports))
                ep.ports = []
        return {}

    # --- startup reconciliation -------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Make the kernel match the state: repair our networks' bridges, delete interfaces/rules nobody owns, and
        rewrite our iptables chains with exactly the rules of the state's networks and published ports.

        Run once at startup, before serving. Interfaces of endpoints that are joined are kept (their container may
        still run); the pair of an endpoint that is not joined should not exist and is removed.
        """
        with self.store.transaction() as st:
            envs, names = {}, {net.flannel for net in st.networks.values()} or {""}
            for name in names:
                try:
                    envs[name] = self.lease.current(name, patient=False)
                except UnavailableError as e:
                    log.warning("%s; bridges and rules are restored at the first Join", e)
            complete = names <= envs.keys()
            self.reconcile_pending = not complete
            bridges = {net.bridge for net in st.networks.values()}
            veths = set()
            for ep in st.endpoints.values():
                if ep.joined and ep.network in st.networks:
                    veths.update((ep.veth_host, ep.veth_container))
            rules = []
            for nid, net in st.networks.items():
                env = envs.get(net.flannel)
                if env is None:
                    continue
                change = net.lease_change(env.lease, env.lease6)
                if change:
                    log.warning("%s", lease_changed_error(net.flannel, change, [nid]))
                    continue
                self._quietly(self._bridge_up, net, env.mtu)
                rules += firewall.network_rules(net.spec())
                rules += firewall.port_rules([p for ep in st.endpoints.values()
                                              if ep.network == nid and ep.joined for p in ep.ports])
            if complete:  # else the rules of a network without its lease would be lost
                self._quietly(self.plumbing.reset_rules, rules)
            st.leave_pending(self.daemon)
            for name, link in sorted(self.plumbing.links().items()):
                keep = name in bridges if name.startswith(BRIDGE_PREFIX) else name in veths
                if not keep and name.startswith((BRIDGE_PREFIX, VETH_HOST_PREFIX, VETH_CONTAINER_PREFIX)):
                    log.info("reconcile: removing leftover interface %s (%s)", name, link["kind"])
                    self._quietly(self.plumbing.delete_link, name)
            for bridge in self.plumbing.forwarding_bridges() - bridges:
                log.info("reconcile: removing leftover iptables rules of %s", bridge)
                self._quietly(self.plumbing.remove_forwarding, bridge)

    @staticmethod
    def _quietly(fn, *args) -> None:
        try:
            fn(*args)
        except (PlumbingError, OSError) as e:
            log.warning("%s: %s", getattr(fn, "__name__", fn), e)
