"""The live-stream probe: silent for an undisturbed stream, and it sees what a NAT does to one
(a blackhole, a packet that left untranslated, a reset).

One test bed for the module, NAT A active with a plain nftables source NAT (no nfmig server:
the probe is what is tested here); each test uses a port of its own.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the probe tests must not skip", pytrace=False)
    pytest.skip("network namespaces need root", allow_module_level=True)

from nfmig.probe import Probe, measure  # noqa: E402
from nfmig.testbed import TestBed  # noqa: E402

UNTRANSLATED_PORT = 9  # the NAT leaves datagrams to this port alone
SNAT = f"""table ip probe_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    udp dport {UNTRANSLATED_PORT} accept
    ip saddr {TestBed.INSIDE_PREFIX} oifname "outside" snat to {TestBed.EXTERNAL}
  }}
}}
"""
HOLE_SECONDS = 0.2


def blackhole(port: int) -> str:
    """Drop the probe's TCP and UDP in both directions while it is loaded into the NAT."""
    return f"""table inet probe_hole {{
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    meta l4proto {{ tcp, udp }} th dport {port} drop
    meta l4proto {{ tcp, udp }} th sport {port} drop
  }}
}}
"""


@pytest.fixture(scope="module")
def bed():
    with TestBed() as testbed:
        testbed.run(testbed.nat_a, "nft", "-f", "-", input=SNAT)
        testbed.activate(testbed.nat_a)
        yield testbed


def test_an_undisturbed_stream_reports_nothing_wrong(bed):
    result = measure(bed, lambda probe: time.sleep(0.3), port=5901, max_seconds=30)

    assert result.tcp_peer.startswith(f"{TestBed.EXTERNAL}:")  # through the NAT
    for flow in (*result.tcp.values(), *result.udp.values()):
        assert flow.sent > 100 and flow.received == flow.sent
        assert (flow.lost, flow.duplicated) == (0, 0)
        # a 2 ms stream; the bound leaves room for a busy host, far below the blackhole's
        assert flow.longest_gap_ms < 100
    assert result.retransmissions() == 0 and result.rto_timeouts() in (0, None)
    assert (result.resets, result.rst_packets, result.untranslated) == (0, 0, 0)
    assert result.udp_peer_changes == 0
    assert result.problems(max_gap_ms=100) == []
    json.dumps(result.to_dict())  # plain data


def test_a_200_ms_blackhole_on_the_nat_is_a_gap_in_every_stream(bed):
    port = 5902

    def hole(probe: Probe) -> None:
        bed.run(bed.nat_a, "nft", "-f", "-", input=blackhole(port))
        try:
            probe.mark("dropping")
            time.sleep(HOLE_SECONDS)
        finally:
            bed.run(bed.nat_a, "nft", "delete", "table", "inet", "probe_hole")
        probe.mark("forwarding")

    result = measure(bed, hole, after=0.6, port=port, max_seconds=30)

    start, end = result.events["dropping"], result.events["forwarding"]
    for kind, flows in (("tcp", result.tcp), ("udp", result.udp)):
        for direction, flow in flows.items():
            assert flow.longest_gap_ms >= HOLE_SECONDS * 1000 - 20, (kind, direction)
            assert start - 0.05 <= flow.longest_gap_at_s <= end, (kind, direction)
    for flow in result.udp.values():
        assert flow.lost >= HOLE_SECONDS / 0.002 / 2  # about 100 datagrams each way
    for flow in result.tcp.values():
        assert flow.lost == 0  # TCP repaired it...
    assert result.retransmissions() > 0  # ...by sending again
    assert result.resets == result.rst_packets == result.untranslated == 0
    assert any("gap of" in problem for problem in result.problems())


STRAYS = f"""import socket
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"x", ("{TestBed.SERVER}", {UNTRANSLATED_PORT}))
try:
    socket.create_connection(("{TestBed.SERVER}", int(__import__("sys").argv[1])), timeout=2)
except ConnectionRefusedError:
    print("refused")
"""


def test_an_untranslated_packet_and_a_reset_on_the_probe_port_are_counted(bed):
    port = 5903

    def strays(probe: Probe) -> None:
        # One datagram the NAT does not translate; one connection to the probe's port,
        # which the server (its listener gone once the probe connected) refuses with a RST.
        out = bed.run(bed.client, sys.executable, "-c", STRAYS, str(port)).stdout
        assert out.split() == ["refused"]

    result = measure(bed, strays, port=port, max_seconds=30)

    assert result.untranslated == 1
    assert result.rst_packets == 2  # sent by the server, received by the client
    assert result.resets == 0  # the probe's own connection carried on
    for flow in (*result.tcp.values(), *result.udp.values()):
        assert (flow.lost, flow.duplicated) == (0, 0)
    problems = result.problems()
    assert any("untranslated" in p for p in problems) and any("RST" in p for p in problems)
