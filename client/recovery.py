"""Every way out of a migration: rollback before the commit point, settling what a lost
reply left unknown, and the account of where the sessions are.

The commit point is the moment every target has confirmed its commit. Before it, the
sources hold every session and a failure takes the copies off the targets (discard,
cancel-commit, or a restore of what a target held before). After it, the targets hold
every session and nothing is ever taken off them again: a failure to switch the traffic
or to delete on a source leaves sessions on both sides, which the report says, and which
running the same migration again resolves.
"""

from __future__ import annotations

import logging
import time

from ncclient.operations.rpc import RPCError

from .endpoints import Connection, EndpointError, describe, open_connection
from .ends import End, SourceEnd, TargetEnd
from .selection import Entry, parse_entries, removal_xml, replacement_xml

log = logging.getLogger(__name__)
_RESTORE_TRIES = 25  # a lost session's locks go when its server notices, a moment later
_RETRY_PAUSE = 0.2


class Recovery:
    """The part of :class:`~nfmig.client.migrate.Migration` that runs when things fail."""

    # set by Migration
    sources: list[SourceEnd]
    targets: list[TargetEnd]
    committed: bool

    def _rollback(self) -> None:
        """Before the commit point: every copy comes off its target."""
        for t in self.targets:
            if t.commit in ("unknown", "confirming"):
                self._settle_commit(t)
            try:
                self._undo(t)
            except Exception as exc:
                self.report.cleanup_complete = False
                self.report.warnings.append(
                    f"rollback on {t} failed ({describe(exc)}): the {len(t.entries)} sessions "
                    f"written there are on their source too, and "
                    + ("its unconfirmed commit is undone by its server when it runs again "
                       "(or within the confirm timeout)" if t.commit == "pending" else
                       "stay there")
                    + "; run the same migration again once it is reachable to complete "
                    "the move")

    def _settle_commit(self, t: TargetEnd) -> None:
        """A commit or its confirmation whose reply was lost: find out whether it took.

        cancel-commit with the migration's persist-id undoes a commit still pending, and
        fails when none is: then the sessions the commit wrote are in running only if it was
        confirmed (a rolled-back commit took them away)."""
        conn = self._reconnect(t)
        if conn is None:
            t.commit = "pending" if t.facts and t.facts.confirmed_commit else "unknown"
            return
        if t.facts and t.facts.confirmed_commit:
            with self._phase("settle", t, fatal=False) as record:
                try:
                    conn.cancel_commit(self.persist_id)
                    t.commit = "none"
                    record.detail = "the pending commit was cancelled"
                    return
                except RPCError:
                    pass  # no commit of ours is pending: confirmed, or never made
        with self._phase("settle", t, fatal=False) as record:
            text = conn.get_data("running", t.selection.filter_xml())
            held = {e.key for e in parse_entries(text)}
            ours = [e.key for e, _ in t.entries if e.key not in t.before]
            t.commit = "done" if ours and all(k in held for k in ours) else "none"
            record.detail = f"the commit {'took' if t.commit == 'done' else 'did not take'}"

    def _undo(self, t: TargetEnd) -> None:
        if t.commit == "none":
            if t.staged and t.conn and t.conn.connected:
                with self._phase("discard", t, fatal=False):
                    t.conn.discard_changes()
            # a lost session's candidate goes with its lock (RFC 6241 §8.3.5.2)
            t.staged = False
            return
        conn = self._reconnect(t)
        if conn is None:
            raise EndpointError(f"{t.endpoint} is unreachable")
        if t.commit == "pending":
            with self._phase("cancel-commit", t):
                conn.cancel_commit(self.persist_id)
                t.commit = "none"
                return
        # Done: put back what the target held under the moved keys before. (The gateway
        # addresses move only past the commit point, which no rollback comes after.)
        new = [e for e, _ in t.entries if e.key not in t.before]
        old = list(t.before.values())
        if not new and not old:
            t.commit = "none"
            return
        body = removal_xml(new) + replacement_xml(old)
        with self._phase("restore", t):
            self._retry_in_use(lambda: (conn.edit_config(body, "candidate"),
                                        conn.commit()))
            t.commit = "none"

    # -- after the commit point ---------------------------------------------------------
    def _delete_forward(self, s: SourceEnd) -> bool:
        """Delete the moved sessions on a source, reconnecting and sending the delete again
        when a reply is lost: removing what is already gone is no error, so a delete that
        was late and one sent again end the same way. False if it could not be done."""
        body = removal_xml(s.entries)
        for attempt in range(3):
            conn = self._reconnect(s) if attempt else s.conn
            if conn is None or not conn.connected:
                continue
            with self._phase("delete", s, fatal=False) as record:
                self._retry_in_use(lambda c=conn: c.edit_config(body, "running"))
                s.delete = "done"
                record.detail = f"{len(s.entries)} sessions"
                return True
        return False

    @staticmethod
    def _retry_in_use(action) -> None:
        for attempt in range(_RESTORE_TRIES):
            try:
                action()
                return
            except RPCError as exc:
                if exc.tag not in ("in-use", "lock-denied") or attempt == _RESTORE_TRIES - 1:
                    raise
                time.sleep(_RETRY_PAUSE)

    # -- the account ---------------------------------------------------------------------
    def _account(self) -> None:
        """Read where the selected sessions are now, on every end that answers."""
        selected: dict[tuple, Entry] = {e.key: e for s in self.sources for e in s.entries}
        if not selected:
            return
        on: dict[str, set[tuple]] = {"source": set(), "target": set()}
        unread = False
        for end in [*self.sources, *self.targets]:
            conn = self._reconnect(end)
            if conn is None:
                unread = True
                continue
            with self._phase("account", end, fatal=False) as record:
                text = conn.get_data("running", self.selection.filter_xml())
                held = {e.key for e in parse_entries(text)} & selected.keys()
                on[end.role] |= held
                record.detail = f"{len(held)} of the selected sessions"
            if not record.ok:
                unread = True
        if unread:
            self.report.placement = {"unknown": len(selected)}
            return
        both = on["source"] & on["target"]
        self.report.placement = {
            "source_only": len(on["source"] - both), "target_only": len(on["target"] - both),
            "both": len(both), "neither": len(selected.keys() - on["source"] - on["target"])}

    # -- connections ---------------------------------------------------------------------
    def _reconnect(self, end: End) -> Connection | None:
        if end.conn is not None and end.conn.connected:
            return end.conn
        if end.unreachable:
            return None
        with self._phase("reconnect", end, fatal=False):
            try:
                conn = end.conn.reopen(min(self.options.connect_timeout, 10)) if end.conn \
                    else open_connection(end.endpoint, self.options.credentials,
                                         self.options.rpc_timeout,
                                         min(self.options.connect_timeout, 10))
            except Exception:
                end.unreachable = True
                raise
            old, held = end.conn, end.locked
            end.conn, end.locked = conn, []
            if old is not None:
                old.close()
                end.report.add_traffic(old)
                if held:
                    self._take_over(end, old.session_id, held)
            return conn
        return None

    def _take_over(self, end: End, old_session: str | None, held: list[str]) -> None:
        """The old session may still hold its locks on a server that has not noticed it is
        gone (a stalled link): end it, so its late requests cannot land after ours, and
        lock again what it held."""
        if old_session:
            with self._phase("kill-session", end, fatal=False):
                try:
                    end.conn.kill_session(old_session)
                except RPCError as exc:
                    if exc.tag != "invalid-value":  # already gone: that is what we want
                        raise
        for datastore in held:
            with self._phase("lock", end, fatal=False):
                self._retry_in_use(lambda d=datastore: end.conn.lock(d))
                end.locked.append(datastore)

    def _unlock(self) -> None:
        for end in [*self.sources, *self.targets]:
            conn = end.conn
            for datastore in reversed(end.locked):
                if conn is None or not conn.connected:
                    break  # the server released them with the session
                with self._phase("unlock", end, fatal=False):
                    conn.unlock(datastore)
            end.locked = []

    def _thaw(self) -> None:
        for s in self.sources:
            if not s.frozen:
                continue
            conn = self._reconnect(s)
            if conn is None:
                self.report.warnings.append(
                    f"{s} not thawed (unreachable): its NAT ends the window by itself within "
                    f"{self.options.freeze_timeout} s of the freeze")
                continue
            with self._phase("thaw", s, fatal=False) as record:
                conn.nat_rpc("thaw", **{"migration-id": self.migration_id})
                s.frozen = False
            if not record.ok:
                self.report.warnings.append(f"{s} not thawed ({record.detail}): its NAT ends "
                                            "the window by itself")
        self._close_window()
