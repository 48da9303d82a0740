"""Serving the plugin socket with gunicorn, so that no Docker call fails because the driver restarted.

dockerd's plugin client (moby pkg/plugins) keeps idle connections open for ever and, when a call fails on one that
was reset, retries after 1 s with the request body already consumed: the retry arrives empty. Three rules keep a
restart from ever doing that:

- One call per connection: every reply says `Connection: close` (gunicorn keepalive 0), so dockerd never reuses a
  connection that a restarting driver could reset under it. A connect that fails (no socket, nobody listening) is
  retried by dockerd with its body intact.
- A worker whose master is gone stops taking calls at once: the kernel signals it when the master dies
  (PR_SET_PDEATHSIG); it unlinks the socket path (new connects fail cleanly and are retried), answers the calls
  already queued on its socket for DRAIN_SECONDS, finishes those in flight, and exits. A SIGTERM does the same.
- One driver per state dir: the master holds an flock on <state-dir>/driver.lock, inherited by its workers, so a
  new driver waits for the previous one's last worker before it binds the socket.
Under systemd socket activation (pyflannel-driver.socket) the listening socket outlives the driver: it is never
unlinked, and calls made while the driver restarts wait in it for the next one.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
import time

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

SOCKET_MODE = 0o660
INSTANCE_LOCK = "driver.lock"
GRACEFUL_SECONDS = 5   # calls in flight at a stop get this long to finish
DRAIN_SECONDS = 0.2    # a stopping worker keeps accepting the connections already queued on its socket this long
PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


class StartupError(Exception):
    pass


def socket_activated() -> bool:
    """systemd passed us the listening socket (LISTEN_FDS for this PID); gunicorn serves on it."""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0") or 0) > 0


def claim_instance(state_dir: str, wait: float) -> int:
    """Take <state-dir>/driver.lock, waiting up to `wait` s for a previous driver's workers to finish; return the fd.

    The fd must stay open for the life of the process (its workers inherit it, and with it the lock)."""
    path = os.path.join(os.path.abspath(state_dir), INSTANCE_LOCK)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StartupError(f"cannot open {path}: {e.strerror}") from None
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise StartupError(f"cannot lock {path}: {e.strerror}") from None
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        if time.monotonic() >= deadline:
            os.close(fd)
            raise StartupError(f"another pyflannel-driver (pid {holder}) still serves state dir {state_dir} after "
                               f"{wait:.0f}s: stop it first")
        if not waiting:
            log.info("waiting for the previous driver (pid %s) to finish its calls", holder)
            waiting = True
        time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_socket_path(path: str) -> None:
    """Make the socket's folder; remove a socket file nobody listens on (a driver that was killed)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create socket folder {folder}: {e.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket: remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale socket of a driver that is gone
        return
    finally:
        probe.close()
    raise StartupError(f"another process is already serving on {path}: stop it first")


def _secure_socket(path: str) -> None:
    os.chmod(path, SOCKET_MODE)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


class DriverWorker(ThreadWorker):
    """gunicorn's threaded worker, stopped the way the module docstring says (master gone, or SIGTERM)."""

    activated = False  # set in the master before the workers fork: the socket is systemd's, never unlinked

    def init_process(self):
        self._stopping = False
        self._socket_path, self._socket_inode = None, None
        for listener in [] if self.activated else self.sockets:
            path = listener.getsockname()
            if isinstance(path, str) and path:
                self._socket_path, self._socket_inode = path, _inode(path)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            self.log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
        super().init_process()  # runs the worker loop

    def run(self):
        if os.getppid() != self.ppid:  # the master died before prctl took effect
            self._begin_stop()
        super().run()

    def handle_exit(self, sig, frame):
        self._begin_stop(signal.Signals(sig).name)

    def is_parent_alive(self):
        if os.getppid() != self.ppid:
            self._begin_stop()
        return True  # the loop ends when the drain timer clears `alive`

    def _begin_stop(self, signame: str | None = None) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._socket_path and _inode(self._socket_path) == self._socket_inode:
            try:
                os.unlink(self._socket_path)
            except OSError:
                pass
        why = "the driver's master process is gone" if os.getppid() != self.ppid else signame
        self.log.info("worker %d stopping (%s): no new connections; answering queued and in-flight calls",
                      os.getpid(), why)
        drain = threading.Timer(DRAIN_SECONDS, ThreadWorker.handle_exit, (self, signal.SIGTERM, None))
        drain.daemon = True
        drain.start()


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def build_server(app, socket_path: str, *, workers: int, threads: int, timeout: int, log_level: str,
                 in_worker=None):
    """`in_worker()` runs in each worker once it is set up: the place for background threads (the master forks
    workers, so it keeps no threads of its own; and a master killed outright must look the same to its workers)."""
    socket_path = os.path.abspath(socket_path)
    DriverWorker.activated = socket_activated()

    class DriverServer(BaseApplication):
        def load_config(self):
            options = {
                "bind": [f"unix:{socket_path}"],
                "workers": workers,
                "threads": threads,
                "worker_class": DriverWorker,
                "timeout": timeout,
                "graceful_timeout": GRACEFUL_SECONDS,
                "keepalive": 0,          # one call per connection: see the module docstring
                "umask": 0o117,          # the socket is created 0660
                "loglevel": log_level,
                "errorlog": "-",
                "accesslog": None,
                "proc_name": "pyflannel-driver",
                "when_ready": lambda server: None if DriverWorker.activated else _secure_socket(socket_path),
                "post_worker_init": lambda worker: in_worker() if in_worker is not None else None,
                "control_socket_disable": True,  # gunicorn >= 24 would otherwise open a control socket
            }
            for key, value in options.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return app

    return DriverServer()
