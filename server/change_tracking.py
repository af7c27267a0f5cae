"""Which sessions changed since a migration began copying them.

The backend reports the changes of its session table to one listener (Backend.watch); the
:class:`ChangeFeed` is that listener, passing every report on to whoever subscribes (the
notification hub's sessions-changed, the change records), and has the backend watched only
while someone does, since watching costs.

:class:`ChangeTracking` keeps one record per migration-id (rpc track-changes): the keys of
the sessions from its sources that were created, updated or deleted since it began, at most
``limit`` of them (beyond, the record only says it overflowed), dropped by itself after its
timeout. Reading one (rpc changes) first has the backend report every change its NF made up
to then (Backend.flush_changes), so nothing made before the request is missed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from typing import NamedTuple

from nfmig.nf_backends.base import Backend, EventListener, SessionEvent, SessionKey, session_key

log = logging.getLogger(__name__)

RECORD_LIMIT = 200_000  # keys one record holds; more changed sessions are an overflow


class ChangeFeed:
    """The backend's change reports, passed on to every subscriber in the order made."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._listeners: tuple[EventListener, ...] = ()
        self._lock = threading.Lock()  # subscribe/unsubscribe; never held by a report

    def subscribe(self, listener: EventListener) -> None:
        """Pass every report from now on to ``listener`` too (from any thread, possibly
        under the backend's locks: it must not call the backend)."""
        with self._lock:
            self._listeners += (listener,)
            if len(self._listeners) == 1:
                try:
                    self.backend.watch(self._deliver)
                except BaseException:
                    self._listeners = ()
                    raise

    def unsubscribe(self, listener: EventListener) -> None:
        with self._lock:
            if listener not in self._listeners:
                return
            self._listeners = tuple(each for each in self._listeners if each != listener)
            if not self._listeners:
                self.backend.watch(None)

    def flush(self) -> None:
        """Deliver every change the NF made up to now before returning (the barrier);
        NotImplementedError when the backend cannot."""
        self.backend.flush_changes()

    def _deliver(self, events: list[SessionEvent]) -> None:
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # one listener's failure must not starve the others
                log.exception("a change listener failed")


class _Source(NamedTuple):
    """A tracked prefix as integers: (is IPv6, network, netmask)."""

    v6: bool
    network: int
    netmask: int


class ChangeRecord:
    """The keys of the changed sessions of one migration's sources, up to ``limit``."""

    def __init__(self, prefixes: Iterable[str], limit: int):
        self.sources = [_Source(n.version == 6, int(n.network_address), int(n.netmask))
                        for n in map(_network, prefixes)]
        self.every_source = not self.sources
        self.limit = limit
        self.keys: set[SessionKey] = set()
        self.overflow = False
        self.timer: threading.Timer | None = None

    def selects(self, v6: bool, address: int) -> bool:
        return any(s.v6 == v6 and address & s.netmask == s.network for s in self.sources)

    def add(self, key: SessionKey) -> None:
        if self.overflow:
            return
        self.keys.add(key)
        if len(self.keys) > self.limit:
            self.lose()

    def lose(self) -> None:
        """Too many changes, or some missed: the keys no longer tell what changed."""
        self.overflow = True
        self.keys = set()


class Changes(NamedTuple):
    """What one record holds when read: the changed keys, or an overflow (no keys)."""

    keys: set[SessionKey]
    overflow: bool


class ChangeTracking:
    """The change records of the migrations, by migration-id."""

    def __init__(self, feed: ChangeFeed, limit: int = RECORD_LIMIT):
        self.feed = feed
        self.limit = limit
        self._records: dict[str, ChangeRecord] = {}
        self._lock = threading.Lock()  # the records; taken by every report
        # Serializes subscribing to the feed and leaving it. Never taken by a report, so
        # leaving (which may wait for the backend's watcher) cannot wait for a report that
        # waits for it.
        self._membership = threading.Lock()
        self._subscribed = False

    def start(self, migration_id: str, prefixes: list[str], timeout: float) -> None:
        """Record from now on (a record of that migration-id starts over). Raises
        NotImplementedError when the backend has no barrier (changes could be missed)."""
        record = ChangeRecord(prefixes, self.limit)
        # Also what tells whether the backend has a barrier; and the changes queued now
        # are not taken for the new record's.
        self.feed.flush()
        record.timer = threading.Timer(timeout, self._expire, args=(migration_id, record))
        record.timer.daemon = True
        with self._membership:
            if not self._subscribed:
                self.feed.subscribe(self._take)
                self._subscribed = True
            with self._lock:
                previous = self._records.get(migration_id)
                self._records[migration_id] = record
        if previous is not None and previous.timer is not None:
            previous.timer.cancel()
        record.timer.start()
        log.info("migration %s: recording changed sessions of %s for at most %g s",
                 migration_id, ", ".join(prefixes) or "every source", timeout)

    def read(self, migration_id: str, stop: bool = False, restart: bool = False) -> Changes:
        """What the record holds once every change made up to now is in; ``stop`` drops
        it, ``restart`` empties it in the same step (the next read answers with what
        changed after this one: nothing is lost between the two). KeyError when there is
        no record of that migration-id."""
        self.feed.flush()
        with self._lock:
            record = self._records.get(migration_id)
            if record is None:
                raise KeyError(migration_id)
            changes = Changes(record.keys, record.overflow)
            if stop:
                del self._records[migration_id]
            elif restart:
                record.keys, record.overflow = set(), False
            else:
                changes = Changes(set(record.keys), record.overflow)
        if stop:
            self._dropped(migration_id, record, "stopped")
        return changes

    def __contains__(self, migration_id: str) -> bool:
        return migration_id in self._records

    def close_all(self) -> None:
        with self._lock:
            records, self._records = list(self._records.values()), {}
        for record in records:
            if record.timer is not None:
                record.timer.cancel()
        self._leave_if_idle()

    # -- internals ---------------------------------------------------------------------
    def _expire(self, migration_id: str, record: ChangeRecord) -> None:
        with self._lock:
            if self._records.get(migration_id) is not record:
                return  # started over or stopped meanwhile
            del self._records[migration_id]
        log.warning("migration %s: change record timed out and was dropped", migration_id)
        self._dropped(migration_id, record, None)

    def _dropped(self, migration_id: str, record: ChangeRecord, how: str | None) -> None:
        if record.timer is not None:
            record.timer.cancel()
        if how:
            log.info("migration %s: change record %s", migration_id, how)
        self._leave_if_idle()

    def _leave_if_idle(self) -> None:
        with self._membership:
            with self._lock:
                idle = self._subscribed and not self._records
            if idle:
                self.feed.unsubscribe(self._take)
                self._subscribed = False

    def _take(self, events: list[SessionEvent]) -> None:
        """The feed's report: each changed key into the records whose sources it is from."""
        with self._lock:
            records = [r for r in self._records.values() if not r.overflow]
            if not records:
                return
            everyone = [r for r in records if r.every_source]
            by_source = [r for r in records if not r.every_source]
            for what, session in events:
                if session is None:  # the backend missed changes (Backend: CHANGES_LOST)
                    log.warning("the NAT missed some of its changes (%s): every change "
                                "record overflows", what)
                    for record in records:
                        record.lose()
                    continue
                key = session_key(session)
                for record in everyone:
                    record.add(key)
                if by_source:
                    v6, address = _address(session.src_address)
                    for record in by_source:
                        if record.selects(v6, address):
                            record.add(key)


def _network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(prefix, strict=False)


def _address(text: str) -> tuple[bool, int]:
    v6 = ":" in text
    packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, text)
    return v6, int.from_bytes(packed, "big")
