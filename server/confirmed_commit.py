"""Confirmed commits (RFC 6241 §8.4): the one that may be pending, its timer, and its undo
record in the state directory.

The record is on disk because a NAT's sessions can outlive the server: the Linux backend's
are conntrack entries in the kernel, so a server killed while a confirmed commit is pending
would leave its unconfirmed sessions in place for good. The record is written before the
commit touches the backend and removed once the commit is confirmed, cancelled or rolled
back; a server that finds one at start rolls that commit back (Datastores.load_startup).

The file, ``pending-commit.json``, is one JSON object::

    {"version": 1, "session_id": 7, "persist": "p-1" or null,
     "deadline": 1764961200.5,            (wall-clock seconds: when it would have expired)
     "undo_policy": "<nat-policy ...>" or null, "policy_changed": true,
     "session_fields": ["protocol", ...],  (the order of the session lists below)
     "undo_sessions": [[key, null or the previous session's fields], ...]}

where each key is the list [protocol, src_address, src_port, dst_address, dst_port], and
null means the commit created that session (rolling back deletes it).

A follow-up confirmed commit (a migration's delta, moments before it confirms) writes only
what it adds, to ``pending-commit.1.json``, ``.2.json`` and so on: the same fields, with
the sessions it touches for the first time; rewriting the whole record would cost as much
as the first commit's. An extension without its base record is left over from a commit
settled while the extensions were being removed, and means nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, SESSION_FIELDS, Session

from . import errors
from .errors import RpcError

log = logging.getLogger(__name__)

PENDING_FILE = "pending-commit.json"
RECORD_VERSION = 1


class RecordError(ValueError):
    """The undo record on disk cannot be read back."""


@dataclass
class PendingConfirm:
    """A confirmed commit awaiting its confirming commit: who may confirm or cancel it, and
    how to put running back as it was."""

    session_id: int
    persist: str | None
    undo_policy: etree._Element | None
    undo_sessions: dict[tuple, Session | None]  # None: the session did not exist before
    policy_changed: bool = False
    deadline: float = 0.0  # time.time() at which it is rolled back unless confirmed
    timer: threading.Timer | None = None
    extensions: int = 0  # follow-up commits recorded beside the first


class ConfirmedCommit:
    """The confirmed commit pending on one server, if any: in memory, on a timer that calls
    ``expire`` with it, and on disk at ``state_dir``/pending-commit.json. ``undo`` puts
    running back as a PendingConfirm recorded it (returning how many sessions it wrote, and
    raising RpcError if the backend refuses).

    Not thread-safe by itself: the datastore calls it under its own lock (``expire`` runs on
    the timer's thread and must take that lock, then check the commit is still pending).
    """

    def __init__(self, state_dir: Path, undo: Callable[[PendingConfirm], int],
                 expire: Callable[[PendingConfirm], None]) -> None:
        self.path = Path(state_dir) / PENDING_FILE
        self.pending: PendingConfirm | None = None
        self._undo = undo
        self._expire = expire

    def check(self, session_id: int, persist_id: str | None) -> PendingConfirm | None:
        """The pending commit, if ``session_id`` (naming ``persist_id``) may confirm or
        cancel it; an RpcError if it may not, or if it names a persist id and none is
        pending."""
        pending = self.pending
        if pending is None:
            if persist_id is not None:
                raise errors.invalid_value("no confirmed commit is pending, so persist-id "
                                           "names nothing", info={"bad-element": "persist-id"})
        elif pending.persist is not None:
            if persist_id != pending.persist:
                raise errors.invalid_value("persist-id does not match the pending confirmed "
                                           "commit's persist", info={"bad-element":
                                                                     "persist-id"})
        elif session_id != pending.session_id:
            raise errors.in_use(f"a confirmed commit of session {pending.session_id} is "
                                "pending; only that session may confirm or cancel it")
        return pending

    def remember(self, session_id: int, persist: str | None, timeout: int,
                 policy: etree._Element | None, policy_changed: bool,
                 changed: Iterable[tuple], before: Mapping[tuple, Session]) -> PendingConfirm:
        """Record what running holds before a confirmed commit (``before``: its sessions under
        the ``changed`` keys; ``policy``: its policy), durably, and (re)start the timer. A
        follow-up confirmed commit extends the pending one: the first of a series keeps its
        policy and the sessions it recorded, later ones add the keys they touch.

        Call it before the commit changes the backend. Raises operation-failed, having
        changed nothing, when the record cannot be written: without it a server that dies
        could not undo the commit."""
        old = self.pending
        if old is None:
            undo = {key: before.get(key) for key in changed}
            new = PendingConfirm(session_id, persist, policy, undo, policy_changed)
            added = undo
        else:
            # A copy, so that a failed write leaves the pending commit as it was.
            added = {key: before.get(key) for key in changed if key not in old.undo_sessions}
            undo = {**old.undo_sessions, **added}
            new = PendingConfirm(old.session_id, persist, old.undo_policy, undo,
                                 old.policy_changed or policy_changed,
                                 extensions=old.extensions + 1)
        new.deadline = time.time() + timeout
        try:
            if old is None:
                self._remove_extensions()  # left by a commit settled mid-removal
                write_record(self.path, new)
            else:
                write_record(self._extension(new.extensions), new, added)
        except OSError as exc:
            raise errors.operation_failed(
                f"the confirmed commit was not applied: its undo record {self.path} cannot be "
                f"written ({exc})") from None
        if old is not None and old.timer is not None:
            old.timer.cancel()
        self.pending = new
        new.timer = threading.Timer(timeout, self._expire, args=(new,))
        new.timer.daemon = True
        new.timer.start()
        log.info("confirmed commit by session %s: rolled back unless confirmed within %d s",
                 session_id, timeout)
        return new

    def settle(self) -> None:
        """The pending commit is confirmed (or, the first of a series, failed to apply): it
        is over, in memory and on disk."""
        if self.drop() is not None:
            self.remove_record()

    def cancel(self, session_id: int, persist_id: str | None) -> None:
        """cancel-commit: roll the pending commit back now."""
        if self.pending is None:
            raise errors.operation_failed("no confirmed commit is pending", type="protocol")
        self.check(session_id, persist_id)
        self.roll_back("cancelled")

    def session_ended(self, session_id: int) -> None:
        """A confirmed commit without persist ends with its session (RFC 6241 §8.4.1)."""
        pending = self.pending
        if pending is not None and pending.persist is None \
                and pending.session_id == session_id:
            self.roll_back(f"session {session_id} closed before confirming")

    def roll_back(self, why: str) -> None:
        """Undo the pending commit. If the backend refuses, the record stays on disk so that
        the next start tries again."""
        pending = self.drop()
        assert pending is not None
        try:
            restored = self._undo(pending)
        except RpcError as exc:
            log.error("rolling back the confirmed commit (%s) failed: %s; its undo record "
                      "%s is kept for the next start", why, exc.message, self.path)
            return
        self.remove_record()
        log.warning("confirmed commit rolled back: %s (%d sessions restored)", why, restored)

    def roll_back_recorded(self) -> None:
        """At start: undo the commit an earlier run of the server left pending, if its record
        is there. A failure is logged and leaves the record for the next start; it does not
        stop the server from starting, since that would leave the NAT unmanaged and the
        commit in place all the same."""
        try:
            recorded = self.recorded()
        except RecordError as exc:
            log.error("%s: the undo record of a confirmed commit left pending by an earlier "
                      "run cannot be read, so that commit is NOT rolled back (%s); the file "
                      "is kept", self.path, exc)
            return
        if recorded is None:
            return
        try:
            restored = self._undo(recorded)
        except Exception as exc:  # whatever it is (the backend, the policy), start anyway
            message = exc.message if isinstance(exc, RpcError) else repr(exc)
            log.error("rolling back the confirmed commit left pending by an earlier run "
                      "(recorded in %s) failed: %s; the file is kept and the roll-back is "
                      "tried again at the next start", self.path, message)
            return
        self.remove_record()
        due = datetime.fromtimestamp(recorded.deadline, UTC).isoformat(timespec="seconds")
        log.warning("a confirmed commit%s, due to be confirmed by %s, was still pending when "
                    "the server last stopped: rolled back at start (%d sessions restored or "
                    "removed%s)", f" (persist {recorded.persist})" if recorded.persist else "",
                    due, restored, ", policy restored" if recorded.policy_changed else "")

    def drop(self) -> PendingConfirm | None:
        """Forget the pending commit in memory and stop its timer; the record stays on disk
        (remove_record) until the caller has done what it stands for."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()
        return pending

    def remove_record(self) -> None:
        """The base record first: without it the extensions mean nothing."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            # Left behind, the record would roll back a settled commit at the next start.
            log.error("%s: cannot remove the undo record of a settled confirmed commit (%s); "
                      "remove it before the server starts again", self.path, exc)
            return
        self._remove_extensions()

    def recorded(self) -> PendingConfirm | None:
        """The confirmed commit that an earlier run of the server left pending, if its record
        is there, with its extensions (RecordError if it cannot be read)."""
        data = _read(self.path)
        if data is None:
            return None
        pending = parse_record(data)
        while (more := _read(self._extension(pending.extensions + 1))) is not None:
            extension = parse_record(more)
            for key, previous in extension.undo_sessions.items():
                pending.undo_sessions.setdefault(key, previous)
            pending.persist, pending.deadline = extension.persist, extension.deadline
            pending.policy_changed |= extension.policy_changed
            pending.extensions += 1
        return pending

    def _extension(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.{number}{self.path.suffix}")

    def _remove_extensions(self) -> None:
        number = 1
        while (path := self._extension(number)).exists():
            try:
                path.unlink()
            except OSError as exc:
                log.error("%s: cannot remove a stale undo record extension (%s)", path, exc)
                return
            number += 1


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RecordError(str(exc)) from None


def write_record(path: Path, pending: PendingConfirm,
                 sessions: Mapping[tuple, Session | None] | None = None) -> None:
    """Write ``pending``'s undo record (or, for an extension, only ``sessions`` of it) to
    ``path`` so that a crash at any moment leaves either the old record or the new one: a
    temporary file, synced, renamed over it (and the directory synced, which makes the
    rename itself durable). Mode 0600: it holds the addresses of users' connections."""
    policy = pending.undo_policy
    record = {
        "version": RECORD_VERSION,
        "session_id": pending.session_id,
        "persist": pending.persist,
        "deadline": pending.deadline,
        "undo_policy": None if policy is None else etree.tostring(policy, encoding="unicode"),
        "policy_changed": pending.policy_changed,
        "session_fields": SESSION_FIELDS,
        # Keys and Sessions are tuples: json writes them as lists as they are, in C, with
        # nothing built per session (100k sessions: 0.08 s when the commit created them all,
        # 0.27 s when it changed them all, 16 MB).
        "undo_sessions": list((pending.undo_sessions if sessions is None
                               else sessions).items()),
    }
    data = json.dumps(record, separators=(",", ":")).encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the state dir is private
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temporary file may have had another mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def parse_record(data: bytes) -> PendingConfirm:
    """A record written by write_record, back as a PendingConfirm (without timer)."""
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            raise RecordError(f"not an undo record of version {RECORD_VERSION}")
        policy_text = record["undo_policy"]
        policy = None if policy_text is None else etree.fromstring(policy_text.encode())
        to_session = _session_reader(record.get("session_fields", SESSION_FIELDS))
        undo: dict[tuple, Session | None] = {}
        for key, previous in record["undo_sessions"]:
            if len(key) != len(KEY_FIELDS):
                raise RecordError(f"{key!r} is not a nat-session key")
            undo[tuple(key)] = None if previous is None else to_session(previous)
        return PendingConfirm(int(record.get("session_id", 0)), record["persist"], policy,
                              undo, bool(record["policy_changed"]),
                              float(record["deadline"]))
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, etree.LxmlError) as exc:
        raise RecordError(f"malformed undo record: {exc!r}") from None


def _session_reader(fields: list[str]) -> Callable[[list], Session]:
    """How to make a Session of one recorded list of fields. A record written by another
    version of the server (fields added or gone since) is read by field name."""
    if tuple(fields) == SESSION_FIELDS:
        def same_order(values: list) -> Session:
            if len(values) != len(SESSION_FIELDS):
                raise RecordError(f"{values!r} is not a nat-session")
            return Session._make(values)
        return same_order
    known = set(SESSION_FIELDS)

    def by_name(values: list) -> Session:
        named = dict(zip(fields, values, strict=True))
        if not set(KEY_FIELDS) <= named.keys():
            raise RecordError(f"{values!r} lacks a key leaf of nat-session")
        return Session(**{f: v for f, v in named.items() if f in known})
    return by_name
