"""Change tracking for live migrations (rpc track-changes, rpc changes): the record of the
sessions that changed since a migration began copying them, read in the freeze window
instead of the whole table.

The tracker and the change feed in-process (the record's bound, lost reports, the backend
watched only while needed); the rpcs through real server processes and ncclient; and a
differential check that `changes` shows exactly what a read of the whole table shows for the
keys that changed: on the simulated NAT with its own traffic, on the Linux kernel NAT in
test-bed namespaces with real conntrack entries (imported by edit-config, and made and closed
by real TCP connections through the NAT), and on the SDN NAT (Open vSwitch) with flow pairs
imported by edit-config, made by a real TCP connection (packet-in) and idled out.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError
from nfmig.client.local import LocalServer, start_local_server
from nfmig.nf_backends.base import CHANGES_LOST, Session
from nfmig.nf_backends.batch import SessionBatch
from nfmig.nf_backends.openflow import OpenflowBackend
from nfmig.nf_backends.simulated import SimulatedBackend
from nfmig.server.change_tracking import ChangeFeed, ChangeTracking
from nfmig.server.errors import RpcError
from nfmig.server.migration import MigrationChanges
from nfmig.server.schema import Schema

from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

from .conftest import NAT_NS, RunningServer
from .restconf_client import Restconf, start_with_restconf
from .test_netconf_server import config, get_data, op_attr, session_xml

NS = {"n": NAT_NS}
KEY = ("protocol", "src_address", "src_port", "dst_address", "dst_port")
# What a session is, beside its key: what change tracking follows. Counters and the
# remaining lifetime move with every packet (and every second) and are compared apart.
STABLE = (*KEY, "translated_address", "translated_port", "translated_dst_address",
          "translated_dst_port", "tcp_state", "src_window_scale", "dst_window_scale")
COUNTERS = ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes")


# -- helpers -------------------------------------------------------------------------------
def rpc(m: manager.Manager, name: str, leaves: str = "") -> etree._Element:
    reply = m.dispatch(etree.fromstring(f'<{name} xmlns="{NAT_NS}">{leaves}</{name}>'))
    return etree.fromstring(reply.xml.encode())


def track(m: manager.Manager, migration_id: str, *prefixes: str, timeout: int | None = None
          ) -> etree._Element:
    leaves = f"<migration-id>{migration_id}</migration-id>" + "".join(
        f"<source-prefix>{p}</source-prefix>" for p in prefixes)
    if timeout is not None:
        leaves += f"<timeout>{timeout}</timeout>"
    return rpc(m, "track-changes", leaves)


class Changes:
    """rpc changes' reply, read: sessions by key (leaf name -> text), ended keys, overflow."""

    def __init__(self, reply: etree._Element):
        self.reply = reply
        self.sessions = {key_of(e): leaves_of(e) for e in reply.findall("n:session", NS)}
        self.ended = {key_of(e) for e in reply.findall("n:ended", NS)}
        self.overflow = reply.find("n:overflow", NS) is not None
        self.ok = reply.find("{urn:ietf:params:xml:ns:netconf:base:1.0}ok") is not None

    def keys(self) -> set[tuple]:
        return set(self.sessions) | self.ended


def changes(m: manager.Manager, migration_id: str, stop: bool = False) -> Changes:
    return Changes(rpc(m, "changes", f"<migration-id>{migration_id}</migration-id>"
                       + ("<stop/>" if stop else "")))


def leaves_of(entry: etree._Element) -> dict[str, str]:
    return {etree.QName(c).localname: c.text for c in entry}


def key_of(entry: etree._Element) -> tuple:
    leaves = leaves_of(entry)
    return tuple(leaves[name] for name in KEY)


def table(m: manager.Manager) -> dict[tuple, dict[str, str]]:
    """Every session of the operational datastore, by key: the full re-read."""
    data = get_data(m, "operational", f'<subtree-filter><nat-session xmlns="{NAT_NS}"/>'
                    "</subtree-filter>")
    return {key_of(e): leaves_of(e) for e in data.findall("n:nat-session", NS)}


