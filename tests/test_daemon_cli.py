"""pyflanneld as a user meets it: clear one-line errors (no tracebacks), -ip-masq, /healthz and /readyz, systemd's
readiness (NOTIFY_SOCKET), -iface-can-reach."""
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from pyflannel.daemon import iface
from pyflannel.daemon.errors import UserError
from pyflannel.kernel.netlink import Kernel
from lab import VENV_BIN, Lab, NotifySocket, inside, ping, wait_until

pytestmark = pytest.mark.lab


def exited(process, timeout=20):
    wait_until(f"{process.name} to exit", lambda: not process.alive(), timeout=timeout)
    return process.popen.returncode, process.log()


def test_bad_flag_names_the_flag():
    done = subprocess.run([str(VENV_BIN / "pyflanneld"), "-healthz-port", "http"], capture_output=True, text=True)
    assert done.returncode == 2 and "-healthz-port" in done.stderr and "'http'" in done.stderr
    done = subprocess.run([str(VENV_BIN / "pyflanneld"), "-no-such-flag"], capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: -no-such-flag" in done.stderr


@pytest.mark.parametrize("config,message", [
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}', "network config: Backend.Type='udp': unsupported"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "network config: SubnetLen=31: must be /30 or shorter"),
    ('{"Network": 5', "network config: config="),
])
def test_invalid_config_exits_with_the_field_and_programs_nothing(make_lab, config, message):
    lab = make_lab(1)
    lab.set_config(config)
    host = lab.hosts[0]
    code, log = exited(host.start_daemon(wait_ready=False))
    assert code == 1 and message in log and "Traceback" not in log
    assert "flannel" not in host.sh("ip", "link") and not lab.leases()


def test_missing_interface_and_no_free_subnet_are_clear_errors(make_lab):
    lab = make_lab(2)
    lab.set_config({"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.1.0"})
    h1, h2 = lab.hosts
    code, log = exited(h1.start_daemon("-iface", "eth9", wait_ready=False))
    assert code == 1 and "no interface with an IPv4 address matches -iface=eth9" in log and "eth0 (192.0.2.11/24)" in log
    assert "Traceback" not in log
    h1.start_daemon()
    code, log = exited(h2.start_daemon(wait_ready=False))
    assert code == 1 and "no free subnet" in log and "Traceback" not in log
    assert len(lab.leases()) == 1


def test_etcd_unreachable_at_start_is_retried_and_said(make_lab):
    lab = make_lab(1, etcd=False)
    host = lab.hosts[0]
    daemon = host.start_daemon(wait_ready=False)
    wait_until("a retry message", lambda: "retrying in" in daemon.log(), timeout=10)
    assert daemon.alive() and "192.0.2.2:2379" in daemon.log() and "Traceback" not in daemon.log()
    lab.start_etcd()
    lab.set_config()
    wait_until("lease after etcd came up", lambda: host.subnet_file.exists(), timeout=20)
    assert len(lab.leases()) == 1


def test_ip_masq_masquerades_only_traffic_leaving_the_network(make_lab):
    lab = make_lab(2)
    lab.set_config()
    for host in lab.hosts:
        host.start_daemon("-ip-masq")
        host.add_bridge()
        host.add_container()
    h1, h2 = lab.hosts
    assert "FLANNEL_IPMASQ=true" in h1.subnet_file.read_text()

    def masq_packets():
        out = h1.sh("iptables", "-t", "nat", "-L", "FLANNEL-POSTRTG", "-v", "-x", "-n")
        return sum(int(line.split()[0]) for line in out.splitlines() if "MASQUERADE" in line)

    before = masq_packets()
    assert ping(h1.containers[0].ns, h2.containers[0].ip)  # inside the flannel network: not masqueraded
    assert masq_packets() == before
    assert ping(h1.containers[0].ns, "192.0.2.2")  # leaving it (to the switch): masqueraded
    assert masq_packets() > before


def test_healthz_and_readyz(make_lab):
    lab = make_lab(1)
    lab.set_config()
    host = lab.hosts[0]
    host.start_daemon("-healthz-ip", "127.0.0.1", "-healthz-port", "8471")

    def get(path):
        with inside(host.ns):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:8471{path}", timeout=2) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

    status, body = wait_until("readyz", lambda: get("/readyz") if get("/readyz")[0] == 200 else None)
    assert body["lease"] == host.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
    assert get("/healthz")[0] == 200
    lab.etcd.kill()
    wait_until("readyz to fail without etcd", lambda: get("/readyz")[0] == 503, timeout=45)
    assert get("/healthz")[0] == 200  # alive, keeping the kernel as it is


