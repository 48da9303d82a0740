"""Container DNS across pyflanneld restarts (issue 29): with the DNS socket held outside pyflanneld, as systemd holds
pyflanneld-dns.socket (the test binds it and hands it over: fd 3, LISTEN_FDS=1, LISTEN_PID), the lookups a container
makes while pyflanneld restarts wait in the socket and are answered when it is back. Under a steady query load, 5
restarts lose no lookup; the same restarts with pyflanneld binding the socket itself lose some (the control). How
pyflanneld finds the socket it is handed (sd_listen_fds(3)'s rules) is a unit test."""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
from dnslib import DNSRecord

from pyflannel.localapi import DEFAULT_NETWORK, Client
from lab import DNS_ADDRESS, OUTSIDE_IP, OUTSIDE_NAMES, inside, wait_until

RESTARTS = 5
QUERY_EVERY = 0.02   # s between two lookups of the load
GIVE_UP_AFTER = 4.0  # s: how long dockerd's embedded resolver waits for a query it forwards (no retry)
BETWEEN_RESTARTS = 3.0
OUTSIDE_NAME = next(iter(OUTSIDE_NAMES))
IP_FREEBIND = 15     # linux/in.h (Python's socket module lacks it)
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: what systemd sets ReceiveBuffer= with
RECEIVE_BUFFER = 4 << 20  # pyflanneld-dns.socket's ReceiveBuffer=4M


@dataclass
class Lookup:
    name: str
    wanted: list[str]
    sent: float
    waited: float | None = None  # s from the query to the right answer
    wrong: str = ""              # an answer that was not the right one (an error, other addresses)


class QueryLoad:
    """A container's lookups as dockerd forwards them to pyflanneld: one every QUERY_EVERY s, alternately a
    container name of another host and an outside name (which pyflanneld forwards in turn), each sent once and
    lost unless the right answer comes within GIVE_UP_AFTER s."""

    def __init__(self, ns: str, names: dict[str, str]):
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.1)
        self.names = list(names.items())
        self.lookups: dict[int, Lookup] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        for query_id, (name, address) in zip(itertools.count(1), itertools.cycle(self.names)):
            if self.done.wait(QUERY_EVERY) or query_id > 0xFFFF:
                return
            query = DNSRecord.question(name)
            query.header.id = query_id
            with self.lock:
                self.lookups[query_id] = Lookup(name, [address], time.monotonic())
            self.sock.sendto(query.pack(), (DNS_ADDRESS, 53))

    def _receive(self) -> None:
        while not self.done.is_set():
            try:
                reply = DNSRecord.parse(self.sock.recv(4096))
            except (TimeoutError, OSError):
                continue
            with self.lock:
                lookup = self.lookups.get(reply.header.id)
                if lookup is None or lookup.waited is not None or lookup.wrong:
                    continue
                got = sorted(str(rr.rdata) for rr in reply.rr)
                if got == lookup.wanted:
                    lookup.waited = time.monotonic() - lookup.sent
                else:
                    lookup.wrong = f"rcode {reply.header.rcode}, {got}"

    def stop(self) -> dict:
        """Once the last lookups had their time: the figures."""
        time.sleep(GIVE_UP_AFTER)
        self.done.set()
        for thread in self.threads:
            thread.join(5)
        self.sock.close()
        lookups = list(self.lookups.values())
        answered = [q.waited for q in lookups if q.waited is not None and q.waited <= GIVE_UP_AFTER]
        return {"lookups": len(lookups), "lost": len(lookups) - len(answered),
                "wrong": sum(1 for q in lookups if q.wrong), "over_1s": sum(w > 1.0 for w in answered),
                "longest_wait": round(max(answered, default=0.0), 2)}


def restarts(host, listen_socket: socket.socket | None) -> None:
    for _ in range(RESTARTS):
        host.daemon.kill(signal.SIGTERM)
        host.start_daemon(listen_socket=listen_socket)  # at once, as `systemctl restart` does
        time.sleep(BETWEEN_RESTARTS)


