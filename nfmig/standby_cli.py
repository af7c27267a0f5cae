"""`nfmig standby` and `nfmig failover`: hot-standby copies of a NAT and taking over."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from nfmig.migrate_cli import add_auth_arguments, credentials_from
from nfmig.server.option_table import number, seconds

STANDBY_EPILOG = """\
The source is followed by a YANG-Push subscription (RFC 8639/8641, on change); every
session it creates, changes or ends is written to each standby (edit-config of running) in
batches. A standby that was unreachable, or a source that was lost, is compared in full
before the changes go on. Runs until interrupted (Ctrl-C, SIGTERM), --for S seconds, or a
failover; then prints its report.

exit status: 0 stopped as asked; 1 failed over (the report says to which standby and how
many changes it may lack); 2 bad command line.
"""


def add_parsers(sub) -> None:
    standby = sub.add_parser(
        "standby", help="keep hot-standby copies of a NAT's sessions in other NF instances",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=STANDBY_EPILOG,
        description="Copy the selected sessions of SOURCE to every TARGET, then keep the "
                    "copies up to date as the source's sessions change.")
    standby.add_argument("source", metavar="SOURCE", help="netconf://user@host[:port]")
    standby.add_argument("targets", nargs="+", metavar="TARGET",
                         help="the standbys, netconf://user@host[:port] each")
    standby.add_argument("--select", action="append", default=[], metavar="SELECTION",
                         help="which sessions: all (default) or subscriber=ADDR_OR_PREFIX "
                              "(repeatable)")
    standby.add_argument("--dampening", type=number(10, 60_000), default=20, metavar="MS",
                         help="the source gathers the changes of this long into one "
                              "notification (default 20 ms; RFC 8641 dampening period)")
    standby.add_argument("--hold", type=number(60, 65_535), default=3600, metavar="S",
                         help="lifetime a standby session keeps at least, while the source "
                              "refreshes it unseen (default 3600 s)")
    standby.add_argument("--failover-after", type=seconds(0.05, 86_400), metavar="S",
                         help="fail over to the first reachable standby once the source has "
                              "been unreachable this long (default: never by itself)")
    standby.add_argument("--for", dest="duration", type=number(1, 10 ** 7), metavar="S",
                         help="stop after S seconds")
    standby.add_argument("--status-file", type=Path, metavar="FILE",
                         help="keep the replication's status in FILE (JSON, rewritten every "
                              "half second): what `nfmig failover` reads")
    standby.add_argument("--json", action="store_true", help="print the report as JSON")
    add_auth_arguments(standby)

    failover = sub.add_parser(
        "failover", help="make a standby take over a lost NAT's traffic",
        description="Give STANDBY the lost source's gateway addresses (from the status file "
                    "of `nfmig standby`, or --gateway), which it puts on its interfaces and "
                    "announces; report what the standby may lack.")
    failover.add_argument("standby", metavar="STANDBY", help="netconf://user@host[:port]")
    failover.add_argument("--status-file", type=Path, metavar="FILE",
                          help="the status `nfmig standby --status-file` kept")
    failover.add_argument("--gateway", action="append", default=[],
                          metavar="ADDRESS/LENGTH@INTERFACE",
                          help="a gateway address to take over (repeatable; instead of, or "
                               "beside, the status file's)")
    failover.add_argument("--json", action="store_true", help="print the report as JSON")
    add_auth_arguments(failover)


def _endpoint(text: str, role: str):
    from nfmig.client.endpoints import Endpoint

    endpoint = Endpoint.parse(text)
    if endpoint.scheme != "netconf":
        raise ValueError(f"the {role} {text} must be netconf://")
    return endpoint


def cmd_standby(args: argparse.Namespace) -> int:
    from nfmig.client.endpoints import EndpointError
    from nfmig.client.selection import Selection, SelectionError
    from nfmig.client.standby import Standby, StandbyError, StandbyOptions

    logging.getLogger("nfmig.client").setLevel(logging.DEBUG if args.verbose
                                               else logging.WARNING)
    try:
        source = _endpoint(args.source, "source")
        targets = [_endpoint(t, "standby") for t in args.targets]
        options = StandbyOptions(
            credentials=credentials_from(args), selection=Selection.parse(args.select),
            dampening_ms=args.dampening, hold=args.hold, failover_after=args.failover_after)
        standby = Standby(source, targets, options)
    except (SelectionError, EndpointError, StandbyError, ValueError) as exc:
        print(f"nfmig: error: {exc}", file=sys.stderr)
        return 2
    until = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: until.set())
    standby.start()
    started = time.monotonic()
    live = sys.stderr.isatty()
    try:
        while not until.is_set() and not standby.stopping.is_set():
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            if args.status_file is not None:
                _write_status(args.status_file, standby.status())
            if live:
                sys.stderr.write("\r" + standby.line()[:150].ljust(150))
                sys.stderr.flush()
            until.wait(0.5)
    finally:
        standby.stop()
        if live:
            sys.stderr.write("\r" + " " * 150 + "\r")
    report = standby.status()
    if args.status_file is not None:
        _write_status(args.status_file, report)
    print(json.dumps(report, indent=2) if args.json else _summary(report), flush=True)
    return 1 if report["failover"] else 0


def _write_status(path: Path, status: dict) -> None:
    status = {**status, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(status, indent=1))
    os.replace(partial, path)  # a reader never sees half a status


def _summary(report: dict) -> str:
    lines = [f"standby of {report['source']}: {report['sessions']} sessions, "
             f"{report['changes']} changes ({report['changes_per_s']}/s), "
             f"{report['source_resyncs']} source resyncs"]
    for t in report["targets"]:
        lines.append(f"  {t['endpoint']}: {'in step' if t['connected'] else 'unreachable'}, "
                     f"{t['applied']} written, {t['pending']} pending, lag p50/p99 "
                     f"{t['lag_p50_ms']}/{t['lag_p99_ms']} ms, {t['resyncs']} resyncs"
                     + (f", {t['refused']} refused" if t["refused"] else "")
                     + (f" (last error: {t['last_error']})" if t["last_error"] else ""))
    if report["failover"]:
        f = report["failover"]
        lines.append(f"  FAILED OVER to {f['standby']} in {f['seconds']} s, after "
                     f"{f['source_lost_for_s']} s without the source; it may lack "
                     f"{f['changes_pending']} changes")
    return "\n".join(lines)


def cmd_failover(args: argparse.Namespace) -> int:
    from nfmig.client.endpoints import EndpointError
    from nfmig.client.failover import FailoverError, fail_over, gateways_from_status, lag_of
    from nfmig.client.switchover import GatewayAddress

    try:
        standby = _endpoint(args.standby, "standby")
        gateways, status = ([], {}) if args.status_file is None else \
            gateways_from_status(args.status_file)
        for text in args.gateway:
            address, _, rest = text.partition("/")
            length, _, interface = rest.partition("@")
            if not (address and length.isdigit() and interface):
                raise ValueError(f"--gateway {text}: give ADDRESS/LENGTH@INTERFACE")
            gateways.append(GatewayAddress(address, interface, length))
        if not gateways:
            raise ValueError("no gateway address to take over: give --status-file or "
                             "--gateway")
        seconds = fail_over(standby, gateways, credentials_from(args))
    except (EndpointError, FailoverError, ValueError) as exc:
        print(f"nfmig: failover: {exc}", file=sys.stderr)
        return 1
    report = {"standby": str(standby), "seconds": round(seconds, 4),
              "gateways": [g.address for g in gateways], "lag": lag_of(status, standby)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lag = report["lag"]
        print(f"{standby} took over {', '.join(report['gateways'])} in {seconds:.3f} s"
              + (f"; at the last status it lacked {lag['changes_pending']} changes"
                 if lag else ""))
    return 0
