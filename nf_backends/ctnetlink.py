"""A lean ctnetlink client: dump, create, update and delete Linux conntrack entries in bulk.

A send carries 2048 messages (built by :mod:`nfmig.nf_backends.ctencode`) and only its last
asks for an ack, so the kernel answers a batch with one reply (plus one per refused entry).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from .ctattrs import (
    _BATCH,
    _HDR,
    _NLA,
    CLONE_NEWNET,
    CT_GET,
    CT_NEW,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR_ATTR_MSG,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    CtEntry,
)
from .ctencode import Encoder
from .ctparse import parse_entry, parse_run


class ConntrackError(Exception):
    """The kernel refused one message; ``index`` is its place in the batch."""

    def __init__(self, index: int, code: int, message: str = ""):
        detail = f": {message}" if message else ""
        super().__init__(f"{os.strerror(code)}{detail}")
        self.index = index
        self.errno = code


# -- the socket ---------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_FLAGS = struct.Struct("=H")  # a message header's flags, at offset 6
T = TypeVar("T")


def in_namespace(netns: str | None, make: Callable[[], T]) -> T:
    """``make()`` run inside ``netns`` (a path like /run/netns/NAME; None: our own). What it
    opens (a socket, a /proc/sys file) stays bound to that namespace afterwards."""
    if netns is None:
        return make()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns, os.O_RDONLY)
    except OSError:
        os.close(own)
        raise
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot enter network namespace {netns}: {os.strerror(code)}")
        try:
            return make()
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the server's namespace")
    finally:
        os.close(own)
        os.close(target)


def _netlink_socket(netns: str | None) -> socket.socket:
    """A ctnetlink socket of ``netns``, or of our own namespace."""
    return in_namespace(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                                     NETLINK_NETFILTER))


class EntryCount:
    """The number of conntrack entries of one namespace, read without a dump."""

    def __init__(self, netns: str | None = None):
        self._fd = in_namespace(netns, lambda: os.open(
            "/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY))

    def read(self) -> int:
        return int(os.pread(self._fd, 32, 0))

    def close(self) -> None:
        os.close(self._fd)


class Conntrack:
    """The conntrack table of one network namespace."""

    # The kernel answers within its send; one that does not (its namespace torn down
    # beneath us) must fail the request, not hold its thread forever.
    REPLY_TIMEOUT = 30.0

    def __init__(self, netns: str | None = None):
        self.sock = _netlink_socket(netns)
        self.sock.settimeout(self.REPLY_TIMEOUT)
        for option, value in ((SO_RCVBUFFORCE, 8 << 20),
                              (SO_SNDBUFFORCE, 4 << 20)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, value)
            except OSError:
                pass  # unprivileged: the default buffers still work, batches are small
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self._seq = self._last = 0
        self._buffer = bytearray(1 << 20)  # one reused receive buffer: no allocation per read
        self._encoder = Encoder()
        self._messages: dict[int, str] = {}  # batch index -> the kernel's error text

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def dump(self, parse: Callable[[bytes, int, int, int], CtEntry] = parse_entry
             ) -> list[CtEntry]:
        entries: list[CtEntry] = []
        for batch in self.dump_batches(parse):
            entries += batch
        return entries

    def dump_batches(self, parse: Callable[[bytes, int, int, int], CtEntry] = parse_entry
                     ) -> Iterator[list[CtEntry]]:
        """The table, one batch of entries per read, as the kernel fills them in (about a
        hundred per 32 KB read): a reader can pass on the first while the kernel has not
        yet walked to the last. Finish (or close) the iterator before using the socket
        for anything else."""
        seq = self._next_seq()
        request = _HDR.pack(20, CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        self.sock.send(request + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
        buf = self._buffer
        runs = parse is parse_entry  # another parser is asked for every message
        while True:
            size = self._recv_into(buf)
            if runs and size >= _HDR.size:
                length, kind, _flags, msg_seq, _pid = _HDR.unpack_from(buf, 0)
                batch = parse_run(buf, size, (length + 3) & ~3) \
                    if kind == CT_NEW and msg_seq == seq else None
                if batch is not None:
                    yield batch
                    continue
            batch = []
            for pos, length, kind, msg_seq in _messages(buf, size):
                if msg_seq == seq:
                    if kind == CT_NEW:
                        batch.append(parse(buf, pos + 20, pos + length, buf[pos + 16]))
                    elif kind == NLMSG_DONE:
                        yield batch
                        return
                    elif kind == NLMSG_ERROR:
                        code, message = _error(buf, pos, length)
                        if code:
                            raise ConntrackError(0, code, message)
            yield batch

    def _receive(self) -> Iterator[tuple[bytearray, int, int, int, int]]:
        """Messages as they arrive: (buffer, offset, length, type, sequence number). The
        buffer is reused by the next read: use a message before asking for the next one."""
        buf = self._buffer
        while True:
            size = self._recv_into(buf)
            for pos, length, kind, seq in _messages(buf, size):
                yield buf, pos, length, kind, seq

    def _recv_into(self, buf: bytearray) -> int:
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise ConntrackError(0, errno.ETIMEDOUT, f"no answer from the kernel within "
                                 f"{self.sock.gettimeout()} s") from None

    def create(self, entries: list[CtEntry]) -> list[int | None]:
        """Insert new entries; per entry None when done, else the errno (all are tried)."""
        return self._batch(entries, "create")

    def update(self, entries: list[CtEntry]) -> list[int | None]:
        """Change timeout and TCP state of existing entries."""
        return self._batch(entries, "update")

    def delete(self, entries: Iterable[CtEntry]) -> list[int | None]:
        return self._batch(list(entries), "delete")

    def get(self, entries: list[CtEntry]) -> list[CtEntry | None]:
        """Each entry as the kernel holds it now (found by its original tuple), or None.
        For a few entries this beats a dump, which walks every namespace's entries."""
        found: list[CtEntry | None] = [None] * len(entries)
        for index, data, pos, length, kind in self._exchange(
                len(entries), lambda start, stop: self._send(entries[start:stop], "get")):
            if kind == CT_NEW:
                found[index] = parse_entry(data, pos + 20, pos + length, data[pos + 16])
        return found

    def get_messages(self, entries: list[CtEntry]) -> list[bytes | None]:
        """Like :meth:`get`, each entry's message as the kernel sent it, unparsed: whether
        an entry is held is often all a caller needs, and the message parses later (see
        :func:`parse_message`) only when its content is wanted."""
        found: list[bytes | None] = [None] * len(entries)
        for index, data, pos, length, kind in self._exchange(
                len(entries), lambda start, stop: self._send(entries[start:stop], "get")):
            if kind == CT_NEW:
                found[index] = bytes(data[pos:pos + length])
        return found

    def last_messages(self) -> dict[int, str]:
        return dict(self._messages)

    def _batch(self, entries: list[CtEntry], kind: str) -> list[int | None]:
        return self._batch_of(len(entries), lambda start, stop: self._send(
            entries[start:stop], kind))

    def _batch_of(self, count: int, send: Callable[[int, int], int]) -> list[int | None]:
        """Per entry None when done, else the errno; ``send`` as for _exchange."""
        results: list[int | None] = [None] * count
        self._messages = {}
        for index, data, pos, length, kind_ in self._exchange(count, send):
            if kind_ != NLMSG_ERROR:
                continue
            code, text = _error(data, pos, length)
            if code:
                results[index] = code
                if text:
                    self._messages[index] = text
        return results

    def _exchange(self, count: int, send: Callable[[int, int], int]
                  ) -> Iterator[tuple[int, bytearray, int, int, int]]:
        """``count`` entries sent a chunk at a time (``send(start, stop)`` sends entries
        start to stop and returns the first one's sequence number), and each reply to one
        of them: (the entry's index, buffer, offset, length, message type). Replies to an
        abandoned earlier request (their sequence numbers fall outside the chunk) are
        passed over."""
        for start in range(0, count, _BATCH):
            stop = min(count, start + _BATCH)
            first = send(start, stop)
            for data, pos, length, kind_, seq in self._replies():
                offset = (seq - first) & 0xFFFFFFFF
                if offset < stop - start:
                    yield start + offset, data, pos, length, kind_

    def _send(self, chunk: list[CtEntry], kind: str) -> int:
        first = (self._seq + 1) & 0xFFFFFFFF
        return self._send_messages(*self._encoder.encode_all(chunk, first, kind), len(chunk))

    def _send_messages(self, messages: bytearray, last: int, count: int) -> int:
        """One send of ``count`` messages (``last``: where the last one begins); the
        sequence number of the first. Only the last message asks for an ack: the kernel
        handles a send's messages in order before the send returns and answers the others
        only when they fail, so that ack ends the replies, and the kernel writes and we read
        thousands of times fewer of them. The kernel's work is done without the interpreter
        lock, so a chunk is large (milliseconds of it): a server's other thread gets that
        long to read the next request."""
        first = (self._seq + 1) & 0xFFFFFFFF
        self._seq = (self._seq + count) & 0xFFFFFFFF
        _FLAGS.pack_into(messages, last + 6, _FLAGS.unpack_from(messages, last + 6)[0] |
                         NLM_F_ACK)
        self._last = self._seq
        self.sock.send(messages)
        return first

    def _replies(self) -> Iterator[tuple[bytearray, int, int, int, int]]:
        """The replies to the last send, up to and including the ack of its last message."""
        last = self._last
        for reply in self._receive():
            yield reply
            if reply[3] == NLMSG_ERROR and reply[4] == last:
                return


