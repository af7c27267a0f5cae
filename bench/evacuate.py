"""A site evacuation against a sequential shell loop of `nfmig migrate`: K NATs of N
sessions each, simulated backend, the same pairs in the same run.

Prints the wall time and sessions per second of both and their ratio, and each NAT's
freeze window under the evacuation against its window when migrated alone (by the loop).
Goals: throughput at least twice the loop's, each window within 1.5 times its own alone.

    .venv/bin/python bench/evacuate.py [--nats 20,50] [--sessions 10000] [--parallel 4]
                                       [--json FILE]

The runs go back and forth: the loop moves every NAT from A to B, the evacuation from B back
to A, each checked by the counts the servers report before and after. Further ways of
moving the same pairs (another orchestrator, say) are added as columns by appending to
EXTRA_RUNS: each gets the site and a direction and returns a Run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.evacuate import session_count
from nfmig.client.local import LocalServer, start_local_server

PASSWORD = "pbench-evacuate"
THROUGHPUT_GOAL = 2.0
FREEZE_GOAL = 1.5


@dataclass
class Site:
    """K source NATs (A) and K targets (B) on loopback; pair i is a[i] <-> b[i]."""

    a: list[LocalServer]
    b: list[LocalServer]
    sessions: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def endpoints(self, side: str) -> list[str]:
        return [f"netconf://admin@127.0.0.1:{s.port}" for s in getattr(self, side)]

    def pairs(self, direction: str) -> list[tuple[str, str]]:
        """(source, target) of every NAT, "ab" or "ba"."""
        return list(zip(self.endpoints(direction[0]), self.endpoints(direction[1]),
                        strict=True))


@dataclass
class Run:
    label: str
    seconds: float
    sessions: int
    freezes: list[float | None]  # per NAT, in the site's order
    ok: bool
    detail: str = ""
    extra: dict = field(default_factory=dict)  # figures of its own (Ansible's overhead)

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds if self.seconds else 0.0


RunFn = Callable[[Site, str], Run]


def migrate_loop(site: Site, direction: str) -> Run:
    """`nfmig migrate` once per NAT, one after the other, from a shell loop."""
    reports = [site.workdir / f"loop-{direction}-{i}.json" for i in range(len(site.a))]
    lines = [f"{shlex.quote(sys.executable)} -m nfmig migrate {src} {dst} "
             f"--insecure-no-host-key-check --report-file {r} >/dev/null || exit 1"
             for (src, dst), r in zip(site.pairs(direction), reports, strict=True)]
    started = time.perf_counter()
    done = subprocess.run(["bash", "-c", "\n".join(lines)], env=site.env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    loaded = [json.loads(r.read_text()) for r in reports if r.exists()]
    return Run("nfmig migrate, shell loop", seconds,
               sum(x["sessions_moved"] for x in loaded),
               [x["freeze_window"]["seconds"] for x in loaded],
               done.returncode == 0 and len(loaded) == len(reports), done.stderr[-500:])


def evacuate(parallel: int, windows: int) -> RunFn:
    def run(site: Site, direction: str) -> Run:
        plan = site.workdir / f"plan-{direction}-{time.monotonic_ns()}.json"
        plan.write_text(json.dumps({
            "defaults": {"insecure-no-host-key-check": True},
            "pairs": [{"source": s, "target": t} for s, t in site.pairs(direction)]}))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "nfmig", "evacuate", str(plan), "--json",
                               "--parallel", str(parallel), "--windows", str(windows)],
                              env=site.env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        try:
            nats = json.loads(done.stdout)["nats"]
        except ValueError:
            return Run("nfmig evacuate", seconds, 0, [], False, done.stderr[-500:])
        return Run(f"nfmig evacuate --parallel {parallel}", seconds,
                   sum(n["report"]["sessions_moved"] for n in nats if n["report"]),
                   [n["report"]["freeze_window"]["seconds"] if n["report"] else None
                    for n in nats], done.returncode == 0, done.stderr[-500:])
    return run


def ansible_hosts(forks: int) -> RunFn:
    """The collection's migrate module, one inventory host per NAT (bench/
    evacuate_ansible.run_collection: the real ansible-playbook)."""
    def run(site: Site, direction: str) -> Run:
        from evacuate_ansible import run_collection

        sides = (site.a, site.b) if direction == "ab" else (site.b, site.a)
        workdir = site.workdir / f"ansible-hosts-{direction}"
        figures = run_collection(list(zip(*sides, strict=True)), workdir, forks)
        reports = [workdir / "reports" / f"nat{i}.json" for i in range(len(site.a))]
        loaded = [json.loads(r.read_text()) if r.exists() else None for r in reports]
        overhead = [h["overhead_seconds"] for h in figures["hosts"].values()
                    if h["overhead_seconds"] is not None]
        return Run(f"ansible, a host per NAT (forks {forks})", figures["total_seconds"],
                   figures["sessions_moved"],
                   [x["freeze_window"]["seconds"] if x else None for x in loaded],
                   figures["ok"], figures["output"][-500:],
                   {"overhead_per_host_s": _median(overhead),
                    "migration_per_host_s": _median(
                        [x["total_seconds"] for x in loaded if x])})
    return run


def ansible_plan(parallel: int, windows: int) -> RunFn:
    """The collection's migrate module given the site's plan: one task runs the whole
    evacuation in-process."""
    def run(site: Site, direction: str) -> Run:
        from evacuate_ansible import ansible_command, ansible_env, known_hosts_line

        workdir = site.workdir / f"ansible-plan-{direction}"
        workdir.mkdir(parents=True, exist_ok=True)
        known = workdir / "known_hosts"
        known.write_text("".join(known_hosts_line(s) for s in site.a + site.b))
        plan = {"defaults": {"known-hosts": str(known)},
                "pairs": [{"source": a, "target": b} for a, b in site.pairs(direction)]}
        result = workdir / "result.json"
        (workdir / "playbook.yml").write_text(PLAN_PLAYBOOK.format(
            plan=json.dumps(plan), parallel=parallel, windows=windows, result=result))
        started = time.perf_counter()
        done = subprocess.run([ansible_command("ansible-playbook"), "-i", "localhost,",
                               str(workdir / "playbook.yml")], cwd=workdir,
                              env={**ansible_env(workdir), "NFMIG_PASSWORD": PASSWORD},
                              capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - started
        try:
            site_report = json.loads(result.read_text())["report"]
        except (OSError, ValueError, KeyError):
            return Run("ansible, the plan in one task", seconds, 0, [], False,
                       (done.stdout + done.stderr)[-500:])
        nats = site_report["nats"]
        evacuation = site_report["totals"]["seconds"]
        return Run("ansible, the plan in one task", seconds,
                   sum(n["report"]["sessions_moved"] for n in nats if n["report"]),
                   [n["report"]["freeze_window"]["seconds"] if n["report"] else None
                    for n in nats], done.returncode == 0, (done.stdout + done.stderr)[-500:],
                   {"overhead_per_host_s": round((seconds - evacuation) / len(nats), 4),
                    "migration_per_host_s": _median([n["report"]["total_seconds"]
                                                     for n in nats if n["report"]])})
    return run


PLAN_PLAYBOOK = """\
- name: Evacuate the site from its plan
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Every pair of the plan
      nfmig.nfmig.migrate:
        plan: {plan}
        parallel: {parallel}
        windows: {windows}
      register: site
    - name: Keep the site report for the figures
      ansible.builtin.copy:
        content: "{{{{ site | to_json }}}}"
        dest: {result}
        mode: "0600"
