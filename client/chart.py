"""`nfmig report FILE --png OUT`: the chart of moving a NAT's VM against moving its state.

From bench/vm_vs_state.py's JSON (``"kind": "vm-vs-state"``), measurements of both in the
same run over the same link: per link shape, a panel of the bytes that crossed the link per
N (the VM's live migration by QEMU, nfmig migrate) and one of the times per N (the VM's
total migration time and downtime, nfmig's whole command and freeze window), linear
scales, labelled with QEMU's accelerator and the guest's memory.

From one migration report (nfmig migrate --json), the older single chart: the state moved
beside VM figures that were never a migration (given on the command line, or the resident
memory of the source's process with --vm-memory-from-pid), and labelled as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nfmig.client.report import human_bytes, load_report

BENCH_KIND = "vm-vs-state"
VM, VM_LIGHT, NF, NF_LIGHT = "#7f7f7f", "#c7c7c7", "#1f77b4", "#9ecae1"


def load(path: Path) -> dict[str, Any]:
    """The bench's measurements or a migration report; ValueError for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a migration report or bench/vm_vs_state.py "
                         f"output: {exc}") from None
    if isinstance(data, dict) and data.get("kind") == BENCH_KIND:
        if not any(r.get("vm") and r.get("nfmig") for r in data.get("results") or []):
            raise ValueError(f"{path}: the benchmark measured no size on both sides")
        return data
    return load_report(path)


def draw(data: dict[str, Any], out: Path, vm_image_bytes: int | None = None,
         vm_memory_bytes: int | None = None) -> None:
    if data.get("kind") == BENCH_KIND:
        if vm_image_bytes is not None or vm_memory_bytes is not None:
            raise ValueError("--vm-image-bytes / --vm-memory-bytes apply to a migration "
                             "report; the benchmark measured the VM")
        draw_bench(data, out)
    else:
        draw_estimate(data, out, vm_image_bytes, vm_memory_bytes)


def _n(n: int) -> str:
    return f"{n // 1000:,}k" if n % 1000 == 0 else f"{n:,}"


def _bar_labels(ax: Any, bars: Any, texts: list[str]) -> None:
    for bar, text in zip(bars, texts, strict=True):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=6.5, rotation=90)


def bench_panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """What draw_bench draws, one entry per link shape: its title, the sizes, and each
    series (label, colour, values) of the bytes panel (MB) and of the time panel (s)."""
    rows = [r for r in data["results"] if r.get("vm") and r.get("nfmig")]
    panels = []
    for link in data.get("links") or sorted({r["link"] for r in rows}):
        here = sorted((r for r in rows if r["link"] == link), key=lambda r: r["sessions"])
        if not here:
            continue
        panels.append({
            "title": f"link: {here[0].get('link_shape') or link}",
            "sizes": [_n(r["sessions"]) for r in here],
            "bytes": [("VM live migration (QEMU)", VM,
                       [r["vm"]["link_bytes"] / 1e6 for r in here]),
                      ("nfmig migrate", NF, [r["nfmig"]["link_bytes"] / 1e6 for r in here])],
            "time": [("VM: total migration time", VM, [r["vm"]["total_s"] for r in here]),
                     ("VM: downtime", VM_LIGHT,
                      [r["vm"]["downtime_ms"] / 1e3 for r in here]),
                     ("nfmig: whole command", NF, [r["nfmig"]["command_s"] for r in here]),
                     ("nfmig: freeze window", NF_LIGHT,
                      [(r["nfmig"].get("freeze_ms") or 0) / 1e3 for r in here])]})
    return panels


def bench_title(data: dict[str, Any]) -> str:
    guest = (f"VM: {data.get('guest_memory_mib', '?')} MiB guest, Linux "
             f"{data.get('guest_kernel', '?')}, QEMU accelerator "
             f"{str(data.get('accelerator', '?')).upper()}")
    qemu = (data.get("qemu") or "").split(" (")[0]
    date = f" ({data['date'][:10]})" if data.get("date") else ""
    return ("Moving a NAT with N sessions: its whole VM (QEMU live migration) vs its state "
            f"(nfmig migrate)\n{guest}{f', {qemu}' if qemu else ''}\nsame sessions, same "
            f"link, same run{date}; median of {data.get('repeat', 1)} run(s) each")


