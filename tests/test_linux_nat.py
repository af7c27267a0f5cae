"""Linux kernel NAT to Linux kernel NAT through two nfmig servers, with live connections.

Each test builds its own hosts in namespaces (client, NAT A, NAT B, server), runs one
`nfmig serve --backend linux` per NAT, moves the sessions with ncclient (get-data on A,
edit-config on B, delete on A), switches the gateway addresses over and checks that the
user's connection carries on: same translated address and port, no reset, no packet
leaving untranslated. One test moves a single subscriber while the others stay on NAT A.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NatClient
from nfmig.client.relay import move_sessions

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the kernel NAT tests must not skip", pytrace=False)
    pytest.skip("network namespaces and conntrack need root", allow_module_level=True)

from nfmig.testbed import TestBed  # noqa: E402

TRAFFIC = str(Path(__file__).with_name("traffic.py"))
NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
POLICY = (f'<nat-policy xmlns="{NAT_NS}"><inside-interface>inside</inside-interface>'
          "<outside-interface>outside</outside-interface>"
          f"<inside-prefix>{TestBed.INSIDE_PREFIX}</inside-prefix>"
          f"<external-address>{TestBed.EXTERNAL}</external-address>"
          "<port-min>20000</port-min><port-max>29999</port-max></nat-policy>")
WATCH = """table inet watch {
  counter untranslated {
  }
  counter resets {
  }
  chain input {
    type filter hook input priority 0; policy accept;
    ip saddr 10.0.0.0/24 counter name untranslated
    tcp flags rst counter name resets
  }
  chain output {
    type filter hook output priority 0; policy accept;
    tcp flags rst counter name resets
  }
}
"""


class Nat:
    """One NAT instance: its namespace and its NETCONF server."""

    def __init__(self, bed: TestBed, netns: str, workdir: Path, backend: str = "linux"):
        self.netns = netns
        self.server = start_local_server(workdir, "--backend", backend, "--netns", netns)
        self.client = NatClient("127.0.0.1", self.server.port, self.server.user,
                                self.server.password, hostkey_verify=False)
        self.client.edit(POLICY)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()


@pytest.fixture
def bed():
    with TestBed() as testbed:
        for ns in (testbed.server, testbed.client):
            testbed.run(ns, "nft", "-f", "-", input=WATCH)
        yield testbed


def start_pair(bed: TestBed, tmp_path: Path, b_backend: str = "linux",
               names: tuple[str, str] = ("a", "b")) -> tuple[Nat, Nat]:
    """A server on NAT A (Linux) and on NAT B, each with POLICY; neither left running if
    the other cannot start."""
    a = Nat(bed, bed.nat_a, tmp_path / names[0])
    try:
        b = Nat(bed, bed.nat_b, tmp_path / names[1], backend=b_backend)
    except BaseException:
        a.close()
        raise
    return a, b


@pytest.fixture
def nats(bed, tmp_path):
    a, b = start_pair(bed, tmp_path)
    bed.activate(bed.nat_a)
    yield a, b
    a.close()
    b.close()


def start(bed: TestBed, ns: str, *args: str) -> subprocess.Popen:
    return bed.popen(ns, sys.executable, TRAFFIC, *args, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)


def open_tcp(bed: TestBed, port: int, size: int
             ) -> tuple[subprocess.Popen, subprocess.Popen, list[str]]:
    """A TCP connection from the client to the server through the active NAT, greeted and
    waiting for "go": the server's and the client's process, and the peer the server saw."""
    server = start(bed, bed.server, "tcp-server", str(port), str(size))
    expect(server, "listening")
    client = start(bed, bed.client, "tcp-client", TestBed.SERVER, str(port), str(size))
    expect(client, "ready")
    return server, client, expect(server, "ready")


def open_udp(bed: TestBed, port: int, first: str
             ) -> tuple[subprocess.Popen, subprocess.Popen, list[str]]:
    """A UDP flow from the client to the server through the active NAT, greeted (one
    datagram each way) and waiting for "go"; ``first`` is who sends after it."""
    server = start(bed, bed.server, "udp-server", str(port), first)
    expect(server, "listening")
    client = start(bed, bed.client, "udp-client", TestBed.SERVER, str(port), first)
    expect(client, "ready")
    return server, client, expect(server, "ready")


def expect(proc: subprocess.Popen, word: str) -> list[str]:
    line = proc.stdout.readline().split()
    assert line and line[0] == word, f"expected {word!r}, got {line!r}"
    return line[1:]


def go(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def migrate(a: Nat, b: Nat, bed: TestBed) -> str:
    """Move every session of A to B through the servers (A's get-data streamed into
    edit-configs on B), delete them on A, then switch the gateway over."""
    body = move_sessions(a.client, b.client).sessions_xml
    assert "<nat-session" in body, "NAT A has no session to move"
    a.client.delete_sessions(body)
    bed.switch_over(a.netns, b.netns)
    return body


def counter(bed: TestBed, ns: str, name: str) -> int:
    out = bed.run(ns, "nft", "list", "counter", "inet", "watch", name).stdout
    return int(out.split("packets")[1].split()[0])


def assert_clean(bed: TestBed) -> None:
    for ns in (bed.server, bed.client):
        assert counter(bed, ns, "resets") == 0, f"a TCP reset was seen in {ns}"
    assert counter(bed, bed.server, "untranslated") == 0, "a packet left untranslated"


def translated_ports(nat: Nat, protocol: str) -> set[tuple[str, str]]:
    body, _ = nat.client.get_sessions()
    out = set()
    for entry in body.split("<nat-session")[1:]:
        if f"<protocol>{protocol}</protocol>" in entry:
            address = entry.split("<translated_address>")[1].split("<")[0]
            port = entry.split("<translated_port>")[1].split("<")[0]
            out.add((address, port))
    return out


def test_tcp_connection_survives_migration_with_strict_tracking(bed, nats):
    a, b = nats
    server, client, peer_before = open_tcp(bed, 5001, 2 << 20)
    assert peer_before[0] == TestBed.EXTERNAL
    migrate(a, b, bed)
    assert translated_ports(b, "TCP") == {tuple(peer_before)}
    go(server, client)  # the server sends first, then the client
    assert expect(server, "done") == peer_before
    expect(client, "done")
    assert_clean(bed)


@pytest.mark.parametrize("first", ["server", "client"])
def test_udp_flow_survives_migration(bed, nats, first):
    a, b = nats
    server, client, peer_before = open_udp(bed, 5002, first)
    migrate(a, b, bed)
    go(server, client)
    assert expect(server, "done") == peer_before
    expect(client, "done")
    assert_clean(bed)


def test_moved_session_keeps_counting_from_the_source_counts(bed, nats):
    a, b = nats
    server, client, _ = open_udp(bed, 5005, "client")
    before = udp_counts(a)
    assert before[0] == before[2] == 1  # the greeting, one datagram each way
    migrate(a, b, bed)
    assert udp_counts(b) == before  # B's kernel has counted nothing yet
    go(server, client)  # one more datagram each way, through B
    expect(server, "done")
    expect(client, "done")
    after = udp_counts(b)
    assert (after[0], after[2]) == (before[0] + 1, before[2] + 1)
    assert after[1] > before[1] and after[3] > before[3]


def udp_counts(nat: Nat) -> tuple[int, int, int, int]:
    """orig packets, orig bytes, reply packets, reply bytes of the NAT's one UDP session."""
    body, _ = nat.client.get_sessions()
    entries = [e for e in body.split("<nat-session")[1:] if "<protocol>UDP<" in e]
    assert len(entries) == 1, f"expected one UDP session, found {len(entries)}"
    return tuple(int(entries[0].split(f"<{leaf}>")[1].split("<")[0])
                 for leaf in ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes"))


def test_thousand_concurrent_flows_from_several_subscribers_all_continue(bed, nats):
    a, b = nats
    subscribers = [f"10.0.0.{10 + i}" for i in range(8)]
    bed.add_client_addresses(subscribers)
    server = start(bed, bed.server, "tcp-many-server", "5004", "1000")
    expect(server, "listening")
    client = start(bed, bed.client, "tcp-many-client", TestBed.SERVER, "5004", "1000",
                    ",".join(subscribers))
    assert expect(client, "ready") == ["1000"]
    assert expect(server, "ready") == ["1000"]  # 1000 distinct translated endpoints
    before = translated_ports(a, "TCP")
    migrate(a, b, bed)
    assert translated_ports(b, "TCP") == before
    go(server, client)
    assert expect(server, "done") == ["1000"]
    assert expect(client, "done") == ["1000"]
    assert_clean(bed)


def test_migrated_sessions_leave_nat_a(bed, nats):
    a, b = nats
    server, client, _ = open_udp(bed, 5003, "client")
    migrate(a, b, bed)
    assert translated_ports(a, "UDP") == set()
    assert len(translated_ports(b, "UDP")) == 1
    go(server, client)
    expect(server, "done")


# The subscriber that moves alone, and the external address only it is translated to.
MOVING = "10.0.0.12"
MOVING_EXTERNAL = "192.0.2.2"
SUBSCRIBERS = ["10.0.0.11", MOVING, "10.0.0.13", "10.0.0.14"]


def mapping(*pairs: tuple[str, str]) -> str:
    entries = "".join(f"<address-mapping><inside-prefix>{prefix}</inside-prefix>"
                      f"<external-address>{external}</external-address></address-mapping>"
                      for prefix, external in pairs)
    return f'<nat-policy xmlns="{NAT_NS}">{entries}</nat-policy>'


def sessions_by_source(nat: Nat) -> dict[str, set[tuple[str, str, str]]]:
    """(protocol, translated address, translated port) of every session, by source."""
    body, _ = nat.client.get_sessions()
    names = ("src_address", "protocol", "translated_address", "translated_port")
    out = defaultdict(set)
    for entry in etree.fromstring(f"<data>{body}</data>"):
        source, *translation = (entry.findtext(f"{{{NAT_NS}}}{name}") for name in names)
        out[source].add(tuple(translation))
    return dict(out)


def open_flows(bed: TestBed, sources: list[str], size: int) -> tuple[dict, dict, dict]:
    """A TCP connection and a UDP flow from each source address to the server, established
    and waiting for go: (server processes, client processes, peers the server saw), each by
    source address."""
    firsts = ["server", "client"] * len(sources)  # who speaks first after go, alternating
    servers = {source: [start(bed, bed.server, "tcp-server", str(5100 + i), str(size)),
                        start(bed, bed.server, "udp-server", str(5200 + i), firsts[i])]
               for i, source in enumerate(sources)}
    for procs in servers.values():
        for proc in procs:
            expect(proc, "listening")
    clients = {source: [
        start(bed, bed.client, "tcp-client", TestBed.SERVER, str(5100 + i), str(size), source),
        start(bed, bed.client, "udp-client", TestBed.SERVER, str(5200 + i), firsts[i], source)]
        for i, source in enumerate(sources)}
    peers = {}
    for source in sources:
        for proc in clients[source]:
            expect(proc, "ready")
        peers[source] = [tuple(expect(proc, "ready")) for proc in servers[source]]
    return servers, clients, peers


def test_address_mappings_become_nat_rules_ahead_of_the_pool_longest_prefix_first(bed, nats):
    a, _ = nats
    a.client.edit(mapping(("10.0.0.0/28", "192.0.2.3"), (f"{MOVING}/32", MOVING_EXTERNAL)))
    out = bed.run(a.netns, "nft", "list", "chain", "ip", "nfmig", "postrouting").stdout
    rules = [(line.split(" saddr ")[1].split()[0], line.split("snat to ")[1].strip())
             for line in out.splitlines() if "snat to" in line]
    assert rules == [(MOVING, f"{MOVING_EXTERNAL}:20000-29999"), (MOVING, MOVING_EXTERNAL),
                     ("10.0.0.0/28", "192.0.2.3:20000-29999"), ("10.0.0.0/28", "192.0.2.3"),
                     ("10.0.0.0/24", f"{TestBed.EXTERNAL}:20000-29999"),
                     ("10.0.0.0/24", TestBed.EXTERNAL)]


def test_one_subscriber_moves_to_nat_b_while_the_others_stay_on_nat_a(bed, nats):
    a, b = nats
    # Both NATs translate the subscriber to its own address: A for the sessions it opens
    # now, B for any it opens after the move.
    for nat in (a, b):
        nat.client.edit(mapping((f"{MOVING}/32", MOVING_EXTERNAL)))
    bed.activate_addresses(a.netns, outside=[MOVING_EXTERNAL])
    bed.activate_addresses(b.netns, inside=[TestBed.SECOND_GATEWAY])
    bed.add_client_addresses(SUBSCRIBERS)
    servers, clients, peers = open_flows(bed, SUBSCRIBERS, 1 << 20)
    before = sessions_by_source(a)
    assert before.keys() == set(SUBSCRIBERS)
    assert {address for _, address, _ in before[MOVING]} == {MOVING_EXTERNAL}
    assert {(address, port) for _, address, port in before[MOVING]} == set(peers[MOVING])
    staying = {s: sessions for s, sessions in before.items() if s != MOVING}
    assert {address for sessions in staying.values() for _, address, _ in sessions} \
        == {TestBed.EXTERNAL}

    body = move_sessions(a.client, b.client, match={"src_address": MOVING}).sessions_xml
    a.client.delete_sessions(body)
    bed.move_subscriber(MOVING, MOVING_EXTERNAL, a.netns, b.netns, via=TestBed.SECOND_GATEWAY)

    assert sessions_by_source(b) == {MOVING: before[MOVING]}
    assert sessions_by_source(a) == staying
    go(*(proc for source in SUBSCRIBERS for proc in servers[source] + clients[source]))
    for source in SUBSCRIBERS:
        assert [tuple(expect(proc, "done")) for proc in servers[source]] == peers[source]
        for proc in clients[source]:
            expect(proc, "done")
    # No packet of the moved subscriber went through A afterwards (a UDP one would have
    # opened a session there), and B carried nobody else.
    assert sessions_by_source(b).keys() == {MOVING}
    assert sessions_by_source(a).keys() == staying.keys()
    assert_clean(bed)


# -- what a migrator relies on: the change feed and the migration window -----------------------
LISTENER = ("import socket,sys,time\ns=socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind(('',int(sys.argv[1])))\ns.listen(16)\nprint('listening',flush=True)\n"
            "conns=[]\nend=time.time()+30\n"
            "while time.time()<end:\n s.settimeout(end-time.time())\n"
            " try: conns.append(s.accept()[0])\n except OSError: break\n")
CONNECT = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),"
           "timeout=float(sys.argv[3])).close()\nexcept OSError: sys.exit(1)\n")


