"""`nfmig migrate` and `nfmig report`: the migrator's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from nfmig.server.option_table import number

EPILOG = """\
endpoints are netconf://user@host:port (port 830 when left out). The password comes from
--password-file, else the NFMIG_PASSWORD environment variable, else SSH keys (--ssh-key,
the agent, ~/.ssh/id_*), else a prompt on the terminal. Host keys are checked against
--known-hosts. `nfmig -v migrate ...` logs every phase as it ends.

forms:
  nfmig migrate SOURCE TARGET                       one to one
  nfmig migrate SOURCE [SOURCE ...] --to TARGET     many to one
  nfmig migrate SOURCE --split PREFIX=TARGET ...    one to many, by subscriber prefix

order: the sessions are copied while traffic flows; then, under a short freeze of new
sessions, what changed since the copy is written and the targets confirm; then the
traffic is switched (--switchover) and only then are the sessions deleted on the sources.

switchover: "gateway" (default) moves the nat-policy/gateway-address entries of the
sources to the target (whole NATs only); "none" switches nothing; anything else is a
shell command run once the targets hold every session, with NFMIG_MIGRATION_ID,
NFMIG_SOURCES, NFMIG_TARGETS, NFMIG_SELECTION and NFMIG_SESSIONS set; it exits 0 once
the traffic goes to the targets. Or copy with --keep-source, switch by your own means,
then run the same command with --finish to delete what the targets hold.

exit status: 0 moved (or the dry run passed); 1 refused or failed, and every session is
where it was; 2 bad command line; 3 failed with sessions on both sides, or the rollback
could not finish (the report says where; running the same command again completes it).
"""


def _size(text: str) -> int:
    from nfmig.client.report import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """How a command that connects to NF instances authenticates (migrate, standby,
    failover)."""
    auth = parser.add_argument_group("authentication")
    auth.add_argument("--password-file", type=Path, metavar="FILE",
                      help="read the password from the first line of FILE")
    auth.add_argument("--ssh-key", type=Path, metavar="FILE", help="SSH private key file")
    auth.add_argument("--known-hosts", type=Path, default=Path("~/.ssh/known_hosts"),
                      metavar="FILE", help="known-hosts file the servers' host keys are "
                                           "checked against (default ~/.ssh/known_hosts)")
    auth.add_argument("--ca-file", type=Path, metavar="PEM",
                      help="CA certificates the restconf:// servers' certificates are checked "
                           "against (default: the system's)")
    auth.add_argument("--insecure-no-host-key-check", action="store_true",
                      help="do not check host keys nor TLS certificates (tests only: anyone "
                           "in the middle could read and change the sessions)")


def credentials_from(args: argparse.Namespace, **extra):
    """The Credentials of add_auth_arguments' options."""
    from nfmig.client.endpoints import Credentials

    return Credentials.from_sources(
        args.password_file, interactive=sys.stdin.isatty(), key_file=args.ssh_key,
        known_hosts=args.known_hosts, ca_file=args.ca_file,
        verify_host_keys=not args.insecure_no_host_key_check, **extra)


