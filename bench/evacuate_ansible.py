"""A site evacuated with the Ansible collection (ansible_collections/nfmig/nfmig): one
inventory host per source -> target pair, a playbook of one nfmig.nfmig.migrate task,
run by the real ansible-playbook; what Ansible adds to each host's migration.

For each host: the task's seconds (from the moment Ansible queued it for that host until
its result came back, as a callback plugin sees it) beside the migration's own
``total_seconds`` from its report; the difference is Ansible's overhead per host (forking
a worker, building and starting the module, importing nfmig in it, the pre-check read of
the source, returning the result).

    .venv/bin/python bench/evacuate_ansible.py [--pairs 1] [--sessions 10000] [--forks 5]
        [--json FILE]

This file is also the callback plugin that times the tasks: ``run_collection`` copies it
into the run's callback directory (a plugin directory is imported whole, so the bench
directory itself is not one), which is why it imports nothing heavy at the top.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CALLBACK = "nfmig_task_timing"
TIMING_ENV = "NFMIG_TASK_TIMING_FILE"

if os.environ.get(TIMING_ENV):  # loaded by ansible-playbook as its callback plugin
    from ansible.plugins.callback import CallbackBase
else:
    # Imported as the bench (or by tests): importing Ansible here would set up its
    # temporary directory under the caller's home, which only the playbook may do.
    CallbackBase = object  # type: ignore[misc,assignment]

PLAYBOOK = """\
- name: Evacuate the site
  hosts: nats
  gather_facts: false
  connection: local
  tasks:
    - name: Move every session of the NAT to its spare
      nfmig.nfmig.migrate:
        source: "{{ nfmig_source }}"
        target: "{{ nfmig_target }}"
        report_file: "{{ report_dir }}/{{ inventory_hostname }}.json"
      register: moved

    - name: Keep the task's result for the figures
      ansible.builtin.copy:
        content: "{{ moved | to_json }}"
        dest: "{{ report_dir }}/{{ inventory_hostname }}.result.json"
        mode: "0600"
