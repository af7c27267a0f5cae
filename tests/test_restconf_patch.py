"""YANG Patch (RFC 8072) through a real server: the bulk form the migrator sends and the
general one give the same result, every edit or none applies, and the migrator's RESTCONF
end writes one patch per edit-config."""

from __future__ import annotations

import json

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations.rpc import RPCError
from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.restconf import RestconfConnection, yang_patch
from nfmig.client.selection import entries_xml, parse_entries, removal_xml, replacement_xml

from .restconf_client import (
    JSON,
    XML,
    Restconf,
    start_with_restconf,
    yanglint_errors,
    yanglint_patch_status,
)

NAT = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
YP = "urn:ietf:params:xml:ns:yang:ietf-yang-patch"
PATCH_XML = "application/yang-patch+xml"
PATCH_JSON = "application/yang-patch+json"
SESSION = "/restconf/data/nfmig-nat:nat-session"
AS_XML = {"content_type": PATCH_XML, "accept": XML}  # an XML patch, its status in XML


@pytest.fixture(scope="module")
def rc(tmp_path_factory):
    server, port = start_with_restconf(tmp_path_factory.mktemp("patch"), "--sessions", "0")
    yield Restconf(server, port)
    server.stop()


def key(port: int, src: str = "10.6.0.1") -> str:
    return f"TCP,{src},{port},198.51.100.6,443"


def entry_xml(port: int, src: str = "10.6.0.1", prefix: str = "") -> str:
    """An entry whose translated port (30000 + port) no other entry of these tests uses."""
    translated = 30000 + port
    p = f"{prefix}:" if prefix else ""
    decl = f'xmlns:{prefix}="{NAT}"' if prefix else f'xmlns="{NAT}"'
    leaves = (("protocol", "TCP"), ("src_address", src), ("src_port", port),
              ("dst_address", "198.51.100.6"), ("dst_port", 443),
              ("translated_address", "192.0.2.6"), ("translated_port", translated))
    return (f"<{p}nat-session {decl}>" + "".join(f"<{p}{n}>{v}</{p}{n}>" for n, v in leaves)
            + f"</{p}nat-session>")


def patch_xml(*edits: tuple[str, str, str, str | None], patch_id: str = "p") -> str:
    body = "".join(f"<edit><edit-id>{i}</edit-id><operation>{op}</operation><target>{t}"
                   f"</target>{f'<value>{v}</value>' if v else ''}</edit>"
                   for i, op, t, v in edits)
    return f'<yang-patch xmlns="{YP}"><patch-id>{patch_id}</patch-id>{body}</yang-patch>'


def ports(rc: Restconf) -> set[int]:
    reply = rc.get(SESSION)
    if reply.status == 404:
        return set()
    return {s["src_port"] for s in reply.json().get("nfmig-nat:nat-session", [])
            if s["src_address"].startswith("10.6.")}


def status_of(reply) -> etree._Element:
    return etree.fromstring(reply.text.encode())


def test_xml_patch_of_many_entries_creates_them_all(rc):
    edits = [(str(p), "create", f"/nfmig-nat:nat-session={key(p)}", entry_xml(p))
             for p in range(1000, 1300)]
    reply = rc.request("PATCH", "/restconf/data", patch_xml(*edits), **AS_XML)
    assert reply.status == 200, reply.text
    assert status_of(reply).find(f"{{{YP}}}ok") is not None
    assert set(range(1000, 1300)) <= ports(rc)
    got = rc.get(f"{SESSION}={key(1005)}").json()["nfmig-nat:nat-session"][0]
    assert got["translated_port"] == 31005


def test_xml_patch_remove_edits_delete_entries(rc):
    rc.request("PATCH", "/restconf/data", patch_xml(
        ("a", "create", f"/nfmig-nat:nat-session={key(1400)}", entry_xml(1400)),
        ("b", "create", f"/nfmig-nat:nat-session={key(1401)}", entry_xml(1401))),
        **AS_XML)
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("a", "remove", f"/nfmig-nat:nat-session={key(1400)}", None),
        ("b", "delete", f"/nfmig-nat:nat-session={key(1401)}", None)),
        **AS_XML)
    assert reply.status == 200, reply.text
    assert not {1400, 1401} & ports(rc)


