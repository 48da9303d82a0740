"""pyflanneld's DNS server (UDP): container names across hosts, everything else forwarded to the host's resolvers.

dockerd is given `--dns <dns address>`; its embedded resolver (127.0.0.11 in every container) answers the names of
its own host's containers and forwards the rest here, from the container's namespace, so the query's source is the
asking container. A name is answered (A records, one per container that has it, ttl ANSWER_TTL) only from the
networks that container is on; a name nobody has is forwarded to the upstream resolvers as it came and their
reply returned as it is. Packets are parsed and built with dnslib, once: an answer is kept, keyed by the query's
bytes after its ID and the asker's networks, and a query asked again is answered from it (with its own ID) until
the name book changes.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from .names import NameBook

log = logging.getLogger(__name__)

ANSWER_TTL = 5          # seconds a resolver may keep an answer: a stopped container's name goes quickly
UPSTREAM_SECONDS = 2.0  # per upstream resolver
RESOLV_CONF = "/etc/resolv.conf"
STOP_CHECK_SECONDS = 0.25  # a receiver sees that pyflanneld stops within this long
KEPT_ANSWERS = 4096     # past this many, the kept answers start again from none
RECEIVERS = 2           # threads answering from the socket: one takes the next query while another is sending


def upstreams_from(path: str = RESOLV_CONF, exclude: str = "") -> list[str]:
    """The nameservers of a resolv.conf, ours left out."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = [parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2 and parts[0] == "nameserver"]
    return [server for server in found if server != exclude]


class Resolver:
    count_upstream_failure = staticmethod(lambda: None)  # pyflanneld's metrics put theirs (Daemon._serve_dns)

    def __init__(self, book: NameBook, upstreams: list[str], upstream_port: int = 53):
        self.book = book
        self.upstreams = upstreams
        self.upstream_port = upstream_port
        # (query, the asker's networks) -> (the book's generation it was made from, the reply), IDs cut off
        self.kept: dict[tuple[bytes, frozenset[str] | None], tuple[int, bytes]] = {}

    def answer(self, data: bytes, asker: str) -> tuple[bytes | None, DNSRecord | None]:
        """(the reply, None) for a name of ours; (None, the query) for one to forward; (None, None) for garbage."""
        # The generation is read before the book is: an answer made while the book changes is never used again.
        generation, networks = self.book.generation, self.book.networks_of(asker)
        key = (bytes(data[2:]), None if networks is None else frozenset(networks))
        kept = self.kept.get(key)
        if kept is not None and kept[0] == generation:
            return data[:2] + kept[1], None
        reply, query = self._answer(data, networks)
        if reply is not None:
            if len(self.kept) >= KEPT_ANSWERS:
                self.kept.clear()
            self.kept[key] = (generation, bytes(reply[2:]))
        return reply, query

    def _answer(self, data: bytes, networks: set[str] | None) -> tuple[bytes | None, DNSRecord | None]:
        try:
            query = DNSRecord.parse(data)
        except DNSError:
            return None, None  # not DNS: no answer, as a resolver does
        if len(query.questions) != 1:
            return None, query
        question = query.q
        records = self.book.records(str(question.qname).rstrip("."), networks)
        if not records:
            return None, query
        reply = query.reply()
        for qtype, key, rdata in ((QTYPE.A, "address", A), (QTYPE.AAAA, "address6", AAAA)):
            if question.qtype in (qtype, QTYPE.ANY):
                for address in dict.fromkeys(getattr(r, key) for r in records if getattr(r, key)):  # each once
                    reply.add_answer(RR(question.qname, qtype, rdata=rdata(address), ttl=ANSWER_TTL))
        return reply.pack(), None  # other types of a known name: no data, no error

    def forward(self, data: bytes, query: DNSRecord) -> bytes:
        for server in self.upstreams:
            try:
                with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(UPSTREAM_SECONDS)
                    sock.sendto(data, (server, self.upstream_port))
                    while True:
                        reply, _ = sock.recvfrom(65535)
                        if reply[:2] == data[:2]:  # the answer to this query (same id)
                            return reply
            except OSError as e:
                log.debug("upstream %s: %s", server, e)
        self.count_upstream_failure()
        failed = query.reply()
        failed.header.rcode = RCODE.SERVFAIL
        return failed.pack()


def held_socket(address: str, port: int = 53) -> socket.socket | None:
    """The UDP socket on address:port that systemd holds for us (pyflanneld-dns.socket), if it passed it: the fds
    from 3 on, LISTEN_FDS of them, when LISTEN_PID is ours (sd_listen_fds(3))."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0") or 0)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket
        if sock.type == socket.SOCK_DGRAM and sock.family == socket.AF_INET and sock.getsockname() == (address, port):
            sock.set_inheritable(False)  # not for wireguard-go or iptables
            sock.setblocking(True)  # systemd makes its sockets non-blocking
            return sock
        sock.detach()
    return None


def serve(resolver: Resolver, address: str, port: int = 53, workers: int = 16,
          sock: socket.socket | None = None, stop: threading.Event | None = None) -> socket.socket:
    """Answer on address:port (UDP) in RECEIVERS threads; forwarding runs in a pool, so a slow upstream delays no
    answer.
    `sock`: that socket already bound (`held_socket`), which outlives us: the queries that come while we restart
    wait in it, and are answered when we are back. Once `stop` is set no query is taken from it any more: those
    after it are left for the next pyflanneld."""
    stop = stop or threading.Event()
    held = sock is not None
    if not held:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dns")

    def send(reply: bytes, peer) -> None:
        try:
            sock.sendto(reply, peer)
        except OSError:
            pass

    def forward(data: bytes, query: DNSRecord, peer) -> None:
        send(resolver.forward(data, query), peer)

    def loop() -> None:
        """Names of ours are answered here at once; the rest is forwarded from the pool."""
        waiting = select.poll()
        waiting.register(sock, select.POLLIN)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:  # none queued: wait for one, looking at `stop` every STOP_CHECK_SECONDS
                waiting.poll(STOP_CHECK_SECONDS * 1000)
                continue
            except OSError:
                return
            reply, query = resolver.answer(data, peer[0])
            if reply is not None:
                send(reply, peer)
            elif query is not None:
                pool.submit(forward, data, query, peer)

    for _ in range(RECEIVERS):
        threading.Thread(target=loop, name="dns", daemon=True).start()
    log.info("DNS for container names on %s:%d%s, other names forwarded to %s", address, port,
             " (systemd's socket)" if held else "", ", ".join(resolver.upstreams) or "nobody (no upstream resolver)")
    return sock