def stable(leaves: dict[str, str] | None) -> tuple | None:
    return None if leaves is None else tuple(leaves.get(name) for name in STABLE)


def changed_keys(before: dict, after: dict) -> set[tuple]:
    """The keys whose session appeared, left, or changed what tracking follows."""
    return {k for k in before.keys() | after.keys()
            if stable(before.get(k)) != stable(after.get(k))}


def assert_as_reread(got: Changes, reread: dict, later: dict) -> None:
    """``got`` shows for its keys what the whole table showed when re-read: ``reread``
    just before the changes request and ``later`` just after (nothing is created in
    between; sessions may expire)."""
    for key, leaves in got.sessions.items():
        assert key in reread, f"{key} reported as existing, but the re-read lacks it"
        views = [v for v in (reread.get(key), later.get(key)) if v is not None]
        assert stable(leaves) in [stable(v) for v in views], (key, leaves, views)
        for name in COUNTERS:  # counters only grow
            values = [int(v[name]) for v in views if name in v]
            if values:
                assert min(values) <= int(leaves[name]) <= max(values), (key, name)
        seconds = [int(v["timeout"]) for v in views if "timeout" in v]
        if seconds:
            assert min(seconds) - 1 <= int(leaves["timeout"]) <= max(seconds) + 1, key
    for key in got.ended:
        assert key not in later, f"{key} reported as ended, but the re-read has it"


def error_of(call) -> RPCError:
    with pytest.raises(RPCError) as err:
        call()
    return err.value


def new_session(i: int, src: str = "10.77.0.1", state: str = "established") -> str:
    return session_xml(src, 10000 + i, "198.51.100.77", 443,  # an external address a source
                       f"<translated_address>203.0.113.{src.split('.')[1]}"
                       "</translated_address>"
                       f"<translated_port>{30000 + i}</translated_port>"
                       f"<tcp_state>{state}</tcp_state>")


# -- in-process: the feed and the records -------------------------------------------------
class CountingBackend(SimulatedBackend):
    """A simulated NAT that counts watch() calls (what watching costs)."""

    def __init__(self) -> None:
        super().__init__()
        self.watching: list[bool] = []

    def watch(self, listener) -> None:
        self.watching.append(listener is not None)
        super().watch(listener)


def sim_session(i: int, src: str = "10.1.0.1") -> Session:
    return Session("TCP", src, 1000 + i, "198.51.100.1", 80, "192.0.2.1", 20000 + i,
                   tcp_state="established", timeout=100)


def test_feed_watches_the_backend_only_while_someone_listens():
    backend = CountingBackend()
    feed = ChangeFeed(backend)
    heard: list[list] = []
    tracking = ChangeTracking(feed)
    feed.subscribe(heard.append)  # the notification hub, say
    tracking.start("m1", [], 60)
    tracking.start("m2", [], 60)
    assert backend.watching == [True]  # once, however many listen
    backend.apply(SessionBatch.put([sim_session(1)]))
    assert len(heard) == 1 and tracking.read("m1").keys == {sim_session(1).key}
    tracking.read("m1", stop=True)
    tracking.read("m2", stop=True)
    assert backend.watching == [True]  # the hub still listens
    feed.unsubscribe(heard.append)
    assert backend.watching == [True, False]
    tracking.start("m3", [], 60)
    assert backend.watching == [True, False, True]
    tracking.close_all()
    assert backend.watching == [True, False, True, False]


def test_record_overflows_beyond_its_bound_and_holds_no_keys():
    backend = SimulatedBackend()
    tracking = ChangeTracking(ChangeFeed(backend), limit=10)
    tracking.start("m1", [], 60)
    backend.apply(SessionBatch.put([sim_session(i) for i in range(10)]))
    assert tracking.read("m1") == (set(map(Session.key.fget, map(sim_session, range(10)))),
                                   False)
    backend.apply(SessionBatch.put([sim_session(10)]))
    assert tracking.read("m1") == (set(), True)
    backend.apply(SessionBatch.put(remove=[sim_session(0).key]))  # still overflowed
    assert tracking.read("m1") == (set(), True)
    tracking.start("m1", [], 60)  # tracking again starts over
    assert tracking.read("m1") == (set(), False)
    tracking.close_all()


