"""WireGuard devices and their peers, one interface for both implementations:

- the kernel's module, through pyroute2 (rtnetlink for the link, its generic-netlink WireGuard for keys and peers);
- userspace wireguard-go (a Debian package) when the kernel has no module: it runs the device as a TUN and is
  configured over its UAPI socket, /var/run/wireguard/<device>.sock (WireGuard's cross-platform text protocol).

`open_device` tries the module first and falls back to wireguard-go, so the choice is automatic; the device says
which it is (`implementation`). Keys are what `wg` prints: base64 of 32 bytes.
"""
from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from pyroute2.netlink.generic.wireguard import WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from .errors import KernelError
from .netlink import Change, Kernel

log = logging.getLogger(__name__)

UAPI_DIR = "/var/run/wireguard"  # wireguard-go's own choice, fixed in its code
KEY_BYTES = 32
START_SECONDS = 5.0
UAPI_SECONDS = 5.0
NO_KEY = "0" * 64  # UAPI's hex of an unset preshared key


@dataclass(frozen=True)
class WireGuardPeer:
    """One peer of a device: who it is, where it is, which inner addresses it may send and receive."""
    public_key: str
    endpoint: str                  # "ip:port"
    allowed_ips: tuple[str, ...]   # CIDRs
    keepalive: int = 0             # seconds; 0: off
    preshared_key: str | None = None


# --- keys ---------------------------------------------------------------------------------------------------------
def key_problem(text) -> str | None:
    """Why `text` is not a WireGuard key (base64 of 32 bytes), or None."""
    try:
        if isinstance(text, str) and len(base64.b64decode(text, validate=True)) == KEY_BYTES:
            return None
    except (binascii.Error, ValueError):
        pass
    return "not a WireGuard key (base64 of 32 bytes, as `wg genkey` or `wg genpsk` prints)"


def generate_private_key() -> str:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def public_key_of(private_key: str) -> str:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


# --- devices ------------------------------------------------------------------------------------------------------
class Device(abc.ABC):
    implementation: str

    def __init__(self, kernel: Kernel, name: str, index: int):
        self.kernel = kernel
        self.name = name
        self.index = index

    @abc.abstractmethod
    def configure(self, private_key: str, listen_port: int | None = None) -> None:
        """Set the device's private key (and UDP port); peers stay."""

    @abc.abstractmethod
    def peers(self) -> set[WireGuardPeer]:
        """The device's peers as they are now."""

    @abc.abstractmethod
    def apply(self, changes: list[Change]) -> list[tuple[Change, OSError]]:
        """Add (or update) and remove peers; returns those refused, each with its error."""

    def delete(self) -> None:
        """Delete the link (wireguard-go exits when its TUN goes)."""
        index = self.kernel.link_index(self.name)
        if index is not None:
            self.kernel.delete_link(index)


class KernelDevice(Device):
    implementation = "kernel module"

    def _set(self, **kwargs) -> None:
        with WireGuard() as wg:
            wg.set(self.name, **kwargs)

    def configure(self, private_key: str, listen_port: int | None = None) -> None:
        try:
            self._set(private_key=private_key, listen_port=listen_port)
        except NetlinkError as e:
            raise KernelError(f"configuring {self.name}: {e}") from None

    def peers(self) -> set[WireGuardPeer]:
        found = set()
        try:
            with WireGuard() as wg:
                for msg in wg.info(self.name):
                    for peer in msg.get("WGDEVICE_A_PEERS") or ():
                        found.add(_peer_from_genl(peer))
        except NetlinkError as e:
            raise KernelError(f"reading {self.name}: {e}") from None
        return found

    def apply(self, changes: list[Change]) -> list[tuple[Change, OSError]]:
        refused = []
        for change in changes:
            try:
                self._set(peer=_genl_peer(change))
            except NetlinkError as e:
                if change.add or e.code != errno.ENOENT:
                    refused.append((change, OSError(e.code, os.strerror(e.code))))
        return refused


