"""The SDN NAT's processes and namespace, for the openflow backend (a mixin of it): start
and stop of its private Open vSwitch and OpenFlow NAT app, the kernel of the namespace
silenced meanwhile, the policy's gateway addresses on its interfaces, and an app that ended
on its own started again (from the keeper thread, see ofnat_procs.py) with what it needs:
the policy, holds and gateway addresses, and the sessions, read back from the switch, whose
flows outlive it. If it keeps ending (MAX_RESTARTS within RESTART_WINDOW), the backend
stops everything and calls ``on_fatal``: by default the server exits with status 1.
"""

from __future__ import annotations

import atexit
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
from collections.abc import Callable
from pathlib import Path

from . import flows
from .base import CHANGES_LOST, BackendError, GatewayAddress, NatPolicy, Session
from .ofnat_procs import RUN_DIR_PREFIX, Control, Keeper, Record, Watch
from .ovs import Ovs, OvsError

log = logging.getLogger("nfmig.nf_backends.openflow")

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
APP_MODULE = "nfmig.nf_backends.ofnat_app"
APP_WAIT = 30.0
MAX_RESTARTS, RESTART_WINDOW = 5, 120.0  # app restarts within that many seconds


def exit_server() -> None:
    logging.shutdown()
    os._exit(1)


