"""The one small interface every NAT implementation meets.

The server speaks to a backend only in model terms (:class:`Session`, :class:`NatPolicy`);
how a session looks natively (a conntrack entry, a flow pair, a userspace table row) is the
backend's business and lives in exactly one place inside its module.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice, repeat
from operator import itemgetter
from typing import NamedTuple

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
NUMERIC_FIELDS = frozenset(
    f for f, t in Session.__annotations__.items() if "int" in str(t)
)


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
class SessionChanges:
    """A batch the backend applies all-or-nothing: full entries to write, keys to remove."""

    upserts: list[Session] = field(default_factory=list)
    deletes: list[SessionKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)


class NewSessions(NamedTuple):
    """Whole sessions a field at a time, as a bulk edit reads them: for each Session field
    (in order) its values, entry by entry, or None where no entry has that leaf. A backend
    may write them without making an object per session (Transaction.write_new)."""

    columns: tuple[list | None, ...]
    count: int

    def keys(self) -> list[SessionKey]:
        return list(zip(*self.columns[:len(KEY_FIELDS)], strict=True))

    def sessions(self) -> list[Session]:
        return list(map(new_session, zip(
            *[repeat(None, self.count) if c is None else c for c in self.columns],
            strict=False)))  # repeat() stops at count: the columns are all that long


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


class PresumedWrongly(Exception):
    """apply() found a session that Transaction.presume_absent() let the plan take as
    absent; it changed nothing. Plan again with a real lookup."""


# A change of the session table: ("created" | "updated" | "deleted", the session), in the
# order the NF made them. "updated": the session's TCP state or translation changed, or it
# was written over (counters and the remaining lifetime change with every packet and are
# not reported). A backend that missed changes (its NF's report overflowed) says so with
# CHANGES_LOST, whose session is None: whoever records changes must then read everything.
SessionEvent = tuple[str, Session]
EventListener = Callable[[list[SessionEvent]], None]
CHANGES_LOST = ("lost", None)


class Transaction:
    """One request's reads of some sessions and its write of them. The datastore plans an
    edit on what lookup() returns and hands the result to apply() moments later, under its
    lock; a backend whose reads are costly may reuse them (a session that changed in
    between is caught by apply() as it would be anyway: missing or existing)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        return self.backend.lookup(keys)

    def presume_absent(self, keys: Collection[SessionKey]) -> bool:
        """Whether the plan may take ``keys`` as absent without a lookup, apply() raising
        PresumedWrongly (having changed nothing) when one of them exists after all. For a
        bulk of new sessions a lookup finds nothing, and can cost as much as the writes."""
        return False

    def apply(self, changes: SessionChanges) -> None:
        self.backend.apply(changes)

    def write_new(self, new: NewSessions) -> None:
        """Write the whole sessions whose keys presume_absent() just accepted, as apply()
        would (all or nothing, PresumedWrongly when one exists after all). A backend that
        can write columns as they are overrides it."""
        self.apply(SessionChanges(upserts=new.sessions()))


class Backend(ABC):
    """A NAT instance's native state, read and written in model terms."""

    name: str = "abstract"
    _listener: EventListener | None = None

    def transaction(self) -> Transaction:
        """A lookup-then-apply unit for one request (see :class:`Transaction`)."""
        return Transaction(self)

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
        """Why this NF cannot hold ``session`` (None: it can). Asked when a candidate is
        validated, so that a migration learns before anything moves which sessions a
        target would refuse. No NAT can translate a session whose addresses are not all
        of one IP version. (Only validate asks this: the SDN NAT's apply() refuses the
        same sessions by the same check, but a write to running on the other NATs does
        not ask yet.)"""
        versions = {":" in a for a in (session.src_address, session.dst_address,
                                       session.translated_address,
                                       session.translated_dst_address) if a}
        return "its addresses are not all of one IP version" if len(versions) > 1 else None

    @abstractmethod
    def lookup(self, keys: Iterable[SessionKey]) -> dict[SessionKey, Session]:
        """The sessions among ``keys`` that exist now."""

    @abstractmethod
    def apply(self, changes: SessionChanges) -> None:
        """Apply a batch atomically; raise BackendError and change nothing if any entry fails."""

    @abstractmethod
    def apply_policy(self, policy: NatPolicy) -> None:
        """Make the NAT use this policy for new sessions."""

    @abstractmethod
    def stats(self) -> BackendStats:
        """Counters for the nat-state container."""
