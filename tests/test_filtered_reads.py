"""A subtree filter of content matches (one subscriber, one peer, one translated port...) is
answered by selecting the sessions as they are read, never parsing the table: and it answers
exactly what RFC 6241's filtering of the whole table answers. Seeded filters are generated
against a live server and checked against that rule, applied here to a full read."""

from __future__ import annotations

import os
import random
from xml.sax.saxutils import escape

import pytest
from lxml import etree
from ncclient import manager
from nfmig.client.local import start_local_server
from nfmig.client.selection import Selection
from nfmig.server.filters import content_matches, selects_by_own_leaves

from .conftest import NAT_NS, NC_NS

SEED = int(os.environ.get("FILTER_SEED", "7"))
FILTERS = 80
LEAVES = ("protocol", "src_address", "src_port", "dst_address", "dst_port",
          "translated_address", "translated_port", "tcp_state", "src_window_scale")


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    server = start_local_server(tmp_path_factory.mktemp("filters"), "--sessions", "400")
    session = manager.connect(host="127.0.0.1", port=server.port, username=server.user,
                              password=server.password, hostkey_verify=False,
                              allow_agent=False, look_for_keys=False, timeout=60)
    yield session
    session.close_session()
    server.stop()


def entries(xml: str) -> list[dict[str, str]]:
    """Each nat-session of a reply as {leaf: text}, its timeout left out (it counts down
    between two reads)."""
    root = etree.fromstring(xml.encode())
    return [{etree.QName(leaf).localname: (leaf.text or "").strip() for leaf in entry
             if etree.QName(leaf).localname != "timeout"}
            for entry in root.iter(f"{{{NAT_NS}}}nat-session")]


def as_set(found: list[dict[str, str]]) -> set[frozenset]:
    return {frozenset(e.items()) for e in found}


def selected(table: list[dict[str, str]], wanted: list[list[tuple[str, str]]]
             ) -> list[dict[str, str]]:
    """RFC 6241 §6.2.5 for filter nodes of content matches only: an entry is selected when,
    for one of the nodes, every content match equals one of its leaves."""
    return [e for e in table
            if any(all(e.get(leaf) == value.strip() for leaf, value in one) for one in wanted)]


def random_filter(rnd: random.Random, table: list[dict[str, str]]
                  ) -> tuple[str, list[list[tuple[str, str]]]]:
    nodes, wanted = [], []
    for _ in range(rnd.randint(1, 3)):
        like = rnd.choice(table)
        one = []
        for leaf in rnd.sample(LEAVES, rnd.randint(1, 3)):
            value = like.get(leaf) or str(rnd.randint(0, 9))
            if rnd.random() < 0.1:
                value = str(rnd.randint(1, 65535))  # likely no match
            if rnd.random() < 0.2:
                value = f"  {value}\n"  # content matches compare the trimmed text
            if rnd.random() < 0.05:
                leaf = "no_such_leaf"
            one.append((leaf, value))
        if rnd.random() < 0.1:
            one.append(one[0])  # the same content match twice
        prefixed = rnd.random() < 0.3  # then the leaves are in no namespace: any matches
        if prefixed:
            body = "".join(f"<{leaf}>{value}</{leaf}>" for leaf, value in one)
            nodes.append(f'<n:nat-session xmlns:n="{NAT_NS}" xmlns="">{body}</n:nat-session>')
        else:
            body = "".join(f"<{leaf}>{value}</{leaf}>" for leaf, value in one)
            nodes.append(f'<nat-session xmlns="{NAT_NS}">{body}</nat-session>')
        wanted.append(one)
    return "".join(nodes), wanted


def test_content_match_filters_select_what_filtering_the_whole_table_selects(m):
    rnd = random.Random(SEED)
    table = entries(m.get_config(source="running").xml)
    assert len(table) == 400
    for i in range(FILTERS):
        text, wanted = random_filter(rnd, table)
        reply = m.get_config(source="running", filter=(
            f'<filter xmlns="{NC_NS}" type="subtree">{text}</filter>')).xml
        assert as_set(entries(reply)) == as_set(selected(table, wanted)), \
            f"filter {i} (FILTER_SEED={SEED}): {text}"


