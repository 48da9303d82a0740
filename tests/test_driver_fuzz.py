"""Fuzz the real plugin socket: pyflannel-driver under gunicorn, in a throwaway namespace, >= 10,000 requests.

The driver is started exactly as Docker's host would run it (`pyflannel-driver --socket --state-dir --subnet-file`
under `ip netns exec`), one valid network with one joined endpoint is created through the socket, and then
Hypothesis-generated calls go over one persistent HTTP/1.1 connection (reopened only when the server closes it):

    wrong types in every validated field (top-level and nested), missing and null fields, hostile values of the right
    type (other scripts' digits, long digit runs, near-miss addresses and ids), extra fields, oversized strings /
    maps / lists, garbage anywhere inside valid bodies, random JSON of every type and in UTF-16/32, invalid JSON,
    binary garbage, deep nesting, odd Content-Types, chunked bodies, unknown and near-miss method names,
    GET/PUT/DELETE/PATCH/HEAD/OPTIONS/made-up verbs, every known method name with random bodies, seven 2-5 MB
    bodies, and (not counted, answered by gunicorn itself) a dozen connections of broken HTTP.

Every reply must be JSON (an object, Content-Type application/vnd.docker.plugins.v1+json) with a non-empty "Err"
when the status is not 200 (and "Error" equal to it on IpamDriver paths), with a status in the documented set and in
the set the request allows (400 for malformed input, naming the field where the fuzzer knows which one; 404 for
unknown methods, 405 for other verbs; never 500). Afterwards the driver has not crashed (same master, same worker
PIDs, no "Traceback"/"Worker exiting" in its log) and the state file and the namespace's links, addresses and routes
are exactly as before the run.

The real network's, endpoint's and pool's ids are only ever sent to calls that cannot change anything
(CreateNetwork repeated, EndpointOperInfo, Program/RevokeExternalConnectivity, ReleasePool of a pool in use), so any
difference afterwards is a bug. PYFLANNEL_FUZZ_REQUESTS changes the request count (default 10000).
"""
from __future__ import annotations

import collections
import difflib
import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.driver_support import CONTENT_TYPE, LEASE
from tests.test_driver_main import ns, running_driver  # noqa: F401  (ns is a fixture)

pytestmark = pytest.mark.lab

TOTAL_REQUESTS = int(os.environ.get("PYFLANNEL_FUZZ_REQUESTS", "10000"))
BATCH = 20                      # average fuzz cases per Hypothesis example (1 to 2 * BATCH)
DOCUMENTED = {200, 400, 404, 405, 409, 500, 503}
ID_RE = re.compile(r"[0-9A-Za-z]{12,128}")
MAX_STRING, MAX_MAP_ENTRIES, MAX_LIST_ITEMS = 4096, 256, 16

BODILESS = {
    "Plugin.Activate": {"Implements": ["NetworkDriver", "IpamDriver"]},
    "NetworkDriver.GetCapabilities": {"Scope": "local", "ConnectivityScope": "global"},
    "IpamDriver.GetCapabilities": {"RequiresMACAddress": False, "RequiresRequestReplay": False},
    "IpamDriver.GetDefaultAddressSpaces": {"LocalDefaultAddressSpace": "pyflannel-local",
                                           "GlobalDefaultAddressSpace": "pyflannel-global"},
}
# Calls the driver has nothing to do for; their bodies are only required to be JSON objects.
NO_OP = {
    "NetworkDriver.DiscoverNew": {},
    "NetworkDriver.DiscoverDelete": {},
    "NetworkDriver.AllocateNetwork": {"Options": {}},
    "NetworkDriver.FreeNetwork": {},
}

# Top-level fields each method validates: name -> (kind, required). Kinds: id (Docker object id), str, bool,
# map (JSON object), list, iface (object or null), any (not validated).
ENDPOINT_REF = {"NetworkID": ("id", True), "EndpointID": ("id", True), "Options": ("map", False)}
FIELDS = {
    "NetworkDriver.CreateNetwork": {"NetworkID": ("id", True), "Options": ("map", False),
                                    "IPv4Data": ("list", False), "IPv6Data": ("list", False)},
    "NetworkDriver.DeleteNetwork": {"NetworkID": ("id", True)},
    "NetworkDriver.CreateEndpoint": {"NetworkID": ("id", True), "EndpointID": ("id", True),
                                     "Options": ("map", False), "Interface": ("iface", False)},
    "NetworkDriver.EndpointOperInfo": ENDPOINT_REF,
    "NetworkDriver.DeleteEndpoint": ENDPOINT_REF,
    "NetworkDriver.Join": {"NetworkID": ("id", True), "EndpointID": ("id", True), "SandboxKey": ("str", False),
                           "Options": ("map", False)},
    "NetworkDriver.Leave": ENDPOINT_REF,
    "NetworkDriver.ProgramExternalConnectivity": ENDPOINT_REF,
    "NetworkDriver.RevokeExternalConnectivity": ENDPOINT_REF,
    "NetworkDriver.DiscoverNew": {"DiscoveryType": ("any", False), "DiscoveryData": ("any", False)},
    "NetworkDriver.DiscoverDelete": {"DiscoveryType": ("any", False), "DiscoveryData": ("any", False)},
    "NetworkDriver.AllocateNetwork": {"NetworkID": ("any", False), "Options": ("any", False),
                                      "IPv4Data": ("any", False), "IPv6Data": ("any", False)},
    "NetworkDriver.FreeNetwork": {"NetworkID": ("any", False)},
    "IpamDriver.RequestPool": {"AddressSpace": ("str", False), "Pool": ("str", False), "SubPool": ("str", False),
                               "Options": ("map", False), "V6": ("bool", False)},
    "IpamDriver.ReleasePool": {"PoolID": ("str", True)},
    "IpamDriver.RequestAddress": {"PoolID": ("str", True), "Address": ("str", False), "Options": ("map", False)},
    "IpamDriver.ReleaseAddress": {"PoolID": ("str", True), "Address": ("str", True)},
}
KNOWN = sorted(set(BODILESS) | set(FIELDS))
# Calls that may carry the real ids: none of them can change the state or the kernel.
REAL_ID_SAFE = {"NetworkDriver.CreateNetwork": ("NetworkID",),
                "NetworkDriver.EndpointOperInfo": ("NetworkID", "EndpointID"),
                "NetworkDriver.ProgramExternalConnectivity": ("NetworkID", "EndpointID"),
                "NetworkDriver.RevokeExternalConnectivity": ("NetworkID", "EndpointID"),
                "IpamDriver.ReleasePool": ("PoolID",)}