def draw_bench(data: dict[str, Any], out: Path) -> None:
    """Bytes and time per N, one column of panels per link shape, linear scales."""
    import matplotlib  # lazy: only this command needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = bench_panels(data)
    fig, axes = plt.subplots(2, len(panels), figsize=(max(7.0, 4.6 * len(panels) + 0.6), 8.6),
                             dpi=120, squeeze=False)
    try:
        for col, panel in enumerate(panels):
            xs = list(range(len(panel["sizes"])))
            for row, (key, unit) in enumerate((("bytes", "MB"), ("time", "s"))):
                ax = axes[row][col]
                series = panel[key]
                w = 0.8 / len(series)
                for i, (label, color, values) in enumerate(series):
                    bars = ax.bar([x + (i - (len(series) - 1) / 2) * w for x in xs], values,
                                  w, color=color, label=label)
                    _bar_labels(ax, bars, [_value(v, unit) for v in values])
                ax.set_xticks(xs, panel["sizes"])
                top = max(v for _, _, values in series for v in values)
                ax.set_ylim(0, top * (1.45 if key == "bytes" else 1.6))  # legend, labels
                ax.legend(fontsize=6.5, loc="upper left", ncol=1 if key == "bytes" else 2)
                if key == "bytes":
                    ax.set_ylabel("MB across the link (both ways)")
                    ax.set_title(panel["title"], fontsize=8.5)
                else:
                    ax.set_ylabel("seconds")
                    ax.set_xlabel("sessions in the NAT (N)")
        fig.suptitle(bench_title(data), fontsize=8.5)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.savefig(out)
    finally:
        plt.close(fig)


def _value(v: float, unit: str) -> str:
    if unit == "MB":
        return f"{v:.2f} MB" if v < 10 else f"{v:.0f} MB"
    return f"{v:.2f} s" if v >= 0.1 else f"{v * 1e3:.0f} ms"


def draw_estimate(report: dict[str, Any], out: Path, vm_image_bytes: int | None = None,
                  vm_memory_bytes: int | None = None) -> None:
    """One migration's state beside VM figures that are not a measured VM migration:
    given sizes, or the resident memory of the source's process (an estimate, a lower
    bound of what its VM would carry), said on the chart."""
    vm = report.get("vm_comparison") or {}
    image = vm_image_bytes if vm_image_bytes is not None else vm.get("vm_image_bytes")
    memory = vm_memory_bytes if vm_memory_bytes is not None else vm.get("vm_memory_bytes")
    if image is None and memory is None:
        raise ValueError("the report has no VM figures: pass --vm-image-bytes and/or "
                         "--vm-memory-bytes (here or to nfmig migrate), or draw "
                         "bench/vm_vs_state.py's measurements")
    image, memory = image or 0, memory or 0
    state = report["bytes"]["state"]
    wire = report["bytes"]["sent"] + report["bytes"]["received"]
    if vm_image_bytes is not None or vm_memory_bytes is not None:
        source = "given to nfmig report"
    else:
        source = vm.get("source") or "given on the command line"
    measured = source.startswith("measured from pid")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        labels = ["VM (image + memory):\nan estimate" if measured else
                  "VM (image + memory):\nsizes given", "nfmig: state moved",
                  "nfmig: NETCONF bytes\n(both ways)"]
        ax.bar(labels[0], image, color=VM, label="VM image")
        ax.bar(labels[0], memory, bottom=image, color=VM_LIGHT,
               label="VM memory (process RSS)" if measured else "VM memory")
        ax.bar(labels[1], state, color=NF, label="sessions (YANG, XML)")
        ax.bar(labels[2], wire, color=NF_LIGHT, label="NETCONF messages")
        ax.set_yscale("log")
        ax.set_ylabel("bytes (log scale)")
        sessions = report.get("sessions_moved") or report.get("sessions_selected") or 0
        ax.set_title(f"Moving a NAT: VM estimate vs state moved ({sessions:,} sessions)"
                     if measured else
                     f"Moving a NAT: VM sizes given vs state moved ({sessions:,} sessions)",
                     fontsize=10)
        for x, value in enumerate((image + memory, state, wire)):
            ax.annotate(human_bytes(value), (x, max(value, 1)), ha="center", va="bottom",
                        fontsize=9)
        note = estimate_note(source)
        ax.text(0.98, 0.97, note + "\n(bench/vm_vs_state.py measures a real one)",
                transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.legend(loc="center right", fontsize=7)
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)


def estimate_note(source: str) -> str:
    """What the single chart says of its VM figures."""
    if source.startswith("measured from pid"):
        return (f"VM figures: {source}: an estimate from a process's resident memory, "
                "not a VM migration")
    return f"VM figures: {source}, not measured"


def cmd_report(args: argparse.Namespace) -> int:
    try:
        data = load(args.report)
        draw(data, args.png, args.vm_image_bytes, args.vm_memory_bytes)
    except ValueError as exc:
        return _fail(str(exc))
    except ImportError:
        return _fail("drawing needs matplotlib (pip install matplotlib)")
    except OSError as exc:
        return _fail(f"cannot write {args.png}: {exc.strerror or exc}")
    print(f"wrote {args.png}")
    return 0


def _fail(message: str) -> int:
    print(f"nfmig: error: {message}", file=sys.stderr)
    return 2
