"""The SDN NAT: a private Open vSwitch in the NAT's network namespace plus the OpenFlow NAT
application (ofnat_app, os-ken) in a process of its own; sessions are flow pairs (flows.py).

The NAT's namespace keeps its inside and outside interfaces for the switch: the kernel there
is silenced (no forwarding, no ARP answers, nothing in or out but loopback), so the addresses
a test bed or operator puts on those interfaces only say which gateway addresses this NAT
owns now, and the application answers ARP for them.

Bulk work goes straight to the switch in OpenFlow 1.5 (one atomic bundle per batch, dumps,
deletes by cookie); the app is told first, over its control socket, which translated ports
imported sessions use, so it never allocates one of them, and after the bundle whether the
switch took it (deleted sessions free their ports) or refused it (every reservation the batch
touched is put back as it was).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import flows
from .base import (
    Backend,
    BackendError,
    BackendStats,
    NatPolicy,
    Session,
    SessionChanges,
    SessionKey,
    Transaction,
)
from .ovs import Bundle, Ovs, OvsError

log = logging.getLogger(__name__)

PORTS = flows.Ports(inside=1, outside=2)
SILENCE_TABLE = "nfmig_ovs"
# The kernel of the namespace must not answer for the NAT: the switch owns these interfaces.
SILENCE = f"""table inet {SILENCE_TABLE}
delete table inet {SILENCE_TABLE}
table inet {SILENCE_TABLE} {{
  chain pre {{ type filter hook prerouting priority raw - 10; policy drop; iifname "lo" accept; }}
  chain out {{ type filter hook output priority raw - 10; policy drop; oifname "lo" accept; }}
}}
"""
SYSCTLS = {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.arp_ignore": "8"}
APP_WAIT = 30.0
DIRECT_LOOKUPS = 16
SEND_CHUNK = 2000  # sessions per send: the switch reads one while the next is packed


class Control:
    """The app's control socket: one JSON request per line, one JSON reply per line."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("rb")
        self.lock = threading.Lock()

    def ask(self, op: str, **args) -> dict:
        with self.asking(op, **args) as reply:
            return reply()

    @contextmanager
    def asking(self, op: str, **args) -> Iterator[Callable[[], dict]]:
        """Send a request now and read its reply when called for (the app works on it in
        the meantime); the connection is ours until the block ends."""
        with self.lock:
            self.sock.sendall((json.dumps({"op": op, **args}) + "\n").encode())
            answer: list[dict] = []

            def reply() -> dict:
                if not answer:
                    line = self.lines.readline()
                    if not line:
                        raise BackendError("the OpenFlow NAT application is gone", None,
                                           "failed")
                    answer.append(json.loads(line))
                return answer[0]

            try:
                yield reply
            finally:
                if not answer:
                    reply()  # the next request must not read this one's reply

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


