"""The NETCONF server, specified through real clients against a real server process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
from lxml import etree
from ncclient.operations import RPCError
from ncclient.transport.errors import AuthenticationError
from nfmig.yang import EXAMPLES_DIR

from .conftest import NAT_NS
from .rawclient import RawClient

NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
NS = {"n": NAT_NS, "nc": "urn:ietf:params:xml:ns:netconf:base:1.0"}


def session_xml(src="10.9.0.1", sport=4000, dst="198.51.100.9", dport=80, extra="",
                proto="TCP", attrs="") -> str:
    return (f'<nat-session xmlns="{NAT_NS}" {attrs}><protocol>{proto}</protocol>'
            f"<src_address>{src}</src_address><src_port>{sport}</src_port>"
            f"<dst_address>{dst}</dst_address><dst_port>{dport}</dst_port>{extra}</nat-session>")


def op_attr(operation: str) -> str:
    return f'xmlns:nc="{NS["nc"]}" nc:operation="{operation}"'


def config(*entries: str) -> str:
    return ('<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0" '
            'xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0">' + "".join(entries)
            + "</config>")


def get_data(nc, datastore="operational", inner="") -> etree._Element:
    rpc = (f'<get-data xmlns="{NCDS}" xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores">'
           f"<datastore>ds:{datastore}</datastore>{inner}</get-data>")
    reply = etree.fromstring(nc.dispatch(etree.fromstring(rpc)).xml.encode())
    return reply.find(f"{{{NCDS}}}data")


def sessions_of(nc, src: str) -> list[etree._Element]:
    data = get_data(nc, "running", f'<xpath-filter xmlns:n="{NAT_NS}">'
                    f"/n:nat-session[n:src_address='{src}']</xpath-filter>")
    return data.findall("n:nat-session", NS)


def error_tag(exc: RPCError) -> str:
    return exc.tag


# -- reading and writing -------------------------------------------------------------------
def test_seed_example_imported_by_edit_config_appears_in_operational(nc):
    seed = (EXAMPLES_DIR / "seed-example.xml").read_text()
    nc.edit_config(target="running", config=config(seed))
    data = get_data(nc, "operational", f'<subtree-filter><nat-session xmlns="{NAT_NS}">'
                    "<src_address>10.0.0.1</src_address></nat-session></subtree-filter>")
    entry = data.find("n:nat-session", NS)
    assert entry is not None
    values = {etree.QName(c).localname: c.text for c in entry}
    assert values["protocol"] == "TCP"
    assert values["src_port"] == "2526"
    assert values["translated_address"] == "130.192.225.79"
    assert values["translated_port"] == "5678"
    assert values["reply_bytes"] == "9880"
    policy = get_data(nc, "running").find("n:nat-policy/n:external-address", NS)
    assert policy.text == "130.192.225.79"


def test_get_config_returns_sessions_and_policy(nc):
    reply = nc.get_config("running")
    assert reply.data_ele.find("n:nat-session", NS) is not None


def test_get_returns_state_data(nc):
    reply = nc.get(filter=("subtree", f'<nat-state xmlns="{NAT_NS}"/>'))
    assert reply.data_ele.find("n:nat-state/n:implementation", NS).text == "simulated"


def test_operational_includes_yang_library(nc):
    data = get_data(nc, "operational", '<subtree-filter><yang-library xmlns="urn:ietf:params:'
                    'xml:ns:yang:ietf-yang-library"/></subtree-filter>')
    names = {e.text for e in data.iter("{urn:ietf:params:xml:ns:yang:ietf-yang-library}name")}
    assert "nfmig-nat" in names


def test_get_schema_returns_the_model(nc):
    reply = nc.get_schema("nfmig-nat")
    assert "module nfmig-nat" in reply.data


def test_hello_announces_nmda_and_candidate(nc):
    caps = list(nc.server_capabilities)
    assert any(c.startswith("urn:ietf:params:netconf:capability:yang-library:1.1") for c in caps)
    assert "urn:ietf:params:netconf:capability:candidate:1.0" in caps


def test_merge_updates_one_leaf_of_an_existing_session(nc):
    nc.edit_config(target="running", config=config(session_xml(src="10.9.1.1", extra=(
        "<translated_address>192.0.2.5</translated_address><translated_port>7001"
        "</translated_port>"))))
    nc.edit_config(target="running", config=config(session_xml(
        src="10.9.1.1", extra="<orig_bytes>999</orig_bytes>")))
    entry = sessions_of(nc, "10.9.1.1")[0]
    assert entry.find("n:translated_port", NS).text == "7001"
    assert entry.find("n:orig_bytes", NS).text == "999"


def test_delete_operation_removes_a_session(nc):
    nc.edit_config(target="running", config=config(session_xml(src="10.9.2.1")))
    nc.edit_config(target="running", config=config(session_xml(
        src="10.9.2.1", attrs=op_attr("delete"))))
    assert sessions_of(nc, "10.9.2.1") == []


def test_remove_of_a_missing_session_changes_nothing_and_succeeds(nc):
    remove = session_xml(src="10.9.2.2", attrs=op_attr("remove"))
    nc.edit_config(target="running", config=config(session_xml(src="10.9.2.3"), remove))
    assert sessions_of(nc, "10.9.2.2") == []
    assert len(sessions_of(nc, "10.9.2.3")) == 1


def test_candidate_changes_reach_running_only_on_commit(nc):
    nc.edit_config(target="candidate", config=config(session_xml(src="10.9.3.1")))
    assert sessions_of(nc, "10.9.3.1") == []
    assert get_data(nc, "candidate").xpath("//n:nat-session[n:src_address='10.9.3.1']",
                                           namespaces=NS)
    nc.commit()
    assert len(sessions_of(nc, "10.9.3.1")) == 1


def test_discard_changes_drops_the_candidate(nc):
    nc.edit_config(target="candidate", config=config(session_xml(src="10.9.4.1")))
    nc.discard_changes()
    nc.commit()
    assert sessions_of(nc, "10.9.4.1") == []


def test_copy_config_running_to_startup_persists_a_file(nc, server):
    nc.copy_config(source="running", target="startup")
    assert "nat-session" in (server.state_dir / "startup.xml").read_text()
    startup = nc.get_config("startup").data_ele
    assert startup.find("n:nat-session", NS) is not None


def test_validate_running_succeeds(nc):
    nc.validate(source="running")


# -- bad input: the right rpc-error, nothing applied, server still up ----------------------
BAD_EDITS = {
    "unknown namespace": ('<x xmlns="urn:example:bogus"><y>1</y></x>', "unknown-namespace"),
    "unknown element": (session_xml(src="10.8.0.2", extra="<colour>red</colour>"),
                        "unknown-element"),
    "port 70000": (session_xml(src="10.8.0.2", extra="<translated_port>70000"
                                                     "</translated_port>"), "invalid-value"),
    "address 10.0.0.300": (session_xml(src="10.0.0.300"), "invalid-value"),
    "unknown protocol": (session_xml(src="10.8.0.2", proto="SCTP"), "invalid-value"),
    "missing key": (f'<nat-session xmlns="{NAT_NS}"><protocol>TCP</protocol><src_address>'
                    "10.8.0.2</src_address><src_port>1</src_port><dst_address>198.51.100.1"
                    "</dst_address></nat-session>", "missing-element"),
    "same key twice": (session_xml(src="10.8.0.2") + session_xml(src="10.8.0.2"),
                       "invalid-value"),
    "state data": (f'<nat-state xmlns="{NAT_NS}"><session-count>3</session-count></nat-state>',
                   "invalid-value"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_edit_gets_its_error_and_applies_nothing(nc, server, case):
    bad, tag = BAD_EDITS[case]
    good = session_xml(src="10.8.0.1")  # valid, and before the bad part: must not land
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=config(good, bad))
    assert err.value.tag == tag, err.value.message
    assert err.value.message
    assert sessions_of(nc, "10.8.0.1") == []
    assert server.alive()


def test_error_path_names_the_bad_leaf(nc):
    bad = session_xml(src="10.8.1.1", extra="<translated_port>70000</translated_port>")
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=config(bad))
    assert err.value.path.endswith("/translated_port")
    assert "10.8.1.1" in err.value.path


def test_create_of_existing_session_is_data_exists(nc):
    nc.edit_config(target="running", config=config(session_xml(src="10.8.2.1")))
    create = session_xml(src="10.8.2.1", attrs=op_attr("create"))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=config(session_xml(src="10.8.2.2"), create))
    assert err.value.tag == "data-exists"
    assert sessions_of(nc, "10.8.2.2") == []


def test_delete_of_missing_session_is_data_missing(nc):
    delete = session_xml(src="10.8.3.1", attrs=op_attr("delete"))
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=config(session_xml(src="10.8.3.2"), delete))
    assert err.value.tag == "data-missing"
    assert sessions_of(nc, "10.8.3.2") == []


def test_edit_on_datastore_locked_by_another_session_is_in_use(server, nc):
    other = server.connect()
    try:
        other.lock("running")
        with pytest.raises(RPCError) as err:
            nc.edit_config(target="running", config=config(session_xml(src="10.8.4.1")))
        assert err.value.tag == "in-use"
        with pytest.raises(RPCError) as denied:
            nc.lock("running")
        assert denied.value.tag == "lock-denied"
    finally:
        other.close_session()
    assert sessions_of(nc, "10.8.4.1") == []
    nc.edit_config(target="running", config=config(session_xml(src="10.8.4.1")))  # released


def server_threads(server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/task"))


def test_a_session_killed_while_idle_leaves_no_thread_behind(server, nc):
    nc.get_schema("nfmig-nat")  # answered: this session's threads all run
    before = server_threads(server)
    idle = server.connect()
    idle.get_schema("nfmig-nat")
    assert server_threads(server) > before
    nc.kill_session(idle.session_id)
    deadline = time.monotonic() + 10
    while server_threads(server) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_threads(server) == before


def test_a_session_can_be_killed_before_its_clients_hello_is_read(server, nc):
    """A client knows a session-id from the server's hello, before the server has read the
    client's: killing that session then works and closes it."""
    transport = paramiko.Transport(("127.0.0.1", server.port))
    try:
        transport.connect(username=server.user, password=server.password)
        channel = transport.open_session()
        channel.settimeout(30)
        channel.invoke_subsystem("netconf")
        hello = b""
        while b"]]>]]>" not in hello:
            chunk = channel.recv(65536)
            assert chunk, "the server closed the session before its hello"
            hello += chunk
        victim = int(re.search(rb"<session-id>(\d+)</session-id>", hello).group(1))
        nc.kill_session(str(victim))  # the victim never sent its hello
        deadline = time.monotonic() + 10
        while channel.recv(65536) and time.monotonic() < deadline:
            pass
        assert channel.closed or channel.eof_received
    finally:
        transport.close()


