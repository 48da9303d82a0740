"""pyflanneld as a user meets it: clear one-line errors (no tracebacks), -ip-masq, /healthz and /readyz."""
import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.lab import VENV_BIN, inside, ping, wait_until

pytestmark = pytest.mark.lab


def exited(process, timeout=20):
    wait_until(f"{process.name} to exit", lambda: not process.alive(), timeout=timeout)
    return process.popen.returncode, process.log()


def test_bad_flag_names_the_flag():
    done = subprocess.run([str(VENV_BIN / "pyflanneld"), "-healthz-port", "http"], capture_output=True, text=True)
    assert done.returncode == 2 and "-healthz-port" in done.stderr and "'http'" in done.stderr
    done = subprocess.run([str(VENV_BIN / "pyflanneld"), "-kube-subnet-mgr"], capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: -kube-subnet-mgr" in done.stderr


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
        out = h1.sh("iptables", "-t", "nat", "-L", "PYFLANNEL-POSTRTG", "-v", "-x", "-n")
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
