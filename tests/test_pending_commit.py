"""A confirmed commit that is never confirmed is rolled back even when the server dies
(RFC 6241 §8.4): its undo record lives in the state directory while it is pending, and a
server that finds one at start rolls that commit back.

Real server processes throughout: killed with SIGKILL and started again on the same state
directory. The kernel NAT is where it matters most: conntrack entries outlive the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
from lxml import etree
from nfmig.client.local import LocalServer, start_local_server
from nfmig.nf_backends.base import SESSION_FIELDS

from nfmig.testbed import TestBed

from .conftest import NAT_NS, NC_NS, RunningServer

PENDING = "pending-commit.json"
NC_ATTRS = f'xmlns="{NAT_NS}" xmlns:nc="{NC_NS}"'
KEY_LEAVES = ("protocol", "src_address", "src_port", "dst_address", "dst_port")


# -- helpers -------------------------------------------------------------------------------
def entry(src: str, sport: int, dst: str = "198.51.100.9", dport: int = 80,
          operation: str | None = None, leaves: str = "") -> str:
    op = f' nc:operation="{operation}"' if operation else ""
    return (f"<nat-session {NC_ATTRS}{op}><protocol>TCP</protocol>"
            f"<src_address>{src}</src_address><src_port>{sport}</src_port>"
            f"<dst_address>{dst}</dst_address><dst_port>{dport}</dst_port>{leaves}"
            "</nat-session>")


def config(*nodes: str) -> str:
    return f'<config xmlns="{NC_NS}">{"".join(nodes)}</config>'


def rpc(m, body: str):
    return m.dispatch(etree.fromstring(body))


def commit(m, leaves: str = ""):
    return rpc(m, f'<commit xmlns="{NC_NS}">{leaves}</commit>')


def running(m) -> tuple[dict[tuple[str, ...], dict[str, str]], etree._Element | None]:
    """Running's sessions (key -> leaf -> text) and its nat-policy element, if any."""
    data = etree.fromstring(m.get_config(source="running").data_xml.encode())
    sessions = {}
    for node in data.iter(f"{{{NAT_NS}}}nat-session"):
        leaves = {etree.QName(leaf).localname: leaf.text for leaf in node}
        sessions[tuple(leaves[k] for k in KEY_LEAVES)] = leaves
    return sessions, data.find(f"{{{NAT_NS}}}nat-policy")


def kill_hard(server: LocalServer) -> None:
    """What a crash does: SIGKILL, no clean-up of any kind (to the server's process group,
    which start_local_server made for it: nothing it started outlives the test either)."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def restart(server: LocalServer, *serve_args: str) -> RunningServer:
    """A new server on the dead one's state directory (and users file, same password)."""
    started = start_local_server(server.state_dir.parent, *serve_args, password=server.password)
    return RunningServer(**vars(started))


def read_record(state_dir: Path) -> dict:
    """The record with its extensions (a follow-up commit's keys, persist and deadline)."""
    path = state_dir / PENDING
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it names users' connections
    record = json.loads(path.read_text())
    number = 1
    while (extension := path.with_name(f"{path.stem}.{number}{path.suffix}")).exists():
        assert stat.S_IMODE(extension.stat().st_mode) == 0o600
        more = json.loads(extension.read_text())
        known = {tuple(key) for key, _ in record["undo_sessions"]}
        assert all(tuple(key) not in known for key, _ in more["undo_sessions"])  # only new
        record["undo_sessions"] += more["undo_sessions"]
        record.update(persist=more["persist"], deadline=more["deadline"])
        number += 1
    return record


@pytest.fixture
def servers():
    """Every server a test starts, stopped at the end (by process group) whatever happens."""
    started: list[LocalServer] = []
    yield started
    for server in started:
        server.stop()


# -- the record follows the pending commit --------------------------------------------------
def test_the_record_is_there_while_the_commit_is_pending_and_gone_once_confirmed(server, nc):
    state_dir = server.state_dir
    nc.edit_config(target="running", config=config(entry("10.31.0.1", 4000, leaves=(
        "<translated_address>192.0.2.31</translated_address>"
        "<translated_port>31000</translated_port>"))))
    nc.edit_config(target="candidate", config=config(
        entry("10.31.0.2", 4000),
        entry("10.31.0.1", 4000, leaves="<translated_port>31001</translated_port>")))
    commit(nc, "<confirmed/><confirm-timeout>300</confirm-timeout><persist>p-31</persist>")
    record = read_record(state_dir)
    assert record["persist"] == "p-31"
    assert abs(record["deadline"] - (time.time() + 300)) < 30  # wall-clock time
    assert record["policy_changed"] is False and record["undo_policy"] is None
    assert record["session_fields"] == list(SESSION_FIELDS)
    undo = {tuple(key): previous for key, previous in record["undo_sessions"]}
    assert undo[("TCP", "10.31.0.2", 4000, "198.51.100.9", 80)] is None  # created by it
    previous = undo[("TCP", "10.31.0.1", 4000, "198.51.100.9", 80)]  # changed by it
    assert dict(zip(SESSION_FIELDS, previous, strict=True))["translated_port"] == 31000

    # A follow-up confirmed commit extends the record with what it touches first (in a file
    # of its own), and its timeout.
    nc.edit_config(target="candidate", config=config(entry("10.31.0.3", 4000)))
    commit(nc, "<confirmed/><confirm-timeout>900</confirm-timeout><persist>p-31b</persist>"
           "<persist-id>p-31</persist-id>")
    record = read_record(state_dir)
    assert record["persist"] == "p-31b"
    assert abs(record["deadline"] - (time.time() + 900)) < 30
    assert {tuple(key)[1] for key, _ in record["undo_sessions"]} == \
        {"10.31.0.1", "10.31.0.2", "10.31.0.3"}

    commit(nc, "<persist-id>p-31b</persist-id>")
    assert not (state_dir / PENDING).exists()
    assert not list(state_dir.glob(f"{PENDING}*"))  # no temporary file left either
    sessions, _ = running(nc)
    assert {"10.31.0.2", "10.31.0.3"} <= {key[1] for key in sessions}


