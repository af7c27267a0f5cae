"""The migrator, through real `nfmig serve` processes (simulated NAT) on loopback.

Every failure test checks the invariant a migration promises: afterwards each session is on
exactly one side (a killed server's simulated table dies with it, so there that side holds
nothing), and running the migration again completes it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest
from lxml import etree
from nfmig.client.endpoints import (
    Connection,
    Credentials,
    Endpoint,
    EndpointError,
)
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.migrate import Migration, Options
from nfmig.client.negotiate import CANDIDATE, VALIDATE, Facts, ModuleInfo, problems
from nfmig.client.netconf import _leading_keys
from nfmig.client.selection import Selection, Split, parse_entries
from nfmig.server.auth import add_user
from nfmig.server.filters import subtree_filter, xpath_filter

from nfmig.cli import build_parser, main

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PASSWORD = "migrate-tests-password"  # an operator account every test server shares
NO_HOST_KEY_CHECK = Credentials(password=PASSWORD, verify_host_keys=False)


class Nat:
    """A NAT instance under test: its server process and a way to look at its sessions."""

    def __init__(self, server: LocalServer):
        self.server = server
        self.endpoint = Endpoint("127.0.0.1", server.port, "ops")
        self.url = str(self.endpoint)
        self._conn: Connection | None = None

    def connect(self) -> Connection:
        return Connection(self.endpoint, NO_HOST_KEY_CHECK, timeout=60)

    @property
    def conn(self) -> Connection:
        """One session for the test's own looks (each login costs a password hash check)."""
        if self._conn is None or not self._conn.connected:
            self._conn = self.connect()
        return self._conn

    def sessions(self) -> dict[tuple, tuple | None]:
        """Every session in running: key -> translated endpoint."""
        text = self.conn.get_data("running", Selection.all().filter_xml())
        return {e.key: e.endpoint for e in parse_entries(text)}

    def plant(self, *entries: str) -> None:
        self.conn.edit_config("".join(entries), "running")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.server.stop()

    def kill(self) -> None:
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait()


def start_nats(tmp_path: Path, *seeds: int) -> list[Nat]:
    """One server per seed count, started in parallel (each takes about half a second)."""
    def one(index: int, sessions: int) -> Nat:
        workdir = tmp_path / f"nat{index}"
        workdir.mkdir(parents=True)
        # A test password: scrypt at 2^14, not the default 2^17 (+0.35 s per login).
        add_user(workdir / "users", "ops", password=PASSWORD, log2_n=14)
        return Nat(start_local_server(workdir, "--sessions", str(sessions)))
    with ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(one, i, n) for i, n in enumerate(seeds)]
    return [f.result() for f in futures]


def session(src: str, sport: int, taddr: str | None = None, tport: int | None = None,
            dst: str = "198.51.100.9", dport: int = 80) -> str:
    translated = (f"<translated_address>{taddr}</translated_address>"
                  f"<translated_port>{tport}</translated_port>" if taddr else "")
    return (f'<nat-session xmlns="{NAT_NS}"><protocol>TCP</protocol><src_address>{src}'
            f"</src_address><src_port>{sport}</src_port><dst_address>{dst}</dst_address>"
            f"<dst_port>{dport}</dst_port>{translated}<tcp_state>established</tcp_state>"
            "</nat-session>")


def migrate(sources: list[Nat], targets: list[Nat] | Nat, selection=None, **options):
    targets = targets if isinstance(targets, list) else [targets]
    return Migration([s.endpoint for s in sources], [t.endpoint for t in targets], selection,
                     Options(credentials=NO_HOST_KEY_CHECK, **options)).run()


def assert_each_session_on_one_side(before: dict, *nats: Nat) -> None:
    seen: dict[tuple, int] = {}
    for nat in nats:
        if nat.server.alive():
            for key in nat.sessions():
                seen[key] = seen.get(key, 0) + 1
    twice = [k for k in before if seen.get(k, 0) > 1]
    assert not twice, f"{len(twice)} sessions on both sides, e.g. {twice[0]}"