GENERIC, MTU = "com.docker.network.generic", "com.docker.network.driver.mtu"
# Validated fields inside the top-level ones: (path, kind, required, the name the driver's message starts with).
# Kind "mtu": a string or number holding an MTU; "strval": a value of a map of strings.
NESTED = {
    "NetworkDriver.CreateNetwork": [
        (("Options", GENERIC), "map", False, f"Options[{GENERIC!r}]"),
        (("Options", GENERIC, MTU), "mtu", False, f"Options[{GENERIC!r}][{MTU!r}]"),
        (("Options", "com.docker.network.enable_ipv6"), "bool", False, "Options['com.docker.network.enable_ipv6']"),
        (("Options", "com.docker.network.enable_ipv4"), "bool", False, "Options['com.docker.network.enable_ipv4']"),
        (("Options", "com.docker.network.internal"), "bool", False, "Options['com.docker.network.internal']"),
        (("IPv4Data", 0), "map", True, "IPv4Data[0]"),
        (("IPv4Data", 0, "Pool"), "str", True, "IPv4Data[0].Pool"),
        (("IPv4Data", 0, "Gateway"), "str", False, "IPv4Data[0].Gateway"),
        (("IPv4Data", 0, "AddressSpace"), "str", False, "IPv4Data[0].AddressSpace"),
        (("IPv4Data", 0, "AuxAddresses"), "map", False, "IPv4Data[0].AuxAddresses"),
    ],
    "NetworkDriver.CreateEndpoint": [
        (("Interface", "Address"), "str", False, "Interface.Address"),
        (("Interface", "AddressIPv6"), "str", False, "Interface.AddressIPv6"),
        (("Interface", "MacAddress"), "str", False, "Interface.MacAddress"),
    ],
    "IpamDriver.RequestPool": [(("Options", "com.docker.network.ipam.serial"), "strval", False,
                                "Options['com.docker.network.ipam.serial']")],
    "IpamDriver.RequestAddress": [(("Options", "RequestAddressType"), "strval", False, "Options['RequestAddressType']"),
                                  (("Options", "x"), "strval", False, "Options['x']")],
}


def _slots() -> list[tuple]:
    """Every validated field of every method: (method, path, kind, required, label)."""
    slots = []
    for method, fields in FIELDS.items():
        slots += [(method, (f,), k, req, f) for f, (k, req) in fields.items() if k != "any"]
        slots += [(method, *nested) for nested in NESTED.get(method, [])]
    return slots


SLOTS = _slots()


def mtu_refused(value) -> bool:
    """Whether the driver must refuse this MTU option (Docker's strconv.Atoi: ASCII digits; 68-65535)."""
    if value in (None, "", 0):
        return False  # unset
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return True
    text = str(value).strip()
    digits = text.lstrip("0")
    return not (text.isascii() and text.isdigit()) or len(digits) > 5 or not 68 <= int(digits or "0") <= 65535


@dataclass(frozen=True)
class Real:
    network_id: str
    endpoint_id: str
    pool_id: str


@dataclass(frozen=True)
class Call:
    """One HTTP request and what its reply may be."""
    kind: str                          # fuzz category, for the summary
    verb: str
    name: str                          # the method name as the server decodes it ("" for odd paths)
    path: str
    body: bytes = b""
    chunked: bool = False
    chunk_junk: bytes = b""            # broken chunk framing sent after the body's chunks (the connection is dropped)
    content_type: str | None = None
    statuses: frozenset = frozenset({200, 400, 409})
    err_prefix: str | None = None      # the Err text must start with this (the field the fuzzer broke)
    reply: dict | None = None          # the exact reply expected
    same_as_previous: bool = False     # extra fields must not change the reply of the call before

    def show(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"...(%d bytes)" % len(self.body)
        return (f"{self.kind}: {self.verb} {self.path} chunked={self.chunked} junk={self.chunk_junk!r} "
                f"ct={self.content_type!r} body={body!r}")


# --- value strategies ---------------------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=10)

NOT_OF_KIND = {
    "id": st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(json_leaf, max_size=2),
                    st.dictionaries(st.text(max_size=5), json_leaf, max_size=2)),
    "bool": st.one_of(st.integers(), st.sampled_from(["true", "false", "", "1"]), st.floats(allow_nan=False),
                      st.lists(json_leaf, max_size=2), st.dictionaries(st.text(max_size=5), json_leaf, max_size=2)),
    "map": st.one_of(st.booleans(), st.integers(), st.text(max_size=10), st.lists(json_leaf, max_size=3)),
    "list": st.one_of(st.booleans(), st.integers(), st.text(max_size=10),
                      st.dictionaries(st.text(max_size=5), json_leaf, max_size=2)),
}
NOT_OF_KIND["str"] = NOT_OF_KIND["strval"] = NOT_OF_KIND["id"]
NOT_OF_KIND["iface"] = NOT_OF_KIND["map"]

ALNUM = "0123456789abcdefABCDEFghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ"


def alnum(n: int, size: int) -> str:
    """`size` letters and digits from the number n (one draw instead of one per character: much faster)."""
    out = []
    for _ in range(size):
        n, digit = divmod(n, 16 if size == 64 else len(ALNUM))  # 64 characters: hex, like Docker's ids
        out.append(ALNUM[digit])
    return "".join(out)


