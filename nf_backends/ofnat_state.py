"""The OpenFlow NAT application's state (ofnat_app.py): sessions, the translated endpoints
they hold, the peers they talk to, the policy, holds and gateway addresses; shared by its
OpenFlow and control threads, and free of OpenFlow itself. Watchers: the event streams it
writes its changes and flush markers to. InterfaceAddresses: the addresses on the NAT's
interfaces, kept in memory from netlink."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from . import flows
from .rtnl import (
    IFA_ADDRESS,
    IFA_LOCAL,
    IFADDRMSG,
    RTM_DELADDR,
    RTM_NEWADDR,
    Rtnl,
    attributes,
    messages,
)

log = logging.getLogger("nfmig.ofnat")


class NatState:
    """Sessions, ports in use, policy, holds and gateways; shared by the app's threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sessions: dict[int, list] = {}  # sid -> [proto, src, sport, dst, dport, ext, port]
        self.replies: dict[tuple, int] = {}  # claim (see claims()) -> sid
        self.ports: dict[tuple, int] = {}  # (proto, ext, port) -> sessions using it
        self.scales: dict[int, list] = {}  # sid -> [orig, reply] window scales seen
        # Source and destination addresses of the sessions -> sessions naming them: the
        # next hops the sessions' packets need (see the app's resolve_ahead).
        self.peers: dict[str, int] = {}
        self.prefixes: list = []
        self.externals: list[str] = []
        self.mappings: list[tuple] = []  # (network, external), longest prefix first
        self.port_min, self.port_max = 1024, 65535
        self.timeouts = {"TCP": 65535, "UDP": 120, "ICMP": 30}
        self.held: list = []
        self.gateways: dict[str, set[str]] = {"inside": set(), "outside": set()}
        self.accepting = True  # new connections get sessions (see "resume")
        self.created = self.expired = 0
        self.batch = 0
        self.pending: dict[int, tuple[dict, set]] = {}  # batch -> (old entries, dropped)

    def reserve(self, entries: list[list], drop: list[int]) -> str:
        """Claim these sessions' translated endpoints, all or none, for a batch that also
        deletes the sessions ``drop`` (their endpoints are free for the batch to claim, not
        yet for new connections). The reply names the batch and the sessions that were new,
        or the entry that collided. Entries are [*key, address, port] or [..., session id]."""
        with self.lock:
            dropped = set(drop)
            claimed: dict[tuple, int] = {}
            sids = []
            for index, e in enumerate(entries):
                sid = e[7] if len(e) > 7 else flows.session_id(tuple(e[:5]))
                for claim in claims(e):
                    owner = claimed.get(claim, self.replies.get(claim, sid))
                    if owner != sid and owner not in dropped:
                        return json.dumps({"error": "port taken", "index": index})
                    claimed[claim] = sid
                sids.append(sid)
            undo: dict[int, list | None] = {}
            for sid, e in zip(sids, entries, strict=True):
                undo.setdefault(sid, self.sessions.get(sid))
                self.add(sid, e[:7])
            self.batch += 1
            self.pending[self.batch] = (undo, dropped)
        return json.dumps({"ok": True, "batch": self.batch,
                           "new": [sid for sid, old in undo.items() if old is None]})

    def settle(self, batch: int, ok: bool) -> list[int]:
        """The switch took the batch (ok: its deleted sessions free their endpoints) or
        refused it (every session it touched gets its reservation from before back).
        Returns the sessions the batch put in (none if refused)."""
        with self.lock:
            undo, dropped = self.pending.pop(batch)
            if ok:
                for sid in dropped:
                    self.remove(sid)
                return list(undo)
            for sid, old in undo.items():
                self.remove(sid)
                if old is not None:
                    self.add(sid, old)
            for sid in dropped:  # a claim of the batch may have shadowed theirs
                e = self.sessions.get(sid)
                if e is not None:
                    self.replies.update(dict.fromkeys(claims(e), sid))
        return []

    def free(self, e: list, sid: int) -> bool:
        """Whether no other session claims what this entry would."""
        return all(self.replies.get(claim, sid) == sid for claim in claims(e))

    def add(self, sid: int, e: list) -> None:
        if sid in self.sessions:
            self.remove(sid)
        self.sessions[sid] = list(e)
        self.replies.update(dict.fromkeys(claims(e), sid))
        endpoint = (e[0], e[5], e[6])
        self.ports[endpoint] = self.ports.get(endpoint, 0) + 1
        peers = self.peers
        peers[e[1]] = peers.get(e[1], 0) + 1
        peers[e[3]] = peers.get(e[3], 0) + 1

    def remove(self, sid: int) -> list | None:
        e = self.sessions.pop(sid, None)
        if e is None:
            return None
        for claim in claims(e):
            if self.replies.get(claim) == sid:
                del self.replies[claim]
        endpoint = (e[0], e[5], e[6])
        left = self.ports.get(endpoint, 1) - 1
        if left:
            self.ports[endpoint] = left
        else:
            self.ports.pop(endpoint, None)
        for peer in (e[1], e[3]):
            left = self.peers.get(peer, 1) - 1
            if left:
                self.peers[peer] = left
            else:
                self.peers.pop(peer, None)
        self.scales.pop(sid, None)
        return e

    def peers_of(self, sids: Iterable[int]) -> set[str]:
        """The addresses these sessions talk between (those that exist)."""
        with self.lock:
            found = set()
            for sid in sids:
                e = self.sessions.get(sid)
                if e is not None:
                    found.update((e[1], e[3]))
            return found

    def external_for(self, src: str) -> str | None:
        address = ipaddress.ip_address(src)
        for network, external in self.mappings:
            if address in network:
                return external
        if self.prefixes and not any(address in p for p in self.prefixes):
            return None
        return self.externals[0] if self.externals else None

    def allocate(self, proto: str, external: str) -> int | None:
        span = self.port_max - self.port_min + 1
        start = random.randrange(span)
        for i in range(span):
            port = self.port_min + (start + i) % span
            if (proto, external, port) not in self.ports:
                return port
        return None

    def set_policy(self, p: dict) -> None:
        with self.lock:
            self.prefixes = [ipaddress.ip_network(x, strict=False) for x in p["prefixes"]]
            self.externals = list(p["externals"])
            self.mappings = [(ipaddress.ip_network(n, strict=False), e)
                             for n, e in p["mappings"]]
            self.port_min, self.port_max = p["port_min"], p["port_max"]
            self.timeouts = {"TCP": p["tcp"], "UDP": p["udp"], "ICMP": p.get("icmp", 30)}

    def hold(self, prefixes: list[str]) -> None:
        """Hold the IPv4 prefixes among these (no IPv6 source ever reaches this NAT)."""
        nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
        with self.lock:
            self.held = [n for n in nets if n.version == 4]

    def load(self, config: dict) -> None:
        """The state the backend starts us with (after a crash: what it knew)."""
        if config.get("policy"):
            self.set_policy(config["policy"])
        self.hold(config.get("held", []))
        self.gateways = {side: set(config.get("gateways", {}).get(side, []))
                         for side in ("inside", "outside")}
        self.scales = {int(sid): v for sid, v in config.get("scales", {}).items()}
        self.created, self.expired = config.get("created", 0), config.get("expired", 0)
        self.accepting = config.get("accepting", True)


