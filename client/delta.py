"""The delta of a live migration: what the sources opened, changed or ended between the
copy (made while traffic flows) and the freeze, written to the targets inside the window.

A source that keeps a change record (rpc track-changes before the copy, rpc changes after
it) answers with just those sessions. While traffic still flows, rounds of them are
written (each with what changed during the one before, the record started over by each
read), until a round is small; under the freeze only the last round's changes remain, so
the window does not grow with the table. Any other source, or an XPath selection, is read
whole again in the window.
"""

from __future__ import annotations

from ncclient.operations.rpc import RPCError

from .endpoints import describe
from .ends import SourceEnd, TargetEnd
from .selection import (
    Entry,
    entries_xml,
    followed_state,
    parse_changes,
    removal_xml,
)

PRECOPY_ROUNDS = 4  # rounds of copying changes while traffic flows, at most
PRECOPY_SMALL = 100  # a round this small is the last before the window


class Delta:
    """The delta's part of :class:`~nfmig.client.migrate.Migration`."""

    def _track(self) -> None:
        """Before the copy: each source records from now on which sessions of the selection
        change (rpc track-changes), so that the window reads just those. A source without
        it, or an XPath selection (its sessions are known only by reading), is read whole
        again in the window."""
        if self.selection.kind == "xpath":
            return
        prefixes = self.selection.freeze_prefixes()
        for s in self.sources:
            with self._phase("track", s, fatal=False) as record:
                try:
                    s.conn.nat_rpc("track-changes", **{
                        "migration-id": self.migration_id, "source-prefix": prefixes,
                        "timeout": max(600, int(self.options.rpc_timeout))})
                    s.tracking = True
                except RPCError as exc:
                    record.detail = f"{describe(exc)}: read whole in the window"

    def _precopy(self) -> None:
        """While traffic still flows: bring the copies up to date in rounds, each with what
        changed during the one before, until a round is small; the window then holds only
        the last round's changes (a copy of 100k sessions takes seconds, in which a busy
        NAT opens thousands)."""
        if not self.sources or not all(s.tracking for s in self.sources):
            return
        for _ in range(PRECOPY_ROUNDS):
            if self._delta(last=False) <= PRECOPY_SMALL:
                return

    def _delta(self, last: bool = True) -> int:
        """Bring the copies up to date with what the sources opened, changed (translation,
        TCP state) or ended since the last look; ``last``: under the freeze, the final one.
        How many sessions it wrote or removed."""
        added: list[tuple[Entry, SourceEnd]] = []
        changed: list[tuple[Entry, SourceEnd]] = []
        ended: list[tuple[Entry, SourceEnd]] = []
        phase = "delta" if last else "precopy"
        for s in self.sources:
            with self._phase(phase, s) as record:
                new, moved, gone = self._source_delta(s, last)
                record.detail = (f"{len(new)} new, {len(moved)} changed, {len(gone)} ended "
                                 "since the last look")
            added += [(e, s) for e in new]
            changed += [(e, s) for e in moved]
            ended += [(e, s) for e in gone]
        for what, found in (("new", added), ("changed", changed), ("ended", ended)):
            self.report.delta[what] = self.report.delta.get(what, 0) + len(found)
        if last:
            self.report.delta["in the window"] = len(added) + len(changed) + len(ended)
        if changed or ended:
            for t in self.targets:
                t.entries = []
            for s in self.sources:
                for entry in s.entries:
                    self._target_of(entry).entries.append((entry, s))
        else:  # only new ones: no pass over every session inside the window
            for entry, s in added:
                self._target_of(entry).entries.append((entry, s))
        self._count_selected()
        for t in self.targets:
            write = [e for e, _ in (*added, *changed) if self._target_of(e) is t]
            gone = [e for e, _ in ended if self._target_of(e) is t]
            if write or gone:
                self._write_delta(t, write, gone, phase)
        return len(added) + len(changed) + len(ended)

    def _source_delta(self, s: SourceEnd, last: bool
                      ) -> tuple[list[Entry], list[Entry], list[Entry]]:
        """New, changed and ended sessions of one source since the last look; ``s.entries``
        becomes what it holds now. From its change record when it keeps one (dropped by
        the last look, started over by the others), else from reading the whole selection
        again."""
        if s.tracking:
            s.tracking = not last
            changes = parse_changes(s.conn.nat_rpc_output(
                "changes", **{"migration-id": self.migration_id,
                              "stop" if last else "restart": ""}))
            if not changes.overflow:
                copied = s.index()
                now = {e.key: e for e in changes.sessions if self.selection.matches(e)
                       and e.key not in self.left_behind}
                gone = [copied.pop(key) for key in changes.ended if key in copied]
                new = [e for key, e in now.items() if key not in copied]
                moved = [e for key, e in now.items() if key in copied
                         and followed_state(copied[key]) != followed_state(e)]
                copied.update(now)
                if gone or moved:
                    s.set_entries(list(copied.values()))
                else:  # only new ones: the list and its index grow together
                    s.entries.extend(new)
                return new, moved, gone
        copied = {e.key: e for e in s.entries}
        now_list = [e for e in self._read_selection(s) if e.key not in self.left_behind]
        new, moved = [], []
        for e in now_list:
            old = copied.pop(e.key, None)
            if old is None:
                new.append(e)
            elif followed_state(old) != followed_state(e):
                moved.append(e)
        s.set_entries(now_list)
        return new, moved, list(copied.values())

    def _write_delta(self, t: TargetEnd, write: list[Entry], gone: list[Entry],
                     phase: str) -> None:
        with self._phase(phase, t) as record:
            t.staged = True
            size = t.conn.edit_config(entries_xml(write) + removal_xml(gone), "candidate")
            record.detail = f"{len(write)} sessions written, {len(gone)} removed"
        self.report.state_bytes += size
        if write:
            self._validate()
        self._commit()

    def _stop_tracking(self) -> None:
        """A source still recording changes for this migration stops (the record would
        go by itself at its timeout, but following the NF's changes costs it meanwhile)."""
        for s in self.sources:
            if s.tracking and s.conn is not None and s.conn.connected:
                with self._phase("track", s, fatal=False):
                    s.conn.nat_rpc_output("changes", **{"migration-id": self.migration_id,
                                                        "stop": ""})
                s.tracking = False