def ids(sizes) -> st.SearchStrategy[str]:
    return st.builds(alnum, st.integers(0, 2 ** 800), st.sampled_from(sizes))


fresh_id = ids([64, 64, 64, 12, 13, 25, 100, 128])
bad_id = st.one_of(
    st.text(max_size=20).filter(lambda s: not ID_RE.fullmatch(s)),
    ids([0, 1, 11, 129, 140]),
    st.builds(lambda i, junk: junk.replace("ID", i), ids([12, 64]), st.sampled_from(
        ["ID\n", "ID ", " ID", "ID\x00", "ID/", "ID-", "ID\u0661", "../ID", "ID\r\n"])))
digits = st.one_of(  # numbers as text: ASCII, other scripts' digits, superscripts, long runs
    st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),
    st.builds(lambda d, n: d * n, st.sampled_from("0123456789"), st.integers(1, 9000)))
octet = st.one_of(st.integers(0, 255).map(str), st.integers(-1, 999).map(str), digits)
ipv4_text = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octet, octet, octet, octet)
prefix_text = st.one_of(st.integers(-1, 40).map(str), digits, st.just("255.255.255.0"), st.just("0.0.0.255"))
cidr_text = st.builds(lambda ip, p: f"{ip}/{p}", ipv4_text, prefix_text)
near_lease = st.sampled_from([LEASE, "10.5.34.0/25", "10.5.35.0/24", "10.5.0.0/16", "0.0.0.0/0", "10.5.34.1/24",
                              "10.5.34.0", "10.5.34.0/33", "10.5.34.0/255.255.255.0", "fd00::/64", "::/0",
                              LEASE + " ", LEASE + "\n", "10.05.34.0/24", "10.5.34.0/+24", ""])
near_address = st.sampled_from(["10.5.34.7", "10.5.34.7/24", "10.5.34.1", "10.5.34.1/24", "10.5.34.0",
                                "10.5.34.255", "10.5.35.7/24", "10.5.34.7/16", "fd00::7/64", "10.5.34.7/",
                                "10.5.34.7\n", ""])
wild_text = st.one_of(st.text(max_size=30), near_lease, near_address, ipv4_text, cidr_text, digits)
clean_pool = st.sampled_from([LEASE, "10.5.35.0/24", "10.5.34.0/25", "192.168.0.0/16"])
clean_address = st.sampled_from(["10.5.34.7", "10.5.34.200", "10.5.34.1", "10.5.35.7", "10.5.34.7/24"])
mac = st.one_of(st.from_regex(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", fullmatch=True),
                st.sampled_from(["", "02:42:0a:05:22:07\n", "02-42-0a-05-22-07", "02:42:0a:05:22", "zz:42:0a:05:22:07",
                                 "02:42:0A:05:22:07"]),
                st.text(max_size=20))
mtu = st.one_of(st.none(), st.just(""), digits, st.integers(-(2 ** 40), 2 ** 40), st.floats(), st.booleans(),
                st.text(max_size=8), st.lists(json_leaf, max_size=2))
NOT_OF_KIND["mtu"] = mtu.filter(mtu_refused)
long_text = st.builds(lambda c, n: c * n, st.sampled_from(["a", "0", "1", "\u00e9", "\u0661", " ", "/"]),
                      st.integers(100, 10_000))
# values of the right JSON type that a validator may still choke on
HOSTILE = {"id": st.one_of(fresh_id, bad_id, long_text), "str": st.one_of(wild_text, long_text),
           "strval": st.one_of(wild_text, long_text), "mtu": st.one_of(digits, mtu), "bool": json_leaf}
pool_ids = st.one_of(st.sampled_from(["pyflannel/10.5.35.0/24", "pyflannel/", "pyflannel/x", "pyflannel/" + LEASE + " ",
                                      "", "default/10.5.34.0/24"]), st.text(max_size=30))
address_spaces = st.one_of(st.sampled_from(["", "pyflannel-local", "pyflannel-global", "LocalDefault"]),
                           st.text(max_size=20))
options_map = st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
    ["com.docker.network.portmap", "RequestAddressType", "com.docker.network.generic"])), json_value, max_size=4)
string_options = st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3)


def _id(draw, method: str, field: str, real: str, *, wild: bool) -> str:
    choices = [fresh_id]
    if field in REAL_ID_SAFE.get(method, ()):
        choices.append(st.just(real))
    if wild:
        choices.append(bad_id)
    return draw(st.one_of(*choices))


