"""The OpenFlow firewall backend on its own: a private Open vSwitch in NAT B's namespace of a
test bed and the firewall app, driven through the backend interface with live traffic.

Nothing is translated, so the server routes the inside prefix through the firewall's
outside gateway address; subscriber "alice" owns the client's prefix.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the Open vSwitch firewall tests must not skip",
                    pytrace=False)
    pytest.skip("network namespaces and Open vSwitch need root", allow_module_level=True)

from nfmig.nf_backends import flows  # noqa: E402
from nfmig.nf_backends.base import BackendError, GatewayAddress, NatPolicy, Session  # noqa: E402
from nfmig.nf_backends.batch import SessionBatch  # noqa: E402
from nfmig.nf_backends.firewall import (  # noqa: E402
    FirewallPolicy,
    InboundService,
    OutboundRule,
    Pinhole,
    Subscriber,
)
from nfmig.nf_backends.openflow_firewall import OpenflowFirewallBackend  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

from .test_linux_nat import (  # noqa: E402
    CONNECT,
    LISTENER,
    connects,
    expect,
    go,
    listen,
    open_tcp,
    open_udp,
    start,
)

CLIENT, SERVER = TestBed.CLIENT, TestBed.SERVER
SERVICE = 7001  # alice's inbound service
NAT_POLICY = NatPolicy(inside_interface="inside", outside_interface="outside",
                       gateway_address=[GatewayAddress(TestBed.INSIDE_GATEWAY, "inside", 24),
                                        GatewayAddress(TestBed.EXTERNAL, "outside", 24)])
POLICY = FirewallPolicy([Subscriber("alice", (TestBed.INSIDE_PREFIX,),
                                    inbound_services=(InboundService("TCP", SERVICE),))])


@pytest.fixture(scope="module")
def bed():
    with TestBed() as testbed:
        without_checksum_offload(testbed)
        testbed.run(testbed.server, "ip", "route", "add", TestBed.INSIDE_PREFIX, "via",
                    TestBed.EXTERNAL)
        yield testbed


@pytest.fixture
def fw(bed):
    backend = OpenflowFirewallBackend(bed.nat_b)
    backend.start()
    try:
        backend.apply_policy(NAT_POLICY)
        backend.apply_firewall_policy(POLICY)
        yield backend
        log = (backend._dir / "app.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        backend.stop()
        bed.deactivate(bed.nat_b)


def listen_inside(bed: TestBed, port: int) -> subprocess.Popen:
    """A TCP listener of alice's (test_linux_nat.listen, in the client's namespace)."""
    proc = bed.popen(bed.client, sys.executable, "-c", LISTENER, str(port),
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["listening"]
    return proc


def connects_in(bed: TestBed, port: int, timeout: float = 1.5) -> bool:
    """Whether a new TCP connection from the server reaches alice's port within timeout."""
    done = bed.run(bed.server, sys.executable, "-c", CONNECT, CLIENT, str(port), str(timeout),
                   check=False)
    return done.returncode == 0


