"""The conntrack table's events: entries appearing, changing and leaving, as the kernel of
one network namespace announces them on its ctnetlink multicast groups."""

from __future__ import annotations

import errno
import select
import socket
import struct

from .ctattrs import (
    CT_DELETE,
    CT_NEW,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NLM_F_CREATE,
    SO_RCVBUFFORCE,
    CtEntry,
)
from .ctnetlink import _messages, _netlink_socket
from .ctparse import parse_entry

NFNLGRP_CONNTRACK_UPDATE = 2  # an entry's state, status or binding changed
_FLAGS = struct.Struct("=H")  # nlmsg_flags, at offset 6 of a message


class ConntrackEvents:
    """Entries appearing in, changing in and leaving the conntrack table of one namespace,
    as the kernel announces them (an entry appears once confirmed, its NAT binding set; it
    changes when its TCP state or status does, or when it is written over ctnetlink).

    The kernel tells a new entry from a changed one by the flags of its CT_NEW message:
    NLM_F_CREATE (with NLM_F_EXCL) for a new one, none for an update."""

    def __init__(self, netns: str | None = None, updates: bool = True):
        self.sock = _netlink_socket(netns)
        try:  # a burst (a 100k-entry import) must not overflow the queue
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        except OSError:
            pass
        groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
        if updates:
            groups |= 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
        self.sock.bind((0, groups))
        self.lost = 0  # times the kernel dropped events because we read too slowly
        self._buffer = bytearray(1 << 20)  # reused: every event is a read of its own

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def wait(self, timeout: float) -> bool:
        """Whether events are waiting, after at most ``timeout`` seconds of waiting."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def read(self, timeout: float = 0.0) -> list[tuple[str, CtEntry]]:
        """The events waiting ("created" | "updated" | "deleted", entry), in the order the
        kernel sent them, after at most ``timeout`` seconds of waiting for the first; with
        no timeout, every event queued now (the socket drained without waiting)."""
        events: list[tuple[str, CtEntry]] = []
        if timeout and not self.wait(timeout):
            return events
        flags_of = _FLAGS.unpack_from
        while True:
            data = self._buffer
            try:
                size = self.sock.recv_into(data, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
                continue
            for pos, length, kind, _seq in _messages(data, size):
                if kind == CT_NEW:
                    what = "created" if flags_of(data, pos + 6)[0] & NLM_F_CREATE else \
                        "updated"
                elif kind == CT_DELETE:
                    what = "deleted"
                else:
                    continue
                events.append((what, parse_entry(data, pos + 20, pos + length,
                                                 data[pos + 16])))
