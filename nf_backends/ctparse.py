"""Reading conntrack messages (dumps, GET replies, events) into CtEntry values.

A dump of one NAT holds thousands of messages of very few layouts: the kernel writes the
same attributes in the same order at the same sizes for every IPv4 TCP source-NAT entry, say.
So the first message of a layout is walked attribute by attribute (``walk``), and what the
walk learnt becomes two precompiled structs: one reading every attribute header at once, to
recognise the layout, and one reading every wanted value at once. A message of a known layout
then costs two unpack calls instead of a Python loop over some thirty attributes; one whose
headers differ is walked again. Both paths build the entry in one place (``_finish``).
"""

from __future__ import annotations

import struct
from operator import itemgetter
from typing import NamedTuple

from .ctattrs import (
    _NLA,
    CTA_COUNTERS_BYTES,
    CTA_COUNTERS_ORIG,
    CTA_COUNTERS_PACKETS,
    CTA_COUNTERS_REPLY,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMPV6_ID,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    ECHO_REPLY,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    TCP_STATE,
    TCP_WSCALE_ORIG,
    TCP_WSCALE_REPLY,
    CtEntry,
    new_entry,
)

# The values a message yields, in this order; a layout without one yields its default.
FIELDS = ("o_src", "o_dst", "o_proto", "o_sport", "o_dport",
          "r_src", "r_dst", "r_proto", "r_sport", "r_dport",
          "status", "timeout", "tcp_state", "ws_orig", "ws_reply",
          "o_packets", "o_bytes", "r_packets", "r_bytes")
DEFAULTS = (b"", b"", 0, 0, 0, b"", b"", 0, 0, 0, 0, 0, None, None, None, 0, 0, 0, 0)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_TUPLE_PREFIX = {CTA_TUPLE_ORIG: "o_", CTA_TUPLE_REPLY: "r_"}
_IP_FIELD = {CTA_IP_V4_SRC: "src", CTA_IP_V6_SRC: "src", CTA_IP_V4_DST: "dst",
             CTA_IP_V6_DST: "dst"}
_PROTO_FIELD = {CTA_PROTO_NUM: ("proto", "B"), CTA_PROTO_SRC_PORT: ("sport", "H"),
                CTA_PROTO_ICMP_ID: ("sport", "H"), CTA_PROTO_ICMPV6_ID: ("sport", "H"),
                CTA_PROTO_DST_PORT: ("dport", "H")}
_TCP_FIELD = {TCP_STATE: "tcp_state", TCP_WSCALE_ORIG: "ws_orig",
              TCP_WSCALE_REPLY: "ws_reply"}
_COUNTER_FIELD = {CTA_COUNTERS_PACKETS: "packets", CTA_COUNTERS_BYTES: "bytes"}
_COUNTERS = {CTA_COUNTERS_ORIG: "o_", CTA_COUNTERS_REPLY: "r_"}
_MAX_LAYOUTS = 64  # a bound, so odd messages cannot grow the cache without end


class _Walk:
    """What walking one message found: every attribute header (offset, length, type) and
    every wanted value (field, offset, big-endian format), offsets from the first attribute."""

    def __init__(self, buf: bytes, base: int) -> None:
        self.buf, self.base = buf, base
        self.headers: list[tuple[int, int, int]] = []
        self.values: dict[str, tuple[int, str]] = {}

    def attributes(self, pos: int, end: int):
        while pos + 4 <= end:
            length, kind = _NLA.unpack_from(self.buf, pos)
            if length < 4:
                raise ValueError("conntrack attribute shorter than its header")
            self.headers.append((pos - self.base, length, kind))
            yield pos + 4, pos + length, kind & 0x3FFF
            pos += (length + 3) & ~3

    def value(self, name: str, pos: int, fmt: str, stop: int) -> None:
        size = stop - pos if fmt == "s" else struct.calcsize(">" + fmt)
        if pos + size > stop:
            raise ValueError(f"conntrack attribute too short for {name}")
        self.values[name] = (pos - self.base, f"{size}s" if fmt == "s" else fmt)


def walk(buf: bytes, pos: int, end: int) -> _Walk:
    """Every attribute of one message, nested ones included; the values a NAT needs."""
    w = _Walk(buf, pos)
    for inner, stop, kind in w.attributes(pos, end):
        if kind in _TUPLE_PREFIX:
            _walk_tuple(w, inner, stop, _TUPLE_PREFIX[kind])
        elif kind == CTA_STATUS:
            w.value("status", inner, "I", stop)
        elif kind == CTA_TIMEOUT:
            w.value("timeout", inner, "I", stop)
        elif kind == CTA_PROTOINFO:
            for tcp, tcp_stop, tkind in w.attributes(inner, stop):
                if tkind == CTA_PROTOINFO_TCP:
                    for at, at_stop, field in w.attributes(tcp, tcp_stop):
                        if field in _TCP_FIELD:
                            w.value(_TCP_FIELD[field], at, "B", at_stop)
        elif kind in _COUNTERS:
            for at, at_stop, field in w.attributes(inner, stop):
                if field in _COUNTER_FIELD:
                    w.value(_COUNTERS[kind] + _COUNTER_FIELD[field], at, "Q", at_stop)
    return w