def add_parsers(sub) -> None:
    migrate = sub.add_parser(
        "migrate", help="move NAT sessions between NF instances over NETCONF or RESTCONF",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Move the selected sessions from the source NF instances to the target\n"
        "ones while their connections keep flowing: negotiate capabilities, announce the\n"
        "migration, lock, copy the selection into the targets' candidate, validate, commit\n"
        "(confirmed), verify; freeze new sessions on the sources, write what changed since\n"
        "the copy, confirm, switch the traffic over, thaw; then delete on the sources.\n"
        "A failure before the targets confirm rolls everything back.")
    migrate.add_argument("endpoints", nargs="+", metavar="ENDPOINT",
                         help="SOURCE TARGET, or the sources when --to or --split is given; "
                              "each netconf://user@host[:port] (SSH, port 830) or "
                              "restconf://user@host[:port] (HTTPS, port 443), mixed freely")
    where = migrate.add_argument_group("where the sessions go")
    where.add_argument("--to", metavar="TARGET",
                       help="the target; every ENDPOINT is then a source (many to one)")
    where.add_argument("--split", action="append", default=[], metavar="PREFIX=TARGET",
                       help="send the sessions of subscriber PREFIX (e.g. 10.0.1.0/24) to "
                            "TARGET; repeat for each target (one to many; the longest prefix "
                            "wins; sessions of other subscribers stay)")
    where.add_argument("--select", action="append", default=[], metavar="SELECTION",
                       help="what to move: all (default), subscriber=ADDR_OR_PREFIX "
                            "(repeatable), or xpath=EXPR over the model, prefix nfnat, e.g. "
                            "\"xpath=/nfnat:nat-session[nfnat:dst_port=443]\"")
    how = migrate.add_argument_group("how")
    how.add_argument("--keep-source", action="store_true",
                     help="copy: leave the sessions on the sources and switch nothing")
    how.add_argument("--finish", action="store_true",
                     help="the second step after --keep-source and a switch of your own: "
                          "delete from the sources the selected sessions the targets hold")
    how.add_argument("--partial", action="store_true",
                     help="leave on their source the sessions a target says it cannot hold "
                          "(e.g. IPv6 on the SDN NAT) and move the rest; without it such a "
                          "migration is refused with their list")
    how.add_argument("--model", choices=("nfmig-nat", "ietf-nat"), default="nfmig-nat",
                     help="the model the sessions are read and written through: nfmig-nat "
                          "(default) or RFC 8512 ietf-nat mapping-entries (every end must "
                          "implement ietf-nat and nfmig-nat-ietf)")
    how.add_argument("--with-policy", action="store_true",
                     help="give a target whose nat-policy does not translate to the moved "
                          "sessions' external addresses the source's policy (without its "
                          "gateway addresses) in the same commit; without it such a "
                          "migration is refused")
    how.add_argument("--switchover", default="gateway", metavar="HOW",
                     help="how the traffic moves once the targets hold the sessions: "
                          "gateway (default: the gateway-address entries move), none, or a "
                          "shell command (see below)")
    how.add_argument("--dry-run", action="store_true",
                     help="do everything up to validating the targets' candidate, then "
                          "discard: nothing moves, no migration is announced")
    how.add_argument("--no-freeze", action="store_true",
                     help="do not hold the selection's new sessions on the sources during "
                          "the migration (for sources without the freeze operation; "
                          "sessions they open meanwhile stay on them)")
    how.add_argument("--freeze-timeout", type=number(1, 3600), default=60, metavar="S",
                     help="a source thaws by itself after S seconds even if the migrator "
                          "vanishes (default 60)")
    how.add_argument("--confirm-timeout", type=number(1, 86400), default=120, metavar="S",
                     help="a confirmed commit is reverted by the target if not confirmed "
                          "within S seconds (default 120)")
    how.add_argument("--migration-id", metavar="ID",
                     help="name of the migration in announcements and freeze (default: "
                          "generated)")
    how.add_argument("--require-revision", metavar="DATE",
                     help="refuse unless every end implements this nfmig-nat revision")
    how.add_argument("--require-feature", action="append", default=[], metavar="NAME",
                     help="refuse unless every end supports this nfmig-nat feature")
    how.add_argument("--timeout", type=number(1, 86400), default=600, metavar="S",
                     help="longest wait for one NETCONF reply (default 600)")
    how.add_argument("--compression", choices=("auto", "on", "off"), default="auto",
                     help="SSH compression on netconf:// ends and gzip bodies on "
                          "restconf:// ends, where the server offers them: the sessions "
                          "cross the wire about tenfold smaller, for CPU time at both ends "
                          "(default auto: on, but for ends on this host's loopback)")
    add_auth_arguments(migrate)
    out = migrate.add_argument_group("report")
    out.add_argument("--json", action="store_true",
                     help="print the report as JSON: sessions moved, bytes each way, seconds "
                          "per phase, the freeze window, the VM comparison")
    out.add_argument("--report-file", type=Path, metavar="FILE",
                     help="also write the JSON report to FILE (for nfmig report)")
    out.add_argument("--vm-image-bytes", type=_size, metavar="SIZE",
                     help="size of the NAT VM's image (e.g. 2G), to compare with the state "
                          "(0, memory only, when --vm-memory-from-pid is given without it)")
    out.add_argument("--vm-memory-bytes", type=_size, metavar="SIZE",
                     help="memory of the NAT VM (e.g. 1G), to compare with the state")
    out.add_argument("--vm-memory-from-pid", type=number(1, 1 << 22), metavar="PID",
                     help="measure the VM memory instead: the resident memory of the source "
                          "NF's process PID on this host and of the processes it started, "
                          "read before the migration begins")

    report = sub.add_parser(
        "report", help="draw moving a NAT's VM against moving its state, as a chart",
        description="Draw the chart of moving a NAT's VM against moving its state: from "
        "bench/vm_vs_state.py --json output (both measured in one run: bytes and time per "
        "N, per link), or from one report of nfmig migrate --json or --report-file (the VM's "
        "figures then given with --vm-image-bytes / --vm-memory-bytes or measured with "
        "--vm-memory-from-pid: labelled as an estimate).")
    report.add_argument("report", type=Path, metavar="FILE.json")
    report.add_argument("--png", type=Path, required=True, metavar="OUT",
                        help="PNG file to write")
    report.add_argument("--vm-image-bytes", type=_size, metavar="SIZE",
                        help="VM image size, when the report has none (or to override it)")
    report.add_argument("--vm-memory-bytes", type=_size, metavar="SIZE",
                        help="VM memory size, when the report has none (or to override it)")


