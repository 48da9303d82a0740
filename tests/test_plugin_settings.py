"""The managed plugin's settings (config.json) against the flags they feed: every pyflanneld flag a plugin can use
and every pyflannel-driver flag is a setting, and the paths the plugin fixes land on the host where the host's own
tools (pyflannel, the CNI thin client) look by default."""
from __future__ import annotations

import json
import re

import pytest

from pyflannel import paths, supervisor
from pyflannel.cni import thin
from pyflannel.daemon import flags
from pyflannel.driver import main as driver_main
from lab import REPO

pytestmark = pytest.mark.unit

CONFIG = json.loads((REPO / "config.json").read_text())
ENV = {e["name"]: e for e in CONFIG["env"]}
MOUNTS = {m["name"]: m for m in CONFIG["mounts"]}
# pyflanneld's files, fixed by the plugin on the host's mounts, and what each is on the host by default
ON_THE_HOST = {"subnet-file": paths.SUBNET_FILE, "api-socket": paths.DAEMON_SOCKET, "state-dir": paths.STATE_DIR}
DRIVER_SOCKET_FLAG = "driver-socket"  # the plugin's driver socket is where dockerd puts it: pyflanneld's default
SET_BY_SUPERVISOR = {"socket", "state-dir", "subnet-file", "daemon-socket", "docker-host"}  # the driver's


def settings_env(overrides: dict | None = None) -> dict:
    """The environment dockerd gives the plugin: config.json's values, `overrides` as `docker plugin set` them."""
    return {name: e["value"] for name, e in ENV.items()} | (overrides or {})


def on_host(plugin_path: str) -> str:
    """A path inside the plugin as the host sees it, through the mount (default source) it lies in."""
    for mount in MOUNTS.values():
        if plugin_path.startswith(mount["destination"] + "/"):
            return mount["source"] + plugin_path[len(mount["destination"]):]
    raise AssertionError(f"{plugin_path} is on no mount of the plugin: invisible on the host")


def test_every_pyflanneld_flag_is_a_plugin_setting():
    expected = {flags.env_name(name) for name, *_ in flags.FLAGS if name != DRIVER_SOCKET_FLAG}
    daemon_settings = {name for name in ENV if name.startswith("FLANNELD_")}
    assert sorted(expected - daemon_settings) == [], "pyflanneld flags the plugin cannot be given"
    assert sorted(daemon_settings - expected) == [], "settings that are no pyflanneld flag"
    fixed = {flags.env_name(name) for name in ON_THE_HOST}
    for name in daemon_settings:
        assert ENV[name]["settable"] == ([] if name in fixed else ["value"]), name


def test_the_plugins_files_are_at_the_host_tools_default_paths():
    for flag, host_default in ON_THE_HOST.items():
        assert on_host(ENV[flags.env_name(flag)]["value"]) == host_default, flag
    assert paths.driver_state_dir(on_host(ENV["FLANNELD_STATE_DIR"]["value"])) == paths.DRIVER_STATE_DIR
    assert thin.DAEMON_SOCKET == paths.DAEMON_SOCKET  # the CNI thin client's copy of the default
    assert all("source" in MOUNTS[name]["settable"] for name in ("host-run", "host-var-lib", "etcd-tls"))
    assert "ro" in MOUNTS["etcd-tls"]["options"]
    assert "rbind" not in MOUNTS["host-var-lib"]["options"], "the host's container mounts under /var/lib stay out"