def _walk_tuple(w: _Walk, pos: int, end: int, prefix: str) -> None:
    for inner, stop, kind in w.attributes(pos, end):
        if kind == CTA_TUPLE_IP:
            for at, at_stop, field in w.attributes(inner, stop):
                if field in _IP_FIELD:
                    w.value(prefix + _IP_FIELD[field], at, "s", at_stop)
        elif kind == CTA_TUPLE_PROTO:
            for at, at_stop, field in w.attributes(inner, stop):
                if field in _PROTO_FIELD:
                    name, fmt = _PROTO_FIELD[field]
                    w.value(prefix + name, at, fmt, at_stop)


class _Layout(NamedTuple):
    headers: struct.Struct  # native order, every attribute header in message order
    expected: tuple         # what ``headers`` unpacks to for this layout
    values: struct.Struct   # network order, every wanted value in offset order
    order: itemgetter       # (values + DEFAULTS) -> FIELDS order


def _compile(w: _Walk) -> _Layout:
    header_fmt, at = ["="], 0
    expected: list[int] = []
    for offset, length, kind in w.headers:
        header_fmt.append(f"{offset - at}xHH")
        expected += (length, kind)
        at = offset + 4
    value_fmt, at = [">"], 0
    picked = sorted(w.values.items(), key=lambda item: item[1][0])
    for _name, (offset, fmt) in picked:
        value_fmt.append(f"{offset - at}x{fmt}")
        at = offset + struct.calcsize(">" + fmt)
    slot = {name: i for i, (name, _) in enumerate(picked)}
    order = itemgetter(*(slot.get(name, len(picked) + _INDEX[name]) for name in FIELDS))
    return _Layout(struct.Struct("".join(header_fmt)), tuple(expected),
                   struct.Struct("".join(value_fmt)), order)


_layouts: dict[int, list[_Layout]] = {}


def parse_entry(buf: bytes, pos: int, end: int, family: int) -> CtEntry:
    """One conntrack message's attributes (``pos`` just after the nfgenmsg header)."""
    size = end - pos
    for layout in _layouts.get(size, ()):
        if layout.headers.unpack_from(buf, pos) == layout.expected:
            return _finish(family, layout.order(layout.values.unpack_from(buf, pos) + DEFAULTS))
    w = walk(buf, pos, end)
    if len(_layouts) < _MAX_LAYOUTS:
        _layouts.setdefault(size, []).append(_compile(w))
    return _finish(family, _walked_values(w, buf, pos))


def parse_entry_walked(buf: bytes, pos: int, end: int, family: int) -> CtEntry:
    """parse_entry without the layout cache: every attribute visited (for checking it)."""
    return _finish(family, _walked_values(walk(buf, pos, end), buf, pos))


def _walked_values(w: _Walk, buf: bytes, pos: int) -> tuple:
    found = dict(zip(FIELDS, DEFAULTS, strict=True))
    for name, (offset, fmt) in w.values.items():
        found[name] = struct.unpack_from(">" + fmt, buf, pos + offset)[0]
    return tuple(found.values())


def _finish(family: int, v: tuple) -> CtEntry:
    (src, dst, proto, sport, dport, r_src, r_dst, _r_proto, r_sport, r_dport, status,
     timeout, state, ws_o, ws_r, o_packets, o_bytes, r_packets, r_bytes) = v
    if not src or not r_src:
        raise ValueError("conntrack message without both tuples")
    nat_addr = nat_port = dnat_addr = dnat_port = None
    echo = proto in ECHO_REPLY
    if echo:
        dport = 0
    if status & IPS_SRC_NAT:  # replies go to the translated source
        nat_addr, nat_port = r_dst, (r_sport if echo else r_dport)
    if status & IPS_DST_NAT:  # replies come from the translated destination
        dnat_addr, dnat_port = r_src, r_sport
    return new_entry((family, proto, src, dst, sport, dport, nat_addr, nat_port, dnat_addr,
                       dnat_port, state, ws_o, ws_r, timeout, o_packets, o_bytes, r_packets,
                       r_bytes))
