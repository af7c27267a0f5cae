"""The firewall's configuration beyond nfmig-nat (yang/nfmig-firewall).

- firewall-policy: small, so held here as an XML tree like the nat-policy, edited as one
  (:mod:`.tree_edit`), validated whole by libyang, and given to the backend as a
  FirewallPolicy;
- pinhole: the backend keeps them (the NF is the source of truth, and their lifetimes run
  down there), so an edit reads them, edits that copy as a tree, validates it, and gives
  the backend what changed in one all-or-nothing call.

Both are edited in running only: a pinhole's lifetime runs from when it is written, which
a candidate committed later would change behind its writer's back.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lxml import etree
from nfmig.nf_backends.base import BackendError
from nfmig.nf_backends.firewall import (
    FirewallBackend,
    FirewallPolicy,
    InboundService,
    OutboundRule,
    Pinhole,
    PinholeKey,
    Subscriber,
)

from . import errors
from .errors import RpcError
from .filters import TopNode
from .schema import Schema
from .tree_edit import edit_node, edited, strip_operations

FW_MODULE = "nfmig-firewall"
FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
POLICY_TAG = f"{{{FW_NS}}}firewall-policy"
PINHOLE_TAG = f"{{{FW_NS}}}pinhole"
POLICY_PATH = f"/{FW_MODULE}:firewall-policy"
PINHOLE_PATH = f"/{FW_MODULE}:pinhole"
_LEAVES = ("protocol", "remote-address", "local-address", "local-port", "reason", "timeout")


@dataclass
class FirewallPlan:
    """What an edit makes of the firewall's configuration, checked, not yet applied."""

    policy: etree._Element | None = None
    policy_changed: bool = False
    put: list[Pinhole] = field(default_factory=list)
    removed: list[PinholeKey] = field(default_factory=list)
    # (before, after) of every top-level node it changes, for access control
    trees: list[tuple[etree._Element | None, etree._Element | None]] = field(
        default_factory=list)
    before: dict[PinholeKey, Pinhole] = field(default_factory=dict)  # what it undoes to

    @property
    def changed(self) -> bool:
        return self.policy_changed or bool(self.put or self.removed)


class FirewallConfig:
    """firewall-policy and pinhole of one firewall's running datastore."""

    tags = frozenset({POLICY_TAG, PINHOLE_TAG})

    def __init__(self, schema: Schema, backend: FirewallBackend):
        self.schema = schema
        self.backend = backend
        self._policy: etree._Element | None = None
        self._policy_node = schema.find(POLICY_PATH)
        self._pinhole_node = schema.find(PINHOLE_PATH)

    # -- reads -------------------------------------------------------------------------
    def nodes(self) -> list[TopNode]:
        policy = self._policy
        nodes = [TopNode(FW_NS, "pinhole", self._pinhole_entries)]
        if policy is not None:
            text = etree.tostring(policy, encoding="unicode")
            nodes.insert(0, TopNode(FW_NS, "firewall-policy", lambda: [text]))
        return nodes

    def _pinhole_entries(self) -> Iterator[str]:
        for p in self.backend.pinholes():
            yield pinhole_xml(p)

    def state_node(self, connections: Callable[[], int]) -> TopNode:
        def state() -> Iterator[str]:
            yield (f'<firewall-state xmlns="{FW_NS}"><connection-count>{connections()}'
                   f"</connection-count><pinhole-count>{len(self.backend.pinholes())}"
                   "</pinhole-count></firewall-state>")
        return TopNode(FW_NS, "firewall-state", state)

    # -- edits -------------------------------------------------------------------------
    def plan(self, edits: list[etree._Element], replace: bool = False) -> FirewallPlan:
        """What ``edits`` (firewall-policy and pinhole elements, with their operations)
        make of running's (of nothing, when they ``replace`` it), validated."""
        plan = FirewallPlan(policy=None if replace else self._policy)
        policy_edits = [e for e in edits if e.tag == POLICY_TAG]
        pinhole_edits = [e for e in edits if e.tag == PINHOLE_TAG]
        if replace:
            policy_edits = [strip_operations(e) for e in policy_edits]
            pinhole_edits = [strip_operations(e) for e in pinhole_edits]
        if policy_edits or replace:
            plan.policy = edited(plan.policy, policy_edits, self._policy_node, POLICY_PATH) \
                if policy_edits else None
            if plan.policy is not None:
                self.schema.check_config(etree.tostring(plan.policy))
            plan.policy_changed = _text(plan.policy) != _text(self._policy)
            if plan.policy_changed:
                plan.trees.append((self._policy, plan.policy))
        if pinhole_edits or replace:
            self._plan_pinholes(plan, pinhole_edits, replace)
        return plan

    def _plan_pinholes(self, plan: FirewallPlan, edits: list[etree._Element],
                       replace: bool) -> None:
        current = plan.before = {p.key: p for p in self.backend.pinholes()}
        # Each edit meets only the entry of its own key (a list of thousands edited in one
        # pass, not each edit against every entry).
        by_key: dict[tuple, etree._Element] = {} if replace else {
            _entry_key(e): e for e in (etree.fromstring(pinhole_xml(p))
                                       for p in current.values())}
        for edit in edits:
            key = _entry_key(edit)
            holder = etree.Element("config")
            if key in by_key:
                holder.append(by_key.pop(key))
            edit_node(holder, edit, self._pinhole_node, "merge", PINHOLE_PATH)
            by_key.update((_entry_key(e), e) for e in holder if isinstance(e.tag, str))
        entries = list(by_key.values())
        if entries:
            self.schema.check_config(b"".join(etree.tostring(e) for e in entries))
        wanted = {p.key: p for p in map(pinhole_of, entries)}
        for key, p in wanted.items():
            if current.get(key) != p:
                plan.put.append(p)
                before = current.get(key)
                plan.trees.append((etree.fromstring(pinhole_xml(before)) if before else None,
                                   etree.fromstring(pinhole_xml(p))))
        for key, p in current.items():
            if key not in wanted:
                plan.removed.append(key)
                plan.trees.append((etree.fromstring(pinhole_xml(p)), None))

    def apply(self, plan: FirewallPlan) -> Callable[[], None]:
        """Put ``plan`` in force, all or nothing (RpcError: nothing changed); returns what
        undoes it, for an edit whose other parts fail after it."""
        if not plan.changed:
            return lambda: None
        old_policy = self._policy
        old_pinholes = plan.before
        if plan.policy_changed:
            try:
                self.backend.apply_firewall_policy(to_backend(self.schema, plan.policy))
            except BackendError as exc:
                raise _refused(exc) from None
            self._policy = plan.policy
        if plan.put or plan.removed:
            try:
                self.backend.apply_pinholes(plan.put, plan.removed)
            except BackendError as exc:
                if plan.policy_changed:
                    self._restore_policy(old_policy)
                raise _refused(exc) from None

        def undo() -> None:
            if plan.put or plan.removed:
                back = [old_pinholes[k] for k in (*plan.removed, *(p.key for p in plan.put))
                        if k in old_pinholes]
                self.backend.apply_pinholes(back, [p.key for p in plan.put
                                                   if p.key not in old_pinholes])
            if plan.policy_changed:
                self._restore_policy(old_policy)
        return undo

    def _restore_policy(self, policy: etree._Element | None) -> None:
        self.backend.apply_firewall_policy(to_backend(self.schema, policy))
        self._policy = policy

    @staticmethod
    def candidate_refusal() -> RpcError:
        return errors.not_supported("firewall-policy and pinhole are edited in running: a "
                                    "pinhole's lifetime runs from when it is written",
                                    type="application")


