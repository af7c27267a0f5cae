"""The SDN NAT's processes live and die with their server.

- Every child (ovsdb-server, ovs-vswitchd, the NAT app) is started by one thread of the
  backend, the :class:`Keeper`, through ``setpriv --pdeathsig``: the kernel signals a child
  when the thread that started it ends, so a server killed with SIGKILL takes its switch and
  its app along, and nothing else does. None of them daemonizes (no ``--detach``).
- What a server started for a namespace is recorded in ``/run/nfmig/openflow-<netns>.json``
  (:class:`Record`): the server's pid, each child's pid, start time and what its command line
  holds, the run directory, the namespace's sysctls as they were before, the gateway
  addresses it put on the interfaces. A server starting there reads the record of a
  predecessor that ended without stopping, kills what is left of it (only processes that
  are still those very children), removes its directory and takes over what is to be
  restored. A predecessor still running is left alone and the start refused.

:class:`Control` is the backend's connection to the app's control socket, :class:`Watch` one
turned into the stream of the app's changes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import BackendError

log = logging.getLogger(__name__)

RECORD_DIR = Path("/run/nfmig")
RUN_DIR_PREFIX = "nfmig-of-"
KILL_WAIT = 5.0
TICK = 0.2  # seconds between the keeper's looks at its children
_LIVE: set[Path] = set()  # records of the backends running in this process


def dying_with_parent(argv: list[str], death_signal: str) -> list[str]:
    """``argv`` run so that the kernel sends it ``death_signal`` when the thread that
    started it ends (prctl PR_SET_PDEATHSIG; kept across the execs of ``ip netns exec``)."""
    return ["setpriv", f"--pdeathsig={death_signal}", *argv]


class Keeper(threading.Thread):
    """The one thread that starts a backend's children and outlives them: it runs spawn
    requests and, between them, ``tick`` (the backend's look at its app, which may start
    it again from here)."""

    def __init__(self, name: str, tick: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._tick = tick
        self._done = threading.Event()

    def popen(self, argv: list[str], death_signal: str, **kwargs) -> subprocess.Popen:
        """subprocess.Popen(argv, **kwargs), started from this thread, dying with it."""
        return self.call(lambda: subprocess.Popen(dying_with_parent(argv, death_signal),
                                                  **kwargs))

    def call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self:
            return fn()
        if not self.is_alive():
            raise RuntimeError("the keeper thread is not running")
        future: Future = Future()
        self._tasks.put((fn, future))
        return future.result()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                fn, future = self._tasks.get(timeout=TICK)
            except queue.Empty:
                try:
                    self._tick()
                except Exception:  # the keeper must live on: its children die with it
                    log.exception("watching the OpenFlow NAT's processes failed")
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        while not self._tasks.empty():  # asked for while finishing: refused, not lost
            _fn, future = self._tasks.get_nowait()
            future.set_exception(RuntimeError("the keeper thread has finished"))

    def finish(self) -> None:
        """End the thread (its children, if any are left, get their death signal)."""
        self._done.set()
        if threading.current_thread() is not self and self.is_alive():
            self.join(timeout=10)


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None if it is gone or a zombie:
    with the pid, what names one process over time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def record_path(netns: str) -> Path:
    name = netns.removeprefix("/run/netns/").strip("/")
    return RECORD_DIR / f"openflow-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"


class Record:
    """What this backend has started in its namespace, on disk while it runs."""

    def __init__(self, netns: str):
        self.netns = netns
        self.path = record_path(netns)
        self.data: dict[str, Any] = {}

    def claim(self) -> dict[str, Any]:
        """Take the namespace over: clean up after a predecessor that ended without
        stopping; refuse if one still runs. Returns the predecessor's record ({} if none)."""
        previous = self._read()
        if previous:
            owner = previous.get("server") or [0, None]
            if start_time(owner[0]) == owner[1] and owner[1] is not None and (
                    owner[0] != os.getpid() or self.path in _LIVE):
                raise BackendError(
                    f"another nfmig server (pid {owner[0]}) runs the OpenFlow NAT of "
                    f"namespace {self.netns}; stop it first", None, "failed")
            self._clean_up(previous)
        _LIVE.add(self.path)
        self.data = {"server": [os.getpid(), start_time(os.getpid())], "netns": self.netns,
                     "children": [], "dir": None, "sysctls": previous.get("sysctls"),
                     "gateways": []}
        self.save()
        return previous

    def add_child(self, proc: subprocess.Popen, marker: str) -> None:
        """Record a child; ``marker``: a word its command line holds once it runs."""
        self.data["children"].append([proc.pid, start_time(proc.pid), marker])
        self.save()

    def forget_child(self, pid: int) -> None:
        self.data["children"] = [c for c in self.data["children"] if c[0] != pid]
        self.save()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        if not self.data:
            return
        try:
            RECORD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = self.path.with_suffix(".new")
            new.write_text(json.dumps(self.data))
            os.replace(new, self.path)
        except OSError as exc:
            log.warning("cannot record the OpenFlow NAT's processes in %s: %s", self.path, exc)

    def release(self) -> None:
        """The backend stopped cleanly: nothing of it is left to clean up."""
        if self.data:
            self.path.unlink(missing_ok=True)
            _LIVE.discard(self.path)
        self.data = {}

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _clean_up(self, previous: dict[str, Any]) -> None:
        killed = []
        for pid, started, marker in previous.get("children", []):
            if started is not None and start_time(pid) == started \
                    and marker in command_line(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + KILL_WAIT
        while any(start_time(pid) is not None for pid in killed) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        removed = None
        rundir = previous.get("dir")
        if rundir and Path(rundir).parent == Path(tempfile.gettempdir()) \
                and Path(rundir).name.startswith(RUN_DIR_PREFIX) and Path(rundir).is_dir():
            shutil.rmtree(rundir, ignore_errors=True)
            removed = rundir
        log.warning("namespace %s: cleaned up after an OpenFlow NAT server that did not stop "
                    "(pid %s): killed %s, removed %s", self.netns,
                    (previous.get("server") or ["?"])[0], killed or "nothing",
                    removed or "nothing")
        self.path.unlink(missing_ok=True)


class Control:
    """The app's control socket: one JSON request per line, one JSON reply per line.

    A connection that failed (the app is gone, or a reply did not come in time) is
    ``broken``: every later request on it fails at once, and the backend opens another."""

    TIMEOUT = 60.0

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.TIMEOUT)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.broken = False

    def ask(self, op: str, **args) -> dict:
        """The app's reply; BackendError if it answers with an error (except for
        "reserve", whose error says which entry collided)."""
        with self.asking(op, **args) as reply:
            answer = reply()
        if "error" in answer and op != "reserve":
            raise BackendError(f"the OpenFlow NAT application could not {op}: "
                               f"{answer['error']}", None, "failed")
        return answer

    @contextmanager
    def asking(self, op: str, **args) -> Iterator[Callable[[], dict]]:
        """Send a request now and read its reply when called for (the app works on it in
        the meantime); the connection is ours until the block ends."""
        with self.lock:
            if self.broken:
                raise BackendError("the OpenFlow NAT application is gone", None, "failed")
            try:
                self.sock.sendall((json.dumps({"op": op, **args}) + "\n").encode())
            except OSError as exc:
                raise self._failed(exc) from None
            answer: list[dict] = []

            def reply() -> dict:
                if not answer:
                    try:
                        line = self.lines.readline()
                    except OSError as exc:
                        raise self._failed(exc) from None
                    if not line:
                        raise self._failed(None)
                    answer.append(json.loads(line))
                return answer[0]

            try:
                yield reply
            finally:
                if not answer and not self.broken:
                    try:
                        reply()  # the next request must not read this one's reply
                    except BackendError:
                        pass  # broken now: the next request fails at once

    def _failed(self, exc: OSError | None) -> BackendError:
        self.broken = True
        why = "closed the connection" if exc is None else str(exc) or type(exc).__name__
        return BackendError(f"the OpenFlow NAT application is gone ({why})", None, "failed")

    def close(self) -> None:
        self.broken = True
        for closing in (self.lines.close, self.sock.close):
            try:
                closing()
            except OSError:
                pass


