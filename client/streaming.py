"""Reading a NETCONF reply while it is still arriving (RFC 6242 chunked framing).

ncclient hands a reply over only once all of it is in: a 10k-session get-data is 5.6 MB that
the client could already be forwarding. ``ChunkReader`` is the parser of client.netconf's
BulkSSHSession once the hello chose :base:1.1. It delivers whole messages to ncclient as
ncclient's own parser does, but while a *tap* is set, the next message goes to the tap piece
by piece instead, as the pieces arrive (``tap(piece)``, then ``tap(None)`` at the end of the
message); ncclient never sees that message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ncclient.transport.errors import NetconfFramingError

Tap = Callable[[bytes | None], None]

# A chunk header or the end-of-chunks marker (RFC 6242 section 4.2); a chunk size has at
# most ten digits (4294967295).
_DELIMITER = re.compile(rb"\n#([1-9][0-9]{0,9})\n|\n##\n")
_LONGEST_DELIMITER = 13


class ChunkReader:
    """RFC 6242 chunks read in place, without re-scanning what is already read."""

    def __init__(self, session) -> None:
        self._session = session
        self._buffer = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._parts: list[bytes] = []  # of a message for ncclient
        self._tapped: Tap | None = None  # the tap taking the current message, if any
        self._started = False
        self.tap: Tap | None = None

    def parse(self, data: bytes) -> None:
        """The session thread calls this with every read from the channel."""
        buf = self._buffer
        buf += data
        pos, end = 0, len(buf)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._piece(bytes(memoryview(buf)[pos:pos + take]))  # one copy
                self._left -= take
                pos += take
                continue
            found = _DELIMITER.match(buf, pos)
            if found is None:
                if end - pos >= _LONGEST_DELIMITER or not b"\n#".startswith(buf[pos:pos + 2]):
                    raise NetconfFramingError("bad chunk header",
                                              bytes(buf[pos:pos + 40]))
                break  # a header cut by the read: wait for the rest
            pos = found.end()
            if found.group(1):
                self._left = int(found.group(1))
            else:
                self._message_end()
        del buf[:pos]

    def _piece(self, piece: bytes) -> None:
        if not self._started:  # a tap takes the message that starts after it was set
            self._started = True
            self._tapped, self.tap = self.tap, None
        if self._tapped is not None:
            self._tapped(piece)
        else:
            self._parts.append(piece)

    def _message_end(self) -> None:
        tapped, self._tapped, self._started = self._tapped, None, False
        if tapped is not None:
            tapped(None)
            return
        message, self._parts = b"".join(self._parts), []
        self._session._dispatch_message(message.decode())