def test_lost_reports_overflow_every_record():
    backend = SimulatedBackend()
    tracking = ChangeTracking(ChangeFeed(backend))
    tracking.start("m1", [], 60)
    tracking.start("m2", ["10.1.0.0/16"], 60)
    backend._report([("created", sim_session(1)), CHANGES_LOST])
    assert tracking.read("m1").overflow and tracking.read("m2").overflow
    tracking.close_all()


def test_record_keeps_only_the_sessions_of_its_sources():
    backend = SimulatedBackend()
    tracking = ChangeTracking(ChangeFeed(backend))
    tracking.start("m1", ["10.1.0.0/16", "2001:db8::/32"], 60)
    tracking.start("m2", ["10.2.0.0/16"], 60)
    inside = sim_session(1, "10.1.2.3")
    v6 = sim_session(2, "2001:db8::7")._replace(dst_address="2001:db8:1::1",
                                                translated_address="2001:db8:2::1")
    elsewhere = sim_session(3, "10.3.0.1")
    backend.apply(SessionBatch.put([inside, v6, elsewhere]))
    assert tracking.read("m1").keys == {inside.key, v6.key}
    assert tracking.read("m2").keys == set()
    tracking.close_all()


def test_tracking_is_refused_without_a_barrier():
    class NoBarrier(SimulatedBackend):
        def flush_changes(self) -> None:
            raise NotImplementedError("no barrier")

    backend = NoBarrier()
    tracking = ChangeTracking(ChangeFeed(backend))
    with pytest.raises(NotImplementedError):
        tracking.start("m1", [], 60)
    assert backend._listener is None and "m1" not in tracking
    schema = Schema()
    operations = MigrationChanges(backend, tracking, schema, NAT_NS)
    request = etree.fromstring(f'<track-changes xmlns="{NAT_NS}"><migration-id>m1'
                               "</migration-id></track-changes>")
    with pytest.raises(RpcError) as err:
        operations.track_changes(None, request)
    assert err.value.tag == "operation-not-supported"


def test_the_openflow_nat_has_a_barrier_costing_nothing_while_nobody_listens():
    """Its app marks its stream of changes once the switch agrees with it (see
    test_changes_equal_a_full_reread_on_the_sdn_nat and test_openflow_nat); with nobody
    listening there is nothing to flush: no app is asked, none need run."""
    backend = OpenflowBackend("no-such-namespace")
    backend.flush_changes()
    backend._listener = lambda events: None  # listening, but never started
    with pytest.raises(RuntimeError, match="not started"):
        backend.flush_changes()


# -- through a server: the rpcs -------------------------------------------------------------
def test_changes_report_created_updated_and_ended_sessions_as_they_are_now(server, nc):
    nc.edit_config(target="running", config=config(*(new_session(i) for i in range(3))))
    assert track(nc, "m-crud", "10.77.0.0/16").find("{*}ok") is not None
    nc.edit_config(target="running", config=config(
        new_session(3),                                                  # created
        new_session(0, state="fin-wait"),                                # updated
        new_session(1).replace(f'xmlns="{NAT_NS}"', f'xmlns="{NAT_NS}" {op_attr("delete")}'),
        new_session(9, src="10.78.0.1")))                                # not tracked
    got = changes(nc, "m-crud")
    now = table(nc)
    key = ("TCP", "10.77.0.1", "{}", "198.51.100.77", "443")
    created, updated, deleted = (tuple(k.format(10000 + i) if k == "{}" else k for k in key)
                                 for i in (3, 0, 1))
    assert set(got.sessions) == {created, updated} and got.ended == {deleted}
    assert got.sessions[updated]["tcp_state"] == "fin-wait"
    assert_as_reread(got, now, now)
    assert list(got.sessions[created])[:5] == list(KEY)  # the model's order
    assert not got.overflow
    # The record goes on: a later read still has them, and what changed since.
    nc.edit_config(target="running", config=config(new_session(4)))
    assert len(changes(nc, "m-crud", stop=True).sessions) == 3


