"""Large edits through a real server: read from their text without a tree of their entries
when written plainly, as one whole tree otherwise, with the same outcome either way."""

from __future__ import annotations

import pytest
from ncclient.operations import RPCError
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NatClient, TextRpc
from nfmig.nf_backends.base import Session
from nfmig.server.session_codec import sessions_to_xml

from .conftest import NAT_NS, NC_NS

COUNT = 5000  # about 1.4 MB of entries: past the size from which edits are hollowed


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = start_local_server(tmp_path_factory.mktemp("bulk"))
    c = NatClient("127.0.0.1", server.port, server.user, server.password,
                  hostkey_verify=False)
    yield c
    c.close()
    server.stop()


@pytest.fixture(autouse=True)
def empty(client):
    body, _ = client.get_sessions("running")
    if body:
        client.delete_sessions(body)
    yield


def entries(count: int = COUNT, first_port: int = 1024) -> str:
    sessions = (Session("UDP", "10.0.0.2", first_port + i, "192.0.2.100", 53, "192.0.2.1",
                        first_port + i, timeout=60) for i in range(count))
    return "".join(sessions_to_xml(sessions, NAT_NS)).replace(f' xmlns="{NAT_NS}"', "")


def edit(client: NatClient, body: str, before: str = "") -> None:
    client.m.execute(TextRpc, f"<edit-config><target><running/></target>{before}"
                              f'<nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">{body}'
                              "</nc:config></edit-config>")


def ports(client: NatClient) -> set[int]:
    body, _ = client.get_sessions("running")
    return {int(p.split("<")[0]) for p in body.split("<src_port>")[1:]}


def test_a_large_plain_edit_applies_every_entry(client):
    edit(client, entries())
    assert ports(client) == set(range(1024, 1024 + COUNT))


def test_a_large_edit_with_a_comment_among_its_entries_applies_every_entry(client):
    text = entries()
    middle = text.index("<nat-session>", len(text) // 2)
    edit(client, text[:middle] + "<!-- a note -->" + text[middle:])
    assert ports(client) == set(range(1024, 1024 + COUNT))


def test_a_large_edit_with_a_broken_tag_is_malformed_and_changes_nothing(client):
    text = entries()
    at = text.index("<src_port>", len(text) // 2)
    with pytest.raises(RPCError) as err:
        edit(client, text[:at] + "<dst_port>" + text[at + len("<src_port>"):])
    assert err.value.tag == "malformed-message"
    assert ports(client) == set()


def test_a_large_replace_edit_leaves_only_its_entries(client):
    edit(client, entries(5, first_port=60000))
    edit(client, entries(), before="<default-operation>replace</default-operation>")
    assert ports(client) == set(range(1024, 1024 + COUNT))


def test_a_large_edit_naming_one_session_twice_is_refused_and_changes_nothing(client):
    text = entries()
    twice = text + text[:text.index("</nat-session>") + len("</nat-session>")]
    with pytest.raises(RPCError) as err:
        edit(client, twice)
    assert (err.value.tag, err.value.app_tag) == ("invalid-value", "data-not-unique")
    assert "appears twice" in err.value.message
    assert ports(client) == set()


def test_a_large_merge_over_existing_sessions_keeps_what_it_does_not_state(client):
    edit(client, entries(3).replace("<timeout>60</timeout>", "<timeout>60</timeout>"
                                    "<orig_packets>7</orig_packets>"))
    edit(client, entries())
    body, _ = client.get_sessions("running")
    assert body.count("<orig_packets>7</orig_packets>") == 3
    assert ports(client) == set(range(1024, 1024 + COUNT))


def test_edits_sent_back_to_back_are_handled_in_order_each_after_the_one_before(client):
    """The server reads a request while it handles the one before: the second edit, read
    before the first was applied, still finds the first's sessions there."""
    creates = entries().replace("<nat-session>", '<nat-session nc:operation="create">')
    operation = ("<edit-config><target><running/></target><default-operation>none"
                 f'</default-operation><nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">'
                 f"{creates}</nc:config></edit-config>")
    m = client.m
    sent = []
    for _ in range(2):
        rpc = TextRpc(m._session, m._device_handler, async_mode=True, timeout=60,
                      huge_tree=True)
        rpc.request(operation)
        sent.append(rpc)
    for rpc in sent:
        assert rpc.event.wait(60)
        rpc.reply.parse()
    assert sent[0].reply.ok
    assert sent[1].reply.error is not None and sent[1].reply.error.tag == "data-exists"
    assert ports(client) == set(range(1024, 1024 + COUNT))
