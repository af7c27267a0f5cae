"""`nfmig migrate` itself, live: TCP and UDP streams through NAT A keep flowing while the
command moves their sessions and the gateway addresses to NAT B, and after faults every
session is where the exit code and the report say.

Each test builds its own hosts in namespaces (client, NAT A, NAT B, server), runs one
`nfmig serve` per NAT, lets NAT A answer for the gateway addresses by its policy, and runs
the real command line as a process of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NatClient

from nfmig.probe import Probe

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the live migration tests must not skip", pytrace=False)
    pytest.skip("network namespaces and conntrack need root", allow_module_level=True)

from nfmig.client.demo_linux import gateway_policy  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

from .test_migrate_linux import synthetic  # noqa: E402

BACKGROUND = 1000  # sessions besides the streams', moved with them
MAX_GAP_MS = 100  # the goal is 50; this machine's host alone stalls a process ~50 ms at times


class Nat:
    def __init__(self, bed: TestBed, ns: str, workdir: Path, password: str, backend: str,
                 active: bool):
        self.bed, self.ns, self.workdir, self.password = bed, ns, workdir, password
        self.backend = backend
        self.server = self._start()
        self.edit(gateway_policy(gateways=active))

    def _start(self) -> LocalServer:
        return start_local_server(self.workdir, "--backend", self.backend, "--netns", self.ns,
                                  password=self.password)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> NatClient:
        return self.server.client()

    def edit(self, body: str) -> None:
        self.server.edit(body)

    def keys(self) -> set[tuple[str, str]]:
        """(protocol, src_port) of every session."""
        client = self.client()
        try:
            text = client.get_sessions()[0]
        finally:
            client.close()
        found = set()
        for entry in text.split("</nat-session>")[:-1]:
            proto = entry.split("<protocol>")[1].split("<")[0]
            port = entry.split("<src_port>")[1].split("<")[0]
            found.add((proto, port))
        return found

    def kill(self) -> None:
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait()

    def restart(self) -> None:
        self.server = self._start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def bed():
    with TestBed() as testbed:
        yield testbed


def start_pair(bed: TestBed, tmp_path: Path, backends=("linux", "linux")) -> tuple[Nat, Nat]:
    password = secrets.token_urlsafe(12)
    a = Nat(bed, bed.nat_a, tmp_path / "a", password, backends[0], active=True)
    try:
        b = Nat(bed, bed.nat_b, tmp_path / "b", password, backends[1], active=False)
    except BaseException:
        a.stop()
        raise
    (tmp_path / "password").write_text(password + "\n")
    return a, b


@pytest.fixture
def pair(bed, tmp_path):
    a, b = start_pair(bed, tmp_path)
    yield a, b
    a.stop()
    b.stop()


def migrate_command(a: Nat, b: Nat, *options: str) -> list[str]:
    return [sys.executable, "-m", "nfmig", "migrate", a.url, b.url, "--password-file",
            str(a.workdir.parent / "password"), "--insecure-no-host-key-check", "--json",
            "--freeze-timeout", "30", *options]


def verbose(command: list[str]) -> list[str]:
    """The command with every phase logged to stderr as it ends."""
    return [*command[:3], "-v", *command[3:]]


def run_until(a: Nat, b: Nat, phase: str, fault, *options: str) -> subprocess.Popen:
    """The command, logging its phases; ``fault(process)`` runs as soon as ``phase`` has
    ended (the log names each phase as it ends). The process, still running or not."""
    proc = subprocess.Popen(verbose(migrate_command(a, b, *options)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if f" {phase} " in line:
            fault(proc)
            break
    return proc


def run_migrate(a: Nat, b: Nat, *options: str) -> tuple[int, dict]:
    done = subprocess.run(migrate_command(a, b, *options), capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def assert_streams_did_not_notice(result) -> None:
    problems = result.problems(max_gap_ms=MAX_GAP_MS)
    assert not problems, problems
    assert result.rst_packets == 0 and result.resets == 0
    assert result.untranslated == 0
    assert result.rto_timeouts() in (0, None)


@pytest.mark.parametrize("backends", [("linux", "linux"), ("linux", "openflow"),
                                      ("openflow", "linux")], ids="->".join)
def test_streams_keep_flowing_through_a_live_migration_by_the_command(bed, tmp_path,
                                                                       backends):
    if "openflow" in backends:
        without_checksum_offload(bed)
    a, b = start_pair(bed, tmp_path, backends)
    try:
        a.edit(synthetic(BACKGROUND))
        with Probe(bed) as probe:  # the streams are flowing
            time.sleep(0.3)
            code, report = run_migrate(a, b)
            time.sleep(0.5)
            result = probe.stop()
        check_live_move(a, b, code, report, result)
    finally:
        a.stop()
        b.stop()


def check_live_move(a: Nat, b: Nat, code: int, report: dict, result) -> None:
    print(f"freeze window {report['freeze_window']['seconds'] * 1000:.1f} ms, switchover "
          f"{(report['switchover_seconds'] or 0) * 1000:.1f} ms, longest stream gap "
          f"{result.longest_gap_ms():.1f} ms, retransmissions {result.retransmissions()}, "
          f"RTOs {result.rto_timeouts()}, RST {result.rst_packets}, untranslated "
          f"{result.untranslated}, total {report['total_seconds']:.2f} s; window: " +
          ", ".join(f"{p['name']} {p['seconds'] * 1000:.1f}" for p in report["phases"]
                    if p["name"] in ("freeze", "delta", "commit", "confirm", "switchover",
                                     "thaw")))
    assert code == 0, report["reason"]
    assert_streams_did_not_notice(result)
    assert report["switchover"].startswith("gateway 10.0.0.1/24 (inside), 192.0.2.1/24")
    assert report["freeze_window"]["seconds"] is not None
    moved = report["sessions_moved"]
    assert moved >= BACKGROUND + 2  # the probe's TCP and UDP sessions too
    assert a.keys() == set() and len(b.keys()) == moved
    phases = [p["name"] for p in report["phases"]]
    assert phases.index("switchover") < phases.index("delete")


# A fault lands at the end of the target's commit: the command then reads every session
# back from the target, which takes long enough at this size that the fault comes before
# the targets confirm, however late the test sees the log line.
KILLED_AT = "commit"
MANY = 20000


def test_a_source_killed_during_the_move_keeps_its_sessions_and_the_copy_is_undone(bed,
                                                                                    pair):
    a, b = pair
    a.edit(synthetic(MANY))
    before = a.keys()
    proc = run_until(a, b, KILLED_AT, lambda _: a.kill())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    report = json.loads(out)
    assert report["cleanup_complete"] is True and report["result"] == "failed"
    a.restart()
    assert a.keys() == before  # the kernel kept them; a new server finds them
    assert b.keys() == set()  # B's unconfirmed commit was cancelled


def test_a_target_killed_holding_its_confirmed_commit_undoes_it_when_restarted(bed, pair):
    a, b = pair
    a.edit(synthetic(MANY))
    before = a.keys()
    proc = run_until(a, b, KILLED_AT, lambda _: b.kill())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out  # B unreachable: its copy is undone when it restarts
    assert a.keys() == before
    b.restart()
    assert b.keys() == set()
    code, report = run_migrate(a, b)
    assert code == 0, report["reason"]
    assert a.keys() == set() and b.keys() == before


def test_a_migrator_killed_after_the_commit_point_leaves_both_and_a_rerun_finishes(bed, pair):
    a, b = pair
    a.edit(synthetic(300))
    before = a.keys()
    # the targets confirmed: from here on only forward
    proc = run_until(a, b, "confirm", subprocess.Popen.kill)
    proc.wait(timeout=30)
    assert b.keys() == before  # confirmed: B keeps them whatever follows
    code, report = run_migrate(a, b)
    assert code == 0, report["reason"]
    assert a.keys() == set() and b.keys() == before


def ipv6_and_dnat_sessions() -> str:
    ns = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
    v6 = "".join(
        f'<nat-session xmlns="{ns}"><protocol>TCP</protocol><src_address>fd00::2'
        f"</src_address><src_port>{41000 + i}</src_port><dst_address>2001:db8::100"
        "</dst_address><dst_port>443</dst_port><translated_address>2001:db8::1"
        f"</translated_address><translated_port>{21000 + i}</translated_port>"
        "<tcp_state>established</tcp_state></nat-session>" for i in range(3))
    dnat = (f'<nat-session xmlns="{ns}"><protocol>TCP</protocol><src_address>'
            f"{TestBed.SERVER}</src_address><src_port>42000</src_port><dst_address>"
            f"{TestBed.EXTERNAL}</dst_address><dst_port>8080</dst_port>"
            f"<translated_dst_address>{TestBed.CLIENT}</translated_dst_address>"
            "<translated_dst_port>80</translated_dst_port><tcp_state>established</tcp_state>"
            "</nat-session>")
    return v6 + dnat


def test_sessions_the_sdn_nat_cannot_hold_refuse_the_move_or_stay_with_partial(bed,
                                                                                tmp_path):
    without_checksum_offload(bed)
    a, b = start_pair(bed, tmp_path, ("linux", "openflow"))
    try:
        a.edit(synthetic(20) + ipv6_and_dnat_sessions())
        before = a.keys()
        code, report = run_migrate(a, b)
        assert code == 1 and report["result"] == "refused"
        assert "cannot hold 4 of the selected sessions" in report["reason"]
        assert len(report["conflicts"]) == 4  # each named, with why
        assert sum("IPv4 only" in c for c in report["conflicts"]) == 3
        assert a.keys() == before and b.keys() == set()

        code, report = run_migrate(a, b, "--partial")
        assert code == 0, report["reason"]
        assert report["stayed"] == 4 and report["sessions_moved"] == 20
        assert len(b.keys()) == 20 and len(a.keys()) == 4  # the four stayed on A
    finally:
        a.stop()
        b.stop()


def test_an_sdn_target_killed_before_it_confirms_leaves_every_session_on_the_source(
        bed, tmp_path):
    """The SDN NAT's flows die with its switch, which dies with its server: the source
    keeps every session, and a new server for the namespace lets a re-run finish."""
    without_checksum_offload(bed)
    a, b = start_pair(bed, tmp_path, ("linux", "openflow"))
    try:
        a.edit(synthetic(MANY))
        before = a.keys()
        proc = run_until(a, b, KILLED_AT, lambda _: b.kill())
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode in (1, 3), out
        report = json.loads(out)
        assert report["result"] == "failed"
        assert a.keys() == before  # nothing was deleted on the source
        b.restart()
        b.edit(gateway_policy(gateways=False))
        assert b.keys() == set()
        code, report = run_migrate(a, b)
        assert code == 0, report["reason"]
        assert a.keys() == set() and b.keys() == before
    finally:
        a.stop()
        b.stop()
