"""The bulk codec of nat-session entries agrees with libyang, the model's authority.

The server reads edits of the session list with libyang (the strict reader) and, for plain
entries, with a recogniser of whole edits that takes values only in their canonical form;
these tests hold both to what a full libyang parse of the same entry says: the same verdict
on every value, the same canonical value, and the recogniser declining all else.
"""

from __future__ import annotations

import pytest
from lxml import etree
from nfmig.nf_backends.base import Session
from nfmig.server.errors import RpcError
from nfmig.server.schema import ListEntryChecker, Schema, YangError
from nfmig.server.session_codec import (
    NeedsTree,
    SessionDecoder,
    SessionEdit,
    _content_in,
    _Formatter,
    hollow_edit,
    session_batches_to_xml,
    sessions_to_xml,
)

NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
KEY = {"protocol": "TCP", "src_address": "10.0.0.1", "src_port": "2526",
       "dst_address": "130.192.225.79", "dst_port": "5678"}

VALUES = [
    ("src_port", "0"), ("src_port", "65535"), ("src_port", "65536"), ("src_port", "70000"),
    ("src_port", "-1"), ("src_port", "+80"), ("src_port", "0080"), ("src_port", " 80"),
    ("src_port", "\u0663"), ("src_port", ""), ("src_port", "8e1"),
    ("src_address", "10.0.0.300"), ("src_address", "010.0.0.1"), ("src_address", "10.0.0"),
    ("src_address", "10.0.0.1 "), ("src_address", "::1"), ("src_address", "2001:DB8::1"),
    ("src_address", "2001:db8:0:0:0:0:0:1"), ("src_address", "::ffff:10.0.0.1"),
    ("src_address", "::10.0.0.1"), ("src_address", "64:ff9b::10.0.0.1"),
    ("src_address", "::ffff:010.0.0.1"), ("src_address", "0:0:0:0:0:0:0:0"),
    ("src_address", "fe80::1%eth0"), ("src_address", "1:2:3:4:5:6:7:8:9"),
    ("translated_address", "192.0.2.1"), ("translated_address", "256.0.0.1"),
    ("protocol", "UDP"), ("protocol", "tcp"), ("protocol", "SCTP"),
    ("tcp_state", "established"), ("tcp_state", "ESTABLISHED"), ("tcp_state", "bogus"),
    ("timeout", "4294967295"), ("timeout", "4294967296"),
    ("orig_bytes", "18446744073709551615"), ("orig_bytes", "18446744073709551616"),
    ("src_window_scale", "14"), ("src_window_scale", "255"), ("src_window_scale", "256"),
]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema()


@pytest.fixture(scope="module")
def decoder(schema: Schema) -> SessionDecoder:
    return SessionDecoder(ListEntryChecker(schema, "/nfmig-nat:nat-session"), NS)


def entry_xml(leaves: dict[str, str]) -> str:
    body = "".join(f"<{k}>{v}</{k}>" for k, v in leaves.items())
    return f'<nat-session xmlns="{NS}">{body}</nat-session>'


def libyang_value(schema: Schema, leaves: dict[str, str], leaf: str) -> str | None:
    """libyang's canonical value of ``leaf`` in the entry, or None if it refuses the entry."""
    try:
        tree = schema.parse_xml(entry_xml(leaves))
    except YangError:
        return None
    try:  # the tree starts with the model's default nodes (nat-policy), then the entry
        entry = next(n for n in tree.siblings() if n.name() == "nat-session")
        return next(str(n.value()) for n in entry.children() if n.name() == leaf)
    finally:
        tree.free()


def fast_value(decoder: SessionDecoder, leaves: dict[str, str], leaf: str) -> str | None:
    try:
        edit = decoder.decode(etree.fromstring(entry_xml(leaves)), "merge")
    except RpcError:
        return None
    return str(getattr(edit.session, leaf))


