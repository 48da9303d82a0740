"""NetworkDriver: one pyflannel network per host, bridged onto this host's flannel lease.

Decisions (see docs/driver.md):
- One network per host. A host has one flannel lease and the lease's gateway lives on one bridge, so a second
  pyflannel network is refused with a message naming the existing one: by RequestPool (which Docker calls first;
  answering the same pool again would make dockerd loop, see ipam.py) and, for networks made with another IPAM
  driver, by CreateNetwork. Docker's rollback after a refused CreateNetwork cannot hurt the first network.
- The network's subnet must be this host's lease and its gateway the lease's first address, whoever did the IPAM:
  with `--ipam-driver pyflannel` that is automatic; with another IPAM driver only `--subnet <lease>` is accepted.
- MTU: FLANNEL_MTU (the overlay's MTU), or the lower `-o com.docker.network.driver.mtu=N`; a higher option is
  capped to FLANNEL_MTU, since bigger packets would not cross the overlay. Read from subnet.env at each Join, so an
  MTU change by pyflanneld reaches new containers.
- Every handler is idempotent: a repeated Create/Join gives the same answer, Delete/Leave of an unknown id succeed.
- CreateEndpoint only records the endpoint (and picks a MAC); Join creates the veth pair, Leave deletes it.
"""
from __future__ import annotations

import ipaddress
import logging

from pyflannel.kernel.links import mac_for, random_mac

from . import validation as v
from .errors import PlumbingError, RefusedError, UnavailableError, ValidationError
from .ipam import HOW_TO_CREATE, LeaseSource, existing_network_error
from .plumbing import BRIDGE_PREFIX, VETH_CONTAINER_PREFIX, VETH_HOST_PREFIX, Plumbing, bridge_name, veth_names
from .state import StateStore

log = logging.getLogger(__name__)


def effective_mtu(flannel_mtu: int, option: int | None) -> int:
    return min(flannel_mtu, option) if option else flannel_mtu


