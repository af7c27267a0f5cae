"""What `nfmig migrate` shows an operator: the progress line on a terminal, a report that
says what is true for a dry run or a failure, and no traceback when the reader of its
output goes away. Real servers, the real command."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.report import EndpointReport, Report


@pytest.fixture
def pair(tmp_path):
    a = start_local_server(tmp_path / "a", "--backend", "simulated", "--sessions", "20000")
    b = start_local_server(tmp_path / "b", "--backend", "simulated", "--sessions", "0",
                           password=a.password, scrypt_cost=14)
    yield a, b
    a.stop()
    b.stop()


def command(a: LocalServer, b: LocalServer, *options: str) -> list[str]:
    return [sys.executable, "-m", "nfmig", "migrate", f"netconf://admin@127.0.0.1:{a.port}",
            f"netconf://admin@127.0.0.1:{b.port}", "--insecure-no-host-key-check", *options]


def environment(a: LocalServer) -> dict[str, str]:
    return dict(os.environ, NFMIG_PASSWORD=a.password)


def test_progress_on_a_terminal_counts_sessions_and_bytes_with_a_rate(pair):
    a, b = pair
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command(a, b), env=environment(a), stdout=subprocess.PIPE,
                               stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                piece = os.read(controller, 65536)
            except OSError:  # the command has ended and closed the terminal
                break
            if not piece:
                break
            shown += piece
        elif process.poll() is not None:
            break
    os.close(controller)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    lines = [x for x in shown.decode(errors="replace").split("\r") if "sessions," in x]
    assert lines, shown[-2000:]
    assert any("20,000 sessions" in x for x in lines), lines[-5:]
    assert all("/s)" in x for x in lines)
    assert "\r" not in out.decode()  # the bar goes to the terminal, not into the report


def test_no_progress_line_when_stderr_is_not_a_terminal(pair):
    a, b = pair
    result = subprocess.run(command(a, b, "--dry-run"), env=environment(a),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sessions," not in result.stderr and "[" not in result.stderr


def test_a_reader_that_goes_away_ends_no_migration_in_a_traceback(pair):
    a, b = pair
    argv = " ".join(f"'{x}'" for x in command(a, b, "--json"))
    result = subprocess.run(["bash", "-c", f"{argv} | true; echo \"exit ${{PIPESTATUS[0]}}\""],
                            env=environment(a), capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    assert "BrokenPipe" not in result.stderr
    assert result.stdout.strip() == "exit 0"  # the migration's own status


def test_a_dry_run_says_what_the_target_would_receive(pair):
    a, b = pair
    result = subprocess.run(command(a, b, "--dry-run"), env=environment(a),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    target = next(x for x in result.stdout.splitlines() if f":{b.port}:" in x)
    assert "would receive 20000 sessions" in target
    assert "confirmed commit" not in result.stdout


def _failed(cleanup_complete: bool, sent: int) -> str:
    report = Report("m1", "all", result="failed", reason="edit refused",
                    cleanup_complete=cleanup_complete)
    report.endpoints = [EndpointReport("netconf://a:830", "source", sessions=sent),
                        EndpointReport("netconf://b:830", "target", sessions=sent,
                                       confirmed_commit=True)]
    return next(x for x in report.summary().splitlines() if "netconf://b:830:" in x)


def test_a_failed_migration_says_the_target_kept_nothing_after_its_rollback():
    line = _failed(cleanup_complete=True, sent=7)
    assert "7 sessions sent, none kept" in line and "confirmed commit" not in line


def test_a_failure_that_left_sessions_on_both_sides_points_to_where_they_are():
    line = _failed(cleanup_complete=False, sent=7)
    assert "where they are now" in line and "none kept" not in line


def test_a_failure_before_anything_was_sent_says_so():
    assert _failed(cleanup_complete=True, sent=0).endswith("nothing sent")
