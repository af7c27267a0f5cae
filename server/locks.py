"""Datastore locks (RFC 6241 §7.5, §7.6): which session holds each datastore, and what a
lock forbids the other sessions."""

from __future__ import annotations

from . import errors


class DatastoreLocks:
    def __init__(self) -> None:
        self._holders: dict[str, int] = {}

    def get(self, datastore: str) -> int | None:
        """The session holding ``datastore``'s lock, if any."""
        return self._holders.get(datastore)

    def take(self, datastore: str, session_id: int, refusal: str | None = None) -> None:
        """Lock ``datastore`` for the session; lock-denied when another holds it, or with
        ``refusal`` (why the datastore cannot be locked now) when there is one."""
        holder = self._holders.get(datastore)
        if holder is not None:
            raise errors.lock_denied(f"{datastore} is already locked by session {holder}",
                                     holder)
        if refusal is not None:
            raise errors.lock_denied(refusal, 0)
        self._holders[datastore] = session_id

    def give_back(self, datastore: str, session_id: int) -> None:
        holder = self._holders.get(datastore)
        if holder is None:
            raise errors.operation_failed(f"{datastore} is not locked", type="protocol")
        if holder != session_id:
            raise errors.lock_denied(f"{datastore} is locked by session {holder}", holder)
        del self._holders[datastore]

    def release(self, session_id: int) -> list[str]:
        """Every lock the session held (it ended, or was killed), now free."""
        held = [ds for ds, sid in self._holders.items() if sid == session_id]
        for ds in held:
            del self._holders[ds]
        return held

    def check_writable(self, datastore: str, session_id: int) -> None:
        """in-use when another session holds ``datastore``'s lock."""
        holder = self._holders.get(datastore)
        if holder is not None and holder != session_id:
            raise errors.in_use(f"{datastore} is locked by session {holder}")
