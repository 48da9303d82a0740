"""The local API, defined once in pyflannel/localapi.py: every call the client makes reaches the daemon's handler
through the server's table (daemon/api.py), with the statuses and error texts the clients rely on. No root: a Unix
socket in tmp_path and a daemon that records what it is handed."""
import socket
from types import SimpleNamespace

import pytest

from pyflannel import localapi
from pyflannel.daemon import api
from pyflannel.daemon.catalog import NetworkConflict
from pyflannel.daemon.errors import Stopped

pytestmark = pytest.mark.unit


class RecordingDaemon:
    def __init__(self):
        self.calls = []
        self.names = SimpleNamespace(listing=lambda: [{"names": ["web"]}], published=lambda: 3)

    def describe(self):
        return [{"name": "default"}]

    def join(self, name, network, backend=None, ipv6=False):
        if name == "taken":
            raise NetworkConflict("network taken has VNI 2")
        self.calls.append(("join", name, network, backend, ipv6))
        return {"name": name}

    def leave(self, name):
        if name == "stopping":
            raise Stopped()
        self.calls.append(("leave", name))
        return {}

    def rotate_key(self, name):
        self.calls.append(("rotate-key", name))
        return {"name": name}

    def publish(self, containers, host=None):
        self.calls.append(("publish", containers, host))
        return {}


@pytest.fixture
def served(tmp_path):
    path, daemon = str(tmp_path / "pyflanneld.sock"), RecordingDaemon()
    server = api.serve(daemon, path)
    yield localapi.Client(path), daemon
    server.shutdown()
    server.server_close()


def raw(client: localapi.Client, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(client.socket_path)
        sock.sendall(request)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_every_call_of_the_api_is_served_once():
    calls = [value for value in vars(localapi).values() if isinstance(value, localapi.Call)]
    assert sorted(c.path for c, _, _ in api.ROUTES) == sorted(c.path for c in calls) and len(calls) == 8


def test_the_clients_calls_reach_the_daemon(served):
    client, daemon = served
    assert client.join("a/b c", "10.60.0.0/16", "wireguard", ipv6=True) == {"name": "a/b c"}
    assert client.rotate_key("shop") == {"name": "shop"} and client.leave("shop") == {}
    client.publish([{"id": "c1"}], "net:[1]")
    assert client.networks() == [{"name": "default"}] and client.names() == [{"names": ["web"]}]
    assert client.published() == 3
    assert daemon.calls == [("join", "a/b c", "10.60.0.0/16", "wireguard", True), ("rotate-key", "shop"),
                            ("leave", "shop"), ("publish", [{"id": "c1"}], "net:[1]")]


def test_refusals_keep_their_status_and_text(served):
    client, _ = served
    for call, status, text in ((lambda: client.join("taken"), 409, "pyflanneld: network taken has VNI 2"),
                               (lambda: client.leave("stopping"), 503, "pyflanneld: pyflanneld is stopping"),
                               (lambda: client._call("PUT", "/v1/networks/x", {"IPv6": "yes"}), 400,
                                'pyflanneld: the body must be {"Network": "CIDR", "Backend": "TYPE", "IPv6": true} '
                                '(each optional)'),
                               (lambda: client._call("GET", "/v1/nowhere"), 404,
                                "pyflanneld: no such resource /v1/nowhere")):
        with pytest.raises(localapi.DaemonError) as refused:
            call()
        assert (refused.value.status, str(refused.value)) == (status, text)
    reply = raw(client, b"DELETE /v1/networks/x HTTP/1.0\r\nContent-Length: 3\r\n\r\n{x}")
    assert reply.startswith(b"HTTP/1.0 400 ") and b'"the body is not JSON: ' in reply
    assert raw(client, b"GET /v1/networks// HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    assert raw(client, b"POST /v1/cni/ HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
