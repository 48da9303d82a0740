"""Network namespaces: open one by path, and run netlink inside one (this thread only)."""
from __future__ import annotations

import contextlib
import os

from pyroute2.iproute import IPRoute
from pyroute2 import netns as pr_netns

from .errors import KernelError


class NamespaceMissing(KernelError):
    """The namespace path cannot be opened."""


@contextlib.contextmanager
def opened(path: str):
    """A file descriptor of the namespace at `path` (e.g. /proc/<pid>/ns/net), closed afterwards."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NamespaceMissing(f"cannot open the network namespace {path}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def netlink(fd: int | None = None):
    """A netlink socket in the namespace `fd` (None: this thread's); the thread switches there for the block."""
    if fd is None:
        with IPRoute() as ipr:
            yield ipr
        return
    pr_netns.pushns(fd)
    try:
        with IPRoute() as ipr:
            yield ipr
    finally:
        pr_netns.popns()
