"""What the migration benchmark (bench/migrator_linux.py) prints: the medians per direction
and size, the servers' memory over repeated migrations, and the issue's goals with their
targets."""

from __future__ import annotations

import statistics
from typing import Any

HETERO_SIZE = 10_000
GOAL_SIZE = 100_000  # the size the goals against conntrackd and for memory are set at
IN_KERNEL_GOAL = 1.5  # sessions in B's kernel, times conntrackd's resync
COMMAND_GOAL = 3.0  # the whole command, times conntrackd's resync
HETERO_GOAL = 2.0  # a heterogeneous command, times the Linux -> Linux one
GROWTH_FLAG = 0.10  # memory growth over the rounds that counts as growth


def medians(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float | type(None)):
            continue
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = statistics.median(values) if values else None
    out["runs"] = len(runs)
    ctd = out.get("conntrackd_s")
    if ctd:
        out["ratio"] = out["command_s"] / ctd
        out["ratio_in_kernel"] = out["in_kernel_s"] / ctd if out.get("in_kernel_s") else None
        out["ratio_floor"] = out["floor_s"] / ctd if out.get("floor_s") else None
    return out


def with_hetero_ratios(results: dict, linux_label: str) -> None:
    """Each heterogeneous direction's command against the Linux -> Linux one of the same
    size and invocation."""
    linux = (results.get(linux_label) or {}).get("median")
    for r in results.values():
        m = r["median"]
        if m and linux and r["direction"] != "Linux -> Linux" and \
                r["sessions"] == HETERO_SIZE:
            m["ratio_linux"] = m["command_s"] / linux["command_s"]


# (label, figure key, digits); None as the key starts a section
ROWS: list[tuple[str, str | None, int]] = [
    ("the command", None, 0),
    ("runs measured", "runs", 0),
    ("sessions in B's kernel (s)", "in_kernel_s", 2),
    ("  / conntrackd", "ratio_in_kernel", 1),
    ("nfmig migrate, whole command (s)", "command_s", 2),
    ("  / conntrackd", "ratio", 1),
    ("  / Linux -> Linux 10k, same run", "ratio_linux", 2),
    ("  until the migration began (s)", "startup_s", 2),
    ("  its report's total (s)", "report_total_s", 2),
    ("freeze window (ms)", "freeze_ms", 0),
    ("delta new/changed/ended", "delta", 0),
    ("switchover (ms)", "switchover_ms", 1),
    ("bytes on the wire per session, out / in", "wire_per_session", 0),
    ("conntrackd resync, same N (s)", "conntrackd_s", 3),
    ("the stack's floor, no protocol (s)", "floor_s", 3),
    ("  start + imports", "floor_start_s", 3),
    ("  A's table read (netlink, parsed)", "floor_read_s", 3),
    ("  written into B (netlink)", "floor_write_s", 3),
    ("  / conntrackd", "ratio_floor", 2),
    ("server memory (RSS, MB)", None, 0),
    ("A, table loaded", "rss_a_loaded", 0),
    ("B, table loaded", "rss_b_loaded", 0),
    ("A, after the migration", "rss_a_moved", 0),
    ("B, after the migration", "rss_b_moved", 0),
    ("the probe's streams", None, 0),
    ("longest gap TCP (ms)", "gap_tcp_ms", 1),
    ("longest gap UDP (ms)", "gap_udp_ms", 1),
    ("TCP retransmissions", "retransmissions", 0),
    ("TCP RTO expiries", "rto", 0),
    ("RST packets", "rst_packets", 0),
    ("untranslated packets at server", "untranslated", 0),
    ("UDP lost (both directions)", "udp_lost", 0),
    ("new flows while it ran", None, 0),
    ("opened (one datagram each)", "flows_sent", 0),
    ("  rate (/s)", "flows_per_s", 0),
    ("  sent within the freeze window", "flows_in_window", 0),
    ("  got through (at the sink)", "flows_at_sink", 0),
    ("  never got through, sent before freeze", "flows_dropped_before_freeze", 0),
    ("  never got through, sent after window", "flows_dropped_after_window", 0),
    ("  on A / on B / neither after", "flows_where", 0),
    ("placement after the command", None, 0),
    ("sessions moved (report)", "sessions_moved", 0),
    ("B holds", "b_after", 0),
    ("on both sides", "on_both", 0),
    ("left on A (not opened after thaw)", "left_on_a", 0),
    ("on A, opened after the thaw", "a_after_thaw", 0),
    ("table sessions not on B as they were", "synthetic_missing_on_b", 0),
    ("  with fewer counts on B", "counts_lost_on_b", 0),
    ("held by a NAT, now on neither side", "vanished", 0),
]


