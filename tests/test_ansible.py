"""The Ansible collection (ansible_collections/nfmig/nfmig) as an operator runs it: the real
ansible-playbook, from the venv, against real `nfmig serve` processes on loopback; the
servers' own counts say what moved. Every ansible command writes only under the test's
temporary directory (bench/evacuate_ansible.ansible_env)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NatClient

from bench.evacuate_ansible import (
    REPO,
    ansible_command,
    ansible_env,
    known_hosts_line,
    run_collection,
)

PASSWORD = "p" + secrets.token_urlsafe(16)
COLLECTION = REPO / "ansible_collections" / "nfmig" / "nfmig"
RUN_TIMEOUT = 120


@pytest.fixture
def nats(tmp_path: Path) -> Iterator:
    """Start simulated NATs by their seed counts, in parallel, all with PASSWORD; every one
    stopped after the test, whatever happened."""
    started: list[LocalServer] = []

    def make(*seeds: int) -> list[LocalServer]:
        first = len(started)

        def one(index: int, sessions: int) -> LocalServer:
            return start_local_server(tmp_path / f"nat{first + index}", "--backend",
                                      "simulated", "--sessions", str(sessions),
                                      password=PASSWORD, scrypt_cost=14)
        with ThreadPoolExecutor(min(len(seeds), 4)) as pool:
            futures = [pool.submit(one, i, n) for i, n in enumerate(seeds)]
        new = []
        for future in futures:
            try:
                new.append(future.result())
            except Exception:
                pass  # the others are stopped below; the first failure is raised
        started.extend(new)
        for future in futures:
            future.result()
        return new
    try:
        yield make
    finally:
        for server in started:
            server.stop()


def count(server: LocalServer) -> int:
    client = NatClient("127.0.0.1", server.port, server.user, PASSWORD, hostkey_verify=False)
    try:
        return client.get_sessions()[0].count("<nat-session")
    finally:
        client.close()


def url(server: LocalServer) -> str:
    return f"netconf://127.0.0.1:{server.port}"


class Site:
    """An inventory (one host per NAT or pair, connection local, credentials and the
    known-hosts file in the usual variables) and the playbooks run over it; each task's
    registered result is kept as JSON per host."""

    def __init__(self, workdir: Path, hosts: dict[str, dict], servers: list[LocalServer],
                 password: str = PASSWORD):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / "results"
        self.known = workdir / "known_hosts"
        self.known.write_text("".join(known_hosts_line(s) for s in servers))
        inventory = {"nats": {"hosts": hosts, "vars": {
            "ansible_connection": "local", "ansible_user": "admin",
            "ansible_password": password, "nfmig_known_hosts": str(self.known)}}}
        self.inventory = workdir / "inventory.json"
        self.inventory.write_text(json.dumps(inventory))
        self.env = ansible_env(workdir)
        self.runs = 0

    def play(self, tasks: str, *options: str, forks: int = 5
             ) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
        """Run ``tasks`` (each registering ``r``, written out after it) on every host;
        the process and each host's last registered result."""
        self.runs += 1
        out = self.out / str(self.runs)
        out.mkdir(parents=True)
        playbook = self.workdir / f"play{self.runs}.yml"
        playbook.write_text(
            "- name: nfmig\n  hosts: nats\n  gather_facts: false\n  tasks:\n"
            + tasks
            + "    - name: Keep the result\n      ansible.builtin.copy:\n"
            f"        content: \"{{{{ r | to_json }}}}\"\n"
            f"        dest: \"{out}/{{{{ inventory_hostname }}}}.json\"\n"
            "        mode: \"0600\"\n      check_mode: false\n      diff: false\n"
            "      delegate_to: localhost\n")
        run = subprocess.run([ansible_command("ansible-playbook"), "-i", str(self.inventory),
                              "--forks", str(forks), *options, str(playbook)],
                             cwd=self.workdir, env=self.env, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
        results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
        return run, results


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP's counts per host."""
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return found


MIGRATE = """\
    - name: Evacuate the NAT
      nfmig.nfmig.migrate:
        source: "{{ source }}"
        target: "{{ target }}"
        diff_limit: 100
      register: r
"""


def test_check_mode_changes_nothing_then_the_move_then_ok_and_the_counts(nats, tmp_path):
    a, b = nats(300, 0)
    site = Site(tmp_path / "site", {"nat-a": {"source": url(a), "target": url(b)}}, [a, b])

    run, results = site.play(MIGRATE, "--check", "--diff")
    assert run.returncode == 0, run.stdout + run.stderr
    r = results["nat-a"]
    assert r["changed"] and r["result"] == "dry-run"
    assert r["would_move"] == 300 and r["moved"] == 0 and r["sessions"] == 300
    assert (count(a), count(b)) == (300, 0)
    assert f"on 127.0.0.1:{b.port}" not in run.stdout  # endpoints are written as URLs
    assert "+TCP " in run.stdout or "+UDP " in run.stdout or "+ICMP " in run.stdout
    assert f"on netconf://admin@127.0.0.1:{b.port}" in run.stdout
    assert "... and 200 more sessions" in run.stdout  # diff_limit: 100 of 300 named

    run, results = site.play(MIGRATE)
    assert run.returncode == 0, run.stdout + run.stderr
    r = results["nat-a"]
    assert r["changed"] and r["result"] == "success" and r["moved"] == 300
    assert r["report"]["sessions_moved"] == 300 and r["freeze_ms"] is not None
    assert (count(a), count(b)) == (0, 300)
    assert recap(run.stdout)["nat-a"]["changed"] >= 1

    run, results = site.play(MIGRATE + """\
    - name: Count the target's sessions
      nfmig.nfmig.sessions_info:
        endpoint: "{{ target }}"
        list_sessions: true
        limit: 5
      register: info
    - name: Both results
      ansible.builtin.set_fact:
        r: "{{ {'migrate': r, 'info': info} }}"
""")
    assert run.returncode == 0, run.stdout + run.stderr
    again, info = results["nat-a"]["migrate"], results["nat-a"]["info"]
    assert not again["changed"] and again["result"] == "unchanged" and again["moved"] == 0
    assert (count(a), count(b)) == (0, 300)
    assert info["session_count"] == 300 and info["selected"] == 300
    assert info["implementation"] == "simulated" and not info["changed"]
    assert sum(info["by_protocol"].values()) == 300
    assert len(info["sessions"]) == 5 and info["truncated"]
    assert {"protocol", "src_address", "translated_address"} <= set(info["sessions"][0])


def test_present_copies_and_keeps_the_source_then_is_ok(nats, tmp_path):
    """Delegated to the controller, from a host whose own connection is SSH: the
    credentials are still the host's (its password a template)."""
    a, b = nats(120, 0)
    host = {"source": url(a), "target": url(b), "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1", "ansible_password": "{{ nat_secret }}",
            "nat_secret": PASSWORD}
    site = Site(tmp_path / "site", {"nat-a": host}, [a, b], password="not this one")
    copy = MIGRATE.replace("diff_limit: 100", "state: present").replace(
        "      register: r\n", "      delegate_to: localhost\n      register: r\n")
    run, results = site.play(copy)
    assert run.returncode == 0, run.stdout + run.stderr
    assert results["nat-a"]["changed"] and results["nat-a"]["moved"] == 120
    assert (count(a), count(b)) == (120, 120)
    run, results = site.play(copy)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not results["nat-a"]["changed"] and results["nat-a"]["result"] == "unchanged"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_target_fails_its_own_host_while_the_others_move(nats, tmp_path):
    a1, b1, a2, a3, b3 = nats(40, 0, 50, 60, 0)
    dead = f"netconf://127.0.0.1:{free_port()}"
    hosts = {"nat-1": {"source": url(a1), "target": url(b1)},
             "nat-2": {"source": url(a2), "target": dead},
             "nat-3": {"source": url(a3), "target": url(b3)}}
    site = Site(tmp_path / "site", hosts, [a1, b1, a2, a3, b3])
    run, results = site.play(MIGRATE.replace("      register: r\n", "        connect_timeout: 5\n"
                                             "      register: r\n"), forks=3)
    assert run.returncode == 2, run.stdout + run.stderr  # some host failed
    counts = recap(run.stdout)
    assert counts["nat-2"]["failed"] == 1, run.stdout
    assert counts["nat-1"]["failed"] == 0 and counts["nat-3"]["failed"] == 0
    assert set(results) == {"nat-1", "nat-3"}
    assert results["nat-1"]["moved"] == 40 and results["nat-3"]["moved"] == 60
    assert "fatal: [nat-2]: FAILED!" in run.stdout
    assert "migration refused: connect on target" in run.stdout, run.stdout
    assert [count(s) for s in (a1, b1, a2, a3, b3)] == [0, 40, 50, 0, 60]


def test_standby_starts_reports_its_status_and_stops(nats, tmp_path):
    a, b = nats(80, 0)
    site = Site(tmp_path / "site", {"nat-a": {"source": url(a), "target": url(b)}}, [a, b])
    status = tmp_path / "standby" / "nat-a.json"
    task = f"""\
    - name: Replication
      nfmig.nfmig.standby:
        state: STATE
        source: "{{{{ source }}}}"
        targets: ["{{{{ target }}}}"]
        status_file: {status}
        timeout: 30
      register: r
"""
    pid_file = status.with_name(status.name + ".pid")
    try:
        run, results = site.play(task.replace("STATE", "started"))
        assert run.returncode == 0, run.stdout + run.stderr
        r = results["nat-a"]
        assert r["changed"] and r["running"] and r["status"]["source_connected"]
        pid = r["pid"]
        deadline = time.monotonic() + 30
        while count(b) < 80 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count(b) == 80

        run, results = site.play(task.replace("STATE", "started").replace(
            "register: r", "register: again") + task.replace("STATE", "status") + """\
    - name: Both results
      ansible.builtin.set_fact:
        r: "{{ {'again': again, 'status': r} }}"
""")
        assert run.returncode == 0, run.stdout + run.stderr
        again, current = results["nat-a"]["again"], results["nat-a"]["status"]
        assert not again["changed"] and again["pid"] == pid
        assert not current["changed"] and current["running"]
        assert current["status"]["sessions"] == 80

        run, results = site.play(task.replace("STATE", "stopped"))
        assert run.returncode == 0, run.stdout + run.stderr
        assert results["nat-a"]["changed"] and not results["nat-a"]["running"]
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    finally:
        _kill_left(pid_file)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _kill_left(pid_file: Path) -> None:
    """A replication a failed test left running is ended here (by its recorded pid)."""
    try:
        pid = json.loads(pid_file.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return
    if _state(pid) not in ("gone", "Z"):
        os.kill(pid, 9)


def test_the_collection_builds_and_installs_with_ansible_galaxy(nats, tmp_path):
    env = ansible_env(tmp_path)
    galaxy = ansible_command("ansible-galaxy")
    built = subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path",
                            str(tmp_path / "dist")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert built.returncode == 0, built.stdout + built.stderr
    (tarball,) = (tmp_path / "dist").glob("nfmig-nfmig-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"plugins/modules/migrate.py", "plugins/action/migrate.py", "meta/runtime.yml",
            "README.md", "MANIFEST.json"} <= names
    for source, into in ((str(tarball), tmp_path / "from-tarball"),
                         (str(COLLECTION), tmp_path / "from-path")):
        # Only the directory installed into is searched: the repository's own copy would
        # make the install a no-op ("already installed").
        installed = subprocess.run([galaxy, "collection", "install", "--offline", source,
                                    "-p", str(into)], cwd=tmp_path,
                                   env=dict(env, ANSIBLE_COLLECTIONS_PATH=str(into)),
                                   capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert (into / "ansible_collections/nfmig/nfmig/plugins/modules/migrate.py").exists()
    (a,) = nats(25)
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(a))
    only_installed = dict(env, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "from-tarball"))
    adhoc = subprocess.run(
        [ansible_command("ansible"), "localhost", "-c", "local", "-m",
         "nfmig.nfmig.sessions_info", "-a",
         json.dumps({"endpoint": f"netconf://admin@127.0.0.1:{a.port}",
                     "known_hosts": str(known)}),
         "-e", json.dumps({"ansible_password": PASSWORD})],
        cwd=tmp_path, env=only_installed, capture_output=True, text=True,
        timeout=RUN_TIMEOUT)
    assert adhoc.returncode == 0, adhoc.stdout + adhoc.stderr
    assert '"session_count": 25' in adhoc.stdout
    assert PASSWORD not in adhoc.stdout + adhoc.stderr


def test_the_bench_runs_the_collection_over_several_hosts(nats, tmp_path):
    a1, b1, a2, b2 = nats(100, 0, 100, 0)
    figures = run_collection([(a1, b1), (a2, b2)], tmp_path / "bench", forks=2)
    assert figures["ok"], figures["output"]
    assert figures["sessions_moved"] == 200
    for host in figures["hosts"].values():
        assert host["status"] == "ok" and host["sessions_moved"] == 100
        assert host["task_seconds"] > host["migration_seconds"] > 0
        assert host["overhead_seconds"] > 0 and host["precheck_seconds"] is not None
    assert [count(s) for s in (a1, b1, a2, b2)] == [0, 100, 0, 100]


def test_a_plan_evacuates_every_pair_in_one_task_and_continues_its_job(nats, tmp_path):
    a1, b1, a2, b2 = nats(70, 0, 30, 0)
    plan = {"pairs": [{"source": url(a1), "target": url(b1)},
                      {"source": url(a2), "target": url(b2)}]}
    site = Site(tmp_path / "site", {"site-a": {"plan": plan}}, [a1, b1, a2, b2])
    task = f"""\
    - name: Evacuate the site from its plan
      nfmig.nfmig.migrate:
        plan: "{{{{ plan }}}}"
        plan_state_file: {tmp_path / "site-a.state"}
        parallel: 2
      register: r
"""
    run, results = site.play(task, "--check")
    assert run.returncode == 0, run.stdout + run.stderr
    r = results["site-a"]
    assert r["changed"] and r["result"] == "dry-run" and r["would_move"] == 100
    assert [count(s) for s in (a1, b1, a2, b2)] == [70, 0, 30, 0]

    run, results = site.play(task)
    assert run.returncode == 0, run.stdout + run.stderr
    r = results["site-a"]
    assert r["changed"] and r["moved"] == 100 and r["report"]["totals"]["done"] == 2
    assert [count(s) for s in (a1, b1, a2, b2)] == [0, 70, 0, 30]

    run, results = site.play(task)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not results["site-a"]["changed"] and results["site-a"]["moved"] == 0


def test_live_streams_keep_flowing_through_a_playbook_evacuation(tmp_path):
    """Linux kernel NATs in network namespaces, TCP and UDP streams through NAT A: the
    playbook moves their sessions and the gateway addresses to NAT B and the streams do
    not notice."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the live Ansible test must not skip", pytrace=False)
        pytest.skip("network namespaces and conntrack need root")
    # Imported here: those modules skip (or fail in CI) as a whole when not root.
    from nfmig.probe import Probe
    from nfmig.testbed import TestBed

    from .test_live_cli import BACKGROUND, assert_streams_did_not_notice, start_pair
    from .test_migrate_linux import synthetic

    with TestBed() as bed:
        a, b = start_pair(bed, tmp_path / "nats")
        try:
            password = (tmp_path / "nats" / "password").read_text().strip()
            site = Site(tmp_path / "site", {"nat-a": {"source": a.url, "target": b.url}},
                        [a.server, b.server], password=password)
            a.edit(synthetic(BACKGROUND))
            with Probe(bed) as probe:  # the streams are flowing
                time.sleep(0.3)
                run, results = site.play(MIGRATE)
                time.sleep(0.5)
                streams = probe.stop()
            assert run.returncode == 0, run.stdout + run.stderr
            r = results["nat-a"]
            assert r["changed"] and r["result"] == "success"
            assert r["moved"] >= BACKGROUND + 2  # the probe's TCP and UDP sessions too
            assert r["report"]["switchover"].startswith("gateway ")
            assert_streams_did_not_notice(streams)
            assert a.keys() == set() and len(b.keys()) == r["moved"]
        finally:
            a.stop()
            b.stop()
