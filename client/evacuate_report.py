"""What a site evacuation reports: per NAT its state and its migration's own report, and
the site's totals (sessions moved, seconds, sessions per second, failed NATs, freeze
windows)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SiteReport:
    """The evacuation: per NAT its state and its migration's own report, and the totals."""

    plan: str
    plan_digest: str
    started: str
    dry_run: bool = False
    seconds: float = 0.0
    nats: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    nothing_to_do: bool = False

    @property
    def failed(self) -> list[dict[str, Any]]:
        wanted = "dry-run" if self.dry_run else "done"
        return [n for n in self.nats if n["state"] != wanted]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    @property
    def cleanup_complete(self) -> bool:
        return all(n.get("cleanup_complete", True) for n in self.nats)

    def totals(self) -> dict[str, Any]:
        run = [n for n in self.nats if n.get("report")]
        moved = sum(n["report"]["sessions_moved"] for n in run)
        freezes = {n["id"]: n["report"]["freeze_window"]["seconds"] for n in run
                   if n["report"]["freeze_window"]["seconds"] is not None}
        values = list(freezes.values())
        return {"nats": len(self.nats), "run": len(run),
                "done": sum(n["state"] == "done" for n in self.nats),
                "done_before": sum(bool(n.get("done_before")) for n in self.nats),
                "failed": len(self.failed), "failed_nats": [n["id"] for n in self.failed],
                "sessions_moved": moved, "seconds": self.seconds,
                "sessions_per_second": round(moved / self.seconds, 1) if self.seconds else None,
                "cleanup_complete": self.cleanup_complete,
                "freeze_windows": {"per_nat": freezes,
                                   "max": max(values) if values else None,
                                   "median": statistics.median(values) if values else None}}

    def to_dict(self) -> dict[str, Any]:
        result = ("nothing to do" if self.nothing_to_do else "interrupted" if self.interrupted
                  else ("dry-run" if self.dry_run else "success") if self.ok else "failed")
        return {"plan": self.plan, "plan_digest": self.plan_digest, "result": result,
                "ok": self.ok, "started": self.started, "dry_run": self.dry_run,
                "totals": self.totals(), "nats": self.nats}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        t = self.totals()
        if self.nothing_to_do:
            return (f"nothing to do: every one of the {t['nats']} NATs of {self.plan} was "
                    "moved by an earlier run")
        lines = [f"{'dry run of ' if self.dry_run else ''}site evacuation {self.plan}: "
                 f"{t['done'] if not self.dry_run else t['nats'] - t['failed']} of "
                 f"{t['nats']} NATs {'pass' if self.dry_run else 'done'}"
                 + (f" ({t['done_before']} by an earlier run)" if t["done_before"] else "")
                 + f", {t['sessions_moved']} sessions in {t['seconds']:.2f} s"
                 + (f" ({t['sessions_per_second']:,.0f}/s)" if t["sessions_per_second"]
                    else "")]
        if t["freeze_windows"]["max"] is not None:
            lines.append(f"  freeze windows: median {t['freeze_windows']['median'] * 1000:.1f} "
                         f"ms, longest {t['freeze_windows']['max'] * 1000:.1f} ms")
        for n in self.nats:
            lines.append(f"  {n['id']:>3} {n['source']} -> {n['target'] or '(no target)'}: "
                         + _outcome(n))
        if self.interrupted:
            lines.append("  interrupted: run again with --resume to finish")
        if not self.cleanup_complete:
            lines.append("  CLEANUP INCOMPLETE for the NATs marked so: sessions are on both "
                         "sides; run again with --resume to complete their moves")
        return "\n".join(lines)


def _outcome(n: dict[str, Any]) -> str:
    report = n.get("report")
    if n.get("done_before"):
        return "done by an earlier run"
    if n["state"] in ("done", "dry-run") and report:
        freeze = report["freeze_window"]["seconds"]
        verb = "would move" if n["state"] == "dry-run" else "moved"
        count = (report["sessions_selected"] if n["state"] == "dry-run"
                 else report["sessions_moved"])
        return (f"{verb} {count} sessions in {report['total_seconds']:.2f} s"
                + (f", freeze {freeze * 1000:.1f} ms" if freeze is not None else ""))
    text = f"{n['state'].upper()}: {n.get('reason') or 'not run'}"
    return text + ("" if n.get("cleanup_complete", True) else " [CLEANUP INCOMPLETE]")
