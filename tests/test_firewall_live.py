"""Live migration between stateful firewalls of different implementations, by the real
command: `nfmig migrate A B --with-policy` between `nfmig serve --nf firewall` on the
Linux firewall (nftables + conntrack) and on the OpenFlow firewall (Open vSwitch), both
ways, while a TCP connection and a UDP flow run through A.

Both firewalls track TCP strictly and drop what nothing admits, so the connections survive
only if their entries moved; nothing is translated, so the server reaches the client's own
address through the firewalls' outside gateway address."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the live firewall tests must not skip", pytrace=False)
    pytest.skip("network namespaces, conntrack and Open vSwitch need root",
                allow_module_level=True)

from nfmig.client.demo_firewall import firewall_policy  # noqa: E402
from nfmig.client.local import LocalServer, start_local_server  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

from . import test_linux_nat as kernel  # noqa: E402
from .test_firewall_linux import inbound, listen_in  # noqa: E402
from .test_linux_nat import counter, expect, go, open_tcp, open_udp  # noqa: E402

bed = kernel.bed  # the kernel NAT tests' test bed, with their reset counters
FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
PINHOLE_PORT, CLOSED_PORT = 7700, 7701
PINHOLE_LIFETIME = 12  # seconds: it outlives the migration, and expires within the test


class Firewall:
    def __init__(self, bed: TestBed, netns: str, backend: str, workdir: Path,
                 password: str, active: bool):
        self.backend = backend
        self.server: LocalServer = start_local_server(
            workdir, "--nf", "firewall", "--backend", backend, "--netns", netns,
            password=password)
        self.edit(firewall_policy(gateways=active))

    @property
    def url(self) -> str:
        return self.server.url

    def edit(self, body: str) -> None:
        self.server.edit(body)

    def sessions(self) -> list[dict[str, str]]:
        """Every connection, leaf name -> value."""
        client = self.server.client()
        try:
            text = client.get_sessions()[0]
        finally:
            client.close()
        return [dict(LEAF.findall(entry)) for entry in text.split("</nat-session>")[:-1]]


LEAF = re.compile(r"<(\w+)>([^<]*)</\1>")


@pytest.fixture
def firewalls(bed, tmp_path, request):
    backends = request.param
    if "openflow" in backends:
        without_checksum_offload(bed)
    bed.run(bed.server, "ip", "route", "add", TestBed.INSIDE_PREFIX, "via", TestBed.EXTERNAL)
    password = "p" + secrets.token_urlsafe(12)
    (tmp_path / "password").write_text(password + "\n")
    started: list[Firewall] = []
    try:
        for name, backend, ns in (("a", backends[0], bed.nat_a), ("b", backends[1], bed.nat_b)):
            started.append(Firewall(bed, ns, backend, tmp_path / name, password, name == "a"))
        bed.activate(bed.nat_a)
        yield started
    finally:
        for firewall in started:
            firewall.server.stop()


def migrate(tmp_path: Path, a: Firewall, b: Firewall) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "nfmig", "migrate", a.url, b.url, "--with-policy", "--json",
         "--password-file", str(tmp_path / "password"), "--insecure-no-host-key-check"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def pinhole(port: int) -> str:
    return (f'<pinhole xmlns="{FW_NS}"><protocol>TCP</protocol><remote-address>'
            f"{TestBed.SERVER}</remote-address><local-address>{TestBed.CLIENT}"
            f"</local-address><local-port>{port}</local-port><reason>related</reason>"
            f"<timeout>{PINHOLE_LIFETIME}</timeout></pinhole>")


@pytest.mark.parametrize("firewalls", [("linux", "linux"), ("linux", "openflow"),
                                       ("openflow", "linux")], ids="->".join, indirect=True)
def test_connections_pinholes_and_the_policy_move_to_the_other_firewall(bed, firewalls,
                                                                       tmp_path):
    a, b = firewalls
    tcp_server, tcp_client, tcp_peer = open_tcp(bed, 5501, 1 << 20)
    udp_server, udp_client, udp_peer = open_udp(bed, 5502, "server")
    # nothing translated: the server sees the client's own address
    assert tcp_peer[0] == udp_peer[0] == TestBed.CLIENT
    listeners = [listen_in(bed, bed.client, port) for port in (PINHOLE_PORT, CLOSED_PORT)]
    try:
        a.edit(pinhole(PINHOLE_PORT))
        opened = time.monotonic()
        assert not inbound(bed, CLOSED_PORT)  # unsolicited: dropped on A
        before = {s["dst_port"]: s for s in a.sessions()}
        report = migrate(tmp_path, a, b)
        assert report["pinholes_moved"] == 1
        assert a.sessions() == [], "every connection left A"
        # the strict target takes the running connections without a new SYN
        go(tcp_server, tcp_client, udp_server, udp_client)
        assert expect(tcp_server, "done") == tcp_peer
        expect(tcp_client, "done")
        assert expect(udp_server, "done") == udp_peer
        expect(udp_client, "done")
        for ns in (bed.server, bed.client):
            assert counter(bed, ns, "resets") == 0, f"a TCP reset was seen in {ns}"
        after = {s["dst_port"]: s for s in b.sessions()}
        moved = after["5501"]
        assert "translated_address" not in moved
        assert int(moved["orig_bytes"]) > int(before["5501"].get("orig_bytes", 0)) >= 0
        assert int(moved["orig_packets"]) >= int(before["5501"].get("orig_packets", 0))
        # B's policy came along: the unsolicited connection stays blocked there too, the
        # pinhole admits its flow until its lifetime (counted on A first) runs out
        assert not inbound(bed, CLOSED_PORT)
        assert inbound(bed, PINHOLE_PORT)
        time.sleep(max(0.0, opened + PINHOLE_LIFETIME + 1.5 - time.monotonic()))
        assert not inbound(bed, PINHOLE_PORT)
    finally:
        for proc in (tcp_server, tcp_client, udp_server, udp_client, *listeners):
            proc.kill()
            proc.wait()
