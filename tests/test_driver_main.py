"""pyflannel-driver as a process: gunicorn on a Unix socket, inside a throwaway namespace (`ip netns exec`)."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid

import pytest
from pyroute2 import netns as pr_netns

from lab import inside
from tests.driver_support import LEASE, link, network_request, write_subnet_env

pytestmark = pytest.mark.lab


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def post(sock_path: str, method: str, body=None):
    """One call the way dockerd makes it: POST, Accept header, no Content-Type."""
    conn = UnixHTTPConnection(sock_path)
    try:
        conn.request("POST", "/" + method, body=b"" if body is None else json.dumps(body).encode(),
                     headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def ns():
    name = f"pfltest-main-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)




def driver_argv(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "pyflannel.driver.main", *args]


def answers(sock: str) -> bool:
    try:
        return post(sock, "Plugin.Activate")[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_driver(ns: str, tmp_path, *extra: str):
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    log = open(tmp_path / "driver.log", "w+")
    proc = subprocess.Popen(driver_argv(ns, "--socket", sock, "--state-dir", str(tmp_path / "state"),
                                        "--subnet-file", write_subnet_env(tmp_path / "subnet.env"), *extra),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"driver did not come up (rc {proc.poll()}):\n{log.read()}")
            time.sleep(0.05)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # by PID: the process we started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_serves_docker_on_a_unix_socket(ns, tmp_path):
    with running_driver(ns, tmp_path, "--workers", "2", "--threads", "2") as (proc, sock):
        mode = os.stat(sock)
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_uid == 0
        assert post(sock, "Plugin.Activate") == (200, "application/vnd.docker.plugins.v1+json",
                                                 {"Implements": ["NetworkDriver", "IpamDriver"]})
        status, _, reply = post(sock, "NetworkDriver.NotYetInvented", {})
        assert status == 404 and reply["Err"]
        status, _, reply = post(sock, "IpamDriver.RequestPool", {"Pool": "", "V6": False})
        assert status == 200 and reply["Pool"] == LEASE
        net_id = uuid.uuid4().hex * 2
        status, _, reply = post(sock, "NetworkDriver.CreateNetwork", network_request(net_id))
        assert (status, reply) == (200, {})
        # several workers share one state: every call sees the network, whichever worker answers
        for _ in range(6):
            status, _, reply = post(sock, "NetworkDriver.CreateNetwork", network_request(uuid.uuid4().hex * 2))
            assert status == 409 and "already has a Docker network on the default flannel network" in reply["Err"]
        with inside(ns):
            assert link("pfl-" + net_id[:8])["ipv4"] == ["10.5.34.1/24"]
        # a second driver on the same socket is refused, and the first one keeps serving
        second = subprocess.run(driver_argv(ns, "--socket", sock, "--state-dir", str(tmp_path / "state2"),
                                            "--subnet-file", str(tmp_path / "subnet.env")),
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "already serving" in second.stderr and "Traceback" not in second.stderr
        assert post(sock, "Plugin.Activate")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not os.path.exists(sock)


def test_restart_reuses_a_stale_socket_file(ns, tmp_path):
    stale = tmp_path / "plugins" / "pyflannel.sock"
    stale.parent.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # left behind by a killed driver: nobody listens
    s.close()
    with running_driver(ns, tmp_path) as (_, sock):
        assert post(sock, "Plugin.Activate")[0] == 200


@pytest.mark.parametrize("setup, words", [
    ("corrupt-state", "is not valid JSON"),
    ("socket-is-a-file", "is not a socket"),
])
def test_startup_errors_are_one_clear_line(ns, tmp_path, setup, words):
    sock, state = tmp_path / "drv.sock", tmp_path / "state"
    state.mkdir()
    if setup == "corrupt-state":
        (state / "state.json").write_text("{")
    else:
        sock.write_text("not a socket")
    done = subprocess.run(driver_argv(ns, "--socket", str(sock), "--state-dir", str(state),
                                      "--subnet-file", write_subnet_env(tmp_path / "subnet.env")),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert words in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("pyflannel-driver: ")


def test_bad_flags_are_rejected():
    done = subprocess.run([sys.executable, "-m", "pyflannel.driver.main", "--workers", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--workers must be at least 1" in done.stderr
