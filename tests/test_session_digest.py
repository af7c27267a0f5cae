"""rpc session-digest (a count and an order-independent digest of the sessions) and the
migrator's verify that relies on it, through real `nfmig serve` processes (simulated NAT).

The digest is checked against the client-side definition (nfmig/digest.py) over what a
get-data returns; verify against the full read it stands in for: a target that holds what
was moved is verified by the digest alone, any other falls back to the read, which decides.
"""

from __future__ import annotations

import secrets

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from nfmig.client.endpoints import Connection, Credentials, Endpoint
from nfmig.client.migrate import Migration, Options
from nfmig.client.selection import Selection, parse_entries, removal_xml

from nfmig.digest import EMPTY, digest_text, entries_digest

from .restconf_client import Restconf, start_with_restconf
from .test_migrate import NAT_NS, NO_HOST_KEY_CHECK, Nat, migrate, session
from .test_restconf_migrate import Both


def entry(proto: str, src: str, sport: int, dst: str, dport: int, **leaves) -> str:
    """A nat-session entry; ``leaves`` in the model's order (translated_*, tcp_state,
    counters...)."""
    rest = "".join(f"<{name}>{value}</{name}>" for name, value in leaves.items())
    return (f'<nat-session xmlns="{NAT_NS}"><protocol>{proto}</protocol><src_address>{src}'
            f"</src_address><src_port>{sport}</src_port><dst_address>{dst}</dst_address>"
            f"<dst_port>{dport}</dst_port>{rest}</nat-session>")


MIXED = [
    # source NAT: TCP, UDP, ICMP echo (address only), over IPv4 and IPv6
    entry("TCP", "10.1.0.1", 40000, "198.51.100.9", 443, translated_address="192.0.2.1",
          translated_port=20000, tcp_state="established", orig_packets=12, orig_bytes=900),
    entry("UDP", "10.1.0.2", 5353, "198.51.100.53", 53, translated_address="192.0.2.1",
          translated_port=20001),
    entry("ICMP", "10.2.0.3", 77, "198.51.100.1", 0, translated_address="192.0.2.2"),
    entry("TCP", "2001:db8:1::7", 41000, "2001:db8:ff::9", 443,
          translated_address="2001:db8:beef::1", translated_port=30000, tcp_state="syn-sent"),
    entry("ICMPv6", "2001:db8:2::8", 9, "2001:db8:ff::1", 0),
    entry("UDP", "2001:db8:1::9", 6000, "2001:db8:ff::53", 53),
    # destination NAT, alone and with source NAT
    entry("TCP", "10.2.0.4", 42000, "192.0.2.80", 80, translated_dst_address="10.9.0.80",
          translated_dst_port=8080, tcp_state="established"),
    entry("TCP", "10.1.0.5", 43000, "192.0.2.81", 443, translated_address="192.0.2.3",
          translated_port=20002, translated_dst_address="10.9.0.81", translated_dst_port=8443,
          tcp_state="established"),
]


def digest(conn, *prefixes: str, datastore: str | None = None) -> tuple[int, str]:
    """(count, digest) as the server answers rpc session-digest."""
    output = conn.nat_rpc_output("session-digest", datastore=datastore,
                                 **{"source-prefix": list(prefixes) or None})
    root = etree.fromstring(f"<output>{output}</output>")
    return int(root.findtext(f"{{{NAT_NS}}}count")), root.findtext(f"{{{NAT_NS}}}digest")


def computed(conn, selection: Selection | None = None) -> tuple[int, str]:
    """(count, digest) computed here, over what a get-data of running returns."""
    selection = selection or Selection.all()
    entries = [e for e in parse_entries(conn.get_data("running", selection.filter_xml()))
               if selection.matches(e)]
    count, total = entries_digest((e.key, e.xml) for e in entries)
    return count, digest_text(total)


@pytest.fixture
def nat(nats) -> Nat:
    (empty,) = nats(0)
    return empty


