"""Moving a NAT: live migration of its whole VM (QEMU) against `nfmig migrate` of its state,
the same N sessions over the same link, in the same run.

The link: two hosts in namespaces, A and B, joined by a veth that tc shapes (bench/vm_net.py;
`--links`: none, or netem with 5 ms each way (10 ms RTT, as between two domains) and a
rate of 1 Gbit/s or 100 Mbit/s; on a kernel without netem, the rate alone with tbf, and
the output says so). What crosses it is counted on its interface, both ways.

The VM (bench/vm_image.py, bench/qemu.py): a Debian kernel and a busybox / conntrack /
nftables initramfs, built from Debian packages into `--cache` once; 256 MiB, one vCPU, two
virtio NICs, the test bed's SNAT policy. QEMU on host A boots it with the N sessions of
bench/tables.py's synthetic table loaded by `conntrack -R` in the guest; its NICs are taps
on bridges of A that reach the test bed's LAN and WAN (nfmig.testbed: client 10.0.0.2 ->
VM 10.0.0.1 / 192.0.2.1 -> server 192.0.2.100). An `-incoming` QEMU waits on host B with
taps on the same segments. The probe's TCP and UDP streams (nfmig.probe, 2 ms) run through
the VM; QMP `migrate` moves it to B over the link; `query-migrate` gives total time,
downtime and RAM bytes; QEMU's announce moves the traffic. KVM when a guest boots with it,
TCG otherwise (said in the output and the JSON).

nfmig (bench/migrator_linux.py, imported): the same N sessions on a Linux NAT A (half
straight into its kernel, half through its server, as that bench does), NAT B empty, both
with `nfmig serve`; A's server runs on host A and listens on the link's address, B's server
and the `nfmig migrate` command run on host B: everything the command reads from A crosses
the link, its writes to B do not (the migrator sits in the destination's domain, as
QEMU's destination does). The command is the real one with its default switchover
(gateway addresses), while the probe's streams and a new UDP flow every millisecond run
through the NATs (migrator_linux.live_migration).

Printed per N and link (medians of `--repeat`): bytes on the link, the VM's total time and
downtime, the command's whole time (interpreter start included) and freeze window, the
longest gap of the live TCP stream through each; then each goal of issue 23, met or not.
`--json FILE` writes every figure (QEMU's, the command's report with its "bytes" object);
`nfmig report FILE --png OUT` draws them. Needs root; `make bench-vm` installs QEMU and
runs it.

    .venv/bin/python bench/vm_vs_state.py [--sizes 1000,10000,100000]
        [--links none,1gbit,100mbit] [--repeat 1] [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from migrator_linux import End, deferred_interrupts, live_migration, policy
from nfmig.client.local import start_local_server
from nfmig.client.netconf import NatClient
from nfmig.nf_backends.ctnetlink import Conntrack
from qemu import QEMU, accelerator, migrate_vm
from results import medians
from tables import parse_sizes, synthetic_sessions
from traffic import CLIENT_EPHEMERAL
from vm_image import DEFAULT_CACHE, Image, build, sessions_initrd
from vm_net import A_ADDRESS, DELAY, LINKS, Hosts, in_netns
from vm_report import goals, table

from nfmig.testbed import TestBed

GUEST_MIB = 256
MAX_SIZE = 200_000  # the NAT namespaces' conntrack tables beside the live flows (as
# bench/migrator_linux.py); 1M sessions would also need a guest of about 1 GiB


class HostedEnd(End):
    """migrator_linux's End with its server on a host namespace of vm_net.Hosts, listening
    on ``address`` there (the migrator reaches it at that address)."""

    def __init__(self, stack: contextlib.ExitStack, bed: TestBed, netns: str,
                 workdir: Path, password: str, active: bool, host: str, address: str):
        self.netns, self.backend, self.path = netns, "linux", bed.ns_path(netns)
        self.address = address
        listen = [] if address == "127.0.0.1" else ["--listen", address]
        with in_netns(host), deferred_interrupts():
            self.server = start_local_server(workdir, "--backend", "linux", "--netns", netns,
                                             *listen, password=password)
            stack.callback(self.server.stop)
        with in_netns(host):
            self.client = NatClient(address, self.server.port, self.server.user, password,
                                    hostkey_verify=False)
        stack.callback(self.client.close)
        self.client.edit(policy(active))
        self.ct = Conntrack(self.path)
        stack.callback(self.ct.close)

    @property
    def url(self) -> str:
        return f"netconf://{self.server.user}@{self.address}:{self.server.port}"


def run_nfmig(n: int, rate: str | None, workdir: Path) -> dict:
    """`nfmig migrate` of n synthetic sessions A -> B across the link, live."""
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(TestBed())
        hosts = stack.enter_context(Hosts(bed, taps=False))
        shape = hosts.shape(rate)
        bed.run(bed.client, "sysctl", "-q", "-w",
                f"net.ipv4.ip_local_port_range={CLIENT_EPHEMERAL}")
        password = secrets.token_urlsafe(16)
        (workdir / "password").write_text(password + "\n")
        (workdir / "password").chmod(0o600)
        a = HostedEnd(stack, bed, bed.nat_a, workdir / "a", password, True, hosts.a,
                      A_ADDRESS)
        b = HostedEnd(stack, bed, bed.nat_b, workdir / "b", password, False, hosts.b,
                      "127.0.0.1")
        sessions = a.populate(synthetic_sessions(n))
        before = hosts.link_bytes()
        with in_netns(hosts.b):  # the command runs on host B
            figures = live_migration(bed, a, b, sessions, workdir)
        figures["link_bytes"] = hosts.link_bytes() - before
        figures["link_bytes_per_session"] = figures["link_bytes"] / n
    figures["link_shape"] = shape
    return figures


def run_vm(image: Image, base_initrd: bytes, n: int, rate: str | None, accel: str,
           memory_mib: int, workdir: Path) -> dict:
    """QEMU's live migration of the NAT VM holding n sessions, A -> B across the link."""
    workdir.mkdir(parents=True)
    initrd = workdir / "initrd.gz"
    initrd.write_bytes(base_initrd + sessions_initrd(synthetic_sessions(n),
                                                     workdir / "sessions.gz").read_bytes())
    with TestBed() as bed, Hosts(bed, taps=True) as hosts:
        shape = hosts.shape(rate)
        figures = migrate_vm(bed, hosts, image, initrd, accel, memory_mib, n, workdir)
    figures["link_shape"] = shape
    figures["total_s"] = figures["total_ms"] / 1e3 if figures["total_ms"] is not None \
        else None
    return figures


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run(sizes: list[int], links: list[str], repeat: int, image: Image, accel: str,
        memory_mib: int, tmp: Path) -> list[dict]:
    base = image.initrd.read_bytes()
    results = []
    for n in sizes:
        for link in links:
            rate = LINKS[link]
            entry: dict = {"sessions": n, "link": link, "vm_runs": [], "nfmig_runs": [],
                           "errors": []}
            for i in range(repeat):
                where = tmp / f"{n}-{link}-{i}"
                for side in ("vm", "nfmig"):
                    t0 = time.monotonic()
                    try:
                        figures = (run_vm(image, base, n, rate, accel, memory_mib,
                                          where / "vm") if side == "vm"
                                   else run_nfmig(n, rate, where / "nfmig"))
                    except Exception as exc:  # one run that could not be measured
                        where_ = traceback.extract_tb(exc.__traceback__)[-1]
                        entry["errors"].append(f"{side} run {i + 1}: "
                                               f"{type(exc).__name__}: {exc} (at "
                                               f"{Path(where_.filename).name}:"
                                               f"{where_.lineno})")
                        print(f"{_label(n)} {link} {side} run {i + 1}: FAILED: "
                              f"{entry['errors'][-1][:2000]}", flush=True)
                        continue
                    entry[f"{side}_runs"].append(figures)
                    print(_progress(n, link, side, i, figures, time.monotonic() - t0),
                          flush=True)
            shapes = {f["link_shape"] for f in entry["vm_runs"] + entry["nfmig_runs"]}
            entry["link_shape"] = " / ".join(sorted(shapes)) or None
            entry["vm"] = medians(entry["vm_runs"]) if entry["vm_runs"] else None
            entry["nfmig"] = medians(entry["nfmig_runs"]) if entry["nfmig_runs"] else None
            results.append(entry)
    return results


