"""pyflanneld's metrics: `prometheus` (the Prometheus registry and counters, served on the healthz port), or, for a
daemon without a healthz port, `Unmeasured` here, which imports neither that module nor prometheus_client."""
from __future__ import annotations


class Unmeasured:
    """The metrics of a daemon without a healthz port: nobody can scrape them, so nothing is counted."""

    class _Nothing:
        def labels(self, *values):
            return self

        def inc(self, amount: float = 1) -> None:
            pass

        def observe(self, value: float) -> None:
            pass

    lease_events = apply_seconds = lease_changes = lease_audit_repairs = etcd_errors = dns_upstream_failures = \
        _Nothing()
    registry = None

    def count_reconcile(self, repairs) -> None:
        pass

    @staticmethod
    def counting(store):
        return store
