"""pyflannel-driver restarted under load, called by a client that behaves like dockerd's plugin client.

dockerd (moby pkg/plugins) keeps idle connections open for reuse and retries a failed call after a pause: a dial
error with the request body intact, an error on a connection that already carried the request with the body
consumed, so the retry arrives empty. DockerdClient does the same (with shorter pauses), so these tests see what
dockerd would see when the driver is SIGKILLed and started again while calls are going on.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from lab import child_pids, exited
from tests.driver_support import network_request, write_subnet_env
from tests.test_driver_main import UnixHTTPConnection, answers, driver_argv, ns, post  # noqa: F401 (ns: fixture)

pytestmark = pytest.mark.lab

ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


class DockerdClient:
    """moby's plugin client: keep-alive pool, retry after a pause for 30 s, the body reader shared by all tries."""

    def __init__(self, sock: str, pause: float = 0.1, give_up: float = 30.0):
        self.sock, self.pause, self.give_up = sock, pause, give_up
        self.idle: list[UnixHTTPConnection] = []
        self.lock = threading.Lock()
        self.reused = self.retried = self.kept_alive = 0

    def _connection(self) -> tuple[UnixHTTPConnection, bool]:
        with self.lock:
            if self.idle:
                self.reused += 1
                return self.idle.pop(), True
        conn = UnixHTTPConnection(self.sock)
        conn.connect()
        return conn, False

    def call(self, method: str, body: dict | None = None) -> tuple[int, dict]:
        reader = io.BytesIO(b"" if body is None else json.dumps(body).encode())  # one reader for every try
        started = time.monotonic()
        while True:
            try:
                conn, _ = self._connection()
            except OSError:  # dial error: nothing was sent, the body is intact
                conn = None
            if conn is not None:
                try:
                    data = reader.read()
                    conn.request("POST", "/" + method, body=data, headers=ACCEPT)
                    resp = conn.getresponse()
                    reply = json.loads(resp.read())
                    if (resp.getheader("Connection") or "").lower() == "close":
                        conn.close()
                    else:
                        self.kept_alive += 1
                        with self.lock:
                            self.idle.append(conn)
                    return resp.status, reply
                except (OSError, http.client.HTTPException):
                    conn.close()  # sent (part of) the request: the body is gone for the retry
            if time.monotonic() - started > self.give_up:
                raise AssertionError(f"{method}: no answer for {self.give_up}s")
            self.retried += 1
            time.sleep(self.pause)


def start_driver(ns_name: str, tmp_path, log_name: str) -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(driver_argv(ns_name, "--socket", str(tmp_path / "plugins" / "pyflannel.sock"),
                                        "--state-dir", str(tmp_path / "state"),
                                        "--subnet-file", str(tmp_path / "subnet.env")),
                            stdout=log, stderr=subprocess.STDOUT)


def wait_answering(sock: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not answers(sock):
        assert proc.poll() is None and time.monotonic() < deadline, f"driver did not come up (rc {proc.poll()})"
        time.sleep(0.02)


@pytest.fixture
def driver_pair(ns, tmp_path):
    """Start/stop drivers on one socket and state dir; every process started is killed at the end, by PID."""
    write_subnet_env(tmp_path / "subnet.env")
    started: list[subprocess.Popen] = []
    workers: list[int] = []

    def start(log_name: str) -> subprocess.Popen:
        proc = start_driver(ns, tmp_path, log_name)
        started.append(proc)
        return proc

    yield start, workers
    for proc in started:
        workers.extend(child_pids(proc.pid))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in workers:
        if not exited(pid):
            os.kill(pid, signal.SIGKILL)


def test_calls_survive_sigkilled_driver_restarts(ns, tmp_path, driver_pair):
    start, workers = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    proc = start("driver-0.log")
    wait_answering(sock, proc)
    client = DockerdClient(sock)
    status, pool = client.call("IpamDriver.RequestPool", {"AddressSpace": "pyflannel-local", "Pool": "", "V6": False,
                                                          "Options": {}, "SubPool": ""})
    assert status == 200
    net_id = uuid.uuid4().hex * 2
    gw = client.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                   "Options": {"RequestAddressType": "com.docker.network.gateway"}})[1]
    assert client.call("NetworkDriver.CreateNetwork", network_request(net_id, gateway=gw["Address"]))[0] == 200

    failures, done, calls = [], threading.Event(), [0]

    def container_lifecycles():
        """What one `docker run --rm` asks of the driver (without Join: no sandbox here), back to back."""
        while not done.is_set():
            ep = uuid.uuid4().hex * 2
            ref = {"NetworkID": net_id, "EndpointID": ep}
            addr = client.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
            steps = [addr,
                     client.call("NetworkDriver.CreateEndpoint", {**ref, "Options": {}, "Interface": {
                         "Address": addr[1].get("Address", ""), "AddressIPv6": "", "MacAddress": ""}}),
                     client.call("NetworkDriver.EndpointOperInfo", ref),
                     client.call("NetworkDriver.DeleteEndpoint", ref),
                     client.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"],
                                                               "Address": addr[1].get("Address", "/").split("/")[0]})]
            calls[0] += len(steps)
            failures.extend(s for s in steps if s[0] != 200)

    threads = [threading.Thread(target=container_lifecycles) for _ in range(4)]
    for t in threads:
        t.start()
    overlaps = []
    try:
        for round_ in range(1, 6):
            time.sleep(0.4 + 0.15 * round_)
            old_workers = child_pids(proc.pid)
            workers.extend(old_workers)
            proc.kill()  # SIGKILL, by PID: the gunicorn master
            proc.wait()
            proc = start(f"driver-{round_}.log")
            # the old worker must be gone before the new driver binds the socket (it is unlinked until then)
            bound_at = worker_gone_at = None
            deadline = time.monotonic() + 20
            while (bound_at is None or worker_gone_at is None) and time.monotonic() < deadline:
                now = time.monotonic()
                if worker_gone_at is None and all(exited(w) for w in old_workers):
                    worker_gone_at = now
                if bound_at is None and os.path.exists(sock) and child_pids(proc.pid):
                    bound_at = now
                time.sleep(0.002)
            assert bound_at is not None and worker_gone_at is not None
            if bound_at < worker_gone_at:
                overlaps.append(round_)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    print(f"\n5 SIGKILL restarts under 4 dockerd-like clients: {calls[0]} calls, {len(failures)} failed, "
          f"{client.retried} retries, {client.reused} reused connections")
    assert not failures, failures[:5]
    assert not overlaps, f"a new driver served while the old worker still ran (rounds {overlaps})"
    assert client.reused == 0 and client.kept_alive == 0  # every reply closed its connection
    assert client.retried > 0  # the restarts did hit the clients
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["endpoints"] == {}
    assert [p["allocated"] for p in state["pools"].values()] == [[]]  # every address given back (the gateway is implicit)


