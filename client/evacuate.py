"""A site evacuation: many NATs moved at once, each by a :class:`Migration` of its own.

    plan = Plan.load("site-a.yaml")
    report = Evacuation(plan, EvacuationOptions(parallel=4, state_file=Path("a.state"))).run()

The migrations run in threads of this process, at most ``parallel`` at once and
``per_target`` into one target (a migration locks its target's datastores, so a second one
into the same target waits for the first). A target with a capacity takes a pair only if
its session count, read from it as the pair starts, plus what the pairs running into it
bring, leaves room for the pair's sessions. Each migration keeps its own guarantees (every
session moved exactly once, the switchover, its report); the freeze windows are gated
(evacuate_gate.py) so that running many at once does not stretch them.

The job's state is kept in a file (evacuate_plan.JobState): run again with ``resume``, only
what is not done runs. A pair found running was interrupted: it is settled the way
``nfmig migrate`` settles one, by running the same migration again (same id), after
cancelling the confirmed commit its interrupted run may have left pending on its target
(under the persist-id the state file kept): before the commit point the sources still hold
every session, after it running again completes the move.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ncclient.operations.rpc import RPCError

from .endpoints import Credentials, Endpoint, describe, open_connection
from .evacuate_gate import WindowGate
from .evacuate_plan import JobState, Pair, PairState, Plan, PlanError
from .evacuate_report import SiteReport
from .migrate import Migration
from .netconf import NAT_NS
from .report import Report

__all__ = ["Evacuation", "EvacuationOptions", "Plan", "PlanError", "SiteReport"]

log = logging.getLogger(__name__)
COUNT_FILTER = (f'<subtree-filter><nat-state xmlns="{NAT_NS}"><session-count/></nat-state>'
                "</subtree-filter>")
_COUNT = re.compile(r"<(?:[\w.-]+:)?session-count\b[^>]*>\s*(\d+)\s*<")


@dataclass
class EvacuationOptions:
    """How the plan runs (the plan's defaults say how each migration does)."""

    parallel: int = 4  # migrations at once
    per_target: int = 1  # migrations into one target at once
    state_file: Path | None = None  # the job's state, rewritten after each change
    resume: bool = False  # continue the job in state_file: run only what is not done
    windows: int = 1  # NATs in their freeze window at once
    quiet_windows: bool = True  # the others pause at a phase boundary while one is open
    settle: float = 2.0  # longest a window waits for the others' phases to end
    dry_run: bool | None = None  # instead of the plan's
    credentials: Credentials | None = None  # instead of the plan's
    on_change: Callable[[PairStatus], None] | None = None  # a pair's state or phase changed


@dataclass
class PairStatus:
    """A pair as it stands now, for a progress display."""

    id: str
    source: str
    target: str | None
    state: str
    phase: str | None = None
    migration: Migration | None = None
    report: Report | None = None
    note: str | None = None  # why it waits, or failed before its migration began

    def sessions(self) -> int:
        if self.migration is not None:
            return self.migration.counts()[0]
        return self.report.sessions_moved if self.report else 0


class Evacuation:
    """Runs a plan; :meth:`run` never raises for a failed NAT: the report says."""

    def __init__(self, plan: Plan, options: EvacuationOptions | None = None):
        self.plan = plan
        self.options = options or EvacuationOptions()
        if self.options.parallel < 1 or self.options.per_target < 1:
            raise ValueError("parallel and per_target must be at least 1")
        self.dry_run = plan.defaults.dry_run if self.options.dry_run is None \
            else self.options.dry_run
        path = None if self.dry_run else self.options.state_file
        if self.options.resume and path is not None:
            self.job = JobState.resume(plan, path)
        else:
            self.job = JobState(plan, path)
        self.credentials = _shared_prompt(self.options.credentials
                                          or plan.defaults.credentials())
        self.gate = WindowGate(self.options.windows, self.options.quiet_windows,
                               self.options.settle)
        self.status = {p.id: PairStatus(p.id, str(p.source), s.target, s.state)
                       for p in plan.pairs for s in [self.job.pairs[p.id]]}
        self._pairs = {p.id: p for p in plan.pairs}
        self._cond = threading.Condition()
        self._running: dict[str, str] = {}  # pair id -> its target
        self._reserved: dict[str, int] = {}  # pair id -> sessions it brings its target
        self._stopping = False
        self._queue: list[str] = []
        self._threads: list[threading.Thread] = []
        self._failed_now: set[str] = set()  # failed in this run before their migration

    def todo(self) -> list[str]:
        """The pairs this run has to do: those not done (none in a dry run)."""
        return [i for i, s in self.job.pairs.items() if s.state != "done" or self.dry_run]

    def run(self) -> SiteReport:
        started = time.perf_counter()
        report = SiteReport(self.plan.origin, self.plan.digest, _now(), self.dry_run)
        todo = self.todo()
        reports: dict[str, Report] = {}
        if not todo:
            report.nothing_to_do = True
        else:
            self.job.save()
            try:
                if self.plan.pool:
                    self._assign(todo)
                self._schedule(todo, reports)
            except KeyboardInterrupt:
                # No more pairs start; those running finish, unless interrupted again: then
                # the state file says they were running, and a resumed job settles them.
                self.stop()
                report.interrupted = True
                try:
                    self._join()
                except KeyboardInterrupt:
                    pass
        report.seconds = round(time.perf_counter() - started, 6)
        report.interrupted = report.interrupted or self._stopping
        for pair_id, state in self.job.pairs.items():
            report.nats.append(self._nat(state, reports.get(pair_id), pair_id in todo))
        return report

    def stop(self) -> None:
        """Start no more pairs; those running finish (call from another thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- assigning a pool's targets ----------------------------------------------------
    def _assign(self, todo: list[str]) -> None:
        """Each source without a target goes to the one with the most room: its session
        count read from it, plus what the plan assigned it and has not moved yet, against
        its capacity. Assignments are kept in the state: a resumed job keeps them."""
        unassigned = [i for i in todo if self.job.pairs[i].target is None]
        if not unassigned:
            return
        capacities = {t.endpoint: t.capacity for t in self.plan.targets}
        ends = [self._pairs[i].source for i in unassigned] + list(capacities)
        with ThreadPoolExecutor(max_workers=min(8, len(ends))) as pool:
            counts = dict(zip(ends, pool.map(self._count_or_reason, ends), strict=True))
        room: dict[Endpoint, int] = {}
        for target, capacity in capacities.items():
            if isinstance(counts[target], int):
                pending = sum(s.estimate or 0 for s in self.job.pairs.values()
                              if s.target == str(target) and s.state != "done")
                room[target] = (capacity or 0) - counts[target] - pending
            else:
                log.warning("pool target %s left out: %s", target, counts[target])
        order = sorted(unassigned, key=lambda i: -_as_int(counts[self._pairs[i].source]))
        for pair_id in order:
            found = counts[self._pairs[pair_id].source]
            if not isinstance(found, int):
                self._fail(pair_id, f"cannot read its session count: {found}")
                continue
            best = max(room, key=lambda t: room[t], default=None)
            if best is None or room[best] < found:
                self._fail(pair_id, f"no pool target has room for its {found} sessions ("
                           + (f"most room: {room[best]} on {best}" if best is not None
                              else "no target could be read") + ")")
                continue
            room[best] -= found
            self.job.update(pair_id, target=str(best), estimate=found)
            self._pairs[pair_id] = replace(self._pairs[pair_id], target=best)
            self._set(pair_id, target=str(best))

    # -- running -----------------------------------------------------------------------
    def _schedule(self, todo: list[str], reports: dict[str, Report]) -> None:
        with self._cond:
            self._queue = [i for i in todo if self._pairs[i].target is not None
                           and i not in self._failed_now]
            while True:
                if not self._stopping:
                    for pair_id in list(self._queue):
                        if self._can_start(pair_id):
                            self._queue.remove(pair_id)
                            self._running[pair_id] = str(self._pairs[pair_id].target)
                            thread = threading.Thread(target=self._worker,
                                                      args=(pair_id, reports),
                                                      name=f"evacuate-{pair_id}", daemon=True)
                            self._threads.append(thread)
                            thread.start()
                if not self._running and (not self._queue or self._stopping):
                    break
                self._cond.wait()
        self._join()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _can_start(self, pair_id: str) -> bool:
        pair = self._pairs[pair_id]
        busy = {str(self._pairs[i].source) for i in self._running}
        into = sum(t == str(pair.target) for t in self._running.values())
        return (len(self._running) < self.options.parallel and str(pair.source) not in busy
                and into < self.options.per_target)

    def _worker(self, pair_id: str, reports: dict[str, Report]) -> None:
        try:
            report = self._attempt(pair_id)
            if report is not None:
                reports[pair_id] = report
        except Exception as exc:  # a bug: the pair fails, the others go on
            log.exception("pair %s: unexpected error", pair_id)
            self._fail(pair_id, f"internal error: {exc!r}")
        finally:
            with self._cond:
                self._running.pop(pair_id, None)
                self._reserved.pop(pair_id, None)
                self._cond.notify_all()

    def _attempt(self, pair_id: str) -> Report | None:
        pair, state = self._pairs[pair_id], self.job.get(pair_id)
        assert pair.target is not None
        capacity = self.plan.capacity_of(pair.target)
        if capacity is not None and not self.dry_run and not self._admit(pair, capacity):
            return None
        options = replace(self.plan.defaults.options(), credentials=self.credentials,
                          dry_run=self.dry_run, migration_id=state.migration_id)
        if state.interrupted and not self.dry_run:
            self._set(pair_id, state="running", note="settling its interrupted run")
            why = self._settle(pair, state)
            if why is not None:
                self._fail(pair_id, why, interrupted=True)
                return None
        migration = Migration([pair.source], [pair.target], pair.selection, options)
        worker = threading.get_ident()

        def on_phase(name: str, endpoint: str | None) -> None:
            if threading.get_ident() == worker:
                self.gate.boundary(pair_id)
            self._set(pair_id, phase=name)

        options.on_phase = on_phase
        options.window = lambda: self.gate.window(pair_id)
        self.job.update(pair_id, state="running", migration_id=migration.migration_id,
                        persist_id=None if self.dry_run else migration.persist_id,
                        attempts=state.attempts + 1)
        self._set(pair_id, state="running", migration=migration, note=None)
        self.gate.begin(pair_id)
        try:
            report = migration.run()
        finally:
            self.gate.end(pair_id)
        if self._lock_refused(pair_id, report):
            self.job.update(pair_id, state="pending", summary=_summary(report))
            self._set(pair_id, state="pending", migration=None, phase=None,
                      note=f"waiting for {pair.target}: another migration holds it")
            with self._cond:
                self._queue.append(pair_id)
            return None
        done = "dry-run" if self.dry_run else "done"
        self.job.update(pair_id, state=done if report.ok else "failed",
                        interrupted=False, summary=_summary(report),
                        persist_id=None if report.ok else migration.persist_id)
        self._set(pair_id, state=done if report.ok else "failed", migration=None,
                  report=report, phase=None, note=report.reason)
        return report

    def _lock_refused(self, pair_id: str, report: Report) -> bool:
        """Refused because another of this job's migrations holds its target's lock: it
        runs again once that one ends."""
        with self._cond:
            target = self._running.get(pair_id)
            others = any(t == target for i, t in self._running.items() if i != pair_id)
        return others and report.result == "refused" and any(
            p.name == "lock" and not p.ok and ("lock-denied" in (p.detail or "")
                                               or "in-use" in (p.detail or ""))
            for p in report.phases)

    def _admit(self, pair: Pair, capacity: int) -> bool:
        """Room on the target for the pair's sessions, by the target's own count; while
        pairs running into it may free or take room, wait for them."""
        need = self.job.get(pair.id).estimate
        if need is None:
            found = self._count_or_reason(pair.source)
            if not isinstance(found, int):
                self._fail(pair.id, f"cannot read its source's session count: {found}")
                return False
            need = found
        while True:
            held = self._count_or_reason(pair.target)
            if not isinstance(held, int):
                self._fail(pair.id, f"cannot read its target's session count: {held}")
                return False
            with self._cond:
                others = [i for i, t in self._running.items()
                          if t == str(pair.target) and i != pair.id]
                coming = sum(self._reserved.get(i, 0) for i in others)
                if held + coming + need <= capacity:
                    self._reserved[pair.id] = need
                    return True
                if not others:
                    break
                self._set(pair.id, note=f"waiting for room on {pair.target}")
                self._cond.wait(5)
        self._fail(pair.id, f"{pair.target} holds {held} sessions of its capacity {capacity}: "
                   f"no room for {need} more", result="refused")
        return False

    def _settle(self, pair: Pair, state: PairState) -> str | None:
        """Before an interrupted pair runs again: cancel the confirmed commit its
        interrupted run may have left pending on the target. None, or why it could not."""
        if not state.persist_id:
            return None
        try:
            conn = open_connection(pair.target, self.credentials,
                                   self.plan.defaults.timeout,
                                   self.plan.defaults.connect_timeout)
        except Exception as exc:
            return f"cannot settle its interrupted run: {describe(exc)}"
        try:
            conn.cancel_commit(state.persist_id)
            log.info("pair %s: the pending commit of its interrupted run was cancelled",
                     pair.id)
        except RPCError:
            pass  # none pending: confirmed (the sessions are the target's) or never made
        except Exception as exc:
            return f"cannot settle its interrupted run: {describe(exc)}"
        finally:
            conn.close()
        self.job.update(pair.id, persist_id=None)
        return None

    # -- bookkeeping ---------------------------------------------------------------------
    def _count_or_reason(self, endpoint: Endpoint) -> int | str:
        try:
            return session_count(endpoint, self.credentials, self.plan.defaults.timeout,
                                 self.plan.defaults.connect_timeout)
        except Exception as exc:
            return describe(exc)

    def _fail(self, pair_id: str, reason: str, result: str = "failed",
              interrupted: bool = False) -> None:
        log.warning("pair %s: %s", pair_id, reason)
        self._failed_now.add(pair_id)
        self.job.update(pair_id, state="failed", interrupted=interrupted,
                        summary={"result": result, "reason": reason, "cleanup_complete": True})
        self._set(pair_id, state="failed", note=reason, phase=None)

    def _set(self, pair_id: str, **changes: Any) -> None:
        status = self.status[pair_id]
        announce = any(k in changes and changes[k] != getattr(status, k)
                       for k in ("state", "phase", "note", "target"))
        for key, value in changes.items():
            setattr(status, key, value)
        if announce and self.options.on_change:
            self.options.on_change(status)

    def _nat(self, state: PairState, report: Report | None, ran: bool) -> dict[str, Any]:
        summary = state.summary or {}
        return {"id": state.id, "source": state.source, "target": state.target,
                "select": state.select,
                "state": "dry-run" if self.dry_run and report and report.ok else state.state,
                "migration_id": state.migration_id, "attempts": state.attempts,
                "done_before": not ran and state.state == "done",
                "reason": summary.get("reason"),
                "cleanup_complete": summary.get("cleanup_complete", True),
                "summary": summary, "report": report.to_dict() if report else None}


def session_count(endpoint: Endpoint, credentials: Credentials, timeout: float = 600,
                  connect_timeout: float = 30) -> int:
    """The sessions an NF instance holds, as it reports them (nat-state/session-count)."""
    conn = open_connection(endpoint, credentials, timeout, connect_timeout)
    try:
        text = conn.get_data("operational", COUNT_FILTER)
    finally:
        conn.close()
    found = _COUNT.search(text)
    if found is None:
        raise ValueError(f"{endpoint} reports no nat-state/session-count")
    return int(found.group(1))


def _summary(report: Report) -> dict[str, Any]:
    return {"result": report.result, "reason": report.reason,
            "cleanup_complete": report.cleanup_complete,
            "sessions_moved": report.sessions_moved,
            "sessions_selected": report.sessions_selected,
            "seconds": report.total_seconds, "freeze_seconds": report.freeze_seconds,
            "placement": report.placement}


def _shared_prompt(credentials: Credentials) -> Credentials:
    """Many migrations connect at once: ask the terminal for the password once, not once
    per endpoint and from several threads together."""
    if credentials.prompt is None:
        return credentials
    ask, lock, answer = credentials.prompt, threading.Lock(), []

    def prompt(endpoint: Endpoint) -> str:
        with lock:
            if not answer:
                answer.append(ask(endpoint))
            return answer[0]
    return replace(credentials, prompt=prompt)


def _as_int(value: int | str) -> int:
    return value if isinstance(value, int) else -1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
