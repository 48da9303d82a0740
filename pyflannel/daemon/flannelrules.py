"""flannel's iptables rules for one network pyflanneld serves, kept in place: -ip-masq's masquerade and
--iptables-forward-rules' FORWARD accepts (the rules themselves: pyflannel.firewall's `masq_chain`, `forward_chain`).

They are written when the lease is taken or changes, then checked every --iptables-resync seconds, as flanneld
does, but with one `iptables -S` per table and family: a chain that lost a rule (or holds a stranger) is rewritten
atomically, a lost hook put back, and a warning says what; nothing is written while all is in place.

The default network's chains are flanneld's (FLANNEL-POSTRTG, FLANNEL-FWD, with its hooks' exact specs): a flanneld
started later finds its hooks (`iptables -C`) and rewrites its chains, and pyflanneld does the same with flanneld's;
flannel v0.13's rules (straight in POSTROUTING and FORWARD) and pyflannel's earlier PYFLANNEL-POSTRTG are deleted.
So a swap either way leaves one set. FLANNEL-FWD's hook is kept below pyflannel's isolation chains: flanneld inserts
it first in FORWARD when it (re)writes it, above them, and pyflanneld moves it back.

--iptables-forward-rules=false writes no FLANNEL-FWD and, as flanneld, deletes none an earlier run left. At stop the
rules stay (a restart finds them in place); a named network's go when the host leaves it.
"""
from __future__ import annotations

import logging

from pyflannel import firewall
from pyflannel.firewall import HookedChain, Rule
from pyflannel.kernel import iptables
from pyflannel.kernel.errors import KernelError

from .errors import UserError

log = logging.getLogger("pyflanneld")


def wanted(config, lease, flags, named: bool) -> tuple[list[HookedChain], list[Rule]]:
    """The chains a network needs under these flags, and the rules they replace: -ip-masq's for each address family
    the network has, FLANNEL-FWD for the default network's with --iptables-forward-rules. UserError if -ip-masq
    cannot be had."""
    families = ([(config.network, lease.subnet)] if config.enable_ipv4 else []) + \
        ([(config.ipv6.network, lease.ipv6_subnet)] if config.ipv6 is not None else [])
    forward = flags.iptables_forward_rules and not named
    chains, replaced = [], []
    for network, subnet in families:
        v6 = network.version == 6
        if not iptables.available(v6=v6):
            program = "ip6tables" if v6 else "iptables"
            if flags.ip_masq:
                raise UserError(f"-ip-masq needs {program}, which is not installed (apt-get install iptables)")
            if forward:
                log.warning("%s is not installed: no FORWARD rules for %s (--iptables-forward-rules)", program,
                            network)
            continue
        if flags.ip_masq:
            random_fully = iptables.has_random_fully(v6=v6) and not flags.ip_masq_fully_random_disable
            chains.append(firewall.masq_chain(network, subnet, random_fully, config.vni if named else None))
        if forward:
            chains.append(firewall.forward_chain(network))
        if not named:
            replaced += firewall.replaced_rules(network, subnet, flags.ip_masq, forward)
    return chains, replaced


class FlannelRules:
    """One network's chains (HookedChain) and the rules they replace, as last wanted."""

    def __init__(self, network: str):
        self.network = network
        self.chains: list[HookedChain] = []
        self.replaced: list[Rule] = []

    def keep(self, chains: list[HookedChain], replaced: list[Rule]) -> None:
        """Put `chains` in place now (and delete `replaced`), and keep them so from now on. UserError if iptables
        refuses."""
        self.chains, self.replaced = chains, replaced
        try:
            done = self._ensure()
            for rule in replaced:  # pyflannel's earlier chain goes with its hook
                if rule.args == ("-j", firewall.NAMED_MASQ):
                    iptables.delete_chain(rule.table, firewall.NAMED_MASQ, v6=rule.v6)
        except KernelError as e:
            raise UserError(f"network {self.network}: iptables: {e}") from None
        if done:
            log.info("network %s: iptables: %s", self.network, "; ".join(done))

    def resync(self) -> None:
        """--iptables-resync: whatever went missing or changed is put back, with a warning."""
        try:
            done = self._ensure()
        except KernelError as e:
            log.warning("network %s: iptables rules not checked: %s; trying again later", self.network, e)
            return
        if done:
            log.warning("network %s: iptables rules were missing or changed: %s", self.network, "; ".join(done))

    def remove(self) -> None:
        """The host left the network: its hooks and chains go."""
        for chain in self.chains:
            if iptables.available(v6=chain.v6):
                try:
                    iptables.remove(chain.table, chain.builtin, list(chain.hook), v6=chain.v6)
                    iptables.delete_chain(chain.table, chain.chain, v6=chain.v6)
                except KernelError as e:
                    log.warning("network %s: could not delete %s: %s", self.network, chain.chain, e)
        self.chains = []

    def _ensure(self) -> list[str]:
        """Each chain holding its rules and hooked once in the right place, nothing replaced left: what it changed.
        The chains go in before the rules they replace go out (flannel v0.13's FORWARD accepts under a DROP policy:
        a connection made in between would be dropped)."""
        done = []
        for table, v6 in dict.fromkeys([(c.table, c.v6) for c in self.chains] + [(r.table, r.v6) for r in
                                                                                   self.replaced]):
            rules: dict[str, list[tuple[str, ...]]] = {}
            for line in iptables.listing(table, v6=v6):  # ["-A", chain, *args]
                rules.setdefault(line[1], []).append(tuple(line[2:]))
            changed = []
            for chain in self.chains:
                if (chain.table, chain.v6) == (table, v6):
                    if rules.get(chain.chain) != list(chain.rules):
                        iptables.replace_chain(table, chain.chain, [list(r) for r in chain.rules], v6=v6)
                        changed.append(f"wrote {chain.chain}")
                    changed += _hook(chain, rules.get(chain.builtin, []))
            for rule in self.replaced:
                if (rule.table, rule.v6) == (table, v6):
                    for _ in range(rules.get(rule.chain, []).count(rule.args)):
                        iptables.must(table, "-D", rule.chain, *rule.args, v6=v6)
                        changed.append(f"deleted `{' '.join(rule.args)}` from {rule.chain} (replaced)")
            done += [f"ip6tables: {what}" if v6 else what for what in changed]
        return done


def _hook(chain: HookedChain, builtin: list[tuple[str, ...]]) -> list[str]:
    """`chain`'s hook once in its built-in chain (listed as `builtin`), below every rule of `chain.below`; inserted
    first or right below them if no copy is there, the copies above the last one deleted."""
    copies = [i for i, rule in enumerate(builtin) if rule == chain.hook]
    floor = max((i for i, rule in enumerate(builtin) if rule in chain.below), default=-1)
    placed = any(i > floor for i in copies)
    done = []
    if not placed:
        iptables.must(chain.table, "-I", chain.builtin, str(floor + 2), *chain.hook, v6=chain.v6)
        done.append(f"moved {chain.chain}'s hook below the isolation chains in {chain.builtin}" if copies else
                    f"hooked {chain.chain} into {chain.builtin}")
    for _ in range(len(copies) - placed):  # iptables -D deletes the first copy: the last one stays, in its place
        iptables.must(chain.table, "-D", chain.builtin, *chain.hook, v6=chain.v6)
    if len(copies) > 1:
        done.append(f"deleted {len(copies) - 1} more hook(s) of {chain.chain} from {chain.builtin}")
    return done