@pytest.mark.parametrize("end", ["cancel-commit", "timeout", "session closed"])
def test_the_record_goes_when_the_commit_is_rolled_back(server, nc, end):
    src = {"cancel-commit": "10.32.0.1", "timeout": "10.32.0.2", "session closed": "10.32.0.3"}
    with server.connect() as other:
        other.edit_config(target="candidate", config=config(entry(src[end], 4000)))
        timeout = "<confirm-timeout>1</confirm-timeout>" if end == "timeout" else ""
        commit(other, f"<confirmed/>{timeout}")
        assert (server.state_dir / PENDING).exists()
        if end == "cancel-commit":
            rpc(other, f'<cancel-commit xmlns="{NC_NS}"/>')
        elif end == "timeout":
            time.sleep(1.6)
    deadline = time.monotonic() + 5  # a closed session is noticed by the server's thread
    while (server.state_dir / PENDING).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (server.state_dir / PENDING).exists()
    assert src[end] not in {key[1] for key in running(nc)[0]}


# -- a server killed with a commit pending: the simulated NAT -------------------------------
def test_a_restarted_server_rolls_back_the_commit_its_predecessor_left_pending(
        tmp_path, servers):
    """The simulated NAT forgets its sessions with its process, so what survives a crash is
    startup: here it was saved while the commit was unconfirmed, and the record undoes that
    commit over it."""
    first = RunningServer(**vars(start_local_server(tmp_path / "nat", "--sessions", "3")))
    servers.append(first)
    with first.connect() as m:
        before, _ = running(m)
        assert len(before) == 3  # the seeded sessions: TCP 10.0.0.1..3 -> 198.51.100.1..3
        deleted, changed = sorted(before)[:2]
        m.edit_config(target="candidate", config=config(
            entry("10.33.0.1", 4000),
            entry(deleted[1], int(deleted[2]), deleted[3], int(deleted[4]), "delete"),
            entry(changed[1], int(changed[2]), changed[3], int(changed[4]),
                  leaves="<tcp_state>fin-wait</tcp_state>"),
            f'<nat-policy xmlns="{NAT_NS}"><external-address>192.0.2.99</external-address>'
            "</nat-policy>"))
        commit(m, "<confirmed/><persist>p-33</persist>")
        rpc(m, f'<copy-config xmlns="{NC_NS}"><target><startup/></target>'
               "<source><running/></source></copy-config>")
    kill_hard(first)
    assert (first.state_dir / PENDING).exists()

    second = restart(first, "--sessions", "3")
    servers.append(second)
    with second.connect() as m:
        after, policy = running(m)
    assert policy is None  # as before the commit, though startup holds one
    assert set(after) == set(before)
    for key in (deleted, changed):
        assert {k: v for k, v in after[key].items() if k != "timeout"} == \
            {k: v for k, v in before[key].items() if k != "timeout"}
    assert not (second.state_dir / PENDING).exists()
    assert "rolled back at start" in second.log.read_text()


def test_a_restart_rolls_back_the_follow_up_commits_of_the_pending_one_too(tmp_path,
                                                                           servers):
    first = RunningServer(**vars(start_local_server(tmp_path / "nat", "--sessions", "2")))
    servers.append(first)
    with first.connect() as m:
        before, _ = running(m)
        m.edit_config(target="candidate", config=config(entry("10.35.0.1", 4000)))
        commit(m, "<confirmed/><persist>p-35</persist>")
        m.edit_config(target="candidate", config=config(entry("10.35.0.2", 4000)))
        commit(m, "<confirmed/><persist>p-35</persist><persist-id>p-35</persist-id>")
        rpc(m, f'<copy-config xmlns="{NC_NS}"><target><startup/></target>'
               "<source><running/></source></copy-config>")
    kill_hard(first)
    assert (first.state_dir / "pending-commit.1.json").exists()  # the follow-up's own file

    second = restart(first, "--sessions", "2")
    servers.append(second)
    with second.connect() as m:
        after, _ = running(m)
    assert set(after) == set(before)  # neither commit's session stayed
    assert not list(second.state_dir.glob("pending-commit*"))


