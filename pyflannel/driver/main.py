"""pyflannel-driver: serve the Docker NetworkDriver + IpamDriver on a Unix socket, with gunicorn.

    pyflannel-driver [--socket /run/docker/plugins/pyflannel.sock] [--state-dir /var/lib/pyflannel/driver]
                     [--subnet-file /run/flannel/subnet.env] [--workers 1] [--threads 4] [--timeout 15]

Docker finds the plugin by the socket's name (pyflannel) in /run/docker/plugins. The app is built (and the kernel
reconciled with the saved state) once, in the gunicorn master, before any worker starts. Startup problems are
reported in one line on stderr, exit status 1, no traceback.

Time limits, so that no call hangs dockerd (a v1 plugin call has no timeout on Docker's side): the state lock gives
up after --lock-timeout, iptables after 10 s, and gunicorn restarts a worker silent for --timeout seconds.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pyflannel import localapi, paths, subnetenv, version_line

from .errors import DriverError
from .publisher import NamePublisher
from .server import (GRACEFUL_SECONDS, StartupError, build_server, claim_instance, prepare_socket_path,
                     socket_activated)
from .state import StateStore

log = logging.getLogger("pyflannel.driver")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyflannel-driver",
                                description="Docker network + IPAM driver for pyflannel (one bridge on this host's "
                                            "flannel lease).")
    p.add_argument("--socket", default=paths.DRIVER_SOCKET, help="Unix socket to serve on (default %(default)s)")
    p.add_argument("--state-dir", default=paths.DRIVER_STATE_DIR, help="where the driver keeps its state (default %(default)s)")
    p.add_argument("--subnet-file", default=paths.SUBNET_FILE,
                   help="pyflanneld's subnet.env with this host's lease (default %(default)s)")
    p.add_argument("--daemon-socket", default=paths.DAEMON_SOCKET,
                   help="pyflanneld's local API, to join and leave named flannel networks (default %(default)s)")
    p.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
                   help="the local Docker engine, whose containers' names pyflanneld answers over DNS on every host "
                        "(default: DOCKER_HOST, else %(default)s; empty: publish no names)")
    p.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (default %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default %(default)s)")
    p.add_argument("--timeout", type=int, default=15, help="seconds before a stuck worker is restarted (default %(default)s)")
    p.add_argument("--lock-timeout", type=float, default=10.0,
                   help="seconds a call waits for the state lock before failing (default %(default)s)")
    p.add_argument("--lease-wait", type=float, default=20.0,
                   help="seconds a Docker call waits for subnet.env while pyflanneld starts (default %(default)s)")
    p.add_argument("--plugin-name", default="pyflannel",
                   help="the plugin's name as users give it to `docker network create` (network and IPAM driver), "
                        "for the commands the driver's errors suggest (default %(default)s; the managed plugin's: "
                        "pyflannel:latest)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=version_line("pyflannel-driver"))
    args = p.parse_args(argv)
    for name in ("workers", "threads", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        if os.geteuid() != 0:
            log.warning("not running as root: creating bridges and veth pairs will fail")
        instance = claim_instance(args.state_dir, wait=GRACEFUL_SECONDS + 5)  # noqa: F841 - held until exit
        if not socket_activated():
            prepare_socket_path(args.socket)
        from .api import create_app
        app = create_app(args.state_dir, args.subnet_file, lock_timeout=args.lock_timeout, lease_wait=args.lease_wait,
                         daemon_socket=args.daemon_socket, plugin_name=args.plugin_name)
        try:
            env = subnetenv.read(args.subnet_file)
            log.info("this host's lease: %s (gateway %s), IPv6 %s (gateway %s), MTU %d", env.lease, env.gateway,
                     env.lease6, env.gateway6, env.mtu)
        except subnetenv.SubnetEnvError as e:
            log.warning("%s; Docker calls will fail until it exists", e)
        publisher = None
        if args.docker_host and args.daemon_socket:
            publisher = NamePublisher(args.docker_host, StateStore(args.state_dir), localapi.Client(args.daemon_socket))
        server = build_server(app, args.socket, workers=args.workers, threads=args.threads, timeout=args.timeout,
                              log_level=args.log_level, in_worker=publisher.start if publisher else None)
    except (StartupError, DriverError) as e:
        print(f"pyflannel-driver: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, for whoever starts the driver
        print(f"pyflannel-driver: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    log.info("serving on %s", "the socket systemd passed" if socket_activated() else os.path.abspath(args.socket))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