def test_changes_when_nothing_changed_is_ok(nc):
    track(nc, "m-quiet", "10.79.0.0/16")
    got = changes(nc, "m-quiet", stop=True)
    assert got.ok and not got.sessions and not got.ended and not got.overflow


def test_stop_drops_the_record(nc):
    track(nc, "m-stop")
    changes(nc, "m-stop", stop=True)
    err = error_of(lambda: changes(nc, "m-stop"))
    assert err.tag == "invalid-value" and "m-stop" in err.message


def test_record_is_dropped_after_its_timeout(nc):
    track(nc, "m-timeout", timeout=1)
    changes(nc, "m-timeout")  # there, within its timeout
    time.sleep(1.5)
    err = error_of(lambda: changes(nc, "m-timeout"))
    assert err.tag == "invalid-value" and "m-timeout" in err.message


def test_unknown_migration_id_is_invalid_value_naming_it(nc):
    err = error_of(lambda: changes(nc, "never-tracked"))
    assert err.tag == "invalid-value"
    assert "never-tracked" in err.message


def test_bad_input_is_refused(nc):
    assert error_of(lambda: track(nc, "m-bad", "10.0.0.0/33")).tag == "invalid-value"
    assert error_of(lambda: rpc(nc, "changes")).tag == "missing-element"
    assert error_of(lambda: track(nc, "m-bad", timeout=0)).tag == "invalid-value"


def test_tracking_again_starts_over(nc):
    track(nc, "m-again", "10.80.0.0/16")
    nc.edit_config(target="running", config=config(new_session(1, src="10.80.0.1")))
    track(nc, "m-again", "10.80.0.0/16")
    nc.edit_config(target="running", config=config(new_session(2, src="10.80.0.1")))
    assert [k[2] for k in changes(nc, "m-again", stop=True).sessions] == ["10002"]


def test_sessions_changed_notifications_are_unaffected_by_tracking(server, nc):
    """Tracking and a subscription share the backend's one listener: the subscriber gets
    created and deleted, never updated, before, during and after a record."""
    nc.create_subscription(filter=("subtree", f'<sessions-changed xmlns="{NAT_NS}"/>'))

    def events() -> list[tuple[str, str]]:
        seen = []
        while (note := nc.take_notification(timeout=1)) is not None:
            root = etree.fromstring(note.notification_xml.encode())
            seen += [(c.findtext("n:event", namespaces=NS), c.findtext("n:src_port",
                                                                        namespaces=NS))
                     for c in root.iter(f"{{{NAT_NS}}}change")]
        return seen

    src = "10.81.0.1"
    nc.edit_config(target="running", config=config(new_session(1, src=src)))
    with server.connect() as migrator:
        track(migrator, "m-notify", "10.81.0.0/16")
        nc.edit_config(target="running", config=config(
            new_session(1, src=src, state="fin-wait"), new_session(2, src=src)))
        assert set(changes(migrator, "m-notify", stop=True).sessions) == {
            ("TCP", src, "10001", "198.51.100.77", "443"),
            ("TCP", src, "10002", "198.51.100.77", "443")}
    nc.edit_config(target="running", config=config(new_session(3, src=src).replace(
        f'xmlns="{NAT_NS}"', f'xmlns="{NAT_NS}" {op_attr("create")}')))
    assert events() == [("created", "10001"), ("created", "10002"), ("created", "10003")]


def test_restconf_offers_the_operations(tmp_path):
    server, port = start_with_restconf(tmp_path, "--sessions", "5")
    try:
        rc = Restconf(server, port)
        listed = rc.get("/restconf/operations").json()["ietf-restconf:operations"]
        assert "nfmig-nat:track-changes" in listed and "nfmig-nat:changes" in listed
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:track-changes",
                           {"nfmig-nat:input": {"migration-id": "m-rc",
                                                "source-prefix": ["10.99.0.0/16"]}})
        assert reply.status == 204, reply.text
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:changes",
                           {"nfmig-nat:input": {"migration-id": "m-rc", "stop": [None]}})
        assert reply.status == 204, reply.text  # nothing changed: no output
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:changes",
                           {"nfmig-nat:input": {"migration-id": "m-rc"}})
        assert reply.status == 400 and reply.error_tag == "invalid-value", reply.text
    finally:
        server.stop()


