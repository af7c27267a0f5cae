"""What a server offers a migrator, specified through ncclient against real server processes:
event notifications (RFC 5277), the migration window (rpc freeze / thaw), migration
announcements, and confirmed commits (RFC 6241 §8.4)."""

from __future__ import annotations

import time

import pytest
from lxml import etree
from ncclient.operations import RPCError
from nfmig.client.local import start_local_server

from .conftest import NAT_NS, RunningServer
from .test_netconf_server import config, get_data, session_xml, sessions_of

NOTIF = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NS = {"n": NAT_NS}


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """A NAT whose traffic opens about 200 sessions a second."""
    started = start_local_server(tmp_path_factory.mktemp("busy"), "--traffic", "200")
    srv = RunningServer(**vars(started))
    yield srv
    srv.stop()


@pytest.fixture
def busy(busy_server):
    m = busy_server.connect()
    yield m
    if m.connected:
        m.close_session()


def rpc(nc, body: str):
    return nc.dispatch(etree.fromstring(body))


def nat_rpc(nc, name: str, leaves: str = ""):
    return rpc(nc, f'<{name} xmlns="{NAT_NS}">{leaves}</{name}>')


def announce(nc, event: str = "started", extra: str = ""):
    return nat_rpc(nc, "announce-migration", f"<migration-id>m-1</migration-id><role>source"
                   f"</role><event>{event}</event>{extra}")


def notification_content(nc, timeout: float = 5) -> etree._Element:
    note = nc.take_notification(timeout=timeout)
    assert note is not None, "no notification arrived"
    root = etree.fromstring(note.notification_xml.encode()
                            if isinstance(note.notification_xml, str)
                            else note.notification_xml)
    assert root.findtext(f"{{{NOTIF}}}eventTime")
    return next(c for c in root if c.tag != f"{{{NOTIF}}}eventTime")


def created_count(nc) -> int:
    data = get_data(nc, "operational", f'<subtree-filter><nat-state xmlns="{NAT_NS}"/>'
                    "</subtree-filter>")
    return int(data.findtext("n:nat-state/n:sessions-created", namespaces=NS))


# -- notifications -------------------------------------------------------------------------
def test_hello_announces_notifications_and_confirmed_commit(nc):
    caps = set(nc.server_capabilities)
    assert "urn:ietf:params:netconf:capability:notification:1.0" in caps
    assert "urn:ietf:params:netconf:capability:interleave:1.0" in caps
    assert "urn:ietf:params:netconf:capability:confirmed-commit:1.1" in caps


def test_announced_migration_reaches_a_subscriber_as_migration_event(server, nc):
    nc.create_subscription()
    with server.connect() as migrator:
        announce(migrator, "failed", "<peer>netconf://b:830</peer><reason>target full</reason>")
    event = notification_content(nc)
    assert event.tag == f"{{{NAT_NS}}}migration-event"
    assert event.findtext("n:event", namespaces=NS) == "failed"
    assert event.findtext("n:reason", namespaces=NS) == "target full"


def test_session_written_by_an_edit_appears_in_sessions_changed(nc):
    nc.create_subscription()
    nc.edit_config(target="running", config=config(session_xml("10.7.0.1", 4100)))
    change = notification_content(nc).find("n:change", NS)
    assert change.findtext("n:event", namespaces=NS) == "created"
    assert change.findtext("n:src_address", namespaces=NS) == "10.7.0.1"


def test_subscription_filter_selects_only_migration_events(server, nc):
    nc.create_subscription(filter=("subtree", f'<migration-event xmlns="{NAT_NS}"/>'))
    nc.edit_config(target="running", config=config(session_xml("10.7.0.2", 4101)))
    announce(nc)
    assert notification_content(nc).tag == f"{{{NAT_NS}}}migration-event"


def test_second_subscription_in_one_session_is_in_use(nc):
    nc.create_subscription()
    with pytest.raises(RPCError) as err:
        nc.create_subscription()
    assert err.value.tag == "in-use"


def test_subscription_to_an_unknown_stream_is_invalid_value(nc):
    with pytest.raises(RPCError) as err:
        nc.create_subscription(stream_name="SYSLOG")
    assert err.value.tag == "invalid-value"


def test_replay_request_fails_because_the_stream_keeps_no_history(nc):
    with pytest.raises(RPCError) as err:
        nc.create_subscription(start_time="2026-01-01T00:00:00Z")
    assert err.value.tag == "operation-failed"


def test_announcement_with_a_bad_event_is_invalid_value_and_not_published(nc):
    with pytest.raises(RPCError) as err:
        announce(nc, "exploded")
    assert err.value.tag == "invalid-value"


# -- migration window ----------------------------------------------------------------------
def test_freeze_holds_new_sessions_until_thaw(busy):
    nat_rpc(busy, "freeze", "<migration-id>w-1</migration-id><timeout>30</timeout>")
    time.sleep(0.6)  # a traffic tick that was under way when freeze arrived
    held = created_count(busy)
    time.sleep(1.2)
    assert created_count(busy) == held
    nat_rpc(busy, "thaw", "<migration-id>w-1</migration-id>")
    time.sleep(1.2)
    assert created_count(busy) > held


