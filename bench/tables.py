"""The NAT session table the migration benchmark moves (bench/migrator_linux.py).

A uniform table first (synthetic_sessions: TCP established source NAT, every original and
reply tuple distinct, as in a real NAT), then made realistic session by session
(mixed_sessions): TCP in every state, UDP, ICMP echo, IPv6 and destination NAT, with
timeouts and counters that vary from session to session.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import random

from nfmig.nf_backends.base import Session
from nfmig.nf_backends.ctnetlink import Conntrack, CtEntry
from nfmig.nf_backends.linux import LinuxBackend

# Subscriber 10.0.0.10-209 to a server in 192.0.2.100-107, port 443, translated to one of
# four external addresses. The pair (external address, port) repeats only across servers,
# so every reply tuple is distinct.
SUBSCRIBERS = [f"10.0.0.{10 + i}" for i in range(200)]
SERVERS = [f"192.0.2.{100 + i}" for i in range(8)]
EXTERNALS = [f"192.0.2.{1 + i}" for i in range(4)]  # contiguous: the Linux NAT takes a range
V6_EXTERNALS = [f"2001:db8::{1 + i}" for i in range(len(EXTERNALS))]
PORT_MIN, PORT_MAX = 1024, 65535
PORTS = PORT_MAX - PORT_MIN + 1
CAPACITY = len(SERVERS) * len(EXTERNALS) * PORTS
TIMEOUT = 432000  # the model's default for established TCP

TCP_STATES = ("established", "syn-sent", "syn-recv", "fin-wait", "close-wait", "last-ack",
              "time-wait", "close")
# Remaining lifetimes (seconds). The floor outlives a whole run with its repeated
# migrations: a session that expires mid-run would look lost. The OVS ceiling is what an
# OpenFlow idle timeout (16 bits) holds with room to spare.
MIN_TIMEOUT = 3600
UDP_TIMEOUT_MAX, ICMP_TIMEOUT_MAX, OVS_TIMEOUT_MAX = 7200, 5400, 7200


def synthetic_sessions(n: int, timeout: int = TIMEOUT) -> list[Session]:
    """N distinct TCP ESTABLISHED SNAT sessions (original and reply tuples all unique)."""
    sessions = []
    for i in range(n):
        binding = i // len(EXTERNALS)
        sessions.append(Session(
            "TCP", SUBSCRIBERS[i % len(SUBSCRIBERS)], PORT_MIN + i // len(SUBSCRIBERS),
            SERVERS[binding // PORTS], 443, EXTERNALS[i % len(EXTERNALS)],
            PORT_MIN + binding % PORTS, None, None, "established", 7, 7, timeout))
    return sessions


def mixed_sessions(n: int, ipv6_and_dnat: bool, ovs_source: bool = False) -> list[Session]:
    """A realistic table of n sessions made of the uniform one, keeping every key and reply
    tuple distinct: of each ten, four TCP in every state in turn, two UDP, one ICMP echo
    (identifier kept, as the SDN NAT needs), and (ipv6_and_dnat) an IPv6 TCP, an IPv6 UDP and
    a destination NAT session; the rest stay TCP established. Every session has a timeout and
    counters of its own (``ovs_source``: timeouts an OpenFlow idle timeout holds)."""
    rng = random.Random(n)  # the same table for the same n, run after run
    mixed, echoes = [], set()
    for i, s in enumerate(synthetic_sessions(n)):
        kind = i % 10
        if kind < 4:
            s = s._replace(tcp_state=TCP_STATES[(i // 10 + kind) % len(TCP_STATES)])
        elif kind < 6:
            s = _udp(s)
        elif kind == 6 and not (claims := {("id", s.translated_address, s.src_port),
                                           ("out", s.src_address, s.dst_address),
                                           ("in", s.translated_address, s.dst_address)}
                                ) & echoes:
            # Echo sessions as the SDN NAT can hold them (it keeps the identifier, so one
            # per inside address and peer, and one per external address and peer) and the
            # kernel too (one per external address and identifier): a few dozen.
            echoes |= claims
            s = s._replace(protocol="ICMP", dst_port=0, translated_port=s.src_port,
                           tcp_state=None, src_window_scale=None, dst_window_scale=None)
        elif kind in (7, 8) and ipv6_and_dnat:
            s = s._replace(src_address=_v6("fd00::", s.src_address),
                           dst_address=_v6("2001:db8:100::", s.dst_address),
                           translated_address=V6_EXTERNALS[EXTERNALS.index(
                               s.translated_address)])
            if kind == 8:
                s = _udp(s)
        elif kind == 9 and ipv6_and_dnat:
            # A server's connection to a published port, on to the subscriber's port 80.
            subscriber = int(s.src_address.rsplit(".", 1)[1])
            s = s._replace(src_address=s.dst_address, dst_address=EXTERNALS[0],
                           dst_port=8000 + subscriber, translated_address=None,
                           translated_port=None, translated_dst_address=s.src_address,
                           translated_dst_port=80)
        mixed.append(_aged(s, rng, ovs_source))
    return mixed


def _udp(s: Session) -> Session:
    return s._replace(protocol="UDP", tcp_state=None, src_window_scale=None,
                      dst_window_scale=None)


def _aged(s: Session, rng: random.Random, ovs_source: bool) -> Session:
    """The session with a lifetime and counts of its own: lifetimes spread up to the
    protocol's usual ceiling, packet counts over several orders of magnitude."""
    if ovs_source:
        ceiling = OVS_TIMEOUT_MAX
    elif s.protocol == "UDP":
        ceiling = UDP_TIMEOUT_MAX
    elif s.protocol == "ICMP":
        ceiling = ICMP_TIMEOUT_MAX
    else:
        ceiling = TIMEOUT if s.tcp_state == "established" else 2 * MIN_TIMEOUT
    orig = rng.randint(1, 10 ** rng.randint(1, 6))
    reply = rng.randint(0, 2 * orig)
    return s._replace(timeout=rng.randint(MIN_TIMEOUT, ceiling), orig_packets=orig,
                      orig_bytes=orig * rng.randint(40, 1500), reply_packets=reply,
                      reply_bytes=reply * rng.randint(40, 1500))