def test_restconf_answers_changes_with_an_output_in_the_encoding_asked_for(tmp_path):
    server, port = start_with_restconf(tmp_path, "--sessions", "5")
    try:
        rc = Restconf(server, port)
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:track-changes",
                           {"nfmig-nat:input": {"migration-id": "m-out"}})
        assert reply.status == 204, reply.text
        reply = rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [{
            "protocol": "UDP", "src_address": "10.98.0.1", "src_port": 5353,
            "dst_address": "192.0.2.53", "dst_port": 53}]})
        assert reply.status == 201, reply.text
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:changes",
                           {"nfmig-nat:input": {"migration-id": "m-out"}})
        assert reply.status == 200, reply.text
        output = reply.json()["nfmig-nat:output"]
        assert [(s["protocol"], s["src_port"]) for s in output["session"]] == [("UDP", 5353)]
        reply = rc.request("POST", "/restconf/operations/nfmig-nat:changes",
                           {"nfmig-nat:input": {"migration-id": "m-out"}},
                           accept="application/yang-data+xml")
        assert reply.status == 200, reply.text
        root = etree.fromstring(reply.text.encode())
        assert root.tag == f"{{{NAT_NS}}}output"
        assert root.findtext(f"{{{NAT_NS}}}session/{{{NAT_NS}}}src_port") == "5353"
    finally:
        server.stop()


# -- differential: the simulated NAT with traffic -------------------------------------------
@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """A simulated NAT with 2000 sessions whose traffic opens about 200 a second; each
    lives 3 s unless it sees packets, so the NAT itself deletes sessions too."""
    started = start_local_server(tmp_path_factory.mktemp("busy-tracked"), "--sessions",
                                 "2000", "--traffic", "200")
    srv = RunningServer(**vars(started))
    yield srv
    srv.stop()


def test_changes_equal_a_full_reread_on_the_simulated_nat_with_traffic(busy_server):
    rng = random.Random(7)
    with busy_server.connect() as m:
        m.edit_config(target="running", config=config(
            f'<nat-policy xmlns="{NAT_NS}"><timeouts><tcp-established>3</tcp-established>'
            "</timeouts></nat-policy>"))
        time.sleep(1)
        track(m, "m-diff")
        before = table(m)
        made = 0
        for _ in range(6):  # edits interleaved with the NAT's own traffic and expiries
            existing = list(table(m).values())
            picked = rng.sample(existing, 30)
            deletes = [session_xml(s["src_address"], s["src_port"], s["dst_address"],
                                   s["dst_port"], attrs=op_attr("remove"))
                       for s in picked[:15]]
            updates = [session_xml(s["src_address"], s["src_port"], s["dst_address"],
                                   s["dst_port"], "<tcp_state>close-wait</tcp_state>")
                       for s in picked[15:]]
            creates = [session_xml(f"10.90.{made // 200}.{1 + made % 200}", 5000 + i,
                                   "198.51.100.90", 80,
                                   f"<translated_address>192.0.2.90</translated_address>"
                                   f"<translated_port>{40000 + made + i}</translated_port>"
                                   "<tcp_state>established</tcp_state><timeout>600</timeout>")
                       for i in range(20)]
            made += 20
            m.edit_config(target="running", config=config(*deletes, *updates, *creates))
            time.sleep(rng.uniform(0.2, 0.7))
        rpc(m, "freeze", "<migration-id>m-diff</migration-id>")  # no new sessions now
        try:
            time.sleep(0.6)  # a traffic tick that began before the freeze has ended
            reread = table(m)
            got = changes(m, "m-diff", stop=True)
            later = table(m)
        finally:
            rpc(m, "thaw", "<migration-id>m-diff</migration-id>")
    changed = changed_keys(before, reread)
    assert len(changed) > 300, "too little changed to compare"
    assert changed <= got.keys(), f"{len(changed - got.keys())} changes missed"
    assert_as_reread(got, reread, later)
    assert any(s["tcp_state"] == "close-wait" for s in got.sessions.values())
    assert got.ended and not got.overflow


