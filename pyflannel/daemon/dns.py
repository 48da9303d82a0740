"""pyflanneld's DNS server (UDP): container names across hosts, everything else forwarded to the host's resolvers.

dockerd is given `--dns <dns address>`; its embedded resolver (127.0.0.11 in every container) answers the names of
its own host's containers and forwards the rest here, from the container's namespace, so the query's source is the
asking container. A name is answered (A records, one per container that has it, ttl ANSWER_TTL) only from the
networks that container is on; a name nobody has is forwarded to the upstream resolvers as it came and their
reply returned as it is. Packets are parsed and built with dnslib.
"""
from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from .names import NameBook

log = logging.getLogger(__name__)

ANSWER_TTL = 5          # seconds a resolver may keep an answer: a stopped container's name goes quickly
UPSTREAM_SECONDS = 2.0  # per upstream resolver
RESOLV_CONF = "/etc/resolv.conf"


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
    def __init__(self, book: NameBook, upstreams: list[str], upstream_port: int = 53):
        self.book = book
        self.upstreams = upstreams
        self.upstream_port = upstream_port

    def answer(self, data: bytes, asker: str) -> tuple[bytes | None, DNSRecord | None]:
        """(the reply, None) for a name of ours; (None, the query) for one to forward; (None, None) for garbage."""
        try:
            query = DNSRecord.parse(data)
        except DNSError:
            return None, None  # not DNS: no answer, as a resolver does
        if len(query.questions) != 1:
            return None, query
        question = query.q
        records = self.book.records(str(question.qname).rstrip("."), self.book.networks_of(asker))
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
        failed = query.reply()
        failed.header.rcode = RCODE.SERVFAIL
        return failed.pack()


def serve(resolver: Resolver, address: str, port: int = 53, workers: int = 16) -> socket.socket:
    """Answer on address:port (UDP) in a thread; forwarding runs in a pool, so a slow upstream delays no answer."""
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
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            reply, query = resolver.answer(data, peer[0])
            if reply is not None:
                send(reply, peer)
            elif query is not None:
                pool.submit(forward, data, query, peer)

    threading.Thread(target=loop, name="dns", daemon=True).start()
    log.info("DNS for container names on %s:%d, other names forwarded to %s", address, port,
             ", ".join(resolver.upstreams) or "nobody (no upstream resolver)")
    return sock
