"""pyflanneld's flags: flannel's names, with one or two leading dashes, each also from FLANNELD_<NAME>."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from pyflannel import paths


def bool_flag(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


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
    ("iface-regex", str, None, True, "regex on interface names or IPs, tried when no -iface is given; repeatable"),
    ("public-ip", str, None, False, "IP other hosts reach us at (default: the external interface's address)"),
    ("public-ipv6", str, None, False, "IPv6 address other hosts reach us at, for dual-stack networks (default: the "
     "external interface's global IPv6 address, if it has one; without one IPv6 goes over the IPv4 underlay)"),
    ("subnet-file", str, paths.SUBNET_FILE, False, "where to write subnet.env"),
    ("subnet-lease-renew-margin", _positive_int, 60, False, "renew the lease this many minutes before it expires"),
    ("ip-masq", bool_flag, False, False, "masquerade traffic that leaves the flannel network"),
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


def env_name(flag: str) -> str:
    return "FLANNELD_" + flag.upper().replace("-", "_")


def build_parser(env: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyflanneld", allow_abbrev=False,
        description="flannel-compatible overlay daemon: leases this host's subnet in etcd and programs the kernel. "
                    "Flags take one or two dashes; each is also read from FLANNELD_<NAME>.")
    for name, kind, default, repeatable, text in FLAGS:
        from_env = env.get(env_name(name))
        if repeatable:
            default = None  # filled from the environment after parsing, when no flag was given
        elif from_env is not None:
            try:
                default = kind(from_env)
            except argparse.ArgumentTypeError as e:
                parser.error(f"{env_name(name)}: {e}")
        opts = dict(dest=name.replace("-", "_"), default=default, help=f"{text} (env {env_name(name)})")
        if kind is bool_flag:
            opts.update(nargs="?", const=True, type=bool_flag)
        elif repeatable:
            opts.update(action="append", type=kind)
        else:
            opts.update(type=kind)
        parser.add_argument(f"-{name}", f"--{name}", **opts)
    return parser


def parse(argv: list[str], env: dict | None = None) -> Flags:
    env = os.environ if env is None else env
    parser = build_parser(env)
    ns = parser.parse_args(argv)
    values = vars(ns)
    for name in ("iface", "iface-regex", "dns-upstream"):
        dest = name.replace("-", "_")
        if values[dest] is None:
            values[dest] = [s for s in env.get(env_name(name), "").split(",") if s]
    values["etcd_endpoints"] = endpoint_list(values["etcd_endpoints"])
    if not values["etcd_endpoints"]:
        parser.error("argument -etcd-endpoints: no URL given")
    if bool(values["etcd_certfile"]) != bool(values["etcd_keyfile"]):
        parser.error("argument -etcd-certfile/-etcd-keyfile: give both or neither")
    for name in ("etcd_certfile", "etcd_keyfile", "etcd_cafile"):
        if values[name] and not os.path.isfile(values[name]):
            parser.error(f"argument -{name.replace('_', '-')}: {values[name]} is not a readable file")
    return Flags(**values)
