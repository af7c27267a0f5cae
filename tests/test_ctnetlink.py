"""The ctnetlink codec against a real kernel: every kind of NAT entry the model carries goes
in through the encoder and comes back out of a dump unchanged, and the dump's layout cache
reads exactly what a full walk of each message reads."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the conntrack codec tests must not skip", pytrace=False)
    pytest.skip("network namespaces and conntrack need root", allow_module_level=True)

from nfmig.nf_backends import ctparse  # noqa: E402
from nfmig.nf_backends.ctattrs import _BATCH  # noqa: E402
from nfmig.nf_backends.ctencode import Encoder  # noqa: E402
from nfmig.nf_backends.ctnetlink import Conntrack, ConntrackError, CtEntry  # noqa: E402
from nfmig.nf_backends.linux import LinuxBackend  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402

# NAT hooks for both families: the kernel takes NAT attributes only once NAT is in use.
NAT_TABLE = """table inet nat {
  chain postrouting { type nat hook postrouting priority 100; }
  chain prerouting { type nat hook prerouting priority -100; }
}
"""
V4, V6 = socket.AF_INET, socket.AF_INET6
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
ESTABLISHED = 3
CTA_MARK, CTA_ID = 8, 12  # attributes a NAT session does not read


def v4(text: str) -> bytes:
    return socket.inet_pton(V4, text)


def v6(text: str) -> bytes:
    return socket.inet_pton(V6, text)


ENTRIES = {
    "tcp ipv4 source nat": CtEntry(V4, TCP, v4("10.0.0.2"), v4("192.0.2.100"), 40000, 443,
                                   v4("192.0.2.1"), 20001, tcp_state=ESTABLISHED,
                                   wscale_orig=7, wscale_reply=6, timeout=300),
    "udp ipv4 source nat": CtEntry(V4, UDP, v4("10.0.0.2"), v4("192.0.2.100"), 40001, 53,
                                   v4("192.0.2.1"), 20002, timeout=60),
    "icmp ipv4 source nat": CtEntry(V4, ICMP, v4("10.0.0.2"), v4("192.0.2.100"), 77, 0,
                                    v4("192.0.2.1"), 20003, timeout=30),
    "tcp ipv6 source nat": CtEntry(V6, TCP, v6("2001:db8:1::2"), v6("2001:db8:2::100"), 40002,
                                   443, v6("2001:db8:2::1"), 20004, tcp_state=ESTABLISHED,
                                   wscale_orig=7, wscale_reply=7, timeout=300),
    "icmpv6 source nat": CtEntry(V6, ICMPV6, v6("2001:db8:1::2"), v6("2001:db8:2::100"), 78,
                                 0, v6("2001:db8:2::1"), 20005, timeout=30),
    "tcp ipv4 destination nat": CtEntry(V4, TCP, v4("192.0.2.100"), v4("192.0.2.1"), 40003,
                                        8080, dnat_addr=v4("10.0.0.2"), dnat_port=80,
                                        tcp_state=ESTABLISHED, wscale_orig=5, wscale_reply=5,
                                        timeout=300),
    "udp ipv4 without nat": CtEntry(V4, UDP, v4("10.0.0.2"), v4("10.0.0.3"), 40004, 5353,
                                    timeout=60),
}
# What the kernel decides itself and a round trip need not keep.
VOLATILE = ("timeout", "orig_packets", "orig_bytes", "reply_packets", "reply_bytes")


@pytest.fixture(scope="module")
def conntrack():
    with TestBed() as bed:
        bed.run(bed.nat_a, "nft", "-f", "-", input=NAT_TABLE)
        ct = Conntrack(bed.ns_path(bed.nat_a))
        try:
            failed = [code for code in ct.create(list(ENTRIES.values())) if code]
            assert not failed, f"the kernel refused entries: {[os.strerror(c) for c in failed]}"
            yield ct
        finally:
            ct.close()


def stable(entry: CtEntry) -> CtEntry:
    return entry._replace(**{name: None for name in VOLATILE})


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_entry_comes_back_from_a_dump_as_it_went_in(conntrack, kind):
    dumped = {e.key: e for e in conntrack.dump()}
    sent = ENTRIES[kind]
    assert stable(dumped[sent.key]) == stable(sent)


def test_dumped_timeout_is_what_was_set_less_the_time_since(conntrack):
    dumped = {e.key: e for e in conntrack.dump()}
    for sent in ENTRIES.values():
        assert sent.timeout - 30 <= dumped[sent.key].timeout <= sent.timeout


def test_layout_cache_reads_what_a_full_walk_reads(conntrack):
    ctparse._layouts.clear()
    cached_cold = conntrack.dump()  # first message of each layout walked and learnt
    cached_warm = conntrack.dump()  # every message through the learnt layouts
    walked = conntrack.dump(parse=ctparse.parse_entry_walked)
    assert ctparse._layouts, "no layout was learnt"
    expected = sorted(map(stable, walked))
    assert sorted(map(stable, cached_cold)) == expected
    assert sorted(map(stable, cached_warm)) == expected


def _fresh(count: int, first_port: int = 50000) -> list[CtEntry]:
    return [CtEntry(V4, UDP, v4("10.0.0.9"), v4("192.0.2.100"), first_port + i, 53,
                    v4("192.0.2.1"), first_port + i, timeout=60) for i in range(count)]


def test_batch_reports_each_refused_entry_at_its_own_index(conntrack):
    """Only a batch's last message asks for an ack; a refusal anywhere (here within the
    first send, within a later one and at the very end) is still put at its entry."""
    existing = ENTRIES["udp ipv4 source nat"]
    batch = _fresh(_BATCH + 300)
    refused = {0, _BATCH + 100, _BATCH + 299}
    for index in refused:
        batch[index] = existing
    try:
        results = conntrack.create(batch)
        assert {i for i, code in enumerate(results) if code} == refused
        assert {results[i] for i in refused} == {errno.EEXIST}
        assert conntrack.last_messages().keys() <= refused
    finally:
        conntrack.delete([e for e in batch if e is not existing])


def test_a_send_whose_every_message_is_refused_reports_every_one(conntrack):
    """A whole send's refusals fit in the receive buffer: none is lost, and the ack that
    ends the send is still read."""
    batch = _fresh(_BATCH + 10, 30000)
    try:
        assert conntrack.create(batch) == [None] * len(batch)
        assert conntrack.create(batch) == [errno.EEXIST] * len(batch)
    finally:
        conntrack.delete(batch)
    assert conntrack.get(batch[:3]) == [None] * 3


def test_batch_after_a_refusal_reads_only_its_own_replies(conntrack):
    conntrack.create([ENTRIES["udp ipv4 source nat"]])  # refused: exists
    batch = _fresh(3, 51000)
    try:
        assert conntrack.create(batch) == [None, None, None]
    finally:
        assert conntrack.delete(batch) == [None, None, None]


def test_get_finds_the_present_entries_and_none_for_the_missing(conntrack):
    missing = _fresh(1, 52000)[0]
    present = ENTRIES["tcp ipv4 source nat"]
    found = conntrack.get([missing, present, missing])
    assert found[0] is None and found[2] is None
    assert stable(found[1]) == stable(present)


def test_message_with_other_attribute_sizes_is_walked_not_misread():
    """Same length, different headers: the cached layout must not claim the message."""
    first = _message([(CTA_MARK, b"\x00" * 4), (CTA_ID, b"\x00" * 4)])
    second = _message([(CTA_ID, b"\x00" * 4), (CTA_MARK, b"\x00" * 4)])
    ctparse._layouts.clear()
    with pytest.raises(ValueError, match="both tuples"):
        ctparse.parse_entry(first, 0, len(first), V4)
    with pytest.raises(ValueError, match="both tuples"):
        ctparse.parse_entry(second, 0, len(second), V4)
    assert len(ctparse._layouts[len(first)]) == 2


def _message(attributes: list[tuple[int, bytes]]) -> bytes:
    out = b""
    for kind, value in attributes:
        out += struct.pack("=HH", 4 + len(value), kind) + value
    return out


def many(entry: CtEntry, count: int, first_port: int) -> list[CtEntry]:
    """``count`` entries of ``entry``'s shape, told apart by their source port."""
    return [entry._replace(sport=first_port + i,
                           nat_port=None if entry.nat_port is None else first_port + i)
            for i in range(count)]


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_a_batch_of_one_shape_comes_back_from_a_dump_as_it_went_in(conntrack, kind):
    batch = many(ENTRIES[kind], 40, 50000)  # one send of one layout: written by columns
    assert not any(conntrack.create(batch))
    try:
        dumped = {e.key: e for e in conntrack.dump()}
        assert [stable(dumped[e.key]) for e in batch] == [stable(e) for e in batch]
    finally:
        assert not any(conntrack.delete(batch))


