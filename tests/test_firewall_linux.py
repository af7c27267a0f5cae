"""The Linux stateful firewall backend with live traffic (yang/nfmig-firewall).

A firewall backend runs in each NAT namespace of a test bed, routing between client and
server with no translation: the server reaches the client's network through the outside
gateway address. Outbound connections of the subscriber pass, unsolicited inbound ones are
dropped unless an inbound service or a pinhole admits them, and an established connection
whose conntrack entry moves from one firewall to the other carries on through the second
without a new SYN, under strict TCP tracking.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the Linux firewall tests must not skip", pytrace=False)
    pytest.skip("network namespaces, nftables and conntrack need root",
                allow_module_level=True)

from nfmig.nf_backends import create_backend  # noqa: E402
from nfmig.nf_backends.base import BackendError, GatewayAddress, NatPolicy, Session  # noqa: E402
from nfmig.nf_backends.batch import SessionBatch  # noqa: E402
from nfmig.nf_backends.firewall import (  # noqa: E402
    FirewallPolicy,
    InboundService,
    OutboundRule,
    Pinhole,
    Subscriber,
    translation_refusal,
)
from nfmig.nf_backends.linux_firewall import LinuxFirewallBackend  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402

from . import test_linux_nat as kernel  # noqa: E402
from .test_linux_nat import counter, expect, go, open_tcp, open_udp  # noqa: E402

bed = kernel.bed  # the kernel NAT tests' test bed, with their reset counters

GATEWAYS = [GatewayAddress(TestBed.INSIDE_GATEWAY, "inside", 24),
            GatewayAddress(TestBed.EXTERNAL, "outside", 24)]
ALICE = Subscriber("alice", (TestBed.INSIDE_PREFIX,))
REFUSED = 1.0  # seconds a connection attempt that the firewall drops is given


def policy(gateways: bool) -> NatPolicy:
    return NatPolicy(inside_interface="inside", outside_interface="outside",
                     gateway_address=GATEWAYS if gateways else [])


@pytest.fixture
def firewalls(bed):
    """A firewall on NAT A (with the gateway addresses, the active one) and on NAT B
    (without), each with subscriber alice owning the client's network; both stopped
    after the test, whatever happens."""
    # Nothing is translated: the server routes the inside network through the firewall.
    bed.run(bed.server, "ip", "route", "add", TestBed.INSIDE_PREFIX, "via", TestBed.EXTERNAL)
    with contextlib.ExitStack() as stack:
        started = []
        for ns, gateways in ((bed.nat_a, True), (bed.nat_b, False)):
            firewall = create_backend("linux", nf="firewall", netns=ns)
            firewall.start()
            stack.callback(firewall.stop)
            firewall.apply_policy(policy(gateways))
            firewall.apply_firewall_policy(FirewallPolicy([ALICE]))
            started.append(firewall)
        bed.activate(bed.nat_a)  # the hosts' neighbour entries point at A at once
        yield tuple(started)


def listen_in(bed: TestBed, ns: str, port: int) -> subprocess.Popen:
    """A TCP listener on ``port`` in ``ns`` (the kernel NAT tests' one, anywhere)."""
    proc = bed.popen(ns, sys.executable, "-c", kernel.LISTENER, str(port),
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["listening"]
    return proc


def inbound(bed: TestBed, port: int, timeout: float = REFUSED) -> bool:
    """Whether a new TCP connection from the server reaches the client's ``port``, on
    which something listens (so a failure is a drop, not a refusal)."""
    done = bed.run(bed.server, sys.executable, "-c", kernel.CONNECT, TestBed.CLIENT,
                   str(port), str(timeout), check=False)
    return done.returncode == 0


def assert_no_reset(bed: TestBed) -> None:
    for ns in (bed.server, bed.client):
        assert counter(bed, ns, "resets") == 0, f"a TCP reset was seen in {ns}"


def sessions_to(firewall: LinuxFirewallBackend, protocol: str, port: int) -> list[Session]:
    return [s for s in firewall.sessions() if s.protocol == protocol and s.dst_port == port]


# -- the policy ------------------------------------------------------------------------------
def test_create_backend_makes_the_linux_firewall():
    firewall = create_backend("linux", nf="firewall", netns="unused")  # touches nothing yet
    assert isinstance(firewall, LinuxFirewallBackend) and firewall.nf == "firewall"
    assert type(create_backend("linux", netns="unused")).__name__ == "LinuxBackend"
    with pytest.raises(ValueError):
        create_backend("linux", nf="router", netns="unused")


def test_outbound_tcp_and_udp_pass_untranslated_and_are_tracked_with_counts(bed, firewalls):
    a, _ = firewalls
    assert a.stats().implementation == "linux-firewall"
    tcp_server, tcp_client, tcp_peer = open_tcp(bed, 5101, 1 << 16)
    udp_server, udp_client, udp_peer = open_udp(bed, 5102, "client")
    assert tcp_peer[0] == udp_peer[0] == TestBed.CLIENT  # nothing translated
    go(tcp_server, tcp_client, udp_server, udp_client)
    for proc in (tcp_server, tcp_client, udp_server, udp_client):
        expect(proc, "done")
    (udp,) = sessions_to(a, "UDP", 5102)
    (tcp,) = sessions_to(a, "TCP", 5101)
    for session in (udp, tcp):
        assert session.src_address == TestBed.CLIENT
        assert (session.translated_address, session.translated_port,
                session.translated_dst_address, session.translated_dst_port) == (None,) * 4
    assert (udp.orig_packets, udp.reply_packets) == (2, 2)  # greeting and one more each way
    assert tcp.orig_bytes > 1 << 16 and tcp.reply_bytes > 1 << 16
    assert a.stats().session_count >= 2
    assert_no_reset(bed)


def test_only_what_the_subscribers_rules_allow_opens_outbound(bed, firewalls):
    a, _ = firewalls
    listeners = [kernel.listen(bed, port) for port in (5111, 5112)]
    web_only = Subscriber("alice", (TestBed.INSIDE_PREFIX,), outbound="listed",
                          outbound_rules=(OutboundRule("one", "TCP", "192.0.2.0/24", 5111),))
    a.apply_firewall_policy(FirewallPolicy([web_only]))
    assert kernel.connects(bed, 5111)
    assert not kernel.connects(bed, 5112, REFUSED)
    # The client's address in nobody's prefix: it opens nothing.
    a.apply_firewall_policy(FirewallPolicy([Subscriber("bob", ("10.0.0.128/25",))]))
    assert not kernel.connects(bed, 5111, REFUSED)
    for listener in listeners:
        listener.kill()


def test_unsolicited_inbound_is_dropped_and_an_inbound_service_admits_its_port(bed, firewalls):
    a, _ = firewalls
    for port in (5121, 5122):
        listen_in(bed, bed.client, port)
    assert not inbound(bed, 5121)
    a.apply_firewall_policy(FirewallPolicy([Subscriber(
        "alice", (TestBed.INSIDE_PREFIX,), inbound_services=(
            InboundService("TCP", 5121), InboundService("TCP", 5122, ("198.51.100.0/24",))))]))
    assert inbound(bed, 5121, timeout=5)
    assert not inbound(bed, 5122)  # the server is not among the service's remotes
    assert_no_reset(bed)


def test_firewall_policy_the_model_forbids_is_refused_and_changes_nothing(bed, firewalls):
    a, _ = firewalls
    listen_in(bed, bed.client, 5131)
    a.apply_firewall_policy(FirewallPolicy([Subscriber(
        "alice", (TestBed.INSIDE_PREFIX,), inbound_services=(InboundService("TCP", 5131),))]))
    for bad in ([ALICE, Subscriber("bob", ("10.0.0.0/28",))],  # overlapping prefixes
                [Subscriber("alice", ("10.0.0.0/33",))],
                [Subscriber("alice", (TestBed.INSIDE_PREFIX,),
                            inbound_services=(InboundService("ICMP", 1),))]):
        with pytest.raises(BackendError):
            a.apply_firewall_policy(FirewallPolicy(bad))
    with pytest.raises(BackendError):
        a.apply_policy(NatPolicy(external_address=["192.0.2.9"]))
    assert inbound(bed, 5131, timeout=5)  # the rules before stay in force


# -- pinholes --------------------------------------------------------------------------------
def test_a_pinhole_admits_its_flow_until_it_expires(bed, firewalls):
    a, _ = firewalls
    for port in (5141, 5142):
        listen_in(bed, bed.client, port)
    a.apply_pinholes([Pinhole("TCP", TestBed.SERVER, TestBed.CLIENT, 5141, "related", 2)], [])
    assert inbound(bed, 5141, timeout=1.5)
    assert not inbound(bed, 5142)  # another port of the same client: no pinhole
    deadline = time.monotonic() + 5
    while a.pinholes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.pinholes() == []
    assert not inbound(bed, 5141)
    a.apply_pinholes([Pinhole("TCP", TestBed.SERVER, TestBed.CLIENT, 5141, "related", 2)], [])
    assert inbound(bed, 5141, timeout=1.5)  # opened again once gone
    assert_no_reset(bed)


def test_pinholes_read_back_with_remaining_lifetime_and_reason(firewalls):
    a, _ = firewalls
    v4 = Pinhole("TCP", TestBed.SERVER, TestBed.CLIENT, 5151, "return-path", 3)
    v6 = Pinhole("UDP", "2001:DB8:2::100", "2001:db8:1:0::2", 53, "related", 100)
    a.apply_pinholes([v4, v6], [])
    held = {p.key: p for p in a.pinholes()}
    v6_key = ("UDP", "2001:db8:2::100", "2001:db8:1::2", 53)  # as nftables writes it
    assert held.keys() == {v4.key, v6_key}
    assert held[v4.key].reason == "return-path" and 2 <= held[v4.key].timeout <= 3
    assert held[v6_key].reason == "related" and 99 <= held[v6_key].timeout <= 100
    # A put of one that is there renews it; a remove of one that is not is no error.
    a.apply_pinholes([v4._replace(reason="related", timeout=600)],
                     [v6_key, ("TCP", "192.0.2.7", TestBed.CLIENT, 1)])
    (renewed,) = a.pinholes()
    assert renewed.key == v4.key and renewed.reason == "related"
    assert 599 <= renewed.timeout <= 600
    # All or nothing: one bad entry and none of the batch is applied.
    for put, remove in (([v6, v4._replace(local_address="2001:db8:1::2")], []),
                        ([v6], [("ICMP", TestBed.SERVER, TestBed.CLIENT, 0)]),
                        ([v6, v6._replace(timeout=5)], [])):
        with pytest.raises(BackendError):
            a.apply_pinholes(put, remove)
    assert [p.key for p in a.pinholes()] == [v4.key]


def test_pinholes_outlive_a_policy_change(firewalls):
    a, _ = firewalls
    a.apply_pinholes([Pinhole("UDP", TestBed.SERVER, TestBed.CLIENT, 5161, "related", 60)], [])
    a.apply_firewall_policy(FirewallPolicy([Subscriber("bob", ("10.0.0.128/25",))]))
    a.apply_policy(policy(gateways=True))
    assert [p.local_port for p in a.pinholes()] == [5161]


# -- sessions: what a migration moves ----------------------------------------------------------
def test_a_batch_with_a_translated_session_is_refused_whole(firewalls):
    _, b = firewalls
    plain = Session("TCP", TestBed.CLIENT, 40001, TestBed.SERVER, 80, tcp_state="established",
                    timeout=300)
    translated = plain._replace(src_port=40002, translated_address=TestBed.EXTERNAL,
                                translated_port=20002)
    assert b.refusal(plain) is None
    assert b.refusal(translated) == translation_refusal(translated)
    with pytest.raises(BackendError) as refused:
        b.apply(SessionBatch.put([plain, translated]))
    assert refused.value.key == translated.key
    assert b.lookup([plain.key, translated.key]) == {}


def test_an_established_connection_continues_through_the_firewall_its_entry_moved_to(
        bed, firewalls):
    a, b = firewalls
    server, client, peer = open_tcp(bed, 5171, 1 << 20)
    (moved,) = sessions_to(a, "TCP", 5171)
    assert (moved.src_address, moved.src_port) == (TestBed.CLIENT, int(peer[1]))
    assert moved.tcp_state == "established" and moved.translated_address is None
    assert moved.src_window_scale is not None and moved.dst_window_scale is not None
    b.apply(SessionBatch.put([moved]))
    written = b.lookup([moved.key])[moved.key]
    assert written._replace(timeout=None) == moved._replace(timeout=None)
    bed.switch_over(bed.nat_a, bed.nat_b)
    go(server, client)  # no new SYN: the segments of the connection go on through B
    assert expect(server, "done") == peer
    expect(client, "done")
    after = b.lookup([moved.key])[moved.key]
    assert after.orig_bytes > moved.orig_bytes + (1 << 20)  # B carried the client's bytes
    assert after.reply_bytes > moved.reply_bytes + (1 << 20)
    assert_no_reset(bed)


def test_a_mid_stream_segment_of_a_connection_the_firewall_does_not_know_is_dropped(
        bed, firewalls):
    _, b = firewalls
    server, client, peer = open_tcp(bed, 5181, 1 << 16)
    bed.switch_over(bed.nat_a, bed.nat_b)  # B never heard of the connection
    bed.run(bed.client, "nft", "-f", "-", input=(
        "add counter inet watch late\n"
        "add rule inet watch input tcp sport 5181 counter name late\n"))
    go(server, client)  # the server sends first: its segments meet B
    time.sleep(1.5)
    assert counter(bed, bed.client, "late") == 0, "B let a segment it does not track through"
    assert sessions_to(b, "TCP", 5181) == []
    assert_no_reset(bed)
    assert client.poll() is None and server.poll() is None  # stalled, not reset


def test_a_hold_drops_new_connections_of_the_held_sources_only_while_it_lasts(bed, firewalls):
    a, _ = firewalls
    listener = kernel.listen(bed, 5191)
    server, client, _ = open_tcp(bed, 5192, 1 << 16)
    a.hold_new_sessions([TestBed.INSIDE_PREFIX], timeout=30)
    assert not kernel.connects(bed, 5191, REFUSED)
    go(server, client)  # an established connection flows on
    expect(server, "done")
    expect(client, "done")
    a.hold_new_sessions([])
    assert kernel.connects(bed, 5191)
    listener.kill()
    assert_no_reset(bed)
