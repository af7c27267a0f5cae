"""RFC 8512 ietf-nat served beside nfmig-nat over the same sessions (server/ietf_nat.py):
real servers of the simulated NAT, real clients (ncclient, netconf-console2, aiohttp, the
`nfmig migrate` command), replies checked by yanglint against the server's own library."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from nfmig.nf_backends.base import SESSION_FIELDS, Session
from nfmig.server.ietf_nat import AUGMENT_NS, NAT_NS, session_from_wire

from .conformance import GETCONFIG, Library
from .conftest import RunningServer
from .restconf_client import Restconf, start_with_restconf
from .test_migrate import PASSWORD, start_nats

NFNAT = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NS = {"n": NAT_NS, "a": AUGMENT_NS, "s": NFNAT}
TABLE = (f'<nat xmlns="{NAT_NS}"><instances><instance><id>1</id><mapping-table/>'
         "</instance></instances></nat>")


def entry(index: int, src: str = "10.9.0.1", sport: int = 4000, *, proto: int = 6,
          dst: str = "198.51.100.7", dport: int = 443, ext: str = "192.0.2.1",
          eport: int | None = 40000, extra: str = "", operation: str | None = None) -> str:
    op = f' xmlns:nc="{NC}" nc:operation="{operation}"' if operation else ""
    ext_port = (f"<external-src-port><start-port-number>{eport}</start-port-number>"
                "</external-src-port>") if eport is not None else ""
    return (f"<mapping-entry{op}><index>{index}</index><transport-protocol>{proto}"
            f"</transport-protocol><internal-src-address>{src}/32</internal-src-address>"
            f"<internal-src-port><start-port-number>{sport}</start-port-number>"
            f"</internal-src-port><external-src-address>{ext}/32</external-src-address>"
            f"{ext_port}<internal-dst-address>{dst}/32</internal-dst-address>"
            f"<internal-dst-port><start-port-number>{dport}</start-port-number>"
            f"</internal-dst-port>{extra}</mapping-entry>")


def config(*entries: str) -> str:
    return (f'<config xmlns="{NC}"><nat xmlns="{NAT_NS}"><instances><instance><id>1</id>'
            f"<mapping-table>{''.join(entries)}</mapping-table></instance></instances></nat>"
            "</config>")


def mapping(reply_data: etree._Element) -> dict[int, etree._Element]:
    return {int(e.findtext("n:index", namespaces=NS)): e
            for e in reply_data.iterfind(".//n:mapping-entry", NS)}


def as_session(e: etree._Element) -> Session:
    values = {}
    for child in e:
        start = child.find("n:start-port-number", NS)
        values[etree.QName(child).localname] = (start if start is not None else child).text
    return session_from_wire(values)


def nat_sessions(data: etree._Element) -> dict[tuple, Session]:
    out = {}
    for e in data.iterfind(".//s:nat-session", NS):
        values = {f: e.findtext(f"s:{f}", namespaces=NS) for f in SESSION_FIELDS}
        s = Session(**{f: (int(v) if v.isdigit() and f not in ("src_address", "dst_address")
                           else v) for f, v in values.items() if v is not None})
        out[s.key] = s
    return out


@pytest.fixture(scope="module")
def rc_server(tmp_path_factory):
    server, port = start_with_restconf(tmp_path_factory.mktemp("ietf"), "--sessions", "20")
    srv = RunningServer(**vars(server))
    yield srv, Restconf(server, port)
    srv.stop()


@pytest.fixture
def m(rc_server):
    nc = rc_server[0].connect()
    yield nc
    nc.close_session()


def test_sessions_are_mapping_entries(m, tmp_path):
    library = Library.from_xml(m.get(filter=("subtree", '<yang-library xmlns="urn:ietf:'
                                                    'params:xml:ns:yang:ietf-yang-library"/>'))
                               .data_xml)
    assert {"ietf-nat", "ietf-interfaces", "nfmig-nat-ietf"} <= library.names()
    assert next(x for x in library.modules if x.name == "ietf-nat").features == \
        ["napt44", "dst-nat"]
    reply = m.get_config("running")
    library.check(reply.data_xml, tmp_path, GETCONFIG)  # both views, yanglint-valid
    data = reply.data_ele
    sessions = nat_sessions(data)
    entries = mapping(data)
    assert len(entries) == len(sessions) == 20
    for e in entries.values():
        assert e.findtext("n:type", namespaces=NS) == "dynamic-implicit"
        assert e.findtext("n:transport-protocol", namespaces=NS) in ("1", "6", "17", "58")
        assert e.findtext("n:internal-src-address", namespaces=NS).endswith(("/32", "/128"))
        s = as_session(e)
        assert sessions[s.key] == s  # every field, the augment's included
    # get-data of operational, yanglint-valid as a get reply
    library.check(m.get(filter=("subtree", TABLE)).data_xml, tmp_path)


def test_write_entries_and_read_them_as_sessions(m):
    m.edit_config(target="running", config=config(
        entry(900, "10.9.0.1", extra=f'<lifetime>77</lifetime><tcp-state xmlns="{AUGMENT_NS}">'
              "established</tcp-state>"),
        entry(901, "10.9.0.2", proto=17, eport=40001)))
    found = nat_sessions(m.get_config("running", filter=(
        "subtree", f'<nat-session xmlns="{NFNAT}"><dst_address>198.51.100.7</dst_address>'
        "</nat-session>")).data_ele)
    tcp = found[("TCP", "10.9.0.1", 4000, "198.51.100.7", 443)]
    assert (tcp.translated_address, tcp.translated_port, tcp.tcp_state) == \
        ("192.0.2.1", 40000, "established")
    assert 0 < tcp.timeout <= 77
    assert ("UDP", "10.9.0.2", 4000, "198.51.100.7", 443) in found
    # a subtree filter on a mapping-entry field; the written entries are dynamic-explicit
    picked = mapping(m.get_config("running", filter=("subtree", (
        f'<nat xmlns="{NAT_NS}"><instances><instance><id>1</id><mapping-table><mapping-entry>'
        "<transport-protocol>17</transport-protocol></mapping-entry></mapping-table>"
        "</instance></instances></nat>"))).data_ele)
    assert picked[901].findtext("n:type", namespaces=NS) == "dynamic-explicit"
    assert all(e.findtext("n:transport-protocol", namespaces=NS) == "17"
               for e in picked.values())
    # merge by index alone, then delete by index
    m.edit_config(target="running", config=config(
        "<mapping-entry><index>900</index><lifetime>55</lifetime></mapping-entry>"))
    tcp = nat_sessions(m.get_config("running").data_ele)[tcp.key]
    assert tcp.timeout <= 55 and tcp.translated_port == 40000
    m.edit_config(target="running", config=config(
        f'<mapping-entry xmlns:nc="{NC}" nc:operation="delete"><index>900</index>'
        "</mapping-entry>"))
    assert tcp.key not in nat_sessions(m.get_config("running").data_ele)
    with pytest.raises(RPCError) as err:  # gone: a second delete is data-missing
        m.edit_config(target="running", config=config(
            f'<mapping-entry xmlns:nc="{NC}" nc:operation="delete"><index>900</index>'
            "</mapping-entry>"))
    assert err.value.tag == "data-missing"


@pytest.mark.parametrize("bad, tag, words", [
    (entry(951, "10.9.1.0").replace("10.9.1.0/32", "10.9.1.0/24"), "invalid-value",
     "mapping of a prefix is not a session"),
    (entry(952, "10.9.1.2").replace("</start-port-number></internal-src-port>",
                                    "</start-port-number><end-port-number>4010"
                                    "</end-port-number></internal-src-port>"),
     "invalid-value", "range of ports"),
    (entry(953, "10.9.1.3", proto=132), "invalid-value", "transport-protocol 132"),
    (entry(954, "10.9.1.4").replace("<transport-protocol>6</transport-protocol>", ""),
     "missing-element", "transport-protocol is missing"),
    (entry(955, "10.9.1.5", proto=300), "invalid-value", "300"),
])
def test_bad_entry_writes_nothing(m, bad, tag, words):
    good = entry(950, "10.9.1.1")
    for target in ("running", "candidate"):
        with pytest.raises(RPCError) as err:
            m.edit_config(target=target, config=config(good, bad))
        assert err.value.tag == tag and words in err.value.message, err.value.message
    data = m.get_config("candidate").data_ele
    assert not any(k[1] == "10.9.1.1" for k in nat_sessions(data))
    assert 950 not in mapping(data)


def test_candidate_and_round_trip(m, tmp_path):
    """nfmig-nat -> ietf-nat -> nfmig-nat: the table read as mapping-entries, deleted, and
    written back as mapping-entries through the candidate is the table it was."""
    before = nat_sessions(m.get_config("running").data_ele)
    entries = mapping(m.get_config("running", filter=("subtree", TABLE)).data_ele)
    keep = {i: e for i, e in entries.items() if as_session(e).key[1].startswith("10.0.")}
    texts = []
    for e in keep.values():
        e.remove(e.find("n:type", NS))
        texts.append(etree.tostring(e, encoding="unicode"))
    m.edit_config(target="candidate", config=config(*(
        f'<mapping-entry xmlns:nc="{NC}" nc:operation="remove"><index>{i}</index>'
        "</mapping-entry>" for i in keep)))
    assert not mapping(m.get_config("candidate", filter=("subtree", TABLE)).data_ele).keys() \
        & keep.keys()
    m.discard_changes()
    m.edit_config(target="running", config=config(*(
        f'<mapping-entry xmlns:nc="{NC}" nc:operation="delete"><index>{i}</index>'
        "</mapping-entry>" for i in keep)))
    m.edit_config(target="candidate", config=config(*texts))
    m.commit()
    after = nat_sessions(m.get_config("running").data_ele)
    for key in (as_session(e).key for e in keep.values()):
        b, a = before[key], after[key]
        assert a._replace(timeout=None) == b._replace(timeout=None)
        assert abs(a.timeout - b.timeout) <= 5
    assert mapping(m.get_config("running", filter=("subtree", TABLE)).data_ele).keys() >= \
        keep.keys()  # each written entry keeps the index it was given


def test_restconf(rc_server, tmp_path):
    _, rc = rc_server
    base = "/restconf/data/ietf-nat:nat/instances/instance=1/mapping-table"
    body = {"ietf-nat:mapping-entry": [{
        "index": 960, "transport-protocol": 17, "internal-src-address": "10.9.2.1/32",
        "internal-src-port": {"start-port-number": 5000},
        "external-src-address": "192.0.2.1/32",
        "external-src-port": {"start-port-number": 45000},
        "internal-dst-address": "203.0.113.5/32",
        "internal-dst-port": {"start-port-number": 53},
        "nfmig-nat-ietf:orig-packets": "12"}]}
    assert rc.request("PUT", f"{base}/mapping-entry=960", body).status in (201, 204)
    got = rc.get(f"{base}/mapping-entry=960")
    assert got.status == 200, got.text
    one = got.json()["ietf-nat:mapping-entry"][0]
    assert one["type"] == "dynamic-explicit" and one["nfmig-nat-ietf:orig-packets"] == "12"
    fields = rc.get(f"{base}/mapping-entry=960?fields=lifetime").json()
    assert set(fields["ietf-nat:mapping-entry"][0]) == {"index", "lifetime"}
    whole = rc.get("/restconf/data/ietf-nat:nat")
    assert whole.status == 200
    Library.from_json(rc.get("/restconf/data/ietf-yang-library:yang-library").json()) \
        .check(whole.json(), tmp_path)  # config and state (statistics)
    session = rc.get("/restconf/data/nfmig-nat:nat-session=UDP,10.9.2.1,5000,203.0.113.5,53")
    assert session.json()["nfmig-nat:nat-session"][0]["translated_port"] == 45000
    bad = dict(body["ietf-nat:mapping-entry"][0], **{"index": 961,
                                                    "internal-src-address": "10.9.2.0/24"})
    refused = rc.request("POST", base, {"ietf-nat:mapping-entry": [bad]})
    assert refused.status == 400 and refused.error_tag == "invalid-value", refused.text
    assert rc.request("DELETE", f"{base}/mapping-entry=960").status == 204
    assert rc.get(f"{base}/mapping-entry=960").status == 404
    assert rc.get("/restconf/data/nfmig-nat:nat-session=UDP,10.9.2.1,5000,203.0.113.5,"
                  "53").status == 404


@pytest.mark.skipif(shutil.which("netconf-console2") is None and not
                    (Path(sys.prefix) / "bin" / "netconf-console2").exists(),
                    reason="netconf-console2 is not installed")
def test_netconf_console(rc_server):
    srv, _ = rc_server
    tool = shutil.which("netconf-console2") or str(Path(sys.prefix) / "bin" /
                                                  "netconf-console2")
    done = subprocess.run([tool, "--host", "127.0.0.1", "--port", str(srv.port), "-u",
                           srv.user, "-p", srv.password, "--get-config", "--ns",
                           f"n={NAT_NS}", "-x", "/n:nat/n:instances/n:instance/"
                           "n:mapping-table/n:mapping-entry[n:index=1]"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "index>1</" in done.stdout and "internal-src-address>" in done.stdout


def test_migrate_through_ietf_nat(tmp_path):
    a, b = start_nats(tmp_path, 30, 0)
    try:
        before = a.sessions()
        source = _full(a)
        (tmp_path / "password").write_text(PASSWORD)
        done = subprocess.run(
            [sys.executable, "-m", "nfmig", "migrate", a.url, b.url, "--model", "ietf-nat",
             "--password-file", str(tmp_path / "password"), "--insecure-no-host-key-check",
             "--switchover", "none", "--json"],
            capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert done.returncode == 0, done.stdout + done.stderr
        assert b.sessions() == before and not a.sessions()
        moved = _full(b)  # every field of every session, as the source had it
        assert moved.keys() == source.keys() and len(moved) == 30
        for key, s in source.items():
            assert moved[key]._replace(timeout=None) == s._replace(timeout=None)
            assert abs(moved[key].timeout - s.timeout) <= 30
    finally:
        a.stop()
        b.stop()


def _full(nat) -> dict[tuple, Session]:
    text = nat.conn.get_data("running", f'<subtree-filter><nat-session xmlns="{NFNAT}"/>'
                                        "</subtree-filter>")
    return nat_sessions(etree.fromstring(f"<d>{text}</d>".encode()))
