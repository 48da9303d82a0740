"""The multi-host lab: hosts in network namespaces on an underlay switch, with etcd reachable over the underlay.

Layout (prefix P is unique per lab):
    P-sw   the "switch": Linux bridge br0 192.0.2.2/24, etcd listening on 192.0.2.2:2379
    P-h1…  one namespace per host, eth0 192.0.2.11…/24 plugged into the switch (an IPv6 underlay lab also
           gives eth0 2001:db8:0:2::11…/64)
    P-hNcM "containers": namespaces with eth0 on host N's bridge cbr0 (FLANNEL_SUBNET's gateway)

Everything created is recorded and removed by close(), also after a failure (the pytest fixture calls it).
Test tooling may use `ip`; product code never does.

The package also holds what the lab's namespaces run (listener.py, prober.py, slow_relay.py, upstream_dns.py,
vxlan_frame.py), the demo (`python -m lab.demo up|down`), system_deps.py (`make system-deps`) and engines/ (`make
engines`). tests/, bench/ and `make demo` import it; the wheel does not ship it (it holds pyflannel/ only).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pr_netns

from pyflannel.daemon.flags import DNS_ADDRESS

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
UNDERLAY = ipaddress.IPv4Network("192.0.2.0/24")
UNDERLAY6 = ipaddress.IPv6Network("2001:db8:0:2::/64")
SWITCH_IP = "192.0.2.2"
ROUTER_IP = "192.0.2.254"          # the lab's "internet" router, on the underlay (add_outside)
OUTSIDE_IP = "203.0.113.1"         # a documentation address behind it: the "internet"
ROUTER_IP6 = str(UNDERLAY6.network_address + 254)  # the router's IPv6 address, in an IPv6 underlay lab
OUTSIDE_IP6 = "2001:db8:ffff::1"   # the "internet" over IPv6 (a documentation address too)
OUTSIDE_DNS = OUTSIDE_IP           # its DNS server (lab/upstream_dns.py): every lab pyflanneld's -dns-upstream
OUTSIDE_NAMES = {"www.example.test": OUTSIDE_IP}
# GET /cgi-bin/ip of a busybox httpd with this script answers with the caller's address as the server sees it.
WHOAMI_CGI = '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%s\\n" "$REMOTE_ADDR"\n'
ETCD_URL = f"http://{SWITCH_IP}:2379"
DEFAULT_CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
DOCKER = "/usr/bin/docker"
# The Docker engines of the test matrix: Debian 12's dockerd (the system's) and Debian 13's (`make engines`).
DOCKER_ENGINES = {"20.10": None, "26.1": REPO / "build" / "engines" / "docker-26.1" / "bin"}
IMAGE = "pfbox:latest"
BUSYBOX_APPLETS = ("sh", "ip", "ping", "httpd", "nc", "wget", "sleep", "cat", "echo", "ifconfig", "hostname", "timeout",
                   "nslookup")
# `ip netns exec` remounts /sys and hides the cgroup mounts dockerd and containerd need: mount them again first.
CGROUP_MOUNTS = """
mount -t tmpfs cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
"""
DOCKERD_WRAPPER = CGROUP_MOUNTS + 'exec dockerd "$@"\n'
CONTAINERD_WRAPPER = CGROUP_MOUNTS + 'exec containerd "$@"\n'
# `ctr run --cni` runs the CNI plugins itself, from /etc/cni/net.d and /opt/cni/bin only. In the private mount
# namespace `ip netns exec` gives it, show it this host's folders there; an overlay keeps the real /etc untouched,
# and libcni's result cache (/var/lib/cni) goes to the host's own folder.
CTR_WRAPPER = """
conf=$1 bin=$2 scratch=$3 cache=$4; shift 4
mkdir -p /var/lib/cni && mount --bind "$cache" /var/lib/cni || exit 1
mount -t tmpfs none "$scratch" && mkdir "$scratch/upper" "$scratch/work" || exit 1
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$scratch/upper,workdir=$scratch/work" /etc || exit 1
mkdir -p /etc/cni/net.d && mount --bind "$conf" /etc/cni/net.d || exit 1
mount -t tmpfs none /opt && mkdir -p /opt/cni/bin && mount --bind "$bin" /opt/cni/bin || exit 1
exec ctr "$@"
"""
CTR_IMAGE = "docker.io/library/pfbox:latest"
WATCH_MISSED = "the watch missed the lease"  # pyflanneld's warning when its safety net repairs a lease
CREATED_NAMESPACES: set[str] = set()  # every namespace any lab of this process made (the safety check reads it)


def make(*args: str, env: dict | None = None) -> None:
    """`make -s ARGS` in the repository, one at a time across pytest's workers: their builds share build/ and dist/."""
    lock = REPO / "build" / ".make.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        subprocess.run(["make", "-s", *args], cwd=REPO, check=True, capture_output=True, env=env)


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_until(what: str, fn, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report the last failure
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@contextlib.contextmanager
def inside(ns: str):
    """Run the block's new sockets in namespace `ns` (this thread only)."""
    pr_netns.pushns(ns)
    try:
        yield
    finally:
        pr_netns.popns()


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def kind(self) -> str:
        """What the process is, whichever host runs it: "h2-dockerd" is a "dockerd"."""
        host, _, kind = self.name.partition("-")
        return kind if re.fullmatch(r"h\d+", host) and kind else self.name

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL, wait: float = 10.0) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(wait)


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: each datagram, with whether `marker` (a path, if given) existed when it
    arrived."""

    def __init__(self, path, marker=None):
        self.path, self.marker = str(path), marker
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[str, bool]] = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.received.append((data.decode(), self.marker is not None and self.marker.exists()))

    def messages(self) -> list[str]:
        return [m for m, _ in self.received]

    def states(self) -> list[str]:
        """Every line of every datagram: READY=1, STATUS=…, STOPPING=1."""
        return [line for m, _ in self.received for line in m.split("\n")]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Container:
    ns: str
    ip: str | None  # None: an IPv6-only network
    host: "Host"
    ip6: str | None = None


@dataclass
class Host:
    lab: "Lab"
    name: str
    ns: str
    ip: str
    workdir: Path
    daemon: Process | None = None
    containers: list[Container] = field(default_factory=list)
    engine: str = "20.10"
    ip6: str | None = None  # eth0's IPv6 address in an IPv6 underlay lab

    @property
    def subnet_file(self) -> Path:
        return self.workdir / "subnet.env"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def api_sock(self) -> Path:
        return self.workdir / "pyflanneld.sock"

    def with_own_run_wireguard(self, *argv: str) -> list[str]:
        """`argv` seeing this host's folder as /var/run/wireguard: wireguard-go's UAPI sockets live there, one
        folder for every lab host otherwise. The bind mount stays in the mount namespace `ip netns exec` makes."""
        self.wireguard_dir.mkdir(exist_ok=True)
        os.makedirs("/run/wireguard", exist_ok=True)
        return ["sh", "-c", 'mount --bind "$0" /run/wireguard && exec "$@"', str(self.wireguard_dir), *argv]

    @property
    def wireguard_dir(self) -> Path:
        """What this host's pyflanneld sees as /var/run/wireguard (wireguard-go's UAPI sockets)."""
        return self.workdir / "wireguard"

    def network_env(self, name: str) -> Path:
        """The subnet.env of the named flannel network `name` on this host."""
        return self.workdir / "networks" / f"{name}.env"

    def sh(self, *args, **kw) -> str:
        return sh(*args, ns=self.ns, **kw)

    def start_daemon(self, *extra: str, wait_ready: bool = True, env: dict | None = None,
                     wrapper: tuple[str, ...] = (), listen_socket: socket.socket | None = None) -> Process:
        """`wrapper`: argv that execs its arguments (the daemon keeps its PID). `listen_socket`: handed over as
        systemd hands a socket unit's (fd 3, LISTEN_FDS=1, LISTEN_PID the daemon's)."""
        iface = [] if "-iface" in extra else ["-iface", "eth0"]
        args = ["-etcd-endpoints", self.lab.etcd_endpoints, *iface, "-subnet-file", str(self.subnet_file),
                "--state-dir", str(self.state_dir), "-etcd-prefix", self.lab.prefix_key, "-api-socket",
                str(self.api_sock), "-dns-upstream", OUTSIDE_DNS, *extra]
        if listen_socket is not None:
            wrapper = ("sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *wrapper)
        self.daemon = self.lab.spawn(f"{self.name}-pyflanneld", [*wrapper, *self.with_own_run_wireguard(
            str(VENV_BIN / "pyflanneld"), *args)], ns=self.ns, env=env, fd3=listen_socket)
        if wait_ready:
            wait_until(f"{self.name}'s subnet.env", lambda: self.subnet_file.exists() or not self.daemon.alive(),
                       timeout=30)
            assert self.daemon.alive(), f"pyflanneld on {self.name} exited:\n{self.daemon.log()}"
        return self.daemon

    def pyflannel_argv(self, command: str) -> list[str]:
        """`pyflannel status` or `doctor` on this host, with the host's paths (the lab's are not the defaults)."""
        argv = ["ip", "netns", "exec", self.ns, str(VENV_BIN / "pyflannel"), command, "-etcd-endpoints",
                self.lab.etcd_endpoints, "-etcd-prefix", self.lab.prefix_key, "-subnet-file", str(self.subnet_file),
                "-api-socket", str(self.api_sock)]
        return argv + (["--driver-state-dir", str(self.workdir / "driver")] if command == "doctor" else [])

    # --- Docker on this host ---------------------------------------------------------------------------------
    @property
    def docker_sock(self) -> Path:
        return self.workdir / "docker" / "docker.sock"

    @property
    def driver_sock(self) -> Path:
        return self.workdir / "pyflannel.sock"

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return sh(DOCKER, "-H", f"unix://{self.docker_sock}", *args, ns=self.ns, check=check, timeout=timeout)

    def docker_clear(self, network: str = "overlay0") -> None:
        """Remove every container of this host's dockerd, then `network`."""
        ids = self.docker("ps", "-aq").split()
        if ids:
            self.docker("rm", "-f", *ids)
        self.docker("network", "rm", network, check=False)

    def docker_ready(self) -> bool:
        try:
            self.docker("version", "-f", "{{.Server.Version}}", timeout=10)
            return True
        except RuntimeError:
            return False

    def start_driver(self, *extra: str) -> Process:
        """pyflannel-driver on this host; returns once its worker serves (a restarted driver first waits for the
        worker of the one before it to finish)."""
        log_path = self.lab.workdir / f"{self.name}-driver.log"
        earlier = log_path.stat().st_size if log_path.exists() else 0
        self.driver = self.lab.spawn(f"{self.name}-driver", [
            str(VENV_BIN / "pyflannel-driver"), "--socket", str(self.driver_sock), "--state-dir",
            str(self.workdir / "driver"), "--subnet-file", str(self.subnet_file), "--daemon-socket",
            str(self.api_sock), "--docker-host", f"unix://{self.docker_sock}", *extra], ns=self.ns)
        wait_until(f"{self.name}'s driver serving", lambda: "Booting worker" in self.driver.log()[earlier:]
                   or not self.driver.alive())
        assert self.driver.alive(), f"pyflannel-driver on {self.name} exited:\n{self.driver.log()}"
        return self.driver

    def start_dockerd(self, engine: str | None = None) -> Process:
        """A dockerd of this host's own (`engine`: a key of DOCKER_ENGINES; by default the one this host ran last,
        else 20.10), run as users run it: it manages this
        host's iptables (DOCKER chains, docker0 and its masquerade), with the FORWARD policy DROP that dockerd sets
        where it turns forwarding on (and 28.0 sets always). It finds the driver through /etc/netns/<ns>/docker."""
        engine = self.engine = engine or self.engine
        bin_dir = DOCKER_ENGINES[engine]
        if bin_dir is not None and not (bin_dir / "dockerd").exists():
            raise RuntimeError(f"dockerd {engine} is not in {bin_dir}: run `make engines`")
        spec_dir = Path("/etc/netns") / self.ns / "docker" / "plugins"
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "pyflannel.spec").write_text(f"unix://{self.driver_sock}\n")
        root = self.workdir / "docker"
        root.mkdir(exist_ok=True)
        self.sh("iptables", "-w", "5", "-P", "FORWARD", "DROP")
        path = f"{bin_dir}:{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
        self.dockerd = self.lab.spawn(f"{self.name}-dockerd", [
            "sh", "-c", DOCKERD_WRAPPER, "dockerd", "-H", f"unix://{self.docker_sock}",
            "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "--pidfile", str(root / "pid"),
            "--dns", DNS_ADDRESS],
            ns=self.ns, env={"PATH": path})
        wait_until(f"{self.name}'s dockerd", lambda: self.docker_ready() or not self.dockerd.alive(), timeout=60,
                   interval=0.3)
        assert self.dockerd.alive(), f"dockerd on {self.name} exited:\n{self.dockerd.log()}"
        version = self.docker("version", "-f", "{{.Server.Version}}").strip()
        assert version.startswith(engine), f"{self.name} runs dockerd {version}, not {engine}"
        sh(DOCKER, "-H", f"unix://{self.docker_sock}", "import", str(self.lab.image_tar()), IMAGE, ns=self.ns)
        return self.dockerd

    # --- containerd on this host --------------------------------------------------------------------------------
    @property
    def containerd_dir(self) -> Path:
        return self.workdir / "containerd"

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        d = self.containerd_dir
        return sh("sh", "-c", CTR_WRAPPER, "ctr-wrapper", str(d / "net.d"), str(d / "bin"), str(d / "scratch"),
                  str(d / "cni-cache"), "-a", str(d / "containerd.sock"), *args, ns=self.ns, check=check, timeout=timeout)

    def start_containerd(self, conflist: dict, plugins: dict[str, Path]) -> Process:
        """A containerd of this host's own, and a CNI set-up only this host's `ctr` sees: `conflist` in its
        /etc/cni/net.d and `plugins` (name -> binary) in its /opt/cni/bin. The image CTR_IMAGE is imported."""
        d = self.containerd_dir
        for folder in ("net.d", "bin", "scratch", "cni-cache"):
            (d / folder).mkdir(parents=True, exist_ok=True)
        (d / "net.d" / "10-pyflannel.conflist").write_text(json.dumps(conflist))
        for name, path in plugins.items():
            shutil.copy(path, d / "bin" / name)
        (d / "config.toml").write_text(
            f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{d}/containerd.sock"\n')
        self.containerd = self.lab.spawn(f"{self.name}-containerd", [
            "sh", "-c", CONTAINERD_WRAPPER, "containerd", "--config", str(d / "config.toml")], ns=self.ns)
        wait_until(f"{self.name}'s containerd", lambda: not self.containerd.alive() or self.ctr(
            "version", check=False, timeout=10).count("Version") >= 2, timeout=60, interval=0.3)
        assert self.containerd.alive(), f"containerd on {self.name} exited:\n{self.containerd.log()}"
        self.ctr("images", "import", str(self.lab.oci_image_tar()))
        return self.containerd

    def run_cni(self, plugin: Path | str, command: str, config: dict, container_id: str = "", netns: str = "",
                ifname: str = "eth0") -> subprocess.CompletedProcess:
        """Run a CNI plugin binary in this host's namespace the way a runtime does (env + config on stdin)."""
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": "/usr/lib/cni"}
        return subprocess.run(["ip", "netns", "exec", self.ns, str(plugin)], input=json.dumps(config).encode(),
                              capture_output=True, env=env, timeout=60)

    def ctr_task_pid(self, name: str) -> int:
        for line in self.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields[0] == name:
                return int(fields[1])
        raise AssertionError(f"no task {name} on {self.name}")

    def ctr_run(self, name: str, *command: str, rm: bool = False) -> int | str:
        """`ctr run --cni -d`: a container in the background on the host's CNI network; returns its pid (which
        teardown kills: it is in no lab namespace). With `rm`: `ctr run --rm --cni` in the foreground, returns its
        output. runc keeps its state in the work dir (its default, /run/containerd/runc, is shared by all)."""
        flags = ["--cni", "--runc-root", str(self.containerd_dir / "runc")]
        if rm:
            return self.ctr("run", "--rm", *flags, CTR_IMAGE, name, *command)
        self.ctr("run", "-d", *flags, CTR_IMAGE, name, *command)
        pid = self.ctr_task_pid(name)
        self.lab.container_pids.add(pid)
        return pid

    def extra_links(self) -> set[str]:
        """Interfaces in the host namespace other than lo, the underlay, the VXLAN device and dockerd's own bridge:
        what a driver made."""
        names = {line.split(":")[1].strip().split("@")[0] for line in self.sh("ip", "-o", "link").splitlines()}
        return names - {"lo", "eth0", "flannel.1", "docker0"}

    def subnet_env(self, network: str = "") -> dict:
        """The default network's subnet.env, or the named `network`'s."""
        path = self.network_env(network) if network else self.subnet_file
        return dict(line.split("=", 1) for line in path.read_text().split())

    def add_bridge(self, name: str = "cbr0", network: str = "") -> None:
        """A container bridge holding FLANNEL_SUBNET, as the Docker driver or CNI plugin would make it."""
        env = self.subnet_env(network)
        self.sh("ip", "link", "add", name, "type", "bridge")
        if "FLANNEL_SUBNET" in env:
            self.sh("ip", "addr", "add", env["FLANNEL_SUBNET"], "dev", name)
        if "FLANNEL_IPV6_SUBNET" in env:
            self.sh("ip", "addr", "add", env["FLANNEL_IPV6_SUBNET"], "dev", name, "nodad")
        self.sh("ip", "link", "set", name, "mtu", env["FLANNEL_MTU"], "up")

    def add_container(self, bridge: str = "cbr0", network: str = "") -> Container:
        """A namespace on `bridge` with the next address of each family the network has, and default routes."""
        env = self.subnet_env(network)
        index = len(self.containers) + 1
        ns = self.lab.add_ns(f"{self.name}c{index}")
        host_end = f"ve{index}"
        self.sh("ip", "link", "add", host_end, "mtu", env["FLANNEL_MTU"], "type", "veth", "peer", "name", "eth0",
                "mtu", env["FLANNEL_MTU"], "netns", ns)
        self.sh("ip", "link", "set", host_end, "master", bridge, "up")
        addresses = []
        for key, flags in (("FLANNEL_SUBNET", ()), ("FLANNEL_IPV6_SUBNET", ("nodad",))):
            if key not in env:
                addresses.append(None)
                continue
            gateway = ipaddress.ip_interface(env[key])
            ip = gateway.ip + index
            sh("ip", "addr", "add", f"{ip}/{gateway.network.prefixlen}", "dev", "eth0", *flags, ns=ns)
            addresses.append((str(ip), str(gateway.ip)))
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        for family, pair in zip(("-4", "-6"), addresses):
            if pair:
                sh("ip", family, "route", "add", "default", "via", pair[1], ns=ns)
        container = Container(ns, addresses[0] and addresses[0][0], self, addresses[1] and addresses[1][0])
        self.containers.append(container)
        return container


class Lab:
    def __init__(self, hosts: int = 3, etcd: bool = True, etcd_api: str = "v2", underlay_ipv6: bool = False):
        """`etcd_api` v3: etcd runs without the v2 API (as 3.5+ does) and the helpers below use v3.
        `underlay_ipv6`: the hosts' eth0 also hold an IPv6 address of UNDERLAY6 (the switch has ::2)."""
        self.etcd_api = etcd_api
        self.underlay_ipv6 = underlay_ipv6
        self.tag = f"pf{os.getpid() % 10000}{int(time.time() * 1000) % 1000:03d}"
        self.prefix_key = "/coreos.com/network"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.namespaces: list[str] = []
        self.processes: list[Process] = []
        self.hosts: list[Host] = []
        self.container_pids: set[int] = set()  # containerd's containers: their own namespaces, outside the lab's
        self.etcd_url = ETCD_URL              # what the lab's own helpers talk to
        self.etcd_endpoints = ETCD_URL        # what the daemons are given (start_etcd_cluster: every member)
        self.etcd_members: list[Process] = []
        try:
            self.switch = self.add_ns("sw")
            sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
            sh("ip", "addr", "add", f"{SWITCH_IP}/24", "dev", "br0", ns=self.switch)
            if underlay_ipv6:
                sh("ip", "addr", "add", f"{UNDERLAY6.network_address + 2}/64", "dev", "br0", "nodad", ns=self.switch)
            sh("ip", "link", "set", "br0", "up", ns=self.switch)
            sh("ip", "link", "set", "lo", "up", ns=self.switch)
            for i in range(1, hosts + 1):
                self.add_host()
            if etcd:
                self.start_etcd()
        except BaseException:
            self.close()
            raise

    # --- building --------------------------------------------------------------------------------------------
    def add_ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        CREATED_NAMESPACES.add(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        return ns

    def add_host(self) -> Host:
        index = len(self.hosts) + 1
        name = f"h{index}"
        ns = self.add_ns(name)
        ip = str(UNDERLAY.network_address + 10 + index)
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"port{index}", "netns", self.switch, ns=ns)
        sh("ip", "link", "set", f"port{index}", "master", "br0", "up", ns=self.switch)
        sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        ip6 = None
        if self.underlay_ipv6:
            ip6 = str(UNDERLAY6.network_address + 10 + index)
            sh("ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ns)
        workdir = self.workdir / name
        workdir.mkdir()
        host = Host(self, name, ns, ip, workdir, ip6=ip6)
        self.hosts.append(host)
        return host

    def spawn(self, name: str, argv: list[str], ns: str | None = None, env: dict | None = None,
              fd3: socket.socket | None = None) -> Process:
        """`fd3`: a socket the process gets as its fd 3."""
        log_path = self.workdir / f"{name}.log"
        cmd = (["ip", "netns", "exec", ns] if ns else []) + argv
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, pass_fds=(3,) if fd3 else (),
                                     preexec_fn=(lambda: os.dup2(fd3.fileno(), 3)) if fd3 else None)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def add_outside(self) -> str:
        """The "internet": a namespace on the underlay at ROUTER_IP holding OUTSIDE_IP, where every host routes
        203.0.113.0/24; it serves GET /cgi-bin/ip (the caller's address as it arrives) on OUTSIDE_IP:80. In an IPv6
        underlay lab also at ROUTER_IP6 holding OUTSIDE_IP6, where every host routes 2001:db8:ffff::/48, serving the
        same on [OUTSIDE_IP6]:80."""
        ns = self.add_ns("out")
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "portout", "netns", self.switch, ns=ns)
        sh("ip", "link", "set", "portout", "master", "br0", "up", ns=self.switch)
        sh("ip", "addr", "add", f"{ROUTER_IP}/24", "dev", "eth0", ns=ns)
        if self.underlay_ipv6:
            sh("ip", "addr", "add", f"{ROUTER_IP6}/64", "dev", "eth0", "nodad", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "addr", "add", f"{OUTSIDE_IP}/32", "dev", "lo", ns=ns)
        for host in self.hosts:
            host.sh("ip", "route", "add", "203.0.113.0/24", "via", ROUTER_IP)
        www = self.workdir / "outside-www"
        _write_whoami(www)
        self.outside = self.spawn("outside-httpd", ["busybox", "httpd", "-f", "-p", f"{OUTSIDE_IP}:80", "-h",
                                                    str(www)], ns=ns)
        if self.underlay_ipv6:
            sh("ip", "addr", "add", f"{OUTSIDE_IP6}/128", "dev", "lo", ns=ns)
            for host in self.hosts:
                host.sh("ip", "-6", "route", "add", "2001:db8:ffff::/48", "via", ROUTER_IP6)
            self.spawn("outside-httpd6", ["busybox", "httpd", "-f", "-p", f"[{OUTSIDE_IP6}]:80", "-h", str(www)],
                       ns=ns)
        self.spawn("outside-dns", [str(VENV_BIN / "python"), str(REPO / "lab" / "upstream_dns.py"), OUTSIDE_DNS,
                                   *(f"{name}={ip}" for name, ip in OUTSIDE_NAMES.items())], ns=ns)
        return ns

    def start_etcd(self, *extra: str, scheme: str = "http", ready=None) -> Process:
        """etcd on the switch, v2 API on only in a v2 lab; `extra` adds flags (TLS, …), `ready` replaces the probe."""
        self.etcd_url = self.etcd_endpoints = f"{scheme}://{SWITCH_IP}:2379"
        data = self.workdir / "etcd"
        self.etcd = self.spawn("etcd", [
            "etcd", "--name", "lab", "--data-dir", str(data),
            f"--enable-v2={str(self.etcd_api == 'v2').lower()}",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://{SWITCH_IP}:2380",
            "--initial-advertise-peer-urls", f"http://{SWITCH_IP}:2380",
            "--initial-cluster", f"lab=http://{SWITCH_IP}:2380", *extra], ns=self.switch)
        wait_until("etcd health", ready or (lambda: self.etcd_get("/health").get("health") == "true"), timeout=30,
                   interval=0.2)
        return self.etcd

    def start_etcd_cluster(self, members: int = 3) -> list[Process]:
        """A real etcd cluster on the switch: member i listens on 192.0.2.2:<i>2379 (peers <i>2380). The daemons
        get every member, the first one first; the lab's helpers use the last one."""
        urls = [(f"http://{SWITCH_IP}:{i}2379", f"http://{SWITCH_IP}:{i}2380") for i in range(1, members + 1)]
        cluster = ",".join(f"m{i}={peer}" for i, (_, peer) in enumerate(urls, start=1))
        for i, (client, peer) in enumerate(urls, start=1):
            self.etcd_members.append(self.spawn(f"etcd-m{i}", [
                "etcd", "--name", f"m{i}", "--data-dir", str(self.workdir / f"etcd-m{i}"),
                f"--enable-v2={str(self.etcd_api == 'v2').lower()}", "--listen-client-urls", client,
                "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new"], ns=self.switch))
        self.etcd_url = urls[-1][0]
        self.etcd_endpoints = ",".join(client for client, _ in urls)
        wait_until("etcd cluster health", lambda: self.etcd_get("/health").get("health") == "true", timeout=60,
                   interval=0.3)
        return self.etcd_members

    def image_tar(self) -> Path:
        """A busybox root filesystem as a tar, for `docker import` (no registry is reachable)."""
        tar = self.workdir / "pfbox.tar"
        if not tar.exists():
            rootfs = self.workdir / "rootfs"
            for folder in ("bin", "etc", "tmp", "www", "proc", "sys", "dev"):
                (rootfs / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
            for applet in BUSYBOX_APPLETS:
                (rootfs / "bin" / applet).symlink_to("busybox")
            (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
            (rootfs / "www" / "index.html").write_text("hello from pyflannel\n")
            _write_whoami(rootfs / "www")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        return tar

    def oci_image_tar(self) -> Path:
        """image_tar()'s root filesystem as an OCI image layout tar named CTR_IMAGE, for `ctr images import`."""
        tar = self.workdir / "pfbox-oci.tar"
        if tar.exists():
            return tar
        layout = self.workdir / "oci"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)

        def blob(data: bytes, media_type: str) -> dict:
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
            return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

        layer = blob(self.image_tar().read_bytes(), "application/vnd.oci.image.layer.v1.tar")
        config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
                                  "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode(),
                      "application/vnd.oci.image.config.v1+json")
        manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": config, "layers": [layer]}).encode(),
                        "application/vnd.oci.image.manifest.v1+json")
        manifest["annotations"] = {"io.containerd.image.name": CTR_IMAGE, "org.opencontainers.image.ref.name": "latest"}
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        subprocess.run(["tar", "-C", str(layout), "-cf", str(tar), "index.json", "oci-layout", "blobs"], check=True)
        return tar

    def start_network(self, config: dict | None = None, containers_per_host: int = 1) -> "Lab":
        """The usual set-up: network config, pyflanneld on every host, then a bridge and containers on each."""
        self.set_config(config)
        for host in self.hosts:
            host.start_daemon()
        for host in self.hosts:
            host.add_bridge()
            for _ in range(containers_per_host):
                host.add_container()
        return self

    def start_docker(self, engine: str, config: dict | None = None) -> "Lab":
        """The Docker set-up: the network config (default: the usual VXLAN one), then pyflanneld, pyflannel-driver
        and a dockerd of `engine` on every host."""
        self.set_config(config)
        for host in self.hosts:
            host.start_daemon()
            host.start_driver()
            host.start_dockerd(engine)
        return self

    # --- etcd, seen from the switch namespace ----------------------------------------------------------------
    def etcd_get(self, path: str) -> dict:
        with inside(self.switch):
            with urllib.request.urlopen(self.etcd_url + path, timeout=5) as r:
                return json.loads(r.read())

    def etcd_request(self, method: str, key: str, value: str | None = None, **params) -> dict:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        body = f"value={urllib.parse.quote(value)}".encode() if value is not None else None
        req = urllib.request.Request(f"{self.etcd_url}/v2/keys{key}{'?' + query if query else ''}", data=body,
                                     method=method)
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        with inside(self.switch):
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                return json.loads(e.read())

    def etcd_v3(self, call: str, body: dict) -> dict:
        """One call of etcd's v3 JSON gateway (keys and values base64, as the gateway wants them)."""
        req = urllib.request.Request(f"{self.etcd_url}/v3/{call}", data=json.dumps(body).encode(), method="POST")
        with inside(self.switch):
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())

    def etcd_put(self, key: str, value: str, ttl: int | None = None) -> None:
        """Write a key through the lab's API; with `ttl`, as flannel writes a lease (v3: on an etcd lease)."""
        if self.etcd_api == "v2":
            self.etcd_request("PUT", key, value, **({"ttl": ttl} if ttl else {}))
            return
        body = {"key": _b64(key), "value": _b64(value)}
        if ttl:
            body["lease"] = self.etcd_v3("lease/grant", {"TTL": ttl})["ID"]
        self.etcd_v3("kv/put", body)

    def etcd_delete(self, key: str) -> None:
        if self.etcd_api == "v2":
            self.etcd_request("DELETE", key)
        else:
            self.etcd_v3("kv/deleterange", {"key": _b64(key)})

    def set_config(self, config: dict | str = None) -> None:
        text = config if isinstance(config, str) else json.dumps(config or DEFAULT_CONFIG)
        self.etcd_put(f"{self.prefix_key}/config", text)

    def network_config(self, network: str) -> dict | None:
        """The named network's config in etcd, parsed; None when absent."""
        key = f"{self.prefix_key}/{network}/config"
        if self.etcd_api == "v2":
            node = self.etcd_request("GET", key).get("node")
            return json.loads(node["value"]) if node else None
        kvs = self.etcd_v3("kv/range", {"key": _b64(key)}).get("kvs")
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def leases(self, network: str = "") -> dict[str, dict]:
        """subnet key -> the etcd node: key, value, attrs (the value parsed) and ttl (None: a reservation); of the
        default network, or of the named `network`."""
        top = f"{self.prefix_key}/{network}" if network else self.prefix_key
        if self.etcd_api == "v2":
            reply = self.etcd_request("GET", f"{top}/subnets", recursive="true")
            nodes = reply.get("node", {}).get("nodes", [])
            return {n["key"].rsplit("/", 1)[-1]: {**n, "attrs": json.loads(n["value"])} for n in nodes}
        prefix = f"{top}/subnets/"
        kvs = self.etcd_v3("kv/range", {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")}).get("kvs", [])
        found = {}
        for kv in kvs:
            key, value = (base64.b64decode(kv[f]).decode() for f in ("key", "value"))
            ttl = int(self.etcd_v3("kv/lease/timetolive", {"ID": kv["lease"]})["TTL"]) if "lease" in kv else None
            found[key.rsplit("/", 1)[-1]] = {"key": key, "value": value, "attrs": json.loads(value), "ttl": ttl}
        return found

    # --- teardown --------------------------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A lab used as `with Lab(...) as lab:` (module fixtures) shows its logs if setting it up failed."""
        if exc_type is not None and not issubclass(exc_type, GeneratorExit):
            print(self.logs())
        self.close()

    def close(self) -> None:
        """Stop the processes kind by kind, the last started kind first (dockerd before its driver before
        pyflanneld), every host's of a kind at once; then remove everything (teardown). Fails when a pyflanneld's
        watch missed a lease that its safety net had to repair (issue 25: each one is a bug)."""
        pending = [p for p in reversed(self.processes) if p.alive()]
        while pending:
            kind = pending[0].kind
            batch = [p for p in pending if p.kind == kind]
            pending = [p for p in pending if p.kind != kind]
            for process in batch:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            for process in batch:
                with contextlib.suppress(Exception):
                    process.popen.wait(max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(Exception):
                    process.kill()
        teardown(self.record())
        self.namespaces.clear()
        missed = [line for p in self.processes if p.kind == "pyflanneld" for line in p.log().splitlines()
                  if WATCH_MISSED in line]
        assert not missed, "the watch missed leases:\n" + "\n".join(missed)

    def record(self) -> dict:
        """What teardown() needs to remove this lab from another process (`make demo-down`)."""
        return {"namespaces": list(self.namespaces), "workdir": str(self.workdir),
                "pids": [p.pid for p in self.processes if p.alive()] + sorted(self.container_pids)}

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} (pid {p.pid}) =====\n{p.log()[-4000:]}" for p in self.processes)


def _lab_pids(namespaces: list[str], workdir: str) -> set[int]:
    """Processes inside the lab's namespaces, or whose command line names its work dir (shims outlive dockerd)."""
    pids = set()
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids.update(int(p) for p in out.split())
    marker = workdir.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
    pids.discard(os.getpid())
    return pids


def teardown(record: dict) -> None:
    """Kill every process of a lab by PID, then remove its namespaces, /etc/netns entries and work dir."""
    for pid in set(record["pids"]) | _lab_pids(record["namespaces"], record["workdir"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for ns in reversed(record["namespaces"]):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    shutil.rmtree(record["workdir"], ignore_errors=True)


def _write_whoami(www: Path) -> None:
    (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
    (www / "cgi-bin" / "ip").write_text(WHOAMI_CGI)
    (www / "cgi-bin" / "ip").chmod(0o755)


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def exited(pid: int) -> bool:
    """The process is gone or a zombie (an orphan's reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def ping(src_ns: str, dst_ip: str, tries: int = 3, timeout: int = 1) -> bool:
    """One echo reply within `tries` single pings (the first may wait for ARP on the way)."""
    for _ in range(tries):
        done = subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", "1", "-W", str(timeout), "-q", dst_ip],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return True
    return False
