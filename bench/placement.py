"""Where every session is after a migration of the benchmark (bench/migrator_linux.py):
on exactly one side each, the moved ones on B as they were; and the problems and notes that
follow from it and from the probe's streams."""

from __future__ import annotations

import time
from datetime import datetime

from nfmig.nf_backends.base import Session
from traffic import flow_key

from nfmig.probe import PORT as PROBE_PORT
from nfmig.probe import ProbeResult
from nfmig.testbed import TestBed

UDP_EXPIRY = 25.0  # seconds: an unanswered UDP flow older than this may have timed out


def placement(before: dict, after_a: dict, after_b: dict, sessions: list[Session],
              sent: dict, arrived: dict, report: dict | None, result: ProbeResult) -> dict:
    """Where every session is after the command: exactly one side each."""
    r = report or {}
    window = r.get("freeze_window") or {}
    phases = r.get("phase_seconds") or {}
    # The hold may act from the moment the freeze was asked for (the window's start is
    # taken once the source has answered it).
    freeze_ns = _epoch_ns(window.get("start"))
    if freeze_ns is not None:
        freeze_ns -= int(phases.get("freeze", 0.0) * 1e9) + 1_000_000
    thaw_end_ns = _epoch_ns(window.get("end"))
    thaw_s = phases.get("thaw", 0.0)
    # Opened after the thaw: from the moment the thaw was asked for (the window's end is
    # taken once the source has answered it).
    thaw_ns = None if thaw_end_ns is None else thaw_end_ns - int(thaw_s * 1e9) - 1_000_000
    times = {sent["first_port"] + i: t for i, t in enumerate(sent["times"]) if t}
    flows = {flow_key(port): t for port, t in times.items()}

    def after_thaw(key: tuple) -> bool:
        t = flows.get(key)
        return t is not None and thaw_ns is not None and t >= thaw_ns

    both = after_a.keys() & after_b.keys()
    left = [k for k in after_a if not after_thaw(k)]
    synthetic_missing = sum(
        after_b.get(s.key) != (s.translated_address, s.translated_port) for s in sessions)
    probe_keys = [k for k in before if k[4] == PROBE_PORT and k[3] == TestBed.SERVER]
    # A flow whose datagram reached the sink had a session on a NAT: it must be on one
    # side now, unless it may have timed out (unanswered UDP: 30 s in the kernel).
    through = {flow_key(port) for port in arrived["ports"]}
    recent = time.time_ns() - int(UDP_EXPIRY * 1e9)
    vanished = [k for k in (before.keys() | through)
                if k not in after_a and k not in after_b and flows.get(k, recent) >= recent]
    # Flows that never got through: dropped by the hold (sent in the window) or else.
    dropped = {k: t for k, t in flows.items()
               if k not in through and k not in after_a and k not in after_b}
    early = sorted((freeze_ns - t) / 1e6 for t in dropped.values()
                   if freeze_ns is not None and t < freeze_ns)
    late = [k for k, t in dropped.items()
            if thaw_end_ns is not None and t > thaw_end_ns + 5_000_000]
    in_window = [t for t in flows.values()
                 if freeze_ns is not None and thaw_end_ns is not None
                 and freeze_ns <= t < thaw_end_ns]
    duration = sent.get("seconds") or 0.0
    return {
        "a_before": len(before), "a_after": len(after_a), "b_after": len(after_b),
        "on_both": len(both), "both_sample": [list(k) for k in sorted(both)[:5]],
        "left_on_a": len(left), "left_sample": [list(k) for k in sorted(left)[:5]],
        "a_after_thaw": len(after_a) - len(left),
        "synthetic_missing_on_b": synthetic_missing,
        "probe_sessions": len(probe_keys),
        "probe_not_on_b": sum(k not in after_b for k in probe_keys),
        "vanished": len(vanished), "vanished_sample": [list(k) for k in sorted(vanished)[:5]],
        "flows_sent": len(times), "flows_per_s": len(times) / duration if duration else None,
        "flows_errors": sent["errors"], "sender_stopped_by": sent["why"],
        "flows_in_window": len(in_window),
        "flows_at_sink": len(through), "datagrams_at_sink": arrived["received"],
        "flows_untranslated_at_sink": arrived["untranslated"],
        "flows_on_a": sum(k in after_a for k in flows),
        "flows_on_b": sum(k in after_b for k in flows),
        "flows_nowhere": sum(k not in after_a and k not in after_b for k in flows),
        "flows_dropped": len(dropped),
        # dropped although sent before the freeze was asked for: ms before it
        "flows_dropped_before_freeze": len(early),
        # ... or sent after the window had closed (5 ms after the thaw's answer)
        "flows_dropped_after_window": len(late),
        "dropped_after_window_sample": [list(k) for k in sorted(late)[:5]],
        "dropped_before_freeze_ms": [round(x, 1) for x in early],
    }