def template(draw, method: str, real: Real, *, wild: bool) -> dict:
    """A request body with every field Docker sends: syntactically valid unless `wild` (then anything plausible)."""
    text = wild_text if wild else None
    if method == "NetworkDriver.CreateNetwork":
        generic = draw(st.fixed_dictionaries({}, optional={"com.docker.network.driver.mtu": mtu if wild else
                                                           st.sampled_from(["", "1400", "9000", 1400])}))
        ipv4 = {"AddressSpace": draw(address_spaces if wild else st.just("pyflannel-local")),
                "Pool": draw(text if wild else clean_pool), "AuxAddresses": {}}
        if draw(st.booleans()):
            ipv4["Gateway"] = draw(text if wild else st.sampled_from(["10.5.34.1/24", "10.5.34.9/24"]))
        options = {"com.docker.network.generic": generic,
                   "com.docker.network.enable_ipv6": draw(st.one_of(st.booleans(), json_leaf) if wild
                                                          else st.booleans())}
        if wild:
            options.update(draw(st.fixed_dictionaries({}, optional={
                "com.docker.network.internal": json_leaf, "com.docker.network.enable_ipv4": json_leaf})))
        return {"NetworkID": _id(draw, method, "NetworkID", real.network_id, wild=wild), "Options": options,
                "IPv4Data": [dict(ipv4) for _ in range(draw(st.integers(0, 2)) if wild else 1)],
                "IPv6Data": draw(st.lists(st.just({"Pool": "fd00::/64"}), max_size=1)) if wild else []}
    if method in ("NetworkDriver.DeleteNetwork", "NetworkDriver.FreeNetwork"):
        return {"NetworkID": _id(draw, method, "NetworkID", real.network_id, wild=wild)}
    if method in FIELDS and "EndpointID" in FIELDS[method]:
        body = {"NetworkID": _id(draw, method, "NetworkID", real.network_id, wild=wild),
                "EndpointID": _id(draw, method, "EndpointID", real.endpoint_id, wild=wild),
                "Options": draw(options_map if wild else st.just({}))}
        if method == "NetworkDriver.CreateEndpoint":
            body["Interface"] = draw(st.one_of(st.none(), st.fixed_dictionaries({
                "Address": wild_text if wild else clean_address.map(lambda a: a.split("/")[0] + "/24"),
                "AddressIPv6": st.sampled_from(["", "fd00::7/64"]) if wild else st.just(""),
                "MacAddress": mac if wild else st.sampled_from(["", "02:42:0a:05:22:07"])})))
        if method == "NetworkDriver.Join":
            body["SandboxKey"] = draw(st.text(max_size=40) if wild else st.just("/var/run/docker/netns/0123456789ab"))
        return body
    if method in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete"):
        return {"DiscoveryType": draw(st.integers(0, 3)), "DiscoveryData": draw(json_value)}
    if method == "NetworkDriver.AllocateNetwork":
        return {"NetworkID": draw(fresh_id), "Options": {}, "IPv4Data": [], "IPv6Data": []}
    if method == "IpamDriver.RequestPool":
        v6 = draw(st.one_of(st.booleans(), json_leaf) if wild else st.booleans())
        pools = st.just("fd00:5:0:27::/64") if v6 is True else clean_pool  # a V6 pool is an IPv6 network
        return {"AddressSpace": draw(address_spaces if wild else st.sampled_from(["", "pyflannel-local"])),
                "Pool": draw(text if wild else st.one_of(st.just(""), pools)),
                "SubPool": draw(text if wild else st.just("")),
                "Options": draw(st.one_of(string_options, options_map) if wild else string_options), "V6": v6}
    if method == "IpamDriver.ReleasePool":
        choices = [pool_ids, st.just(real.pool_id)]
        return {"PoolID": draw(st.one_of(*choices))}
    if method == "IpamDriver.RequestAddress":
        opts = st.one_of(string_options, st.just({"RequestAddressType": "com.docker.network.gateway"}))
        return {"PoolID": draw(pool_ids), "Address": draw(text if wild else st.one_of(st.just(""), clean_address)),
                "Options": draw(st.one_of(opts, options_map) if wild else opts)}
    if method == "IpamDriver.ReleaseAddress":
        return {"PoolID": draw(pool_ids), "Address": draw(text if wild else clean_address)}
    return {}


# --- calls --------------------------------------------------------------------------------------------------------

def known_call(kind: str, method: str, body: bytes, **kw) -> Call:
    return Call(kind=kind, verb="POST", name=method, path="/" + method, body=body, **kw)


def for_json_body(kind: str, method: str, body: bytes, **kw) -> Call:
    """What a known method must answer to `body`, judged from what it parses to (as the driver parses it)."""
    if method in BODILESS:
        return known_call(kind, method, body, statuses=frozenset({200}), reply=BODILESS[method], **kw)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # "not valid JSON" or "nested too deeply" (the depth limit is the stack's)
        if body.strip() == b"":
            value = None
        else:
            return known_call(kind, method, body, statuses=frozenset({400}), err_prefix="request body ", **kw)
    if not isinstance(value, dict):
        return known_call(kind, method, body, statuses=frozenset({400}), err_prefix="request body ", **kw)
    if depth(value) > 200:  # may be "nested too deeply" for the server, whose stack is deeper than ours
        return known_call(kind, method, body, statuses=frozenset({200, 400, 409}), **kw)
    if method in NO_OP:
        return known_call(kind, method, body, statuses=frozenset({200}), reply=NO_OP[method], **kw)
    return known_call(kind, method, body, **kw)


def depth(value) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            todo.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            todo.extend((child, level + 1) for child in node)
    return deepest


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def first_bad_id(method: str, body: dict) -> str | None:
    """The id field the driver checks first and must refuse (ids are checked before anything else), if any."""
    for name in ("NetworkID", "EndpointID"):
        if FIELDS.get(method, {}).get(name, ("", False))[0] != "id":
            continue
        value = body.get(name)
        if not (isinstance(value, str) and ID_RE.fullmatch(value)):
            return name
    return None


def validated_fields(method: str, kinds=None) -> list[str]:
    return [f for f, (k, _) in FIELDS.get(method, {}).items() if k != "any" and (kinds is None or k in kinds)]


BROKEN_CHUNKS = [b"zz\r\n", b"-1\r\n", b"\r\n", b"5\r\nhelloXX\r\n", b"0x5\r\nhello\r\n"]


@st.composite
def plugin_calls(draw, real: Real) -> list[Call]:
    """One fuzz case: a list of one or two calls; 1 in 20 with broken chunked framing."""
    framing = draw(st.integers(0, 19))
    extra = {"content_type": draw(st.one_of(st.none(), st.none(), st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
         CONTENT_TYPE, "application/json; charset=utf-16"]))), "chunked": framing <= 2}
    calls = _cases(draw, real, extra)
    if framing == 0:
        junk = draw(st.sampled_from(BROKEN_CHUNKS))
        calls = [_broken(replace(call, chunk_junk=junk, same_as_previous=False)) for call in calls]
    return calls


def _broken(call: Call) -> Call:
    """With broken chunks a call that reads its body is refused (404/405 come first; bodiless calls ignore it)."""
    if call.verb == "POST" and call.name.lstrip("/") in FIELDS:
        if 404 in call.statuses:  # "///M": served as M or not at all
            return replace(call, statuses=frozenset({400, 404}), err_prefix=None, reply=None)
        return replace(call, statuses=frozenset({400}), err_prefix="request body cannot be read", reply=None)
    return call