def test_prefixed_xml_values_take_the_general_path_with_the_same_result(rc):
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "create", f"/nfmig-nat:nat-session={key(1500)}",
         entry_xml(1500, prefix="n"))), **AS_XML)
    assert reply.status == 200, reply.text
    got = rc.get(f"{SESSION}={key(1500)}").json()["nfmig-nat:nat-session"][0]
    assert got["translated_port"] == 31500


def test_a_pretty_printed_patch_with_an_xml_declaration_applies(rc):
    text = patch_xml(("1", "create", f"/nfmig-nat:nat-session={key(1550)}",
                      entry_xml(1550))).replace("<edit>", "\n  <edit>\n    ")
    reply = rc.request("PATCH", "/restconf/data", '<?xml version="1.0"?>\n' + text + "\n",
                       **AS_XML)
    assert reply.status == 200, reply.text
    assert 1550 in ports(rc)


def test_a_patch_that_is_not_well_formed_is_400_malformed_message(rc):
    text = patch_xml(("1", "create", f"/nfmig-nat:nat-session={key(1560)}",
                      entry_xml(1560).replace("</translated_port>", "</translated>")))
    reply = rc.request("PATCH", "/restconf/data", text, **AS_XML)
    assert reply.status == 400, reply.text
    assert status_of(reply).findtext(f".//{{{YP}}}error-tag") == "malformed-message"
    assert 1560 not in ports(rc)


def test_a_key_differing_between_target_and_value_is_400_and_nothing_applies(rc, tmp_path):
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "create", f"/nfmig-nat:nat-session={key(1600)}", entry_xml(1600)),
        ("2", "create", f"/nfmig-nat:nat-session={key(1601)}", entry_xml(1602))),
        **AS_XML)
    assert reply.status == 400, reply.text
    error = status_of(reply).find(f".//{{{YP}}}error")
    assert error.findtext(f"{{{YP}}}error-tag") == "invalid-value"
    assert "src_port" in error.findtext(f"{{{YP}}}error-message")
    assert not {1600, 1601, 1602} & ports(rc)


def test_a_repeated_edit_id_is_400(rc):
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "create", f"/nfmig-nat:nat-session={key(1700)}", entry_xml(1700)),
        ("1", "create", f"/nfmig-nat:nat-session={key(1701)}", entry_xml(1701))),
        **AS_XML)
    assert reply.status == 400, reply.text
    assert not {1700, 1701} & ports(rc)


def test_a_delete_with_a_value_is_400(rc):
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "delete", f"/nfmig-nat:nat-session={key(1800)}", entry_xml(1800))),
        **AS_XML)
    assert reply.status == 400, reply.text


def test_create_of_an_existing_entry_is_409_data_exists(rc):
    edit = ("1", "create", f"/nfmig-nat:nat-session={key(1900)}", entry_xml(1900))
    rc.request("PATCH", "/restconf/data", patch_xml(edit), **AS_XML)
    reply = rc.request("PATCH", "/restconf/data", patch_xml(edit), **AS_XML)
    assert reply.status == 409, reply.text
    assert status_of(reply).findtext(f".//{{{YP}}}error-tag") == "data-exists"


def one_edit_json_patch(rc, patch_id: str, operation: str, target_port: int, entry: dict):
    """A JSON YANG Patch of one edit (id "1") whose target names the session of
    ``target_port`` and whose value is ``entry``."""
    return rc.request("PATCH", "/restconf/data", {"ietf-yang-patch:yang-patch": {
        "patch-id": patch_id, "edit": [{"edit-id": "1", "operation": operation,
                                        "target": f"/nfmig-nat:nat-session={key(target_port)}",
                                        "value": {"nfmig-nat:nat-session": [entry]}}]}},
        content_type=PATCH_JSON)


