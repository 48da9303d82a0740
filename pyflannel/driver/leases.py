"""This host's leases in flannel networks, as pyflanneld writes them to subnet.env, and the refusals when a Docker
request does not fit them: a flannel network without the address family asked for, a lease that changed under a
Docker network, a second Docker network on one flannel network (a host has one lease and one bridge in each)."""
from __future__ import annotations

import os
import time

from pyflannel import paths, subnetenv

from . import validation as v
from .errors import RefusedError, UnavailableError, create_command
from .records import NetworkRecord

HOW_TO_ENABLE_IPV6 = ("set \"EnableIPv6\": true and an \"IPv6Network\" (e.g. \"fd00:5::/48\") in its etcd config and "
                      "restart pyflanneld, or create the network without --ipv6")


class LeaseSource:
    """Reads subnet.env at every call, so the driver follows pyflanneld without a restart. While it does not exist
    (pyflanneld still starting: at boot dockerd may restart containers before it is up), a call waits up to `wait`
    seconds for it rather than failing the container at once."""

    def __init__(self, path: str = paths.SUBNET_FILE, wait: float = 0.0):
        self.path = path
        self.wait = wait

    def current(self, name: str = "", patient: bool = True) -> subnetenv.SubnetEnv:
        """This host's lease in the flannel network `name` ("" for the default one)."""
        path = paths.network_env_file(self.path, name)
        deadline = time.monotonic() + (self.wait if patient else 0.0)
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            env = subnetenv.read(path)
        except subnetenv.SubnetEnvError as e:
            what = f"lease in flannel network {name}" if name else "flannel lease"
            raise UnavailableError(f"no {what} on this host: {e}") from None
        for lease in (env.lease, env.lease6):
            if lease is not None and lease.num_addresses < 4:
                raise UnavailableError(f"{path}: lease {lease} is too small to hold a gateway and containers")
        return env


def describe_flannel(name: str) -> str:
    return f"flannel network {name}" if name else "the default flannel network"


def family_lease(env: subnetenv.SubnetEnv, v6: bool):
    """(lease, gateway with the lease's prefix) of one family; (None, None) if the flannel network lacks it."""
    return (env.lease6, env.ipv6_subnet) if v6 else (env.lease, env.subnet)


def no_ipv6_error(name: str) -> RefusedError:
    return RefusedError(f"--ipv6: {describe_flannel(name)} has no IPv6 on this host (its subnet.env has no "
                        f"FLANNEL_IPV6_SUBNET): {HOW_TO_ENABLE_IPV6}")


def ipv6_only_error(name: str) -> RefusedError:
    return RefusedError(
        f"{describe_flannel(name)} is IPv6-only (its etcd config has \"EnableIPv4\": false; subnet.env has no "
        f"FLANNEL_SUBNET), but Docker asked for an IPv4 pool: Docker before 28 always does, even with --ipv6. Use "
        f"Docker 28 or later with `{create_command('--ipv4=false', '--ipv6')}`, or enable"
        f" IPv4 in the flannel network's config (\"EnableIPv4\": true and a \"Network\")")


def lease_changed_error(name: str, change: str, network_ids: list[str]) -> RefusedError:
    """This host's lease changed under Docker networks (pyflanneld had to take another: its lease expired while the
    host was cut off, and another host took the subnet): every step to make them again on the new lease."""
    refs = " ".join(nid[:12] for nid in network_ids) or "NETWORK"
    filters = " ".join(f"--filter network={nid[:12]}" for nid in network_ids) or "--filter network=NETWORK"
    option = ("--ipam-opt", f"{v.OPT_NETWORK}={name}") if name else ()
    return RefusedError(
        f"this host's lease in {describe_flannel(name)} changed from {change} (pyflanneld had to take another one: "
        f"see its log); Docker network {refs} still uses the old one and must be made again on the new lease: "
        f"1. remove its containers: `docker rm -f $(docker ps -aq {filters})`; 2. `docker network rm {refs}`; "
        f"3. `{create_command(*option)}` with its other options; "
        f"4. run the containers again")


def existing_network_error(network_id: str, net: NetworkRecord) -> RefusedError:
    name = net.flannel
    return RefusedError(
        f"this host already has a Docker network on {describe_flannel(name)} (id {network_id[:12]}, bridge "
        f"{net.bridge}, subnet {net.pool}): a host has one lease and one bridge per flannel network. Connect "
        f"containers to that network, or create one on another flannel network with "
        f"`{create_command('--ipam-opt', f'{v.OPT_NETWORK}=NAME')}`. (If "
        f"`docker network ls --no-trunc` does not list it, the driver's state is stale: stop pyflannel-driver, delete "
        f"its state.json, start it again.)")
