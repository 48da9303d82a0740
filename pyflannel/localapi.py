"""pyflanneld's local API, as its clients (pyflannel-driver, the CNI plugin, `pyflannel status`) call it.

HTTP with JSON bodies on a Unix socket (default /run/flannel/pyflanneld.sock, root only):

    GET    /v1/networks          every flannel network this host serves: {"networks": [{"name", "network", ...}]}
    PUT    /v1/networks/NAME     join NAME (body {"Network": "10.60.0.0/16", "Backend": "wireguard", "IPv6": true},
                                 each optional); the first host to use a name writes its config to etcd (dual stack
                                 only with "IPv6"; "IPv6" on a network that has none adds it while this host alone
                                 serves it). Answers once the lease is held and NAME's subnet.env is written: the
                                 network's description.
    DELETE /v1/networks/NAME     leave NAME: the lease is deleted and the kernel state goes.
    PUT    /v1/names             this host's containers and their names per network (the whole set, each time),
                                 and which host they are on (body {"containers": [...], "host": host_identity()});
                                 409 from a pyflanneld on another host
    GET    /v1/names             every host's container names in the networks served: {"names": [...]}
    GET    /v1/names/own         how many of this host's containers it holds: {"containers": N}
    POST   /v1/networks/NAME/rotate-key   a new WireGuard key for NAME on this host: the network's description
    POST   /v1/cni               run a CNI call as the plugin would (no JSON: cni/thin.py has the exchange)

An error is {"error": "..."} with 400 (bad name or body), 409 (contradicts etcd or another network) or 503 (etcd
not reachable, still joining).
"""
from __future__ import annotations

import json
import os
import re
import socket
from urllib.parse import quote

DEFAULT_NETWORK = "default"  # the name of the network at <prefix>/config, in reports and in pyflannel.network=
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}\Z")
RESERVED_NAMES = {"config", "subnets", "names"}  # the default network's own keys under <prefix>
BACKENDS = ("vxlan", "wireguard")  # what a named network created through the API can use (vxlan by default)
JOIN_SECONDS = 10.0   # pyflanneld answers a join within this (else 503: still joining), below gunicorn's timeout
CLIENT_SECONDS = 12.0


class DaemonError(Exception):
    """pyflanneld refused the call or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a flannel network (it becomes an etcd key), or None."""
    if not NAME.match(name):
        return (f"network name {name!r} is not valid: use 1 to 63 letters, digits, '_', '.' and '-', starting with "
                f"a letter or digit")
    if name in RESERVED_NAMES:
        return f"network name {name!r} is reserved (<prefix>/{name} is part of the default network's layout)"
    return None


def host_identity() -> str | None:
    """This host as a name publish names it: its network namespace (`net:[4026531840]`), which the driver's bridges
    and pyflanneld's routes share on every install (systemd, the managed plugin, compose: host networking), and
    which tells apart two hosts of one machine that share a /run; None where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def _network_path(name: str) -> str:
    return f"/v1/networks/{quote(name, safe='')}"


class Client:
    def __init__(self, socket_path: str, timeout: float = CLIENT_SECONDS):
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One HTTP/1.0 exchange, by hand: the CNI plugin's binary is built without http.client (start-up time)."""
        data = json.dumps(body).encode() if body is not None else b""
        request = (f"{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        chunks = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                raise DaemonError(f"pyflanneld does not answer on {self.socket_path} ({e.strerror or e}): is it "
                                  f"running? (its -api-socket flag names the socket)") from None
            try:
                sock.sendall(request)
                while chunk := sock.recv(1 << 16):
                    chunks.append(chunk)
            except OSError as e:
                raise DaemonError(f"pyflanneld took the call on {self.socket_path} but gave no answer "
                                  f"({e.strerror or e})") from None
        head, _, text = b"".join(chunks).partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        try:
            reply = json.loads(text) if text.strip() else {}
        except ValueError:
            reply = {"error": text[:200].decode(errors="replace")}
        if status != 200:
            raise DaemonError(f"pyflanneld: {reply.get('error') or f'HTTP {status}'}", status or 503)
        return reply

    def join(self, name: str, network: str | None = None, backend: str | None = None, ipv6: bool = False) -> dict:
        """Serve network `name`; a new one gets `network` (its Network) and `backend` (vxlan or wireguard); `ipv6`:
        the network must be dual stack (IPv4-only otherwise, when new)."""
        body = {key: value for key, value in (("Network", network), ("Backend", backend), ("IPv6", ipv6)) if value}
        return self._call("PUT", _network_path(name), body)

    def leave(self, name: str) -> dict:
        return self._call("DELETE", _network_path(name))

    def rotate_key(self, name: str) -> dict:
        """A new WireGuard key for network `name` on this host; returns the network as `networks` describes it."""
        return self._call("POST", _network_path(name) + "/rotate-key")

    def networks(self) -> list[dict]:
        return self._call("GET", "/v1/networks").get("networks", [])

    def publish(self, containers: list[dict], host: str | None = None) -> None:
        """This host's containers on flannel networks, all of them: [{"id", "networks": {NAME or "": {"address",
        "names"}}}]; their names are answered over DNS on every host. `host` (host_identity()): pyflanneld refuses
        the set (409) when it runs on another host."""
        self._call("PUT", "/v1/names", {"containers": containers, **({"host": host} if host else {})})

    def names(self) -> list[dict]:
        return self._call("GET", "/v1/names").get("names", [])

    def published(self) -> int:
        """How many of this host's containers pyflanneld holds: fewer than were published means it restarted."""
        return self._call("GET", "/v1/names/own").get("containers", 0)
