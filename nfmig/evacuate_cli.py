"""`nfmig evacuate PLAN`: move every NAT of a site, as a plan says, in one resumable job."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

from nfmig.migrate_cli import add_auth_arguments, credentials_from, emit_report
from nfmig.server.option_table import number

EPILOG = """\
a plan (YAML or JSON):

  defaults:
    user: admin                  # for endpoints written without user@
    password-env: SITE_PASSWORD  # else --password-file, NFMIG_PASSWORD, keys, a prompt
    freeze-timeout: 60
  pairs:
    - source: netconf://nat-a1.site:830
      target: netconf://nat-b1.site:830
    - source: netconf://nat-a2.site:830
      target: netconf://nat-b2.site:830
      select: subscriber=10.0.2.0/24

or a pool: each source goes to the target with the most room, by the session count the
target reports and what the plan already sends it, against its capacity:

  sources: [netconf://nat-a1.site, netconf://nat-a2.site, netconf://nat-a3.site]
  targets:
    - {endpoint: netconf://nat-b1.site, capacity: 200000}
    - {endpoint: netconf://nat-b2.site, capacity: 200000}

defaults: user, password-env, password-file, key-file, known-hosts, ca-file,
insecure-no-host-key-check, compression (auto|on|off), timeout, connect-timeout,
freeze-timeout, confirm-timeout, keep-source, dry-run, freeze, partial, with-policy,
switchover, model, select. The command line's options win over the plan's.

Each NAT moves by a migration of its own, as `nfmig migrate` would move it. The job's
state is kept in --state (default PLAN.state.json): after an interruption or a failure,
run the same command with --resume; only what is not done runs, and a NAT that was
interrupted while moving is settled first (its pending commit cancelled, then the same
migration run again), so that no session ends up on both sides or on neither.

exit status: 0 every NAT moved (or the dry run passed, or nothing was left to do); 1 some
NAT failed, and each failed one's sessions are where they were; 2 bad command line or
plan; 3 some NAT failed with sessions on both sides, or its rollback could not finish
(--resume completes it).
"""


def add_parsers(sub) -> None:
    evacuate = sub.add_parser(
        "evacuate", help="move every NAT of a site to other NF instances, as a plan says",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Move the sessions of many NAT instances at once (a site going into\n"
        "maintenance): the pairs of PLAN run side by side, at most --parallel at once and\n"
        "--per-target into one target, with their freeze windows taken one at a time; the\n"
        "job can be resumed, and one report covers the site.")
    evacuate.add_argument("plan", type=Path, metavar="PLAN",
                          help="the plan: a YAML or JSON file (see below)")
    evacuate.add_argument("--parallel", type=number(1, 256), default=4, metavar="N",
                          help="migrations at once (default 4)")
    evacuate.add_argument("--per-target", type=number(1, 64), default=1, metavar="N",
                          help="migrations into one target at once (default 1: a migration "
                               "locks its target, the next one into it waits)")
    evacuate.add_argument("--windows", type=number(1, 256), default=1, metavar="N",
                          help="NATs in their freeze window at once (default 1; the other "
                               "migrations pause between two phases while a window is open)")
    evacuate.add_argument("--state", type=Path, metavar="FILE",
                          help="the job's state (default PLAN.state.json beside the plan)")
    evacuate.add_argument("--resume", action="store_true",
                          help="continue the job in the state file: run only what is not done")
    evacuate.add_argument("--dry-run", action="store_true",
                          help="every migration up to validating its target, then discard: "
                               "nothing moves, the state file is neither read nor written")
    evacuate.add_argument("--json", action="store_true",
                          help="print the site's report as JSON (each NAT's migration report, "
                               "and the totals)")
    evacuate.add_argument("--report-file", type=Path, metavar="FILE",
                          help="also write the JSON report to FILE")
    evacuate.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="log every phase of every migration as it ends")
    add_auth_arguments(evacuate)


def cmd_evacuate(args: argparse.Namespace) -> int:
    from nfmig.client.endpoints import EndpointError
    from nfmig.client.evacuate import Evacuation, EvacuationOptions, Plan, PlanError

    verbose = getattr(args, "verbose", False)
    logging.getLogger("nfmig.client").setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        plan = Plan.load(args.plan)
        state = args.state or args.plan.with_name(args.plan.name + ".state.json")
        dry_run = args.dry_run or plan.defaults.dry_run
        if not dry_run:
            if args.resume and not state.exists():
                raise PlanError(f"{state}: no state file to resume from (leave out --resume "
                                "to start)")
            if not args.resume and state.exists():
                raise PlanError(f"{state} holds the state of an earlier run: --resume to "
                                "continue it, or remove it to start over")
        credentials = _credentials(args, plan.defaults)
        display = Display(sys.stderr)
        evacuation = Evacuation(plan, EvacuationOptions(
            parallel=args.parallel, per_target=args.per_target, windows=args.windows,
            state_file=state, resume=args.resume, dry_run=dry_run, credentials=credentials,
            on_change=display.changed))
    except (PlanError, EndpointError, ValueError) as exc:
        return _fail(str(exc), 2)
    if evacuation.todo() and not dry_run and display.plain:
        print(f"nfmig: evacuating {len(evacuation.todo())} NATs of {plan.origin} "
              f"(state in {state})", file=sys.stderr)
    display.start(evacuation)
    try:
        report = evacuation.run()
    finally:
        display.close()
    emit_report(args, report.to_json(), report.summary())
    if report.ok:
        return 0
    failed = report.totals()["failed"]
    print(f"nfmig: evacuation {'interrupted' if report.interrupted else 'failed'}: "
          f"{failed} of {len(report.nats)} NATs not moved; --resume to continue",
          file=sys.stderr)
    return 1 if report.cleanup_complete else 3


def _credentials(args: argparse.Namespace, defaults):
    """add_auth_arguments' options, each left out taken from the plan's defaults."""
    merged = argparse.Namespace(**vars(args))
    merged.password_file = args.password_file or defaults.password_file
    merged.ssh_key = args.ssh_key or defaults.key_file
    if args.known_hosts == Path("~/.ssh/known_hosts") and defaults.known_hosts:
        merged.known_hosts = defaults.known_hosts
    merged.ca_file = args.ca_file or defaults.ca_file
    merged.insecure_no_host_key_check = (args.insecure_no_host_key_check
                                         or defaults.insecure_no_host_key_check)
    password = None if merged.password_file else defaults.env_password()
    if password is not None:
        merged.password_file = None
    credentials = credentials_from(merged, compress=defaults.compress())
    if password is not None:
        credentials.password, credentials.prompt = password, None
    return credentials


class Display:
    """On a terminal, a line per NAT and one for the site, redrawn in place; otherwise a
    plain line each time a NAT starts, ends or fails."""

    REDRAW = 0.25

    def __init__(self, stream) -> None:
        self.stream = stream
        self.plain = not stream.isatty()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = 0
        self._said: dict[str, tuple] = {}
        self._started = time.monotonic()
        self._evacuation = None
        self._thread: threading.Thread | None = None

    def start(self, evacuation) -> None:
        self._evacuation = evacuation
        if not self.plain:
            self._thread = threading.Thread(target=self._tick, name="display", daemon=True)
            self._thread.start()

    def changed(self, status) -> None:
        if not self.plain:
            return
        with self._lock:
            said = (status.state, status.note)
            if self._said.get(status.id) == said:
                return  # a new phase: the terminal display shows those, the log does not
            self._said[status.id] = said
            self.stream.write(f"nfmig: NAT {status.id} {status.source} -> "
                              f"{status.target or '?'}: {_state_text(status)}\n")
            self.stream.flush()

    def lines(self) -> list[str]:
        statuses = list(self._evacuation.status.values())
        rows = shutil.get_terminal_size((100, 40))
        shown = statuses
        if len(statuses) > rows.lines - 3:  # the ones that say something now
            shown = [s for s in statuses if s.state in ("running", "failed")][:rows.lines - 3]
        out = [f"{s.id:>3} {_short(s.source)} -> {_short(s.target)} {_state_text(s)}"
               [:rows.columns - 1] for s in shown]
        counts = {k: sum(s.state == k for s in statuses)
                  for k in ("done", "dry-run", "running", "failed", "pending")}
        moved = sum(s.sessions() for s in statuses if s.state in ("running", "done"))
        seconds = time.monotonic() - self._started
        out.append(f"site: {counts['done'] + counts['dry-run']}/{len(statuses)} done, "
                   f"{counts['running']} running, {counts['failed']} failed, "
                   f"{counts['pending']} waiting | {moved:,} sessions, "
                   f"{moved / max(seconds, 1e-3):,.0f}/s, {seconds:.1f} s"[:rows.columns - 1])
        return out

    def _draw(self) -> None:
        try:
            lines = self.lines()
        except Exception:  # a NAT's figures read while its migration changes them
            return
        with self._lock:
            if self._stop.is_set():
                return
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.stream.flush()
            self._drawn = len(lines)

    def _tick(self) -> None:
        while not self._stop.wait(self.REDRAW):
            self._draw()

    def close(self) -> None:
        if self._thread is not None:
            self._draw()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _state_text(status) -> str:
    if status.state == "running":
        phase = f" {status.phase}" if status.phase else ""
        sessions = status.sessions()
        return f"running{phase}" + (f", {sessions:,} sessions" if sessions else "") + (
            f" ({status.note})" if status.note else "")
    if status.state in ("done", "dry-run") and status.report is not None:
        r = status.report
        freeze = f", freeze {r.freeze_seconds * 1000:.1f} ms" if r.freeze_seconds else ""
        count = r.sessions_selected if status.state == "dry-run" else r.sessions_moved
        verb = "would move" if status.state == "dry-run" else "moved"
        return f"{status.state}: {verb} {count} sessions in {r.total_seconds:.2f} s{freeze}"
    if status.state == "failed":
        return f"FAILED: {status.note}"
    return status.state + (f" ({status.note})" if status.note else "")


def _short(endpoint: str | None) -> str:
    return (endpoint or "?").split("://", 1)[-1]


def _fail(message: str, code: int) -> int:
    print(f"nfmig: error: {message}", file=sys.stderr)
    return code
