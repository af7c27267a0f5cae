"""The ctnetlink vocabulary: message and attribute numbers, and one conntrack entry.

Numbers from linux/netlink.h, linux/netfilter/nfnetlink.h and
linux/netfilter/nfnetlink_conntrack.h; shared by the encoder (ctnetlink) and the dump
parser (ctparse).
"""

from __future__ import annotations

import struct
from functools import partial
from operator import itemgetter
from typing import NamedTuple

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
CLONE_NEWNET = 0x40000000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
NLA_F_NESTED = 0x8000
NLMSGERR_ATTR_MSG = 1

CT_NEW, CT_GET, CT_DELETE = 0x100, 0x101, 0x102  # NFNL_SUBSYS_CTNETLINK << 8 | message
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3  # multicast groups of events

# Attribute numbers (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_NAT_SRC, CTA_TIMEOUT, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_NAT_DST = 6, 7, 9, 10, 13
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTOINFO_TCP = 1
TCP_STATE, TCP_WSCALE_ORIG, TCP_WSCALE_REPLY, TCP_FLAGS_ORIG, TCP_FLAGS_REPLY = 1, 2, 3, 4, 5
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO = 1, 2, 3
CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP = 4, 5
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2

IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8
IPS_SRC_NAT, IPS_DST_NAT = 0x10, 0x20
TCP_FLAG_WINDOW_SCALE, TCP_FLAG_SACK_PERM = 0x01, 0x02

ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
ECHO_REPLY = {ICMP: (8, 0), ICMPV6: (128, 129)}  # protocol -> (request type, reply type)

_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_BATCH = 2048  # messages per send (see Conntrack._send)


class CtEntry(NamedTuple):
    """One conntrack entry as the NAT sees it. Addresses are packed bytes (4 or 16); for
    ICMP, sport is the echo identifier and dport 0. ``nat_*`` is the translated source (SNAT,
    from the reply tuple) and ``dnat_*`` the translated destination (DNAT)."""

    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    nat_addr: bytes | None = None
    nat_port: int | None = None
    dnat_addr: bytes | None = None
    dnat_port: int | None = None
    tcp_state: int | None = None
    wscale_orig: int | None = None
    wscale_reply: int | None = None
    timeout: int | None = None
    orig_packets: int = 0
    orig_bytes: int = 0
    reply_packets: int = 0
    reply_bytes: int = 0

    # (proto, src, sport, dst, dport): the original tuple, which names an entry. An
    # itemgetter, not a method: bulk work reads it for every entry, often more than once.
    key = property(itemgetter(1, 2, 4, 3, 5))


# A CtEntry made in C from a tuple of every field: bulk work makes one per entry.
new_entry = partial(tuple.__new__, CtEntry)
