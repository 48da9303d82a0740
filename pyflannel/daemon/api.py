"""The local API's server side (the protocol is in pyflannel/localapi.py): a threaded HTTP server on a Unix socket,
mode 0600, that hands each call to the daemon: join, leave and describe networks; publish and list names; rotate a
WireGuard key; run a CNI call for the thin CNI client."""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote

from pyflannel.kernel.errors import KernelError

from .catalog import NetworkConflict
from .errors import Stopped, UserError
from .store.base import ConfigNotFound, StoreError

log = logging.getLogger(__name__)

PREFIX = "/v1/networks"
ROTATE_KEY = "/rotate-key"
CNI = "/v1/cni"
NAMES = "/v1/names"


class Unavailable(Exception):
    """The call cannot be answered now (still starting, etcd unreachable): 503."""


class WrongHost(Exception):
    """A name publish from a driver on another host (its --daemon-socket reaches this pyflanneld): 409."""


def status_of(error: Exception) -> int:
    if isinstance(error, (NetworkConflict, ConfigNotFound)):
        return 409
    if isinstance(error, UserError):
        return 400
    return 503


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def take_over(path: str) -> None:
    """Remove the socket a killed daemon left at `path`; refuse to start while a live one answers there, whose
    clients (the driver's name publishes among them) would otherwise reach this daemon, and it none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except TimeoutError:  # its backlog is full: it lives, busy
            pass
        except OSError:  # nothing there, or nobody listening (refused): a file left behind
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
    raise UserError(f"another pyflanneld answers on {path}: give this one another -api-socket")


def serve(daemon, path: str) -> _Server:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") == NAMES:
                return self.reply(200, {"names": daemon.names.listing()})
            if self.path.rstrip("/") == NAMES + "/own":
                return self.reply(200, {"containers": daemon.names.published()})
            if self.path.rstrip("/") != PREFIX:
                return self.reply(404, {"error": f"no such resource {self.path}"})
            self.reply(200, {"networks": daemon.describe()})

        def do_PUT(self):
            if self.path.rstrip("/") == NAMES:
                try:
                    body = self._body()
                    if not isinstance(body.get("host", ""), str):
                        raise TypeError("host is not a string")
                    return self.reply(200, daemon.publish(body["containers"], body.get("host")))
                except WrongHost as e:
                    return self.reply(409, {"error": str(e)})
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    return self.reply(400, {"error": f'the body must be {{"containers": [...], "host": "..."}} '
                                                     f'("host" optional) ({e})'})
            self._network_call(lambda name, body: daemon.join(name, body.get("Network"), body.get("Backend"),
                                                              body.get("IPv6", False)))

        def cni(self):
            """The thin CNI client's call (cni/thin.py): environment in CNI-Env headers, config as the body."""
            if daemon.cni_plugin is None:
                return self.reply(404, {"error": "this pyflanneld runs no CNI calls (started without the plugin)"})
            environ = {}
            for header in self.headers.get_all("CNI-Env") or ():
                name, _, value = header.encode("latin-1").decode("utf-8", errors="replace").partition("=")
                environ[name] = value
            stdin = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code, output = daemon.cni(environ, stdin)
            data = output.encode()
            self.send_response(200)
            self.send_header("CNI-Exit-Code", str(code))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else {}

        def do_POST(self):
            if self.path == CNI:
                return self.cni()
            if not self.path.endswith(ROTATE_KEY):
                return self.reply(404, {"error": f"no such resource {self.path}"})
            self.path = self.path[:-len(ROTATE_KEY)]
            self._network_call(lambda name, body: daemon.rotate_key(name))

        def do_DELETE(self):
            self._network_call(lambda name, body: daemon.leave(name))

        def _network_call(self, call):
            if not self.path.startswith(PREFIX + "/"):
                return self.reply(404, {"error": f"no such resource {self.path}"})
            name = unquote(self.path[len(PREFIX) + 1:])
            try:
                body = self._body()
            except ValueError as e:
                return self.reply(400, {"error": f"the body is not JSON: {e}"})
            if not isinstance(body, dict) or not all(isinstance(body.get(key, ""), (str, type(None)))
                                                     for key in ("Network", "Backend")) \
                    or not isinstance(body.get("IPv6", False), bool):
                return self.reply(400, {"error": 'the body must be {"Network": "CIDR", "Backend": "TYPE", "IPv6": '
                                                 'true} (each optional)'})
            try:
                self.reply(200, call(name, body))
            except (UserError, ConfigNotFound, StoreError, KernelError, Unavailable) as e:
                self.reply(status_of(e), {"error": str(e)})
            except TimeoutError:
                self.reply(503, {"error": f"network {name} is busy: try again"})
            except Stopped:
                self.reply(503, {"error": "pyflanneld is stopping"})

        def reply(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    take_over(path)
    umask = os.umask(0o177)
    try:
        server = _Server(path, Handler)
    finally:
        os.umask(umask)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("local API on %s", path)
    return server
