"""The one small interface every NAT implementation meets.

The server speaks to a backend only in model terms (:class:`Session`, :class:`NatPolicy`);
how a session looks natively (a conntrack entry, a flow pair, a userspace table row) is the
backend's business and lives in exactly one place inside its module.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .batch import SessionBatch

# The model's key of a nat-session entry, in key order.
KEY_FIELDS = ("protocol", "src_address", "src_port", "dst_address", "dst_port")
# A session's key leaves, the first of its fields: Session.key, callable in C by bulk work.
session_key = itemgetter(slice(0, len(KEY_FIELDS)))

# The model's protocol enumeration: each value is its IANA protocol number.
PROTOCOL_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "ICMPv6": 58}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}
# The model's tcp-state enumeration, in the order of the kernel's TCP conntrack states.
TCP_STATES = ("none", "syn-sent", "syn-recv", "established", "fin-wait", "close-wait",
              "last-ack", "time-wait", "close", "syn-sent2")
TCP_STATE_NUMBERS = {name: number for number, name in enumerate(TCP_STATES)}


class Session(NamedTuple):
    """One nat-session entry, field for leaf, in the YANG model's order.

    Values are Python natives (str for enums and addresses, int for numbers); None means the
    leaf is absent.
    """

    protocol: str
    src_address: str
    src_port: int
    dst_address: str
    dst_port: int
    translated_address: str | None = None
    translated_port: int | None = None
    translated_dst_address: str | None = None
    translated_dst_port: int | None = None
    tcp_state: str | None = None
    src_window_scale: int | None = None
    dst_window_scale: int | None = None
    timeout: int | None = None
    orig_packets: int | None = None
    orig_bytes: int | None = None
    reply_packets: int | None = None
    reply_bytes: int | None = None

    key = property(session_key)  # (protocol, src_address, src_port, dst_address, dst_port)


SessionKey = tuple  # (protocol, src_address, src_port, dst_address, dst_port)
SESSION_FIELDS: tuple[str, ...] = Session._fields
# A Session made in C from a tuple of every field: bulk work makes one per entry.
new_session = partial(tuple.__new__, Session)
SESSION_BATCH = 256  # sessions per list of Backend.session_batches (by default)


@dataclass
class Timeouts:
    tcp_established: int = 432000
    tcp_transitory: int = 120
    udp: int = 120
    icmp: int = 30


@dataclass(frozen=True)
class AddressMapping:
    """One address-mapping entry: sources in inside_prefix go out as external_address."""

    inside_prefix: str
    external_address: str


@dataclass(frozen=True)
class GatewayAddress:
    """One gateway-address entry: an address the instance answers for on one interface."""

    address: str
    interface: str  # "inside" | "outside"
    prefix_length: int

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    @property
    def with_prefixlen(self) -> str:
        return f"{self.address}/{self.prefix_length}"


@dataclass
class NatPolicy:
    """The nat-policy container in Python terms (defaults as in the model)."""

    inside_interface: str | None = None
    outside_interface: str | None = None
    inside_prefix: list[str] = field(default_factory=list)
    external_address: list[str] = field(default_factory=list)
    address_mapping: list[AddressMapping] = field(default_factory=list)
    gateway_address: list[GatewayAddress] = field(default_factory=list)
    port_min: int = 1024
    port_max: int = 65535
    timeouts: Timeouts = field(default_factory=Timeouts)

    def mappings_most_specific_first(self) -> list[AddressMapping]:
        """The address mappings in the order they must be tried: longest prefix first."""
        def prefix_length(mapping: AddressMapping) -> int:
            return ipaddress.ip_network(mapping.inside_prefix, strict=False).prefixlen
        return sorted(self.address_mapping, key=prefix_length, reverse=True)

    def timeout_for(self, protocol: str, tcp_state: str | None) -> int:
        if protocol == "TCP":
            if tcp_state in (None, "established"):
                return self.timeouts.tcp_established
            return self.timeouts.tcp_transitory
        if protocol == "UDP":
            return self.timeouts.udp
        return self.timeouts.icmp


@dataclass
class BackendStats:
    implementation: str
    session_count: int
    sessions_created: int = 0
    sessions_expired: int = 0
    sessions_imported: int = 0


class BackendError(Exception):
    """A batch was refused; nothing of it was applied.

    ``key`` names the entry that failed (None when the failure is not about one entry) and
    ``reason`` is the implementation's own word for why (e.g. "exists", "port taken").
    """

    def __init__(self, message: str, key: SessionKey | None = None, reason: str = "failed"):
        super().__init__(message)
        self.key = key
        self.reason = reason


# A change of the session table: ("created" | "updated" | "deleted", the session), in the
# order the NF made them. "updated": the session's TCP state or translation changed, or it
# was written over (counters and the remaining lifetime change with every packet and are
# not reported). A backend that missed changes (its NF's report overflowed) says so with
# CHANGES_LOST, whose session is None: whoever records changes must then read everything.
SessionEvent = tuple[str, Session]
EventListener = Callable[[list[SessionEvent]], None]
CHANGES_LOST = ("lost", None)


def _family_refusal(s: Session) -> str | None:
    v6 = ":" in s.src_address
    if any((":" in a) != v6 for a in (s.dst_address, s.translated_address,
                                       s.translated_dst_address) if a):
        return "its addresses are not all of one IP version"
    if s.protocol == ("ICMP" if v6 else "ICMPv6"):
        return f"{s.protocol} does not run over IPv{6 if v6 else 4}"
    return None


def refusals(backend: Backend, sessions: list[Session]) -> Iterator[BackendError]:
    """A BackendError for each of ``sessions`` the backend cannot hold, naming it. Whole
    columns are looked at first: a bulk of one IP version (the usual case) needs no look at
    each session."""
    if not sessions or (type(backend).refusal is Backend.refusal and _one_version(sessions)):
        return
    for session in sessions:
        why = backend.refusal(session)
        if why is not None:
            yield BackendError(f"this NAT cannot hold the session: {why}", session.key,
                               "not supported")


def refuse_unholdable(backend: Backend, sessions: list[Session]) -> None:
    """Raise the first of :func:`refusals`, before a write changes anything."""
    refused = next(refusals(backend, sessions), None)
    if refused is not None:
        raise refused


def _one_version(sessions: list[Session]) -> bool:
    """Whether every address of every session is of one IP version and no ICMP kind
    crosses it: then no session has a family refusal."""
    v6: bool | None = None
    for index in (1, 3, 5, 7):  # src, dst, translated and translated_dst address
        kinds = {":" in a for a in map(itemgetter(index), sessions) if a is not None}
        if len(kinds) > 1 or (v6 is not None and kinds and kinds != {v6}):
            return False
        if kinds:
            v6 = kinds.pop()
    return ("ICMP" if v6 else "ICMPv6") not in set(map(itemgetter(0), sessions))


class Backend(ABC):
    """A NAT instance's native state, read and written in model terms."""

    name: str = "abstract"
    _listener: EventListener | None = None

    def watch(self, listener: EventListener | None) -> None:
        """From now on report every change of the session table to ``listener``, in batches
        and from any thread; None stops the reports. Watching costs, so the server only
        watches while someone needs the changes (a subscriber, a change record). The
        listener must not call the backend: it may be called under the backend's locks."""
        self._listener = listener

    def flush_changes(self) -> None:  # noqa: B027 - optional hook
        """A barrier: report, before returning, every change the NF made up to now (that
        watch() would report). The default suits a backend whose reports are made
        synchronously with its changes. One that cannot tell when its NF's reports are in
        raises NotImplementedError: the server then refuses change tracking, and the
        migrator reads the selection again instead."""

    def _report(self, events: list[SessionEvent]) -> None:
        listener = self._listener
        if listener is not None and events:
            listener(events)

    @abstractmethod
    def hold_new_sessions(self, prefixes: list[str], timeout: float | None = None) -> None:
        """Create no new session for sources in ``prefixes`` (an empty list releases
        them); existing sessions keep flowing. This is the migration window: a session
        opened during a move would otherwise be left behind.

        ``timeout``: seconds after which the hold ends by itself even if nobody releases
        it (the server that set it may be gone by then); None holds until released."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin serving (threads, daemons). Called once by the server."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Release everything start() acquired."""

    @abstractmethod
    def sessions(self) -> Iterator[Session]:
        """A consistent snapshot of every session, in any order."""

    def session_batches(self) -> Iterator[list[Session]]:
        """sessions() in lists: the unit a bulk reader formats at once. A backend that
        reads its table in pieces yields each piece as it reads it."""
        sessions = self.sessions()
        while batch := list(islice(sessions, SESSION_BATCH)):
            yield batch

    def refusal(self, session: Session) -> str | None:
        """Why this NF cannot hold ``session`` (None: it can). Validate asks it of every
        staged session, so that a migration learns before anything moves which sessions a
        target would refuse; every write to running refuses the same sessions (see
        refuse_unholdable). No NAT can translate a session whose addresses are not all of
        one IP version, nor ICMP over IPv6 or ICMPv6 over IPv4."""
        return _family_refusal(session)

    @abstractmethod
    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        """The sessions among ``keys`` that exist now."""

    @abstractmethod
    def apply(self, batch: SessionBatch) -> None:
        """Apply ``batch`` all or nothing: settle each edit on what the NF holds under its
        key (:meth:`SessionEdit.result`, learnt from the NF itself however it can), and
        raise BackendError, having changed nothing, if any entry fails or cannot be held
        (refuse_unholdable)."""

    @abstractmethod
    def apply_policy(self, policy: NatPolicy) -> None:
        """Make the NAT use this policy for new sessions."""

    @abstractmethod
    def stats(self) -> BackendStats:
        """Counters for the nat-state container."""
