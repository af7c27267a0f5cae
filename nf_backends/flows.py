"""Sessions as OpenFlow flow pairs: the one place that knows what a NAT flow looks like.

One session is two flows in table 1 sharing a session id in their cookies::

    cookie = MAGIC (16 bits) | session id (47 bits) | direction (1 bit: 0 out, 1 in)

The session id is a hash of the session's key, so a key names its flows without a lookup
(deletes go by cookie). The outbound flow matches the 5-tuple on the inside port and rewrites
the source address and port; the inbound flow matches the translated reply on the outside
port and rewrites the destination back. Both live in table 1, behind table 0, which lets in
only frames addressed to the NAT's own ports, and continue in table 2, where the next hop's
MAC addresses are set (see the NAT application), so a session's flows hold nothing but NAT.

An ICMP echo session's flows match the addresses and the echo type: OpenFlow has no field
for the echo identifier, so it passes unchanged (translated port = source port) and rides in
the low bits of the session id instead.

What flows cannot carry: TCP state (flows do not track it, so every TCP session reads back
as "established") and window scales; the backend keeps those it was given, and the app
those it saw in handshakes. The remaining timeout is the idle timeout minus the idle age
(at most 65535 s, the OpenFlow limit); counters are the flows' packet and byte counts.

Flows are written and read as OpenFlow 1.5 messages (ovs.py sends and receives them):
a flow-mod is one struct pack, and a dump is read through layouts learnt from the first
flow of each, so a known flow costs three unpack calls.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import NamedTuple

from .base import Session, SessionKey

MAGIC = 0x6E66  # "nf": flows of nfmig sessions
COOKIE_SHIFT = 48
SESSION_MASK = (1 << 47) - 1
COOKIE_MATCH = f"cookie={MAGIC << COOKIE_SHIFT:#x}/{0xFFFF << COOKIE_SHIFT:#x}"
BASE_COOKIE = 0x6E65 << COOKIE_SHIFT  # the app's own fixed flows (ARP, misses)
PRIORITY = 100
MAX_IDLE = 65535
# Table 0 lets in only frames addressed to this NAT (ARP aside): its ports listen to every
# frame of their segment, and a NAT must not translate traffic sent to another one, such as
# the active NAT's frames a switch floods while it has not learnt (or has forgotten) where
# that NAT is.
GUARD_TABLE, NAT_TABLE, NEXT_HOP_TABLE = 0, 1, 2
L4 = {"TCP": "tcp", "UDP": "udp"}
# ICMP echo: OpenFlow can neither match nor rewrite the echo identifier, so an echo session
# keeps its identifier and is told apart by its addresses alone (see ofnat_state.claims).
ECHO_REQUEST, ECHO_REPLY = 8, 0


class Ports(NamedTuple):
    inside: int
    outside: int


def session_id(key: SessionKey) -> int:
    """The 47-bit id of the session with this key, the same in every process. An ICMP
    echo session's low 16 bits are its echo identifier: no flow field holds that, so the
    cookie does."""
    text = " ".join(map(str, key))
    sid = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(),
                         "big") & SESSION_MASK
    if key[0] == "ICMP":
        return (sid & ~0xFFFF) | (key[2] & 0xFFFF)
    return sid


def cookie(sid: int, inbound: bool) -> int:
    return (MAGIC << COOKIE_SHIFT) | (sid << 1) | int(inbound)


# -- flow messages (OpenFlow 1.5 flow-mod bodies, see ovs.Bundle) ---------------------------
# One struct packs a whole session flow: header, match and instructions; the OXM headers that
# say which field is which are arguments, so one layout serves both directions of TCP and
# UDP (echo flows have one of their own). Field numbers are those of the OpenFlow basic OXM class.
IN_PORT, ETH_TYPE, IP_PROTO, IPV4_SRC, IPV4_DST = 0, 5, 10, 11, 12
L4_FIELDS = {"TCP": (13, 14), "UDP": (15, 16)}  # source, destination port
L4_NUMBERS = {"TCP": 6, "UDP": 17}
NUMBER_L4 = {1: "ICMP", 6: "TCP", 17: "UDP"}
ICMP_TYPE = 19
ADD, DELETE = 0, 3
SEND_FLOW_REM, RESET_COUNTS = 1, 4
SET_FIELD, APPLY_ACTIONS, GOTO_TABLE = 25, 4, 1
ANY = 0xFFFFFFFF


def oxm(field: int, length: int) -> int:
    return (0x8000 << 16) | (field << 9) | length


_FLOW = struct.Struct("!QQBBHHHIIIHH" "HH" "II" "IH" "IB" "I4s" "I4s" "IH" "IH" "5x"
                      "HH4x" "HHI4s4x" "HHIH6x" "HHB3x")
_ECHO = struct.Struct("!QQBBHHHIIIHH" "HH" "II" "IH" "IB" "I4s" "I4s" "IB" "4x"
                      "HH4x" "HHI4s4x" "HHB3x")
_DELETE = struct.Struct("!QQBBHHHIIIHHHH4x")
_HEADERS = {(p, inbound): (L4_NUMBERS[p], oxm(src, 2), oxm(dst, 2),
                           oxm(IPV4_DST if inbound else IPV4_SRC, 4),
                           oxm(dst if inbound else src, 2))
            for p, (src, dst) in L4_FIELDS.items() for inbound in (False, True)}


def add_messages(sessions: Iterable[tuple[int, Session, int]], ports: Ports) -> list[bytes]:
    """Flow-mod bodies adding each (session id, session, idle timeout)'s pair."""
    pack, aton, headers = _FLOW.pack, socket.inet_aton, _HEADERS
    head = (ANY, ANY, ANY, SEND_FLOW_REM | RESET_COUNTS, 0, 1, 51, oxm(IN_PORT, 4))
    tail = (APPLY_ACTIONS, 40, SET_FIELD, 16)
    cookie_base = MAGIC << COOKIE_SHIFT
    messages = []
    for sid, s, idle in sessions:
        src, dst, ext = aton(s.src_address), aton(s.dst_address), aton(s.translated_address)
        if s.protocol == "ICMP":
            messages += _echo_pair(sid, src, dst, ext, idle, ports)
            continue
        number, h_sport, h_dport, h_addr, h_port = headers[(s.protocol, False)]
        messages.append(pack(
            cookie_base | (sid << 1), 0, NAT_TABLE, ADD, idle, 0, PRIORITY, *head,
            ports.inside, oxm(ETH_TYPE, 2), 0x0800, oxm(IP_PROTO, 1), number,
            oxm(IPV4_SRC, 4), src, oxm(IPV4_DST, 4), dst, h_sport, s.src_port, h_dport,
            s.dst_port, *tail, h_addr, ext, SET_FIELD, 16, h_port, s.translated_port,
            GOTO_TABLE, 8, NEXT_HOP_TABLE))
        number, h_sport, h_dport, h_addr, h_port = headers[(s.protocol, True)]
        messages.append(pack(
            cookie_base | (sid << 1) | 1, 0, NAT_TABLE, ADD, idle, 0, PRIORITY, *head,
            ports.outside, oxm(ETH_TYPE, 2), 0x0800, oxm(IP_PROTO, 1), number,
            oxm(IPV4_SRC, 4), dst, oxm(IPV4_DST, 4), ext, h_sport, s.dst_port, h_dport,
            s.translated_port, *tail, h_addr, src, SET_FIELD, 16, h_port, s.src_port,
            GOTO_TABLE, 8, NEXT_HOP_TABLE))
    return messages


