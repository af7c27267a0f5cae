"""A firewall's server (`nfmig serve --nf firewall`, simulated backend) with ncclient: the
model it implements, its policy and pinholes edited and read over NETCONF, and its
connections as nat-session entries that translate nothing.

Each reply is checked by yanglint against exactly the modules the server lists."""

from __future__ import annotations

import time

import pytest
from lxml import etree
from ncclient.operations import RPCError
from nfmig.client.local import start_local_server

from .conformance import Library
from .conftest import NAT_NS, RunningServer
from .test_netconf_server import config, get_data, op_attr, session_xml

FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
YANGLIB = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
NS = {"f": FW_NS, "n": NAT_NS}
POLICY = (f'<firewall-policy xmlns="{FW_NS}"><subscriber><name>alice</name>'
          "<prefix>10.0.0.0/24</prefix><inbound-service><protocol>TCP</protocol>"
          "<port>22</port><remote-prefix>192.0.2.0/24</remote-prefix></inbound-service>"
          "</subscriber></firewall-policy>")


def pinhole(remote: str = "192.0.2.100", local: str = "10.0.0.2", port: int = 5000,
            timeout: int = 30, attrs: str = "", reason: str = "related") -> str:
    return (f'<pinhole xmlns="{FW_NS}" {attrs}><protocol>UDP</protocol><remote-address>'
            f"{remote}</remote-address><local-address>{local}</local-address><local-port>"
            f"{port}</local-port><reason>{reason}</reason><timeout>{timeout}</timeout>"
            "</pinhole>")


@pytest.fixture(scope="module")
def firewall(tmp_path_factory):
    started = start_local_server(tmp_path_factory.mktemp("fw"), "--nf", "firewall",
                                 "--sessions", "20")
    srv = RunningServer(**vars(started))
    yield srv
    srv.stop()


@pytest.fixture
def m(firewall):
    with firewall.connect() as session:
        yield session


def library(m) -> Library:
    reply = m.get(filter=("subtree", f'<yang-library xmlns="{YANGLIB}"/>'))
    return Library.from_xml(reply.data_xml)


def pinholes(m) -> list[etree._Element]:
    return get_data(m, "running", f'<subtree-filter><pinhole xmlns="{FW_NS}"/>'
                    "</subtree-filter>").findall("f:pinhole", NS)


def test_a_firewall_implements_its_module_and_a_nat_does_not(m, tmp_path):
    modules = {(e.findtext("{*}name")) for e in etree.fromstring(m.get(filter=(
        "subtree", f'<yang-library xmlns="{YANGLIB}"/>')).data_xml.encode()).iter(
            f"{{{YANGLIB}}}module")}
    assert {"nfmig-firewall", "nfmig-nat"} <= modules
    nat = start_local_server(tmp_path / "nat")
    try:
        with RunningServer(**vars(nat)).connect() as other:
            assert "nfmig-firewall" not in other.get(filter=(
                "subtree", f'<yang-library xmlns="{YANGLIB}"/>')).data_xml
    finally:
        nat.stop()


def test_the_policy_is_written_read_back_and_valid(m, tmp_path):
    m.edit_config(target="running", config=config(POLICY))
    data = get_data(m, "running", f'<subtree-filter><firewall-policy xmlns="{FW_NS}"/>'
                    "</subtree-filter>")
    assert data.findtext("f:firewall-policy/f:subscriber/f:name", namespaces=NS) == "alice"
    assert data.findtext("f:firewall-policy/f:subscriber/f:inbound-service/f:port",
                         namespaces=NS) == "22"
    library(m).check(get_data(m, "operational"), tmp_path)


def test_an_invalid_policy_is_refused_and_nothing_changes(m):
    m.edit_config(target="running", config=config(POLICY))
    before = get_data(m, "running").find("f:firewall-policy", NS)
    with pytest.raises(RPCError) as refused:  # a subscriber needs at least one prefix
        m.edit_config(target="running", config=config(
            f'<firewall-policy xmlns="{FW_NS}"><subscriber><name>bob</name></subscriber>'
            "</firewall-policy>"))
    assert refused.value.tag in ("too-few-elements", "invalid-value", "missing-element",
                                 "data-missing", "operation-failed")
    after = get_data(m, "running").find("f:firewall-policy", NS)
    assert etree.tostring(before) == etree.tostring(after)


def test_pinholes_are_opened_renewed_and_closed(m):
    m.edit_config(target="running", config=config(pinhole(port=5001, timeout=30)))
    (entry,) = [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5001"]
    assert 28 <= int(entry.findtext("f:timeout", namespaces=NS)) <= 30
    m.edit_config(target="running", config=config(pinhole(port=5001, timeout=300,
                                                          reason="return-path")))
    (entry,) = [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5001"]
    assert int(entry.findtext("f:timeout", namespaces=NS)) > 290
    assert entry.findtext("f:reason", namespaces=NS) == "return-path"
    m.edit_config(target="running", config=config(pinhole(port=5001,
                                                          attrs=op_attr("delete"))))
    assert not [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5001"]


def test_a_pinhole_expires_on_time(m):
    m.edit_config(target="running", config=config(pinhole(port=5002, timeout=1)))
    assert [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5002"]
    time.sleep(1.3)
    assert not [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5002"]


def test_a_translated_session_is_refused_with_the_rest_of_its_edit(m):
    with pytest.raises(RPCError) as refused:
        m.edit_config(target="running", config=config(
            pinhole(port=5003),
            session_xml("10.9.0.9", 4000, extra="<translated_address>192.0.2.1"
                        "</translated_address><translated_port>20000</translated_port>")))
    assert "translates nothing" in str(refused.value)
    assert not [p for p in pinholes(m) if p.findtext("f:local-port", namespaces=NS) == "5003"]


def test_connections_are_sessions_without_translation(m):
    m.edit_config(target="running", config=config(session_xml("10.9.0.8", 4100)))
    sessions = get_data(m, "running").findall("n:nat-session", NS)
    assert len(sessions) >= 21
    assert not any(s.find("n:translated_address", NS) is not None for s in sessions)


def test_pinholes_are_not_edited_in_the_candidate(m):
    with pytest.raises(RPCError) as refused:
        m.edit_config(target="candidate", config=config(pinhole(port=5004)))
    assert refused.value.tag == "operation-not-supported"
    m.discard_changes()


def test_the_state_counts_connections_and_pinholes(m):
    m.edit_config(target="running", config=config(pinhole(port=5005)))
    state = get_data(m, "operational").find("f:firewall-state", NS)
    assert int(state.findtext("f:connection-count", namespaces=NS)) >= 20
    assert int(state.findtext("f:pinhole-count", namespaces=NS)) >= 1
