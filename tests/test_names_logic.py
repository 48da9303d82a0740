"""The name book and the resolver on fakes (an in-memory store, a fake upstream): who sees which names, replicas,
other record types, forwarding. No root, no etcd."""
import ipaddress
import socket
import threading
import types

import pytest
from dnslib import EDNS0, RCODE, RR, DNSRecord

from pyflannel.daemon.dns import Resolver
from pyflannel.daemon.names import Container, NameBook
from pyflannel.daemon.store.base import KeyChange
from tests.fakes import MemoryStore

pytestmark = pytest.mark.unit


CIDRS = {"shop": "10.60.0.0/16", "crm": "10.61.0.0/16"}


def book_of(networks: dict[str, MemoryStore], public_ip: str = "192.0.2.11") -> NameBook:
    overlays = {name: types.SimpleNamespace(store=store, config=types.SimpleNamespace(
        network=ipaddress.IPv4Network(CIDRS[name]))) for name, store in networks.items()}
    return NameBook(lambda: overlays, public_ip, 60, threading.Event())


def deliver(book: NameBook, networks: dict[str, MemoryStore]) -> None:
    """What the feed does: each network's names changes, below names/, to the book."""
    for network, store in networks.items():
        book.on_names(network, [KeyChange(c.key[len("names/"):], c.value, c.revision) for c in store.history
                                if c.key.startswith("names/")])


def ask(resolver: Resolver, name: str, asker: str, qtype: str = "A") -> DNSRecord | None:
    reply, query = resolver.answer(DNSRecord.question(name, qtype).pack(), asker)
    return DNSRecord.parse(reply) if reply else None


def test_names_are_answered_to_the_networks_that_share_them():
    shop, crm = MemoryStore(), MemoryStore()
    here, there = book_of({"shop": shop, "crm": crm}), book_of({"shop": shop, "crm": crm}, "192.0.2.12")
    here.publish([Container("a", {"shop": ("10.60.1.2", ("client",))}),
                  Container("b", {"crm": ("10.61.1.2", ("crmclient",))})])
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web", "www"))}),
                   Container("d", {"crm": ("10.61.2.2", ("web",))}),
                   Container("e", {"shop": ("10.60.2.3", ("api",))})])
    here._write(), there._write()
    assert set(shop.list_folder("names")[0]) == {"192.0.2.11/10.60.1.2", "192.0.2.12/10.60.2.2",
                                                 "192.0.2.12/10.60.2.3"}
    here._read()
    resolver = Resolver(here, [])
    assert [str(rr.rdata) for rr in ask(resolver, "web", "10.60.1.2").rr] == ["10.60.2.2"]  # shop's web only
    assert [str(rr.rdata) for rr in ask(resolver, "WWW.", "10.60.1.2").rr] == ["10.60.2.2"]
    assert [str(rr.rdata) for rr in ask(resolver, "web", "10.61.1.2").rr] == ["10.61.2.2"]  # crm's web only
    assert ask(resolver, "api", "10.61.1.2") is None  # not shared with crm: forwarded (nobody here: none)
    assert sorted(str(rr.rdata) for rr in ask(resolver, "web", "192.0.2.11").rr) == ["10.60.2.2", "10.61.2.2"]
    assert ask(resolver, "web", "172.17.0.2") is None  # a container of Docker's bridge: no names of ours
    assert [str(rr.rdata) for rr in ask(resolver, "web", "10.60.1.9").rr] == ["10.60.2.2"]  # just started: by Network
    empty = ask(resolver, "web", "10.60.1.2", "AAAA")
    assert empty.header.rcode == RCODE.NOERROR and empty.rr == []  # a known name without IPv6: no data, no error
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))})])  # api stopped, www alias gone
    there._write(), deliver(here, {"shop": shop, "crm": crm})
    assert ask(resolver, "api", "10.60.1.2") is None and ask(resolver, "www", "10.60.1.2") is None
    assert [str(rr.rdata) for rr in ask(resolver, "web", "10.60.1.2").rr] == ["10.60.2.2"]
    there.publish([])
    there._write(), deliver(here, {"shop": shop, "crm": crm})
    assert set(shop.list_folder("names")[0]) == {"192.0.2.11/10.60.1.2"} and not crm.list_folder("names/192.0.2.12")[0]
    assert ask(resolver, "web", "10.60.1.2") is None and here.listing() == [
        {"network": "crm", "names": ["crmclient"], "address": "10.61.1.2", "host": "192.0.2.11"},
        {"network": "shop", "names": ["client"], "address": "10.60.1.2", "host": "192.0.2.11"}]