def test_ready_once_the_lease_is_held_then_watchdog_and_stopping(make_lab, tmp_path):
    """Type=notify: READY=1 (with the lease as STATUS) only once subnet.env exists, which needs etcd; WATCHDOG=1 at
    half WATCHDOG_USEC; STOPPING=1 on SIGTERM."""
    lab = make_lab(1, etcd=False)
    host = lab.hosts[0]
    systemd = NotifySocket(tmp_path / "notify", host.subnet_file)
    try:
        daemon = host.start_daemon(wait_ready=False, env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "1000000"})
        wait_until("a retry message", lambda: "retrying in" in daemon.log(), timeout=10)
        time.sleep(1)
        assert not [m for m in systemd.messages() if "READY" in m]  # no etcd, no lease: not ready
        assert "WATCHDOG=1" in systemd.messages()  # starting is alive (systemd's start timeout bounds it)
        lab.start_etcd()
        lab.set_config()
        wait_until("READY=1", lambda: any(m.startswith("READY=1") for m in systemd.messages()), timeout=30)
        ready = [(m, existed) for m, existed in systemd.received if m.startswith("READY=1")]
        (lease,) = lab.leases()
        assert ready == [(f"READY=1\nSTATUS=lease {lease.replace('-', '/')}", True)]
        count = systemd.messages().count("WATCHDOG=1")
        wait_until("more WATCHDOG=1", lambda: systemd.messages().count("WATCHDOG=1") >= count + 2, timeout=5)
        daemon.kill(signal.SIGTERM)
        assert daemon.popen.returncode == 0 and "Traceback" not in daemon.log()
        assert "STOPPING=1" in systemd.messages()
    finally:
        systemd.sock.close()


@pytest.fixture
def routed_host():
    """A lab host with a second uplink: 198.51.100.0/24 on `uplink` (two addresses), 203.0.113.0/24 routed there
    from the second one; eth0 keeps 192.0.2.0/24."""
    lab = Lab(1, etcd=False)
    try:
        host = lab.hosts[0]
        host.sh("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "uplink-peer")
        host.sh("ip", "addr", "add", "198.51.100.5/24", "dev", "uplink")
        host.sh("ip", "addr", "add", "198.51.100.6/24", "dev", "uplink")
        for name in ("uplink", "uplink-peer"):
            host.sh("ip", "link", "set", name, "up")
        host.sh("ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1", "src", "198.51.100.6")
        yield host
    finally:
        lab.close()


def test_iface_can_reach_takes_the_routed_interface_and_source(routed_host):
    with inside(routed_host.ns):
        kernel = Kernel()
        try:
            ext = iface.choose(kernel, [], [], None, None, "203.0.113.7")
            assert (ext.name, ext.public_ip, str(ext.address)) == ("uplink", "198.51.100.6", "198.51.100.6/24")
            assert iface.choose(kernel, [], [], None, None, "192.0.2.2").name == "eth0"
            # flanneld's order: -iface, then -iface-regex, then -iface-can-reach; -public-ip wins for the address
            assert iface.choose(kernel, ["eth0"], [], None, None, "203.0.113.7").name == "eth0"
            assert iface.choose(kernel, ["eth9"], ["^nothing"], None, None, "203.0.113.7").name == "uplink"
            assert iface.choose(kernel, ["eth9"], ["^eth"], None, None, "203.0.113.7").name == "eth0"
            assert iface.choose(kernel, [], [], "192.0.2.99", None, "203.0.113.7").public_ip == "192.0.2.99"
            with pytest.raises(UserError, match=r"^-iface-can-reach=8.8.8.8: no route to 8.8.8.8"):
                iface.choose(kernel, [], [], None, None, "8.8.8.8")  # the namespace has no default route
            with pytest.raises(UserError, match=r"^-iface-can-reach='eth0' is not an IP address"):
                iface.choose(kernel, [], [], None, None, "eth0")
            with pytest.raises(UserError, match=r"^-iface-can-reach=198.51.100.5: the route to it leaves through lo"):
                iface.choose(kernel, [], [], None, None, "198.51.100.5")
        finally:
            kernel.close()
