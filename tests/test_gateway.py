"""The v3 store's HTTP floor against a stand-in member (a local HTTP server answering as etcd's gateway would): the API
path per etcd version, errors sorted into "try the next member" and "etcd said no", a streamed watch split anywhere.
The store itself is tested against a real etcd (test_etcdv3, test_etcd_cluster)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pyflannel.daemon.store.gateway import Gateway, GatewayError, Unreachable

pytestmark = pytest.mark.unit


class Member(BaseHTTPRequestHandler):
    version = "3.3.27"
    answers: dict = {}  # path -> (status, body)
    seen: list = []

    def do_GET(self):
        self._reply(200, json.dumps({"etcdserver": self.version, "etcdcluster": "3.3.0"}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, json.loads(body), self.headers.get("Authorization")))
        if self.path.endswith("/held"):  # a watch that stays open after its first message
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b'{"result": {"created": true}}\n'
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(3)
            return
        if self.path.endswith("/watch"):  # chunks that split messages anywhere
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in (b'{"result": {"created": tr', b'ue}}\n{"result": {"events": []}}\n{"res', b'ult": {}}\n'):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        self._reply(*self.answers.get(self.path, (200, b'{"header": {"revision": "7"}}')))

    def _reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def member():
    Member.answers, Member.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Member)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def gateway(server, headers=None) -> Gateway:
    return Gateway("http", "127.0.0.1", server.server_address[1], timeout=2, headers={} if headers is None else headers)


@pytest.mark.parametrize("version, path", [("3.3.27", "/v3beta/"), ("3.4.23", "/v3/"), ("3.2.32", "/v3alpha/")])
def test_the_api_path_follows_the_members_version(member, version, path):
    Member.version = version
    headers = {}
    g = gateway(member, headers)
    headers["Authorization"] = "token-1"  # the store's token, shared with every member's gateway
    assert g.post("kv/range", {"key": "YQ=="}) == {"header": {"revision": "7"}}
    assert Member.seen == [(f"{path}kv/range", {"key": "YQ=="}, "token-1")]


def test_errors_say_whether_another_member_may_answer(member):
    Member.version = "3.4.23"
    Member.answers = {"/v3/kv/txn": (400, b'{"error": "etcdserver: requested lease not found", "code": 5}'),
                      "/v3/kv/range": (503, b'{"error": "etcdserver: no leader"}'),
                      "/v3/lease/grant": (200, b"<html>a proxy</html>")}
    g = gateway(member)
    with pytest.raises(GatewayError, match="lease not found") as refused:
        g.post("kv/txn", {})
    assert not isinstance(refused.value, Unreachable)
    with pytest.raises(Unreachable, match="no leader"):
        g.post("kv/range", {})
    with pytest.raises(GatewayError, match="not etcd's JSON"):
        g.post("lease/grant", {})
    with pytest.raises(Unreachable):
        Gateway("http", "127.0.0.1", 1, timeout=1, headers={}).post("kv/range", {})
    assert g.answers() and not Gateway("http", "127.0.0.1", 1, timeout=1, headers={}).answers()


def test_a_watch_streams_each_message_whole_however_it_is_chunked(member):
    messages = gateway(member).stream("watch", {"create_request": {}}, idle=2)
    assert list(messages) == [{"result": {"created": True}}, {"result": {"events": []}}, {"result": {}}]


def test_a_watch_left_open_takes_its_connection_with_it(member):
    """A watch ended by the reader (idle, or the daemon stopping) while the member still streams: the next request
    goes out on a connection of its own, not on the one still carrying the stream."""
    Member.version = "3.4.23"
    g = gateway(member)
    messages = g.stream("held", {"create_request": {}}, idle=2)
    assert next(messages) == {"result": {"created": True}}
    messages.close()
    started = time.monotonic()
    assert g.post("kv/range", {"key": "YQ=="}) == {"header": {"revision": "7"}}
    assert time.monotonic() - started < 1
