"""/healthz (the main loop is alive), /readyz (lease held, kernel programmed, etcd reachable) and /metrics.

Only a daemon with a healthz port serves them: prometheus_client is imported then, not at every start."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health:
    """Shared between the main loop (writer) and the HTTP server (reader)."""

    def __init__(self, stall_after: float = 30.0):
        self.stall_after = stall_after
        self.last_tick = time.monotonic()
        self.lease: str | None = None
        self.programmed = False
        self.etcd_ok = False

    def tick(self):
        self.last_tick = time.monotonic()

    def healthy(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.last_tick
        return age < self.stall_after, {"main_loop_seconds_since_tick": round(age, 3)}

    def ready(self) -> tuple[bool, dict]:
        state = {"lease": self.lease, "programmed": self.programmed, "etcd_reachable": self.etcd_ok}
        return bool(self.lease and self.programmed and self.etcd_ok), state


def serve(health: Health, host: str, port: int, registry) -> ThreadingHTTPServer:
    """`registry`: the prometheus_client CollectorRegistry served at /metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                self.reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                return
            checks = {"/healthz": health.healthy, "/readyz": health.ready}
            if self.path not in checks:
                self.send_error(404)
                return
            ok, body = checks[self.path]()
            self.reply(200 if ok else 503, "application/json", json.dumps({"ok": ok, **body}).encode())

        def reply(self, status: int, content_type: str, data: bytes):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server
