"""`pyflannel`: the operator's view of a host — `pyflannel status [--json]`, `pyflannel doctor [--json]`; `join`,
`leave`, `rotate-key`; `docker-opts` for a docker0 on the lease; `swarm-network` for swarm services."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from pyflannel import localapi, paths, subnetenv, version_line
from pyflannel.dockeropts import DOCKER_ENV
from pyflannel.files import write_atomically


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    from pyflannel.daemon.flags import FLAGS, endpoint_list, env_name
    for name, kind, default, _, text in FLAGS:
        if name.startswith("etcd-") or name in ("subnet-file", "api-socket", "dns-address"):
            parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"),
                                type=endpoint_list if name == "etcd-endpoints" else str,
                                default=os.environ.get(env_name(name), default), help=text)


def _reachable(ip: str) -> bool:
    ipaddress.ip_address(ip)  # only an address from a parsed lease reaches the argv
    return subprocess.run(["ping", "-c", "1", "-W", "1", "-q", ip], capture_output=True).returncode == 0


def collect(args) -> dict:
    from pyflannel.daemon import store as stores
    from pyflannel.kernel.netlink import Kernel
    from pyflannel.daemon.store.base import StoreError

    report = {"host": {}, "hosts": [], "routes": [], "problems": []}
    try:
        env = subnetenv.read(args.subnet_file)
        report["host"] = {"subnet": str(env.lease or "none (IPv6 only)"), "network": str(env.network), "mtu": env.mtu,
                          "ipmasq": env.ipmasq, "subnet_file": args.subnet_file}
        if env.lease6:
            report["host"].update(ipv6_subnet=str(env.lease6), ipv6_network=str(env.ipv6_network))
    except subnetenv.SubnetEnvError as e:
        report["problems"].append(str(e))
        env = None
    kernel = Kernel()
    routes = kernel.routes() | kernel.routes(socket.AF_INET6)
    by_subnet = {r.dst: r for r in routes}
    report["routes"] = [f"{r.dst} via {r.gateway}{' onlink' if r.onlink else ''}" for r in sorted(
        routes, key=lambda r: (r.dst.version, int(r.dst.network_address)))]
    try:
        store = stores.from_flags(args)
        leases, _ = store.leases()
        report["host"]["etcd"] = "reachable"
    except (StoreError, ValueError) as e:
        report["problems"].append(f"etcd: {e}")
        report["host"]["etcd"] = "unreachable"
        leases = []
    now = datetime.now(timezone.utc)
    def is_own(lease) -> bool:
        return env is not None and (lease.subnet == env.lease or env.lease6 is not None
                                    and lease.ipv6_subnet == env.lease6)

    own = env.lease if env else None
    peers = [lease for lease in leases if not is_own(lease)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        reachable = dict(zip((p.subnet for p in peers), pool.map(lambda p: _reachable(p.public_ip), peers)))
    for lease in sorted(leases, key=lambda lease: int(lease.subnet.network_address)):
        expires = (f"{int((lease.expiration - now).total_seconds())}s" if lease.expiration else "never (reserved)")
        mine = is_own(lease)
        report["hosts"].append({
            "subnet": str(lease.subnet), "ipv6_subnet": str(lease.ipv6_subnet or "") or None,
            "public_ip": lease.public_ip, "vtep_mac": lease.vtep_mac or lease.vtep_mac_v6 or "",
            "backend": lease.backend_type, "expires_in": expires, "self": mine,
            "programmed": mine or lease.subnet in by_subnet or lease.ipv6_subnet in by_subnet,
            "reachable": True if mine else reachable.get(lease.subnet, False),
        })
    if own and leases and not any(h["self"] for h in report["hosts"]):
        report["problems"].append(f"this host's subnet {own} has no lease in etcd")
    try:
        report["networks"] = localapi.Client(args.api_socket, timeout=3.0).networks()
    except localapi.DaemonError as e:
        report["networks"] = []
        report["problems"].append(str(e))
    report["problems"] += [f"flannel network {n['name']}: {n['error']}" for n in report["networks"] if n["error"]]
    report["problems"] += [f"flannel network {n['name']}: this host's lease moved from {n['moved_from']} to "
                           f"{n['lease']}: Docker networks and containers on the old one must be made again "
                           f"(`pyflannel doctor` names them, with the steps)" for n in report["networks"]
                           if n.get("moved_from")]
    return report


def table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """Upper-case headers and rows, each column as wide as its widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    return ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))] + [
        "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]


def render(report: dict) -> str:
    host = report["host"]
    ipv6 = (f" and IPv6 subnet {host['ipv6_subnet']} of {host['ipv6_network']}" if host.get("ipv6_subnet") else "")
    lines = [f"this host: subnet {host.get('subnet', '?')} of {host.get('network', '?')}{ipv6}, MTU "
             f"{host.get('mtu', '?')}, etcd {host.get('etcd', '?')}", ""]
    dual = any(h["ipv6_subnet"] for h in report["hosts"])
    columns = ("subnet", *(("ipv6_subnet",) if dual else ()), "public_ip", "vtep_mac", "backend", "expires_in",
               "programmed", "reachable")
    rows = [[("*" if h["self"] else "") + str(h[c]) if c == "subnet" else
             ("yes" if h[c] else "NO") if isinstance(h[c], bool) else str(h[c]) for c in columns]
            for h in report["hosts"]]
    lines += table(columns, rows)
    lines += ["", "routes programmed (proto 77):"] + [f"  {r}" for r in report["routes"] or ["none"]]
    if report["networks"]:
        dual = any(n.get("ipv6_lease") for n in report["networks"])
        columns = ("name", "network", "vni", "lease", *(("ipv6_lease",) if dual else ()), "peers", "state")
        rows = [[str(n.get(c) if n.get(c) is not None else "-") for c in columns] for n in report["networks"]]
        lines += ["", "flannel networks served by pyflanneld:"] + ["  " + line for line in table(columns, rows)]
    if report["problems"]:
        lines += ["", "problems:"] + [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def membership(args) -> int:
    """`pyflannel join|leave NAME`: for hosts whose containers come from CNI (the Docker driver does it itself);
    `pyflannel rotate-key [NAME]`: a new WireGuard key for a network of this host."""
    client = localapi.Client(args.api_socket)
    try:
        if args.command == "join":
            network = client.join(args.name, args.subnet, args.backend, args.ipv6)
            print(f"{args.name}: Network {network['network']}, backend {network['backend']}, device "
                  f"{network['device']}, this host's lease {network['lease']} ({network['subnet_file']})")
        elif args.command == "rotate-key":
            network = client.rotate_key(args.name)
            print(f"{args.name}: new WireGuard public key {network['public_key']}, published in lease "
                  f"{network['lease']}")
        else:
            client.leave(args.name)
            print(f"{args.name}: left")
    except localapi.DaemonError as e:
        print(f"pyflannel {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


def names(args) -> int:
    """`pyflannel status --names`: every host's container names in the networks this host serves."""
    try:
        records = localapi.Client(args.api_socket).names()
    except localapi.DaemonError as e:
        print(f"pyflannel status --names: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        rows = [[r["network"], ", ".join(r["names"]), r["address"], r["host"]] for r in records]
        print("\n".join(table(("network", "names", "address", "host"), rows)))
    return 0


class DockerError(Exception):
    """A `docker` command failed; the message is Docker's own."""


def _docker(*args: str) -> str:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise DockerError("the docker command is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise DockerError(f"`docker {' '.join(args)}` did not answer within 60 s") from None
    if done.returncode:
        raise DockerError(done.stderr.strip() or f"`docker {' '.join(args)}` failed")
    return done.stdout.strip()


def _inspect(network: str) -> dict | None:
    """`docker network inspect NETWORK`, or None when this engine has no such network."""
    try:
        return json.loads(_docker("network", "inspect", network))[0]
    except DockerError as e:
        if "not found" in str(e).lower() or "no such network" in str(e).lower():
            return None
        raise


def swarm_network(args) -> int:
    """`pyflannel swarm-network NAME`: Docker's way to a swarm network for a local-scope driver, in one command run
    on every node (also on one that joins later): the config-only network NAME-config (pyflannel's IPAM on flannel
    network --network) on this node, and on a manager the swarm network NAME made from it. Each step is skipped
    when its network exists as asked."""
    from pyflannel.driver.validation import OPT_BACKEND, OPT_NETWORK, swarm_commands
    flannel = args.network or args.name
    problem = localapi.name_problem(flannel)
    if problem:
        print(f"pyflannel swarm-network: --network: {problem}", file=sys.stderr)
        return 1
    try:
        try:
            plugin, enabled = _docker("plugin", "inspect", "-f", "{{.Name}} {{.Enabled}}", args.plugin).split()
        except DockerError as e:
            raise DockerError(f"{e}: swarm takes only a managed plugin; name it with --plugin or PYFLANNEL_PLUGIN")
        if enabled != "true":
            raise DockerError(f"the plugin {plugin} is disabled: `docker plugin enable {plugin}`")
        node, manager = _docker("info", "-f", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}").split()
        config_only, swarm = swarm_commands(args.name, flannel, plugin,
                                            (f"{OPT_BACKEND}={args.backend}",) if args.backend else (), tuple(args.opt))
        config = config_only[-1]
        found = _inspect(config)
        if found is None:
            _docker(*config_only[1:])
            print(f"{config}: config-only network made (--ipam-driver {plugin}, flannel network {flannel})")
        elif not found.get("ConfigOnly") or (found["IPAM"]["Driver"], (found["IPAM"]["Options"] or {}).get(
                OPT_NETWORK)) != (plugin, flannel):
            raise DockerError(f"this engine has a network {config} that is not the config-only network of {plugin} "
                              f"for flannel network {flannel}: remove it (`docker network rm {config}`) and run "
                              f"this again")
        else:
            print(f"{config}: config-only network already here")
        if node != "active":
            print(f"{args.name}: this engine is in no swarm; {config} is ready for when it joins one")
        elif manager != "true":
            print(f"{args.name}: this node is a worker: the swarm network is made on a manager, by the same command")
        else:
            found = _inspect(args.name)
            if found is None:
                _docker(*swarm[1:])
                print(f"{args.name}: swarm network made (--config-from {config}); every node needs {config}: run "
                      f"`pyflannel swarm-network {args.name}` on each, also on a node that joins later")
            elif (found.get("Scope"), (found.get("ConfigFrom") or {}).get("Network")) != ("swarm", config):
                raise DockerError(f"this swarm has a network {args.name} not made --config-from {config}: remove "
                                  f"it (`docker network rm {args.name}`, once no service uses it) and run this again")
            else:
                print(f"{args.name}: swarm network already here")
    except DockerError as e:
        print(f"pyflannel swarm-network: {e}", file=sys.stderr)
        return 1
    return 0


def docker_opts(args) -> int:
    """`pyflannel docker-opts`: flannel's mk-docker-opts.sh, with its switches."""
    from pyflannel import dockeropts
    from pyflannel.kernel.netlink import Kernel
    try:
        env = subnetenv.read(args.f)
    except subnetenv.SubnetEnvError as e:
        print(f"pyflannel docker-opts: {e}", file=sys.stderr)
        return 1
    if env.lease is not None:
        kernel = Kernel()
        try:
            routed = [r for r in kernel.all_routes() if r.get("RTA_GATEWAY") and r.get("RTA_DST") == str(
                env.lease.network_address) and r["dst_len"] == env.lease.prefixlen]
        finally:
            kernel.close()
        if routed:
            print(f"pyflannel docker-opts: the routing table already has {env.lease} via "
                  f"{routed[0].get('RTA_GATEWAY')}: docker0 cannot hold this host's lease (another flannel daemon "
                  f"or a stale route has it)", file=sys.stderr)
            return 1
    neither = not args.i and not args.c
    choice = dockeropts.Choice(individual=args.i or neither, combined=args.c or neither, key=args.k,
                               ip_masq=not args.m)
    try:
        write_atomically(args.d, dockeropts.render(env, choice, os.environ.get(args.k, "")))
    except OSError as e:
        print(f"pyflannel docker-opts: cannot write {args.d}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyflannel", description="Inspect a pyflannel host, or make it join or "
                                                                   "leave a named flannel network.")
    parser.add_argument("--version", action="version", version=version_line("pyflannel"))
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="hosts, leases, reachability and this host's routes")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--names", action="store_true", help="the container names pyflanneld answers over DNS")
    _add_store_flags(status)
    doctor = sub.add_parser("doctor", help="check this host for known flannel problems, each with its fix")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--driver-state-dir",
                        default=paths.driver_state_dir(os.environ.get("FLANNELD_STATE_DIR", paths.STATE_DIR)),
                        help="pyflannel-driver's --state-dir, for its networks (default: the driver folder of "
                             "FLANNELD_STATE_DIR or %(default)s)")
    _add_store_flags(doctor)
    from pyflannel.daemon.flags import bool_flag, env_name
    doctor.add_argument("-allow-container-tunnels", "--allow-container-tunnels", nargs="?", const=True,
                        type=bool_flag, default=bool_flag(os.environ.get(env_name("allow-container-tunnels"), "false")),
                        help="pyflanneld's flag: containers may send to the overlay's UDP ports")
    doctor.add_argument("-subnet-lease-renew-margin", "--subnet-lease-renew-margin", type=int,
                        dest="subnet_lease_renew_margin",
                        default=int(os.environ.get(env_name("subnet-lease-renew-margin"), 60)),
                        help="minutes: a lease with less time left is not being renewed (pyflanneld's flag)")
    for command, text in (("join", "serve a named flannel network on this host (the first host creates it)"),
                          ("leave", "stop serving a named flannel network: this host's lease and devices go"),
                          ("rotate-key", "give this host a new WireGuard key in a wireguard network; peers follow")):
        action = sub.add_parser(command, help=text)
        if command == "rotate-key":
            action.add_argument("name", nargs="?", default=localapi.DEFAULT_NETWORK,
                                help="the flannel network (default: %(default)s)")
        else:
            action.add_argument("name", help="the flannel network's name (<prefix>/<NAME> in etcd)")
        if command == "join":
            action.add_argument("--subnet", help="its cluster-wide Network, when this host creates it")
            action.add_argument("--backend", choices=localapi.BACKENDS,
                                help="its backend, when this host creates it (default vxlan)")
            action.add_argument("--ipv6", action="store_true",
                                help="dual stack: its own IPv6Network beside the IPv4 one (IPv4 only otherwise)")
        action.add_argument("-api-socket", "--api-socket", default=os.environ.get("FLANNELD_API_SOCKET",
                                                                                 paths.DAEMON_SOCKET),
                            help="pyflanneld's -api-socket (default %(default)s)")
    swarm = sub.add_parser("swarm-network", help="a swarm network on pyflannel: its config-only network on this "
                                                 "node and, on a manager, the swarm network (run on every node)")
    swarm.add_argument("name", help="the swarm network's name (its config-only network is NAME-config)")
    swarm.add_argument("--network", help="the flannel network it uses (default: NAME)")
    swarm.add_argument("--backend", choices=localapi.BACKENDS,
                       help="the flannel network's backend, when this creates it (default vxlan)")
    swarm.add_argument("-o", "--opt", action="append", default=[], metavar="KEY=VALUE",
                       help="a driver option (as docker network create -o), kept in the config-only network")
    swarm.add_argument("--plugin", default=os.environ.get("PYFLANNEL_PLUGIN", "pyflannel"),
                       help="the managed plugin's name (default: $PYFLANNEL_PLUGIN or %(default)s)")
    opts = sub.add_parser("docker-opts", help="write dockerd's options for a docker0 on this host's lease, as "
                                              "flannel's mk-docker-opts.sh does")
    opts.add_argument("-f", default=paths.SUBNET_FILE, metavar="FLANNEL-ENV-FILE",
                      help="subnet.env to read (default %(default)s)")
    opts.add_argument("-d", default=DOCKER_ENV, metavar="DOCKER-ENV-FILE",
                      help="the file to write (default %(default)s)")
    opts.add_argument("-i", action="store_true", help="each option as a variable of its own (DOCKER_OPT_MTU=...)")
    opts.add_argument("-c", action="store_true", help="all options in one variable (-k); -i and -c when neither")
    opts.add_argument("-k", default="DOCKER_OPTS", metavar="COMBINED-KEY", help="the combined variable's name")
    opts.add_argument("-m", action="store_true", help="no --ip-masq (for old Docker versions)")
    args = parser.parse_args(argv)
    if args.command == "docker-opts":
        return docker_opts(args)
    if args.command == "swarm-network":
        return swarm_network(args)
    if args.command == "doctor":
        from pyflannel import doctor as doctor_module
        return doctor_module.run(args)
    if args.command in ("join", "leave", "rotate-key"):
        return membership(args)
    if args.names:
        return names(args)
    report = collect(args)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
