"""Sessions as OpenFlow flow pairs: the one place that knows what a NAT flow looks like.

One session is two flows in table 0 sharing a session id in their cookies::

    cookie = MAGIC (16 bits) | session id (47 bits) | direction (1 bit: 0 out, 1 in)

The session id is a hash of the session's key, so a key names its flows without a lookup
(deletes go by cookie). The outbound flow matches the 5-tuple on the inside port and rewrites
the source address and port; the inbound flow matches the translated reply on the outside
port and rewrites the destination back. Both continue in table 1, where the next hop's MAC
addresses are set (see the NAT application), so a session's flows hold nothing but NAT.

What flows cannot carry: TCP state (flows do not track it, so every TCP session reads back
as "established") and window scales; the backend keeps those it was given, and the app
those it saw in handshakes. The remaining timeout is the idle timeout minus the idle age
(at most 65535 s, the OpenFlow limit); counters are the flows' packet and byte counts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .base import Session, SessionKey

MAGIC = 0x6E66  # "nf": flows of nfmig sessions
COOKIE_SHIFT = 48
SESSION_MASK = (1 << 47) - 1
COOKIE_MATCH = f"cookie={MAGIC << COOKIE_SHIFT:#x}/{0xFFFF << COOKIE_SHIFT:#x}"
BASE_COOKIE = 0x6E65 << COOKIE_SHIFT  # the app's own fixed flows (ARP, misses)
PRIORITY = 100
MAX_IDLE = 65535
NAT_TABLE, NEXT_HOP_TABLE = 0, 1
L4 = {"TCP": "tcp", "UDP": "udp"}
L4_PROTOCOL = {v: k for k, v in L4.items()}


class Ports(NamedTuple):
    inside: int
    outside: int


def session_id(key: SessionKey) -> int:
    """The 47-bit id of the session with this key, the same in every process."""
    text = " ".join(map(str, key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(),
                          "big") & SESSION_MASK


def cookie(sid: int, inbound: bool) -> int:
    return (MAGIC << COOKIE_SHIFT) | (sid << 1) | int(inbound)


def session_match(sid: int) -> str:
    """A del-flows / dump-flows match for both flows of one session."""
    return f"cookie={cookie(sid, False):#x}/{(1 << 64) - 2:#x}"


def flow_pair(s: Session, idle: int, ports: Ports) -> tuple[str, str]:
    """The outbound and inbound flow of a session, in ovs-ofctl syntax."""
    proto = L4[s.protocol]
    sid = session_id(s.key)
    head = (f"table={NAT_TABLE},priority={PRIORITY},idle_timeout={idle},send_flow_rem,"
            f"reset_counts,{proto}")
    out = (f"{head},cookie={cookie(sid, False):#x},in_port={ports.inside},"
           f"nw_src={s.src_address},tp_src={s.src_port},nw_dst={s.dst_address},"
           f"tp_dst={s.dst_port},actions=set_field:{s.translated_address}->ip_src,"
           f"set_field:{s.translated_port}->{proto}_src,goto_table:{NEXT_HOP_TABLE}")
    back = (f"{head},cookie={cookie(sid, True):#x},in_port={ports.outside},"
            f"nw_src={s.dst_address},tp_src={s.dst_port},nw_dst={s.translated_address},"
            f"tp_dst={s.translated_port},actions=set_field:{s.src_address}->ip_dst,"
            f"set_field:{s.src_port}->{proto}_dst,goto_table:{NEXT_HOP_TABLE}")
    return out, back


def add_commands(sessions: Iterable[Session], idle_for, ports: Ports) -> str:
    """Bundle lines adding each session's pair; ``idle_for(session)`` gives its timeout."""
    lines = []
    for s in sessions:
        out, back = flow_pair(s, min(MAX_IDLE, max(1, idle_for(s))), ports)
        lines.append(f"add {out}\n")
        lines.append(f"add {back}\n")
    return "".join(lines)


def delete_commands(sids: Iterable[int]) -> str:
    """Bundle lines deleting both flows of each session: by exact cookie, which the switch
    finds through its cookie index (a partial mask would scan the table per line)."""
    return "".join(f"delete cookie={cookie(sid, False):#x}/-1\n"
                   f"delete cookie={cookie(sid, True):#x}/-1\n" for sid in sids)


class FlowRecord(NamedTuple):
    """What a dump says about one flow of a session."""

    sid: int
    inbound: bool
    protocol: str
    nw_src: str
    nw_dst: str
    tp_src: int
    tp_dst: int
    packets: int
    bytes: int
    remaining: int  # seconds until it idles out
    set_address: str  # the address and port its actions write
    set_port: int


# One pass over the whole dump; fields come in the order ovs-ofctl prints them.
_FLOW = re.compile(
    r"cookie=0x([0-9a-f]+),[^\n]*? n_packets=(\d+), n_bytes=(\d+), idle_timeout=(\d+),"
    r"[^\n]*?idle_age=(\d+),[^\n]*?priority=\d+,(tcp|udp),in_port=\d+,nw_src=([\d.]+),"
    r"nw_dst=([\d.]+),tp_src=(\d+),tp_dst=(\d+) actions=set_field:([\d.]+)->ip_\w+,"
    r"set_field:(\d+)->")


def parse_dump(text: str) -> Iterator[FlowRecord]:
    """The nfmig session flows of an ``ovs-ofctl --no-names dump-flows`` output."""
    for m in _FLOW.finditer(text):
        (value, packets, nbytes, idle, age, proto, src, dst, sport, dport, address,
         port) = m.groups()
        value = int(value, 16)
        if value >> COOKIE_SHIFT != MAGIC:
            continue
        yield FlowRecord((value >> 1) & SESSION_MASK, bool(value & 1), L4_PROTOCOL[proto],
                         src, dst, int(sport), int(dport), int(packets), int(nbytes),
                         max(0, int(idle) - int(age)), address, int(port))


def sessions_from_records(records: Iterable[FlowRecord], extras: dict[int, tuple]
                          ) -> Iterator[Session]:
    """Pair the flows by session id and read each pair back as a session.

    ``extras`` holds what flows cannot: session id -> (tcp_state, src_window_scale,
    dst_window_scale, orig_packets, orig_bytes, reply_packets, reply_bytes) added to (the
    counters) or used instead of (the rest) what the flows say. A session whose outbound
    flow is gone (expired a moment ago) is not reported.
    """
    outbound: dict[int, FlowRecord] = {}
    inbound: dict[int, FlowRecord] = {}
    for record in records:
        (inbound if record.inbound else outbound)[record.sid] = record
    nothing = (None, None, None, 0, 0, 0, 0)
    for sid, out in outbound.items():
        back = inbound.get(sid)
        state, ws_o, ws_r, op, ob, rp, rb = extras.get(sid, nothing)
        tcp = out.protocol == "TCP"
        timeout, reply_packets, reply_bytes = out.remaining, 0, 0
        if back is not None:
            timeout = min(timeout, back.remaining)
            reply_packets, reply_bytes = back.packets, back.bytes
        yield Session(
            out.protocol, out.nw_src, out.tp_src, out.nw_dst, out.tp_dst, out.set_address,
            out.set_port, None, None, (state or "established") if tcp else None,
            ws_o if tcp else None, ws_r if tcp else None, timeout,
            out.packets + op, out.bytes + ob, reply_packets + rp, reply_bytes + rb)
