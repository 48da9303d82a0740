"""`python dns_load.py SERVER NAME N`: N A queries for NAME to SERVER:53, one at a time, then N more with 8 in
flight; prints {"p50_ms", "p99_ms", "qps", "qps_8", "errors"} as JSON. Run inside a container's network namespace."""
import json
import socket
import statistics
import sys
import threading
import time

from dnslib import DNSRecord


def ask(sock: socket.socket, packet: bytes) -> bool:
    sock.send(packet)
    reply = DNSRecord.parse(sock.recv(4096))
    return bool(reply.rr)


def main() -> None:
    server, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    packet = DNSRecord.question(name).pack()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    sock.connect((server, 53))
    times, errors = [], 0
    started = time.monotonic()
    for _ in range(count):
        t = time.perf_counter()
        try:
            ok = ask(sock, packet)
        except OSError:
            ok = False
        times.append((time.perf_counter() - t) * 1000)
        errors += not ok
    qps = count / (time.monotonic() - started)

    def worker(n: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((server, 53))
        for _ in range(n):
            try:
                ask(s, packet)
            except OSError:
                pass

    threads = [threading.Thread(target=worker, args=(count // 8,)) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    qps_8 = (count // 8 * 8) / (time.monotonic() - started)
    print(json.dumps({"p50_ms": statistics.median(times), "p99_ms": statistics.quantiles(times, n=100)[98],
                      "qps": qps, "qps_8": qps_8, "errors": errors}))


if __name__ == "__main__":
    main()
