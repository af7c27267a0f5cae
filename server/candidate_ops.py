"""The candidate datastore's operations on :class:`~.datastore.Datastores` (RFC 6241 §8.3,
§8.4): commit, confirmed or not, its confirmation, cancel and expiry (the record and undo
are :mod:`.confirmed_commit`'s), and discard-changes.
"""

from __future__ import annotations

import logging

from nfmig.nf_backends.base import Session
from nfmig.nf_backends.batch import SessionBatch

from . import nacm
from .confirmed_commit import PendingConfirm
from .errors import RpcError
from .gc_pause import collector_paused

log = logging.getLogger("nfmig.server.datastore")


class CandidateOperations:
    """Mixed into Datastores, whose state (the candidate, running's policy and /nacm, the
    pending confirmed commit, the lock) these operations change."""

    def commit(self, session_id: int, *, confirmed: bool = False, timeout: int = 600,
               persist: str | None = None, persist_id: str | None = None) -> None:
        """Candidate into running. A confirmed commit is undone unless confirmed (by a
        plain commit of the same session, or one naming its persist id) within timeout."""
        with self._lock, collector_paused():
            self.locks.check_writable("running", session_id)
            pending = self._confirmed.check(session_id, persist_id)
            candidate = self._candidate
            changes: dict[tuple, Session | None] = {}
            live: dict[tuple, Session] = {}
            if candidate is not None and candidate.modified:
                changes = candidate.sessions
                # what the commit writes into running, checked for the one committing
                nacm.guard_write([(self._policy, candidate.policy if candidate.policy_changed
                                   else self._policy),
                                  (self._nacm, candidate.nacm if candidate.nacm_changed
                                   else self._nacm)],
                                 lambda: put_batch(changes), self._held({}))
                if confirmed:  # to undo it, what running holds under every key
                    live = self.backend.lookup(list(changes))
            if confirmed:  # recorded (on disk too) before the backend changes
                self._confirmed.remember(session_id, persist, timeout, self._policy,
                                         candidate is not None and candidate.policy_changed,
                                         changes, live)
            if candidate is not None and candidate.modified:
                try:
                    self._commit_changes(candidate.policy, candidate.policy_changed,
                                         put_batch(changes))
                except RpcError:
                    if pending is None and confirmed:
                        self._confirmed.settle()
                    raise
                if candidate.nacm_changed:
                    if confirmed and not self._nacm_before:
                        self._nacm_before.append(self._nacm)  # what a rollback puts back
                    self._nacm = candidate.nacm
                self._candidate = None
            if not confirmed and pending is not None:
                self._nacm_before.clear()
                self._confirmed.settle()
                log.info("confirmed commit confirmed by session %s", session_id)

    def cancel_commit(self, session_id: int, persist_id: str | None) -> None:
        with self._lock, collector_paused():
            self._confirmed.cancel(session_id, persist_id)

    def session_ended(self, session_id: int) -> None:
        """A confirmed commit without persist ends with its session (RFC 6241 §8.4.1)."""
        with self._lock, collector_paused():
            self._confirmed.session_ended(session_id)

    def _expire(self, pending: PendingConfirm) -> None:
        with self._lock, collector_paused():
            if self._confirmed.pending is pending:  # not confirmed or extended meanwhile
                self._confirmed.roll_back("its confirm timeout expired")

    def _undo(self, pending: PendingConfirm) -> int:
        """Put running back as a confirmed commit found it; the sessions written."""
        # each previous session written again, each one the commit created taken away
        undo = pending.undo_sessions
        self._commit_changes(pending.undo_policy, pending.policy_changed, put_batch(undo))
        if self._nacm_before:
            self._nacm = self._nacm_before.pop()
        return len(undo)

    def discard_changes(self, session_id: int) -> None:
        with self._lock:
            self.locks.check_writable("candidate", session_id)
            self._candidate = None


def put_batch(changes: dict[tuple, Session | None]) -> SessionBatch:
    """Settled entries (None: gone) as a batch whose outcome depends on nothing held."""
    return SessionBatch.put([s for s in changes.values() if s is not None],
                            [k for k, s in changes.items() if s is None])
