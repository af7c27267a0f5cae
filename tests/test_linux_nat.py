"""Linux kernel NAT to Linux kernel NAT through two nfmig servers, with live connections.

Each test builds its own hosts in namespaces (client, NAT A, NAT B, server), runs one
`nfmig serve --backend linux` per NAT, moves the sessions with ncclient (get-data on A,
edit-config on B, delete on A), switches the gateway addresses over and checks that the
user's connection carries on: same translated address and port, no reset, no packet
leaving untranslated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NatClient

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

    def __init__(self, bed: TestBed, netns: str, workdir: Path):
        self.netns = netns
        self.server = start_local_server(workdir, "--backend", "linux", "--netns", netns)
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


@pytest.fixture
def nats(bed, tmp_path):
    a = Nat(bed, bed.nat_a, tmp_path / "a")
    try:
        b = Nat(bed, bed.nat_b, tmp_path / "b")
    except BaseException:
        a.close()
        raise
    bed.activate(bed.nat_a)
    yield a, b
    a.close()
    b.close()


def start(bed: TestBed, ns: str, *args: str) -> subprocess.Popen:
    return bed.popen(ns, sys.executable, TRAFFIC, *args, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)


def expect(proc: subprocess.Popen, word: str) -> list[str]:
    line = proc.stdout.readline().split()
    assert line and line[0] == word, f"expected {word!r}, got {line!r}"
    return line[1:]


def go(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def migrate(a: Nat, b: Nat, bed: TestBed) -> str:
    """Move every session of A to B through the servers, then switch the gateway over."""
    body, _ = a.client.get_sessions()
    assert "<nat-session" in body, "NAT A has no session to move"
    b.client.edit(body)
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
    size = 2 << 20
    server = start(bed, bed.server, "tcp-server", "5001", str(size))
    expect(server, "listening")
    client = start(bed, bed.client, "tcp-client", TestBed.SERVER, "5001", str(size))
    expect(client, "ready")
    peer_before = expect(server, "ready")
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
    server = start(bed, bed.server, "udp-server", "5002", first)
    expect(server, "listening")
    client = start(bed, bed.client, "udp-client", TestBed.SERVER, "5002", first)
    expect(client, "ready")
    peer_before = expect(server, "ready")
    migrate(a, b, bed)
    go(server, client)
    assert expect(server, "done") == peer_before
    expect(client, "done")
    assert_clean(bed)


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
    server = start(bed, bed.server, "udp-server", "5003", "client")
    expect(server, "listening")
    client = start(bed, bed.client, "udp-client", TestBed.SERVER, "5003", "client")
    expect(client, "ready")
    expect(server, "ready")
    migrate(a, b, bed)
    assert translated_ports(a, "UDP") == set()
    assert len(translated_ports(b, "UDP")) == 1
    go(server, client)
    expect(server, "done")
