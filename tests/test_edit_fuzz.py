"""A differential fuzz of edits of the session list against a live server.

Thousands of edit-config, edit-data and RESTCONF (PATCH and POST) requests, each a mix of
valid entries (TCP, UDP and ICMP, IPv4 and IPv6, with and without source and destination
NAT, values written canonically or not) with mutations of every kind injected, a good share
of them past 64 KiB (where the server reads an edit's text without a tree) and the rest
small, are sent byte for byte; tests/edit_oracle.py works out, from the same bytes, whether
each must be accepted and what running then holds, and get-data after each request must
agree. The run is seeded: FUZZ_SEED=N repeats one, FUZZ_PAYLOADS=N sets its length.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
from lxml import etree

from .edit_oracle import KEYS, LEAVES, NC, NCDS, NS, RESTCONF, Held, Oracle, Policy, Refused
from .rawclient import RawClient
from .restconf_client import XML, Restconf, start_with_restconf

PAYLOADS = int(os.environ.get("FUZZ_PAYLOADS", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
LARGE = 64 << 10  # bytes from which the server reads an edit's text without its tree
POLICY = Policy(432000, 400000, 400000, 400000)  # nothing a run writes times out in it
POLICY_XML = (f'<nat-policy xmlns="{NS}"><timeouts><tcp-transitory>400000</tcp-transitory>'
              "<udp>400000</udp><icmp>400000</icmp></timeouts></nat-policy>")
TCP_STATES = ("none", "syn-sent", "syn-recv", "established", "fin-wait", "close-wait",
              "last-ack", "time-wait", "close", "syn-sent2")


# -- valid entries ---------------------------------------------------------------------------
def session(rnd: random.Random, key_space: int) -> dict[str, str]:
    """A valid session's leaves as canonical text, in model order."""
    v6 = rnd.random() < 0.4
    protocol = rnd.choice(["TCP", "TCP", "UDP", "ICMPv6" if v6 else "ICMP"])
    n = rnd.randrange(key_space)
    icmp = protocol.startswith("ICMP")
    leaves = {
        "protocol": protocol,
        "src_address": f"2001:db8::{n % 4000 + 1:x}" if v6 else
        f"10.1.{n // 250 % 250}.{n % 250 + 1}",
        "src_port": str(0 if icmp and rnd.random() < 0.1 else n % 60000 + 1024),
        "dst_address": f"2001:db8:1::{rnd.randrange(1, 9):x}" if v6 else
        f"192.0.2.{rnd.randrange(1, 9)}",
        "dst_port": "0" if icmp else rnd.choice(["53", "80", "443"]),
    }
    if rnd.random() < 0.6:
        leaves["translated_address"] = f"2001:db8:ff::{rnd.randrange(1, 5)}" if v6 else \
            f"198.51.100.{rnd.randrange(1, 5)}"
        leaves["translated_port"] = str(rnd.randrange(1024, 65536))
    if rnd.random() < 0.3:
        leaves["translated_dst_address"] = f"2001:db8:fe::{rnd.randrange(1, 5)}" if v6 else \
            f"203.0.113.{rnd.randrange(1, 5)}"
        leaves["translated_dst_port"] = rnd.choice(["8080", "8443"])
    if protocol == "TCP":
        leaves["tcp_state"] = rnd.choice(TCP_STATES)
        if rnd.random() < 0.5:
            leaves["src_window_scale"] = str(rnd.randrange(15))
            leaves["dst_window_scale"] = str(rnd.randrange(15))
    leaves["timeout"] = str(rnd.randrange(100000, 1 << 32))
    if rnd.random() < 0.5:
        for counter in ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes"):
            leaves[counter] = str(rnd.randrange(1 << rnd.choice([8, 32, 64])))
    return leaves


class Entry:
    """An entry as text in pieces, for mutations to work on."""

    def __init__(self, leaves: dict[str, str]):
        self.start = "nat-session"
        self.attributes = f' xmlns="{NS}"'
        self.leaves = [[name, "", value] for name, value in leaves.items()]  # name, attrs, text
        self.between = [""] * (len(self.leaves) + 1)
        self.raw: str | None = None  # the whole entry, once a mutation wrote it as text

    def text(self) -> str:
        if self.raw is not None:
            return self.raw
        inner = "".join(gap + ((text or "") if name is None else  # an odd child, as it is
                               f"<{name}{attrs}/>" if text is None else
                               f"<{name}{attrs}>{text}</{name}>")
                        for gap, (name, attrs, text) in zip(self.between, self.leaves,
                                                            strict=False))
        return f"<{self.start}{self.attributes}>{inner}{self.between[-1]}</{self.start}>"