def _progress(n: int, link: str, side: str, i: int, f: dict, wall: float) -> str:
    if side == "vm":
        line = (f"{_label(n)} {link} VM run {i + 1}: {f['link_bytes'] / 1e6:.1f} MB, total "
                f"{f['total_ms']} ms, downtime {f['downtime_ms']} ms, TCP gap "
                f"{f['gap_tcp_ms']:.0f} ms (boot {f['boot_s']:.0f} s)")
    else:
        line = (f"{_label(n)} {link} nfmig run {i + 1}: {f['link_bytes'] / 1e6:.2f} MB "
                f"({f['link_bytes_per_session']:.0f} B/session), command "
                f"{f['command_s']:.2f} s, freeze {f['freeze_ms'] or 0:.0f} ms, TCP gap "
                f"{f['gap_tcp_ms']:.0f} ms")
        for p in f.get("problems") or []:
            line += f"\n  PROBLEM: {p}"
    return line + f" ({wall:.0f} s with the bed)"


def _qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "?"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: every finally runs


def _links(text: str) -> list[str]:
    links = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in links if w not in LINKS]
    if unknown or not links:
        raise argparse.ArgumentTypeError(f"links are {', '.join(LINKS)}")
    return links


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=[1000, 10_000, 100_000],
                        help="comma-separated session counts (default 1000,10000,100000)")
    parser.add_argument("--links", type=_links, default=list(LINKS),
                        help="comma-separated: none, 1gbit, 100mbit (default all three; "
                             f"shaped ones add {DELAY} each way)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (median; "
                        "default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the VM image is built once (default {DEFAULT_CACHE})")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="QEMU's accelerator (default: KVM when a guest boots with "
                             "it, else TCG)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("vm_vs_state: needs root (network namespaces, taps, conntrack)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if max(args.sizes) > MAX_SIZE:
        parser.error(f"sizes above {MAX_SIZE} do not fit the NAT namespaces' conntrack "
                     "tables beside the live flows")
    if shutil.which(QEMU) is None:
        print(f"vm_vs_state: {QEMU} is not installed (make bench-vm installs it)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        image = build(args.cache)
        with tempfile.TemporaryDirectory(prefix="nfmig-vmbench-") as tmp:
            if args.accel == "auto":
                with TestBed() as bed, Hosts(bed, taps=True) as hosts:
                    accel, why = accelerator(image, image.initrd, hosts, Path(tmp) / "check")
            else:
                accel, why = args.accel, "chosen with --accel"
            qemu = _qemu_version()
            print(f"VM: {qemu}, accelerator {accel.upper()} ({why}), {GUEST_MIB} MiB guest, "
                  f"kernel {image.kernel_version}; N synthetic TCP sessions; link "
                  f"{', '.join(args.links)}", flush=True)
            results = run(args.sizes, args.links, args.repeat, image, accel, GUEST_MIB,
                          Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    print("\n".join(["", *table(results)]))
    for link in args.links:
        shapes = {r["link_shape"] for r in results if r["link"] == link and r["link_shape"]}
        print(f"link {link}: {' / '.join(sorted(shapes)) or 'not measured'}")
    verdicts = goals(results)
    print("\n".join(["", *(v["line"] for v in verdicts)]))
    errors = [e for r in results for e in r["errors"]]
    problems = [f"{_label(r['sessions'])} {r['link']}: {p}" for r in results
                for run_ in r["nfmig_runs"] for p in run_.get("problems") or []]
    for line in errors + problems:
        print(f"PROBLEM: {line}")
    print(f"({time.monotonic() - started:.0f} s in all)")
    if args.json:
        import json

        args.json.write_text(json.dumps({
            "kind": "vm-vs-state", "date": datetime.now(UTC).isoformat(),
            "accelerator": accel, "accelerator_reason": why, "qemu": qemu,
            "guest_memory_mib": GUEST_MIB, "guest_kernel": image.kernel_version,
            "image_packages": image.packages, "link_delay_each_way": DELAY,
            "sizes": args.sizes, "links": args.links, "repeat": args.repeat,
            "results": results, "goals": verdicts, "problems": errors + problems},
            indent=1, default=str) + "\n")
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