def _genl_peer(change: Change) -> dict:
    peer: WireGuardPeer = change.entry
    if not change.add:
        return {"public_key": peer.public_key, "remove": True}
    addr, port = peer.endpoint.rsplit(":", 1)
    wanted = {"public_key": peer.public_key, "endpoint_addr": addr, "endpoint_port": int(port),
              "persistent_keepalive": peer.keepalive, "replace_allowed_ips": True, "allowed_ips": list(peer.allowed_ips)}
    if peer.preshared_key:
        wanted["preshared_key"] = peer.preshared_key
    return wanted


def _value(nla, name):
    value = nla.get(name)
    return value.get("value", value) if isinstance(value, dict) else value


def _peer_from_genl(peer) -> WireGuardPeer:
    endpoint = peer.get("WGPEER_A_ENDPOINT") or {}
    psk = _value(peer, "WGPEER_A_PRESHARED_KEY")
    psk = psk.decode() if isinstance(psk, bytes) else psk
    key = _value(peer, "WGPEER_A_PUBLIC_KEY")
    return WireGuardPeer(key.decode() if isinstance(key, bytes) else key,
                         f"{endpoint.get('addr')}:{endpoint.get('port')}",
                         tuple(sorted(a.get("addr") for a in peer.get("WGPEER_A_ALLOWEDIPS") or ())),
                         peer.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                         None if not psk or psk == base64.b64encode(bytes(KEY_BYTES)).decode() else psk)


class UserspaceDevice(Device):
    implementation = "wireguard-go (userspace)"

    @property
    def socket_path(self) -> str:
        return uapi_path(self.name)

    def configure(self, private_key: str, listen_port: int | None = None) -> None:
        lines = [f"private_key={_hex(private_key)}"] + ([f"listen_port={listen_port}"] if listen_port else [])
        code = uapi_call(self.socket_path, "set=1", lines)[0]
        if code:
            raise KernelError(f"configuring {self.name} through {self.socket_path}: {os.strerror(code)}")

    def peers(self) -> set[WireGuardPeer]:
        code, pairs = uapi_call(self.socket_path, "get=1", [])
        if code:
            raise KernelError(f"reading {self.name} through {self.socket_path}: {os.strerror(code)}")
        return _peers_from_uapi(pairs)

    def apply(self, changes: list[Change]) -> list[tuple[Change, OSError]]:
        """All changes in one request; if it is refused, one by one to name those at fault."""
        if not changes:
            return []
        code = uapi_call(self.socket_path, "set=1", [line for c in changes for line in _uapi_peer(c)])[0]
        if not code:
            return []
        refused = []
        for change in changes:
            code = uapi_call(self.socket_path, "set=1", _uapi_peer(change))[0]
            if code:
                refused.append((change, OSError(code, os.strerror(code))))
        return refused


def uapi_path(name: str) -> str:
    return os.path.join(UAPI_DIR, f"{name}.sock")


