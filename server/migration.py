"""The model's migration operations: rpc freeze and thaw (the migration window on a source),
rpc announce-migration (migration events for every subscriber), rpc track-changes and
changes (which sessions changed since a migration began copying them; the records are
change_tracking.py's), and rpc session-digest (a count and digest of the sessions, by which a
migrator checks what a target holds without reading it back).

A window holds new sessions of its selection in the backend until thawed or timed out; the
timeout is the server's, so a migrator that vanishes never leaves the NAT frozen, and the
backend's too (the hold is set to end when the longest open window does), so a server that
dies with a window open does not either.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple
from xml.sax.saxutils import escape

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, Backend, BackendError, Session

from nfmig.digest import digest_sum, digest_text

from . import errors
from .change_tracking import ChangeTracking
from .errors import RpcError
from .notifications import NotificationHub
from .schema import Schema, YangError
from .session_codec import sessions_to_xml

log = logging.getLogger(__name__)

EVERY_SOURCE = ["0.0.0.0/0", "::/0"]
DEFAULT_WINDOW = 60  # seconds, as the model's default for freeze/timeout
DEFAULT_RECORD = 300  # seconds, as the model's default for track-changes/timeout


class _Window(NamedTuple):
    prefixes: list[str]
    timer: threading.Timer
    deadline: float  # time.monotonic() when it times out


class MigrationWindows:
    """Open freeze windows by migration-id, and what the backend holds because of them."""

    def __init__(self, backend: Backend, hub: NotificationHub, schema: Schema, namespace: str):
        self.backend = backend
        self.hub = hub
        self.schema = schema
        self.namespace = namespace
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    # -- operations --------------------------------------------------------------------
    def freeze(self, _session, op: etree._Element) -> str:
        request = self._input(op)
        migration_id = request["migration-id"]
        prefixes = request.get("source-prefix") or EVERY_SOURCE
        timeout = int(request.get("timeout", DEFAULT_WINDOW))
        deadline = time.monotonic() + timeout
        timer = threading.Timer(timeout, self._expire, args=(migration_id,))
        timer.daemon = True
        with self._lock:
            previous = self._windows.get(migration_id)
            self._windows[migration_id] = _Window(prefixes, timer, deadline)
            try:
                self._hold()
            except BackendError as exc:
                self._restore(migration_id, previous)
                raise errors.operation_failed(f"the NAT cannot hold new sessions: {exc}") \
                    from None
            if previous is not None:
                previous.timer.cancel()
            timer.start()
        log.info("migration %s: new sessions from %s held for at most %d s", migration_id,
                 ", ".join(prefixes), timeout)
        return "<ok/>"

    def thaw(self, _session, op: etree._Element) -> str:
        migration_id = self._input(op)["migration-id"]
        self._close(migration_id, "thawed")
        return "<ok/>"

    def announce(self, _session, op: etree._Element) -> str:
        """Publish the announcement as the migration-event notification, leaf for leaf."""
        request = self._input(op)
        leaves = "".join(etree.tostring(child, encoding="unicode", with_tail=False)
                         for child in op if isinstance(child.tag, str))
        log.info("migration %s: %s as %s%s", request["migration-id"], request["event"],
                 request["role"], f" ({request['reason']})" if request.get("reason") else "")
        self.hub.publish(f'<migration-event xmlns="{self.namespace}">{leaves}'
                         "</migration-event>")
        return "<ok/>"

    # -- windows -----------------------------------------------------------------------
    def close_all(self) -> None:
        with self._lock:
            for window in self._windows.values():
                window.timer.cancel()
            self._windows.clear()

    def _expire(self, migration_id: str) -> None:
        log.warning("migration %s: window timed out; new sessions flow again", migration_id)
        try:
            self._close(migration_id, "timed out")
        except RpcError:
            return  # logged by _close
        self.hub.publish(migration_event(
            self.namespace, **{"migration-id": migration_id, "role": "source",
                               "event": "failed", "reason": "the migration window timed out "
                               "before the migrator thawed it; new sessions flow again"}))

    def _close(self, migration_id: str, how: str) -> None:
        with self._lock:
            window = self._windows.pop(migration_id, None)
            if window is None:
                return  # thawing a closed window is fine: migrators thaw on every way out
            window.timer.cancel()
            try:
                self._hold()
            except BackendError as exc:
                log.error("migration %s: %s, but the NAT still holds its sessions: %s",
                          migration_id, how, exc)
                raise errors.operation_failed(f"the NAT cannot release the hold: {exc}") \
                    from None
        log.info("migration %s: window %s", migration_id, how)

    def _restore(self, migration_id: str, previous: _Window | None) -> None:
        if previous is None:
            self._windows.pop(migration_id, None)
        else:
            self._windows[migration_id] = previous

    def _hold(self) -> None:
        """Hold what the open windows select, until the last of them times out: should
        this server die meanwhile, the backend ends the hold by itself then."""
        windows = self._windows.values()
        held = sorted({p for window in windows for p in window.prefixes})
        last = max((window.deadline for window in windows), default=None)
        timeout = None if last is None else max(0.0, last - time.monotonic())
        self.backend.hold_new_sessions(held, timeout)

    # -- input -------------------------------------------------------------------------
    def _input(self, op: etree._Element) -> dict:
        return rpc_input(self.schema, op)


class MigrationChanges:
    """rpc track-changes and changes: a record per migration of the sessions that changed
    since it began, and its reading as whole sessions (those that exist now, as they are
    now) and ended keys."""

    def __init__(self, backend: Backend, tracking: ChangeTracking, schema: Schema,
                 namespace: str):
        self.backend = backend
        self.tracking = tracking
        self.schema = schema
        self.namespace = namespace

    def track_changes(self, _session, op: etree._Element) -> str:
        request = rpc_input(self.schema, op)
        migration_id = request["migration-id"]
        try:
            self.tracking.start(migration_id, request.get("source-prefix") or [],
                                int(request.get("timeout", DEFAULT_RECORD)))
        except NotImplementedError as exc:
            raise errors.not_supported(f"this NAT cannot track changes ({exc}); read the "
                                       "selection again instead", type="application") from None
        except (BackendError, OSError) as exc:
            raise errors.operation_failed(f"the NAT's changes cannot be followed: {exc}") \
                from None
        return "<ok/>"

    def changes(self, _session, op: etree._Element) -> str:
        request = rpc_input(self.schema, op)
        migration_id = request["migration-id"]
        try:
            recorded = self.tracking.read(migration_id, stop="stop" in request,
                                          restart="restart" in request)
        except KeyError:
            raise errors.invalid_value(
                f"no change record for migration {migration_id!r}: never tracked, stopped, "
                "or timed out (track-changes starts one)",
                info={"bad-element": "migration-id"}) from None
        except (NotImplementedError, OSError, BackendError) as exc:
            raise errors.operation_failed(f"the NAT's changes cannot be read: {exc}") \
                from None
        if recorded.overflow:
            return f'<overflow xmlns="{self.namespace}"/>'
        try:
            current = self.backend.lookup(recorded.keys) if recorded.keys else {}
        except BackendError as exc:
            raise errors.operation_failed(f"the NAT cannot read its sessions: {exc}") \
                from None
        ended = sorted(recorded.keys.difference(current))
        body = changes_xml(self.namespace, (current[k] for k in sorted(current)), ended)
        return body or "<ok/>"  # RFC 7950 §7.14.4: no output parameters, <ok/>


class SessionDigests:
    """rpc session-digest: how many sessions of the selected sources the NAT holds, and the
    digest of their keys and translations (nfmig/digest.py), computed a batch of the
    backend's sessions at a time: the table is never written out as XML or a tree."""

    def __init__(self, backend: Backend, schema: Schema, namespace: str):
        self.backend = backend
        self.schema = schema
        self.namespace = namespace

    def session_digest(self, _session, op: etree._Element) -> str:
        # datastore is not looked at: both its values (libyang refuses any other), running
        # and operational, are the backend's live table here
        request = rpc_input(self.schema, op, required=())
        selects = source_filter(request.get("source-prefix") or [])
        try:
            batches = self.backend.session_batches()
            if selects is None:
                count, total = digest_sum(s for batch in batches for s in batch)
            else:
                count, total = digest_sum(s for batch in batches for s in batch
                                          if selects(s.src_address))
        except (BackendError, OSError) as exc:
            raise errors.operation_failed(f"the NAT cannot read its sessions: {exc}") \
                from None
        ns = self.namespace
        return (f'<count xmlns="{ns}">{count}</count>'
                f'<digest xmlns="{ns}">{digest_text(total)}</digest>')


