"""What a migration reports: its outcome, each phase's time, the bytes it moved, the freeze
window, and how the state it moved compares with moving the NAT's whole VM."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class PhaseRecord:
    name: str
    seconds: float
    endpoint: str | None = None
    ok: bool = True
    detail: str | None = None


@dataclass
class EndpointReport:
    endpoint: str
    role: str  # source | target
    sessions: int = 0  # read (source) or written (target)
    deleted: int = 0  # sessions removed from a source
    already_present: int = 0  # target: sessions it held before under a moved key
    confirmed_commit: bool = False
    bytes_sent: int = 0  # NETCONF / RESTCONF message bytes
    bytes_received: int = 0
    # what its TCP connections carried (compressed, encrypted, framed), as the kernel
    # counted it; None where it could not be read
    wire_sent: int | None = None
    wire_received: int | None = None
    compression: str | None = None  # of what the migrator sent it, as negotiated
    module: str | None = None  # nfmig-nat@revision, features

    def add_traffic(self, conn: Any) -> None:
        """Count what ``conn`` (a connection about to be closed or replaced) carried."""
        self.bytes_sent += conn.bytes_sent
        self.bytes_received += conn.bytes_received
        wire = conn.wire_counts()
        first = self.wire_sent is None and self.bytes_sent == conn.bytes_sent
        if wire is None or (self.wire_sent is None and not first):
            self.wire_sent = self.wire_received = None  # one connection unknown: all are
        else:
            self.wire_sent = (self.wire_sent or 0) + wire[0]
            self.wire_received = (self.wire_received or 0) + wire[1]
        self.compression = conn.compression or self.compression


@dataclass
class Report:
    migration_id: str
    selection: str
    result: str = "running"  # success | failed | refused | dry-run
    reason: str | None = None
    cleanup_complete: bool = True
    dry_run: bool = False
    keep_source: bool = False
    sessions_selected: int = 0
    sessions_moved: int = 0
    stayed: int = 0  # selected, but left on their source: a target cannot hold them
    pinholes_moved: int = 0  # a firewall's pinholes of the selected subscribers
    state_bytes: int = 0  # the sessions as written to the targets
    endpoints: list[EndpointReport] = field(default_factory=list)
    phases: list[PhaseRecord] = field(default_factory=list)
    started: str | None = None
    total_seconds: float = 0.0
    freeze_start: str | None = None
    freeze_end: str | None = None
    freeze_seconds: float | None = None
    # how the traffic was switched ("gateway", "none", "command", "not switched") and when
    switchover: str | None = None
    switchover_seconds: float | None = None
    # sessions the sources opened, changed or ended between the copy and the freeze
    delta: dict[str, int] = field(default_factory=dict)
    # after a failure, where the selected sessions are, as read from the ends: counts of
    # source_only, target_only, both, neither (ended meanwhile, or lost), unknown
    placement: dict[str, int] | None = None
    conflicts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vm_image_bytes: int | None = None
    vm_memory_bytes: int | None = None
    # Where the VM figures came from: "command line", or "measured from pid N" when the
    # memory is the NF process tree's resident memory (then the image is 0 unless given).
    vm_source: str = "command line"

    @property
    def ok(self) -> bool:
        return self.result in ("success", "dry-run")

    @property
    def bytes_sent(self) -> int:
        return sum(e.bytes_sent for e in self.endpoints)

    @property
    def bytes_received(self) -> int:
        return sum(e.bytes_received for e in self.endpoints)

    def wire(self) -> dict[str, Any] | None:
        """The bytes that crossed the wire each way (None unless known for every end),
        in all and per session selected."""
        sent = [e.wire_sent for e in self.endpoints]
        received = [e.wire_received for e in self.endpoints]
        if not self.endpoints or None in sent or None in received:
            return None
        n = self.sessions_selected
        return {"sent": sum(sent), "received": sum(received),
                "sent_per_session": round(sum(sent) / n, 1) if n else None,
                "received_per_session": round(sum(received) / n, 1) if n else None}

    def phase_seconds(self) -> dict[str, float]:
        """Time per phase, summed over endpoints, in the order the phases ran."""
        totals: dict[str, float] = {}
        for p in self.phases:
            totals[p.name] = round(totals.get(p.name, 0.0) + p.seconds, 6)
        return totals

    def vm_comparison(self) -> dict[str, Any] | None:
        if self.vm_image_bytes is None and self.vm_memory_bytes is None:
            return None
        vm = (self.vm_image_bytes or 0) + (self.vm_memory_bytes or 0)
        return {"vm_image_bytes": self.vm_image_bytes, "vm_memory_bytes": self.vm_memory_bytes,
                "vm_bytes": vm, "state_bytes": self.state_bytes,
                "vm_to_state_ratio": round(vm / self.state_bytes, 1) if self.state_bytes
                else None, "source": self.vm_source}

    def vm(self) -> dict[str, Any] | None:
        """The VM figures the comparison uses, and where they came from."""
        if self.vm_image_bytes is None and self.vm_memory_bytes is None:
            return None
        return {"memory_bytes": self.vm_memory_bytes, "image_bytes": self.vm_image_bytes,
                "source": self.vm_source}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("vm_image_bytes", "vm_memory_bytes", "vm_source", "freeze_start",
                     "freeze_end", "freeze_seconds"):
            out.pop(name)
        out["vm"] = self.vm()
        out.update(
            ok=self.ok,
            bytes={"sent": self.bytes_sent, "received": self.bytes_received,
                   "state": self.state_bytes, "wire": self.wire()},
            phase_seconds=self.phase_seconds(),
            freeze_window={"start": self.freeze_start, "end": self.freeze_end,
                           "seconds": self.freeze_seconds},
            vm_comparison=self.vm_comparison())
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _target_outcome(self, t: EndpointReport) -> str:
        if self.dry_run:
            return f"would receive {t.sessions} sessions"
        if self.ok:
            return f"{t.sessions} sessions" + (", confirmed commit" if t.confirmed_commit
                                               else "")
        if not t.sessions:
            return "nothing sent"
        if self.cleanup_complete:
            return f"{t.sessions} sessions sent, none kept (rolled back)"
        return f"{t.sessions} sessions sent; where they are now: see below"

    def _bytes_line(self) -> str:
        messages = (f"messages {human_bytes(self.bytes_sent)} sent, "
                    f"{human_bytes(self.bytes_received)} received; state moved "
                    f"{human_bytes(self.state_bytes)}")
        wire = self.wire()
        if wire is None:
            return f"  bytes: {messages}"
        each = (f" ({wire['sent_per_session']:,.0f} B and "
                f"{wire['received_per_session']:,.0f} B per session)"
                if wire["sent_per_session"] is not None else "")
        compressed = sorted({e.compression for e in self.endpoints
                             if e.compression not in (None, "none")})
        how = f", compressed ({', '.join(compressed)})" if compressed else ""
        return (f"  bytes on the wire: {human_bytes(wire['sent'])} sent, "
                f"{human_bytes(wire['received'])} received{each}{how}; {messages}")

    def summary(self) -> str:
        """The report for a person."""
        lines = [f"migration {self.migration_id}: {self.result}"
                 + (f": {self.reason}" if self.reason else "")]
        sources = [e for e in self.endpoints if e.role == "source"]
        targets = [e for e in self.endpoints if e.role == "target"]
        verb = "would move" if self.dry_run else "moved"
        count = self.sessions_selected if self.dry_run else self.sessions_moved
        lines.append(f"  {verb} {count} of {self.sessions_selected} selected sessions "
                     f"({self.selection}) from {', '.join(e.endpoint for e in sources)} to "
                     f"{', '.join(e.endpoint for e in targets)}")
        if self.pinholes_moved:
            lines.append(f"  and {self.pinholes_moved} pinholes of the selected subscribers")
        for t in targets:
            lines.append(f"    {t.endpoint}: {self._target_outcome(t)}"
                         + (f" ({t.already_present} already there)" if t.already_present
                            else ""))
        lines.append("  phase        seconds")
        for name, seconds in self.phase_seconds().items():
            lines.append(f"    {name:<10} {seconds:8.3f}")
        lines.append(f"    {'total':<10} {self.total_seconds:8.3f}")
        if self.freeze_seconds is not None:
            lines.append(f"  freeze window {self.freeze_seconds:.3f} s "
                         f"({self.freeze_start} .. {self.freeze_end})")
        if self.delta:
            lines.append("  since the copy: " + ", ".join(f"{n} {what}" for what, n
                                                         in self.delta.items()))
        if self.switchover is not None:
            lines.append(f"  switchover: {self.switchover}" + (
                f" in {self.switchover_seconds:.3f} s" if self.switchover_seconds is not None
                else ""))
        if self.placement is not None:
            lines.append("  where the selected sessions are now: " + ", ".join(
                f"{n} {where.replace('_', ' ')}" for where, n in self.placement.items()))
        lines.append(self._bytes_line())
        vm = self.vm_comparison()
        if vm:
            ratio = vm["vm_to_state_ratio"]
            lines.append(f"  moving the VM would transfer {human_bytes(vm['vm_bytes'])}"
                         + (f", {ratio:,.0f} times the state" if ratio else "")
                         + f" (VM figures: {self.vm_source})")
        lines += [f"  conflict: {c}" for c in self.conflicts[:20]]
        if len(self.conflicts) > 20:
            lines.append(f"  ... and {len(self.conflicts) - 20} more conflicts")
        lines += [f"  warning: {w}" for w in self.warnings]
        if not self.cleanup_complete:
            lines.append("  CLEANUP INCOMPLETE: see the warnings; running the same migration "
                         "again completes it")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def parse_size(text: str) -> int:
    """A byte count such as 2147483648, 512M, 1.5G or 20GiB (k/M/G/T, powers of 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = cleaned[-1:] if cleaned[-1:] in units else ""
    number = cleaned[:-1] if unit else cleaned
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 2147483648, 512M, 1.5G)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(value * units[unit])


