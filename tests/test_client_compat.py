"""What standard NETCONF and RESTCONF clients expect of a server: a terminal granted to
OpenSSH, with-defaults (RFC 6243), depth limits that keep list keys, a yang-library they can
use (RFC 8525, RFC 7895), monitoring statistics (RFC 6022), and methods a resource allows.

Every test runs a real `nfmig serve` and a real client (ncclient, netconf-console2,
OpenSSH's ssh, curl); every reply's data is checked by yanglint against the modules the
server's own yang-library lists (tests/conformance.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError
from nfmig.client.local import LocalServer

from .conformance import GET, GETCONFIG, Library
from .restconf_client import Restconf, start_with_restconf
from .test_ssh_hardening import UserKey

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NAT = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NCM = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
YANGLIB = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
WD = "urn:ietf:params:xml:ns:netconf:default:1.0"
CAP = "urn:ietf:params:netconf:capability:"
NS = {"n": NAT, "m": NCM, "y": YANGLIB, "nc": NC, "ds": NCDS}
KEYS = ("protocol", "src_address", "src_port", "dst_address", "dst_port")
# A policy that sets one leaf to its default (port-min) and leaves the rest unset.
POLICY = (f'<config xmlns="{NC}"><nat-policy xmlns="{NAT}"><external-address>192.0.2.1'
          "</external-address><port-min>1024</port-min></nat-policy></config>")
pytestmark = pytest.mark.filterwarnings("ignore:DSA is deprecated")


class Server:
    """One server, reached by NETCONF (password or key) and RESTCONF."""

    def __init__(self, local: LocalServer, restconf_port: int, key: UserKey):
        self.local = local
        self.port = local.port
        self.rc = Restconf(local, restconf_port)
        self.key = key

    def connect(self) -> manager.Manager:
        return manager.connect(host="127.0.0.1", port=self.port, username=self.local.user,
                               password=self.local.password, hostkey_verify=False,
                               allow_agent=False, look_for_keys=False, timeout=60)

    def console(self, *args: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).parent / "netconf-console2"
        return subprocess.run([str(exe), "--host", "127.0.0.1", "--port", str(self.port),
                               "-u", self.local.user, "-p", self.local.password, *args],
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compat")
    key = UserKey(workdir, "operator")
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(workdir / "users"),
                    "keyed", "--key", str(key.public)], check=True, capture_output=True)
    local, port = start_with_restconf(workdir, "--sessions", "20")
    server = Server(local, port, key)
    with server.connect() as m:
        m.edit_config(target="running", config=POLICY)
    yield server
    local.stop()
    assert "Traceback" not in local.log.read_text(), local.log.read_text()[-3000:]


@pytest.fixture
def nc(srv):
    m = srv.connect()
    yield m
    if m.connected:
        m.close_session()


@pytest.fixture(scope="module")
def library(srv) -> Library:
    """The modules the server lists, from its own yang-library over NETCONF."""
    with srv.connect() as m:
        return Library.from_xml(m.get(filter=("subtree", f'<yang-library xmlns="{YANGLIB}"/>'))
                                .data_ele)


def data_of(reply) -> etree._Element:
    return reply.data_ele


def get_data(m: manager.Manager, datastore: str, extra: str = "") -> etree._Element:
    reply = m.dispatch(etree.fromstring(
        f'<get-data xmlns="{NCDS}" xmlns:ds="urn:ietf:params:xml:ns:yang:ietf-datastores">'
        f"<datastore>ds:{datastore}</datastore>{extra}</get-data>"))
    return etree.fromstring(reply.xml.encode()).find("ds:data", NS)


def statistics(m: manager.Manager) -> dict[str, str]:
    data = data_of(m.get(filter=("subtree", f'<netconf-state xmlns="{NCM}"><statistics/>'
                                            "</netconf-state>")))
    return {etree.QName(c).localname: c.text for c in data.find("m:netconf-state/m:statistics",
                                                                NS)}


def my_session(m: manager.Manager) -> etree._Element:
    data = data_of(m.get(filter=("subtree", f'<netconf-state xmlns="{NCM}"><sessions><session>'
                                            f"<session-id>{m.session_id}</session-id>"
                                            "</session></sessions></netconf-state>")))
    return data.find("m:netconf-state/m:sessions/m:session", NS)


def wait_for(check, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# -- 1. a terminal before the subsystem ----------------------------------------------------
def test_openssh_asking_for_a_terminal_gets_its_netconf_session(srv):
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("OpenSSH's ssh is not installed")
    hello = (f'<?xml version="1.0" encoding="UTF-8"?><hello xmlns="{NC}"><capabilities>'
             f"<capability>urn:ietf:params:netconf:base:1.0</capability></capabilities>"
             "</hello>]]>]]>")
    rpcs = (f'<rpc message-id="1" xmlns="{NC}"><get><filter><nat-state xmlns="{NAT}"/>'
            f'</filter></get></rpc>]]>]]><rpc message-id="2" xmlns="{NC}"><close-session/>'
            "</rpc>]]>]]>")
    # -tt: a terminal is asked for although stdin is a pipe, as client libraries do
    out = subprocess.run([ssh, "-tt", "-F", "/dev/null", "-o", "BatchMode=yes",
                          "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-o", "IdentitiesOnly=yes", "-i", str(srv.key.path),
                          "-p", str(srv.port), "-s", "keyed@127.0.0.1", "netconf"],
                         input=(hello + rpcs).encode(), capture_output=True, timeout=60)
    text = out.stdout.decode()
    assert "<session-id>" in text, out.stderr.decode()
    assert "<implementation>simulated</implementation>" in text
    assert re.search(r'message-id="2"[^>]*>\s*<ok/>', text), text[-500:]


# -- 2. with-defaults (RFC 6243) -----------------------------------------------------------
def test_hello_announces_with_defaults_and_its_modes(nc):
    assert (f"{CAP}with-defaults:1.0?basic-mode=explicit"
            "&also-supported=report-all,trim,report-all-tagged") in nc.server_capabilities


def policy_of(data: etree._Element) -> etree._Element:
    policy = data.find("n:nat-policy", NS)
    assert policy is not None, etree.tostring(data)[:2000]
    return policy


def test_explicit_reports_what_was_set_even_at_its_default(nc, library, tmp_path):
    data = data_of(nc.get_config("running", with_defaults="explicit"))
    library.check(data, tmp_path, GETCONFIG)
    policy = policy_of(data)
    assert policy.findtext("n:port-min", namespaces=NS) == "1024"
    assert policy.find("n:port-max", NS) is None


def test_report_all_adds_every_default(nc, library, tmp_path):
    data = data_of(nc.get_config("running", with_defaults="report-all"))
    library.check(data, tmp_path, GETCONFIG)
    policy = policy_of(data)
    assert policy.findtext("n:port-max", namespaces=NS) == "65535"
    assert policy.findtext("n:timeouts/n:udp", namespaces=NS) == "120"


def test_trim_leaves_out_what_equals_its_default(nc, library, tmp_path):
    data = data_of(nc.get_config("running", with_defaults="trim"))
    library.check(data, tmp_path, GETCONFIG)
    policy = policy_of(data)
    assert policy.find("n:port-min", NS) is None
    assert policy.findtext("n:external-address", namespaces=NS) == "192.0.2.1"


def test_report_all_tagged_marks_each_default(nc, library, tmp_path):
    data = data_of(nc.get(filter=("subtree", f'<nat-policy xmlns="{NAT}"/>'),
                          with_defaults="report-all-tagged"))
    library.check(data, tmp_path, GET)
    policy = policy_of(data)
    assert policy.find("n:port-min", NS).get(f"{{{WD}}}default") == "true"
    assert policy.find("n:port-max", NS).get(f"{{{WD}}}default") == "true"
    assert policy.find("n:external-address", NS).get(f"{{{WD}}}default") is None


def test_netconf_console2_reads_with_defaults(srv):
    out = srv.console("--get-config", "--with-defaults", "report-all")
    assert out.returncode == 0, out.stderr
    assert "<port-max>65535</port-max>" in out.stdout


def test_get_data_of_a_configuration_datastore_takes_with_defaults(nc, library, tmp_path):
    data = get_data(nc, "running", "<with-defaults>report-all</with-defaults>")
    library.check(data, tmp_path, GETCONFIG)
    assert policy_of(data).findtext("n:port-max", namespaces=NS) == "65535"


def test_get_data_of_operational_refuses_with_defaults(nc):
    # RFC 8526 §3.1.1: only a server announcing :with-operational-defaults takes it there
    with pytest.raises(RPCError) as refused:
        get_data(nc, "operational", "<with-defaults>report-all</with-defaults>")
    assert refused.value.tag == "invalid-value"


def test_an_unknown_with_defaults_mode_is_invalid_value(nc):
    with pytest.raises(RPCError) as refused:
        nc.dispatch(etree.fromstring(
            f'<get-config xmlns="{NC}"><source><running/></source><with-defaults xmlns='
            '"urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults">all</with-defaults>'
            "</get-config>"))
    assert refused.value.tag == "invalid-value"


# -- 3. depth limits keep list keys --------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_max_depth_keeps_the_keys_of_every_list_entry(nc, library, tmp_path, depth):
    data = get_data(nc, "operational", f"<max-depth>{depth}</max-depth>")
    library.check(data, tmp_path, GET)
    entries = data.findall("n:nat-session", NS)
    assert entries
    for entry in entries:
        assert [etree.QName(c).localname for c in entry][:5] == list(KEYS)
    if depth == 1:  # the entries and their keys only
        assert all(len(entry) == 5 for entry in entries)
    else:  # the entries of a list two levels down keep theirs too
        module_sets = data.findall("y:yang-library/y:module-set", NS)
        assert module_sets and all(m.findtext("y:name", namespaces=NS) for m in module_sets)


@pytest.mark.parametrize("depth", [1, 2])
def test_restconf_depth_keeps_the_keys_of_every_list_entry(srv, library, tmp_path, depth):
    out = srv.rc.curl(f"{srv.rc.base}/restconf/data?depth={depth}")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    library.check(data, tmp_path, GET)
    content = data["ietf-restconf:data"]
    entries = content["nfmig-nat:nat-session"]
    assert entries and all(set(KEYS) <= set(e) for e in entries)
    if depth == 2:
        module_sets = content["ietf-yang-library:yang-library"]["module-set"]
        assert module_sets and all("name" in s for s in module_sets)


# -- 4. the yang-library -------------------------------------------------------------------
def test_yang_library_lists_every_datastore_with_its_schema(nc):
    data = data_of(nc.get(filter=("subtree", f'<yang-library xmlns="{YANGLIB}"/>')))
    stores = {d.findtext("y:name", namespaces=NS).split(":")[-1]:
              d.findtext("y:schema", namespaces=NS)
              for d in data.iterfind("y:yang-library/y:datastore", NS)}
    assert stores == dict.fromkeys(("running", "candidate", "startup", "operational"),
                                   "complete")


def test_netconf_replies_name_no_file_of_the_server(nc):
    text = nc.get().data_xml
    assert "file:" not in text
    assert "<location>NETCONF</location>" in text  # netconf-state/schemas: use get-schema


def test_every_module_listed_can_be_fetched_with_get_schema(nc, library):
    for module in library.modules:
        text = nc.get_schema(module.name, module.revision).data
        assert re.search(rf"module {re.escape(module.name)}\s*{{", text), module.name


def test_libyang_own_modules_are_not_announced(nc, library):
    assert "yang" not in library.names() and "ietf-yang-schema-mount" not in library.names()
    assert not any("?module=yang&" in c for c in nc.server_capabilities)


def test_yang_library_1_0_capability_names_the_module_set_of_modules_state(nc):
    cap = next(c for c in nc.server_capabilities if c.startswith(f"{CAP}yang-library:1.0?"))
    module_set_id = re.search(r"module-set-id=([^&]+)", cap).group(1)
    data = data_of(nc.get(filter=("subtree", f'<modules-state xmlns="{YANGLIB}"/>')))
    state = data.find("y:modules-state", NS)
    assert state.findtext("y:module-set-id", namespaces=NS) == module_set_id
    nat = next(m for m in state.iterfind("y:module", NS)
               if m.findtext("y:name", namespaces=NS) == "nfmig-nat")
    assert nat.findtext("y:conformance-type", namespaces=NS) == "implement"
    assert nat.find("y:schema", NS) is None  # get-schema, not a file of the server


def test_restconf_yang_library_locations_are_fetchable_urls(srv, library, tmp_path):
    data = srv.rc.get("/restconf/data/ietf-yang-library:yang-library").json()
    library.check(data, tmp_path, GET)
    module = next(m for m in data["ietf-yang-library:yang-library"]["module-set"][0]["module"]
                  if m["name"] == "nfmig-nat")
    url = module["location"][0]
    assert url.startswith(srv.rc.base + "/restconf/modules/nfmig-nat/")
    out = srv.rc.curl(url)
    assert out.returncode == 0 and "module nfmig-nat" in out.stdout


def test_whole_replies_are_valid_against_the_listed_modules(nc, srv, library, tmp_path):
    library.check(data_of(nc.get()), tmp_path, GET)
    library.check(data_of(nc.get_config("running")), tmp_path, GETCONFIG)
    library.check(srv.rc.get("/restconf/data").json(), tmp_path, GET)


# -- 5. monitoring statistics --------------------------------------------------------------
def test_netconf_state_reports_statistics(nc, library, tmp_path):
    data = data_of(nc.get(filter=("subtree", f'<netconf-state xmlns="{NCM}"/>')))
    library.check(data, tmp_path, GET)
    stats = statistics(nc)
    assert set(stats) == {"netconf-start-time", "in-bad-hellos", "in-sessions",
                          "dropped-sessions", "in-rpcs", "in-bad-rpcs", "out-rpc-errors",
                          "out-notifications"}
    assert int(stats["in-sessions"]) >= 1 and int(stats["in-rpcs"]) >= 1


def test_a_session_closed_properly_is_not_dropped(srv, nc):
    before = statistics(nc)
    with srv.connect():
        pass  # close-session
    after = statistics(nc)
    assert int(after["in-sessions"]) == int(before["in-sessions"]) + 1
    assert after["dropped-sessions"] == before["dropped-sessions"]


def test_a_session_whose_transport_breaks_is_dropped(srv, nc):
    before = int(statistics(nc)["dropped-sessions"])
    other = srv.connect()
    other._session._transport.close()  # no close-session
    wait_for(lambda: int(statistics(nc)["dropped-sessions"]) == before + 1)


def test_a_bad_hello_is_counted(srv, nc):
    before = int(statistics(nc)["in-bad-hellos"])
    transport = paramiko.Transport(("127.0.0.1", srv.port))
    try:
        transport.connect(username=srv.local.user, password=srv.local.password)
        chan = transport.open_session()
        chan.invoke_subsystem("netconf")
        chan.sendall(b"<hello xmlns='urn:example:not-netconf'/>]]>]]>")
        wait_for(lambda: int(statistics(nc)["in-bad-hellos"]) == before + 1)
    finally:
        transport.close()


def test_notifications_sent_are_counted(srv, nc):
    nc.create_subscription()
    before = int(statistics(nc)["out-notifications"])
    with srv.connect() as migrator:
        migrator.dispatch(etree.fromstring(
            f'<announce-migration xmlns="{NAT}"><migration-id>m-9</migration-id><role>source'
            "</role><event>started</event></announce-migration>"))
    assert nc.take_notification(timeout=10) is not None
    assert my_session(nc).findtext("m:out-notifications", namespaces=NS) == "1"
    assert int(statistics(nc)["out-notifications"]) == before + 1


# -- 5. methods a resource allows ------------------------------------------------------------
@pytest.mark.parametrize("path", ["/restconf/data/nfmig-nat:nat-state",
                                  "/restconf/data/ietf-yang-library:yang-library",
                                  "/restconf/ds/ietf-datastores:operational"])
def test_options_on_a_read_only_resource_allows_only_reads(srv, path):
    reply = srv.rc.request("OPTIONS", path)
    assert reply.status == 200
    assert [m.strip() for m in reply.headers["Allow"].split(",")] == ["GET", "HEAD", "OPTIONS"]
    assert "Accept-Patch" not in reply.headers


def test_options_on_configuration_allows_writes(srv):
    reply = srv.rc.request("OPTIONS", "/restconf/data/nfmig-nat:nat-policy")
    assert "PUT" in reply.headers["Allow"] and "PATCH" in reply.headers["Allow"]
