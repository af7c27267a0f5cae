"""The copy of a migration, made while traffic flows: what the targets hold before it, the
sources' sessions read and written into the targets' candidates, and the check that
several sources do not collide.

On NETCONF ends reading and writing overlap. Each source's get-data reply is taken as it
arrives (client.relay's EntryStream) in blocks of whole entries; each block is parsed, the
selection's exact test kept, and each entry goes to its target; a target's share goes to
its candidate as an edit-config of its own, sent without waiting for the replies to those
before (EditPipeline), and every reply is looked at. So the source writes its reply, the
client reads it and the targets decode their edits side by side.

An end the stream cannot serve takes the same steps one after the other: a RESTCONF source
(or one on :base:1.0 framing) is read whole, and a RESTCONF target is written in one edit
once every source is read and checked.

A target counts as staged from the first byte sent to it: whatever fails (an edit it
refuses, a source's reply that breaks off, a lost connection), the rollback discards its
candidate (recovery.py), and the sources keep every session.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from itertools import repeat

from ncclient.operations.errors import TimeoutExpiredError
from ncclient.operations.rpc import RPCError
from ncclient.transport.errors import TransportError

from .endpoints import Connection, data_of, describe
from .ends import MigrationError, SourceEnd, TargetEnd
from .netconf import GetData, take_entry_namespace
from .relay import FIRST_BLOCK, EditPipeline, EntryStream, reply_error
from .report import PhaseRecord
from .selection import Entry, entries_xml, parse_entries

# A target's share of a block goes out once it is this large; smaller ones wait for the
# next block (a selection or a split leaves a target only part of each).
_LEAST_EDIT = FIRST_BLOCK // 2
_POLL = 0.05  # seconds between looks at the ends while a reply streams in
# How long a stream that must stop waits for the block being written to a target; one that
# takes no more than that is cut off (its candidate goes with its session).
_STOP_WAIT = 10.0


@dataclass(eq=False)
class _Share:
    """What one target gets during the copy: the edits sent so far (None: written whole
    once every source is read), what waits for the next one, and its edit phase."""

    end: TargetEnd
    pipeline: EditPipeline | None
    pending: list[bytes] = field(default_factory=list)
    size: int = 0
    record: PhaseRecord | None = None
    t0: float = 0.0


class _TargetFailed(Exception):
    def __init__(self, share: _Share, error: BaseException, index: int | None = None):
        super().__init__(describe(error))
        self.share, self.error, self.index = share, error, index


class _SourceStream(EntryStream):
    """One source's get-data reply, each block of it parsed and routed as it arrives (in
    the source session's thread)."""

    def __init__(self, copy: Copy, source: SourceEnd):
        super().__init__(f"nfmig-copy-{secrets.token_hex(8)}")
        self.copy, self.source = copy, source

    def take(self, entries: bytes) -> None:
        found = parse_entries(entries.decode())
        selected = [e for e in found if self.copy.selection.matches(e)]
        self.copy._route(self.source, selected, entries if len(selected) == len(found)
                         else None)