# -- the rpc ---------------------------------------------------------------------------------
def test_digest_of_an_empty_datastore_is_zero(nat):
    assert digest(nat.conn) == (0, EMPTY)


def test_digest_is_the_client_side_definition_over_what_get_data_returns(nat):
    nat.plant(*MIXED)
    answered = digest(nat.conn)
    assert answered == computed(nat.conn)
    assert answered[0] == len(MIXED)


def test_digest_matches_the_example_in_the_model(nat):
    nat.plant(entry("TCP", "10.0.0.7", 40000, "198.51.100.9", 443,
                    translated_address="192.0.2.1", translated_port=20000))
    assert digest(nat.conn) == (1, "c2d6d3108c41a87b")


def test_digest_changes_when_a_translated_endpoint_changes(nat):
    nat.plant(*MIXED)
    before = digest(nat.conn)
    nat.plant(entry("TCP", "10.2.0.4", 42000, "192.0.2.80", 80, translated_dst_port=8081))
    after = digest(nat.conn)
    assert after[0] == before[0] and after[1] != before[1]


def test_digest_does_not_change_with_counters(nat):
    nat.plant(*MIXED)
    before = digest(nat.conn)
    nat.plant(entry("TCP", "10.1.0.1", 40000, "198.51.100.9", 443, orig_packets=5000,
                    orig_bytes=7000000, reply_packets=4000, reply_bytes=9000000))
    assert digest(nat.conn) == before


def test_source_prefixes_select_the_sessions_inside_them(nat):
    nat.plant(*MIXED)
    prefixes = ("10.1.0.0/16", "2001:db8:1::/48")
    selected = digest(nat.conn, *prefixes)
    assert selected == computed(nat.conn, Selection.subscribers(*prefixes))
    assert selected[0] == 5


def test_operational_has_the_digest_of_running(nat):
    nat.plant(*MIXED)
    assert digest(nat.conn, datastore="operational") == digest(nat.conn)


def test_a_datastore_other_than_running_or_operational_is_refused(nat):
    with pytest.raises(RPCError) as refused:
        digest(nat.conn, datastore="candidate")
    assert refused.value.tag == "invalid-value"


@pytest.fixture
def restconf(tmp_path):
    server, port = start_with_restconf(tmp_path, "--sessions", "40")
    yield Restconf(server, port)
    server.stop()


def test_restconf_serves_the_digest_netconf_does(restconf):
    rc = restconf
    assert "nfmig-nat:session-digest" in \
        rc.get("/restconf/operations").json()["ietf-restconf:operations"]
    reply = rc.request("POST", "/restconf/operations/nfmig-nat:session-digest",
                       {"nfmig-nat:input": {"source-prefix": ["10.0.0.0/28"]}})
    assert reply.status == 200, reply.text
    output = reply.json()["nfmig-nat:output"]
    conn = Connection(Endpoint("127.0.0.1", rc.server.port, rc.server.user),
                      Credentials(password=rc.server.password, verify_host_keys=False))
    try:
        assert (int(output["count"]), output["digest"]) == digest(conn, "10.0.0.0/28")
    finally:
        conn.close()


# -- verify ----------------------------------------------------------------------------------
def verify_detail(report) -> str:
    (record,) = [p for p in report.phases if p.name == "verify"]
    return record.detail or ""


def test_verify_of_a_target_that_holds_what_was_moved_is_the_digest(nats):
    a, b = nats(40, 0)
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert verify_detail(report) == "digest matched: 40 sessions"


def test_the_expected_digest_counts_what_the_target_held_under_the_moved_keys(nats):
    a, b = nats(0, 0)
    a.plant(*(session("10.3.0.1", 4000 + i, "192.0.2.10", 20000 + i) for i in range(5)))
    b.plant(session("10.3.0.1", 4000, "192.0.2.99", 9999),  # written over by the move
            session("10.3.0.9", 5000, "192.0.2.99", 9998))  # stays
    report = migrate([a], b, Selection.subscribers("10.3.0.0/24"))
    assert report.result == "success", report.reason
    assert verify_detail(report) == "digest matched: 5 sessions"