# -- mutations -------------------------------------------------------------------------------
NON_CANONICAL = {
    "src_port": ["00{}", "+{}", " {} ", "\t{}\n"], "timeout": ["0{}", "+{}", " {}"],
    "src_address": ["{upper}", " {}", "{}%eth0"], "tcp_state": [" {} ", "{upper}"],
}
BAD_VALUES = {
    "src_port": ["65536", "-1", "0x10", "", "1e3", "\u0663", "7&amp;1", "7&lt;"],
    "dst_port": ["70000", "abc"], "translated_port": ["65536", "+1"],
    "src_window_scale": ["15", "255", "-0"], "timeout": ["4294967296", "1.5"],
    "orig_bytes": ["18446744073709551616", "-1"], "protocol": ["tcp", "SCTP", "TCP "],
    "tcp_state": ["ESTABLISHED", "bogus"], "src_address": ["10.0.0.256", "010.0.0.1", "::g"],
    "translated_address": ["1.2.3", "fe80::1%eth0"],
}
ODD_CHILDREN = ['<bogus xmlns="urn:evil"/>', "<session-count/>", "<nat-state/>", "<x>1</x>",
                f'<nc:protocol xmlns:nc="{NC}">TCP</nc:protocol>', "<tcp_state></tcp_state>",
                "<timeout/>", f'<tcp_state xmlns:nc="{NC}" nc:operation="delete"/>',
                f'<src_window_scale xmlns:nc="{NC}" nc:operation="remove"/>',
                f'<timeout xmlns:nc="{NC}" nc:operation="delete"/>',
                f'<reply_bytes xmlns:nc="{NC}" nc:operation="delete">junk</reply_bytes>']
ODD_ATTRIBUTES = [' colour="red"', ' xmlns:e="urn:e" e:x="1"', ' xml:lang="en"',
                  ' operation="delete"', ' operation="create"', f' xmlns:nc="{NC}" nc:foo="1"',
                  ' xmlns:y="urn:ietf:params:xml:ns:yang:1" y:insert="first"']
INSERTS = ["<?p x?>", "<!--c-->", "<![CDATA[1]]>", "&#55;", " ", "\n\t", "x", "<x/>", "&amp;"]


def operation_attribute(rnd: random.Random, leaf: bool = False) -> str:
    value = rnd.choice(["merge", "replace", "create", "delete", "remove", "remove", "delete"]
                       if leaf else ["merge", "replace", "create", "delete", "remove", "frob",
                                     "none", ""])
    return f' xmlns:nc="{NC}" nc:operation="{value}"'