# -- moving -------------------------------------------------------------------------------
def test_whole_nf_migration_moves_every_session_and_leaves_none_on_the_source(nats):
    a, b = nats(40, 0)
    before = a.sessions()
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert b.sessions() == before
    assert a.sessions() == {}
    assert report.sessions_moved == 40
    done = {p.name for p in report.phases if p.ok}
    assert {"connect", "negotiate", "announce", "lock", "freeze", "read", "edit", "validate",
            "commit", "verify", "confirm", "delete", "unlock", "thaw", "finish"} <= done
    assert report.freeze_seconds is not None and report.freeze_seconds > 0


def test_keep_source_copies_the_sessions(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    report = migrate([a], b, keep_source=True)
    assert report.result == "success", report.reason
    assert a.sessions() == before
    assert b.sessions() == before


def test_dry_run_moves_nothing_and_leaves_the_target_unlocked(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    report = migrate([a], b, dry_run=True)
    assert report.result == "dry-run", report.reason
    assert report.sessions_selected == 20 and report.sessions_moved == 0
    assert {"validate", "discard"} <= {p.name for p in report.phases}
    assert a.sessions() == before
    assert b.sessions() == {}
    other = b.connect()
    try:
        other.lock("candidate")  # released, and no staged change left behind
        other.unlock("candidate")
    finally:
        other.close()


def test_subscriber_selection_moves_only_that_subscriber(nats):
    a, b = nats(10, 0)
    a.plant(*(session("10.1.0.7", 4000 + i) for i in range(3)),
            *(session("10.1.0.8", 4000 + i) for i in range(2)))
    report = migrate([a], b, Selection.subscribers("10.1.0.7"))
    assert report.result == "success", report.reason
    assert {k[1] for k in b.sessions()} == {"10.1.0.7"} and len(b.sessions()) == 3
    assert len(a.sessions()) == 12 and all(k[1] != "10.1.0.7" for k in a.sessions())


def test_prefix_selection_moves_the_subscribers_inside_the_prefix(nats):
    a, b = nats(40, 0)  # the seeded subscribers are 10.0.0.1 .. 10.0.0.40
    report = migrate([a], b, Selection.subscribers("10.0.0.16/28"))
    assert report.result == "success", report.reason
    assert sorted(int(k[1].rsplit(".", 1)[1]) for k in b.sessions()) == list(range(16, 32))
    assert len(a.sessions()) == 24


def test_xpath_selection_moves_what_the_expression_selects(nats):
    a, b = nats(30, 0)  # seeded source ports are 1024, 1025, ...
    report = migrate([a], b, Selection.from_xpath("/nfnat:nat-session[nfnat:src_port < 1030]"))
    assert report.result == "success", report.reason
    assert sorted(int(k[2]) for k in b.sessions()) == list(range(1024, 1030))
    assert len(a.sessions()) == 24


def test_run_async_migrates_from_an_event_loop(nats):
    a, b = nats(10, 0)
    migration = Migration([a.endpoint], b.endpoint, None, Options(credentials=NO_HOST_KEY_CHECK))
    report = asyncio.run(migration.run_async())
    assert report.result == "success", report.reason
    assert len(b.sessions()) == 10


def test_migration_events_are_notified_on_both_ends(nats):
    a, b = nats(5, 0)
    watchers = []
    for nat in (a, b):
        conn = nat.connect()
        conn.m.create_subscription(filter=("subtree", f'<migration-event xmlns="{NAT_NS}"/>'))
        watchers.append(conn)
    try:
        report = migrate([a], b)
        for conn, role in zip(watchers, ("source", "target"), strict=True):
            events = []
            for _ in range(2):
                note = conn.m.take_notification(timeout=10)
                assert note is not None, f"no migration-event on the {role}"
                events.append(etree.fromstring(note.notification_xml.encode()))
            found = [(e.findtext(f".//{{{NAT_NS}}}event"), e.findtext(f".//{{{NAT_NS}}}role"),
                      e.findtext(f".//{{{NAT_NS}}}migration-id")) for e in events]
            assert found == [("started", role, report.migration_id),
                             ("finished", role, report.migration_id)]
    finally:
        for conn in watchers:
            conn.close()


# -- refusals: nothing moves --------------------------------------------------------------
def test_target_rejecting_the_data_leaves_every_session_on_the_source(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    proto, address, port = next(iter(before.values()))
    b.plant(session("10.9.9.9", 5555, address, port))  # holds one of A's translated endpoints
    report = migrate([a], b)
    assert report.result == "failed"
    assert "translated endpoint" in report.reason
    assert a.sessions() == before
    assert set(b.sessions()) == {("TCP", "10.9.9.9", "5555", "198.51.100.9", "80")}
    assert_each_session_on_one_side(before, a, b)


def test_rerun_after_a_rejected_migration_completes_it(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    _, address, port = next(iter(before.values()))
    blocker = session("10.9.9.9", 5555, address, port)
    b.plant(blocker)
    assert migrate([a], b).result == "failed"
    b.plant(blocker.replace("<nat-session ", f'<nat-session xmlns:nc="{NC}" '
                            'nc:operation="delete" '))
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert b.sessions() == before and a.sessions() == {}


def test_rerun_after_a_partial_run_completes_the_migration(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    # What a run that stopped after committing leaves: the sessions on both ends.
    assert migrate([a], b, keep_source=True).result == "success"
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert report.endpoints[1].already_present == 20
    assert b.sessions() == before and a.sessions() == {}


def test_target_locked_by_another_session_is_refused_and_nothing_moves(nats):
    a, b = nats(20, 0)
    before = a.sessions()
    other = b.connect()
    try:
        other.lock("running")
        report = migrate([a], b)
    finally:
        other.close()
    assert report.result == "refused"
    assert "lock" in report.reason and str(b.endpoint) in report.reason
    assert a.sessions() == before and b.sessions() == {}


def test_a_required_revision_the_ends_lack_is_refused(nats):
    a, b = nats(5, 0)
    report = migrate([a], b, require_revision="2099-01-01")
    assert report.result == "refused"
    assert "revision 2026-12-05, 2099-01-01 is required" in report.reason
    assert "freeze" not in {p.name for p in report.phases}
    assert len(a.sessions()) == 5 and b.sessions() == {}


def test_a_required_feature_the_ends_lack_is_refused(nats):
    a, b = nats(5, 0)
    report = migrate([a], b, require_features=("bulk-sessions",))
    assert report.result == "refused"
    assert "lacks the feature bulk-sessions" in report.reason
    assert len(a.sessions()) == 5 and b.sessions() == {}


# -- failures in flight: rolled back ------------------------------------------------------
def kill_at(nat: Nat, phase: str):
    """An on_phase hook that kills ``nat`` as ``phase`` starts on it: the phase's request
    meets a dead server (a delay would race the phase's own end on a fast machine)."""
    def hook(name: str, endpoint: str | None) -> None:
        if name == phase and endpoint == nat.url and nat.server.alive():
            nat.kill()
    return hook


def test_target_killed_mid_edit_leaves_every_session_on_the_source(nats):
    a, b = nats(3000, 0)
    before = a.sessions()
    report = migrate([a], b, on_phase=kill_at(b, "edit"))
    assert report.result == "failed"
    assert f"edit on target {b.url}" in report.reason
    assert not b.server.alive()
    assert a.sessions() == before
    assert "freeze" not in {p.name for p in report.phases}  # the copy runs unfrozen
    assert report.cleanup_complete


def test_source_killed_mid_read_leaves_the_target_unchanged(nats):
    a, b = nats(3000, 0)
    b.plant(session("10.9.9.1", 7000))
    report = migrate([a], b, on_phase=kill_at(a, "read"))
    assert report.result == "failed"
    assert f"read on source {a.url}" in report.reason
    assert not a.server.alive()
    assert set(b.sessions()) == {("TCP", "10.9.9.1", "7000", "198.51.100.9", "80")}
    other = b.connect()  # and unlocked
    try:
        other.lock("running")
    finally:
        other.close()


def test_target_killed_after_commit_is_reported_as_an_unfinished_rollback(nats):
    a, b = nats(50, 0)
    before = a.sessions()

    def kill(name: str, endpoint: str | None) -> None:
        if name == "verify" and endpoint == b.url:
            b.kill()
    report = migrate([a], b, on_phase=kill)
    assert report.result == "failed"
    assert not report.cleanup_complete
    assert any("run the same migration again" in w for w in report.warnings)
    assert a.sessions() == before  # the source deletes nothing before the target confirms


def test_connection_cut_after_commit_rolls_the_target_back(nats):
    a, b = nats(50, 0)
    before = a.sessions()
    holder: dict = {}

    def cut(name: str, endpoint: str | None) -> None:
        if name == "verify" and endpoint == b.url:
            holder["migration"].connection(b.endpoint).cut()
    migration = Migration([a.endpoint], b.endpoint, None,
                          Options(credentials=NO_HOST_KEY_CHECK, on_phase=cut))
    holder["migration"] = migration
    report = migration.run()
    assert report.result == "failed"
    assert f"verify on target {b.url}" in report.reason
    assert report.cleanup_complete, report.warnings
    assert a.sessions() == before
    assert b.sessions() == {}


def test_connection_cut_at_the_source_delete_is_settled_by_deleting_again(nats):
    a, b = nats(50, 0)
    before = a.sessions()
    holder: dict = {"cuts": 0}

    def cut(name: str, endpoint: str | None) -> None:
        if name == "delete" and endpoint == a.url and not holder["cuts"]:
            holder["cuts"] += 1
            holder["migration"].connection(a.endpoint).cut()
    migration = Migration([a.endpoint], b.endpoint, None,
                          Options(credentials=NO_HOST_KEY_CHECK, on_phase=cut))
    holder["migration"] = migration
    report = migration.run()
    assert report.result == "success", report.reason
    assert a.sessions() == {}
    assert b.sessions() == before  # past the commit point nothing comes off the target
    assert any(p.name == "reconnect" and p.ok for p in report.phases)


# -- many to one, one to many -------------------------------------------------------------
def test_many_to_one_moves_every_source_into_the_target(nats):
    a, b, target = nats(0, 0, 0)
    a.plant(*(session("10.1.0.1", 4000 + i, "192.0.2.10", 20000 + i) for i in range(5)))
    b.plant(*(session("10.2.0.1", 4000 + i, "192.0.2.10", 30000 + i) for i in range(7)))
    report = migrate([a, b], target)
    assert report.result == "success", report.reason
    assert len(target.sessions()) == 12
    assert a.sessions() == {} and b.sessions() == {}


def test_many_to_one_conflicting_translated_endpoints_are_refused_before_anything_moves(nats):
    a, b, target = nats(0, 0, 0)
    a.plant(session("10.1.0.1", 4000, "192.0.2.10", 20000),
            session("10.1.0.1", 4001, "192.0.2.10", 20001))
    b.plant(session("10.2.0.1", 4000, "192.0.2.10", 20001))
    report = migrate([a, b], target)
    assert report.result == "refused"
    assert report.conflicts == [
        f"translated endpoint TCP 192.0.2.10:20001 is used by TCP 10.1.0.1:4001 -> "
        f"198.51.100.9:80 on {a.url} and by TCP 10.2.0.1:4000 -> 198.51.100.9:80 on {b.url}"]
    # the check comes once every source is read, after the edits streamed into the
    # target's candidate: that is discarded
    assert [p.ok for p in report.phases if p.name == "discard"] == [True]
    assert len(a.sessions()) == 2 and len(b.sessions()) == 1 and target.sessions() == {}


def test_many_to_one_duplicate_sessions_are_refused_before_anything_moves(nats):
    a, b, target = nats(3, 3, 0)  # seeded alike: the same three keys on both sources
    report = migrate([a, b], target)
    assert report.result == "refused"
    assert len([c for c in report.conflicts if c.startswith("session ")]) == 3
    assert len(a.sessions()) == 3 and len(b.sessions()) == 3 and target.sessions() == {}


def test_one_to_many_split_sends_each_prefix_to_its_target(nats):
    a, b, c = nats(0, 0, 0)
    a.plant(*(session(f"10.1.0.{i}", 4000) for i in range(1, 4)),
            *(session(f"10.2.0.{i}", 4000) for i in range(1, 3)),
            session("10.3.0.1", 4000))
    split = Split({"10.1.0.0/24": b.endpoint, "10.2.0.0/24": c.endpoint})
    report = Migration([a.endpoint], [], split, Options(credentials=NO_HOST_KEY_CHECK)).run()
    assert report.result == "success", report.reason
    assert {k[1] for k in b.sessions()} == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    assert {k[1] for k in c.sessions()} == {"10.2.0.1", "10.2.0.2"}
    assert {k[1] for k in a.sessions()} == {"10.3.0.1"}


# -- endpoints and credentials ------------------------------------------------------------
def test_endpoint_url_forms():
    assert Endpoint.parse("netconf://admin@nat-a") == Endpoint("nat-a", 830, "admin")
    assert Endpoint.parse("netconf://ops@[2001:db8::1]:8830") == \
        Endpoint("2001:db8::1", 8830, "ops")
    assert str(Endpoint("2001:db8::1", 8830, "ops")) == "netconf://ops@[2001:db8::1]:8830"
    for bad in ("nat-a:830", "ssh://admin@nat-a", "netconf://admin:pw@nat-a",
                "netconf://admin@nat-a:99999"):
        with pytest.raises(EndpointError):
            Endpoint.parse(bad)


def test_password_comes_from_the_file_before_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NFMIG_PASSWORD", "from-env")
    assert Credentials.from_sources().password == "from-env"
    (tmp_path / "pw").write_text("from-file\n")
    assert Credentials.from_sources(tmp_path / "pw").password == "from-file"


def test_host_key_is_checked_against_the_known_hosts_file(nats, tmp_path):
    (a,) = nats(1)
    key = paramiko.ECDSAKey.from_private_key_file(str(a.server.state_dir /
                                                      "ssh_host_ecdsa_key"))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{a.server.port} {key.get_name()} {key.get_base64()}\n")
    checked = Credentials(password=PASSWORD, known_hosts=known)
    Connection(a.endpoint, checked).close()
    other = paramiko.ECDSAKey.generate(bits=256)
    known.write_text(f"[127.0.0.1]:{a.server.port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(EndpointError, match="does not match"):
        Connection(a.endpoint, checked)
    known.write_text("")
    with pytest.raises(EndpointError, match="is not in"):
        Connection(a.endpoint, checked)


# -- the command line ---------------------------------------------------------------------
def run_cli(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("NFMIG_PASSWORD", PASSWORD)
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_report_has_sessions_bytes_phases_window_and_vm_comparison(
        nats, capsys, monkeypatch, tmp_path):
    a, b = nats(30, 0)
    code, out, _ = run_cli(capsys, monkeypatch, "migrate", a.url, b.url,
                           "--insecure-no-host-key-check", "--json",
                           "--vm-image-bytes", "2G", "--vm-memory-bytes", "1G")
    assert code == 0
    report = json.loads(out)
    assert report["result"] == "success" and report["sessions_moved"] == 30
    assert report["bytes"]["sent"] > report["bytes"]["state"] > 0
    assert report["bytes"]["received"] > 0
    assert {"read", "edit", "commit", "delete"} <= set(report["phase_seconds"])
    assert report["freeze_window"]["seconds"] > 0
    vm = report["vm_comparison"]
    assert vm["vm_bytes"] == 3 << 30 and vm["vm_to_state_ratio"] > 100
    (tmp_path / "r.json").write_text(out)
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "r.json"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_failure_prints_one_line_and_exits_non_zero(nats, capsys, monkeypatch):
    a, b = nats(10, 0)
    _, address, port = next(iter(a.sessions().values()))
    b.plant(session("10.9.9.9", 5555, address, port))
    code, _, err = run_cli(capsys, monkeypatch, "migrate", a.url, "--to", b.url,
                           "--insecure-no-host-key-check")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfmig: migration failed: commit on target")
    assert "translated endpoint" in lines[0]
    assert len(a.sessions()) == 10


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["migrate", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    migrate_parser = parser._subparsers._group_actions[0].choices["migrate"]
    for action in migrate_parser._actions:
        assert action.help, f"{action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text
    for form in ("SOURCE TARGET", "--to TARGET", "--split PREFIX=TARGET", "NFMIG_PASSWORD"):
        assert form in text


def test_cli_needs_to_or_split_for_more_than_two_endpoints(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "migrate", "netconf://a@h", "netconf://b@h",
                           "netconf://c@h")
    assert code == 2 and "--to" in err


# -- negotiation and filters, without servers ---------------------------------------------
def test_ends_with_another_revision_or_other_features_are_refused():
    def facts(revision: str, *features: str) -> Facts:
        caps = frozenset({CANDIDATE, VALIDATE[0]})
        return Facts(caps, {"nfmig-nat": ModuleInfo(revision, frozenset(features)),
                            "ietf-netconf-nmda": ModuleInfo("2019-01-07")})
    assert problems([("A", "source", facts("2026-11-21")),
                     ("B", "target", facts("2026-11-21"))]) == []
    found = problems([("A", "source", facts("2026-11-21", "dnat")),
                      ("B", "target", facts("2027-01-01"))])
    assert found == [
        "target B implements nfmig-nat revision 2027-01-01, A revision 2026-11-21; every end "
        "must implement the same revision",
        "target B supports the nfmig-nat features none, A {dnat}; every end must support the "
        "same features"]


def test_a_target_without_candidate_or_the_model_is_refused():
    bare = Facts(frozenset(), {"ietf-netconf-nmda": ModuleInfo("2019-01-07")})
    found = problems([("A", "source", bare), ("B", "target", bare)])
    assert found == ["source A does not implement the nfmig-nat module (not in its "
                     "yang-library)",
                     "target B does not implement the nfmig-nat module (not in its "
                     "yang-library)"]
    no_candidate = Facts(frozenset(), {"nfmig-nat": ModuleInfo("2026-11-21")})
    assert "target B lacks the :candidate capability" in problems(
        [("B", "target", no_candidate)])[0]


@pytest.mark.parametrize("prefix", ["0.0.0.0/0", "10.0.0.0/8", "10.128.0.0/9", "10.0.16.0/20",
                                    "10.0.0.16/28", "10.0.0.5/32", "10.0.1.0/24"])
def test_prefix_filter_selects_exactly_the_addresses_inside(prefix):
    addresses = ["10.0.0.4", "10.0.0.5", "10.0.0.16", "10.0.0.31", "10.0.0.32", "10.0.1.9",
                 "10.0.15.255", "10.0.16.0", "10.0.31.7", "10.0.32.0", "10.127.0.1",
                 "10.128.0.1", "10.255.255.255", "11.0.0.1", "2001:db8::1"]
    data = etree.fromstring(f'<data xmlns="{NAT_NS}">' + "".join(
        session(a, 1) for a in addresses).replace(f' xmlns="{NAT_NS}"', "", len(addresses))
        + "</data>")
    selection = Selection.subscribers(prefix)
    filter_el = etree.fromstring(selection.filter_xml())
    picked = xpath_filter(data, filter_el.text, filter_el.nsmap) if filter_el.text else \
        subtree_filter(data, filter_el)
    found = {e.findtext(f"{{{NAT_NS}}}src_address") for e in picked}
    net = ipaddress.ip_network(prefix)
    assert found == {a for a in addresses if ipaddress.ip_address(a) in net}


# -- the delete request's keys, read from a get-data reply's text ---------------------------
def _server_entry(sport: int) -> str:
    return (f'<nat-session xmlns="{NAT_NS}"><protocol>UDP</protocol>'
            f"<src_address>10.0.0.2</src_address><src_port>{sport}</src_port>"
            "<dst_address>192.0.2.100</dst_address><dst_port>53</dst_port>"
            "<translated_address>192.0.2.1</translated_address>"
            f"<translated_port>{sport}</translated_port><timeout>60</timeout></nat-session>")


def test_delete_keys_of_entries_as_servers_write_them_are_those_a_full_read_finds():
    text = _server_entry(4000) + _server_entry(4001)
    assert _leading_keys(text) == [e.key for e in parse_entries(text)]


@pytest.mark.parametrize("odd", [
    f'<nat-session xmlns="{NAT_NS}"><src_address>10.0.0.3</src_address>'
    "<protocol>UDP</protocol><src_port>1</src_port><dst_address>192.0.2.100</dst_address>"
    "<dst_port>53</dst_port></nat-session>",
    f'<n:nat-session xmlns:n="{NAT_NS}"><n:protocol>UDP</n:protocol>'
    "<n:src_address>10.0.0.3</n:src_address><n:src_port>1</n:src_port>"
    "<n:dst_address>192.0.2.100</n:dst_address><n:dst_port>53</n:dst_port></n:nat-session>",
    "<!-- " + _server_entry(4002) + " -->",
], ids=["keys-not-first", "prefixed", "comment"])
def test_delete_keys_are_left_to_a_full_read_when_an_entry_is_written_otherwise(odd):
    assert _leading_keys(_server_entry(4000) + odd) is None