"""


class CallbackModule(CallbackBase):  # type: ignore[misc,valid-type]
    """Each host's seconds per task, from queued to its result; written as JSON to the file
    named by NFMIG_TASK_TIMING_FILE when the playbook ends."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = CALLBACK
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: dict[tuple[str, str], float] = {}
        self.times: dict[str, dict[str, dict[str, Any]]] = {}

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self.started[(host.get_name(), task._uuid)] = time.monotonic()

    def _done(self, result: Any, status: str) -> None:
        host, task = result._host.get_name(), result._task
        t0 = self.started.pop((host, task._uuid), None)
        if t0 is not None:
            self.times.setdefault(host, {})[task.get_name()] = {
                "seconds": round(time.monotonic() - t0, 6), "status": status}

    def v2_runner_on_ok(self, result: Any) -> None:
        self._done(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._done(result, "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._done(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._done(result, "skipped")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        path = os.environ.get(TIMING_ENV)
        if path:
            Path(path).write_text(json.dumps(self.times, indent=1))


def ansible_env(workdir: Path, python: str = sys.executable) -> dict[str, str]:
    """The environment of an ansible command that writes only under ``workdir``: its home,
    temporary files and configuration there, the collection from this repository, modules
    run by ``python`` (which has nfmig), no retry files, no colours, no prompts."""
    home = workdir / "ansible-home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    config = workdir / "ansible.cfg"
    if not config.exists():
        config.write_text("[defaults]\n")  # none found elsewhere (cwd, ~) is read
    return {
        **os.environ,
        "HOME": str(home), "LC_ALL": "C.UTF-8", "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_GALAXY_CACHE_DIR": str(home / "galaxy-cache"),
        "ANSIBLE_GALAXY_TOKEN_PATH": str(home / "galaxy-token"),
        "ANSIBLE_COLLECTIONS_PATH": str(REPO),
        "ANSIBLE_PYTHON_INTERPRETER": python,
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        # how often the controller polls its workers (Ansible's default, a millisecond,
        # takes a share of a core from the migrations on a small controller)
        "ANSIBLE_INTERNAL_POLL_INTERVAL": os.environ.get("ANSIBLE_INTERNAL_POLL_INTERVAL",
                                                         "0.05"),
    }


def ansible_command(name: str) -> str:
    """An ansible command of the Python running this (the venv's)."""
    return str(Path(sys.executable).parent / name)


def known_hosts_line(server: Any) -> str:
    """The known-hosts line of a local nfmig server's ECDSA host key."""
    import paramiko

    key = paramiko.ECDSAKey.from_private_key_file(str(server.state_dir / "ssh_host_ecdsa_key"))
    return f"[127.0.0.1]:{server.port} {key.get_name()} {key.get_base64()}\n"


def run_collection(pairs: Sequence[tuple[Any, Any]], workdir: Path, forks: int = 5
                   ) -> dict[str, Any]:
    """Run the evacuation playbook over one inventory host per ``(source, target)`` pair of
    local nfmig servers (client.local.LocalServer, every one with the same password),
    ``forks`` hosts at a time. Returns the total seconds, the sessions moved, and per host
    the task's seconds beside the migration's, with Ansible's overhead between them."""
    if not pairs:
        raise ValueError("no pair to migrate")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reports = workdir / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    callbacks = workdir / "callbacks"
    callbacks.mkdir(exist_ok=True)
    shutil.copyfile(__file__, callbacks / f"{CALLBACK}.py")
    known = workdir / "known_hosts"
    known.write_text("".join(known_hosts_line(s) for pair in pairs for s in pair))
    hosts = {
        f"nat{i}": {"nfmig_source": f"netconf://127.0.0.1:{source.port}",
                    "nfmig_target": f"netconf://127.0.0.1:{target.port}",
                    "ansible_user": source.user}
        for i, (source, target) in enumerate(pairs)}
    inventory = {"nats": {"hosts": hosts, "vars": {
        "ansible_password": pairs[0][0].password, "nfmig_known_hosts": str(known),
        "report_dir": str(reports)}}}
    (workdir / "inventory.json").write_text(json.dumps(inventory))
    (workdir / "playbook.yml").write_text(PLAYBOOK)
    timing = workdir / "timing.json"
    timing.unlink(missing_ok=True)
    env = ansible_env(workdir)
    env.update({"ANSIBLE_CALLBACK_PLUGINS": str(callbacks),
                "ANSIBLE_CALLBACKS_ENABLED": CALLBACK, TIMING_ENV: str(timing)})
    t0 = time.perf_counter()
    run = subprocess.run([ansible_command("ansible-playbook"), "-i",
                          str(workdir / "inventory.json"), "--forks", str(forks),
                          str(workdir / "playbook.yml")],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    total = time.perf_counter() - t0
    times = json.loads(timing.read_text()) if timing.exists() else {}
    per_host = {}
    moved = 0
    for name in hosts:
        task = times.get(name, {}).get("Move every session of the NAT to its spare", {})
        report_path = reports / f"{name}.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        moved += report.get("sessions_moved", 0)
        result_path = reports / f"{name}.result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        migration = report.get("total_seconds")
        seconds = task.get("seconds")
        per_host[name] = {
            "status": task.get("status", "missing"), "task_seconds": seconds,
            "migration_seconds": migration,
            "precheck_seconds": result.get("precheck_seconds"),
            "sessions_moved": report.get("sessions_moved", 0),
            "overhead_seconds": round(seconds - migration, 6)
            if seconds is not None and migration is not None else None}
    return {"ok": run.returncode == 0, "returncode": run.returncode,
            "total_seconds": round(total, 6), "sessions_moved": moved, "forks": forks,
            "hosts": per_host, "output": run.stdout[-4000:] + run.stderr[-4000:]}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import secrets
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from nfmig.client.local import start_local_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1, help="source -> target pairs (hosts)")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions per source")
    parser.add_argument("--forks", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    password = "p" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="nfmig-ansible-bench-") as tmp:
        root = Path(tmp)
        servers: list[Any] = []

        def start(name: str, sessions: int) -> Any:
            return start_local_server(root / name, "--backend", "simulated", "--sessions",
                                      str(sessions), password=password, scrypt_cost=14)
        try:
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(start, f"{role}{i}", args.sessions if role == "a"
                                       else 0)
                           for i in range(args.pairs) for role in ("a", "b")]
                for future in futures:
                    servers.append(future.result())
            pairs = list(zip(servers[::2], servers[1::2], strict=True))
            figures = run_collection(pairs, root / "run", args.forks)
        finally:
            for server in servers:
                server.stop()
    if not figures["ok"]:
        print(figures["output"], file=sys.stderr)
    print(f"{args.pairs} host(s) x {args.sessions} sessions, forks {args.forks}: "
          f"{figures['sessions_moved']} moved in {figures['total_seconds']:.2f} s "
          f"(ansible-playbook, start to end)")
    print(f"{'host':<8} {'task s':>8} {'migration s':>12} {'overhead s':>11} "
          f"{'of it, pre-check s':>19}")
    for name, host in figures["hosts"].items():
        def cell(value: float | None, width: int) -> str:
            return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"
        print(f"{name:<8} {cell(host['task_seconds'], 8)} "
              f"{cell(host['migration_seconds'], 12)} {cell(host['overhead_seconds'], 11)} "
              f"{cell(host['precheck_seconds'], 19)}")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in figures.items() if k != "output"},
                                        indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
