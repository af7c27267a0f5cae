"""Two hosts, A and B, in namespaces of their own, joined by one link that tc can shape: the
path a migration crosses in bench/vm_vs_state.py, whether QEMU's stream or nfmig's NETCONF.

    host A: mig 198.51.100.1/24 ── veth, netem delay + rate both ways ── 198.51.100.2/24 :B

With ``taps``, each host also gets bridges ``lan`` and ``wan`` with a tap device each (the
VM's NICs: QEMU in that host opens them) and an uplink into the test bed's switch
namespace (nfmig.testbed), so both QEMUs sit on the same two L2 segments as the test bed's
client and server, and QEMU's announce after a migration moves the traffic to B.

The namespaces are named after the test bed's prefix and removed by ``destroy`` (or the
context manager), whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from types import TracebackType

from nfmig.testbed import TestBed

A_ADDRESS, B_ADDRESS = "198.51.100.1", "198.51.100.2"
LINK = "mig"
DELAY = "5ms"  # each way: a 10 ms round trip, as between two domains
# netem's queue, in packets: enough for a window at 1 Gbit/s and 10 ms (about 1.25 MB,
# fewer packets with segmentation offload), so the shaping delays and does not drop
NETEM_LIMIT = 100_000
LINKS = {"none": None, "1gbit": "1gbit", "100mbit": "100mbit"}
CLONE_NEWNET = 0x40000000


class Hosts:
    """Namespaces ``<prefix>-ha`` and ``<prefix>-hb`` and the link between them."""

    def __init__(self, bed: TestBed, taps: bool) -> None:
        self.bed, self.taps = bed, taps
        self.a, self.b = f"{bed.prefix}-ha", f"{bed.prefix}-hb"
        self._made: list[str] = []

    def __enter__(self) -> Hosts:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def build(self) -> None:
        for ns in (self.a, self.b):
            _ip(None, f"netns add {ns}")
            self._made.append(ns)
            # no IPv6 on the devices made from now on: no DAD, MLD or router frames
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  "net.ipv6.conf.default.disable_ipv6=1"])
        _ip(self.a, f"link add {LINK} type veth peer name {LINK} netns {self.b}")
        for ns, address in ((self.a, A_ADDRESS), (self.b, B_ADDRESS)):
            lines = ["link set lo up", f"link set {LINK} up",
                     f"addr add {address}/24 dev {LINK}"]
            if self.taps:
                side = "a" if ns == self.a else "b"
                for bridge, tap in (("lan", "tap-in"), ("wan", "tap-out")):
                    # the uplink's far end is in the switch, on the test bed's bridge
                    _ip(self.bed.switch, f"link add vm{side}-{bridge} type veth peer name "
                                         f"up-{bridge} netns {ns}")
                    _ip(self.bed.switch, f"link set vm{side}-{bridge} master {bridge} up")
                    lines += [f"link add {bridge} type bridge", f"link set {bridge} up",
                              f"link set up-{bridge} master {bridge} up",
                              f"tuntap add {tap} mode tap",
                              f"link set {tap} master {bridge} up"]
            _ip(ns, "\n".join(lines))

    def shape(self, rate: str | None) -> str:
        """Delay DELAY each way and limit to ``rate`` (tc netem on both ends), or, where the
        kernel has no netem, the rate alone (tc tbf: no delay). None: the link as it is.
        Returns what was done, for the report."""
        if rate is None:
            return "unshaped"
        for ns in (self.a, self.b):
            netem = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", LINK,
                          "root", "netem", "delay", DELAY, "rate", rate, "limit",
                          str(NETEM_LIMIT)], check=False)
            if netem.returncode == 0:
                continue
            if "unknown" not in netem.stderr:
                raise RuntimeError(f"tc netem on {ns}: {netem.stderr.strip()}")
            # Rate only. The bucket holds 10 ms of traffic (at least a 64 KB segment,
            # which veth passes whole), the queue 50 ms: a bottleneck that delays bursts
            # and drops beyond, as a router's would.
            per_s = _bits(rate) // 8
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", LINK, "root",
                  "tbf", "rate", rate, "burst", str(max(per_s // 100, 128 << 10)),
                  "limit", str(max(per_s // 20, 256 << 10))])
            return f"{rate} (tc tbf, rate only: this kernel has no netem, so no delay)"
        return f"{rate}, {DELAY} each way (tc netem)"

    def link_bytes(self) -> int:
        """Bytes that crossed the link so far, both ways (A's end's counters)."""
        out = _run(["ip", "-s", "-j", "-n", self.a, "link", "show", "dev", LINK]).stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def destroy(self) -> None:
        """Remove the namespaces (their devices go with them) and the uplinks; never
        raises."""
        if self.taps:
            for side in ("a", "b"):
                for bridge in ("lan", "wan"):
                    with contextlib.suppress(Exception):
                        _run(["ip", "-n", self.bed.switch, "link", "del",
                              f"vm{side}-{bridge}"], check=False)
        made, self._made = self._made, []
        for ns in made:
            with contextlib.suppress(Exception):
                _run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block's calling thread in namespace ``ns``: the sockets it opens and the
    processes it starts belong to ``ns`` (a process inherits its parent thread's
    namespace), which is how a server or the migrate command is placed on host A or B
    without changing how it is started."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET):  # pragma: no cover - cannot happen as root
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)


def _bits(rate: str) -> int:
    """tc's rate ("1gbit", "100mbit") in bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate.removesuffix(unit)) * factor)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def _ip(ns: str | None, batch: str) -> None:
    _run(["ip", *(["-n", ns] if ns else []), "-batch", "-"], input=batch + "\n")


def _run(argv: list[str], input: str | None = None, check: bool = True
         ) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done
