"""WireGuard pieces without a device: keys, and the UAPI text protocol both ways."""
import base64

import pytest

from pyflannel.kernel import wireguard as wg
from pyflannel.kernel.netlink import Change

pytestmark = pytest.mark.unit


def test_keys_are_what_wg_writes():
    private = wg.generate_private_key()
    assert wg.key_problem(private) is None and len(base64.b64decode(private)) == 32
    assert wg.public_key_of(private) != private and wg.key_problem(wg.public_key_of(private)) is None
    # RFC 7748's test vector (Alice), in WireGuard's base64
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert wg.public_key_of(base64.b64encode(alice).decode()) == base64.b64encode(bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")).decode()
    for bad in ("", "abc", base64.b64encode(b"x" * 31).decode(), None, 7):
        assert "base64 of 32 bytes" in wg.key_problem(bad)


def test_uapi_lines_for_a_peer_and_back():
    key, psk = wg.public_key_of(wg.generate_private_key()), wg.generate_private_key()
    peer = wg.WireGuardPeer(key, "192.0.2.12:51820", ("10.5.2.0/24",), 25, psk)
    lines = wg._uapi_peer(Change(True, peer))
    assert lines[0] == f"public_key={base64.b64decode(key).hex()}"
    assert {"endpoint=192.0.2.12:51820", "persistent_keepalive_interval=25", "replace_allowed_ips=true",
            "allowed_ip=10.5.2.0/24", f"preshared_key={base64.b64decode(psk).hex()}"} <= set(lines)
    assert wg._uapi_peer(Change(False, peer)) == [lines[0], "remove=true"]
    # what wireguard-go answers to get=1: the device's own keys first, then each peer from its public_key
    answer = [("private_key", "11" * 32), ("listen_port", "51820"), *[tuple(line.split("=", 1)) for line in lines],
              ("rx_bytes", "0"), ("public_key", "22" * 32), ("preshared_key", wg.NO_KEY), ("endpoint", "192.0.2.13:1"),
              ("persistent_keepalive_interval", "0"), ("allowed_ip", "10.5.3.0/24"), ("allowed_ip", "10.5.9.0/24")]
    other = wg.WireGuardPeer(base64.b64encode(bytes.fromhex("22" * 32)).decode(), "192.0.2.13:1",
                             ("10.5.3.0/24", "10.5.9.0/24"))
    assert wg._peers_from_uapi([pair for pair in answer if pair[0] != "replace_allowed_ips"]) == {peer, other}
