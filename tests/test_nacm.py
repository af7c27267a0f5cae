"""NACM (RFC 8341) through real `nfmig serve` processes, NETCONF (ncclient) and RESTCONF
(aiohttp) clients: every rule kind for a user inside and outside its group, the defaults,
the counters, the shipped groups (a real `nfmig migrate` as a migrator), the recovery
session; and, in process, that a permitted user's bulk work is never looked at entry by
entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError
from nfmig.nf_backends.base import Session
from nfmig.nf_backends.batch import SessionBatch
from nfmig.server import nacm
from nfmig.server.auth import User, add_user, load_users
from nfmig.server.errors import RpcError
from nfmig.server.filters import TopNode
from nfmig.server.nacm_config import NACM_NS, default_tree
from nfmig.server.schema import Schema

from .restconf_client import Restconf, start_with_restconf, yanglint

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
NS = {"n": NAT_NS, "a": NACM_NS}
PASSWORD = "nacm-tests-password"
# name -> groups in the users file; "rescue" is the recovery user, an operator otherwise
USERS = {"op": ["operator"], "mig": ["migrator"], "bob": ["team"], "carol": ["other"],
         "rescue": ["operator"]}
DNS = ("UDP", "10.7.0.1", "5000", "192.0.2.53", "53")


def add_users(workdir, users=USERS) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name, groups in users.items():
        # a cheap hash: a test's password needs no stretching, and logins are many
        add_user(workdir / "users", name, password=PASSWORD, log2_n=10, groups=groups)


@pytest.fixture(scope="module")
def nat(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nacm")
    add_users(workdir)
    server, port = start_with_restconf(workdir, "--sessions", "20",
                                       "--nacm-recovery-user", "rescue")
    server.rc = Restconf(server, port)
    yield server
    server.stop()


def connect(server, user: str = "admin") -> manager.Manager:
    return manager.connect(host="127.0.0.1", port=server.port, username=user,
                           password=server.password if user == "admin" else PASSWORD,
                           hostkey_verify=False, allow_agent=False, look_for_keys=False,
                           timeout=60)


@pytest.fixture(scope="module")
def admin(nat):
    m = connect(nat)
    yield m
    m.close_session()


def rest(nat, method: str, path: str, user: str = "admin", body=None, **kw):
    password = nat.password if user == "admin" else PASSWORD
    return nat.rc.request(method, path, body, user=user, password=password, **kw)


def session(key=DNS, extra: str = "") -> str:
    leaves = "".join(f"<{n}>{v}</{n}>" for n, v in zip(
        ("protocol", "src_address", "src_port", "dst_address", "dst_port"), key, strict=True))
    return f'<nat-session xmlns="{NAT_NS}">{leaves}{extra}</nat-session>'


def edit(m, body: str, target: str = "running", default: str = "") -> None:
    m.edit_config(target=target, default_operation=default or None,
                  config=f'<config xmlns="{NC}" xmlns:nc="{NC}">{body}</config>')


def rpc(m, body: str):
    return m.dispatch(etree.fromstring(body))


def denied(call, *args, **kw) -> None:
    with pytest.raises(RPCError) as caught:
        call(*args, **kw)
    assert caught.value.tag == "access-denied", caught.value


def data(m) -> etree._Element:
    """What <get> shows this user: running and state."""
    return etree.fromstring(m.get().xml.encode()).find(f"{{{NC}}}data")


def keys_of(tree: etree._Element) -> set[tuple]:
    return {tuple(e.findtext(f"n:{k}", namespaces=NS) for k in
                  ("protocol", "src_address", "src_port", "dst_address", "dst_port"))
            for e in tree.iterfind("n:nat-session", NS)}


def nacm_xml(inner: str) -> str:
    return f'<nacm xmlns="{NACM_NS}">{inner}</nacm>'


def team_rules(admin, rules: str, extra: str = "") -> None:
    """The rule-list of group team becomes ``rules``; ``extra`` other /nacm leaves."""
    edit(admin, nacm_xml(f'<rule-list nc:operation="replace"><name>team</name>'
                         f"<group>team</group>{rules}</rule-list>{extra}"))


def rule(name: str, access: str, action: str, module: str = "nfmig-nat", kind: str = "",
         target: str = "") -> str:
    typed = f"<{kind}>{target}</{kind}>" if kind else ""
    return (f"<rule><name>{name}</name><module-name>{module}</module-name>{typed}"
            f"<access-operations>{access}</access-operations><action>{action}</action></rule>")


@pytest.fixture
def team(admin):
    """Group team's rules are the test's; afterwards gone, and the defaults back."""
    yield
    edit(admin, nacm_xml('<rule-list nc:operation="remove"><name>team</name></rule-list>'
                         '<read-default nc:operation="remove"/>'
                         '<write-default nc:operation="remove"/>'
                         '<exec-default nc:operation="remove"/>'
                         '<enable-external-groups nc:operation="remove"/>'
                         '<enable-nacm nc:operation="remove"/>'
                         '<groups><group nc:operation="remove"><name>team</name></group>'
                         "</groups>"))
    edit(admin, session().replace("<nat-session", '<nat-session nc:operation="remove"'))


def counters(admin) -> dict[str, int]:
    tree = data(admin).find("a:nacm", NS)
    return {name: int(tree.findtext(f"a:{name}", namespaces=NS)) for name in
            ("denied-operations", "denied-data-writes", "denied-notifications")}


# -- the users file -------------------------------------------------------------------------
def test_users_file_groups_and_the_legacy_default(tmp_path):
    users = tmp_path / "users"
    users.write_text("old password scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$"
                     "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")  # before groups
    done = subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users),
                           "ann", "--password=x", "--scrypt-cost=10", "--group", "operator",
                           "--group", "migrator"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    add_user(users, "old", groups=["migrator"])  # groups alone, for an existing user
    loaded = load_users(users)
    assert loaded["ann"].groups == ["operator", "migrator"]
    assert loaded["old"].groups == ["migrator"] and loaded["old"].password_hashes
    engine = nacm.Nacm(shared_schema(), default_tree, {**loaded, **load_like({"legacy": []})})
    assert engine.access_of("legacy", "127.0.0.1").groups == {"admin"}
    assert engine.access_of("ann", "127.0.0.1").groups == {"operator", "migrator"}
    assert engine.access_of("stranger", "127.0.0.1").groups == set()
    refused = subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users),
                              "eve", "--group", "*all"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "group" in refused.stderr


_SCHEMA: list[Schema] = []


def shared_schema() -> Schema:
    """One libyang context for the in-process tests (each costs a fraction of a second)."""
    if not _SCHEMA:
        _SCHEMA.append(Schema())
    return _SCHEMA[0]


def load_like(groups: dict[str, list[str]]) -> dict[str, User]:
    return {name: User(name, groups=list(g)) for name, g in groups.items()}


# -- what is shipped -------------------------------------------------------------------------
def test_shipped_config_is_in_running_and_the_module_in_the_yang_library(admin, nat):
    tree = data(admin)
    lists = [e.findtext("a:name", namespaces=NS) for e in tree.iterfind("a:nacm/a:rule-list", NS)]
    assert lists[:3] == ["admin", "migrator", "operator"]
    assert {g.text for g in tree.iterfind("a:nacm/a:groups/a:group/a:name", NS)} >= {
        "admin", "migrator", "operator"}
    library = etree.tostring(tree, encoding="unicode")
    assert "<name>ietf-netconf-acm</name>" in library
    # RESTCONF's JSON of /nacm (config and counters) is valid by the model
    reply = rest(nat, "GET", "/restconf/data/ietf-netconf-acm:nacm")
    assert reply.status == 200
    body = reply.json()["ietf-netconf-acm:nacm"]
    assert "denied-operations" in body and body["rule-list"][0]["name"] == "admin"


def test_operator_reads_everything_and_changes_nothing(nat, admin):
    before = counters(admin)
    op = connect(nat, "op")
    try:
        seen = data(op)
        assert len(keys_of(seen)) >= 20 and seen.find("n:nat-state", NS) is not None
        assert seen.find("a:nacm/a:rule-list", NS) is not None  # read-only means all of it
        digest = rpc(op, f'<session-digest xmlns="{NAT_NS}"/>')  # a read: permitted
        assert "count" in digest.xml
        denied(edit, op, session())
        denied(op.lock, "running")
        denied(rpc, op, f'<freeze xmlns="{NAT_NS}"><migration-id>m</migration-id></freeze>')
        denied(rpc, op, f'<edit-data xmlns="{NCDS}" xmlns:ds="urn:ietf:params:xml:ns:yang:'
                        f'ietf-datastores"><datastore>ds:running</datastore><config>'
                        f"{session()}</config></edit-data>")
        denied(rpc, op, f'<kill-session xmlns="{NC}"><session-id>1</session-id></kill-session>')
    finally:
        op.close_session()
    # RESTCONF: each write method refused with 403 and an ietf-restconf:errors body
    entry = {"nfmig-nat:nat-session": [{"protocol": "UDP", "src_address": DNS[1],
                                        "src_port": 5000, "dst_address": DNS[3],
                                        "dst_port": 53}]}
    uri = "/restconf/data/nfmig-nat:nat-session=" + ",".join(DNS)
    for method, path, body in (("POST", "/restconf/data", entry), ("PUT", uri, entry),
                               ("PATCH", "/restconf/data", {"ietf-restconf:data": {
                                   "nfmig-nat:nat-policy": {"port-min": 2000}}}),
                               ("DELETE", "/restconf/data/nfmig-nat:nat-session="
                                          + ",".join(sorted(keys_of(data(admin)))[0]), None),
                               ("POST", "/restconf/operations/nfmig-nat:thaw",
                                {"nfmig-nat:input": {"migration-id": "m"}})):
        reply = rest(nat, method, path, "op", body)
        assert reply.status == 403, (method, path, reply.text)
        assert reply.error_tag == "access-denied"
    assert DNS not in keys_of(data(admin)) and len(keys_of(data(admin))) >= 20
    after = counters(admin)
    assert after["denied-operations"] >= before["denied-operations"] + 6
    assert after["denied-data-writes"] >= before["denied-data-writes"] + 4


def test_migrator_writes_nat_state_but_not_access_control(nat, admin):
    mig = connect(nat, "mig")
    try:
        assert data(mig).find("a:nacm", NS) is None  # default-deny-all: not shown
        mig.lock("candidate")
        edit(mig, session(), target="candidate")
        rpc(mig, f'<validate xmlns="{NC}"><source><candidate/></source></validate>')
        rpc(mig, f'<commit xmlns="{NC}"><confirmed/><confirm-timeout>60</confirm-timeout>'
                 "</commit>")
        mig.commit()
        mig.unlock("candidate")
        assert DNS in keys_of(data(admin))
        edit(mig, session().replace("<nat-session", '<nat-session nc:operation="delete"'))
        denied(edit, mig, nacm_xml("<read-default>deny</read-default>"))
        denied(mig.copy_config, source="running", target="startup")
        denied(mig.delete_config, target="startup")
    finally:
        mig.close_session()
    reply = rest(nat, "PATCH", "/restconf/data/ietf-netconf-acm:nacm", "mig",
                 {"ietf-netconf-acm:nacm": {"read-default": "deny"}})
    assert reply.status in (403, 404)  # it cannot even see /nacm
    assert data(admin).find("a:nacm/a:read-default", NS) is None


# -- each rule kind, for a user in its group (bob) and one outside it (carol) -----------------
def test_module_name_rule_hides_a_module(nat, admin, team):
    team_rules(admin, rule("no-nat", "read", "deny"))
    bob, carol = connect(nat, "bob"), connect(nat, "carol")
    try:
        inside, outside = data(bob), data(carol)
        assert not keys_of(inside) and inside.find("n:nat-state", NS) is None
        assert len(keys_of(outside)) >= 20 and outside.find("n:nat-state", NS) is not None
        assert "yang-library" in etree.tostring(inside, encoding="unicode")  # the rest stays
    finally:
        bob.close_session()
        carol.close_session()
    assert rest(nat, "GET", "/restconf/data/nfmig-nat:nat-state", "bob").status == 404
    assert rest(nat, "GET", "/restconf/data/nfmig-nat:nat-state", "carol").status == 200
    listed = rest(nat, "GET", "/restconf/data", "bob").json()["ietf-restconf:data"]
    assert "nfmig-nat:nat-session" not in listed


def test_rpc_name_rule_and_the_exec_default(nat, admin, team):
    team_rules(admin, rule("no-freeze", "exec", "deny", kind="rpc-name", target="freeze"))
    freeze = f'<freeze xmlns="{NAT_NS}"><migration-id>m-r</migration-id></freeze>'
    thaw = f'<thaw xmlns="{NAT_NS}"><migration-id>m-r</migration-id></thaw>'
    bob, carol = connect(nat, "bob"), connect(nat, "carol")
    try:
        before = counters(admin)["denied-operations"]
        denied(rpc, bob, freeze)
        rpc(bob, thaw)  # another rpc of the module: exec-default permit
        rpc(carol, freeze)
        rpc(carol, thaw)
        assert counters(admin)["denied-operations"] == before + 1
        # built in: kill-session and delete-config denied by default, close-session never
        denied(rpc, carol, f'<kill-session xmlns="{NC}"><session-id>1</session-id>'
                           "</kill-session>")
        denied(carol.delete_config, target="startup")
        team_rules(admin, "", "<exec-default>deny</exec-default>")
        denied(bob.get)
        denied(carol.get)
    finally:
        bob.close_session()  # permitted even now
        carol.close_session()


def test_notification_name_rule_drops_what_the_group_may_not_get(nat, admin, team):
    team_rules(admin, rule("no-changes", "read", "deny", kind="notification-name",
                           target="sessions-changed"))
    started = datetime.now(UTC)
    bob, carol = connect(nat, "bob"), connect(nat, "carol")
    try:
        bob.create_subscription()
        carol.create_subscription()
        before = counters(admin)["denied-notifications"]
        edit(admin, session())  # a sessions-changed
        rpc(admin, f'<announce-migration xmlns="{NAT_NS}"><migration-id>m-n</migration-id>'
                   "<role>source</role><event>started</event></announce-migration>")
        assert sorted(names(carol, 2)) == ["migration-event", "sessions-changed"]
        assert names(bob, 1) == ["migration-event"]
        assert bob.take_notification(timeout=1) is None
        assert counters(admin)["denied-notifications"] >= before + 1
    finally:
        bob.close_session()
        carol.close_session()
    # RESTCONF's stream too: bob's replay of the same minutes has no sessions-changed
    stopped = datetime.now(UTC)
    query = f"?start-time={started.isoformat()}&stop-time={stopped.isoformat()}"
    for user, wanted in (("bob", False), ("carol", True)):
        text = rest(nat, "GET", "/restconf/streams/NETCONF/json" + query.replace("+", "%2B"),
                    user, accept=None).text
        assert "migration-event" in text
        assert ("sessions-changed" in text) is wanted, (user, text)


def names(m, count: int) -> list[str]:
    out = []
    for _ in range(count):
        note = m.take_notification(timeout=10)
        assert note is not None, f"{len(out)} of {count} notifications arrived"
        root = etree.fromstring(note.notification_xml.encode()
                                if isinstance(note.notification_xml, str)
                                else note.notification_xml)
        out.append(next(etree.QName(c).localname for c in root
                        if etree.QName(c).localname != "eventTime"))
    return out


def test_path_rules_judge_entries_and_leaves(nat, admin, team):
    first = sorted(keys_of(data(admin)))[0]
    predicate = "".join(f"[nfmig-nat:{k}='{v}']" for k, v in zip(
        ("protocol", "src_address", "src_port", "dst_address", "dst_port"), first, strict=True))
    dns = "".join(f"[{k}='{v}']" for k, v in zip(
        ("protocol", "src_address", "src_port", "dst_address", "dst_port"), DNS, strict=True))
    team_rules(admin,
               rule("hide-one", "read", "deny", kind="path",
                    target=f"/nfmig-nat:nat-session{predicate}")
               + rule("no-timeouts", "read", "deny", kind="path",
                      target="/nfmig-nat:nat-session/nfmig-nat:timeout")
               + rule("dns-only", "create update delete", "permit", kind="path",
                      target=f"/nfmig-nat:nat-session{dns}"))
    stored = data(admin).find("a:nacm/a:rule-list[a:name='team']/a:rule/a:path", NS)
    assert stored.text.startswith("/nfmig-nat:nat-session[nfmig-nat:protocol=")
    bob, carol = connect(nat, "bob"), connect(nat, "carol")
    try:
        inside, outside = data(bob), data(carol)
        assert keys_of(inside) == keys_of(outside) - {first}
        assert inside.find("n:nat-session/n:timeout", NS) is None
        assert outside.find("n:nat-session/n:timeout", NS) is not None
        other = ("UDP", "10.7.0.2", "5000", "192.0.2.53", "53")
        denied(edit, bob, session() + session(other))  # all or nothing
        assert not {DNS, other} & keys_of(data(admin))
        edit(bob, session())  # the one entry the rule names
        assert DNS in keys_of(data(admin))
        denied(edit, carol, session().replace("<nat-session", '<nat-session nc:operation='
                                              '"delete"'))  # write-default deny
    finally:
        bob.close_session()
        carol.close_session()


def test_access_operations_tell_create_update_and_delete_apart(nat, admin, team):
    new, timeout = session(), session(extra="<timeout>77</timeout>")
    delete = session().replace("<nat-session", '<nat-session nc:operation="delete"')
    team_rules(admin, rule("create-delete", "create delete", "permit"))
    bob = connect(nat, "bob")
    try:
        before = counters(admin)["denied-data-writes"]
        edit(bob, new)  # create
        denied(edit, bob, timeout)  # merge into an existing entry: update
        edit(bob, delete)
        team_rules(admin, rule("update", "update", "permit"))
        denied(edit, bob, new)  # merge of an entry not there: create
        edit(admin, new)
        edit(bob, timeout)
        denied(edit, bob, delete)
        assert counters(admin)["denied-data-writes"] == before + 3
        # the same through RESTCONF: 403, nothing applied
        uri = "/restconf/data/nfmig-nat:nat-session=" + ",".join(DNS)
        assert rest(nat, "DELETE", uri, "bob").status == 403
        assert rest(nat, "GET", uri, "carol").status == 200
    finally:
        bob.close_session()


def test_groups_in_nacm_and_external_groups(nat, admin, team):
    team_rules(admin, rule("no-nat", "read", "deny"))
    # carol joins team through /nacm/groups; bob's team comes from the users file only
    edit(admin, nacm_xml("<groups><group><name>team</name><user-name>carol</user-name>"
                         "</group></groups>"))
    bob, carol = connect(nat, "bob"), connect(nat, "carol")
    try:
        assert not keys_of(data(bob)) and not keys_of(data(carol))
        edit(admin, nacm_xml("<enable-external-groups>false</enable-external-groups>"))
        assert keys_of(data(bob)) and not keys_of(data(carol))
        # admin's group came from the users file too: admin is locked out now
        denied(edit, admin, nacm_xml("<enable-external-groups>true</enable-external-groups>"))
    finally:
        bob.close_session()
        carol.close_session()
        rescue = connect(nat, "rescue")  # the recovery session puts it right
        edit(rescue, nacm_xml('<enable-external-groups nc:operation="remove"/>'))
        rescue.close_session()


def test_defaults_for_a_user_no_rule_list_names(nat, admin, team):
    carol = connect(nat, "carol")
    try:
        assert keys_of(data(carol))  # read-default permit
        denied(edit, carol, session())  # write-default deny
        team_rules(admin, "", "<read-default>deny</read-default>"
                              "<write-default>permit</write-default>")
        assert not keys_of(data(carol)) and data(carol).find("n:nat-state", NS) is None
        edit(carol, session())
        edit(carol, session().replace("<nat-session", '<nat-session nc:operation="delete"'))
        denied(edit, carol, nacm_xml("<read-default>permit</read-default>"))  # deny-all
        edit(admin, nacm_xml("<enable-nacm>false</enable-nacm>"))  # nothing is checked
        assert data(carol).find("a:nacm/a:rule-list", NS) is not None
        edit(carol, nacm_xml("<read-default>permit</read-default>"))
    finally:
        carol.close_session()


# -- lock-outs ---------------------------------------------------------------------------
def test_recovery_session_repairs_a_lock_out(nat, admin):
    admin_list = nacm_xml('<rule-list><name>admin</name><group>admin</group><rule>'
                          "<name>permit-all</name><module-name>*</module-name>"
                          "<access-operations>*</access-operations><action>permit</action>"
                          "</rule></rule-list>")
    edit(admin, nacm_xml('<rule-list nc:operation="delete"><name>admin</name></rule-list>'))
    try:
        denied(edit, admin, f'<nat-policy xmlns="{NAT_NS}"><port-min>2000</port-min>'
                            "</nat-policy>")
        denied(edit, admin, admin_list)  # cannot give itself the rights back
        rescue = connect(nat, "rescue")  # an operator, but the recovery user, from here
        try:
            edit(rescue, admin_list.replace("<rule-list>", '<rule-list nc:operation="create">'))
        finally:
            rescue.close_session()
    finally:  # whatever failed, the module's other tests need admin back
        reply = rest(nat, "PUT", "/restconf/data/ietf-netconf-acm:nacm/rule-list=admin",
                     "rescue", {"ietf-netconf-acm:rule-list": [{
                         "name": "admin", "group": ["admin"], "rule": [{
                             "name": "permit-all", "module-name": "*",
                             "access-operations": "*", "action": "permit"}]}]})
        assert reply.status == 204, reply.text  # the recovery session over RESTCONF
    assert [e.text for e in data(admin).iterfind("a:nacm/a:rule-list/a:name", NS)][-1] == \
        "admin"
    edit(admin, f'<nat-policy xmlns="{NAT_NS}" nc:operation="remove"/>')  # admin again
    engine = nacm.Nacm(shared_schema(), default_tree, {"rescue": object()}, "rescue")
    assert engine.access_of("rescue", "127.0.0.1").recovery
    assert not engine.access_of("rescue", "192.0.2.10").recovery  # only from the host


def test_replacing_a_datastore_keeps_nacm_and_a_cancelled_commit_restores_it(nat, admin):
    edit(admin, f'<nat-policy xmlns="{NAT_NS}"><port-min>3000</port-min></nat-policy>',
         target="candidate", default="replace")
    candidate = etree.fromstring(admin.get_config("candidate").xml.encode())
    assert candidate.find(f".//{{{NACM_NS}}}rule-list") is not None
    admin.discard_changes()
    edit(admin, nacm_xml("<read-default>deny</read-default>"), target="candidate")
    rpc(admin, f'<commit xmlns="{NC}"><confirmed/><persist>p-nacm</persist></commit>')
    assert data(admin).findtext("a:nacm/a:read-default", namespaces=NS) == "deny"
    rpc(admin, f'<cancel-commit xmlns="{NC}"><persist-id>p-nacm</persist-id></cancel-commit>')
    assert data(admin).find("a:nacm/a:read-default", NS) is None


def test_rules_written_as_restconf_json_read_back_valid(nat, tmp_path):
    rule_json = {"name": "json-path", "module-name": "nfmig-nat",
                 "path": "/nfmig-nat:nat-session/timeout", "access-operations": "read",
                 "action": "deny"}
    body = {"ietf-netconf-acm:rule-list": [{"name": "json", "group": ["nobody"],
                                            "rule": [rule_json]}]}
    assert rest(nat, "POST", "/restconf/data/ietf-netconf-acm:nacm", body=body).status == 201
    try:
        reply = rest(nat, "GET", "/restconf/data")
        assert reply.status == 200
        lists = reply.json()["ietf-restconf:data"]["ietf-netconf-acm:nacm"]["rule-list"]
        path = next(r for r in lists if r["name"] == "json")["rule"][0]["path"]
        assert path == "/nfmig-nat:nat-session/timeout"  # RFC 7951: one prefix
        checked = yanglint(reply.json(), tmp_path)
        assert checked.returncode == 0, checked.stderr
        xml = rest(nat, "GET", "/restconf/data/ietf-netconf-acm:nacm",
                   accept="application/yang-data+xml").text
        assert 'xmlns:nfmig-nat="urn:nfmig' in xml
    finally:
        assert rest(nat, "DELETE", "/restconf/data/ietf-netconf-acm:nacm/rule-list=json"
                    ).status == 204


# -- the migrator group runs a real migration -------------------------------------------------
@pytest.fixture
def pair(tmp_path):
    """NAT a (30 sessions; NETCONF and RESTCONF) and NAT b (empty), each with a migrator
    and an operator."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str, sessions: int):
        add_users(tmp_path / name, {"mig": ["migrator"], "op": ["operator"]})
        return start_with_restconf(tmp_path / name, "--sessions", str(sessions))
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(one, "a", 30), pool.submit(one, "b", 0)]
    servers = []
    for future in started:
        server, server.restconf_port = future.result()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


