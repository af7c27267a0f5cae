"""An in-memory stateful firewall: the simulated NAT's table with nothing translated, plus
the firewall's rules and pinholes (for tests and demos without namespaces)."""

from __future__ import annotations

import math
import threading
import time

from .base import BackendError, NatPolicy, Session
from .firewall import (
    L4_PROTOCOLS,
    FirewallBackend,
    FirewallPolicy,
    Pinhole,
    PinholeKey,
    check_nat_policy,
    translation_refusal,
)
from .simulated import SimulatedBackend


class SimulatedFirewallBackend(SimulatedBackend, FirewallBackend):
    name = "simulated-firewall"
    translates = False

    def __init__(self, seed_sessions: int = 0, traffic_rate: float = 0.0, **kw):
        self.firewall_policy = FirewallPolicy()
        self._pinholes: dict[PinholeKey, tuple[Pinhole, float]] = {}  # -> (it, expiry)
        self._pinhole_lock = threading.Lock()
        super().__init__(seed_sessions, traffic_rate, **kw)

    def refusal(self, session: Session) -> str | None:
        return translation_refusal(session) or super().refusal(session)

    def apply_policy(self, policy: NatPolicy) -> None:
        check_nat_policy(policy)
        super().apply_policy(policy)

    def apply_firewall_policy(self, policy: FirewallPolicy) -> None:
        self.firewall_policy = policy

    def pinholes(self) -> list[Pinhole]:
        now = time.monotonic()
        with self._pinhole_lock:
            for key in [k for k, (_, expiry) in self._pinholes.items() if expiry <= now]:
                del self._pinholes[key]
            return [p._replace(timeout=max(1, math.ceil(expiry - now)))
                    for p, expiry in self._pinholes.values()]

    def apply_pinholes(self, put: list[Pinhole], remove: list[PinholeKey]) -> None:
        for p in put:  # every one checked before any is applied
            if p.protocol not in L4_PROTOCOLS or p.timeout < 1:
                raise BackendError(f"pinhole {p.key}: a TCP or UDP flow for at least 1 s",
                                   None, "invalid")
        now = time.monotonic()
        with self._pinhole_lock:
            for key in remove:
                self._pinholes.pop(tuple(key), None)
            for p in put:
                self._pinholes[p.key] = (p, now + p.timeout)
