"""ctnetlink messages built from conntrack entries: every message of one shape (family,
protocol, NAT kind) is laid out once, and a send's entries of one shape are written a field
at a time into copies of that layout; the others one struct pack each. The layouts are
:mod:`nfmig.nf_backends.ctattrs`'s numbers; :mod:`nfmig.nf_backends.ctparse` reads the
kernel's messages back.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import itemgetter

from .ctattrs import (
    _HDR,
    _NLA,
    CT_DELETE,
    CT_GET,
    CT_NEW,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_NAT_DST,
    CTA_NAT_PROTO,
    CTA_NAT_SRC,
    CTA_NAT_V4_MAXIP,
    CTA_NAT_V4_MINIP,
    CTA_NAT_V6_MAXIP,
    CTA_NAT_V6_MINIP,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMPV6_ID,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTONAT_PORT_MAX,
    CTA_PROTONAT_PORT_MIN,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    ECHO_REPLY,
    ICMP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_SEEN_REPLY,
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    TCP,
    TCP_FLAG_SACK_PERM,
    TCP_FLAG_WINDOW_SCALE,
    TCP_FLAGS_ORIG,
    TCP_FLAGS_REPLY,
    TCP_STATE,
    TCP_WSCALE_ORIG,
    TCP_WSCALE_REPLY,
    CtEntry,
    new_entry,
)


class _Layout:
    """A message shape: constant bytes plus (offset, format, field) for what varies."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fields: list[tuple[int, str, int]] = []
        self._open: list[int] = []

    def const(self, data: bytes) -> None:
        self.buf += data

    def var(self, fmt: str, field: int) -> None:
        self.fields.append((len(self.buf), fmt, field))
        self.buf += bytes(struct.calcsize(fmt))

    def attr(self, kind: int, fmt: str, value: int | bytes | None = None,
             field: int | None = None) -> None:
        size = struct.calcsize(fmt)
        self.buf += _NLA.pack(4 + size, kind)
        if field is None:
            self.buf += struct.pack(fmt, value)
        else:
            self.var(fmt, field)
        self.buf += bytes(-size % 4)

    def nest(self, kind: int) -> None:
        self._open.append(len(self.buf))
        self.buf += _NLA.pack(0, kind | NLA_F_NESTED)

    def end(self) -> None:
        start = self._open.pop()
        struct.pack_into("=H", self.buf, start, len(self.buf) - start)

    def finish(self) -> _Layout:
        """Compile the shape into one struct: the constant runs become byte-string fields,
        so a message is a single pack of (constants and values). Network-order fields are
        packed in native order from values already swapped (see ``Encoder``)."""
        struct.pack_into("=I", self.buf, 0, len(self.buf))
        self.template = bytes(self.buf)
        fmt, order, consts = ["="], [], []

        def constant(start: int, stop: int) -> None:
            if stop > start:
                fmt.append(f"{stop - start}s")
                order.append(_FIELD_COUNT + len(consts))  # constants follow the values
                consts.append(self.template[start:stop])

        at = 0
        for offset, field_fmt, field in sorted(self.fields):
            constant(at, offset)
            fmt.append(field_fmt.lstrip("=!"))
            order.append(field)
            at = offset + struct.calcsize(field_fmt)
        constant(at, len(self.template))
        self.consts = tuple(consts)
        self.pick = itemgetter(*order)  # (values + consts) in message order
        self.struct = struct.Struct("".join(fmt))
        return self


# Field numbers used by layouts: the value each varying field of a message takes.
F_SEQ, F_SRC, F_DST, F_SPORT, F_DPORT, F_TIMEOUT, F_STATE, F_WS_O, F_WS_R = range(9)
F_NAT_ADDR, F_NAT_PORT, F_DNAT_ADDR, F_DNAT_PORT = range(9, 13)
_FIELD_COUNT = 13


