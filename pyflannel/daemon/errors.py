"""Errors a user sees as one clear line (no traceback): the daemon's main() prints them and exits 1."""


class UserError(Exception):
    """Something the user must fix: a flag, the etcd config, the host's interfaces or kernel."""


class ConfigError(UserError):
    """The network config in etcd is invalid; the message names the field and the value."""

    def __init__(self, field: str, value, reason: str):
        super().__init__(f"network config: {field}={value!r}: {reason}")
        self.field = field


class Stopped(Exception):
    """The daemon was told to stop (SIGTERM, SIGINT): whatever was about to start is not started."""


class NoFreeSubnet(UserError):
    """Every subnet between SubnetMin and SubnetMax is leased."""
