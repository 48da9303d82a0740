"""`python listener.py PORT`: prints each UDP datagram and the first line of each TCP connection received on PORT
(IPv4 and IPv6), one line each, at once (tests only: a victim or a peer that says what reached it)."""
import socket
import sys
import threading


def dual_stack(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", int(sys.argv[1])))
    return sock


def tcp() -> None:
    server = dual_stack(socket.SOCK_STREAM)
    server.listen(64)
    while True:
        conn, peer = server.accept()
        conn.settimeout(2)
        try:
            print(conn.makefile().readline().strip(), peer[0], flush=True)
        except OSError:
            pass
        finally:
            conn.close()


threading.Thread(target=tcp, daemon=True).start()
udp = dual_stack(socket.SOCK_DGRAM)
while True:
    data, peer = udp.recvfrom(2048)
    print(data.decode(errors="replace"), peer[0], flush=True)
