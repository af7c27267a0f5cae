"""The traffic of the migration benchmark besides the probe's streams (nfmig.probe): a
sender in the client namespace that opens a new UDP flow every interval, and a sink in the
server namespace that tells which of them got through, each a small script in its
namespace."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time

from nfmig.testbed import TestBed

SINK_PORT = 6100  # UDP, in the server namespace
FLOW_INTERVAL = 0.001  # seconds between two new flows of the sender
# The sender's source ports; the client's own ephemeral ports (the probe's) are moved above
# them, so no port is used twice and every flow is a new conntrack entry.
FLOW_PORTS = (1024, 60999)
CLIENT_EPHEMERAL = "61000 65000"
SENDER_SECONDS = 55.0  # the sender stops by itself after this long (FLOW_PORTS allow 59 s)
AGENT_WAIT = 15.0  # seconds for an agent's line

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