def mutate(rnd: random.Random, entry: Entry, others: list[Entry],
           namespaces: bool = True) -> None:
    """One change of any kind to the entry: most keep it well-formed, many keep it valid."""
    kind = rnd.randrange(22)
    leaves = entry.leaves
    if not leaves:
        return
    pick = rnd.randrange(len(leaves))
    name = leaves[pick][0] or "x"
    if kind == 0:  # two keys swapped
        i, j = rnd.sample(range(len(KEYS)), 2)
        leaves[i], leaves[j] = leaves[j], leaves[i]
    elif kind == 1 and len(leaves) > len(KEYS):  # a non-key leaf moved (before the keys too)
        leaf = leaves.pop(rnd.randrange(len(KEYS), len(leaves)))
        leaves.insert(rnd.randrange(len(leaves) + 1), leaf)
    elif kind == 2:  # a leaf dropped
        del leaves[pick]
    elif kind == 3:  # a leaf twice
        leaves.insert(pick, list(leaves[pick]) if rnd.random() < 0.5 else
                      [name, "", rnd.choice(["1", "TCP", "10.0.0.1"])])
    elif kind in (4, 5):  # something inside a value, or between leaves
        at = rnd.randrange(len(leaves[pick][2] or " ") + 1)
        text = leaves[pick][2] or ""
        if kind == 4:
            leaves[pick][2] = text[:at] + rnd.choice(INSERTS) + text[at:]
        else:
            entry.between[rnd.randrange(len(entry.between))] += rnd.choice(INSERTS)
    elif kind == 6:  # a character as a reference
        text = leaves[pick][2] or "1"
        at = rnd.randrange(len(text))
        leaves[pick][2] = f"{text[:at]}&#{ord(text[at])};{text[at + 1:]}"
    elif kind == 7:  # an odd child
        leaves.insert(rnd.randrange(len(leaves) + 1), [None, "", rnd.choice(ODD_CHILDREN)])
    elif kind == 8:  # an odd attribute on the entry or a leaf
        if rnd.random() < 0.5:
            entry.attributes += rnd.choice(ODD_ATTRIBUTES)
        else:
            leaves[pick][1] += rnd.choice(ODD_ATTRIBUTES)
    elif kind == 9:  # the entry's operation
        entry.attributes += operation_attribute(rnd)
    elif kind in (10, 11):  # a leaf's operation, perhaps on an empty leaf
        leaves[pick][1] += operation_attribute(rnd, leaf=True)
        if rnd.random() < 0.5:
            leaves[pick][2] = None if rnd.random() < 0.5 else ""
    elif kind == 12:  # a value out of range or of the wrong type
        bad = rnd.choice(list(BAD_VALUES))
        for leaf in leaves:
            if leaf[0] == bad:
                leaf[2] = rnd.choice(BAD_VALUES[bad])
    elif kind == 13:  # a value valid but not canonical
        for leaf in leaves:
            forms = NON_CANONICAL.get(leaf[0])
            if forms and leaf[2]:
                form = rnd.choice(forms)
                leaf[2] = leaf[2].upper() if form == "{upper}" else form.format(leaf[2])
    elif kind == 14:  # empty or self-closing
        leaves[pick][2] = None if rnd.random() < 0.5 else ""
    elif kind == 15:  # addresses of the other IP version
        for leaf in leaves:
            if leaf[0] in ("dst_address", "translated_address", "translated_dst_address") \
                    and rnd.random() < 0.6:
                leaf[2] = "2001:db8:9::9" if "." in (leaf[2] or "") else "192.0.2.99"
    elif kind == 16:  # ICMP of the other IP version
        leaves[0][2] = rnd.choice(["ICMP", "ICMPv6"])
    elif kind == 17 and others:  # an entry's key again
        other = rnd.choice(others)
        for i in range(min(len(KEYS), len(leaves), len(other.leaves))):
            leaves[i] = list(other.leaves[i])
    elif kind == 18 and namespaces:  # another namespace, or a prefix
        entry.attributes = rnd.choice([' xmlns=""', f' xmlns="{NC}"', ' xmlns="urn:evil"'])
        if rnd.random() < 0.5:
            entry.start = "n:nat-session"
            entry.attributes = f' xmlns:n="{NS}"' + (' xmlns="urn:evil"' if rnd.random() < 0.5
                                                     else f' xmlns="{NS}"')
    elif kind == 19:  # whitespace and pretty printing
        entry.between = [gap + rnd.choice(["\n  ", "\t", " ", "\r\n"]) for gap in entry.between]
    elif kind == 20:  # a leaf with a child element
        leaves[pick][2] = (leaves[pick][2] or "") + rnd.choice(["<x/>", f'<y xmlns="{NS}">1</y>'])
    else:  # a prefixed leaf
        leaves[pick][0] = f"p:{name}" if rnd.random() < 0.7 else name
        leaves[pick][1] += f' xmlns:p="{NS if rnd.random() < 0.7 else "urn:evil"}"'
    entry.between += [""] * (len(leaves) + 1 - len(entry.between))


