"""Hot standby, live: `nfmig standby` keeps NAT B a copy of NAT A while TCP and UDP
connections flow through A; then A dies (its server killed, its links down), the command
fails over, and the connections go on through B.

Each test builds its own hosts in namespaces (client, NAT A, NAT B, server) and runs one
`nfmig serve` per Linux NAT and the real command line as a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nfmig.probe import Probe

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the live standby tests must not skip", pytrace=False)
    pytest.skip("network namespaces and conntrack need root", allow_module_level=True)

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

from .test_live_cli import start_pair  # noqa: E402
from .test_migrate_linux import NAT_NS, synthetic  # noqa: E402

BACKGROUND = 300
DAMPENING_MS = 20
FAILOVER_AFTER = 1


@pytest.fixture
def bed():
    with TestBed() as testbed:
        yield testbed


def standby_command(a, b, status, *options: str) -> list[str]:
    return [sys.executable, "-m", "nfmig", "standby", a.url, b.url, "--password-file",
            str(a.workdir.parent / "password"), "--insecure-no-host-key-check", "--json",
            "--dampening", str(DAMPENING_MS), "--status-file", str(status), *options]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def reply_tuples_unique(keys_text: str) -> bool:
    seen = set()
    for entry in keys_text.split("</nat-session>")[:-1]:
        def leaf(name: str, e=entry) -> str:
            return e.split(f"<{name}>")[1].split("<")[0] if f"<{name}>" in e else ""
        reply = (leaf("protocol"), leaf("translated_address"), leaf("translated_port"),
                 leaf("dst_address"), leaf("dst_port"))
        if reply in seen:
            return False
        seen.add(reply)
    return True


@pytest.mark.parametrize("backends", [("linux", "linux"), ("linux", "openflow"),
                                      ("openflow", "linux")], ids="->".join)
def test_connections_survive_the_sources_death_through_the_standby(bed: TestBed, tmp_path,
                                                                   backends):
    if "openflow" in backends:
        without_checksum_offload(bed)
    a, b = start_pair(bed, tmp_path, backends)
    status = tmp_path / "status.json"
    command = None
    try:
        a.edit(synthetic(BACKGROUND))
        command = subprocess.Popen(
            standby_command(a, b, status, "--failover-after", str(FAILOVER_AFTER)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(b.keys()) >= BACKGROUND, 30, "the initial copy")
        with Probe(bed) as probe:  # connections opened after the copy
            wait_for(lambda: a.keys() <= b.keys(), 10, "the probe's sessions on B")
            ended = {("TCP", str(30000 + i)) for i in range(5)}  # of the synthetic table
            a.edit("".join(_deletion(30000 + i) for i in range(5)))
            wait_for(lambda: not set(ended) & b.keys(), 10, "ended sessions gone from B")
            time.sleep(2 * DAMPENING_MS / 1000)
            a.kill()  # the source's server ...
            for dev in ("inside", "outside"):  # ... and its NAT
                bed.run(bed.nat_a, "ip", "link", "set", "dev", dev, "down")
            out, err = command.communicate(timeout=60)
            # the streams go on through B (TCP's retransmission timer backs off while A
            # is gone: its next try comes up to a few seconds later)
            time.sleep(5)
            result = probe.stop()
        report = json.loads(out)
        assert command.returncode == 1, err  # it failed over
        assert report["failover"]["standby"] == b.url, report
        print(f"failover in {report['failover']['seconds'] * 1000:.0f} ms after "
              f"{report['failover']['source_lost_for_s']:.2f} s without the source; longest "
              f"stream gap {result.longest_gap_ms():.0f} ms; RST {result.rst_packets}")
        assert result.rst_packets == 0 and result.resets == 0  # no connection broke
        assert all(f.lost == 0 for f in result.tcp.values())  # TCP caught up through B
        assert result.udp_peer_changes == 0  # UDP kept its translation
        assert result.untranslated == 0
        assert not set(ended) & b.keys()
        client = b.client()
        try:
            assert reply_tuples_unique(client.get_sessions()[0])
        finally:
            client.close()
    finally:
        if command is not None and command.poll() is None:
            command.kill()
            command.wait()
        a.stop()
        b.stop()


def _deletion(port: int) -> str:
    """The delete of one session of the synthetic table (tests.test_migrate_linux)."""
    return (f'<nat-session xmlns="{NAT_NS}" xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0" '
            f'nc:operation="delete"><protocol>TCP</protocol><src_address>{TestBed.CLIENT}'
            f"</src_address><src_port>{port}</src_port><dst_address>{TestBed.SERVER}"
            "</dst_address><dst_port>443</dst_port></nat-session>")