@pytest.mark.parametrize(("leaf", "value"), VALUES)
def test_fast_leaf_check_agrees_with_libyang(schema, decoder, leaf, value):
    leaves = {**KEY, leaf: value}
    assert fast_value(decoder, leaves, leaf) == libyang_value(schema, leaves, leaf)


def config_of(*entries: str, nsdecl: str = f' xmlns:nc="{NC}" xmlns="{NS}"') -> etree._Element:
    return etree.fromstring(f"<nc:config{nsdecl}>{''.join(entries)}</nc:config>"
                            if "xmlns:nc" in nsdecl else
                            f"<config{nsdecl}>{''.join(entries)}</config>")


def sample_sessions() -> list[Session]:
    tcp = Session("TCP", "10.0.0.1", 2526, "130.192.225.79", 5678, "192.0.2.1", 20001, None,
                  None, "established", 7, 7, 431999, 10, 1000, 9, 900)
    udp = Session("UDP", "10.0.0.2", 5353, "198.51.100.7", 53, "192.0.2.1", 20002, None,
                  None, None, None, None, 30, 1, 60, 1, 120)
    dnat = Session("TCP", "2001:db8::1", 40000, "2001:db8:1::80", 80, None, None,
                   "2001:db8:2::80", 8080, "syn-sent", None, None, 120, 1, 60, 0, 0)
    return [tcp, udp, dnat, tcp._replace(src_port=2527)]


def both_readings(decoder: SessionDecoder, config: etree._Element) -> tuple[list, list]:
    fast = decoder.decode_bulk(config, "merge")
    assert fast is not None, "plain entries must take the fast path"
    slow = [decoder.decode(child, "merge") for child in config]
    return _as_tuples(fast), _as_tuples(slow)


def _as_tuples(edits: list) -> list[tuple]:
    return [(e.operation, e.key, e.session, e.present, dict(e.removed)) for e in edits]


def test_whole_edit_reading_matches_entry_by_entry_reading(decoder):
    entries = list(sessions_to_xml(sample_sessions(), NS))
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow and len(fast) == 4


def uniform_sessions(n: int = 50) -> list[Session]:
    """Entries with the same leaves in the same order: the bulk edit's usual form."""
    tcp = sample_sessions()[0]
    return [tcp._replace(src_port=1024 + i, translated_port=20000 + i, orig_bytes=i * 7)
            for i in range(n)]


def test_uniform_edit_reading_matches_entry_by_entry_reading(decoder):
    entries = list(sessions_to_xml(uniform_sessions(), NS))
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow and len(fast) == 50


def test_uniform_edit_reading_keeps_each_entrys_operation(decoder):
    entries = [e.replace("<nat-session", '<nat-session nc:operation="replace"', 1) if i % 3
               else e for i, e in enumerate(sessions_to_xml(uniform_sessions(9), NS))]
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow
    assert [op for op, *_ in fast] == ["merge", "replace", "replace"] * 3


def test_uniform_edit_reading_of_many_blocks_matches_entry_by_entry_reading(decoder):
    entries = list(sessions_to_xml(uniform_sessions(3000), NS))  # a block is ~500 entries
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow and len(fast) == 3000


def test_an_entry_of_another_layout_in_a_later_block_is_read_by_its_own_layout(decoder):
    sessions = uniform_sessions(3000)
    sessions[2500] = sessions[2500]._replace(orig_bytes=None)
    fast, slow = both_readings(decoder, config_of(*sessions_to_xml(sessions, NS)))
    assert fast == slow
    assert fast[2500][2] == sessions[2500]


def test_an_odd_leaf_in_a_later_block_goes_to_the_entry_reader(decoder):
    entries = list(sessions_to_xml(uniform_sessions(3000), NS))
    entries[2500] = entries[2500].replace("<src_port>", f'<src_port xmlns="{NS}">', 1)
    assert decoder.decode_bulk(config_of(*entries), "merge") is None