def _echo_pair(sid: int, src: bytes, dst: bytes, ext: bytes, idle: int, ports: Ports
               ) -> tuple[bytes, bytes]:
    """An echo session's pair: requests out with the source rewritten, replies back."""
    head = (NAT_TABLE, ADD, idle, 0, PRIORITY, ANY, ANY, ANY, SEND_FLOW_REM | RESET_COUNTS,
            0, 1, 44, oxm(IN_PORT, 4))
    fields = (oxm(ETH_TYPE, 2), 0x0800, oxm(IP_PROTO, 1), 1, oxm(IPV4_SRC, 4))
    base = (MAGIC << COOKIE_SHIFT) | (sid << 1)
    return (_ECHO.pack(base, 0, *head, ports.inside, *fields, src, oxm(IPV4_DST, 4), dst,
                       oxm(ICMP_TYPE, 1), ECHO_REQUEST, APPLY_ACTIONS, 24, SET_FIELD, 16,
                       oxm(IPV4_SRC, 4), ext, GOTO_TABLE, 8, NEXT_HOP_TABLE),
            _ECHO.pack(base | 1, 0, *head, ports.outside, *fields, dst, oxm(IPV4_DST, 4),
                       ext, oxm(ICMP_TYPE, 1), ECHO_REPLY, APPLY_ACTIONS, 24, SET_FIELD, 16,
                       oxm(IPV4_DST, 4), src, GOTO_TABLE, 8, NEXT_HOP_TABLE))


def delete_messages(sids: Iterable[int]) -> list[bytes]:
    """Flow-mod bodies deleting both flows of each session: by exact cookie, which the
    switch finds through its cookie index (a partial mask would scan the table each time)."""
    pack, base, exact = _DELETE.pack, MAGIC << COOKIE_SHIFT, (1 << 64) - 1
    rest = (NAT_TABLE, DELETE, 0, 0, 0, ANY, ANY, ANY, 0, 0, 1, 4)
    messages = []
    for sid in sids:
        messages.append(pack(base | (sid << 1), exact, *rest))
        messages.append(pack(base | (sid << 1) | 1, exact, *rest))
    return messages


