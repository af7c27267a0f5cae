"""The migrator between two Linux kernel NATs (conntrack) in network namespaces.

A kernel NAT keeps its sessions when its nfmig server dies, so here "every session on
exactly one side" is checked for real after a server is killed, and a second run, with
the server restarted, completes the migration.
"""

from __future__ import annotations

import os
import signal
import threading

from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.local import start_local_server
from nfmig.client.migrate import Migration, Options
from nfmig.client.netconf import NatClient

from nfmig.testbed import TestBed

from . import test_linux_nat as kernel
from .test_linux_nat import (
    NAT_NS,
    POLICY,
    Nat,
    assert_clean,
    expect,
    go,
    open_tcp,
    translated_ports,
)

bed, nats = kernel.bed, kernel.nats  # the kernel NAT tests' own fixtures

NO_HOST_KEY_CHECK = Credentials(verify_host_keys=False)


def endpoint(nat: Nat) -> Endpoint:
    s = nat.server
    return Endpoint("127.0.0.1", s.port, s.user, s.password)


def synthetic(n: int) -> str:
    """N established TCP sessions of the client, translated inside the policy's range."""
    return "".join(
        f'<nat-session xmlns="{NAT_NS}"><protocol>TCP</protocol>'
        f"<src_address>{TestBed.CLIENT}</src_address><src_port>{30000 + i}</src_port>"
        f"<dst_address>{TestBed.SERVER}</dst_address><dst_port>443</dst_port>"
        f"<translated_address>{TestBed.EXTERNAL}</translated_address>"
        f"<translated_port>{20000 + i}</translated_port><tcp_state>established</tcp_state>"
        "</nat-session>" for i in range(n))


def count(nat: Nat) -> int:
    return nat.client.get_sessions()[0].count("<nat-session")


def test_live_tcp_connection_survives_a_migration_by_the_migrator(bed, nats):
    a, b = nats
    server, client, peer = open_tcp(bed, 5301, 1 << 20)
    report = Migration([endpoint(a)], endpoint(b), None,
                       Options(credentials=NO_HOST_KEY_CHECK)).run()
    assert report.result == "success", report.reason
    assert translated_ports(b, "TCP") == {tuple(peer)}
    assert translated_ports(a, "TCP") == set()
    bed.switch_over(a.netns, b.netns)
    go(server, client)
    assert expect(server, "done") == peer
    expect(client, "done")
    assert_clean(bed)


def test_source_server_killed_mid_read_loses_no_kernel_session_and_a_rerun_completes(
        bed, nats, tmp_path):
    a, b = nats
    a.client.edit(synthetic(2000))
    assert count(a) == 2000

    def kill_during_read(name: str, where: str | None) -> None:
        if name == "read":
            threading.Timer(0.01, os.killpg, (a.server.process.pid, signal.SIGKILL)).start()
    report = Migration([endpoint(a)], endpoint(b), None,
                       Options(credentials=NO_HOST_KEY_CHECK, on_phase=kill_during_read)).run()
    assert report.result == "failed"
    assert count(b) == 0
    a.server.process.wait()
    # The kernel still holds every session: a new server for the same namespace finds them.
    a.client.close()
    restarted = start_local_server(tmp_path / "a2", "--backend", "linux", "--netns", a.netns)
    try:
        a.server, a.client = restarted, NatClient("127.0.0.1", restarted.port, restarted.user,
                                                  restarted.password, hostkey_verify=False)
        a.client.edit(POLICY)
        assert count(a) == 2000
        report = Migration([endpoint(a)], endpoint(b), None,
                           Options(credentials=NO_HOST_KEY_CHECK)).run()
        assert report.result == "success", report.reason
        assert count(b) == 2000 and count(a) == 0
    finally:
        restarted.stop()
