"""A userspace NAT: its own session table plus a synthetic traffic generator.

Needs no privileges, so it serves demos, unit tests and benchmarks. Its native table is
keyed by packed integers like a kernel's, not by the model's strings: the conversion in
:func:`_to_session` / :func:`_from_session` is this backend's whole mapping to the model.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator

from .base import (
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    TCP_STATE_NUMBERS,
    TCP_STATES,
    Backend,
    BackendError,
    BackendStats,
    NatPolicy,
    Session,
    SessionEvent,
    SessionKey,
    refuse_unholdable,
)
from .batch import SessionBatch

log = logging.getLogger(__name__)

# TEST-NET-1 addresses, used when the policy names none: four of them hold 250k sessions.
DEFAULT_EXTERNAL = ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")

# Native row layout: [nat_ip, nat_port, dnat_ip, dnat_port, tcp_state, wscale_o, wscale_r,
#                     expires_at, o_pkts, o_bytes, r_pkts, r_bytes]
NAT_IP, NAT_PORT, DNAT_IP, DNAT_PORT, STATE, WS_O, WS_R, EXPIRES, OP, OB, RP, RB = range(12)


_INT_OF: dict[str, int] = {}


def _ip(text: str | None) -> int | None:
    if text is None:
        return None
    value = _INT_OF.get(text)
    if value is None:
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        value = int.from_bytes(socket.inet_pton(family, text), "big")
        if len(_INT_OF) < 1 << 20:
            _INT_OF[text] = value
    return value


_TEXT_OF: dict[tuple[int, bool], str] = {}


def _ip_text(value: int | None, v6: bool) -> str | None:
    if value is None:
        return None
    text = _TEXT_OF.get((value, v6))
    if text is None:
        # The C library's form, as libyang prints it (::ffff:10.0.0.1 stays dotted).
        text = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big")) if v6 else \
            socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
        if len(_TEXT_OF) < 1 << 20:
            _TEXT_OF[(value, v6)] = text
    return text


def _native_key(key: SessionKey) -> tuple:
    proto, src, sport, dst, dport = key
    # Once per session of every bulk edit: the cache is asked first, without _ip's call.
    return (PROTOCOL_NUMBERS[proto], _INT_OF.get(src) or _ip(src), sport,
            _INT_OF.get(dst) or _ip(dst), dport, ":" in src)


def _to_session(nkey: tuple, row: list, now: float) -> Session:
    proto, src, sport, dst, dport, v6 = nkey
    state = row[STATE]
    return Session(
        PROTOCOL_NAMES[proto], _ip_text(src, v6), sport, _ip_text(dst, v6), dport,
        _ip_text(row[NAT_IP], v6), row[NAT_PORT],
        _ip_text(row[DNAT_IP], v6), row[DNAT_PORT],
        None if state is None else TCP_STATES[state],
        row[WS_O], row[WS_R],
        max(0, int(row[EXPIRES] - now)),
        row[OP], row[OB], row[RP], row[RB],
    )


def _from_session(s: Session, now: float, policy: NatPolicy) -> list:
    timeout = s.timeout if s.timeout is not None else policy.timeout_for(s.protocol, s.tcp_state)
    return [
        _ip(s.translated_address), s.translated_port,
        _ip(s.translated_dst_address), s.translated_dst_port,
        None if s.tcp_state is None else TCP_STATE_NUMBERS[s.tcp_state],
        s.src_window_scale, s.dst_window_scale,
        now + timeout,
        s.orig_packets or 0, s.orig_bytes or 0, s.reply_packets or 0, s.reply_bytes or 0,
    ]


class SimulatedBackend(Backend):
    """An in-memory NAT table; ``traffic_rate`` new sessions per second when > 0."""

    name = "simulated"
    translates = True  # a firewall's table (simulated_firewall) holds no translations

    def __init__(self, seed_sessions: int = 0, traffic_rate: float = 0.0, tick: float = 0.5,
                 rng_seed: int | None = None):
        self._table: dict[tuple, list] = {}
        # (protocol, nat_ip, nat_port) -> native key of the session holding that endpoint
        self._endpoints: dict[tuple[int, int, int], tuple] = {}
        self._lock = threading.RLock()
        # Held from a change of the table until it is reported (taken before _lock), so
        # that flush_changes() is a barrier without reporting under the table's lock.
        self._reporting = threading.Lock()
        self._policy = NatPolicy()
        # (is IPv6, network, netmask, external) per address mapping, longest prefix first
        self._mappings: list[tuple[bool, int, int, int]] = []
        # (is IPv6, network, netmask) per held prefix: no new sessions from there
        self._held: list[tuple[bool, int, int]] = []
        self._held_until: float | None = None  # time.monotonic() when the hold ends
        self._traffic_rate = traffic_rate
        self._tick = tick
        self._rng = random.Random(rng_seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = self._expired = self._imported = 0
        if seed_sessions:
            self.seed(seed_sessions)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="simulated-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    # -- Backend interface -------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        now = time.monotonic()
        with self._lock:
            items = list(self._table.items())
        return (_to_session(k, row, now) for k, row in items)

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        now = time.monotonic()
        found = {}
        with self._lock:
            for key in keys:
                nkey = _native_key(key)
                row = self._table.get(nkey)
                if row is not None:
                    found[key] = _to_session(nkey, row, now)
        return found

    def apply(self, batch: SessionBatch) -> None:
        now = time.monotonic()
        with self._reporting:
            with self._lock:
                held = {}
                for key in batch.keys():
                    nkey = _native_key(key)
                    row = self._table.get(nkey)
                    if row is not None:
                        held[key] = _to_session(nkey, row, now)
                writes, gone = batch.results(held)
                refuse_unholdable(self, writes)
                deletes = [_native_key(k) for k in gone]
                upserts = [(_native_key(s.key), _from_session(s, now, self._policy), s)
                           for s in writes]
                self._check_ports(upserts, set(deletes))
                events = []
                for nkey in deletes:
                    row = self._table.pop(nkey)
                    self._release(nkey, row)
                    events.append(("deleted", _to_session(nkey, row, now)))
                for nkey, row, session in upserts:
                    old = self._table.get(nkey)
                    if old is not None:
                        self._release(nkey, old)
                    events.append(("created" if old is None else "updated", session))
                    self._table[nkey] = row
                    self._claim(nkey, row)
                self._imported += len(upserts)
            self._report(events)

    def flush_changes(self) -> None:
        """Changes are made and reported in one hold of the reporting lock (the table's
        own is let go before the report): once it is ours, every tick or batch before
        has been reported."""
        with self._reporting:
            pass

    def apply_policy(self, policy: NatPolicy) -> None:
        mappings = []
        for mapping in policy.mappings_most_specific_first():
            network = ipaddress.ip_network(mapping.inside_prefix, strict=False)
            mappings.append((network.version == 6, int(network.network_address),
                             int(network.netmask), _ip(mapping.external_address)))
        with self._lock:
            self._policy = policy
            self._mappings = mappings

    def hold_new_sessions(self, prefixes: list[str], timeout: float | None = None) -> None:
        held = []
        for prefix in prefixes:
            network = ipaddress.ip_network(prefix, strict=False)
            held.append((network.version == 6, int(network.network_address),
                         int(network.netmask)))
        with self._lock:
            self._held = held
            self._held_until = None if timeout is None else time.monotonic() + timeout

    def _is_held(self, src: int, v6: bool, now: float) -> bool:
        if not self._held or (self._held_until is not None and now >= self._held_until):
            return False
        return any(is_v6 == v6 and src & mask == net for is_v6, net, mask in self._held)

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(self.name, len(self._table), self._created, self._expired,
                                self._imported)

    # -- native helpers ----------------------------------------------------------------
    def _check_ports(self, upserts: list, deleting: set) -> None:
        """Refuse a batch that would give one external endpoint to two sessions."""
        claimed: dict[tuple, tuple] = {}
        for nkey, row, s in upserts:
            if row[NAT_IP] is None:
                continue
            endpoint = (nkey[0], row[NAT_IP], row[NAT_PORT])
            if endpoint in claimed and claimed[endpoint] != nkey:
                raise BackendError(
                    f"translated endpoint {s.translated_address}:{s.translated_port} is given "
                    f"to two sessions in this batch", s.key, "port taken")
            claimed[endpoint] = nkey
            owner = self._endpoints.get(endpoint)
            if owner is not None and owner != nkey and owner not in deleting:
                raise BackendError(
                    f"translated endpoint {s.translated_address}:{s.translated_port} is in "
                    f"use by another session", s.key, "port taken")

    def _claim(self, nkey: tuple, row: list) -> None:
        if row[NAT_IP] is not None:
            self._endpoints[(nkey[0], row[NAT_IP], row[NAT_PORT])] = nkey

    def _release(self, nkey: tuple, row: list) -> None:
        if row[NAT_IP] is not None:
            self._endpoints.pop((nkey[0], row[NAT_IP], row[NAT_PORT]), None)

    def _externals(self, src: int, v6: bool) -> list[int]:
        """The external addresses a new session from ``src`` may use: the one its address
        mapping names, else the pool in a random order (spreads sessions over it)."""
        for is_v6, network, netmask, external in self._mappings:
            if is_v6 == v6 and src & netmask == network:
                return [external]
        addresses = [_ip(a) for a in self._policy.external_address or DEFAULT_EXTERNAL]
        self._rng.shuffle(addresses)
        return addresses

    def _allocate_port(self, proto: int, nat_ip: int) -> int | None:
        """A free external port, never one held by another session (imported ones too)."""
        lo, hi = self._policy.port_min, self._policy.port_max
        for _ in range(64):
            port = self._rng.randint(lo, hi)
            if (proto, nat_ip, port) not in self._endpoints:
                return port
        for port in range(lo, hi + 1):
            if (proto, nat_ip, port) not in self._endpoints:
                return port
        return None

    def _open_session(self, now: float, index: int) -> tuple | None:
        """Create one TCP session as traffic from a subscriber would; its native key, or
        None when the 5-tuple exists already or its source is held."""
        src = (10 << 24) | (index % 0xFFFF + 1)
        sport = 1024 + index % 60000
        dst = (198 << 24) | (51 << 16) | (100 << 8) | (1 + index % 250)
        nkey = (6, src, sport, dst, 443, False)
        if nkey in self._table or self._is_held(src, False, now):
            return None
        nat_ip = port = None
        for nat_ip in self._externals(src, False) if self.translates else ():
            port = self._allocate_port(6, nat_ip)
            if port is not None:
                break
        else:
            if self.translates:
                raise BackendError("every external address and port is in use", None,
                                   "table full")
        timeout = self._policy.timeouts.tcp_established
        row = [nat_ip, port, None, None, TCP_STATE_NUMBERS["established"], 7, 7, now + timeout,
               3, 180, 2, 120]
        self._table[nkey] = row
        self._claim(nkey, row)
        return nkey

    def seed(self, count: int) -> None:
        """Fill the table with ``count`` established sessions (distinct 5-tuples)."""
        now = time.monotonic()
        with self._lock:
            made, index = 0, len(self._table)
            while made < count:
                if self._open_session(now, index):
                    made += 1
                index += 1

    def _run(self) -> None:
        carry = 0.0
        index = 1 << 20
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._reporting:
                with self._lock:
                    events = self._expire(now)
                    carry += self._traffic_rate * self._tick
                    while carry >= 1:
                        carry -= 1
                        index += 1
                        try:
                            nkey = self._open_session(now, index)
                        except BackendError:
                            carry = 0.0  # no free port: traffic waits for expiries
                            break
                        if nkey is not None:
                            self._created += 1
                            events.append(("created",
                                           _to_session(nkey, self._table[nkey], now)))
                    if self._traffic_rate:
                        self._advance_counters(now)
                self._report(events)

    def _expire(self, now: float) -> list[SessionEvent]:
        dead = [k for k, row in self._table.items() if row[EXPIRES] <= now]
        events = []
        for k in dead:
            row = self._table.pop(k)
            self._release(k, row)
            events.append(("deleted", _to_session(k, row, now)))
        self._expired += len(dead)
        return events

    def _advance_counters(self, now: float) -> None:
        """Some sessions see packets: counters grow and their idle timer restarts."""
        if not self._table:
            return
        keys = self._rng.sample(list(self._table), min(len(self._table), 32))
        for k in keys:
            row = self._table[k]
            row[OP] += 1
            row[OB] += 100
            row[RP] += 1
            row[RB] += 1400
            row[EXPIRES] = now + self._policy.timeouts.tcp_established
