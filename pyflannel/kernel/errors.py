"""The kernel layer's one error type: neutral, so the driver can answer Docker with it and the CNI plugin its
runtime, each in its own terms (`reraised_as`)."""
from __future__ import annotations

import functools
from typing import Callable


class KernelError(Exception):
    """The kernel (netlink) or iptables refused or could not do something; the message names what."""


def reraised_as(make: Callable[[Callable, KernelError], Exception]):
    """A decorator: a KernelError out of the function leaves it as `make(function, error)`."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KernelError as e:
                raise make(fn, e) from None
        return wrapper
    return decorate
