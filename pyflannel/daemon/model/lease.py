"""A lease, as every part of pyflanneld sees it: the value under `<prefix>/subnets/`, and its change as a watch
reports it. (The manager that acquires and renews ours is daemon/lease.py.)"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..subnets import IPv4Network, IPv6Network, lease_key

# The expiration of a lease that has a TTL which the store did not read (pyflanneld does not need its peers'
# expirations, and etcd v3 costs one request per etcd lease to read them).
EXPIRY_NOT_READ = datetime.max.replace(tzinfo=timezone.utc)


@dataclass(slots=True)
class Lease:
    """One host's lease: an IPv4 subnet (its identity: flannel's keys always begin with one) and, on a dual-stack
    network, an IPv6 subnet with the host's IPv6 attributes."""
    subnet: IPv4Network
    public_ip: str
    backend_type: str
    backend_data: dict | None = None
    expiration: datetime | None = None  # None: no TTL, an admin reservation
    extra: dict = field(default_factory=dict)  # attributes we do not interpret, kept on rewrite
    ipv6_subnet: IPv6Network | None = None
    public_ipv6: str | None = None
    backend_v6_data: dict | None = None

    @property
    def key(self) -> str:
        """The key's last part: '10.5.34.0-24', or '10.5.34.0-24&fd00:5:0:27::-64' with an IPv6 subnet."""
        return lease_key(self.subnet, self.ipv6_subnet)

    @property
    def vtep_mac(self) -> str | None:
        return (self.backend_data or {}).get("VtepMAC")

    @property
    def vtep_mac_v6(self) -> str | None:
        return (self.backend_v6_data or {}).get("VtepMAC")

    def attrs_json(self) -> str:
        """The value in flannel's key order, PublicIPv6 and BackendV6Data only when there are some. (flannel's
        LeaseAttrs writes a nil PublicIPv6 as null; Go reads an absent one as the same nil, and v0.13, which has no
        such field, ignores it either way. A lease read with null is rewritten without it.)"""
        value = {"PublicIP": self.public_ip}
        if self.public_ipv6 is not None:
            value["PublicIPv6"] = self.public_ipv6
        value.update(BackendType=self.backend_type, BackendData=self.backend_data)
        if self.backend_v6_data is not None:
            value["BackendV6Data"] = self.backend_v6_data
        value.update({k: v for k, v in self.extra.items() if k not in value})
        return json.dumps(value, separators=(",", ":"))

    @classmethod
    def from_attrs(cls, subnet: IPv4Network, text: str, expiration: datetime | None,
                   ipv6_subnet: IPv6Network | None = None) -> "Lease":
        """Parse a lease value; raises ValueError on a value no flannel would write."""
        attrs = json.loads(text)
        if not isinstance(attrs, dict) or not isinstance(attrs.get("PublicIP"), str):
            raise ValueError("lease value has no PublicIP")
        data, data6 = attrs.get("BackendData"), attrs.get("BackendV6Data")
        if data is not None and not isinstance(data, dict) or data6 is not None and not isinstance(data6, dict):
            raise ValueError("lease BackendData or BackendV6Data is not an object")
        public_ipv6 = attrs.get("PublicIPv6")
        if public_ipv6 is not None and not isinstance(public_ipv6, str):
            raise ValueError("lease PublicIPv6 is not a string")
        known = {"PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"}
        return cls(subnet, attrs["PublicIP"], attrs.get("BackendType") or "vxlan", data, expiration,
                   {k: v for k, v in attrs.items() if k not in known}, ipv6_subnet, public_ipv6, data6)


@dataclass(frozen=True)
class LeaseEvent:
    """A lease added (or changed: added again) or removed, as a watch or a re-listing reports it."""
    ADDED = "added"
    REMOVED = "removed"
    kind: str
    lease: Lease
    revision: int = 0  # the store's position of the change (v2 index, v3 revision); 0: found by a re-listing