# -- requests --------------------------------------------------------------------------------
def request(rnd: random.Random, held: dict, kind: str, large: bool) -> tuple[bytes, str, str]:
    """A request's bytes, the kind of request the oracle reads it as, and its transport."""
    key_space = 200000 if large else 600
    count = rnd.randrange(250, 330) if large else 1 if kind == "post" else rnd.randrange(1, 5)
    sessions = [session(rnd, key_space) for _ in range(count)]
    if held and rnd.random() < 0.6:  # entries of what running holds: for create, delete...
        for i in rnd.sample(range(count), min(count, rnd.randrange(1, 4))):
            values = rnd.choice(list(held.values())).values
            sessions[i] = {n: str(values[n]) for n in LEAVES if values.get(n) is not None
                           and (n in KEYS or rnd.random() < 0.5)}
    entries = [Entry(s) for s in sessions]
    mutations = 0 if rnd.random() < 0.25 else rnd.choice([1, 1, 1, 2, 3])
    for _ in range(mutations):
        victim = rnd.choice(entries)
        mutate(rnd, victim, [e for e in entries if e is not victim], kind != "post")
    if kind != "post" and rnd.random() < 0.2:  # an operation on some entries
        for entry in rnd.sample(entries, min(len(entries), 3)):
            if "operation" not in entry.attributes:
                entry.attributes += operation_attribute(rnd)
    body = "".join(entry.text() for entry in entries)
    if kind == "patch":
        return (f'<data xmlns="{RESTCONF}">{body}</data>').encode(), "patch", "patch"
    if kind == "post":  # the oracle reads it as the body of a datastore's PATCH
        return body.encode(), "post", "post"
    default = rnd.choice([None, None, "merge", "merge", "none", "replace"])
    config_op = rnd.choice([""] * 8 + [f' nc:operation="{op}"' for op in
                                       ("merge", "create", "frob")])
    if default == "replace":  # it replaces the policy too: the run's is kept in it
        body = POLICY_XML + "".join(e.text() for e in [Entry(s) for s in sessions])
        config_op = ""
    declarations = f' xmlns:nc="{NC}"' if rnd.random() < 0.7 else ""
    options = f"<default-operation>{default}</default-operation>" if default else ""
    ns = NC if kind == "edit-config" else NCDS
    target = "<target><running/></target>" if kind == "edit-config" else \
        '<datastore xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores">ds:running</datastore>'
    if "nc:operation" in config_op and not declarations:
        declarations = f' xmlns:nc="{NC}"'
    config = f"<config{declarations}{config_op}>{body}</config>"
    # A comment in the envelope keeps a large edit whole (its tree parsed, its text read),
    # where without one it is read from its text alone.
    note = "<!-- an operator's note -->" if rnd.random() < 0.3 else ""
    declaration = '<?xml version="1.0" encoding="UTF-8"?>\n' if rnd.random() < 0.3 else ""
    payload = (f'{declaration}<rpc xmlns="{NC}" message-id="1"><{kind} xmlns="{ns}">{note}'
               f"{target}{options}{config}</{kind}></rpc>").encode()
    return payload, kind, "netconf"


# -- the run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv, port = start_with_restconf(tmp_path_factory.mktemp("fuzz"), "--max-message-size", "8m")
    yield srv, Restconf(srv, port)
    srv.stop()


def running(client: RawClient) -> bytes:
    return client.rpc(f'<get-data xmlns="{NCDS}" xmlns:ds="urn:ietf:params:xml:ns:yang:'
                      'ietf-datastores"><datastore>ds:running</datastore></get-data>')


def table(reply: bytes) -> dict[tuple, dict[str, str]]:
    root = etree.fromstring(reply, etree.XMLParser(huge_tree=True))
    found = {}
    for entry in root.iter(f"{{{NS}}}nat-session"):
        leaves = {etree.QName(c).localname: c.text for c in entry}
        found[tuple(leaves[k] for k in KEYS)] = leaves
    return found


def without_timeouts(reply: bytes) -> bytes:
    return re.sub(rb"<timeout>[0-9]+</timeout>", b"", reply)


def counted_down(before: bytes, after: bytes, since: float) -> bool:
    """Whether each timeout in ``after`` is the one in ``before`` as counted down since."""
    elapsed = time.monotonic() - since
    pairs = zip(re.findall(rb"<timeout>([0-9]+)<", before),
                re.findall(rb"<timeout>([0-9]+)<", after), strict=True)
    return all(0 <= int(old) - int(new) <= elapsed + 2 for old, new in pairs)


