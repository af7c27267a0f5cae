"""Live migration by the real command: `nfmig migrate --json` moves N sessions and the
gateway addresses from NAT A to NAT B while connections flow and new ones keep arriving.

For every run a fresh test bed (nfmig.testbed) with one `nfmig serve` per NAT (one password
for both), NAT A active by its policy's gateway addresses (client/demo_linux.gateway_policy,
over the whole port range):
1. A holds N sessions of a mixed table (mixed_sessions: TCP in every state, UDP, ICMP echo,
   and Linux to Linux also IPv6 TCP and UDP and destination NAT, made of
   bench/kernel_migration.py's generator) plus the live TCP and UDP streams of nfmig.probe;
2. a sender in the client namespace opens a new UDP flow every millisecond (one datagram
   from a new source port, carrying that port) to a sink in the server namespace, from just
   before the command starts until 0.5 s after it ends (bounded: SENDER_SECONDS);
3. `python -m nfmig -v migrate A B --json` runs as a process of its own: copy while traffic
   flows, freeze, delta, confirm, switchover, thaw, delete on A (-v: the phases it logs
   place the probe's longest gaps in them);
4. then every session is checked to be on exactly one side: none on both, none left on A
   but flows the sender opened after the thaw began, every synthetic session on B with its
   translation, the probe's streams on B, every flow that got through on one side;
5. Linux -> Linux only: conntrackd (FTFW, the reference of bench/kernel_migration.py) syncs
   the same N sessions between the two NAT namespaces, and the ratio
   `nfmig migrate / conntrackd` is printed.
`--hetero` adds Linux -> OVS and OVS -> Linux (`--backend openflow`) at 10k. Figures are
medians of `--repeat` runs; `--json FILE` writes them all, with every run's figures, the
command's report, its phase timeline and the probe's result. A run that cannot be measured
(a server that does not start, say) is reported and the others go on. Exit status 1 when a
run failed or found a problem. Needs root.

    .venv/bin/python bench/migrator_linux.py [--sizes 10000,100000] [--repeat 3]
        [--hetero] [--no-reference] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from kernel_migration import (
    EXTERNALS,
    PORT_MAX,
    PORT_MIN,
    Codec,
    _interrupt,
    add_sync_link,
    create_all,
    deferred_interrupts,
    flush,
    measure_conntrackd,
    parse_sizes,
    synthetic_sessions,
)
from nfmig.client.demo_linux import gateway_policy
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NAT_NS, NatClient
from nfmig.nf_backends.base import Session
from nfmig.nf_backends.ctnetlink import Conntrack
from nfmig.server.session_codec import sessions_to_xml

from nfmig.probe import PORT as PROBE_PORT
from nfmig.probe import Probe, ProbeResult
from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

HETERO_SIZE = 10_000
SINK_PORT = 6100  # UDP, in the server namespace
FLOW_INTERVAL = 0.001  # seconds between two new flows of the sender
# The sender's source ports; the client's own ephemeral ports (the probe's) are moved above
# them, so no port is used twice and every flow is a new conntrack entry.
FLOW_PORTS = (1024, 60999)
CLIENT_EPHEMERAL = "61000 65000"
SENDER_SECONDS = 55.0  # the sender stops by itself after this long (FLOW_PORTS allow 59 s)
COMMAND_TIMEOUT = 900.0  # seconds: bound on one `nfmig migrate`
PROBE_SECONDS = 900.0  # the probe's agents stop by themselves after this long
AGENT_WAIT = 15.0  # seconds for an agent's line
SETTLE, AFTER = 0.3, 0.5  # streams run before the command; traffic goes on after it
UDP_EXPIRY = 25.0  # seconds: an unanswered UDP flow older than this may have timed out
OVS_TIMEOUT = 3600  # synthetic sessions' timeout on an OVS source (flow idle timeouts)
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}

# One datagram from a new source port every interval until told to stop, the ports run
# out or max_s passes; reports the wall-clock send time of every flow (0: not sent).
SENDER = r"""
import json, os, select, socket, sys, time
sink, port, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
step, max_ns = int(float(sys.argv[5]) * 1e9), int(float(sys.argv[6]) * 1e9)
os.set_blocking(0, False)
print("ready", flush=True)
times, errors, why = [], [], "told to stop"
start = due = time.monotonic_ns()
p = first
while True:
    now = time.monotonic_ns()
    if now - start >= max_ns:
        why = "time limit"
        break
    if p > last:
        why = "ports exhausted"
        break
    if now >= due:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("", p))
            s.sendto(str(p).encode(), (sink, port))
            times.append(time.time_ns())
        except OSError as exc:
            times.append(0)
            if len(errors) < 5:
                errors.append(f"port {p}: {exc}")
        finally:
            s.close()
        p += 1
        due += step
        if due < now - 20 * step:  # after a stall, catch up by 20 flows at most
            due = now
    ready, _, _ = select.select([0], [], [], max(0, due - time.monotonic_ns()) / 1e9)
    if ready:
        data = os.read(0, 256)
        if not data or b"stop" in data:
            break
