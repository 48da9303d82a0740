"""What operators are handed: the alert rules (promtool's unit tests of them), the Grafana dashboard, `--version` on
every command, pyflanneld's -log-level; and the local API's two guards: one pyflanneld per API socket, and name
publishes refused from another host. The dashboard's and rules' metric names are checked against a live scrape in
tests/test_metrics.py."""
from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyflannel import __version__, localapi, supervisor
from pyflannel.daemon import api, flags as cli_flags
from pyflannel.daemon.errors import UserError
from pyflannel.daemon.main import Daemon, set_verbosity
from pyflannel.driver.publisher import NamePublisher
from pyflannel.driver.state import DriverState

pytestmark = pytest.mark.unit

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "pyflannel.rules.yml"
RULES_TEST = MONITORING / "pyflannel.rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
BIN = Path(sys.executable).parent
# promtool as `make engines` extracts it from Debian's prometheus package (not installed: it would start a server).
PROMTOOL = MONITORING.parent / "build" / "engines" / "promtool" / "promtool"
# A metric's name in PromQL: ours, or the process collector's (`up`, the other one used, is Prometheus' own).
METRIC = re.compile(r"\b((?:pyflannel|process)_[a-z0-9_]+)\b")


def expressions() -> list[str]:
    """Every PromQL expression the operator is handed: the rules' `expr:` and the dashboard's targets."""
    rules = re.findall(r"^\s*expr:\s*(.+)$", RULES.read_text(), re.M)
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    return rules + targets


def used_metric_names() -> set[str]:
    """The sample names (as a scrape shows them: counters with _total, histograms' _bucket) the expressions use."""
    return {name for expr in expressions() for name in METRIC.findall(expr)}


@pytest.mark.skipif(not PROMTOOL.exists(), reason=f"{PROMTOOL} absent: `make engines` extracts it")
def test_alert_rules_pass_promtool_tests():
    done = subprocess.run([str(PROMTOOL), "test", "rules", RULES_TEST.name], cwd=MONITORING, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    checked = subprocess.run([str(PROMTOOL), "check", "rules", RULES.name], cwd=MONITORING, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_promtool_test():
    alerts = set(re.findall(r"^\s*- alert:\s*(\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname:\s*(\w+)", RULES_TEST.read_text(), re.M))
    assert len(alerts) >= 12 and alerts == tested, alerts ^ tested


def test_alerts_cover_what_the_issue_asks_for():
    used = {name for expr in re.findall(r"^\s*expr:\s*(.+)$", RULES.read_text(), re.M) for name in METRIC.findall(expr)}
    for metric in ("pyflannel_lease_changes_total", "pyflannel_lease_expiry_timestamp_seconds",
                   "pyflannel_reconcile_failures_total", "pyflannel_etcd_reachable", "pyflannel_network_up",
                   "pyflannel_dns_upstream_failures_total"):
        assert metric in used, metric


def test_dashboard_is_grafana_json_whose_panels_all_query():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "instance", "network"}
    for panel in panels:
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]) or "up{" in target["expr"], target["expr"]
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}, target["expr"]
    assert {"pyflannel_network_up", "pyflannel_etcd_reachable", "pyflannel_dns_upstream_failures_total",
            "pyflannel_reconcile_failures_total"} <= used_metric_names()


# --- --version and -log-level ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["pyflanneld", "pyflannel-driver", "pyflannel"])
def test_every_command_says_its_version(command):
    done = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"{command} {__version__}\n"), done.stderr


def test_the_plugins_supervisor_says_its_version(capsys):
    with pytest.raises(SystemExit) as exited:
        supervisor.parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"pyflannel-plugin {__version__}\n"


