"""The SDN NAT: a private Open vSwitch in the NAT's network namespace plus the OpenFlow NAT
application (ofnat_app, os-ken) in a process of its own; sessions are flow pairs (flows.py).

The NAT's namespace keeps its inside and outside interfaces for the switch: the kernel there
is silenced (no forwarding, no ARP answers, nothing in or out but loopback), so the addresses
a test bed or operator puts on those interfaces only say which gateway addresses this NAT
owns now, and the application answers ARP for them.

Bulk work goes straight to the switch (ovs-ofctl bundles, dumps, deletes by cookie); the app
is told first, over its control socket, which translated ports imported sessions use, so it
never allocates one of them.
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
from collections.abc import Iterable, Iterator
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
)
from .ovs import Ovs, OvsError

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


class Control:
    """The app's control socket: one JSON request per line, one JSON reply per line."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("rb")
        self.lock = threading.Lock()

    def ask(self, op: str, **args) -> dict:
        with self.lock:
            self.sock.sendall((json.dumps({"op": op, **args}) + "\n").encode())
            line = self.lines.readline()
        if not line:
            raise BackendError("the OpenFlow NAT application is gone", None, "failed")
        return json.loads(line)

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
        # window scales, base counters), see flows.sessions_from_records.
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
            self.ctl.ask("reserve", sessions=[_reservation(s) for s in existing])

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
                     tcp=min(flows.MAX_IDLE, t.tcp_established), udp=min(flows.MAX_IDLE, t.udp))
        self._policy = policy

    # -- reads ---------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        text = self.ovs.dump_flows(f"table=0,{flows.COOKIE_MATCH}")
        return flows.sessions_from_records(flows.parse_dump(text), self._all_extras())

    def _all_extras(self) -> dict[int, tuple]:
        scales = self.ctl.ask("scales")["scales"]
        extras = {int(sid): (None, o, r, 0, 0, 0, 0) for sid, (o, r) in scales.items()}
        extras.update(self._extras)
        return extras

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        keys = set(keys)
        if not keys:
            return {}
        if len(keys) <= DIRECT_LOOKUPS:
            text = "".join(self.ovs.dump_flows(
                f"table=0,{flows.session_match(flows.session_id(k))}") for k in keys)
            records = flows.parse_dump(text)
        else:
            wanted = {flows.session_id(k) for k in keys}
            records = (r for r in flows.parse_dump(
                self.ovs.dump_flows(f"table=0,{flows.COOKIE_MATCH}")) if r.sid in wanted)
        found = flows.sessions_from_records(records, self._all_extras())
        return {s.key: s for s in found if s.key in keys}

    def stats(self) -> BackendStats:
        out = self.ovs.ofctl("dump-aggregate", f"table=0,{flows.COOKIE_MATCH}")
        count = int(out.split("flow_count=")[1].split()[0]) if "flow_count=" in out else 0
        app = self.ctl.ask("stats")
        return BackendStats("openflow", (count + 1) // 2, app["created"], app["expired"],
                            self._imported)

    # -- writes --------------------------------------------------------------------------
    def apply(self, changes: SessionChanges) -> None:
        upserts = {s.key: s for s in changes.upserts}
        for s in upserts.values():
            _check(s)
        deleted = [flows.session_id(k) for k in changes.deletes if k not in upserts]
        commands = flows.delete_commands(deleted) + flows.add_commands(
            upserts.values(), self._idle, PORTS)
        with self._lock:
            reply = self.ctl.ask("reserve", sessions=[_reservation(s)
                                                      for s in upserts.values()])
            if "error" in reply:
                key = changes.upserts[reply["index"]].key if "index" in reply else None
                raise BackendError(f"translated endpoint already used by another session: "
                                   f"{key}", key, "port taken")
            try:
                self.ovs.bundle(commands)
            except OvsError as exc:
                self.ctl.ask("release", sids=reply["new"])
                raise BackendError(f"the switch refused the batch, nothing applied: {exc}",
                                   None, "failed") from None
            self.ctl.ask("release", sids=deleted)
            for sid in deleted:
                self._extras.pop(sid, None)
            for s in upserts.values():
                self._extras[flows.session_id(s.key)] = (
                    s.tcp_state, s.src_window_scale, s.dst_window_scale, s.orig_packets or 0,
                    s.orig_bytes or 0, s.reply_packets or 0, s.reply_bytes or 0)
            self._imported += len(reply["new"])
        self._report([("deleted", Session(*k)) for k in changes.deletes if k not in upserts]
                     + [("created", s) for s in upserts.values()])

    def _idle(self, s: Session) -> int:
        return s.timeout if s.timeout else self._policy.timeout_for(s.protocol, s.tcp_state)


def _check(s: Session) -> None:
    if s.protocol not in flows.L4:
        raise BackendError(f"the OpenFlow NAT translates TCP and UDP only, not {s.protocol}",
                           s.key, "not supported")
    if s.translated_address is None or s.translated_port is None:
        raise BackendError("a session needs translated_address and translated_port here",
                           s.key, "incomplete")
    if s.translated_dst_address is not None or s.translated_dst_port is not None:
        raise BackendError("the OpenFlow NAT does no destination NAT", s.key, "not supported")
    for address in (s.src_address, s.dst_address, s.translated_address):
        if ":" in address:
            raise BackendError("the OpenFlow NAT translates IPv4 only", s.key,
                               "not supported")


def _reservation(s: Session) -> list:
    return [*s.key, s.translated_address, s.translated_port]
