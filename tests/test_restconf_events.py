"""The RESTCONF event stream (RFC 8040 §6, §9.3): discovery through restconf-state, the
location URLs, replay (start-time, stop-time), filter, and the notifications it carries,
through a real server process and a real aiohttp client; JSON checked by yanglint."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import aiohttp
import pytest
from lxml import etree

from .restconf_client import (
    XML,
    Restconf,
    start_with_restconf,
    yanglint,
    yanglint_errors,
    yanglint_stream_marker,
)

STATE = "/restconf/data/ietf-restconf-monitoring:restconf-state"
STREAM = "/restconf/streams/NETCONF/json"
ANNOUNCE = "/restconf/operations/nfmig-nat:announce-migration"
NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"


@pytest.fixture(scope="module")
def rc(tmp_path_factory):
    server, port = start_with_restconf(tmp_path_factory.mktemp("events"), "--sessions", "5")
    yield Restconf(server, port)
    server.stop()


def announce(rc: Restconf, migration_id: str) -> None:
    reply = rc.request("POST", ANNOUNCE, {"nfmig-nat:input": {
        "migration-id": migration_id, "role": "source", "event": "started"}})
    assert reply.status == 204, reply.text


def follow(rc: Restconf, url: str, action: Callable[[], None] | None = None,
           until: Callable[[list[str]], bool] = lambda events: False,
           timeout: float = 10) -> list[str]:
    """The events (each its data lines joined) a stream sends after ``action`` ran, until
    ``until`` holds, the server ends the stream, or ``timeout`` passes."""
    async def run() -> list[str]:
        events: list[str] = []
        async with aiohttp.ClientSession() as s, s.get(
                url if url.startswith("https:") else rc.base + url, ssl=rc.tls,
                headers={"Accept": "text/event-stream", **rc.auth()}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert (await r.content.readline()).startswith(b": subscribed")
            if action is not None:
                await asyncio.get_running_loop().run_in_executor(None, action)
            lines: list[str] = []
            deadline = asyncio.get_running_loop().time() + timeout
            while not until(events):
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    raw = await asyncio.wait_for(r.content.readline(), left)
                except TimeoutError:
                    break
                if not raw:
                    break  # the server ended the stream
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    lines.append(line[6:])
                elif not line and lines:
                    events.append("\n".join(lines))
                    lines = []
        return events
    return asyncio.run(run())


def migration_ids(events: list[str]) -> list[str]:
    notes = [json.loads(e)["ietf-restconf:notification"] for e in events]
    return [n["nfmig-nat:migration-event"]["migration-id"] for n in notes
            if "nfmig-nat:migration-event" in n]


def kinds(events: list[str]) -> list[str]:
    """What each event is: a migration-id, or the name of another notification."""
    out = []
    for e in events:
        note = json.loads(e)["ietf-restconf:notification"]
        name = next(k for k in note if k != "eventTime")
        out.append(note[name]["migration-id"] if name == "nfmig-nat:migration-event" else name)
    return out


def assert_error(reply, tmp_path, status=400, tag="invalid-value"):
    assert reply.status == status, reply.text
    assert reply.error_tag == tag
    checked = yanglint_errors(reply.text, tmp_path)
    assert checked.returncode == 0, checked.stderr


# -- discovery -----------------------------------------------------------------------------
def test_restconf_state_lists_the_stream_with_both_encodings_and_their_locations(rc, tmp_path):
    reply = rc.get(STATE)
    assert reply.status == 200, reply.text
    checked = yanglint(reply.json(), tmp_path, "get")
    assert checked.returncode == 0, checked.stderr
    stream, = reply.json()["ietf-restconf-monitoring:restconf-state"]["streams"]["stream"]
    assert stream["name"] == "NETCONF"
    assert {a["encoding"]: a["location"] for a in stream["access"]} == {
        "json": rc.base + "/restconf/streams/NETCONF/json",
        "xml": rc.base + "/restconf/streams/NETCONF/xml"}


def test_restconf_state_advertises_replay_and_the_log_creation_time(rc):
    stream = rc.get(STATE).json()["ietf-restconf-monitoring:restconf-state"]["streams"][
        "stream"][0]
    assert stream["replay-support"] is True
    created = datetime.fromisoformat(stream["replay-log-creation-time"])
    assert created.tzinfo is not None and created < datetime.now(created.tzinfo)


def test_restconf_state_capabilities_name_what_the_server_supports(rc):
    caps = set(rc.get(STATE).json()["ietf-restconf-monitoring:restconf-state"][
        "capabilities"]["capability"])
    prefix = "urn:ietf:params:restconf:capability:"
    assert {prefix + c for c in ("defaults:1.0?basic-mode=explicit", "depth:1.0",
                                 "fields:1.0", "filter:1.0", "replay:1.0",
                                 "with-defaults:1.0", "yang-patch:1.0")} == caps


def test_restconf_state_is_part_of_the_operational_data_as_xml(rc):
    root = etree.fromstring(rc.get("/restconf/data?content=nonconfig", accept=XML)
                            .text.encode())
    ns = "urn:ietf:params:xml:ns:yang:ietf-restconf-monitoring"
    locations = root.findall(f".//{{{ns}}}location")
    assert rc.base + "/restconf/streams/NETCONF/xml" in [e.text for e in locations]


def test_restconf_monitoring_is_in_the_yang_library(rc):
    lib = rc.get("/restconf/data/ietf-yang-library:yang-library").json()
    modules = lib["ietf-yang-library:yang-library"]["module-set"][0]["module"]
    assert "ietf-restconf-monitoring" in {m["name"] for m in modules}


def test_the_json_location_from_restconf_state_serves_the_events(rc, tmp_path):
    stream = rc.get(STATE).json()["ietf-restconf-monitoring:restconf-state"]["streams"][
        "stream"][0]
    url = next(a["location"] for a in stream["access"] if a["encoding"] == "json")
    events = follow(rc, url, lambda: announce(rc, "found-1"), lambda e: len(e) >= 1)
    assert migration_ids(events) == ["found-1"]
    content = json.loads(events[0])["ietf-restconf:notification"]
    del content["eventTime"]
    checked = yanglint(content, tmp_path, "notif")
    assert checked.returncode == 0, checked.stderr


def test_the_xml_location_serves_notifications_in_xml(rc):
    stream = rc.get(STATE).json()["ietf-restconf-monitoring:restconf-state"]["streams"][
        "stream"][0]
    url = next(a["location"] for a in stream["access"] if a["encoding"] == "xml")
    events = follow(rc, url, lambda: announce(rc, "xml-1"), lambda e: len(e) >= 1)
    root = etree.fromstring(events[0].encode())
    assert root.tag == f"{{{NOTIF_NS}}}notification"
    assert root.findtext(".//{urn:nfmig:params:xml:ns:yang:nfmig-nat}migration-id") == "xml-1"


# -- replay ----------------------------------------------------------------------------------
def event_time(event: str) -> datetime:
    return datetime.fromisoformat(json.loads(event)["ietf-restconf:notification"]["eventTime"])


def test_start_time_replays_notifications_sent_before_the_client_connected(rc):
    announce(rc, "before-1")
    replayed = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z",
                      until=lambda e: "before-1" in migration_ids(e))
    assert "before-1" in migration_ids(replayed)


def test_replay_starts_at_start_time(rc):
    announce(rc, "old-1")
    first = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z",
                   until=lambda e: "old-1" in migration_ids(e))
    after = event_time(first[migration_ids(first).index("old-1")]) + timedelta(microseconds=1)
    announce(rc, "new-1")
    events = follow(rc, f"{STREAM}?start-time={quote(after.isoformat())}",
                    until=lambda e: "new-1" in migration_ids(e))
    assert migration_ids(events) == ["new-1"]


def test_stop_time_in_the_past_replays_up_to_it_and_ends_the_stream(rc):
    announce(rc, "window-1")
    first = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z",
                   until=lambda e: "window-1" in migration_ids(e))
    at = event_time(first[migration_ids(first).index("window-1")])
    announce(rc, "window-2")
    start, stop = quote(at.isoformat()), quote((at + timedelta(microseconds=1)).isoformat())
    began = time.monotonic()
    events = follow(rc, f"{STREAM}?start-time={start}&stop-time={stop}", timeout=10)
    assert migration_ids(events) == ["window-1"]
    assert time.monotonic() - began < 5  # the server ended the stream; no timeout ran out


def test_live_events_follow_the_replayed_ones_once_each(rc):
    announce(rc, "once-1")
    events = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z",
                    lambda: announce(rc, "once-2"),
                    until=lambda e: "once-2" in migration_ids(e))
    ids = migration_ids(events)
    assert ids.count("once-1") == 1 and ids.count("once-2") == 1
    assert ids.index("once-1") < ids.index("once-2")


REPLAY_COMPLETE = "nc-notifications:replayComplete"
COMPLETE = "nc-notifications:notificationComplete"
NCN_NS = "urn:ietf:params:xml:ns:netmod:notification"


def test_replay_complete_comes_after_the_replayed_notifications_and_before_live_ones(
        rc, tmp_path):
    announce(rc, "mark-1")
    events = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z",
                    lambda: announce(rc, "mark-2"), until=lambda e: "mark-2" in kinds(e))
    seen = kinds(events)
    assert seen.count(REPLAY_COMPLETE) == 1
    assert seen.index("mark-1") < seen.index(REPLAY_COMPLETE) < seen.index("mark-2")
    marker = json.loads(events[seen.index(REPLAY_COMPLETE)])
    assert marker["ietf-restconf:notification"][REPLAY_COMPLETE] == {}
    checked = yanglint_stream_marker(marker, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_replay_of_an_empty_window_still_sends_replay_complete(rc):
    now = datetime.now(UTC)
    events = follow(rc, f"{STREAM}?start-time={quote(now.isoformat())}",
                    until=lambda e: REPLAY_COMPLETE in kinds(e))
    assert kinds(events) == [REPLAY_COMPLETE]


def test_a_live_stream_sends_no_replay_complete(rc):
    events = follow(rc, STREAM, lambda: announce(rc, "live-only"),
                    until=lambda e: "live-only" in kinds(e))
    assert kinds(events) == ["live-only"]


def test_stop_time_in_the_past_ends_with_notification_complete_after_replay_complete(
        rc, tmp_path):
    announce(rc, "done-1")
    stop = quote(datetime.now(UTC).isoformat())
    events = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z&stop-time={stop}")
    seen = kinds(events)
    assert "done-1" in seen
    assert seen[-2:] == [REPLAY_COMPLETE, COMPLETE]
    marker = json.loads(events[-1])
    checked = yanglint_stream_marker(marker, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_stop_time_reached_while_live_sends_notification_complete_and_ends(rc):
    stop = datetime.now(UTC) + timedelta(seconds=1.5)
    began = time.monotonic()
    events = follow(rc, f"{STREAM}?start-time={quote(datetime.now(UTC).isoformat())}"
                        f"&stop-time={quote(stop.isoformat())}",
                    lambda: announce(rc, "before-stop"), timeout=10)
    assert kinds(events) == [REPLAY_COMPLETE, "before-stop", COMPLETE]
    assert event_time(events[-1]) >= stop - timedelta(milliseconds=50)
    assert time.monotonic() - began < 5  # the server ended the stream


def test_the_xml_stream_sends_both_markers_in_their_namespace(rc):
    stop = quote(datetime.now(UTC).isoformat())
    events = follow(rc, "/restconf/streams/NETCONF/xml?start-time=2000-01-01T00:00:00Z"
                        f"&stop-time={stop}")
    tails = [etree.fromstring(e.encode())[-1] for e in events[-2:]]
    assert [t.tag for t in tails] == [f"{{{NCN_NS}}}replayComplete",
                                      f"{{{NCN_NS}}}notificationComplete"]
    assert all(etree.fromstring(e.encode()).tag == f"{{{NOTIF_NS}}}notification"
               for e in events[-2:])


def test_stop_time_without_start_time_is_400(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?stop-time=2000-01-01T00:00:00Z"), tmp_path)


def test_start_time_in_the_future_is_400(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?start-time=2999-01-01T00:00:00Z"), tmp_path)


def test_start_time_that_is_not_a_date_and_time_is_400(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?start-time=yesterday"), tmp_path)


def test_stop_time_before_start_time_is_400(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?start-time=2020-01-02T00:00:00Z"
                        "&stop-time=2020-01-01T00:00:00Z"), tmp_path)


# -- filter and other parameters -------------------------------------------------------------
def test_filter_selects_notifications_by_their_content(rc):
    wanted = quote("/nfmig-nat:migration-event[nfmig-nat:migration-id='keep-1']")
    events = follow(rc, f"{STREAM}?filter={wanted}",
                    lambda: (announce(rc, "drop-1"), announce(rc, "keep-1")),
                    until=lambda e: len(e) >= 1)
    assert migration_ids(events) == ["keep-1"]


def test_filter_applies_to_replayed_notifications_too(rc):
    announce(rc, "replay-drop")
    announce(rc, "replay-keep")
    wanted = quote("//nfmig-nat:migration-id='replay-keep'")
    events = follow(rc, f"{STREAM}?start-time=2000-01-01T00:00:00Z&filter={wanted}",
                    until=lambda e: "replay-keep" in migration_ids(e))
    assert set(migration_ids(events)) == {"replay-keep"}


def test_filter_that_is_not_xpath_is_400_invalid_value(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?filter={quote('/nfmig-nat:migration-event[')}"),
                 tmp_path)


def test_filter_with_an_unknown_prefix_is_400_invalid_value(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?filter={quote('/nope:event')}"), tmp_path)


def test_unknown_query_parameter_on_a_stream_is_400(rc, tmp_path):
    assert_error(rc.get(f"{STREAM}?depth=1"), tmp_path)


def test_unknown_stream_is_404(rc, tmp_path):
    assert_error(rc.get("/restconf/streams/OTHER/json"), tmp_path, 404)


# -- session changes -------------------------------------------------------------------------
def session(port: int) -> dict:
    return {"protocol": "UDP", "src_address": "10.8.0.1", "src_port": port,
            "dst_address": "198.51.100.8", "dst_port": 53}


def changes(events: list[str]) -> list[tuple[str, int]]:
    out = []
    for e in events:
        note = json.loads(e)["ietf-restconf:notification"]
        for change in note.get("nfmig-nat:sessions-changed", {}).get("change", []):
            if change["src_address"] == "10.8.0.1":
                out.append((change["event"], change["src_port"]))
    return out


def test_session_changes_made_by_patch_arrive_as_sessions_changed(rc, tmp_path):
    def edit() -> None:
        added = rc.request("PATCH", "/restconf/data", {"ietf-restconf:data": {
            "nfmig-nat:nat-session": [session(7001), session(7002)]}})
        assert added.status == 204, added.text
        removed = rc.request("PATCH", "/restconf/data", {"ietf-yang-patch:yang-patch": {
            "patch-id": "gone", "edit": [{
                "edit-id": "1", "operation": "delete",
                "target": "/nfmig-nat:nat-session=UDP,10.8.0.1,7001,198.51.100.8,53"}]}},
            content_type="application/yang-patch+json")
        assert removed.status == 200, removed.text

    events = follow(rc, STREAM, edit, until=lambda e: ("deleted", 7001) in changes(e))
    seen = changes(events)
    assert sorted(seen[:2]) == [("created", 7001), ("created", 7002)]
    assert seen[2:] == [("deleted", 7001)]
    note = next(json.loads(e)["ietf-restconf:notification"] for e in events
                if "nfmig-nat:sessions-changed" in e)
    del note["eventTime"]
    checked = yanglint(note, tmp_path, "notif")
    assert checked.returncode == 0, checked.stderr