def uapi_call(path: str, operation: str, lines: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """One UAPI exchange: (errno the device answered, the key=value pairs before it). OSError if it cannot be
    reached."""
    request = "\n".join([operation, *lines]) + "\n\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(UAPI_SECONDS)
        sock.connect(path)
        sock.sendall(request.encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    pairs = [tuple(line.split("=", 1)) for line in data.decode().splitlines() if "=" in line]
    code = next((int(v) for k, v in pairs if k == "errno"), errno.EIO)
    return code, [(k, v) for k, v in pairs if k != "errno"]


def _uapi_peer(change: Change) -> list[str]:
    peer: WireGuardPeer = change.entry
    lines = [f"public_key={_hex(peer.public_key)}"]
    if not change.add:
        return lines + ["remove=true"]
    lines += [f"endpoint={peer.endpoint}", f"persistent_keepalive_interval={peer.keepalive}",
              f"preshared_key={_hex(peer.preshared_key) if peer.preshared_key else NO_KEY}",
              "replace_allowed_ips=true"]
    return lines + [f"allowed_ip={cidr}" for cidr in peer.allowed_ips]


def _peers_from_uapi(pairs: list[tuple[str, str]]) -> set[WireGuardPeer]:
    peers, current = set(), None

    def done():
        if current is not None:
            peers.add(WireGuardPeer(current["key"], current.get("endpoint", ""), tuple(sorted(current["ips"])),
                                    current.get("keepalive", 0), current.get("psk")))

    for key, value in pairs:
        if key == "public_key":
            done()
            current = {"key": _b64(value), "ips": []}
        elif current is None:
            continue  # the device's own settings come first
        elif key == "endpoint":
            current["endpoint"] = value
        elif key == "allowed_ip":
            current["ips"].append(value)
        elif key == "persistent_keepalive_interval":
            current["keepalive"] = int(value)
        elif key == "preshared_key" and value != NO_KEY:
            current["psk"] = _b64(value)
    done()
    return peers


def _answers(path: str) -> bool:
    try:
        return uapi_call(path, "get=1", [])[0] == 0
    except OSError:
        return False


# --- opening ------------------------------------------------------------------------------------------------------
def existing_device(kernel: Kernel, name: str) -> Device | None:
    """The WireGuard device `name` if it exists and works: a kernel one, or a TUN whose wireguard-go answers."""
    index = kernel.link_index(name)
    if index is None:
        return None
    kind = kernel.link_kind(index)
    if kind == "wireguard":
        return KernelDevice(kernel, name, index)
    if kind == "tun" and _answers(uapi_path(name)):
        return UserspaceDevice(kernel, name, index)
    return None


def open_device(kernel: Kernel, name: str, mtu: int, log_path: str) -> Device:
    """The WireGuard device `name`, adopted if it exists and works, else created: by the kernel's module, or by
    wireguard-go (its output goes to `log_path`) when the kernel has none. MTU set, link up."""
    device = existing_device(kernel, name)
    index = kernel.link_index(name)
    if device is None and index is not None:
        log.info("replacing %s: a %s device without a working WireGuard behind it", name, kernel.link_kind(index))
        kernel.delete_link(index)
    if device is None:
        device = _create(kernel, name, log_path)
    else:
        log.info("reusing %s (%s)", name, device.implementation)
    if kernel.link(device.index).get("IFLA_MTU") != mtu:
        kernel.set_mtu(device.index, mtu)
    kernel.set_up(device.index)
    return device


def _create(kernel: Kernel, name: str, log_path: str) -> Device:
    try:
        kernel.ipr.link("add", ifname=name, kind="wireguard")
    except NetlinkError as e:
        if e.code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
            raise KernelError(f"cannot create {name}: {e}") from None
        log.info("the kernel has no WireGuard module: running %s with wireguard-go", name)
        return UserspaceDevice(kernel, name, _start_wireguard_go(kernel, name, log_path))
    log.info("created %s (kernel WireGuard)", name)
    return KernelDevice(kernel, name, kernel.link_index(name))


def _start_wireguard_go(kernel: Kernel, name: str, log_path: str) -> int:
    """Start wireguard-go for `name` in its own session (it outlives a restart of ours, so traffic goes on), and
    wait for its device and UAPI socket."""
    exe = shutil.which("wireguard-go")
    if exe is None:
        raise KernelError("the kernel has no WireGuard module and wireguard-go is not installed: "
                          "`apt install wireguard-go`, or load the module (`modprobe wireguard`)")
    path = uapi_path(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a killed wireguard-go
    with open(log_path, "ab") as out:
        process = subprocess.Popen([exe, "-f", name], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}, start_new_session=True)
    threading.Thread(target=process.wait, name=f"reap-{name}", daemon=True).start()
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        index = kernel.link_index(name)
        if index is not None and _answers(path):
            log.info("created %s (wireguard-go, pid %d)", name, process.pid)
            return index
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.kill()
    with open(log_path, errors="replace") as f:
        tail = f.read()[-500:].strip()
    raise KernelError(f"wireguard-go did not bring up {name} within {START_SECONDS:.0f} s"
                      f"{': ' + tail if tail else ''}")