def disagreement(expected: dict[tuple, Held], found: dict[tuple, dict[str, str]]) -> str | None:
    now = time.monotonic()
    wanted = {tuple(str(h.values[k]) for k in KEYS): h for h in expected.values()}
    if set(wanted) != set(found):
        return (f"keys: missing {sorted(set(wanted) - set(found))[:3]}, "
                f"unexpected {sorted(set(found) - set(wanted))[:3]}")
    for key, held in wanted.items():
        leaves = found[key]
        for name in LEAVES:
            value = held.values.get(name)
            if name == "timeout":
                if abs(int(leaves[name]) - held.timeout(now)) > 3 + held.rewrites:
                    return f"{key}: timeout {leaves[name]}, expected {held.timeout(now):.0f}"
            elif (None if value is None else str(value)) != leaves.get(name):
                return f"{key}: {name} is {leaves.get(name)!r}, expected {value!r}"
    return None


def send(client: RawClient, rc: Restconf, payload: bytes, transport: str) -> bool:
    """Whether the server accepted the request."""
    if transport == "netconf":
        reply = client.send_raw(payload)
        assert b"<ok/>" in reply or b"<rpc-error>" in reply, reply[:500]
        return b"<ok/>" in reply
    reply = rc.request("PATCH" if transport == "patch" else "POST", "/restconf/data",
                       payload, content_type=XML, accept=XML)
    assert reply.status < 500 or "internal error" not in reply.text, reply.text
    return reply.status < 300


def test_edits_agree_with_libyang_and_rfc_6241(server, tmp_path):
    srv, rc = server
    client = RawClient(srv.port, srv.user, srv.password, base11=True)
    oracle = Oracle(POLICY)
    rnd = random.Random(SEED)
    reset = (f'<rpc xmlns="{NC}" message-id="1"><edit-config><target><running/></target>'
             "<default-operation>replace</default-operation>"
             f"<config>{POLICY_XML}</config></edit-config></rpc>").encode()
    assert b"<ok/>" in client.send_raw(reset)
    held: dict[tuple, Held] = {}
    # running as read after the last request (and without its timeouts): what a refusal
    # left as it was needs no parsing
    last, last_reply, last_time = None, b"", 0.0
    failures = []
    counts = {"accepted": 0, "refused": 0, "large": 0}
    started = time.monotonic()
    for number in range(PAYLOADS):
        kind = rnd.choices(["edit-config", "edit-data", "patch", "post"], [55, 20, 20, 5])[0]
        large = kind != "post" and rnd.random() < 0.3
        payload, read_as, transport = request(rnd, held, kind, large)
        counts["large"] += len(payload) >= LARGE
        try:
            expected = oracle.outcome(held, f'<data xmlns="{RESTCONF}">'.encode() + payload +
                                      b"</data>", "patch", forced="create") \
                if read_as == "post" else oracle.outcome(held, payload, read_as)
            why = None
        except Refused as exc:
            expected, why = held, str(exc)
        accepted = send(client, rc, payload, transport)
        reply = running(client)
        masked = without_timeouts(reply)
        problem = None
        if accepted != (why is None):
            problem = f"server {'accepted' if accepted else 'refused'}; oracle: {why or 'accept'}"
        elif masked != last or accepted or not counted_down(last_reply, reply, last_time):
            problem = disagreement(expected, table(reply))
        if problem:
            path = Path(tmp_path) / f"payload-{number}.xml"
            path.write_bytes(payload)
            failures.append(f"#{number} {transport} ({len(payload)} bytes, {path}): {problem}")
            if len(failures) >= 5:
                break
            assert b"<ok/>" in client.send_raw(reset)  # start again from a known table
            held, last = {}, None
            continue
        last, last_reply, last_time = masked, reply, time.monotonic()
        held = expected
        counts["accepted" if accepted else "refused"] += 1
        if len(held) > 400:
            assert b"<ok/>" in client.send_raw(reset)
            held, last = {}, None
    client.close()
    elapsed = time.monotonic() - started
    print(f"seed {SEED}: {PAYLOADS} payloads in {elapsed:.1f} s, {counts}")
    assert not failures, f"FUZZ_SEED={SEED}: " + "\n".join(failures)
    assert counts["large"] > PAYLOADS // 5 and counts["refused"] > PAYLOADS // 10
