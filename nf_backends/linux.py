"""The Linux kernel NAT: sessions are conntrack entries of one network namespace, the policy
is an nftables table in it (that side, the namespace's configuration, is
:mod:`nfmig.nf_backends.linux_config`'s).

A session moves in with the recipe that keeps a live connection working (see
:mod:`nfmig.nf_backends.ctnetlink`); the NAT rules must be in place before that, which the
server guarantees by applying the policy before any session of the same edit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from operator import itemgetter

from .base import (
    CHANGES_LOST,
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    TCP_STATE_NUMBERS,
    TCP_STATES,
    Backend,
    BackendError,
    BackendStats,
    NatPolicy,
    Session,
    SessionKey,
    new_session,
    refuse_unholdable,
)
from .batch import SessionBatch, SessionEdit
from .ctattrs import ECHO_REPLY, TCP, CtEntry, new_entry
from .ctevents import ConntrackEvents
from .ctnetlink import ERRNO_REASONS, Conntrack, EntryCount, parse_message
from .linux_config import NamespaceConfig

log = logging.getLogger(__name__)

_COUNTS = slice(Session._fields.index("orig_packets"), Session._fields.index("reply_bytes") + 1)
_ENTRY_COUNTS = slice(CtEntry._fields.index("orig_packets"),
                      CtEntry._fields.index("reply_bytes") + 1)
_NO_COUNTS = (None,) * 4
_entry_key = CtEntry.key.fget
_counts_of = itemgetter(_COUNTS)
_STATE_NAMES = dict(enumerate(TCP_STATES))  # kernel TCP state -> the model's name


class LinuxBackend(Backend):
    name = "linux"

    def __init__(self, netns: str, ruleset: Callable[[NatPolicy], str] | None = None):
        """``ruleset``: what a policy makes of the namespace's nftables table (see
        NamespaceConfig); None: the NAT's."""
        self.netns = netns
        self.netns_path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        self._ct: Conntrack | None = None
        self._count: EntryCount | None = None
        self._lock = threading.Lock()
        self._offsets: dict[tuple, tuple[int, int, int, int]] = {}  # imported counts
        self._imported = 0
        self._text: dict[bytes, str] = {}
        self._packed: dict[str, bytes] = {}
        # The rules, holds and gateway addresses; under the same lock as the session
        # writes, so that the two never interleave.
        self._config = NamespaceConfig(netns, self._lock, ruleset)
        self._events: ConntrackEvents | None = None
        self._watcher: threading.Thread | None = None
        # Held while events are read and reported, so that flush_changes() can report
        # every event queued now before it returns, however far the watcher has got.
        self._reporting = threading.Lock()

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        self._config.start()  # instantiates conntrack and NAT in the netns
        # Every entry from now on with its counters and its events: in the kernel's default
        # (events 2, "auto") an entry made while nobody listened never reports a change or
        # its end, so sessions that predate a watch() would change unseen.
        self._config.sysctl({"net.netfilter.nf_conntrack_acct": "1",
                             "net.netfilter.nf_conntrack_events": "1"})
        self._ct = Conntrack(self.netns_path)
        self._count = EntryCount(self.netns_path)
        self.hold_new_sessions([])  # a hold left by a server that was killed mid-migration
        log.info("linux NAT in network namespace %s", self.netns)

    def stop(self) -> None:
        self.watch(None)
        if self._watcher is not None:
            self._watcher.join(timeout=1)  # it notices within one wait
        self._config.close()  # its thread inside the namespace, and that thread's sockets
        if self._ct is not None:
            self._ct.close()
            self._ct = None
        if self._count is not None:
            self._count.close()
            self._count = None

    # -- events and holds --------------------------------------------------------------
    def watch(self, listener) -> None:
        """Follow the kernel's conntrack events while someone listens. Stopping does not
        wait for the watcher thread: it closes its socket itself within one wait, and
        reports nothing more from the moment it is no longer the one followed."""
        with self._reporting:
            self._listener = listener
            if listener is not None and self._events is None:
                self._events = ConntrackEvents(self.netns_path)
                self._watcher = threading.Thread(target=self._follow, args=(self._events,),
                                                 name=f"conntrack-events-{self.netns}",
                                                 daemon=True)
                self._watcher.start()
            elif listener is None:
                self._events = None

    def flush_changes(self) -> None:
        """Report every conntrack event the kernel has queued for us: each was queued as
        the kernel made its change, so none made before this call is left out."""
        with self._reporting:
            events = self._events
            if events is None:
                if self._listener is not None:  # the watcher failed: nothing is followed
                    self._report([CHANGES_LOST])  # type: ignore[list-item]
                return
            try:
                self._report_waiting(events)
            except OSError as exc:  # the watcher meets it too, and stops following
                log.error("reading the conntrack events of %s failed: %s", self.netns, exc)
                self._report([CHANGES_LOST])  # type: ignore[list-item]

    def _follow(self, events: ConntrackEvents) -> None:
        try:
            while self._events is events:
                if events.wait(0.25):
                    with self._reporting:
                        if self._events is events:
                            self._report_waiting(events)
        except Exception:  # whoever records changes must know they are no longer followed
            log.exception("following the conntrack events of %s failed", self.netns)
            with self._reporting:
                if self._events is events:
                    self._events = None
                    self._report([CHANGES_LOST])  # type: ignore[list-item]
        finally:
            with self._reporting:
                events.close()

    def _report_waiting(self, events: ConntrackEvents) -> None:
        """Read and report what ``events`` holds now (with the reporting lock held)."""
        lost = events.lost
        batch = events.read()
        changes = [(what, s) for what, s in
                   ((what, self._session(e)) for what, e in batch) if s is not None]
        if events.lost != lost:
            log.warning("conntrack events of %s were lost (%d overflows): the change feed "
                        "missed some sessions", self.netns, events.lost - lost)
            changes.append(CHANGES_LOST)  # type: ignore[arg-type]
        self._report(changes)

    def hold_new_sessions(self, prefixes: list[str], timeout: float | None = None) -> None:
        """Drop the first packet of new connections from the held sources (the peers
        retry, by then on the NAT the sessions moved to); existing ones pass.

        The held prefixes are elements of nftables sets, each carrying ``timeout``: the
        kernel drops them by itself when it runs out, so the hold ends on time even if
        the server that set it has died."""
        self._config.hold(prefixes, timeout)

    @property
    def ct(self) -> Conntrack:
        if self._ct is None:
            raise RuntimeError("the linux backend is not started")
        return self._ct

    # -- policy ------------------------------------------------------------------------
    def apply_policy(self, policy: NatPolicy) -> None:
        """The NAT rules and timeouts, then the gateway addresses; all or nothing (see
        NamespaceConfig.apply)."""
        self._config.apply(policy)

    # -- reads -------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        return chain.from_iterable(self.session_batches())

    def session_batches(self) -> Iterator[list[Session]]:
        """Every session, read from the kernel while it is consumed, a list per read (about
        a hundred): a get-data reply goes out while the kernel is still walking its table.
        Through a netlink socket of its own, so a slow reader holds up nothing else."""
        ct = Conntrack(self.netns_path)
        try:
            # Only counts imported before the dump began may be forgotten: a session
            # imported meanwhile may be missing from it.
            imported = set(self._offsets)
            seen: list[tuple] = []
            for batch in ct.dump_batches():
                if imported:
                    seen += map(_entry_key, batch)
                yield list(self._sessions_from(batch))
            if imported:
                self._forget_offsets(imported.difference(seen))
        finally:
            ct.close()

    def _forget_offsets(self, keys: set[tuple]) -> None:
        """Forget the counts these sessions brought along (they left the kernel)."""
        if keys:
            with self._lock:
                self._offsets = {k: v for k, v in self._offsets.items() if k not in keys}

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        return self._sessions_of(self._read(set(keys)))

    def _sessions_of(self, entries: dict[tuple, CtEntry]) -> dict[SessionKey, Session]:
        return {s.key: s for s in self._sessions_from(entries.values())}

    def _read(self, keys: set[SessionKey]) -> dict[tuple, CtEntry]:
        """The kernel's entries for these keys, by native key: nothing to read from an
        empty table; else one GET per key, or one dump when the table holds fewer entries
        than there are keys (an entry costs a dump about what a key costs a GET)."""
        if not keys:
            return {}
        with self._lock:
            held = self._count.read() if self._count is not None else len(keys)
            if held == 0:
                return {}
            if held > len(keys):
                return {e.key: e for e in self.ct.get(list(map(self._probe, keys)))
                        if e is not None}
            wanted = set(map(self._native_key, keys))
            return {e.key: e for e in self.ct.dump() if e.key in wanted}

    def _probe(self, key: SessionKey) -> CtEntry:
        """An entry naming ``key``'s original tuple, enough to look it up."""
        proto, src, sport, dst, dport = self._native_key(key)
        return CtEntry(socket.AF_INET if len(src) == 4 else socket.AF_INET6, proto, src, dst,
                       sport, dport)

    def stats(self) -> BackendStats:
        if self._count is None:
            raise RuntimeError("the linux backend is not started")
        return BackendStats(self.name, self._count.read(), sessions_imported=self._imported)

    # -- writes ------------------------------------------------------------------------
    def apply(self, batch: SessionBatch) -> None:
        """Write ``batch`` all or nothing. A batch that adds whole entries is created at
        once, and the kernel says which keys it holds already (EEXIST): only those are
        read, and settled as updates. Any other batch reads its keys first."""
        if batch.adds_whole_entries:
            sessions = batch.sessions()
            refuse_unholdable(self, sessions)
            entries = self._entries(sessions)
            # ICMP sessions that differ only in what the kernel's key leaves out fold
            # into one entry: settled on what is read, like any other batch.
            if len(set(map(_entry_key, entries))) == len(entries):
                self._add(batch.edits, sessions, entries)
                return
        if {e.operation for e in batch.edits} <= {"delete", "remove"}:
            self._take_away(batch.edits)
            return
        current = self._read(set(batch.keys()))
        writes, gone = batch.results(self._sessions_of(current))
        self._write(writes, gone, current)

    def _add(self, edits: list[SessionEdit], sessions: list[Session],
             entries: list[CtEntry]) -> None:
        """Create ``entries`` (one per edit); those whose key the kernel holds already
        become updates of what it holds, as each edit settles over it."""
        with self._lock:
            results = self.ct.create(entries)
            clashes = [i for i, code in enumerate(results)
                       if code and ERRNO_REASONS.get(code) == "exists"]
            clashing = set(clashes)
            failed = self._first_failure(
                [None if i in clashing else code for i, code in enumerate(results)]
                if clashes else results, entries, {})
            held: dict[tuple, CtEntry] = {}
            if failed is None and clashes:
                held = {e.key: e for e in self.ct.get([self._probe(edits[i].key)
                                                      for i in clashes]) if e is not None}
                try:
                    settled = [self._settle(edits[i], entries[i], held) for i in clashes]
                except BackendError as exc:
                    failed = exc
                else:
                    for i, session in zip(clashes, settled, strict=True):
                        sessions[i] = session
                    failed = self._update(self._entries(settled), held)
            if failed is not None:
                self.ct.delete([e for e, code in zip(entries, results, strict=True)
                                if not code])
                raise failed
            written = dict(zip(map(_entry_key, entries), zip(sessions, entries, strict=True),
                               strict=True))
            self._remember_counts(written, held)
            self._imported += len(entries) - len(clashes)

    def _take_away(self, edits: list[SessionEdit]) -> None:
        """Delete the entries the kernel holds under the edits' keys. Whether each is held
        is all a delete or remove needs to know: the kernel's answers stay unparsed, and are
        read only to put back what was deleted when a later delete fails."""
        probes = [self._probe(edit.key) for edit in edits]
        with self._lock:
            held = self.ct.get_messages(probes)
            for edit, message in zip(edits, held, strict=True):
                if message is None:
                    edit.result(None)  # raises for a delete of what is not there
            gone = [probe for probe, message in zip(probes, held, strict=True) if message]
            messages = list(filter(None, held))
            self._delete(gone, lambda i: parse_message(messages[i]))
            for entry in gone:  # what they brought left with them
                self._offsets.pop(entry.key, None)

    def _settle(self, edit: SessionEdit, entry: CtEntry, held: dict[tuple, CtEntry]
                ) -> Session:
        """What ``edit`` makes of the session the kernel holds under its key; a key the
        kernel refused to create but does not hold clashes with another session's reply
        (its translated port is taken)."""
        old = held.get(entry.key)
        if old is None:
            raise BackendError("conntrack refused the session (port taken): its reply "
                               "tuple is another session's", edit.key, "port taken")
        session = edit.result(self._session(old))
        assert session is not None  # adding edits never take an entry away
        return session

    def _write(self, upserts: list[Session], deletes: list[SessionKey],
               current: dict[tuple, CtEntry]) -> None:
        """Write settled sessions and take keys away; ``current``: the kernel's entries
        under every key concerned, just read."""
        refuse_unholdable(self, upserts)
        entries = self._entries(upserts)
        wanted = dict(zip(map(_entry_key, entries), zip(upserts, entries, strict=True),
                          strict=True))
        with self._lock:
            deletes = [current[k] for k in map(self._native_key, deletes)
                       if k in current and k not in wanted]
            creates = [e for k, (_, e) in wanted.items() if k not in current]
            updates = [e for k, (_, e) in wanted.items() if k in current]
            self._delete(deletes)
            results = self.ct.create(creates)
            failed = self._first_failure(results, creates, current)
            if failed is None:
                failed = self._update(updates, current)
            if failed is not None:
                # Only what this batch created: a refused create names an entry that
                # was there before, and stays.
                self.ct.delete([e for e, code in zip(creates, results, strict=True)
                                if not code])
                self.ct.create(deletes)
                raise failed
            self._remember_counts(wanted, current)
            self._imported += len(creates)
            for entry in deletes:  # what they brought left with them
                self._offsets.pop(entry.key, None)

    def _update(self, updates: list[CtEntry], held: dict[tuple, CtEntry]
                ) -> BackendError | None:
        """Update entries the kernel holds; on a refusal, put back what ``held`` says
        they were, and say why."""
        failed = self._first_failure(self.ct.update(updates), updates, held)
        if failed is not None:
            self.ct.update([held[e.key] for e in updates])
        return failed

    def _delete(self, entries: list[CtEntry],
                original: Callable[[int], CtEntry] | None = None) -> None:
        """Delete, or delete nothing: a session that vanished meanwhile (expired) is fine.
        On a refusal the deleted ones are created again, as ``original`` (by index) says
        they were when ``entries`` name them by their keys only."""
        results = self.ct.delete(entries)
        failed = [(e, c) for e, c in zip(entries, results, strict=True)
                  if c and ERRNO_REASONS.get(c) != "missing"]
        if failed:
            self.ct.create([original(i) if original else entries[i]
                            for i, code in enumerate(results) if not code])
            entry, code = failed[0]
            raise BackendError(f"conntrack refused to delete the session: "
                               f"{os.strerror(code)}", self._key(entry),
                               ERRNO_REASONS.get(code, "failed"))

    def _first_failure(self, results: list[int | None], entries: list[CtEntry],
                       current: dict) -> BackendError | None:
        for index, code in enumerate(results):
            if code:
                entry = entries[index]
                reason = ERRNO_REASONS.get(code, "failed")
                if reason == "exists" and entry.key not in current:
                    reason = "port taken"  # the reply tuple clashes with another session
                detail = self.ct.last_messages().get(index, os.strerror(code))
                return BackendError(f"conntrack refused the session ({reason}): {detail}",
                                    self._key(entry), reason)
        return None

    def _remember_counts(self, written: dict[tuple, tuple[Session, CtEntry]],
                         current: dict[tuple, CtEntry]) -> None:
        """What each written session brought along beyond what the kernel has counted for
        it, to add to the kernel's counts from now on (a moved session keeps counting from
        where it was; a new kernel entry starts at zero)."""
        offsets = self._offsets
        if not current:  # all new: the counts are what the sessions brought (the bulk case)
            counts = list(map(_counts_of, map(itemgetter(0), written.values())))
            if None not in chain.from_iterable(counts):
                offsets.update(zip(written, counts, strict=True))
                return
        for key, (session, _) in written.items():
            counts = session[_COUNTS]
            if counts == _NO_COUNTS:
                continue
            old = current.get(key)
            if old is None and None not in counts:
                offsets[key] = counts
                continue
            kernel = old[_ENTRY_COUNTS] if old is not None else (0, 0, 0, 0)
            offsets[key] = tuple(max(0, (c or 0) - k)
                                 for c, k in zip(counts, kernel, strict=True))

    # -- conversion between model and kernel -------------------------------------------
    def _session(self, e: CtEntry) -> Session | None:
        """The model's view of one kernel entry; None for a protocol the model lacks."""
        return next(self._sessions_from((e,)), None)

    def _sessions_from(self, entries: Iterable[CtEntry]) -> Iterator[Session]:
        """The model's view of kernel entries (those of a protocol the model has), with the
        counts a session brought along added. A loop, names bound once: a dump converts
        every entry of the table."""
        texts, text = self._text, self._addr_text
        offsets = self._offsets
        names = PROTOCOL_NAMES
        state_name = _STATE_NAMES.get
        for (_family, proto, src, dst, sport, dport, nat_addr, nat_port, dnat_addr, dnat_port,
             state, ws_orig, ws_reply, timeout, o_packets, o_bytes, r_packets, r_bytes
             ) in entries:
            protocol = names.get(proto)
            if protocol is None:
                continue  # e.g. GRE or SCTP: not in the model
            if proto == TCP:
                state = state_name(state)
            else:
                state = ws_orig = ws_reply = None
            if offsets:
                extra = offsets.get((proto, src, sport, dst, dport))  # CtEntry.key
                if extra is not None:
                    o_packets += extra[0]
                    o_bytes += extra[1]
                    r_packets += extra[2]
                    r_bytes += extra[3]
            yield new_session((
                protocol, texts.get(src) or text(src), sport, texts.get(dst) or text(dst),
                dport, (texts.get(nat_addr) or text(nat_addr)) if nat_addr else None,
                nat_port, (texts.get(dnat_addr) or text(dnat_addr)) if dnat_addr else None,
                dnat_port, state, ws_orig, ws_reply, timeout, o_packets, o_bytes, r_packets,
                r_bytes))

    def _entries(self, sessions: Iterable[Session]) -> list[CtEntry]:
        """The kernel entries for sessions: an edit converts every session it writes. A
        loop, names bound once, tuples made in C."""
        packed, pack = self._packed, self._addr_bytes
        numbers, states, timeout_for = PROTOCOL_NUMBERS, TCP_STATE_NUMBERS, \
            self._config.policy.timeout_for
        entries = []
        for (protocol, src, sport, dst, dport, nat, nat_port, dnat, dnat_port, state, ws_orig,
             ws_reply, timeout, _op, _ob, _rp, _rb) in sessions:
            proto = numbers[protocol]
            src_bytes = packed.get(src) or pack(src)
            entries.append(new_entry((
                socket.AF_INET if len(src_bytes) == 4 else socket.AF_INET6, proto, src_bytes,
                packed.get(dst) or pack(dst), sport, 0 if proto in ECHO_REPLY else dport,
                (packed.get(nat) or pack(nat)) if nat else None, nat_port,
                (packed.get(dnat) or pack(dnat)) if dnat else None, dnat_port,
                states.get(state or "established") if proto == TCP else None,
                ws_orig, ws_reply, timeout or timeout_for(protocol, state), 0, 0, 0, 0)))
        return entries

    def _native_key(self, key: SessionKey) -> tuple:
        protocol, src, sport, dst, dport = key
        proto = PROTOCOL_NUMBERS[protocol]
        return (proto, self._addr_bytes(src), sport, self._addr_bytes(dst),
                0 if proto in ECHO_REPLY else dport)

    def _key(self, e: CtEntry) -> SessionKey:
        return (PROTOCOL_NAMES.get(e.proto, str(e.proto)), self._addr_text(e.src), e.sport,
                self._addr_text(e.dst), e.dport)

    def _addr_text(self, packed: bytes) -> str:
        text = self._text.get(packed)
        if text is None:
            family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
            text = socket.inet_ntop(family, packed)
            if len(self._text) < 1 << 17:
                self._text[packed] = text
        return text

    def _addr_bytes(self, text: str) -> bytes:
        packed = self._packed.get(text)
        if packed is None:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            packed = socket.inet_pton(family, text)
            if len(self._packed) < 1 << 17:
                self._packed[text] = packed
        return packed