def _cases(draw, real: Real, extra: dict) -> list[Call]:
    kind = draw(st.sampled_from(["wild", "wild", "wrong_type", "wrong_type", "values", "values", "missing", "extra",
                                 "nested", "nested", "limits", "random_json", "random_json", "bad_json", "garbage",
                                 "unknown", "verb"]))
    slot = None
    if kind in ("wrong_type", "missing"):  # a field of any method, each field equally likely
        slot = draw(st.sampled_from(SLOTS))
        method = slot[0]
    elif kind == "values":  # each kind of field equally likely (the one MTU field as likely as all the strings)
        field_kind = draw(st.sampled_from(sorted(HOSTILE)))
        slot = draw(st.sampled_from([s for s in SLOTS if s[2] == field_kind]))
        method = slot[0]
    else:
        method = draw(st.sampled_from(KNOWN))

    if kind in ("wild", "wrong_type", "missing", "extra", "nested", "limits") and method in BODILESS:
        kind = "random_json"  # nothing to mutate: send it a random body instead
    if kind == "wild":
        body = template(draw, method, real, wild=True)
        bad = first_bad_id(method, body)
        if bad:
            return [known_call(kind, method, dumps(body), statuses=frozenset({400}), err_prefix=bad + ":", **extra)]
        return [for_json_body(kind, method, dumps(body), **extra)]
    if kind == "wrong_type":  # one field, at the top or nested, gets a value of another type
        _, path, field_kind, _, label = slot
        body = template(draw, method, real, wild=False)
        put(body, path, draw(NOT_OF_KIND[field_kind]))
        return [known_call(kind, method, dumps(body), statuses=frozenset({400}), err_prefix=label + ":", **extra)]
    if kind == "values":  # one field gets a value of the right type that is hard to validate
        _, path, field_kind, _, label = slot
        body = template(draw, method, real, wild=False)
        value = draw(HOSTILE[field_kind])
        put(body, path, value)
        bad = first_bad_id(method, body)
        if bad or (field_kind == "mtu" and mtu_refused(value)):
            return [known_call(kind, method, dumps(body), statuses=frozenset({400}),
                               err_prefix=(bad or label) + ":", **extra)]
        return [for_json_body(kind, method, dumps(body), **extra)]
    if kind == "missing":  # one field, at the top or nested, is left out or null
        _, path, _, required, label = slot
        body = template(draw, method, real, wild=False)
        put(body, path, None, delete=draw(st.booleans()))
        if required:
            return [known_call(kind, method, dumps(body), statuses=frozenset({400}), err_prefix=f"{label}: is missing"
                               if path[-1] != 0 else f"{label}: must be", **extra)]
        return [for_json_body(kind, method, dumps(body), **extra)]
    if kind == "extra":
        body = template(draw, method, real, wild=draw(st.booleans()))
        more = draw(st.dictionaries(st.text(max_size=15).filter(lambda k: k not in FIELDS[method]), json_value,
                                    min_size=1, max_size=5))
        first = for_json_body(kind, method, dumps(body), **extra)
        if first_bad_id(method, body):
            first = replace(first, statuses=frozenset({400}))
        return [first, replace(first, body=dumps({**body, **more}), same_as_previous=True)]
    if kind == "nested":
        body = template(draw, method, real, wild=draw(st.booleans()))
        _mutate_somewhere(draw, body)
        bad = first_bad_id(method, body)
        call = for_json_body(kind, method, dumps(body), **extra)
        return [replace(call, statuses=frozenset({400}), err_prefix=bad + ":") if bad else call]
    if kind == "limits":
        return [_over_limit(draw, method, real, extra)]
    if kind == "random_json":
        value = draw(st.one_of(json_value, st.dictionaries(st.sampled_from(sorted(FIELDS.get(method, {"x": 0}))),
                                                             json_value, max_size=4)))
        return [for_json_body(kind, method, json.dumps(value).encode(draw(st.sampled_from(
            ["utf-8", "utf-8", "utf-16", "utf-32"]))), **extra)]
    if kind == "bad_json":
        good = dumps(template(draw, method, real, wild=True)) if method in FIELDS else b'{"a": [1, {"b": null}]}'
        body = draw(st.one_of(
            st.integers(0, len(good) - 1).map(lambda n: good[:n]),                     # truncated
            st.integers(0, len(good) - 1).flatmap(lambda n: st.binary(min_size=1, max_size=3).map(
                lambda junk: good[:n] + junk + good[n:])),                            # corrupted
            st.text(max_size=40).map(str.encode),                                     # text
            st.sampled_from([b"{", b"}", b"[", b"{'NetworkID': 'x'}", b'{"a":1,}', b"nul", b"true false", b"{}{}",
                             b'{"a": 1e999999}', b'{"a": "\\ud800"}', b'{"a": "\\x"}', b"\xef\xbb\xbf{}",
                             b'{"a": 0' + b"1" * 5000 + b"}"]),
            st.integers(1, 100_000).map(lambda n: b"[" * n),                          # deep nesting
            st.integers(1, 5_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))
        return [for_json_body(kind, method, body, **extra)]
    if kind == "garbage":
        body = draw(st.one_of(st.binary(max_size=200),
                              st.integers(1, 200_000).map(lambda n: random.Random(n).randbytes(n))))
        return [for_json_body(kind, method, body, **extra)]
    if kind == "unknown":
        name = draw(st.one_of(
            st.text(max_size=40),
            st.sampled_from(KNOWN).flatmap(lambda k: st.sampled_from([
                k.lower(), k.upper(), k + ".", k + " ", " " + k, k + "/", "/" + k, k + "\x00", k[:-1], k + "s",
                "./" + k, k.replace(".", "/"), k.replace(".", ""), k + "?x=1", k + "#x"])),
            st.sampled_from(["Plugin.Deactivate", "NetworkDriver.", "IpamDriver.", "", ".", "..",
                             "NetworkDriver.GetCapabilities.", "IpamDriver.RequestPools", "NetworkDriver.Foo"])))
        if name in KNOWN:
            name += "_"
        path = "/" + urllib.parse.quote(name, safe=draw(st.sampled_from(["", "/", "/.-_~"])))
        body = dumps(draw(json_value))
        if name.startswith("/") and name.lstrip("/") in KNOWN:
            # werkzeug merges repeated slashes, so "///M" may be served as M (a URL normalisation; Docker sends /M)
            as_method = for_json_body(kind, name.lstrip("/"), body, **extra)
            return [replace(as_method, name=name, path=path, statuses=as_method.statuses | {404}, err_prefix=None,
                            reply=None)]
        return [Call(kind=kind, verb="POST", name=name, path=path, body=body, statuses=frozenset({404}), **extra)]
    # kind == "verb": every other HTTP method is refused (HEAD with an empty body)
    verb = draw(st.sampled_from(["GET", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW", "PROPFIND"]))
    body = b"" if verb in ("GET", "HEAD") and draw(st.booleans()) else dumps(template(draw, method, real, wild=True))
    return [Call(kind=kind, verb=verb, name=method, path="/" + method, body=body, statuses=frozenset({405}), **extra)]


def put(body: dict, path: tuple, value, *, delete: bool = False) -> None:
    """Set (or delete) body[path[0]][path[1]]..., making the containers on the way objects if they are not."""
    node = body
    for key in path[:-1]:
        if isinstance(key, int):
            if not node:
                node.append({})
        elif not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def _mutate_somewhere(draw, value) -> None:
    """Replace one value anywhere inside `value` (a dict or list), or add a key, with random JSON."""
    node = value
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        node[key] = draw(json_value)
        return
    if isinstance(node, dict):
        node[draw(st.text(max_size=8))] = draw(json_value)
    else:
        node.append(draw(json_value))


def _over_limit(draw, method: str, real: Real, extra: dict) -> Call:
    """A field over the validator's size limits: long strings, big maps and lists. Always 400 naming the field."""
    body = template(draw, method, real, wild=False)
    choices = validated_fields(method, ("id", "str", "map", "list"))
    if not choices:
        body["x"] = "x" * draw(st.integers(MAX_STRING, 50_000))
        return for_json_body("limits", method, dumps(body), **extra)
    name = draw(st.sampled_from(choices))
    kind = FIELDS[method][name][0]
    if kind in ("id", "str"):
        body[name] = draw(st.sampled_from("0a")) * draw(st.integers(MAX_STRING + 1, 60_000))
    elif kind == "map":
        size = draw(st.integers(MAX_MAP_ENTRIES + 1, 2000))
        body[name] = {f"k{i}": "v" for i in range(size)}
    else:
        item = body[name][0] if body.get(name) else {"Pool": LEASE}
        body[name] = [item] * draw(st.integers(MAX_LIST_ITEMS + 1, 200))
    return known_call("limits", method, dumps(body), statuses=frozenset({400}), err_prefix=name + ":", **extra)


def huge_calls() -> list[Call]:
    """A few bodies of 2-5 MB (the driver refuses anything over 1 MiB; bodiless calls ignore the body)."""
    mib = 1 << 20
    rnd = random.Random(20)
    too_big = frozenset({400})
    return [
        known_call("huge", "NetworkDriver.CreateNetwork", dumps({"NetworkID": "a" * (2 * mib)}), statuses=too_big,
                   err_prefix="request body is larger"),
        known_call("huge", "IpamDriver.RequestPool", rnd.randbytes(3 * mib), statuses=too_big,
                   err_prefix="request body is larger"),
        known_call("huge", "NetworkDriver.Join", b"[" + b"0," * (5 * mib // 2) + b"0]", statuses=too_big,
                   err_prefix="request body is larger"),
        known_call("huge", "NetworkDriver.CreateEndpoint", b'{"Options": {' + b",".join(
            b'"k%d": "%s"' % (i, b"v" * 100) for i in range(25_000)) + b"}}", statuses=too_big, chunked=True,
                   err_prefix="request body is larger"),
        known_call("huge", "Plugin.Activate", b"\x00" * (4 * mib), statuses=frozenset({200}),
                   reply=BODILESS["Plugin.Activate"]),
        Call("huge", "POST", "NetworkDriver.NoSuchMethod", "/NetworkDriver.NoSuchMethod", b"{" * (3 * mib),
             statuses=frozenset({404})),
        Call("huge", "GET", "NetworkDriver.Leave", "/NetworkDriver.Leave", b" " * (2 * mib), statuses=frozenset({405})),
    ]


def found_before() -> list[Call]:
    """What this fuzzer found in the driver once, sent every time (the random part finds them only most of the time)."""
    net, ep = "a" * 64, "b" * 64
    mtu_label = f"Options[{GENERIC!r}][{MTU!r}]:"

    def create_network(mtu_option) -> bytes:
        return dumps({"NetworkID": net, "Options": {GENERIC: {MTU: mtu_option}}, "IPv4Data": [{"Pool": LEASE}]})

    return [
        # "$" let an id or a MAC end in a newline
        known_call("found", "NetworkDriver.DeleteNetwork", dumps({"NetworkID": net[:12] + "\n"}),
                   statuses=frozenset({400}), err_prefix="NetworkID:"),
        known_call("found", "NetworkDriver.CreateEndpoint", dumps({"NetworkID": net, "EndpointID": ep, "Interface": {
            "Address": "10.5.34.7/24", "MacAddress": "02:42:0a:05:22:07\n"}}), statuses=frozenset({400}),
                   err_prefix="Interface.MacAddress:"),
        # MTU digits: "²" and 4301+ digits made int() raise (500), other scripts' digits were read as ASCII ones
        *[known_call("found", "NetworkDriver.CreateNetwork", create_network(mtu_option), statuses=frozenset({400}),
                     err_prefix=mtu_label) for mtu_option in ["\u00b2", "1" * 5000, "\u0661\u0664\u0660\u0660",
                                                              "\u09ed0"]],
        # ... and leading zeros are fine (as for Docker): a valid MTU, refused only because the host has a network
        known_call("found", "NetworkDriver.CreateNetwork", create_network("0" * 4300 + "1400"),
                   statuses=frozenset({409}), err_prefix="this host already has a Docker network on"),
        # calls with nothing to do took any body
        *[known_call("found", method, body, statuses=frozenset({400}), err_prefix="request body ")
          for method in NO_OP for body in (b"", b"null", b"[1]", b'"x"')],
        # Flask answered OPTIONS itself: 200, text/html, empty
        Call("found", "OPTIONS", "Plugin.Activate", "/Plugin.Activate", statuses=frozenset({405})),
        # (a chunked body over 1 MiB, and broken chunk framing: in huge_calls() and protocol_garbage())
    ]


# --- the client ---------------------------------------------------------------------------------------------------

class PluginSocket:
    """HTTP/1.1 over the driver's Unix socket on one persistent connection, reopened when the server closes it.

    Written by hand so that every byte sent is the fuzzer's choice, and so that a server answering early and closing
    (a refused huge body) still yields the reply."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.connections = 0
        self.sent = 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def _connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)
        self.buf = b""
        self.connections += 1

    def request(self, call: Call) -> tuple[int, dict, bytes]:
        head = [f"{call.verb} {call.path} HTTP/1.1", "Host: localhost",
                "Accept: application/vnd.docker.plugins.v1.2+json"]
        if call.content_type:
            head.append(f"Content-Type: {call.content_type}")
        if call.chunked:
            head.append("Transfer-Encoding: chunked")
            step = 65536
            payload = b"".join(b"%x\r\n%s\r\n" % (len(call.body[i:i + step]), call.body[i:i + step])
                               for i in range(0, len(call.body), step)) + (call.chunk_junk or b"0\r\n\r\n")
        else:
            head.append(f"Content-Length: {len(call.body)}")
            payload = call.body
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        self.sent += len(data)
        for attempt in (1, 2):
            reused = self.sock is not None
            if not reused:
                self._connect()
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may have answered already (and closed): read what it sent
            try:
                reply = self._response(call.verb)
                if call.chunk_junk:
                    self.close()  # where the next request would start is anybody's guess
                return reply
            except EOFError:
                self.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle keep-alive connection before our request: resend
                raise
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise EOFError("connection closed by the driver")
        self.buf += chunk

    def _response(self, verb: str) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            if self.buf == b"":
                self._fill()
                continue
            try:
                self._fill()
            except EOFError:
                raise AssertionError(f"connection closed in the middle of a reply: {self.buf[:200]!r}") from None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ")[:2]
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        code = int(status)
        if verb == "HEAD" or code < 200 or code in (204, 304):
            body = b""
        elif "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._fill()
            body, self.buf = self.buf[:length], self.buf[length:]
        else:
            assert "chunked" not in headers.get("transfer-encoding", ""), "chunked reply"
            while True:
                try:
                    self._fill()
                except EOFError:
                    break
            body, self.buf = self.buf, b""
            self.close()
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            self.close()
        return code, headers, body


def protocol_garbage(sock_path: str) -> int:
    """Broken HTTP, each on its own connection. gunicorn answers these itself (HTML 400/414/431) before the driver
    sees them, so only the status line is checked here; what matters is that the worker survives."""
    rnd = random.Random(7)
    cases = [rnd.randbytes(200), rnd.randbytes(5000) + b"\r\n\r\n", b"\x00\x01\x02\r\n\r\n", b"\r\n\r\n",
             b"POST /Plugin.Activate HTTP/9.9\r\n\r\n", b"POST  HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
             b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
             b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
             b"POST /NetworkDriver.Join HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
             b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
             b"POST /Plugin.Activate HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
             b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"]  # body cut short
    for case in cases:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(sock_path)
            s.sendall(case)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        assert data == b"" or re.match(rb"HTTP/1\.[01] (200|400|404|414|431) ", data), (case[:100], data[:300])
    return len(cases)


# --- the run ------------------------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.requests = 0
        self.statuses = collections.Counter()
        self.kinds = collections.Counter()
        self.previous: tuple[int, dict] | None = None


def check(conn: PluginSocket, tally: Tally, call: Call) -> None:
    status, headers, data = conn.request(call)
    tally.requests += 1
    tally.statuses[status] += 1
    tally.kinds[call.kind] += 1
    where = f"{call.show()}\n -> {status} {headers.get('content-type')} {data[:500]!r}"
    assert status in DOCUMENTED, where
    assert status in call.statuses, where
    assert headers.get("content-type") == CONTENT_TYPE, where
    if call.verb == "HEAD":
        assert data == b"", where
        return
    try:
        reply = json.loads(data)
    except ValueError:
        raise AssertionError(f"reply is not JSON: {where}") from None
    assert isinstance(reply, dict), where
    if status == 200:
        assert not reply.get("Err"), where
    else:
        assert isinstance(reply.get("Err"), str) and reply["Err"].strip(), where
        assert "Traceback" not in reply["Err"], where
        if call.path.startswith("/IpamDriver."):
            assert reply.get("Error") == reply["Err"], where
    if call.err_prefix is not None:
        assert reply["Err"].startswith(call.err_prefix), where
    if call.reply is not None:
        assert reply == call.reply, where
    if call.same_as_previous:
        assert (status, reply) == tally.previous, f"extra fields changed the reply {tally.previous}: {where}"
    tally.previous = (status, reply)


def setup_call(conn: PluginSocket, method: str, body: dict) -> dict:
    status, _, data = conn.request(known_call("setup", method, dumps(body)))
    reply = json.loads(data)
    assert status == 200 and not reply.get("Err"), (method, status, reply)
    return reply


def kernel(netns: str) -> dict:
    def ip(*args: str) -> str:
        return subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, check=True).stdout
    return {"links": ip("-o", "link"), "addresses": ip("-o", "addr"), "routes": ip("route", "show", "table", "all")}


def settled_kernel(netns: str) -> dict:
    """The namespace once it stops changing on its own (e.g. interfaces coming up)."""
    last = kernel(netns)
    for _ in range(20):
        time.sleep(0.25)
        now = kernel(netns)
        if now == last:
            return now
        last = now
    return last


def diff(what: str, before: str, after: str) -> str:
    if before == after:
        return ""
    return f"{what}:\n" + "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after",
                                                          lineterm=""))


def state_files(state_dir: str) -> dict:
    return {name: open(os.path.join(state_dir, name), "rb").read() for name in sorted(os.listdir(state_dir))}


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_fuzz_the_plugin_socket(ns, tmp_path):  # noqa: F811 (ns is the imported fixture)
    with running_driver(ns, tmp_path) as (proc, sock):
        conn = PluginSocket(sock)
        tally = Tally()

        # one real network with one joined endpoint, made the way Docker makes them
        pool = setup_call(conn, "IpamDriver.RequestPool", {"AddressSpace": "pyflannel-local", "Pool": "",
                                                           "SubPool": "", "Options": {}, "V6": False})
        gateway = setup_call(conn, "IpamDriver.RequestAddress", {
            "PoolID": pool["PoolID"], "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
        real = Real(network_id=uuid.uuid4().hex + uuid.uuid4().hex, endpoint_id=uuid.uuid4().hex + uuid.uuid4().hex,
                    pool_id=pool["PoolID"])
        setup_call(conn, "NetworkDriver.CreateNetwork", {
            "NetworkID": real.network_id, "IPv6Data": [],
            "Options": {"com.docker.network.generic": {"com.docker.network.driver.mtu": "1400"},
                        "com.docker.network.enable_ipv6": False},
            "IPv4Data": [{"AddressSpace": "pyflannel-local", "Pool": pool["Pool"], "Gateway": gateway["Address"],
                          "AuxAddresses": {}}]})
        address = setup_call(conn, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                                 "Options": {}})
        setup_call(conn, "NetworkDriver.CreateEndpoint", {
            "NetworkID": real.network_id, "EndpointID": real.endpoint_id, "Options": {},
            "Interface": {"Address": address["Address"], "AddressIPv6": "", "MacAddress": ""}})
        joined = setup_call(conn, "NetworkDriver.Join", {"NetworkID": real.network_id, "EndpointID": real.endpoint_id,
                                                         "SandboxKey": "/var/run/docker/netns/fuzz", "Options": {}})
        state_dir = str(tmp_path / "state")
        state_before = state_files(state_dir)
        saved = json.loads(state_before["state.json"])
        assert list(saved["networks"]) == [real.network_id] and list(saved["endpoints"]) == [real.endpoint_id]
        assert saved["pools"][real.pool_id]["allocated"] == [address["Address"].split("/")[0]]
        kernel_before = settled_kernel(ns)
        assert f"pfl-{real.network_id[:8]}" in kernel_before["links"]
        assert joined["InterfaceName"]["SrcName"] in kernel_before["links"]
        assert "10.5.34.1/24" in kernel_before["addresses"]
        master, workers = proc.pid, children(proc.pid)
        assert workers, "gunicorn has no worker"

        started = time.monotonic()
        for call in huge_calls() + found_before():
            check(conn, tally, call)

        examples = 0

        def fuzz_round(count: int) -> None:
            @settings(max_examples=count, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
            @given(st.lists(plugin_calls(real), min_size=1, max_size=2 * BATCH))
            def fuzz(batch):
                nonlocal examples
                examples += 1
                for calls in batch:
                    for call in calls:
                        check(conn, tally, call)
                assert proc.poll() is None, "the driver exited"
                assert children(master) == workers, "a gunicorn worker was restarted"

            fuzz()

        while tally.requests < TOTAL_REQUESTS:
            fuzz_round(max(10, (TOTAL_REQUESTS - tally.requests) // BATCH))
        conn.close()
        broken_http = protocol_garbage(sock)
        elapsed = time.monotonic() - started

        # no crash: same master, same workers, nothing alarming in gunicorn's log
        assert proc.poll() is None and proc.pid == master
        assert children(master) == workers, "a gunicorn worker was restarted"
        log = (tmp_path / "driver.log").read_text(errors="replace")
        assert log.count("Booting worker") == len(workers), f"a gunicorn worker was restarted:\n{log[-5000:]}"
        for bad in ("Traceback", "Worker exiting", "WORKER TIMEOUT", "Error handling request", "Logging error",
                    " ERROR ", "[ERROR]", "[CRITICAL]"):
            assert bad not in log, f"{bad!r} in the driver's log:\n{log[-5000:]}"

        # nothing changed: state file byte for byte (and as data), the namespace's links, addresses and routes
        state_after, kernel_after = state_files(state_dir), kernel(ns)
        changes = [diff(f"state dir {name}", state_before.get(name, b"").decode(errors="replace"),
                        state_after.get(name, b"").decode(errors="replace"))
                   for name in sorted(set(state_before) | set(state_after))]
        changes += [diff(f"ip {what}", kernel_before[what], kernel_after[what]) for what in kernel_before]
        if json.loads(state_after["state.json"]) != saved:
            changes.append("state.json holds different data")
        changes = [c for c in changes if c]
        assert not changes, "the fuzz changed the driver's state or the kernel:\n" + "\n".join(changes)

        print(f"\nfuzz: {tally.requests} requests ({conn.sent / 1e6:.1f} MB) in {elapsed:.1f} s "
              f"({tally.requests / elapsed:.0f}/s), {examples} Hypothesis examples, {conn.connections} connections, "
              f"+{broken_http} connections of broken HTTP (answered by gunicorn)")
        print("fuzz: statuses " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items())))
        print("fuzz: kinds " + ", ".join(f"{k}: {n}" for k, n in sorted(tally.kinds.items())))
        assert tally.requests >= TOTAL_REQUESTS