def test_unknown_rpc_is_operation_not_supported(nc):
    with pytest.raises(RPCError) as err:
        nc.dispatch(etree.fromstring('<frobnicate xmlns="urn:example:bogus"/>'))
    assert err.value.tag == "operation-not-supported"


def test_message_over_the_size_limit_is_too_big(server, nc):
    entries = [session_xml(src=f"10.7.{i // 250}.{i % 250 + 1}") for i in range(5000)]
    with pytest.raises(RPCError) as err:
        nc.edit_config(target="running", config=config(*entries))  # ~1.5 MB > 1 MiB limit
    assert err.value.tag == "too-big"
    assert sessions_of(nc, "10.7.0.1") == []
    assert nc.get_config("running").ok  # same session still usable


def test_wrong_password_is_refused_and_server_stays_up(server):
    with pytest.raises(AuthenticationError):
        server.connect(password="not-the-password")
    assert server.alive()
    server.connect().close_session()


def test_malformed_xml_gets_malformed_message_on_base11(server):
    raw = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply = raw.send_raw(b"<rpc message-id='9' xmlns='urn:ietf:params:xml:ns:netconf:"
                             b"base:1.0'><get-config><source><running/></source>")
        assert b"<error-tag>malformed-message</error-tag>" in reply
        assert b"<data" in raw.rpc("<get-config><source><running/></source></get-config>")
    finally:
        raw.close()


