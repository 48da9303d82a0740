"""flannel's iptables rules kept by pyflanneld (issue 28): --iptables-forward-rules' FLANNEL-FWD lets a docker0 on
the lease work under FORWARD DROP (and =false does not); -ip-masq's FLANNEL-POSTRTG; both with flanneld v0.20's
exact chains, hooks and comments, one set after restarts, after what flanneld v0.13 and earlier pyflannel left, and
after rules deleted or moved by hand (--iptables-resync); FLANNEL-FWD below the isolation chains;
--ip-masq-fully-random-disable; a named network's own chain, gone when the host leaves."""
from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pyflannel import firewall
from pyflannel.daemon import flannelrules
from pyflannel.localapi import Client
from lab import REPO, VENV_BIN, wait_until

NETWORK, NETWORK6 = "10.5.0.0/16", "fd00:5::/48"
DUAL = {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}}
MASQ_HOOK = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
FORWARD_HOOK = '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'


def flanneld_masq(network: str, lease: str, fully: str = " --random-fully") -> list[str]:
    """FLANNEL-POSTRTG as flanneld v0.20.2 writes it (network/iptables.go, MasqRules), as `iptables -S` shows it."""
    multicast = "ff00::/8" if ":" in network else "224.0.0.0/4"
    c = '-m comment --comment "flanneld masq"'
    return ["-N FLANNEL-POSTRTG",
            f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {network} -d {network} {c} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {network} ! -d {multicast} {c} -j MASQUERADE{fully}",
            f"-A FLANNEL-POSTRTG ! -s {network} -d {lease} {c} -j RETURN",
            f"-A FLANNEL-POSTRTG ! -s {network} -d {network} {c} -j MASQUERADE{fully}"]


def flanneld_forward(network: str) -> list[str]:
    """FLANNEL-FWD as flanneld v0.20.2 writes it (ForwardRules)."""
    c = '-m comment --comment "flanneld forward"'
    return ["-N FLANNEL-FWD", f"-A FLANNEL-FWD -s {network} {c} -j ACCEPT",
            f"-A FLANNEL-FWD -d {network} {c} -j ACCEPT"]


# --- the rules as data ---------------------------------------------------------------------------------------------

def listed(chain: firewall.HookedChain) -> list[str]:
    """A HookedChain as `iptables -S CHAIN` would show it."""
    quote = lambda args: " ".join(f'"{a}"' if " " in a else a for a in args)  # noqa: E731
    return [f"-N {chain.chain}"] + [f"-A {chain.chain} {quote(rule)}" for rule in chain.rules]


@pytest.mark.unit
@pytest.mark.parametrize("network,lease", [(NETWORK, "10.5.34.0/24"), (NETWORK6, "fd00:5:0:22::/64")])
def test_the_default_networks_chains_are_flanneld_v0_20s(network, lease):
    net = ipaddress.ip_network(network)
    masq = firewall.masq_chain(net, ipaddress.ip_network(lease), random_fully=True)
    assert (masq.table, masq.chain, masq.builtin) == ("nat", "FLANNEL-POSTRTG", "POSTROUTING")
    assert masq.v6 == (net.version == 6)
    assert f"-A POSTROUTING {' '.join(masq.hook)}" == MASQ_HOOK.replace('"flanneld masq"', "flanneld masq")
    assert listed(masq) == flanneld_masq(network, lease)
    assert listed(firewall.masq_chain(net, ipaddress.ip_network(lease), random_fully=False)) == \
        flanneld_masq(network, lease, fully="")
    forward = firewall.forward_chain(net)
    assert (forward.table, forward.builtin) == ("filter", "FORWARD") and listed(forward) == flanneld_forward(network)
    assert forward.below == (("-j", "PYFLANNEL-ISOLATION"), ("-j", "PYFLANNEL-CNI-ISOLATION"))


@pytest.fixture
def iptables_installed(monkeypatch):
    """The rules as data, whatever this machine has (a user's PATH may lack /usr/sbin)."""
    monkeypatch.setattr(flannelrules.iptables, "available", lambda v6=False: True)
    monkeypatch.setattr(flannelrules.iptables, "has_random_fully", lambda v6=False: True)


@pytest.mark.unit
def test_a_named_network_keeps_a_chain_of_its_own_and_gets_no_forward_chain(iptables_installed):
    config = SimpleNamespace(enable_ipv4=True, network=ipaddress.ip_network("10.60.0.0/16"), ipv6=None, vni=7)
    lease = SimpleNamespace(subnet=ipaddress.ip_network("10.60.3.0/24"), ipv6_subnet=None)
    flags = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=True, iptables_forward_rules=True)
    chains, replaced = flannelrules.wanted(config, lease, flags, named=True)
    assert [(c.chain, c.hook) for c in chains] == [("PYFLANNEL-POSTRTG-7", ("-j", "PYFLANNEL-POSTRTG-7"))]
    assert "--random-fully" not in str(chains[0].rules) and "comment" not in str(chains[0].rules)
    assert replaced == []


