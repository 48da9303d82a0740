"""Whether a host port is free: a bind() says what the kernel says, whoever holds the port."""
from __future__ import annotations

import errno
import socket

TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def in_use(proto: str, host_ip: str, port: int) -> bool:
    """True if a socket of this namespace holds `port` (tcp or udp) on `host_ip` (IPv4 or IPv6; "" for any
    address)."""
    kind = TYPES.get(proto)
    if kind is None:  # sctp: the kernel may lack it; iptables rules alone decide
        return False
    with socket.socket(socket.AF_INET6 if ":" in host_ip else socket.AF_INET, kind) as s:
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False