"""


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


# Further columns: (label, how). Each moves every NAT of the site in the direction given.
EXTRA_RUNS: list[tuple[str, RunFn]] = []


def start_site(workdir: Path, nats: int, sessions: int) -> Site:
    def one(index: int) -> LocalServer:
        side, n = ("a", sessions) if index < nats else ("b", 0)
        return start_local_server(workdir / f"{side}{index % nats}", "--backend", "simulated",
                                  "--sessions", str(n), password=PASSWORD, scrypt_cost=14)
    servers: list[LocalServer] = []
    try:
        with ThreadPoolExecutor(4) as pool:
            for server in pool.map(one, range(2 * nats)):
                servers.append(server)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return Site(servers[:nats], servers[nats:], sessions, workdir,
                dict(os.environ, NFMIG_PASSWORD=PASSWORD))


def counts(site: Site, side: str) -> list[int]:
    credentials = Credentials(password=PASSWORD, verify_host_keys=False)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda e: session_count(Endpoint.parse(e), credentials),
                             site.endpoints(side)))


def measure(workdir: Path, nats: int, sessions: int, parallel: int, windows: int,
            ansible: bool) -> dict:
    site = start_site(workdir, nats, sessions)
    try:
        runs = [("loop", migrate_loop), ("evacuate", evacuate(parallel, windows)),
                *([("ansible_hosts", ansible_hosts(os.cpu_count() or 2)),
                   ("ansible_plan", ansible_plan(parallel, windows))] if ansible else []),
                *EXTRA_RUNS]
        results: dict[str, Run] = {}
        direction = "ab"
        for key, how in runs:
            before = counts(site, direction[0])
            if before != [sessions] * nats:
                raise RuntimeError(f"{key}: the sources hold {before} before the run")
            run = how(site, direction)
            after = counts(site, direction[1]), counts(site, direction[0])
            if after != ([sessions] * nats, [0] * nats):
                run.ok, run.detail = False, f"after the run: targets {after[0]}, sources " \
                                            f"{after[1]}; {run.detail}"
            results[key] = run
            direction = direction[::-1]
    finally:
        for server in site.a + site.b:
            server.stop()
    return summarize(nats, sessions, results)


def summarize(nats: int, sessions: int, results: dict[str, Run]) -> dict:
    loop = results["loop"]
    out: dict = {"nats": nats, "sessions_per_nat": sessions, "runs": {}}
    for key, run in results.items():
        ratios = [e / a for e, a in zip(run.freezes, loop.freezes, strict=False)
                  if e is not None and a]
        out["runs"][key] = {
            "label": run.label, "ok": run.ok, "seconds": round(run.seconds, 3),
            "sessions": run.sessions, "sessions_per_s": round(run.rate, 1),
            "throughput_vs_loop": round(run.rate / loop.rate, 2) if loop.rate else None,
            "freeze_ms": [round(f * 1000, 2) if f is not None else None for f in run.freezes],
            "freeze_vs_alone": {
                "median": round(statistics.median(ratios), 2) if ratios else None,
                "max": round(max(ratios), 2) if ratios else None,
                "over_goal": sum(r > FREEZE_GOAL for r in ratios)},
            "detail": run.detail if not run.ok else "", **run.extra}
    return out


def show(result: dict) -> None:
    print(f"\n{result['nats']} NATs x {result['sessions_per_nat']:,} sessions")
    print(f"  {'':<34} {'seconds':>8} {'sessions/s':>11} {'x loop':>7} "
          f"{'freeze ms med/max':>18} {'freeze / alone med/max':>23}")
    for run in result["runs"].values():
        freezes = [f for f in run["freeze_ms"] if f is not None]
        ratio = run["freeze_vs_alone"]
        freeze = (f"{statistics.median(freezes):.1f}/{max(freezes):.1f}" if freezes else "-")
        alone = (f"{ratio['median']:.2f}/{ratio['max']:.2f}" if ratio["median"] is not None
                 else "-")
        print(f"  {run['label']:<34} {run['seconds']:>8.2f} {run['sessions_per_s']:>11,.0f} "
              f"{run['throughput_vs_loop'] or 0:>7.2f} {freeze:>18} {alone:>23}"
              + ("" if run["ok"] else f"  FAILED: {run['detail']}"))
    for run in result["runs"].values():
        if run.get("overhead_per_host_s") is not None:
            share = run["overhead_per_host_s"] / run["migration_per_host_s"] \
                if run.get("migration_per_host_s") else None
            print(f"  {run['label']}: Ansible adds {run['overhead_per_host_s']:.3f} s per NAT "
                  f"to its migration's {run['migration_per_host_s']:.3f} s"
                  + (f" ({share:.0%}; goal <= 10%)" if share is not None else ""))
    evac = result["runs"].get("evacuate")
    if evac:
        print(f"  goals: throughput >= {THROUGHPUT_GOAL}x the loop "
              f"({evac['throughput_vs_loop']}x), each freeze <= {FREEZE_GOAL}x alone "
              f"({evac['freeze_vs_alone']['over_goal']} of {result['nats']} NATs over)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="20,50", help="K, NATs per site (comma list)")
    parser.add_argument("--sessions", type=int, default=10_000, help="N, sessions per NAT")
    parser.add_argument("--parallel", type=int, default=4, help="nfmig evacuate --parallel")
    parser.add_argument("--windows", type=int, default=1, help="nfmig evacuate --windows")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures")
    parser.add_argument("--no-ansible", action="store_true",
                        help="leave out the Ansible collection's two columns")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="nfmig-bench-evacuate-") as tmp:
        for nats in (int(x) for x in args.nats.split(",")):
            result = measure(Path(tmp) / f"k{nats}", nats, args.sessions, args.parallel,
                             args.windows, not args.no_ansible)
            results.append(result)
            show(result)
    if args.json:
        args.json.write_text(json.dumps({"bench": "evacuate", "cpus": os.cpu_count(),
                                         "parallel": args.parallel, "windows": args.windows,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