def listen(bed: TestBed, port: int) -> subprocess.Popen:
    proc = bed.popen(bed.server, sys.executable, "-c", LISTENER, str(port),
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["listening"]
    return proc


def connects(bed: TestBed, port: int, timeout: float = 1.5) -> bool:
    """Whether a new TCP connection from the client reaches the server within timeout."""
    done = bed.run(bed.client, sys.executable, "-c", CONNECT, TestBed.SERVER, str(port),
                   str(timeout), check=False)
    return done.returncode == 0


def watcher(nat: Nat) -> manager.Manager:
    m = manager.connect(host="127.0.0.1", port=nat.server.port, username=nat.server.user,
                        password=nat.server.password, hostkey_verify=False,
                        allow_agent=False, look_for_keys=False, timeout=30)
    m.create_subscription()
    return m


def changes_seen(m: manager.Manager, port: int, seconds: float = 5) -> list[etree._Element]:
    """The sessions-changed entries about connections to ``port`` within ``seconds``."""
    ns = {"n": NAT_NS}
    found: list[etree._Element] = []
    deadline = time.monotonic() + seconds
    while not found and time.monotonic() < deadline:
        note = m.take_notification(timeout=max(0.1, deadline - time.monotonic()))
        if note is None:
            break
        root = etree.fromstring(note.notification_xml.encode())
        found += [c for c in root.iterfind(".//n:change", ns)
                  if c.findtext("n:dst_port", namespaces=ns) == str(port)]
    return found


def test_connection_through_the_nat_reaches_subscribers_as_created_session(bed, nats):
    a, _ = nats
    listener = listen(bed, 5011)
    m = watcher(a)
    try:
        assert connects(bed, 5011)
        change = changes_seen(m, 5011)[0]
        ns = {"n": NAT_NS}
        assert change.findtext("n:event", namespaces=ns) == "created"
        assert change.findtext("n:src_address", namespaces=ns) == TestBed.CLIENT
        assert change.findtext("n:translated_address", namespaces=ns) == TestBed.EXTERNAL
    finally:
        m.close_session()
        listener.kill()


def test_frozen_subscribers_open_no_new_connection_until_thawed(bed, nats):
    a, _ = nats
    listener = listen(bed, 5012)
    freeze = (f'<freeze xmlns="{NAT_NS}"><migration-id>t-1</migration-id>'
              f"<source-prefix>{TestBed.INSIDE_PREFIX}</source-prefix></freeze>")
    try:
        a.client.m.dispatch(etree.fromstring(freeze))
        assert not connects(bed, 5012)
        a.client.m.dispatch(etree.fromstring(
            f'<thaw xmlns="{NAT_NS}"><migration-id>t-1</migration-id></thaw>'))
        assert connects(bed, 5012)
    finally:
        listener.kill()


def test_freeze_lets_established_connections_flow(bed, nats):
    a, _ = nats
    server, client, _ = open_tcp(bed, 5013, 1 << 20)
    a.client.m.dispatch(etree.fromstring(
        f'<freeze xmlns="{NAT_NS}"><migration-id>t-2</migration-id></freeze>'))
    go(server, client)
    expect(server, "done")
    expect(client, "done")
    assert_clean(bed)


# -- the kernel table through the datastore, without traffic ----------------------------------
def kernel_session(sport: int, operation: str, timeout: int = 300) -> str:
    return (f'<nat-session xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0" '
            f'nc:operation="{operation}"><protocol>TCP</protocol>'
            f"<src_address>{TestBed.CLIENT}</src_address><src_port>{sport}</src_port>"
            f"<dst_address>{TestBed.SERVER}</dst_address><dst_port>80</dst_port>"
            f"<translated_address>{TestBed.EXTERNAL}</translated_address>"
            f"<translated_port>{sport}</translated_port><tcp_state>established</tcp_state>"
            f"<timeout>{timeout}</timeout></nat-session>")


def kernel_timeouts(nat: Nat) -> dict[int, int]:
    """Source port -> remaining timeout of every session in the NAT's kernel."""
    body, _ = nat.client.get_sessions()
    return {int(entry.split("<src_port>")[1].split("<")[0]):
            int(entry.split("<timeout>")[1].split("<")[0])
            for entry in body.split("</nat-session>")[:-1]}


def session_count(nat: Nat) -> int:
    reply = nat.client.m.dispatch(etree.fromstring(
        '<get-data xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-nmda" '
        'xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores"><datastore>ds:operational'
        f'</datastore><subtree-filter><nat-state xmlns="{NAT_NS}"/></subtree-filter>'
        "</get-data>"))
    return int(etree.fromstring(reply.xml.encode()).findtext(f".//{{{NAT_NS}}}session-count"))


def test_kernel_entries_are_found_by_key_and_counted(nats):
    a, _ = nats
    a.client.edit(kernel_session(21001, "create") + kernel_session(21002, "create"))
    assert session_count(a) == 2
    with pytest.raises(RPCError) as exists:
        a.client.edit(kernel_session(21001, "create"))
    assert exists.value.tag == "data-exists"
    a.client.edit(kernel_session(21001, "delete"))
    assert session_count(a) == 1
    with pytest.raises(RPCError) as missing:
        a.client.edit(kernel_session(21001, "delete"))
    assert missing.value.tag == "data-missing"


# A bulk edit creates its sessions and lets the kernel say which it holds already.
def test_a_bulk_merge_updates_the_sessions_already_there_and_creates_the_rest(nats):
    a, _ = nats
    a.client.edit(kernel_session(23010, "merge", timeout=100))
    a.client.edit("".join(kernel_session(23000 + i, "merge", timeout=600) for i in range(100)))
    timeouts = kernel_timeouts(a)
    assert set(timeouts) == set(range(23000, 23100))
    assert 500 < timeouts[23010] <= 600  # updated, not created again


def test_a_bulk_merge_keeps_what_it_leaves_out_of_a_session_already_there(nats):
    a, _ = nats
    a.client.edit(kernel_session(23510, "merge", timeout=100))
    without_timeout = [kernel_session(23500 + i, "merge").replace(
        "<timeout>300</timeout>", "") for i in range(100)]
    a.client.edit("".join(without_timeout))
    timeouts = kernel_timeouts(a)
    assert set(timeouts) == set(range(23500, 23600))
    assert timeouts[23510] <= 100  # merged: the timeout it had, not the policy's
    assert timeouts[23511] > 100


def test_a_bulk_create_that_meets_an_existing_session_changes_nothing(nats):
    a, _ = nats
    a.client.edit(kernel_session(24050, "merge", timeout=100))
    with pytest.raises(RPCError) as exists:
        a.client.edit("".join(kernel_session(24000 + i, "create") for i in range(100)))
    assert exists.value.tag == "data-exists"
    timeouts = kernel_timeouts(a)
    assert set(timeouts) == {24050}  # none of the new ones, and the old one kept
    assert timeouts[24050] <= 100


# A batch of deletes and removes only asks the kernel which keys it holds, and deletes those.
def test_a_bulk_delete_naming_a_session_not_there_deletes_nothing(nats):
    a, _ = nats
    a.client.edit("".join(kernel_session(26000 + i, "merge") for i in range(100)))
    with pytest.raises(RPCError) as missing:
        a.client.edit("".join(kernel_session(26000 + i, "delete") for i in range(101)))
    assert missing.value.tag == "data-missing"
    assert "26100" in (missing.value.path or "")
    assert set(kernel_timeouts(a)) == set(range(26000, 26100))


def test_a_bulk_remove_takes_away_what_is_there_and_passes_over_the_rest(nats):
    a, _ = nats
    a.client.edit("".join(kernel_session(26200 + i, "merge") for i in range(100)))
    a.client.edit("".join(kernel_session(26150 + i, "remove") for i in range(100)))
    assert set(kernel_timeouts(a)) == set(range(26250, 26300))
    a.client.edit("".join(kernel_session(26250 + i, "delete") for i in range(50)))
    assert kernel_timeouts(a) == {}


def with_counts(entry: str, counts: tuple[int, int, int, int]) -> str:
    leaves = "".join(f"<{name}>{value}</{name}>" for name, value in zip(
        ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes"), counts, strict=True))
    return entry.replace("</timeout>", "</timeout>" + leaves)


def kernel_counts(nat: Nat) -> dict[int, tuple[int, ...]]:
    """Source port -> the four counts of every session in the NAT's kernel."""
    body, _ = nat.client.get_sessions()
    return {int(entry.split("<src_port>")[1].split("<")[0]):
            tuple(int(entry.split(f"<{name}>")[1].split("<")[0]) for name in (
                "orig_packets", "orig_bytes", "reply_packets", "reply_bytes"))
            for entry in body.split("</nat-session>")[:-1]}


def test_sessions_of_a_bulk_edit_report_the_counts_they_brought(nats):
    a, _ = nats
    counts = {25000 + i: (i + 1, 1000 * (i + 1), 2 * i, 500 * i) for i in range(100)}
    a.client.edit("".join(with_counts(kernel_session(port, "merge"), c)
                          for port, c in counts.items()))
    assert kernel_counts(a) == counts  # no traffic: the kernel has counted nothing since


def test_a_bulk_edit_whose_entry_takes_another_ones_port_changes_nothing(nats):
    a, _ = nats
    entries = [kernel_session(26000 + i, "merge") for i in range(100)]
    # The last session translates to the first one's port towards the same server: the
    # reply tuples clash, which the kernel refuses.
    entries[-1] = entries[-1].replace("<translated_port>26099<", "<translated_port>26000<")
    with pytest.raises(RPCError) as taken:
        a.client.edit("".join(entries))
    assert "port taken" in str(taken.value)
    assert "[src_port='26099']" in taken.value.path  # the entry the kernel refused
    assert kernel_timeouts(a) == {}