def _v6(prefix: str, ipv4: str) -> str:
    return str(ipaddress.ip_address(prefix) + int(ipaddress.ip_address(ipv4)) % (1 << 16))


def uncounted(s: Session) -> Session:
    """The session as the kernel holds one it counted itself from zero: written straight
    into a table, it keeps no counts (the kernel takes none on create)."""
    return s._replace(orig_packets=None, orig_bytes=None, reply_packets=None,
                      reply_bytes=None)


# -- straight into a kernel table --------------------------------------------------------
def kernel_entries(sessions: list[Session]) -> list[CtEntry]:
    """The entries through the Linux backend's own conversion, so that a table written here
    holds exactly what a server would write."""
    return _converter()._entries(sessions)


@functools.cache
def _converter() -> LinuxBackend:
    return LinuxBackend("unused")  # never started: it only converts, touching no kernel


def create_all(ct: Conntrack, entries: list[CtEntry], where: str) -> None:
    failed = [code for code in ct.create(entries) if code]
    if failed:
        raise RuntimeError(f"{where}: conntrack refused {len(failed)} of {len(entries)} "
                           f"entries ({os.strerror(failed[0])})")


def flush(ct: Conntrack) -> None:
    """Empty a table (entries that expired meanwhile are no error)."""
    ct.delete(ct.dump())


def binding_set(entries: list[CtEntry]) -> set[tuple]:
    """What must survive a move: the 5-tuple, the translated address and port, TCP state."""
    return {(e.key, e.nat_addr, e.nat_port, e.tcp_state) for e in entries}


def parse_sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > CAPACITY:
        raise argparse.ArgumentTypeError(f"sizes must be between 1 and {CAPACITY}")
    return sizes
