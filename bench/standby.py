"""Hot standby, measured kernel to kernel: `nfmig standby` keeping NAT B (Linux) a copy of
NAT A (Linux), beside conntrackd (FTFW, the peer writing straight into its kernel) doing
the same between the same two namespaces in the same run; then a failover.

1. lag: sessions are created in A's kernel at RATE per second, in a batch every 10 ms,
   while the replication runs; B's conntrack count is read every millisecond, and each
   batch's lag is the time from its creation in A until B's count covers it. With
   ``--standbys 3`` the command also keeps two simulated NATs (on loopback) as standbys,
   which it writes beside B. Printed: p50/p99/max of the lags, for nfmig and conntrackd.
2. throughput: the same with ``--throughput RATE`` (one standby): whether the last
   batches' lag stays bounded (not falling behind), and the rate B's kernel reached.
3. failover: the probe's TCP and UDP streams through A, the command following A with
   ``--failover-after``; A's server is killed and A's links go down; the command gives B
   A's gateway addresses. Printed: the command's failover time, how long it saw no source,
   the streams' longest gap and whether any was reset.

    .venv/bin/python bench/standby.py [--rate 1000] [--seconds 5] [--standbys 3]
        [--throughput 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from conntrackd_ref import SYNC_A, SYNC_B, Conntrackd, add_sync_link
from migrator_linux import End
from nfmig.client.local import start_local_server
from nfmig.nf_backends.ctnetlink import Conntrack, EntryCount
from tables import create_all, flush, kernel_entries, synthetic_sessions

from nfmig.probe import Probe
from nfmig.testbed import TestBed

BATCH_EVERY = 0.010  # seconds between two batches of created sessions
POLL = 0.001  # seconds between two reads of B's count
SETTLE_TIMEOUT = 120.0


class Lags:
    """B's count read every POLL; the lag of each batch once the count covers it."""

    def __init__(self, netns_path: str, base: int):
        self.count = EntryCount(netns_path)
        self.base = base
        self.batches: list[tuple[float, int]] = []  # (created at, total created so far)
        self.lags: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def created(self, at: float, total: int) -> None:
        self.batches.append((at, total))

    def _watch(self) -> None:
        done = 0
        while not self._stop.is_set():
            held = self.count.read() - self.base
            now = time.monotonic()
            while done < len(self.batches) and held >= self.batches[done][1]:
                self.lags.append(now - self.batches[done][0])
                done += 1
            time.sleep(POLL)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.lags) < len(self.batches) and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.lags) == len(self.batches)

    def close(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.count.close()
        ms = sorted(x * 1e3 for x in self.lags)
        if not ms:
            return {"batches": len(self.batches), "reached": 0}
        return {"batches": len(self.batches), "reached": len(ms),
                "p50_ms": round(statistics.median(ms), 1),
                "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
                "max_ms": round(ms[-1], 1),
                "last_ms": round(self.lags[-1] * 1e3, 1)}


def load(ct: Conntrack, lags: Lags, rate: int, seconds: float, first: int) -> float:
    """Create rate*seconds sessions in A's kernel at ``rate``; the rate reached."""
    per_batch = max(1, round(rate * BATCH_EVERY))
    sessions = synthetic_sessions(first + int(rate * seconds))[first:]
    started = time.monotonic()
    made = 0
    while made < len(sessions):
        due = started + (made // per_batch) * BATCH_EVERY
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        batch = sessions[made:made + per_batch]
        create_all(ct, kernel_entries(batch), "creating sessions in A")
        made += len(batch)
        lags.created(time.monotonic(), made)
    return made / max(time.monotonic() - started, 1e-3)


def in_step(b: End, n: int) -> None:
    count = EntryCount(b.path)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while count.read() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"B holds {count.read()} of {n} sessions")
            time.sleep(0.01)
    finally:
        count.close()


def standby_process(workdir: Path, a: End, targets: list[str], *options: str
                    ) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nfmig", "standby", a.url, *targets, "--password-file",
         str(workdir / "password"), "--insecure-no-host-key-check", "--json", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> dict:
    process.terminate()
    out, err = process.communicate(timeout=60)
    try:
        return json.loads(out)
    except ValueError:
        raise RuntimeError(f"nfmig standby printed no report: {err[-2000:]}") from None


def nfmig_lag(bed: TestBed, stack: contextlib.ExitStack, workdir: Path, a: End, b: End,
              rate: int, seconds: float, standbys: int, first: int) -> dict:
    targets = [b.url]
    for i in range(standbys - 1):  # simulated standbys beside B
        extra = start_local_server(workdir / f"sim{i}", "--sessions", "0",
                                   password=(workdir / "password").read_text().strip())
        stack.callback(extra.stop)
        targets.append(f"netconf://{extra.user}@127.0.0.1:{extra.port}")
    on_a = EntryCount(a.path)
    held = on_a.read()  # what B must hold once in step
    on_a.close()
    process = standby_process(workdir, a, targets, "--dampening", "10")
    try:
        in_step(b, held)
        lags = Lags(b.path, held)
        reached = load(a.ct, lags, rate, seconds, first)
        lags.wait(30)
        figures = lags.close() | {"rate": round(reached)}
    finally:
        report = stop(process)
    figures["command"] = {t["endpoint"]: {k: t[k] for k in ("applied", "pending",
                                                            "lag_p99_ms", "resyncs")}
                          for t in report["targets"]}
    return figures


def conntrackd_lag(bed: TestBed, workdir: Path, a: End, b: End, rate: int, seconds: float,
                   first: int, run: str) -> dict:
    flush(a.ct)
    flush(b.ct)
    if not (workdir / "sync-link").exists():
        add_sync_link(bed)
        (workdir / "sync-link").touch()
    daemons = [Conntrackd(bed, a.netns, workdir / f"ctd-a-{run}", SYNC_A, SYNC_B, False),
               Conntrackd(bed, b.netns, workdir / f"ctd-b-{run}", SYNC_B, SYNC_A, True)]
    try:
        daemons[0].wait_cache(0)
        daemons[1].wait_cache(0)
        lags = Lags(b.path, 0)
        reached = load(a.ct, lags, rate, seconds, first)
        lags.wait(30)
        return lags.close() | {"rate": round(reached)}
    finally:
        for daemon in daemons:
            daemon.stop()


def failover(bed: TestBed, workdir: Path, a: End, b: End) -> dict:
    process = standby_process(workdir, a, [b.url], "--failover-after", "0.1",
                              "--dampening", "10")
    with Probe(bed) as probe:
        time.sleep(1.0)  # the probe's sessions replicated
        killed = time.monotonic()
        os.killpg(a.server.process.pid, 9)
        for dev in ("inside", "outside"):
            bed.run(bed.nat_a, "ip", "link", "set", "dev", dev, "down")
        out, err = process.communicate(timeout=60)
        done = time.monotonic()
        time.sleep(4)  # TCP's backed-off retransmission reaches B
        result = probe.stop()
    report = json.loads(out) if out.strip() else {}
    f = report.get("failover") or {}
    return {"failed_over": bool(f), "command_failover_s": f.get("seconds"),
            "source_lost_for_s": f.get("source_lost_for_s"),
            "kill_to_command_end_s": round(done - killed, 3),
            "longest_gap_ms": round(result.longest_gap_ms(), 1),
            "rst": result.rst_packets, "resets": result.resets,
            "tcp_lost": sum(x.lost for x in result.tcp.values()),
            "udp_peer_changes": result.udp_peer_changes, "stderr": err[-500:] if not f
            else None}


LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()
"""
CONNECTOR = """
import json, socket, sys, time
host, port, n, pace = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
times = []
started = time.perf_counter()
for i in range(n):
    if pace:  # one connection every 1/pace s: the latency of a steady load
        time.sleep(max(0.0, started + i / pace - time.perf_counter()))
    t = time.perf_counter()
    c = socket.create_connection((host, port), timeout=5)
    times.append(time.perf_counter() - t)
    c.close()
print(json.dumps({"seconds": time.perf_counter() - started, "times": times}))
"""
DATA_PORT, CONNECTIONS, PACED_SECONDS = 7600, 10000, 3


# The data path (the connections' packets, forwarded by the kernel in the sending process's
# context) on one core, the NF's control plane (its server, the replication, conntrackd) on
# the other: as on an NF host whose control plane has a core of its own. Without that, on
# two cores, the measure is how the scheduler shares them, not what replication costs.
TRAFFIC_CPU, CONTROL_CPU = 0, 1


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` and of its descendants onto ``cpu``."""
    pids, children = [pid], {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    while pids:
        current = pids.pop()
        pids += children.get(current, [])
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {cpu})


def data_path(bed: TestBed, pace: int) -> dict:
    """New TCP connections through NAT A, one after another as fast as they go, then
    ``pace`` a second for PACED_SECONDS: the rate reached, and the connect latency of each
    run."""
    out = {}
    for name, count, rate in (("flat_out", CONNECTIONS, 0),
                              (f"at_{pace}_per_s", pace * PACED_SECONDS, pace)):
        result = bed.run(bed.client, "taskset", "-c", str(TRAFFIC_CPU), sys.executable, "-c",
                         CONNECTOR, TestBed.SERVER, str(DATA_PORT), str(count), str(rate),
                         timeout=120)
        found = json.loads(result.stdout)
        ms = sorted(t * 1e3 for t in found["times"])
        out[name] = {"connections_per_s": round(len(ms) / found["seconds"]),
                     "connect_p50_ms": round(statistics.median(ms), 3),
                     "connect_p99_ms": round(ms[int(len(ms) * 0.99)], 3)}
    return out


def data_path_cost(bed: TestBed, stack: contextlib.ExitStack, workdir: Path, a: End,
                   b: End, standbys: int, pace: int) -> dict:
    """The same connections through A without, then with, the replication attached."""
    listener = bed.popen(bed.server, "taskset", "-c", str(TRAFFIC_CPU), sys.executable, "-c",
                         LISTENER, str(DATA_PORT), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        for end in (a, b):
            pin(end.server.process.pid, CONTROL_CPU)
        alone = data_path(bed, pace)
        targets = [b.url]
        for i in range(standbys - 1):
            extra = start_local_server(workdir / f"cost{i}", "--sessions", "0",
                                       password=(workdir / "password").read_text().strip())
            stack.callback(extra.stop)
            pin(extra.process.pid, CONTROL_CPU)
            targets.append(f"netconf://{extra.user}@127.0.0.1:{extra.port}")
        process = standby_process(workdir, a, targets, "--dampening", "10")
        pin(process.pid, CONTROL_CPU)
        try:
            time.sleep(2.0)  # in step
            pin(process.pid, CONTROL_CPU)  # and the threads it started meanwhile
            attached = data_path(bed, pace)
        finally:
            stop(process)
        flush(a.ct)
        flush(b.ct)
        daemons = [Conntrackd(bed, a.netns, workdir / "ctd-a-path", SYNC_A, SYNC_B, False),
                   Conntrackd(bed, b.netns, workdir / "ctd-b-path", SYNC_B, SYNC_A, True)]
        try:
            daemons[0].wait_cache(0)
            daemons[1].wait_cache(0)
            for daemon in daemons:
                pin(daemon.proc.pid, CONTROL_CPU)
            with_conntrackd = data_path(bed, pace)
        finally:
            for daemon in daemons:
                daemon.stop()
    finally:
        listener.kill()
        listener.wait()
    return {"alone": alone, f"with {standbys} standbys": attached,
            "with conntrackd": with_conntrackd}


def run(rate: int, seconds: float, standbys: int, throughput: int) -> dict:
    out: dict = {"rate": rate, "seconds": seconds, "standbys": standbys}
    with contextlib.ExitStack() as stack, tempfile_dir() as workdir:
        bed = stack.enter_context(TestBed())
        password = secrets.token_urlsafe(16)
        (workdir / "password").write_text(password + "\n")
        a = End(stack, bed, bed.nat_a, "linux", workdir / "a", password, active=True)
        b = End(stack, bed, bed.nat_b, "linux", workdir / "b", password, active=False)
        base = 1000
        create_all(a.ct, kernel_entries(synthetic_sessions(base)), "loading A")
        out["nfmig"] = nfmig_lag(bed, stack, workdir, a, b, rate, seconds, standbys, base)
        print(f"nfmig standby ({standbys} standbys), {rate}/s: {out['nfmig']}", flush=True)
        if throughput:
            first = base + int(rate * seconds)
            out["nfmig_throughput"] = nfmig_lag(bed, stack, workdir, a, b, throughput,
                                                seconds, 1, first)
            print(f"nfmig standby, {throughput}/s: {out['nfmig_throughput']}", flush=True)
        out["conntrackd"] = conntrackd_lag(bed, workdir, a, b, rate, seconds, 0, "lag")
        print(f"conntrackd FTFW, {rate}/s: {out['conntrackd']}", flush=True)
        if throughput:
            flush(a.ct)
            flush(b.ct)
            out["conntrackd_throughput"] = conntrackd_lag(bed, workdir, a, b, throughput,
                                                          seconds, 0, "throughput")
            print(f"conntrackd FTFW, {throughput}/s: {out['conntrackd_throughput']}",
                  flush=True)
        flush(a.ct)
        flush(b.ct)
        out["data_path"] = data_path_cost(bed, stack, workdir, a, b, standbys, rate)
        print(f"data path through A: {out['data_path']}", flush=True)
        flush(a.ct)
        flush(b.ct)
        create_all(a.ct, kernel_entries(synthetic_sessions(base)), "loading A")
        out["failover"] = failover(bed, workdir, a, b)
        print(f"failover: {out['failover']}", flush=True)
    return out


@contextlib.contextmanager
def tempfile_dir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nfmig-standby-") as d:
        yield Path(d)


def goals(out: dict) -> list[str]:
    n, c = out["nfmig"], out["conntrackd"]
    lines = [f"lag p99 at {out['rate']}/s, {out['standbys']} standbys: nfmig "
             f"{n.get('p99_ms')} ms, conntrackd {c.get('p99_ms')} ms (goal <= 100 ms): "
             + ("met" if (n.get("p99_ms") or 1e9) <= 100 else "NOT met")]
    if "nfmig_throughput" in out:
        t = out["nfmig_throughput"]
        ok = t.get("reached") == t.get("batches") and (t.get("last_ms") or 1e9) < 1000
        lines.append(f"sustained {t.get('rate')}/s to one standby: last batch "
                     f"{t.get('last_ms')} ms behind (goal: not falling behind): "
                     + ("met" if ok else "NOT met"))
    f = out["failover"]
    took = (f.get("source_lost_for_s") or 0) + (f.get("command_failover_s") or 0)
    lines.append(f"failover: {took * 1e3:.0f} ms from losing the source to B holding the "
                 f"gateways (goal <= 300 ms): " + ("met" if f["failed_over"] and took <= 0.3
                                                   else "NOT met")
                 + f"; streams: longest gap {f['longest_gap_ms']} ms, {f['rst']} RST, "
                 f"{f['tcp_lost']} TCP messages lost")
    d = out.get("data_path")
    if d:
        runs = [d["alone"], d[f"with {out['standbys']} standbys"], d["with conntrackd"]]
        for name in runs[0]:
            alone, attached, ctd = (r[name] for r in runs)
            lines.append(
                f"data path through A, new TCP connections {name.replace('_', ' ')}: "
                f"{alone['connections_per_s']}/s alone, {attached['connections_per_s']}/s "
                f"with {out['standbys']} standbys, {ctd['connections_per_s']}/s with "
                f"conntrackd; connect p50/p99 {alone['connect_p50_ms']}/"
                f"{alone['connect_p99_ms']}, {attached['connect_p50_ms']}/"
                f"{attached['connect_p99_ms']}, {ctd['connect_p50_ms']}/"
                f"{ctd['connect_p99_ms']} ms (goal: no measurable cost)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--standbys", type=int, default=3)
    parser.add_argument("--throughput", type=int, default=20000,
                        help="sessions/s for the sustained test (0: skip it)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/standby.py needs root (namespaces, conntrack)", file=sys.stderr)
        return 2
    out = run(args.rate, args.seconds, args.standbys, args.throughput)
    print("\n".join(goals(out)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