class Watchers:
    """The connections that follow the app's changes ("watch"), and what is written to
    them: each change a line to every one, and the marker a "flush" asks for to its own.

    A change is written once the switch has done what was sent to it for the change: its
    line waits for the reply to a barrier request sent after it (one barrier in flight at a
    time, taking every line waiting by then), so that a session reported created is in the
    switch's flows, one reported ended gone from them. A marker goes after every line
    waiting when it is asked for. Lines are written by the app's event loop as it handles
    the barrier replies; ``barrier(xid)`` sends a barrier request (False: no switch, nothing
    of it is in flight). Nobody watching costs one test per change."""

    def __init__(self, barrier: Callable[[int], bool]) -> None:
        self.barrier = barrier
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        # (connection, or None for every one; line): for the next barrier, and for the
        # one in flight.
        self.queued: list[tuple[socket.socket | None, bytes]] = []
        self.sent: list[tuple[socket.socket | None, bytes]] = []
        self.in_flight: int | None = None  # the xid of the barrier request in flight
        self.xid = random.randrange(1 << 31)  # apart from the datapath's own

    def next_xid(self) -> int:
        """An xid for a request of ours (a barrier, a count), apart from the others."""
        with self.lock:
            return self._next_xid()

    def _next_xid(self) -> int:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        return self.xid

    def add(self, conn: socket.socket) -> None:
        """The connection follows from now on (answered first: no change comes before)."""
        with self.lock:
            conn.sendall(b'{"ok": true}\n')
            self.conns.append(conn)

    def remove(self, conn: socket.socket) -> None:
        with self.lock:
            if conn in self.conns:
                self.conns.remove(conn)

    def emit(self, event: str, entry: list, scales: list | None = None) -> None:
        """A change ("created" | "updated" | "deleted", the session's entry and, for TCP,
        the window scales seen so far), once what was sent to the switch for it is done
        (call it after sending that)."""
        if not self.conns:
            return
        change = {"event": event, "session": entry}
        if scales is not None:
            change["scales"] = scales
        line = (json.dumps(change) + "\n").encode()
        with self.lock:
            self.queued.append((None, line))
            self._next()

    def mark(self, conn: socket.socket, token: int, lost: bool = False,
             error: str | None = None) -> None:
        """The marker ``token`` to this connection, after every change waiting now
        (``lost``: some changes may be missing before it; ``error``: the flush failed)."""
        line = json.dumps({"flushed": token, "lost": lost, "error": error}).encode() + b"\n"
        with self.lock:
            if self.queued or self.in_flight is not None:
                self.queued.append((conn, line))
                self._next()
            else:
                self._write(conn, line)

    def answered(self, xid: int) -> None:
        """A barrier reply (the switch's own are not ours)."""
        with self.lock:
            if xid == self.in_flight:
                self._release()

    def reconnected(self) -> None:
        """A switch (again): nothing sent to one before is in flight any more."""
        with self.lock:
            if self.in_flight is not None:
                self._release()

    def _next(self) -> None:
        """A barrier request for what waits, unless one is in flight."""
        while self.in_flight is None and self.queued:
            self.in_flight = self._next_xid()
            self.sent, self.queued = self.queued, []
            try:
                sent = self.barrier(self.in_flight)
            except Exception:
                log.exception("cannot send a barrier request")
                sent = False
            if not sent:
                self._release(again=False)

    def _release(self, again: bool = True) -> None:
        """The barrier in flight is answered: what waited for it is written."""
        self.in_flight = None
        for conn, line in self.sent:
            for each in [conn] if conn is not None else list(self.conns):
                self._write(each, line)
        self.sent = []
        if again:
            self._next()

    def _write(self, conn: socket.socket, line: bytes) -> None:
        try:
            conn.sendall(line)
        except OSError:  # gone; shut here, so its reader sees the stream end
            if conn in self.conns:
                self.conns.remove(conn)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def claims(e: list) -> list[tuple]:
    """What a session [proto, src, sport, dst, dport, ext, port] holds that no other may:
    its reply tuple. An echo session's flows cannot match its identifier, so it holds its
    address pairs on both sides instead: one echo session per peer and address."""
    if e[0] == "ICMP":
        return [("ICMP", e[5], e[3]), ("ICMP-out", e[1], e[3])]
    return [(e[0], e[5], e[6], e[3], e[4])]


