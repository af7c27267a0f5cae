"""`nfmig migrate` between stateful firewalls (`nfmig serve --nf firewall`, simulated): the
connections move as sessions do, the selected subscribers' pinholes move with what is
left of their lifetime, --with-policy carries their rules, and a firewall's state never
goes to a NAT."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from lxml import etree
from nfmig.client.endpoints import Credentials
from nfmig.client.local import start_local_server
from nfmig.client.migrate import Migration, Options

from .conftest import NAT_NS, RunningServer
from .test_firewall_server import FW_NS, POLICY, pinhole
from .test_netconf_server import config, get_data, op_attr, session_xml

NS = {"f": FW_NS, "n": NAT_NS}
PASSWORD = "p" + "firewall-test-secret"


@pytest.fixture
def ends(tmp_path):
    started = []
    try:
        for name, args in (("a", ("--nf", "firewall", "--sessions", "200")),
                           ("b", ("--nf", "firewall")), ("nat", ())):
            started.append(RunningServer(**vars(start_local_server(
                tmp_path / name, *args, password=PASSWORD, scrypt_cost=14))))
        (tmp_path / "password").write_text(PASSWORD + "\n")
        yield started
    finally:
        for server in started:
            server.stop()


def url(server) -> str:
    return f"netconf://{server.user}@127.0.0.1:{server.port}"


def migrate(tmp_path, source, target, *options: str) -> tuple[int, dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "nfmig", "migrate", url(source), url(target), "--json",
         "--password-file", str(tmp_path / "password"), "--insecure-no-host-key-check",
         *options], capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, report, done.stderr


def contents(server) -> etree._Element:
    with server.connect() as m:
        return get_data(m, "running")


def test_a_subscriber_moves_with_its_pinholes_and_rules(ends, tmp_path):
    a, b, _ = ends
    with a.connect() as m:  # the seeded connections come from 10.0.0.0/16
        m.edit_config(target="running", config=config(
            POLICY, pinhole(local="10.0.0.7", port=6000, timeout=300),
            pinhole(local="10.0.9.9", port=6001, timeout=300, reason="return-path"),
            pinhole(local="172.16.0.1", port=6002)))
    code, report, err = migrate(tmp_path, a, b, "--select", "subscriber=10.0.0.0/16",
                                "--with-policy")
    assert code == 0, err
    assert report["pinholes_moved"] == 2
    moved = contents(b)
    assert len(moved.findall("n:nat-session", NS)) == report["sessions_moved"] == 200
    ports = {p.findtext("f:local-port", namespaces=NS): p for p in moved.findall("f:pinhole",
                                                                                 NS)}
    assert set(ports) == {"6000", "6001"}
    assert 250 < int(ports["6000"].findtext("f:timeout", namespaces=NS)) <= 300
    assert ports["6001"].findtext("f:reason", namespaces=NS) == "return-path"
    assert moved.findtext("f:firewall-policy/f:subscriber/f:name", namespaces=NS) == "alice"
    left = contents(a)
    assert not left.findall("n:nat-session", NS)
    assert [p.findtext("f:local-port", namespaces=NS) for p in left.findall("f:pinhole", NS)
            ] == ["6002"]  # another subscriber's stays


def test_a_migration_failing_after_the_pinholes_moved_takes_them_and_the_rules_back(ends):
    a, b, _ = ends
    with a.connect() as m:
        m.edit_config(target="running", config=config(
            POLICY, pinhole(local="10.0.0.8", port=6100)))

    def fail_at_confirm(phase: str, _end: str | None) -> None:
        if phase == "confirm":  # after the window's writes, before the commit point
            raise RuntimeError("lost at the commit point")

    report = Migration([url(a)], [url(b)], options=Options(
        credentials=Credentials(password=PASSWORD, verify_host_keys=False),
        on_phase=fail_at_confirm, with_policy=True)).run()
    assert report.result == "failed" and report.cleanup_complete, report.reason
    assert report.pinholes_moved == 1
    left_on_b = contents(b)
    assert not left_on_b.findall("f:pinhole", NS)
    assert not left_on_b.findall("n:nat-session", NS)
    assert left_on_b.find("f:firewall-policy", NS) is None  # the carried rules went too
    assert [p.findtext("f:local-port", namespaces=NS)
            for p in contents(a).findall("f:pinhole", NS)] == ["6100"]


def test_a_firewall_does_not_migrate_to_a_nat(ends, tmp_path):
    a, _, nat = ends
    code, report, err = migrate(tmp_path, a, nat)
    assert code != 0
    assert "does not implement nfmig-firewall" in report["reason"]
    assert len(contents(a).findall("n:nat-session", NS)) == 200


def test_a_standby_firewall_follows_the_connections_and_the_pinholes(ends, tmp_path):
    a, b, _ = ends
    with a.connect() as m:
        m.edit_config(target="running", config=config(
            session_xml("10.9.0.1", 4000), pinhole(port=6200, timeout=600),
            pinhole(port=6201, timeout=600)))
    standby = subprocess.Popen(
        [sys.executable, "-m", "nfmig", "standby", url(a), url(b), "--for", "5", "--json",
         "--password-file", str(tmp_path / "password"), "--insecure-no-host-key-check"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while len(contents(b).findall("f:pinhole", NS)) < 2:
            assert time.monotonic() < deadline, "the pinholes never reached the standby"
            time.sleep(0.2)
        with a.connect() as m:  # one closed, one opened, one renewed for longer
            m.edit_config(target="running", config=config(
                pinhole(port=6200, attrs=op_attr("delete")), pinhole(port=6202, timeout=60),
                pinhole(port=6201, timeout=3000)))
        out, err = standby.communicate(timeout=60)
    finally:
        if standby.poll() is None:
            standby.kill()
            standby.wait()
    assert standby.returncode == 0, err
    assert json.loads(out)["sessions"] == 201
    copied = contents(b)
    sessions = copied.findall("n:nat-session", NS)
    assert len(sessions) == 201
    assert not any(s.find("n:translated_address", NS) is not None for s in sessions)
    timeouts = {p.findtext("f:local-port", namespaces=NS): int(p.findtext(
        "f:timeout", namespaces=NS)) for p in copied.findall("f:pinhole", NS)}
    assert set(timeouts) == {"6201", "6202"}
    assert timeouts["6201"] > 2900 and timeouts["6202"] <= 60


def test_a_dry_run_writes_nothing_of_the_firewall(ends, tmp_path):
    a, b, _ = ends
    with a.connect() as m:
        m.edit_config(target="running", config=config(POLICY, pinhole(local="10.0.0.9")))
    code, report, err = migrate(tmp_path, a, b, "--dry-run", "--with-policy")
    assert code == 0 and report["result"] == "dry-run", err
    on_b = contents(b)
    assert on_b.find("f:firewall-policy", NS) is None
    assert not on_b.findall("f:pinhole", NS) and not on_b.findall("n:nat-session", NS)