@pytest.mark.parametrize("operation", ["create", "update", "delete", "get"])
@pytest.mark.parametrize("first_seq", [1, 2**32 - 10])  # numbers wrapping within the batch
def test_a_batch_encodes_to_the_messages_of_its_entries_one_by_one(operation, first_seq):
    encoder = Encoder()
    for entries in [*(many(e, 20, 1000) for e in ENTRIES.values()),
                    [e for e in ENTRIES.values() for _ in range(3)],  # mixed shapes
                    [e for _ in range(20) for e in ENTRIES.values()]]:  # mixed, by columns
        seqs = [(first_seq + i) & 0xFFFFFFFF for i in range(len(entries))]
        messages = encoder._encode_each(entries, seqs, operation)
        assert encoder.encode_all(entries, first_seq, operation) == (
            b"".join(messages), sum(map(len, messages[:-1])))


@pytest.mark.parametrize("operation", ["delete", "get"])
def test_keys_alone_encode_by_columns_to_the_messages_of_their_entries(operation):
    """What names an entry by its original tuple (a lookup or delete by key) carries no
    timeout, and still encodes by columns to what each entry encodes to alone."""
    encoder = Encoder()
    for entry in ENTRIES.values():
        probes = [e._replace(timeout=None) for e in many(entry, 20, 1000)]
        messages = encoder._encode_each(probes, list(range(1, 21)), operation)
        assert encoder.encode_columns(list(zip(*probes, strict=True)), list(range(1, 21)),
                                      operation) == (bytearray(b"".join(messages)),
                                                     len(messages[0]))


