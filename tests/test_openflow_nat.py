"""The SDN NAT backend on its own: a private Open vSwitch in NAT B's namespace of a test bed
and the OpenFlow NAT application, driven through the backend interface."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the Open vSwitch NAT tests must not skip", pytrace=False)
    pytest.skip("network namespaces and Open vSwitch need root", allow_module_level=True)

from nfmig.nf_backends.base import BackendError, NatPolicy, Session, SessionChanges  # noqa: E402
from nfmig.nf_backends.openflow import OpenflowBackend  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402
from nfmig.testbed_ovs import without_checksum_offload  # noqa: E402

POLICY = NatPolicy(inside_prefix=[TestBed.INSIDE_PREFIX], external_address=[TestBed.EXTERNAL],
                   port_min=20000, port_max=20009)
CONNECT = ("import socket,sys\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])),"
           "timeout=5)\nprint(*c.getsockname())\n")
ACCEPT = ("import socket,sys\ns=socket.create_server(('',int(sys.argv[1])))\n"
          "print('listening',flush=True)\nc,a=s.accept()\nprint(*a,flush=True)\n")


@pytest.fixture(scope="module")
def bed():
    with TestBed() as testbed:
        without_checksum_offload(testbed)
        yield testbed


@pytest.fixture
def nat(bed):
    backend = OpenflowBackend(bed.nat_b)
    backend.start()
    try:
        backend.apply_policy(POLICY)
        yield backend
    finally:
        backend.stop()
        bed.deactivate(bed.nat_b)


def session(sport: int, tport: int, protocol: str = "TCP", **kw) -> Session:
    return Session(protocol, TestBed.CLIENT, sport, TestBed.SERVER, 80, TestBed.EXTERNAL, tport,
                   **{"tcp_state": "established" if protocol == "TCP" else None,
                      "timeout": 300, **kw})


def test_start_runs_private_daemons_and_stop_ends_exactly_them(bed):
    backend = OpenflowBackend(bed.nat_b)
    backend.start()
    pids = [p.pid for p in backend.ovs._procs] + [backend._app.pid]
    rundir = backend._dir
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    backend.stop()
    time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not rundir.exists()


def test_imported_sessions_read_back_with_counters_and_delete_by_key(nat):
    given = [session(31000 + i, 20000 + i, orig_packets=5, orig_bytes=500, reply_packets=7,
                     reply_bytes=700, src_window_scale=7, dst_window_scale=9) for i in range(3)]
    given.append(session(31010, 20005, "UDP", timeout=60))
    nat.apply(SessionChanges(upserts=given))
    found = {s.key: s for s in nat.sessions()}
    assert found.keys() == {s.key for s in given}
    for s in given:
        got = found[s.key]
        assert got[:7] == s[:7] and got[9:12] == s[9:12]
        assert got[13:] == ((s.orig_packets or 0), (s.orig_bytes or 0), (s.reply_packets or 0),
                            (s.reply_bytes or 0))
        assert 0 < got.timeout <= s.timeout
    assert nat.lookup([given[0].key, ("TCP", "10.0.0.9", 1, "192.0.2.100", 80)]).keys() \
        == {given[0].key}
    assert nat.stats().session_count == 4
    nat.apply(SessionChanges(deletes=[s.key for s in given[:2]]))
    assert {s.key for s in nat.sessions()} == {s.key for s in given[2:]}


def test_a_batch_the_switch_refuses_leaves_nothing_installed(nat):
    nat.apply(SessionChanges(upserts=[session(32000, 20001)]))
    nat.ovs.limit_table(0, 20)  # room for a few more pairs, not for twelve
    with pytest.raises(BackendError, match="nothing applied"):
        nat.apply(SessionChanges(upserts=[session(32001 + i, 20002 + i) for i in range(12)],
                                 deletes=[session(32000, 20001).key]))
    assert [s.key for s in nat.sessions()] == [session(32000, 20001).key]
    nat.apply(SessionChanges(upserts=[session(32001, 20002)]))  # its port was released


def test_a_translated_endpoint_in_use_is_refused(nat):
    nat.apply(SessionChanges(upserts=[session(33000, 20003)]))
    with pytest.raises(BackendError) as refused:
        nat.apply(SessionChanges(upserts=[session(33001, 20004), session(33002, 20003)]))
    assert refused.value.reason == "port taken"
    assert refused.value.key == session(33002, 20003).key
    assert len(list(nat.sessions())) == 1


def connect(bed: TestBed, port: int) -> subprocess.CompletedProcess:
    listener = bed.popen(bed.server, sys.executable, "-c", ACCEPT, str(port),
                         stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "listening"
    try:
        done = bed.run(bed.client, sys.executable, "-c", CONNECT, TestBed.SERVER, str(port),
                       check=False, timeout=15)
        assert done.returncode == 0, done.stderr
        return listener.stdout.readline().split()
    finally:
        listener.kill()
        listener.wait()


def test_new_connection_gets_a_port_by_packet_in_never_an_imported_one(bed, nat):
    imported = [session(34000 + i, 20000 + i) for i in range(9)]  # all but 20009
    nat.apply(SessionChanges(upserts=imported))
    bed.activate(bed.nat_b)
    assert connect(bed, 5501) == [TestBed.EXTERNAL, "20009"]
    new = [s for s in nat.sessions() if s.dst_port == 5501]
    assert [(s.translated_address, s.translated_port, s.tcp_state) for s in new] \
        == [(TestBed.EXTERNAL, 20009, "established")]
    assert nat.stats().sessions_created == 1


def test_app_answers_arp_for_gateway_addresses_only_while_it_owns_them(bed, nat):
    mac = bed.run(bed.nat_b, "cat", "/sys/class/net/inside/address").stdout.strip()
    probe = ["arping", "-c", "1", "-w", "2", "-I", "eth0", TestBed.INSIDE_GATEWAY]
    assert bed.run(bed.client, *probe, check=False).returncode != 0
    bed.activate(bed.nat_b)
    answered = bed.run(bed.client, *probe, check=False)
    assert answered.returncode == 0 and mac in answered.stdout.lower()