def _tuple(lay: _Layout, kind: int, e: CtEntry, reply: bool) -> None:
    v4 = e.family == socket.AF_INET
    afmt = "4s" if v4 else "16s"
    lay.nest(kind)
    lay.nest(CTA_TUPLE_IP)
    src, dst = (F_DST, F_SRC) if reply else (F_SRC, F_DST)
    lay.attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, afmt, field=src)
    lay.attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, afmt, field=dst)
    lay.end()
    lay.nest(CTA_TUPLE_PROTO)
    lay.attr(CTA_PROTO_NUM, "B", e.proto)
    if e.proto in ECHO_REPLY:
        base = CTA_PROTO_ICMP_ID if e.proto == ICMP else CTA_PROTO_ICMPV6_ID
        lay.attr(base, "!H", field=F_SPORT)
        lay.attr(base + 1, "B", ECHO_REPLY[e.proto][1 if reply else 0])
        lay.attr(base + 2, "B", 0)
    else:
        sport, dport = (F_DPORT, F_SPORT) if reply else (F_SPORT, F_DPORT)
        lay.attr(CTA_PROTO_SRC_PORT, "!H", field=sport)
        lay.attr(CTA_PROTO_DST_PORT, "!H", field=dport)
    lay.end()
    lay.end()


def _nat(lay: _Layout, kind: int, family: int, addr_field: int, port_field: int | None) -> None:
    v4 = family == socket.AF_INET
    afmt = "4s" if v4 else "16s"
    lay.nest(kind)
    lay.attr(CTA_NAT_V4_MINIP if v4 else CTA_NAT_V6_MINIP, afmt, field=addr_field)
    lay.attr(CTA_NAT_V4_MAXIP if v4 else CTA_NAT_V6_MAXIP, afmt, field=addr_field)
    if port_field is not None:
        # min = max: without a pinned port the kernel silently picks another on a clash
        lay.nest(CTA_NAT_PROTO)
        lay.attr(CTA_PROTONAT_PORT_MIN, "!H", field=port_field)
        lay.attr(CTA_PROTONAT_PORT_MAX, "!H", field=port_field)
        lay.end()
    lay.end()


def _header(lay: _Layout, msg_type: int, flags: int, family: int) -> None:
    lay.const(_HDR.pack(0, msg_type, flags, 0, 0))
    lay.fields.append((8, "=I", F_SEQ))
    lay.const(struct.pack("=BBH", family, 0, 0))


def _create_layout(e: CtEntry, update: bool) -> _Layout:
    """NEW message. A create follows the recipe that keeps a moved NAT session working: the
    reply tuple is the exact inverse of the original (the kernel derives the translated one
    from the NAT attributes), NAT ranges pinned to one address and port, CONFIRMED status."""
    lay = _Layout()
    flags = NLM_F_REQUEST | (0 if update else NLM_F_CREATE | NLM_F_EXCL)
    _header(lay, CT_NEW, flags, e.family)
    _tuple(lay, CTA_TUPLE_ORIG, e, reply=False)
    if not update:
        _tuple(lay, CTA_TUPLE_REPLY, e, reply=True)
        lay.attr(CTA_STATUS, "!I", IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED)
    lay.attr(CTA_TIMEOUT, "!I", field=F_TIMEOUT)
    if e.proto == TCP and e.tcp_state is not None:
        lay.nest(CTA_PROTOINFO)
        lay.nest(CTA_PROTOINFO_TCP)
        lay.attr(TCP_STATE, "B", field=F_STATE)
        if e.wscale_orig is not None and e.wscale_reply is not None:
            lay.attr(TCP_WSCALE_ORIG, "B", field=F_WS_O)
            lay.attr(TCP_WSCALE_REPLY, "B", field=F_WS_R)
            # the kernel only takes the scales with the flag set; mask 0xff makes it listen
            scaled = bytes([TCP_FLAG_WINDOW_SCALE | TCP_FLAG_SACK_PERM, 0xFF])
            lay.attr(TCP_FLAGS_ORIG, "2s", scaled)
            lay.attr(TCP_FLAGS_REPLY, "2s", scaled)
        lay.end()
        lay.end()
    if not update and e.nat_addr is not None:
        _nat(lay, CTA_NAT_SRC, e.family, F_NAT_ADDR, F_NAT_PORT if e.nat_port is not None
             else None)
    if not update and e.dnat_addr is not None:
        _nat(lay, CTA_NAT_DST, e.family, F_DNAT_ADDR, F_DNAT_PORT if e.dnat_port is not None
             else None)
    return lay.finish()


