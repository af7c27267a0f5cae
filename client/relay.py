"""Moving NAT sessions between two servers with the source's reply still arriving.

A get-data on the source; as its reply comes in (client.streaming), it is cut at entry
boundaries into edit-configs that go to the target at once, each without waiting for the
reply to the one before (a NETCONF server answers a session's requests in order, so they
queue there). The target writes the first sessions while the source is still reading out
the last: the two servers work side by side instead of one after the other.

Each edit is atomic on the target. The move as a whole is made atomic here: when an edit
fails, or the source's reply breaks off, the sessions the other edits wrote are removed from
the target again, and the error names the entry and the reason.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from functools import cached_property

from ncclient.operations.rpc import RPC, RPCError
from ncclient.transport import SessionListener
from ncclient.xml_ import to_ele

from .netconf import (
    NatClient,
    PiecesRpc,
    edit_config_operation,
    get_sessions_operation,
    rpc_start,
)

log = logging.getLogger(__name__)

# Bytes of entries per edit. The first is small, so the target starts early; each next one
# twice the last, up to BLOCK: few edits for their fixed costs. From 64 KB on, the server
# reads an edit without building a tree of it.
FIRST_BLOCK = 64 << 10
BLOCK = 1 << 20
_ENTRY = b"<nat-session"
_ENTRY_END = b"</nat-session>"
_TAIL = re.compile(rb"\s*</data>\s*</rpc-reply>\s*")


class MoveError(Exception):
    """The move failed; the target holds none of the sessions (unless ``leftover`` says)."""

    def __init__(self, message: str, leftover: int = 0):
        super().__init__(message)
        self.leftover = leftover  # sessions the move wrote to the target and could not remove


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
    reader = source.reader
    if reader is None:  # :base:1.0 framing: read the whole reply, then edit
        body, reply_bytes = source.get_sessions(match=match)
        request_bytes = target.edit(body) if body else 0
        return Moved([body.encode()], reply_bytes, request_bytes, 1 if body else 0)
    message_id = f"nfmig-move-{secrets.token_hex(8)}"
    relay = _Relay(target, message_id, min(FIRST_BLOCK, block), block, timeout)
    session = source.m._session
    session.add_listener(relay)
    try:
        reader.tap = relay.feed
        session.send(_get_data(message_id, match))
        if not relay.finished.wait(timeout):
            relay.fail(TimeoutError(f"no complete reply from the source within {timeout} s"))
    finally:
        session.remove_listener(relay)
        if reader.tap == relay.feed:
            reader.tap = None
    return relay.outcome()


def _get_data(message_id: str, match: dict[str, str] | None) -> str:
    """The get-data request, whole: its reply goes to the relay, never to ncclient."""
    return f'{rpc_start(message_id)}{get_sessions_operation("operational", match)}</rpc>'


class _Relay(SessionListener):
    """Takes the source's reply piece by piece (in the source session's thread) and sends
    each block of whole entries to the target as an edit-config of its own."""

    def __init__(self, target: NatClient, message_id: str, first_block: int, block: int,
                 timeout: float):
        self.target = target
        self.message_id = message_id.encode()
        self.block, self.largest_block = first_block, block
        self.timeout = timeout
        self.pending = bytearray()
        self.head: bytes | None = None  # the reply up to its first entry, once seen
        self.sent: list[bytes] = []     # the entries of each edit
        self.edits: list[RPC] = []
        self.reply_bytes = self.request_bytes = 0
        self.failure: BaseException | None = None
        self.finished = threading.Event()

    # -- in the source session's thread ------------------------------------------------
    def feed(self, piece: bytes | None) -> None:
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
            if len(self.pending) >= self.block and not self._target_failed():
                cut = self.pending.rfind(_ENTRY_END)
                if cut >= 0:
                    self._send(cut + len(_ENTRY_END))
        except Exception as exc:  # the session thread must not die of it: the move fails
            self.fail(exc)

    def _first(self) -> bool:
        """Find the first entry; what comes before it must be our reply's data."""
        start = self.pending.find(_ENTRY)
        if start < 0:
            return False  # no entry yet, or none at all (an empty result, an rpc-error)
        head = bytes(self.pending[:start])
        if b'message-id="' + self.message_id + b'"' not in head or b"<data" not in head:
            raise MoveError("the source answered with something else than the reply to "
                            "the get-data")
        self.head = head
        del self.pending[:start]
        return True

    def _last(self) -> None:
        if self.head is None:
            return  # the whole reply is in pending: outcome() reads it
        found = self.pending.rfind(_ENTRY_END)
        cut = found + len(_ENTRY_END) if found >= 0 else 0  # 0: all sent with a block
        if _TAIL.fullmatch(self.pending, cut) is None:
            raise MoveError("the source's reply does not end after its last session")
        if cut and not self._target_failed():
            self._send(cut)

    def _send(self, length: int) -> None:
        # Passed on as the bytes they came as, without decoding them; each keeps its
        # namespace declaration: taking it off costs a search through all of them, for 4%
        # fewer bytes that the target reads no faster.
        entries = bytes(memoryview(self.pending)[:length])
        if not entries.isascii():  # a server's entries nearly always are: nothing to check
            try:
                entries.decode()
            except UnicodeDecodeError as exc:  # a target would close the session on it
                raise MoveError(f"the source's reply is not UTF-8 ({exc.reason})") from None
        del self.pending[:length]
        m = self.target.m
        rpc = PiecesRpc(m._session, m._device_handler, async_mode=True, timeout=self.timeout,
                        huge_tree=True)
        operation, size = edit_config_operation(entries, "running", declare_once=False)
        rpc.request(operation)
        self.edits.append(rpc)
        self.sent.append(entries)
        self.request_bytes += size
        self.block = min(2 * self.block, self.largest_block)

    def _target_failed(self) -> bool:
        """An edit the target already refused: sending more would only add to undo."""
        return any(rpc.event.is_set() and (rpc.error or rpc.reply.error)
                   for rpc in self.edits)

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.finished.set()

    # -- a SessionListener of the source session -----------------------------------------
    def callback(self, root, raw) -> None:
        pass  # other messages are ncclient's

    def errback(self, ex: Exception) -> None:
        self.fail(ex)  # the source session broke: no end of the reply will come

    # -- in the caller's thread ----------------------------------------------------------
    def outcome(self) -> Moved:
        refused = self._wait_for_edits()
        if self.failure is None and refused is None:
            if self.head is None:
                self._no_entries()
            return Moved(self.sent, self.reply_bytes, self.request_bytes, len(self.edits))
        skip = refused[0] if refused else None  # the refused edit wrote nothing
        written = [text for i, text in enumerate(self.sent) if i != skip]
        why = (f"the target refused edit {refused[0] + 1} of {len(self.edits)}: "
               f"{_describe(refused[1])}" if refused else
               f"the move broke off: {_describe(self.failure)}")
        leftover = _remove(self.target, written)
        undone = (f"; {leftover} sessions it wrote are still on the target" if leftover else
                  "; the target holds none of the sessions")
        raise MoveError(why + undone, leftover)

    def _wait_for_edits(self) -> tuple[int, BaseException] | None:
        """The first edit the target refused (index, error), after every reply is in."""
        refused = None
        for index, rpc in enumerate(self.edits):
            if not rpc.event.wait(self.timeout):
                error: BaseException | None = TimeoutError(
                    f"no reply to edit {index + 1} within {self.timeout} s")
            elif rpc.error is not None:
                error = rpc.error
            else:
                rpc.reply.parse()
                error = rpc.reply.error
            if error is not None and refused is None:
                refused = (index, error)
        return refused

    def _no_entries(self) -> None:
        """A reply without entries: an empty selection, or an rpc-error."""
        raw = bytes(self.pending).decode()
        if "rpc-error" in raw:
            raise MoveError(f"the source refused the get-data: "
                            f"{_describe(RPCError(to_ele(raw)))}")


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