# -- the interfaces' addresses, from netlink ------------------------------------------------
RTMGRP_IPV4_IFADDR = 0x10  # the kernel's IPv4 address notifications (rtnl.py: the layouts)


class InterfaceAddresses:
    """The IPv4 addresses (with their prefix lengths) on some interfaces of this network
    namespace, in memory: dumped once, then kept current from the kernel's netlink
    notifications, so a question costs no process and no system call."""

    def __init__(self, ifnames: Iterable[str]) -> None:
        self.lock = threading.Lock()  # reading the notifications and applying them
        self.names = {socket.if_nametoindex(name): name for name in ifnames}
        self.found: dict[str, frozenset[ipaddress.IPv4Interface]] = {
            name: frozenset() for name in self.names.values()}
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.events.bind((0, RTMGRP_IPV4_IFADDR))  # before the dump: nothing falls between
        with self.lock:
            self._dump()
            self._drain()

    def on(self, ifname: str) -> frozenset[ipaddress.IPv4Interface]:
        return self.found.get(ifname, frozenset())

    def update(self) -> set[str]:
        """Apply the notifications the kernel has sent by now (a change made before this
        call is among them); returns the interfaces that got an address."""
        with self.lock:
            return self._drain()

    def watch(self, on_added: Callable[[str], None]) -> None:
        """Apply notifications as they come, from a thread of their own, and call
        ``on_added(ifname)`` when an interface got an address."""
        threading.Thread(target=self._watch, args=(on_added,), daemon=True,
                         name="ofnat-addresses").start()

    def _watch(self, on_added: Callable[[str], None]) -> None:
        while True:
            try:
                select.select([self.events], [], [])
                for ifname in self.update():
                    on_added(ifname)
            except Exception:  # never the end of the watch
                log.exception("reading address notifications failed")
                time.sleep(0.5)

    def _drain(self) -> set[str]:
        added: set[str] = set()
        found = {name: set(addresses) for name, addresses in self.found.items()}
        while True:
            try:
                data = self.events.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._dump()  # notifications were lost: read everything again
                found = {name: set(addresses) for name, addresses in self.found.items()}
                continue
            for kind, ifname, address in self._parse(data):
                if kind == RTM_NEWADDR and address not in found[ifname]:
                    found[ifname].add(address)
                    added.add(ifname)
                elif kind == RTM_DELADDR:
                    found[ifname].discard(address)
        self.found = {name: frozenset(addresses) for name, addresses in found.items()}
        return added

    def _dump(self) -> None:
        found: dict[str, set] = {name: set() for name in self.names.values()}
        route = Rtnl()
        try:
            for address, prefixlen, ifname in route.addresses():
                if ifname in found and ":" not in address:
                    found[ifname].add(ipaddress.IPv4Interface((address, prefixlen)))
        finally:
            route.close()
        self.found = {name: frozenset(addresses) for name, addresses in found.items()}

    def _parse(self, data: bytes) -> Iterator[tuple[int, str, ipaddress.IPv4Interface]]:
        """(message type, interface, address) of the IPv4 address messages about our
        interfaces in one netlink datagram."""
        for kind, _seq, body in messages(data):
            if kind not in (RTM_NEWADDR, RTM_DELADDR):
                continue
            family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(body)
            attrs = dict(attributes(body, IFADDRMSG.size))
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if family == socket.AF_INET and index in self.names and raw and len(raw) == 4:
                yield kind, self.names[index], ipaddress.IPv4Interface(
                    (ipaddress.IPv4Address(raw), prefixlen))