_TOKENS = itertools.count(1)  # of the flushes: which marker answers which


class Watch(Control):
    """The app's changes: a control connection turned by "watch" into a stream of
    events, one JSON line each, which :meth:`follow` reads until it ends. On it,
    :meth:`flush` asks the app for a marker after every change it made up to then (see
    ofnat_control) and waits, a bounded time, until the reader has got there."""

    def __init__(self, path: Path, timeout: float = Control.TIMEOUT):
        super().__init__(path)
        self.sock.settimeout(timeout)
        try:
            self.ask("watch")
        except BaseException:
            self.close()
            raise
        self.sock.settimeout(None)  # the reader waits for events as long as they take
        self._waiting: dict[int, list] = {}  # token -> [threading.Event, error or None]
        self._ended = False

    def follow(self, on_event: Callable[[dict], None], on_lost: Callable[[], None]) -> None:
        """Read the stream until it ends or is closed: each event to ``on_event`` in
        turn, each marker to the flush waiting for it (after every event before it, and
        ``on_lost()`` first if the app says changes may be missing before it)."""
        try:
            for line in self.lines:
                message = json.loads(line)
                if "flushed" not in message:
                    on_event(message)
                    continue
                if message.get("lost"):
                    on_lost()
                waiter = self._waiting.get(message["flushed"])
                if waiter is not None:
                    waiter[1] = message.get("error")
                    waiter[0].set()
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self._ended = True
                waiting = list(self._waiting.values())
            for waiter in waiting:
                waiter[1] = "its stream of changes ended"
                waiter[0].set()

    def flush(self, timeout: float) -> None:
        """Once every change the app made up to now has been passed to ``on_event``;
        BackendError if the app does not say so within ``timeout`` seconds."""
        token = next(_TOKENS)
        waiter: list = [threading.Event(), None]
        deadline = time.monotonic() + timeout
        with self.lock:
            if self._ended or self.broken:
                raise BackendError("the OpenFlow NAT application's stream of changes has "
                                   "ended", None, "failed")
            self._waiting[token] = waiter
        try:
            self._send(json.dumps({"op": "flush", "token": token}).encode() + b"\n",
                       deadline)
            if not waiter[0].wait(max(0.0, deadline - time.monotonic())):
                raise BackendError(f"the OpenFlow NAT application did not flush its changes "
                                   f"within {timeout:g} s", None, "failed")
        finally:
            self._waiting.pop(token, None)
        if waiter[1] is not None:
            raise BackendError(f"the OpenFlow NAT application could not flush its changes: "
                               f"{waiter[1]}", None, "failed")

    def _send(self, data: bytes, deadline: float) -> None:
        """All of ``data`` before the deadline (the socket itself waits without end)."""
        view = memoryview(data)
        with self.lock:
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.sock], [], left)[1]:
                    raise BackendError("the OpenFlow NAT application takes no request",
                                       None, "failed")
                try:
                    view = view[self.sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise self._failed(exc) from None
