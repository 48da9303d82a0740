"""HTTP face of the driver: Docker's `POST /<Method>` calls, mapped to handlers. No logic lives here.

    Plugin.Activate                         -> Implements NetworkDriver + IpamDriver
    NetworkDriver.*                         -> network.NetworkDriver   (bridge, veth pairs)
    IpamDriver.*                            -> ipam.Ipam               (the host's flannel lease as the pool)

Replies are JSON with Content-Type application/vnd.docker.plugins.v1+json. Failures are JSON {"Err": ...} (IPAM
replies carry the same text as "Error" too); the status comes from errors.py. Unknown methods get 404, which Docker
reads as "not implemented". No exception ever reaches Docker as a traceback. GET /metrics: see metrics.py.
"""
from __future__ import annotations

import logging
import time

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from pyflannel import localapi, paths

from . import errors, validation as v
from .errors import DriverError, ValidationError
from .ipam import Ipam
from .leases import LeaseSource
from .metrics import instrument
from .network import NetworkDriver
from .plumbing import Plumbing
from .state import StateStore

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
BODILESS = {"Plugin.Activate", "NetworkDriver.GetCapabilities", "IpamDriver.GetCapabilities",
            "IpamDriver.GetDefaultAddressSpaces"}
# dockerd's plugin client retries a call whose connection failed after sending, with its body already consumed.
EMPTY_BODY = ("request body is empty: expected a JSON object. This is dockerd retrying a call whose connection was "
              "cut while it was being sent (the driver stopped during the call); nothing was changed: run the "
              "command again")


def reply(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type=CONTENT_TYPE)


