"""systemd's notification protocol as pyflanneld speaks it: datagrams on a real AF_UNIX socket, at a path or an
abstract address; nothing without NOTIFY_SOCKET; WATCHDOG=1 at half WATCHDOG_USEC, only for our PID and while
alive. (READY=1 and STOPPING=1 from a running pyflanneld: tests/test_daemon_cli.py.)"""
import os
import socket
import threading
import time

import pytest

from pyflannel.daemon import notify

pytestmark = pytest.mark.unit


@pytest.fixture
def systemd(tmp_path, monkeypatch):
    """systemd's end: a datagram socket at a path, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(name, raising=False)
        yield s


def test_a_message_is_one_datagram(systemd):
    assert notify.notify("READY=1\nSTATUS=lease 10.5.34.0/24")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=lease 10.5.34.0/24"


def test_abstract_address(monkeypatch):
    name = f"pyflannel-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("STOPPING=1")
        assert s.recv(4096) == b"STOPPING=1"


def test_nothing_without_notify_socket_or_when_nobody_listens(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not notify.notify("READY=1")
    assert "cannot tell systemd READY=1" in caplog.text


def test_watchdog_sends_at_half_the_timeout_while_alive(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 0.1
    alive, stop = threading.Event(), threading.Event()
    alive.set()
    thread = notify.start_watchdog(alive.is_set, stop)
    try:
        started = time.monotonic()
        assert systemd.recv(4096) == b"WATCHDOG=1" and systemd.recv(4096) == b"WATCHDOG=1"
        assert time.monotonic() - started >= 0.15
        alive.clear()
        time.sleep(0.15)  # a datagram sent before the clear may still come
        systemd.setblocking(False)
        while True:
            try:
                systemd.recv(4096)
            except BlockingIOError:
                break
        time.sleep(0.3)
        with pytest.raises(BlockingIOError):  # stuck: silence, and systemd restarts us
            systemd.recv(4096)
    finally:
        stop.set()
        thread.join(2)
    assert not thread.is_alive()


def test_no_watchdog_for_another_pid_or_without_timeout(systemd, monkeypatch):
    assert notify.start_watchdog(lambda: True, threading.Event()) is None
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.start_watchdog(lambda: True, threading.Event()) is None
