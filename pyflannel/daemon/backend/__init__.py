"""Data-plane backends behind one small interface; `for_config` picks the one the network config names."""
from __future__ import annotations

from .base import Backend
from .hostgw import HostGwBackend
from .vxlan import VxlanBackend
from .wireguard import WireGuardBackend

BACKENDS = {cls.type: cls for cls in (VxlanBackend, HostGwBackend, WireGuardBackend)}


def for_config(config, ext, kernel, state_dir) -> Backend:
    return BACKENDS[config.backend_type](config, ext, kernel, state_dir)


__all__ = ["Backend", "for_config", "BACKENDS"]
