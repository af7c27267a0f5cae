"""NETCONF message framing over an SSH channel (RFC 6242): end-of-message for base 1.0 and
the hello, chunked framing for base 1.1. Reads in large blocks, never copies a message more
than once, and enforces a message size limit without losing its place in the stream."""

from __future__ import annotations

import re

EOM = b"]]>]]>"
MAX_CHUNK = 4294967295
_CHUNK_HEADER = re.compile(rb"\n#([1-9][0-9]{0,9})\n")
_END_OF_CHUNKS = b"\n##\n"
# More than a channel's window (8 MB) holds: a read takes all of it, where a read of less
# moves the rest of paramiko's buffer down (a copy of up to the whole window each time).
_RECV = 16 << 20


class FramingError(Exception):
    """The peer broke the framing; the session cannot continue."""


class MessageTooBig(Exception):
    """A whole message was read and discarded; ``head`` keeps its first bytes (to find the
    message-id)."""

    def __init__(self, size: int, head: bytes):
        super().__init__(f"message of {size} bytes or more")
        self.size = size
        self.head = head


class ChannelEOF(Exception):
    pass


class FrameReader:
    def __init__(self, recv, max_message: int):
        self._recv = recv
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0
        self.bytes_in = 0

    def _fill(self, compact: bool = True) -> None:
        if compact and self._pos > (1 << 20):
            del self._buf[:self._pos]
            self._pos = 0
        data = self._recv(_RECV)
        if not data:
            raise ChannelEOF()
        self.bytes_in += len(data)
        self._buf += data

    def read_eom(self) -> bytes:
        """One base-1.0 message (also used for the hello)."""
        del self._buf[:self._pos]
        self._pos = 0
        search = 0
        while True:
            idx = self._buf.find(EOM, search)
            if idx >= 0:
                self._pos = idx + len(EOM)
                return bytes(self._buf[:idx])
            if len(self._buf) > self.max_message:
                self._skip_eom()
            search = max(0, len(self._buf) - len(EOM) + 1)
            self._fill(compact=False)

    def _skip_eom(self) -> None:
        head = bytes(self._buf[:4096])
        size = len(self._buf)
        while True:
            tail = bytes(self._buf[-(len(EOM) - 1):])
            self._buf = bytearray(tail)
            self._pos = 0
            self._fill(compact=False)
            size += len(self._buf) - len(tail)
            idx = self._buf.find(EOM)
            if idx >= 0:
                self._pos = idx + len(EOM)
                raise MessageTooBig(size, head)

    def _need(self, count: int) -> None:
        while len(self._buf) - self._pos < count:
            self._fill()

    def read_chunked(self) -> bytes:
        """One base-1.1 message: chunks until end-of-chunks."""
        parts: list[bytes] = []
        total = 0
        head = b""
        while True:
            self._need(4)
            if self._buf.startswith(_END_OF_CHUNKS, self._pos):
                self._pos += len(_END_OF_CHUNKS)
                break
            header = self._read_header()
            size = int(header)
            if total + size > self.max_message:
                head = head or b"".join(parts)[:4096]
                parts = []
            self._need(size)
            if total + size <= self.max_message:
                parts.append(bytes(memoryview(self._buf)[self._pos:self._pos + size]))
            elif not head:
                head = bytes(self._buf[self._pos:self._pos + min(size, 4096)])
            self._pos += size
            total += size
        if total > self.max_message:
            raise MessageTooBig(total, head)
        return b"".join(parts)

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