def process_memory(pid: int, proc: Path = Path("/proc")) -> tuple[int, list[int]]:
    """Resident memory (VmRSS) of process ``pid`` and of every process below it, in bytes,
    with the pids counted: what an NF process and the daemons it started occupy on this host.

    A lower bound of what the NF's VM would carry (a VM also holds its kernel and whatever
    else it runs), so the comparison never flatters nfmig. Pages processes share are counted
    in each of them.
    """
    if not (proc / str(pid) / "status").exists():
        raise ValueError(f"no process {pid} on this host (--vm-memory-from-pid needs the NF "
                         "process's pid where nfmig migrate runs)")
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields follow the last ")".
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    counted, todo, total = [], [pid], 0
    while todo:
        current = todo.pop()
        counted.append(current)
        todo.extend(children.get(current, []))
        total += _resident_bytes(proc / str(current) / "status")
    return total, counted


def _resident_bytes(status: Path) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        pass  # the process ended meanwhile: it holds nothing now
    return 0  # kernel threads have no VmRSS


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a migration report: {exc}") from None
    if not isinstance(data, dict) or "bytes" not in data or "migration_id" not in data:
        raise ValueError(f"{path}: not a migration report (written by nfmig migrate --json)")
    return data


class Progress:
    """A one-line progress bar on a terminal: the phases done, the phase under way, and (with
    ``counts``) the sessions read and the message bytes moved so far with their rate; drawn
    as each phase starts and every REDRAW seconds in between."""

    REDRAW = 0.25

    def __init__(self, total: int, counts: Callable[[], tuple[int, int]] | None = None,
                 stream: TextIO | None = None, width: int = 24):
        self.total = max(total, 1)
        self.done = 0
        self.counts = counts
        self.stream = stream or sys.stderr
        self.width = width
        self._phase = "starting"
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        if counts is not None:
            self._ticker.start()

    def __call__(self, phase: str, endpoint: str | None = None) -> None:
        with self._lock:
            self.done = min(self.done + 1, self.total)
            self._phase = f"{phase} {endpoint}" if endpoint else phase
        self._draw()

    def line(self) -> str:
        """The bar as it is now."""
        with self._lock:
            filled = self.width * self.done // self.total
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] {self._phase}"
        if self.counts is not None:
            sessions, moved = self.counts()
            rate = moved / max(time.monotonic() - self._started, 1e-3)
            text += (f" | {sessions:,} sessions, {human_bytes(moved)} "
                     f"({human_bytes(rate)}/s)")
        return text

    def _draw(self) -> None:
        try:
            text = self.line()
        except Exception:  # counts read while the migration changes them: next time
            return
        with self._lock:
            if not self._stop.is_set():
                self.stream.write("\r" + text[:120].ljust(120))
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.REDRAW):
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
