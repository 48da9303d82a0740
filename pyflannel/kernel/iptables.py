"""The one iptables runner: argument lists (never a shell), `-w` to wait for the xtables lock, one timeout.

Rules are token lists such as ["-s", "10.5.0.0/16", "-j", "MASQUERADE"], without the chain; every function takes
the table and the chain apart from them. `v6=True` runs ip6tables instead, for IPv6 rules: same tables, same
chains, same rule syntax.
"""
from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess

from .errors import KernelError

LOCK_WAIT_SECONDS = 5   # iptables -w: how long to wait for another program's xtables lock
TIMEOUT_SECONDS = 10    # a hung iptables must not hang a Docker call, a CNI call or the daemon


class IptablesMissing(KernelError):
    """iptables (or ip6tables) is not installed."""


def _program(v6: bool) -> str:
    return "ip6tables" if v6 else "iptables"


def available(*, v6: bool = False) -> bool:
    return shutil.which(_program(v6)) is not None


@functools.cache
def has_random_fully(*, v6: bool = False) -> bool:
    """Whether MASQUERADE takes --random-fully: iptables 1.6.2 or later (go-iptables' HasRandomFully, which flannel
    asks)."""
    path = shutil.which(_program(v6))
    if path is None:
        return False
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=TIMEOUT_SECONDS).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return found is not None and tuple(map(int, found.groups())) >= (1, 6, 2)


