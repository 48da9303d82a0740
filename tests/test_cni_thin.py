"""The thin CNI client's own logic: where the daemon socket is, and the request it sends."""
import json
import os

import pytest

from pyflannel.cni import thin

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("config, expected", [
    ({"name": "x"}, thin.DAEMON_SOCKET),
    ({"name": "x", "daemonSocket": "/tmp/a b/pyflanneld.sock"}, "/tmp/a b/pyflanneld.sock"),
    ({"name": "x", "daemonSocket": "/tmp/quote\"d.sock"}, "/tmp/quote\"d.sock"),   # escapes: the json module reads it
    ({"name": "x", "daemonSocket": ""}, thin.DAEMON_SOCKET),
    ({"name": "x", "daemonSocket": 7}, thin.DAEMON_SOCKET),
])
def test_daemon_socket_from_the_config(config, expected):
    for separators in ((",", ":"), (", ", ": ")):
        assert thin.daemon_socket(json.dumps(config, separators=separators).encode()) == expected
    assert thin.daemon_socket(b"{not json") == thin.DAEMON_SOCKET


def test_the_request_carries_the_cni_environment_and_the_config(monkeypatch):
    for name in [n for n in os.environ if n.startswith("CNI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CNI_COMMAND", "ADD")
    monkeypatch.setenv("CNI_ARGS", "K8S_POD_NAME=a;IgnoreUnknown=1")
    monkeypatch.setenv("HOME", "/root")
    head, _, body = thin.request(b'{"name": "x"}').partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/cni HTTP/1.0" and "Content-Length: 13" in lines and body == b'{"name": "x"}'
    assert {"CNI-Env: CNI_COMMAND=ADD", "CNI-Env: CNI_ARGS=K8S_POD_NAME=a;IgnoreUnknown=1"} <= set(lines)
    assert not any("HOME" in line for line in lines)
    monkeypatch.setenv("CNI_ARGS", "a\nb")
    assert thin.request(b"{}") is None  # cannot travel in a header: the plugin runs in-process
