"""Network namespaces for migrating a kernel NAT's sessions while connections stay up.

    client 10.0.0.2 ── lan ──┬── inside [NAT A] outside ──┬── wan ── server 192.0.2.100
                             └── inside [NAT B] outside ──┘

Both bridges live in a switch namespace, so the root namespace holds nothing but the
namespaces themselves. The active NAT owns the gateway addresses (10.0.0.1 inside,
192.0.2.1 outside); a switch-over moves them, so client and server keep talking to the
same addresses while another NAT instance carries the traffic. Namespace names start with
a prefix unique to the run, so parallel runs never collide. IPv4 only.

Both NATs can carry traffic at once, too: one subscriber (a client address) moves while
the others stay. The NAT it moves to needs an inside address of its own (e.g.
SECOND_GATEWAY) that the client routes that one source address through, and the
subscriber needs an external address of its own, which moves from NAT to NAT with it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

IP_TIMEOUT = 10.0  # seconds for one ip command or batch
KILL_WAIT = 5.0  # seconds to wait for killed processes to be reaped
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


class TestBed:
    """Client, NAT A, NAT B and server in namespaces joined by two bridges."""

    __test__ = False  # a helper, not a test class, whatever module imports it

    INSIDE_GATEWAY = "10.0.0.1"
    SECOND_GATEWAY = "10.0.0.253"  # the other NAT's inside address, for steered subscribers
    EXTERNAL = "192.0.2.1"
    CLIENT = "10.0.0.2"
    SERVER = "192.0.2.100"
    INSIDE_PREFIX = "10.0.0.0/24"
    OUTSIDE_PREFIX = "192.0.2.0/24"
    NAT_SYSCTLS = {
        "net.ipv4.ip_forward": "1",
        "net.netfilter.nf_conntrack_acct": "1",
        # strict TCP tracking: a migrated session must carry the right window state
        "net.netfilter.nf_conntrack_tcp_loose": "0",
        "net.netfilter.nf_conntrack_tcp_be_liberal": "0",
    }

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is None:
            prefix = self._free_prefix()
        elif not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r}: use letters, digits, '_', '.', '-' (<= 40)")
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.client = f"{prefix}-client"
        self.nat_a = f"{prefix}-nata"
        self.nat_b = f"{prefix}-natb"
        self.server = f"{prefix}-server"
        self.namespaces = (self.switch, self.client, self.nat_a, self.nat_b, self.server)
        # (namespace, its interface, bridge, the peer's name in the switch)
        self._ports = (
            (self.client, "eth0", "lan", "client"),
            (self.server, "eth0", "wan", "server"),
            (self.nat_a, "inside", "lan", "nata-in"),
            (self.nat_a, "outside", "wan", "nata-out"),
            (self.nat_b, "inside", "lan", "natb-in"),
            (self.nat_b, "outside", "wan", "natb-out"),
        )
        self._owned: list[str] = []  # namespaces this bed created, so destroy() spares others
        self._procs: list[subprocess.Popen] = []
        self._announcers: list[subprocess.Popen] = []
        self._steered: set[str] = set()  # client addresses with a route of their own
        self._macs: dict[tuple[str, str], str] = {}  # (NAT namespace, interface) -> MAC

    @staticmethod
    def _free_prefix() -> str:
        while True:
            prefix = f"nfm{secrets.token_hex(3)}"
            if not any(name.startswith(f"{prefix}-") for name in _netns_names()):
                return prefix

    # -- life cycle ----------------------------------------------------------------------

    def build(self) -> None:
        """Create the namespaces and wire them; on failure remove whatever was made."""
        taken = sorted(set(self.namespaces) & set(_netns_names()))
        if taken:
            raise RuntimeError(f"namespaces already exist, not touching them: {taken}")
        try:
            self._owned = list(self.namespaces)
            _ip_batch(None, [f"netns add {ns}" for ns in self.namespaces])
            self._set_sysctls()
            self._wire_switch()
            self._configure_hosts()
            self._read_macs()
        except BaseException:
            self.destroy()
            raise

    def _set_sysctls(self) -> None:
        # Devices created from now on get no IPv6 (no DAD, router or MLD frames on the
        # bridges); lo keeps ::1.
        no_ipv6 = "net.ipv6.conf.default.disable_ipv6=1"
        # conntrack -L instantiates conntrack in the NAT namespaces, which the
        # net.netfilter sysctls need.
        _parallel([
            *(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", no_ipv6]
              for ns in (self.switch, self.client, self.server)),
            *(["ip", "netns", "exec", ns, "conntrack", "-L"] for ns in (self.nat_a, self.nat_b)),
        ])
        nat = [f"{key}={value}" for key, value in self.NAT_SYSCTLS.items()]
        _parallel([["ip", "netns", "exec", ns, "sysctl", "-q", "-w", no_ipv6, *nat]
                   for ns in (self.nat_a, self.nat_b)])

    def _wire_switch(self) -> None:
        lines = ["link add lan type bridge", "link add wan type bridge",
                 "link set lan up", "link set wan up"]
        for ns, ifname, bridge, peer in self._ports:
            lines.append(f"link add {peer} type veth peer name {ifname} netns {ns}")
            lines.append(f"link set {peer} master {bridge} up")
        _ip_batch(self.switch, lines)

    def _configure_hosts(self) -> None:
        batches: dict[str, list[str]] = {ns: ["link set lo up"] for ns in self.namespaces}
        for ns, ifname, _bridge, _peer in self._ports:
            batches[ns].append(f"link set {ifname} up")
        batches[self.client] += [f"addr add {self.CLIENT}/24 dev eth0",
                                 f"route add default via {self.INSIDE_GATEWAY}"]
        batches[self.server].append(f"addr add {self.SERVER}/24 dev eth0")
        _parallel([_ip_argv(ns) for ns in batches], ["\n".join(b) + "\n" for b in batches.values()])

    def _read_macs(self) -> None:
        """The NATs' interface MACs, read once: a switch-over points the hosts at them
        without starting a process to look them up in the middle of the move."""
        def links(ns: str) -> list[tuple[tuple[str, str], str]]:
            out = _run(["ip", "-j", "-n", ns, "link", "show"], input=None,
                       timeout=IP_TIMEOUT).stdout
            return [((ns, link["ifname"]), link["address"]) for link in json.loads(out)
                    if link["ifname"] in ("inside", "outside")]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for found in pool.map(links, (self.nat_a, self.nat_b)):
                self._macs.update(found)

    def destroy(self) -> None:
        """Kill what popen() started, then delete this bed's namespaces; never raises."""
        procs = self._procs + self._announcers
        self._procs, self._announcers = [], []
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children too
            except OSError:
                pass
        deadline = time.monotonic() + KILL_WAIT
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        existing = set(_netns_names())
        doomed = [ns for ns in self._owned if ns in existing]
        if doomed:
            try:
                _ip_batch(None, [f"netns del {ns}" for ns in doomed], force=True)
            except Exception:
                pass  # whatever is left is retried by the next call
        existing = set(_netns_names())
        self._owned = [ns for ns in self._owned if ns in existing]

    def __enter__(self) -> TestBed:
        self.build()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    # -- which NAT carries the traffic ---------------------------------------------------

    def activate(self, nat_ns: str) -> None:
        """Give nat_ns the gateway addresses and point client and server at it."""
        self.activate_addresses(nat_ns, inside=[self.INSIDE_GATEWAY], outside=[self.EXTERNAL])

    def deactivate(self, nat_ns: str) -> None:
        """Take the gateway addresses away from nat_ns; nothing to do if it has none."""
        self.deactivate_addresses(nat_ns, inside=[self.INSIDE_GATEWAY],
                                  outside=[self.EXTERNAL])

    def activate_addresses(self, nat_ns: str, inside: Iterable[str] = (),
                           outside: Iterable[str] = ()) -> None:
        """Give nat_ns these addresses (/24) on its inside and outside interfaces, and point
        client and server at it for them.

        Another NAT may still hold the same addresses (make before break, see
        switch_over): the client's and server's neighbour entries are therefore set to
        nat_ns's MAC, which is what the gratuitous ARP would do, but at once and without
        an ARP exchange that both NATs would answer. The gratuitous ARP still goes out, in
        the background (arping lingers a second after sending), for any other listener.
        """
        self._check_nat(nat_ns)
        moves = self._moves(inside, outside)
        if not moves:
            return
        _ip_batch(nat_ns, [f"addr replace {address}/24 dev {dev}" for dev, address, _ in moves])
        self._announcers = [p for p in self._announcers if p.poll() is None]
        for dev, address, _ in moves:
            self._announcers.append(subprocess.Popen(
                ["ip", "netns", "exec", nat_ns, "arping", "-U", "-c", "1", "-I", dev, address],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        entries: dict[str, list[str]] = {}
        for dev, address, peer in moves:
            entries.setdefault(peer, []).append(
                f"neigh replace {address} lladdr {self._mac(nat_ns, dev)} dev eth0 "
                "nud reachable")
        _parallel([_ip_argv(ns) for ns in entries],
                  ["\n".join(lines) + "\n" for lines in entries.values()])

    def _mac(self, nat_ns: str, dev: str) -> str:
        if (nat_ns, dev) not in self._macs:  # a bed built before the MACs were read
            self._read_macs()
        return self._macs[(nat_ns, dev)]

    def deactivate_addresses(self, nat_ns: str, inside: Iterable[str] = (),
                             outside: Iterable[str] = ()) -> None:
        """Take these addresses away from nat_ns; those it does not have are skipped."""
        self._check_nat(nat_ns)
        moves = self._moves(inside, outside)
        if moves:
            _ip_batch(nat_ns, [f"addr flush dev {dev} to {address}/32"
                               for dev, address, _ in moves], family="-4")

    def _moves(self, inside: Iterable[str], outside: Iterable[str]
               ) -> list[tuple[str, str, str]]:
        """(NAT interface, address, namespace that reaches it) for each address, checked."""
        return ([("inside", self._checked(a, self.INSIDE_PREFIX), self.client) for a in inside]
                + [("outside", self._checked(a, self.OUTSIDE_PREFIX), self.server)
                   for a in outside])

    def route_client(self, address: str, via: str | None) -> None:
        """Send what the client sends from ``address`` through the gateway ``via`` (the
        inside address of a NAT) instead of the default gateway; ``via=None`` undoes it.

        Source policy routing: a rule for that one source address selects a table of its
        own whose default route goes through ``via``.
        """
        address = self._checked(address, self.INSIDE_PREFIX)
        table = _steering_table(address)
        lines = []
        if address in self._steered:
            lines += [f"rule del from {address}/32 table {table}",
                      f"route del default table {table}"]
        if via is not None:
            via = self._checked(via, self.INSIDE_PREFIX)
            lines += [f"route replace default via {via} dev eth0 table {table}",
                      f"rule add from {address}/32 table {table}"]
        if lines:
            _ip_batch(self.client, lines)
        if via is None:
            self._steered.discard(address)
        else:
            self._steered.add(address)

    def move_subscriber(self, address: str, external: str, old: str, new: str,
                        via: str) -> float:
        """Move one subscriber from NAT old to NAT new while the others stay on old: its
        external address goes to new, and the client routes ``address`` through ``via``
        (new's inside address). Returns the seconds it took."""
        for ns in (old, new):  # check everything before changing anything
            self._check_nat(ns)
        self._checked(address, self.INSIDE_PREFIX)
        self._checked(via, self.INSIDE_PREFIX)
        self._checked(external, self.OUTSIDE_PREFIX)
        started = time.perf_counter()
        # Make before break, as in switch_over. The external address first: new needs it
        # to route towards the server at all, and the server's replies go to new from then
        # on; old keeps translating what the client still sends its way until the route
        # moves, and only then gives the address up.
        self.activate_addresses(new, outside=[external])
        self.route_client(address, via)
        self.deactivate_addresses(old, outside=[external])
        return time.perf_counter() - started

    def switch_over(self, old: str, new: str) -> float:
        """Move the gateway from old to new; returns the seconds it took.

        Make before break: new gets the addresses and the hosts are pointed at it while
        old still holds them, and only then does old give them up. The other way round,
        every packet already on its way to old in between (a few ms: process starts) was
        dropped there, since old's connected routes go with its addresses: a lost segment
        per direction that TCP recovers by fast retransmit at best and by its
        retransmission timer (>= 200 ms) when nothing followed it.
        """
        started = time.perf_counter()
        self.activate(new)
        self.deactivate(old)
        return time.perf_counter() - started

    def add_client_addresses(self, addresses: list[str]) -> None:
        """More client addresses on eth0 (/24 unless given), one per simulated subscriber."""
        inside = ipaddress.ip_network(self.INSIDE_PREFIX)
        lines = []
        for address in addresses:
            iface = ipaddress.ip_interface(address if "/" in address else f"{address}/24")
            if iface.network != inside:
                raise ValueError(f"{address} is not in {self.INSIDE_PREFIX}")
            lines.append(f"addr replace {iface.with_prefixlen} dev eth0")
        if lines:
            _ip_batch(self.client, lines)

    @staticmethod
    def _checked(address: str, prefix: str) -> str:
        """``address`` if it is a host address of ``prefix``: the bed sends nowhere else."""
        network = ipaddress.ip_network(prefix)
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address") from None
        if parsed not in network or parsed in (network.network_address,
                                               network.broadcast_address):
            raise ValueError(f"{address} is not a host address in {prefix}")
        return str(parsed)

    # -- running things in the namespaces ------------------------------------------------

    def run(self, ns: str, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run cmd in ns and wait; RuntimeError on timeout, or on failure when check."""
        self._check_ns(ns)
        return _run(["ip", "netns", "exec", ns, *cmd], input=input, timeout=timeout,
                    check=check)

    def popen(self, ns: str, *cmd: str, **kwargs) -> subprocess.Popen:
        """Start cmd in ns in its own process group, which destroy() kills."""
        self._check_ns(ns)
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def ns_path(self, ns: str) -> str:
        """The bind mount that holds ns open, for code that enters it with setns."""
        return f"/run/netns/{ns}"

    def _check_ns(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of test bed {self.prefix}")

    def _check_nat(self, ns: str) -> None:
        if ns not in (self.nat_a, self.nat_b):
            raise ValueError(f"{ns!r} is not a NAT namespace of test bed {self.prefix}")


def _steering_table(address: str) -> int:
    """The routing table of one steered client address: 1000 + its last octet (unique in
    the bed's /24, and clear of the kernel's reserved tables 253-255)."""
    return 1000 + int(ipaddress.ip_address(address)) % 256


def _netns_names() -> list[str]:
    try:
        return os.listdir("/run/netns")
    except FileNotFoundError:
        return []


def _ip_argv(ns: str | None, *options: str) -> list[str]:
    return ["ip", *options, *(["-n", ns] if ns else []), "-batch", "-"]


def _ip_batch(ns: str | None, lines: list[str], *, force: bool = False,
              family: str | None = None) -> None:
    """Many ip commands in one process: the test bed's speed is mostly process starts."""
    options = [*(["-force"] if force else []), *([family] if family else [])]
    _run(_ip_argv(ns, *options), input="\n".join(lines) + "\n", timeout=IP_TIMEOUT)


def _parallel(argvs: list[list[str]], inputs: list[str | None] | None = None) -> None:
    """Run independent commands side by side; raise the first failure."""
    inputs = inputs or [None] * len(argvs)
    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        futures = [pool.submit(_run, argv, input=text, timeout=IP_TIMEOUT)
                   for argv, text in zip(argvs, inputs, strict=True)]
    for future in futures:
        future.result()


def _run(argv: list[str], *, input: str | None, timeout: float,
         check: bool = True) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills the whole process group and waits boundedly."""
    proc = subprocess.Popen(argv, text=True, start_new_session=True,
                            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise RuntimeError(f"`{' '.join(argv)}` timed out after {timeout} s") from None
    except BaseException:  # interrupted: leave nothing running
        _kill(proc)
        raise
    if check and proc.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {err.strip()}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.communicate(timeout=KILL_WAIT)
    except subprocess.TimeoutExpired:
        pass