def _body():
    """The request's JSON (Docker sends no Content-Type); ValidationError if it is empty or garbage."""
    too_large = ValidationError("", f"request body is larger than {v.MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > v.MAX_BODY_BYTES:
        raise too_large
    try:
        data = request.get_data(cache=True)
    except HTTPException:
        raise  # e.g. the client went away: 400
    except Exception as e:  # noqa: BLE001 - the server cannot parse the body (gunicorn: a malformed chunk)
        raise ValidationError("", f"request body cannot be read: {e}") from None
    if len(data) > v.MAX_BODY_BYTES:  # a chunked body (no Content-Length)
        raise too_large
    if not data.strip():
        raise ValidationError("", EMPTY_BODY)
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:
        raise ValidationError("", "request body is nested too deeply") from None
    if body is None and request.get_data(cache=True).strip() not in (b"", b"null"):
        raise ValidationError("", "request body is not valid JSON")
    return body


def create_app(state_dir: str = paths.DRIVER_STATE_DIR, subnet_file: str = paths.SUBNET_FILE, *,
               plumbing: Plumbing | None = None, reconcile: bool = True, lock_timeout: float = 10.0,
               lease_wait: float = 0.0, daemon_socket: str | None = paths.DAEMON_SOCKET,
               plugin_name: str = "pyflannel") -> Flask:
    """Build the app. With reconcile=True (the default) the kernel is first brought in line with the saved state.
    daemon_socket: pyflanneld's local API, for named flannel networks (None: the default network only);
    plugin_name: the name users give -d and --ipam-driver (errors.plugin_name)."""
    errors.name_plugin(plugin_name)
    store = StateStore(state_dir, lock_timeout=lock_timeout)
    lease = LeaseSource(subnet_file, wait=lease_wait)
    plumbing = plumbing or Plumbing()
    daemon = localapi.Client(daemon_socket) if daemon_socket else None
    network = NetworkDriver(store, lease, plumbing, daemon)
    ipam = Ipam(store, lease, plumbing, daemon)
    if reconcile:
        network.reconcile()

    empty = lambda fn: (lambda body: fn())  # noqa: E731 - methods whose body Docker leaves empty (not even parsed)

    def nothing_to_do(answer: dict):
        def handler(body):
            v.body_object(body)  # still refuse a body that is not a JSON object, like every other call
            return answer
        return handler

    handlers = {
        "Plugin.Activate": empty(lambda: {"Implements": ["NetworkDriver", "IpamDriver"]}),

        "NetworkDriver.GetCapabilities": empty(network.capabilities),
        "NetworkDriver.CreateNetwork": lambda b: network.create_network(v.create_network(b)),
        "NetworkDriver.DeleteNetwork": lambda b: network.delete_network(v.network_ref(b)),
        "NetworkDriver.CreateEndpoint": lambda b: network.create_endpoint(v.create_endpoint(b)),
        "NetworkDriver.EndpointOperInfo": lambda b: network.endpoint_oper_info(v.endpoint_ref(b)),
        "NetworkDriver.DeleteEndpoint": lambda b: network.delete_endpoint(v.endpoint_ref(b)),
        "NetworkDriver.Join": lambda b: network.join(v.join(b)),
        "NetworkDriver.Leave": lambda b: network.leave(v.endpoint_ref(b)),
        "NetworkDriver.ProgramExternalConnectivity":
            lambda b: network.program_external_connectivity(v.endpoint_ref(b)),
        "NetworkDriver.RevokeExternalConnectivity":
            lambda b: network.revoke_external_connectivity(v.endpoint_ref(b)),
        # Only sent for ConnectivityScope global / swarm managers; nothing to do, flannel spreads the routes.
        "NetworkDriver.DiscoverNew": nothing_to_do({}),
        "NetworkDriver.DiscoverDelete": nothing_to_do({}),
        "NetworkDriver.AllocateNetwork": nothing_to_do({"Options": {}}),
        "NetworkDriver.FreeNetwork": nothing_to_do({}),

        "IpamDriver.GetCapabilities": empty(ipam.capabilities),
        "IpamDriver.GetDefaultAddressSpaces": empty(ipam.default_address_spaces),
        "IpamDriver.RequestPool": lambda b: ipam.request_pool(v.request_pool(b)),
        "IpamDriver.ReleasePool": lambda b: ipam.release_pool(v.pool_ref(b)),
        "IpamDriver.RequestAddress": lambda b: ipam.request_address(v.request_address(b)),
        "IpamDriver.ReleaseAddress": lambda b: ipam.release_address(v.release_address(b)),
    }

    app = Flask("pyflannel.driver")
    # werkzeug silently cuts a chunked body off at this length: one byte more tells _body() that it was too large
    app.config["MAX_CONTENT_LENGTH"] = v.MAX_BODY_BYTES + 1
    app.extensions["pyflannel"] = {"store": store, "network": network, "ipam": ipam, "lease": lease}
    instrument(app, handlers)

    @app.post("/<method>", provide_automatic_options=False)  # OPTIONS too gets a JSON 405, not Flask's empty 200
    def call(method: str):
        handler = handlers.get(method)
        if handler is None:
            log.info("unknown method %s", method)
            return error_reply(404, f"pyflannel does not implement {method}")
        started = time.monotonic()
        body = None if method in BODILESS else _body()
        log.debug("%s %s", method, json.dumps(body)[:4000])
        result = handler(body)
        log.info("%s ok (%.0f ms)", method, (time.monotonic() - started) * 1000)
        return reply(result)

    @app.errorhandler(Exception)
    def on_error(e: Exception):
        if isinstance(e, DriverError):
            log.warning("%s failed (%d): %s", request.path.lstrip("/"), e.status, e)
            return error_reply(e.status, str(e))
        if isinstance(e, HTTPException):
            text = {404: f"pyflannel does not implement {request.path.lstrip('/')}",
                    405: f"{request.method} is not allowed: plugin calls are POST /<Method>"}.get(e.code, e.description)
            return error_reply(e.code or 500, text)
        log.exception("%s: internal error", request.path.lstrip("/"))
        return error_reply(500, f"internal error in pyflannel-driver ({type(e).__name__}: {e}); see its log")

    return app


def error_reply(status: int, message: str) -> Response:
    body = {"Err": message}
    if request.path.startswith("/IpamDriver."):
        body["Error"] = message  # ipams/remote reads "Error" in 200 replies, plugins client reads "Err" otherwise
    return reply(body, status)