print("result", json.dumps({"first_port": first, "times": times, "errors": errors,
                            "seconds": (time.monotonic_ns() - start) / 1e9, "why": why}),
      flush=True)
"""

# Counts what arrives until told to stop (bounded by max_s), and which of the sender's
# flows (each datagram carries its source port) got through.
SINK = r"""
import json, os, select, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("", int(sys.argv[1])))
s.setblocking(False)
inside = sys.argv[2]
deadline = time.monotonic() + float(sys.argv[3])
os.set_blocking(0, False)
print("ready", flush=True)
got, peers, untranslated, ports = 0, set(), 0, set()
def drain():
    global got, untranslated
    while True:
        try:
            data, peer = s.recvfrom(64)
        except BlockingIOError:
            return
        got += 1
        peers.add(peer)
        untranslated += peer[0].startswith(inside)
        if data.isdigit():
            ports.add(int(data))
while time.monotonic() < deadline:
    ready, _, _ = select.select([s, 0], [], [], 0.5)
    if s in ready:
        drain()
    if 0 in ready:
        data = os.read(0, 256)
        if not data or b"stop" in data:
            time.sleep(0.2)
            drain()
            break
print("result", json.dumps({"received": got, "peers": len(peers), "ports": sorted(ports),
                            "untranslated": untranslated}), flush=True)
"""


# -- the NATs -----------------------------------------------------------------------------
class End:
    """One NAT namespace with its `nfmig serve`; ``stack`` stops it however the run ends.
    ``ct`` (a ctnetlink handle) for the Linux backend, whose truth is the kernel's table."""

    def __init__(self, stack: contextlib.ExitStack, bed: TestBed, netns: str, backend: str,
                 workdir: Path, password: str, active: bool, ipv6: bool = False):
        self.netns, self.backend, self.path = netns, backend, bed.ns_path(netns)
        self.label = "Linux" if backend == "linux" else "OVS"
        with deferred_interrupts():
            self.server = start_local_server(workdir, "--backend", backend, "--netns", netns,
                                             password=password)
            stack.callback(self.server.stop)
        self.client = NatClient("127.0.0.1", self.server.port, self.server.user, password,
                                hostkey_verify=False)
        stack.callback(self.client.close)
        self.client.edit(policy(active, ipv6))
        self.ct = None
        if backend == "linux":
            self.ct = Conntrack(self.path)
            stack.callback(self.ct.close)

    @property
    def url(self) -> str:
        return f"netconf://{self.server.user}@127.0.0.1:{self.server.port}"

    def populate(self, sessions: list[Session], codec: Codec) -> None:
        if self.ct is not None:  # straight into the kernel, as kernel_migration.py does
            create_all(self.ct, codec.backend._entries(sessions), f"populating {self.netns}")
        else:
            self.client.edit("".join(sessions_to_xml(sessions, NAT_NS)))

    def table(self) -> dict[tuple, tuple]:
        """Every session: key (protocol, src, sport, dst, dport) -> (translated address,
        port); from the kernel for Linux, from the server's operational datastore else."""
        if self.ct is not None:
            return {(PROTOCOLS.get(e.proto, str(e.proto)), _ip(e.src), e.sport, _ip(e.dst),
                     e.dport): (_ip(e.nat_addr), e.nat_port) for e in self.ct.dump()}
        text, _ = self.client.get_sessions()
        found = {}
        for chunk in text.split("</nat-session>")[:-1]:
            f = dict(_LEAF.findall(chunk))
            found[(f["protocol"], f["src_address"], int(f["src_port"]), f["dst_address"],
                   int(f["dst_port"]))] = (f.get("translated_address"),
                                           int(f["translated_port"])
                                           if "translated_port" in f else None)
        return found


