"""What a migration does to live user connections: a probe of streams through the test bed.

Two agents, on the client and on the server (``ip netns exec`` through TestBed.popen,
stopped by PID), send every ``interval`` (2 ms) over one TCP connection opened by the
client through the active NAT (small writes, TCP_NODELAY: a segment each) and one UDP flow,
both directions. A message carries its sequence number and send time (CLOCK_MONOTONIC,
which the namespaces share); the receiver timestamps arrivals. When stopped, each agent
reports what it received and its TCP sender's retransmission counts (TCP_INFO); nftables
counters in the server's and client's namespace count TCP resets on the probe's port and
packets reaching the server from the inside prefix (untranslated).

    with Probe(bed) as probe:         # streams flowing once this returns
        ...                           # migrate; probe.mark("switch") notes when
        result = probe.stop()
    result.problems()                 # the migration goals this run missed

Each agent is a ``python -m nfmig.probe_agent`` process (nfmig/probe_agent.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nfmig.testbed import TestBed

PORT = 5900  # TCP and UDP, on the server
INTERVAL = 0.002  # seconds between two messages of one stream
DRAIN = 0.3  # seconds an agent keeps receiving after it stopped sending
MAX_SECONDS = 120.0  # an agent stops by itself after this long, whatever happens
SETTLE = 0.1  # seconds the streams run before gaps count (interpreters warming up)
GOAL_GAP_MS = 50.0  # a live migration's goal: no stream pauses longer than this

_C2S, _S2C = "client->server", "server->client"


# -- results -------------------------------------------------------------------------------

@dataclass
class Flow:
    """One direction of one stream, as its receiver saw it."""

    sent: int
    received: int  # distinct messages
    lost: int  # sent, never received (for TCP: not received before the end)
    duplicated: int
    reordered: int  # arrived after a later one
    longest_gap_ms: float  # between two consecutive arrivals
    longest_gap_at_s: float | None  # when that gap began, seconds after the probe started
    max_delay_ms: float  # send to arrival, worst message
    # The worst lateness of either agent's loop (a descheduled process): a gap about this
    # long is the host's doing, not the network's.
    sender_lag_ms: float
    receiver_lag_ms: float


@dataclass
class TcpSender:
    """The sending side of the TCP connection, from its TCP_INFO at the end."""

    retransmissions: int  # tcpi_total_retrans: segments sent again, for whatever reason
    rto_timeouts: int | None  # tcpi_total_rto: retransmission timer expiries (Linux >= 6.7)
    bytes_retransmitted: int | None  # tcpi_bytes_retrans (Linux >= 4.19)
    # tcpi_dsack_dups: retransmissions the receiver reported as duplicates, i.e. sent
    # again needlessly (a probe timer that fired while the host stalled), not lost
    spurious: int | None
    rto_ms: float  # the timer's value at the end

    def lost(self) -> int:
        """Retransmissions that repaired a real loss."""
        return max(0, self.retransmissions - (self.spurious or 0))


@dataclass
class ProbeResult:
    duration_s: float
    tcp: dict[str, Flow]  # by direction: "client->server", "server->client"
    udp: dict[str, Flow]
    tcp_senders: dict[str, TcpSender]  # by side: "client", "server"
    resets: int  # connection reset (or broken pipe) errors the two TCP endpoints got
    # TCP RSTs on the probe's port, counted in the client's and the server's namespace as
    # sent and as received (one from the server to the client counts twice)
    rst_packets: int
    untranslated: int  # packets that reached the server namespace from the inside prefix
    tcp_peer: str  # the client's address:port as the server saw it (the NAT's)
    udp_peer: str
    udp_peer_changes: int  # UDP datagrams that came from another address:port than the first
    events: dict[str, float] = field(default_factory=dict)  # mark() -> seconds after start
    errors: list[str] = field(default_factory=list)

    def longest_gap_ms(self) -> float:
        return max(f.longest_gap_ms for f in (*self.tcp.values(), *self.udp.values()))

    def retransmissions(self) -> int:
        return sum(s.retransmissions for s in self.tcp_senders.values())

    def rto_timeouts(self) -> int | None:
        counts = [s.rto_timeouts for s in self.tcp_senders.values()]
        return None if None in counts else sum(c or 0 for c in counts)

    def problems(self, max_gap_ms: float = GOAL_GAP_MS) -> list[str]:
        """The live-migration goals this run missed (none: the streams did not notice)."""
        found = [*self.errors]
        for kind, flows in (("tcp", self.tcp), ("udp", self.udp)):
            for direction, flow in flows.items():
                if flow.longest_gap_ms > max_gap_ms:
                    found.append(f"{kind} {direction}: gap of {flow.longest_gap_ms:.1f} ms "
                                 f"(the hosts' own lag up to "
                                 f"{max(flow.sender_lag_ms, flow.receiver_lag_ms):.1f} ms)")
                if flow.lost or flow.duplicated:
                    found.append(f"{kind} {direction}: {flow.lost} lost, "
                                 f"{flow.duplicated} duplicated")
        lost, rto = sum(s.lost() for s in self.tcp_senders.values()), self.rto_timeouts()
        found += [text for wrong, text in (
            (lost, f"tcp: {lost} retransmission(s) of lost segments"),
            (rto, f"tcp: {rto} retransmission timeout(s)"),
            (self.resets or self.rst_packets,
             f"tcp: {self.resets} reset error(s), {self.rst_packets} RST(s)"),
            (self.untranslated, f"{self.untranslated} untranslated packet(s) at the server"),
            (self.udp_peer_changes,
             f"udp: {self.udp_peer_changes} datagram(s) from another port")) if wrong]
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


# -- the controller ------------------------------------------------------------------------

class Probe:
    """The two agents and the nftables counters of one probe in a test bed."""

    def __init__(self, bed: TestBed, port: int = PORT, interval: float = INTERVAL,
                 drain: float = DRAIN, max_seconds: float = MAX_SECONDS) -> None:
        if not 1024 <= port <= 65535:
            raise ValueError(f"port {port}: use 1024-65535")
        self.bed, self.port, self.interval = bed, port, interval
        self.drain, self.max_seconds = drain, max_seconds
        self.table = f"nfmig_probe_{port}"  # a table per port: two probes can share a bed
        self._agents: dict[str, subprocess.Popen] = {}
        self._buffers: dict[str, bytes] = {}
        self._tables: list[str] = []  # namespaces holding our table
        self._started_ns = 0
        self._events: dict[str, float] = {}
        self._ready: dict[str, list[str]] = {}

    def start(self, timeout: float = 10.0) -> None:
        """Counters in place, agents connected, streams flowing; on failure nothing left."""
        try:
            self._add_counters()
            argv = [str(v) for v in (self.port, self.interval, self.drain, self.max_seconds)]
            deadline = time.monotonic() + timeout
            self._spawn("server", self.bed.server, ["server", *argv])
            self._expect("server", "listening", deadline)
            self._started_ns = time.monotonic_ns()
            self._spawn("client", self.bed.client, ["client", *argv, self.bed.SERVER])
            self._ready["client"] = self._expect("client", "ready", deadline)
            self._ready["server"] = self._expect("server", "ready", deadline)
            time.sleep(SETTLE)
            self._tell("go")
        except BaseException:
            self.close()
            raise

    def mark(self, label: str) -> float:
        """Note that ``label`` happens now (e.g. "switch"); returns seconds since start."""
        at = (time.monotonic_ns() - self._started_ns) / 1e9
        self._events[label] = at
        return at

    def stop(self, timeout: float = 10.0) -> ProbeResult:
        """Stop both streams, let them drain, and put the agents' reports together."""
        deadline = time.monotonic() + self.drain + timeout
        try:
            duration = (time.monotonic_ns() - self._started_ns) / 1e9
            self._tell("stop")
            reports = {role: json.loads(" ".join(self._expect(role, "result", deadline)))
                       for role in ("client", "server")}
            counts = self._counters()
            return self._result(duration, reports, counts)
        finally:
            self.close()

    def close(self) -> None:
        """Kill the agents (by PID, whole process group) and drop the counters; idempotent."""
        agents, self._agents = list(self._agents.values()), {}
        for proc in agents:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
        tables, self._tables = self._tables, []
        for ns in tables:
            self.bed.run(ns, "nft", "delete", "table", "inet", self.table, check=False,
                         timeout=10)

    def __enter__(self) -> Probe:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _tell(self, word: str) -> None:
        for proc in self._agents.values():
            with contextlib.suppress(OSError):  # an agent that died is reported later
                proc.stdin.write(f"{word}\n".encode())
                proc.stdin.flush()

    def _add_counters(self) -> None:
        # Priority -300 (raw): counted before anything else in the namespace can drop it.
        rst = "tcp flags & rst == rst"
        for ns, extra in ((self.bed.server, f"ip saddr {self.bed.INSIDE_PREFIX} "
                                            "counter name untranslated"),
                          (self.bed.client, "")):
            rules = f"""table inet {self.table} {{
  counter untranslated {{ }}
  counter rst {{ }}
  chain pre {{ type filter hook prerouting priority -300; policy accept;
    {extra}
    tcp sport {self.port} {rst} counter name rst
    tcp dport {self.port} {rst} counter name rst
  }}
  chain out {{ type filter hook output priority -300; policy accept;
    tcp sport {self.port} {rst} counter name rst
    tcp dport {self.port} {rst} counter name rst
  }}
}}
"""
            self._tables.append(ns)
            self.bed.run(ns, "nft", "-f", "-", input=rules, timeout=10)

    def _counters(self) -> dict[str, int]:
        totals = {"untranslated": 0, "rst": 0}
        for ns in self._tables:
            out = self.bed.run(ns, "nft", "-j", "list", "table", "inet", self.table,
                               timeout=10).stdout
            for item in json.loads(out)["nftables"]:
                if "counter" in item:
                    totals[item["counter"]["name"]] += item["counter"]["packets"]
        return totals

    def _spawn(self, role: str, ns: str, argv: list[str]) -> None:
        self._agents[role] = self.bed.popen(
            ns, sys.executable, "-m", "nfmig.probe_agent", *argv, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buffers[role] = b""

    def _expect(self, role: str, word: str, deadline: float) -> list[str]:
        """The words after ``word`` on the agent's next line, waiting until ``deadline``."""
        proc = self._agents[role]
        while b"\n" not in self._buffers[role]:
            ready, _, _ = select.select([proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
            if not chunk:
                proc.kill()
                err = proc.stderr.read().decode(errors="replace").strip()[-2000:]
                why = "timed out" if not ready else f"exited {proc.wait(5)}"
                raise RuntimeError(f"probe {role} agent {why} waiting for {word!r}: {err}")
            self._buffers[role] += chunk
        line, self._buffers[role] = self._buffers[role].split(b"\n", 1)
        words = line.decode().split()
        if not words or words[0] != word:
            raise RuntimeError(f"probe {role} agent said {line!r}, expected {word!r}")
        return words[1:]

    def _result(self, duration: float, reports: dict[str, dict], counts: dict[str, int]
                ) -> ProbeResult:
        start = self._started_ns
        client, server = reports["client"], reports["server"]

        def flow(kind: str, sender: dict, receiver: dict) -> Flow:
            rx, sent = receiver[kind]["rx"], sender[kind]["sent"]
            at = rx["gap_at_ns"]
            return Flow(sent=sent, received=rx["received"], lost=max(0, sent - rx["received"]),
                        duplicated=rx["duplicated"], reordered=rx["reordered"],
                        longest_gap_ms=round(rx["gap_ns"] / 1e6, 3),
                        longest_gap_at_s=None if at is None else round((at - start) / 1e9, 4),
                        max_delay_ms=round(rx["delay_ns"] / 1e6, 3),
                        sender_lag_ms=round(sender["lag_ns"] / 1e6, 3),
                        receiver_lag_ms=round(receiver["lag_ns"] / 1e6, 3))

        errors = [f"{role}: {e}" for role, r in reports.items() for e in r["errors"]]
        return ProbeResult(
            duration_s=round(duration, 4),
            tcp={_C2S: flow("tcp", client, server), _S2C: flow("tcp", server, client)},
            udp={_C2S: flow("udp", client, server), _S2C: flow("udp", server, client)},
            tcp_senders={role: TcpSender(**r["tcp"]["info"]) for role, r in reports.items()},
            resets=sum(r["tcp"]["resets"] for r in reports.values()),
            rst_packets=counts["rst"], untranslated=counts["untranslated"],
            tcp_peer=self._ready["server"][0], udp_peer=self._ready["server"][1],
            udp_peer_changes=server["udp"]["peer_changes"],
            events=dict(self._events), errors=errors)


def measure(bed: TestBed, action: Callable[[Probe], object], before: float = 0.3,
            after: float = 0.5, **probe_options: Any) -> ProbeResult:
    """Run ``action(probe)`` while the streams flow, ``before`` seconds after they start;
    stop them ``after`` seconds later (long enough for a 200 ms retransmission timer)."""
    probe = Probe(bed, **probe_options)
    probe.start()
    try:
        time.sleep(before)
        probe.mark("action")
        action(probe)
        probe.mark("action done")
        time.sleep(after)
        return probe.stop()
    finally:
        probe.close()
