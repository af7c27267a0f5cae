"""What bench/vm_vs_state.py prints: the side-by-side table (VM live migration against
`nfmig migrate`, per N and link) and issue 23's goals, each met or not."""

from __future__ import annotations

from typing import Any

BYTES_RATIO_GOAL = 10.0  # the VM's bytes over nfmig's, at least, at every N up to ...
BYTES_GOAL_MAX_N = 100_000
BYTES_PER_SESSION_GOAL = 130.0  # nfmig's bytes on the wire per session, at most

HEADER = ("| N | link | VM bytes | VM total | VM downtime | VM TCP gap | nfmig bytes | per "
          "session | nfmig command | freeze | nfmig TCP gap | VM / nfmig bytes | nfmig / VM "
          "time |")


def _n(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.2f} MB" if b < 1e7 else f"{b / 1e6:.0f} MB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(results: list[dict]) -> list[str]:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in results:
        vm, nf = r.get("vm") or {}, r.get("nfmig") or {}
        per = _ratio(nf.get("link_bytes"), r["sessions"])
        bytes_ratio = _ratio(vm.get("link_bytes"), nf.get("link_bytes"))
        time_ratio = _ratio(nf.get("command_s"), vm.get("total_s"))
        lines.append(
            f"| {_n(r['sessions'])} | {r['link']} | {_mb(vm.get('link_bytes'))} | "
            f"{_s(vm.get('total_s'))} | {_ms(vm.get('downtime_ms'))} | "
            f"{_ms(vm.get('gap_tcp_ms'))} | {_mb(nf.get('link_bytes'))} | "
            f"{'-' if per is None else f'{per:.0f} B'} | {_s(nf.get('command_s'))} | "
            f"{_ms(nf.get('freeze_ms'))} | {_ms(nf.get('gap_tcp_ms'))} | "
            f"{'-' if bytes_ratio is None else f'{bytes_ratio:.1f}x'} | "
            f"{'-' if time_ratio is None else f'{time_ratio:.2f}x'} |")
    lines.append("")
    lines.append("bytes: what crossed the link between host A and host B, both ways (its "
                 "interface counters); VM total and downtime: QEMU's query-migrate; nfmig "
                 "command: wall clock of `python -m nfmig migrate` (interpreter start, "
                 "logins, copy, verify, switchover and delete on A included); freeze: the "
                 "command's freeze window; TCP gap: the longest pause between two arrivals "
                 "of the probe's 2 ms TCP stream through the moved NAT.")
    return lines


def goals(results: list[dict]) -> list[dict[str, Any]]:
    """Issue 23's goals, each {"goal", "met", "line"}; met is None when unmeasured."""
    done = [r for r in results if r.get("vm") and r.get("nfmig")]
    out = []

    def verdict(name: str, checks: list[tuple[str, bool]]) -> None:
        met = all(ok for _, ok in checks) if checks else None
        status = "not measured" if met is None else "met" if met else "NOT met"
        detail = "; ".join(f"{what}{'' if ok else ' (no)'}" for what, ok in checks)
        out.append({"goal": name, "met": met, "line": f"{name}: {status}"
                    + (f" — {detail}" if detail else "")})

    checks = []
    for r in done:
        if r["sessions"] > BYTES_GOAL_MAX_N:
            continue
        vm, nf = r["vm"]["link_bytes"], r["nfmig"]["link_bytes"]
        per = nf / r["sessions"]
        checks.append((f"{_n(r['sessions'])} {r['link']}: VM/nfmig {vm / nf:.1f}x, "
                       f"{per:.0f} B/session",
                       vm >= BYTES_RATIO_GOAL * nf and per <= BYTES_PER_SESSION_GOAL))
    verdict(f"bytes: nfmig <= 1/{BYTES_RATIO_GOAL:g} of the VM's and <= "
            f"{BYTES_PER_SESSION_GOAL:g} B/session on the link, every N <= "
            f"{_n(BYTES_GOAL_MAX_N)}", checks)

    checks = [(f"{_n(r['sessions'])}: {r['nfmig']['command_s']:.2f} s vs "
               f"{r['vm']['total_s']:.2f} s", r["nfmig"]["command_s"] <= r["vm"]["total_s"])
              for r in done if r["link"] == "none"]
    verdict("time, unshaped: nfmig's whole command <= the VM's total migration time, "
            "every N", checks)

    checks = []
    for link in sorted({r["link"] for r in done if r["link"] != "none"}):
        ratios = [(r["sessions"], r["nfmig"]["command_s"] / r["vm"]["total_s"])
                  for r in sorted(done, key=lambda r: r["sessions"]) if r["link"] == link]
        if len(ratios) < 2:
            continue
        improving = all(b[1] < a[1] for a, b in zip(ratios, ratios[1:], strict=False))
        checks.append((f"{link}: " + " -> ".join(f"{_n(n)} {x:.2f}x" for n, x in ratios),
                       improving))
    verdict("time, shaped: nfmig / VM time ratio improves with N", checks)

    checks = [(f"{_n(r['sessions'])} {r['link']}: {r['nfmig']['gap_tcp_ms']:.0f} vs "
               f"{r['vm']['gap_tcp_ms']:.0f} ms",
               r["nfmig"]["gap_tcp_ms"] <= r["vm"]["gap_tcp_ms"]) for r in done]
    verdict("interruption: the live TCP flow's longest gap through nfmig <= through the "
            "VM migration", checks)
    return out
