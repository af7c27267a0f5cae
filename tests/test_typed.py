"""Typed nat-session objects (pyangbind bindings of the model) against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import libyang
import pytest
from lxml import etree
from nfmig.client.netconf import NatClient
from nfmig.client.typed import (
    BINDINGS_FILE,
    NatSession,
    TypedValueError,
    fetch_sessions,
    from_xml,
    leaf_names,
    push_sessions,
    session_from_xml,
    stale_bindings,
    to_json,
    to_xml,
)
from nfmig.yang import NAT_MODULE, NAT_NS, YANG_DIR

from .test_netconf_server import get_data

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def client(server):
    c = NatClient("127.0.0.1", server.port, server.user, server.password,
                  hostkey_verify=False, timeout=60)
    yield c
    c.close()


def typed_session(src: str = "10.7.0.1", dst: str = "198.51.100.9", **leaves) -> NatSession:
    return NatSession(protocol="TCP", src_address=src, src_port=40000, dst_address=dst,
                      dst_port=443, **leaves)


def test_a_typed_session_round_trips_through_a_server(client):
    sent = typed_session("10.7.0.1", translated_address="192.0.2.11", translated_port=61011,
                         tcp_state="established", src_window_scale=7, orig_bytes=1 << 40)
    push_sessions(client, sent)
    (back,) = fetch_sessions(client, "running", src_address="10.7.0.1")
    # The NF fills in what was left out (the timeout, counters it keeps): the rest is as sent.
    assert {k: v for k, v in back.as_dict().items() if k in sent.as_dict()} == sent.as_dict()
    assert back.timeout > 0
    assert back.orig_bytes == 1 << 40 and back.tcp_state == "established"
    assert back.key == ("TCP", "10.7.0.1", 40000, "198.51.100.9", 443)


def test_a_value_the_model_refuses_is_rejected_before_anything_is_sent(client):
    with pytest.raises(TypedValueError, match=r"src_window_scale: 15 is not a valid uint8 "
                                              r"\(0\.\.14\)") as refused:
        typed_session("10.7.1.1", src_window_scale=15)
    assert refused.value.leaf == "src_window_scale"
    session = typed_session("10.7.1.1", tcp_state="established")
    with pytest.raises(TypedValueError, match="tcp_state: 'open' is not one of none, "):
        session.tcp_state = "open"
    assert session.tcp_state == "established"  # the refused value changed nothing
    with pytest.raises(TypedValueError, match="fetch_sessions|src_port"):
        fetch_sessions(client, "running", src_port=70000)
    assert fetch_sessions(client, "running", src_address="10.7.1.1") == []


@pytest.mark.parametrize("leaves, message", [
    ({"protocol": "SCTP"}, "protocol: 'SCTP' is not one of ICMP, TCP, UDP, ICMPv6"),
    ({"src_address": "10.7.0.256"}, "src_address: '10.7.0.256' is not a valid "
                                    "inet:ip-address-no-zone"),
    ({"translated_port": 65536}, r"translated_port: 65536 is not a valid port-type "
                                 r"\(0\.\.65535\)"),
    ({"orig_bytes": -1}, "orig_bytes: -1 is not a valid counter-type"),
    ({"timeout": 1.5}, "timeout: 1.5 is not an integer"),
    ({"timeout": True}, "timeout: True is not an integer"),
    ({"colour": "red"}, "nat-session has no leaf 'colour'"),
])
def test_each_bad_value_names_its_leaf_and_what_the_model_allows(leaves, message):
    values = {"protocol": "TCP", "src_address": "10.7.0.1", "src_port": 1,
              "dst_address": "192.0.2.9", "dst_port": 2, **leaves}
    with pytest.raises(TypedValueError, match=message):
        NatSession(**values)


def test_the_typed_attributes_are_the_leaves_of_the_model():
    assert tuple(NatSession.__annotations__) == leaf_names()
    assert typed_session().translated_address is None  # not set


def test_the_key_of_a_typed_session_is_fixed():
    session = typed_session()
    with pytest.raises(TypedValueError, match="src_port is a key"):
        session.src_port = 1


def test_a_session_is_parsed_from_a_get_data_reply(nc, client):
    push_sessions(client, typed_session("10.7.2.1", translated_address="192.0.2.2",
                                        translated_port=61002))
    reply = get_data(nc, "running", f'<subtree-filter><nat-session xmlns="{NAT_NS}">'
                     "<src_address>10.7.2.1</src_address></nat-session></subtree-filter>")
    session = session_from_xml(etree.tostring(reply))
    assert session.translated_port == 61002 and session.src_address == "10.7.2.1"
    with pytest.raises(TypedValueError, match="expected one nat-session, found 0"):
        session_from_xml(f'<data xmlns="{NAT_NS}"/>')


def test_fetch_refuses_more_sessions_than_typed_objects_are_for(client):
    push_sessions(client, *(typed_session(f"10.7.3.{i}", "198.51.100.73")
                            for i in range(1, 5)))
    with pytest.raises(TypedValueError, match="4 sessions match, more than the 3"):
        fetch_sessions(client, "running", limit=3, dst_address="198.51.100.73")
    assert len(fetch_sessions(client, "running", limit=4, dst_address="198.51.100.73")) == 4


def test_typed_xml_is_what_edit_config_takes_and_json_is_rfc_7951():
    sessions = [typed_session("10.7.4.1", orig_bytes=5), typed_session("2001:db8::7")]
    assert from_xml(to_xml(*sessions)) == sessions
    ctx = libyang.Context(str(YANG_DIR))
    try:
        ctx.load_module(NAT_MODULE)
        # strict: libyang refuses what RFC 7951 does not allow (e.g. a uint64 as a number).
        tree = ctx.parse_data_mem(to_json(*sessions), "json", strict=True, no_state=True)
        try:
            printed = tree.print_mem("xml", with_siblings=True)
        finally:
            tree.free()
    finally:
        ctx.destroy()
    assert from_xml(printed) == sessions


def test_the_generated_bindings_are_fresh():
    assert stale_bindings() is None, "run make bindings"


def test_stale_bindings_fail_the_check_with_what_to_run(tmp_path):
    edited = tmp_path / "nat_bindings.py"
    edited.write_text(BINDINGS_FILE.read_text().replace("is_config=True", "is_config=False",
                                                        1))
    done = subprocess.run([sys.executable, "-m", "nfmig.client.typed", "check", str(edited)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("client/nat_bindings.py is stale: run make bindings")


def test_the_readme_example_works_as_written(server):
    text = README.read_text()
    section = text[text.index("### Typed objects for scripts"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    connect = 'NatClient("127.0.0.1", 8830, "admin", "...", hostkey_verify=False)'
    assert connect in code
    code = code.replace(connect, f"NatClient('127.0.0.1', {server.port}, {server.user!r}, "
                                 f"{server.password!r}, hostkey_verify=False)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    scope["client"].close()
