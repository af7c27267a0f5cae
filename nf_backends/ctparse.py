"""Reading conntrack messages (dumps, GET replies, events) into CtEntry values.

A dump of one NAT holds thousands of messages of very few layouts: the kernel writes the
same attributes in the same order at the same sizes for every IPv4 TCP source-NAT entry, say.
So the first message of a layout is walked attribute by attribute (``walk``), and what the
walk learnt becomes two precompiled structs: one reading every attribute header at once, to
recognise the layout, and one reading every wanted value at once. A message of a known layout
then costs two unpack calls instead of a Python loop over some thirty attributes; one whose
headers differ is walked again. Both paths build the entry in one place (``_finish``).

A read of a dump is mostly messages of one length, one after the other: ``parse_run`` checks
that all of them repeat the first one's headers (a compare per header, across every message at
once) and reads every value of every message in one call, making the entries a column at a
time (``_finish_all``).
"""

from __future__ import annotations

import struct
from itertools import repeat
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
_HEAD = 20  # nlmsghdr (16) and nfgenmsg (4), before a message's attributes
_MESSAGE_WORDS = (0, 1, 2, 3, 4)  # length, type and flags, sequence, port id, nfgenmsg


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
    slots: tuple[int, ...]  # the same as ``order``'s indices, for columns
    header_words: tuple[int, ...]  # where each attribute header is, in 4-byte words
    run: struct.Struct      # ``values`` for a whole message, its headers included


def _compile(w: _Walk, size: int) -> _Layout:
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
    slots = tuple(slot.get(name, len(picked) + _INDEX[name]) for name in FIELDS)
    values = struct.Struct("".join(value_fmt))
    # Attributes start 4-aligned after the message's 20 header bytes (RFC 3549 s2.3.2).
    words = tuple((_HEAD + offset) // 4 for offset, _length, _kind in w.headers)
    stride = (_HEAD + size + 3) & ~3
    run = struct.Struct(f">{_HEAD}x{values.format[1:]}{stride - _HEAD - values.size}x")
    return _Layout(struct.Struct("".join(header_fmt)), tuple(expected), values,
                   itemgetter(*slots), slots, words, run)


_layouts: dict[int, list[_Layout]] = {}


def parse_entry(buf: bytes, pos: int, end: int, family: int) -> CtEntry:
    """One conntrack message's attributes (``pos`` just after the nfgenmsg header)."""
    size = end - pos
    layout = _layout_of(buf, size, pos)
    if layout is not None:
        return _finish(family, layout.order(layout.values.unpack_from(buf, pos) + DEFAULTS))
    w = walk(buf, pos, end)
    if len(_layouts) < _MAX_LAYOUTS:
        _layouts.setdefault(size, []).append(_compile(w, size))
    return _finish(family, _walked_values(w, buf, pos))


def parse_run(buf: bytearray, size: int, stride: int) -> list[CtEntry] | None:
    """The entries of the first ``size`` bytes of ``buf``: conntrack messages ``stride``
    bytes apart, the first one's layout learnt as :func:`parse_entry` does. None unless
    every message has the first one's header words (length, type, flags, sequence, family
    and each attribute's length and type): then the caller reads them one by one."""
    count, rest = divmod(size, stride)
    first_length = int.from_bytes(buf[0:4], "little")
    layout = _layout_of(buf, first_length - _HEAD, _HEAD)
    if layout is None and size >= first_length:
        parse_entry(buf, _HEAD, first_length, buf[16])  # learns its layout, or raises
        layout = _layout_of(buf, first_length - _HEAD, _HEAD)
    if rest or count < 2 or stride % 4 or layout is None or layout.run.size != stride:
        return None
    words = memoryview(buf)[:size].cast("I")
    step = stride // 4
    for word in (*_MESSAGE_WORDS, *layout.header_words):
        if words[word::step].tobytes() != words[word:word + 1].tobytes() * count:
            return None
    rows = layout.run.iter_unpack(memoryview(buf)[:size])
    columns = list(zip(*rows, strict=True))
    width = len(columns)
    fields = [columns[i] if i < width else [DEFAULTS[i - width]] * count
              for i in layout.slots]
    return _finish_all(buf[16], fields, count)


def _layout_of(buf: bytes, size: int, pos: int) -> _Layout | None:
    """The learnt layout of the message whose ``size`` bytes of attributes start at
    ``pos``, if any."""
    for layout in _layouts.get(size, ()):
        if layout.headers.unpack_from(buf, pos) == layout.expected:
            return layout
    return None


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


def _finish_all(family: int, columns: list, count: int) -> list[CtEntry]:
    """``_finish`` of every row of ``columns`` (FIELDS order), a column at a time when the
    rows share their protocol and NAT kind (a NAT's table is mostly that), else row by
    row."""
    (src, dst, proto, sport, dport, r_src, r_dst, _r_proto, r_sport, r_dport, status,
     timeout, state, ws_o, ws_r, o_packets, o_bytes, r_packets, r_bytes) = columns
    protocols = set(proto)
    kinds = {s & (IPS_SRC_NAT | IPS_DST_NAT) for s in status}
    if len(protocols) != 1 or len(kinds) != 1 or not all(src) or not all(r_src):
        return [_finish(family, row) for row in zip(*columns, strict=False)]
    kind = kinds.pop()
    echo = protocols.pop() in ECHO_REPLY
    nones = [None] * count
    if echo:
        dport = [0] * count
    nat_addr, nat_port = (r_dst, r_sport if echo else r_dport) if kind & IPS_SRC_NAT \
        else (nones, nones)
    dnat_addr, dnat_port = (r_src, r_sport) if kind & IPS_DST_NAT else (nones, nones)
    return list(map(new_entry, zip(repeat(family, count), proto, src, dst, sport, dport,
                                   nat_addr, nat_port, dnat_addr, dnat_port, state, ws_o,
                                   ws_r, timeout, o_packets, o_bytes, r_packets, r_bytes,
                                   strict=False)))  # repeat() is endless: strict would fail
