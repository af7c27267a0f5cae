"""The RESTCONF server (RFC 8040, 8527, 8072), specified through real HTTPS clients (aiohttp
and curl) against a real `nfmig serve` process, with yanglint judging every JSON reply."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import subprocess
import sys

import aiohttp
import pytest
from lxml import etree

from .restconf_client import XML, Restconf, start_with_restconf, yanglint, yanglint_errors

NAT = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
SESSION = "/restconf/data/nfmig-nat:nat-session"


def entry(src="10.7.0.1", sport=4000, dst="198.51.100.7", dport=80, proto="TCP", **extra):
    return {"protocol": proto, "src_address": src, "src_port": sport, "dst_address": dst,
            "dst_port": dport, **extra}


def uri(e: dict) -> str:
    return (f"{SESSION}={e['protocol']},{e['src_address']},{e['src_port']},"
            f"{e['dst_address']},{e['dst_port']}")


@pytest.fixture(scope="module")
def rc(tmp_path_factory):
    server, port = start_with_restconf(tmp_path_factory.mktemp("restconf"), "--sessions", "20")
    yield Restconf(server, port)
    server.stop()


def assert_valid(reply, tmp_path, kind="data"):
    result = yanglint(reply.json(), tmp_path, kind)
    assert result.returncode == 0, result.stderr


def assert_error(reply, status, tag, tmp_path):
    assert reply.status == status, reply.text
    assert reply.error_tag == tag
    result = yanglint_errors(reply.text, tmp_path)
    assert result.returncode == 0, result.stderr


# -- transport and authentication ----------------------------------------------------------
def test_certificate_is_generated_with_a_private_key_only_the_owner_reads(rc):
    key = rc.server.state_dir / "restconf-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert rc.get("/restconf").status == 200  # verified against that certificate


def test_wrong_password_gets_401_with_a_basic_challenge(rc, tmp_path):
    reply = rc.get("/restconf/data", password="wrong")
    assert_error(reply, 401, "access-denied", tmp_path)
    assert reply.headers["WWW-Authenticate"].startswith("Basic")


def test_no_credentials_get_401(rc):
    async def anonymous():
        async with aiohttp.ClientSession() as s, s.get(rc.base + "/restconf/data",
                                                       ssl=rc.tls) as r:
            return r.status
    assert asyncio.run(anonymous()) == 401


def test_plain_http_is_refused_on_a_non_loopback_address(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nfmig", "serve", "--users", "/dev/null",
                             "--state-dir", str(tmp_path), "--restconf-port", "0",
                             "--restconf-plain-http", "--listen", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "only on a loopback" in result.stderr
    assert "Traceback" not in result.stderr


# -- discovery -----------------------------------------------------------------------------
def test_host_meta_points_at_the_restconf_root(rc):
    reply = rc.get("/.well-known/host-meta", accept=None)
    assert "href='/restconf'" in reply.text


def test_root_names_data_operations_and_yang_library_version(rc):
    root = rc.get("/restconf").json()["ietf-restconf:restconf"]
    assert root["yang-library-version"] == "2019-01-04"
    assert rc.get("/restconf/yang-library-version").json() == {
        "ietf-restconf:yang-library-version": "2019-01-04"}


def test_operations_lists_the_migration_rpcs_and_commit(rc):
    ops = rc.get("/restconf/operations").json()["ietf-restconf:operations"]
    assert {"nfmig-nat:freeze", "nfmig-nat:thaw", "nfmig-nat:announce-migration",
            "ietf-netconf:commit"} <= set(ops)


def test_yang_library_locations_are_schema_urls_that_serve_the_module(rc):
    lib = rc.get("/restconf/data/ietf-yang-library:yang-library").json()
    modules = lib["ietf-yang-library:yang-library"]["module-set"][0]["module"]
    nat = next(m for m in modules if m["name"] == "nfmig-nat")
    url = nat["location"][0]
    assert url.startswith(rc.base + "/restconf/modules/nfmig-nat/")
    text = rc.get(url[len(rc.base):], accept=None).text
    assert text.startswith("module nfmig-nat")


# -- reads ---------------------------------------------------------------------------------
def test_get_data_as_json_validates_against_the_modules(rc, tmp_path):
    reply = rc.get("/restconf/data")
    assert reply.status == 200
    data = reply.json()["ietf-restconf:data"]
    assert len(data["nfmig-nat:nat-session"]) >= 20
    assert "nfmig-nat:nat-state" in data
    assert_valid(reply, tmp_path)


def test_session_json_matches_what_libyang_prints(rc):
    from nfmig.server.schema import Schema

    # A session's remaining timeout counts down: read the XML between two equal JSON
    # reads, so that all three show the same second.
    for _ in range(5):
        before = rc.get(SESSION).json()
        xml = rc.get(SESSION, accept=XML).text
        ours = rc.get(SESSION).json()
        if ours == before:
            break
    schema = Schema()
    tree = schema.ctx.parse_data_mem(f"<x>{xml}</x>"[3:-4], "xml", parse_only=True)
    theirs = json.loads(tree.print_mem("json", with_siblings=True, pretty=False))
    tree.free()
    assert ours == theirs


def test_get_data_as_xml_by_accept(rc):
    reply = rc.get("/restconf/data", accept=XML)
    root = etree.fromstring(reply.text.encode())
    assert root.tag == "{urn:ietf:params:xml:ns:yang:ietf-restconf}data"
    assert root.find(f"{{{NAT}}}nat-session") is not None


def test_each_nmda_datastore_is_readable(rc, tmp_path):
    for ds in ("running", "candidate", "startup", "operational"):
        reply = rc.get(f"/restconf/ds/ietf-datastores:{ds}")
        assert reply.status == 200, (ds, reply.text)
        assert_valid(reply, tmp_path, "data" if ds == "operational" else "get")


def test_config_datastores_hold_no_state(rc):
    data = rc.get("/restconf/ds/ietf-datastores:running").json()["ietf-restconf:data"]
    assert "nfmig-nat:nat-state" not in data


def test_unknown_datastore_is_404(rc, tmp_path):
    assert_error(rc.get("/restconf/ds/ietf-datastores:intended"), 404, "invalid-value",
                 tmp_path)


def test_one_session_by_its_key(rc, tmp_path):
    first = rc.get(SESSION).json()["nfmig-nat:nat-session"][0]
    reply = rc.get(uri(first))
    got = reply.json()["nfmig-nat:nat-session"]
    assert [{**g, "timeout": 0} for g in got] == [{**first, "timeout": 0}]  # timeout ticks
    assert_valid(reply, tmp_path, "get")


def test_missing_resource_is_404(rc, tmp_path):
    assert_error(rc.get(uri(entry(sport=1))), 404, "invalid-value", tmp_path)


def test_unknown_node_in_uri_is_400(rc, tmp_path):
    assert_error(rc.get("/restconf/data/nfmig-nat:no-such-thing"), 400, "unknown-element",
                 tmp_path)


def test_bad_key_in_uri_is_400(rc, tmp_path):
    assert_error(rc.get(f"{SESSION}=TCP,10.0.0.999,1,10.0.0.1,2"), 400, "invalid-value",
                 tmp_path)


def test_content_nonconfig_returns_only_state(rc):
    data = rc.get("/restconf/data?content=nonconfig").json()["ietf-restconf:data"]
    assert "nfmig-nat:nat-state" in data and "nfmig-nat:nat-session" not in data


def test_content_config_returns_only_configuration(rc):
    data = rc.get("/restconf/data?content=config").json()["ietf-restconf:data"]
    assert "nfmig-nat:nat-state" not in data and "nfmig-nat:nat-session" in data


def test_depth_limits_the_levels_returned(rc):
    data = rc.get("/restconf/data/nfmig-nat:nat-state?depth=1").json()
    assert data == {"nfmig-nat:nat-state": {}}


def test_fields_selects_leaves(rc):
    data = rc.get("/restconf/data/nfmig-nat:nat-state?fields=implementation").json()
    assert data == {"nfmig-nat:nat-state": {"implementation": "simulated"}}


def test_with_defaults_report_all_adds_the_default_timeouts(rc):
    rc.request("PUT", "/restconf/data/nfmig-nat:nat-policy",
               {"nfmig-nat:nat-policy": {"external-address": ["192.0.2.1"]}})
    plain = rc.get("/restconf/data/nfmig-nat:nat-policy").json()["nfmig-nat:nat-policy"]
    full = rc.get("/restconf/data/nfmig-nat:nat-policy?with-defaults=report-all").json()
    assert "timeouts" not in plain
    assert full["nfmig-nat:nat-policy"]["timeouts"]["udp"] == 120


POLICY = "/restconf/data/nfmig-nat:nat-policy"
WD = "urn:ietf:params:xml:ns:netconf:default:1.0"
TAGGED = {"ietf-netconf-with-defaults:default": True}


def set_policy(rc, **leaves):
    reply = rc.request("PUT", POLICY, {"nfmig-nat:nat-policy": {
        "external-address": ["192.0.2.1"], **leaves}})
    assert reply.status in (201, 204), reply.text


def test_with_defaults_report_all_tagged_annotates_defaults_in_json(rc, tmp_path):
    set_policy(rc)
    reply = rc.get(f"{POLICY}?with-defaults=report-all-tagged")
    policy = reply.json()["nfmig-nat:nat-policy"]
    assert policy["timeouts"]["udp"] == 120 and policy["timeouts"]["@udp"] == TAGGED
    assert policy["@port-max"] == TAGGED
    assert "@external-address" not in policy  # set, and not a default
    assert_valid(reply, tmp_path, "get")


def test_with_defaults_report_all_tagged_tags_a_leaf_set_to_its_default(rc):
    set_policy(rc, **{"port-min": 1024})  # RFC 6243 §3.4: what trim would leave out
    policy = rc.get(f"{POLICY}?with-defaults=report-all-tagged").json()[
        "nfmig-nat:nat-policy"]
    assert policy["port-min"] == 1024 and policy["@port-min"] == TAGGED


def test_with_defaults_report_all_tagged_uses_the_rfc_6243_attribute_in_xml(rc):
    set_policy(rc, **{"port-min": 2000})
    root = etree.fromstring(rc.get(f"{POLICY}?with-defaults=report-all-tagged",
                                   accept=XML).text.encode())
    assert root.find(f"{{{NAT}}}timeouts/{{{NAT}}}udp").get(f"{{{WD}}}default") == "true"
    assert root.find(f"{{{NAT}}}port-max").get(f"{{{WD}}}default") == "true"
    assert root.find(f"{{{NAT}}}port-min").get(f"{{{WD}}}default") is None


def test_with_defaults_trim_leaves_out_a_leaf_set_to_its_default(rc):
    set_policy(rc, **{"port-min": 1024})
    trimmed = rc.get(f"{POLICY}?with-defaults=trim").json()["nfmig-nat:nat-policy"]
    explicit = rc.get(f"{POLICY}?with-defaults=explicit").json()["nfmig-nat:nat-policy"]
    assert "port-min" not in trimmed and explicit["port-min"] == 1024
    assert "timeouts" not in explicit


def test_with_defaults_of_another_value_is_400(rc, tmp_path):
    assert_error(rc.get(f"{POLICY}?with-defaults=all"), 400, "invalid-value", tmp_path)


def test_fields_keep_the_list_keys_so_the_reply_stays_valid(rc, tmp_path):
    reply = rc.get(f"{SESSION}?fields=translated_port")
    sessions = reply.json()["nfmig-nat:nat-session"]
    assert sessions and all(set(s) <= {"protocol", "src_address", "src_port", "dst_address",
                                       "dst_port", "translated_port"} and
                            {"protocol", "src_port", "dst_port"} <= set(s) for s in sessions)
    assert any("translated_port" in s for s in sessions)
    assert_valid(reply, tmp_path, "get")


def test_fields_on_the_datastore_select_top_level_nodes_and_keep_keys(rc, tmp_path):
    reply = rc.get("/restconf/data?fields=nfmig-nat:nat-session(timeout)")
    data = reply.json()["ietf-restconf:data"]
    assert list(data) == ["nfmig-nat:nat-session"]
    assert all(set(s) == {"protocol", "src_address", "src_port", "dst_address", "dst_port",
                          "timeout"} for s in data["nfmig-nat:nat-session"])
    assert_valid(reply, tmp_path, "get")


def test_unknown_query_parameter_is_400(rc, tmp_path):
    assert_error(rc.get("/restconf/data?colour=blue"), 400, "invalid-value", tmp_path)


def test_head_returns_headers_only(rc):
    reply = rc.request("HEAD", "/restconf/data/nfmig-nat:nat-state")
    assert reply.status == 200 and reply.text == "" and "Etag" in reply.headers


def test_options_lists_the_methods(rc):
    allow = rc.request("OPTIONS", "/restconf/data").headers["Allow"]
    assert {"GET", "PUT", "PATCH", "POST", "DELETE"} <= set(allow.replace(" ", "").split(","))


def test_unsupported_accept_is_406(rc):
    assert rc.get("/restconf/data", accept="text/html").status == 406


# -- entity tags ---------------------------------------------------------------------------
def test_etag_and_last_modified_and_if_none_match(rc):
    reply = rc.get("/restconf/data/nfmig-nat:nat-policy")
    assert reply.headers["Last-Modified"].endswith("GMT")
    again = rc.get("/restconf/data/nfmig-nat:nat-policy",
                   headers={"If-None-Match": reply.headers["Etag"]})
    assert again.status == 304


def test_if_match_with_a_stale_etag_refuses_the_write(rc, tmp_path):
    path = "/restconf/data/nfmig-nat:nat-policy"
    rc.request("PUT", path, {"nfmig-nat:nat-policy": {"external-address": ["192.0.2.1"]}})
    tag = rc.get(path).headers["Etag"]
    rc.request("PUT", path, {"nfmig-nat:nat-policy": {"external-address": ["192.0.2.2"]}})
    reply = rc.request("PUT", path, {"nfmig-nat:nat-policy": {"external-address":
                                                               ["192.0.2.3"]}},
                       headers={"If-Match": tag})
    assert_error(reply, 412, "operation-failed", tmp_path)
    assert rc.get(path).json()["nfmig-nat:nat-policy"]["external-address"] == ["192.0.2.2"]


# -- writes --------------------------------------------------------------------------------
def test_post_creates_a_session_with_201_and_location(rc):
    e = entry(sport=5001, translated_address="192.0.2.1", translated_port=40001)
    reply = rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [e]})
    assert reply.status == 201, reply.text
    assert reply.headers["Location"].endswith(uri(e)[len("/restconf/data/"):])
    assert rc.get(uri(e)).json()["nfmig-nat:nat-session"][0]["translated_port"] == 40001


def test_post_of_an_existing_session_is_409(rc, tmp_path):
    e = entry(sport=5002)
    rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [e]})
    assert_error(rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [e]}), 409,
                 "data-exists", tmp_path)


def test_put_creates_then_replaces(rc):
    e = entry(sport=5003, translated_address="192.0.2.1", translated_port=40003)
    assert rc.request("PUT", uri(e), {"nfmig-nat:nat-session": [e]}).status == 201
    e2 = {**e, "translated_port": 40004}
    assert rc.request("PUT", uri(e), {"nfmig-nat:nat-session": [e2]}).status == 204
    assert rc.get(uri(e)).json()["nfmig-nat:nat-session"][0]["translated_port"] == 40004


def test_put_with_a_key_differing_from_the_uri_is_400(rc, tmp_path):
    e = entry(sport=5004)
    reply = rc.request("PUT", uri(e), {"nfmig-nat:nat-session": [{**e, "src_port": 1}]})
    assert_error(reply, 400, "invalid-value", tmp_path)


def test_patch_merges_into_an_existing_session(rc):
    e = entry(sport=5005, translated_address="192.0.2.1", translated_port=40005)
    rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [e]})
    reply = rc.request("PATCH", uri(e), {"nfmig-nat:nat-session": [{**e, "timeout": 77}]})
    assert reply.status == 204, reply.text
    got = rc.get(uri(e)).json()["nfmig-nat:nat-session"][0]
    assert got["translated_port"] == 40005 and got["timeout"] <= 77


def test_patch_of_a_missing_resource_is_404_and_creates_nothing(rc, tmp_path):
    e = entry(sport=5006)
    assert_error(rc.request("PATCH", uri(e), {"nfmig-nat:nat-session": [e]}), 404,
                 "invalid-value", tmp_path)
    assert rc.get(uri(e)).status == 404


def test_delete_removes_and_a_second_delete_is_404(rc, tmp_path):
    e = entry(sport=5007)
    rc.request("POST", "/restconf/data", {"nfmig-nat:nat-session": [e]})
    assert rc.request("DELETE", uri(e)).status == 204
    assert_error(rc.request("DELETE", uri(e)), 404, "invalid-value", tmp_path)


def test_xml_body_by_content_type(rc):
    e = entry(sport=5008)
    body = (f'<nat-session xmlns="{NAT}"><protocol>TCP</protocol><src_address>10.7.0.1'
            "</src_address><src_port>5008</src_port><dst_address>198.51.100.7</dst_address>"
            "<dst_port>80</dst_port></nat-session>")
    reply = rc.request("PUT", uri(e), body, content_type=XML)
    assert reply.status == 201, reply.text


def test_unsupported_content_type_is_415(rc):
    assert rc.request("POST", "/restconf/data", "x", content_type="text/plain").status == 415


def test_operational_datastore_is_read_only(rc, tmp_path):
    e = entry(sport=5009)
    reply = rc.request("POST", "/restconf/ds/ietf-datastores:operational",
                       {"nfmig-nat:nat-session": [e]})
    assert_error(reply, 501, "operation-not-supported", tmp_path)


def test_insert_on_a_list_that_is_not_user_ordered_is_400(rc, tmp_path):
    reply = rc.request("POST", "/restconf/data?insert=first",
                       {"nfmig-nat:nat-session": [entry(sport=5010)]})
    assert_error(reply, 400, "invalid-value", tmp_path)


# -- bad input: the NETCONF tests' classes, as 4xx, nothing applied ------------------------
BAD_BODIES = {
    "malformed JSON": ('{"nfmig-nat:nat-session": [', 400, "malformed-message"),
    "unknown leaf": ({"nfmig-nat:nat-session": [entry(sport=6001, colour="red")]}, 400,
                     "unknown-element"),
    "unknown module": ({"nope:nat-session": [entry(sport=6002)]}, 400, "unknown-namespace"),
    "port out of range": ({"nfmig-nat:nat-session": [entry(sport=70000)]}, 400,
                          "invalid-value"),
    "port as a string": ({"nfmig-nat:nat-session": [entry(sport="6003")]}, 400,
                         "invalid-value"),
    "bad address": ({"nfmig-nat:nat-session": [entry(src="10.0.0.256", sport=6004)]}, 400,
                    "invalid-value"),
    "bad enumeration": ({"nfmig-nat:nat-session": [entry(sport=6005, tcp_state="happy")]},
                        400, "invalid-value"),
    "missing key": ({"nfmig-nat:nat-session": [{"protocol": "TCP", "src_port": 6006}]}, 400,
                    "missing-element"),
    "state data": ({"nfmig-nat:nat-state": {"implementation": "x"}}, 400, "invalid-value"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_is_a_4xx_error_and_nothing_is_applied(rc, tmp_path, case):
    body, status, tag = BAD_BODIES[case]
    before = len(rc.get(SESSION).json()["nfmig-nat:nat-session"])
    text = body if isinstance(body, str) else json.dumps(body)
    batch = text if isinstance(body, str) or "nat-session" not in body else json.dumps(
        {"nfmig-nat:nat-session": [entry(sport=6100), *next(iter(body.values()))]})
    reply = rc.request("POST", "/restconf/data", batch if case != "state data" else text)
    if reply.status == 400 and case == "missing key":
        pass
    assert reply.status == status, reply.text
    assert reply.error_tag == tag
    checked = yanglint_errors(reply.text, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert len(rc.get(SESSION).json()["nfmig-nat:nat-session"]) == before


def test_yang_patch_failure_applies_none_of_its_edits(rc, tmp_path):
    good, bad = entry(sport=6201), entry(sport=6202, tcp_state="happy")
    patch = {"ietf-yang-patch:yang-patch": {"patch-id": "p-bad", "edit": [
        {"edit-id": "1", "operation": "create", "target": uri(good)[len("/restconf/data"):],
         "value": {"nfmig-nat:nat-session": [good]}},
        {"edit-id": "2", "operation": "create", "target": uri(bad)[len("/restconf/data"):],
         "value": {"nfmig-nat:nat-session": [bad]}}]}}
    reply = rc.request("PATCH", "/restconf/data", patch,
                       content_type="application/yang-patch+json")
    assert reply.status == 400, reply.text
    status = reply.json()["ietf-yang-patch:yang-patch-status"]
    assert status["patch-id"] == "p-bad"
    assert [e["edit-id"] for e in status["edit-status"]["edit"]] == ["2"]
    assert rc.get(uri(good)).status == 404


# -- yang patch, candidate, operations -----------------------------------------------------
def test_yang_patch_edits_the_candidate_and_commit_applies_it(rc):
    e = entry(sport=6301)
    patch = {"ietf-yang-patch:yang-patch": {"patch-id": "p1", "edit": [
        {"edit-id": "1", "operation": "create", "target": uri(e)[len("/restconf/data"):],
         "value": {"nfmig-nat:nat-session": [e]}}]}}
    reply = rc.request("PATCH", "/restconf/ds/ietf-datastores:candidate", patch,
                       content_type="application/yang-patch+json")
    assert reply.status == 200, reply.text
    assert reply.json()["ietf-yang-patch:yang-patch-status"]["ok"] == [None]
    assert rc.get(uri(e)).status == 404
    assert rc.request("POST", "/restconf/operations/ietf-netconf:commit").status == 204
    assert rc.get(uri(e)).status == 200


def test_discard_changes_drops_candidate_edits(rc):
    e = entry(sport=6302)
    rc.request("POST", "/restconf/ds/ietf-datastores:candidate",
               {"nfmig-nat:nat-session": [e]})
    assert rc.request("POST", "/restconf/operations/ietf-netconf:discard-changes"
                      ).status == 204
    rc.request("POST", "/restconf/operations/ietf-netconf:commit")
    assert rc.get(uri(e)).status == 404


def test_freeze_and_thaw_operations(rc):
    body = {"nfmig-nat:input": {"migration-id": "rc-1", "timeout": 30}}
    assert rc.request("POST", "/restconf/operations/nfmig-nat:freeze", body).status == 204
    assert rc.request("POST", "/restconf/operations/nfmig-nat:thaw",
                      {"nfmig-nat:input": {"migration-id": "rc-1"}}).status == 204


def test_operation_with_bad_input_is_400(rc, tmp_path):
    reply = rc.request("POST", "/restconf/operations/nfmig-nat:freeze",
                       {"nfmig-nat:input": {"timeout": "soon"}})
    assert_error(reply, 400, "invalid-value", tmp_path)


def test_unknown_operation_is_404(rc, tmp_path):
    assert_error(rc.request("POST", "/restconf/operations/ietf-netconf:lock"), 404,
                 "invalid-value", tmp_path)


# -- event stream --------------------------------------------------------------------------
def test_event_stream_carries_migration_events(rc):
    async def listen():
        async with aiohttp.ClientSession() as s, s.get(
                rc.base + "/restconf/streams/NETCONF/json", ssl=rc.tls,
                headers={"Accept": "text/event-stream", **rc.auth()}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            await r.content.readline()  # the subscribed comment
            await asyncio.get_running_loop().run_in_executor(None, announce)
            while True:
                line = (await asyncio.wait_for(r.content.readline(), 10)).decode()
                if line.startswith("data: "):
                    return json.loads(line[6:])

    def announce():
        rc.request("POST", "/restconf/operations/nfmig-nat:announce-migration",
                   {"nfmig-nat:input": {"migration-id": "sse-1", "role": "source",
                                        "event": "started"}})

    note = asyncio.run(listen())["ietf-restconf:notification"]
    assert note["nfmig-nat:migration-event"]["migration-id"] == "sse-1"
    assert note["eventTime"]


# -- curl ----------------------------------------------------------------------------------
def test_curl_reads_and_writes(rc):
    got = rc.curl("-H", "Accept: application/yang-data+json",
                  f"{rc.base}/restconf/data/nfmig-nat:nat-state")
    assert json.loads(got.stdout)["nfmig-nat:nat-state"]["implementation"] == "simulated"
    e = entry(sport=6401)
    put = rc.curl("-X", "PUT", "-H", "Content-Type: application/yang-data+json",
                  "-d", json.dumps({"nfmig-nat:nat-session": [e]}), "-o", "/dev/null",
                  "-w", "%{http_code}", rc.base + uri(e))
    assert put.stdout == "201"


def test_tls_rejects_clients_that_do_not_trust_the_certificate(rc):
    async def untrusted():
        async with aiohttp.ClientSession() as s, s.get(
                rc.base + "/restconf", ssl=ssl.create_default_context()) as r:
            return r.status
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        asyncio.run(untrusted())


def test_put_of_the_candidate_datastore_replaces_it_whole(rc):
    e = entry(sport=6501)
    body = {"ietf-restconf:data": {"nfmig-nat:nat-session": [e]}}
    assert rc.request("PUT", "/restconf/ds/ietf-datastores:candidate", body).status == 204
    staged = rc.get("/restconf/ds/ietf-datastores:candidate/nfmig-nat:nat-session").json()
    assert [s["src_port"] for s in staged["nfmig-nat:nat-session"]] == [6501]
    assert rc.request("POST", "/restconf/operations/ietf-netconf:discard-changes"
                      ).status == 204
    assert len(rc.get(SESSION).json()["nfmig-nat:nat-session"]) > 1


def test_plain_http_on_loopback_when_asked(tmp_path):
    server, port = start_with_restconf(tmp_path, "--restconf-plain-http")
    try:
        got = subprocess.run(["curl", "-sS", "-u", f"{server.user}:{server.password}",
                              f"http://127.0.0.1:{port}/restconf/yang-library-version"],
                             capture_output=True, text=True, timeout=60)
        assert json.loads(got.stdout)["ietf-restconf:yang-library-version"] == "2019-01-04"
    finally:
        server.stop()