def test_prefix_selection_into_a_busy_target_is_verified_by_the_digest(nats):
    a, b = nats(30, 40)  # b's own sessions are 10.0.0.x too
    report = migrate([a], b, Selection.subscribers("10.0.0.16/28"))
    assert report.result == "success", report.reason
    assert verify_detail(report) == "digest matched: 15 sessions"


def on_target_at_verify(target: Nat, edit):
    """An on_phase hook that changes ``target``'s running through the migration's own
    session (it holds the lock) as verify starts there, after the commit."""
    holder: dict = {}

    def hook(name: str, endpoint: str | None) -> None:
        if name == "verify" and endpoint == target.url:
            edit(holder["migration"].connection(target.endpoint))
    return holder, hook


def run_with(sources: list[Nat], target: Nat, hook_parts, selection=None):
    holder, hook = hook_parts
    migration = Migration([s.endpoint for s in sources], target.endpoint, selection,
                          Options(credentials=NO_HOST_KEY_CHECK, on_phase=hook))
    holder["migration"] = migration
    return migration.run()


def test_a_target_that_lost_a_session_falls_back_to_the_read_and_fails(nats):
    a, b = nats(40, 0)
    before = a.sessions()
    lost = parse_entries(a.conn.get_data("running", Selection.all().filter_xml()))[7]
    report = run_with([a], b, on_target_at_verify(
        b, lambda conn: conn.edit_config(removal_xml([lost]), "running")))
    assert report.result == "failed"
    assert "1 of 40 sessions missing" in report.reason
    assert report.reason.endswith("full read: digest differed: 39 sessions, 40 expected)")
    assert verify_detail(report) == report.reason
    assert a.sessions() == before and b.sessions() == {}  # rolled back


def test_a_target_with_another_session_in_the_selection_is_verified_by_the_read(nats):
    a, b = nats(40, 0)
    extra = session("10.0.0.200", 6000, "192.0.2.50", 40000)
    report = run_with([a], b, on_target_at_verify(
        b, lambda conn: conn.edit_config(extra, "running")))
    assert report.result == "success", report.reason
    assert verify_detail(report) == ("full read (digest differed: 41 sessions, 40 expected): "
                                     "40 of 40 found")


def test_a_target_without_session_digest_is_verified_by_the_read(nats, monkeypatch):
    a, b = nats(40, 0)
    asked = Connection.nat_rpc_output

    def older_server(self, name, **leaves):
        if name == "session-digest":  # an operation the server does not have, as it is there
            name = f"session-digest-{secrets.token_hex(3)}"
        return asked(self, name, **leaves)
    monkeypatch.setattr(Connection, "nat_rpc_output", older_server)
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert verify_detail(report) == ("full read (the target does not implement "
                                     "session-digest): 40 of 40 found")


def test_an_xpath_selection_is_verified_by_the_read(nats):
    a, b = nats(40, 0)
    report = migrate([a], b, Selection.from_xpath("/nfnat:nat-session[nfnat:dst_port=443]"))
    assert report.result == "success", report.reason
    moved = report.sessions_moved
    assert verify_detail(report) == (f"full read (an XPath selection has no digest): "
                                     f"{moved} of {moved} found")


@pytest.fixture
def restconf_pair(tmp_path):
    password = secrets.token_urlsafe(12)
    started = [Both(tmp_path / "a", 30, password), Both(tmp_path / "b", 0, password)]
    bundle = tmp_path / "ca.pem"
    bundle.write_text("".join(b.cert.read_text() for b in started))
    yield started, Credentials(ca_file=bundle, verify_host_keys=False)
    for both in started:
        both.server.stop()


def test_a_restconf_target_is_verified_by_the_digest(restconf_pair):
    (a, b), credentials = restconf_pair
    report = Migration([a.endpoint("netconf")], [b.endpoint("restconf")], None,
                       Options(credentials=credentials)).run()
    assert report.result == "success", report.reason
    assert verify_detail(report) == "digest matched: 30 sessions"