BAD_RECORDS = {
    "unreadable": "{not json",
    # Two sessions restored onto one translated endpoint: the NAT refuses the batch.
    "refused": json.dumps({
        "version": 1, "session_id": 1, "persist": None, "deadline": 0, "undo_policy": None,
        "policy_changed": False, "session_fields": list(SESSION_FIELDS),
        "undo_sessions": [
            [key, [*key, "192.0.2.7", 30000, *[None] * (len(SESSION_FIELDS) - 7)]]
            for key in (["TCP", "10.34.0.1", 4000, "198.51.100.9", 80],
                        ["TCP", "10.34.0.2", 4000, "198.51.100.9", 80])]}),
}


@pytest.mark.parametrize("kind", BAD_RECORDS)
def test_a_record_that_cannot_be_rolled_back_is_kept_and_the_server_starts(
        tmp_path, servers, kind):
    state_dir = tmp_path / "nat" / "state"
    state_dir.mkdir(parents=True)
    (state_dir / PENDING).write_text(BAD_RECORDS[kind])
    server = RunningServer(**vars(start_local_server(tmp_path / "nat")))
    servers.append(server)
    with server.connect() as m:
        assert running(m) == ({}, None)  # serving, and nothing of the record applied
    assert (state_dir / PENDING).read_text() == BAD_RECORDS[kind]
    assert re.search(r" ERROR .*confirmed commit .*kept", server.log.read_text())


# -- a server killed with a commit pending: the kernel NAT ----------------------------------
@pytest.fixture
def bed():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the kernel NAT tests must not skip", pytrace=False)
        pytest.skip("network namespaces and conntrack need root")
    testbed = TestBed()
    try:
        testbed.build()
        yield testbed
    finally:
        testbed.destroy()


def kernel_entry(sport: int, operation: str | None = None) -> str:
    return entry(TestBed.CLIENT, sport, TestBed.SERVER, 80, operation, leaves=(
        f"<translated_address>{TestBed.EXTERNAL}</translated_address>"
        f"<translated_port>{sport}</translated_port><tcp_state>established</tcp_state>"
        "<timeout>300</timeout>"))


def conntrack_ports(bed: TestBed, ns: str) -> set[int]:
    """The source ports of the kernel's TCP entries from the client to the server, as the
    conntrack tool reads them (not through the server)."""
    out = bed.run(ns, "conntrack", "-L", "-p", "tcp").stdout
    return {int(line.split(" sport=")[1].split()[0]) for line in out.splitlines()
            if f"src={TestBed.CLIENT} dst={TestBed.SERVER} " in line}


def nat_rules(bed: TestBed, ns: str) -> list[str]:
    out = bed.run(ns, "nft", "list", "chain", "ip", "nfmig", "postrouting").stdout
    return [line.split("snat to ")[1].strip() for line in out.splitlines() if "snat to" in line]


POLICY = (f'<nat-policy xmlns="{NAT_NS}"><inside-interface>inside</inside-interface>'
          "<outside-interface>outside</outside-interface>"
          f"<inside-prefix>{TestBed.INSIDE_PREFIX}</inside-prefix>"
          f"<external-address>{TestBed.EXTERNAL}</external-address>"
          "<port-min>20000</port-min><port-max>29999</port-max></nat-policy>")


@pytest.mark.privileged
def test_kernel_sessions_of_a_commit_pending_when_the_server_was_killed_are_rolled_back(
        bed, tmp_path, servers):
    args = ("--backend", "linux", "--netns", bed.nat_a)
    first = RunningServer(**vars(start_local_server(tmp_path / "nat", *args)))
    servers.append(first)
    new_ports = set(range(21001, 21051))
    with first.connect() as m:
        m.edit_config(target="running", config=config(POLICY, kernel_entry(21000)))
        m.edit_config(target="candidate", config=config(
            *(kernel_entry(port) for port in sorted(new_ports)),
            kernel_entry(21000, "delete"),
            f'<nat-policy xmlns="{NAT_NS}"><port-max>24999</port-max></nat-policy>'))
        commit(m, "<confirmed/><confirm-timeout>600</confirm-timeout><persist>k-1</persist>")
    assert conntrack_ports(bed, bed.nat_a) == new_ports
    assert f"{TestBed.EXTERNAL}:20000-24999" in nat_rules(bed, bed.nat_a)

    kill_hard(first)
    assert conntrack_ports(bed, bed.nat_a) == new_ports  # the kernel kept them
    assert (first.state_dir / PENDING).exists()

    second = restart(first, *args)
    servers.append(second)
    assert conntrack_ports(bed, bed.nat_a) == {21000}  # the new ones gone, the deleted back
    assert f"{TestBed.EXTERNAL}:20000-29999" in nat_rules(bed, bed.nat_a)  # policy too
    assert not (second.state_dir / PENDING).exists()
    assert "rolled back at start" in second.log.read_text()
    with second.connect() as m:
        sessions, policy = running(m)
    assert {int(key[2]) for key in sessions} == {21000}
    assert policy.findtext(f"{{{NAT_NS}}}port-max") == "29999"
