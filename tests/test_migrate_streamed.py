"""The migrator's copy over NETCONF, streamed: each source's reply is written into the
targets' candidates block by block as it arrives (client.copy). Through real `nfmig serve`
processes on loopback, as tests/test_migrate.py; every failure must leave each session on
exactly one side."""

from __future__ import annotations

import re

from nfmig.client import copy as copy_module
from nfmig.client.local import start_local_server
from nfmig.client.migrate import Migration, Options
from nfmig.client.selection import Split
from nfmig.server.auth import add_user

from .test_migrate import (
    NO_HOST_KEY_CHECK,
    PASSWORD,
    Nat,
    assert_each_session_on_one_side,
    migrate,
)

SEVERAL_BLOCKS = 3000  # about 1.5 MB of entries: edits of 64 KB, 128 KB, 256 KB, ...
_EDIT = re.compile(r"(\d+) sessions, (\d+) bytes in (\d+) edits, streamed")


def phases(report, name: str) -> list:
    return [p for p in report.phases if p.name == name]


def edits_of(record) -> tuple[int, int, int]:
    """(sessions, bytes, edits) of a streamed edit phase."""
    found = _EDIT.match(record.detail or "")
    assert found, record.detail
    return tuple(map(int, found.groups()))


def discarded_once(report) -> bool:
    return [p.ok for p in phases(report, "discard")] == [True]


def only_on_the_source(report, count: int | None = None) -> bool:
    placement = report.placement or {}
    return placement.get("target_only") == 0 and placement.get("both") == 0 and (
        count is None or placement.get("source_only") == count)


def test_a_copy_in_several_edits_stages_every_session_and_reports_them(nats):
    a, b = nats(SEVERAL_BLOCKS, 0)
    before = a.sessions()
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert b.sessions() == before and a.sessions() == {}
    (read,) = phases(report, "read")
    assert read.detail.startswith(f"{SEVERAL_BLOCKS} sessions, streamed")
    (edit,) = phases(report, "edit")
    sessions, size, edits = edits_of(edit)
    assert sessions == SEVERAL_BLOCKS and edits >= 3
    assert 0 < size <= report.state_bytes
    assert [e.sessions for e in report.endpoints] == [SEVERAL_BLOCKS, SEVERAL_BLOCKS]
    assert report.sessions_moved == SEVERAL_BLOCKS


def test_a_streamed_dry_run_stages_every_block_then_discards_them(nats):
    a, b = nats(SEVERAL_BLOCKS, 0)
    before = a.sessions()
    report = migrate([a], b, dry_run=True)
    assert report.result == "dry-run", report.reason
    assert edits_of(phases(report, "edit")[0])[2] >= 3
    assert discarded_once(report)
    assert a.sessions() == before and b.sessions() == {}


def test_a_split_streams_each_targets_share_of_every_block_to_it(nats):
    a, b, c = nats(SEVERAL_BLOCKS, 0, 0)  # subscribers 10.0.0.1, 10.0.0.2, ... in order
    before = a.sessions()
    split = Split({"10.0.0.0/22": b.endpoint, "10.0.4.0/22": c.endpoint})
    report = Migration([a.endpoint], [], split, Options(credentials=NO_HOST_KEY_CHECK)).run()
    assert report.result == "success", report.reason
    on_b, on_c = b.sessions(), c.sessions()
    assert len(on_b) == 1023 and all(k[1].startswith(("10.0.0.", "10.0.1.", "10.0.2.",
                                                      "10.0.3.")) for k in on_b)
    assert len(on_c) == 1024 and all(k[1].startswith(("10.0.4.", "10.0.5.", "10.0.6.",
                                                      "10.0.7.")) for k in on_c)
    assert len(a.sessions()) == SEVERAL_BLOCKS - 1023 - 1024
    assert {**on_b, **on_c, **a.sessions()} == before
    assert sorted(edits_of(p)[0] for p in phases(report, "edit")) == [1023, 1024]


def test_a_target_that_refuses_an_entry_mid_stream_rolls_back_and_the_source_keeps_all(
        nats, monkeypatch):
    a, b = nats(SEVERAL_BLOCKS, 0)
    before = a.sessions()
    sent = []
    original = copy_module.take_entry_namespace

    def third_edit_with_a_bad_entry(body: bytes) -> bytes:
        sent.append(body)
        if len(sent) == 3:  # one entry the target's model refuses, in the middle
            middle = body.index(b"<src_port>", len(body) // 2)
            body = body[:middle] + b"<src_port>x" + body[middle + len(b"<src_port>"):]
        return original(body)
    monkeypatch.setattr(copy_module, "take_entry_namespace", third_edit_with_a_bad_entry)
    report = migrate([a], b)
    assert report.result == "failed"
    assert f"edit on target {b.url}: invalid-value" in report.reason
    assert "src_port" in report.reason and "(edit 3 of " in report.reason
    assert len(sent) >= 3
    assert discarded_once(report) and report.cleanup_complete
    assert a.sessions() == before and b.sessions() == {}
    assert only_on_the_source(report)  # of those read before the stream stopped
    assert_each_session_on_one_side(before, a, b)


def test_a_target_that_refuses_an_edit_too_big_for_it_rolls_back(nats, tmp_path):
    (a,) = nats(SEVERAL_BLOCKS)
    workdir = tmp_path / "small"
    workdir.mkdir()
    add_user(workdir / "users", "ops", password=PASSWORD, log2_n=14)  # a cheap test hash
    b = Nat(start_local_server(workdir, "--max-message-size", str(400 << 10)))
    try:
        before = a.sessions()
        report = migrate([a], b)
        assert report.result == "failed"
        assert f"edit on target {b.url}: too-big" in report.reason
        assert discarded_once(report) and report.cleanup_complete
        assert a.sessions() == before and b.sessions() == {}
        assert only_on_the_source(report, SEVERAL_BLOCKS)
    finally:
        b.stop()


def test_a_source_whose_connection_breaks_mid_reply_rolls_back(nats):
    # more than the SSH window (8 MB) holds: the reply cannot all be in when it breaks
    a, b = nats(20000, 0)
    before = a.sessions()
    holder: dict = {}

    def cut_the_source(name: str, endpoint: str | None) -> None:
        if name == "edit" and endpoint == b.url and "cut" not in holder:
            holder["cut"] = True  # as the first block goes to the target
            holder["migration"].connection(a.endpoint).cut()
    migration = Migration([a.endpoint], b.endpoint, None,
                          Options(credentials=NO_HOST_KEY_CHECK, on_phase=cut_the_source))
    holder["migration"] = migration
    report = migration.run()
    assert report.result == "failed"
    assert f"read on source {a.url}" in report.reason
    (edit,) = phases(report, "edit")
    assert not edit.ok and edit.detail.startswith("broken off")
    assert discarded_once(report) and report.cleanup_complete
    assert a.sessions() == before and b.sessions() == {}
    assert only_on_the_source(report)
    other = b.connect()  # and the target is unlocked
    try:
        other.lock("candidate")
        other.unlock("candidate")
    finally:
        other.close()