def test_other_names_are_forwarded_and_a_dead_upstream_is_a_servfail():
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))

    def answer_once():
        data, peer = upstream.recvfrom(4096)
        reply = DNSRecord.parse(data).reply()
        reply.add_answer(*RR.fromZone("www.example.test. 60 A 203.0.113.1"))
        upstream.sendto(reply.pack(), peer)

    threading.Thread(target=answer_once, daemon=True).start()
    resolver = Resolver(book_of({}), ["127.0.0.1"], upstream.getsockname()[1])
    query = DNSRecord.question("www.example.test")
    _, to_forward = resolver.answer(query.pack(), "10.60.1.2")
    forwarded = DNSRecord.parse(resolver.forward(query.pack(), to_forward))
    assert [str(rr.rdata) for rr in forwarded.rr] == ["203.0.113.1"]
    upstream.close()
    failed = DNSRecord.parse(resolver.forward(query.pack(), query))
    assert failed.header.rcode == RCODE.SERVFAIL and failed.header.id == query.header.id


def test_dual_stack_containers_are_answered_with_aaaa_records():
    shop = MemoryStore()
    here, there = book_of({"shop": shop}), book_of({"shop": shop}, "192.0.2.12")
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))}, {"shop": "fd00:f1a0:0:2::2"}),
                   Container("d", {"shop": ("10.60.2.3", ("web", "db"))})])
    there._write(), here._read()
    assert '"address6": "fd00:f1a0:0:2::2"' in shop.list_folder("names")[0]["192.0.2.12/10.60.2.2"]
    resolver = Resolver(here, [])
    assert [str(rr.rdata) for rr in ask(resolver, "web", "10.60.1.2", "AAAA").rr] == ["fd00:f1a0:0:2::2"]
    assert sorted(str(rr.rdata) for rr in ask(resolver, "web", "10.60.1.2").rr) == ["10.60.2.2", "10.60.2.3"]
    assert len(ask(resolver, "web", "10.60.1.2", "ANY").rr) == 3
    db = ask(resolver, "db", "10.60.1.2", "AAAA")
    assert db.header.rcode == RCODE.NOERROR and db.rr == []  # known, IPv4 only: no data, no error


def test_names_are_written_once_kept_alive_without_rewrites_and_written_again_once_expired():
    """Idle costs nothing but a keep-alive; a change writes the keys that changed, in that network only; names
    whose liveness ran out (etcd lease or TTL) are written again at the next keep-alive."""
    shop, crm = MemoryStore(), MemoryStore()
    book = book_of({"shop": shop, "crm": crm})
    book.publish([Container("a", {"shop": ("10.60.1.2", ("web",))}), Container("b", {"crm": ("10.61.1.2", ("db",))}),
                  Container("c", {"shop": ("10.60.1.3", ("api",))})])
    assert book._write() and (len(shop.history), len(crm.history)) == (2, 1)
    assert book._write() and (len(shop.history), len(crm.history)) == (2, 1)  # nothing changed: nothing written
    assert book._keep_alive() and (shop.keep_alives, crm.keep_alives) == (1, 1) and len(shop.history) == 2
    book.publish([Container("a", {"shop": ("10.60.1.2", ("web", "www"))}), Container("b", {"crm": ("10.61.1.2",
                                                                                                   ("db",))})])
    assert book._write() and (len(shop.history), len(crm.history)) == (4, 1)  # a's new alias, c gone; crm untouched
    assert [c.key for c in shop.history[2:]] == ["names/192.0.2.11/10.60.1.2", "names/192.0.2.11/10.60.1.3"]
    shop.expire("names/192.0.2.11")  # the host's etcd lease (v3) or folder TTL (v2) ran out
    assert shop.list_folder("names")[0] == {} and not book._keep_alive()
    assert book._write() and set(shop.list_folder("names")[0]) == {"192.0.2.11/10.60.1.2"}
    book.forget("shop", shop)  # the host leaves shop: its names there go at once
    assert shop.list_folder("names")[0] == {} and "shop" not in book.written


def query_bytes(name: str, qtype: str = "A", id: int = 1, edns: bool = False) -> bytes:
    query = DNSRecord.question(name, qtype)
    query.header.id = id
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    return bytes(query.pack())


def test_an_answer_kept_is_the_bytes_dnslib_makes_with_the_askers_id():
    shop = MemoryStore()
    here, there = book_of({"shop": shop}), book_of({"shop": shop}, "192.0.2.12")
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))}, {"shop": "fd00:f1a0:0:2::2"}),
                   Container("d", {"shop": ("10.60.2.3", ("web",))})])
    there._write(), here._read()
    resolver = Resolver(here, [])
    for name, qtype, edns in (("web", "A", False), ("WEB.", "ANY", True), ("web", "AAAA", True), ("web", "MX", False)):
        first, _ = resolver.answer(query_bytes(name, qtype, 1, edns), "10.60.1.2")
        again, _ = resolver.answer(query_bytes(name, qtype, 0xBEEF, edns), "10.60.1.2")
        made, _ = Resolver(here, []).answer(query_bytes(name, qtype, 0xBEEF, edns), "10.60.1.2")  # nothing kept
        assert again == made and again[:2] == b"\xbe\xef" and first[2:] == again[2:]
    assert len(resolver.kept) == 4  # each question once