def test_json_patch_takes_numbers_for_the_keys_the_target_writes_as_text(rc):
    e = {"protocol": "TCP", "src_address": "10.6.0.1", "src_port": 2000,
         "dst_address": "198.51.100.6", "dst_port": 443, "translated_port": 42000}
    reply = one_edit_json_patch(rc, "j", "merge", 2000, e)
    assert reply.status == 200, reply.text
    assert 2000 in ports(rc)


def test_json_patch_with_a_differing_key_is_400_in_its_edits_status_yanglint_accepts(
        rc, tmp_path):
    e = {"protocol": "TCP", "src_address": "10.6.0.1", "src_port": 2101,
         "dst_address": "198.51.100.6", "dst_port": 443}
    reply = one_edit_json_patch(rc, "j2", "create", 2100, e)
    assert reply.status == 400, reply.text
    edit, = reply.json()["ietf-yang-patch:yang-patch-status"]["edit-status"]["edit"]
    assert edit["edit-id"] == "1"
    checked = yanglint_errors(json.dumps({"ietf-restconf:errors": edit["errors"]}), tmp_path)
    assert checked.returncode == 0, checked.stderr
    checked = yanglint_patch_status(reply.text, JSON, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert not {2100, 2101} & ports(rc)


def test_a_nested_target_edits_one_leaf_of_the_policy(rc):
    rc.request("PUT", "/restconf/data/nfmig-nat:nat-policy",
               {"nfmig-nat:nat-policy": {"external-address": ["192.0.2.6"]}})
    reply = rc.request("PATCH", "/restconf/data", {"ietf-yang-patch:yang-patch": {
        "patch-id": "n", "edit": [{"edit-id": "1", "operation": "merge",
                                   "target": "/nfmig-nat:nat-policy/port-min",
                                   "value": {"nfmig-nat:port-min": 2000}}]}},
        content_type=PATCH_JSON)
    assert reply.status == 200, reply.text
    policy = rc.get("/restconf/data/nfmig-nat:nat-policy").json()["nfmig-nat:nat-policy"]
    assert policy["port-min"] == 2000 and policy["external-address"] == ["192.0.2.6"]


# -- yang-patch-status of a failed patch (RFC 8072 §2.3) -------------------------------------
def edit_errors(reply) -> dict[str, list[etree._Element]]:
    """edit-id -> the error elements of that edit, from an XML yang-patch-status."""
    return {e.findtext(f"{{{YP}}}edit-id"): e.findall(f"{{{YP}}}errors/{{{YP}}}error")
            for e in status_of(reply).iterfind(f"{{{YP}}}edit-status/{{{YP}}}edit")}


def test_an_edit_the_datastore_refuses_is_named_in_edit_status_with_its_error(rc, tmp_path):
    rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "create", f"/nfmig-nat:nat-session={key(4000)}", entry_xml(4000))), **AS_XML)
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("new", "create", f"/nfmig-nat:nat-session={key(4001)}", entry_xml(4001)),
        ("again", "create", f"/nfmig-nat:nat-session={key(4000)}", entry_xml(4000)),
        patch_id="add-4001"), **AS_XML)
    assert reply.status == 409, reply.text
    root = status_of(reply)
    assert root.findtext(f"{{{YP}}}patch-id") == "add-4001"
    assert root.find(f"{{{YP}}}errors") is None and root.find(f"{{{YP}}}ok") is None
    error, = edit_errors(reply)["again"]
    assert {etree.QName(c).localname: (c.text or "").strip() for c in error} == {
        "error-type": "application", "error-tag": "data-exists",
        "error-path": "/n:nat-session[n:protocol='TCP'][n:src_address='10.6.0.1']"
                      "[n:src_port='4000'][n:dst_address='198.51.100.6'][n:dst_port='443']"
                      .replace("n:", "nfmig-nat:"),  # XML: every name qualified
        "error-message": "nat-session TCP 10.6.0.1:4000 -> 198.51.100.6:443 already exists"}
    checked = yanglint_patch_status(reply.text, XML, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert 4001 not in ports(rc)


def test_an_invalid_leaf_in_an_edits_value_is_400_in_that_edits_status_as_json(rc, tmp_path):
    bad = entry_xml(4101).replace("<translated_port>34101", "<translated_port>99999")
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("ok-one", "merge", f"/nfmig-nat:nat-session={key(4100)}", entry_xml(4100)),
        ("bad-one", "merge", f"/nfmig-nat:nat-session={key(4101)}", bad),
        patch_id="j-4101"), content_type=PATCH_XML, accept=JSON)
    assert reply.status == 400, reply.text
    assert reply.headers["Content-Type"].startswith(JSON)
    status = reply.json()["ietf-yang-patch:yang-patch-status"]
    assert status["patch-id"] == "j-4101" and set(status) == {"patch-id", "edit-status"}
    edit, = status["edit-status"]["edit"]
    assert edit["edit-id"] == "bad-one"
    error, = edit["errors"]["error"]
    assert error["error-tag"] == "invalid-value" and error["error-type"] == "application"
    assert error["error-path"].endswith("[src_port='4101'][dst_address='198.51.100.6']"
                                        "[dst_port='443']/translated_port")
    assert "99999" in error["error-message"]
    checked = yanglint_patch_status(reply.text, JSON, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert not {4100, 4101} & ports(rc)


def test_deleting_a_missing_entry_is_409_data_missing_in_that_edits_status(rc, tmp_path):
    reply = rc.request("PATCH", "/restconf/data", {"ietf-yang-patch:yang-patch": {
        "patch-id": "gone", "edit": [
            {"edit-id": "d1", "operation": "delete",
             "target": f"/nfmig-nat:nat-session={key(4200)}"}]}}, content_type=PATCH_JSON)
    assert reply.status == 409, reply.text
    edit, = reply.json()["ietf-yang-patch:yang-patch-status"]["edit-status"]["edit"]
    assert edit["edit-id"] == "d1"
    assert edit["errors"]["error"][0]["error-tag"] == "data-missing"
    checked = yanglint_patch_status(reply.text, JSON, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_a_patch_that_cannot_be_read_is_a_global_error_with_its_patch_id(rc, tmp_path):
    text = patch_xml(("1", "create", f"/nfmig-nat:nat-session={key(4300)}",
                      entry_xml(4300).replace("</protocol>", "</proto>")), patch_id="broken")
    reply = rc.request("PATCH", "/restconf/data", text, **AS_XML)
    assert reply.status == 400, reply.text
    root = status_of(reply)
    assert root.findtext(f"{{{YP}}}patch-id") == "broken"
    assert root.find(f"{{{YP}}}edit-status") is None
    assert root.findtext(f"{{{YP}}}errors/{{{YP}}}error/{{{YP}}}error-tag") == \
        "malformed-message"
    checked = yanglint_patch_status(reply.text, XML, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_a_patch_without_edits_is_a_global_400(rc, tmp_path):
    reply = rc.request("PATCH", "/restconf/data", {"ietf-yang-patch:yang-patch": {
        "patch-id": "empty", "edit": []}}, content_type=PATCH_JSON)
    assert reply.status == 400, reply.text
    status = reply.json()["ietf-yang-patch:yang-patch-status"]
    assert status["patch-id"] == "empty" and "edit-status" not in status
    assert status["errors"]["error"][0]["error-tag"] == "missing-element"
    checked = yanglint_patch_status(reply.text, JSON, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_a_netconf_lock_refuses_the_whole_patch_with_409(rc, tmp_path):
    with manager.connect(host="127.0.0.1", port=rc.server.port, username=rc.server.user,
                         password=rc.server.password, hostkey_verify=False,
                         allow_agent=False, look_for_keys=False, timeout=60) as nc:
        nc.lock("running")
        reply = rc.request("PATCH", "/restconf/data", patch_xml(
            ("1", "create", f"/nfmig-nat:nat-session={key(4400)}", entry_xml(4400)),
            patch_id="locked"), **AS_XML)
        nc.unlock("running")
    assert reply.status == 409, reply.text
    root = status_of(reply)
    assert root.findtext(f"{{{YP}}}errors/{{{YP}}}error/{{{YP}}}error-tag") in (
        "in-use", "lock-denied")
    assert root.find(f"{{{YP}}}edit-status") is None
    checked = yanglint_patch_status(reply.text, XML, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert 4400 not in ports(rc)


def test_a_patch_that_applies_answers_ok_in_the_encoding_accept_asks_for(rc, tmp_path):
    reply = rc.request("PATCH", "/restconf/data", patch_xml(
        ("1", "create", f"/nfmig-nat:nat-session={key(4500)}", entry_xml(4500)),
        patch_id="fine"), content_type=PATCH_XML, accept=JSON)
    assert reply.status == 200, reply.text
    assert reply.json() == {"ietf-yang-patch:yang-patch-status": {"patch-id": "fine",
                                                                  "ok": [None]}}
    checked = yanglint_patch_status(reply.text, JSON, tmp_path)
    assert checked.returncode == 0, checked.stderr


# -- the migrator's end ----------------------------------------------------------------------
def test_the_migrators_patch_has_one_edit_per_entry_with_its_operation():
    entries = parse_entries(entry_xml(1) + entry_xml(2) + entry_xml(3))
    body = entries_xml(entries[:1]) + replacement_xml(entries[1:2]) + removal_xml(entries[2:])
    root = etree.fromstring(yang_patch(body, "m1").encode())
    edits = root.findall(f"{{{YP}}}edit")
    assert [e.findtext(f"{{{YP}}}operation") for e in edits] == ["merge", "replace", "remove"]
    assert [e.findtext(f"{{{YP}}}target") for e in edits] == [
        f"/nfmig-nat:nat-session={key(p)}" for p in (1, 2, 3)]
    assert edits[2].find(f"{{{YP}}}value") is None
    assert edits[1].find(f"{{{YP}}}value/{{{NAT}}}nat-session") is not None


def test_the_migrators_patch_percent_encodes_ipv6_keys():
    entries = parse_entries(entry_xml(1, src="2001:db8::1"))
    root = etree.fromstring(yang_patch(entries_xml(entries), "m2").encode())
    assert root.findtext(f"{{{YP}}}edit/{{{YP}}}target") == (
        "/nfmig-nat:nat-session=TCP,2001%3Adb8%3A%3A1,1,198.51.100.6,443")


@pytest.fixture
def conn(rc):
    endpoint = Endpoint("127.0.0.1", rc.port, rc.server.user, rc.server.password, "restconf")
    connection = RestconfConnection(endpoint, Credentials(ca_file=rc.cert))
    yield connection
    connection.close()


def test_the_migrators_edit_config_writes_and_removes_through_one_patch(rc, conn):
    entries = parse_entries(entry_xml(3000) + entry_xml(3001))
    conn.edit_config(entries_xml(entries), "running")
    assert {3000, 3001} <= ports(rc)
    conn.edit_config(removal_xml(entries), "running")
    assert not {3000, 3001} & ports(rc)


def test_the_migrators_edit_config_is_atomic_and_fails_as_an_rpc_error(rc, conn):
    good = entry_xml(3100)
    bad = entry_xml(3101).replace("<translated_port>33101", "<translated_port>99999")
    with pytest.raises(RPCError) as failure:
        conn.edit_config(good + bad, "running")
    assert failure.value.tag == "invalid-value"
    assert not {3100, 3101} & ports(rc)


def test_the_migrators_error_names_the_edit_and_its_target(rc, conn):
    conn.edit_config(entries_xml(parse_entries(entry_xml(3200))), "running")
    entries = parse_entries(entry_xml(3201) + entry_xml(3200))
    body = entries_xml(entries[:1]) + entries_xml(entries[1:]).replace(
        "<nat-session ", '<nat-session xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0" '
        'nc:operation="create" ', 1)
    with pytest.raises(RPCError) as failure:
        conn.edit_config(body, "running")
    assert failure.value.tag == "data-exists"
    assert failure.value.message.startswith(
        f"edit 2 (create /nfmig-nat:nat-session={key(3200)}): nat-session TCP 10.6.0.1:3200")
    assert 3201 not in ports(rc)
