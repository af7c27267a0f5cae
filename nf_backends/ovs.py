"""A private Open vSwitch for one NAT instance: its own ovsdb-server and ovs-vswitchd, run
inside the NAT's network namespace with their own run/db/log directories, one userspace
(``netdev``) bridge, and the bulk OpenFlow requests of the backend (``Channel``).

The daemons run in the namespace so that the bridge's ports are that namespace's interfaces
and the controller address 127.0.0.1 is the namespace's own loopback. Everything started here
is stopped by PID; nothing of the host's own Open vSwitch is touched.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
BRIDGE = "nfmig"
OF_VERSION = "OpenFlow15"  # bundles (atomic multi-flow changes) need OpenFlow 1.4+
START_WAIT = 20.0  # seconds for a daemon's socket to appear
CMD_TIMEOUT = 120.0


class OvsError(RuntimeError):
    """An Open vSwitch daemon or command failed; the message carries its own words.

    ``index``: the position of the flow message the switch named as the failing one, if any.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class Ovs:
    """ovsdb-server + ovs-vswitchd in ``netns`` (None: the current namespace)."""

    def __init__(self, netns: str | None, ports: dict[str, int], controller: str,
                 rundir: Path | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        """``popen`` starts the daemons (none of them daemonizes: each stays the child
        that ``popen`` made, e.g. one that dies with the thread that started it)."""
        self.netns = netns
        self._popen = popen
        self.ports = ports  # interface name -> OpenFlow port number
        self.controller = controller
        self._own_dir = rundir is None
        # Unix socket paths must stay short (108 bytes): a fresh directory under /tmp.
        self.dir = Path(tempfile.mkdtemp(prefix="nfmig-ovs-")) if rundir is None else rundir
        self.db_sock = self.dir / "db.sock"
        self.mgmt = f"unix:{self.dir / (BRIDGE + '.mgmt')}"
        self._procs: list[subprocess.Popen] = []
        self._names: dict[int, str] = {}  # pid -> daemon

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start both daemons and create the bridge; on failure stop what was started."""
        try:
            self._start_db()
            self._start_switch()
            self._create_bridge()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons this instance started (by PID) and remove its directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs, self._names = [], {}
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def ended(self) -> list[str]:
        """The daemons that have ended (each as "name (pid N) with status S")."""
        return [f"{self._names[p.pid]} (pid {p.pid}) with status {p.returncode}"
                for p in self._procs if p.poll() is not None]

    def _env(self) -> dict[str, str]:
        d = str(self.dir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d,
                "OVS_SYSCONFDIR": d, "OVS_PKGDATADIR": str(SCHEMA.parent)}

    def _in_ns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_file = open(self.dir / f"{name}.out", "w")  # noqa: SIM115 - owned by the child
        try:
            proc = self._popen(self._in_ns(argv), env=self._env(), stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        self._procs.append(proc)
        self._names[proc.pid] = name

    def _wait_for(self, path: Path, name: str) -> None:
        deadline = time.monotonic() + START_WAIT
        while not path.exists():
            proc = self._procs[-1]
            if proc.poll() is not None or time.monotonic() > deadline:
                out = (self.dir / f"{name}.out").read_text(errors="replace")[-2000:]
                raise OvsError(f"{name} did not start: {out.strip()}")
            time.sleep(0.02)

    def _start_db(self) -> None:
        db = self.dir / "conf.db"
        self.run("ovsdb-tool", "create", str(db), str(SCHEMA), in_ns=False)
        self._spawn("ovsdb-server", [
            "ovsdb-server", str(db), f"--remote=punix:{self.db_sock}",
            f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
            f"--log-file={self.dir / 'ovsdb-server.log'}", "-vconsole:off"])
        self._wait_for(self.db_sock, "ovsdb-server")
        self.vsctl("--no-wait", "init")

    def _start_switch(self) -> None:
        ctl = self.dir / "ovs-vswitchd.ctl"
        self._spawn("ovs-vswitchd", [
            "ovs-vswitchd", f"unix:{self.db_sock}", f"--unixctl={ctl}",
            f"--log-file={self.dir / 'ovs-vswitchd.log'}", "-vconsole:off"])
        self._wait_for(ctl, "ovs-vswitchd")

    def _create_bridge(self) -> None:
        """The bridge, its ports and its controller in one transaction: changing the
        controller later would wipe every flow."""
        args = ["add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=netdev",
                "fail-mode=secure", "protocols=OpenFlow13,OpenFlow14,OpenFlow15",
                "--", "set-controller", BRIDGE, self.controller,
                "--", "set", "controller", BRIDGE, "max_backoff=1000",
                "connection_mode=out-of-band"]
        for name, number in self.ports.items():
            args += ["--", "add-port", BRIDGE, name, "--", "set", "interface", name,
                     f"ofport_request={number}"]
        self.vsctl(*args)

    # -- commands ------------------------------------------------------------------------
    def run(self, *argv: str, stdin: str | None = None, in_ns: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
        cmd = self._in_ns(list(argv)) if in_ns else list(argv)
        done = subprocess.run(cmd, input=stdin, text=True, capture_output=True,
                              env=self._env(), timeout=CMD_TIMEOUT)
        if check and done.returncode:
            raise OvsError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: "
                           f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def vsctl(self, *args: str) -> str:
        return self.run("ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=20",
                        *args).stdout

    def ofctl(self, command: str, *args: str) -> str:
        return self.run("ovs-ofctl", "-O", OF_VERSION, command, self.mgmt, *args).stdout

    def bundle(self) -> Bundle:
        """An atomic bundle of flow changes, open on a connection of its own."""
        return Bundle(Channel(self.mgmt.removeprefix("unix:")))

    def flow_descs(self, requests: Sequence[tuple[int, int, int]]) -> list[bytes]:
        """The flows of each (table, cookie, cookie mask), as OpenFlow reply bodies."""
        with self.dumping(requests) as replies:
            return replies()

    @contextmanager
    def dumping(self, requests: Sequence[tuple[int, int, int]]
                ) -> Iterator[Callable[[], list[bytes]]]:
        """flow_descs() asked for now, its answer read when called for (the switch writes
        the dump in the meantime)."""
        with Channel(self.mgmt.removeprefix("unix:")) as channel:
            channel.request_dump(requests)
            yield lambda: channel.read_dump(len(requests))

    def limit_table(self, table: int, flows: int) -> None:
        """Refuse flows in ``table`` beyond ``flows`` (a full table fails a bundle)."""
        self.vsctl("--", "--id=@ft", "create", "Flow_Table", f"flow_limit={flows}",
                   "overflow_policy=refuse", "--", "set", "bridge", BRIDGE,
                   f"flow_tables:{table}=@ft")

    def controller_connected(self) -> bool:
        out = self.vsctl("--columns=is_connected", "list", "controller")
        return "true" in out


# -- OpenFlow 1.5 on the bridge's management socket ------------------------------------------
# Bulk work speaks the protocol itself: 20k flow messages are packed in Python faster than
# ovs-ofctl parses their text, and a binary dump skips the text round trip both ways.
OFP_VERSION = 6
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY = 0, 1, 2, 3
FLOW_MOD, MULTIPART_REQUEST, MULTIPART_REPLY, BARRIER_REQUEST, BARRIER_REPLY = 14, 18, 19, 20, 21
BUNDLE_CONTROL, BUNDLE_ADD = 33, 34
OPEN_REQUEST, COMMIT_REQUEST, COMMIT_REPLY, DISCARD_REQUEST = 0, 4, 5, 6
BUNDLE_FLAGS = 3  # atomic and ordered
MP_FLOW_DESC, MP_REPLY_MORE = 1, 1
ANY = 0xFFFFFFFF
_HEADER = struct.Struct("!BBHI")
_BUNDLE_ADD = struct.Struct("!BBHIIHHBBHI")  # outer header, bundle id, pad, flags, inner header
_BUNDLE_CTRL = struct.Struct("!BBHIIHH")
_FLOW_REQUEST = struct.Struct("!BBHIHH4xB3xII4xQQHH4x")  # with an empty match
_ERROR = struct.Struct("!HH")
ERRORS = {(5, 1): "flow table full", (17, 11): "a message of the bundle failed",
          (5, 0): "flow modification failed", (17, 4): "bundle does not exist"}


class Channel:
    """One OpenFlow 1.5 connection to a bridge's management socket, for one bulk request.

    The switch stops reading a connection whose replies pile up, so every send also drains
    what has arrived (errors for bundled messages come while we are still sending)."""

    def __init__(self, path: str, timeout: float = CMD_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.deadline = time.monotonic() + timeout
        self.buf = bytearray()
        self.inbox: list[tuple[int, int, int, bytes]] = []  # version, type, xid, body
        try:
            self.sock.connect(path)
            self.sock.setblocking(False)
            self._send(_HEADER.pack(OFP_VERSION, HELLO, 8, 0))
            version, kind, _xid, _body = self._next()
        except (OSError, OvsError) as exc:
            self.close()
            raise OvsError(f"cannot reach the switch at {path}: {exc}") from None
        if kind != HELLO or version != OFP_VERSION:
            self.close()
            raise OvsError(f"the switch does not speak OpenFlow 1.5 (version {version})")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------
    def _send(self, data: bytes | bytearray) -> None:
        try:
            self._send_draining(data)
        except OSError as exc:
            raise OvsError(f"the OpenFlow connection to the switch failed: {exc}") from None

    def _send_draining(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while view:
                for _key, events in sel.select(self._left()):
                    if events & selectors.EVENT_READ:
                        self._receive()
                    if events & selectors.EVENT_WRITE:
                        try:
                            view = view[self.sock.send(view):]
                        except BlockingIOError:
                            pass
                if time.monotonic() > self.deadline:
                    raise OvsError("the switch did not take the request in time")

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _receive(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            raise OvsError("the switch closed the OpenFlow connection")
        self.buf += chunk
        buf, pos = self.buf, 0
        while len(buf) - pos >= 8:
            version, kind, length, xid = _HEADER.unpack_from(buf, pos)
            if length < 8 or len(buf) - pos < length:
                break
            body = bytes(buf[pos + 8:pos + length])
            if kind == ECHO_REQUEST:
                self.sock.sendall(_HEADER.pack(version, ECHO_REPLY, length, xid) + body)
            else:
                self.inbox.append((version, kind, xid, body))
            pos += length
        del buf[:pos]

    def _next(self) -> tuple[int, int, int, bytes]:
        while not self.inbox:
            try:
                if not select_readable(self.sock, self._left()):
                    raise OvsError("the switch did not answer in time")
                self._receive()
            except OSError as exc:
                raise OvsError(f"the OpenFlow connection to the switch failed: {exc}"
                               ) from None
        return self.inbox.pop(0)

    def _until(self, xid: int, kinds: tuple[int, ...]) -> tuple[list, list]:
        """Messages up to the reply of type ``kinds`` (or an error) to ``xid``: (replies,
        errors as (xid, type, code))."""
        replies, errors = [], []
        while True:
            _version, kind, got, body = self._next()
            if kind == ERROR:
                errors.append((got, *_ERROR.unpack_from(body)))
                if got == xid:
                    return replies, errors
            elif got == xid and kind in kinds:
                replies.append(body)
                if kind != MULTIPART_REPLY or not struct.unpack_from("!H", body, 2)[0] \
                        & MP_REPLY_MORE:
                    return replies, errors

    # -- requests ------------------------------------------------------------------------
    def request_dump(self, requests: Sequence[tuple[int, int, int]]) -> None:
        """Ask for the flows in each (table, cookie, cookie mask), all at once."""
        out = bytearray()
        for xid, (table, cookie, mask) in enumerate(requests, start=1):
            out += _FLOW_REQUEST.pack(OFP_VERSION, MULTIPART_REQUEST, 56, xid, MP_FLOW_DESC,
                                      0, table, ANY, ANY, cookie, mask, 1, 4)
        self._send(out)

    def read_dump(self, count: int) -> list[bytes]:
        """The replies to request_dump() of ``count`` requests: reply bodies, each a run
        of flow descriptions."""
        bodies: list[bytes] = []
        for xid in range(1, count + 1):
            replies, errors = self._until(xid, (MULTIPART_REPLY,))
            if errors:
                raise OvsError(f"the switch refused a flow dump: {_error_text(*errors[0][1:])}")
            bodies += replies
        return bodies


class Bundle:
    """Flow-mod bodies (flows.py) sent to the switch as they are made, applied all at once
    by commit() or not at all (discard(), or leaving the block without a commit). The switch
    checks each message on arrival, so it works on a batch while the rest is being built."""

    BUNDLE_ID = 1

    def __init__(self, channel: Channel):
        self.channel = channel
        self.count = 0
        self.xid = 1
        self.done = False
        self._control(OPEN_REQUEST, wait=False)

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.done:
                self.discard()
        except OvsError:
            pass  # closing the connection discards it too
        finally:
            self.channel.close()

    def add(self, bodies: Sequence[bytes]) -> None:
        out, pack, xid = bytearray(), _BUNDLE_ADD.pack, self.count + 2
        for body in bodies:
            out += pack(OFP_VERSION, BUNDLE_ADD, 24 + len(body), xid, self.BUNDLE_ID, 0,
                        BUNDLE_FLAGS, OFP_VERSION, FLOW_MOD, 8 + len(body), xid)
            out += body
            xid += 1
        self.count = xid - 2
        self.channel._send(out)

    def check(self) -> None:
        """Raise the error of a message the switch refused (a bundle would otherwise commit
        without it)."""
        barrier = self._next_xid()
        self.channel._send(_HEADER.pack(OFP_VERSION, BARRIER_REQUEST, 8, barrier))
        _, errors = self.channel._until(barrier, (BARRIER_REPLY,))
        if errors:
            raise _bundle_error(errors, self.count)

    def commit(self) -> None:
        self.check()
        self.done = True
        self._control(COMMIT_REQUEST)

    def discard(self) -> None:
        self.done = True
        self._control(DISCARD_REQUEST)

    def _next_xid(self) -> int:
        # Message n of the bundle has xid n + 2; requests of our own come after them all.
        self.xid += 1
        return (1 << 31) + self.xid

    def _control(self, kind: int, wait: bool = True) -> None:
        xid = 1 if kind == OPEN_REQUEST else self._next_xid()
        self.channel._send(_BUNDLE_CTRL.pack(OFP_VERSION, BUNDLE_CONTROL, 16, xid,
                                             self.BUNDLE_ID, kind, BUNDLE_FLAGS))
        if wait:
            _, errors = self.channel._until(xid, (BUNDLE_CONTROL,))
            if errors:
                raise _bundle_error(errors, self.count)


def select_readable(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def _error_text(kind: int, code: int) -> str:
    return ERRORS.get((kind, code), f"OpenFlow error type {kind} code {code}")


def _bundle_error(errors: list[tuple[int, int, int]], count: int) -> OvsError:
    """The first error about one of the bundle's messages (xid 2..count+1), else the
    bundle's own."""
    for xid, kind, code in errors:
        if 2 <= xid < count + 2:
            return OvsError(_error_text(kind, code), xid - 2)
    return OvsError(_error_text(*errors[-1][1:]))