@pytest.mark.lab
def test_no_lookup_is_lost_while_pyflanneld_restarts(make_lab):
    lab = make_lab(2)
    lab.add_outside()
    lab.set_config()
    h1, h2 = lab.hosts
    with inside(h1.ns):  # as pyflanneld-dns.socket: non-blocking, bound before the address is on lo (FreeBind)
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    held.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    held.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    held.bind((DNS_ADDRESS, 53))
    h1.start_daemon(listen_socket=held)
    h2.start_daemon()
    web = h2.subnet_env()["FLANNEL_SUBNET"].split("/")[0].rsplit(".", 1)[0] + ".10"
    Client(str(h2.api_sock)).publish([{"id": "web", "networks": {DEFAULT_NETWORK: {"address": web,
                                                                                   "names": ["web"]}}}])
    h1.add_bridge()
    container = h1.add_container()
    names = {"web": web, OUTSIDE_NAME: OUTSIDE_IP}
    wait_until("web resolves from h1's container", lambda: resolves(container.ns, "web") == [web], timeout=15)
    assert "(systemd's socket)" in h1.daemon.log()

    load = QueryLoad(container.ns, names)
    time.sleep(1)
    restarts(h1, held)
    held_figures = load.stop() | {"dropped_full": full_socket_drops(h1)}
    print(f"\n{RESTARTS} restarts, socket held: {held_figures}")

    h1.daemon.kill(signal.SIGTERM)
    held.close()
    h1.start_daemon()  # the control: pyflanneld binds the socket itself
    wait_until("h1 answers on its own socket", lambda: resolves(container.ns, "web") == [web], timeout=15)
    load = QueryLoad(container.ns, names)
    time.sleep(1)
    restarts(h1, None)
    own_figures = load.stop()
    print(f"{RESTARTS} restarts, socket of pyflanneld's own: {own_figures}")

    assert held_figures["lost"] == 0 and held_figures["lookups"] > RESTARTS * BETWEEN_RESTARTS / QUERY_EVERY / 2
    assert own_figures["lost"] > 0  # what the held socket saves


def full_socket_drops(host) -> int:
    """UDP datagrams the host's kernel dropped because a socket's receive buffer was full."""
    head, values = [line.split()[1:] for line in host.sh("cat", "/proc/net/snmp").splitlines()
                    if line.startswith("Udp:")]
    return int(dict(zip(head, values))["RcvbufErrors"])


def resolves(ns: str, name: str) -> list[str]:
    with inside(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(DNSRecord.question(name).pack(), (DNS_ADDRESS, 53))
        return sorted(str(rr.rdata) for rr in DNSRecord.parse(sock.recv(4096)).rr)


HELD_SOCKET_PROBE = """
import socket
from pyflannel.daemon import dns
sock = dns.held_socket("127.0.0.1", {port})
print(sock is not None and sock.getblocking() and not sock.get_inheritable(), dns.held_socket("127.0.0.1", 1))
"""


@pytest.mark.unit
@pytest.mark.parametrize("listen_pid", ["$$", "1"])
def test_the_socket_is_taken_when_handed_to_this_process(listen_pid):
    """sd_listen_fds(3)'s rules: fd 3 on, LISTEN_FDS of them, only when LISTEN_PID is ours; the address must be the
    one asked for; a non-blocking socket (as systemd makes them) is made blocking, and kept from children."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as sock:
        sock.bind(("127.0.0.1", 0))
        probe = HELD_SOCKET_PROBE.format(port=sock.getsockname()[1])
        done = subprocess.run(["sh", "-c", f'LISTEN_PID={listen_pid} LISTEN_FDS=1 exec "$@"', "sh", sys.executable,
                               "-c", probe],
                              capture_output=True, text=True, timeout=30, pass_fds=(3,),
                              preexec_fn=lambda: os.dup2(sock.fileno(), 3))
    assert done.stdout.split() == (["True", "None"] if listen_pid == "$$" else ["False", "None"]), done.stderr