def end(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def to_port(fw: OpenflowFirewallBackend, port: int) -> list[Session]:
    return [s for s in fw.sessions() if s.dst_port == port]


def test_outbound_tcp_and_udp_pass_untranslated_as_connections(bed, fw):
    tcp_server, tcp_client, tcp_peer = open_tcp(bed, 5601, 100_000)
    udp_server, udp_client, udp_peer = open_udp(bed, 5602, "server")
    try:
        assert tcp_peer[0] == udp_peer[0] == CLIENT  # nothing translated
        go(tcp_server, tcp_client, udp_server, udp_client)
        for proc in (tcp_server, tcp_client, udp_server, udp_client):
            expect(proc, "done")
    finally:
        end(tcp_server, tcp_client, udp_server, udp_client)
    [tcp] = to_port(fw, 5601)
    [udp] = to_port(fw, 5602)
    assert tcp.key == ("TCP", CLIENT, int(tcp_peer[1]), SERVER, 5601)
    assert udp.key == ("UDP", CLIENT, int(udp_peer[1]), SERVER, 5602)
    for s in (tcp, udp):
        assert s[5:9] == (None, None, None, None)
        # The switch credits its flows' counters every second or so: some are still due.
        assert s.orig_packets > 0 and s.reply_packets > 0 and s.timeout > 0
    assert (tcp.tcp_state, udp.tcp_state) == ("established", None)
    assert tcp.src_window_scale is not None and tcp.dst_window_scale is not None
    assert fw.stats().sessions_created == 2


def test_inbound_opens_only_through_an_inbound_service(bed, fw):
    served, unserved = listen_inside(bed, SERVICE), listen_inside(bed, SERVICE + 1)
    try:
        assert not connects_in(bed, SERVICE + 1, timeout=1)  # unsolicited: dropped
        assert connects_in(bed, SERVICE)
    finally:
        end(served, unserved)
    [opened] = to_port(fw, SERVICE)  # from outside: the remote is its source
    assert (opened.src_address, opened.dst_address, opened.translated_address) \
        == (SERVER, CLIENT, None)
    assert to_port(fw, SERVICE + 1) == []


def test_a_pinhole_admits_its_flow_until_it_expires(bed, fw):
    listener = listen_inside(bed, 7010)
    try:
        fw.apply_pinholes([Pinhole("TCP", SERVER, CLIENT, 7010, "return-path", 3)], [])
        [pinhole] = fw.pinholes()
        assert pinhole[:5] == ("TCP", SERVER, CLIENT, 7010, "return-path")
        assert 1 <= pinhole.timeout <= 3
        assert connects_in(bed, 7010)
        deadline = time.monotonic() + 10
        while fw.pinholes() and time.monotonic() < deadline:
            time.sleep(0.2)  # the switch times flows out about once a second
        assert fw.pinholes() == []
        assert not connects_in(bed, 7010, timeout=1)
    finally:
        end(listener)
    assert len(to_port(fw, 7010)) == 1  # what it admitted stays


def test_pinholes_are_renewed_and_closed_all_or_nothing(fw):
    udp = Pinhole("UDP", SERVER, CLIENT, 7020, "related", 30)
    tcp = Pinhole("TCP", SERVER, CLIENT, 7021, "related", 30)
    fw.apply_pinholes([udp, tcp], [])
    with pytest.raises(BackendError):  # no OpenFlow timeout holds it: nothing checked in
        fw.apply_pinholes([udp._replace(reason="return-path"),
                           tcp._replace(local_port=7022, timeout=70000)], [tcp.key])
    listing = fw.ovs.ofctl("dump-flows", f"table={flows.NAT_TABLE}").splitlines()[1:]
    fw.ovs.limit_table(flows.NAT_TABLE, len(listing))  # full: a new pinhole is refused
    with pytest.raises(BackendError, match="nothing applied"):
        fw.apply_pinholes([udp._replace(reason="return-path"),
                           tcp._replace(local_port=7022)], [])
    assert {p[:5] for p in fw.pinholes()} == {udp[:5], tcp[:5]}
    fw.apply_pinholes([udp._replace(reason="return-path", timeout=600)],
                      [tcp.key, ("TCP", "2001:db8::1", CLIENT, 1)])
    [renewed] = fw.pinholes()
    assert renewed[:5] == udp._replace(reason="return-path")[:5] and renewed.timeout > 500


def test_a_translated_session_is_refused_with_nothing_applied(fw):
    plain = Session("TCP", CLIENT, 41000, SERVER, 80, tcp_state="established", timeout=300)
    translated = plain._replace(src_port=41001, translated_address=TestBed.EXTERNAL,
                                translated_port=20000)
    with pytest.raises(BackendError, match="translates nothing"):
        fw.apply_policy(NatPolicy(external_address=[TestBed.EXTERNAL]))
    assert fw.refusal(plain) is None
    assert "translates nothing" in fw.refusal(translated)
    with pytest.raises(BackendError) as refused:
        fw.apply(SessionBatch.put([plain, translated]))
    assert (refused.value.key, refused.value.reason) == (translated.key, "not supported")
    assert list(fw.sessions()) == []
    fw.apply(SessionBatch.put([plain]))
    [got] = fw.sessions()
    assert got[:10] == plain[:10] and 0 < got.timeout <= 300


def test_a_hold_keeps_new_connections_out_both_ways(bed, fw):
    outside, inside = listen(bed, 5610), listen_inside(bed, SERVICE)
    try:
        fw.hold_new_sessions([TestBed.INSIDE_PREFIX])
        assert not connects(bed, 5610, timeout=1)
        assert not connects_in(bed, SERVICE, timeout=1)
        fw.hold_new_sessions([])
        assert connects(bed, 5610) and connects_in(bed, SERVICE)
    finally:
        end(outside, inside)


def test_a_connection_written_through_apply_passes_without_a_syn(bed, fw):
    """Opened through NAT A as a plain router, moved as a migration moves it: written to
    the firewall, then the gateway addresses switched over."""
    fw.apply_policy(NatPolicy(inside_interface="inside", outside_interface="outside"))
    bed.activate(bed.nat_a)
    server = client = None
    try:
        server, client, peer = open_tcp(bed, 5620, 100_000)
        assert peer[0] == CLIENT
        fw.apply(SessionBatch.put([Session("TCP", CLIENT, int(peer[1]), SERVER, 5620,
                                           tcp_state="established", timeout=300)]))
        fw.apply_policy(NAT_POLICY)
        bed.switch_over(bed.nat_a, bed.nat_b)
        go(server, client)
        expect(server, "done")
        expect(client, "done")
    finally:
        end(*filter(None, (server, client)))
        bed.deactivate(bed.nat_a)
    [moved] = to_port(fw, 5620)
    assert moved.orig_packets > 0 and moved.reply_packets > 0
    assert fw.stats().sessions_created == 0  # no SYN came this way


def test_a_mid_stream_segment_of_an_unknown_connection_is_dropped(bed, fw):
    """A connection opened through the inbound service, then forgotten: its inside end
    speaks first and is not let through, until the connection is written back."""
    server = start(bed, bed.client, "tcp-server", str(SERVICE), "1000")
    client = None
    try:
        expect(server, "listening")
        client = start(bed, bed.server, "tcp-client", CLIENT, str(SERVICE), "1000")
        expect(client, "ready")
        remote = expect(server, "ready")
        [known] = to_port(fw, SERVICE)
        assert known.key == ("TCP", SERVER, int(remote[1]), CLIENT, SERVICE)
        fw.apply(SessionBatch.put(remove=[known.key]))
        created = fw.stats().sessions_created
        go(server, client)
        time.sleep(2)
        assert not select.select([client.stdout], [], [], 0)[0], "data passed"
        assert fw.lookup([known.key]) == {}
        assert fw.stats().sessions_created == created
        fw.apply(SessionBatch.put([known]))
        expect(client, "done")
        expect(server, "done")
    finally:
        end(*filter(None, (server, client)))


def test_listed_outbound_rules_hold_across_a_restart_of_the_app(bed, fw):
    """Only the listed outbound connections open, also for an app started again after a
    crash (with the rules and the switch's connections); their changes are reported as
    untranslated sessions."""
    fw.apply_firewall_policy(FirewallPolicy([Subscriber(
        "alice", (TestBed.INSIDE_PREFIX,), outbound="listed",
        outbound_rules=(OutboundRule("web", "TCP", f"{SERVER}/32", 5630),))]))
    heard: list = []
    fw.watch(heard.extend)
    allowed, other = listen(bed, 5630), listen(bed, 5631)
    try:
        assert connects(bed, 5630)
        assert not connects(bed, 5631, timeout=1)
        fw.flush_changes()
        # Opened by the SYN, then its reply gave the peer's window scale.
        assert [event for event, _ in heard] == ["created", "updated"]
        opened = heard[-1][1]
        assert opened.dst_port == 5630 and opened.dst_window_scale is not None
        assert all(s[5:9] == (None,) * 4 for _, s in heard)
        first = fw._app.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (fw._app.pid == first or not fw._app_up.is_set()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [s.key for s in fw.sessions()] == [opened.key]
        assert not connects(bed, 5631, timeout=1)
        assert connects(bed, 5630)
    finally:
        end(allowed, other)
    assert len(to_port(fw, 5630)) == 2
