"""pyflanneld's command line as flanneld's: every flag of flanneld v0.13.0, v0.20.2 and today's main.go parses, in
Go's spellings, from the command line or FLANNELD_*; the Kubernetes subnet manager is refused in one line."""
import logging
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pyflannel.daemon import flags as cli_flags
from pyflannel.daemon.errors import UserError
from pyflannel.daemon.main import set_verbosity

pytestmark = pytest.mark.unit

# flannelFlags of main.go, read off each tag (name: a value it takes; None: a boolean)
FLANNEL_V0_13 = {
    "etcd-endpoints": "http://192.0.2.2:2379", "etcd-prefix": "/coreos.com/network", "etcd-keyfile": "",
    "etcd-certfile": "", "etcd-cafile": "", "etcd-username": "u", "etcd-password": "p", "iface": "eth0",
    "iface-regex": "^eth", "subnet-file": "/run/flannel/subnet.env", "public-ip": "192.0.2.11",
    "subnet-lease-renew-margin": "60", "ip-masq": None, "kube-subnet-mgr": None, "kube-api-url": "https://k8s",
    "kube-annotation-prefix": "flannel.alpha.coreos.com", "kubeconfig-file": "/etc/kubeconfig", "version": None,
    "healthz-ip": "127.0.0.1", "healthz-port": "8471", "iptables-resync": "5", "iptables-forward-rules": None,
    "net-config-path": "/etc/kube-flannel/net-conf.json",
}
FLANNEL_V0_20_2 = {**FLANNEL_V0_13, "iface-can-reach": "192.0.2.2", "public-ipv6": "2001:db8::11",
                   "set-node-network-unavailable": None}
FLANNEL_HEAD = {**FLANNEL_V0_20_2, "ip-masq-fully-random-disable": None, "ip-blackhole-route": None}
KLOG = {"v": "2", "vmodule": "main=3", "log_backtrace_at": "main.go:100"}
GLOG = {"logtostderr": None, "alsologtostderr": None, "stderrthreshold": "INFO", "log_dir": "/var/log"}
EVERY_FLAG = {**FLANNEL_HEAD, **KLOG, **GLOG}
PYFLANNELD = Path(sys.executable).parent / "pyflanneld"
REFUSED = {"kube-subnet-mgr", "version"}  # a line and exit 1; the version and exit 0 (tested below)


def pyflanneld(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYFLANNELD), *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", sorted(set(EVERY_FLAG) - REFUSED))
@pytest.mark.parametrize("spelling", ["-name value", "--name=value"])
def test_every_flanneld_flag_parses(name, spelling):
    value = EVERY_FLAG[name]
    dashes = spelling.split("name")[0]
    if value is None:
        argv = [f"{dashes}{name}"] if spelling == "-name value" else [f"{dashes}{name}=true"]
    else:
        argv = [f"{dashes}{name}", value] if spelling == "-name value" else [f"{dashes}{name}={value}"]
    cli_flags.parse(argv, env={})


def test_flanneld_v0_20_command_line_sets_what_applies():
    f = cli_flags.parse(["-etcd-endpoints=http://192.0.2.2:2379", "--iface-can-reach=192.0.2.2", "-ip-masq", "-v", "1",
                         "--iptables-forward-rules", "-iptables-resync=7", "--ip-blackhole-route",
                         "-ip-masq-fully-random-disable=true", "-healthz-port=0", "--logtostderr"], env={})
    assert (f.iface_can_reach, f.ip_masq, f.v, f.iptables_forward_rules, f.iptables_resync, f.ip_blackhole_route,
            f.ip_masq_fully_random_disable) == ("192.0.2.2", True, 1, True, 7, True, True)


def test_defaults_are_flanneld_s():
    f = cli_flags.parse([], env={})
    assert (f.iptables_forward_rules, f.iptables_resync, f.ip_masq_fully_random_disable, f.ip_blackhole_route,
            f.iface_can_reach, f.v) == (True, 5, False, False, None, 0)


@pytest.mark.parametrize("name,dest", [("iptables-forward-rules", "iptables_forward_rules"), ("ip-masq", "ip_masq"),
                                       ("ip-blackhole-route", "ip_blackhole_route")])