def all_sessions_request() -> tuple[int, int, int]:
    """A dump request (table, cookie, mask) for every session flow."""
    return NAT_TABLE, MAGIC << COOKIE_SHIFT, 0xFFFF << COOKIE_SHIFT


def session_request(sid: int) -> tuple[int, int, int]:
    """A dump request for both flows of one session."""
    return NAT_TABLE, cookie(sid, False), (1 << 64) - 2


def flow_values(bodies: Iterable[bytes]) -> Iterator[tuple]:
    """(cookie, idle timeout, IP protocol, source, destination (4 bytes each), source and
    destination port, idle seconds, packets, bytes, address and port its actions set) of
    every NAT-shaped flow among the flow descriptions of dump replies."""
    layouts, unpack_length = _LAYOUTS, _LENGTH.unpack_from
    for body in bodies:
        pos, end = 8, len(body)  # past the multipart reply's own header
        while pos + 24 <= end:
            (length,) = unpack_length(body, pos)
            if length < 24 or pos + length > end:
                break
            for layout in layouts.get(length, ()):
                if layout.headers.unpack_from(body, pos) == layout.expected:
                    yield layout.order(layout.values.unpack_from(body, pos))
                    break
            else:
                values = _learn(body, pos, length)
                if values is not None:
                    yield values
            pos += length


# -- reading flow descriptions: a layout is learnt from the first flow that has it ----------
# (ofp_flow_desc: length, table, priority, idle and hard timeouts, flags, importance,
# cookie; then the match, the statistics and the instructions, each a run of TLVs.)
_LENGTH = struct.Struct("!H")
_WANTED = ("cookie", "idle", "proto", "src", "dst", "sport", "dport", "idle_time", "packets",
           "bytes", "address", "port")
_PORTS = ("sport", "dport", "port")
_OPTIONAL = (*_PORTS, "address")  # a flow that rewrites nothing (a firewall's) has neither
_MAX_LAYOUTS = 32


class _Layout(NamedTuple):
    headers: struct.Struct  # every length and type word of the flow, at once
    expected: tuple
    values: struct.Struct  # every wanted value, in the order of their offsets
    order: Callable[[tuple], tuple]  # ... put in _WANTED order


_LAYOUTS: dict[int, list[_Layout]] = {}
_MATCH_FIELDS = {IP_PROTO: ("proto", "B"), IPV4_SRC: ("src", "4s"), IPV4_DST: ("dst", "4s"),
                 13: ("sport", "H"), 14: ("dport", "H"), 15: ("sport", "H"),
                 16: ("dport", "H")}
_STAT_FIELDS = {1: ("idle_time", "I"), 4: ("packets", "Q"), 5: ("bytes", "Q")}
OXM_BASIC, OXS_BASIC = 0x8000, 0x8002


