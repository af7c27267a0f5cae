"""The reference the migration benchmark compares with: conntrackd (FTFW, external cache
disabled on the receiver) resyncing a table from one NAT namespace into the other over a
link of its own, timed from `conntrackd -n` on B until B's kernel holds every entry."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Protocol

from nfmig.nf_backends.base import Session
from nfmig.nf_backends.ctnetlink import Conntrack, EntryCount
from tables import binding_set, create_all, flush, kernel_entries

from nfmig.testbed import TestBed

SYNC_DEV, SYNC_A, SYNC_B, SYNC_PORT = "sync", "198.51.100.1", "198.51.100.2", 3780
WAIT = 120.0  # seconds: bound on every wait for a daemon, a log line or a count

# The sync link carries no session state of its own: untracked, so the peer's count is
# exactly the synced entries.
NOTRACK = f"""table ip kbench_sync {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{SYNC_DEV}" notrack
  }}
  chain output {{
    type filter hook output priority raw; policy accept;
    oifname "{SYNC_DEV}" notrack
  }}
}}
"""

CONNTRACKD_CONF = """Sync {{
  Mode FTFW {{
    DisableExternalCache {receiver}
  }}
  UDP {{
    IPv4_address {me}
    IPv4_Destination_Address {peer}
    Port {port}
    Interface {dev}
    SndSocketBuffer 24985600
    RcvSocketBuffer 24985600
    Checksum on
  }}
}}
General {{
  HashSize 65536
  HashLimit 524288
  LogFile {dir}/conntrackd.log
  Syslog off
  LockFile {dir}/conntrackd.lock
  UNIX {{
    Path {dir}/conntrackd.sock
  }}
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Userspace {{
    Protocol Accept {{
      TCP
      UDP
      ICMP
    }}
    Address Ignore {{
      IPv4_address 127.0.0.1
      IPv4_address {me}
    }}
  }}
}}
"""


class Namespace(Protocol):
    """A NAT namespace as the reference needs it."""

    netns: str
    path: str
    ct: Conntrack | None


def add_sync_link(bed: TestBed) -> None:
    """A veth pair between the NAT namespaces; it goes away with them."""
    bed.run(bed.nat_a, "ip", "link", "add", SYNC_DEV, "type", "veth", "peer", "name",
            SYNC_DEV, "netns", bed.nat_b)
    for ns, address in ((bed.nat_a, SYNC_A), (bed.nat_b, SYNC_B)):
        bed.run(ns, "ip", "-batch", "-", input=f"addr add {address}/30 dev {SYNC_DEV}\n"
                f"link set {SYNC_DEV} up\n")
        bed.run(ns, "nft", "-f", "-", input=NOTRACK)


class Conntrackd:
    """One conntrackd in a namespace, with its own config, lock, socket and log."""

    def __init__(self, bed: TestBed, netns: str, workdir: Path, me: str, peer: str,
                 receiver: bool):
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "conntrackd.conf"
        self.config.write_text(CONNTRACKD_CONF.format(
            receiver="On" if receiver else "Off", me=me, peer=peer, port=SYNC_PORT,
            dev=SYNC_DEV, dir=workdir))
        self.log = workdir / "conntrackd.log"
        with open(workdir / "conntrackd.out", "w") as out:
            self.proc = bed.popen(netns, "conntrackd", "-C", str(self.config),
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT)

    def command(self, *args: str) -> str:
        """A client command over the daemon's unix socket. Run from the root namespace to
        save a namespace switch; conntrackd then warns that the sync device is missing
        there, which does not matter to a client."""
        result = subprocess.run(["conntrackd", "-C", str(self.config), *args],
                                capture_output=True, text=True, timeout=WAIT)
        if result.returncode:
            raise RuntimeError(f"conntrackd {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def wait_cache(self, n: int) -> None:
        """Until the daemon's internal cache holds n entries (it dumps the kernel at start)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"conntrackd exited; its log:\n{self._log_tail()}")
            with contextlib.suppress(RuntimeError):
                match = re.search(r"active objects:\s+(\d+)", self.command("-s", "cache"))
                if match and int(match.group(1)) == n:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"conntrackd did not load {n} entries within {WAIT} s; its log:\n"
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        """By PID: SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def wait_count(count: EntryCount, n: int) -> float:
    """The monotonic time at which the namespace's conntrack count (what `conntrack -C`
    prints) first reaches n."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if count.read() >= n:
            return time.monotonic()
        time.sleep(0.0005)
    raise RuntimeError(f"conntrackd: NAT B holds {count.read()} of {n} entries after {WAIT} s")


def measure_conntrackd(bed: TestBed, a: Namespace, b: Namespace, sessions: list[Session],
                       workdir: Path) -> float:
    """Seconds from `conntrackd -n` (resync request) on B until B's kernel holds every
    session, written into A's kernel first. Both tables must be empty, the sync link in
    place (add_sync_link); both are emptied again however it ends."""
    assert a.ct is not None and b.ct is not None
    entries = kernel_entries(sessions)
    create_all(a.ct, entries, "populating NAT A for conntrackd")
    daemons: list[Conntrackd] = []
    count = EntryCount(b.path)
    try:
        daemons.append(Conntrackd(bed, a.netns, workdir / "a", SYNC_A, SYNC_B, False))
        daemons.append(Conntrackd(bed, b.netns, workdir / "b", SYNC_B, SYNC_A, True))
        daemons[0].wait_cache(len(entries))
        daemons[1].wait_cache(0)
        started = time.monotonic()
        daemons[1].command("-n")
        reached = wait_count(count, len(entries))
        on_b = b.ct.dump()
        if len(on_b) != len(entries) or binding_set(on_b) != binding_set(entries):
            raise RuntimeError(f"conntrackd: NAT B holds {len(on_b)} entries, not the "
                               f"{len(entries)} of NAT A with their translation")
        return reached - started
    finally:
        count.close()
        for daemon in daemons:
            daemon.stop()
        flush(a.ct)
        flush(b.ct)
