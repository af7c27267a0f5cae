"""The floor of the stack a migration runs on, measured beside it (bench/migrator_linux.py).

Whatever the protocol, `nfmig migrate` as a Python command starts an interpreter and
imports its modules, reads N sessions out of NAT A's kernel and writes them into NAT B's.
Those three steps, done with nfmig's own netlink code and nothing else (no NETCONF, no XML,
no SSH, no migrator), bound from below what the command can reach, and so what a goal
stated as a ratio to conntrackd can ask of it: the floor's own ratio.
"""

from __future__ import annotations

import subprocess
import sys
import time

from nfmig.nf_backends.ctnetlink import Conntrack, CtEntry
from tables import flush

_IMPORTS = "import nfmig.cli, nfmig.migrate_cli, nfmig.client.migrate"


def interpreter_start() -> float:
    """Seconds to start the interpreter and import what `nfmig migrate` imports."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _IMPORTS], check=True)
    return time.perf_counter() - t0


def measure_floor(a: Conntrack, b: Conntrack, entries: list[CtEntry]) -> dict[str, float]:
    """The floor's parts with ``entries`` in A's (empty) kernel table, and its sum: start,
    A's table dumped and parsed, the same entries created in B's (empty) table. Both tables
    are emptied again however it ends."""
    try:
        if any(a.create(entries)):
            raise RuntimeError("floor: NAT A refused entries of the table")
        t0 = time.perf_counter()
        read = a.dump()
        t1 = time.perf_counter()
        if len(read) != len(entries):
            raise RuntimeError(f"floor: NAT A holds {len(read)} of {len(entries)} entries")
        if any(b.create(entries)):
            raise RuntimeError("floor: NAT B refused entries of the table")
        t2 = time.perf_counter()
    finally:
        flush(a)
        flush(b)
    parts = {"floor_start_s": interpreter_start(), "floor_read_s": t1 - t0,
             "floor_write_s": t2 - t1}
    return parts | {"floor_s": sum(parts.values())}
