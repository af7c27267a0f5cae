"""Hot standby: copies of one NAT's sessions kept live in other NAT instances, through their
NETCONF interfaces only.

The source is read by a YANG-Push subscription (client.push): its first notification holds
every selected session, each later one what changed within a dampening period. The
replicator keeps that table (the *mirror*) and passes every change to each standby's
*applier*, a thread of its own that writes them in batches (edit-config of running:
whole sessions replaced, ended ones removed; continue-on-error, so one session a standby
refuses does not hold back the others). Changes wait per session: a standby that is slow
gets the last value of each session once, never a backlog of values already superseded.

A standby that connects (first, or again after losing its connection) is compared with the
mirror in full first: sessions it lacks or holds differently are written, those the source
no longer has are removed; then the changes follow. A source that is lost is subscribed to
again, and its new first notification is compared with the mirror the same way, so nothing
ended or opened meanwhile is missed.

Standby sessions are written with a remaining lifetime of at least ``hold`` seconds: the
source refreshes a session's lifetime with every packet without reporting it, so a copy
counting down the last reported lifetime would expire while its connection still lives.
They end on the standby when the source reports them ended. Their counters are the
source's as of its last report.

Failover (``failover_after``, or client.failover on its own) gives the standby the source's
gateway addresses, as a migration's switchover does.

A firewall's pinholes, which the feed does not carry, are read from the source every second
and kept in step the same way (client.standby_pinholes).
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ncclient.operations.rpc import RPCError

from .endpoints import Connection, Credentials, Endpoint, describe, open_connection
from .firewall_state import PINHOLE_FILTER, parse_pinholes
from .negotiate import read_facts
from .netconf import NAT_NS, NC_NS, TextRpc, take_entry_namespace
from .push import Change, DeleteSubscription, EstablishSubscription, read_notification
from .push import subscription_id as read_subscription_id
from .selection import (
    Entry,
    Selection,
    followed_state,
    parse_entries,
    removal_xml,
    replacement_xml,
)
from .standby_pinholes import PinholeFollower, is_firewall
from .switchover import GatewayAddress, gateway_filter, parse_gateways

log = logging.getLogger(__name__)

_TIMEOUT = re.compile(r"<timeout>(\d+)</timeout>")
_LAGS_KEPT = 20_000  # recent lags per standby, for its percentiles
_IDLE = 0.2  # seconds between looks at the stop flag while nothing happens


@dataclass
class StandbyOptions:
    credentials: Credentials = field(default_factory=Credentials)
    selection: Selection = field(default_factory=Selection.all)
    dampening_ms: int = 20  # the source's dampening period (RFC 8641: centiseconds)
    batch: int = 20_000  # sessions in one edit of a standby
    hold: int = 3600  # seconds of lifetime a standby session keeps at least
    failover_after: float | None = None  # seconds without the source before failing over
    rpc_timeout: float = 120
    connect_timeout: float = 10
    retry_pause: float = 0.5  # between attempts to reach an end again


@dataclass
class TargetStatus:
    endpoint: str
    connected: bool = False
    applied: int = 0  # changes written
    pending: int = 0  # changes waiting
    oldest_pending_ms: float = 0.0
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    resyncs: int = 0
    refused: int = 0  # sessions the standby would not take
    last_error: str | None = None


class StandbyError(Exception):
    pass


class Standby:
    """Replicate ``source``'s selected sessions to every ``targets`` until :meth:`stop`
    (or a failover)."""

    def __init__(self, source: Endpoint, targets: list[Endpoint],
                 options: StandbyOptions | None = None):
        if not targets:
            raise StandbyError("name at least one standby")
        self.source = source
        self.options = options or StandbyOptions()
        self.mirror: dict[tuple, Entry] = {}
        self.mirror_ready = threading.Event()
        self.pinholes = PinholeFollower()  # a firewall source's (none from a NAT)
        self.lock = threading.Lock()  # the mirror, and handing changes to the appliers
        self.stopping = threading.Event()
        self.appliers = [_Applier(self, t) for t in targets]
        self.gateways: list[GatewayAddress] = []
        self.changes = 0
        self.source_connected = False
        self.source_lost_since: float | None = None
        self.source_resyncs = 0
        self.failover: dict[str, Any] | None = None
        self.started = time.monotonic()
        self._threads: list[threading.Thread] = []

    # -- running -------------------------------------------------------------------------
    def start(self) -> None:
        for applier in self.appliers:
            self._spawn(applier.run, f"standby-{applier.endpoint}")
        self._spawn(self._follow_source, "standby-source")

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for applier in self.appliers:
            applier.wake()
        for thread in self._threads:
            thread.join(timeout=30)

    def run(self, until: threading.Event | None = None) -> dict[str, Any]:
        """Start, replicate until ``until`` is set or a failover happened, stop; the
        report."""
        self.start()
        try:
            while not self.stopping.is_set() and not (until and until.is_set()):
                time.sleep(_IDLE)
        finally:
            self.stop()
        return self.status()

    # -- the source ----------------------------------------------------------------------
    def _follow_source(self) -> None:
        while not self.stopping.is_set():
            try:
                conn = open_connection(self.source, self.options.credentials,
                                       self.options.rpc_timeout, self.options.connect_timeout)
            except Exception as exc:
                self._source_lost(describe(exc))
                continue
            try:
                self._subscribe_and_follow(conn)
            except Exception as exc:
                log.debug("following %s stopped", self.source, exc_info=True)
                self._source_lost(describe(exc))
            finally:
                conn.close()

    def _subscribe_and_follow(self, conn: Connection) -> None:
        if not isinstance(conn, Connection):
            raise StandbyError(f"{self.source}: a standby's source is followed over NETCONF")
        self.gateways = parse_gateways(conn.get_data("running", gateway_filter()))
        self.pinholes.enabled = is_firewall(read_facts(conn).modules)
        self._follow_pinholes(conn)  # known before a standby compares itself with them
        reply = conn._call(EstablishSubscription, _subtree(self.options.selection),
                           max(1, round(self.options.dampening_ms / 10)), True)
        subscription = read_subscription_id(reply.xml)
        log.info("following %s (subscription %s)", self.source, subscription)
        self.source_connected, self.source_lost_since = True, None
        try:
            while not self.stopping.is_set():
                notification = conn.m.take_notification(block=True, timeout=_IDLE)
                if notification is None:
                    if not conn.connected or not conn.session.is_alive():
                        raise StandbyError("the connection was lost")
                    self._follow_pinholes(conn)
                    continue
                self._follow_pinholes(conn)
                update = read_notification(notification.notification_xml)
                if update is None or update.subscription != subscription:
                    continue
                if update.ended is not None:
                    raise StandbyError(f"the subscription ended: {update.ended}")
                self._take(update.changes, update.whole)
        finally:
            self.source_connected = False
            if conn.connected and self.stopping.is_set():
                try:
                    conn._call(DeleteSubscription, subscription)
                except Exception:  # the session ends next, and the subscription with it
                    log.debug("delete-subscription failed", exc_info=True)

    def _follow_pinholes(self, conn: Connection) -> None:
        edit = self.pinholes.poll(conn)
        if edit:
            for applier in self.appliers:
                applier.offer_pinholes(edit)

    def _take(self, changes: list[Change], whole: bool) -> None:
        """Changes into the mirror and to every standby; ``whole``: every selected session
        (what the mirror holds beyond it has ended)."""
        selection = self.options.selection
        changes = [c for c in changes if c.entry is None or selection.matches(c.entry)]
        with self.lock:
            if whole:
                if self.mirror_ready.is_set():
                    self.source_resyncs += 1
                now = changes[0].seen if changes else time.monotonic()
                present = {c.key for c in changes}
                changes = [c for c in changes if _differs(self.mirror.get(c.key), c.entry)]
                changes += [Change(k, None, now) for k in self.mirror if k not in present]
            for c in changes:
                if c.entry is None:
                    self.mirror.pop(c.key, None)
                else:
                    self.mirror[c.key] = c.entry
            self.changes += len(changes)
            for applier in self.appliers:
                applier.offer(changes)
            self.mirror_ready.set()

    def _source_lost(self, why: str) -> None:
        now = time.monotonic()
        if self.source_lost_since is None:
            self.source_lost_since = now
            log.warning("lost the source %s: %s", self.source, why)
        after = self.options.failover_after
        pause = self.options.retry_pause
        if after is not None and self.failover is None:
            left = after - (now - self.source_lost_since)
            if left <= 0:
                self._fail_over()
                return
            pause = min(pause, left)  # fail over on time, not at the next retry
        self.stopping.wait(pause)

    def _fail_over(self) -> None:
        from .failover import fail_over  # here: only a failover needs it

        lost_for = time.monotonic() - (self.source_lost_since or time.monotonic())
        for applier in self.appliers:
            if not applier.connected:
                continue
            lag = applier.status()
            try:
                seconds = fail_over(applier.endpoint, self.gateways, self.options.credentials,
                                    conn=applier.conn)
            except Exception as exc:
                log.warning("failover to %s failed: %s", applier.endpoint, describe(exc))
                continue
            self.failover = {"standby": str(applier.endpoint), "seconds": round(seconds, 4),
                             "source_lost_for_s": round(lost_for, 3),
                             "changes_pending": lag.pending,
                             "oldest_pending_ms": lag.oldest_pending_ms,
                             "gateways": [g.address for g in self.gateways]}
            log.warning("failed over to %s after %.1f s without the source; %d changes "
                        "may have been lost", applier.endpoint, lost_for, lag.pending)
            self.stopping.set()
            return
        log.warning("no standby could take over; still trying")

    # -- what it reports ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        return {
            "source": str(self.source), "source_connected": self.source_connected,
            "source_lost_for_s": None if self.source_lost_since is None else
            round(time.monotonic() - self.source_lost_since, 3),
            "sessions": len(self.mirror), "changes": self.changes,
            "changes_per_s": round(self.changes / elapsed, 1),
            "source_resyncs": self.source_resyncs,
            "gateways": [{"address": g.address, "interface": g.interface,
                          "prefix_length": g.prefix_length} for g in self.gateways],
            "targets": [vars(a.status()) for a in self.appliers],
            "failover": self.failover,
        }

    def line(self) -> str:
        """One line for a terminal."""
        s = self.status()
        parts = [f"{t['endpoint']}: "
                 + (f"lag {t['lag_p99_ms'] or 0:.0f} ms p99, {t['pending']} pending"
                    if t["connected"] else "unreachable") for t in s["targets"]]
        source = "source up" if s["source_connected"] else "SOURCE LOST"
        return (f"{source} | {s['sessions']:,} sessions, {s['changes_per_s']:,.0f} "
                f"changes/s | " + "; ".join(parts))


class _StandbyEdit(TextRpc):
    """edit-config of running that applies every entry it can (continue-on-error)."""

    def request(self, body: bytes) -> object:  # type: ignore[override]
        return self._request((b"<edit-config><target><running/></target>"
                              b"<error-option>continue-on-error</error-option>"
                              + f'<nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">'.encode(),
                              body, b"</nc:config></edit-config>"))


class _Applier:
    """One standby: the changes waiting for it, written in batches by its own thread."""

    def __init__(self, standby: Standby, endpoint: Endpoint):
        self.standby = standby
        self.endpoint = endpoint
        self.pending: dict[tuple, Change] = {}  # the last change of each session, in order
        self.pinhole_edits: list[str] = []  # a firewall's, in the order read
        self.cond = threading.Condition()
        self.conn: Connection | None = None
        self.lags: deque[float] = deque(maxlen=_LAGS_KEPT)
        self.applied = self.resyncs = self.refused = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.connected

    def offer(self, changes: list[Change]) -> None:
        with self.cond:
            for c in changes:
                self.pending.pop(c.key, None)  # moves to the end: applied in order made
                self.pending[c.key] = c
            self.cond.notify()

    def offer_pinholes(self, edit: str) -> None:
        with self.cond:
            self.pinhole_edits.append(edit)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def run(self) -> None:
        options = self.standby.options
        stopping = self.standby.stopping
        while not stopping.is_set():
            if not self.connected:
                if not self._connect():
                    stopping.wait(options.retry_pause)
                    continue
            batch: list[Change] = []
            try:
                self._write_pinholes()
                batch = self._next_batch()
                if batch:
                    self._write(batch)
            except Exception as exc:
                self._lost(describe(exc), batch)
        if self.conn is not None:
            self.conn.close()

    def _connect(self) -> bool:
        standby = self.standby
        if not standby.mirror_ready.wait(_IDLE):
            return False  # nothing to compare with yet
        try:
            conn = open_connection(self.endpoint, standby.options.credentials,
                                   standby.options.rpc_timeout, standby.options.connect_timeout)
        except Exception as exc:
            self.last_error = describe(exc)
            return False
        if not isinstance(conn, Connection):
            conn.close()
            self.last_error = "a standby is written over NETCONF"
            return False
        self.conn = conn
        try:
            self._resync()
        except Exception as exc:
            self._lost(describe(exc), [])
            return False
        log.info("standby %s in step", self.endpoint)
        return True

    def _resync(self) -> None:
        """The standby compared with the mirror in full: what it lacks or holds differently
        written, what the source no longer has removed; the changes waiting are part of it."""
        standby = self.standby
        held = {e.key: e for e in parse_entries(self.conn.get_data(
            "running", standby.options.selection.filter_xml()))}
        now = time.monotonic()
        with standby.lock:
            mirror = dict(standby.mirror)
            with self.cond:
                self.pending.clear()
        batch = [Change(k, e, now) for k, e in mirror.items() if _differs(held.get(k), e)]
        batch += [Change(k, None, now) for k in held if k not in mirror]
        self.resyncs += 1
        if standby.pinholes.enabled:
            with self.cond:
                self.pinhole_edits.clear()  # the whole comparison covers them
            edit = standby.pinholes.whole(parse_pinholes(self.conn.get_data(
                "running", PINHOLE_FILTER)))
            if edit:
                self._edit_pinholes(edit)
        for start in range(0, len(batch), standby.options.batch):
            self._write(batch[start:start + standby.options.batch])

    def _next_batch(self) -> list[Change]:
        with self.cond:
            if not self.pending:
                self.cond.wait(_IDLE)
            taken = []
            limit = self.standby.options.batch
            while self.pending and len(taken) < limit:
                key = next(iter(self.pending))
                taken.append(self.pending.pop(key))
            return taken

    def _write_pinholes(self) -> None:
        with self.cond:
            edits, self.pinhole_edits = self.pinhole_edits, []
        if edits:
            try:
                self._edit_pinholes("".join(edits))
            except Exception:
                with self.cond:  # written again once the standby answers
                    self.pinhole_edits[:0] = edits
                raise

    def _edit_pinholes(self, edit: str) -> None:
        try:
            self.conn.edit_config(edit, "running")
        except RPCError as exc:  # a standby that is no firewall, say: the sessions go on
            self.refused += 1
            self.last_error = describe(exc)

    def _write(self, batch: list[Change]) -> None:
        hold = self.standby.options.hold
        puts = [_held(c.entry, hold) for c in batch if c.entry is not None]
        ends = [_key_entry(c.key) for c in batch if c.entry is None]
        body = take_entry_namespace((replacement_xml(puts) + removal_xml(ends)).encode())
        try:
            self.conn._call(_StandbyEdit, body)
        except RPCError as exc:  # continue-on-error: the others were written
            self.refused += len(getattr(exc, "errors", None) or [exc])
            self.last_error = describe(exc)
        done = time.monotonic()
        self.applied += len(batch)
        self.lags.extend((done - c.seen) * 1e3 for c in batch)

    def _lost(self, why: str, batch: list[Change]) -> None:
        log.warning("standby %s: %s; writing to it again once it answers", self.endpoint, why)
        self.last_error = why
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        with self.cond:  # put back what was not written, unless something newer came
            for c in batch:
                self.pending.setdefault(c.key, c)

    def status(self) -> TargetStatus:
        with self.cond:
            pending = len(self.pending)
            oldest = next(iter(self.pending.values())).seen if self.pending else None
        lags = sorted(self.lags)
        return TargetStatus(
            str(self.endpoint), self.connected, self.applied, pending,
            round((time.monotonic() - oldest) * 1e3, 1) if oldest is not None else 0.0,
            round(statistics.median(lags), 1) if lags else None,
            round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1) if lags else None,
            self.resyncs, self.refused, self.last_error)


def _subtree(selection: Selection) -> str:
    """The subscription's datastore-subtree-filter content for ``selection`` (its exact
    test is applied here too, so a wider filter is enough)."""
    text = selection.filter_xml()
    if text.startswith("<subtree-filter>"):
        return text.removeprefix("<subtree-filter>").removesuffix("</subtree-filter>")
    return ""  # the whole list, narrowed here by Selection.matches


def _differs(held: Entry | None, entry: Entry | None) -> bool:
    if held is None or entry is None:
        return held is not entry
    return followed_state(held) != followed_state(entry)


def _held(entry: Entry, hold: int) -> Entry:
    """``entry`` with at least ``hold`` seconds of lifetime."""
    text = _TIMEOUT.sub(lambda m: f"<timeout>{max(int(m.group(1)), hold)}</timeout>",
                        entry.xml, count=1)
    return entry._replace(xml=text) if text != entry.xml else entry


def _key_entry(key: tuple) -> Entry:
    return Entry(key, None, "")
