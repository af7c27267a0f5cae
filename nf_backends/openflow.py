"""The SDN NAT: a private Open vSwitch in the NAT's network namespace plus the OpenFlow NAT
application (ofnat_app, os-ken) in a process of its own; sessions are flow pairs (flows.py).

The NAT's namespace keeps its inside and outside interfaces for the switch: the kernel there
is silenced (no forwarding, no ARP answers, nothing in or out but loopback), so the addresses
on those interfaces only say which gateway addresses this NAT owns now, and the application
answers ARP for them. They are put there by hand (a test bed's switch-over) or from the
policy's gateway-address list (IPv4 only), whose new entries the app also announces with a
gratuitous ARP.

Bulk work goes straight to the switch in OpenFlow 1.5 (one atomic bundle per batch, dumps,
deletes by cookie); the app is told first, over its control socket, which translated ports
imported sessions use, so it never allocates one of them, and after the bundle whether the
switch took it (deleted sessions free their ports) or refused it (every reservation the batch
touched is put back as it was).

Changes of the session table are reported while someone listens (watch()): those the app
makes (new connections, expiries, the peer's window scale learned from a handshake) from
its stream of changes, each once the switch has done it; those of edits by apply() itself.
flush_changes() is the barrier change tracking needs: a marker the app writes on that
stream after every change it made up to the request (see ofnat_control). An app that ends
loses what it had not reported: the listener is told (CHANGES_LOST).

The switch's daemons and the app live and die with the server, and an app that ends on its
own is started again (ofnat_life.py, ofnat_procs.py).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import flows
from .base import (
    Backend,
    BackendError,
    BackendStats,
    GatewayAddress,
    NatPolicy,
    Session,
    SessionKey,
)
from .batch import SessionBatch
from .ofnat_life import PORTS, NatProcesses, exit_server, policy_request, reservation
from .ofnat_procs import Control, Keeper, Record, Watch
from .ovs import Bundle, Ovs, OvsError

log = logging.getLogger(__name__)

DIRECT_LOOKUPS = 16
FLUSH_WAIT = 5.0  # seconds a flush of the app's changes may take
SEND_CHUNK = 2000  # sessions per send: the switch reads one while the next is packed


class OpenflowBackend(NatProcesses, Backend):
    name = "openflow"

    def __init__(self, netns: str, inside: str = "inside", outside: str = "outside",
                 on_fatal: Callable[[], None] = exit_server):
        """``on_fatal``: called (after stopping everything) when the NAT cannot go on: its
        app keeps ending, or its switch ended (and every session with it); by default the
        server process exits with status 1."""
        self.netns = netns
        self.netns_path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        self.ifnames = (inside, outside)
        self._on_fatal = on_fatal
        self._dir: Path | None = None
        self._ovs: Ovs | None = None
        self._app: subprocess.Popen | None = None
        self._ctl: Control | None = None
        self._watch: Watch | None = None
        self._following = threading.Lock()
        self._keeper: Keeper | None = None
        self._record: Record | None = None
        self._of_port = 0
        self._sysctls: dict[str, str] = {}
        self._policy = NatPolicy()
        self._held: list[str] = []
        self._gateways: list[GatewayAddress] = []  # those of the policy, on the interfaces
        # The app's last word on window scales and counters: what a restarted app starts from.
        self._app_scales: dict = {}
        self._app_counts = {"created": 0, "expired": 0}
        self._restarts: list[float] = []
        # What flows cannot hold, for sessions given to us: session id -> (tcp_state,
        # window scales, base counters), see flows.read_sessions.
        self._extras: dict[int, tuple] = {}
        self._imported = 0
        self._lock = threading.Lock()  # one batch at a time; none while the app restarts
        self._life = threading.RLock()  # start, restart and stop of the app
        self._app_up = threading.Event()
        self._running = threading.Event()

    def flush_changes(self) -> None:
        """The barrier: the app marks its stream of changes after every change it made
        up to now (the flow expiries and packet-ins the switch sent before included, and
        any flow the switch has idled out without saying so yet: see ofnat_control), and
        this returns once the stream's reader has reported everything up to the marker.
        Edits are reported as they are applied. Nobody listening: nothing to report.
        BackendError if the app does not answer within FLUSH_WAIT in all."""
        if self._listener is None:
            return
        if self._keeper is None:
            raise RuntimeError("the openflow backend is not started")
        deadline = time.monotonic() + FLUSH_WAIT
        if not self._app_up.wait(FLUSH_WAIT):
            raise BackendError("the OpenFlow NAT application is not running: its changes "
                               "cannot be flushed", None, "failed")
        watch = self._follow_app(max(0.1, deadline - time.monotonic()))
        watch.flush(max(0.1, deadline - time.monotonic()))

    def refusal(self, session: Session) -> str | None:
        return super().refusal(session) or _refusal(session)

    def hold_new_sessions(self, prefixes: list[str], timeout: float | None = None) -> None:
        # timeout: not passed on; the server's own timer releases the hold.
        self._held = [p for p in prefixes if ipaddress.ip_network(p, strict=False).version == 4]
        self.ctl.ask("hold", prefixes=self._held)

    # -- policy --------------------------------------------------------------------------
    def apply_policy(self, policy: NatPolicy) -> None:
        for address in [*policy.external_address,
                        *(m.external_address for m in policy.address_mapping)]:
            if ipaddress.ip_address(address).version != 4:
                raise BackendError("the OpenFlow NAT translates IPv4 only", None,
                                   "not supported")
        for g in policy.gateway_address:
            if g.version != 4:
                raise BackendError(f"gateway-address {g.address}: the OpenFlow NAT is "
                                   "IPv4-only, it cannot answer for an IPv6 address", None,
                                   "not supported")
        old = self._policy
        self.ctl.ask("policy", **policy_request(policy))
        try:
            self._set_gateways(policy.gateway_address)
        except BackendError:  # all or nothing: the app gets the old policy back
            self._quietly("restore the policy", lambda: self.ctl.ask(
                "policy", **policy_request(old)))
            raise
        self._policy = policy

    def _set_gateways(self, wanted: list[GatewayAddress]) -> None:
        """Put the policy's gateway addresses on their interfaces and give them to the app,
        which announces the new ones; those no longer in the policy go away. If that
        fails, the interfaces get their addresses from before back."""
        self._record_gateways([*self._gateways, *wanted])  # whatever happens next
        try:
            added = self._put_gateways(self._gateways, wanted)
            self.ctl.ask("gateways", **self._gateway_sides(wanted),
                         announce=[[g.interface, g.address] for g in added])
        except BackendError:
            self._quietly("put the gateway addresses back", self._put_gateways, wanted,
                          self._gateways)
            self._record_gateways(self._gateways)
            raise
        self._gateways = list(wanted)
        self._record_gateways(wanted)

    def _record_gateways(self, gateways: list[GatewayAddress]) -> None:
        if self._record is not None:
            self._record.update(gateways=[[g.with_prefixlen, self._ifname(g)]
                                          for g in gateways])

    # -- reads ---------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        bodies = self.ovs.flow_descs([flows.all_sessions_request()])
        return iter(flows.read_sessions(bodies, self._all_extras()))

    def _all_extras(self) -> dict[int, tuple]:
        return self._extras_with(self.ctl.ask("scales"))

    def _extras_with(self, reply: dict) -> dict[int, tuple]:
        """What flows cannot hold (see flows.read_sessions): the app's window scales of
        sessions it made, overridden by what sessions given to us came with."""
        self._app_scales = reply["scales"]  # what a restarted app starts from
        extras = {int(sid): (None, o, r, 0, 0, 0, 0) for sid, (o, r) in reply["scales"].items()}
        extras.update(self._extras)
        return extras

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        return self._lookup(keys, {})

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
        out = self.ovs.ofctl("dump-aggregate",
                             f"table={flows.NAT_TABLE},{flows.COOKIE_MATCH}")
        count = int(out.split("flow_count=")[1].split()[0]) if "flow_count=" in out else 0
        app = self.ctl.ask("stats")
        self._app_counts = {"created": app["created"], "expired": app["expired"]}
        return BackendStats("openflow", (count + 1) // 2, app["created"], app["expired"],
                            self._imported)

    # -- writes --------------------------------------------------------------------------
    def apply(self, batch: SessionBatch) -> None:
        """A batch of whole sessions written over whatever is held (replace) goes to the
        switch as it is; any other is settled on a lookup of its keys first."""
        ids: dict[SessionKey, int] = {}
        if {e.operation for e in batch.edits} <= {"replace"} and \
                not any(e.removed for e in batch.edits):
            writes, gone = batch.sessions(), []
        else:
            writes, gone = batch.results(self._lookup(batch.keys(), ids))
        self._write(writes, gone, ids)

    def _write(self, writes: list[Session], gone: list[SessionKey],
               ids: dict[SessionKey, int]) -> None:
        """``ids``: session ids of some of the keys, if known (key -> id)."""
        upserts = {s.key: s for s in writes}
        for s in upserts.values():
            self._check_session(s)
        sid = flows.session_id
        given = [(ids.get(k) or sid(k), s) for k, s in upserts.items()]
        deleted = [ids.get(k) or sid(k) for k in gone if k not in upserts]
        if not given and not deleted:
            return
        ctl = self.ctl  # waited for outside the lock: a restarting app needs it
        with self._lock:
            try:
                with self.ovs.bundle() as bundle:
                    reply = self._reserve_while_sending(ctl, bundle, given, deleted)
                    if "error" in reply:
                        raise self._taken(reply, writes)
                    try:
                        bundle.commit()
                    except OvsError as exc:
                        ctl.ask("settle", batch=reply["batch"], ok=False)
                        raise self._refused(exc, len(deleted), given) from None
            except OvsError as exc:  # the connection failed; any reservation is undone
                raise BackendError(f"the switch could not take the batch, nothing applied: "
                                   f"{exc}", None, "failed") from None
            try:
                ctl.ask("settle", batch=reply["batch"], ok=True)
            except BackendError as exc:
                # The batch is in the switch: a restarted app reads it back from there.
                log.warning("batch applied, but the app did not hear of it: %s", exc)
            for i in deleted:
                self._extras.pop(i, None)
            for i, s in given:
                self._extras[i] = (
                    s.tcp_state, s.src_window_scale, s.dst_window_scale, s.orig_packets or 0,
                    s.orig_bytes or 0, s.reply_packets or 0, s.reply_bytes or 0)
            self._imported += len(reply["new"])
        if self._listener is not None:  # the app does not report what edits do
            new = set(reply["new"])
            self._report([("deleted", Session(*k)) for k in gone if k not in upserts]
                         + [("created" if i in new else "updated", s) for i, s in given])

    def _reserve_while_sending(self, ctl: Control, bundle: Bundle,
                               given: list[tuple[int, Session]], deleted: list[int]) -> dict:
        """The app's reservation of the batch's ports, asked for while the switch takes
        the batch's flows (which go in only at the commit, after the reply)."""
        failure = None
        with ctl.asking("reserve", sessions=[reservation(s, i) for i, s in given],
                        drop=deleted) as reserved:
            try:
                bundle.add(flows.delete_messages(deleted))
                idle, limit = self._idle, flows.MAX_IDLE
                for at in range(0, len(given), SEND_CHUNK):
                    bundle.add(self._pair_messages(
                        ((i, s, min(limit, max(1, idle(s)))) for i, s in
                         given[at:at + SEND_CHUNK]), PORTS))
            except OvsError as exc:
                failure = exc
            reply = reserved()
        if failure is not None:
            if "error" not in reply:
                ctl.ask("settle", batch=reply["batch"], ok=False)
            raise failure
        return reply

    @staticmethod
    def _taken(reply: dict, writes: list[Session]) -> BackendError:
        key = writes[reply["index"]].key if "index" in reply else None
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

    # The flow pairs of written sessions: flows.add_messages' arguments and result.
    _pair_messages = staticmethod(flows.add_messages)

    @staticmethod
    def _check_session(s: Session) -> None:
        """BackendError if a written session cannot be held (before anything is)."""
        _check(s)

    def _idle(self, s: Session) -> int:
        return s.timeout if s.timeout else self._policy.timeout_for(s.protocol, s.tcp_state)


def _refusal(s: Session) -> str | None:
    try:
        _check(s)
    except BackendError as exc:
        return str(exc)
    return None


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
