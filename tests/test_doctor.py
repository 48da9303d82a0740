"""`pyflannel doctor` on a lab host: clean reports nothing; each planted problem is found, named, and its fix works.

Everything planted lives in the lab's namespaces (routes, MTU, offload, iptables rules, sockets) or the lab's etcd.
"""
import json
import signal
import subprocess
import sys

import pytest

from lab import VENV_BIN, wait_until

pytestmark = pytest.mark.lab


def doctor(lab, host, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(["ip", "netns", "exec", host.ns, str(VENV_BIN / "pyflannel"), "doctor", "--json",
                           "-etcd-endpoints", lab.etcd_url, "-subnet-file", str(host.subnet_file), "-api-socket",
                           str(host.api_sock), *extra], capture_output=True, text=True, timeout=60)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def problems(report: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for f in report["findings"]:
        if f["severity"] == "problem":
            found.setdefault(f["check"], []).append(f)
    return found


def only_problem(lab, host, check: str, *extra: str) -> dict:
    """Run doctor; exactly one check reports one problem, exit code 1; that finding is returned."""
    rc, report = doctor(lab, host, *extra)
    found = problems(report)
    assert rc == 1 and list(found) == [check] and len(found[check]) == 1, report
    return found[check][0]


def apply_fix(host, finding: dict) -> None:
    host.sh(*finding["fix"].split())


def assert_clean(lab, host) -> None:
    rc, report = doctor(lab, host)
    assert rc == 0 and problems(report) == {}, report


def test_doctor_finds_each_planted_problem(make_lab):
    lab = make_lab(2)
    lab.set_config()
    for host in lab.hosts:
        host.start_daemon()
    h1, h2 = lab.hosts

    rc, report = doctor(lab, h1)
    assert rc == 0 and report["problems"] == 0 and report["findings"] == [], report
    assert set(report["checks"].values()) == {"ok"}
    text = h1.sh(str(VENV_BIN / "pyflannel"), "doctor", "-etcd-endpoints", lab.etcd_url,
                 "-subnet-file", str(h1.subnet_file))
    assert "no problems found" in text and "ok       routes" in text
    rc, report = doctor(lab, h1, "-dns-address", "169.254.53.54")  # where no pyflanneld answers DNS
    assert rc == 1 and [f["check"] for f in report["findings"]] == ["dns"]
    assert "169.254.53.54:53" in report["findings"][0]["message"]

    # 1. a foreign route more specific than the Network steals part of it
    h1.sh("ip", "route", "add", "10.5.200.0/25", "dev", "eth0")
    finding = only_problem(lab, h1, "routes")
    assert "10.5.200.0/25" in finding["message"] and finding["fix"] == "ip route del 10.5.200.0/25 dev eth0"
    apply_fix(h1, finding)
    assert_clean(lab, h1)

    # 2. flannel.1's MTU differs from FLANNEL_MTU and from eth0's MTU - 50
    h1.sh("ip", "link", "set", "flannel.1", "mtu", "1400")
    finding = only_problem(lab, h1, "mtu")
    assert "flannel.1 MTU is 1400" in finding["message"] and finding["fix"] == "ip link set flannel.1 mtu 1450"
    apply_fix(h1, finding)
    assert_clean(lab, h1)

    # 3. an iptables INPUT rule drops VXLAN
    h1.sh("iptables", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
    finding = only_problem(lab, h1, "vxlan-port")
    assert "8472" in finding["message"] and finding["fix"].startswith("iptables -D INPUT -p udp")
    apply_fix(h1, finding)
    assert_clean(lab, h1)

    # 3b. the tunnel guard is not hooked in: VXLAN frames from anyone reach flannel.1
    h1.sh("iptables", "-t", "raw", "-D", "PREROUTING", "-j", "PYFLANNEL-TUNNEL")
    finding = only_problem(lab, h1, "tunnel-guard")
    assert "from any address" in finding["message"]
    assert finding["fix"] == "iptables -t raw -I PREROUTING 1 -j PYFLANNEL-TUNNEL"
    apply_fix(h1, finding)
    assert_clean(lab, h1)

    # 3c. containers' VXLAN is not dropped (fine only with -allow-container-tunnels)
    h1.sh("iptables", "-t", "raw", "-D", "PYFLANNEL-TUNNEL", "-s", "10.5.0.0/16", "-p", "udp", "--dport", "8472",
          "-j", "DROP")
    finding = only_problem(lab, h1, "tunnel-guard")
    assert "containers on 10.5.0.0/16 can send VXLAN" in finding["message"] and "restart pyflanneld" in finding["fix"]
    assert doctor(lab, h1, "-allow-container-tunnels")[0] == 0
    h1.daemon.kill(signal.SIGTERM)
    h1.subnet_file.unlink()  # (so that start_daemon waits for the new daemon's)
    h1.start_daemon()
    assert_clean(lab, h1)

    # 4. two leases with one PublicIP (h2's)
    leases = lab.leases()
    fake = next(f"10.5.{n}.0-24" for n in range(250, 0, -1) if f"10.5.{n}.0-24" not in leases)
    value = json.dumps({"PublicIP": h2.ip, "PublicIPv6": None, "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:99"}})
    lab.etcd_request("PUT", f"{lab.prefix_key}/subnets/{fake}", value, ttl=600)
    finding = only_problem(lab, h1, "public-ip")
    assert h2.ip in finding["message"] and "etcdctl rm" in finding["fix"]
    assert finding["fix"].count("/subnets/") == 2  # neither is this host's lease: both named
    lab.etcd_request("DELETE", f"{lab.prefix_key}/subnets/{fake}")
    assert_clean(lab, h1)

    # 5. our lease is about to expire (pyflanneld, which would renew a shortened TTL at once, is stopped)
    h1.daemon.kill()
    own = h1.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0-")
    lab.etcd_request("PUT", f"{lab.prefix_key}/subnets/{own}", lab.leases()[own]["value"], ttl=60)
    finding = only_problem(lab, h1, "lease", "-dns-address", "")  # (pyflanneld's DNS is down with it)
    assert "expires in" in finding["message"] and "restart pyflanneld" in finding["fix"]

    # 6. the UDP port taken by another socket where no flannel.1 exists (h2: daemon stopped, device gone)
    h2.daemon.kill()
    h2.sh("ip", "link", "del", "flannel.1")
    squatter = lab.spawn("h2-udp-8472", [sys.executable, "-c", "import socket, time; s = socket.socket("
                         "socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 8472)); time.sleep(300)"], ns=h2.ns)
    wait_until("the squatter's socket", lambda: ":2118 " in h2.sh("cat", "/proc/net/udp"))
    rc, report = doctor(lab, h2)
    port = problems(report)["vxlan-port"]
    assert rc == 1 and f"pid {squatter.pid}" in port[0]["message"], report
    assert "flannel.1 does not exist" in problems(report)["mtu"][0]["message"]

    # 7. etcd is gone: one problem; what needs etcd is "unknown", the kernel checks still run
    lab.etcd.kill()
    rc, report = doctor(lab, h1, "-dns-address", "")  # (h1's pyflanneld is still stopped, its DNS with it)
    assert rc == 1 and list(problems(report)) == ["etcd"], report
    assert "unreachable" in problems(report)["etcd"][0]["message"]
    assert report["checks"]["lease"] == report["checks"]["public-ip"] == "unknown"
    assert report["checks"]["routes"] == report["checks"]["mtu"] == "ok"


def test_doctor_checksum_offload_with_random_fully(make_lab):
    lab = make_lab(1)
    lab.set_config()
    h1 = lab.hosts[0]
    h1.start_daemon()
    toggled = subprocess.run(["ip", "netns", "exec", h1.ns, "ethtool", "-K", "flannel.1", "tx-checksum-ip-generic",
                              "on"], capture_output=True, text=True)
    if toggled.returncode != 0:
        pytest.skip(f"the vxlan driver refuses the offload toggle: {toggled.stderr.strip()}")
    assert_clean(lab, h1)  # offload alone is fine
    h1.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.5.0.0/16", "-j", "MASQUERADE", "--random-fully")
    finding = only_problem(lab, h1, "offload")
    assert "--random-fully" in finding["message"]
    assert finding["fix"] == "ethtool -K flannel.1 tx-checksum-ip-generic off"
    apply_fix(h1, finding)
    assert_clean(lab, h1)


def test_ip_masq_daemon_turns_vxlan_checksum_offload_off(make_lab):
    lab = make_lab(1)
    lab.set_config()
    h1 = lab.hosts[0]
    h1.start_daemon("-ip-masq")
    assert "tx-checksum-ip-generic: off" in h1.sh("ethtool", "-k", "flannel.1")
    assert "--random-fully" in h1.sh("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG")
    assert_clean(lab, h1)  # doctor's offload check agrees


def test_doctor_checks_forwarding_and_egress_of_the_docker_networks(make_lab):
    """A host with pyflannel-driver and a network on it (created through the plugin socket, as dockerd would):
    ip_forward off, FORWARD policy DROP without the bridge's accept rules, a lost masquerade rule: each found."""
    from tests.driver_support import network_request
    from tests.test_driver_main import post

    lab = make_lab(1)
    lab.set_config()
    h1 = lab.hosts[0]
    h1.start_daemon()
    h1.start_driver()
    sock = str(h1.driver_sock)
    pool = post(sock, "IpamDriver.RequestPool", {"Pool": "", "V6": False})[2]
    gateway = post(sock, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {
        "RequestAddressType": "com.docker.network.gateway"}})[2]["Address"]
    net_id = "a1" * 32
    assert post(sock, "NetworkDriver.CreateNetwork", network_request(net_id, pool=pool["Pool"], gateway=gateway))[0] == 200
    bridge = "pfl-" + net_id[:8]

    def doctor_here() -> tuple[int, dict]:
        done = subprocess.run(["ip", "netns", "exec", h1.ns, str(VENV_BIN / "pyflannel"), "doctor", "--json",
                               "-etcd-endpoints", lab.etcd_url, "-subnet-file", str(h1.subnet_file),
                               "--driver-state-dir", str(h1.workdir / "driver")], capture_output=True, text=True,
                              timeout=60)
        return done.returncode, json.loads(done.stdout)

    rc, report = doctor_here()
    assert rc == 0 and report["checks"]["forwarding"] == report["checks"]["masquerade"] == "ok", report

    h1.sh("iptables", "-t", "nat", "-F", "PYFLANNEL-NAT-OUT")  # a firewall reload lost the driver's rules
    found = problems(doctor_here()[1])
    assert list(found) == ["masquerade"] and pool["Pool"] in found["masquerade"][0]["message"]
    h1.driver.kill()
    h1.start_driver()  # the fix it names: the driver rewrites its rules at start
    assert doctor_here()[0] == 0

    h1.sh("iptables", "-P", "FORWARD", "DROP")
    found = problems(doctor_here()[1])
    assert list(found) == ["forwarding"] and len(found["forwarding"]) == 2, found
    for finding in found["forwarding"]:
        assert bridge in finding["message"]
        apply_fix(h1, finding)
    h1.sh("sysctl", "-qw", "net.ipv4.ip_forward=0")
    found = problems(doctor_here()[1])
    assert list(found) == ["forwarding"] and found["forwarding"][0]["fix"] == "sysctl -w net.ipv4.ip_forward=1"
    apply_fix(h1, found["forwarding"][0])
    rc, report = doctor_here()
    assert rc == 0, report


def test_doctor_names_every_step_for_a_docker_network_left_on_a_lost_lease():
    """pyflanneld took another lease (its old one went to another host): the Docker network still on the old one is
    named, with the steps that move it (its containers first)."""
    from datetime import timedelta

    from pyflannel.doctor import Facts, check_networks
    from pyflannel.driver.records import NetworkRecord
    facts = Facts("/run/flannel/subnet.env", [], "/coreos.com/network", timedelta(minutes=60))
    facts.daemon_networks = [{"name": "default", "state": "ready", "lease": "10.5.77.0/24",
                              "ipv6_lease": "fd00:5:0:9::/64", "error": None}]
    facts.driver_networks = {
        "ab" * 32: NetworkRecord("pfl-abababab", "10.5.34.0/24", "10.5.34.1/24", "10.5.0.0/16", None, True, False, "",
                                 pool6="fd00:5:0:27::/64", gateway6="fd00:5:0:27::1/64", flannel_network6="fd00:5::/48"),
        "cd" * 32: NetworkRecord("pfl-cdcdcdcd", "10.5.77.0/24", "10.5.77.1/24", "10.5.0.0/16", None, True, False, "")}
    [finding] = check_networks(facts)
    assert "Docker network abababababab (bridge pfl-abababab) is on a lease this host no longer holds" in finding.message
    assert "10.5.34.0/24 to 10.5.77.0/24 and fd00:5:0:27::/64 to fd00:5:0:9::/64" in finding.fix
    assert "docker ps -aq --filter network=abababababab" in finding.fix and "docker network rm abababababab" in finding.fix
