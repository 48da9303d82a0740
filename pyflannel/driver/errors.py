"""The driver's error types and the HTTP status each one is reported with.

Docker shows the "Err" text of a failed call to the user, so every message says what was wrong and, where there is
one, what to do about it. The status tells Docker (and a person reading logs) which kind of failure it was:

    400  ValidationError   the request itself is malformed (names the field)
    409  RefusedError      a well-formed request pyflannel will not carry out (second network, foreign subnet, ...)
    503  UnavailableError  a precondition outside the driver is missing (no subnet.env yet, state lock busy)
    500  PlumbingError     the kernel refused a netlink operation; and any unexpected exception (a real bug)

404 is deliberately never used for "unknown network/endpoint": Docker reads 404 as "the plugin does not implement
this method" and silently ignores the failure for some calls.
"""
from __future__ import annotations

# The name users give `-d` and `--ipam-driver`, as Docker knows the plugin: a legacy plugin by its socket's (or spec
# file's) name, `pyflannel`; the managed plugin by its reference, tag included, `pyflannel:latest` (dockerd 20.10
# knows it by no shorter name). Set once at start (`pyflannel-driver --plugin-name`), before any call is served.
plugin_name = "pyflannel"


def name_plugin(name: str) -> None:
    global plugin_name
    plugin_name = name


def create_command(*options: str) -> str:
    """`docker network create` of a pyflannel network with `options`, as the user types it."""
    return " ".join(("docker network create -d", plugin_name, "--ipam-driver", plugin_name, *options, "NAME"))


class DriverError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(DriverError):
    """A field of the request has the wrong type or value; `field` is its JSON path, e.g. IPv4Data[0].Pool."""

    status = 400

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class RefusedError(DriverError):
    status = 409


class UnavailableError(DriverError):
    status = 503


class PlumbingError(DriverError):
    status = 500
