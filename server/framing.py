"""NETCONF message framing over an SSH channel (RFC 6242): end-of-message for base 1.0 and
the hello, chunked framing for base 1.1.

Reads in large blocks and holds a message's limits while its bytes arrive: a chunk header
is weighed against the message size limit as soon as it is read, and the message's first
bytes are checked (``head_check``) once they are in. A message refused that way is answered
at once (:class:`MessageRefused`) and the rest of it is read and dropped by the next read,
so the session goes on with the message after it; nothing of it is held but its first
bytes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

EOM = b"]]>]]>"
MAX_CHUNK = 4294967295
_CHUNK_HEADER = re.compile(rb"\n#([1-9][0-9]{0,9})\n")
_END_OF_CHUNKS = b"\n##\n"
# More than a channel's window (8 MB) holds: a read takes all of it, where a read of less
# moves the rest of paramiko's buffer down (a copy of up to the whole window each time).
_RECV = 16 << 20
# How much of a refused message is kept (to find its message-id).
_KEPT = 64 << 10
# A read buffer allocated beyond this is given back once a message is through with it.
_BUFFER_KEPT = 4 << 20


class FramingError(Exception):
    """The peer broke the framing; the session cannot continue."""


class MessageRefused(Exception):
    """A message refused while it arrived; ``head`` keeps its first bytes (to find the
    message-id), ``reason`` is what ``head_check`` said. The next read drops the rest of
    the message as it arrives (however large a chunk its peer announced), then reads the
    next one: the framing stays in step and the session goes on."""

    def __init__(self, size: int, head: bytes, reason: object = None):
        super().__init__(f"message refused at {size} bytes: {reason or 'too big'}")
        self.size = size
        self.head = head
        self.reason = reason


class MessageTooBig(MessageRefused):
    """A message beyond the size limit; ``size`` is how much of it was known when it was
    refused (read, or announced by a chunk header)."""


class ChannelEOF(Exception):
    pass


class FrameReader:
    """Messages from ``recv`` (a channel's), each at most ``max_message`` bytes; the first
    ``head_size`` bytes of a longer message go to ``head_check``, which returns None or why
    the message is refused."""

    def __init__(self, recv: Callable[[int], bytes], max_message: int,
                 head_check: Callable[[bytes], object | None] | None = None,
                 head_size: int = _KEPT):
        self._recv = recv
        self.max_message = max_message
        self.head_check = head_check
        self.head_size = head_size
        self._buf = bytearray()
        self._pos = 0
        self.bytes_in = 0
        self._skip_eom = False  # the rest of a refused base-1.0 message is still to come
        self._skip_chunk: int | None = None  # ... of a base-1.1 one: bytes of its chunk

    def _fill(self, compact: bool = True) -> None:
        if compact and self._pos > (1 << 20):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += self._received()

    def _received(self) -> bytes:
        data = self._recv(_RECV)
        if not data:
            raise ChannelEOF()
        self.bytes_in += len(data)
        return data

    def _keep(self, data: bytes, start: int) -> None:
        """Make what follows ``start`` in ``data`` (the next message) the read buffer."""
        self._buf = bytearray(memoryview(data)[start:])
        self._pos = 0

    def _release(self) -> None:
        """Give back a read buffer a large message grew, keeping what follows it."""
        if sys.getsizeof(self._buf) > _BUFFER_KEPT:
            self._buf = bytearray(memoryview(self._buf)[self._pos:])
            self._pos = 0

    # -- end-of-message framing ------------------------------------------------------------
    def read_eom(self, limit: int | None = None) -> bytes:
        """One base-1.0 message (also used for the hello, with a ``limit`` of its own)."""
        if self._skip_eom:
            self._drop_eom()
        limit = self.max_message if limit is None else limit
        del self._buf[:self._pos]
        self._pos = 0
        search = 0
        checked = self.head_check is None
        while True:
            idx = self._buf.find(EOM, search)
            if idx > limit:  # all of it came in one read: refused all the same
                head = bytes(memoryview(self._buf)[:_KEPT])
                self._pos = idx + len(EOM)
                self._release()
                raise MessageTooBig(idx, head)
            if idx >= 0:
                self._pos = idx + len(EOM)
                message = bytes(memoryview(self._buf)[:idx])
                self._release()
                return message
            if not checked and len(self._buf) >= self.head_size:
                checked = True
                reason = self.head_check(bytes(memoryview(self._buf)[:self.head_size]))
                if reason is not None:
                    self._refuse_eom(MessageRefused(len(self._buf), b"", reason))
            if len(self._buf) > limit:
                self._refuse_eom(MessageTooBig(len(self._buf), b""))
            search = max(0, len(self._buf) - len(EOM) + 1)
            self._fill(compact=False)

    def _refuse_eom(self, refused: MessageRefused) -> None:
        refused.head = bytes(memoryview(self._buf)[:_KEPT])
        tail = bytes(self._buf[-(len(EOM) - 1):])  # may begin the end marker
        self._buf = bytearray(tail)
        self._pos = 0
        self._skip_eom = True
        raise refused

    def _drop_eom(self) -> None:
        """Read up to the end of a refused message, keeping nothing of it: each read is
        searched where it lies, never copied."""
        idx = self._buf.find(EOM, self._pos)
        if idx >= 0:
            self._pos = idx + len(EOM)
            self._skip_eom = False
            return
        tail = bytes(self._buf[-(len(EOM) - 1):])  # may begin the end marker
        self._buf = bytearray()
        self._pos = 0
        while True:
            data = self._received()
            joined = tail + data[:len(EOM) - 1]
            idx = joined.find(EOM)
            end = idx + len(EOM) - len(tail) if idx >= 0 else -1  # where it ends in data
            if end < 0:
                idx = data.find(EOM)
                end = idx + len(EOM) if idx >= 0 else -1
            if end >= 0:
                self._keep(data, end)
                self._skip_eom = False
                return
            tail = joined[-(len(EOM) - 1):] if len(data) < len(EOM) - 1 else \
                data[-(len(EOM) - 1):]

    # -- chunked framing -------------------------------------------------------------------
    def _need(self, count: int) -> None:
        while len(self._buf) - self._pos < count:
            self._fill()

    def read_chunked(self) -> bytes:
        """One base-1.1 message: chunks until end-of-chunks. A chunk is taken as it
        arrives, so the head check sees the first bytes of even a single huge chunk."""
        if self._skip_chunk is not None:
            self._drop_chunks()
        message = bytearray()  # one buffer: a list of tiny chunks would weigh far more
        checked = self.head_check is None
        while True:
            self._need(4)
            if self._buf.startswith(_END_OF_CHUNKS, self._pos):
                self._pos += len(_END_OF_CHUNKS)
                break
            size = int(self._read_header())
            if len(message) + size > self.max_message:
                # Refused on the header's word, once the message's first bytes (its
                # message-id) are in; the rest is dropped by the next read.
                total = len(message) + size
                del message[_KEPT:]
                wanted = min(size, _KEPT - len(message))
                self._take(message, wanted)
                self._skip_chunk = size - wanted
                raise MessageTooBig(total, bytes(message))
            left = size
            while left:
                if self._pos == len(self._buf):
                    self._fill()
                end = min(self._pos + left, len(self._buf))
                message += memoryview(self._buf)[self._pos:end]
                left -= end - self._pos
                self._pos = end
                if not checked and len(message) >= self.head_size:
                    checked = True
                    reason = self.head_check(bytes(message[:self.head_size]))
                    if reason is not None:
                        self._skip_chunk = left
                        raise MessageRefused(len(message), bytes(message[:_KEPT]), reason)
        self._release()
        return bytes(message)

    def _take(self, message: bytearray, count: int) -> None:
        """Append the next ``count`` bytes of the current chunk to ``message``."""
        while count:
            if self._pos == len(self._buf):
                self._fill()
            end = min(self._pos + count, len(self._buf))
            message += memoryview(self._buf)[self._pos:end]
            count -= end - self._pos
            self._pos = end

    def _drop_chunks(self) -> None:
        """Read up to the end-of-chunks of a refused message, keeping nothing of it."""
        left = self._skip_chunk or 0
        while True:
            taken = min(left, len(self._buf) - self._pos)
            self._pos += taken
            left -= taken
            while left:  # each read dropped where it lies, never copied
                data = self._received()
                if len(data) > left:
                    self._keep(data, left)
                    left = 0
                else:
                    left -= len(data)
            self._need(4)
            if self._buf.startswith(_END_OF_CHUNKS, self._pos):
                self._pos += len(_END_OF_CHUNKS)
                self._skip_chunk = None
                self._release()
                return
            left = int(self._read_header())

    def _read_header(self) -> bytes:
        # "\n#" + up to 10 digits + "\n"
        while True:
            match = _CHUNK_HEADER.match(self._buf, self._pos)
            if match:
                if int(match.group(1)) > MAX_CHUNK:
                    raise FramingError(f"chunk size {int(match.group(1))} exceeds {MAX_CHUNK}")
                self._pos = match.end()
                return match.group(1)
            window = bytes(self._buf[self._pos:self._pos + 13])
            if not window.startswith(b"\n#"[:len(window)]) or len(window) >= 13 or (
                    len(window) > 2 and not _partial_header_ok(window)):
                raise FramingError(f"bad chunk header {window[:13]!r}")
            self._fill()


def _partial_header_ok(window: bytes) -> bool:
    digits = window[2:]
    return digits[:1] != b"0" and all(48 <= b <= 57 for b in digits)


SEND_CHUNK = 32 << 10


def frame_chunks(body: bytes, chunk: int = SEND_CHUNK) -> bytes:
    """Part of a message as chunks of ``chunk`` bytes, no end marker. Moderate chunks matter to
    clients that re-scan their whole receive buffer until a chunk is complete (one huge
    chunk makes them quadratic)."""
    view = memoryview(body)
    parts = []
    for start in range(0, len(body), chunk):
        piece = view[start:start + chunk]
        parts.append(b"\n#%d\n" % len(piece))
        parts.append(piece)
    return b"".join(parts)


def end_of_message(chunked: bool) -> bytes:
    return _END_OF_CHUNKS if chunked else EOM


def frame_eom(body: bytes) -> bytes:
    return body + EOM
