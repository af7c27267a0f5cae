"""The SDN NAT backend on its own: a private Open vSwitch in NAT B's namespace of a test bed
and the OpenFlow NAT application, driven through the backend interface."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the Open vSwitch NAT tests must not skip", pytrace=False)
    pytest.skip("network namespaces and Open vSwitch need root", allow_module_level=True)

from nfmig.nf_backends import flows, ofnat_life, openflow  # noqa: E402
from nfmig.nf_backends.base import (  # noqa: E402
    CHANGES_LOST,
    BackendError,
    GatewayAddress,
    NatPolicy,
    Session,
)
from nfmig.nf_backends.batch import SessionBatch  # noqa: E402
from nfmig.nf_backends.ofnat_procs import record_path  # noqa: E402
from nfmig.nf_backends.openflow import OpenflowBackend  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

POLICY = NatPolicy(inside_prefix=[TestBed.INSIDE_PREFIX], external_address=[TestBed.EXTERNAL],
                   port_min=20000, port_max=20009)
CONNECT = ("import socket,sys\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])),"
           "timeout=5)\nprint(*c.getsockname())\n")
ACCEPT = ("import socket,sys\ns=socket.create_server(('',int(sys.argv[1])))\n"
          "print('listening',flush=True)\nc,a=s.accept()\nprint(*a,flush=True)\n")


@pytest.fixture(scope="module")
def bed():
    with TestBed() as testbed:
        without_checksum_offload(testbed)
        yield testbed


@pytest.fixture
def nat(bed):
    backend = OpenflowBackend(bed.nat_b)
    backend.start()
    try:
        backend.apply_policy(POLICY)
        yield backend
    finally:
        backend.stop()
        bed.deactivate(bed.nat_b)


def session(sport: int, tport: int, protocol: str = "TCP", **kw) -> Session:
    return Session(protocol, TestBed.CLIENT, sport, TestBed.SERVER, 80, TestBed.EXTERNAL, tport,
                   **{"tcp_state": "established" if protocol == "TCP" else None,
                      "timeout": 300, **kw})


def test_start_runs_private_daemons_and_stop_ends_exactly_them(bed):
    backend = OpenflowBackend(bed.nat_b)
    backend.start()
    pids = [p.pid for p in backend.ovs._procs] + [backend._app.pid]
    rundir = backend._dir
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    backend.stop()
    time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not rundir.exists()


def test_a_request_the_app_cannot_handle_fails_alone(nat):
    app = nat._app.pid
    with pytest.raises(BackendError, match="unknown operation"):
        nat.ctl.ask("no-such-operation")
    with pytest.raises(BackendError, match="could not settle"):
        nat.ctl.ask("settle", batch=12345, ok=True)
    nat.hold_new_sessions(["0.0.0.0/0", "::/0"])  # IPv6 sources never reach this NAT
    nat.hold_new_sessions([])
    nat.apply(SessionBatch.put([session(30000, 20000)]))
    assert [s.key for s in nat.sessions()] == [session(30000, 20000).key]
    assert nat._app.pid == app and nat._app.poll() is None


def test_an_app_that_keeps_ending_stops_everything_then_gives_up(bed, monkeypatch):
    monkeypatch.setattr(ofnat_life, "MAX_RESTARTS", 1)
    gave_up = threading.Event()
    backend = OpenflowBackend(bed.nat_b, on_fatal=gave_up.set)
    backend.start()
    try:
        daemons = [p.pid for p in backend.ovs._procs]
        first = backend._app.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (backend._app is None or backend._app.pid == first
               or not backend._app_up.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = backend._app.pid
        assert second != first and backend.stats().session_count == 0  # back, serving
        os.kill(second, signal.SIGKILL)
        assert gave_up.wait(10)
        time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in [*daemons, second])
        assert not record_path(bed.nat_b).exists()
    finally:
        backend.stop()


def test_a_switch_daemon_that_ends_stops_everything_then_gives_up(bed):
    gave_up = threading.Event()
    backend = OpenflowBackend(bed.nat_b, on_fatal=gave_up.set)
    backend.start()
    try:
        pids = [p.pid for p in backend.ovs._procs] + [backend._app.pid]
        os.kill(pids[1], signal.SIGKILL)  # ovs-vswitchd: the flows are gone
        assert gave_up.wait(10)
        time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
        assert not record_path(bed.nat_b).exists()
    finally:
        backend.stop()


def test_gateway_addresses_follow_the_policy_all_or_nothing(bed, nat, monkeypatch):
    def addresses() -> str:
        return bed.run(bed.nat_b, "ip", "-4", "-o", "addr", "show").stdout

    inside = GatewayAddress(TestBed.INSIDE_GATEWAY, "inside", 24)
    nat.apply_policy(NatPolicy(**{**POLICY.__dict__, "gateway_address": [inside]}))
    assert f"inside    inet {TestBed.INSIDE_GATEWAY}/24" in addresses()
    with pytest.raises(BackendError, match="2001:db8::1"):
        nat.apply_policy(NatPolicy(**{**POLICY.__dict__, "gateway_address": [
            GatewayAddress("2001:db8::1", "outside", 64)]}))
    real, failed = nat._ns, []

    def failing(*cmd, **kw):  # the first batch of addresses fails, once in
        if "-batch" in cmd and not failed:
            real(*cmd, **kw)
            failed.append(cmd)
            raise BackendError("ip refused it")
        return real(*cmd, **kw)

    monkeypatch.setattr(nat, "_ns", failing)
    with pytest.raises(BackendError, match="ip refused it"):
        nat.apply_policy(NatPolicy(**{**POLICY.__dict__, "gateway_address": [
            GatewayAddress(TestBed.EXTERNAL, "outside", 24)]}))
    monkeypatch.undo()
    assert f"inside    inet {TestBed.INSIDE_GATEWAY}/24" in addresses()  # as before
    assert TestBed.EXTERNAL not in addresses()
    assert nat._policy.gateway_address == [inside]
    nat.apply_policy(POLICY)
    assert TestBed.INSIDE_GATEWAY not in addresses()


def test_imported_sessions_read_back_with_counters_and_delete_by_key(nat):
    given = [session(31000 + i, 20000 + i, orig_packets=5, orig_bytes=500, reply_packets=7,
                     reply_bytes=700, src_window_scale=7, dst_window_scale=9) for i in range(3)]
    given.append(session(31010, 20005, "UDP", timeout=60))
    nat.apply(SessionBatch.put(given))
    found = {s.key: s for s in nat.sessions()}
    assert found.keys() == {s.key for s in given}
    for s in given:
        got = found[s.key]
        assert got[:7] == s[:7] and got[9:12] == s[9:12]
        assert got[13:] == ((s.orig_packets or 0), (s.orig_bytes or 0), (s.reply_packets or 0),
                            (s.reply_bytes or 0))
        assert 0 < got.timeout <= s.timeout
    assert nat.lookup([given[0].key, ("TCP", "10.0.0.9", 1, "192.0.2.100", 80)]).keys() \
        == {given[0].key}
    assert nat.stats().session_count == 4
    nat.apply(SessionBatch.put(remove=[s.key for s in given[:2]]))
    assert {s.key for s in nat.sessions()} == {s.key for s in given[2:]}


def test_thousands_of_sessions_import_read_back_and_delete_in_one_batch_each(nat):
    # Enough flows that a dump comes back in many replies.
    given = [Session("UDP" if i % 3 == 0 else "TCP", f"10.0.0.{2 + i % 200}",
                     40000 + i // 200, TestBed.SERVER, 443, TestBed.EXTERNAL, 1024 + i,
                     timeout=600) for i in range(3000)]
    nat.apply(SessionBatch.put(given))
    found = {s.key: s for s in nat.sessions()}
    assert found.keys() == {s.key for s in given}
    assert all(found[s.key][:7] == s[:7] for s in given)
    assert nat.lookup(s.key for s in given).keys() == found.keys()
    nat.apply(SessionBatch.put(remove=[s.key for s in given]))
    assert list(nat.sessions()) == [] and nat.stats().session_count == 0


def test_a_batch_the_switch_refuses_leaves_nothing_installed(nat):
    nat.apply(SessionBatch.put([session(32000, 20001)]))
    nat.ovs.limit_table(flows.NAT_TABLE, 20)  # room for a few more pairs, not for twelve
    with pytest.raises(BackendError, match="nothing applied"):
        nat.apply(SessionBatch.put([session(32001 + i, 20002 + i) for i in range(12)],
                                 remove=[session(32000, 20001).key]))
    assert [s.key for s in nat.sessions()] == [session(32000, 20001).key]
    nat.apply(SessionBatch.put([session(32001, 20002)]))  # its port was released


def test_a_refused_update_keeps_the_old_translated_port_reserved(nat):
    nat.apply(SessionBatch.put([session(35000, 20001)]))
    nat.ovs.limit_table(flows.NAT_TABLE, 20)
    moved = session(35000, 20002)  # the same session, another translated port
    with pytest.raises(BackendError, match="nothing applied"):
        nat.apply(SessionBatch.put([moved] + [session(35001 + i, 21000 + i)
                                                    for i in range(12)]))
    assert [s.translated_port for s in nat.sessions()] == [20001]
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionBatch.put([session(35100, 20001)]))
    assert refused.value.reason == "port taken"
    nat.apply(SessionBatch.put([session(35101, 20002)]))  # never really taken


def test_a_batch_may_give_a_deleted_sessions_port_to_a_new_one(nat):
    old, new = session(36000, 20004), session(36001, 20004)
    nat.apply(SessionBatch.put([old]))
    nat.apply(SessionBatch.put([new], remove=[old.key]))
    assert [s.key for s in nat.sessions()] == [new.key]
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionBatch.put([old]))
    assert refused.value.reason == "port taken"


def test_an_idle_session_expires_and_frees_its_translated_port(nat):
    nat.apply(SessionBatch.put([session(37000, 20006, timeout=1)]))
    deadline = time.monotonic() + 15
    while (nat.stats().sessions_expired == 0 or list(nat.sessions())) \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # the switch idles flows out about once a second
    assert nat.stats().sessions_expired == 1
    assert list(nat.sessions()) == []
    nat.apply(SessionBatch.put([session(37001, 20006)]))  # the app let the port go


def test_a_translated_endpoint_in_use_is_refused(nat):
    nat.apply(SessionBatch.put([session(33000, 20003)]))
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionBatch.put([session(33001, 20004), session(33002, 20003)]))
    assert refused.value.reason == "port taken"
    assert refused.value.key == session(33002, 20003).key
    assert len(list(nat.sessions())) == 1


def connect(bed: TestBed, port: int) -> list[str]:
    """A TCP connection from the client to the server: the endpoint the server saw."""
    listener = bed.popen(bed.server, sys.executable, "-c", ACCEPT, str(port),
                         stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "listening"
    try:
        done = bed.run(bed.client, sys.executable, "-c", CONNECT, TestBed.SERVER, str(port),
                       check=False, timeout=15)
        assert done.returncode == 0, done.stderr
        return listener.stdout.readline().split()
    finally:
        listener.kill()
        listener.wait()


def test_new_connection_gets_a_port_by_packet_in_never_an_imported_one(bed, nat):
    imported = [session(34000 + i, 20000 + i) for i in range(9)]  # all but 20009
    nat.apply(SessionBatch.put(imported))
    bed.activate(bed.nat_b)
    assert connect(bed, 5501) == [TestBed.EXTERNAL, "20009"]
    new = [s for s in nat.sessions() if s.dst_port == 5501]
    assert [(s.translated_address, s.translated_port, s.tcp_state) for s in new] \
        == [(TestBed.EXTERNAL, 20009, "established")]
    assert nat.stats().sessions_created == 1


def test_app_answers_arp_for_gateway_addresses_only_while_it_owns_them(bed, nat):
    mac = bed.run(bed.nat_b, "cat", "/sys/class/net/inside/address").stdout.strip()
    probe = ["arping", "-c", "1", "-w", "2", "-I", "eth0", TestBed.INSIDE_GATEWAY]
    assert bed.run(bed.client, *probe, check=False).returncode != 0
    bed.activate(bed.nat_b)
    answered = bed.run(bed.client, *probe, check=False)
    assert answered.returncode == 0 and mac in answered.stdout.lower()


def echo(ident: int, tident: int | None = None, **kw) -> Session:
    return Session("ICMP", TestBed.CLIENT, ident, TestBed.SERVER, 0, TestBed.EXTERNAL,
                   ident if tident is None else tident, **{"timeout": 30, **kw})


def test_icmp_echo_sessions_read_back_as_imported_and_delete_by_key(nat):
    given = echo(4242, orig_packets=3, orig_bytes=252, reply_packets=3, reply_bytes=252)
    nat.apply(SessionBatch.put([given]))
    [got] = nat.sessions()
    assert got[:9] == given[:9] and got[13:] == given[13:]
    assert 0 < got.timeout <= 30
    assert nat.lookup([given.key]) == {given.key: got}
    nat.apply(SessionBatch.put(remove=[given.key]))
    assert list(nat.sessions()) == []


def test_an_icmp_session_whose_identifier_is_rewritten_is_refused(nat):
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionBatch.put([echo(4242, 4243)]))
    assert refused.value.reason == "not supported"
    assert "identifier" in str(refused.value)


def test_two_echo_sessions_the_switch_cannot_tell_apart_are_refused(nat):
    nat.apply(SessionBatch.put([echo(4242)]))
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionBatch.put([echo(4243)]))  # same peer and address
    assert refused.value.reason == "port taken"


def test_ping_through_the_sdn_nat_is_an_echo_session_keeping_its_identifier(bed, nat):
    bed.activate(bed.nat_b)
    done = bed.run(bed.client, "ping", "-c", "2", "-W", "2", TestBed.SERVER, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [got] = [s for s in nat.sessions() if s.protocol == "ICMP"]
    assert (got.src_address, got.dst_address, got.dst_port, got.translated_address) \
        == (TestBed.CLIENT, TestBed.SERVER, 0, TestBed.EXTERNAL)
    assert got.translated_port == got.src_port and got.orig_packets >= 1


# -- change reports and their barrier ---------------------------------------------------------
def events_of(heard: list, key: tuple) -> list[str]:
    return [what for what, s in heard if s is not None and s.key == key]


def test_changes_are_reported_up_to_a_flush_whatever_made_them(bed, nat):
    """Edits (by the backend), a connection through the NAT (the app's packet-in, then the
    handshake's reply: the peer's window scale) and expiries (the switch's flow-removed):
    each reported once a flush returns, with nothing waited for but the flush."""
    nat.flush_changes()  # nobody listens: nothing to flush
    heard: list = []
    nat.watch(heard.extend)
    kept, updated, expiring = session(38000, 20001), session(38001, 20002), \
        session(38002, 20003, "UDP", timeout=1)
    nat.apply(SessionBatch.put([kept, updated, expiring]))
    nat.apply(SessionBatch.put([updated._replace(tcp_state="fin-wait")],
                             remove=[kept.key]))
    bed.activate(bed.nat_b)
    seen_as = connect(bed, 5502)  # the server's peer: the translated endpoint
    [made] = [s for s in nat.sessions() if s.dst_port == 5502]
    assert [made.translated_address, str(made.translated_port)] == seen_as
    opened = made.key
    deadline = time.monotonic() + 15
    while any(s.key == expiring.key for s in nat.sessions()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the switch idles flows out about once a second
    nat.flush_changes()
    assert events_of(heard, kept.key) == ["created", "deleted"]
    assert events_of(heard, updated.key) == ["created", "updated"]
    assert events_of(heard, expiring.key) == ["created", "deleted"]
    assert events_of(heard, opened) == ["created", "updated"]  # the SYN, then its reply
    assert made.dst_window_scale is not None
    nat.watch(None)
    nat.apply(SessionBatch.put(remove=[updated.key]))
    nat.flush_changes()
    assert events_of(heard, updated.key) == ["created", "updated"]  # not followed now


def test_a_flush_takes_in_every_expiry_the_switch_made_before_it(nat):
    heard: list = []
    nat.watch(heard.extend)
    given = [session(39000 + i, 21000 + i, timeout=1) for i in range(300)]
    nat.apply(SessionBatch.put(given))
    deadline = time.monotonic() + 15
    while list(nat.sessions()) and time.monotonic() < deadline:
        time.sleep(0.02)
    nat.flush_changes()  # the flow-removed messages may still be on their way to the app
    assert {s.key for what, s in heard if what == "deleted"} == {s.key for s in given}
    assert nat.stats().sessions_expired == len(given)


def test_a_flush_fails_in_bounded_time_when_the_app_does_not_answer(nat, monkeypatch):
    monkeypatch.setattr(openflow, "FLUSH_WAIT", 1.0)
    heard: list = []
    nat.watch(heard.extend)
    nat.flush_changes()
    os.kill(nat._app.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="did not flush"):
            nat.flush_changes()
        assert time.monotonic() - started < 3
    finally:
        os.kill(nat._app.pid, signal.SIGCONT)
    nat.flush_changes()  # the stream goes on: the late marker answers nobody


def test_an_app_that_ends_loses_its_changes_and_the_listener_is_told(nat, monkeypatch):
    monkeypatch.setattr(openflow, "FLUSH_WAIT", 10.0)
    heard: list = []
    nat.watch(heard.extend)
    first = nat._app.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while CHANGES_LOST not in heard and time.monotonic() < deadline:
        time.sleep(0.05)
    assert CHANGES_LOST in heard
    started = time.monotonic()
    while time.monotonic() - started < 20:  # refused while it is down, never waited on long
        try:
            nat.flush_changes()
            break
        except BackendError:
            time.sleep(0.1)
    assert nat._app.pid != first
    added = session(40000, 20005)
    nat.apply(SessionBatch.put([added]))
    nat.flush_changes()
    assert events_of(heard, added.key) == ["created"]
