"""The one currency of session writes: a batch of edits, one operation per entry.

An edit says what the request said (its operation, the leaves it sets, the leaves it takes
away); what it makes of an entry depends on whether the NF holds that entry, which only
the backend learns, from the NF itself (a kernel's EEXIST, a table's lookup). So a batch
goes to ``Backend.apply`` as it was read, and the backend settles each entry with
:meth:`SessionEdit.result`, RFC 6241's rules for one entry, written once here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from itertools import repeat
from operator import attrgetter
from types import MappingProxyType
from typing import NamedTuple

from .base import SESSION_FIELDS, BackendError, Session, SessionKey, session_key

# Operations that write the whole entry the edit states when the NF does not hold it.
ADDING = frozenset({"merge", "replace", "create"})
NOTHING_REMOVED: Mapping[str, str] = MappingProxyType({})


class SessionEdit(NamedTuple):
    """One entry of a write: its operation (create, merge, replace, delete, remove, or none:
    only the leaves' own operations apply), the leaves it sets (the others None in
    ``session``) and the non-key leaves it takes away (name -> delete | remove)."""

    operation: str
    session: Session
    present: tuple[str, ...] = SESSION_FIELDS
    removed: Mapping[str, str] = NOTHING_REMOVED

    @property
    def key(self) -> SessionKey:
        return session_key(self.session)

    def result(self, existing: Session | None) -> Session | None:
        """The entry after this edit, over ``existing`` (None: the NF does not hold it);
        None when the entry goes. Raises BackendError (exists, missing) as RFC 6241 §7.2
        has the operation fail."""
        op = self.operation
        if op == "create" and existing is not None:
            raise BackendError(f"nat-session {key_text(self.key)} already exists", self.key,
                               "exists")
        if op in ("delete", "remove"):
            if op == "delete" and existing is None:
                raise BackendError(f"nat-session {key_text(self.key)} does not exist, so it "
                                   "cannot be deleted", self.key, "missing")
            return None
        if existing is None:
            if op == "none":
                raise BackendError(f"nat-session {key_text(self.key)} does not exist", self.key,
                                   "missing")
            missing = [f for f, how in self.removed.items() if how == "delete"]
            if missing:
                raise BackendError(f"leaf {missing[0]} of nat-session {key_text(self.key)} does "
                                   "not exist, so it cannot be deleted", self.key, "missing")
            return self.session
        if op == "replace":
            return self.session
        missing = [f for f, how in self.removed.items()
                   if how == "delete" and getattr(existing, f) is None]
        if missing:
            raise BackendError(f"leaf {missing[0]} of nat-session {key_text(self.key)} does not "
                               "exist, so it cannot be deleted", self.key, "missing")
        values = {} if op == "none" else {n: getattr(self.session, n) for n in self.present}
        return existing._replace(**values, **dict.fromkeys(self.removed))


new_edit = partial(tuple.__new__, SessionEdit)  # a SessionEdit made in C from a 4-tuple
_operation = attrgetter("operation")
_session = attrgetter("session")


class SessionBatch:
    """Edits a backend applies all or nothing, in the request's order."""

    __slots__ = ("edits",)

    def __init__(self, edits: list[SessionEdit]):
        self.edits = edits

    @classmethod
    def put(cls, sessions: Iterable[Session] = (), remove: Iterable[SessionKey] = ()
            ) -> SessionBatch:
        """Whole sessions written over whatever the NF holds under their keys, and keys
        taken away if held: a batch whose outcome does not depend on what is there."""
        edits = list(map(new_edit, zip(repeat("replace"), sessions, repeat(SESSION_FIELDS),
                                       repeat(NOTHING_REMOVED))))
        edits += [SessionEdit("remove", Session(*key)) for key in remove]
        return cls(edits)

    def __len__(self) -> int:
        return len(self.edits)

    def __bool__(self) -> bool:
        return bool(self.edits)

    def keys(self) -> list[SessionKey]:
        return list(map(session_key, map(_session, self.edits)))

    def sessions(self) -> list[Session]:
        return list(map(_session, self.edits))

    @property
    def adds_whole_entries(self) -> bool:
        """Whether every edit writes what it states when the entry is absent (create,
        merge, replace, no leaf taken away): over absent entries nothing can fail."""
        return set(map(_operation, self.edits)) <= ADDING and \
            not any(map(attrgetter("removed"), self.edits))

    def results(self, existing: Mapping[SessionKey, Session]
                ) -> tuple[list[Session], list[SessionKey]]:
        """Each edit settled over ``existing`` (what the NF holds under the batch's keys,
        which are unique: an edit naming an entry twice is refused before it gets here):
        the sessions to write and the held keys to take away. Raises the first edit's
        BackendError."""
        writes: list[Session] = []
        gone: list[SessionKey] = []
        for edit in self.edits:
            key = edit.key
            new = edit.result(existing.get(key))
            if new is not None:
                writes.append(new)
            elif key in existing:
                gone.append(key)
        return writes, gone


def key_text(key: SessionKey) -> str:
    proto, src, sport, dst, dport = key
    return f"{proto} {src}:{sport} -> {dst}:{dport}"
