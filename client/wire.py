"""Bytes on the wire: what a client's TCP connections carried, as the kernel counted it.

The NETCONF and RESTCONF clients count their messages' bytes themselves; what crosses the
link is less (SSH or HTTP compression) or more (SSH packets, TLS records, HTTP headers).
The kernel's count of a TCP connection (``TCP_INFO``: bytes the peer acknowledged, bytes
received) is the figure a link carries, whatever the layers above did to the messages.
"""

from __future__ import annotations

import socket
import struct

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, both __u64, follow
# the 8 one-byte fields, 24 __u32 fields and two __u64 pacing rates (kernel 4.1 and later).
_ACKED_RECEIVED = struct.Struct("=QQ")
_OFFSET = 120
_LENGTH = _OFFSET + _ACKED_RECEIVED.size


def tcp_counts(sock: socket.socket | None) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) of a TCP socket's connection so far,
    or None when the kernel does not say (not TCP, not Linux, closed)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _LENGTH)
    except (OSError, AttributeError, ValueError):
        return None
    if len(raw) < _LENGTH:
        return None
    acked, received = _ACKED_RECEIVED.unpack_from(raw, _OFFSET)
    # The SYN takes one sequence number, which the acknowledged count includes.
    return max(acked - 1, 0), received


class WireMeter:
    """Sums what several TCP connections carried (a client's pool of HTTP connections,
    each looked at again after every exchange): only the growth since a connection was
    last looked at is added."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.known = True  # False once a connection could not be read
        self._seen: dict[int, tuple[socket.socket, int, int]] = {}

    def look(self, sock: socket.socket | None) -> None:
        counts = tcp_counts(sock)
        if counts is None:
            self.known = False
            return
        key = id(sock)
        previous = self._seen.get(key)
        if previous is not None and previous[0] is not sock:
            previous = None  # a new socket where a closed one was
        sent0, received0 = (previous[1], previous[2]) if previous else (0, 0)
        if counts[0] < sent0 or counts[1] < received0:
            sent0 = received0 = 0  # another connection behind the same object
        self.sent += counts[0] - sent0
        self.received += counts[1] - received0
        self._seen[key] = (sock, *counts)
