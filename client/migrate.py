"""The migrator: moves a selection of NAT sessions from source NF instances to target ones
through NETCONF, live: the connections keep flowing while their state moves.

Phases, each timed, logged and reported:

- connect; negotiate (hello + yang-library of every end); announce (rpc
  announce-migration, started); lock (targets' candidate and running, sources' running);
- the copy, while traffic flows (copy.py): track (each source records what changes from
  now on); prepare (what the targets hold under their selection, and its session digest;
  the gateway addresses to move); read (get-data, operational) and edit (the targets'
  candidates), which overlap on NETCONF ends: each source's reply is parsed and written to
  the targets block by block as it arrives, and each phase records its own wall time
  (a RESTCONF end reads whole, then edits); check (conflicts between sources, once every
  source is read); validate (and what each target cannot hold); the targets' policies;
  commit (confirmed, with the migration's persist-id); verify (the session digest, or a
  read back); precopy (rounds of what changed meanwhile, delta.py);
- the window: freeze (new sessions of the selection held on the sources); delta (the last
  changes, written and committed); confirm (the commit point); switchover (gateway
  addresses onto the targets, then off the sources, or the switchover command); thaw;
- delete (on the sources, only now that no traffic reaches them there);
- on every way out: unlock, thaw, and announce finished or failed.

Before the commit point a failure rolls back (discard, cancel-commit, or a restore of
what a target held before) and the sources keep every session; after it nothing is taken
off a target again (recovery.py). Running the same migration again after any failure
completes it: writes are merges, deletes are removes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime

from ncclient.operations.rpc import RPCError

from nfmig.digest import MODULUS, entries_digest, parse_output

from .checks import Checks
from .copy import Copy
from .delta import Delta
from .endpoints import (
    Connection,
    Credentials,
    Endpoint,
    EndpointError,
    describe,
    open_connection,
)
from .ends import End, MigrationError, Options, SourceEnd, TargetEnd, failure_after_commit
from .firewall_state import FirewallState, firewall_problems
from .ietf_nat import IetfNatConnection, IndexPlan
from .ietf_nat import problems as ietf_nat_problems
from .negotiate import problems, read_facts
from .recovery import Recovery
from .report import EndpointReport, PhaseRecord, Report
from .selection import Selection, Split, parse_entries
from .switchover import Switching

# The API in one import: Migration(sources, targets, selection, options).run() -> Report
__all__ = ["Credentials", "Endpoint", "Migration", "MigrationError", "Options", "Report",
           "Selection", "Split"]

log = logging.getLogger(__name__)


class Migration(Checks, Copy, Delta, Recovery, Switching, FirewallState):
    """Moves ``selection`` from ``sources`` to ``targets``.

    ``selection`` is a :class:`Selection` (one target) or a :class:`Split` that names the
    target of each subscriber prefix (``targets`` may then be left empty). Endpoints are
    :class:`Endpoint` objects or ``netconf://user@host:port`` text.
    """

    def __init__(self, sources: Sequence[Endpoint | str],
                 targets: Sequence[Endpoint | str] | Endpoint | str | None,
                 selection: Selection | Split | None = None, options: Options | None = None):
        self.options = options or Options()
        selection = selection or Selection.all()
        if isinstance(targets, Endpoint | str):
            targets = [targets]
        source_eps = [_endpoint(s) for s in sources]
        target_eps = [_endpoint(t) for t in targets or []]
        self.split: Split | None = None
        if isinstance(selection, Split):
            self.split = Split([(net.with_prefixlen, _endpoint(t))
                                for net, t in selection.routes])
            for _, t in self.split.routes:
                if t not in target_eps:
                    target_eps.append(t)
            unused = [t for t in target_eps if all(t != r for _, r in self.split.routes)]
            if unused:
                raise ValueError(f"no --split prefix goes to {unused[0]}")
            self.selection = self.split.selection
        else:
            if len(target_eps) != 1:
                raise ValueError("several targets need a split by prefix (Split)")
            self.selection = selection
        if not source_eps:
            raise ValueError("a migration needs at least one source")
        for group, what in ((source_eps, "source"), (target_eps, "target")):
            if len(set(group)) != len(group):
                raise ValueError(f"the same {what} is named twice")
        both = set(source_eps) & set(target_eps)
        if both:
            raise ValueError(f"{both.pop()} is both a source and a target")
        self.migration_id = self.options.migration_id or (
            f"nfmig-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}")
        self.report = Report(self.migration_id, str(self.split or self.selection),
                             dry_run=self.options.dry_run,
                             keep_source=self.options.keep_source,
                             vm_image_bytes=self.options.vm_image_bytes,
                             vm_memory_bytes=self.options.vm_memory_bytes)
        self.sources = [SourceEnd(e, "source", EndpointReport(str(e), "source"))
                        for e in source_eps]
        self.targets = [TargetEnd(e, "target", EndpointReport(str(e), "target"),
                                selection=self.split.selection_for(e) if self.split
                                else self.selection) for e in target_eps]
        self._freeze_t0: float | None = None
        self.committed = False  # every target confirmed: from here on only forward
        self.left_behind: set[tuple] = set()  # keys a target cannot hold (--partial)
        self._init_firewall_state()
        # names the targets' confirmed commits: only this migration confirms or cancels them
        self.persist_id = f"{self.migration_id}-{secrets.token_hex(4)}"

    @property
    def ends(self) -> list[End]:
        return [*self.sources, *self.targets]

    def connection(self, endpoint: Endpoint | str) -> Connection | None:
        """The live connection to one end (for callers that watch or test a migration)."""
        wanted = _endpoint(endpoint)
        return next((e.conn for e in self.ends if e.endpoint == wanted), None)

    def counts(self) -> tuple[int, int]:
        """The sessions read from the sources and the message bytes exchanged with every
        end so far (for a progress bar: read while the migration runs, from another
        thread)."""
        sessions = sum(len(s.entries) for s in self.sources)
        moved = sum(e.report.bytes_sent + e.report.bytes_received
                    + (e.conn.bytes_sent + e.conn.bytes_received if e.conn else 0)
                    for e in self.ends)
        return sessions, moved

    def expected_steps(self) -> int:
        """About how many phase steps a successful run reports (for a progress bar)."""
        s, t = len(self.sources), len(self.targets)
        return 11 * s + 14 * t + (s > 1)

    # -- running -----------------------------------------------------------------------
    def run(self) -> Report:
        """Migrate; never raises for a failed migration: the report says what happened."""
        started = time.perf_counter()
        self.report.started = _now()
        failure: MigrationError | None = None
        try:
            self._steps()
        except MigrationError as exc:
            failure = exc
        except KeyboardInterrupt:
            failure = MigrationError("interrupted")
        except Exception as exc:  # a bug: still roll back, and say so in the report
            log.exception("migration %s: unexpected error", self.migration_id)
            failure = MigrationError(f"internal error: {exc!r}")
        finally:
            self._finish(failure)
            self.report.total_seconds = round(time.perf_counter() - started, 6)
        return self.report

    async def run_async(self) -> Report:
        """:meth:`run` in a worker thread, for asyncio programs."""
        import asyncio  # here: the command line, which has no event loop, starts faster

        return await asyncio.to_thread(self.run)

    def _steps(self) -> None:
        self._connect()
        self._negotiate()
        if self.options.finish:
            self._finish_copy()
            return
        dry = self.options.dry_run
        if not dry:
            self._announce("started")
        self._lock()
        # The copy, while traffic flows.
        self._track()
        self._copy()
        self._validate()
        self._check_policies()
        if dry:
            for t in self.targets:
                if t.staged:
                    with self._phase("discard", t):
                        t.conn.discard_changes()
                        t.staged = False
            self.report.result = "dry-run"
            return
        self._commit()
        self._verify()
        self._survey_pinholes()
        with self.options.window() if self.options.window else nullcontext():
            self._precopy()
            # The short window: what changed since the copy, then the traffic moves.
            self._freeze()
            self._delta()
            self._move_pinholes()
            self._confirm()
            self.committed = True
            self._switchover()
            self._thaw()
        self._delete()
        self._delete_pinholes()
        self.report.sessions_moved = sum(len(t.entries) for t in self.targets)
        self.report.result = "success"

    @contextmanager
    def _phase(self, name: str, end: End | None = None, fatal: bool = True
               ) -> Iterator[PhaseRecord]:
        """Time, log and record one phase on one end; turn its failure into a reason."""
        record, t0 = self._open_phase(name, end)
        try:
            yield record
        except Exception as exc:
            failure = self._close_phase(record, t0, end, exc)
            if isinstance(exc, MigrationError):
                raise
            if fatal:
                raise failure from exc
        except BaseException:
            self._close_phase(record, t0, end)
            raise
        else:
            self._close_phase(record, t0, end)

    def _open_phase(self, name: str, end: End | None = None) -> tuple[PhaseRecord, float]:
        """A phase's start, for one that does not run inside a ``with`` (the copy's read and
        edits overlap); :meth:`_close_phase` records it."""
        label = str(end.endpoint) if end else None
        if self.options.on_phase:
            self.options.on_phase(name, label)
        return PhaseRecord(name, 0.0, label), time.perf_counter()

    def _close_phase(self, record: PhaseRecord, t0: float, end: End | None,
                     exc: BaseException | None = None) -> MigrationError | None:
        """Record, time and log a phase; when ``exc`` failed it, the migration's reason."""
        failure = None
        if isinstance(exc, MigrationError):
            record.ok, record.detail = False, exc.reason
            failure = exc
        elif exc is not None:
            record.ok, record.detail = False, describe(exc)
            where = f" on {end}" if end else ""
            refused = isinstance(exc, EndpointError) or (
                isinstance(exc, RPCError) and exc.tag in ("lock-denied", "in-use"))
            failure = MigrationError(f"{record.name}{where}: {describe(exc)}",
                                     "refused" if refused and record.name in ("connect", "lock")
                                     else "failed")
        record.seconds = round(time.perf_counter() - t0, 6)
        self.report.phases.append(record)
        log.log(logging.INFO if record.ok else logging.WARNING, "%s%s: %.3f s%s", record.name,
                f" {record.endpoint}" if record.endpoint else "", record.seconds,
                "" if record.ok else f" FAILED: {record.detail}")
        return failure

    # -- phases ------------------------------------------------------------------------
    def _connect(self) -> None:
        def open_one(end: End) -> None:
            with self._phase("connect", end):
                end.conn = open_connection(end.endpoint, self.options.credentials,
                                           self.options.rpc_timeout,
                                           self.options.connect_timeout)
                if self.options.model == "ietf-nat":
                    end.conn = IetfNatConnection(end.conn, plan, end.role == "source")
        plan = IndexPlan()  # the sources' indices, for the targets
        # Parallel: an SSH handshake is mostly waiting, and many-to-one has many ends.
        with ThreadPoolExecutor(max_workers=min(8, len(self.ends))) as pool:
            results = [pool.submit(open_one, end) for end in self.ends]
        for result in results:
            result.result()  # the first failure, in the ends' order

    def _negotiate(self) -> None:
        ends = []
        for end in self.ends:
            with self._phase("negotiate", end):
                end.facts = read_facts(end.conn)
            nat = end.facts.nat
            end.report.module = str(nat) if nat else None
            ends.append((str(end.endpoint), end.role, end.facts))
        found = problems(ends, self.options.require_revision, self.options.require_features)
        found += firewall_problems(ends)
        if self.options.model == "ietf-nat":
            found += ietf_nat_problems(ends)
        if self.options.freeze:
            found += self._probe_freeze()
        if found:
            raise MigrationError("capabilities do not match: " + "; ".join(found), "refused")
        for t in self.targets:
            t.report.confirmed_commit = t.facts.confirmed_commit

    def _probe_freeze(self) -> list[str]:
        """Ask each source to thaw this migration: harmless (nothing is frozen yet, and
        thawing a closed window is no error), and tells whether it implements the window."""
        found = []
        for s in self.sources:
            with self._phase("negotiate", s):
                try:
                    s.conn.nat_rpc("thaw", **{"migration-id": self.migration_id})
                except RPCError as exc:
                    if exc.tag not in ("operation-not-supported", "unknown-element",
                                       "unknown-namespace"):
                        raise
                    found.append(f"source {s.endpoint} does not implement the nfmig-nat "
                                 "operations freeze and thaw; move without a freeze window "
                                 "(--no-freeze) or upgrade it")
        return found

    def _announce(self, event: str, reason: str | None = None) -> None:
        """announce-migration on every end it can reach; a failure here is only a warning:
        the notification informs others, the migration does not depend on it."""
        for end in self.ends:
            conn = end.conn if end.conn and end.conn.connected else None
            if conn is None:
                self.report.warnings.append(f"{end}: no migration-event ({event}) announced: "
                                            "not connected")
                continue
            peers = self.targets if end.role == "source" else self.sources
            leaves = {"migration-id": self.migration_id, "role": end.role,
                      "peer": " ".join(str(p.endpoint) for p in peers)[:255], "event": event,
                      "selection": self.report.selection[:1024],
                      "sessions": self._session_count(end, event) if event != "started"
                      else None,
                      "window-start": self.report.freeze_start or
                      (_now() if event == "started" and self.options.freeze else None),
                      "window-end": self.report.freeze_end if event != "started" else None,
                      "reason": reason[:1024] if reason else None}
            with self._phase("announce" if event == "started" else "finish", end, fatal=False):
                try:
                    conn.nat_rpc("announce-migration", **leaves)
                except Exception as exc:
                    self.report.warnings.append(f"{end}: announce-migration ({event}) "
                                                f"failed: {describe(exc)}")
                    raise

    def _session_count(self, end: End, event: str) -> int:
        if event != "finished":
            return 0
        if isinstance(end, TargetEnd):
            return len(end.entries)
        return end.report.deleted if not self.options.keep_source else len(end.entries)

    def _lock(self) -> None:
        for t in self.targets:
            for datastore in ("candidate", "running"):
                with self._phase("lock", t):
                    t.conn.lock(datastore)
                    t.locked.append(datastore)
        if self.options.keep_source or self.options.dry_run:
            return  # the sources are only read
        for s in self.sources:  # nobody else edits the sessions being moved
            with self._phase("lock", s):
                s.conn.lock("running")
                s.locked.append("running")

    def _freeze(self) -> None:
        if not self.options.freeze:
            self.report.warnings.append("no freeze window: sessions the sources open during "
                                        "the migration stay on them")
            return
        prefixes = self.selection.freeze_prefixes()
        for s in self.sources:
            with self._phase("freeze", s):
                s.frozen = True  # from the request on: thawing a window never opened is fine
                s.conn.nat_rpc("freeze", **{"migration-id": self.migration_id,
                                            "source-prefix": prefixes,
                                            "timeout": self.options.freeze_timeout})
            if self._freeze_t0 is None:
                self._freeze_t0 = time.perf_counter()
                self.report.freeze_start = _now()

    def _commit(self) -> None:
        """Candidate into running, as a confirmed commit with the migration's persist-id:
        a confirmation that comes too late then fails instead of committing nothing."""
        for t in self.targets:
            if not t.staged:
                continue
            with self._phase("commit", t):
                before, t.commit = t.commit, "unknown"  # until a reply says what happened
                try:
                    if t.facts.confirmed_commit:
                        extend = self.persist_id if before == "pending" else None
                        t.conn.commit(confirmed=True, timeout=self.options.confirm_timeout,
                                      persist=self.persist_id, persist_id=extend)
                        t.commit = "pending"
                    else:
                        t.conn.commit()
                        t.commit = "done"
                except RPCError:
                    t.commit = before  # an answered commit that failed applied nothing
                    raise
                t.staged = False

    def _verify(self) -> None:
        """Each target holds every moved session with its translation. Its session digest
        shows it when it is what the target had before, less the sessions written over,
        plus the moved ones; otherwise (another digest, none to be had) a read of every
        session decides, as the reference the digest stands in for."""
        before = getattr(self, "_digests_before", {})
        for t in self.targets:
            if t.commit == "none":
                continue
            with self._phase("verify", t) as record:
                why = before.get(t, "no digest before the edit")
                if not isinstance(why, str):
                    why = self._digest_differs(t, why)
                if why is None:
                    record.detail = f"digest matched: {len(t.entries)} sessions"
                    continue
                text = t.conn.get_data("running", t.selection.filter_xml())
                found = {e.key: e for e in parse_entries(text)}
                missing = [e for e, _ in t.entries if e.key not in found]
                changed = [e for e, _ in t.entries
                           if e.key in found and found[e.key].endpoint != e.endpoint]
                record.detail = (f"full read ({why}): {len(t.entries) - len(missing)} of "
                                 f"{len(t.entries)} found")
                if missing or changed:
                    first = (missing or changed)[0].key_text()
                    raise MigrationError(
                        f"verify on {t}: {len(missing)} of {len(t.entries)} sessions missing "
                        f"and {len(changed)} with another translated endpoint after the commit"
                        f" (first: {first}; full read: {why})")

    def _digest_differs(self, t: TargetEnd, before: tuple[int, int]) -> str | None:
        """Why the target's digest is not the one expected after the commit; None when it
        is. The expected one is worked out while the target computes its own."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            asked = pool.submit(self._session_digest, t)
            overwritten = entries_digest((e.key, t.before[e.key].xml) for e, _ in t.entries
                                         if e.key in t.before)
            moved = entries_digest((e.key, e.xml) for e, _ in t.entries)
            found = asked.result()
        if isinstance(found, str):
            return found
        count = before[0] - overwritten[0] + moved[0]
        total = (before[1] - overwritten[1] + moved[1]) % MODULUS
        if found == (count, total):
            return None
        return (f"digest differed: {found[0]} sessions, {count} expected" if found[0] != count
                else "digest differed")

    def _session_digest(self, t: TargetEnd) -> tuple[int, int] | str:
        """The target's count and digest of the sessions under its selection (rpc
        session-digest), or why there is none."""
        if t.selection.kind == "xpath":
            return "an XPath selection has no digest"
        offered = getattr(t.conn, "operations", None)  # a RESTCONF end lists them
        if offered is not None and "nfmig-nat:session-digest" not in offered:
            return "the target does not implement session-digest"
        try:
            output = t.conn.nat_rpc_output("session-digest", **{
                "source-prefix": t.selection.freeze_prefixes() or None})
        except RPCError as exc:
            if exc.tag in ("operation-not-supported", "unknown-element", "unknown-namespace"):
                return "the target does not implement session-digest"
            return f"session-digest failed: {describe(exc)}"
        return parse_output(output) or "the target's session-digest answer has no digest"

    def _confirm(self) -> None:
        """The commit point: once every target has confirmed, the sessions are theirs."""
        for t in self.targets:
            if t.commit == "pending":
                with self._phase("confirm", t):
                    t.commit = "confirming"  # a lost reply leaves it unknown
                    try:
                        t.conn.commit(persist_id=self.persist_id)
                    except RPCError as exc:
                        # answered: not confirmed; the confirmed commit may have timed out
                        t.commit = "unknown"
                        raise MigrationError(
                            f"confirm on {t}: {describe(exc)} (the confirmed commit was "
                            f"rolled back by the target: --confirm-timeout "
                            f"{self.options.confirm_timeout} s passed before the "
                            "confirmation?)") from exc
                    t.commit = "done"

    def _delete(self) -> None:
        if self.options.keep_source:
            return
        left = [s for s in self.sources if s.entries and not self._delete_forward(s)]
        for s in self.sources:
            s.report.deleted = len(s.entries) if s.delete == "done" else 0
        if left:
            for s in left:
                self.report.warnings.append(f"{len(s.entries)} sessions are still on {s} "
                                            "(and on their target)")
            raise failure_after_commit(f"delete on {left[0]} failed")

    def _finish_copy(self) -> None:
        """The second step of a copy (--keep-source) once the traffic has been switched by
        other means: each selected session the targets hold, with the same translation, is
        deleted from its source; the others stay, and the report names how many."""
        for s in self.sources:
            with self._phase("lock", s):
                s.conn.lock("running")
                s.locked.append("running")
        self._read()
        held: dict[tuple, tuple | None] = {}
        for t in self.targets:
            with self._phase("read", t):
                text = t.conn.get_data("running", t.selection.filter_xml())
                held.update((e.key, e.endpoint) for e in parse_entries(text))
        for s in self.sources:
            copied = [e for e in s.entries if e.key in held and held[e.key] == e.endpoint]
            if len(copied) < len(s.entries):
                self.report.warnings.append(
                    f"{len(s.entries) - len(copied)} sessions stay on {s}: no target holds "
                    "them (with the same translation)")
            s.entries = copied
        self.committed = True
        self._delete()
        self.report.sessions_moved = sum(len(s.entries) for s in self.sources)
        self.report.result = "success"

    # -- every way out -----------------------------------------------------------------
    def _finish(self, failure: MigrationError | None) -> None:
        if failure is not None:
            self.report.result = failure.result
            self.report.reason = failure.reason
            self.report.conflicts = failure.conflicts
            log.warning("migration %s %s: %s", self.migration_id, failure.result,
                        failure.reason)
            if self.committed:
                self.report.cleanup_complete = False
            else:
                self._rollback()
                self._take_back_firewall_state()
        self._stop_tracking()
        self._unlock()
        self._thaw()
        if failure is not None and any(p.name == "edit" for p in self.report.phases):
            self._account()
        if not self.options.dry_run and any(e.conn for e in self.ends):
            self._announce("failed" if failure else "finished",
                           failure.reason if failure else None)
        for end in self.ends:
            if end.conn is not None:
                end.conn.close()
                end.report.add_traffic(end.conn)
        self.report.endpoints = [e.report for e in self.ends]

    def _close_window(self) -> None:
        if self._freeze_t0 is None or self.report.freeze_seconds is not None:
            return
        seconds = time.perf_counter() - self._freeze_t0
        self.report.freeze_end = _now()
        self.report.freeze_seconds = round(seconds, 6)
        if seconds > self.options.freeze_timeout:
            self.report.warnings.append(
                f"the window took {seconds:.1f} s, longer than the freeze timeout "
                f"({self.options.freeze_timeout} s): sessions opened after it closed stay "
                "on the sources; raise --freeze-timeout")


def _endpoint(value: Endpoint | str) -> Endpoint:
    return value if isinstance(value, Endpoint) else Endpoint.parse(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
