"""The parts of a migration: its options, its failure, and what it knows about each end
(connection, capabilities, locks, and how far the sessions got there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .endpoints import Connection, Credentials, Endpoint
from .negotiate import Facts
from .report import EndpointReport
from .selection import Entry, Selection

if TYPE_CHECKING:  # switchover.py needs this module's errors
    from .switchover import GatewayAddress


@dataclass
class Options:
    """How a migration runs; the defaults suit a live migration."""

    keep_source: bool = False  # copy: the sources keep the sessions, nothing is switched
    finish: bool = False  # after keep_source and a switch of one's own: delete on the sources
    partial: bool = False  # sessions a target cannot hold stay on their source; move the rest
    with_policy: bool = False  # a target whose policy lacks the sessions' addresses gets the
    # source's (without its gateway addresses) in the same commit
    # what moves the traffic: "gateway" (the gateway-address entries), "none", or a command
    switchover: str = "gateway"
    dry_run: bool = False  # everything up to validate on the targets, then discard
    freeze: bool = True  # hold the selection's new sessions on the sources (rpc freeze)
    freeze_timeout: int = 60  # seconds after which a source thaws by itself
    confirm_timeout: int = 120  # seconds a confirmed commit waits for its confirmation
    migration_id: str | None = None
    require_revision: str | None = None  # of nfmig-nat, on every end
    require_features: tuple[str, ...] = ()  # of nfmig-nat, on every end
    # the model the sessions are read and written through: "nfmig-nat" or "ietf-nat"
    # (RFC 8512 mapping-entries, client/ietf_nat.py)
    model: str = "nfmig-nat"
    credentials: Credentials = field(default_factory=Credentials)
    rpc_timeout: float = 600
    connect_timeout: float = 30
    vm_image_bytes: int | None = None  # for the report's comparison with moving the VM
    vm_memory_bytes: int | None = None
    on_phase: Callable[[str, str | None], None] | None = None  # as each phase starts
    # Entered just before the last catch-up with the sources' changes (precopy) and left
    # once the sources are thawed: lets a caller running many migrations bound how many are
    # in their freeze window at once. None: no gate.
    window: Callable[[], AbstractContextManager[object]] | None = None


class MigrationError(Exception):
    """Why a migration stopped; ``result`` is "refused" when no end was changed (a target's
    candidate a streamed copy had staged is discarded)."""

    def __init__(self, reason: str, result: str = "failed", conflicts: Sequence[str] = ()):
        super().__init__(reason)
        self.reason = reason
        self.result = result
        self.conflicts = list(conflicts)


@dataclass(eq=False)
class End:
    """One NF instance taking part, as the migration tracks it."""

    endpoint: Endpoint
    role: str
    report: EndpointReport
    conn: Connection | None = None
    facts: Facts | None = None
    locked: list[str] = field(default_factory=list)
    unreachable: bool = False

    def __str__(self) -> str:
        return f"{self.role} {self.endpoint}"


@dataclass(eq=False)
class SourceEnd(End):
    """A source: what was read from it, whether it is frozen, whether it deleted them."""

    entries: list[Entry] = field(default_factory=list)  # selected, as read
    frozen: bool = False
    tracking: bool = False  # keeps a change record for this migration (track-changes)
    delete: str = "none"  # none | done
    gateways: list[GatewayAddress] = field(default_factory=list)  # to move to the target
    _index: dict[tuple, Entry] | None = None  # entries by key, while it is entries' own
    _indexed: list[Entry] | None = None

    def index(self) -> dict[tuple, Entry]:
        """``entries`` by key, made once and kept while ``entries`` is the same list (the
        rounds of a delta look up a few keys each, inside the window)."""
        if self._index is None or self._indexed is not self.entries:
            self._index, self._indexed = {e.key: e for e in self.entries}, self.entries
        return self._index

    def set_entries(self, entries: list[Entry]) -> None:
        self.entries, self._index, self._indexed = entries, None, None


@dataclass(eq=False)
class TargetEnd(End):
    """A target: what it gets, what it held before under those keys, where its commit is."""

    selection: Selection = field(default_factory=Selection.all)
    entries: list[tuple[Entry, SourceEnd]] = field(default_factory=list)  # to write, by source
    before: dict[tuple, Entry] = field(default_factory=dict)  # held before, by key
    staged: bool = False  # candidate holds our edit
    # none | unknown (a reply was lost) | pending (confirmed, not yet confirmed) |
    # confirming (its confirmation sent) | done
    commit: str = "none"
    gateways: list[GatewayAddress] = field(default_factory=list)  # written by the switchover


def failure_after_commit(what: str) -> MigrationError:
    """A failure past the commit point: the targets keep every session."""
    return MigrationError(f"{what}; every session is on its target, and those named in the "
                          "warnings are on their source too: run the same migration again "
                          "to finish")