# -- client quirks -------------------------------------------------------------------------
def test_base10_only_client_gets_end_of_message_framing(server):
    raw = RawClient(server.port, server.user, server.password, base11=False)
    try:
        reply = raw.rpc("<get-config><source><running/></source></get-config>", "42")
        assert b'message-id="42"' in reply and b"<data" in reply
    finally:
        raw.close()


def test_hello_with_leading_newline_is_accepted(server):
    raw = RawClient(server.port, server.user, server.password, base11=True,
                    hello_prefix=b"\n")
    try:
        assert b"<data" in raw.rpc("<get-config><source><running/></source></get-config>")
    finally:
        raw.close()


def test_config_without_namespace_is_accepted(server, nc):
    raw = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply = raw.rpc("<edit-config><target><running/></target><config>"
                        + session_xml(src="10.6.0.1") + "</config></edit-config>")
        assert b"<ok/>" in reply
    finally:
        raw.close()
    assert len(sessions_of(nc, "10.6.0.1")) == 1


def test_netconf_console2_reads_config_and_schema(server):
    exe = Path(sys.executable).parent / "netconf-console2"
    base = [str(exe), "--host", "127.0.0.1", "--port", str(server.port), "-u", server.user,
            "-p", server.password]
    out = subprocess.run([*base, "--get-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "nat-session" in out.stdout
    schema = subprocess.run([*base, "--get-schema", "nfmig-nat"], capture_output=True,
                            text=True, timeout=60)
    assert schema.returncode == 0, schema.stderr
    assert "module nfmig-nat" in schema.stdout
