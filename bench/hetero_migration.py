"""Linux kernel NAT <-> SDN NAT (Open vSwitch): N sessions moved through two nfmig servers.

Builds a test bed (nfmig.testbed), serves NAT A with `nfmig serve --backend linux` and NAT B
with `--backend openflow`, loads N synthetic TCP ESTABLISHED sessions into A (not timed) and
moves them: get-data on A, edit-config on B, delete on A (Linux -> OVS); then back the same
way (OVS -> Linux). For reference, the same moves between two Linux NATs of a second test
bed, in the same rounds.

Goal: each direction within 1.5x of the Linux -> Linux figure. Needs root.

    .venv/bin/python bench/hetero_migration.py [--sessions 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from kernel_migration import EXTERNALS, PORT_MAX, PORT_MIN, synthetic_sessions
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NAT_NS, NatClient, timed
from nfmig.server.session_codec import sessions_to_xml

from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

PHASES = ("get-data", "edit-config", "delete", "total")


def synthetic(n: int) -> str:
    """N distinct TCP ESTABLISHED sessions with unique reply tuples, as model XML."""
    return "".join(sessions_to_xml(synthetic_sessions(n, timeout=3600), NAT_NS))


def policy() -> str:
    externals = "".join(f"<external-address>{a}</external-address>" for a in EXTERNALS)
    return (f'<nat-policy xmlns="{NAT_NS}"><inside-prefix>{TestBed.INSIDE_PREFIX}'
            f"</inside-prefix>{externals}<port-min>{PORT_MIN}</port-min>"
            f"<port-max>{PORT_MAX}</port-max></nat-policy>")


class Nat:
    def __init__(self, workdir: Path, backend: str, netns: str):
        self.server: LocalServer = start_local_server(workdir, "--backend", backend,
                                                      "--netns", netns)
        self.client = NatClient("127.0.0.1", self.server.port, self.server.user,
                                self.server.password, hostkey_verify=False)
        self.client.edit(policy())

    def count(self) -> int:
        return self.client.get_sessions()[0].count("<nat-session")

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()


def move(src: Nat, dst: Nat, n: int) -> dict[str, float]:
    (body, _), t_get = timed(src.client.get_sessions)
    _, t_edit = timed(dst.client.edit, body)
    _, t_del = timed(src.client.delete_sessions, body)
    if dst.count() != n or src.count() != 0:
        raise RuntimeError(f"incomplete move: {dst.count()} of {n} arrived, "
                           f"{src.count()} left behind")
    return {"get-data": t_get, "edit-config": t_edit, "delete": t_del,
            "total": t_get + t_edit + t_del}


def report(name: str, runs: list[dict[str, float]]) -> dict[str, float]:
    medians = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    print(f"{name:<16}" + "".join(f"{medians[p]:>13.3f}" for p in PHASES))
    return medians


def run(n: int, repeat: int, workdir: Path) -> int:
    results: dict[str, list[dict[str, float]]] = {"Linux -> OVS": [], "OVS -> Linux": [],
                                                  "Linux -> Linux": []}
    with ExitStack() as stack:
        # Two beds, so that every round times all three directions: load that comes and
        # goes on the machine then weighs on the reference as on the figures it judges.
        bed, ref = stack.enter_context(TestBed()), stack.enter_context(TestBed())
        without_checksum_offload(bed)
        a, b = serve(stack, workdir / "a", "linux", bed.nat_a, n), \
            serve(stack, workdir / "sdn", "openflow", bed.nat_b, 0)
        ref_a, ref_b = serve(stack, workdir / "ref-a", "linux", ref.nat_a, n), \
            serve(stack, workdir / "ref-b", "linux", ref.nat_b, 0)
        for timed_round in [False] + [True] * repeat:  # the first warms every server up
            for name, there, back in (("Linux -> OVS", (a, b), None),
                                      ("OVS -> Linux", (b, a), None),
                                      ("Linux -> Linux", (ref_a, ref_b), (ref_b, ref_a))):
                figures = move(*there, n)
                if back:
                    move(*back, n)
                if timed_round:
                    results[name].append(figures)
    print(f"{n} sessions, median of {repeat} (seconds)")
    print(f"{'direction':<16}" + "".join(f"{p:>13}" for p in PHASES))
    medians = {name: report(name, runs) for name, runs in results.items()}
    reference = medians["Linux -> Linux"]["total"]
    ok = True
    for name in ("Linux -> OVS", "OVS -> Linux"):
        ratio = medians[name]["total"] / reference
        within = ratio <= 1.5
        ok &= within
        rounds = [r["total"] / ref_r["total"]
                  for r, ref_r in zip(results[name], results["Linux -> Linux"], strict=True)]
        print(f"{name}: {ratio:.2f}x Linux -> Linux ({'within' if within else 'OVER'} 1.5x; "
              f"rounds {min(rounds):.2f}x-{max(rounds):.2f}x)")
    return 0 if ok else 1


def serve(stack: ExitStack, workdir: Path, backend: str, netns: str, sessions: int) -> Nat:
    """A NAT served for the rest of the run, holding ``sessions`` synthetic sessions."""
    nat = Nat(workdir, backend, netns)
    stack.callback(nat.close)
    if sessions:
        nat.client.edit(synthetic(sessions))
    return nat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/hetero_migration.py needs root (network namespaces, Open vSwitch)")
        return 2
    with tempfile.TemporaryDirectory(prefix="nfmig-bench-") as tmp:
        return run(args.sessions, args.repeat, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