@pytest.mark.unit
def test_the_default_network_replaces_flannel_v0_13s_rules_and_the_old_chain(iptables_installed):
    config = SimpleNamespace(enable_ipv4=True, network=ipaddress.ip_network(NETWORK), vni=1,
                             ipv6=SimpleNamespace(network=ipaddress.ip_network(NETWORK6)))
    lease = SimpleNamespace(subnet=ipaddress.ip_network("10.5.34.0/24"),
                            ipv6_subnet=ipaddress.ip_network("fd00:5:0:22::/64"))
    flags = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=False, iptables_forward_rules=False)
    chains, replaced = flannelrules.wanted(config, lease, flags, named=False)
    assert [(c.chain, c.v6) for c in chains] == [("FLANNEL-POSTRTG", False), ("FLANNEL-POSTRTG", True)]
    v4 = {(r.chain, " ".join(r.args)) for r in replaced if not r.v6}
    assert v4 == {("POSTROUTING", "-s 10.5.0.0/16 -d 10.5.0.0/16 -j RETURN"),
                  ("POSTROUTING", "-s 10.5.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE"),
                  ("POSTROUTING", "-s 10.5.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"),
                  ("POSTROUTING", "! -s 10.5.0.0/16 -d 10.5.34.0/24 -j RETURN"),
                  ("POSTROUTING", "! -s 10.5.0.0/16 -d 10.5.0.0/16 -j MASQUERADE"),
                  ("POSTROUTING", "! -s 10.5.0.0/16 -d 10.5.0.0/16 -j MASQUERADE --random-fully"),
                  ("POSTROUTING", "-j PYFLANNEL-POSTRTG")}  # FORWARD's v0.13 rules stay with =false
    flags.iptables_forward_rules, flags.ip_masq = True, False
    chains, replaced = flannelrules.wanted(config, lease, flags, named=False)
    assert [c.chain for c in chains] == ["FLANNEL-FWD", "FLANNEL-FWD"]
    assert {(r.chain, " ".join(r.args), r.v6) for r in replaced} == {
        ("FORWARD", "-s 10.5.0.0/16 -j ACCEPT", False), ("FORWARD", "-d 10.5.0.0/16 -j ACCEPT", False),
        ("FORWARD", "-s fd00:5::/48 -j ACCEPT", True), ("FORWARD", "-d fd00:5::/48 -j ACCEPT", True)}


@pytest.mark.unit
def test_the_chains_go_in_before_the_rules_they_replace_go_out(iptables_installed, monkeypatch):
    """Taking over from flannel v0.13 under FORWARD DROP: FLANNEL-FWD is hooked before v0.13's accepts are deleted,
    so no connection falls between them; the masquerade likewise."""
    network, lease = ipaddress.ip_network(NETWORK), ipaddress.ip_network("10.5.34.0/24")
    config = SimpleNamespace(enable_ipv4=True, network=network, vni=1, ipv6=None)
    flags = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=False, iptables_forward_rules=True)
    v013 = {"filter": [["-A", "FORWARD", "-s", NETWORK, "-j", "ACCEPT"],
                       ["-A", "FORWARD", "-d", NETWORK, "-j", "ACCEPT"]],
            "nat": [["-A", "POSTROUTING", "-s", NETWORK, "-d", NETWORK, "-j", "RETURN"]]}
    calls = []
    monkeypatch.setattr(flannelrules.iptables, "listing", lambda table, v6=False: v013[table])
    monkeypatch.setattr(flannelrules.iptables, "replace_chain", lambda table, chain, rules, v6=False: calls.append(
        ("write", table, chain)))
    monkeypatch.setattr(flannelrules.iptables, "must", lambda table, *args, v6=False: calls.append((args[0], table,
                                                                                                   args[1])))
    monkeypatch.setattr(flannelrules.iptables, "delete_chain", lambda table, chain, v6=False: calls.append(
        ("-X", table, chain)))
    kept = flannelrules.FlannelRules("default")
    kept.keep(*flannelrules.wanted(config, SimpleNamespace(subnet=lease, ipv6_subnet=None), flags, named=False))
    assert calls[-1] == ("-X", "nat", "PYFLANNEL-POSTRTG")  # pyflannel's earlier chain goes last, with its hook
    for table, builtin in (("filter", "FORWARD"), ("nat", "POSTROUTING")):
        ours = [c for c in calls[:-1] if c[1] == table]
        assert [c[0] for c in ours] == ["write", "-I"] + ["-D"] * (len(ours) - 2), ours
        assert all(c[2] == builtin for c in ours[1:])