def test_a_filter_of_content_matches_is_selected_without_parsing_the_table():
    node = etree.fromstring(f'<filter><nat-session xmlns="{NAT_NS}"><src_address> 10.0.0.1 '
                            "</src_address><dst_port>80</dst_port></nat-session></filter>")
    assert content_matches(node, NAT_NS, "nat-session") == [
        {"src_address": "10.0.0.1", "dst_port": "80"}]


@pytest.mark.parametrize("inner", ["<src_address/>", "<src_address>1</src_address><x/>",
                                   '<src_address a="1">1</src_address>',
                                   "<src_address><b>1</b></src_address>"])
def test_a_filter_with_anything_but_content_matches_is_left_to_the_general_filter(inner):
    node = etree.fromstring(f'<filter><nat-session xmlns="{NAT_NS}">{inner}</nat-session>'
                            "</filter>")
    assert content_matches(node, NAT_NS, "nat-session") is None


def test_a_subscriber_filter_of_get_data_returns_only_its_sessions(m):
    table = entries(m.get_config(source="running").xml)
    address = table[0]["src_address"]
    request = (f'<get-data xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-nmda" '
               f'xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores">'
               f"<datastore>ds:operational</datastore><subtree-filter>"
               f'<nat-session xmlns="{NAT_NS}"><src_address>{address}</src_address>'
               f"</nat-session></subtree-filter></get-data>")
    reply = m.dispatch(etree.fromstring(request))
    found = entries(reply.xml)
    assert found and as_set(found) == as_set([e for e in table
                                              if e["src_address"] == address])


XPATH_TESTS = ["nfnat:dst_port=443", "nfnat:protocol='UDP' and nfnat:src_port > 2000",
               "contains(nfnat:translated_address, '.1')", "not(nfnat:tcp_state)",
               "number(nfnat:src_port) mod 7 = 3", "starts-with(nfnat:src_address, '10.0.0.1')",
               "position() = 3", "nfnat:src_port = ../nfnat:nat-session[1]/nfnat:src_port",
               "count(../nfnat:nat-session) > 10"]


def get_data(m: manager.Manager, xpath: str, depth: bool) -> list[dict[str, str]]:
    request = (f'<get-data xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-nmda" '
               f'xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores">'
               f"<datastore>ds:running</datastore>"
               f'<xpath-filter xmlns:nfnat="{NAT_NS}">{escape(xpath)}</xpath-filter>'
               + ("<max-depth>65535</max-depth>" if depth else "") + "</get-data>")
    return entries(m.dispatch(etree.fromstring(request)).xml)


def random_xpath(rnd: random.Random, table: list[dict[str, str]]) -> str:
    if rnd.random() < 0.5:
        prefixes = [f"{rnd.choice(table)['src_address']}/{rnd.choice([8, 16, 20, 24, 28, 30])}"
                    for _ in range(rnd.randint(1, 3))]
        return etree.fromstring(Selection.subscribers(*prefixes).filter_xml()).text or ""
    tests = rnd.sample(XPATH_TESTS, rnd.randint(1, 2))
    return "/nfnat:nat-session[" + f" {rnd.choice(['and', 'or'])} ".join(
        f"({t})" for t in tests) + "]"


def test_xpath_filters_on_entries_own_leaves_select_what_the_whole_table_selects(m):
    """Compared with the same filter asked with a max-depth, which filters the whole table
    as one tree."""
    rnd = random.Random(SEED)
    table = entries(m.get_config(source="running").xml)
    for i in range(40):
        xpath = random_xpath(rnd, table)
        assert as_set(get_data(m, xpath, False)) == as_set(get_data(m, xpath, True)), \
            f"xpath {i} (FILTER_SEED={SEED}): {xpath}"


@pytest.mark.parametrize(("select", "own"), [
    ("/n:nat-session[n:dst_port=443]", True),
    ("/n:nat-session[starts-with(n:src_address, '10.') and number(n:src_port) > 5]", True),
    ("/n:nat-session[position()=1]", False),
    ("/n:nat-session[n:src_port=../n:nat-session[1]/n:src_port]", False),
    ("//n:nat-session[n:dst_port=443]", False),
    ("/n:nat-session[n:dst_port=443]/n:src_port", False),
    ("/n:nat-session[dst_port=443]", False)])
def test_an_xpath_filter_is_run_a_run_of_entries_at_a_time_only_on_their_own_leaves(select,
                                                                                      own):
    assert selects_by_own_leaves(select, {"n": NAT_NS}, NAT_NS, "nat-session") is own
