"""pyflanneld's flags: flannel's names, with one or two leading dashes, each also from FLANNELD_<NAME>.

Every flag of flanneld (v0.13 to today) is accepted, so its command lines and unit files work unchanged: the ones
that apply are honoured; klog's and glog's logging flags set the verbosity (-v) or are accepted without effect (logs
go to stderr, as flanneld's under systemd); the Kubernetes subnet manager's are refused (-kube-subnet-mgr) or warned
about as unused, since pyflanneld keeps its leases in etcd. Go's syntax: `-name value` or `-name=value`, and a
boolean flag takes a value only after `=` (`-ip-masq=false`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from pyflannel import paths, version_line

from .errors import UserError

log = logging.getLogger("pyflanneld")


def bool_flag(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _level(text: str) -> int:
    if not str(text).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a verbosity level (0, 1, 2, ...)")
    return int(text)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(text: str) -> str:
    if str(text).lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return str(text).lower()


def _positive_int(text: str) -> int:
    if not str(text).isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def endpoint_list(text: str) -> list[str]:
    """-etcd-endpoints' comma-separated URLs."""
    return [e.strip() for e in text.split(",") if e.strip()]


def _port(text: str) -> int:
    if not str(text).isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 0 to 65535")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


DNS_ADDRESS = "169.254.53.53"  # link-local: never routed off the host, the same on every host

# name, type, default, repeatable, help
FLAGS = [
    ("etcd-endpoints", str, "http://127.0.0.1:4001,http://127.0.0.1:2379", False,
     "comma-separated etcd URLs"),
    ("etcd-prefix", str, "/coreos.com/network", False, "etcd prefix of the network config and leases"),
    ("etcd-certfile", str, None, False, "TLS client certificate for etcd"),
    ("etcd-keyfile", str, None, False, "TLS client key for etcd"),
    ("etcd-cafile", str, None, False, "CA bundle to verify etcd's certificate"),
    ("etcd-username", str, None, False, "etcd user (auth)"),
    ("etcd-password", str, None, False, "etcd password (auth)"),
    ("etcd-api", str, "auto", False, "etcd API: v3 (flannel >= 0.18), v2 (older flannel) or auto (where "
     "<prefix>/config is, v3 first)"),
    ("iface", str, None, True, "external interface, by name or IP; repeat to give fallbacks in order"),
    ("iface-regex", str, None, True, "regex on interface names or IPs, tried when no -iface matches; repeatable"),
    ("iface-can-reach", str, None, False, "the interface the kernel routes this address through (`ip route get "
     "ADDR`), and the route's source address as public IP; tried when no -iface or -iface-regex matches"),
    ("public-ip", str, None, False, "IP other hosts reach us at (default: the external interface's address)"),
    ("public-ipv6", str, None, False, "IPv6 address other hosts reach us at, for dual-stack networks (default: the "
     "external interface's global IPv6 address, if it has one; without one IPv6 goes over the IPv4 underlay)"),
    ("subnet-file", str, paths.SUBNET_FILE, False, "where to write subnet.env"),
    ("subnet-lease-renew-margin", _positive_int, 60, False, "renew the lease this many minutes before it expires"),
    ("ip-masq", bool_flag, False, False, "masquerade traffic that leaves the flannel network"),
    ("ip-masq-fully-random-disable", bool_flag, False, False, "masquerade without --random-fully (ports picked "
     "in sequence, not at random)"),
    ("iptables-forward-rules", bool_flag, True, False, "accept forwarding from and to the flannel network in the "
     "FORWARD chain (for hosts whose FORWARD policy is DROP, as Docker sets it)"),
    ("iptables-resync", _positive_int, 5, False, "seconds between checks that pyflanneld's iptables rules are in "
     "place"),
    ("ip-blackhole-route", bool_flag, False, False, "a blackhole route for this host's lease, so traffic to its "
     "unused addresses is dropped here instead of following the default route"),
    ("healthz-ip", str, "0.0.0.0", False, "address of the /healthz and /readyz endpoint"),
    ("healthz-port", _port, 0, False, "port of the /healthz, /readyz and /metrics endpoint (0: off)"),
    ("state-dir", str, paths.STATE_DIR, False, "where state that survives a restart lives (VTEP MAC)"),
    ("reconcile-interval", _seconds, 10.0, False, "seconds between full kernel-vs-leases reconciliations"),
    ("driver-socket", str, paths.DRIVER_SOCKET, False, "pyflannel-driver's socket, whose metrics /metrics includes"),
    ("api-socket", str, paths.DAEMON_SOCKET, False, "Unix socket of the local API, on which pyflannel-driver and the "
     "CNI plugin join and leave named networks"),
    ("dns-address", str, DNS_ADDRESS, False, "address (put on lo) where container names are answered over DNS, the "
     "same on every host; give it to dockerd as --dns; empty: no DNS"),
    ("dns-upstream", str, None, True, "resolver for the other names; repeatable (default: /etc/resolv.conf's)"),
    ("names-ttl", _positive_int, 60, False, "seconds a host's container names stay in etcd after it stops renewing"),
    ("allow-container-tunnels", bool_flag, False, False, "let containers send to the overlay's UDP ports (VXLAN, "
     "WireGuard): for container networks that run a tunnel of their own"),
    ("allow-container-etcd", bool_flag, False, False, "let containers open connections to the etcd endpoints "
     "pyflanneld uses: for clusters whose applications share that etcd"),
    ("log-level", _log_level, "info", False, "the least severe messages logged: debug (pyflannel's DEBUG messages, "
     "as -v=1), info, warning or error; a -v above 0 wins over it"),
    ("v", _level, 0, False, "log verbosity: 0 logs from -log-level up; 1 to 4 add pyflannel's DEBUG messages; 5 and "
     "more the libraries' too (pyroute2, the etcd client, urllib3)"),
]

