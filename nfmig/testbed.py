"""Hosts in network namespaces for a NAT migration: a client, NAT A, NAT B and a server.

    client (10.0.0.2) ── lan ──┬── inside [NAT A] outside ──┬── wan ── server (192.0.2.100)
                               └── inside [NAT B] outside ──┘

Both bridges live in a switch namespace; the root namespace only holds the namespaces. The
active NAT owns the gateway addresses (10.0.0.1 inside, 192.0.2.1 outside); switching over
moves them and announces the move with gratuitous ARP. Every name starts with a prefix
unique to the run, and destroy() removes everything, even after a failed build.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time


class TestBed:
    __test__ = False  # not a pytest test class

    INSIDE_GATEWAY = "10.0.0.1"
    EXTERNAL = "192.0.2.1"
    CLIENT = "10.0.0.2"
    SERVER = "192.0.2.100"
    INSIDE_PREFIX = "10.0.0.0/24"
    NAT_SYSCTLS = {
        "net.ipv4.ip_forward": "1",
        "net.netfilter.nf_conntrack_acct": "1",
        "net.netfilter.nf_conntrack_tcp_loose": "0",  # strict TCP tracking
        "net.netfilter.nf_conntrack_tcp_be_liberal": "0",
    }

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"nfm{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.client = f"{self.prefix}-client"
        self.nat_a = f"{self.prefix}-nata"
        self.nat_b = f"{self.prefix}-natb"
        self.server = f"{self.prefix}-server"
        self.namespaces = [self.switch, self.client, self.nat_a, self.nat_b, self.server]
        self._procs: list[subprocess.Popen] = []

    # -- life cycle --------------------------------------------------------------------
    def build(self) -> None:
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            self._ip("netns", "add", ns)
        self._ip("-n", self.switch, "link", "add", "lan", "type", "bridge")
        self._ip("-n", self.switch, "link", "add", "wan", "type", "bridge")
        self._link(self.client, "eth0", "lan", "c")
        self._link(self.server, "eth0", "wan", "s")
        for ns, tag in ((self.nat_a, "a"), (self.nat_b, "b")):
            self._link(ns, "inside", "lan", f"{tag}i")
            self._link(ns, "outside", "wan", f"{tag}o")
        for ns in self.namespaces:
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.switch, "link", "set", "lan", "up")
        self._ip("-n", self.switch, "link", "set", "wan", "up")
        self._ip("-n", self.client, "addr", "add", f"{self.CLIENT}/24", "dev", "eth0")
        self._ip("-n", self.client, "route", "add", "default", "via", self.INSIDE_GATEWAY)
        self._ip("-n", self.server, "addr", "add", f"{self.SERVER}/24", "dev", "eth0")
        for ns in (self.nat_a, self.nat_b):
            self.run(ns, "conntrack", "-L")  # makes conntrack (and its sysctls) exist here
            self.run(ns, "sysctl", "-q", "-w",
                     *(f"{k}={v}" for k, v in self.NAT_SYSCTLS.items()))

    def _link(self, ns: str, name: str, bridge: str, tag: str) -> None:
        """A veth pair: ``name`` in ``ns``, its peer in the switch on ``bridge``."""
        peer = f"{self.prefix}{tag}"
        self._ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer,
                 "netns", self.switch)
        self._ip("-n", self.switch, "link", "set", peer, "master", bridge, "up")
        self._ip("-n", ns, "link", "set", name, "up")

    def destroy(self) -> None:
        """Kill what popen() started, then delete the namespaces. Never raises."""
        for proc in self._procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def __enter__(self) -> TestBed:
        self.build()
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    # -- switching NAT instances -------------------------------------------------------
    def activate(self, nat_ns: str) -> None:
        self._ip("-n", nat_ns, "addr", "replace", f"{self.INSIDE_GATEWAY}/24", "dev", "inside")
        self._ip("-n", nat_ns, "addr", "replace", f"{self.EXTERNAL}/24", "dev", "outside")
        # stale neighbour entries would keep sending to the old NAT until they time out
        self._ip("-n", self.client, "neigh", "flush", self.INSIDE_GATEWAY)
        self._ip("-n", self.server, "neigh", "flush", self.EXTERNAL)
        self.run(nat_ns, "arping", "-U", "-c", "1", "-I", "inside", self.INSIDE_GATEWAY,
                 check=False)
        self.run(nat_ns, "arping", "-U", "-c", "1", "-I", "outside", self.EXTERNAL,
                 check=False)

    def deactivate(self, nat_ns: str) -> None:
        for address, dev in ((f"{self.INSIDE_GATEWAY}/24", "inside"),
                             (f"{self.EXTERNAL}/24", "outside")):
            subprocess.run(["ip", "-n", nat_ns, "addr", "del", address, "dev", dev],
                           capture_output=True, timeout=30)

    def switch_over(self, old: str, new: str) -> float:
        started = time.perf_counter()
        self.deactivate(old)
        self.activate(new)
        return time.perf_counter() - started

    def add_client_addresses(self, addresses: list[str]) -> None:
        for address in addresses:
            self._ip("-n", self.client, "addr", "add", f"{address}/24", "dev", "eth0")

    # -- running things ----------------------------------------------------------------
    def ns_path(self, ns: str) -> str:
        return f"/run/netns/{ns}"

    def run(self, ns: str, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=input, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {ns} failed: {result.stderr.strip()}")
        return result

    def popen(self, ns: str, *cmd: str, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], start_new_session=True,
                                **kwargs)
        self._procs.append(proc)
        return proc

    @staticmethod
    def _ip(*args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode:
            raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