def test_kept_answers_follow_every_change_of_the_book_and_of_the_askers_networks():
    shop, crm = MemoryStore(), MemoryStore()
    networks = {"shop": shop, "crm": crm}
    here, there = book_of(networks), book_of(networks, "192.0.2.12")
    here.publish([Container("a", {"shop": ("10.60.1.2", ("client",))})])
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))}), Container("d", {"crm": ("10.61.2.2", ("web",))})])
    here._write(), there._write(), here._read()
    resolver = Resolver(here, [])

    def web(asker: str = "10.60.1.2") -> list[str] | None:
        reply, _ = resolver.answer(query_bytes("web"), asker)
        return sorted(str(rr.rdata) for rr in DNSRecord.parse(reply).rr) if reply else None

    assert web() == ["10.60.2.2"] and web() == ["10.60.2.2"]
    there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))}), Container("d", {"crm": ("10.61.2.2", ("web",))}),
                   Container("e", {"shop": ("10.60.2.4", ("web",))})])  # a replica of web starts
    there._write(), deliver(here, networks)
    assert web() == ["10.60.2.2", "10.60.2.4"]
    here.publish([Container("a", {"crm": ("10.60.1.2", ("client",))})])  # a's networks change: crm's web, not shop's
    assert web() == ["10.61.2.2"]
    here.publish([Container("a", {"shop": ("10.60.1.2", ("client",))})])
    assert web() == ["10.60.2.2", "10.60.2.4"]
    there.publish([Container("d", {"crm": ("10.61.2.2", ("web",))})])  # shop's web is gone
    there._write(), deliver(here, networks)
    assert web() is None
    looked_up = here.records

    def records_then_a_change(name, on):  # the feed changes the book while an answer is being made
        found = looked_up(name, on)
        there.publish([Container("c", {"shop": ("10.60.2.2", ("web",))}), Container("d", {"crm": ("10.61.2.2",
                                                                                                  ("web",))})])
        there._write(), deliver(here, networks)
        here.records = looked_up
        return found

    here.records = records_then_a_change
    assert web("192.0.2.11") == ["10.61.2.2"]  # made from the book as it was: not kept
    assert web("192.0.2.11") == ["10.60.2.2", "10.61.2.2"]
    here.forget("crm", crm)  # the host leaves crm: its copy of crm's names goes
    assert web("192.0.2.11") == ["10.60.2.2"]


def test_forwarded_queries_and_garbage_are_not_kept_and_the_kept_answers_are_bounded(monkeypatch):
    shop = MemoryStore()
    book = book_of({"shop": shop})
    book.publish([Container("a", {"shop": ("10.60.1.2", ("web",))})])
    book._write(), book._read()
    resolver = Resolver(book, [])
    assert resolver.answer(query_bytes("www.example.test"), "10.60.1.2")[1] is not None  # to forward
    assert resolver.answer(b"\x00\x01 not DNS at all", "10.60.1.2") == (None, None)
    assert resolver.answer(b"\x00\x01 not DNS at all", "10.60.1.2") == (None, None)
    assert resolver.kept == {}
    monkeypatch.setattr("pyflannel.daemon.dns.KEPT_ANSWERS", 3)
    sizes = []
    for id in range(10):  # 10 different queries (with or without EDNS, trailing bytes)
        reply, _ = resolver.answer(query_bytes("web", "A", id, edns=id % 2 == 0) + bytes(id // 2), "10.60.1.2")
        assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["10.60.1.2"]
        sizes.append(len(resolver.kept))
    assert max(sizes) == 3


def test_the_copy_follows_puts_deletions_and_an_expired_hosts_folder():
    """Every host's names as the feed hands them after the first read: a put, a put again (renamed), a key deleted,
    and a v2 host folder whose TTL ran out take records out of the answers; the listing stays in key order."""
    shop = MemoryStore()
    book = book_of({"shop": shop})
    book._read()

    def record(names, address):
        return f'{{"names": {names}, "address": "{address}"}}'
    book.on_names("shop", [KeyChange("192.0.2.12/10.60.2.2", record('["web"]', "10.60.2.2"), 10),
                           KeyChange("192.0.2.12/10.60.2.3", record('["api"]', "10.60.2.3"), 11),
                           KeyChange("192.0.2.13/10.60.3.2", record('["web"]', "10.60.3.2"), 12),
                           KeyChange("192.0.2.13/10.60.3.3", "not a record", 13)])
    assert [r.address for r in book.records("web", None)] == ["10.60.2.2", "10.60.3.2"]
    book.on_names("shop", [KeyChange("192.0.2.12/10.60.2.2", record('["www"]', "10.60.2.2"), 14),
                           KeyChange("192.0.2.12/10.60.2.3", None, 15)])
    assert [r.address for r in book.records("web", None)] == ["10.60.3.2"]
    assert book.records("api", None) == [] and [r.host for r in book.records("WWW", {"shop"})] == ["192.0.2.12"]
    assert [(r["host"], r["names"]) for r in book.listing()] == [("192.0.2.12", ["www"]), ("192.0.2.13", ["web"])]
    book.on_names("shop", [KeyChange("192.0.2.13", None, 16, folder=True)])
    assert book.records("web", None) == [] and [r["address"] for r in book.listing()] == ["10.60.2.2"]
