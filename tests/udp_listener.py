"""`python udp_listener.py PORT`: prints each UDP datagram received on PORT (IPv4 and IPv6), one line each, at once
(tests only: a victim that says what reached it)."""
import socket
import sys

sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.bind(("::", int(sys.argv[1])))
while True:
    data, peer = sock.recvfrom(2048)
    print(data.decode(errors="replace"), peer[0], flush=True)