def _by_tuple_layout(e: CtEntry, msg_type: int) -> _Layout:
    """A message naming one entry by its original tuple (DELETE, GET)."""
    lay = _Layout()
    _header(lay, msg_type, NLM_F_REQUEST, e.family)
    _tuple(lay, CTA_TUPLE_ORIG, e, reply=False)
    return lay.finish()


_BY_TUPLE = ("delete", "get")  # kinds whose messages carry the original tuple only
_UNIFORM_FROM = 16  # entries from which encode_all tries the columns first
# Network-order values swapped once, so that a whole message packs in native order.
_SWAPPED_PORT = [int.from_bytes(p.to_bytes(2, "big"), "little") for p in range(1 << 16)]


def _shape(e: CtEntry, kind: str) -> tuple:
    """What decides an entry's message layout."""
    return (kind, e.family, e.proto, e.tcp_state is not None,
            e.wscale_orig is not None and e.wscale_reply is not None, e.nat_addr is not None,
            e.nat_port is not None, e.dnat_addr is not None, e.dnat_port is not None)


def _packed_column(fmt: str, values: tuple) -> bytes | None:
    """A field's values for every message, packed one after the other; None when an
    address has not the layout's size (another family: the caller falls back)."""
    if fmt.endswith("s"):
        packed = b"".join(values)
        return packed if len(packed) == int(fmt[:-1]) * len(values) else None
    order, code = (fmt[0], fmt[1:]) if fmt[0] in "!=" else ("=", fmt)
    return struct.pack(f"{order}{len(values)}{code}", *values)


def _swapped32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "big"), "little")


