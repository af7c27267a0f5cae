"""Interface addresses over rtnetlink, and gratuitous ARP, from the calling thread's network
namespace (the NamespaceWorker's): a switchover puts a gateway address on one NAT and takes
it off another, inside a migration's window, without starting `ip` or `arping`.

The message layouts are the kernel's (linux/netlink.h, linux/if_addr.h, linux/if_arp.h),
declared once here and used to write requests and read replies alike.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
ETH_P_ARP = 0x0806

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
RTATTR = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")  # -errno (0: an acknowledgement)
# An Ethernet frame with an ARP request: destination, source, type; then hardware type,
# protocol type, their lengths, operation, sender MAC and IPv4, target MAC and IPv4.
ARP_FRAME = struct.Struct("!6s6sHHHBBH6s4s6s4s")
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


class RtnlError(OSError):
    """The kernel refused a request (errno, and what was asked)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    head = RTATTR.pack(RTATTR.size + len(payload), kind)
    return head + payload + b"\0" * (_align(len(head) + len(payload)) - len(head) - len(payload))


class Rtnl:
    """One rtnetlink socket of the calling thread's namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def addresses(self) -> set[tuple[str, int, str]]:
        """Every IPv4 and IPv6 address: (address, prefix length, interface name)."""
        found = set()
        for kind, body in self._request(RTM_GETADDR, NLM_F_DUMP,
                                        IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if kind != RTM_NEWADDR:
                continue
            family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(body)
            attrs = dict(attributes(body, IFADDRMSG.size))
            raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
            if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            found.add((socket.inet_ntop(family, raw), prefixlen, socket.if_indextoname(index)))
        return found

    def add(self, address: str, prefixlen: int, device: str) -> None:
        """Put the address on the interface (replacing it if it is there)."""
        self._change(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, address, prefixlen, device)

    def delete(self, address: str, prefixlen: int, device: str) -> None:
        self._change(RTM_DELADDR, 0, address, prefixlen, device)

    def _change(self, kind: int, flags: int, address: str, prefixlen: int,
                device: str) -> None:
        ip = ipaddress.ip_address(address)
        family = _FAMILY[ip.version]
        body = IFADDRMSG.pack(family, prefixlen, 0, 0, socket.if_nametoindex(device))
        body += _attr(IFA_ADDRESS, ip.packed)
        if ip.version == 4:
            body += _attr(IFA_LOCAL, ip.packed)
        for _ in self._request(kind, flags | NLM_F_ACK, body):
            pass

    def _request(self, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """Send one request; yield (type, body) of each message of the answer until its end
        (an acknowledgement, an error, or the end of a dump)."""
        self._seq += 1
        seq = self._seq
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags,
                                     seq, 0) + body)
        while True:
            for rkind, rseq, payload in messages(self.sock.recv(1 << 16)):
                if rseq != seq:
                    continue  # an answer to an earlier request that was given up on
                if rkind == NLMSG_DONE:
                    return
                if rkind == NLMSG_ERROR:
                    (code,) = NLMSGERR.unpack_from(payload)
                    if code:
                        raise RtnlError(-code, os.strerror(-code))
                    return
                yield rkind, payload


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in one datagram."""
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size:
            return
        yield kind, seq, data[pos + NLMSGHDR.size:pos + length]
        pos += _align(length)


def attributes(body: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute of a message's payload from ``start``."""
    pos = start
    while pos + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, pos)
        if length < RTATTR.size:
            return
        yield kind, body[pos + RTATTR.size:pos + length]
        pos += _align(length)


class Announcer:
    """Gratuitous ARP, through one packet socket per interface kept open: closing a packet
    socket waits for the kernel's network grace period (tens of milliseconds), which a
    switchover inside a migration's window cannot spare. Bound with protocol 0, the
    sockets receive nothing."""

    def __init__(self) -> None:
        self._sockets: dict[str, socket.socket] = {}

    def announce(self, device: str, address: str) -> None:
        """One ARP request for ``address`` from itself, broadcast on ``device``: neighbours
        that know the address take the sender's MAC for it."""
        ip = ipaddress.IPv4Address(address).packed
        sock = self._sockets.get(device)
        if sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            sock.bind((device, 0))
            self._sockets[device] = sock
        mac = sock.getsockname()[4]
        sock.send(ARP_FRAME.pack(b"\xff" * 6, mac, ETH_P_ARP, 1, 0x0800, 6, 4, 1, mac, ip,
                                 b"\0" * 6, ip))

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
