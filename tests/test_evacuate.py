"""`nfmig evacuate PLAN`: many NATs moved in one job, as a plan says. Real `nfmig serve`
processes of the simulated NAT; the sessions are counted on the servers themselves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.evacuate import Evacuation, EvacuationOptions, Plan, session_count
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NAT_NS

PASSWORD = "ptest-evacuate"


@pytest.fixture
def nats(tmp_path):
    """Start simulated NATs by their seed counts (``port``: on that port); all stopped
    after the test."""
    started: list[LocalServer] = []

    def make(*seeds: int, port: int | None = None) -> list[LocalServer]:
        def one(index: int) -> LocalServer:
            where = [] if port is None else ["--netconf-port", str(port)]
            return start_local_server(tmp_path / f"nat{len(started)}-{index}", "--backend",
                                      "simulated", "--sessions", str(seeds[index]), *where,
                                      password=PASSWORD, scrypt_cost=14)
        with ThreadPoolExecutor(len(seeds)) as pool:
            futures = [pool.submit(one, i) for i in range(len(seeds))]
        for future in futures:
            if future.exception() is None:
                started.append(future.result())
        return [f.result() for f in futures]
    yield make
    for server in started:
        server.stop()


def url(server: LocalServer | int) -> str:
    port = server if isinstance(server, int) else server.port
    return f"netconf://admin@127.0.0.1:{port}"


def count(server: LocalServer) -> int:
    return session_count(Endpoint.parse(url(server)),
                         Credentials(password=PASSWORD, verify_host_keys=False))


def write_plan(tmp_path: Path, plan: dict, name: str = "plan.json") -> Path:
    plan.setdefault("defaults", {})["insecure-no-host-key-check"] = True
    path = tmp_path / name
    path.write_text(json.dumps(plan, indent=2))
    return path


def pairs(*ends: tuple) -> dict:
    return {"pairs": [{"source": url(s), "target": url(t)} for s, t in ends]}


def evacuate(plan: Path, *options: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfmig", "evacuate", str(plan), *options],
                          env=dict(os.environ, NFMIG_PASSWORD=PASSWORD), capture_output=True,
                          text=True, timeout=120, **popen)


def state_of(plan: Path) -> dict[str, dict]:
    data = json.loads(plan.with_name(plan.name + ".state.json").read_text())
    return {p["id"]: p for p in data["pairs"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_pairs_plan_moves_every_nat_to_its_target(nats, tmp_path):
    a1, a2, a3, b1, b2, b3 = nats(300, 200, 100, 0, 0, 0)
    plan = write_plan(tmp_path, pairs((a1, b1), (a2, b2), (a3, b3)))
    result = evacuate(plan, "--json")
    assert result.returncode == 0, result.stderr
    assert [count(s) for s in (a1, a2, a3, b1, b2, b3)] == [0, 0, 0, 300, 200, 100]
    report = json.loads(result.stdout)
    assert report["totals"]["sessions_moved"] == 600
    assert all(n["report"]["result"] == "success" for n in report["nats"])


def held_elsewhere(count: int) -> str:
    """Sessions no seeded simulated NAT holds: other subscribers, another external
    address (a target's own, which the moved sessions must not collide with)."""
    return "".join(
        f'<nat-session xmlns="{NAT_NS}"><protocol>TCP</protocol><src_address>10.200.0.{i % 250}'
        f"</src_address><src_port>{2000 + i}</src_port><dst_address>198.51.100.1"
        f"</dst_address><dst_port>443</dst_port><translated_address>203.0.113.1"
        f"</translated_address><translated_port>{30000 + i}</translated_port></nat-session>"
        for i in range(count))


def test_a_pool_plan_counts_what_each_target_holds_against_its_capacity(nats, tmp_path):
    # b1 has the most capacity but holds 100 sessions already: only b2 has room for a1's 400
    a1, a2, b1, b2 = nats(400, 300, 0, 0)
    b1.edit(held_elsewhere(100))
    plan = write_plan(tmp_path, {
        "sources": [url(a1), url(a2)],
        "targets": [{"endpoint": url(b1), "capacity": 450},
                    {"endpoint": url(b2), "capacity": 420}]})
    result = evacuate(plan, "--json")
    assert result.returncode == 0, result.stderr
    went = {n["source"]: n["target"] for n in json.loads(result.stdout)["nats"]}
    assert went == {url(a1): url(b2), url(a2): url(b1)}
    assert (count(a1), count(a2), count(b2)) == (0, 0, 400)
    assert count(b1) == 400  # its own 100 and a2's 300


def test_a_pool_source_no_target_has_room_for_stays_where_it_is(nats, tmp_path):
    a1, a2, b1 = nats(300, 200, 0)
    plan = write_plan(tmp_path, {"sources": [url(a1), url(a2)],
                                 "targets": [{"endpoint": url(b1), "capacity": 400}]})
    result = evacuate(plan)
    assert result.returncode == 1
    assert (count(a1), count(a2), count(b1)) == (0, 200, 300)
    assert "no pool target has room for its 200 sessions" in result.stdout


def test_an_unreachable_target_fails_only_its_own_pairs(nats, tmp_path):
    a1, a2, a3, b1, b3 = nats(100, 200, 300, 0, 0)
    dead = free_port()
    plan = write_plan(tmp_path, {"pairs": [
        {"source": url(a1), "target": url(b1)}, {"source": url(a2), "target": url(dead)},
        {"source": url(a3), "target": url(b3)}]})
    result = evacuate(plan)
    assert result.returncode == 1
    assert [count(s) for s in (a1, a2, a3, b1, b3)] == [0, 200, 0, 100, 300]
    state = state_of(plan)
    assert [state[i]["state"] for i in "123"] == ["done", "failed", "done"]
    assert "cannot connect" in state["2"]["summary"]["reason"]


def test_resume_after_the_target_is_back_moves_its_sessions_exactly_once(nats, tmp_path):
    a1, a2, b1 = nats(100, 200, 0)
    port = free_port()
    plan = write_plan(tmp_path, {"pairs": [
        {"source": url(a1), "target": url(b1)}, {"source": url(a2), "target": url(port)}]})
    assert evacuate(plan).returncode == 1
    first = state_of(plan)
    (b2,) = nats(0, port=port)
    result = evacuate(plan, "--resume")
    assert result.returncode == 0, result.stderr
    assert [count(s) for s in (a1, a2, b1, b2)] == [0, 0, 100, 200]
    again = state_of(plan)
    assert again["1"]["migration_id"] == first["1"]["migration_id"]  # not run again
    assert (again["2"]["state"], again["2"]["attempts"]) == ("done", 2)


def test_resuming_a_completed_plan_does_nothing_and_says_so(nats, tmp_path):
    a1, b1 = nats(100, 0)
    plan = write_plan(tmp_path, pairs((a1, b1)))
    assert evacuate(plan).returncode == 0
    before = plan.with_name(plan.name + ".state.json").read_text()
    result = evacuate(plan, "--resume")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("nothing to do:")
    assert plan.with_name(plan.name + ".state.json").read_text() == before
    assert (count(a1), count(b1)) == (0, 100)


def test_a_nat_interrupted_after_its_commit_is_completed_on_resume(nats, tmp_path):
    a1, b1 = nats(200, 0)
    started, go = tmp_path / "switching", tmp_path / "go"
    plan = write_plan(tmp_path, {
        "defaults": {"switchover": f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; "
                                  "done"},
        **pairs((a1, b1))})
    env = dict(os.environ, NFMIG_PASSWORD=PASSWORD)
    process = subprocess.Popen([sys.executable, "-m", "nfmig", "evacuate", str(plan)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the migration never reached its switchover"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert state_of(plan)["1"]["state"] == "running"
    assert (count(a1), count(b1)) == (200, 200)  # confirmed, not yet deleted on the source
    go.touch()
    result = evacuate(plan, "--resume")
    assert result.returncode == 0, result.stderr
    assert (count(a1), count(b1)) == (0, 200)


@pytest.mark.parametrize(("text", "says"), [
    ("pairs:\n  - source: netconf://a:830\n    target: netconf://b:830\n    colour: red\n",
     "plan.yaml:4: pairs[0].colour: unknown field"),
    ("pairs:\n  - source: netconf://a:830\n", "plan.yaml:2: pairs[0]: target is missing"),
    ("pairs:\n  - {source: 'a:830', target: netconf://b}\n",
     "plan.yaml:2: pairs[0].source: 'a:830': write endpoints as"),
    ("pairs: [{source: netconf://a, target: netconf://b}\n",
     "plan.yaml:2: not valid YAML"),
    ("sources: [netconf://a]\ntargets:\n  - {endpoint: netconf://b, capacity: -1}\n",
     "plan.yaml:3: targets[0].capacity: must be a number of sessions"),
    ("defaults:\n  freeze-timeout: soon\npairs: []\n",
     "plan.yaml:2: defaults.freeze-timeout: must be a whole number"),
    ("pairs:\n  - {source: netconf://a, target: netconf://b}\n"
     "  - {source: netconf://b, target: netconf://c}\n",
     "plan.yaml:3: pairs[1].source: netconf://b:830 is both"),
])
def test_a_bad_plan_exits_2_with_one_line_saying_where(tmp_path, text, says):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    result = evacuate(plan)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"nfmig: error: {plan.parent}/{says}"), result.stderr


def test_a_dry_run_moves_nothing_and_keeps_no_state(nats, tmp_path):
    a1, b1 = nats(100, 0)
    plan = write_plan(tmp_path, pairs((a1, b1)))
    result = evacuate(plan, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would move 100 sessions" in result.stdout
    assert (count(a1), count(b1)) == (100, 0)
    assert not plan.with_name(plan.name + ".state.json").exists()


def test_the_api_reports_each_nats_own_migration_and_the_site_totals(nats, tmp_path):
    a1, a2, b1, b2 = nats(150, 250, 0, 0)
    plan = Plan.load({"defaults": {"insecure-no-host-key-check": True},
                      **pairs((a1, b1), (a2, b2))})
    options = EvacuationOptions(parallel=2, state_file=tmp_path / "state.json",
                                credentials=Credentials(password=PASSWORD,
                                                        verify_host_keys=False))
    report = Evacuation(plan, options).run()
    assert report.ok
    site = report.to_dict()
    assert [n["report"]["sessions_moved"] for n in site["nats"]] == [150, 250]
    assert site["totals"]["sessions_moved"] == 400 == count(b1) + count(b2)
    assert set(site["totals"]["freeze_windows"]["per_nat"]) == {"1", "2"}
    assert site["totals"]["sessions_per_second"] > 0