# klog's (v0.20 on) and glog's (v0.13) flags flanneld takes besides -v: accepted, without effect (logs go to stderr)
LOGGING_FLAGS = [
    ("vmodule", str, None, False, "klog's per-file verbosity: accepted, no effect"),
    ("log_backtrace_at", str, None, False, "klog's stack trace at a log line: accepted, no effect"),
    ("logtostderr", bool_flag, None, False, "glog's: accepted; pyflanneld always logs to stderr"),
    ("alsologtostderr", bool_flag, None, False, "glog's: accepted; pyflanneld always logs to stderr"),
    ("stderrthreshold", str, None, False, "glog's: accepted, no effect"),
    ("log_dir", str, None, False, "glog's: accepted, no effect (no log files: stderr only)"),
]

# The Kubernetes subnet manager's flags (flannel's defaults in the help): -kube-subnet-mgr is refused; the others,
# which mean nothing without it, are warned about when given.
KUBE_FLAGS = [
    ("kube-subnet-mgr", bool_flag, None, False, "refused: pyflanneld keeps its leases in etcd"),
    ("kube-api-url", str, None, False, "unused (-kube-subnet-mgr's)"),
    ("kube-annotation-prefix", str, None, False, "unused (-kube-subnet-mgr's; flannel's default "
     "flannel.alpha.coreos.com)"),
    ("kubeconfig-file", str, None, False, "unused (-kube-subnet-mgr's)"),
    ("net-config-path", str, None, False, "unused (-kube-subnet-mgr's; flannel's default "
     "/etc/kube-flannel/net-conf.json): the network config is <prefix>/config in etcd"),
    ("set-node-network-unavailable", bool_flag, None, False, "unused (-kube-subnet-mgr's)"),
]


@dataclass
class Flags:
    etcd_endpoints: list[str]
    etcd_prefix: str
    etcd_certfile: str | None
    etcd_keyfile: str | None
    etcd_cafile: str | None
    etcd_username: str | None
    etcd_password: str | None
    etcd_api: str
    iface: list[str]
    iface_regex: list[str]
    public_ip: str | None
    public_ipv6: str | None
    subnet_file: str
    subnet_lease_renew_margin: int
    ip_masq: bool
    healthz_ip: str
    healthz_port: int
    state_dir: str
    reconcile_interval: float
    driver_socket: str
    api_socket: str
    dns_address: str
    dns_upstream: list[str]
    names_ttl: int
    allow_container_tunnels: bool
    allow_container_etcd: bool
    iface_can_reach: str | None
    ip_masq_fully_random_disable: bool
    iptables_forward_rules: bool
    iptables_resync: int
    ip_blackhole_route: bool
    log_level: str
    v: int


def env_name(flag: str) -> str:
    return "FLANNELD_" + flag.upper().replace("-", "_")


