"""The migrator end to end: `nfmig migrate --json` moves N sessions Linux NAT -> Linux NAT.

Builds the test bed, serves NAT A and NAT B with `nfmig serve --backend linux`, fills A's
conntrack table with N synthetic TCP ESTABLISHED source-NAT entries (the same ones
bench/kernel_migration.py moves) and runs the real command with every phase: negotiate,
announce, lock, freeze, read, edit candidate, validate, confirmed commit, verify, confirm,
delete, unlock, thaw. Prints the phases and the freeze window, checks that every entry
arrived in B's kernel with its translation and left A's, and with --json prints the
migrator's own report. Needs root.

    .venv/bin/python bench/migrator_linux.py [--sessions 10000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kernel_migration import (
    Codec,
    Nat,
    _interrupt,
    binding_set,
    create_all,
    flush,
    synthetic_sessions,
    verify_gone,
    verify_moved,
)

from nfmig.testbed import TestBed


def migrate(a: Nat, b: Nat, workdir: Path) -> dict:
    """Run `nfmig migrate` as a user would, with the password in a file."""
    password_file = workdir / "password"
    password_file.write_text(a.server.password + "\n")
    password_file.chmod(0o600)
    endpoint = "netconf://{}@127.0.0.1:{}"
    argv = [sys.executable, "-m", "nfmig", "migrate",
            endpoint.format(a.server.user, a.server.port),
            "--to", endpoint.format(b.server.user, b.server.port),
            "--password-file", str(password_file), "--insecure-no-host-key-check", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"nfmig migrate exited {done.returncode}: "
                           f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def run(n: int) -> dict:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nfmig-mbench-")))
        bed = stack.enter_context(TestBed())
        password = secrets.token_urlsafe(16)  # one user for both ends, as an operator has
        a = Nat(stack, bed, bed.nat_a, tmp / "a", password)
        b = Nat(stack, bed, bed.nat_b, tmp / "b", password)
        codec = Codec(bed.nat_a)
        entries = codec.backend._entries(synthetic_sessions(n))
        create_all(a.ct, entries, "populating NAT A")
        try:
            report = migrate(a, b, tmp)
            expected = binding_set(entries)
            verify_moved(b, expected)
            verify_gone(a, expected)
        finally:
            flush(a.ct)
            flush(b.ct)
    return report


def summary(report: dict) -> list[str]:
    lines = [f"{'phase':<12} {'seconds':>8}"]
    for phase in report.get("phases", []):
        lines.append(f"{phase['name']:<12} {phase['seconds']:>8.3f}")
    lines.append("")
    for key in ("sessions_moved", "total_seconds", "freeze_window_seconds"):
        if key in report:
            lines.append(f"{key}: {report[key]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000, metavar="N",
                        help="sessions on NAT A (default 10000)")
    parser.add_argument("--json", action="store_true", help="print the migrator's report")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("migrator_linux: needs root (network namespaces, conntrack)", file=sys.stderr)
        return 2
    if not 1 <= args.sessions <= 200_000:
        parser.error("--sessions must be between 1 and 200000")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(args.sessions)
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else "\n".join(summary(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
