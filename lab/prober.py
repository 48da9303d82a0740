"""`python prober.py HOST PORT SECONDS`: opens a new TCP connection to HOST:PORT every 50 ms for SECONDS and prints
one line per try, "<unix time> ok|fail" (tests only: how long a swap interrupts new connections)."""
import socket
import sys
import time

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + seconds
while time.time() < end:
    started = time.time()
    try:
        with socket.create_connection((host, port), timeout=0.25) as conn:
            conn.sendall(b"probe\n")
        outcome = "ok"
    except OSError:
        outcome = "fail"
    print(f"{started:.3f} {outcome}", flush=True)
    time.sleep(max(0.0, 0.05 - (time.time() - started)))