def test_freeze_of_one_prefix_leaves_other_sources_alone(busy):
    nat_rpc(busy, "freeze", "<migration-id>w-2</migration-id>"
            "<source-prefix>192.168.0.0/16</source-prefix>")  # no traffic comes from there
    try:
        before = created_count(busy)
        time.sleep(1.2)
        assert created_count(busy) > before
    finally:
        nat_rpc(busy, "thaw", "<migration-id>w-2</migration-id>")


def test_window_that_times_out_thaws_and_reports_a_failed_migration(busy):
    busy.create_subscription(filter=("subtree", f'<migration-event xmlns="{NAT_NS}"/>'))
    nat_rpc(busy, "freeze", "<migration-id>w-3</migration-id><timeout>1</timeout>")
    event = notification_content(busy, timeout=5)
    assert event.findtext("n:event", namespaces=NS) == "failed"
    held = created_count(busy)
    time.sleep(1.2)
    assert created_count(busy) > held


def test_thaw_of_a_window_that_is_not_open_is_fine(nc):
    assert nat_rpc(nc, "thaw", "<migration-id>never-opened</migration-id>").ok


def test_freeze_with_a_bad_prefix_is_invalid_value(nc):
    with pytest.raises(RPCError) as err:
        nat_rpc(nc, "freeze", "<migration-id>w-4</migration-id>"
                "<source-prefix>10.0.0.300/24</source-prefix>")
    assert err.value.tag == "invalid-value"


def test_freeze_without_migration_id_is_missing_element(nc):
    with pytest.raises(RPCError) as err:
        nat_rpc(nc, "freeze")
    assert err.value.tag == "missing-element"


# -- confirmed commit ----------------------------------------------------------------------
def commit(nc, leaves: str = ""):
    return rpc(nc, f'<commit xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">{leaves}</commit>')


def stage(nc, src: str) -> None:
    nc.edit_config(target="candidate", config=config(session_xml(src, 4200)))


def test_confirmed_commit_not_confirmed_in_time_is_rolled_back(nc):
    stage(nc, "10.8.0.1")
    commit(nc, "<confirmed/><confirm-timeout>1</confirm-timeout>")
    assert sessions_of(nc, "10.8.0.1")
    time.sleep(1.6)
    assert not sessions_of(nc, "10.8.0.1")


def test_confirming_commit_keeps_the_change(nc):
    stage(nc, "10.8.0.2")
    commit(nc, "<confirmed/><confirm-timeout>1</confirm-timeout>")
    commit(nc)
    time.sleep(1.6)
    assert sessions_of(nc, "10.8.0.2")


def test_cancel_commit_rolls_back_at_once(nc):
    stage(nc, "10.8.0.3")
    commit(nc, "<confirmed/>")
    rpc(nc, '<cancel-commit xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"/>')
    assert not sessions_of(nc, "10.8.0.3")


def test_rollback_restores_a_session_the_commit_deleted(nc):
    nc.edit_config(target="running", config=config(session_xml("10.8.0.4", 4200)))
    nc.edit_config(target="candidate", config=config(
        session_xml("10.8.0.4", 4200, attrs='xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0"'
                    ' nc:operation="delete"')))
    commit(nc, "<confirmed/>")
    assert not sessions_of(nc, "10.8.0.4")
    rpc(nc, '<cancel-commit xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"/>')
    assert sessions_of(nc, "10.8.0.4")


def test_confirmed_commit_ends_with_its_session(server, nc):
    with server.connect() as other:
        stage(other, "10.8.0.5")
        commit(other, "<confirmed/>")
        assert sessions_of(nc, "10.8.0.5")
    time.sleep(0.5)
    assert not sessions_of(nc, "10.8.0.5")


def test_persisted_confirmed_commit_survives_its_session_and_another_confirms_it(server, nc):
    with server.connect() as other:
        stage(other, "10.8.0.6")
        commit(other, "<confirmed/><confirm-timeout>2</confirm-timeout><persist>p-6</persist>")
    commit(nc, "<persist-id>p-6</persist-id>")
    time.sleep(2.5)
    assert sessions_of(nc, "10.8.0.6")


def test_another_session_cannot_confirm_an_unpersisted_confirmed_commit(server, nc):
    stage(nc, "10.8.0.7")
    commit(nc, "<confirmed/>")
    try:
        with server.connect() as other, pytest.raises(RPCError) as err:
            commit(other)
        assert err.value.tag == "in-use"
    finally:
        rpc(nc, '<cancel-commit xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"/>')


def test_confirm_timeout_without_confirmed_is_invalid_value(nc):
    with pytest.raises(RPCError) as err:
        commit(nc, "<confirm-timeout>5</confirm-timeout>")
    assert err.value.tag == "invalid-value"