def dest(flag: str) -> str:
    return flag.replace("-", "_")


def build_parser(env: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyflanneld", allow_abbrev=False,
        description="flannel-compatible overlay daemon: leases this host's subnet in etcd and programs the kernel. "
                    "Flags take one or two dashes; each is also read from FLANNELD_<NAME>. A true/false flag takes "
                    "its value after '=' (-ip-masq=false), as flanneld's.")
    for name, kind, default, repeatable, text in FLAGS + LOGGING_FLAGS + KUBE_FLAGS:
        from_env = env.get(env_name(name))
        if repeatable:
            default = None  # filled from the environment after parsing, when no flag was given
        elif from_env is not None:
            try:
                default = kind(from_env)
            except argparse.ArgumentTypeError as e:
                parser.error(f"{env_name(name)}: {e}")
        opts = dict(dest=dest(name), default=default, help=f"{text} (env {env_name(name)})")
        if kind is bool_flag:
            opts.update(nargs="?", const=True, type=bool_flag, metavar="BOOL")
        elif repeatable:
            opts.update(action="append", type=kind)
        else:
            opts.update(type=kind)
        parser.add_argument(f"-{name}", f"--{name}", **opts)
    parser.add_argument("-version", "--version", nargs="?", const=True, type=bool_flag, default=False, metavar="BOOL",
                        help="print pyflanneld's version and exit")  # as flanneld's: not from the environment
    return parser


BOOLEANS = {dest(name) for name, kind, *_ in FLAGS + LOGGING_FLAGS + KUBE_FLAGS if kind is bool_flag} | {"version"}


def go_booleans(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Go's flag syntax for argparse: a boolean flag given alone (`-ip-masq`) is true and does not take the next
    word, so it becomes `-ip-masq=true`; `-ip-masq false`, which flanneld would read as true, is refused."""
    out: list[str] = []
    words = iter(argv)
    for arg in words:
        if arg == "--":
            return out + [arg, *words]
        name, equals, _ = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or equals or dest(name) not in BOOLEANS:
            out.append(arg)
            continue
        out.append(f"{arg}=true")
        word = next(words, None)
        if word is None:
            break
        if not word.startswith("-") and _is_boolean(word):
            parser.error(f"argument {arg}: a true/false value goes after '=' ({arg}={word}), as flanneld reads it")
        out.append(word)  # an argument of its own, as in Go
    return out


def _is_boolean(word: str) -> bool:
    try:
        bool_flag(word)
        return True
    except argparse.ArgumentTypeError:
        return False


def parse(argv: list[str], env: dict | None = None) -> Flags:
    env = os.environ if env is None else env
    parser = build_parser(env)
    values = vars(parser.parse_args(go_booleans(parser, argv)))
    if values.pop("version"):
        print(version_line("pyflanneld"))
        sys.exit(0)
    for name, *_ in LOGGING_FLAGS:
        del values[dest(name)]
    kube = {name: values.pop(dest(name)) for name, *_ in KUBE_FLAGS}
    if kube["kube-subnet-mgr"]:
        raise UserError("pyflanneld uses etcd: -kube-subnet-mgr is not supported (leases in the Kubernetes API); "
                        "give -etcd-endpoints and drop -kube-subnet-mgr")
    unused = [f"-{name}" for name, value in kube.items() if value is not None and name != "kube-subnet-mgr"]
    if unused:
        log.warning("ignoring %s: %s without -kube-subnet-mgr; pyflanneld uses etcd", ", ".join(unused),
                    "it means nothing" if len(unused) == 1 else "they mean nothing")
    for name in ("iface", "iface-regex", "dns-upstream"):
        if values[dest(name)] is None:
            values[dest(name)] = [s for s in env.get(env_name(name), "").split(",") if s]
    values["etcd_endpoints"] = endpoint_list(values["etcd_endpoints"])
    if not values["etcd_endpoints"]:
        parser.error("argument -etcd-endpoints: no URL given")
    if bool(values["etcd_certfile"]) != bool(values["etcd_keyfile"]):
        parser.error("argument -etcd-certfile/-etcd-keyfile: give both or neither")
    for name in ("etcd_certfile", "etcd_keyfile", "etcd_cafile"):
        if values[name] and not os.path.isfile(values[name]):
            parser.error(f"argument -{name.replace('_', '-')}: {values[name]} is not a readable file")
    return Flags(**values)