@pytest.mark.parametrize(("plain", "odd"), [
    ("<src_port>1025</src_port>", "<src_port>70000</src_port>"),           # out of range
    ("<src_port>1025</src_port>", f'<src_port xmlns="{NS}">1025</src_port>'),  # declaration
    ("<src_port>1025</src_port>", "<src_port>1&amp;2</src_port>"),            # an entity
    ("<orig_bytes>7</orig_bytes>", "<orig_bytes>1,2</orig_bytes>"),           # not one number
    ("<orig_bytes>7</orig_bytes>", "<orig_bytes>07</orig_bytes>"),            # not canonical
])
def test_uniform_edit_reading_leaves_an_odd_leaf_to_the_entry_reader(decoder, plain, odd):
    entries = list(sessions_to_xml(uniform_sessions(3), NS))
    assert plain in entries[1]
    entries[1] = entries[1].replace(plain, odd)
    assert decoder.decode_bulk(config_of(*entries), "merge") is None


@pytest.mark.parametrize("written", ["0", "18446744073709551615"])
def test_uniform_edit_reading_reads_any_canonical_decimal_as_the_entry_reader(decoder,
                                                                              written):
    entries = list(sessions_to_xml(uniform_sessions(3), NS))
    entries[1] = entries[1].replace("<orig_bytes>7</orig_bytes>",
                                    f"<orig_bytes>{written}</orig_bytes>")
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow and fast[1][2].orig_bytes == int(written)


def test_a_value_not_written_canonically_is_read_by_libyang_as_its_canonical_value(decoder):
    entries = list(sessions_to_xml(uniform_sessions(3), NS))
    entries[1] = entries[1].replace("<orig_bytes>7</orig_bytes>", "<orig_bytes>0080</orig_bytes>")
    assert decoder.decode_bulk(config_of(*entries), "merge") is None
    assert decoder.decode_all(config_of(*entries), "merge")[1].session.orig_bytes == 80


@pytest.mark.parametrize(("leaf", "value"), VALUES)
def test_the_recogniser_takes_a_value_only_in_libyangs_canonical_form(schema, decoder, leaf,
                                                                      value):
    taken = decoder.checker.leaves[leaf].canonical_column([value])
    canonical = libyang_value(schema, {**KEY, leaf: value}, leaf)
    assert taken is None or (str(taken[0]) == canonical == value)


@pytest.mark.parametrize("odd", ["0080", "", "8e1", "+80", "-1", " 80", "1,2", "\u0663",
                                 "18446744073709551616", "1" * 5000, "null", "[1]"])
def test_a_column_of_integers_with_one_odd_text_is_declined(decoder, odd):
    assert decoder.checker.leaves["orig_bytes"].canonical_column(["10", odd, "30"]) is None


def test_a_column_of_plain_integers_converts_to_them(decoder):
    leaf = decoder.checker.leaves["src_port"]
    assert leaf.canonical_column(list(map(str, range(1000)))) == list(range(1000))


def test_whole_edit_reading_keeps_operations_and_pretty_printing(decoder):
    entries = [e.replace("<nat-session", '<nat-session nc:operation="create"', 1) if i % 2
               else e for i, e in enumerate(sessions_to_xml(sample_sessions(), NS))]
    pretty = "\n  ".join(e.replace("><", ">\n    <") for e in entries)
    fast, slow = both_readings(decoder, config_of(pretty))
    assert fast == slow
    assert [op for op, *_ in fast] == ["merge", "create", "merge", "create"]


def test_whole_edit_reading_accepts_entries_declaring_the_namespace(decoder):
    entries = list(sessions_to_xml(sample_sessions(), NS))
    fast, slow = both_readings(decoder, config_of(*entries, nsdecl=f' xmlns="{NC}"'))
    assert fast == slow


def test_whole_edit_reading_accepts_entries_declaring_the_base_namespace_for_operation(
        decoder):
    entries = [e.replace("<nat-session", f'<nat-session xmlns:nc="{NC}" nc:operation="remove"',
                         1) for e in sessions_to_xml(sample_sessions(), NS)]
    fast, slow = both_readings(decoder, config_of(*entries))
    assert fast == slow
    assert {op for op, *_ in fast} == {"remove"}