def source_filter(prefixes: Iterable[str]) -> Callable[[str], bool] | None:
    """Whether a src_address is in one of ``prefixes``; None when there are none (every
    source). Each address is parsed once: a subscriber has many sessions."""
    networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    if not networks:
        return None
    known: dict[str, bool] = {}

    def selects(address: str) -> bool:
        inside = known.get(address)
        if inside is None:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                inside = False
            else:  # an address is in no network of the other IP version
                inside = any(parsed in n for n in networks)
            known[address] = inside
        return inside
    return selects


def changes_xml(namespace: str, sessions: Iterable[Session], ended: Iterable[tuple]) -> str:
    """rpc changes' output: a session element per session (written as nat-session entries
    are), an ended element per key; each in the model's namespace."""
    key = "".join(f"<{name}>%s</{name}>" for name in KEY_FIELDS)
    return "".join(sessions_to_xml(sessions, namespace, "session")) + "".join(
        f'<ended xmlns="{namespace}">{key % tuple(k)}</ended>' for k in ended)


def rpc_input(schema: Schema, op: etree._Element,
              required: tuple[str, ...] = ("migration-id",)) -> dict:
    """The rpc's input, checked by libyang against the model; ``required``: the leaves it
    must have (libyang's parse of an rpc leaves mandatory leaves unchecked)."""
    name = etree.QName(op).localname
    try:
        request = schema.parse_operation(etree.tostring(op, encoding="unicode"))
    except YangError as exc:
        raise RpcError("invalid-value", f"{name}: {exc}", type="application") from None
    for mandatory in (*required, *(("role", "event") if name == "announce-migration"
                                   else ())):
        if mandatory not in request:
            raise errors.missing_element(f"{name} needs {mandatory}", mandatory)
    return request


def migration_event(namespace: str, **leaves: str) -> str:
    """A migration-event notification's content from leaf values (for the server's own
    events, e.g. a window that timed out)."""
    body = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in leaves.items())
    return f'<migration-event xmlns="{namespace}">{body}</migration-event>'