# -- differential: the Linux kernel NAT with real connections ----------------------------
TRAFFIC = str(Path(__file__).with_name("traffic.py"))
linux = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and conntrack "
                           "need root")


POLICY = (f'<nat-policy xmlns="{NAT_NS}"><inside-interface>inside</inside-interface>'
          "<outside-interface>outside</outside-interface>"
          f"<inside-prefix>{TestBed.INSIDE_PREFIX}</inside-prefix>"
          f"<external-address>{TestBed.EXTERNAL}</external-address>"
          "<port-min>20000</port-min><port-max>29999</port-max></nat-policy>")


def _open_tcp(bed: TestBed, port: int) -> tuple[subprocess.Popen, subprocess.Popen, tuple]:
    """A greeted TCP connection from the client to the server through the active NAT,
    waiting for "go"; the key of its session."""
    def start(ns: str, *args: str) -> subprocess.Popen:
        return bed.popen(ns, sys.executable, TRAFFIC, *args, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    server = start(bed.server, "tcp-server", str(port), "1000")
    assert server.stdout.readline().split()[0] == "listening"
    client = start(bed.client, "tcp-client", TestBed.SERVER, str(port), "1000")
    ready = client.stdout.readline().split()
    assert ready[0] == "ready", ready
    assert server.stdout.readline().split()[0] == "ready"
    return server, client, ("TCP", ready[1], ready[2], TestBed.SERVER, str(port))


def _finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout.readline().split()[0] == "done"
        proc.wait(timeout=20)


@linux
def test_changes_equal_a_full_reread_on_the_linux_nat(tmp_path):
    with TestBed() as bed:
        server: LocalServer | None = None
        try:
            server = start_local_server(tmp_path / "a", "--backend", "linux", "--netns",
                                        bed.nat_a)
            srv = RunningServer(**vars(server))
            with srv.connect() as m, srv.connect() as watcher:
                m.edit_config(target="running", config=config(POLICY))
                bed.activate(bed.nat_a)
                _check_linux_changes(bed, m, watcher)
        finally:
            if server is not None:
                server.stop()


def _imported_key(i: int) -> tuple:
    return ("TCP", f"10.0.0.{100 + i % 50}", str(30000 + i), "192.0.2.100", str(8000 + i))


def _imported(i: int, state: str = "established", timeout: int = 600) -> str:
    return session_xml(f"10.0.0.{100 + i % 50}", 30000 + i, "192.0.2.100", 8000 + i,
                       f"<translated_address>192.0.2.1</translated_address>"
                       f"<translated_port>{20000 + i}</translated_port>"
                       f"<tcp_state>{state}</tcp_state><src_window_scale>7</src_window_scale>"
                       f"<dst_window_scale>7</dst_window_scale><timeout>{timeout}</timeout>")


def _import_changes(m: manager.Manager, created: range) -> None:
    """Edits of imported sessions: ``created`` new ones, the first ten updated (their TCP
    state) and the next ten deleted."""
    m.edit_config(target="running", config=config(*(_imported(i) for i in created)))
    m.edit_config(target="running", config=config(*(_imported(i, "fin-wait")
                                                    for i in range(10))))
    m.edit_config(target="running", config=config(*(
        _imported(i).replace(f'xmlns="{NAT_NS}"', f'xmlns="{NAT_NS}" {op_attr("delete")}')
        for i in range(10, 20))))


def _check_linux_changes(bed: TestBed, m: manager.Manager, watcher: manager.Manager) -> None:
    m.edit_config(target="running", config=config(*(_imported(i) for i in range(60))))
    old_server, old_client, closed = _open_tcp(bed, 5101)  # before tracking: closes later
    watcher.create_subscription()
    track(m, "m-linux", TestBed.INSIDE_PREFIX)
    before = table(m)
    assert closed in before and before[closed]["tcp_state"] == "established"
    # Imports: created, updated (TCP state), deleted; and real connections: one opened,
    # one closed (its TCP state changes as it closes).
    _import_changes(m, range(60, 80))
    new_server, new_client, opened = _open_tcp(bed, 5102)
    _finish(old_server, old_client)
    time.sleep(0.3)  # the closing handshake's last ACK has crossed the NAT
    reread = table(m)
    got = changes(m, "m-linux")
    later = table(m)
    changed = changed_keys(before, reread)
    assert opened in changed and closed in changed
    assert reread[closed]["tcp_state"] != "established"
    assert got.keys() == changed  # every change, and nothing else
    assert_as_reread(got, reread, later)
    assert {got.sessions[_imported_key(i)]["tcp_state"] for i in range(10)} == {"fin-wait"}
    assert got.ended == {_imported_key(i) for i in range(10, 20)} and not got.overflow
    # Whatever tracking takes in, sessions-changed reports creations and deletions only.
    seen = []
    while (note := watcher.take_notification(timeout=1)) is not None:
        root = etree.fromstring(note.notification_xml.encode())
        seen += [(c.findtext("n:event", namespaces=NS), key_of(c))
                 for c in root.iter(f"{{{NAT_NS}}}change")]
    assert {event for event, _ in seen} == {"created", "deleted"}
    assert ("created", opened) in seen and ("deleted", _imported_key(10)) in seen
    _finish(new_server, new_client)
    assert changes(m, "m-linux", stop=True).sessions[opened]["tcp_state"] != "established"


# -- differential: the SDN NAT (Open vSwitch) with real connections ------------------------
def _sdn_policy(tcp_timeout: int) -> str:
    return POLICY.replace("</nat-policy>", f"<timeouts><tcp-established>{tcp_timeout}"
                          "</tcp-established></timeouts></nat-policy>")


@linux
def test_changes_equal_a_full_reread_on_the_sdn_nat(tmp_path):
    with TestBed() as bed:
        without_checksum_offload(bed)
        server: LocalServer | None = None
        try:
            server = start_local_server(tmp_path / "b", "--backend", "openflow", "--netns",
                                        bed.nat_b)
            srv = RunningServer(**vars(server))
            with srv.connect() as m:
                m.edit_config(target="running", config=config(_sdn_policy(2)))
                bed.activate(bed.nat_b)
                _check_sdn_changes(bed, m)
        finally:
            if server is not None:
                server.stop()


def _check_sdn_changes(bed: TestBed, m: manager.Manager) -> None:
    """Sessions created by edit and by a connection (the app's packet-in), updated and
    deleted by edit, and idled out (an imported one, and the one of a connection that
    closed: its flows idle out after the policy's 2 s)."""
    old_server, old_client, closed = _open_tcp(bed, 5201)
    _finish(old_server, old_client)  # idle from now on
    m.edit_config(target="running", config=config(
        *(_imported(i) for i in range(60)), *(_imported(i, timeout=2) for i in range(60, 70))))
    expiring = {closed, *(_imported_key(i) for i in range(60, 70))}
    track(m, "m-sdn", TestBed.INSIDE_PREFIX)
    before = table(m)
    assert expiring <= before.keys()
    _import_changes(m, range(70, 90))
    m.edit_config(target="running", config=config(_sdn_policy(600)))  # for the next one
    new_server, new_client, _ = _open_tcp(bed, 5202)
    deadline = time.monotonic() + 20
    while expiring & table(m).keys() and time.monotonic() < deadline:
        time.sleep(0.1)  # the switch idles flows out about once a second
    reread = table(m)
    got = changes(m, "m-sdn")
    later = table(m)
    [opened] = [k for k in reread if k[4] == "5202"]  # its source port: the client's own
    changed = changed_keys(before, reread)
    assert opened in changed and expiring <= changed
    assert got.keys() == changed  # every change, and nothing else
    assert_as_reread(got, reread, later)
    assert got.sessions[opened]["dst_window_scale"] is not None  # the handshake's reply
    assert {got.sessions[_imported_key(i)]["tcp_state"] for i in range(10)} == {"fin-wait"}
    assert got.ended == expiring | {_imported_key(i) for i in range(10, 20)}
    assert not got.overflow
    _finish(new_server, new_client)
    changes(m, "m-sdn", stop=True)
