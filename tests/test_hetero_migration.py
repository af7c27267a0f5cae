"""Live migration between two NATs that share nothing but the YANG model: the Linux kernel
NAT (conntrack, NAT A) and the SDN NAT (Open vSwitch + the OpenFlow NAT app, NAT B).

Each test runs a real `nfmig serve` per NAT, opens a TCP connection and a UDP flow through
the active one, moves the sessions with get-data / edit-config / delete through the servers,
switches the gateway addresses over and checks that both keep going (the server speaks
first, then 2 MB each way on TCP) with the server seeing the same translated endpoint. A
ping moves too, its echo identifier kept.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

from .test_linux_nat import (
    WATCH,
    assert_clean,
    expect,
    go,
    migrate,
    open_tcp,
    start,
    start_pair,
    translated_ports,
)

SIZE = 2 << 20


@pytest.fixture
def bed():
    with TestBed() as testbed:
        for ns in (testbed.server, testbed.client):
            testbed.run(ns, "nft", "-f", "-", input=WATCH)
        without_checksum_offload(testbed)
        yield testbed


@pytest.fixture
def nats(bed, tmp_path):
    a, b = start_pair(bed, tmp_path, "openflow", ("linux", "sdn"))
    yield a, b
    a.close()
    b.close()


def open_flows(bed: TestBed, port: int):
    """A greeted TCP connection (server first after go) and a UDP flow, through the active
    NAT: the processes and the endpoints the server saw."""
    tcp_server, tcp_client, tcp_peer = open_tcp(bed, port, SIZE)
    udp_server = start(bed, bed.server, "udp-server", str(port + 1), "server")
    expect(udp_server, "listening")
    udp_client = start(bed, bed.client, "udp-client", TestBed.SERVER, str(port + 1), "server")
    expect(udp_client, "ready")
    udp_peer = expect(udp_server, "ready")
    return [tcp_server, udp_server], [tcp_client, udp_client], [tcp_peer, udp_peer]


def assert_flowing(bed: TestBed, servers, clients, peers) -> None:
    go(*servers, *clients)
    assert [expect(s, "done") for s in servers] == peers
    for c in clients:
        expect(c, "done")
    assert_clean(bed)


def test_linux_to_openflow_keeps_tcp_and_udp_flowing(bed, nats):
    linux, sdn = nats
    bed.activate(linux.netns)
    servers, clients, peers = open_flows(bed, 5401)
    migrate(linux, sdn, bed)
    assert translated_ports(sdn, "TCP") == {tuple(peers[0])}
    assert translated_ports(sdn, "UDP") == {tuple(peers[1])}
    assert translated_ports(linux, "TCP") == set()
    assert_flowing(bed, servers, clients, peers)


def test_openflow_to_linux_moves_sessions_the_sdn_app_created(bed, nats):
    linux, sdn = nats
    bed.activate(sdn.netns)
    servers, clients, peers = open_flows(bed, 5411)
    assert peers[0][0] == TestBed.EXTERNAL
    assert translated_ports(sdn, "TCP") == {tuple(peers[0])}
    migrate(sdn, linux, bed)
    assert translated_ports(linux, "TCP") == {tuple(peers[0])}
    assert translated_ports(linux, "UDP") == {tuple(peers[1])}
    assert translated_ports(sdn, "TCP") == set()
    assert_flowing(bed, servers, clients, peers)


def test_round_trip_linux_to_openflow_to_linux(bed, nats):
    linux, sdn = nats
    bed.activate(linux.netns)
    servers, clients, peers = open_flows(bed, 5421)
    migrate(linux, sdn, bed)
    migrate(sdn, linux, bed)
    assert translated_ports(linux, "TCP") == {tuple(peers[0])}
    assert translated_ports(sdn, "TCP") == set()
    assert_flowing(bed, servers, clients, peers)


def test_a_ping_moves_from_linux_to_openflow_keeping_its_echo_identifier(bed, nats):
    linux, sdn = nats
    bed.activate(linux.netns)
    ping = bed.popen(bed.client, "ping", "-n", "-i", "0.1", "-c", "40", "-W", "1",
                     TestBed.SERVER, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # echoes through NAT A first, so that it holds the echo session
        before = translated_ports(linux, "ICMP")
        assert len(before) == 1
        migrate(linux, sdn, bed)
        out, _ = ping.communicate(timeout=30)
    finally:
        ping.kill()
        ping.wait()
    assert translated_ports(sdn, "ICMP") == before
    assert "icmp_seq=40 " in out, out  # answered through the SDN NAT at the end
    assert int(re.search(r"(\d+) received", out).group(1)) >= 30, out
