"""systemd's service notifications (sd_notify(3)) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

Under `Type=notify` systemd counts pyflanneld as started at READY=1, which is sent once the default network's lease
is held and its kernel programmed: units ordered after pyflanneld (the driver, dockerd) find subnet.env. With
`WatchdogSec=`, systemd sets WATCHDOG_USEC and expects WATCHDOG=1 within it; pyflanneld sends it only while its main
loop is alive (/healthz's test), so a stuck daemon is restarted. Without NOTIFY_SOCKET every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

log = logging.getLogger(__name__)


def _address() -> str | None:
    """$NOTIFY_SOCKET as a socket address: a path, or '@name' for an abstract socket (a leading NUL byte)."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if where.startswith("@"):
        return "\0" + where[1:]
    return where if where.startswith("/") else None


def notify(state: str) -> bool:
    """Send `state` (newline-separated assignments: "READY=1\\nSTATUS=..."); False when not sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("cannot tell systemd %s on %s: %s", state.replace("\n", ", "), os.environ["NOTIFY_SOCKET"],
                    e.strerror or e)
        return False


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 (half systemd's timeout), or None when systemd watches no process of ours."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or _address() is None or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


def start_watchdog(alive: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
    """A thread sending WATCHDOG=1 at half systemd's timeout while `alive()`, until `stop` is set or a send fails."""
    interval = watchdog_interval()
    if interval is None:
        return None

    def keep_alive():
        while not stop.wait(interval):
            if alive() and not notify("WATCHDOG=1"):
                return

    thread = threading.Thread(target=keep_alive, name="watchdog", daemon=True)
    thread.start()
    return thread
