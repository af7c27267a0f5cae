"""Hot standby through real `nfmig serve` processes (simulated NAT) on loopback: the copy,
the changes that follow it, standbys that come and go, a source that is lost, failover.
(The live version, with connections through Linux NATs, is test_standby_live.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from nfmig.client.standby import Standby, StandbyOptions

from tests.test_live_migration import GATEWAYS, gateways
from tests.test_migrate import NAT_NS, NO_HOST_KEY_CHECK, PASSWORD, session


def options(**kw) -> StandbyOptions:
    return StandbyOptions(credentials=NO_HOST_KEY_CHECK, retry_pause=0.2, **kw)


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def same_sessions(a, b) -> bool:
    return set(a.sessions()) == set(b.sessions())


@pytest.fixture
def replicate():
    running: list[Standby] = []

    def start(source, *targets, **kw) -> Standby:
        standby = Standby(source.endpoint, [t.endpoint for t in targets], options(**kw))
        standby.start()
        running.append(standby)
        return standby
    yield start
    for standby in running:
        standby.stop()


def test_every_standby_gets_the_sources_sessions(nats, replicate):
    a, b, c, d = nats(300, 0, 0, 0)
    standby = replicate(a, b, c, d)
    for target in (b, c, d):
        assert eventually(lambda t=target: same_sessions(a, t)), target.url
    status = standby.status()
    assert status["sessions"] == 300
    assert all(t["connected"] for t in status["targets"])


def test_created_changed_and_ended_sessions_follow(nats, replicate):
    a, b = nats(50, 0)
    replicate(a, b)
    assert eventually(lambda: same_sessions(a, b))
    a.plant(session("10.1.0.9", 5000))
    assert eventually(lambda: ("TCP", "10.1.0.9", "5000", "198.51.100.9", "80")
                      in b.sessions())
    a.plant(session("10.1.0.9", 5000).replace("established", "fin-wait"))
    assert eventually(lambda: "fin-wait" in b.conn.get_data(
        "running", f'<subtree-filter><nat-session xmlns="{NAT_NS}"><src_address>10.1.0.9'
        "</src_address></nat-session></subtree-filter>"))
    a.plant(session("10.1.0.9", 5000).replace("<nat-session ", '<nat-session xmlns:nc='
                                              '"urn:ietf:params:xml:ns:netconf:base:1.0" '
                                              'nc:operation="delete" '))
    assert eventually(lambda: ("TCP", "10.1.0.9", "5000", "198.51.100.9", "80")
                      not in b.sessions())


def test_a_standby_session_outlives_the_lifetime_last_reported(nats, replicate):
    a, b = nats(0, 0)
    replicate(a, b, hold=3600)
    a.plant(session("10.1.0.8", 5001).replace("</tcp_state>", "</tcp_state>"
                                              "<timeout>120</timeout>"))
    text = eventually(lambda: b.conn.get_data(
        "running", f'<subtree-filter><nat-session xmlns="{NAT_NS}"><src_address>10.1.0.8'
        "</src_address></nat-session></subtree-filter>"))
    held = int(text.split("<timeout>")[1].split("<")[0])
    assert held > 3000


def test_a_standby_that_comes_later_is_brought_in_step(nats, replicate, tmp_path):
    a, b, late = nats(100, 0, 0)
    late.plant(session("10.9.9.9", 7000))  # the source never had it
    late.server.stop()
    standby = replicate(a, b, late)
    assert eventually(lambda: same_sessions(a, b))
    a.plant(session("10.1.0.7", 5002))
    from nfmig.client.local import start_local_server
    restarted = start_local_server(late.server.state_dir.parent, "--sessions", "0",
                                   "--netconf-port", str(late.server.port))
    late.server = restarted
    late._conn = None
    assert eventually(lambda: same_sessions(a, late), timeout=20)
    assert standby.status()["targets"][1]["resyncs"] >= 1


def test_the_source_lost_then_failover_gives_the_standby_its_gateways(nats, replicate):
    a, b = nats(40, 0)
    a.plant(GATEWAYS)
    standby = replicate(a, b, failover_after=1.0)
    assert eventually(lambda: same_sessions(a, b))
    a.kill()
    assert eventually(lambda: standby.failover is not None, timeout=20)
    assert standby.failover["standby"] == b.url
    assert gateways(b) == {"10.0.0.1", "192.0.2.1"}
    assert len(b.sessions()) == 40


def test_the_command_reports_and_writes_its_status(nats, tmp_path):
    a, b = nats(30, 0)
    status = tmp_path / "status.json"
    result = subprocess.run(
        [sys.executable, "-m", "nfmig", "standby", a.url.replace("netconf://", "netconf://"),
         b.url, "--for", "3", "--json", "--status-file", str(status),
         "--insecure-no-host-key-check"],
        env={"NFMIG_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sessions"] == 30 and report["targets"][0]["applied"] >= 30
    assert json.loads(status.read_text())["targets"][0]["endpoint"] == b.url
    assert len(b.sessions()) == 30


def test_failover_command_takes_the_gateways_from_the_status(nats, tmp_path):
    a, b = nats(5, 0)
    a.plant(GATEWAYS)
    status = tmp_path / "status.json"
    subprocess.run([sys.executable, "-m", "nfmig", "standby", a.url, b.url, "--for", "2",
                    "--status-file", str(status), "--insecure-no-host-key-check"],
                   env={"NFMIG_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"},
                   capture_output=True, timeout=60, check=True)
    result = subprocess.run([sys.executable, "-m", "nfmig", "failover", b.url, "--status-file",
                             str(status), "--json", "--insecure-no-host-key-check"],
                            env={"NFMIG_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["gateways"]) == ["10.0.0.1", "192.0.2.1"]
    assert gateways(b) == {"10.0.0.1", "192.0.2.1"}


def test_a_busy_source_is_followed_without_falling_behind(tmp_path, replicate):
    from nfmig.client.local import start_local_server
    from nfmig.server.auth import add_user

    from tests.test_migrate import Nat, start_nats
    workdir = tmp_path / "busy"
    workdir.mkdir()
    add_user(workdir / "users", "ops", password=PASSWORD, log2_n=14)
    a = Nat(start_local_server(workdir, "--sessions", "1000", "--traffic", "2000"))
    (b,) = start_nats(tmp_path / "b", 0)
    try:
        standby = replicate(a, b)
        stop = threading.Event()
        time.sleep(3)
        status = standby.status()["targets"][0]
        assert status["connected"] and status["applied"] > 1000
        assert status["pending"] < 5000, status
        stop.set()
    finally:
        a.stop()
        b.stop()