class OpenflowBackend(Backend):
    name = "openflow"

    def __init__(self, netns: str, inside: str = "inside", outside: str = "outside"):
        self.netns = netns
        self.netns_path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        self.ifnames = (inside, outside)
        self._dir: Path | None = None
        self._ovs: Ovs | None = None
        self._app: subprocess.Popen | None = None
        self._ctl: Control | None = None
        self._watch: Control | None = None
        self._sysctls: dict[str, str] = {}
        self._policy = NatPolicy()
        # What flows cannot hold, for sessions given to us: session id -> (tcp_state,
        # window scales, base counters), see flows.read_sessions.
        self._extras: dict[int, tuple] = {}
        self._imported = 0
        self._lock = threading.Lock()

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        if not Path(self.netns_path).exists():
            raise BackendError(f"network namespace {self.netns} does not exist", None, "failed")
        try:
            self._silence_kernel()
            self._dir = Path(tempfile.mkdtemp(prefix="nfmig-of-"))
            of_port = random.randrange(20000, 60000)
            self._start_app(of_port)
            self._ovs = Ovs(self.netns, dict(zip(self.ifnames, PORTS, strict=True)),
                            f"tcp:127.0.0.1:{of_port}", rundir=self._dir / "ovs")
            self._ovs.dir.mkdir()
            self._ovs.start()
            if not self.ctl.ask("ready", timeout=APP_WAIT).get("ok"):
                raise BackendError("the switch did not connect to the NAT application",
                                   None, "failed")
            self._adopt_existing()
        except OvsError as exc:
            self.stop()
            raise BackendError(str(exc), None, "failed") from None
        except BaseException:
            self.stop()
            raise
        log.info("OpenFlow NAT in network namespace %s (switch in %s)", self.netns,
                 self._dir)

    def stop(self) -> None:
        self.watch(None)
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._app is not None:
            if self._app.poll() is None:
                os.killpg(self._app.pid, signal.SIGTERM)
                try:
                    self._app.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(self._app.pid, signal.SIGKILL)
                    self._app.wait(timeout=5)
            self._app = None
        if self._ovs is not None:
            self._ovs.stop()
            self._ovs = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._restore_kernel()

    def _ns(self, *cmd: str, stdin: str | None = None) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.netns, *cmd], input=stdin,
                              capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise BackendError(f"{cmd[0]} in namespace {self.netns} failed: "
                               f"{done.stderr.strip()}", None, "failed")
        return done.stdout

    def _silence_kernel(self) -> None:
        for key in SYSCTLS:
            self._sysctls[key] = self._ns("sysctl", "-n", key).strip()
        self._ns("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in SYSCTLS.items()))
        self._ns("nft", "-f", "-", stdin=SILENCE)
        for dev in self.ifnames:
            # Checksums must be complete in every frame the switch rewrites.
            self._ns("ethtool", "-K", dev, "tx", "off", "rx", "off")

    def _restore_kernel(self) -> None:
        if not self._sysctls or not Path(self.netns_path).exists():
            return
        try:
            self._ns("nft", "delete", "table", "inet", SILENCE_TABLE)
            self._ns("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in self._sysctls.items()))
        except BackendError as exc:
            log.warning("could not restore namespace %s: %s", self.netns, exc)
        self._sysctls = {}

    def _start_app(self, of_port: int) -> None:
        assert self._dir is not None
        control = self._dir / "app.sock"
        config = {"socket": str(control), "of_port": of_port, "inside": self.ifnames[0],
                  "outside": self.ifnames[1], "inside_port": PORTS.inside,
                  "outside_port": PORTS.outside}
        env = {**os.environ, "NFMIG_OFNAT": json.dumps(config)}
        with open(self._dir / "app.log", "w") as out:
            self._app = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m",
                 "nfmig.nf_backends.ofnat_app"], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + APP_WAIT
        while not control.exists():
            if self._app.poll() is not None or time.monotonic() > deadline:
                tail = (self._dir / "app.log").read_text(errors="replace")[-2000:]
                raise BackendError(f"the OpenFlow NAT application did not start: {tail}",
                                   None, "failed")
            time.sleep(0.05)
        self._ctl = Control(control)

    def _adopt_existing(self) -> None:
        """Sessions already in the switch keep their ports (an attached, not fresh, switch)."""
        existing = list(self.sessions())
        if existing:
            reply = self.ctl.ask("reserve", sessions=[_reservation(s) for s in existing])
            if "error" in reply:
                raise BackendError("the switch holds sessions with one translated endpoint",
                                   None, "failed")
            self.ctl.ask("settle", batch=reply["batch"], ok=True)

    @property
    def ctl(self) -> Control:
        if self._ctl is None:
            raise RuntimeError("the openflow backend is not started")
        return self._ctl

    @property
    def ovs(self) -> Ovs:
        if self._ovs is None:
            raise RuntimeError("the openflow backend is not started")
        return self._ovs

    # -- events and holds ----------------------------------------------------------------
    def watch(self, listener) -> None:
        self._listener = listener
        if listener is not None and self._watch is None and self._dir is not None:
            self._watch = Control(self._dir / "app.sock")
            self._watch.sock.settimeout(None)
            self._watch.ask("watch")
            threading.Thread(target=self._follow, args=(self._watch,), daemon=True,
                             name=f"ofnat-events-{self.netns}").start()
        elif listener is None and self._watch is not None:
            watch, self._watch = self._watch, None
            try:
                watch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            watch.close()

    def _follow(self, watch: Control) -> None:
        try:
            for line in watch.lines:
                event = json.loads(line)
                p, src, sport, dst, dport, ext, port = event["session"]
                self._report([(event["event"], Session(p, src, sport, dst, dport, ext, port))])
        except (OSError, ValueError):
            pass  # closed by watch(None)

    def hold_new_sessions(self, prefixes: list[str]) -> None:
        self.ctl.ask("hold", prefixes=prefixes)

    # -- policy --------------------------------------------------------------------------
    def apply_policy(self, policy: NatPolicy) -> None:
        for address in [*policy.external_address,
                        *(m.external_address for m in policy.address_mapping)]:
            if ipaddress.ip_address(address).version != 4:
                raise BackendError("the OpenFlow NAT translates IPv4 only", None,
                                   "not supported")
        t = policy.timeouts
        self.ctl.ask("policy", prefixes=policy.inside_prefix,
                     externals=policy.external_address,
                     mappings=[[m.inside_prefix, m.external_address]
                               for m in policy.mappings_most_specific_first()],
                     port_min=policy.port_min, port_max=policy.port_max,
                     tcp=min(flows.MAX_IDLE, t.tcp_established), udp=min(flows.MAX_IDLE, t.udp),
                     icmp=min(flows.MAX_IDLE, t.icmp))
        self._policy = policy

    # -- reads ---------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        bodies = self.ovs.flow_descs([flows.all_sessions_request()])
        return iter(flows.read_sessions(bodies, self._all_extras()))

    def _all_extras(self) -> dict[int, tuple]:
        return self._extras_with(self.ctl.ask("scales"))

    def _extras_with(self, reply: dict) -> dict[int, tuple]:
        """What flows cannot hold (see flows.read_sessions): the app's window scales of
        sessions it made, overridden by what sessions given to us came with."""
        extras = {int(sid): (None, o, r, 0, 0, 0, 0) for sid, (o, r) in reply["scales"].items()}
        extras.update(self._extras)
        return extras

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        return self._lookup(keys, {})

    def transaction(self) -> Transaction:
        return _FlowTransaction(self)

    def _lookup(self, keys: Iterable[SessionKey], ids: dict[SessionKey, int]
                ) -> dict[SessionKey, Session]:
        """The sessions among ``keys`` that exist now; their session ids go into ``ids``."""
        keys = set(keys)
        if not keys:
            return {}
        if len(keys) <= DIRECT_LOOKUPS:
            ids.update((k, flows.session_id(k)) for k in keys)
            requests = [flows.session_request(ids[k]) for k in keys]
        else:  # one dump of every session costs less than many small ones
            requests = [flows.all_sessions_request()]
        with self.ovs.dumping(requests) as dump, self.ctl.asking("scales") as scales:
            # Hashed while the switch writes the dump and the app its answer.
            ids.update((k, flows.session_id(k)) for k in keys if k not in ids)
            wanted = {ids[k]: k for k in keys}
            bodies, extras = dump(), self._extras_with(scales())
        found = flows.read_sessions(bodies, extras, wanted)
        return {s.key: s for s in found if s.key in keys}

    def stats(self) -> BackendStats:
        out = self.ovs.ofctl("dump-aggregate", f"table=0,{flows.COOKIE_MATCH}")
        count = int(out.split("flow_count=")[1].split()[0]) if "flow_count=" in out else 0
        app = self.ctl.ask("stats")
        return BackendStats("openflow", (count + 1) // 2, app["created"], app["expired"],
                            self._imported)

    # -- writes --------------------------------------------------------------------------
    def apply(self, changes: SessionChanges, ids: dict[SessionKey, int] | None = None
              ) -> None:
        """``ids``: session ids of some of the keys, if known (key -> id)."""
        ids = ids or {}
        upserts = {s.key: s for s in changes.upserts}
        for s in upserts.values():
            _check(s)
        sid = flows.session_id
        given = [(ids.get(k) or sid(k), s) for k, s in upserts.items()]
        deleted = [ids.get(k) or sid(k) for k in changes.deletes if k not in upserts]
        if not given and not deleted:
            return
        with self._lock:
            try:
                with self.ovs.bundle() as bundle:
                    reply = self._reserve_while_sending(bundle, given, deleted)
                    if "error" in reply:
                        raise self._taken(reply, changes)
                    try:
                        bundle.commit()
                    except OvsError as exc:
                        self.ctl.ask("settle", batch=reply["batch"], ok=False)
                        raise self._refused(exc, len(deleted), given) from None
            except OvsError as exc:  # the connection failed; any reservation is undone
                raise BackendError(f"the switch could not take the batch, nothing applied: "
                                   f"{exc}", None, "failed") from None
            self.ctl.ask("settle", batch=reply["batch"], ok=True)
            for i in deleted:
                self._extras.pop(i, None)
            for i, s in given:
                self._extras[i] = (
                    s.tcp_state, s.src_window_scale, s.dst_window_scale, s.orig_packets or 0,
                    s.orig_bytes or 0, s.reply_packets or 0, s.reply_bytes or 0)
            self._imported += len(reply["new"])
        if self._listener is not None:
            self._report([("deleted", Session(*k)) for k in changes.deletes
                          if k not in upserts] + [("created", s) for s in upserts.values()])

    def _reserve_while_sending(self, bundle: Bundle, given: list[tuple[int, Session]],
                               deleted: list[int]) -> dict:
        """The app's reservation of the batch's ports, asked for while the switch takes
        the batch's flows (which go in only at the commit, after the reply)."""
        failure = None
        with self.ctl.asking("reserve", sessions=[_reservation(s, i) for i, s in given],
                             drop=deleted) as reserved:
            try:
                bundle.add(flows.delete_messages(deleted))
                idle, limit = self._idle, flows.MAX_IDLE
                for at in range(0, len(given), SEND_CHUNK):
                    bundle.add(flows.add_messages(
                        ((i, s, min(limit, max(1, idle(s)))) for i, s in
                         given[at:at + SEND_CHUNK]), PORTS))
            except OvsError as exc:
                failure = exc
            reply = reserved()
        if failure is not None:
            if "error" not in reply:
                self.ctl.ask("settle", batch=reply["batch"], ok=False)
            raise failure
        return reply

    @staticmethod
    def _taken(reply: dict, changes: SessionChanges) -> BackendError:
        key = changes.upserts[reply["index"]].key if "index" in reply else None
        return BackendError(f"translated endpoint already used by another session: {key}",
                            key, "port taken")

    @staticmethod
    def _refused(exc: OvsError, deletes: int, given: list[tuple[int, Session]]
                 ) -> BackendError:
        """The batch's error, naming the session whose flow the switch refused, if any
        (the bundle holds two deletes per deleted session, then two adds per session)."""
        key = None
        if exc.index is not None and exc.index >= 2 * deletes:
            key = given[(exc.index - 2 * deletes) // 2][1].key
        return BackendError(f"the switch refused the batch, nothing applied: {exc}", key,
                            "failed")

    def _idle(self, s: Session) -> int:
        return s.timeout if s.timeout else self._policy.timeout_for(s.protocol, s.tcp_state)


class _FlowTransaction(Transaction):
    """Keeps the session ids lookup() hashed, for apply() to use again."""

    backend: OpenflowBackend

    def __init__(self, backend: OpenflowBackend) -> None:
        super().__init__(backend)
        self._ids: dict[SessionKey, int] = {}

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        return self.backend._lookup(keys, self._ids)

    def apply(self, changes: SessionChanges) -> None:
        ids, self._ids = self._ids, {}
        self.backend.apply(changes, ids)


def _check(s: Session) -> None:
    if s.protocol not in flows.L4 and s.protocol != "ICMP":
        raise BackendError(f"the OpenFlow NAT translates TCP, UDP and ICMP echo only, not "
                           f"{s.protocol}", s.key, "not supported")
    if s.translated_address is None or s.translated_port is None:
        raise BackendError("a session needs translated_address and translated_port here",
                           s.key, "incomplete")
    if s.protocol == "ICMP" and (s.translated_port != s.src_port or s.dst_port != 0):
        raise BackendError("the OpenFlow NAT cannot rewrite an ICMP echo identifier: "
                           "translated_port must equal src_port (and dst_port be 0)", s.key,
                           "not supported")
    if s.translated_dst_address is not None or s.translated_dst_port is not None:
        raise BackendError("the OpenFlow NAT does no destination NAT", s.key, "not supported")
    for address in (s.src_address, s.dst_address, s.translated_address):
        if ":" in address:
            raise BackendError("the OpenFlow NAT translates IPv4 only", s.key,
                               "not supported")


def _reservation(s: Session, sid: int | None = None) -> list:
    """A session as the app's reserve takes it (with its id, when known, to save a hash)."""
    entry = [*s.key, s.translated_address, s.translated_port]
    return entry if sid is None else [*entry, sid]
