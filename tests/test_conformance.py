"""Conformance: every NETCONF operation and parameter the README claims, each a request
and its reply checked by yanglint against the modules the server's own yang-library lists
(the request as an `nc-rpc`, the reply as its `nc-reply`, and the data a read returns as
instance data), then the same exchange through each kind of client a user brings:
ncclient, netconf-console2, OpenSSH's ssh, paramiko raw on :base:1.1 and a client that
speaks only :base:1.0.

The server is a real `nfmig serve` (simulated NAT, NETCONF and RESTCONF)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree
from ncclient import manager
from nfmig.client.local import LocalServer

from .conformance import GET, GETCONFIG, YANGLIB, Library
from .rawclient import RawClient
from .restconf_client import Restconf, start_with_restconf
from .test_ssh_hardening import UserKey

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NAT = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
NCM = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
NOTIF = "urn:ietf:params:xml:ns:netconf:notification:1.0"
POLICY = (f'<nat-policy xmlns="{NAT}"><external-address>192.0.2.1</external-address>'
          "</nat-policy>")
pytestmark = pytest.mark.filterwarnings("ignore:DSA is deprecated")


def session_xml(port: int, operation: str | None = None) -> str:
    op = f' xmlns:nc="{NC}" nc:operation="{operation}"' if operation else ""
    return (f'<nat-session xmlns="{NAT}"{op}><protocol>TCP</protocol>'
            f"<src_address>10.0.0.77</src_address><src_port>{port}</src_port>"
            "<dst_address>198.51.100.7</dst_address><dst_port>443</dst_port>"
            "<translated_address>192.0.2.1</translated_address>"
            f"<translated_port>{port}</translated_port><tcp_state>established</tcp_state>"
            "</nat-session>")


def config(body: str) -> str:
    return f"<config>{body}</config>"


class Nat:
    """The server under test, its listed modules, and a user with an SSH key."""

    def __init__(self, local: LocalServer, restconf_port: int, key: UserKey):
        self.local = local
        self.rc = Restconf(local, restconf_port)
        self.key = key
        self.library: Library | None = None

    def raw(self, base11: bool = True) -> RawClient:
        return RawClient(self.local.port, self.local.user, self.local.password, base11=base11)

    def ncclient(self) -> manager.Manager:
        return manager.connect(host="127.0.0.1", port=self.local.port,
                               username=self.local.user, password=self.local.password,
                               hostkey_verify=False, allow_agent=False, look_for_keys=False,
                               timeout=60)


@pytest.fixture(scope="module")
def nat(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("conformance")
    key = UserKey(workdir, "keyed")
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(workdir / "users"),
                    "keyed", "--key", str(key.public)], check=True, capture_output=True)
    local, port = start_with_restconf(workdir, "--sessions", "20")
    served = Nat(local, port, key)
    client = served.raw()
    try:
        assert b"<ok/>" in client.rpc(f"<edit-config><target><running/></target>"
                                      f"{config(POLICY)}</edit-config>")
        data = etree.fromstring(client.rpc(f'<get><filter type="subtree"><yang-library '
                                           f'xmlns="{YANGLIB}"/></filter></get>'))
        served.library = Library.from_xml(data)
    finally:
        client.close()
    yield served
    local.stop()
    assert "Traceback" not in local.log.read_text(), local.log.read_text()[-3000:]


def yanglint(library: Library, kind: str, path: Path, *extra: str
             ) -> subprocess.CompletedProcess:
    schemas, features = [], []
    for m in library.implemented():
        schemas.append(str(m.file))
        features += ["-F", f"{m.name}:{','.join(m.features)}"]
    return subprocess.run(["yanglint", "-D", "-p", str(m.file.parent), "-f", "xml", "-t", kind,
                           *extra, *features, *schemas, str(path)],
                          capture_output=True, text=True, timeout=60)


def exchange(nat: Nat, client: RawClient, inner: str, tmp_path: Path,
             data: str | None = None) -> etree._Element:
    """Send ``inner`` as an rpc; yanglint checks the request, the reply, and (``data``:
    GET or GETCONFIG) the data the reply carries. Returns the reply."""
    stamp = time.monotonic_ns()
    request = (f'<rpc xmlns="{NC}" message-id="{stamp}">{inner}</rpc>').encode()
    rpc_file = tmp_path / f"rpc-{stamp}.xml"
    rpc_file.write_bytes(request)
    checked = yanglint(nat.library, "nc-rpc", rpc_file)
    assert checked.returncode == 0, f"the request itself is invalid:\n{checked.stderr}"
    reply = client.send_raw(request)
    reply_file = tmp_path / f"reply-{stamp}.xml"
    reply_file.write_bytes(reply)
    checked = yanglint(nat.library, "nc-reply", reply_file, "-R", str(rpc_file))
    assert checked.returncode == 0, f"yanglint refuses the reply:\n{checked.stderr}\n" \
                                    f"{reply[:2000]!r}"
    root = etree.fromstring(reply)
    if data is not None:
        assert root.find(f"{{{NC}}}rpc-error") is None, reply[:2000]
        nat.library.check(root, tmp_path, data)
    return root


def ok(root: etree._Element) -> bool:
    return root.find(f"{{{NC}}}ok") is not None


def error_tag(root: etree._Element) -> str | None:
    return root.findtext(f"{{{NC}}}rpc-error/{{{NC}}}error-tag")


@pytest.fixture
def raw(nat):
    client = nat.raw()
    yield client
    client.close()


# -- RFC 6241 operations ------------------------------------------------------------------

READS = {
    "get": ("<get/>", GET),
    "get, subtree filter": (f'<get><filter type="subtree"><nat-session xmlns="{NAT}">'
                            "<protocol>TCP</protocol></nat-session></filter></get>", GET),
    "get, XPath filter": (f'<get><filter type="xpath" xmlns:n="{NAT}" '
                          'select="/n:nat-session[n:protocol=\'TCP\']"/></get>', GET),
    "get-config running": ("<get-config><source><running/></source></get-config>",
                           GETCONFIG),
    "get-config candidate": ("<get-config><source><candidate/></source></get-config>",
                             GETCONFIG),
    "get-config startup": ("<get-config><source><startup/></source></get-config>",
                           GETCONFIG),
    "get-config, subtree filter": ("<get-config><source><running/></source>"
                                   f'<filter type="subtree"><nat-policy xmlns="{NAT}"/>'
                                   "</filter></get-config>", GETCONFIG),
    "get-config with-defaults report-all": (
        "<get-config><source><running/></source><with-defaults xmlns="
        '"urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults">report-all</with-defaults>'
        "</get-config>", GETCONFIG),
}


@pytest.mark.parametrize("name", READS)
def test_read_returns_valid_instance_data(nat, raw, tmp_path, name):
    request, kind = READS[name]
    exchange(nat, raw, request, tmp_path, kind)


NMDA_READS = {
    "operational": "",
    "operational, config-filter false": "<config-filter>false</config-filter>",
    "operational, max-depth 2": "<max-depth>2</max-depth>",
    "operational, subtree filter": (f'<subtree-filter><nat-session xmlns="{NAT}"><protocol>'
                                    "UDP</protocol></nat-session></subtree-filter>"),
    "operational, XPath filter": (f'<xpath-filter xmlns:n="{NAT}">/n:nat-session'
                                  "[n:protocol='TCP']</xpath-filter>"),
    "running": "", "candidate": "", "startup": "",
    # the parameter comes from a grouping used in get-data: the NMDA module's namespace
    "running, with-defaults trim": "<with-defaults>trim</with-defaults>",
}


@pytest.mark.parametrize("name", NMDA_READS)
def test_get_data_returns_valid_instance_data(nat, raw, tmp_path, name):
    datastore = name.split(",")[0]
    request = (f'<get-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>ds:{datastore}'
               f"</datastore>{NMDA_READS[name]}</get-data>")
    exchange(nat, raw, request, tmp_path, GET if datastore == "operational" else GETCONFIG)


def test_edit_config_validate_commit_of_the_candidate(nat, raw, tmp_path):
    edit = (f"<edit-config><target><candidate/></target>{config(session_xml(41001))}"
            "</edit-config>")
    assert ok(exchange(nat, raw, edit, tmp_path))
    assert ok(exchange(nat, raw, "<validate><source><candidate/></source></validate>",
                       tmp_path))
    assert ok(exchange(nat, raw, "<commit/>", tmp_path))
    held = exchange(nat, raw, "<get-config><source><running/></source><filter type="
                    f'"subtree">{session_xml(41001).split("<translated_address>")[0]}'
                    "</nat-session></filter></get-config>", tmp_path, GETCONFIG)
    assert held.find(f".//{{{NAT}}}nat-session") is not None


@pytest.mark.parametrize("operation, found", [
    ("create", True), ("merge", True), ("replace", True)])
def test_edit_config_operations_write_an_entry(nat, raw, tmp_path, operation, found):
    port = {"create": 41011, "merge": 41012, "replace": 41013}[operation]
    edit = (f"<edit-config><target><running/></target>"
            f"{config(session_xml(port, operation))}</edit-config>")
    assert ok(exchange(nat, raw, edit, tmp_path))
    assert _present(nat, raw, tmp_path, port) is found


@pytest.mark.parametrize("operation", ["delete", "remove"])
def test_edit_config_operations_take_an_entry_away(nat, raw, tmp_path, operation):
    port = 41021 if operation == "delete" else 41022
    exchange(nat, raw, f"<edit-config><target><running/></target>"
                       f"{config(session_xml(port))}</edit-config>", tmp_path)
    edit = (f"<edit-config><target><running/></target>"
            f"{config(session_xml(port, operation))}</edit-config>")
    assert ok(exchange(nat, raw, edit, tmp_path))
    assert not _present(nat, raw, tmp_path, port)


def _present(nat: Nat, raw: RawClient, tmp_path: Path, port: int) -> bool:
    key = session_xml(port).split("<translated_address>")[0] + "</nat-session>"
    reply = exchange(nat, raw, f'<get-config><source><running/></source><filter type="subtree">'
                               f"{key}</filter></get-config>", tmp_path, GETCONFIG)
    return reply.find(f".//{{{NAT}}}nat-session") is not None


def test_edit_config_test_only_changes_nothing(nat, raw, tmp_path):
    edit = (f"<edit-config><target><running/></target><test-option>test-only</test-option>"
            f"{config(session_xml(41031))}</edit-config>")
    assert ok(exchange(nat, raw, edit, tmp_path))
    assert not _present(nat, raw, tmp_path, 41031)


def test_edit_config_rollback_on_error_applies_nothing(nat, raw, tmp_path):
    bad = session_xml(41042).replace("<tcp_state>established", "<tcp_state>sleeping")
    edit = (f"<edit-config><target><running/></target><error-option>rollback-on-error"
            f"</error-option>{config(session_xml(41041) + bad)}</edit-config>")
    assert error_tag(exchange(nat, raw, edit, tmp_path)) == "invalid-value"
    assert not _present(nat, raw, tmp_path, 41041)


def test_edit_config_create_of_an_existing_entry_is_data_exists(nat, raw, tmp_path):
    exchange(nat, raw, f"<edit-config><target><running/></target>"
                       f"{config(session_xml(41051))}</edit-config>", tmp_path)
    edit = (f"<edit-config><target><running/></target>"
            f"{config(session_xml(41051, 'create'))}</edit-config>")
    assert error_tag(exchange(nat, raw, edit, tmp_path)) == "data-exists"


def test_edit_data_writes_the_candidate(nat, raw, tmp_path):
    edit = (f'<edit-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>ds:candidate</datastore>'
            f"<config>{session_xml(41061)}</config></edit-data>")
    assert ok(exchange(nat, raw, edit, tmp_path))
    assert ok(exchange(nat, raw, "<discard-changes/>", tmp_path))


def test_copy_config_and_delete_config_of_startup(nat, raw, tmp_path):
    assert ok(exchange(nat, raw, "<copy-config><target><startup/></target><source><running/>"
                                 "</source></copy-config>", tmp_path))
    assert ok(exchange(nat, raw, "<delete-config><target><startup/></target></delete-config>",
                       tmp_path))


def test_lock_is_exclusive_until_unlocked(nat, raw, tmp_path):
    other = nat.raw()
    try:
        assert ok(exchange(nat, raw, "<lock><target><candidate/></target></lock>", tmp_path))
        assert error_tag(exchange(nat, other, "<lock><target><candidate/></target></lock>",
                                  tmp_path)) == "lock-denied"
        assert ok(exchange(nat, raw, "<unlock><target><candidate/></target></unlock>",
                           tmp_path))
        assert ok(exchange(nat, other, "<lock><target><candidate/></target></lock>",
                           tmp_path))
        assert ok(exchange(nat, other, "<unlock><target><candidate/></target></unlock>",
                           tmp_path))
    finally:
        other.close()


def test_confirmed_commit_with_persist_then_cancel(nat, raw, tmp_path):
    exchange(nat, raw, f"<edit-config><target><candidate/></target>"
                       f"{config(session_xml(41071))}</edit-config>", tmp_path)
    assert ok(exchange(nat, raw, "<commit><confirmed/><confirm-timeout>60</confirm-timeout>"
                                 "<persist>conformance</persist></commit>", tmp_path))
    assert _present(nat, raw, tmp_path, 41071)
    assert ok(exchange(nat, raw, "<cancel-commit><persist-id>conformance</persist-id>"
                                 "</cancel-commit>", tmp_path))
    assert not _present(nat, raw, tmp_path, 41071)


def test_kill_session_ends_another_session(nat, raw, tmp_path):
    other = nat.raw()
    hello = etree.fromstring(other.server_hello)
    session_id = hello.findtext(f"{{{NC}}}session-id")
    assert ok(exchange(nat, raw, f"<kill-session><session-id>{session_id}</session-id>"
                                 "</kill-session>", tmp_path))
    with pytest.raises((EOFError, OSError)):
        other.rpc("<get-config><source><running/></source></get-config>")
    other.close()


def test_close_session_is_answered_ok(nat, tmp_path):
    client = nat.raw()
    try:
        assert ok(exchange(nat, client, "<close-session/>", tmp_path))
    finally:
        client.close()


def test_get_schema_returns_the_module_text(nat, raw, tmp_path):
    reply = exchange(nat, raw, f'<get-schema xmlns="{NCM}"><identifier>nfmig-nat</identifier>'
                               "<format>yang</format></get-schema>", tmp_path)
    assert "module nfmig-nat" in reply.findtext(f"{{{NCM}}}data")


def test_create_subscription_is_answered_ok(nat, tmp_path):
    # RFC 5277 defines the operation in XML Schema, not YANG: no module to check it with
    client = nat.raw()
    try:
        assert b"<ok/>" in client.rpc(f'<create-subscription xmlns="{NOTIF}"/>')
    finally:
        client.close()


# -- the model's own operations -----------------------------------------------------------

def test_session_digest_answers_count_and_digest(nat, raw, tmp_path):
    reply = exchange(nat, raw, f'<session-digest xmlns="{NAT}"/>', tmp_path)
    assert int(reply.findtext(f"{{{NAT}}}count")) >= 20


def test_track_changes_then_changes(nat, raw, tmp_path):
    assert ok(exchange(nat, raw, f'<track-changes xmlns="{NAT}"><migration-id>conf-1'
                                 "</migration-id></track-changes>", tmp_path))
    exchange(nat, raw, f"<edit-config><target><running/></target>"
                       f"{config(session_xml(41081))}</edit-config>", tmp_path)
    reply = exchange(nat, raw, f'<changes xmlns="{NAT}"><migration-id>conf-1</migration-id>'
                               "<stop/></changes>", tmp_path)
    ports = [s.findtext(f"{{{NAT}}}src_port") for s in reply.iter(f"{{{NAT}}}session")]
    assert "41081" in ports


def test_freeze_and_thaw(nat, raw, tmp_path):
    assert ok(exchange(nat, raw, f'<freeze xmlns="{NAT}"><migration-id>conf-2</migration-id>'
                                 "<source-prefix>10.0.9.0/24</source-prefix><timeout>30"
                                 "</timeout></freeze>", tmp_path))
    assert ok(exchange(nat, raw, f'<thaw xmlns="{NAT}"><migration-id>conf-2</migration-id>'
                                 "</thaw>", tmp_path))


def test_announce_migration(nat, raw, tmp_path):
    assert ok(exchange(nat, raw, f'<announce-migration xmlns="{NAT}"><migration-id>conf-3'
                                 "</migration-id><role>source</role><event>started</event>"
                                 "</announce-migration>", tmp_path))


# -- the client matrix: the same exchange through each kind of client ---------------------

EDIT = config(session_xml(42001))


def _check_running_holds(nat: Nat, port: int) -> None:
    client = nat.raw()
    try:
        key = session_xml(port).split("<translated_address>")[0] + "</nat-session>"
        reply = client.rpc(f'<get-config><source><running/></source><filter type="subtree">'
                           f"{key}</filter></get-config>")
        assert f"<src_port>{port}</src_port>".encode() in reply
    finally:
        client.close()


@pytest.mark.parametrize("base11", [True, False], ids=["paramiko raw, base 1.1",
                                                       "base 1.0 only"])
def test_raw_clients_read_and_write(nat, tmp_path, base11):
    client = nat.raw(base11=base11)
    port = 42011 if base11 else 42012
    try:
        exchange(nat, client, "<get-config><source><running/></source></get-config>",
                 tmp_path, GETCONFIG)
        assert ok(exchange(nat, client, f"<edit-config><target><running/></target>"
                                        f"{config(session_xml(port))}</edit-config>",
                           tmp_path))
    finally:
        client.close()
    _check_running_holds(nat, port)


def test_ncclient_reads_and_writes(nat, tmp_path):
    with nat.ncclient() as m:
        nat.library.check(m.get_config(source="running").data_ele, tmp_path, GETCONFIG)
        m.edit_config(target="candidate", config=f'<config xmlns="{NC}">'
                                                 f"{session_xml(42021)}</config>")
        m.commit()
    _check_running_holds(nat, 42021)


def test_netconf_console2_reads_and_writes(nat, tmp_path):
    console = str(Path(sys.executable).parent / "netconf-console2")
    common = [console, "--host", "127.0.0.1", "--port", str(nat.local.port), "-u",
              nat.local.user, "-p", nat.local.password]
    read = subprocess.run([*common, "--get-config"], capture_output=True, text=True,
                          timeout=60)
    assert read.returncode == 0, read.stderr
    nat.library.check(read.stdout, tmp_path, GETCONFIG)
    edit = tmp_path / "edit.xml"
    edit.write_text(session_xml(42031))
    wrote = subprocess.run([*common, "--edit-config", str(edit)], capture_output=True,
                           text=True, timeout=60)
    assert wrote.returncode == 0 and "<ok " in wrote.stdout, wrote.stdout + wrote.stderr
    _check_running_holds(nat, 42031)


def test_openssh_reads_and_writes(nat, tmp_path):
    ssh = shutil.which("ssh")
    if ssh is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ssh (OpenSSH client) is not installed")
        pytest.skip("ssh (OpenSSH client) is not installed")
    messages = [f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:'
                "1.0</capability></capabilities></hello>",
                f'<rpc xmlns="{NC}" message-id="1"><get-config><source><running/></source>'
                "</get-config></rpc>",
                f'<rpc xmlns="{NC}" message-id="2"><edit-config><target><running/></target>'
                f"{config(session_xml(42041))}</edit-config></rpc>",
                f'<rpc xmlns="{NC}" message-id="3"><close-session/></rpc>']
    result = subprocess.run(
        [ssh, "-F", "/dev/null", "-p", str(nat.local.port), "-i", str(nat.key.path),
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-s", "keyed@127.0.0.1", "netconf"],
        input="]]>]]>".join(messages) + "]]>]]>", capture_output=True, text=True, timeout=60)
    replies = [r for r in result.stdout.split("]]>]]>") if "<rpc-reply" in r]
    assert len(replies) == 3, result.stdout[-2000:] + result.stderr[-2000:]
    nat.library.check(replies[0], tmp_path, GETCONFIG)
    assert "<ok/>" in replies[1] and "<ok/>" in replies[2]
    _check_running_holds(nat, 42041)
