"""The NMDA datastores of one NF instance, over its backend.

- running: the NAT policy (kept here) and the sessions (kept by the backend: the NF is the
  source of truth, so nothing here copies them);
- candidate: running plus pending changes, which commit applies as one backend batch;
- startup: a file in the state directory;
- operational: running plus state (nat-state, yang-library, netconf-state).

Every edit is checked against the model before anything is applied, and applied
all-or-nothing: the backend takes the whole session batch or none of it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from lxml import etree
from nfmig.nf_backends.base import (
    SESSION_FIELDS,
    Backend,
    BackendError,
    NatPolicy,
    Session,
    refusals,
    session_key,
)
from nfmig.nf_backends.batch import SessionBatch, SessionEdit, key_text
from nfmig.nf_backends.firewall import FirewallBackend

from . import errors, nacm
from .candidate_ops import CandidateOperations, put_batch
from .confirmed_commit import ConfirmedCommit
from .errors import RpcError, RpcErrors
from .filters import TopNode
from .firewall_config import FirewallConfig, FirewallPlan
from .gc_pause import collector_paused
from .ietf_nat import NAT_NS as IETF_NAT_NS
from .ietf_nat import NAT_TAG as IETF_NAT_TAG
from .ietf_nat import statistics_node
from .ietf_nat_edit import MappingTable, combine
from .locks import DatastoreLocks
from .nacm_config import NACM_NS, NACM_TAG, NacmModel, default_tree
from .policy import PolicyModel
from .schema import ListEntryChecker, Schema, YangError
from .session_codec import (
    OPERATION_ATTR,
    HollowEdit,
    NeedsTree,
    SessionDecoder,
    check_operation,
    session_batches_to_xml,
)
from .tree_edit import strip_operations

log = logging.getLogger(__name__)

CONFIG_DATASTORES = ("running", "candidate", "startup")


def _refuse_duplicate(edits: list[SessionEdit], checker: ListEntryChecker) -> None:
    seen = set()
    for edit in edits:
        if edit.key in seen:
            raise errors.invalid_value(
                f"nat-session {key_text(edit.key)} appears twice in this edit",
                path=_entry_path(checker, edit.key), app_tag="data-not-unique")
        seen.add(edit.key)


@dataclass
class EditOptions:
    default_operation: str = "merge"       # merge | replace | none
    test_option: str = "test-then-set"     # test-then-set | set | test-only
    error_option: str = "stop-on-error"    # stop-on-error | continue-on-error | rollback-on-error


@dataclass
class Candidate:
    """Pending changes over running: policy as a whole, sessions by key (None = delete)."""

    policy: etree._Element | None
    sessions: dict[tuple, Session | None] = field(default_factory=dict)
    policy_changed: bool = False
    nacm: etree._Element | None = None  # /nacm (RFC 8341), held whole like the policy
    nacm_changed: bool = False

    @property
    def modified(self) -> bool:
        return self.policy_changed or self.nacm_changed or bool(self.sessions)


class Datastores(CandidateOperations):
    def __init__(self, schema: Schema, backend: Backend, state_dir: Path):
        self.schema = schema
        self.backend = backend
        self.state_dir = Path(state_dir)
        self.ns = schema.nat_ns
        self.decoder = SessionDecoder(ListEntryChecker(schema, "/nfmig-nat:nat-session"), self.ns)
        self._policy_model = PolicyModel(schema)
        # The same sessions as ietf-nat mapping-entries (server/ietf_nat.py)
        self.ietf = MappingTable(schema, self._held_anywhere)
        self._ietf_statistics = statistics_node(time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime()))
        self._lock = threading.RLock()
        self._policy: etree._Element | None = None
        # The shipped rule-lists, until a startup with a /nacm of its own replaces them.
        self._nacm_model = NacmModel(schema)
        self._nacm: etree._Element | None = default_tree()
        self._nacm_before: list[etree._Element | None] = []  # a confirmed commit's undo
        self._candidate: Candidate | None = None
        self._confirmed = ConfirmedCommit(self.state_dir, self._undo, self._expire)
        self.locks = DatastoreLocks()
        self.startup_path = self.state_dir / "startup.xml"
        # A firewall's policy and pinholes (nfmig-firewall), beside the NAT model's nodes
        self.firewall = FirewallConfig(schema, backend) \
            if isinstance(backend, FirewallBackend) else None
        self._firewall_tags = self.firewall.tags if self.firewall else frozenset()

    # -- start-up ----------------------------------------------------------------------
    def load_startup(self) -> None:
        """Make running what startup holds, if the state directory has one; then roll back
        a confirmed commit that an earlier run left pending (RFC 6241 §8.4: one never
        confirmed is undone, and a kernel NAT still holds what it wrote)."""
        if self.startup_path.exists():
            text = self.startup_path.read_text()
            try:
                config = etree.fromstring(f"<config>{text}</config>".encode())
                self._replace_running(config)
            except (etree.XMLSyntaxError, RpcError) as exc:
                raise RuntimeError(f"{self.startup_path}: not a valid startup configuration: "
                                   f"{exc}") from None
            log.info("running loaded from %s", self.startup_path)
        with self._lock, collector_paused():
            self._confirmed.roll_back_recorded()

    @property
    def nacm_tree(self) -> etree._Element | None:
        """Running's /nacm, the rules in force (replaced, never changed in place)."""
        return self._nacm

    # -- reads -------------------------------------------------------------------------
    def config_nodes(self, datastore: str) -> list[TopNode]:
        """The configuration of a datastore as top-level nodes, serialised on demand."""
        if datastore == "startup":
            text = self.startup_path.read_text() if self.startup_path.exists() else ""
            return [TopNode(None, None, lambda: [text])] if text else []
        with self._lock:
            candidate = self._candidate if datastore == "candidate" else None
            policy = candidate.policy if candidate else self._policy
            nacm_tree = candidate.nacm if candidate else self._nacm
            overlay = dict(candidate.sessions) if candidate else {}
        nodes = [TopNode(self.ns, "nat-session", lambda: session_batches_to_xml(
            self._session_batches_with(overlay), self.ns),
            select=lambda wanted: self._selected(overlay, wanted))]
        if policy is not None:
            policy_text = etree.tostring(policy, encoding="unicode")
            nodes.insert(0, TopNode(self.ns, "nat-policy", lambda: [policy_text]))
        if nacm_tree is not None:
            nacm_text = etree.tostring(nacm_tree, encoding="unicode")
            nodes.append(TopNode(NACM_NS, "nacm", lambda: [nacm_text]))
        nodes.append(self.ietf.node(lambda: self._session_batches_with(overlay)))
        if self.firewall is not None:  # the candidate's are running's (firewall_config)
            nodes += self.firewall.nodes()
        return nodes

    def _selected(self, overlay: dict, wanted: list[dict[str, str]]
                  ) -> Callable[[], Iterator[str]] | None:
        """The producer of the entries with the leaf values of one of ``wanted`` (a
        subtree filter's content matches), selected as they are read; None when a leaf
        named is not one of the list's."""
        fields = [[(SESSION_FIELDS.index(name), value) for name, value in one.items()]
                  for one in wanted if one.keys() <= set(SESSION_FIELDS)]
        if len(fields) != len(wanted):
            return None

        def chosen(batch: list[Session]) -> list[Session]:
            return [s for s in batch if any(all(s[i] is not None and str(s[i]) == value
                                                for i, value in one) for one in fields)]
        return lambda: session_batches_to_xml(map(chosen, self._session_batches_with(overlay)),
                                              self.ns)

    def config_text(self, datastore: str) -> str:
        """The datastore's configuration as stored (startup): the sessions once, as
        nat-session entries, without their ietf-nat view."""
        return "".join(node.text() for node in self.config_nodes(datastore)
                       if node.namespace != IETF_NAT_NS)

    def sessions(self, datastore: str) -> Iterator[Session]:
        """The sessions of running, operational or candidate (running with its pending
        changes)."""
        with self._lock:
            candidate = self._candidate if datastore == "candidate" else None
            overlay = dict(candidate.sessions) if candidate else {}
        return self._sessions_with(overlay)

    def session(self, datastore: str, key: tuple) -> Session | None:
        """One session of running, operational or candidate, by key."""
        with self._lock:
            candidate = self._candidate if datastore == "candidate" else None
            if candidate is not None and key in candidate.sessions:
                return candidate.sessions[key]
        return self.backend.lookup([key]).get(key)

    def _sessions_with(self, overlay: dict) -> Iterator[Session]:
        return chain.from_iterable(self._session_batches_with(overlay))

    def _session_batches_with(self, overlay: dict) -> Iterator[list[Session]]:
        """The backend's sessions with a candidate's changes over them, in lists."""
        if not overlay:
            yield from self.backend.session_batches()
            return
        for batch in self.backend.session_batches():
            yield [s for s in batch if session_key(s) not in overlay]
        yield [s for s in overlay.values() if s is not None]

    def state_nodes(self) -> list[TopNode]:
        nodes = [TopNode(self.ns, "nat-state", self._nat_state), self._ietf_statistics]
        if self.firewall is not None:
            nodes.append(self.firewall.state_node(lambda: self.backend.stats().session_count))
        return nodes

    def _nat_state(self) -> Iterator[str]:
        stats = self.backend.stats()
        yield (f'<nat-state xmlns="{self.ns}"><implementation>{stats.implementation}'
               f"</implementation><session-count>{stats.session_count}</session-count>"
               f"<sessions-created>{stats.sessions_created}</sessions-created>"
               f"<sessions-expired>{stats.sessions_expired}</sessions-expired>"
               f"<sessions-imported>{stats.sessions_imported}</sessions-imported></nat-state>")

    @property
    def policy(self) -> NatPolicy:
        with self._lock:
            return self._policy_model.to_backend(self._policy)

    # -- locks -------------------------------------------------------------------------
    def lock(self, datastore: str, session_id: int) -> None:
        with self._lock:
            dirty = datastore == "candidate" and self._candidate and self._candidate.modified
            self.locks.take(datastore, session_id, "candidate has uncommitted changes; "
                            "commit or discard-changes first" if dirty else None)

    def unlock(self, datastore: str, session_id: int) -> None:
        with self._lock:
            self.locks.give_back(datastore, session_id)

    def release_locks(self, session_id: int) -> list[str]:
        with self._lock:
            held = self.locks.release(session_id)
            if "candidate" in held and self._candidate:
                self._candidate = None  # RFC 6241 §8.3.5.2: a lock holder's edits go
            return held

    # -- edits -------------------------------------------------------------------------
    def edit(self, datastore: str, config: etree._Element, options: EditOptions,
             session_id: int, source: bytes | HollowEdit | None = None) -> None:
        """edit-config / edit-data of ``config``'s children into ``datastore``. ``source``,
        the request's text that ``config`` was parsed from, lets a bulk edit be read from
        it directly; a HollowEdit's ``config`` holds no children at all (see there)."""
        if isinstance(source, HollowEdit) and options.default_operation == "replace":
            raise NeedsTree()  # a replace reads the tree as a whole
        if datastore not in ("running", "candidate"):
            raise errors.invalid_value(f"{datastore} cannot be the target of an edit; use "
                                       "running or candidate", info={"bad-element": "target"})
        with self._lock, collector_paused(), \
                self.ietf.scope(keep=options.test_option != "test-only"):
            self.locks.check_writable(datastore, session_id)
            if options.default_operation == "replace":
                if options.test_option == "test-only":
                    self._plan_replace(config)
                    return
                self._replace_datastore(datastore, config)
                return
            policy_edits, session_edits = self._split(config, options.default_operation,
                                                      source, datastore)
            nacm_edits = [e for e in policy_edits if e.tag == NACM_TAG]
            firewall = self._plan_firewall(datastore, [e for e in policy_edits
                                                       if e.tag in self._firewall_tags])
            policy_edits = [e for e in policy_edits if e.tag != NACM_TAG
                            and e.tag not in self._firewall_tags]
            base = self._base_for(datastore)
            new_policy = self._policy_model.plan(base.policy, policy_edits)
            new_nacm = self._nacm_model.plan(base.nacm, nacm_edits)
            batch = _batch_of(session_edits, self.decoder.checker)
            if options.test_option != "test-only":  # refused before anything is applied
                nacm.guard_write([(base.policy, new_policy), (base.nacm, new_nacm),
                                  *firewall.trees], batch, self._held(base.sessions))
            if datastore == "running" and options.test_option != "test-only" and \
                    options.error_option != "continue-on-error":
                # The NF settles each entry on what it holds, all or nothing.
                with self._firewall_first(firewall):
                    self._commit_changes(new_policy, policy_edits != [], batch)
                if nacm_edits:
                    self._nacm = new_nacm
                return
            changes, failed = self._plan_sessions(base.sessions, batch,
                                                  options.error_option)
            if options.test_option == "test-only":
                if failed:
                    raise RpcErrors(failed)
                return
            if datastore == "running":
                with self._firewall_first(firewall):
                    self._commit_changes(new_policy, policy_edits != [], put_batch(changes))
                if nacm_edits:
                    self._nacm = new_nacm
            else:
                self._stage(new_policy, policy_edits != [], changes, new_nacm,
                            nacm_edits != [])
            if failed:
                raise RpcErrors(failed)

    def _plan_firewall(self, datastore: str, edits: list[etree._Element],
                       replace: bool = False) -> FirewallPlan:
        """The firewall's part of an edit, checked. It is edited in running only
        (firewall_config): the candidate's is always running's, so what a copy into the
        candidate holds of it is left out."""
        if self.firewall is None or not (edits or replace):
            return FirewallPlan()
        if datastore == "candidate":
            if edits and not replace:
                raise self.firewall.candidate_refusal()
            return FirewallPlan()
        return self.firewall.plan(edits, replace)

    @contextmanager
    def _firewall_first(self, plan: FirewallPlan) -> Iterator[None]:
        """The firewall's part applied before the rest of an edit, and undone if the rest
        fails: all or nothing across both."""
        undo = self.firewall.apply(plan) if self.firewall is not None else None
        try:
            yield
        except BaseException:
            if undo is not None:
                undo()
            raise

    def _base_for(self, datastore: str) -> Candidate:
        if datastore == "candidate" and self._candidate:
            return self._candidate
        return Candidate(policy=self._policy, nacm=self._nacm)

    def _held(self, overlay: dict) -> Callable[[list], set]:
        """Which of some keys the view ``overlay`` puts over running holds (for access
        control, which asks only when the answer decides)."""
        def held(keys: list) -> set:
            found = {k for k in keys if overlay.get(k) is not None}
            rest = [k for k in keys if k not in overlay]
            if rest:
                found.update(k for k, v in self.backend.lookup(rest).items() if v is not None)
            return found
        return held

    def _split(self, config: etree._Element, default_op: str,
               source: bytes | HollowEdit | None = None, datastore: str = "running"
               ) -> tuple[list[etree._Element], list[SessionEdit]]:
        """The policy (and /nacm) elements and the session entries of an edit, every entry checked
        against the model (see SessionDecoder). Raises RpcError, or NeedsTree for a hollowed
        edit its text reader declines."""
        inherited = config.get(OPERATION_ATTR)
        inherited = default_op if inherited is None else check_operation(inherited, "config")
        bulk = self.decoder.decode_bulk(config, inherited, source)
        if bulk is not None:
            return [], bulk
        policy_edits: list[etree._Element] = []
        entries: list[etree._Element] = []
        mapped: list[etree._Element] = []  # /ietf-nat:nat
        session_tag = f"{{{self.ns}}}nat-session"
        policy_tags = (f"{{{self.ns}}}nat-policy", "nat-policy")
        if (config.text or "").strip() or any((child.tail or "").strip() for child in config):
            raise errors.invalid_value("config holds text among its nodes",
                                       info={"bad-element": "config"})
        for child in config:
            tag = child.tag
            if tag == session_tag:
                entries.append(child)
            elif tag in policy_tags or tag == NACM_TAG or tag in self._firewall_tags:
                policy_edits.append(child)
            elif tag == IETF_NAT_TAG:
                mapped.append(child)
            elif isinstance(tag, str):
                raise self._unknown_top_level(child)
        edits = self.decoder.read_strictly(entries, inherited)
        if mapped:
            overlay = self._base_for(datastore).sessions
            view = self._held(overlay)
            edits = combine(edits, self.ietf.read(
                mapped, inherited, lambda keys: {k: k for k in view(keys)},
                lambda: (s.key for s in self._sessions_with(overlay))))
        return policy_edits, edits

    def _held_anywhere(self, keys: list) -> set:
        """Which of some keys running or the candidate holds (what the ietf-nat index
        table keeps entries for)."""
        staged = self._candidate.sessions if self._candidate else {}
        return {k for k in keys if staged.get(k) is not None} | set(self.backend.lookup(keys))

    def _unknown_top_level(self, element: etree._Element) -> RpcError:
        """Let libyang name what is wrong with a node we do not edit (unknown, or state)."""
        try:
            self.schema.parse_xml(etree.tostring(element), validate=False)
        except YangError as exc:
            return exc.to_rpc_error()
        qname = etree.QName(element)
        return errors.invalid_value(f"{qname.localname} is state data and cannot be edited",
                                    path=f"/{qname.localname}")

    # The sessions: checked entry by entry against the view they edit.
    def _plan_sessions(self, overlay: dict, batch: SessionBatch, error_option: str
                       ) -> tuple[dict[tuple, Session | None], list[RpcError]]:
        """What each entry of ``batch`` makes of the view ``overlay`` puts over running
        (the candidate's pending changes), settled as the NF would settle it: the entries
        after the edit (None: gone), and with continue-on-error the entries that failed."""
        if not batch:
            return {}, []
        keys = batch.keys()
        pending = [k for k in keys if k not in overlay] if overlay else keys
        current = self.backend.lookup(pending) if pending else {}
        if overlay:  # the batch's own keys: the overlay grows with each edit of a bulk copy
            staged = map(overlay.get, keys)
            current.update((k, v) for k, v in zip(keys, staged, strict=True) if v is not None)
        changes: dict[tuple, Session | None] = {}
        failed: list[RpcError] = []
        for edit in batch.edits:
            key = edit.key
            if edit.operation == "remove" and current.get(key) is None:
                continue  # removing what is not there changes nothing (RFC 6241 7.2)
            try:
                changes[key] = edit.result(current.get(key))
            except BackendError as exc:
                if error_option != "continue-on-error":
                    raise _backend_error(exc, self.decoder) from None
                failed.append(_backend_error(exc, self.decoder))
        return changes, failed

    def _commit_changes(self, policy: etree._Element | None, policy_changed: bool,
                        batch: SessionBatch) -> None:
        """Apply to the backend: policy first (new sessions need it), then the sessions as
        one batch; a refused batch puts the old policy back."""
        old_policy = self._policy
        if policy_changed:
            try:
                self.backend.apply_policy(self._policy_model.to_backend(policy))
            except BackendError as exc:  # the backend undid its part; nothing changed
                raise _backend_error(exc, self.decoder) from None
            self._policy = policy
        if not batch:
            return
        try:
            self.backend.apply(batch)
        except BackendError as exc:
            if policy_changed:
                self.backend.apply_policy(self._policy_model.to_backend(old_policy))
                self._policy = old_policy
            raise _backend_error(exc, self.decoder) from None
        log.info("running: %d session edits applied", len(batch))

    def _stage(self, policy: etree._Element | None, policy_changed: bool,
               sessions: dict[tuple, Session | None], nacm_tree: etree._Element | None = None,
               nacm_changed: bool = False) -> None:
        candidate = self._candidate or Candidate(policy=self._policy, nacm=self._nacm)
        candidate.sessions.update(sessions)
        if policy_changed:
            candidate.policy = policy
            candidate.policy_changed = True
        if nacm_changed:
            candidate.nacm = nacm_tree
            candidate.nacm_changed = True
        self._candidate = candidate

    # -- replace (default-operation replace, copy-config) -------------------------------
    def _plan_replace(self, config: etree._Element, datastore: str = "running"
                      ) -> tuple[etree._Element | None, dict[tuple, Session | None], bool,
                                 etree._Element | None, FirewallPlan]:
        """The policy and sessions ``config`` replaces a datastore's with; whether it
        replaces /nacm too (only when it holds one: replacing the NAT's configuration
        does not take the access control with it, nor lock everyone out), and with what;
        and the firewall's part."""
        edits, session_edits = self._split(config, "replace")
        nacm_edits = [strip_operations(e) for e in edits if e.tag == NACM_TAG]
        firewall = self._plan_firewall(datastore, [e for e in edits
                                                   if e.tag in self._firewall_tags], True)
        policy = self._policy_model.plan(None, [strip_operations(e) for e in edits
                                                if e.tag != NACM_TAG
                                                and e.tag not in self._firewall_tags])
        new_nacm = self._nacm_model.plan(None, nacm_edits)
        batch = _batch_of(session_edits, self.decoder.checker)
        return (policy, dict(zip(batch.keys(), batch.sessions(), strict=True)),
                nacm_edits != [], new_nacm, firewall)

    def _replace_datastore(self, datastore: str, config: etree._Element) -> None:
        policy, wanted, replaces_nacm, new_nacm, firewall = self._plan_replace(config,
                                                                              datastore)
        base = self._base_for(datastore)
        if not replaces_nacm:
            new_nacm = base.nacm
        changes: dict[tuple, Session | None] = dict(wanted)
        for s in self._sessions_with(self._candidate.sessions if datastore == "candidate"
                                     and self._candidate else {}):
            if s.key not in wanted:
                changes[s.key] = None
        nacm.guard_write([(base.policy, policy), (base.nacm, new_nacm), *firewall.trees],
                         lambda: put_batch(changes), self._held(base.sessions))
        if datastore == "running":
            with self._firewall_first(firewall):
                self._commit_changes(policy, True, put_batch(changes))
            self._nacm = new_nacm
        else:
            self._stage(policy, True, changes, new_nacm, replaces_nacm)

    def _replace_running(self, config: etree._Element) -> None:
        with self._lock:
            self._replace_datastore("running", config)

    def validate(self, source: str) -> None:
        """Validate a datastore's configuration.

        Running and candidate hold the NF's own sessions and entries that passed the per-leaf
        checks when they were edited in (the same verdicts as libyang, tested in
        tests/test_session_codec.py), under a key kept unique by construction; the model
        constrains nothing across nat-session entries beyond the key. So what is left to
        validate is the policy, with libyang in full. Parsing the whole session list instead
        would cost seconds at 10k entries: libyang checks each top-level list instance
        against every sibling.
        """
        staged: list[Session] = []
        if source == "startup":
            text = self.config_text(source)  # written by hand, perhaps: parse it all
        else:
            with self._lock:
                candidate = self._candidate if source == "candidate" else None
                policy = candidate.policy if candidate else self._policy
                if candidate is not None:
                    staged = [s for s in candidate.sessions.values() if s is not None]
            text = etree.tostring(policy) if policy is not None else None
        if text:
            try:
                tree = self.schema.parse_xml(text)
            except YangError as exc:
                raise exc.to_rpc_error() from None
            if tree is not None:
                tree.free()
        self._check_held(staged)

    def _check_held(self, sessions: list[Session]) -> None:
        """The staged sessions this NF could not hold: one rpc-error each, naming the entry,
        so that a migrator learns them all before anything moves."""
        refused = [_backend_error(exc, self.decoder) for exc in refusals(self.backend, sessions)]
        if refused:
            raise RpcErrors(refused)

    # -- copy / delete -----------------------------------------------------------------
    def copy_config(self, source: str | etree._Element, target: str, session_id: int) -> None:
        with self._lock, collector_paused():
            if target != "startup":
                self.locks.check_writable(target, session_id)
            if isinstance(source, str):
                text = self.config_text(source)
                config = etree.fromstring(f"<config>{text}</config>".encode())
            else:
                config = source
            if target == "startup":
                self._plan_replace(config, "startup")  # validates: startup holds valid config
                self.locks.check_writable("startup", session_id)
                nacm.guard_whole(self._config_tags())
                self._write_startup("".join(etree.tostring(c, encoding="unicode")
                                            for c in config if isinstance(c.tag, str)))
            else:
                self._replace_datastore(target, config)

    def delete_config(self, target: str, session_id: int) -> None:
        if target != "startup":
            raise errors.invalid_value(f"delete-config cannot delete {target}; only startup",
                                       info={"bad-element": target})
        with self._lock:
            self.locks.check_writable("startup", session_id)
            nacm.guard_whole(self._config_tags())
            self.startup_path.unlink(missing_ok=True)

    def _config_tags(self) -> tuple[str, ...]:
        return (f"{{{self.ns}}}nat-policy", f"{{{self.ns}}}nat-session", NACM_TAG,
                *sorted(self._firewall_tags))

    def _write_startup(self, text: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.startup_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.startup_path)  # never a half-written startup


def _batch_of(edits: list[SessionEdit], checker: ListEntryChecker) -> SessionBatch:
    """The edit's entries as the backend takes them; an entry named twice is refused."""
    batch = SessionBatch(edits)
    if len(set(batch.keys())) != len(batch):
        _refuse_duplicate(edits, checker)
    return batch


def _entry_path(checker: ListEntryChecker, key: tuple) -> str:
    return checker.entry_path(dict(zip(checker.keys, map(str, key), strict=True)))


def _backend_error(exc: BackendError, decoder: SessionDecoder) -> RpcError:
    path = _entry_path(decoder.checker, exc.key) if exc.key else None
    if exc.reason in _EDIT_OUTCOMES:  # the edit's own rules, not a refusal of the NAT
        return RpcError(_EDIT_OUTCOMES[exc.reason], str(exc), path=path)
    return RpcError("operation-failed", f"the NAT refused the change, nothing was applied: "
                    f"{exc}", path=path, app_tag=exc.reason.replace(" ", "-"))


_EDIT_OUTCOMES = {"exists": "data-exists", "missing": "data-missing"}