@pytest.mark.parametrize("odd", [
    '<nat-session><src_port nc:operation="delete">1</src_port>',  # an attribute on a leaf
    '<nat-session><timeout nc:operation="remove"/>',               # ... on an empty leaf
    '<nat-session><src_port xmlns="urn:other">1</src_port>',       # a leaf in another namespace
    "<nat-session><nc:src_port>1</nc:src_port>",                   # a prefixed leaf
    "<nat-session><extra>1</extra>",                               # an unknown leaf
    "<nat-session><src_port>1</src_port><src_port>2</src_port>",    # a leaf given twice
    "<nat-session><src_port>70000</src_port>",                      # a value out of range
    "<nat-session><src_port/>",                                     # an empty leaf
])
@pytest.mark.parametrize("sessions", [sample_sessions, uniform_sessions])
def test_whole_edit_reading_leaves_anything_unusual_to_the_entry_reader(decoder, odd,
                                                                        sessions):
    entries = list(sessions_to_xml(sessions(), NS))
    entries[1] = entries[1].replace(f'<nat-session xmlns="{NS}">', odd, 1)
    assert decoder.decode_bulk(config_of(*entries), "merge") is None


def test_whole_edit_reading_of_an_empty_config_is_empty(decoder):
    assert decoder.decode_bulk(config_of(), "merge") == []


def edit_request(entries: str, before: str = "") -> bytes:
    """An edit-config rpc as a client writes it: the model's namespace declared on config."""
    return (f'<rpc xmlns="{NC}" message-id="1"><edit-config><target><running/></target>'
            f'{before}<nc:config xmlns:nc="{NC}" xmlns="{NS}">{entries}</nc:config>'
            "</edit-config></rpc>").encode()


def config_in(request: bytes) -> etree._Element:
    return etree.fromstring(request).find(f"{{{NC}}}edit-config/{{{NC}}}config")


def plain_entries(n: int = 300) -> str:
    return "".join(sessions_to_xml(uniform_sessions(n), NS)).replace(f' xmlns="{NS}"', "")


def test_a_bulk_edit_is_read_from_the_requests_own_text(decoder):
    request = edit_request(plain_entries())
    assert _content_in(request, config_in(request)) == plain_entries()


def test_reading_the_requests_text_matches_reading_the_tree(decoder):
    request = edit_request(plain_entries())
    config = config_in(request)
    from_text = decoder.decode_all(config, "merge", request)
    assert _as_tuples(from_text) == _as_tuples(decoder.decode_all(config, "merge"))
    assert len(from_text) == 300


@pytest.mark.parametrize("before", [
    "<!-- <nc:config> -->",                                # the tag in a comment first
    "<default-operation>merge</default-operation>",
])
def test_text_that_misleads_the_search_is_read_from_the_tree(decoder, before):
    request = edit_request(plain_entries(), before)
    config = config_in(request)
    assert _as_tuples(decoder.decode_all(config, "merge", request)) == \
        _as_tuples(decoder.decode_all(config, "merge"))


def test_text_in_another_encoding_is_read_from_the_tree(decoder):
    request = b'<?xml version="1.0" encoding="ISO-8859-1"?>' + edit_request(plain_entries())
    assert _content_in(request, config_in(request)) is None
    assert len(decoder.decode_all(config_in(request), "merge", request)) == 300


def test_an_entry_hidden_in_a_comment_is_not_read(decoder):
    hidden = plain_entries(1).replace("<nat-session>", "<!-- <nat-session>", 1) + " -->"
    request = edit_request(plain_entries() + hidden)
    config = config_in(request)
    assert len(decoder.decode_all(config, "merge", request)) == 300


# -- large edits parsed without their entries' tree (HollowEdit) -----------------------------
BIG = 2000  # entries: over a megabyte, where the server hollows an edit