class _Recorder:
    """A dump's parser that keeps every message's bytes (padded as in a read) by key."""

    def __init__(self):
        self.messages: dict[tuple, bytes] = {}

    def __call__(self, buf, pos, end, family):
        entry = ctparse.parse_entry_walked(buf, pos, end, family)
        message = bytes(buf[pos - 20:end])
        self.messages[entry.key] = message + b"\0" * (-len(message) % 4)
        return entry


def _dumped_messages(conntrack, batch: list[CtEntry]) -> list[bytes]:
    recorder = _Recorder()
    conntrack.dump(parse=recorder)
    return [recorder.messages[e.key] for e in batch]


def _read_whole(messages: list[bytes]) -> list[CtEntry]:
    return [ctparse.parse_entry_walked(m, 20, len(m), m[16]) for m in messages]


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_a_read_of_one_layout_is_read_by_columns_as_message_by_message(conntrack, kind):
    batch = many(ENTRIES[kind], 40, 53000)
    assert not any(conntrack.create(batch))
    try:
        messages = _dumped_messages(conntrack, batch)
    finally:
        assert not any(conntrack.delete(batch))
    read = bytearray(b"".join(messages))
    assert ctparse.parse_run(read, len(read), len(messages[0])) == _read_whole(messages)


def test_a_read_of_one_layout_with_several_nat_kinds_is_read_as_message_by_message(conntrack):
    snat = many(ENTRIES["udp ipv4 source nat"], 20, 54000)
    plain = many(ENTRIES["udp ipv4 without nat"], 20, 54000)
    assert not any(conntrack.create(snat + plain))
    try:
        messages = _dumped_messages(conntrack, [e for pair in zip(snat, plain, strict=True)
                                                   for e in pair])
    finally:
        assert not any(conntrack.delete(snat + plain))
    assert len(set(map(len, messages))) == 1  # one layout, told apart by status only
    read = bytearray(b"".join(messages))
    assert ctparse.parse_run(read, len(read), len(messages[0])) == _read_whole(messages)


@pytest.mark.parametrize("where", ["flags", "attribute type", "length"])
def test_a_read_whose_messages_do_not_all_repeat_the_first_is_not_read_by_columns(
        conntrack, where):
    batch = many(ENTRIES["tcp ipv4 source nat"], 10, 55000)
    assert not any(conntrack.create(batch))
    try:
        messages = _dumped_messages(conntrack, batch)
    finally:
        assert not any(conntrack.delete(batch))
    odd = bytearray(messages[5])
    if where == "flags":
        odd[6] ^= 0x01
    elif where == "attribute type":  # the first top-level attribute named another one
        odd[22] ^= 0x01
    else:
        odd += b"\0" * 4
        odd[0:4] = struct.pack("=I", len(odd))
    read = bytearray(b"".join([*messages[:5], odd, *messages[6:]]))
    assert ctparse.parse_run(read, len(read), len(messages[0])) is None


def test_imported_counts_are_added_to_the_sessions_of_a_read():
    backend = LinuxBackend("unused")  # conversions only: never started
    batch = [e._replace(orig_packets=1, orig_bytes=2, reply_packets=3, reply_bytes=4)
             for e in many(ENTRIES["tcp ipv4 source nat"], 20, 1000)]
    backend._offsets = {batch[3].key: (10, 20, 30, 40), batch[17].key: (1, 1, 1, 1)}
    sessions = list(backend._sessions_from(batch))
    assert sessions[3][-4:] == (11, 22, 33, 44) and sessions[4][-4:] == (1, 2, 3, 4)


@pytest.mark.parametrize("request_", ["create", "dump"])
def test_a_kernel_that_does_not_answer_fails_the_request_instead_of_hanging(request_):
    """As when the namespace is torn down beneath the server: a socket nobody answers."""
    conntrack = Conntrack()
    ours, unanswered = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    conntrack.sock.close()
    conntrack.sock = ours
    ours.settimeout(0.2)
    try:
        with pytest.raises(ConntrackError) as failed:
            conntrack.create(_fresh(1)) if request_ == "create" else conntrack.dump()
        assert failed.value.errno == errno.ETIMEDOUT
        assert "no answer from the kernel within 0.2 s" in str(failed.value)
    finally:
        ours.close()
        unanswered.close()