def test_the_host_command_reads_the_mounts_config_json_has():
    """plugin/pyflannel-host maps the plugin's paths to the host through these mounts, by name and destination."""
    script = (REPO / "plugin" / "pyflannel-host").read_text()
    assert f"TLS_DIR={MOUNTS['etcd-tls']['destination']} " in script
    for name in ("host-run", "host-var-lib", "etcd-tls"):
        assert f'"mount {name} "*)' in script
    run, var_lib = MOUNTS["host-run"]["destination"], MOUNTS["host-var-lib"]["destination"]
    assert ENV["FLANNELD_SUBNET_FILE"]["value"] == f"{run}/flannel/subnet.env"
    assert ENV["FLANNELD_API_SOCKET"]["value"] == f"{run}/flannel/pyflanneld.sock"
    assert ENV["FLANNELD_STATE_DIR"]["value"] == f"{var_lib}/pyflannel"
    for name in ("FLANNELD_SUBNET_FILE", "FLANNELD_API_SOCKET", "FLANNELD_STATE_DIR"):
        assert name in script


def test_every_driver_flag_is_a_plugin_setting(capsys):
    with pytest.raises(SystemExit):
        driver_main.parse_args(["--help"])
    driver_flags = set(re.findall(r"--([a-z][a-z-]*)", capsys.readouterr().out)) - {"help", "version"}
    settings = {name[len(supervisor.DRIVER_SETTING):].lower().replace("_", "-") for name in ENV
                if name.startswith(supervisor.DRIVER_SETTING)}
    assert sorted(driver_flags - SET_BY_SUPERVISOR - settings) == []
    assert sorted(settings - driver_flags) == []
    assert all(ENV[name]["settable"] == ["value"] for name in ENV if name.startswith(supervisor.DRIVER_SETTING))


def test_the_default_settings_start_both_processes_on_the_host_paths():
    env = supervisor.daemon_environment(settings_env())
    daemon = flags.parse([], env)
    assert (daemon.subnet_file, daemon.api_socket, daemon.state_dir) == (
        "/host/run/flannel/subnet.env", "/host/run/flannel/pyflanneld.sock", "/host/var/lib/pyflannel")
    assert daemon.etcd_endpoints == ["http://127.0.0.1:2379"] and daemon.etcd_api == "auto"
    driver = driver_main.parse_args(supervisor.driver_argv(env, paths.DRIVER_SOCKET)[1:])
    assert (driver.state_dir, driver.subnet_file, driver.daemon_socket) == (
        "/host/var/lib/pyflannel/driver", daemon.subnet_file, daemon.api_socket)
    assert (driver.log_level, driver.lease_wait, driver.workers) == ("info", 20.0, 1)
    assert driver.plugin_name == "pyflannel:latest"  # what `docker plugin create pyflannel` registers


def test_settings_given_with_plugin_set_reach_the_flags(tmp_path):
    tls = {name: tmp_path / name for name in ("client.pem", "client.key", "ca.pem")}
    for path in tls.values():
        path.write_text("")
    env = supervisor.daemon_environment(settings_env({
        "FLANNELD_ETCD_CERTFILE": str(tls["client.pem"]), "FLANNELD_ETCD_KEYFILE": str(tls["client.key"]),
        "FLANNELD_ETCD_CAFILE": str(tls["ca.pem"]), "FLANNELD_ETCD_API": "v3", "FLANNELD_PUBLIC_IPV6": "2001:db8::1",
        "FLANNELD_HEALTHZ_IP": "127.0.0.1", "FLANNELD_IFACE": "eth0,eth1", "FLANNELD_V": "2",
        "DRIVER_LOG_LEVEL": "debug", "DRIVER_LEASE_WAIT": "3", "DRIVER_THREADS": "8"}))
    daemon = flags.parse([], env)
    assert daemon.etcd_certfile == str(tls["client.pem"]) and daemon.etcd_cafile == str(tls["ca.pem"])
    assert (daemon.etcd_api, daemon.public_ipv6, daemon.healthz_ip, daemon.iface, daemon.v) == (
        "v3", "2001:db8::1", "127.0.0.1", ["eth0", "eth1"], 2)
    driver = driver_main.parse_args(supervisor.driver_argv(env, paths.DRIVER_SOCKET)[1:])
    assert (driver.log_level, driver.lease_wait, driver.threads, driver.workers) == ("debug", 3.0, 8, 1)
