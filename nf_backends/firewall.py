"""What a stateful firewall adds to the interface every NF implementation meets.

A firewall is a :class:`~nfmig.nf_backends.base.Backend` whose sessions are its tracked
connections with no translation (every ``translated_*`` field None) and whose NatPolicy
gives only interfaces, gateway addresses and timeouts. On top of that it takes the
per-subscriber rules (:class:`FirewallPolicy`, the model's firewall-policy) and keeps
pinholes (:class:`Pinhole`, the model's pinhole list): dynamic entries that admit new
inbound connections from one remote to one local port for a while.

The rules every firewall enforces (yang/nfmig-firewall): packets of a tracked connection
pass; a new outbound connection opens if its source is a subscriber's and the subscriber's
outbound rules allow it; a new inbound connection opens if an inbound service of the
subscriber it reaches, or a pinhole, admits it; anything else is dropped, and TCP is
tracked strictly (a segment that neither belongs to a connection nor opens one with a SYN
is dropped).
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

from .base import BackendError, NatPolicy, Session

L4_PROTOCOLS = ("TCP", "UDP")


@dataclass(frozen=True)
class OutboundRule:
    """A kind of outbound connection a subscriber may open; None matches anything."""

    name: str
    protocol: str | None = None
    destination_prefix: str | None = None
    destination_port: int | None = None


@dataclass(frozen=True)
class InboundService:
    """A subscriber's port reachable from outside; no remote prefix: from anyone."""

    protocol: str
    port: int
    remote_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subscriber:
    name: str
    prefixes: tuple[str, ...]
    outbound: str = "allow-all"  # "allow-all" | "listed"
    outbound_rules: tuple[OutboundRule, ...] = ()
    inbound_services: tuple[InboundService, ...] = ()

    def owns(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(p, strict=False) for p in self.prefixes)


@dataclass
class FirewallPolicy:
    """The firewall-policy container in Python terms."""

    subscribers: list[Subscriber] = field(default_factory=list)

    def subscriber_of(self, address: str) -> Subscriber | None:
        return next((s for s in self.subscribers if s.owns(address)), None)


PinholeKey = tuple  # (protocol, remote_address, local_address, local_port)


class Pinhole(NamedTuple):
    """One pinhole entry, leaf for field in the model's order; ``timeout`` the remaining
    seconds."""

    protocol: str
    remote_address: str
    local_address: str
    local_port: int
    reason: str = "related"
    timeout: int = 60

    @property
    def key(self) -> PinholeKey:
        return self[:4]


def translation_refusal(session: Session) -> str | None:
    """Why a firewall cannot hold ``session`` (it translates nothing), or None."""
    if any(v is not None for v in (session.translated_address, session.translated_port,
                                   session.translated_dst_address,
                                   session.translated_dst_port)):
        return "a firewall translates nothing: the session has translated leaves"
    return None


def check_nat_policy(policy: NatPolicy) -> None:
    """A firewall's nat-policy: interfaces, gateway addresses, timeouts; no translation."""
    if policy.external_address or policy.address_mapping:
        raise BackendError("a firewall translates nothing: its nat-policy has no "
                           "external-address or address-mapping", None, "invalid")


class FirewallBackend(ABC):
    """The part of a firewall backend beyond :class:`Backend` (mixed into one)."""

    nf = "firewall"

    @abstractmethod
    def apply_firewall_policy(self, policy: FirewallPolicy) -> None:
        """Put ``policy`` in force, replacing the one before, all or nothing."""

    @abstractmethod
    def pinholes(self) -> list[Pinhole]:
        """Every pinhole now, with its remaining lifetime (expired ones are gone)."""

    @abstractmethod
    def apply_pinholes(self, put: list[Pinhole], remove: list[PinholeKey]) -> None:
        """Open or renew ``put`` (a pinhole already there takes the new reason and
        timeout) and close ``remove``, all or nothing: a BackendError leaves every pinhole
        as it was. Removing a pinhole that is not there is not an error."""