class Copy:
    """The copy's part of :class:`~nfmig.client.migrate.Migration`."""

    _shares: dict[TargetEnd, _Share]

    def _copy(self) -> None:
        """prepare; read each source and edit the targets' candidates (streamed on
        NETCONF); check."""
        self._prepare()
        self._shares = {t: _Share(t, t.conn.pipeline() if isinstance(t.conn, Connection)
                                  else None) for t in self.targets}
        try:
            self._read_and_edit()
        except _TargetFailed as failed:
            failure = self._edit_failed(failed.share, failed.error, failed.index)
            self._break_off(failure.reason)
            raise failure from failed.error
        except BaseException as exc:
            self._break_off(exc.reason if isinstance(exc, MigrationError) else describe(exc))
            raise
        finally:
            self._shares = {}
        for t in self.targets:
            t.before = {e.key: self._held[t][e.key] for e, _ in t.entries
                        if e.key in self._held[t]}
            t.report.already_present = len(t.before)
        self._held = {}

    def _read_and_edit(self) -> None:
        for s in self.sources:
            if isinstance(s.conn, Connection) and s.conn.reader is not None:
                self._read_streamed(s)
            else:
                self._read_whole(s)
        self._count_selected()
        for share in self._shares.values():
            if share.pending:
                self._send_share(share)
        self._check()  # a RESTCONF target is written only once it passed
        for share in self._shares.values():
            if share.pipeline is None:
                self._edit_whole(share.end)
        for share in self._shares.values():
            if share.record is not None:
                self._await_edits(share)

    def _break_off(self, reason: str) -> None:
        """Record the edit phases still open as broken off by ``reason``."""
        for share in self._shares.values():
            if share.record is not None:
                self._close_phase(share.record, share.t0, share.end,
                                  MigrationError(f"broken off: {reason}"))
                share.record = None

    def _prepare(self) -> None:
        """What each target holds under its selection before the copy (a rollback restores
        it, and verify's expected digest starts from it), and which gateway addresses the
        switchover moves."""
        self._digests_before: dict[TargetEnd, tuple[int, int] | str] = {}
        self._held: dict[TargetEnd, dict[tuple, Entry]] = {}
        for t in self.targets:
            with self._phase("prepare", t):
                text = t.conn.get_data("running", t.selection.filter_xml())
                self._held[t] = {e.key: e for e in parse_entries(text)}
                if not self.options.dry_run:
                    self._digests_before[t] = self._session_digest(t)
        self._plan_switchover()

    # -- reading -----------------------------------------------------------------------
    def _read(self) -> None:
        """Every source read whole, nothing written (--finish)."""
        self._shares = {}
        for s in self.sources:
            self._read_whole(s)
        self._count_selected()

    def _read_whole(self, s: SourceEnd) -> None:
        with self._phase("read", s) as record:
            entries = self._read_selection(s)
            record.detail = f"{len(entries)} sessions"
        self._route(s, entries)

    def _read_selection(self, s: SourceEnd) -> list[Entry]:
        text = s.conn.get_data("operational", self.selection.filter_xml())
        return [e for e in parse_entries(text) if self.selection.matches(e)]

    def _read_streamed(self, s: SourceEnd) -> None:
        """One source's reply, routed to the targets block by block as it arrives; it
        breaks off as soon as a target fails."""
        stream = _SourceStream(self, s)
        record, t0 = self._open_phase("read", s)
        session = s.conn.session
        deadline = time.monotonic() + self.options.rpc_timeout
        try:
            stream.start(session, GetData.operation("operational",
                                                    self.selection.filter_xml()))
            while not stream.finished.wait(_POLL):
                trouble = self._stream_trouble(session, deadline)
                if trouble is not None:
                    self._stop(stream, trouble)
        except BaseException as exc:
            self._stop(stream, exc)  # an interrupt too: no block may go out after it
            if not isinstance(exc, Exception):
                raise
        finally:
            stream.detach(session)
        failure = stream.failure
        if failure is None and stream.head is None:
            try:  # no entry to stream: an empty result, an rpc-error, entries written otherwise
                self._whole_reply(s, stream.whole())
            except Exception as exc:
                failure = exc
        if isinstance(failure, _TargetFailed):
            self._close_phase(record, t0, s, MigrationError(
                f"broken off: edit on {failure.share.end} failed"))
            raise failure
        if failure is not None:
            if not isinstance(failure, RPCError):
                s.conn.broken = True  # what is left of the reply may still come
            raise self._close_phase(record, t0, s, failure)
        record.detail = (f"{len(s.entries)} sessions, streamed into the targets' edits as "
                         "it arrived (their edit phases overlap this one)")
        self._close_phase(record, t0, s)

    def _stream_trouble(self, session, deadline: float) -> BaseException | None:
        """Why a stream must stop now, if it must: its source gone, a target that refused
        an edit or went, or no end in time."""
        if not session.connected or not session.is_alive():
            return TransportError("the connection was lost")
        for share in self._shares.values():
            if share.record is None:
                continue
            refused = share.pipeline.refused()
            if refused is not None:
                return _TargetFailed(share, refused[1], refused[0])
            if share.pipeline.lost():
                return _TargetFailed(share, TransportError("the connection was lost"))
        if time.monotonic() > deadline:
            return TimeoutExpiredError(f"no complete reply within {self.options.rpc_timeout}"
                                       " s")
        return None

    def _stop(self, stream: _SourceStream, why: BaseException) -> None:
        """End a stream once no block is being written; a target that does not take the
        one being written is cut off."""
        if stream.fail(why, _STOP_WAIT):
            return
        for share in self._shares.values():
            if share.record is not None:
                share.end.conn.broken = True
                share.end.conn.cut()
        stream.fail(why, _STOP_WAIT)

    def _whole_reply(self, s: SourceEnd, reply: str) -> None:
        error = reply_error(reply)
        if error is not None:
            raise error
        self._route(s, [e for e in parse_entries(data_of(reply))
                        if self.selection.matches(e)])

    # -- routing and writing -----------------------------------------------------------
    def _route(self, s: SourceEnd, entries: list[Entry], raw: bytes | None = None) -> None:
        """Entries of ``s`` (``raw``: their text, when they are all of a block) to their
        targets; a target's share is sent once large enough."""
        s.entries.extend(entries)
        if self.split is None:
            mine = {self.targets[0]: entries}
        else:
            mine = {}
            for e in entries:
                mine.setdefault(self._target_of(e), []).append(e)
        for t, some in mine.items():
            t.entries.extend(zip(some, repeat(s)))
            share = self._shares.get(t)
            if share is None or share.pipeline is None or not some:
                continue
            body = raw if raw is not None and len(mine) == 1 else entries_xml(some).encode()
            share.pending.append(body)
            share.size += len(body)
            if share.size >= _LEAST_EDIT:
                self._send_share(share)

    def _target_of(self, entry: Entry) -> TargetEnd:
        if self.split is None:
            return self.targets[0]
        wanted = self.split.target_of(entry)
        return next(t for t in self.targets if t.endpoint == wanted)

    def _send_share(self, share: _Share) -> None:
        body = take_entry_namespace(b"".join(share.pending))
        share.pending, share.size = [], 0
        if share.record is None:
            share.record, share.t0 = self._open_phase("edit", share.end)
            share.end.staged = True  # from the first byte sent: a half-sent edit is discarded
        try:
            share.pipeline.send(body)
        except Exception as exc:
            raise _TargetFailed(share, exc) from exc

    def _await_edits(self, share: _Share) -> None:
        failed = share.pipeline.wait()
        if failed is not None:
            raise _TargetFailed(share, failed[1], failed[0])
        t, size = share.end, share.pipeline.request_bytes
        share.record.detail = (
            f"{len(t.entries)} sessions, {size} bytes in {len(share.pipeline.edits)} edits, "
            "streamed: timed from its first edit to the last reply, overlapping the read")
        self._close_phase(share.record, share.t0, t)
        share.record = None
        self.report.state_bytes += size

    def _edit_failed(self, share: _Share, error: BaseException, index: int | None
                     ) -> MigrationError:
        t = share.end
        if not isinstance(error, RPCError):
            t.conn.broken = True  # once anything but an answer came back, it is done
        which = (f" (edit {index + 1} of {len(share.pipeline.edits)})"
                 if index is not None else "")
        failure = MigrationError(f"edit on {t}: {describe(error)}{which}")
        if share.record is None:
            share.record, share.t0 = self._open_phase("edit", t)
        self._close_phase(share.record, share.t0, t, failure)
        share.record = None
        return failure

    def _edit_whole(self, t: TargetEnd) -> None:
        if not t.entries:
            return
        with self._phase("edit", t) as record:
            t.staged = True  # from the first byte sent: a half-sent edit is discarded too
            size = t.conn.edit_config(entries_xml(e for e, _ in t.entries), "candidate")
            record.detail = f"{len(t.entries)} sessions, {size} bytes"
        self.report.state_bytes += size

    def _count_selected(self) -> None:
        for s in self.sources:
            s.report.sessions = len(s.entries)
        for t in self.targets:
            t.report.sessions = len(t.entries)
        self.report.sessions_selected = sum(len(s.entries) for s in self.sources)