def _parse(text: bytes) -> etree._Element:
    return etree.fromstring(text, parser=etree.XMLParser(huge_tree=True))


def hollow_read(decoder: SessionDecoder, request: bytes) -> list[SessionEdit]:
    hollow = hollow_edit(request, _parse)
    assert hollow is not None, "the request was not hollowed"
    assert len(hollow.config) == 0
    return decoder.decode_all(hollow.config, "merge", hollow)


def test_a_large_edit_read_without_its_tree_matches_the_tree(decoder):
    request = edit_request(plain_entries(BIG))
    assert _as_tuples(hollow_read(decoder, request)) == \
        _as_tuples(decoder.decode_all(config_in(request), "merge"))


def test_a_large_edit_of_entries_declaring_the_namespace_is_read_without_its_tree(decoder):
    # as the relay passes on a source's reply: every entry keeps its declaration
    request = edit_request("".join(sessions_to_xml(uniform_sessions(BIG), NS)))
    assert _as_tuples(hollow_read(decoder, request)) == \
        _as_tuples(decoder.decode_all(config_in(request), "merge"))


def test_a_small_edit_is_not_hollowed():
    assert hollow_edit(edit_request(plain_entries(10)), _parse) is None


@pytest.mark.parametrize("before", ["<!-- <nc:config> -->", "<?pi <nc:config>?>"])
def test_a_large_edit_with_a_hidden_config_tag_is_parsed_whole(before):
    assert hollow_edit(edit_request(plain_entries(BIG), before), _parse) is None


def test_a_large_copy_config_is_parsed_whole():
    request = (f'<rpc xmlns="{NC}" message-id="1"><copy-config><target><candidate/></target>'
               f'<source><config xmlns:n="{NS}">{plain_entries(BIG)}</config></source>'
               "</copy-config></rpc>").encode()
    assert hollow_edit(request, _parse) is None


