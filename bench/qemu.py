"""QEMU for bench/vm_vs_state.py: the NAT VM (bench/vm_image.py) started on host A, an
`-incoming` twin on host B (bench/vm_net.py), and a live migration between them through
QMP (`migrate`, then `query-migrate` until it completes), with the probe's live TCP and UDP
streams (nfmig.probe) running through the VM's NAT the whole time.

Both QEMUs get the same command line (machine, accelerator, memory, NIC MACs, kernel and
initramfs) but for `-incoming`. The accelerator is KVM when a VM boots with it within
KVM_BOOT_SECONDS, TCG otherwise (on machines of this kind KVM's guest hangs at boot: nested
virtualisation); ``accelerator`` says which and why. Every QEMU is started and killed by
its PID here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm_image import INSIDE_MAC, OUTSIDE_MAC, READY, Image
from vm_net import B_ADDRESS, Hosts

from nfmig.probe import Probe, ProbeResult
from nfmig.testbed import TestBed

QEMU = "qemu-system-x86_64"
MIGRATION_PORT = 4444
KVM_BOOT_SECONDS = 30.0
BOOT_SECONDS = 600.0  # TCG and 100k sessions to load: ~25 s; 1M: minutes
MIGRATE_SECONDS = 300.0
SETTLE, AFTER = 0.3, 0.5  # the streams run this long before the migration and after it
# QEMU's default bandwidth cap (128 MiB/s) would make the VM slower than the link; the
# link, shaped or not, is what limits it here.
MAX_BANDWIDTH = 100 << 30
APPEND = "console=ttyS0 quiet panic=-1 init_on_free=1"


class Qmp:
    """A QMP connection over the QEMU's unix socket: commands and their answers; events
    are read past."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        # QEMU creates the socket early and greets once its monitor runs: a connection
        # that breaks before the greeting is tried again
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(path))
                self.file = self.sock.makefile("rb")
                json.loads(self.file.readline())  # the greeting
                self.command("qmp_capabilities")
                return
            except (OSError, ValueError, RuntimeError):
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def command(self, name: str, **arguments: Any) -> Any:
        message = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"QMP {name}: QEMU closed the connection")
            answer = json.loads(line)
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise RuntimeError(f"QMP {name}: {answer['error'].get('desc')}")

    def close(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Machine:
    """One QEMU process in a host namespace."""

    process: subprocess.Popen
    qmp_path: Path
    serial: Path
    stderr: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def wait_ready(self, timeout: float) -> int:
        """The number of sessions the guest's /init loaded, once it says it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
            if READY in text:
                words = text.split(READY, 1)[1].split()
                return int(words[0]) if words and words[0].isdigit() else 0
            if not self.alive():
                raise RuntimeError(f"QEMU exited {self.process.returncode}: "
                                   f"{self.stderr.read_text(errors='replace')[-1500:]}")
            time.sleep(0.1)
        raise TimeoutError(f"the VM did not get ready in {timeout:.0f} s; its console:\n"
                           f"{text[-1500:]}")


def start(ns: str, workdir: Path, name: str, accel: str, memory_mib: int, kernel: Path,
          initrd: Path, incoming: str | None = None) -> Machine:
    """QEMU in namespace ``ns`` with the host's tap-in / tap-out (vm_net.Hosts)."""
    workdir.mkdir(parents=True, exist_ok=True)
    qmp, serial, err = (workdir / f"{name}.qmp", workdir / f"{name}.console",
                        workdir / f"{name}.stderr")
    argv = [QEMU, "-name", f"nfmig-{name}", "-machine", "pc", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "qemu64", "-m", str(memory_mib),
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", APPEND,
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-no-reboot"]
    for nic, tap, mac in (("in", "tap-in", INSIDE_MAC), ("out", "tap-out", OUTSIDE_MAC)):
        argv += ["-netdev", f"tap,id={nic},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev={nic},mac={mac}"]
    if incoming:
        argv += ["-incoming", incoming]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    return Machine(proc, qmp, serial, err)


def accelerator(image: Image, initrd: Path, hosts: Hosts, workdir: Path) -> tuple[str, str]:
    """("kvm" or "tcg", why): KVM when /dev/kvm is there and a guest boots with it."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    vm = start(hosts.a, workdir, "kvm-check", "kvm", 256, image.kernel, initrd)
    try:
        vm.wait_ready(KVM_BOOT_SECONDS)
        return "kvm", "a guest booted with KVM"
    except TimeoutError:
        return "tcg", f"KVM unusable here: a guest did not boot with it in " \
                      f"{KVM_BOOT_SECONDS:.0f} s"
    except RuntimeError as exc:
        return "tcg", f"KVM unusable here: {str(exc).splitlines()[0][:160]}"
    finally:
        vm.kill()


def migrate_vm(bed: TestBed, hosts: Hosts, image: Image, initrd: Path, accel: str,
               memory_mib: int, n: int, workdir: Path) -> dict:
    """Boot the VM with n sessions on host A, its twin waiting on B, run the probe through
    it, migrate A -> B over the link; QEMU's figures, the link's bytes, the probe's."""
    machines: list[Machine] = []
    try:
        t0 = time.monotonic()
        src = start(hosts.a, workdir, "src", accel, memory_mib, image.kernel, initrd)
        machines.append(src)
        loaded = src.wait_ready(BOOT_SECONDS)
        boot_s = time.monotonic() - t0
        if loaded < n:
            raise RuntimeError(f"the VM loaded {loaded} of {n} sessions")
        dst = start(hosts.b, workdir, "dst", accel, memory_mib, image.kernel, initrd,
                    incoming=f"tcp:{B_ADDRESS}:{MIGRATION_PORT}")
        machines.append(dst)
        qmp = Qmp(src.qmp_path)
        dqmp = Qmp(dst.qmp_path)
        try:
            qmp.command("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            with Probe(bed) as probe:
                time.sleep(SETTLE)
                before = hosts.link_bytes()
                probe.mark("migrate")
                qmp.command("migrate", uri=f"tcp:{B_ADDRESS}:{MIGRATION_PORT}")
                info = _until_done(qmp)
                probe.mark("migrated")
                moved = hosts.link_bytes() - before
                time.sleep(AFTER)
                status = dqmp.command("query-status")
                result = probe.stop()
        finally:
            qmp.close()
            dqmp.close()
        return _figures(info, moved, result, status, boot_s, loaded)
    finally:
        for machine in machines:
            machine.kill()


def _until_done(qmp: Qmp) -> dict:
    deadline = time.monotonic() + MIGRATE_SECONDS
    while time.monotonic() < deadline:
        info = qmp.command("query-migrate")
        # QEMU sets "completed" a moment before it computes the total time and downtime:
        # until they are there, ask again
        if info.get("status") == "completed" and info.get("total-time"):
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU migration {info['status']}: {info.get('error-desc')}")
        time.sleep(0.01)
    raise TimeoutError(f"QEMU migration not done in {MIGRATE_SECONDS:.0f} s")


def _figures(info: dict, link_bytes: int, result: ProbeResult, status: dict, boot_s: float,
             loaded: int) -> dict:
    ram = info.get("ram") or {}
    return {
        "link_bytes": link_bytes, "total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
        "ram_transferred": ram.get("transferred"), "ram_total": ram.get("total"),
        "ram_duplicate_pages": ram.get("duplicate"), "ram_normal_pages": ram.get("normal"),
        "ram_normal_bytes": ram.get("normal-bytes"),
        "dirty_sync_count": ram.get("dirty-sync-count"), "mbps": ram.get("mbps"),
        "destination_status": status.get("status"), "boot_s": round(boot_s, 2),
        "sessions_loaded": loaded,
        "gap_tcp_ms": max(f.longest_gap_ms for f in result.tcp.values()),
        "gap_udp_ms": max(f.longest_gap_ms for f in result.udp.values()),
        "tcp_lost": sum(f.lost for f in result.tcp.values()),
        "udp_lost": sum(f.lost for f in result.udp.values()),
        "retransmissions": result.retransmissions(), "resets": result.resets,
        "rst_packets": result.rst_packets, "untranslated": result.untranslated,
        "probe": result.to_dict(),
    }
