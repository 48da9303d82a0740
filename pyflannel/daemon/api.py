"""The local API's server side: a threaded HTTP server on a Unix socket, mode 0600, that hands each call of
pyflannel/localapi.py to the daemon by the table ROUTES: join, leave and describe networks; publish and list names;
rotate a WireGuard key; run a CNI call for the thin CNI client."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import unquote

from pyflannel import localapi
from pyflannel.kernel.errors import KernelError

from .catalog import NetworkConflict
from .errors import Stopped, UserError
from .store.base import ConfigNotFound, StoreError

log = logging.getLogger(__name__)


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


class Request(BaseHTTPRequestHandler):
    """One call: routed by ROUTES to its handler, which is given the daemon, the request and the network's name
    when the path has one."""
    daemon = None  # each server's own subclass says whose

    def do_GET(self):
        for call, paths, handler in ROUTES:
            found = paths.fullmatch(self.path) if call.method == self.command else None
            if found:
                return handler(self.daemon, self, *map(unquote, found.groups()))
        self.reply(404, {"error": f"no such resource {self.path}"})

    do_PUT = do_POST = do_DELETE = do_GET

    def body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else {}

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def answer(call: localapi.Call, value) -> Callable:
    """The handler of a call that only reads: 200 with `value(daemon)` under the call's answer key."""
    return lambda daemon, request: request.reply(200, {call.answer: value(daemon)})


def publish(daemon, request: Request):
    try:
        containers, host = localapi.read_names_body(request.body())
        request.reply(200, daemon.publish(containers, host))
    except WrongHost as e:
        request.reply(409, {"error": str(e)})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        request.reply(400, {"error": f"the body must be {localapi.NAMES_BODY} ({e})"})


def on_network(call: Callable) -> Callable:
    """The handler of a call on one network: `call(daemon, name, (Network, Backend, IPv6))` answers it, its errors
    are answered with their status."""
    def handler(daemon, request: Request, name: str):
        try:
            body = request.body()
        except ValueError as e:
            return request.reply(400, {"error": f"the body is not JSON: {e}"})
        try:
            options = localapi.read_join_body(body)
        except ValueError:
            return request.reply(400, {"error": f"the body must be {localapi.JOIN_BODY}"})
        try:
            request.reply(200, call(daemon, name, options))
        except (UserError, ConfigNotFound, StoreError, KernelError, Unavailable) as e:
            request.reply(status_of(e), {"error": str(e)})
        except TimeoutError:
            request.reply(503, {"error": f"network {name} is busy: try again"})
        except Stopped:
            request.reply(503, {"error": "pyflanneld is stopping"})
    return handler


def cni(daemon, request: Request):
    """The thin CNI client's call (cni/thin.py): environment in CNI-Env headers, config as the body."""
    if daemon.cni_plugin is None:
        return request.reply(404, {"error": "this pyflanneld runs no CNI calls (started without the plugin)"})
    environ = {}
    for header in request.headers.get_all("CNI-Env") or ():
        name, _, value = header.encode("latin-1").decode("utf-8", errors="replace").partition("=")
        environ[name] = value
    stdin = request.rfile.read(int(request.headers.get("Content-Length") or 0))
    code, output = daemon.cni(environ, stdin)
    data = output.encode()
    request.send_response(200)
    request.send_header("CNI-Exit-Code", str(code))
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def paths_of(call: localapi.Call) -> re.Pattern:
    """The paths that reach a call: "{name}" is any text (the name, percent-encoded); a JSON call's path without a
    name may end in slashes, the thin CNI client's is exact."""
    if "{name}" not in call.path:
        return re.compile(re.escape(call.path) + ("" if call is localapi.CNI else "/*"))
    before, after = call.path.split("{name}")
    return re.compile(f"{re.escape(before)}(.*){re.escape(after)}")


ROUTES = [(call, paths_of(call), handler) for call, handler in (
    (localapi.NETWORKS, answer(localapi.NETWORKS, lambda daemon: daemon.describe())),
    (localapi.NAMES, answer(localapi.NAMES, lambda daemon: daemon.names.listing())),
    (localapi.OWN_NAMES, answer(localapi.OWN_NAMES, lambda daemon: daemon.names.published())),
    (localapi.PUBLISH, publish),
    (localapi.JOIN, on_network(lambda daemon, name, options: daemon.join(name, *options))),
    (localapi.LEAVE, on_network(lambda daemon, name, options: daemon.leave(name))),
    (localapi.ROTATE_KEY, on_network(lambda daemon, name, options: daemon.rotate_key(name))),
    (localapi.CNI, cni),
)]


def serve(daemon, path: str) -> _Server:
    handler = type("Handler", (Request,), {"daemon": daemon})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    take_over(path)
    umask = os.umask(0o177)
    try:
        server = _Server(path, handler)
    finally:
        os.umask(umask)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("local API on %s", path)
    return server