# --- in the lab -----------------------------------------------------------------------------------------------------

def rules(host, table: str, chain: str, v6: bool = False) -> list[str]:
    return host.sh("ip6tables" if v6 else "iptables", "-t", table, "-S", chain).splitlines()


def restart(host, *flags: str) -> None:
    """pyflanneld stopped and started again; returns once it has written its rules (subnet.env is there already)."""
    host.daemon.kill(signal.SIGTERM)
    before = host.daemon.log().count("subnet.env written")
    host.start_daemon(*flags)
    wait_until("pyflanneld to use its lease", lambda: host.daemon.log().count("subnet.env written") > before)


def connects(src_ns: str, dst_ip: str, tag: str) -> bool:
    """A TCP connection from a container's namespace, carrying `tag` (lab/listener.py prints it)."""
    client = ("import socket,sys; s=socket.create_connection((sys.argv[1], 8080), timeout=2); "
              "s.sendall(sys.argv[2].encode() + b'\\n'); s.close()")
    return subprocess.run(["ip", "netns", "exec", src_ns, sys.executable, "-c", client, dst_ip, tag],
                          capture_output=True, timeout=10).returncode == 0


@pytest.mark.lab
def test_forward_rules_open_a_docker0_on_the_lease_under_forward_drop(make_lab):
    """The classic setup (dockerd --bip=$FLANNEL_SUBNET, FORWARD policy DROP): another host's container opens a
    connection to a container on docker0 with the forward rules, and cannot without them."""
    lab = make_lab(2)
    lab.set_config()
    for host in lab.hosts:
        host.sh("iptables", "-P", "FORWARD", "DROP")
        host.start_daemon("--iptables-forward-rules=false")
        host.add_bridge("docker0")
        host.add_container("docker0")
    h1, h2 = lab.hosts
    listener = lab.spawn("h1-listener", [str(VENV_BIN / "python"), str(REPO / "lab" / "listener.py"), "8080"],
                         ns=h1.containers[0].ns)
    time.sleep(0.5)
    assert "FLANNEL-FWD" not in h1.sh("iptables", "-S")
    assert not connects(h2.containers[0].ns, h1.containers[0].ip, "without")  # dropped: FORWARD DROP

    for host in lab.hosts:
        restart(host)  # --iptables-forward-rules: true by default
    assert FORWARD_HOOK in rules(h1, "filter", "FORWARD")
    assert connects(h2.containers[0].ns, h1.containers[0].ip, "with")
    wait_until("the connection's line", lambda: "with" in listener.log(), timeout=5)
    assert "without" not in listener.log()