def table(results: dict) -> list[str]:
    labels = [label for label, r in results.items() if r["median"]]
    width = max([14, *(len(label) + 2 for label in labels)])
    lines = [f"{'medians':<40}" + "".join(f"{label:>{width}}" for label in labels)]
    section = ""
    for name, key, digits in ROWS:
        if key is None:
            section = f"-- {name}"
            continue
        cells = [_cell(results[label]["median"], key, digits) for label in labels]
        if all(c == "-" for c in cells):
            continue
        if section:
            lines.append(section)
            section = ""
        lines.append(f"{name:<40}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


def _cell(m: dict, key: str, digits: int) -> str:
    if key == "delta":
        return "/".join(_fmt(m.get(k), 0) for k in ("delta_new", "delta_changed",
                                                      "delta_ended"))
    if key == "flows_where":
        return "/".join(_fmt(m.get(k), 0) for k in ("flows_on_a", "flows_on_b",
                                                      "flows_nowhere"))
    if key == "wire_per_session":
        return "/".join(_fmt(m.get(k), 0) for k in ("wire_out_per_session",
                                                      "wire_in_per_session"))
    if key.startswith("ratio"):
        return "-" if m.get(key) is None else f"{m[key]:.{digits}f}x"
    return _fmt(m.get(key), digits)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# -- memory over repeated migrations -------------------------------------------------------
def memory_block(label: str, run: dict) -> list[str]:
    """One run's servers' memory: loaded, after the measured migration, after each round,
    and the growth from the first round to the last."""
    rounds = run["memory_rounds"]
    lines = [f"server memory over repeated migrations, {label} (RSS of nfmig serve, MB)",
             f"{'':<26}{'command s':>10}{'in B kernel s':>15}{'A MB':>8}{'B MB':>8}"
             f"{'both MB':>9}",
             _memory_line("table loaded", None, None, run["rss_a_loaded"],
                          run["rss_b_loaded"]),
             _memory_line("measured, A -> B", run["command_s"], run["in_kernel_s"],
                          run["rss_a_moved"], run["rss_b_moved"])]
    lines += [_memory_line(f"round {r['round']}, {r['direction']}", r["command_s"],
                           r["in_kernel_s"], r["rss_a"], r["rss_b"])
              + (f"  FAILED: {r['failed'][:300]}" if r.get("failed") else "")
              for r in rounds]
    growth = memory_growth(rounds)
    if growth:
        start, end = growth.pop("rounds")
        lines.append(f"growth from round {start} to round {end} (same direction): "
                     + ", ".join(f"{who} {g:+.1%}{' (FLAG: over 10%)' if g > GROWTH_FLAG else ''}"
                                 for who, g in growth.items()))
    return lines


def _memory_line(name: str, command: float | None, in_kernel: float | None,
                 a: float | None, b: float | None) -> str:
    both = a + b if a is not None and b is not None else None
    return (f"{name:<26}{_fmt(command, 2):>10}{_fmt(in_kernel, 2):>15}{_fmt(a, 0):>8}"
            f"{_fmt(b, 0):>8}{_fmt(both, 0):>9}")


def memory_growth(rounds: list[dict]) -> dict[str, float]:
    """Relative RSS growth, per server and of both together, from the first round to the
    last one in the same direction: after a round one server has just taken the table in
    and the other just given it away, so only rounds of one direction compare. Empty under
    three rounds."""
    done = [r for r in rounds if not r.get("failed")]
    if len(done) < 3:
        return {}
    first = done[0]
    last = next(r for r in reversed(done) if r["direction"] == first["direction"])
    if last is first or None in (first["rss_a"], first["rss_b"], last["rss_a"],
                                 last["rss_b"]):
        return {}
    return {"A": last["rss_a"] / first["rss_a"] - 1, "B": last["rss_b"] / first["rss_b"] - 1,
            "both": (last["rss_a"] + last["rss_b"]) / (first["rss_a"] + first["rss_b"]) - 1,
            "rounds": (first["round"], last["round"])}


# -- the goals --------------------------------------------------------------------
def goals(results: dict, rounds: int) -> list[str]:
    lines = ["goals (mixed table, medians):"]
    linux = next((r for r in results.values() if r["direction"] == "Linux -> Linux"
                  and r["sessions"] == GOAL_SIZE), None)
    m = (linux or {}).get("median") or {}
    where = f"Linux -> Linux {GOAL_SIZE // 1000}k"
    how = "no conntrackd reference" if m and not m.get("conntrackd_s") else ""
    lines.append(_goal(f"{where}, sessions in B's kernel / conntrackd",
                       m.get("ratio_in_kernel"), IN_KERNEL_GOAL, how))
    lines.append(_goal(f"{where}, whole command (verify, delete on A) / conntrackd",
                       m.get("ratio"), COMMAND_GOAL, how))
    if m.get("ratio_floor") and m.get("in_kernel_s"):
        lines.append(f"  {where}: the stack's floor alone (start, read A, write B; no "
                     f"protocol) is {m['ratio_floor']:.2f}x conntrackd; the command's time "
                     f"in B's kernel is {m['in_kernel_s'] / m['floor_s']:.2f}x that floor")
    for r in results.values():
        if r["direction"] != "Linux -> Linux" and r["sessions"] == HETERO_SIZE:
            lines.append(_goal(f"{r['direction']} {HETERO_SIZE // 1000}k, whole command / "
                               f"Linux -> Linux {HETERO_SIZE // 1000}k",
                               (r["median"] or {}).get("ratio_linux"), HETERO_GOAL))
    if not any(r["direction"] != "Linux -> Linux" for r in results.values()):
        lines.append(_goal("Linux <-> OVS 10k, whole command / Linux -> Linux 10k", None,
                           HETERO_GOAL, "run with --hetero"))
    runs = (linux or {}).get("runs") or []
    growth = memory_growth(runs[0].get("memory_rounds", [])) if runs else {}
    name = f"{where}, server memory over {rounds or 'repeated'} migrations back and forth"
    if not growth:
        lines.append(f"  {name}: not measured (run --sizes {GOAL_SIZE} --memory-rounds 10; "
                     "3 rounds at least)")
    else:
        start, end = growth.pop("rounds")
        worst = max(growth.values())
        lines.append(f"  {name}: both servers {growth['both']:+.1%} (A {growth['A']:+.1%}, "
                     f"B {growth['B']:+.1%}) from round {start} to round {end}, the same "
                     f"direction (target: no growth, none over {GROWTH_FLAG:.0%}): "
                     f"{'met' if worst <= GROWTH_FLAG else 'NOT met'}")
    if m:
        lines.append(f"  {where}, server memory (RSS): table loaded A "
                     f"{_fmt(m.get('rss_a_loaded'), 0)} MB, B {_fmt(m.get('rss_b_loaded'), 0)}"
                     f" MB; after the migration A {_fmt(m.get('rss_a_moved'), 0)} MB, B "
                     f"{_fmt(m.get('rss_b_moved'), 0)} MB (reported; no target)")
    return lines


def _goal(name: str, ratio: float | None, target: float, how: str = "") -> str:
    if ratio is None:
        return f"  {name}: not measured ({how or f'run --sizes {GOAL_SIZE}'}) " \
               f"(target <= {target:g}x)"
    verdict = "met" if ratio <= target else "NOT met"
    return f"  {name}: {ratio:.2f}x (target <= {target:g}x): {verdict}"