@pytest.mark.parametrize(("odd", "new"), [
    ("<src_port>", "<dst_port>"),              # a start tag its end tag does not close
    ("<src_port>", '<src_port a="1">'),         # an attribute on a leaf
    ("<src_port>", "<!-- x --><src_port>"),     # a comment between leaves
    ("</nat-session>", "</nat-session>x"),      # text between entries
    ("<protocol>TCP", "<protocol>T&#67;P"),     # an entity
])
def test_a_large_edit_the_text_reader_declines_needs_the_tree(decoder, odd, new):
    entries = plain_entries(BIG)
    at = entries.index(odd, len(entries) // 2)
    request = edit_request(entries[:at] + new + entries[at + len(odd):])
    hollow = hollow_edit(request, _parse)
    assert hollow is not None
    with pytest.raises(NeedsTree):
        decoder.decode_all(hollow.config, "merge", hollow)


def test_a_large_edit_read_ahead_is_what_reading_it_at_handling_gives(decoder):
    request = edit_request(plain_entries(BIG))
    ahead = hollow_edit(request, _parse)
    decoder.prepare(ahead)
    assert list(ahead.prepared) == ["merge"]
    assert _as_tuples(decoder.decode_all(ahead.config, "merge", ahead)) == \
        _as_tuples(hollow_read(decoder, request))
    assert not ahead.prepared  # taken, not kept for a second read


def test_a_large_edit_read_ahead_for_another_operation_is_read_again(decoder):
    ahead = hollow_edit(edit_request(plain_entries(BIG)), _parse)
    decoder.prepare(ahead)  # as merge, the default
    edits = decoder.decode_all(ahead.config, "create", ahead)
    assert {e.operation for e in edits} == {"create"}


def test_a_large_edit_read_ahead_takes_its_default_operation_from_the_request(decoder):
    request = edit_request(plain_entries(BIG), "<default-operation>none</default-operation>")
    ahead = hollow_edit(request, _parse)
    assert ahead.default_operation == "none"
    decoder.prepare(ahead)
    assert list(ahead.prepared) == ["none"]


def test_a_large_edit_read_ahead_that_is_not_plain_still_needs_the_tree(decoder):
    entries = plain_entries(BIG)
    at = entries.index("<src_port>", len(entries) // 2)
    ahead = hollow_edit(edit_request(entries[:at] + '<src_port a="1">' +
                                     entries[at + len("<src_port>"):]), _parse)
    decoder.prepare(ahead)
    with pytest.raises(NeedsTree):
        decoder.decode_all(ahead.config, "merge", ahead)


def test_a_batch_is_written_as_its_entries_one_by_one():
    batch = [Session("TCP", "10.0.0.1", 1000, "192.0.2.9", 443, "192.0.2.1", 2000,
                     tcp_state="established", timeout=300, orig_packets=3),
             Session("UDP", "10.0.0.2", 53, "192.0.2.9", 53, timeout=60),
             Session("TCP", "10.0.0.3", 1000, "192.0.2.9", 80, None, None, "10.1.0.9", 8080),
             Session("TCP", "10.0.0.4", 1001, "192.0.2.9", 443, "192.0.2.1", 2001,
                     tcp_state="established", timeout=300, orig_packets=4)]
    one_by_one = "".join(sessions_to_xml(batch, NS))
    assert list(session_batches_to_xml([batch[:3], batch[3:], []], NS)) == [
        "".join(sessions_to_xml(batch[:3], NS)), "".join(sessions_to_xml(batch[3:], NS)), ""]
    assert "".join(session_batches_to_xml([batch], NS)) == one_by_one
    assert "<translated_address>" not in one_by_one.split("</nat-session>")[1]  # absent: out


ALIKE = [Session("TCP", f"10.0.0.{i}", 1000 + i, "192.0.2.9", 443, "192.0.2.1", 2000 + i,
                 tcp_state="established", timeout=300, orig_packets=i) for i in range(20)]


def test_a_batch_of_alike_sessions_is_written_in_one_template_as_one_by_one():
    formatter = _Formatter(NS)
    assert formatter._entries_alike(ALIKE) is not None  # the one template did the work
    assert formatter.entries(ALIKE) == "".join(sessions_to_xml(ALIKE, NS))


@pytest.mark.parametrize("odd", [{"tcp_state": None}, {"reply_bytes": 7}],
                         ids=["a leaf fewer", "a leaf more"])
def test_a_batch_with_one_session_of_other_leaves_is_written_one_by_one(odd):
    batch = [*ALIKE[:10], ALIKE[10]._replace(**odd), *ALIKE[11:]]
    formatter = _Formatter(NS)
    assert formatter._entries_alike(batch) is None
    assert formatter.entries(batch) == "".join(sessions_to_xml(batch, NS))


@pytest.mark.parametrize("leaf", [f'<tcp_state xmlns:nc="{NC}" nc:operation="delete"/>',
                                  f'<tcp_state xmlns:nc="{NC}" nc:operation="delete">'
                                  "bogus</tcp_state>"])
def test_a_leaf_an_edit_takes_away_needs_no_valid_value(decoder, leaf):
    edit = decoder.decode(etree.fromstring(entry_xml(KEY).replace("</nat-session>",
                                                                  leaf + "</nat-session>")),
                          "merge")
    assert dict(edit.removed) == {"tcp_state": "delete"} and "tcp_state" not in edit.present


@pytest.mark.parametrize("leaf", [f'<src_port xmlns:nc="{NC}" nc:operation="remove">',
                                  f'<timeout xmlns:nc="{NC}" nc:operation="delete"><x/>'])
def test_a_key_or_a_leaf_with_a_child_cannot_be_taken_away(decoder, leaf):
    name = leaf[1:leaf.index(" ")]
    text = entry_xml({**KEY, "timeout": "5"}).replace(f"<{name}>", leaf, 1)
    with pytest.raises(RpcError):
        decoder.decode(etree.fromstring(text), "merge")