@pytest.mark.lab
def test_one_set_of_flanneld_rules_after_restarts_leftovers_and_hand_edits(make_lab):
    lab = make_lab(1)
    lab.set_config(DUAL)
    h1 = lab.hosts[0]
    h1.start_daemon("--iptables-forward-rules=false")
    env = h1.subnet_env()
    lease = str(ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network)
    lease6 = str(ipaddress.ip_interface(env["FLANNEL_IPV6_SUBNET"]).network)
    h1.daemon.kill(signal.SIGTERM)
    # what flanneld v0.13 left (rules straight in POSTROUTING and FORWARD), pyflannel's earlier chain, and the
    # driver's isolation chain, hooked first in FORWARD
    ipt = lambda *args: h1.sh("iptables", "-w", "5", *args)  # noqa: E731
    for rule in (("-s", NETWORK, "-d", NETWORK, "-j", "RETURN"),
                 ("-s", NETWORK, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"),
                 ("!", "-s", NETWORK, "-d", lease, "-j", "RETURN"),
                 ("!", "-s", NETWORK, "-d", NETWORK, "-j", "MASQUERADE", "--random-fully")):
        ipt("-t", "nat", "-A", "POSTROUTING", *rule)
    ipt("-A", "FORWARD", "-s", NETWORK, "-j", "ACCEPT")
    ipt("-A", "FORWARD", "-d", NETWORK, "-j", "ACCEPT")
    ipt("-t", "nat", "-N", "PYFLANNEL-POSTRTG")
    ipt("-t", "nat", "-A", "PYFLANNEL-POSTRTG", "-s", NETWORK, "-j", "MASQUERADE")
    ipt("-t", "nat", "-I", "POSTROUTING", "1", "-j", "PYFLANNEL-POSTRTG")
    ipt("-N", "PYFLANNEL-ISOLATION")
    ipt("-I", "FORWARD", "1", "-j", "PYFLANNEL-ISOLATION")

    restart(h1, "-ip-masq", "--iptables-resync", "1")
    assert rules(h1, "nat", "POSTROUTING") == ["-P POSTROUTING ACCEPT", MASQ_HOOK]
    assert rules(h1, "nat", "FLANNEL-POSTRTG") == flanneld_masq(NETWORK, lease)
    assert rules(h1, "filter", "FORWARD") == ["-P FORWARD ACCEPT", "-A FORWARD -j PYFLANNEL-ISOLATION", FORWARD_HOOK]
    assert rules(h1, "filter", "FLANNEL-FWD") == flanneld_forward(NETWORK)
    assert "PYFLANNEL-POSTRTG" not in h1.sh("iptables", "-t", "nat", "-S")
    assert rules(h1, "nat", "POSTROUTING", v6=True) == ["-P POSTROUTING ACCEPT", MASQ_HOOK]
    assert rules(h1, "nat", "FLANNEL-POSTRTG", v6=True) == flanneld_masq(NETWORK6, lease6)
    assert rules(h1, "filter", "FLANNEL-FWD", v6=True) == flanneld_forward(NETWORK6)

    # a second start: still one set
    restart(h1, "-ip-masq", "--iptables-resync", "1")
    assert rules(h1, "nat", "POSTROUTING") == ["-P POSTROUTING ACCEPT", MASQ_HOOK]
    assert rules(h1, "filter", "FORWARD") == ["-P FORWARD ACCEPT", "-A FORWARD -j PYFLANNEL-ISOLATION", FORWARD_HOOK]

    # by hand: the hook deleted, a rule deleted, a second hook, flanneld's hook moved first: back within 1 s resyncs
    hook = ("-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG")
    forward_hook = ("-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD")
    for edit, settled in (
            (lambda: ipt("-t", "nat", "-D", "POSTROUTING", *hook),
             lambda: rules(h1, "nat", "POSTROUTING") == ["-P POSTROUTING ACCEPT", MASQ_HOOK]),
            (lambda: ipt("-t", "nat", "-A", "POSTROUTING", *hook),
             lambda: rules(h1, "nat", "POSTROUTING") == ["-P POSTROUTING ACCEPT", MASQ_HOOK]),
            (lambda: ipt("-t", "nat", "-D", "FLANNEL-POSTRTG", "2"),
             lambda: rules(h1, "nat", "FLANNEL-POSTRTG") == flanneld_masq(NETWORK, lease)),
            (lambda: (ipt("-D", "FORWARD", *forward_hook), ipt("-I", "FORWARD", *forward_hook)),  # flanneld's -I
             lambda: rules(h1, "filter", "FORWARD")[1:] == ["-A FORWARD -j PYFLANNEL-ISOLATION", FORWARD_HOOK]),
            (lambda: h1.sh("ip6tables", "-F", "FLANNEL-FWD"),
             lambda: rules(h1, "filter", "FLANNEL-FWD", v6=True) == flanneld_forward(NETWORK6))):
        before = h1.daemon.log().count("were missing or changed")
        edit()
        wait_until("the resync", settled, timeout=4)
        wait_until("its warning", lambda: h1.daemon.log().count("were missing or changed") > before, timeout=2)
    # all in place: nothing rewritten
    quiet = h1.daemon.log().count("iptables")
    time.sleep(2.5)
    assert h1.daemon.log().count("iptables") == quiet

    restart(h1, "-ip-masq", "--ip-masq-fully-random-disable")
    assert rules(h1, "nat", "FLANNEL-POSTRTG") == flanneld_masq(NETWORK, lease, fully="")
    assert "--random-fully" not in h1.sh("ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG")

    # a named network: a chain of its own per VNI, no FLANNEL-FWD of its own; gone when the host leaves
    vni = Client(str(h1.api_sock)).join("shop", "10.60.0.0/16")["vni"]
    chain = f"PYFLANNEL-POSTRTG-{vni}"
    assert f"-A POSTROUTING -j {chain}" in rules(h1, "nat", "POSTROUTING")
    assert len(rules(h1, "nat", chain)) == 5 and len(rules(h1, "filter", "FLANNEL-FWD")) == 3
    Client(str(h1.api_sock)).leave("shop")
    assert chain not in h1.sh("iptables", "-t", "nat", "-S") and chain not in h1.sh("ip6tables", "-t", "nat", "-S")
    assert rules(h1, "nat", "POSTROUTING") == ["-P POSTROUTING ACCEPT", MASQ_HOOK]