def _learn(buf: bytes, pos: int, length: int) -> tuple | None:
    """Walk one flow description; remember its layout if it is a session flow's."""
    headers: list[tuple[int, str, int]] = [(0, "H", length)]
    found: dict[str, tuple[int, str]] = {"cookie": (16, "Q"), "idle": (8, "H")}
    (mlen,) = struct.unpack_from("!H", buf, pos + 26)
    headers.append((26, "H", mlen))
    for off, field, size in _tlvs(buf, pos, 28, 24 + mlen, OXM_BASIC, headers):
        name, fmt = _MATCH_FIELDS.get(field, ("", "x"))
        if name and size == struct.calcsize(fmt):
            found[name] = (off, fmt)
    stats = 24 + (mlen + 7) // 8 * 8
    (slen,) = struct.unpack_from("!H", buf, pos + stats + 2)
    headers.append((stats + 2, "H", slen))
    for off, field, _size in _tlvs(buf, pos, stats + 4, stats + slen, OXS_BASIC, headers):
        if field in _STAT_FIELDS:
            found[_STAT_FIELDS[field][0]] = (off, _STAT_FIELDS[field][1])
    _actions(buf, pos, stats + (slen + 7) // 8 * 8, length, headers, found)
    if any(name not in found for name in _WANTED if name not in _OPTIONAL):
        return None
    headers.sort()
    by_offset = sorted((name for name in _WANTED if name in found),
                       key=lambda name: found[name][0])
    layout = _Layout(_struct([(o, f) for o, f, _v in headers]),
                     tuple(v for _o, _f, v in headers),
                     _struct([found[name] for name in by_offset]), _order(by_offset))
    if sum(map(len, _LAYOUTS.values())) < _MAX_LAYOUTS:
        _LAYOUTS.setdefault(length, []).append(layout)
    return layout.order(layout.values.unpack_from(buf, pos))


def _order(by_offset: list[str]) -> Callable[[tuple], tuple]:
    """Values read in offset order, put in _WANTED order (a port absent from the flow,
    as in an echo flow, or a translated address, as in a firewall's, reads as 0)."""
    if len(by_offset) == len(_WANTED):
        return itemgetter(*(by_offset.index(name) for name in _WANTED))
    where = [by_offset.index(name) if name in by_offset else None for name in _WANTED]
    return lambda values: tuple(0 if i is None else values[i] for i in where)


def _tlvs(buf: bytes, pos: int, start: int, end: int, klass: int, headers: list):
    """(offset of the value, field, value length) of each TLV of class ``klass`` in
    [start, end) of the flow at ``pos``; every TLV header goes into ``headers``."""
    off = start
    while off + 4 <= end:
        (word,) = struct.unpack_from("!I", buf, pos + off)
        headers.append((off, "I", word))
        size = word & 0xFF
        if word >> 16 == klass:
            yield off + 4, (word >> 9) & 0x7F, size
        off += 4 + size


def _actions(buf: bytes, pos: int, off: int, end: int, headers: list,
             found: dict[str, tuple[int, str]]) -> None:
    """Find the first address and port an apply-actions instruction sets."""
    while off + 4 <= end:
        (word,) = struct.unpack_from("!I", buf, pos + off)
        headers.append((off, "I", word))
        kind, ilen = word >> 16, word & 0xFFFF
        if ilen < 4:
            return
        act = off + 8
        while kind == APPLY_ACTIONS and act + 8 <= off + ilen:
            atype, alen, field_word = struct.unpack_from("!HHI", buf, pos + act)
            headers.append((act, "I", (atype << 16) | alen))
            if alen < 8:
                return
            if atype == SET_FIELD:
                headers.append((act + 4, "I", field_word))
                field = (field_word >> 9) & 0x7F
                if field in (IPV4_SRC, IPV4_DST):
                    found.setdefault("address", (act + 8, "4s"))
                elif field in (13, 14, 15, 16):
                    found.setdefault("port", (act + 8, "H"))
            act += alen
        off += ilen


def _struct(items: list[tuple[int, str]]) -> struct.Struct:
    """One big-endian struct reading each (offset, format), offsets rising."""
    fmt, at = ["!"], 0
    for off, item in items:
        if off > at:
            fmt.append(f"{off - at}x")
        fmt.append(item)
        at = off + struct.calcsize("!" + item)
    return struct.Struct("".join(fmt))


def read_sessions(bodies: Iterable[bytes], extras: dict[int, tuple],
                  wanted: dict[int, SessionKey] | None = None) -> list[Session]:
    """Pair the session flows of dump replies by session id and read each pair back as a
    session (only those with ids in ``wanted``, if given).

    ``extras`` holds what flows cannot: session id -> (tcp_state, src_window_scale,
    dst_window_scale, orig_packets, orig_bytes, reply_packets, reply_bytes) added to (the
    counters) or used instead of (the rest) what the flows say. A session whose outbound
    flow is gone (expired a moment ago) is not reported.
    """
    outbound: dict[int, tuple] = {}
    inbound: dict[int, tuple] = {}
    for values in flow_values(bodies):
        value = values[0]
        sid = (value >> 1) & SESSION_MASK
        if value >> COOKIE_SHIFT != MAGIC or (wanted is not None and sid not in wanted):
            continue
        (inbound if value & 1 else outbound)[sid] = values
    names: dict[bytes, str] = {}  # a dump repeats few addresses many times

    def name(raw: bytes) -> str:
        text = names.get(raw)
        if text is None:
            text = names[raw] = socket.inet_ntoa(raw)
        return text

    nothing = (None, None, None, 0, 0, 0, 0)
    found = []
    for sid, (_c, idle, number, src, dst, sport, dport, age, packets, nbytes, address,
              port) in outbound.items():
        protocol = NUMBER_L4.get(number)
        if protocol is None:
            continue
        if number == 1:
            sport = port = sid & 0xFFFF
        state, ws_o, ws_r, op, ob, rp, rb = extras.get(sid, nothing)
        timeout, reply_packets, reply_bytes = max(0, idle - age), 0, 0
        back = inbound.get(sid)
        if back is not None:
            timeout = min(timeout, max(0, back[1] - back[7]))
            reply_packets, reply_bytes = back[8], back[9]
        tcp = protocol == "TCP"
        if not address:  # nothing translated (read as 0 when absent, see _order)
            address = port = None
        found.append(Session(
            protocol, name(src), sport, name(dst), dport, address and name(address), port,
            None, None,
            (state or "established") if tcp else None, ws_o if tcp else None,
            ws_r if tcp else None, timeout, packets + op, nbytes + ob, reply_packets + rp,
            reply_bytes + rb))
    return found