class NatProcesses:
    """The processes and the namespace of an OpenflowBackend (which sets these up)."""

    app_module = APP_MODULE  # the app's module: the NAT's, or one built on it

    netns: str
    netns_path: str
    ifnames: tuple[str, str]
    _on_fatal: Callable[[], None]
    _dir: Path | None
    _ovs: Ovs | None
    _app: subprocess.Popen | None
    _ctl: Control | None
    _watch: Watch | None
    _following: threading.Lock  # _watch: which stream is followed
    _keeper: Keeper | None
    _record: Record | None
    _of_port: int
    _sysctls: dict[str, str]
    _policy: NatPolicy
    _held: list[str]
    _gateways: list[GatewayAddress]
    _app_scales: dict
    _app_counts: dict[str, int]
    _restarts: list[float]
    _extras: dict[int, tuple]
    _lock: threading.Lock
    _life: threading.RLock
    _app_up: threading.Event
    _running: threading.Event  # from a successful start() to stop(): the app is looked after
    _listener: Callable | None

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        if not Path(self.netns_path).exists():
            raise BackendError(f"network namespace {self.netns} does not exist", None, "failed")
        try:
            self._record = Record(self.netns)
            self._recover(self._record.claim())
            self._keeper = Keeper(f"ofnat-{self.netns}", self._look_after_app)
            self._keeper.start()
            self._silence_kernel()
            self._dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            self._record.update(dir=str(self._dir))
            self._of_port = random.randrange(20000, 60000)
            self._start_app()
            self._ovs = Ovs(self.netns, dict(zip(self.ifnames, PORTS, strict=True)),
                            f"tcp:127.0.0.1:{self._of_port}", rundir=self._dir / "ovs",
                            popen=self._spawn_daemon)
            self._ovs.dir.mkdir()
            self._ovs.start()
            self._app_online()
        except OvsError as exc:
            self.stop()
            raise BackendError(str(exc), None, "failed") from None
        except BaseException:
            self.stop()
            raise
        self._running.set()
        atexit.register(self.stop)
        log.info("OpenFlow NAT in network namespace %s (switch in %s)", self.netns,
                 self._dir)

    def stop(self) -> None:
        """Stop exactly what start() started; every step is tried, whatever failed before."""
        self._running.clear()
        atexit.unregister(self.stop)
        with self._life:
            self._app_up.clear()
            self._quietly("stop following the app", self.watch, None)
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            if self._app is not None:
                self._quietly("stop the NAT application", self._end_app, self._app)
                self._app = None
            if self._ovs is not None:
                self._quietly("stop the switch", self._ovs.stop)
                self._ovs = None
        if self._keeper is not None:
            self._keeper.finish()
            self._keeper = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._quietly("remove the gateway addresses", self._put_gateways, self._gateways, [])
        self._gateways = []
        self._restore_kernel()
        if self._record is not None:
            self._record.release()
            self._record = None

    @staticmethod
    def _quietly(what: str, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.warning("could not %s: %s", what, exc)

    def _recover(self, previous: dict) -> None:
        """Take over what a predecessor killed without stopping left in the namespace: the
        sysctls from before it, the gateway addresses it put on the interfaces."""
        if previous.get("sysctls"):
            self._sysctls = dict(previous["sysctls"])
        for address, ifname in previous.get("gateways", []):
            self._ns("ip", "addr", "del", address, "dev", ifname, check=False)

    def _ns(self, *cmd: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.netns, *cmd], input=stdin,
                              capture_output=True, text=True, timeout=30)
        if done.returncode and check:
            raise BackendError(f"{cmd[0]} in namespace {self.netns} failed: "
                               f"{done.stderr.strip()}", None, "failed")
        return done.stdout

    def _silence_kernel(self) -> None:
        if not self._sysctls:  # else: those from before a predecessor silenced it
            for key in SYSCTLS:
                self._sysctls[key] = self._ns("sysctl", "-n", key).strip()
        assert self._record is not None
        self._record.update(sysctls=self._sysctls)
        self._ns("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in SYSCTLS.items()))
        self._ns("nft", "-f", "-", stdin=SILENCE)
        for dev in self.ifnames:
            # Checksums must be complete in every frame the switch rewrites.
            self._ns("ethtool", "-K", dev, "tx", "off", "rx", "off")

    def _restore_kernel(self) -> None:
        if not self._sysctls or not Path(self.netns_path).exists():
            return
        try:
            self._ns("nft", "delete", "table", "inet", SILENCE_TABLE, check=False)
            self._ns("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in self._sysctls.items()))
        except BackendError as exc:
            log.warning("could not restore namespace %s: %s", self.netns, exc)
        self._sysctls = {}

    def _spawn_daemon(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """An Open vSwitch daemon, started by the keeper: it dies with the server, and only
        then or by stop() (a signal to the server's process group, such as a Ctrl-C, is
        the server's to handle: a switch gone first would look like a crash)."""
        assert self._keeper is not None and self._record is not None
        proc = self._keeper.popen(argv, "TERM", start_new_session=True, **kwargs)
        self._record.add_child(proc, str(self._dir))
        return proc

    # -- the NAT application -------------------------------------------------------------
    def _start_app(self) -> None:
        """Start the app (again) with everything it needs to know, and connect to it."""
        assert self._dir is not None and self._keeper is not None and self._record is not None
        control = self._dir / "app.sock"
        for stale in (control, self._dir / "app.sock.new"):  # left by an app that died
            stale.unlink(missing_ok=True)
        config = {"socket": str(control), "of_port": self._of_port,
                  "inside": self.ifnames[0], "outside": self.ifnames[1],
                  "inside_port": PORTS.inside, "outside_port": PORTS.outside,
                  "policy": policy_request(self._policy), "held": self._held,
                  "gateways": self._gateway_sides(self._gateways),
                  "scales": self._app_scales, **self._app_counts, "accepting": False,
                  **self._app_config()}
        (self._dir / "app.json").write_text(json.dumps(config))  # too big for environ
        env = {**os.environ, "NFMIG_OFNAT": json.dumps({"file": str(self._dir / "app.json")})}
        with open(self._dir / "app.log", "a") as out:
            self._app = app = self._keeper.popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", self.app_module],
                "KILL",
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._record.add_child(app, self.app_module)
        deadline = time.monotonic() + APP_WAIT
        while not control.exists():
            if app.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"the OpenFlow NAT application did not start: "
                                   f"{self._app_log()}", None, "failed")
            time.sleep(0.05)
        self._ctl = Control(control)

    def _app_config(self) -> dict:
        """What else an app of app_module starts with (in its configuration)."""
        return {}

    def _app_online(self) -> None:
        """Once the switch is connected: the sessions it holds are the app's to know
        (their ports are taken), then the app may make sessions of its own."""
        assert self._ctl is not None
        if not self._ctl.ask("ready", timeout=APP_WAIT).get("ok"):
            raise BackendError("the switch did not connect to the NAT application",
                               None, "failed")
        with self._lock:  # no batch between the dump and the reservation
            existing = flows.read_sessions(
                self.ovs.flow_descs([flows.all_sessions_request()]), self._extras)
            if existing:
                reply = self._ctl.ask("reserve", sessions=[reservation(s) for s in existing])
                if "error" in reply:
                    raise BackendError("the switch holds sessions with one translated "
                                       "endpoint", None, "failed")
                self._ctl.ask("settle", batch=reply["batch"], ok=True)
            self._ctl.ask("resume")
        self._app_up.set()
        if self._listener is not None:
            self._follow_app()

    def _end_app(self, app: subprocess.Popen) -> None:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGTERM)
            try:
                app.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(app.pid, signal.SIGKILL)
                app.wait(timeout=5)
        if self._record is not None:
            self._record.forget_child(app.pid)

    def _app_log(self) -> str:
        try:
            return (self._dir / "app.log").read_text(errors="replace")[-2000:].strip()
        except (OSError, TypeError):
            return ""

    def _look_after_app(self) -> None:
        """The keeper's look at the app (every few tenths of a second): one that ended
        on its own is started again from this thread, so that it dies with the server. A
        switch daemon that ended took every session with it: the server gives up."""
        ovs = self._ovs
        ended = ovs.ended() if ovs is not None and self._running.is_set() else []
        if ended:
            with self._life:
                if self._running.is_set():
                    log.critical("the Open vSwitch of namespace %s is gone (%s ended), and "
                                 "every session with it; stopping the server", self.netns,
                                 ", ".join(ended))
                    self.stop()
                    self._on_fatal()
            return
        app = self._app
        if app is None or not self._running.is_set() or app.poll() is None:
            return
        with self._life:
            if not self._running.is_set() or self._app is not app:
                return
            self._app_up.clear()
            self._unfollow_app()
            # What it had not reported, and the expiries until it is back, are lost.
            self._report([CHANGES_LOST])  # type: ignore[list-item]
            if self._record is not None:
                self._record.forget_child(app.pid)
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            last_words = self._app_log()[-600:]
            if len(self._restarts) > MAX_RESTARTS:
                log.critical("the OpenFlow NAT application of namespace %s ended %d times "
                             "within %d s (now with status %s); stopping the server. Its "
                             "log ends: %s", self.netns, len(self._restarts),
                             RESTART_WINDOW, app.returncode, last_words)
                self.stop()
                self._on_fatal()
                return
            log.error("the OpenFlow NAT application of namespace %s (pid %d) ended with "
                      "status %s; starting it again. Its log ends: %s", self.netns,
                      app.pid, app.returncode, last_words)
            if self._ctl is not None:
                self._ctl.close()
            try:
                self._start_app()
                self._app_online()
            except Exception as exc:
                log.error("the OpenFlow NAT application of namespace %s did not come back: "
                          "%s", self.netns, exc)
                if self._app is not None and self._app.poll() is None:
                    self._end_app(self._app)  # the next look tries again
                return
        log.warning("the OpenFlow NAT application of namespace %s runs again (pid %d), with "
                    "the switch's sessions", self.netns, self._app.pid)

    @property
    def ctl(self) -> Control:
        """The app's control connection, once the app is up (waiting while it restarts)."""
        if self._keeper is None:
            raise RuntimeError("the openflow backend is not started")
        if not self._app_up.wait(APP_WAIT) or self._ctl is None:
            raise BackendError("the OpenFlow NAT application is not running", None, "failed")
        ctl = self._ctl
        if ctl.broken and self._app is not None and self._app.poll() is None:
            with self._life:  # the app lives, the connection failed: another one
                if self._ctl is ctl:
                    self._ctl = Control(ctl.path)
                ctl = self._ctl
        return ctl

    @property
    def ovs(self) -> Ovs:
        if self._ovs is None:
            raise RuntimeError("the openflow backend is not started")
        return self._ovs

    # -- events and holds ----------------------------------------------------------------
    def watch(self, listener) -> None:
        """Follow the app's stream of changes while someone listens (the app writes none
        while nobody does). Edits are reported by the backend as it applies them."""
        self._listener = listener
        if listener is None:
            self._unfollow_app()
        elif self._app_up.is_set():
            try:
                self._follow_app()
            except (OSError, BackendError) as exc:  # followed again once the app is back
                log.warning("cannot follow the OpenFlow NAT application's events: %s", exc)
                self._report([CHANGES_LOST])  # type: ignore[list-item]
        else:  # being started again: what ends meanwhile goes unreported
            self._report([CHANGES_LOST])  # type: ignore[list-item]

    def _follow_app(self, timeout: float = Control.TIMEOUT) -> Watch:
        """The stream followed now; a new one (and its reader) if there is none (the
        app's answer to "watch" awaited ``timeout`` seconds at most)."""
        with self._following:
            if self._watch is not None:
                return self._watch
            if self._dir is None:
                raise BackendError("the openflow backend is not started", None, "failed")
            try:
                self._watch = watch = Watch(self._dir / "app.sock", timeout)
            except OSError as exc:
                raise BackendError(f"the OpenFlow NAT application is gone ({exc})", None,
                                   "failed") from None
        threading.Thread(target=self._follow, args=(watch,), daemon=True,
                         name=f"ofnat-events-{self.netns}").start()
        return watch

    def _unfollow_app(self) -> None:
        with self._following:
            watch, self._watch = self._watch, None
        if watch is not None:
            try:
                watch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            watch.close()

    def _follow(self, watch: Watch) -> None:
        def report(event: dict) -> None:
            if self._watch is watch:  # no longer once another one is followed
                self._report([(event["event"], _reported_session(event))])

        def lost() -> None:
            if self._watch is watch:
                self._report([CHANGES_LOST])  # type: ignore[list-item]

        try:
            watch.follow(report, lost)
        except Exception:
            log.exception("following the OpenFlow NAT application's events failed")
        with self._following:
            # Not closed by watch(None), stop() or a restart: the app is gone, or the
            # stream broke (followed again by the next flush).
            ended_alone = self._watch is watch
            if ended_alone:
                self._watch = None
        if ended_alone:
            log.warning("the OpenFlow NAT application's stream of changes ended")
            self._report([CHANGES_LOST])  # type: ignore[list-item]
            watch.close()

    def _put_gateways(self, old: list[GatewayAddress], new: list[GatewayAddress]
                      ) -> list[GatewayAddress]:
        """Change the interfaces' addresses from ``old`` to ``new``; returns the added."""
        gone = [g for g in old if g not in new]
        added = [g for g in new if g not in old]
        for g in gone:  # one put there by hand and taken away since is fine
            self._ns("ip", "addr", "del", g.with_prefixlen, "dev", self._ifname(g),
                     check=False)
        if added:
            self._ns("ip", "-batch", "-", stdin="".join(
                f"addr replace {g.with_prefixlen} dev {self._ifname(g)}\n" for g in added))
        return added

    def _ifname(self, g: GatewayAddress) -> str:
        return self.ifnames[0] if g.interface == "inside" else self.ifnames[1]

    @staticmethod
    def _gateway_sides(gateways: list[GatewayAddress]) -> dict[str, list[str]]:
        return {side: [g.address for g in gateways if g.interface == side]
                for side in ("inside", "outside")}


def policy_request(policy: NatPolicy) -> dict:
    """The policy as the app's "policy" request (and its configuration) has it."""
    t = policy.timeouts
    return {"prefixes": policy.inside_prefix, "externals": policy.external_address,
            "mappings": [[m.inside_prefix, m.external_address]
                         for m in policy.mappings_most_specific_first()],
            "port_min": policy.port_min, "port_max": policy.port_max,
            "tcp": min(flows.MAX_IDLE, t.tcp_established), "udp": min(flows.MAX_IDLE, t.udp),
            "icmp": min(flows.MAX_IDLE, t.icmp)}


def reservation(s: Session, sid: int | None = None) -> list:
    """A session as the app's reserve takes it (with its id, when known, to save a hash).
    One that translates nothing (a firewall's) holds its own source endpoint."""
    entry = [*s.key, s.src_address if s.translated_address is None else s.translated_address,
             s.src_port if s.translated_port is None else s.translated_port]
    return entry if sid is None else [*entry, sid]


def _reported_session(event: dict) -> Session:
    """A change of the app as the session a read would give now (flows.read_sessions):
    TCP is established once the app translates it, with the window scales seen so far, so
    a replica written from changes alone tracks the connection as the source does."""
    p, src, sport, dst, dport, ext, port = event["session"]
    if p != "TCP":
        return Session(p, src, sport, dst, dport, ext, port)
    orig, reply = event.get("scales") or (None, None)
    return Session(p, src, sport, dst, dport, ext, port, None, None, "established", orig,
                   reply)
