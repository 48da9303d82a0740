"""The walls of a CNI bridge: what isolates flannel networks for Docker (pyflannel.firewall), for the CNI plugin's
bridges too: a container sends from its bridge's lease only, takes nothing from outside its flannel Network but
replies, and sends nothing through another flannel network's device. In the plugin's own chains; checked at most
every RECHECK_SECONDS per bridge and process, as the masquerade rule is (an ADD must not pay an iptables exec)."""
from __future__ import annotations

import time

from pyflannel import firewall, subnetenv
from pyflannel.kernel import iptables
from pyflannel.kernel.errors import KernelError

from .protocol import KERNEL_REFUSED, CniError

RECHECK_SECONDS = 10.0
_chains = iptables.Chains(firewall.CNI_CHAINS, firewall.CNI_HOOKS)
_seen: dict[tuple, float] = {}  # (bridge, its rules) -> when they were last found or made (time.monotonic)


def ensure(bridge: str, env: subnetenv.SubnetEnv) -> None:
    """`bridge`'s walls for the lease(s) in `env`; CniError when iptables refuses them (the ADD fails: a container
    must not run without them)."""
    rules = firewall.cni_rules(bridge, env.lease, env.network, env.lease6, env.ipv6_network)
    key = (bridge, tuple(rules))
    if time.monotonic() - _seen.get(key, -RECHECK_SECONDS) < RECHECK_SECONDS:
        return
    try:
        _chains.add(rules)
    except KernelError as e:
        raise CniError(KERNEL_REFUSED, f"the isolation rules of bridge {bridge}: {e}") from None
    _seen[key] = time.monotonic()