def test_a_stopped_master_stops_its_worker_at_once(ns, tmp_path, driver_pair):
    start, workers = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    proc = start("driver.log")
    wait_answering(sock, proc)
    worker = child_pids(proc.pid)
    workers.extend(worker)
    assert len(worker) == 1
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while not exited(worker[0]):
        assert time.monotonic() - killed < 5, "the worker outlived its master"
        time.sleep(0.01)
    stopped = time.monotonic() - killed
    print(f"\nworker stopped {stopped * 1000:.0f} ms after its master was SIGKILLed")
    assert not os.path.exists(sock)  # unlinked by the worker: dockerd's next dial fails and is retried with its body
    assert "master process is gone" in (tmp_path / "driver.log").read_text()


def test_replies_close_the_connection(ns, tmp_path, driver_pair):
    start, _ = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    wait_answering(sock, start("driver.log"))
    conn = UnixHTTPConnection(sock)
    conn.request("POST", "/Plugin.Activate", body=b"", headers=ACCEPT)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") == "close"
    resp.read()
    assert conn.sock is None or conn.sock.recv(1) == b""  # the driver closed its end


def test_an_empty_retry_says_so_and_changes_nothing(ns, tmp_path, driver_pair):
    start, _ = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    wait_answering(sock, start("driver.log"))
    status, _, pool = post(sock, "IpamDriver.RequestPool", {"Pool": "", "V6": False})
    state_file = tmp_path / "state" / "state.json"
    before = state_file.read_text()
    for method in ("NetworkDriver.CreateEndpoint", "NetworkDriver.Join", "IpamDriver.RequestAddress"):
        status, _, reply = post(sock, method)  # no body, as dockerd's retry sends it
        assert status == 400 and "dockerd retrying a call" in reply["Err"] and "nothing was changed" in reply["Err"]
    assert state_file.read_text() == before


def test_a_second_driver_on_the_same_state_waits_then_gives_up(ns, tmp_path, driver_pair):
    start, _ = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    first = start("driver.log")
    wait_answering(sock, first)
    second = subprocess.run(driver_argv(ns, "--socket", str(tmp_path / "other.sock"), "--state-dir",
                                        str(tmp_path / "state"), "--subnet-file", str(tmp_path / "subnet.env")),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"another pyflannel-driver (pid {first.pid}) still serves state dir" in second.stderr
    assert answers(sock)


def test_under_socket_activation_restarts_cost_not_even_a_retry(ns, tmp_path, driver_pair):
    """As systemd runs it (pyflannel-driver.socket): the listening socket is passed as fd 3 (LISTEN_FDS) and outlives
    each driver, so calls made while one driver dies and the next starts wait in it: none fails, none is retried."""
    start, workers = driver_pair
    sock = str(tmp_path / "plugins" / "pyflannel.sock")
    (tmp_path / "plugins").mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(128)
    started: list[subprocess.Popen] = []

    def start_activated(log_name: str) -> subprocess.Popen:
        log = open(tmp_path / log_name, "w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", sys.executable,
             "-m", "pyflannel.driver.main", "--socket", sock, "--state-dir", str(tmp_path / "state"),
             "--subnet-file", str(tmp_path / "subnet.env")],
            stdout=log, stderr=subprocess.STDOUT, pass_fds=(3,),
            preexec_fn=lambda: os.dup2(listener.fileno(), 3))
        started.append(proc)
        return proc

    try:
        proc = start_activated("driver-0.log")
        wait_answering(sock, proc)
        client = DockerdClient(sock)
        failures, calls, done = [], [0], threading.Event()

        def caller():
            while not done.is_set():
                status, reply = client.call("NetworkDriver.EndpointOperInfo", {"NetworkID": "a" * 64,
                                                                               "EndpointID": "b" * 64})
                calls[0] += 1
                if status != 200:
                    failures.append(reply)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for round_ in range(1, 4):
            time.sleep(0.5)
            workers.extend(child_pids(proc.pid))
            proc.kill()
            proc.wait()
            time.sleep(0.5)  # systemd's RestartSec, shortened
            proc = start_activated(f"driver-{round_}.log")
        time.sleep(1)
        done.set()
        for t in threads:
            t.join(60)
        print(f"\nsocket activation, 3 SIGKILL restarts under 4 clients: {calls[0]} calls, {len(failures)} failed, "
              f"{client.retried} retried")
        assert not failures and client.retried == 0 and calls[0] > 20
        assert os.path.exists(sock)  # systemd's socket: never unlinked
    finally:
        for p in started:
            workers.extend(child_pids(p.pid))
            if p.poll() is None:
                p.kill()
                p.wait()
        listener.close()