def migrate(source: str, target: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    return subprocess.run([sys.executable, "-m", "nfmig", "migrate", source, target,
                           "--password-file", str(secret), "--insecure-no-host-key-check",
                           "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NFMIG_PASSWORD": "", **env})


def test_a_migrator_migrates_and_an_operator_cannot(pair, tmp_path):
    a, b = pair
    def netconf(user: str, server) -> str:
        return f"netconf://{user}@127.0.0.1:{server.port}"
    refused = migrate(netconf("op", a), netconf("op", b), tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "access-denied" in refused.stdout + refused.stderr or \
        "may not" in refused.stdout + refused.stderr
    done = migrate(netconf("mig", a), netconf("mig", b), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["result"] == "success" and report["sessions_moved"] == 30
    assert counts(a, b) == (0, 30)
    # and back, into a RESTCONF end: YANG Patch, validate, commit, over /restconf/operations
    back = migrate(netconf("mig", b), f"restconf://mig@127.0.0.1:{a.restconf_port}", tmp_path,
                   SSL_CERT_FILE=str(a.state_dir / "restconf-cert.pem"))
    assert back.returncode == 0, back.stdout + back.stderr
    assert counts(a, b) == (30, 0)


def counts(*servers) -> tuple[int, ...]:
    out = []
    for server in servers:
        m = connect(server)
        try:
            out.append(len(keys_of(data(m))))
        finally:
            m.close_session()
    return tuple(out)


# -- in process: a permitted user's bulk work is not looked at entry by entry -----------------
class _Untouchable:
    def __call__(self, *args):
        raise AssertionError("a permitted write looked at its entries")


def with_entry_rule(access: str) -> etree._Element:
    """The shipped /nacm, and first a rule of the migrators' that denies ``access`` to the
    one entry DNS names."""
    running = default_tree()
    running.insert(1, etree.fromstring(
        f'<rule-list xmlns="{NACM_NS}"><name>x</name><group>migrator</group><rule><name>r'
        f'</name><module-name>*</module-name><path xmlns:n="{NAT_NS}">/n:nat-session'
        "[n:protocol='UDP'][n:src_address='10.7.0.1'][n:src_port='5000']"
        f"[n:dst_address='192.0.2.53'][n:dst_port='53']</path><access-operations>{access}"
        "</access-operations><action>deny</action></rule></rule-list>"))
    return running


def test_permitted_bulk_work_is_judged_once_per_subtree():
    running = default_tree()
    users = load_like({"mig": ["migrator"], "op": ["operator"], "root": []})
    engine = nacm.Nacm(shared_schema(), lambda: running, users)
    sessions = TopNode(NAT_NS, "nat-session", lambda: [session()])
    policy = TopNode(NAT_NS, "nat-policy", lambda: ["<nat-policy/>"])
    for user in ("mig", "root"):
        with nacm.acting(engine.access_of(user, "192.0.2.1")):
            nacm.guard_write([], _Untouchable(), _Untouchable())
            kept = nacm.readable([sessions, policy])
            assert kept[0] is sessions and kept[1] is policy  # not wrapped: streamed as is
            assert nacm.reads_whole(NAT_NS, "nat-session")
    with nacm.acting(engine.access_of("op", "192.0.2.1")), \
            pytest.raises(RpcError, match="may not create"):
        nacm.guard_write([], SessionBatch.put([Session(*DNS[:2], 5000, DNS[3], 53)]), None)
    # a rule naming one entry: now each entry is judged, and only as deep as the rule goes
    running = with_entry_rule("read")
    with nacm.acting(engine.access_of("mig", "192.0.2.1")):
        assert not nacm.reads_whole(NAT_NS, "nat-session")
        other = session(("TCP", "10.0.0.9", "1", "192.0.2.9", "2"))
        mixed = TopNode(NAT_NS, "nat-session", lambda: [session() + other])
        assert "".join(nacm.readable([mixed])[0].produce()) == other


def test_a_large_edit_is_judged_entry_by_entry_when_a_rule_names_entries():
    """100k entries, one of them the one the rule denies: found, in well under the time a
    backend takes to write them."""
    running = with_entry_rule("create")
    engine = nacm.Nacm(shared_schema(), lambda: running, load_like({"mig": ["migrator"]}))
    entries = [Session("TCP", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1024 + i % 60000,
                       "198.51.100.1", 443) for i in range(100_000)]
    started = time.perf_counter()
    with nacm.acting(engine.access_of("mig", "192.0.2.1")):
        nacm.guard_write([], SessionBatch.put(entries), lambda keys: set())
        with pytest.raises(RpcError, match="may not create /nfmig-nat:nat-session"):
            nacm.guard_write([], SessionBatch.put([*entries, Session(*DNS[:2], 5000, DNS[3],
                                                                     53)]), lambda keys: set())
    assert time.perf_counter() - started < 10