def test_log_level_from_the_flag_or_the_environment():
    assert cli_flags.parse([], env={}).log_level == "info"
    assert cli_flags.parse(["-log-level", "WARNING"], env={}).log_level == "warning"
    assert cli_flags.parse([], env={"FLANNELD_LOG_LEVEL": "error"}).log_level == "error"
    assert cli_flags.parse(["--log-level=debug"], env={"FLANNELD_LOG_LEVEL": "error"}).log_level == "debug"
    done = subprocess.run([str(BIN / "pyflanneld"), "-log-level", "loud"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "-log-level" in done.stderr and "'loud' is not a log level" in done.stderr


@pytest.mark.parametrize("v,level,ours,libraries", [
    (0, "info", logging.INFO, logging.INFO),
    (0, "warning", logging.WARNING, logging.WARNING),
    (0, "error", logging.ERROR, logging.ERROR),
    (0, "debug", logging.DEBUG, logging.INFO),   # pyflannel's DEBUG messages, not the libraries'
    (1, "error", logging.DEBUG, logging.INFO),   # -v above 0 wins
    (5, "warning", logging.DEBUG, logging.DEBUG),
])
def test_log_level_and_v(v, level, ours, libraries):
    names = ("pyflannel", "pyflanneld", "")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.NOTSET if n else logging.INFO)
        set_verbosity(v, level)
        assert logging.getLogger("pyflannel.daemon.overlay").getEffectiveLevel() == ours
        assert logging.getLogger("pyflanneld").getEffectiveLevel() == ours
        assert logging.getLogger("pyroute2").getEffectiveLevel() == libraries
    finally:
        for n, saved_level in saved.items():
            logging.getLogger(n).setLevel(saved_level)


# --- one pyflanneld per API socket; names from this host only -------------------------------------------------------

class PublishingDaemon:
    """The API's daemon side: Daemon.publish itself, over a name book that records what it is handed."""
    publish = Daemon.publish

    def __init__(self, host: str | None):
        self.host = host
        self.handed: list = []  # each set of containers the name book was handed
        self.names = SimpleNamespace(publish=self.handed.append)

    def describe(self) -> list:
        return [{"name": "default", "state": "ready"}]


def test_a_second_server_on_a_live_socket_is_refused_and_the_first_still_answers(tmp_path):
    path = str(tmp_path / "pyflanneld.sock")
    first = api.serve(PublishingDaemon("net:[1]"), path)
    try:
        with pytest.raises(UserError, match=rf"^another pyflanneld answers on {re.escape(path)}: give this one "
                                            r"another -api-socket$"):
            api.serve(PublishingDaemon("net:[1]"), path)
        assert localapi.Client(path).networks() == [{"name": "default", "state": "ready"}]
    finally:
        first.shutdown()
        first.server_close()


def test_a_socket_nobody_answers_on_is_taken_over(tmp_path):
    path = str(tmp_path / "pyflanneld.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:  # a killed daemon's: bound, nobody listening
        left.bind(path)
    server = api.serve(PublishingDaemon("net:[1]"), path)
    try:
        assert localapi.Client(path).networks()
    finally:
        server.shutdown()
        server.server_close()


def test_names_from_another_host_are_refused_with_409(tmp_path):
    path = str(tmp_path / "pyflanneld.sock")
    daemon = PublishingDaemon("net:[4026531840]")
    server = api.serve(daemon, path)
    container = {"id": "c1", "networks": {"": {"address": "10.5.1.2", "names": ["web"]}}}
    try:
        client = localapi.Client(path)
        client.publish([container], "net:[4026531840]")
        client.publish([container])  # an older driver, which says no host: taken
        with pytest.raises(localapi.DaemonError) as refused:
            client.publish([container], "net:[4026532999]")
        assert refused.value.status == 409
        assert "names published from another host (network namespace net:[4026532999]; this pyflanneld runs in " \
               "net:[4026531840])" in str(refused.value) and "-api-socket" in str(refused.value)
        with pytest.raises(localapi.DaemonError) as bad:
            client._call("PUT", "/v1/names", {"containers": [], "host": 5})
        assert bad.value.status == 400
    finally:
        server.shutdown()
        server.server_close()
    assert len(daemon.handed) == 2 and daemon.handed[0][0].networks == {"default": ("10.5.1.2", ("web",))}


def test_the_publisher_says_which_host_and_logs_a_refusal_once(caplog, monkeypatch):
    class RefusingDaemon:
        def __init__(self):
            self.hosts = []

        def publish(self, containers, host):
            self.hosts.append(host)
            raise localapi.DaemonError("pyflanneld: names published from another host (...)", 409)

    daemon = RefusingDaemon()
    publisher = NamePublisher("unix:///nowhere.sock", state=None, daemon=daemon)
    assert publisher.host == localapi.host_identity() and publisher.host.startswith("net:[")
    monkeypatch.setattr("pyflannel.driver.publisher.containers_of", lambda client, networks: [])
    monkeypatch.setattr(publisher, "_client", lambda: None)
    publisher.state = SimpleNamespace(load=DriverState)
    monkeypatch.setattr("pyflannel.driver.publisher.RETRY_SECONDS", 0.0)
    monkeypatch.setattr("pyflannel.driver.publisher.SETTLE_SECONDS", 0.0)
    rounds = iter(range(3))
    monkeypatch.setattr(publisher.changed, "wait", lambda timeout: next(rounds))  # three rounds, then StopIteration
    with caplog.at_level(logging.DEBUG, logger="pyflannel.driver.publisher"), pytest.raises(StopIteration):
        publisher._send()
    assert daemon.hosts == [publisher.host] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["names not published: pyflanneld: names published from another host (...)"]