class NetworkDriver:
    def __init__(self, store: StateStore, lease: LeaseSource, plumbing: Plumbing):
        self.store = store
        self.lease = lease
        self.plumbing = plumbing

    @staticmethod
    def capabilities() -> dict:
        # Scope local: Docker keeps the network to this host (no swarm manager redirect); ConnectivityScope global:
        # containers of the same-named network on other hosts are reachable (through flannel).
        return {"Scope": "local", "ConnectivityScope": "global"}

    # --- networks ---------------------------------------------------------------------------------------------------

    def create_network(self, req: v.CreateNetwork) -> dict:
        if req.ipv6_requested:
            raise RefusedError("IPv6 is not supported by pyflannel: create the network without --ipv6")
        if req.ipv4_disabled:
            raise RefusedError("a pyflannel network needs IPv4: create it without --ipv4=false")
        if req.internal:
            raise RefusedError("internal networks (--internal) are not supported by pyflannel: its containers are "
                               "always routed to the other hosts")
        if len(req.ipv4) != 1:
            raise ValidationError("IPv4Data", f"exactly one IPv4 pool is needed, got {len(req.ipv4)}: "
                                              f"`{HOW_TO_CREATE}`")
        env = self.lease.current()
        data = req.ipv4[0]
        if data.pool != env.lease:
            raise RefusedError(
                f"subnet {data.pool} is not this host's flannel lease {env.lease}: a pyflannel network must use "
                f"the lease pyflanneld got for this host. Create it with `{HOW_TO_CREATE}` (or, with another IPAM "
                f"driver, --subnet {env.lease})")
        if data.gateway is not None and data.gateway.ip != env.gateway:
            raise RefusedError(f"gateway {data.gateway.ip} is not the first address of this host's lease "
                               f"({env.gateway}): create the network without --gateway")
        if req.mtu_option and req.mtu_option > env.mtu:
            log.info("network %s: -o %s=%d is above FLANNEL_MTU %d; using %d", req.network_id[:12], v.OPT_MTU,
                     req.mtu_option, env.mtu, env.mtu)
        gateway = ipaddress.IPv4Interface(f"{env.gateway}/{env.lease.prefixlen}")
        with self.store.transaction() as st:
            known = st["networks"].get(req.network_id)
            if known is not None:  # repeated call: same answer, repair the bridge if needed
                self.plumbing.ensure_bridge(known["bridge"], gateway, effective_mtu(env.mtu, known["mtu_option"]))
                return {}
            for other_id, other in st["networks"].items():
                raise existing_network_error(other_id, other)
            bridge = bridge_name(req.network_id)
            self.plumbing.ensure_bridge(bridge, gateway, effective_mtu(env.mtu, req.mtu_option))
            st["networks"][req.network_id] = {"bridge": bridge, "pool": str(env.lease), "gateway": str(gateway),
                                              "mtu_option": req.mtu_option}
        log.info("network %s created: bridge %s, %s", req.network_id[:12], bridge, gateway)
        return {}

    def delete_network(self, req: v.NetworkRef) -> dict:
        with self.store.transaction() as st:
            net = st["networks"].get(req.network_id)
            if net is None:
                return {}
            for eid, ep in list(st["endpoints"].items()):
                if ep["network"] == req.network_id:  # Docker deletes endpoints first; these are leftovers
                    self.plumbing.delete_veth(ep["veth_host"], ep["veth_container"])
                    del st["endpoints"][eid]
            self.plumbing.delete_bridge(net["bridge"])
            del st["networks"][req.network_id]
        log.info("network %s deleted", req.network_id[:12])
        return {}

    # --- endpoints --------------------------------------------------------------------------------------------------

    @staticmethod
    def _network(st: dict, network_id: str) -> dict:
        net = st["networks"].get(network_id)
        if net is None:
            raise RefusedError(f"network {network_id[:12]} is not known to pyflannel (was the driver's state dir "
                               f"wiped?): remove the network and create it again")
        return net

    @staticmethod
    def _endpoint_reply(ep: dict, req_interface: v.EndpointInterface | None) -> dict:
        # Only fields Docker left empty may be returned; nothing at all if Docker sent no Interface.
        if req_interface is None or not ep["mac_generated"]:
            return {"Interface": None}
        return {"Interface": {"MacAddress": ep["mac"]}}

    def create_endpoint(self, req: v.CreateEndpoint) -> dict:
        iface = req.interface
        with self.store.transaction() as st:
            net = self._network(st, req.network_id)
            known = st["endpoints"].get(req.endpoint_id)
            if known is not None:
                if known["network"] != req.network_id:
                    raise RefusedError(f"endpoint {req.endpoint_id[:12]} already belongs to network "
                                       f"{known['network'][:12]}")
                return self._endpoint_reply(known, iface)
            pool = ipaddress.IPv4Network(net["pool"])
            address = iface.address if iface else None
            if address is not None:
                if address.network != pool:
                    raise RefusedError(f"Interface.Address {address} is not in the network's subnet {pool}")
                if address.ip == ipaddress.IPv4Interface(net["gateway"]).ip:
                    raise RefusedError(f"Interface.Address {address} is the network's gateway")
            host, container = veth_names(req.endpoint_id)
            clash = [e for e, ep in st["endpoints"].items() if ep["veth_host"] == host]
            if clash:
                raise RefusedError(f"endpoint {req.endpoint_id[:12]} would reuse interface name {host} of endpoint "
                                   f"{clash[0][:12]}; retry")
            if iface is not None and iface.mac:
                mac, generated = iface.mac, False
            else:
                mac = mac_for(address.ip) if address is not None else random_mac()
                generated = True
            st["endpoints"][req.endpoint_id] = {
                "network": req.network_id, "address": str(address) if address else "", "mac": mac,
                "mac_generated": generated, "veth_host": host, "veth_container": container,
                "joined": False, "sandbox": ""}
            return self._endpoint_reply(st["endpoints"][req.endpoint_id], iface)

    def endpoint_oper_info(self, req: v.EndpointRef) -> dict:
        st = self.store.load()
        ep = st["endpoints"].get(req.endpoint_id)
        if ep is None:
            return {"Value": {}}
        net = st["networks"].get(ep["network"], {})
        return {"Value": {"bridge": net.get("bridge", ""), "veth_host": ep["veth_host"], "address": ep["address"],
                          "mac": ep["mac"], "joined": ep["joined"]}}

    def _unplug(self, endpoint_id: str, then) -> dict:
        """Delete an endpoint's veth pair, then `then(state, endpoint)`; an unknown endpoint is no error."""
        with self.store.transaction() as st:
            ep = st["endpoints"].get(endpoint_id)
            if ep is not None:
                self.plumbing.delete_veth(ep["veth_host"], ep["veth_container"])
                then(st, ep)
        return {}

    def delete_endpoint(self, req: v.EndpointRef) -> dict:
        return self._unplug(req.endpoint_id, lambda st, ep: st["endpoints"].pop(req.endpoint_id))

    def join(self, req: v.Join) -> dict:
        env = self.lease.current()
        with self.store.transaction() as st:
            net = self._network(st, req.network_id)
            ep = st["endpoints"].get(req.endpoint_id)
            if ep is None or ep["network"] != req.network_id:
                raise RefusedError(f"endpoint {req.endpoint_id[:12]} is not known to pyflannel on network "
                                   f"{req.network_id[:12]} (CreateEndpoint was not called, or the state was lost)")
            if net["pool"] != str(env.lease):
                raise RefusedError(f"this host's flannel lease changed from {net['pool']} to {env.lease} (did "
                                   f"pyflanneld get a new lease?): remove the network and create it again with "
                                   f"`{HOW_TO_CREATE}`")
            gateway = ipaddress.IPv4Interface(net["gateway"])
            mtu = effective_mtu(env.mtu, net["mtu_option"])
            self.plumbing.ensure_bridge(net["bridge"], gateway, mtu)
            try:
                self.plumbing.ensure_veth(ep["veth_host"], ep["veth_container"], net["bridge"], mtu, ep["mac"])
            except Exception:
                if not ep["joined"]:
                    self._quietly(self.plumbing.delete_veth, ep["veth_host"], ep["veth_container"])
                raise
            ep["joined"] = True
            ep["sandbox"] = req.sandbox_key
        return {"InterfaceName": {"SrcName": ep["veth_container"], "DstPrefix": "eth"},
                "Gateway": str(gateway.ip), "GatewayIPv6": "", "DisableGatewayService": False}

    def leave(self, req: v.EndpointRef) -> dict:
        return self._unplug(req.endpoint_id, lambda st, ep: ep.update(joined=False, sandbox=""))

    @staticmethod
    def program_external_connectivity(req: v.EndpointRef) -> dict:
        if req.options.get(v.OPT_PORTMAP):
            raise RefusedError("publishing ports (-p/--publish) is not supported on pyflannel networks: containers "
                               "are reachable directly at their overlay address from every pyflannel host")
        return {}

    @staticmethod
    def revoke_external_connectivity(req: v.EndpointRef) -> dict:
        return {}  # nothing was programmed

    # --- startup reconciliation -------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Make the kernel match the state: repair our networks' bridges, delete interfaces/rules nobody owns.

        Run once at startup, before serving. Interfaces of endpoints that are joined are kept (their container may
        still run); the pair of an endpoint that is not joined should not exist and is removed.
        """
        with self.store.transaction() as st:
            try:
                env = self.lease.current()
            except UnavailableError as e:
                env = None
                log.warning("%s; bridges are repaired at the next Docker call", e)
            bridges = {net["bridge"] for net in st["networks"].values()}
            veths = set()
            for ep in st["endpoints"].values():
                if ep["joined"] and ep["network"] in st["networks"]:
                    veths.update((ep["veth_host"], ep["veth_container"]))
            for nid, net in st["networks"].items():
                if env is None:
                    continue
                if net["pool"] != str(env.lease):
                    log.warning("network %s uses %s but this host's lease is now %s: recreate the network",
                                nid[:12], net["pool"], env.lease)
                    continue
                self._quietly(self.plumbing.ensure_bridge, net["bridge"], ipaddress.IPv4Interface(net["gateway"]),
                              effective_mtu(env.mtu, net["mtu_option"]))
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
