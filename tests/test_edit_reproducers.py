"""Edits the server once took that libyang and RFC 6241 refuse, each sent byte for byte.

Every odd entry is sent on its own (a small edit, read strictly) and in the middle of a
bulk edit of valid entries larger than 64 KiB (the size from which the server reads an
edit's text without a tree), over NETCONF and, as a body, over RESTCONF: each is refused
with an rpc-error (a 4xx), and the datastore reads the same after as before.
"""

from __future__ import annotations

import re

import pytest

from .rawclient import RawClient
from .restconf_client import XML, Restconf, start_with_restconf

NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
KEYS = ("<protocol>TCP</protocol><src_address>10.9.0.1</src_address><src_port>7002</src_port>"
        "<dst_address>192.0.2.80</dst_address><dst_port>80</dst_port>")
HELD = (f'<nat-session xmlns="{NS}">{KEYS}<translated_address>198.51.100.1'
        "</translated_address><translated_port>30000</translated_port>"
        "<tcp_state>established</tcp_state><timeout>300</timeout></nat-session>")


def entry(inner: str, start: str = f'<nat-session xmlns="{NS}">') -> str:
    return f"{start}{inner}</nat-session>"


def bulk(count: int = 400) -> list[str]:
    """Valid new entries, some 90 KB of them."""
    return [entry(f"<protocol>UDP</protocol><src_address>10.8.{i >> 8}.{i & 255}</src_address>"
                  f"<src_port>{1024 + i}</src_port><dst_address>192.0.2.53</dst_address>"
                  f"<dst_port>53</dst_port><translated_address>198.51.100.1"
                  f"</translated_address><translated_port>{20000 + i}</translated_port>"
                  "<timeout>60</timeout>") for i in range(count)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv, port = start_with_restconf(tmp_path_factory.mktemp("reproducers"),
                                    "--max-message-size", "8m")
    yield srv, Restconf(srv, port)
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = RawClient(server[0].port, server[0].user, server[0].password, base11=True)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def one_session_held(client):
    """Running holds exactly HELD before each test."""
    reply = client.rpc(f"<edit-config><target><running/></target><default-operation>replace"
                       f"</default-operation><config>{HELD}</config></edit-config>")
    assert b"<ok/>" in reply, reply


def running(client: RawClient) -> bytes:
    """Running as get-data reads it, each session's remaining lifetime (which the NAT
    counts down; ietf-nat's mapping-entry carries it too) masked."""
    reply = client.rpc(f'<get-data xmlns="{NCDS}" xmlns:ds="urn:ietf:params:xml:ns:yang:'
                       'ietf-datastores"><datastore>ds:running</datastore></get-data>')
    assert b"<rpc-error>" not in reply, reply
    return re.sub(rb"<(timeout|lifetime)>[0-9]+</(?:timeout|lifetime)>", rb"<\1/>", reply)


def edit(client: RawClient, entries: list[str], declarations: str = "") -> bytes:
    return client.rpc(f"<edit-config><target><running/></target><config{declarations}>"
                      f"{''.join(entries)}</config></edit-config>")


def error_tag(reply: bytes) -> str:
    found = re.search(rb"<error-tag>([^<]*)</error-tag>", reply)
    assert found is not None, f"no rpc-error in {reply[:2000]!r}"
    return found.group(1).decode()


def refused_with_nothing_changed(client: RawClient, entries: list[str],
                                 declarations: str = "") -> str:
    before = running(client)
    tag = error_tag(edit(client, entries, declarations))
    assert running(client) == before
    return tag


ODD = {
    "an unknown element in another namespace as the last child": (
        entry(KEYS + '<bogus xmlns="urn:evil"/>'), {"unknown-namespace"}),
    "a state leaf of another container as the last child": (
        entry(KEYS + "<session-count/>"), {"unknown-element"}),
    "an empty enumeration leaf as the last child": (
        entry(KEYS + "<tcp_state></tcp_state>"), {"invalid-value"}),
    "a processing instruction inside a port": (
        entry(KEYS.replace("<src_port>7002", "<src_port>7<?p x?>002")), {"invalid-value"}),
    "a processing instruction inside a counter": (
        entry(KEYS + "<orig_bytes>1<?p x?>23</orig_bytes>"), {"invalid-value"}),
    "a processing instruction inside a window scale": (
        entry(KEYS + "<src_window_scale>1<?p x?>4</src_window_scale>"), {"invalid-value"}),
    "keys out of schema order": (
        entry(KEYS.replace("<protocol>TCP</protocol>", "") + "<protocol>TCP</protocol>"),
        {"bad-element"}),
    "a leaf before the keys": (entry("<timeout>5</timeout>" + KEYS), {"bad-element"}),
    "an unknown attribute on the entry": (
        entry(KEYS, f'<nat-session xmlns="{NS}" colour="red">'), {"unknown-attribute"}),
    "an unknown attribute on a leaf": (
        entry(KEYS + '<timeout unit="s">5</timeout>'), {"unknown-attribute"}),
    "an invalid operation on a leaf": (
        entry(KEYS + f'<timeout xmlns:nc="{NC}" nc:operation="frob">5</timeout>'),
        {"bad-attribute"}),
    "text between leaves": (
        entry(KEYS.replace("</protocol>", "</protocol>hello")), {"invalid-value"}),
    "a child element inside a leaf": (
        entry(KEYS + "<timeout>5<x/></timeout>"), {"invalid-value"}),
    "an operation attribute without the NETCONF namespace": (
        entry(KEYS.replace("7002", "7003"), f'<nat-session xmlns="{NS}" operation="create">'),
        {"unknown-attribute"}),
    "an entry in no namespace": (entry(KEYS.replace("7002", "7003"),
                                       '<nat-session xmlns="">'), {"unknown-namespace"}),
    "an entry in the namespace of <config>": (entry(KEYS.replace("7002", "7003"),
                                                    "<nat-session>"), {"unknown-element"}),
}


@pytest.mark.parametrize("odd", list(ODD))
def test_an_odd_entry_alone_is_refused_and_changes_nothing(client, odd):
    text, tags = ODD[odd]
    assert refused_with_nothing_changed(client, [text]) in tags


@pytest.mark.parametrize("odd", list(ODD))
def test_an_odd_entry_in_a_large_edit_is_refused_and_changes_nothing(client, odd):
    entries = bulk()
    entries.insert(len(entries) // 2, ODD[odd][0])
    assert refused_with_nothing_changed(client, entries) in ODD[odd][1]


@pytest.mark.parametrize("odd", list(ODD))
def test_an_odd_entry_posted_over_restconf_is_a_4xx_and_changes_nothing(server, client, odd):
    before = running(client)
    reply = server[1].request("POST", "/restconf/data", ODD[odd][0], content_type=XML,
                              accept=XML)
    assert 400 <= reply.status < 500, (reply.status, reply.text)
    assert running(client) == before


def test_restconf_xml_post_of_an_entry_with_an_unknown_element_is_400(server, client):
    reply = server[1].request("POST", "/restconf/data", entry(
        KEYS.replace("7002", "7004") + '<bogus xmlns="urn:evil"/>'), content_type=XML,
        accept=XML)
    assert reply.status == 400, reply.text
    assert b"7004" not in running(client)


@pytest.mark.parametrize("large", [False, True], ids=["alone", "in a large edit"])
def test_deleting_a_held_leaf_as_the_entrys_last_child_deletes_it(client, large):
    entries = bulk() if large else []
    entries.append(entry(KEYS + f'<tcp_state xmlns:nc="{NC}" nc:operation="delete"/>'))
    assert b"<ok/>" in edit(client, entries)
    held = running(client).split(b"<src_port>7002</src_port>")[1].split(b"</nat-session>")[0]
    assert b"<tcp_state>" not in held and b"<translated_port>30000</" in held


@pytest.mark.parametrize("large", [False, True], ids=["alone", "in a large edit"])
def test_deleting_an_absent_leaf_is_data_missing_and_changes_nothing(client, large):
    entries = bulk() if large else []
    entries.append(entry(KEYS + f'<src_window_scale xmlns:nc="{NC}" nc:operation="delete"/>'))
    assert refused_with_nothing_changed(client, entries) == "data-missing"


def test_removing_an_absent_leaf_changes_nothing_and_is_ok(client):
    before = running(client)
    reply = edit(client, [entry(KEYS + f'<src_window_scale xmlns:nc="{NC}" '
                                'nc:operation="remove"/>')])
    assert b"<ok/>" in reply
    assert running(client) == before


def test_an_unnamespaced_operation_on_config_applies_nothing(client):
    """Only the base namespace's operation attribute is an operation; on <config> any other
    attribute is anyxml content the edit has no use for, and the entries merge."""
    reply = edit(client, [entry(KEYS.replace("7002", "7005"))], ' operation="delete"')
    assert b"<ok/>" in reply
    assert b"7005" in running(client)


def test_an_invalid_operation_on_config_is_bad_attribute(client):
    tag = refused_with_nothing_changed(client, [entry(KEYS.replace("7002", "7006"))],
                                       f' xmlns:nc="{NC}" nc:operation="frob"')
    assert tag == "bad-attribute"