def test_booleans_take_a_value_after_equals(name, dest):
    for dashes in ("-", "--"):
        assert getattr(cli_flags.parse([f"{dashes}{name}=false"], env={}), dest) is False
        assert getattr(cli_flags.parse([f"{dashes}{name}=true"], env={}), dest) is True
        assert getattr(cli_flags.parse([f"{dashes}{name}"], env={}), dest) is True


def test_a_boolean_never_takes_the_next_word(capsys):
    """Go reads `-ip-masq false` as -ip-masq=true and stops at `false`: a silent surprise, refused here instead."""
    with pytest.raises(SystemExit) as exited:
        cli_flags.parse(["--iptables-forward-rules", "false"], env={})
    assert exited.value.code == 2
    assert "--iptables-forward-rules=false" in capsys.readouterr().err
    f = cli_flags.parse(["-ip-masq", "-iface", "eth1"], env={})  # the next flag is not its value
    assert f.ip_masq is True and f.iface == ["eth1"]


def test_environment_gives_every_flag():
    env = {"FLANNELD_IPTABLES_FORWARD_RULES": "false", "FLANNELD_IPTABLES_RESYNC": "9", "FLANNELD_V": "3",
           "FLANNELD_IFACE_CAN_REACH": "192.0.2.2", "FLANNELD_IP_BLACKHOLE_ROUTE": "true",
           "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "true", "FLANNELD_LOG_BACKTRACE_AT": "main.go:1",
           "FLANNELD_VERSION": "true"}  # as flanneld: -version only from the command line
    f = cli_flags.parse([], env=env)
    assert (f.iptables_forward_rules, f.iptables_resync, f.v, f.iface_can_reach, f.ip_blackhole_route,
            f.ip_masq_fully_random_disable) == (False, 9, 3, "192.0.2.2", True, True)
    assert cli_flags.parse(["-iptables-forward-rules=true"], env=env).iptables_forward_rules is True  # flag wins


def test_kube_subnet_mgr_is_refused_and_its_friends_warned(caplog):
    for argv, env in ((["-kube-subnet-mgr"], {}), (["--kube-subnet-mgr=true"], {}),
                      ([], {"FLANNELD_KUBE_SUBNET_MGR": "true"})):
        with pytest.raises(UserError, match="^pyflanneld uses etcd: -kube-subnet-mgr is not supported"):
            cli_flags.parse(argv, env=env)
    with caplog.at_level(logging.WARNING):
        cli_flags.parse(["-kube-subnet-mgr=false", "-kube-api-url", "https://k8s"], env={})
        cli_flags.parse([], env={})  # flannel's defaults (net-config-path has one) are no cause for a warning
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["ignoring -kube-api-url: it means nothing without -kube-subnet-mgr; pyflanneld uses etcd"]


def test_kube_subnet_mgr_exits_1_with_one_line():
    done = pyflanneld("-kube-subnet-mgr", "-kubeconfig-file", "/etc/kubeconfig")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "pyflanneld uses etcd: -kube-subnet-mgr is not supported" in lines[0]


def test_version_prints_and_exits_0_without_etcd():
    for argv in (["--version"], ["-version"], ["-version=true", "-etcd-endpoints", "http://192.0.2.99:1"]):
        done = pyflanneld(*argv)
        assert (done.returncode, done.stdout) == (0, f"pyflanneld {version('pyflannel')}\n"), done.stderr


@pytest.mark.parametrize("v,ours,libraries", [(0, logging.INFO, logging.INFO), (1, logging.DEBUG, logging.INFO),
                                              (5, logging.DEBUG, logging.DEBUG)])
def test_v_adds_detail_to_info(v, ours, libraries):
    names = ("pyflannel", "pyflanneld", "")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        logging.getLogger().setLevel(logging.INFO)
        set_verbosity(v)
        assert logging.getLogger("pyflannel.daemon.overlay").getEffectiveLevel() == ours
        assert logging.getLogger("pyflanneld").getEffectiveLevel() == ours
        assert logging.getLogger("pyroute2").getEffectiveLevel() == libraries
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