def run(table: str, *args: str, v6: bool = False) -> subprocess.CompletedProcess:
    """`iptables -w 5 -t TABLE ARGS…`; the result, whatever its exit code. KernelError if it cannot run at all."""
    program = _program(v6)
    path = shutil.which(program)
    if path is None:
        raise IptablesMissing(f"{program} is not installed")
    try:
        return subprocess.run([path, "-w", str(LOCK_WAIT_SECONDS), "-t", table, *args], capture_output=True,
                              text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{program} -t {table} {shlex.join(args)} did not finish within {TIMEOUT_SECONDS}s") \
            from None
    except OSError as e:
        raise KernelError(f"cannot run {program}: {e.strerror}") from None


def must(table: str, *args: str, v6: bool = False) -> str:
    """run(), and KernelError with iptables' own words unless it succeeded; returns its output."""
    done = run(table, *args, v6=v6)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise KernelError(f"{_program(v6)} -t {table} {shlex.join(args)}: {why}")
    return done.stdout


def exists(table: str, chain: str, rule: list[str], *, v6: bool = False) -> bool:
    return run(table, "-C", chain, *rule, v6=v6).returncode == 0


def ensure(table: str, chain: str, rule: list[str], first: bool = False, *, v6: bool = False) -> bool:
    """Add `rule` to `chain` unless it is there (at the top with `first`); True if it was added."""
    if exists(table, chain, rule, v6=v6):
        return False
    if first:
        must(table, "-I", chain, "1", *rule, v6=v6)
    else:
        must(table, "-A", chain, *rule, v6=v6)
    return True


def remove(table: str, chain: str, rule: list[str], *, v6: bool = False) -> None:
    """Delete every copy of `rule` from `chain` (none is fine)."""
    for _ in range(8):  # copies, if someone added the rule more than once
        if not exists(table, chain, rule, v6=v6):
            return
        must(table, "-D", chain, *rule, v6=v6)


def listing(table: str, chain: str | None = None, *, v6: bool = False) -> list[list[str]]:
    """`iptables -S [CHAIN]`: the "-A …" rules as token lists."""
    out = must(table, "-S", *([chain] if chain else []), v6=v6)
    return [shlex.split(line) for line in out.splitlines() if line.startswith("-A ")]


def policy(table: str, chain: str, *, v6: bool = False) -> str | None:
    """A built-in chain's policy (ACCEPT, DROP), None if it cannot be read."""
    try:
        out = must(table, "-S", chain, v6=v6)
    except KernelError:
        return None
    for line in out.splitlines():
        if line.startswith(f"-P {chain} "):
            return line.split()[2]
    return None


def ensure_chain(table: str, chain: str, *, v6: bool = False) -> None:
    """Create `chain` unless it exists."""
    if run(table, "-S", chain, v6=v6).returncode != 0:
        must(table, "-N", chain, v6=v6)


def flush(table: str, chain: str, *, v6: bool = False) -> None:
    must(table, "-F", chain, v6=v6)


def replace_chain(table: str, chain: str, rules: list[list[str]], *, v6: bool = False) -> None:
    """Make `chain` (created if new) hold exactly `rules`, in one atomic step (`iptables-restore --noflush`): no
    packet ever sees the chain half written."""
    program = _program(v6) + "-restore"
    path = shutil.which(program)
    if path is None:
        raise IptablesMissing(f"{program} is not installed")
    text = (f"*{table}\n:{chain} - [0:0]\n" + "".join(f"-A {chain} {' '.join(map(_restore_word, rule))}\n"
                                                    for rule in rules) + "COMMIT\n")
    try:
        done = subprocess.run([path, "-w", str(LOCK_WAIT_SECONDS), "--noflush"], input=text, capture_output=True,
                              text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{program} of {table} {chain} did not finish within {TIMEOUT_SECONDS}s") from None
    except OSError as e:
        raise KernelError(f"cannot run {program}: {e.strerror}") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise KernelError(f"{program} of {table} {chain}: {why}")


def _restore_word(word: str) -> str:
    """A token as iptables-restore reads it: double quotes (it knows no single ones) around one with a space or a
    character a shell would take."""
    if any(c in word for c in "\"\n"):
        raise KernelError(f"iptables rule token {word!r} cannot be written for iptables-restore")
    return f'"{word}"' if not word or any(not (c.isalnum() or c in "-_./:,=!") for c in word) else word


def delete_chain(table: str, chain: str, *, v6: bool = False) -> None:
    """Flush and delete `chain` (none: fine); the rules that jump to it must be gone first."""
    if run(table, "-S", chain, v6=v6).returncode == 0:
        flush(table, chain, v6=v6)
        must(table, "-X", chain, v6=v6)


class Chains:
    """Chains of ours, hooked into built-in ones, holding rules given as data: anything with `table`, `chain`,
    `args` and `v6` (pyflannel.firewall.Rule). `chains`: (table, chain); `hooks`: (table, built-in chain, rule,
    first?)."""

    def __init__(self, chains: tuple, hooks: tuple):
        self.chains, self.hooks = chains, hooks
        self._hooked: set[bool] = set()  # the families (v6 or not) whose chains are hooked in, by this process

    def hook(self, v6: bool) -> None:
        """Our chains exist in the family's tables and are hooked in (checked once per process)."""
        if v6 in self._hooked:
            return
        for table, chain in self.chains:
            ensure_chain(table, chain, v6=v6)
        for table, chain, rule, first in self.hooks:
            ensure(table, chain, list(rule), first=first, v6=v6)
        self._hooked.add(v6)

    def add(self, rules: list) -> None:
        """Each rule in its chain. Order matters within a chain (a RETURN before the DROP after it): when one of a
        chain's rules is missing, that chain's rules of the list are taken out and appended again in order."""
        for (table, chain, v6), group in _by_chain(rules).items():
            self.hook(v6)
            if all(exists(table, chain, list(r.args), v6=v6) for r in group):
                continue
            for rule in group:
                remove(table, chain, list(rule.args), v6=v6)
            for rule in group:
                must(table, "-A", chain, *rule.args, v6=v6)

    @staticmethod
    def remove(rules: list) -> None:
        for rule in rules:
            if available(v6=rule.v6):
                remove(rule.table, rule.chain, list(rule.args), v6=rule.v6)

    def reset(self, rules: list) -> None:
        """Our chains hold exactly `rules` afterwards, in each family that has rules or a program to run."""
        for v6 in (False, True):
            family = [rule for rule in rules if rule.v6 == v6]
            if v6 and not family and not available(v6=True):
                continue
            self.hook(v6)
            for table, chain in self.chains:
                flush(table, chain, v6=v6)
            for rule in family:
                must(rule.table, "-A", rule.chain, *rule.args, v6=v6)


def _by_chain(rules: list) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for rule in rules:
        groups.setdefault((rule.table, rule.chain, rule.v6), []).append(rule)
    return groups
