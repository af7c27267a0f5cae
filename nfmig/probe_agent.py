"""One agent of the probe (nfmig.probe): the process in the client's or the server's
namespace that sends its streams, timestamps what arrives and reports it.

    python -m nfmig.probe_agent client|server PORT INTERVAL DRAIN MAX_SECONDS [HOST]

It says "listening" (server) and "ready" once its streams flow; a line "stop" on its
standard input stops the sending, and after DRAIN seconds of receiving it prints "result"
and its report as JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import socket
import struct
import sys
import termios
import time
from typing import Any

_MSG = struct.Struct("!QQ")  # sequence number, send time (ns, CLOCK_MONOTONIC)
_HELLO = b"nfmig-probe-hello"


class _Receiver:
    """Arrivals of one direction of one stream."""

    def __init__(self, reliable: bool) -> None:
        self.reliable = reliable  # TCP: sequence numbers must come in order
        self.seen: set[int] = set()  # UDP only (bounded: the agent's lifetime over its interval)
        self.received = self.duplicated = self.reordered = 0
        self.highest = -1
        self.last_ns: int | None = None
        self.gap_ns, self.gap_at_ns, self.delay_ns = 0, None, 0
        self.errors: list[str] = []

    def arrived(self, now: int) -> None:
        if self.last_ns is not None and now - self.last_ns > self.gap_ns:
            self.gap_ns, self.gap_at_ns = now - self.last_ns, self.last_ns
        self.last_ns = now

    def message(self, seq: int, sent_ns: int, now: int) -> None:
        self.delay_ns = max(self.delay_ns, now - sent_ns)
        if self.reliable:
            if seq != self.highest + 1 and not self.errors:
                self.errors.append(f"tcp: message {seq} after {self.highest}")
        elif seq in self.seen:
            self.duplicated += 1
            return
        else:
            self.seen.add(seq)
        if seq < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, seq)
        self.received += 1

    def report(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "received", "duplicated", "reordered", "gap_ns", "gap_at_ns", "delay_ns")}


def _tcp_info(sock: socket.socket) -> dict[str, Any]:
    """The retransmission counters of struct tcp_info (include/uapi/linux/tcp.h); fields
    newer than the running kernel are None."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)

    def field_at(offset: int, fmt: str) -> int | None:
        end = offset + struct.calcsize(fmt)
        return struct.unpack_from(fmt, raw, offset)[0] if len(raw) >= end else None

    return {"retransmissions": field_at(100, "=I") or 0,  # tcpi_total_retrans
            "rto_timeouts": field_at(240, "=H"),  # tcpi_total_rto
            "bytes_retransmitted": field_at(208, "=Q"),  # tcpi_bytes_retrans
            "spurious": field_at(216, "=I"),  # tcpi_dsack_dups
            "rto_ms": (field_at(8, "=I") or 0) / 1000}  # tcpi_rto, µs