def counters_check(sessions: list[Session], counts_on_b: dict[tuple, tuple]) -> dict:
    """Whether each table session that came with counts still has them on B: at least
    those (nothing sends on them, but a NAT may count what it sees)."""
    lost = [s.key for s in sessions if s.orig_packets is not None and s.key in counts_on_b
            and any(got < had for got, had in zip(
                counts_on_b[s.key], (s.orig_packets, s.orig_bytes, s.reply_packets,
                                     s.reply_bytes), strict=True))]
    return {"counted": sum(s.orig_packets is not None for s in sessions),
            "counts_lost_on_b": len(lost), "counts_lost_sample": [list(k) for k in lost[:5]]}


def problems_of(f: dict, code: int, report: dict | None, stderr: str,
                result: ProbeResult) -> list[str]:
    found = []
    if code != 0 or report is None or not report.get("ok"):
        reason = (report or {}).get("reason") or stderr[-500:]
        found.append(f"nfmig migrate exited {code} ({(report or {}).get('result')}): {reason}")
    if f["on_both"]:
        found.append(f"{f['on_both']} session(s) on both A and B, e.g. {f['both_sample']}")
    if f["left_on_a"]:
        found.append(f"{f['left_on_a']} session(s) left on A that were not opened after the "
                     f"thaw, e.g. {f['left_sample']}")
    if f["synthetic_missing_on_b"]:
        found.append(f"{f['synthetic_missing_on_b']} table session(s) not on B with "
                     "their translation")
    if f.get("counts_lost_on_b"):
        found.append(f"{f['counts_lost_on_b']} of the {f['counted']} table sessions that "
                     f"had counts have fewer on B, e.g. {f['counts_lost_sample']}")
    if f["probe_not_on_b"] or f["probe_sessions"] != 2:
        found.append(f"probe sessions on A before: {f['probe_sessions']}, not on B after: "
                     f"{f['probe_not_on_b']}")
    if f["vanished"]:
        found.append(f"{f['vanished']} session(s) that A held (or that carried a datagram) "
                     f"are on neither side, e.g. {f['vanished_sample']}")
    if f["flows_dropped_after_window"]:
        found.append(f"{f['flows_dropped_after_window']} new flow(s) opened after the freeze "
                     "window never got through and have no session, e.g. "
                     f"{f['dropped_after_window_sample']}")
    if f["sender_stopped_by"] != "told to stop":
        found.append(f"the new-flow sender stopped early: {f['sender_stopped_by']}")
    if f["flows_untranslated_at_sink"]:
        found.append(f"{f['flows_untranslated_at_sink']} new-flow datagram(s) reached the "
                     "sink untranslated")
    found += result.problems()
    return found


def notes_of(f: dict) -> list[str]:
    """What is worth knowing but breaks no rule: a first datagram is dropped by the hold
    when the source takes it up after the freeze, though it was sent before."""
    if not f["flows_dropped_before_freeze"]:
        return []
    ms = f["dropped_before_freeze_ms"]
    return [f"{f['flows_dropped_before_freeze']} new flow(s) sent before the freeze was asked "
            f"for never got through and have no session on either side (sent {ms[0]} to "
            f"{ms[-1]} ms before it)"]



def _epoch_ns(iso: str | None) -> int | None:
    if not iso:
        return None
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)

