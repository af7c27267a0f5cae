"""Taking a get-data reply as it arrives, and writing its entries to another server as they
come: the machinery of a streamed copy, and ``move_sessions``, the plainest use of it.

A get-data on the source; as its reply comes in (client.streaming), an :class:`EntryStream`
cuts it at entry boundaries into blocks of whole entries, each handed on at once. An
:class:`EditPipeline` sends edits of such blocks to a target, each without waiting for the
reply to the one before (a NETCONF server answers a session's requests in order, so they
queue there), and looks at every reply. The target writes the first sessions while the
source is still reading out the last: the two servers work side by side instead of one
after the other. (client.copy streams a migration's copy the same way.)

Each edit is atomic on the target. ``move_sessions`` makes the move as a whole atomic: when
an edit fails, or the source's reply breaks off, the sessions the other edits wrote are
removed from the target again, and the error names the entry and the reason.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

from ncclient.operations.errors import TimeoutExpiredError
from ncclient.operations.rpc import RPC, RPCError
from ncclient.transport import SessionListener
from ncclient.transport.errors import TransportError
from ncclient.xml_ import to_ele

from .netconf import (
    BulkSSHSession,
    EditData,
    GetData,
    NatClient,
    TextRpc,
    config_size,
    rpc_start,
    sessions_filter,
)

log = logging.getLogger(__name__)

# Bytes of entries per block. The first is small, so the target starts early; each next one
# twice the last, up to BLOCK: few edits for their fixed costs. From 64 KB on, the server
# reads an edit without building a tree of it.
FIRST_BLOCK = 64 << 10
BLOCK = 1 << 20
_ENTRY = b"<nat-session"
_ENTRY_END = b"</nat-session>"
_TAIL = re.compile(rb"\s*</data>\s*</rpc-reply>\s*")
# While waiting for a reply, how often to look whether its session is still there: ncclient
# tells a lost transport only to the requests waiting at that moment.
_POLL = 0.05


class StreamError(Exception):
    """A reply that is not the one asked for, or not a get-data reply of whole entries."""


class MoveError(Exception):
    """The move failed; the target holds none of the sessions (unless ``leftover`` says)."""

    def __init__(self, message: str, leftover: int = 0):
        super().__init__(message)
        self.leftover = leftover  # sessions the move wrote to the target and could not remove


class EntryStream(SessionListener):
    """Takes a get-data reply piece by piece (from a ChunkReader's tap, in the session's
    thread) and hands each block of whole entries to :meth:`take` as soon as it is in.

    Subclasses implement ``take``; ``stopped`` says when taking more is no use. Once
    ``finished`` is set the reply is over: ``failure`` says why if it broke off, and when no
    entry was found in it (an empty result, an rpc-error, entries written otherwise) all of
    it is left for :meth:`whole`.
    """

    def __init__(self, message_id: str, first_block: int = FIRST_BLOCK, block: int = BLOCK):
        self.message_id = message_id
        self.block, self.largest_block = first_block, block
        self.pending = bytearray()
        self.head: bytes | None = None  # the reply up to its first entry, once seen
        self.reply_bytes = 0
        self.failure: BaseException | None = None
        self.finished = threading.Event()
        # held while a piece is handled: once fail() has it, no block is being taken
        self._lock = threading.RLock()

    def take(self, entries: bytes) -> None:
        raise NotImplementedError

    def stopped(self) -> bool:
        return False

    # -- in the caller's thread ----------------------------------------------------------
    def start(self, session: BulkSSHSession, operation: str) -> None:
        """Send ``operation`` (a request's element, as text) on ``session`` and take its
        reply. Not sent as an ncclient operation: the reply comes here, never to ncclient,
        which would keep waiting for it."""
        session.add_listener(self)
        session.reader.tap = self.feed
        session.send(f"{rpc_start(self.message_id)}{operation}</rpc>")

    def detach(self, session: BulkSSHSession) -> None:
        session.remove_listener(self)
        if session.reader.tap == self.feed:
            session.reader.tap = None

    def fail(self, exc: BaseException, wait: float | None = None) -> bool:
        """End the stream for ``exc`` (unless it is over already): no block is taken after
        this. Waits for a block being taken (at most ``wait`` seconds); False when it still
        was then."""
        got = self._lock.acquire(timeout=-1 if wait is None else wait)
        try:
            if not self.finished.is_set():
                self.failure = exc
                self.finished.set()
        finally:
            if got:
                self._lock.release()
        return got

    def whole(self) -> str:
        """The reply, when no entry was taken from it."""
        return bytes(self.pending).decode(errors="replace")

    # -- a SessionListener of the source session -----------------------------------------
    def callback(self, root, raw) -> None:
        pass  # other messages are ncclient's

    def errback(self, ex: Exception) -> None:
        self.fail(ex)  # the session broke: no end of the reply will come

    # -- in the session's thread ---------------------------------------------------------
    def feed(self, piece: bytes | None) -> None:
        with self._lock:
            if self.finished.is_set():
                return
            try:
                if piece is None:
                    self._last()
                    self.finished.set()
                    return
                self.reply_bytes += len(piece)
                self.pending += piece
                if self.head is None and not self._first():
                    return
                if len(self.pending) >= self.block and not self.stopped():
                    cut = self.pending.rfind(_ENTRY_END)
                    if cut >= 0:
                        self._take(cut + len(_ENTRY_END))
            except Exception as exc:  # the session thread must not die of it: the stream fails
                self.failure = exc
                self.finished.set()

    def _first(self) -> bool:
        """Find the first entry; what comes before it must be our reply's data."""
        start = self.pending.find(_ENTRY)
        if start < 0:
            return False  # no entry yet, or none at all
        head = bytes(self.pending[:start])
        if f'message-id="{self.message_id}"'.encode() not in head or b"<data" not in head:
            raise StreamError("the server answered with something else than the reply to "
                              "the get-data")
        self.head = head
        del self.pending[:start]
        return True

    def _last(self) -> None:
        if self.head is None:
            return  # the whole reply is in pending
        found = self.pending.rfind(_ENTRY_END)
        cut = found + len(_ENTRY_END) if found >= 0 else 0  # 0: all taken with a block
        if _TAIL.fullmatch(self.pending, cut) is None:
            raise StreamError("the reply does not end after its last session")
        if cut and not self.stopped():
            self._take(cut)

    def _take(self, length: int) -> None:
        # Handed on as the bytes they came as; each keeps its namespace declaration.
        entries = bytes(memoryview(self.pending)[:length])
        if not entries.isascii():  # a server's entries nearly always are: nothing to check
            try:
                entries.decode()
            except UnicodeDecodeError as exc:  # a target would close the session on it
                raise StreamError(f"the reply is not UTF-8 ({exc.reason})") from None
        del self.pending[:length]
        self.take(entries)
        self.block = min(2 * self.block, self.largest_block)


class EditPipeline:
    """Edits of blocks of entries into one datastore through one session, each sent without
    waiting for the replies to those before, every reply looked at."""

    def __init__(self, manager, operation: type[TextRpc], datastore: str, timeout: float):
        self.manager = manager
        self.operation = operation
        self.datastore = datastore
        self.timeout = timeout
        self.edits: list[RPC] = []
        self.request_bytes = 0  # the <config> elements of the edits
        self._answered = 0  # the first edits, each answered without an error

    @property
    def session(self) -> BulkSSHSession:
        return self.manager._session

    def send(self, entries: bytes) -> None:
        m = self.manager
        rpc = self.operation(m._session, m._device_handler, async_mode=True,
                             timeout=self.timeout, huge_tree=True)
        rpc.request(entries, self.datastore)
        self.edits.append(rpc)
        self.request_bytes += config_size(entries, self.operation)

    def lost(self) -> bool:
        session = self.session
        return not session.connected or not session.is_alive()

    def refused(self) -> tuple[int, BaseException] | None:
        """The first edit answered with an error so far (index, error), without waiting."""
        while self._answered < len(self.edits):
            rpc = self.edits[self._answered]
            if not rpc.event.is_set():
                return None
            error = _error_of(rpc)
            if error is not None:
                return self._answered, error
            self._answered += 1
        return None

    def wait(self, timeout: float | None = None) -> tuple[int, BaseException] | None:
        """The first edit that failed (index, error), once every reply is in; a lost
        session, or no reply within ``timeout`` seconds, fails the first edit unanswered."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        first = None
        for index, rpc in enumerate(self.edits):
            while not rpc.event.wait(_POLL):
                if self.lost():
                    return first or (index, TransportError("the connection was lost"))
                if time.monotonic() > deadline:
                    return first or (index, TimeoutExpiredError(
                        f"no reply to edit {index + 1} of {len(self.edits)} in time"))
            error = _error_of(rpc)
            if error is not None and first is None:
                first = (index, error)
        return first


def _error_of(rpc: RPC) -> BaseException | None:
    """What an answered request failed of: its rpc-errors (all of them when several), or
    what kept the reply from it."""
    if rpc.error is not None:
        return rpc.error
    reply = rpc.reply
    reply.parse()
    if reply.error is None:
        return None
    errors = reply.errors
    return RPCError(to_ele(reply.xml), errs=errors) if len(errors) > 1 else reply.error


def reply_error(raw: str) -> RPCError | None:
    """The rpc-error of a reply given whole, if it is one."""
    if "rpc-error" not in raw:
        return None
    return RPCError(to_ele(raw))


# -- moving sessions between two servers ---------------------------------------------------
@dataclass
class Moved:
    sent: list[bytes] = field(repr=False)  # the moved entries as the source wrote them
    reply_bytes: int   # the source's get-data reply
    request_bytes: int  # the <config> elements of the edits
    edits: int

    @cached_property
    def sessions_xml(self) -> str:
        """The moved entries as one text (for delete_sessions), made when first asked for:
        the move itself passes them on as bytes."""
        return b"".join(self.sent).decode()


def move_sessions(source: NatClient, target: NatClient,
                  match: dict[str, str] | None = None, block: int = BLOCK,
                  timeout: float = 600) -> Moved:
    """Copy the sessions of ``source``'s operational datastore (those matching ``match``,
    as in NatClient.get_sessions) into ``target``'s running datastore. The source keeps
    them: delete_sessions(moved.sessions_xml) on the source finishes a move."""
    if source.reader is None:  # :base:1.0 framing: read the whole reply, then edit
        body, reply_bytes = source.get_sessions(match=match)
        request_bytes = target.edit(body) if body else 0
        return Moved([body.encode()], reply_bytes, request_bytes, 1 if body else 0)
    relay = _Relay(target, f"nfmig-move-{secrets.token_hex(8)}", min(FIRST_BLOCK, block),
                   block, timeout)
    session = source.session
    try:
        relay.start(session, GetData.operation("operational", sessions_filter(match)))
        if not relay.finished.wait(timeout):
            relay.fail(TimeoutError(f"no complete reply from the source within {timeout} s"))
    finally:
        relay.detach(session)
    return relay.outcome()


class _Relay(EntryStream):
    """Sends each block of the source's reply to the target as an edit-data of its own."""

    def __init__(self, target: NatClient, message_id: str, first_block: int, block: int,
                 timeout: float):
        super().__init__(message_id, first_block, block)
        self.target = target
        self.timeout = timeout
        self.edits = EditPipeline(target.m, EditData, "running", timeout)
        self.sent: list[bytes] = []  # the entries of each edit

    def take(self, entries: bytes) -> None:
        self.edits.send(entries)
        self.sent.append(entries)

    def stopped(self) -> bool:
        """An edit the target already refused: sending more would only add to undo."""
        return self.edits.refused() is not None

    def outcome(self) -> Moved:
        refused = self.edits.wait()
        edits = len(self.edits.edits)
        if self.failure is None and refused is None:
            if self.head is None:
                self._no_entries()
            return Moved(self.sent, self.reply_bytes, self.edits.request_bytes, edits)
        skip = refused[0] if refused else None  # the refused edit wrote nothing
        written = [text for i, text in enumerate(self.sent) if i != skip]
        why = (f"the target refused edit {refused[0] + 1} of {edits}: "
               f"{_describe(refused[1])}" if refused else
               f"the move broke off: {_describe(self.failure)}")
        leftover = _remove(self.target, written)
        undone = (f"; {leftover} sessions it wrote are still on the target" if leftover else
                  "; the target holds none of the sessions")
        raise MoveError(why + undone, leftover)

    def _no_entries(self) -> None:
        """A reply without entries: an empty selection, or an rpc-error."""
        error = reply_error(self.whole())
        if error is not None:
            raise MoveError(f"the source refused the get-data: {_describe(error)}")


def _remove(target: NatClient, written: list[bytes]) -> int:
    """Remove what the move wrote to the target; how many sessions could not be."""
    if not any(written):
        return 0
    every = b"".join(written).decode(errors="replace")
    try:
        target.delete_sessions(every, operation="remove")
    except Exception as exc:
        log.error("removing the sessions a failed move wrote to the target failed: %s",
                  _describe(exc))
        return every.count("</nat-session>")
    return 0


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, RPCError):
        where = f" (at {exc.path})" if getattr(exc, "path", None) else ""
        return f"{exc.tag}: {exc.message}{where}" if exc.message else f"{exc.tag}{where}"
    return str(exc) or type(exc).__name__
