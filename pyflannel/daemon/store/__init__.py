"""Lease stores: one implementation per etcd API behind the Store interface, and the -etcd-api choice.

Each API's client is imported only when that API is used; -etcd-api auto tries v3 first."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

from pyflannel.imports import deferred, standing_in

with standing_in("importlib.metadata", deferred("importlib.metadata", calls=("version",))):
    import urllib3  # noqa: F401 (both APIs' clients use it; its optional HTTP/2 support checks h2's version with
    # importlib.metadata at import, which this leaves out)

from ..model.lease import Lease
from .base import ConfigNotFound, KeyChange, LeaseDigest, Store, StoreError

log = logging.getLogger(__name__)

ETCD_APIS = ("auto", "v2", "v3")


def from_flags(flags, timeout: float = 5.0, peer_expiry: bool = True) -> Store:
    """The store the -etcd-* flags describe (pyflanneld's, and `pyflannel status` / `doctor`'s).

    peer_expiry=False leaves leases' expirations unread where reading costs a request each (etcd v3): pyflanneld
    learns its own lease's expiration when it writes it."""
    kw = dict(certfile=flags.etcd_certfile, keyfile=flags.etcd_keyfile, cafile=flags.etcd_cafile,
              username=flags.etcd_username, password=flags.etcd_password, timeout=timeout)
    api = flags.etcd_api
    if api not in ETCD_APIS:
        raise ValueError(f"-etcd-api: {api!r} is not one of {', '.join(ETCD_APIS)}")
    def v2() -> Store:
        from .etcdv2 import EtcdV2Store
        return EtcdV2Store(flags.etcd_endpoints, flags.etcd_prefix, **kw)

    def v3() -> Store:
        from .etcdv3 import EtcdV3Store
        return EtcdV3Store(flags.etcd_endpoints, flags.etcd_prefix, read_expiry=peer_expiry, **kw)
    if api != "auto":
        return v2() if api == "v2" else v3()
    return DetectedStore(v2, v3)


class DetectedStore(Store):
    """-etcd-api auto: the API in which <prefix>/config exists, v3 first; while neither has it, v3 (as flannel >= 0.18).

    The choice is made by the first call that finds the config, and then kept. Each API's store is made (and its
    client imported) when it is first asked."""

    def __init__(self, make_v2: Callable[[], Store], make_v3: Callable[[], Store]):
        self._make = {"v2": make_v2, "v3": make_v3}
        self.chosen: Store | None = None

    @functools.cached_property
    def v2(self) -> Store:
        return self._make["v2"]()

    @functools.cached_property
    def v3(self) -> Store:
        return self._make["v3"]()

    def store(self) -> Store:
        if self.chosen is not None:
            return self.chosen
        v3_error = None
        for api in ("v3", "v2"):
            candidate = getattr(self, api)
            try:
                candidate.network_config()
            except ConfigNotFound:
                continue
            except StoreError as e:
                # v3 failing: etcd is down, unless the config is in v2 (etcd 2, a broken gateway);
                # v2 failing: its API is off (etcd >= 3.5's default)
                if candidate is self.v3:
                    v3_error = e
                continue
            log.info("etcd API %s: %s/config found there", api, candidate.prefix)
            self.chosen = candidate
            return candidate
        if v3_error:
            raise v3_error
        return self.v3

    def network_config(self) -> str:
        return self.store().network_config()

    def leases(self) -> tuple[list[Lease], int]:
        return self.store().leases()

    def lease_digest(self) -> LeaseDigest:
        return self.store().lease_digest()

    def write_lease(self, lease: Lease, ttl: int | None, must_exist: bool, expected: str | None = None) -> Lease:
        return self.store().write_lease(lease, ttl, must_exist, expected)

    def delete_lease(self, lease: Lease) -> None:
        self.store().delete_lease(lease)

    def current_position(self) -> int:
        return self.store().current_position()

    def stream(self, position: int, idle: float) -> Iterator[list[KeyChange]]:
        return self.store().stream(position, idle)

    def watch_views(self) -> list[Store]:
        return self.store().watch_views()

    def named_configs(self) -> dict[str, str]:
        return self.store().named_configs()

    def create_key(self, key: str, value: str) -> bool:
        return self.store().create_key(key, value)

    def read_key(self, key: str) -> str | None:
        return self.store().read_key(key)

    def delete_key(self, key: str, expected: str) -> None:
        self.store().delete_key(key, expected)

    def replace_key(self, key: str, value: str, expected: str) -> bool:
        return self.store().replace_key(key, value, expected)

    def list_folder(self, folder: str) -> tuple[dict[str, str], int]:
        return self.store().list_folder(folder)

    def put_keys(self, folder: str, items: dict[str, str | None], ttl: int) -> None:
        self.store().put_keys(folder, items, ttl)

    def keep_alive(self, folder: str, ttl: int) -> bool:
        return self.store().keep_alive(folder, ttl)

    def child(self, name: str) -> Store:
        """A named network lives in the API the default network was found in."""
        return self.store().child(name)
