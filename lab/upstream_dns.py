"""The lab internet's DNS server (tests only): `python upstream_dns.py ADDRESS NAME=IP ...` answers A queries for the
names given, NXDOMAIN for the rest; what pyflanneld forwards names it does not know to in the lab."""
import socket
import sys

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


def main() -> None:
    address, pairs = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - not DNS
            continue
        reply = query.reply()
        name = str(query.q.qname).rstrip(".")
        if name in pairs and query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(pairs[name]), ttl=60))
        elif name not in pairs:
            reply.header.rcode = RCODE.NXDOMAIN
        sock.sendto(reply.pack(), peer)


if __name__ == "__main__":
    main()
