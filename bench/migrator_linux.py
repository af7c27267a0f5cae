"""Live migration by the real command: `nfmig migrate --json` moves N sessions and the
gateway addresses from NAT A to NAT B while connections flow and new ones keep arriving,
beside conntrackd resyncing the same table in the same run.

For every run a fresh test bed (nfmig.testbed) with one `nfmig serve` per NAT (one password
for both), NAT A active by its policy's gateway addresses (client/demo_linux.gateway_policy,
over the whole port range):
1. A holds N sessions of a mixed table (bench/tables.py: TCP in every state, UDP, ICMP
   echo, and Linux to Linux also IPv6 TCP and UDP and destination NAT; timeouts and
   counters vary from session to session) plus the live TCP and UDP streams of nfmig.probe.
   A Linux A gets half of the table straight into its kernel, as traffic leaves sessions
   (the kernel counts from zero), and half through its server, as an earlier migration
   leaves them (with the counts they brought); an OVS A gets all of it through its server;
2. a sender in the client namespace opens a new UDP flow every millisecond (bench/traffic.py)
   to a sink in the server namespace, from just before the command starts until 0.5 s
   after it ends;
3. `python -m nfmig -v migrate A B --json` runs as a process of its own: copy while traffic
   flows, commit, verify, freeze, delta, confirm, switchover, thaw, delete on A;
4. then every session is checked to be on exactly one side (bench/placement.py): none on
   both, none left on A but flows opened after the thaw began, every table session on B
   with its translation and at least the counts it had, the probe's streams on B, every flow
   that got through on one side;
5. `--memory-rounds K` (Linux -> Linux, first run of each size): the same table moves back
   and forth K more times between the same two servers (B -> A, A -> B, ...), the servers'
   memory read after each;
6. Linux -> Linux only: conntrackd (FTFW, bench/conntrackd_ref.py) resyncs the same N
   sessions between the two NAT namespaces, from `conntrackd -n` on B until B's kernel
   holds N; then the stack's floor (bench/floor.py): the interpreter's start with the
   command's imports, A's table read and B's written with nfmig's netlink code alone.

Printed per direction and size (medians of `--repeat` runs): "sessions in B's kernel", the
seconds from the command's start (interpreter start included) until B holds every session
it read, taken from the command's phase timeline (its -v log: the end of the first commit on
B; later commits carry only what changed since the copy), with its ratio to conntrackd; the
whole command and its ratio; the freeze window, the probe's gaps, the new flows, where the
sessions went; the resident memory (VmRSS) of both `nfmig serve` processes once the table is
loaded and after the migration. `--hetero` adds Linux -> OVS and OVS -> Linux at 10k (IPv4
source NAT, what the SDN NAT holds; B's switch stands for B's kernel), each as a ratio to
the Linux -> Linux 10k command of the same invocation (which it runs too). Then each goal
of the issue with its target and whether it is met. `--json FILE` writes every run's
figures, the command's report, its phase timeline and the probe's result. A run that cannot
be measured (a server that does not start, say) is reported and the others go on. Exit
status 1 when a run failed or found a problem. Needs root; `make bench` runs it with
--hetero.

    .venv/bin/python bench/migrator_linux.py [--sizes 10000,100000] [--repeat 3]
        [--hetero] [--memory-rounds K] [--no-reference] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from conntrackd_ref import add_sync_link, measure_conntrackd
from floor import measure_floor
from nfmig.client.demo_linux import gateway_policy
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NAT_NS
from nfmig.nf_backends.base import Session
from nfmig.nf_backends.ctnetlink import Conntrack
from nfmig.server.gc_pause import AGAIN, IDLE
from nfmig.server.session_codec import sessions_to_xml
from placement import counters_check, notes_of, placement, problems_of
from results import HETERO_SIZE, goals, medians, memory_block, table, with_hetero_ratios
from tables import (
    EXTERNALS,
    PORT_MAX,
    PORT_MIN,
    V6_EXTERNALS,
    create_all,
    flush,
    kernel_entries,
    mixed_sessions,
    parse_sizes,
    uncounted,
)
from traffic import (
    CLIENT_EPHEMERAL,
    FLOW_INTERVAL,
    FLOW_PORTS,
    SENDER,
    SENDER_SECONDS,
    SINK,
    SINK_PORT,
    Agent,
)

from nfmig.probe import Probe, ProbeResult
from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

COMMAND_TIMEOUT = 900.0  # seconds: bound on one `nfmig migrate`
PROBE_SECONDS = 900.0  # the probe's agents stop by themselves after this long
SETTLE, AFTER = 0.3, 0.5  # streams run before the command; traffic goes on after it
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


# -- the NATs -----------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends: a server started but not yet handed to
    the stack would be orphaned by an interrupt in between."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt


class End:
    """One NAT namespace with its `nfmig serve`; ``stack`` stops it however the run ends.
    ``ct`` (a ctnetlink handle) for the Linux backend, whose truth is the kernel's table."""

    def __init__(self, stack: contextlib.ExitStack, bed: TestBed, netns: str, backend: str,
                 workdir: Path, password: str, active: bool, ipv6: bool = False):
        self.netns, self.backend, self.path = netns, backend, bed.ns_path(netns)
        with deferred_interrupts():
            self.server = start_local_server(workdir, "--backend", backend, "--netns", netns,
                                             password=password)
            stack.callback(self.server.stop)
        self.client = self.server.client()
        stack.callback(self.client.close)
        self.client.edit(policy(active, ipv6))
        self.ct: Conntrack | None = None
        if backend == "linux":
            self.ct = Conntrack(self.path)
            stack.callback(self.ct.close)

    @property
    def url(self) -> str:
        return f"netconf://{self.server.user}@127.0.0.1:{self.server.port}"

    def names(self, url: str) -> bool:
        """Whether an endpoint as the command logs it is this end."""
        return url in (self.url, self.url.replace(f"{self.server.user}@", ""))

    def rss_mb(self) -> float | None:
        """Resident memory of the `nfmig serve` process (its VmRSS), in MB."""
        try:
            status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        except OSError:
            return None
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(found.group(1)) / 1024 if found else None

    def populate(self, sessions: list[Session]) -> list[Session]:
        """Load the table; returns it as this NAT now holds it. Linux: blocks of ten in
        turn straight into the kernel (counts dropped: the kernel takes none) or through the
        server, so every kind of session is loaded both ways."""
        if self.ct is None:
            self.client.edit("".join(sessions_to_xml(sessions, NAT_NS)))
            return sessions
        straight = [s for i, s in enumerate(sessions) if (i // 10) % 2 == 0]
        create_all(self.ct, kernel_entries(straight), f"populating {self.netns}")
        served = [s for i, s in enumerate(sessions) if (i // 10) % 2]
        if served:
            self.client.edit("".join(sessions_to_xml(served, NAT_NS)))
        return [uncounted(s) if (i // 10) % 2 == 0 else s for i, s in enumerate(sessions)]

    def table(self, with_counts: bool = False) -> tuple[dict[tuple, tuple], dict[tuple, tuple]]:
        """Every session: key (protocol, src, sport, dst, dport) -> (translated address,
        port), from the kernel for Linux, from the server's operational datastore else;
        and (``with_counts``) key -> its four counters, from the server."""
        found: dict[tuple, tuple] = {}
        counts: dict[tuple, tuple] = {}
        if self.ct is not None:
            found = {(PROTOCOLS.get(e.proto, str(e.proto)), _ip(e.src), e.sport, _ip(e.dst),
                      e.dport): (_ip(e.nat_addr), e.nat_port) for e in self.ct.dump()}
            if not with_counts:
                return found, counts
        text, _ = self.client.get_sessions()
        for chunk in text.split("</nat-session>")[:-1]:
            f = dict(_LEAF.findall(chunk))
            key = (f["protocol"], f["src_address"], int(f["src_port"]), f["dst_address"],
                   int(f["dst_port"]))
            if self.ct is None:
                found[key] = (f.get("translated_address"), int(f["translated_port"])
                              if "translated_port" in f else None)
            counts[key] = tuple(int(f.get(c, 0)) for c in _COUNTERS)
        return found, counts


_COUNTERS = ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes")
_LEAF = re.compile(r"<(protocol|src_address|src_port|dst_address|dst_port|translated_address"
                   r"|translated_port|orig_packets|orig_bytes|reply_packets|reply_bytes)>"
                   r"([^<]*)</")


def _ip(packed: bytes | None) -> str | None:
    return None if packed is None else str(ipaddress.ip_address(packed))


def policy(active: bool, ipv6: bool = False) -> str:
    """The test bed's policy (demo_linux.gateway_policy, with the gateway addresses on the
    active NAT) over the whole port range: the new flows all go to one server address and
    port, and would use up the demo's 10,000 ports in 10 s."""
    text = gateway_policy(gateways=active)
    demo_range = "<port-min>20000</port-min><port-max>29999</port-max>"
    if demo_range not in text:
        raise RuntimeError("demo_linux.gateway_policy changed its port range; adapt "
                           "bench/migrator_linux.py")
    # Every external address the table uses (the migrator refuses a target whose policy
    # translates elsewhere).
    externals = [*EXTERNALS, *(V6_EXTERNALS if ipv6 else ())]
    more = "".join(f"<external-address>{a}</external-address>" for a in externals
                   if f"<external-address>{a}</external-address>" not in text)
    return text.replace(demo_range, f"<port-min>{PORT_MIN}</port-min>"
                                    f"<port-max>{PORT_MAX}</port-max>" + more)


# -- the command --------------------------------------------------------------------------
@dataclass
class Command:
    """One `nfmig migrate` as it ran."""

    code: int
    report: dict | None
    stderr: str
    seconds: float  # wall clock, interpreter start included
    started: float  # epoch seconds at its start

    def phases(self, zero: float) -> list[dict]:
        """Its phases from its -v log (each logged with the time it ended, to the
        millisecond), in seconds since ``zero`` (epoch seconds)."""
        phases = []
        for stamp, name, endpoint, seconds in _PHASE_LOG.findall(self.stderr):
            end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - zero
            phases.append({"phase": name, "end": endpoint or None,
                           "from_s": round(end - float(seconds), 4), "to_s": round(end, 4)})
        return phases

    def in_kernel_s(self, target: End) -> float | None:
        """Seconds from the start until the end of the first commit on ``target``: every
        session read from the source is then in the target's table."""
        return next((p["to_s"] for p in self.phases(self.started)
                     if p["phase"] == "commit" and p["end"] and target.names(p["end"])), None)

    def startup_s(self) -> float | None:
        """Seconds from the start until the migration began (the report's start)."""
        started = (self.report or {}).get("started")
        if not started:
            return None
        return datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp() - \
            self.started


# `nfmig -v`: "2026-12-05 19:30:17,158 INFO nfmig.client.migrate: freeze ENDPOINT: 0.022 s"
_PHASE_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ nfmig[\w.]*: "
                        r"(\w+)(?: (\S+))?: ([\d.]+) s", re.M)


def migrate(source: End, target: End, workdir: Path) -> Command:
    """`python -m nfmig -v migrate SOURCE TARGET --json` as a user runs it (-v: each phase
    is logged on stderr, with the time, as it ends)."""
    argv = [sys.executable, "-m", "nfmig", "-v", "migrate", source.url, target.url,
            "--password-file", str(workdir / "password"), "--insecure-no-host-key-check",
            "--json"]
    started, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except BaseException:  # a timeout or an interrupt: leave nothing running
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise
    seconds = time.perf_counter() - t0
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    return Command(proc.returncode, report, err, seconds, started)


def during(phases: list[dict], start: float | None, length_ms: float, a: End,
           b: End) -> list[str]:
    """The phases that overlap [start, start + length] (a gap of the probe), each with the
    end it ran on."""
    if start is None:
        return []
    stop = start + length_ms / 1e3
    return [f"{p['phase']}@{_side(p['end'], a, b)}" for p in phases
            if p["from_s"] <= stop + 0.001 and p["to_s"] >= start - 0.001]


def _side(url: str | None, a: End, b: End) -> str | None:
    return "A" if url and a.names(url) else "B" if url and b.names(url) else url


# -- one run ------------------------------------------------------------------------------
def run_once(backends: tuple[str, str], n: int, workdir: Path, reference: bool,
             rounds: int) -> dict:
    """One migration A -> B of n sessions of the mixed table plus live traffic, in a bed of
    its own, then ``rounds`` more back and forth and the conntrackd reference; its figures,
    and the problems found."""
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(TestBed())
        if "openflow" in backends:
            without_checksum_offload(bed)
        bed.run(bed.client, "sysctl", "-q", "-w",
                f"net.ipv4.ip_local_port_range={CLIENT_EPHEMERAL}")
        password = secrets.token_urlsafe(16)  # one user for both ends, as an operator has
        (workdir / "password").write_text(password + "\n")
        (workdir / "password").chmod(0o600)
        linux_only = backends == ("linux", "linux")  # IPv6 and DNAT: the SDN NAT has neither
        a = End(stack, bed, bed.nat_a, backends[0], workdir / "a", password, active=True,
                ipv6=linux_only)
        b = End(stack, bed, bed.nat_b, backends[1], workdir / "b", password, active=False,
                ipv6=linux_only)
        sessions = a.populate(mixed_sessions(n, linux_only, ovs_source=a.ct is None))
        loaded = {"rss_a_loaded": a.rss_mb(), "rss_b_loaded": b.rss_mb()}
        figures = loaded | live_migration(bed, a, b, sessions, workdir)
        if rounds and not figures["exit"]:  # else the table is not all on B to move back
            figures["memory_rounds"] = memory_rounds(a, b, rounds, workdir)
            figures["problems"] += [f"memory round {r['round']}: {r['failed']}"
                                    for r in figures["memory_rounds"] if r.get("failed")]
        if reference:
            for end in (a, b):
                flush(end.ct)
            add_sync_link(bed)
            figures["conntrackd_s"] = measure_conntrackd(bed, a, b, sessions,
                                                         workdir / "conntrackd")
            figures |= measure_floor(a.ct, b.ct, kernel_entries(sessions))
    return figures


def live_migration(bed: TestBed, a: End, b: End, sessions: list[Session],
                   workdir: Path) -> dict:
    agents: list[Agent] = []
    try:
        with Probe(bed, max_seconds=PROBE_SECONDS) as probe:
            time.sleep(SETTLE)
            before, _ = a.table()
            sink = Agent(bed, bed.server, SINK, SINK_PORT, "10.0.0.", PROBE_SECONDS)
            agents.append(sink)
            sender = Agent(bed, bed.client, SENDER, TestBed.SERVER, SINK_PORT, *FLOW_PORTS,
                           FLOW_INTERVAL, SENDER_SECONDS)
            agents.append(sender)
            probe_zero = time.time() - probe.mark("command")
            command = migrate(a, b, workdir)
            probe.mark("command done")
            moved = {"rss_a_moved": a.rss_mb(), "rss_b_moved": b.rss_mb()}
            time.sleep(AFTER)
            sent, arrived = sender.stop(), sink.stop()
            result = probe.stop()
    finally:
        for agent in agents:
            agent.kill()
    after_a, _ = a.table()
    after_b, counts_b = b.table(with_counts=True)
    figures = moved | figures_of(command, b, result)
    figures |= placement(before, after_a, after_b, sessions, sent, arrived, command.report,
                         result)
    figures |= counters_check(sessions, counts_b)
    phases = command.phases(probe_zero)
    figures["gaps_during"] = {
        f"{kind} {direction}": {"gap_ms": flow.longest_gap_ms, "at_s": flow.longest_gap_at_s,
                                "phases": during(phases, flow.longest_gap_at_s,
                                                 flow.longest_gap_ms, a, b)}
        for kind, flows in (("tcp", result.tcp), ("udp", result.udp))
        for direction, flow in flows.items()}
    figures["problems"] = problems_of(figures, command.code, command.report, command.stderr,
                                      result)
    figures["notes"] = notes_of(figures)
    figures["report"], figures["probe"] = command.report, result.to_dict()
    figures["timeline"] = phases
    figures["stderr_tail"] = command.stderr.strip()[-3000:]
    return figures


def figures_of(command: Command, b: End, result: ProbeResult) -> dict:
    r = command.report or {}
    window = (r.get("freeze_window") or {}).get("seconds")
    delta = r.get("delta") or {}
    switch = r.get("switchover_seconds")
    wire = (r.get("bytes") or {}).get("wire") or {}
    return {
        "exit": command.code, "result": r.get("result"), "command_s": command.seconds,
        "in_kernel_s": command.in_kernel_s(b), "startup_s": command.startup_s(),
        "report_total_s": r.get("total_seconds"),
        "freeze_ms": None if window is None else window * 1e3,
        "delta_new": delta.get("new"), "delta_changed": delta.get("changed"),
        "delta_ended": delta.get("ended"),
        "switchover": r.get("switchover"),
        "switchover_ms": None if switch is None else switch * 1e3,
        "wire_out_per_session": wire.get("sent_per_session"),
        "wire_in_per_session": wire.get("received_per_session"),
        "gap_tcp_ms": max(f.longest_gap_ms for f in result.tcp.values()),
        "gap_udp_ms": max(f.longest_gap_ms for f in result.udp.values()),
        "retransmissions": result.retransmissions(), "rto": result.rto_timeouts(),
        "rst_packets": result.rst_packets, "resets": result.resets,
        "untranslated": result.untranslated,
        "udp_lost": sum(f.lost for f in result.udp.values()),
        "tcp_lost": sum(f.lost for f in result.tcp.values()),
        "sessions_moved": r.get("sessions_moved"),
        "phase_seconds": r.get("phase_seconds"), "bytes": r.get("bytes"),
    }


def memory_rounds(a: End, b: End, k: int, workdir: Path) -> list[dict]:
    """The table moved back and forth k times after the measured migration left it on B
    (B -> A first), no traffic besides; the servers' memory after each, once they have
    handed back what the move freed (they do so when idle: server/gc_pause.py). Stops at
    the first migration that fails."""
    rounds = []
    for i in range(1, k + 1):
        source, target = (b, a) if i % 2 else (a, b)
        command = migrate(source, target, workdir)
        time.sleep(IDLE + AGAIN + 0.5)
        r = command.report or {}
        rounds.append({
            "round": i, "direction": f"{'B' if source is b else 'A'} -> "
                                     f"{'A' if target is a else 'B'}",
            "command_s": command.seconds, "in_kernel_s": command.in_kernel_s(target),
            "sessions_moved": r.get("sessions_moved"),
            "rss_a": a.rss_mb(), "rss_b": b.rss_mb()})
        if command.code or not r.get("ok"):
            rounds[-1]["failed"] = (f"nfmig migrate exited {command.code} "
                                    f"({r.get('result')}): "
                                    f"{r.get('reason') or command.stderr[-500:]}")
            break
    return rounds


# -- the whole benchmark ------------------------------------------------------------------
def plan(sizes: list[int], hetero: bool) -> list[tuple[str, tuple[str, str], int]]:
    if hetero and HETERO_SIZE not in sizes:  # the figure the heterogeneous ones compare with
        sizes = sorted([*sizes, HETERO_SIZE])
    cases = [("Linux -> Linux", ("linux", "linux"), n) for n in sizes]
    if hetero:
        cases += [("Linux -> OVS", ("linux", "openflow"), HETERO_SIZE),
                  ("OVS -> Linux", ("openflow", "linux"), HETERO_SIZE)]
    return cases


def label_of(direction: str, n: int) -> str:
    return f"{direction} {n // 1000}k" if n % 1000 == 0 else f"{direction} {n}"


def run(sizes: list[int], repeat: int, hetero: bool, reference: bool, rounds: int,
        tmp: Path) -> dict:
    results: dict[str, Any] = {}
    for name, backends, n in plan(sizes, hetero):
        label = label_of(name, n)
        runs, errors = [], []
        for i in range(repeat):
            t0 = time.monotonic()
            linux = backends == ("linux", "linux")
            try:
                figures = run_once(backends, n, tmp / f"{backends[0]}-{backends[1]}-{n}-{i}",
                                   reference and linux, rounds if linux and i == 0 else 0)
            except Exception as exc:  # a run that could not be measured; the others go on
                errors.append(f"{type(exc).__name__}: {exc}")
                print(f"{label} run {i + 1}: FAILED: {errors[-1][:2000]}", flush=True)
                continue
            runs.append(figures)
            print(progress(label, i, figures, time.monotonic() - t0), flush=True)
        results[label] = {"direction": name, "sessions": n, "runs": runs, "errors": errors,
                          "median": medians(runs) if runs else None}
    with_hetero_ratios(results, label_of("Linux -> Linux", HETERO_SIZE))
    return results


def progress(label: str, i: int, f: dict, wall: float) -> str:
    line = (f"{label} run {i + 1}: command {f['command_s']:.2f} s, in B's kernel "
            f"{_fmt(f['in_kernel_s'], 2)} s, freeze {_fmt(f['freeze_ms'], 0)} ms, gaps "
            f"TCP/UDP {f['gap_tcp_ms']:.1f}/{f['gap_udp_ms']:.1f} ms, {f['flows_sent']} new "
            "flows")
    worst = max(f["gaps_during"].items(), key=lambda item: item[1]["gap_ms"])
    line += (f"; longest gap {worst[0]} at {worst[1]['at_s']} s, during "
             f"{', '.join(worst[1]['phases']) or 'no phase'}")
    if "memory_rounds" in f:
        line += f", {len(f['memory_rounds'])} memory round(s)"
    if "conntrackd_s" in f:
        line += f", conntrackd {f['conntrackd_s']:.3f} s"
    line += f" ({wall:.0f} s with the bed)"
    if f["problems"]:
        line += "\n  PROBLEMS: " + "\n  PROBLEMS: ".join(f["problems"])
    if f["notes"]:
        line += "\n  NOTE: " + "\n  NOTE: ".join(f["notes"])
    return line


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: every finally runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=[10_000, 100_000],
                        help="comma-separated session counts on NAT A, Linux -> Linux "
                             "(default 10000,100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median; "
                        "default 3)")
    parser.add_argument("--hetero", action="store_true",
                        help=f"also Linux -> OVS and OVS -> Linux at {HETERO_SIZE}, and "
                             f"Linux -> Linux at {HETERO_SIZE} if --sizes leaves it out")
    parser.add_argument("--memory-rounds", type=int, default=0, metavar="K",
                        help="after the first Linux -> Linux run of each size, move the "
                             "table back and forth K more times between the same servers "
                             "and print their memory after each (default 0; the issue's "
                             "goal is about 10 at 100000)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the conntrackd reference")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("migrator_linux: needs root (network namespaces, conntrack)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.memory_rounds < 0:
        parser.error("--memory-rounds must be 0 or more")
    if max(args.sizes) > 200_000:
        parser.error("sizes above 200000 do not fit the root namespace's conntrack table "
                     "beside the live flows")
    reference = not args.no_reference
    if reference and shutil.which("conntrackd") is None:
        print("migrator_linux: conntrackd is not installed (make setup installs it); or pass "
              "--no-reference", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"nfmig migrate, live: N sessions of a mixed table + probe streams + a new UDP flow "
          f"every {FLOW_INTERVAL * 1e3:g} ms; median of {args.repeat}", flush=True)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="nfmig-mbench-") as tmp:
            results = run(args.sizes, args.repeat, args.hetero, reference,
                          args.memory_rounds, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    print("\n".join(["", *table(results)]))
    for label, r in results.items():
        for run_ in r["runs"][:1]:
            if run_.get("memory_rounds"):
                print("\n".join(["", *memory_block(label, run_)]))
    print("\n".join(["", *goals(results, args.memory_rounds)]))
    problems = [f"{label} run {i + 1}: {p}" for label, r in results.items()
                for i, run_ in enumerate(r["runs"]) for p in run_["problems"]]
    failures = [f"{label}: {e}" for label, r in results.items() for e in r["errors"]]
    print("\nsessions in B's kernel: from the command's start until its first commit on B "
          "ended (its -v log, to the millisecond); whole command: wall clock of `python -m "
          "nfmig migrate` (interpreter start included); conntrackd: `conntrackd -n` on B until "
          "B's kernel holds N; RSS: VmRSS of each `nfmig serve` process (OVS: the switch and "
          "the OpenFlow app not included); gaps: the longest pause between two arrivals of a "
          "2 ms stream (nfmig.probe); the sender keeps opening new UDP flows from before the "
          "command starts until 0.5 s after it ends.")
    notes = [f"{label} run {i + 1}: {n}" for label, r in results.items()
             for i, run_ in enumerate(r["runs"]) for n in run_["notes"]]
    for line in failures + problems:
        print(f"PROBLEM: {line}")
    for line in notes:
        print(f"NOTE: {line}")
    if not failures and not problems:
        print("every session on exactly one side after every run; no stream problem")
    print(f"({time.monotonic() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps({
            "sizes": args.sizes, "repeat": args.repeat, "hetero": args.hetero,
            "memory_rounds": args.memory_rounds, "flow_interval_s": FLOW_INTERVAL,
            "results": results, "problems": failures + problems, "notes": notes},
            indent=1, default=str) + "\n")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