def cmd_migrate(args: argparse.Namespace) -> int:
    from nfmig.client.endpoints import EndpointError
    from nfmig.client.migrate import Migration, Options
    from nfmig.client.report import Progress
    from nfmig.client.selection import Selection, SelectionError, Split

    # Phases are logged; without -v only their warnings reach the terminal, the report
    # (and the progress bar) say the rest.
    logging.getLogger("nfmig.client").setLevel(logging.DEBUG if args.verbose
                                               else logging.WARNING)
    try:
        sources, targets, selection = _plan(args, Selection, Split)
        vm_image, vm_memory, vm_source = _vm_figures(args)
        credentials = credentials_from(args, compress={"on": True, "off": False}.get(
            args.compression))
        if args.finish and (args.keep_source or args.dry_run):
            raise ValueError("--finish deletes what an earlier --keep-source copied; it "
                             "cannot be combined with --keep-source or --dry-run")
        if not args.switchover.strip():
            raise ValueError("--switchover needs gateway, none or a command")
        options = Options(keep_source=args.keep_source, dry_run=args.dry_run,
                          finish=args.finish, switchover=args.switchover.strip(),
                          partial=args.partial, with_policy=args.with_policy,
                          freeze=not args.no_freeze, freeze_timeout=args.freeze_timeout,
                          confirm_timeout=args.confirm_timeout,
                          migration_id=args.migration_id,
                          require_revision=args.require_revision,
                          require_features=tuple(args.require_feature),
                          model=args.model,
                          credentials=credentials, rpc_timeout=args.timeout,
                          vm_image_bytes=vm_image, vm_memory_bytes=vm_memory)
        migration = Migration(sources, targets, selection, options)
        migration.report.vm_source = vm_source
    except (SelectionError, EndpointError, ValueError) as exc:
        return _fail(str(exc), 2)
    progress = None
    if sys.stderr.isatty():
        progress = Progress(migration.expected_steps(), migration.counts)
        options.on_phase = progress
    try:
        report = migration.run()
    finally:
        if progress:
            progress.close()
    emit_report(args, report.to_json(), report.summary())
    if report.ok:
        return 0
    print(f"nfmig: migration {report.result}: {report.reason}", file=sys.stderr)
    return 1 if report.cleanup_complete else 3


def emit_report(args: argparse.Namespace, text: str, summary: str) -> None:
    """A command's report (JSON ``text``): into --report-file, and on stdout as JSON with
    --json, else its ``summary`` for a person."""
    if args.report_file:
        try:
            args.report_file.write_text(text + "\n")
        except OSError as exc:
            print(f"nfmig: cannot write {args.report_file}: {exc.strerror}", file=sys.stderr)
    _emit(text if args.json else summary)


def _emit(text: str) -> None:
    """Print the report; a reader that went away (``| head``) takes what it wanted, and the
    exit status still says how the migration went."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _plan(args: argparse.Namespace, Selection, Split):
    """Sources, targets and selection from the command line's forms."""
    if args.split:
        if args.to:
            raise ValueError("--split names the targets; leave out --to")
        if args.select:
            raise ValueError("--split selects by prefix; it cannot be combined with --select")
        return args.endpoints, [], Split.parse(args.split)
    selection = Selection.parse(args.select)
    if args.to:
        return args.endpoints, [args.to], selection
    if len(args.endpoints) != 2:
        raise ValueError("name one SOURCE and one TARGET, or the target with --to (many to "
                         "one) or --split (one to many)")
    return args.endpoints[:1], args.endpoints[1:], selection


def _vm_figures(args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    """VM image and memory bytes for the comparison, and where they came from."""
    if args.vm_memory_from_pid is None:
        return args.vm_image_bytes, args.vm_memory_bytes, "command line"
    if args.vm_memory_bytes is not None:
        raise ValueError("give the VM memory with --vm-memory-bytes or measure it with "
                         "--vm-memory-from-pid, not both")
    from nfmig.client.report import process_memory

    memory, _ = process_memory(args.vm_memory_from_pid)
    image = args.vm_image_bytes if args.vm_image_bytes is not None else 0
    return image, memory, f"measured from pid {args.vm_memory_from_pid}"


def cmd_report(args: argparse.Namespace) -> int:
    from nfmig.client.chart import cmd_report  # matplotlib: only this command needs it

    return cmd_report(args)


def _fail(message: str, code: int) -> int:
    print(f"nfmig: error: {message}", file=sys.stderr)
    return code