def pinhole_xml(p: Pinhole) -> str:
    return (f'<pinhole xmlns="{FW_NS}"><protocol>{p.protocol}</protocol><remote-address>'
            f"{p.remote_address}</remote-address><local-address>{p.local_address}"
            f"</local-address><local-port>{p.local_port}</local-port><reason>{p.reason}"
            f"</reason><timeout>{p.timeout}</timeout></pinhole>")


def pinhole_of(entry: etree._Element) -> Pinhole:
    """A (valid) pinhole element as the backend takes it; the model's default reason."""
    values = {etree.QName(c).localname: (c.text or "").strip() for c in entry
              if isinstance(c.tag, str)}
    return Pinhole(values["protocol"], values["remote-address"], values["local-address"],
                   int(values["local-port"]), values.get("reason", "related"),
                   int(values["timeout"]))


def _entry_key(entry: etree._Element) -> tuple:
    """A pinhole element's key, addresses and port in canonical form where they parse (a
    value that does not is libyang's to refuse)."""
    values = {etree.QName(c).localname: (c.text or "").strip() for c in entry
              if isinstance(c.tag, str)}
    key = [values.get(name) for name in _LEAVES[:4]]
    for i, canonical in ((1, _address), (2, _address), (3, int)):
        with contextlib.suppress(TypeError, ValueError):
            key[i] = canonical(key[i])
    return tuple(key)


def _address(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def to_backend(schema: Schema, policy: etree._Element | None) -> FirewallPolicy:
    """The backend's view of a (valid) firewall-policy tree; none is no subscriber."""
    if policy is None:
        return FirewallPolicy()
    tree = schema.parse_xml(etree.tostring(policy))
    try:
        data = tree.print_dict(include_implicit_defaults=True, absolute=False)
    finally:
        tree.free()
    subscribers = []
    for s in data.get("firewall-policy", {}).get("subscriber", []):
        subscribers.append(Subscriber(
            s["name"], tuple(s.get("prefix", [])), s.get("outbound", "allow-all"),
            tuple(OutboundRule(r["name"], r.get("protocol"), r.get("destination-prefix"),
                               r.get("destination-port"))
                  for r in s.get("outbound-rule", [])),
            tuple(InboundService(i["protocol"], i["port"], tuple(i.get("remote-prefix", [])))
                  for i in s.get("inbound-service", []))))
    return FirewallPolicy(subscribers)


def _text(element: etree._Element | None) -> str | None:
    return None if element is None else etree.tostring(element, encoding="unicode")


def _refused(exc: BackendError) -> RpcError:
    return RpcError("operation-failed", f"the firewall refused the change, nothing was "
                    f"applied: {exc}", app_tag=exc.reason.replace(" ", "-"))