class Encoder:
    def __init__(self) -> None:
        self._layouts: dict[tuple, _Layout] = {}
        self._timeouts: dict[int, int] = {}  # timeout -> swapped: a handful of values

    def encode_all(self, entries: list[CtEntry], first_seq: int, kind: str
                   ) -> tuple[bytearray, int]:
        """One message per entry, numbered from ``first_seq`` in the entries' order, one
        after the other (a send's worth); and where the last one begins. The entries of
        each message shape are encoded together a column at a time, whatever shapes lie
        between them (a mixed table's batch)."""
        seqs = [(first_seq + i) & 0xFFFFFFFF for i in range(len(entries))]
        groups: dict[tuple, list[int]] = {}
        for index, shape in enumerate(map(_shape, entries, repeat(kind))):
            groups.setdefault(shape, []).append(index)
        if len(groups) == 1 and len(entries) >= _UNIFORM_FROM:
            encoded = self.encode_columns(list(zip(*entries, strict=True)), seqs, kind)
            if encoded is not None:
                return encoded[0], len(encoded[0]) - encoded[1]
        messages: list = [None] * len(entries)
        for indices in groups.values():
            group = [entries[i] for i in indices]
            own = [seqs[i] for i in indices]
            encoded = self.encode_columns(list(zip(*group, strict=True)), own, kind) \
                if len(group) >= _UNIFORM_FROM else None
            if encoded is None:
                for index, message in zip(indices, self._encode_each(group, own, kind),
                                          strict=True):
                    messages[index] = message
                continue
            data, size = encoded
            for at, index in zip(range(0, len(data), size), indices, strict=True):
                messages[index] = data[at:at + size]
        joined = bytearray(b"".join(messages))
        return joined, len(joined) - len(messages[-1])

    def encode_columns(self, columns: Sequence[Sequence], seqs: list[int], kind: str
                       ) -> tuple[bytearray, int] | None:
        """The messages of entries given a field at a time (CtEntry's fields in order,
        each a list or tuple), numbered ``seqs``, when they have one message shape; and
        the size of each. None otherwise. The layout's constant bytes repeated, then
        each varying field written into every message at once: its values packed together
        in one call, and each of their bytes copied to its place with a strided slice. No
        Python runs per entry."""
        n = len(seqs)
        (families, protos, srcs, dsts, sports, dports, nat_addrs, nat_ports, dnat_addrs,
         dnat_ports, states, ws_origs, ws_replies, timeouts, *_counts) = columns
        first = new_entry(tuple(column[0] for column in columns))
        # One shape: the first entry's family and protocol throughout, and each optional
        # field in every entry or in none.
        if families.count(first.family) != n or protos.count(first.proto) != n or \
                (None in timeouts and kind not in _BY_TUPLE) or \
                any(column.count(None) not in (0, n) for column in (
                    states, ws_origs, ws_replies, nat_addrs, nat_ports, dnat_addrs,
                    dnat_ports)):
            return None
        shape = _shape(first, kind)
        lay = self._layouts.get(shape) or self._layout(shape, first, kind)
        columns = {F_SEQ: seqs, F_SRC: srcs, F_DST: dsts, F_SPORT: sports, F_DPORT: dports,
                   F_TIMEOUT: timeouts, F_STATE: states, F_WS_O: ws_origs,
                   F_WS_R: ws_replies, F_NAT_ADDR: nat_addrs, F_NAT_PORT: nat_ports,
                   F_DNAT_ADDR: dnat_addrs, F_DNAT_PORT: dnat_ports}
        size = len(lay.template)
        messages = bytearray(lay.template * n)
        for offset, fmt, field in lay.fields:
            values = _packed_column(fmt, columns[field])
            if values is None:
                return None
            width = len(values) // n
            for byte in range(width):
                messages[offset + byte::size] = values[byte::width]
        return messages, size

    def _encode_each(self, entries: Iterable[CtEntry], seqs: Iterable[int], kind: str
                     ) -> list[bytes]:
        """The messages of entries one by one, numbered ``seqs``. A loop, names bound
        once: a batch encodes hundreds."""
        layouts, timeouts, port = self._layouts, self._timeouts, _SWAPPED_PORT
        messages = []
        for e, seq in zip(entries, seqs, strict=True):
            (family, proto, src, dst, sport, dport, nat_addr, nat_port, dnat_addr, dnat_port,
             state, ws_orig, ws_reply, timeout, _op, _ob, _rp, _rb) = e
            shape = _shape(e, kind)
            lay = layouts.get(shape) or self._layout(shape, e, kind)
            timeout = timeout or 0
            swapped = timeouts.get(timeout)
            if swapped is None:
                swapped = self._timeout(timeout)
            messages.append(lay.struct.pack(*lay.pick((
                seq, src, dst, port[sport], port[dport], swapped, state or 0, ws_orig or 0,
                ws_reply or 0, nat_addr, port[nat_port or 0], dnat_addr,
                port[dnat_port or 0]) + lay.consts)))
        return messages

    def _layout(self, shape: tuple, e: CtEntry, kind: str) -> _Layout:
        lay = self._layouts[shape] = (
            _by_tuple_layout(e, CT_DELETE) if kind == "delete" else
            _by_tuple_layout(e, CT_GET) if kind == "get" else
            _create_layout(e, kind == "update"))
        return lay

    def _timeout(self, timeout: int) -> int:
        if len(self._timeouts) >= 4096:  # bounded, whatever timeouts come
            self._timeouts.clear()
        swapped = self._timeouts[timeout] = _swapped32(timeout)
        return swapped
