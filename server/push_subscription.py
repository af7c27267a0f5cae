"""One YANG-Push subscription (RFC 8641) of the nat-session list: the changes it has yet to
send, and the thread that sends its notifications.

Changes arrive from the backend's reports (:meth:`PushSubscription.take`, called under the
backend's locks: it only files each change under its key, a dict operation). Per key the
subscription keeps whether the entry existed when the period began, whether it ended on
the way, and its last value; when the dampening period allows, the sending thread takes the
whole dict and sends one push-change-update with one edit per key (the last value wins):

    existed before  exists now  ended on the way  ->  edit
    no              no          -                 ->  nothing (made and ended in one period)
    no              yes         -                 ->  create
    yes             no          -                 ->  delete
    yes             yes         no                ->  merge
    yes             yes         yes               ->  replace (ended and made again)

Deletes go first in each patch, so a translated port freed by one session and taken by a
new one in the same period is free again before it is taken. RFC 8641's change-type says a
receiver may be sent a create of an entry it holds or a delete of one it does not: that is
what makes the sync-on-start snapshot safe to read while changes are filed (a change
reported during the read is sent after it, whether the snapshot saw it or not).

Nothing is queued per change beyond that dict: a subscriber that reads slowly gets larger
patches, never a backlog. When the backend says it lost changes (CHANGES_LOST), or on
resync-subscription, the pending changes are dropped and a push-update of the whole
selection is sent instead, which replaces the receiver's copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nfmig.nf_backends.base import Backend, SessionEvent

from . import push_format
from .push_format import CREATE, DELETE, MERGE, REPLACE, PatchWriter
from .push_select import Selection

log = logging.getLogger(__name__)

CHANGE_LIMIT = 10_000  # edits per push-change-update; more changes go in the next ones
REPLY_WAIT = 10.0  # seconds the first notification waits for the establish reply to go out
# where each change kind is excluded by excluded-change (RFC 8641 change-type)
_CHANGE_TYPE = {CREATE: "create", DELETE: "delete", MERGE: "replace", REPLACE: "replace"}

Send = Callable[[str], None]


@dataclass
class Policy:
    """What establish-subscription asked for (RFC 8639 / RFC 8641), checked."""

    datastore: str  # "operational" | "running"
    selection: Selection
    on_change: bool  # else periodic
    dampening: float = 0.0  # seconds (on-change)
    sync_on_start: bool = True
    excluded: frozenset[str] = frozenset()  # change-types not sent
    period: float = 0.0  # seconds (periodic)
    anchor: float | None = None  # time.time() of a periodic update, if given
    # the datastore-subtree-filter or datastore-xpath-filter as given (for /subscriptions)
    filter_xml: str = ""
    stop: float | None = None  # time.time() when the subscription ends
    centiseconds: dict[str, int] = field(default_factory=dict)  # as given, for logs


class PushSubscription:
    """A dynamic subscription of one NETCONF session."""

    def __init__(self, subscription_id: int, session_id: int, policy: Policy,
                 backend: Backend, namespace: str, module: str, send: Send,
                 reply_sent: Callable[[], bool], ended: Callable[[PushSubscription], None]):
        self.id = subscription_id
        self.session_id = session_id
        self.policy = policy
        self._backend = backend
        self._namespace = namespace
        self._send = send
        self._reply_sent = reply_sent
        self._ended = ended
        self._writer = PatchWriter(subscription_id, namespace, module)
        self._lock = threading.Lock()  # _pending and _resync; taken by every report
        # key -> [existed before, ended on the way, last kind, last session]
        self._pending: dict[tuple, list] = {}
        self._resync = policy.on_change and policy.sync_on_start
        self._wake = threading.Event()  # something to send, or the end
        if self._resync:
            self._wake.set()
        self._stop = threading.Event()
        self._final: str | None = None  # the notification to end with, if any
        self.sent_changes = 0
        # RFC 8639's receiver counters, and when the oldest change not yet sent was filed
        self.sent_records = 0
        self.excluded_records = 0
        self._pending_since: float | None = time.monotonic() if self._resync else None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"yang-push-{subscription_id}")

    def start(self) -> None:
        self._thread.start()

    # -- from the backend's reports (under its locks: no call back into it) -------------
    def take(self, events: list[SessionEvent]) -> None:
        selection = self.policy.selection
        matches, by_state = selection.matches, selection.by_state
        with self._lock:
            pending = self._pending
            idle = not pending
            for what, session in events:
                if session is None:  # CHANGES_LOST: only a whole new copy helps
                    pending.clear()
                    self._resync = True
                    self._wake.set()
                    if self._pending_since is None:
                        self._pending_since = time.monotonic()
                    continue
                if matches is not None and not matches(session):
                    if what == "created" or not by_state:
                        continue
                    # changed out of a selection that reads its state (or ended there):
                    # gone for this receiver; a delete of an entry it lacks is harmless
                    what = "deleted"
                key = session[:5]
                record = pending.get(key)
                if record is None:
                    pending[key] = [what != "created", False, what, session]
                else:
                    if what != "deleted" and record[2] == "deleted":
                        record[1] = True
                    record[2] = what
                    record[3] = session
            if idle and pending:
                self._wake.set()
                if self._pending_since is None:
                    self._pending_since = time.monotonic()

    def resync(self) -> None:
        """Send the whole selection again (resync-subscription, a changed filter)."""
        with self._lock:
            self._pending.clear()
            self._resync = True
            self._wake.set()
            if self._pending_since is None:
                self._pending_since = time.monotonic()

    def backlog(self) -> tuple[int, float]:
        """The entries changed and not yet sent (a resync pending counts as one) and how
        many seconds the oldest change has waited."""
        with self._lock:
            since = self._pending_since
            return (len(self._pending) + self._resync,
                    0.0 if since is None else time.monotonic() - since)

    # -- ending --------------------------------------------------------------------------
    def end(self, final: str | None = None, wait: bool = True) -> None:
        """Stop sending; ``final`` the last notification (subscription-terminated) or
        None (delete-subscription: nothing more is sent). ``wait``: until the thread is
        done, so that nothing of this subscription follows the caller's reply."""
        self._final = final
        self._stop.set()
        self._wake.set()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    @property
    def ending(self) -> bool:
        return self._stop.is_set()

    # -- the sending thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._wait_for_reply()
            if self.policy.on_change:
                self._on_change()
            else:
                self._periodic()
        except _Gone:
            log.info("subscription %s of session %s: the session is gone", self.id,
                     self.session_id)
        except Exception:  # never a traceback to the client; the log has it
            log.exception("subscription %s of session %s failed", self.id, self.session_id)
            self._final = push_format.subscription_terminated(
                self.id, "ietf-yang-push:datastore-not-subscribable")
        final = self._final
        if final is not None:
            try:
                self._send(final)
            except Exception:  # the session is gone
                pass
        self._ended(self)

    def _wait_for_reply(self) -> None:
        """The establish reply (with the id) goes out before any notification of it."""
        deadline = time.monotonic() + REPLY_WAIT
        while not self._reply_sent() and time.monotonic() < deadline:
            if self._stop.wait(0.002):
                return

    def _deliver(self, message: str) -> None:
        if self._stop.is_set():
            return
        try:
            self._send(message)
        except Exception as exc:
            raise _Gone() from exc
        self.sent_records += 1

    def _on_change(self) -> None:
        last = -1e18
        while True:
            self._wait(self._wake)
            if self._stop.is_set():
                return
            # modify-subscription may change the period: read each time
            if self._stop.wait(max(0.0, last + self.policy.dampening - time.monotonic())):
                return
            with self._lock:
                resync, self._resync = self._resync, False
                pending, self._pending = self._pending, {}
                self._pending_since = None
                self._wake.clear()
            if resync:
                self._send_contents()
            if pending:
                self._send_changes(pending)
            last = time.monotonic()

    def _wait(self, event: threading.Event) -> None:
        """Until ``event``, or the stop-time (which completes the subscription)."""
        stop = self.policy.stop
        while not event.wait(None if stop is None else max(0.0, stop - time.time())):
            if stop is not None and time.time() >= stop:
                self._complete()

    def _complete(self) -> None:
        self._final = push_format.subscription_completed(self.id)
        self._stop.set()
        self._wake.set()

    def _periodic(self) -> None:
        period, anchor = self.policy.period, self.policy.anchor
        due = time.time()
        if anchor is not None:  # the next multiple of the period from the anchor
            due = anchor + period * -(-(due - anchor) // period)
        while True:
            stop = self.policy.stop
            wait = due - time.time()
            if stop is not None and stop <= due:
                wait = stop - time.time()
            if self._stop.wait(max(0.0, wait)):
                return
            if stop is not None and time.time() >= stop:
                self._complete()
                return
            self._send_contents()
            period = self.policy.period  # modify-subscription may change it
            due += period * max(1, -(-(time.time() - due) // period))

    def _send_contents(self) -> None:
        """push-update: every selected session now (sync-on-start, resync, periodic)."""
        selection = self.policy.selection
        batches = (selection.pick(batch) for batch in self._backend.session_batches())
        message = "".join(push_format.push_update(
            self.id, push_format.contents(batches, self._namespace)))
        self._deliver(message)

    def _send_changes(self, pending: dict[tuple, list]) -> None:
        excluded = self.policy.excluded
        trim = self.policy.selection.trim if self.policy.selection.keep is not None else None
        deletes, others = [], []
        for before, remade, last, session in pending.values():
            if last == "deleted":
                if before:
                    deletes.append((DELETE, session))
                continue
            op = (REPLACE if remade else MERGE) if before else CREATE
            others.append((op, session if trim is None else trim(session)))
        edits = deletes + others
        if excluded:
            kept = [e for e in edits if _CHANGE_TYPE[e[0]] not in excluded]
            self.excluded_records += len(edits) - len(kept)
            edits = kept
        for start in range(0, len(edits), CHANGE_LIMIT):
            began = time.perf_counter()
            message = self._writer.message(edits[start:start + CHANGE_LIMIT])
            made = time.perf_counter()
            self._deliver(message)
            log.debug("subscription %s: %d edits made in %.3f s, sent in %.3f s", self.id,
                      min(CHANGE_LIMIT, len(edits) - start), made - began,
                      time.perf_counter() - made)
        self.sent_changes += len(edits)


class _Gone(Exception):
    """The subscriber's session can no longer be written to."""
