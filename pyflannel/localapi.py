"""pyflanneld's local API, defined once: its calls (`Call`s: method, path, reply), their bodies, and the client that
pyflannel-driver, the CNI plugin and `pyflannel status` call it with; pyflanneld serves the same table (daemon/api.py).

HTTP with JSON bodies on a Unix socket (default /run/flannel/pyflanneld.sock, root only). An error is
{"error": "..."} with 400 (bad name or body), 409 (contradicts etcd or another network) or 503 (etcd not reachable,
still joining).
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import quote

DEFAULT_NETWORK = "default"  # the name of the network at <prefix>/config, in reports and in pyflannel.network=
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}\Z")
RESERVED_NAMES = {"config", "subnets", "names"}  # the default network's own keys under <prefix>
BACKENDS = ("vxlan", "wireguard")  # what a named network created through the API can use (vxlan by default)
JOIN_SECONDS = 10.0   # pyflanneld answers a join within this (else 503: still joining), below gunicorn's timeout
CLIENT_SECONDS = 12.0


@dataclass(frozen=True)
class Call:
    """One call of the API: its method, its path ("{name}": a network's name, percent-encoded) and the key of the
    JSON reply that holds the answer (None: the reply is the answer)."""
    method: str
    path: str
    answer: str | None = None

    def path_for(self, name: str | None = None) -> str:
        return self.path if name is None else self.path.format(name=quote(name, safe=""))


# every flannel network this host serves: [{"name", "network", ...}]
NETWORKS = Call("GET", "/v1/networks", "networks")
# serve NAME (a JOIN_BODY); the first host to use a name writes its config to etcd (dual stack only with "IPv6";
# "IPv6" on a network that has none adds it while this host alone serves it). Answers once the lease is held and
# NAME's subnet.env is written: the network's description.
JOIN = Call("PUT", "/v1/networks/{name}")
# leave NAME: the lease is deleted and the kernel state goes
LEAVE = Call("DELETE", "/v1/networks/{name}")
# a new WireGuard key for NAME on this host: the network's description
ROTATE_KEY = Call("POST", "/v1/networks/{name}/rotate-key")
# this host's containers and their names per network (the whole set, each time), and which host they are on
# (a NAMES_BODY); 409 from a pyflanneld on another host
PUBLISH = Call("PUT", "/v1/names")
# every host's container names in the networks served
NAMES = Call("GET", "/v1/names", "names")
# how many of this host's containers it holds
OWN_NAMES = Call("GET", "/v1/names/own", "containers")
# run a CNI call as the plugin would (no JSON: cni/thin.py has the exchange)
CNI = Call("POST", "/v1/cni")

JOIN_BODY = '{"Network": "CIDR", "Backend": "TYPE", "IPv6": true} (each optional)'
NAMES_BODY = '{"containers": [...], "host": "..."} ("host" optional)'


def join_body(network: str | None, backend: str | None, ipv6: bool) -> dict:
    """JOIN's body: a new network's Network and Backend, and whether it is dual stack; only those given."""
    return {key: value for key, value in (("Network", network), ("Backend", backend), ("IPv6", ipv6)) if value}


def read_join_body(body) -> tuple[str | None, str | None, bool]:
    """A network call's body read back as (Network, Backend, IPv6); ValueError when it is no JOIN_BODY."""
    if not isinstance(body, dict) or not all(isinstance(body.get(key, ""), (str, type(None)))
                                             for key in ("Network", "Backend")) \
            or not isinstance(body.get("IPv6", False), bool):
        raise ValueError(JOIN_BODY)
    return body.get("Network"), body.get("Backend"), body.get("IPv6", False)


def names_body(containers: list[dict], host: str | None) -> dict:
    """PUBLISH's body: [{"id", "networks": {NAME or "": {"address", "names", optional "address6"}}}] and the
    host_identity() of the publisher (left out when unknown)."""
    return {"containers": containers, **({"host": host} if host else {})}


def read_names_body(body) -> tuple[list, str | None]:
    """PUBLISH's body read back as (containers, host); KeyError, TypeError or AttributeError when it is no
    NAMES_BODY."""
    if not isinstance(body.get("host", ""), str):
        raise TypeError("host is not a string")
    return body["containers"], body.get("host")


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

    def _send(self, call: Call, name: str | None = None, body: dict | None = None) -> dict:
        return self._call(call.method, call.path_for(name), body)

    def join(self, name: str, network: str | None = None, backend: str | None = None, ipv6: bool = False) -> dict:
        """Serve network `name`; a new one gets `network` (its Network) and `backend` (vxlan or wireguard); `ipv6`:
        the network must be dual stack (IPv4-only otherwise, when new)."""
        return self._send(JOIN, name, join_body(network, backend, ipv6))

    def leave(self, name: str) -> dict:
        return self._send(LEAVE, name)

    def rotate_key(self, name: str) -> dict:
        """A new WireGuard key for network `name` on this host; returns the network as `networks` describes it."""
        return self._send(ROTATE_KEY, name)

    def networks(self) -> list[dict]:
        return self._send(NETWORKS).get(NETWORKS.answer, [])

    def publish(self, containers: list[dict], host: str | None = None) -> None:
        """This host's containers on flannel networks, all of them (names_body); their names are answered over DNS
        on every host. `host` (host_identity()): pyflanneld refuses the set (409) when it runs on another host."""
        self._send(PUBLISH, body=names_body(containers, host))

    def names(self) -> list[dict]:
        return self._send(NAMES).get(NAMES.answer, [])

    def published(self) -> int:
        """How many of this host's containers pyflanneld holds: fewer than were published means it restarted."""
        return self._send(OWN_NAMES).get(OWN_NAMES.answer, 0)
