"""Stateful firewall migration by the real command: `nfmig migrate --with-policy` moves N
tracked connections (and a hundred pinholes) between `nfmig serve --nf firewall` instances,
Linux to Linux, Linux to Open vSwitch and Open vSwitch to Linux, beside conntrackd syncing
the same connections between the two Linux firewalls in the same run.

For every run a fresh test bed (nfmig.testbed), the firewalls configured as
client/demo_firewall configures them (A active), and A holding a mixed table of
connections (bench/tables.py's, nothing translated: TCP in every state, UDP, ICMP echo;
lifetimes and counters vary), written straight into its kernel for Linux, through its
server for Open vSwitch. Printed per size and direction: the command's seconds (the
interpreter's start included), its freeze window, where the connections ended up (all on
B, none on A, read from the kernels or the servers), and for Linux to Linux conntrackd's
seconds from its resync request until B's kernel holds them all, and the ratio.

    .venv/bin/python bench/firewall.py [--sizes 10000,100000]
        [--directions linux-linux,linux-openflow,openflow-linux] [--json FILE]

Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from conntrackd_ref import add_sync_link, measure_conntrackd
from nfmig.client.demo_firewall import firewall_policy
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NAT_NS
from nfmig.nf_backends.base import Session
from nfmig.nf_backends.ctnetlink import Conntrack
from nfmig.server.session_codec import sessions_to_xml
from tables import create_all, flush, kernel_entries, mixed_sessions, parse_sizes

from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
PINHOLES = 100
CHUNK = 20_000  # sessions per edit-config when A is loaded through its server
COMMAND_TIMEOUT = 900


def firewall_table(n: int, ovs: bool) -> list[Session]:
    """bench/tables.py's mixed table with nothing translated (IPv4), lifetimes an OpenFlow
    idle timeout holds when an end is Open vSwitch; there TCP and UDP only (the OpenFlow
    firewall tracks no ICMP), topped up to n."""
    table = [s._replace(translated_address=None, translated_port=None)
             for s in mixed_sessions(n + n // 5, ipv6_and_dnat=False, ovs_source=ovs)
             if not (ovs and s.protocol == "ICMP")]
    return table[:n]


def pinholes() -> str:
    return "".join(
        f'<pinhole xmlns="{FW_NS}"><protocol>UDP</protocol><remote-address>192.0.2.100'
        f"</remote-address><local-address>10.0.0.{2 + i % 200}</local-address><local-port>"
        f"{40000 + i}</local-port><timeout>3600</timeout></pinhole>" for i in range(PINHOLES))


@dataclass
class End:
    netns: str
    path: str
    backend: str
    server: LocalServer
    ct: Conntrack | None

    def count(self) -> int:
        if self.ct is not None:
            return len(self.ct.dump())
        client = self.server.client()
        try:
            return client.get_sessions()[0].count("<nat-session")
        finally:
            client.close()


def start_end(stack: contextlib.ExitStack, bed: TestBed, netns: str, backend: str,
              workdir: Path, password: str, active: bool) -> End:
    server = start_local_server(workdir, "--nf", "firewall", "--backend", backend, "--netns",
                                netns, password=password)
    stack.callback(server.stop)
    ct = None
    if backend == "linux":
        ct = Conntrack(bed.ns_path(netns))
        stack.callback(ct.close)
    end = End(netns, bed.ns_path(netns), backend, server, ct)
    server.edit(firewall_policy(gateways=active).replace(
        "<prefix>10.0.0.0/24</prefix>", "<prefix>10.0.0.0/8</prefix>"))
    return end


def load(a: End, table: list[Session]) -> None:
    if a.ct is not None:
        create_all(a.ct, kernel_entries(table), f"loading {a.netns}")
    else:
        for at in range(0, len(table), CHUNK):
            a.server.edit("".join(sessions_to_xml(table[at:at + CHUNK], NAT_NS)))
    a.server.edit(pinholes())


def one_run(n: int, direction: str, workdir: Path) -> dict:
    backends = direction.split("-")
    out: dict = {"sessions": n, "direction": direction}
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(TestBed())
        if "openflow" in backends:
            without_checksum_offload(bed)
        bed.run(bed.server, "ip", "route", "add", TestBed.INSIDE_PREFIX, "via",
                TestBed.EXTERNAL)
        password = "p" + secrets.token_urlsafe(16)
        (workdir / "password").write_text(password + "\n")
        a = start_end(stack, bed, bed.nat_a, backends[0], workdir / "a", password, True)
        b = start_end(stack, bed, bed.nat_b, backends[1], workdir / "b", password, False)
        table = firewall_table(n, "openflow" in backends)
        load(a, table)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "nfmig", "migrate", a.server.url, b.server.url,
             "--with-policy", "--json",
             "--password-file", str(workdir / "password"), "--insecure-no-host-key-check"],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        out["command_s"] = round(time.perf_counter() - started, 3)
        report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        out.update(ok=done.returncode == 0, reason=report.get("reason"),
                   moved=report.get("sessions_moved"),
                   pinholes_moved=report.get("pinholes_moved"),
                   freeze_ms=round(report["freeze_window"]["seconds"] * 1000, 1)
                   if report.get("freeze_window", {}).get("seconds") is not None else None,
                   pinholes_ms=round(1000 * sum(p["seconds"] for p in report.get("phases", [])
                                                if p["name"] == "pinholes"), 1),
                   on_a=a.count(), on_b=b.count())
        out["placed"] = out["ok"] and out["on_a"] == 0 and out["on_b"] >= n
        if not out["ok"]:
            out["stderr"] = done.stderr[-2000:]
        if backends == ["linux", "linux"]:
            flush(a.ct)
            flush(b.ct)
            add_sync_link(bed)
            out["conntrackd_s"] = round(measure_conntrackd(bed, a, b, table,
                                                           workdir / "ctd"), 3)
            out["ratio"] = round(out["command_s"] / out["conntrackd_s"], 1)
    return out


def show(run: dict) -> str:
    line = (f"{run['direction']:<16} {run['sessions']:>7,}: nfmig migrate {run['command_s']:6.2f}"
            f" s, freeze {run.get('freeze_ms')} ms (pinholes {run.get('pinholes_ms')} ms), "
            f"{run.get('moved')} moved "
            f"(+{run.get('pinholes_moved')} pinholes), A {run.get('on_a')} / B "
            f"{run.get('on_b')}" + ("" if run.get("placed") else "  NOT all on B"))
    if "conntrackd_s" in run:
        line += f"; conntrackd {run['conntrackd_s']:.2f} s; ratio {run['ratio']}x"
    if not run.get("ok"):
        line += f"\n    failed: {run.get('reason')}"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--directions", default="linux-linux,linux-openflow,openflow-linux")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/firewall.py needs root (namespaces, conntrack, Open vSwitch)",
              file=sys.stderr)
        return 2
    runs = []
    for n in parse_sizes(args.sizes):
        for direction in args.directions.split(","):
            with tempfile.TemporaryDirectory(prefix="nfmig-bench-fw-") as tmp:
                try:
                    run = one_run(n, direction, Path(tmp))
                except Exception as exc:  # one run that cannot be measured: the others go on
                    run = {"sessions": n, "direction": direction, "ok": False,
                           "reason": repr(exc), "command_s": 0.0}
            runs.append(run)
            print(show(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bench": "firewall", "runs": runs}, indent=2))
    return 0 if all(r.get("placed") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
