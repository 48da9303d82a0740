"""Crafted VXLAN frames (tests only), as an attacker with a plain UDP socket sends them:
`python vxlan_frame.py HOST PORT VNI INNER_DST_MAC INNER_SRC INNER_DST INNER_DPORT TOKEN [COUNT]` sends COUNT
(default 3) UDP datagrams to HOST:PORT, each a VXLAN header with VNI, an Ethernet frame to INNER_DST_MAC and an
IPv4/UDP packet INNER_SRC -> INNER_DST:INNER_DPORT carrying TOKEN. HOST may be IPv4 or IPv6."""
import ipaddress
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(vni: int, dst_mac: str, src: str, dst: str, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload  # checksum 0: none, fine for IPv4
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip = header[:10] + struct.pack("!H", checksum(header)) + header[12:] + udp
    ethernet = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("020000c0ffee") + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni << 8) + ethernet + ip


def main() -> None:
    host, port, vni, dst_mac, src, dst, dport, token = sys.argv[1:9]
    count = int(sys.argv[9]) if len(sys.argv) > 9 else 3
    data = frame(int(vni), dst_mac, src, dst, int(dport), token.encode())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(data, (host, int(port)))
            time.sleep(0.05)


if __name__ == "__main__":
    main()