V6_EXTERNALS = [f"2001:db8::{1 + i}" for i in range(len(EXTERNALS))]
TCP_STATES = ("established", "syn-sent", "syn-recv", "fin-wait", "close-wait", "last-ack",
              "time-wait", "close")


def mixed_sessions(uniform: list[Session], ipv6_and_dnat: bool) -> list[Session]:
    """A realistic table made of the uniform one, session by session, keeping every key
    and reply tuple distinct: of each ten, four TCP in every state in turn, two UDP, one
    ICMP echo (identifier kept, as the SDN NAT needs), and (Linux to Linux only) an IPv6
    TCP, an IPv6 UDP and a destination NAT session; the rest stay TCP established."""
    mixed, echoes = [], set()
    for i, s in enumerate(uniform):
        kind = i % 10
        if kind < 4:
            s = s._replace(tcp_state=TCP_STATES[(i // 10 + kind) % len(TCP_STATES)])
        elif kind < 6:
            s = s._replace(protocol="UDP", tcp_state=None, src_window_scale=None,
                           dst_window_scale=None)
        elif kind == 6 and not (claims := {("id", s.translated_address, s.src_port),
                                           ("out", s.src_address, s.dst_address),
                                           ("in", s.translated_address, s.dst_address)}
                                ) & echoes:
            # Echo sessions as the SDN NAT can hold them (it keeps the identifier, so one
            # per inside address and peer, and one per external address and peer) and the
            # kernel too (one per external address and identifier): a few dozen here.
            echoes |= claims
            s = s._replace(protocol="ICMP", dst_port=0, translated_port=s.src_port,
                           tcp_state=None, src_window_scale=None, dst_window_scale=None)
        elif kind in (7, 8) and ipv6_and_dnat:
            s = s._replace(src_address=_v6("fd00::", s.src_address),
                           dst_address=_v6("2001:db8:100::", s.dst_address),
                           translated_address=V6_EXTERNALS[EXTERNALS.index(
                               s.translated_address)])
            if kind == 8:
                s = s._replace(protocol="UDP", tcp_state=None, src_window_scale=None,
                               dst_window_scale=None)
        elif kind == 9 and ipv6_and_dnat:
            # A server's connection to a published port, on to the subscriber's port 80.
            subscriber = int(s.src_address.rsplit(".", 1)[1])
            s = s._replace(src_address=s.dst_address, dst_address=EXTERNALS[0],
                           dst_port=8000 + subscriber, translated_address=None,
                           translated_port=None, translated_dst_address=s.src_address,
                           translated_dst_port=80)
        mixed.append(s)
    return mixed


def _v6(prefix: str, ipv4: str) -> str:
    return str(ipaddress.ip_address(prefix) + int(ipaddress.ip_address(ipv4)) % (1 << 16))


def policy(active: bool, ipv6: bool = False) -> str:
    """The test bed's policy (demo_linux.gateway_policy, with the gateway addresses on the
    active NAT) over the whole port range: the new flows all go to one server address and
    port, and would use up the demo's 10,000 ports in 10 s."""
    text = gateway_policy(gateways=active)
    demo_range = "<port-min>20000</port-min><port-max>29999</port-max>"
    if demo_range not in text:
        raise RuntimeError("demo_linux.gateway_policy changed its port range; adapt "
                           "bench/migrator_linux.py")
    # Every external address the synthetic sessions use (the migrator refuses a target whose
    # policy translates elsewhere).
    externals = [*EXTERNALS, *(V6_EXTERNALS if ipv6 else ())]
    more = "".join(f"<external-address>{a}</external-address>" for a in externals
                   if f"<external-address>{a}</external-address>" not in text)
    return text.replace(demo_range, f"<port-min>{PORT_MIN}</port-min>"
                                    f"<port-max>{PORT_MAX}</port-max>" + more)


_LEAF = re.compile(r"<(protocol|src_address|src_port|dst_address|dst_port|translated_address"
                   r"|translated_port)>([^<]*)</")


def _ip(packed: bytes | None) -> str | None:
    return None if packed is None else str(ipaddress.ip_address(packed))


# -- the traffic besides the probe ---------------------------------------------------------
class Agent:
    """A small script in a namespace (TestBed.popen: own process group, killed by PID)."""

    def __init__(self, bed: TestBed, ns: str, script: str, *args: object):
        self.proc = bed.popen(ns, sys.executable, "-c", script, *map(str, args),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        self.buffer = b""
        self.expect("ready")

    def expect(self, word: str, timeout: float = AGENT_WAIT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20) if ready else b""
            if not chunk:
                self.kill()
                err = self.proc.stderr.read().decode(errors="replace")[-1500:]
                why = "exited" if ready else "timed out"
                raise RuntimeError(f"traffic agent: no {word!r} ({why}): {err}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        head, _, rest = line.decode().partition(" ")
        if head != word:
            raise RuntimeError(f"traffic agent said {line[:200]!r}, expected {word!r}")
        return rest

    def stop(self) -> dict:
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.flush()
        try:
            return json.loads(self.expect("result"))
        finally:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def flow_key(port: int) -> tuple:
    return ("UDP", TestBed.CLIENT, port, TestBed.SERVER, SINK_PORT)


# -- the command --------------------------------------------------------------------------
def migrate(a: End, b: End, workdir: Path) -> tuple[int, dict | None, str, float]:
    """`python -m nfmig -v migrate A B --json` as a user runs it (-v: each phase is logged
    on stderr, with the time, as it ends): exit code, report, stderr, and its wall-clock
    seconds (interpreter start included)."""
    password_file = workdir / "password"
    argv = [sys.executable, "-m", "nfmig", "-v", "migrate", a.url, b.url, "--password-file",
            str(password_file), "--insecure-no-host-key-check", "--json"]
    t0 = time.perf_counter()
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
    return proc.returncode, report, err, seconds


# `nfmig -v`: "2026-12-05 19:30:17,158 INFO nfmig.client.migrate: freeze ENDPOINT: 0.022 s"
_PHASE_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ nfmig[\w.]*: "
                        r"(\w+)(?: (\S+))?: ([\d.]+) s", re.M)


def timeline(stderr: str, wall_offset: float) -> list[dict]:
    """The command's phases on the probe's clock (seconds since the streams started), from
    the times it logged them ending (millisecond resolution)."""
    phases = []
    for stamp, name, endpoint, seconds in _PHASE_LOG.findall(stderr):
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_offset
        phases.append({"phase": name, "end": endpoint or None,
                       "from_s": round(end - float(seconds), 4), "to_s": round(end, 4)})
    return phases


def during(phases: list[dict], start: float | None, length_ms: float,
           names: dict[str, str]) -> list[str]:
    """The phases that overlap [start, start + length] (a gap of the probe), each with the
    end it ran on (``names``: endpoint URL -> "A" or "B")."""
    if start is None:
        return []
    stop = start + length_ms / 1e3
    return [f"{p['phase']}@{names.get(p['end'], p['end'])}" for p in phases
            if p["from_s"] <= stop + 0.001 and p["to_s"] >= start - 0.001]


def _epoch_ns(iso: str | None) -> int | None:
    if not iso:
        return None
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)


# -- one run ------------------------------------------------------------------------------
def run_once(backends: tuple[str, str], n: int, workdir: Path, reference: bool) -> dict:
    """One migration A -> B of n synthetic sessions plus live traffic, in a bed of its own;
    its figures, and the problems found."""
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
        codec = Codec(bed.nat_a)
        sessions = mixed_sessions(synthetic_sessions(n) if a.ct is not None else
                                  synthetic_sessions(n, timeout=OVS_TIMEOUT), linux_only)
        a.populate(sessions, codec)
        figures = live_migration(bed, a, b, sessions, workdir)
        if reference:
            for end in (a, b):
                flush(end.ct)
            add_sync_link(bed)
            figures["conntrackd_s"] = measure_conntrackd(bed, a, b, sessions, codec,
                                                         workdir / "conntrackd")
    return figures


def live_migration(bed: TestBed, a: End, b: End, sessions: list[Session],
                   workdir: Path) -> dict:
    agents: list[Agent] = []
    try:
        with Probe(bed, max_seconds=PROBE_SECONDS) as probe:
            time.sleep(SETTLE)
            before = a.table()
            sink = Agent(bed, bed.server, SINK, SINK_PORT, "10.0.0.", PROBE_SECONDS)
            agents.append(sink)
            sender = Agent(bed, bed.client, SENDER, TestBed.SERVER, SINK_PORT, *FLOW_PORTS,
                           FLOW_INTERVAL, SENDER_SECONDS)
            agents.append(sender)
            wall_offset = time.time() - probe.mark("command")
            code, report, stderr, seconds = migrate(a, b, workdir)
            probe.mark("command done")
            time.sleep(AFTER)
            sent, arrived = sender.stop(), sink.stop()
            result = probe.stop()
    finally:
        for agent in agents:
            agent.kill()
    after_a, after_b = a.table(), b.table()
    figures = figures_of(code, report, stderr, seconds, result)
    figures |= placement(before, after_a, after_b, sessions, sent, arrived, report, result)
    phases = timeline(stderr, wall_offset)
    names = {a.url.replace(f"{a.server.user}@", ""): "A",
             b.url.replace(f"{b.server.user}@", ""): "B", a.url: "A", b.url: "B"}
    figures["gaps_during"] = {
        f"{kind} {direction}": {"gap_ms": flow.longest_gap_ms, "at_s": flow.longest_gap_at_s,
                                "phases": during(phases, flow.longest_gap_at_s,
                                                 flow.longest_gap_ms, names)}
        for kind, flows in (("tcp", result.tcp), ("udp", result.udp))
        for direction, flow in flows.items()}
    figures["problems"] = problems_of(figures, code, report, stderr, result)
    figures["notes"] = notes_of(figures)
    figures["report"], figures["probe"] = report, result.to_dict()
    figures["timeline"], figures["stderr_tail"] = phases, stderr.strip()[-3000:]
    return figures


def figures_of(code: int, report: dict | None, stderr: str, seconds: float,
               result: ProbeResult) -> dict:
    r = report or {}
    window = (r.get("freeze_window") or {}).get("seconds")
    delta = r.get("delta") or {}
    switch = r.get("switchover_seconds")
    udp_lost = sum(f.lost for f in result.udp.values())
    return {
        "exit": code, "result": r.get("result"), "command_s": seconds,
        "report_total_s": r.get("total_seconds"),
        "freeze_ms": None if window is None else window * 1e3,
        "delta_new": delta.get("new"), "delta_changed": delta.get("changed"),
        "delta_ended": delta.get("ended"),
        "switchover": r.get("switchover"),
        "switchover_ms": None if switch is None else switch * 1e3,
        "gap_tcp_ms": max(f.longest_gap_ms for f in result.tcp.values()),
        "gap_udp_ms": max(f.longest_gap_ms for f in result.udp.values()),
        "retransmissions": result.retransmissions(), "rto": result.rto_timeouts(),
        "rst_packets": result.rst_packets, "resets": result.resets,
        "untranslated": result.untranslated, "udp_lost": udp_lost,
        "tcp_lost": sum(f.lost for f in result.tcp.values()),
        "sessions_moved": r.get("sessions_moved"),
        "phase_seconds": r.get("phase_seconds"), "bytes": r.get("bytes"),
    }


def placement(before: dict, after_a: dict, after_b: dict, sessions: list[Session],
              sent: dict, arrived: dict, report: dict | None, result: ProbeResult) -> dict:
    """Where every session is after the command: exactly one side each."""
    r = report or {}
    window = r.get("freeze_window") or {}
    phases = r.get("phase_seconds") or {}
    # The hold may act from the moment the freeze was asked for (the window's start is
    # taken once the source has answered it).
    freeze_ns = _epoch_ns(window.get("start"))
    if freeze_ns is not None:
        freeze_ns -= int(phases.get("freeze", 0.0) * 1e9) + 1_000_000
    thaw_end_ns = _epoch_ns(window.get("end"))
    thaw_s = phases.get("thaw", 0.0)
    # Opened after the thaw: from the moment the thaw was asked for (the window's end is
    # taken once the source has answered it).
    thaw_ns = None if thaw_end_ns is None else thaw_end_ns - int(thaw_s * 1e9) - 1_000_000
    times = {sent["first_port"] + i: t for i, t in enumerate(sent["times"]) if t}
    flows = {flow_key(port): t for port, t in times.items()}

    def after_thaw(key: tuple) -> bool:
        t = flows.get(key)
        return t is not None and thaw_ns is not None and t >= thaw_ns

    both = after_a.keys() & after_b.keys()
    left = [k for k in after_a if not after_thaw(k)]
    synthetic_missing = sum(
        after_b.get(s.key) != (s.translated_address, s.translated_port) for s in sessions)
    probe_keys = [k for k in before if k[4] == PROBE_PORT and k[3] == TestBed.SERVER]
    # A flow whose datagram reached the sink had a session on a NAT: it must be on one
    # side now, unless it may have timed out (unanswered UDP: 30 s in the kernel).
    through = {flow_key(port) for port in arrived["ports"]}
    recent = time.time_ns() - int(UDP_EXPIRY * 1e9)
    vanished = [k for k in (before.keys() | through)
                if k not in after_a and k not in after_b and flows.get(k, recent) >= recent]
    # Flows that never got through: dropped by the hold (sent in the window) or else.
    dropped = {k: t for k, t in flows.items()
               if k not in through and k not in after_a and k not in after_b}
    early = sorted((freeze_ns - t) / 1e6 for t in dropped.values()
                   if freeze_ns is not None and t < freeze_ns)
    late = [k for k, t in dropped.items()
            if thaw_end_ns is not None and t > thaw_end_ns + 5_000_000]
    in_window = [t for t in flows.values()
                 if freeze_ns is not None and thaw_end_ns is not None
                 and freeze_ns <= t < thaw_end_ns]
    duration = sent.get("seconds") or 0.0
    return {
        "a_before": len(before), "a_after": len(after_a), "b_after": len(after_b),
        "on_both": len(both), "both_sample": [list(k) for k in sorted(both)[:5]],
        "left_on_a": len(left), "left_sample": [list(k) for k in sorted(left)[:5]],
        "a_after_thaw": len(after_a) - len(left),
        "synthetic_missing_on_b": synthetic_missing,
        "probe_sessions": len(probe_keys),
        "probe_not_on_b": sum(k not in after_b for k in probe_keys),
        "vanished": len(vanished), "vanished_sample": [list(k) for k in sorted(vanished)[:5]],
        "flows_sent": len(times), "flows_per_s": len(times) / duration if duration else None,
        "flows_errors": sent["errors"], "sender_stopped_by": sent["why"],
        "flows_in_window": len(in_window),
        "flows_at_sink": len(through), "datagrams_at_sink": arrived["received"],
        "flows_untranslated_at_sink": arrived["untranslated"],
        "flows_on_a": sum(k in after_a for k in flows),
        "flows_on_b": sum(k in after_b for k in flows),
        "flows_nowhere": sum(k not in after_a and k not in after_b for k in flows),
        "flows_dropped": len(dropped),
        # dropped although sent before the freeze was asked for: ms before it
        "flows_dropped_before_freeze": len(early),
        # ... or sent after the window had closed (5 ms after the thaw's answer)
        "flows_dropped_after_window": len(late),
        "dropped_after_window_sample": [list(k) for k in sorted(late)[:5]],
        "dropped_before_freeze_ms": [round(x, 1) for x in early],
    }


def problems_of(f: dict, code: int, report: dict | None, stderr: str,
                result: ProbeResult) -> list[str]:
    found = []
    if code != 0 or report is None or not report.get("ok"):
        reason = (report or {}).get("reason") or stderr[-500:]
        found.append(f"nfmig migrate exited {code} ({(report or {}).get('result')}): {reason}")
    if f["on_both"]:
        found.append(f"{f['on_both']} session(s) on both A and B, e.g. {f['both_sample']}")
    if f["left_on_a"]:
        found.append(f"{f['left_on_a']} session(s) left on A that were not opened after the "
                     f"thaw, e.g. {f['left_sample']}")
    if f["synthetic_missing_on_b"]:
        found.append(f"{f['synthetic_missing_on_b']} synthetic session(s) not on B with "
                     "their translation")
    if f["probe_not_on_b"] or f["probe_sessions"] != 2:
        found.append(f"probe sessions on A before: {f['probe_sessions']}, not on B after: "
                     f"{f['probe_not_on_b']}")
    if f["vanished"]:
        found.append(f"{f['vanished']} session(s) that A held (or that carried a datagram) "
                     f"are on neither side, e.g. {f['vanished_sample']}")
    if f["flows_dropped_after_window"]:
        found.append(f"{f['flows_dropped_after_window']} new flow(s) opened after the freeze "
                     "window never got through and have no session, e.g. "
                     f"{f['dropped_after_window_sample']}")
    if f["sender_stopped_by"] != "told to stop":
        found.append(f"the new-flow sender stopped early: {f['sender_stopped_by']}")
    if f["flows_untranslated_at_sink"]:
        found.append(f"{f['flows_untranslated_at_sink']} new-flow datagram(s) reached the "
                     "sink untranslated")
    found += result.problems()
    return found


def notes_of(f: dict) -> list[str]:
    """What is worth knowing but breaks no rule: a first datagram is dropped by the hold
    when the source takes it up after the freeze, though it was sent before."""
    if not f["flows_dropped_before_freeze"]:
        return []
    ms = f["dropped_before_freeze_ms"]
    return [f"{f['flows_dropped_before_freeze']} new flow(s) sent before the freeze was asked "
            f"for never got through and have no session on either side (sent {ms[0]} to "
            f"{ms[-1]} ms before it)"]


# -- the whole benchmark ------------------------------------------------------------------
def medians(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float | type(None)):
            continue
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = statistics.median(values) if values else None
    out["runs"] = len(runs)
    if out.get("conntrackd_s"):
        out["ratio"] = out["command_s"] / out["conntrackd_s"]
        out["ratio_report_total"] = (out["report_total_s"] / out["conntrackd_s"]
                                     if out.get("report_total_s") else None)
    return out


def plan(sizes: list[int], hetero: bool) -> list[tuple[str, tuple[str, str], int]]:
    cases = [("Linux -> Linux", ("linux", "linux"), n) for n in sizes]
    if hetero:
        cases += [("Linux -> OVS", ("linux", "openflow"), HETERO_SIZE),
                  ("OVS -> Linux", ("openflow", "linux"), HETERO_SIZE)]
    return cases


def run(sizes: list[int], repeat: int, hetero: bool, reference: bool, tmp: Path) -> dict:
    results: dict[str, Any] = {}
    for name, backends, n in plan(sizes, hetero):
        label = f"{name} {n // 1000}k" if n % 1000 == 0 else f"{name} {n}"
        runs, errors = [], []
        for i in range(repeat):
            t0 = time.monotonic()
            try:
                figures = run_once(backends, n, tmp / f"{backends[0]}-{backends[1]}-{n}-{i}",
                                   reference and backends == ("linux", "linux"))
            except Exception as exc:  # a run that could not be measured; the others go on
                errors.append(f"{type(exc).__name__}: {exc}")
                print(f"{label} run {i + 1}: FAILED: {errors[-1][:2000]}", flush=True)
                continue
            runs.append(figures)
            print(progress(label, i, figures, time.monotonic() - t0), flush=True)
        results[label] = {"direction": name, "sessions": n, "runs": runs, "errors": errors,
                          "median": medians(runs) if runs else None}
    return results


def progress(label: str, i: int, f: dict, wall: float) -> str:
    line = (f"{label} run {i + 1}: command {f['command_s']:.2f} s, freeze "
            f"{_fmt(f['freeze_ms'], 0)} ms, gaps TCP/UDP {f['gap_tcp_ms']:.1f}/"
            f"{f['gap_udp_ms']:.1f} ms, {f['flows_sent']} new flows")
    worst = max(f["gaps_during"].items(), key=lambda item: item[1]["gap_ms"])
    line += (f"; longest gap {worst[0]} at {worst[1]['at_s']} s, during "
             f"{', '.join(worst[1]['phases']) or 'no phase'}")
    if "conntrackd_s" in f:
        line += f", conntrackd {f['conntrackd_s']:.3f} s"
    line += f" ({wall:.0f} s with the bed)"
    if f["problems"]:
        line += "\n  PROBLEMS: " + "\n  PROBLEMS: ".join(f["problems"])
    if f["notes"]:
        line += "\n  NOTE: " + "\n  NOTE: ".join(f["notes"])
    return line


# (label, figure key, digits); None as the key starts a section
ROWS: list[tuple[str, str | None, int]] = [
    ("the command", None, 0),
    ("runs measured", "runs", 0),
    ("nfmig migrate, whole command (s)", "command_s", 2),
    ("  its report's total (s)", "report_total_s", 2),
    ("freeze window (ms)", "freeze_ms", 0),
    ("delta new/changed/ended", "delta", 0),
    ("switchover (ms)", "switchover_ms", 1),
    ("conntrackd, same N (s)", "conntrackd_s", 3),
    ("nfmig migrate / conntrackd", "ratio", 1),
    ("  by the report's total", "ratio_report_total", 1),
    ("the probe's streams", None, 0),
    ("longest gap TCP (ms)", "gap_tcp_ms", 1),
    ("longest gap UDP (ms)", "gap_udp_ms", 1),
    ("TCP retransmissions", "retransmissions", 0),
    ("TCP RTO expiries", "rto", 0),
    ("RST packets", "rst_packets", 0),
    ("untranslated packets at server", "untranslated", 0),
    ("UDP lost (both directions)", "udp_lost", 0),
    ("new flows while it ran", None, 0),
    ("opened (one datagram each)", "flows_sent", 0),
    ("  rate (/s)", "flows_per_s", 0),
    ("  sent within the freeze window", "flows_in_window", 0),
    ("  got through (at the sink)", "flows_at_sink", 0),
    ("  never got through, sent before freeze", "flows_dropped_before_freeze", 0),
    ("  never got through, sent after window", "flows_dropped_after_window", 0),
    ("  on A / on B / neither after", "flows_where", 0),
    ("placement after the command", None, 0),
    ("sessions moved (report)", "sessions_moved", 0),
    ("B holds", "b_after", 0),
    ("on both sides", "on_both", 0),
    ("left on A (not opened after thaw)", "left_on_a", 0),
    ("on A, opened after the thaw", "a_after_thaw", 0),
    ("synthetic not on B as they were", "synthetic_missing_on_b", 0),
    ("held by a NAT, now on neither side", "vanished", 0),
]


def table(results: dict) -> list[str]:
    labels = [label for label, r in results.items() if r["median"]]
    width = max([14, *(len(label) + 2 for label in labels)])
    lines = [f"{'medians':<36}" + "".join(f"{label:>{width}}" for label in labels)]
    section = ""
    for name, key, digits in ROWS:
        if key is None:
            section = f"-- {name}"
            continue
        cells = [_cell(results[label]["median"], key, digits) for label in labels]
        if all(c == "-" for c in cells):
            continue
        if section:
            lines.append(section)
            section = ""
        lines.append(f"{name:<36}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


def _cell(m: dict, key: str, digits: int) -> str:
    if key == "delta":
        return "/".join(_fmt(m.get(k), 0) for k in ("delta_new", "delta_changed",
                                                      "delta_ended"))
    if key == "flows_where":
        return "/".join(_fmt(m.get(k), 0) for k in ("flows_on_a", "flows_on_b",
                                                      "flows_nowhere"))
    if key.startswith("ratio"):
        return "-" if m.get(key) is None else f"{m[key]:.1f}x"
    return _fmt(m.get(key), digits)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[10_000, 100_000],
                        help="comma-separated session counts on NAT A (default 10000,100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median)")
    parser.add_argument("--hetero", action="store_true",
                        help=f"also Linux -> OVS and OVS -> Linux at {HETERO_SIZE}")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the conntrackd reference")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("migrator_linux: needs root (network namespaces, conntrack)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if max(args.sizes) > 200_000:
        parser.error("sizes above 200000 do not fit the root namespace's conntrack table "
                     "beside the live flows")
    reference = not args.no_reference
    if reference and shutil.which("conntrackd") is None:
        print("migrator_linux: conntrackd is not installed (make setup installs it); or pass "
              "--no-reference", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"nfmig migrate, live: N synthetic sessions + probe streams + a new UDP flow every "
          f"{FLOW_INTERVAL * 1e3:g} ms; median of {args.repeat}", flush=True)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="nfmig-mbench-") as tmp:
            results = run(args.sizes, args.repeat, args.hetero, reference, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    print("\n".join(["", *table(results)]))
    problems = [f"{label} run {i + 1}: {p}" for label, r in results.items()
                for i, run_ in enumerate(r["runs"]) for p in run_["problems"]]
    failures = [f"{label}: {e}" for label, r in results.items() for e in r["errors"]]
    print("\nwhole command: wall clock of `python -m nfmig migrate` (interpreter start "
          "included); conntrackd: `conntrackd -n` on B until B's kernel holds N; gaps: the "
          "longest pause between two arrivals of a 2 ms stream (nfmig.probe); the sender "
          "keeps opening new UDP flows from before the command starts until 0.5 s after it "
          "ends.")
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
            "flow_interval_s": FLOW_INTERVAL, "results": results,
            "problems": failures + problems, "notes": notes}, indent=1, default=str) + "\n")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