def parse_message(message: bytes) -> CtEntry:
    """The entry of one message :meth:`Conntrack.get_messages` returned."""
    return parse_entry(message, 20, len(message), message[16])


def _messages(buf: bytearray, size: int) -> Iterator[tuple[int, int, int, int]]:
    """Each message of a read of ``size`` bytes: (offset, length, type, sequence number)."""
    pos = 0
    while pos < size:
        length, kind, _flags, seq, _pid = _HDR.unpack_from(buf, pos)
        yield pos, length, kind, seq
        pos += (length + 3) & ~3


def _error(data: bytes, pos: int, length: int) -> tuple[int, str]:
    """errno (positive, 0 for an ack) and the kernel's extended-ack text, if any."""
    code = -struct.unpack_from("=i", data, pos + 16)[0]
    text = ""
    if code:
        attrs = pos + 36  # error code and the request's header (acks are capped)
        while attrs + 4 <= pos + length:
            alen, akind = _NLA.unpack_from(data, attrs)
            if alen < 4:
                break
            if akind == NLMSGERR_ATTR_MSG:
                text = data[attrs + 4:attrs + alen].rstrip(b"\0").decode(errors="replace")
            attrs += (alen + 3) & ~3
    return code, text


ERRNO_REASONS = {
    errno.EEXIST: "exists",
    errno.ENOENT: "missing",
    errno.ENOMEM: "table full",
    errno.ENOSPC: "table full",
    errno.EBUSY: "busy",
    errno.EINVAL: "invalid",
    errno.EOPNOTSUPP: "not supported",
}
