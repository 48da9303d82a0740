"""The driver's Prometheus metrics: calls by plugin method and status, and their latency.

Served at GET /metrics on the plugin socket; pyflanneld's /metrics fetches and includes them. The counts live in
the gunicorn worker, so they restart from 0 with it, and with --workers above 1 each scrape sees one worker's.
"""
from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)

disable_created_metrics()  # a *_created series per counter would double the output and tell little
OTHER = "other"  # the endpoint label of any unknown path, so that junk calls cannot grow the label set
# Driver calls take milliseconds (state lock, netlink) up to seconds (iptables, a contended lock).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def instrument(app: Flask, methods) -> None:
    """Count every plugin call (errors included) in before/after_request hooks, and serve GET /metrics."""
    registry = CollectorRegistry()
    requests = Counter("pyflannel_driver_requests", "Plugin calls answered, by method and HTTP status",
                       ["endpoint", "code"], registry=registry)
    latency = Histogram("pyflannel_driver_request_duration_seconds", "Time to answer a plugin call, by method",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)

    @app.before_request
    def start_clock():
        g.started = time.monotonic()

    @app.after_request
    def count(response: Response) -> Response:
        if request.endpoint != "serve_metrics":
            method = request.path.lstrip("/")
            endpoint = method if method in methods else OTHER
            requests.labels(endpoint, str(response.status_code)).inc()
            latency.labels(endpoint).observe(time.monotonic() - g.get("started", time.monotonic()))
        return response

    @app.get("/metrics", provide_automatic_options=False)
    def serve_metrics():
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