def _unacked(sock: socket.socket) -> int:
    """Bytes in the send queue not yet acknowledged (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("=i", buf)[0]


class _Agent:
    tcp: socket.socket
    udp: socket.socket
    udp_peer: tuple[str, int] | None = None

    def __init__(self, role: str, interval: float, drain: float, max_seconds: float) -> None:
        self.role = role
        self.interval_ns, self.drain_ns = int(interval * 1e9), int(drain * 1e9)
        self.max_ns = int(max_seconds * 1e9)
        self.rx = {"tcp": _Receiver(True), "udp": _Receiver(False)}
        self.sent = {"tcp": 0, "udp": 0}
        self.pending = self.tcp_buffer = b""  # TCP bytes not sent yet / not parsed yet
        self.resets = self.udp_errors = self.peer_changes = self.lag_ns = 0
        self.tcp_eof = False  # the peer's stream ended (FIN) or the connection failed
        self.tcp_failed = False
        self.info: dict[str, Any] = {}
        self.errors: list[str] = []
        self.sel = selectors.DefaultSelector()

    # setting up --------------------------------------------------------------------------

    def serve(self, port: int) -> None:
        with socket.create_server(("0.0.0.0", port)) as listener:
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("0.0.0.0", port))
            listener.settimeout(10)
            self.udp.settimeout(10)
            _say("listening")
            self.tcp, tcp_peer = listener.accept()
        while self.udp_peer is None:  # the client's hello, perhaps sent more than once
            data, peer = self.udp.recvfrom(64)
            if data == _HELLO:
                self.udp_peer = peer
        self.udp.sendto(_HELLO, self.udp_peer)
        _say("ready", *(f"{a}:{p}" for a, p in (tcp_peer, self.udp_peer)))

    def connect(self, host: str, port: int) -> None:
        self.tcp = socket.create_connection((host, port), timeout=10)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.connect((host, port))
        self.udp.settimeout(0.1)
        for _ in range(50):  # bounded: the hello or its answer may be lost
            self.udp.send(_HELLO)
            try:
                if self.udp.recv(64) == _HELLO:
                    break
            except TimeoutError:
                continue
        else:
            raise RuntimeError("no UDP answer from the server")
        self.udp_peer = self.udp.getpeername()
        _say("ready", *(f"{a}:{p}" for a, p in (self.tcp.getsockname(),
                                                 self.udp.getsockname())))

    # running -----------------------------------------------------------------------------

    def run(self) -> None:
        # Every write a segment of its own: the stream's gaps are the network's.
        self.tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for sock in (self.tcp, self.udp):
            sock.setblocking(False)
        sel = self.sel
        sel.register(self.tcp, selectors.EVENT_READ, self._read_tcp)
        sel.register(self.udp, selectors.EVENT_READ, self._read_udp)
        sel.register(sys.stdin, selectors.EVENT_READ, None)
        due = time.monotonic_ns()
        stop_at = due + self.max_ns
        while True:
            now = time.monotonic_ns()
            if now >= stop_at:
                self.errors.append("stopped by itself: never told to stop")
                break
            if now >= due:
                self.lag_ns = max(self.lag_ns, now - due)
                self._send(now)
                # No catching up after a stall: a burst would hide the gap it followed.
                due = max(due + self.interval_ns, now + self.interval_ns // 2)
            stop = False
            for key, _ in sel.select(max(0, due - time.monotonic_ns()) / 1e9):
                if key.data is None:
                    stop = self._command()
                else:
                    key.data(time.monotonic_ns())
            if stop:
                break
        sel.unregister(sys.stdin)
        self._drain()

    def _command(self) -> bool:
        """Read the controller's lines; True once told to stop (or the controller left)."""
        data = os.read(sys.stdin.fileno(), 256)
        if b"go" in data.split():  # measuring starts: the interpreters' warm-up is not news
            for rx in self.rx.values():
                rx.gap_ns, rx.gap_at_ns, rx.delay_ns = 0, None, 0
            self.lag_ns = 0
        return not data or b"stop" in data.split()

    def _send(self, now: int) -> None:
        message = _MSG.pack(self.sent["udp"], now)
        try:
            if self.role == "client":
                self.udp.send(message)
            else:
                self.udp.sendto(message, self.udp_peer)
            self.sent["udp"] += 1
        except OSError as exc:  # an ICMP error came back, or no route: counted, not fatal
            self.udp_errors += 1
            if self.udp_errors == 1:
                self.errors.append(f"udp send: {exc}")
        if not self.tcp_failed:
            self.pending += _MSG.pack(self.sent["tcp"], now)
            self.sent["tcp"] += 1
            self._flush()

    def _flush(self) -> None:
        try:
            while self.pending:
                self.pending = self.pending[self.tcp.send(self.pending):]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail_tcp(exc)

    def _fail_tcp(self, exc: OSError) -> None:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            self.resets += 1
        self.errors.append(f"tcp: {exc}")
        self.tcp_failed = True
        self._tcp_ended()

    def _tcp_ended(self) -> None:
        if not self.tcp_eof:
            self.tcp_eof = True
            self.sel.unregister(self.tcp)  # it would stay readable for ever

    def _read_tcp(self, now: int) -> None:
        try:
            data = self.tcp.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._fail_tcp(exc)
        if not data:
            return self._tcp_ended()
        rx = self.rx["tcp"]
        rx.arrived(now)
        self.tcp_buffer += data
        whole = len(self.tcp_buffer) - len(self.tcp_buffer) % _MSG.size
        for seq, sent_ns in _MSG.iter_unpack(self.tcp_buffer[:whole]):
            rx.message(seq, sent_ns, now)
        self.tcp_buffer = self.tcp_buffer[whole:]

    def _read_udp(self, now: int) -> None:
        rx = self.rx["udp"]
        for _ in range(256):  # bounded: whatever is queued now
            try:
                data, peer = self.udp.recvfrom(64)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port/host unreachable for an earlier send
                self.udp_errors += 1
                if self.udp_errors == 1:
                    self.errors.append(f"udp receive: {exc}")
                continue
            if len(data) != _MSG.size:
                continue  # a late hello
            if peer != self.udp_peer:
                self.peer_changes += 1
            rx.arrived(now)
            rx.message(*_MSG.unpack(data), now)

    def _drain(self) -> None:
        """Receive what is still on its way; end TCP cleanly once everything sent is
        acknowledged (closing with unread data would send a RST the probe would count)."""
        stopped = time.monotonic_ns()
        give_up = stopped + self.drain_ns + 5_000_000_000
        shut = False
        while True:
            now = time.monotonic_ns()
            if self.pending and not self.tcp_failed:
                self._flush()
            # Counted once all is acknowledged (or about to give up): the last word.
            if not shut and (self.tcp_failed or not self.pending and (
                    _unacked(self.tcp) == 0 or now >= give_up - 1_000_000_000)):
                self.info = _tcp_info(self.tcp)
                with contextlib.suppress(OSError):
                    self.tcp.shutdown(socket.SHUT_WR)
                shut = True
            if now - stopped >= self.drain_ns and (shut and self.tcp_eof or now >= give_up):
                break
            for key, _ in self.sel.select(0.01):
                key.data(time.monotonic_ns())
        if not shut:
            self.info = _tcp_info(self.tcp)
        if not self.tcp_eof:
            self.errors.append("tcp: the peer's stream did not end within the drain time")
        self.tcp.close()
        self.udp.close()

    def report(self) -> dict[str, Any]:
        errors = [*self.errors, *self.rx["tcp"].errors]
        return {"errors": errors, "lag_ns": self.lag_ns,
                "tcp": {"sent": self.sent["tcp"], "rx": self.rx["tcp"].report(),
                        "info": self.info, "resets": self.resets},
                "udp": {"sent": self.sent["udp"], "rx": self.rx["udp"].report(),
                        "errors": self.udp_errors, "peer_changes": self.peer_changes}}


def _say(*words: object) -> None:
    print(*words, flush=True)


def _agent_main(role: str, port: str, interval: str, drain: str, max_seconds: str,
                host: str = "") -> None:
    agent = _Agent(role, float(interval), float(drain), float(max_seconds))
    if role == "server":
        agent.serve(int(port))
    else:
        agent.connect(host, int(port))
    agent.run()
    _say("result", json.dumps(agent.report()))


if __name__ == "__main__":
    if sys.argv[1:2] not in (["client"], ["server"]):
        sys.exit("usage: python -m nfmig.probe_agent client|server PORT INTERVAL DRAIN "
                 "MAX_SECONDS [HOST]")
    _agent_main(*sys.argv[1:])
