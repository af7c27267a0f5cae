"""NACM (RFC 8341) enforcement: who may read, write and execute what, on NETCONF and RESTCONF
alike.

Who is asking travels with the request as an :class:`Access` in a context variable
(:func:`acting`): NETCONF's dispatch sets it around each operation, RESTCONF's middleware for
each request (its blocking work runs in executor threads, to which the web layer copies the
request's context). The checks sit where both protocols meet: the exec check in
``Operations.dispatch``, reads where the top-level nodes of a reply are gathered
(:func:`readable`), writes in the datastores once an edit is planned and before anything is
applied (:func:`guard_write`), notifications as each is delivered. Work the server does on
its own (start-up, a confirmed commit's timeout) runs with no Access and is not checked.

Speed: the rules are read once per request for each top-level subtree. When no rule can
tell two of its nodes apart (no path reaching inside it, no schema default inside it that
differs), the subtree's verdict is one answer: the 100k entries of nat-session are streamed
or written without a look at any of them. Only rules that do reach inside (a path naming an
entry, say) make the engine look at each entry, and then only as deep as those paths go.

The recovery session (RFC 8341 §3.4): the user `nfmig serve --nacm-recovery-user` names,
connected from the host itself (a loopback address), is not subject to NACM at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import libyang
from lxml import etree

from .errors import RpcError
from .filters import TopNode
from .ietf_nat import with_statistics
from .nacm_config import (
    LEGACY_GROUP,
    NACM_NS,
    NOTIF_MODULE,
    NOTIF_NS,
    WRITE_OPERATIONS,
    Entry,
    LeafView,
    NacmModel,
    Rule,
    RuleSet,
    changes,
    compile_rules,
    local_name,
    node_value,
    path_matches,
)
from .schema import Schema, module_ns

log = logging.getLogger(__name__)

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
# RFC 5277's replayComplete and notificationComplete: always delivered (RFC 8341 §3.4.6).
NCN_NS = "urn:ietf:params:xml:ns:netmod:notification"
# RFC 8341 §3.2.2 (the nacm:default-deny-all of RFC 6241's module, which our copy lacks).
DENIED_BY_DEFAULT = frozenset({(NC_NS, "kill-session"), (NC_NS, "delete-config")})
MIXED = None  # a subtree verdict that depends on which node: neither True nor False
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)
_CONTENT = re.compile(r"</eventTime>\s*<(?:([\w.-]+):)?([\w.-]+)[^>]*?\sxmlns(?::([\w.-]+))?"
                      r"""\s*=\s*["']([^"']*)["']""")


@dataclass(frozen=True)
class Access:
    """Who is asking: the user, the groups the users file gives them, whether theirs is the
    recovery session; and the engine that judges them."""

    user: str
    groups: frozenset[str]
    recovery: bool
    engine: Nacm


_CURRENT: contextvars.ContextVar[Access | None] = contextvars.ContextVar("nacm_access",
                                                                       default=None)


def current() -> Access | None:
    return _CURRENT.get()


@contextlib.contextmanager
def acting(access: Access | None) -> Iterator[None]:
    """Run the block on behalf of ``access``."""
    token = _CURRENT.set(access)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _judged() -> tuple[Access, RuleSet] | None:
    """The current Access and rules, or None when nothing is to be checked."""
    access = _CURRENT.get()
    if access is None or access.recovery:
        return None
    rules = access.engine.rules()
    return (access, rules) if rules.enabled else None


# -- what the rest of the server calls -----------------------------------------------------
def readable(nodes: list[TopNode]) -> list[TopNode]:
    """The top-level nodes of a reply as the current user may read them (RFC 8341 §3.4.5:
    what may not be read is left out); /nacm's counters joined to its configuration."""
    nodes = with_statistics(_with_counters(nodes))  # ietf-nat's state joined the same way
    judged = _judged()
    if judged is None:
        return nodes
    return judged[0].engine.filter_reads(judged[0], judged[1], nodes)


def reads_whole(namespace: str, name: str) -> bool:
    """Whether the current user may read the top-level subtree ``name`` whole (so a reader
    may produce it without going through :func:`readable`)."""
    judged = _judged()
    if judged is None:
        return True
    access, rules = judged
    return access.engine.subtree(access, rules, namespace, name, "read") is True


def guard_write(trees: Iterable[tuple[etree._Element | None, etree._Element | None]],
                sessions: Any = None, held: Callable[[list], set] | None = None) -> None:
    """Refuse (access-denied) a write the current user may not make, before anything is
    applied: ``trees`` are the small top-level nodes it changes (before, after), ``sessions``
    the nat-session edits (a SessionBatch, or a function making one), ``held`` which of a
    list of keys the written datastore holds (consulted only when that decides)."""
    judged = _judged()
    if judged is not None:
        judged[0].engine.check_write(judged[0], judged[1], trees, sessions, held)


def guard_whole(tags: Iterable[str]) -> None:
    """Refuse a write that replaces or deletes the top-level nodes ``tags`` whole (the startup
    datastore) unless the current user may create, update and delete all of them."""
    judged = _judged()
    if judged is None:
        return
    access, rules = judged
    engine = access.engine
    for tag in tags:
        ns, _, name = tag[1:].partition("}")
        for op in WRITE_OPERATIONS:
            if engine.subtree(access, rules, ns, name, op) is not True:
                engine.deny_write(access, op, f"/{engine.model.module_of.get(ns, '')}:{name}")


def notification_permitted(message: str) -> bool:
    """Whether the current user may receive this notification (a whole <notification>)."""
    access = _CURRENT.get()
    return access is None or access.engine.notification_permitted(access, message)


# -- the engine ----------------------------------------------------------------------------
class Nacm:
    """The rules in force (running's /nacm, compiled when it changes), the schema's own
    defaults (nacm:default-deny-all / -write), and the denied-* counters."""

    def __init__(self, schema: Schema, running: Callable[[], etree._Element | None],
                 users: dict[str, Any], recovery_user: str | None = None):
        self.model = NacmModel(schema)
        self._running = running
        self._users = users
        self.recovery_user = recovery_user
        self._compiled: tuple[etree._Element | None, RuleSet] | None = None
        self._lock = threading.Lock()
        self.denied_operations = 0
        self.denied_data_writes = 0
        self.denied_notifications = 0
        # schema facts, by (top namespace, local names from the top node down)
        self._kind: dict[tuple[str, tuple[str, ...]], tuple[int, tuple[str, ...]]] = {}
        self._deny_all: set[tuple[str, tuple[str, ...]]] = set()
        self._deny_write: set[tuple[str, tuple[str, ...]]] = set()
        self._rpc_denied = set(DENIED_BY_DEFAULT)
        for module in schema.ctx:
            if module.implemented():
                for node in module.children():
                    self._learn(module_ns(module), node, ())
        # nodes with a default-deny-all node below them
        self._deny_inside = {(ns, names[:i]) for ns, names in self._deny_all
                             for i in range(1, len(names))}

    def _learn(self, ns: str, node: libyang.SNode, above: tuple[str, ...]) -> None:
        names = (*above, node.name())
        marks = {e.name() for e in node.extensions()}
        if node.nodetype() in (libyang.SNode.RPC, libyang.SNode.NOTIF):
            if "default-deny-all" in marks:
                self._rpc_denied.add((ns, node.name()))
            return
        keys = tuple(k.name() for k in node.keys()) if node.nodetype() == libyang.SNode.LIST \
            else ()
        self._kind[(ns, names)] = (node.nodetype(), keys)
        if "default-deny-all" in marks:
            self._deny_all.add((ns, names))
        if "default-deny-write" in marks:
            self._deny_write.add((ns, names))
        if node.nodetype() in (libyang.SNode.CONTAINER, libyang.SNode.LIST):
            for child in node.children():
                self._learn(ns, child, names)

    # -- who -----------------------------------------------------------------------------
    def access_of(self, user: str, source: str) -> Access:
        record = self._users.get(user)
        groups = frozenset() if record is None else \
            frozenset(getattr(record, "groups", None) or (LEGACY_GROUP,))
        recovery = user == self.recovery_user and _is_loopback(source)
        return Access(user, groups, recovery, self)

    def rules(self) -> RuleSet:
        tree = self._running()
        compiled = self._compiled
        if compiled is None or compiled[0] is not tree:
            try:
                rules = compile_rules(tree, self.model.resolve)
            except ValueError as exc:  # checked on every edit: only a hand-made startup
                log.error("NACM: /nacm cannot be evaluated (%s); denying everything", exc)
                rules = RuleSet(read_default=False, write_default=False, exec_default=False)
            compiled = self._compiled = (tree, rules)
        return compiled[1]

    # -- protocol operations (RFC 8341 §3.4.4) -------------------------------------------
    def check_exec(self, access: Access, ns: str, name: str) -> None:
        if access.recovery or (ns, name) == (NC_NS, "close-session"):
            return
        rules = self.rules()
        if not rules.enabled:
            return
        module = self.model.module_of.get(ns, NOTIF_MODULE if ns == NOTIF_NS else "")
        for rule in rules.rules_for(access.user, access.groups):
            if "exec" in rule.operations and rule.kind in ("any", "rpc") and \
                    rule.module in ("*", module) and rule.target in ("", "*", name):
                if rule.permit:
                    return
                break
        else:
            if (ns, name) not in self._rpc_denied and rules.exec_default:
                return
        with self._lock:
            self.denied_operations += 1
        log.info("NACM: %s may not execute %s:%s", access.user, module, name)
        raise RpcError("access-denied", f"user {access.user} may not execute {module}:{name}",
                       type="protocol")

    # -- verdicts --------------------------------------------------------------------------
    def _data_rules(self, access: Access, rules: RuleSet, op: str) -> tuple[Rule, ...]:
        return tuple(r for r in rules.rules_for(access.user, access.groups)
                     if op in r.operations and r.kind in ("any", "data"))

    def _default(self, rules: RuleSet, ns: str, names: tuple[str, ...], op: str) -> bool:
        for depth in range(1, len(names) + 1):
            if (ns, names[:depth]) in self._deny_all or \
                    (op != "read" and (ns, names[:depth]) in self._deny_write):
                return False
        return rules.read_default if op == "read" else rules.write_default

    def subtree(self, access: Access, rules: RuleSet, ns: str, name: str, op: str
                ) -> bool | None:
        """The verdict on every node of the top-level subtree ``name`` for ``op``: True or
        False when it is the same for all of them, else MIXED."""
        module = self.model.module_of.get(ns, "")
        tag = f"{{{ns}}}{name}"
        seen: set[bool] = set()  # actions of rules that reach only some of the subtree
        for rule in self._data_rules(access, rules, op):
            if rule.module not in ("*", module):
                continue
            if rule.path is None or (len(rule.path) == 1 and rule.path[0].tag == tag
                                     and not rule.path[0].predicates):
                return rule.permit if seen <= {rule.permit} else MIXED
            if rule.path[0].tag == tag:
                seen.add(rule.permit)
        verdict = self._default(rules, ns, (name,), op)
        if verdict and any(key[0] == ns and key[1][0] == name for key in
                           (self._deny_all if op == "read" else
                            self._deny_all | self._deny_write)):
            return MIXED  # a schema default inside the subtree says otherwise
        return verdict if seen <= {verdict} else MIXED

    def _node(self, rules: RuleSet, data_rules: tuple[Rule, ...], chain: list, op: str
              ) -> bool:
        """The verdict on one node, given as its chain of nodes from the top (XML elements,
        or the views of :class:`Entry`)."""
        ns, _, _ = chain[0].tag[1:].partition("}")
        module = self.model.module_of.get(ns, "")
        for rule in data_rules:
            if rule.module in ("*", module) and (rule.path is None
                                                 or path_matches(rule.path, chain)):
                return rule.permit
        return self._default(rules, ns, tuple(local_name(n.tag) for n in chain), op)

    @staticmethod
    def _reach(data_rules: tuple[Rule, ...], tag: str) -> int:
        """How deep the rules' paths reach into the subtree ``tag``: below that depth each
        node has its parent's verdict."""
        return max((len(r.path) for r in data_rules if r.path and r.path[0].tag == tag),
                   default=1)

    # -- reads (RFC 8341 §3.4.5) ---------------------------------------------------------
    def filter_reads(self, access: Access, rules: RuleSet, nodes: list[TopNode]
                     ) -> list[TopNode]:
        data_rules = self._data_rules(access, rules, "read")
        kept = []
        for node in nodes:
            if node.name is None:  # stored or mixed text: judged once it is parsed
                if not self._reads_anything_whole(data_rules):
                    kept.append(TopNode(None, None, lambda n=node: [self._pruned_text(
                        access, rules, data_rules, n.text())]))
                else:
                    kept.append(node)
                continue
            verdict = self.subtree(access, rules, node.namespace or "", node.name, "read")
            if verdict is True:
                kept.append(node)
            elif verdict is MIXED:
                kept.append(TopNode(node.namespace, node.name, lambda n=node: (
                    self._pruned_text(access, rules, data_rules, piece)
                    for piece in n.produce())))
        return kept

    def _reads_anything_whole(self, data_rules: tuple[Rule, ...]) -> bool:
        first = next(iter(data_rules), None)
        return first is not None and first.permit and first.module == "*" and first.path is None

    def _pruned_text(self, access: Access, rules: RuleSet, data_rules: tuple[Rule, ...],
                     text: str) -> str:
        holder = etree.fromstring(f"<x>{text}</x>".encode(), parser=_PARSER)
        known: dict[str, tuple[bool | None, int]] = {}  # entries of a list share one answer
        for element in list(holder):
            if not isinstance(element.tag, str):
                continue
            if element.tag not in known:
                qname = etree.QName(element)
                known[element.tag] = (self.subtree(access, rules, qname.namespace or "",
                                                   qname.localname, "read"),
                                      self._reach(data_rules, element.tag))
            verdict, depth = known[element.tag]
            if verdict is MIXED:
                verdict = self._prune(rules, data_rules, [element], depth)
            if not verdict:
                holder.remove(element)
        if not len(holder):
            return ""
        text = etree.tostring(holder, encoding="unicode")  # one call for the whole run
        return text[text.index(">") + 1:text.rindex("<")]

    def _prune(self, rules: RuleSet, data_rules: tuple[Rule, ...], chain: list,
               depth: int) -> bool:
        """Whether the last node of ``chain`` may be read; its unreadable descendants taken
        out of it. An entry whose key may not be read goes whole."""
        if not self._node(rules, data_rules, chain, "read"):
            return False
        element = chain[-1]
        ns = chain[0].tag[1:chain[0].tag.index("}")]
        names = tuple(local_name(n.tag) for n in chain)
        if len(chain) >= depth and (ns, names) not in self._deny_inside:
            return True  # every descendant has this node's verdict
        keys = self._kind.get((ns, names), (0, ()))[1]
        for child in list(element):
            if isinstance(child.tag, str) and not self._prune(rules, data_rules,
                                                               [*chain, child], depth):
                if local_name(child.tag) in keys:
                    return False
                element.remove(child)
        return True

    # -- writes (RFC 8341 §3.4.5) --------------------------------------------------------
    def deny_write(self, access: Access, op: str, path: str) -> None:
        with self._lock:
            self.denied_data_writes += 1
        log.info("NACM: %s may not %s %s", access.user, op, path)
        raise RpcError("access-denied", f"user {access.user} may not {op} {path}",
                       path=path)

    def check_write(self, access: Access, rules: RuleSet,
                    trees: Iterable[tuple[etree._Element | None, etree._Element | None]],
                    sessions: Any, held: Callable[[list], set] | None) -> None:
        for old, new in trees:
            if old is new:
                continue
            top = new if new is not None else old
            ns = etree.QName(top).namespace or ""
            verdicts = {op: self.subtree(access, rules, ns, etree.QName(top).localname, op)
                        for op in WRITE_OPERATIONS}
            if all(v is True for v in verdicts.values()):
                continue
            for op, chain in changes(self._kind, ns, old, new, []):
                verdict = verdicts[op]
                if verdict is MIXED:
                    verdict = self._node(rules, self._data_rules(access, rules, op), chain, op)
                if not verdict:
                    self.deny_write(access, op, self._instance_path(chain))
        if sessions is not None:
            self._check_sessions(access, rules, sessions, held)

    def _check_sessions(self, access: Access, rules: RuleSet, sessions: Any,
                        held: Callable[[list], set] | None) -> None:
        ns = self.model.ns_of["nfmig-nat"]
        verdicts = {op: self.subtree(access, rules, ns, "nat-session", op)
                    for op in WRITE_OPERATIONS}
        if all(v is True for v in verdicts.values()):
            return  # the usual case: not one entry looked at
        batch = sessions() if callable(sessions) else sessions
        if not batch:
            return
        present: set = set()
        if held is not None and any(e.operation not in ("create", "delete")
                                    for e in batch.edits):
            present = set(held(batch.keys()))
        tag = f"{{{ns}}}nat-session"
        deep: dict[str, tuple[tuple[Rule, ...], int]] = {}
        for edit in batch.edits:
            key = edit.key
            if edit.operation == "create":
                op = "create"
            elif edit.operation in ("delete", "remove"):
                if edit.operation == "remove" and key not in present:
                    continue  # removing what is not there writes nothing
                op = "delete"
            else:
                op = "update" if key in present else "create"
            verdict = verdicts[op]
            if verdict is True:
                continue
            entry = Entry(tag, edit.session)
            if verdict is MIXED:
                if op not in deep:
                    data_rules = self._data_rules(access, rules, op)
                    deep[op] = (data_rules, self._reach(data_rules, tag))
                data_rules, depth = deep[op]
                verdict = self._node(rules, data_rules, [entry], op)
                if verdict and depth > 1:  # rules that name leaves: each leaf written
                    leaves = edit.session._fields if op == "delete" else edit.present
                    verdict = all(self._node(rules, data_rules, [entry, LeafView(ns, name)], op)
                                  for name in leaves
                                  if getattr(edit.session, name) is not None or op == "delete")
            if not verdict:
                self.deny_write(access, op, self._instance_path([entry]))

    def _instance_path(self, chain: list) -> str:
        ns = etree.QName(chain[0].tag).namespace or ""
        module = self.model.module_of.get(ns, "")
        parts = []
        names: tuple[str, ...] = ()
        for i, node in enumerate(chain):
            name = local_name(node.tag)
            names = (*names, name)
            step = f"/{module}:{name}" if i == 0 else f"/{name}"
            for key in self._kind.get((ns, names), (0, ()))[1]:
                step += f"[{key}='{node_value(node, key) or ''}']"
            parts.append(step)
        return "".join(parts)

    # -- notifications (RFC 8341 §3.4.6) -------------------------------------------------
    def notification_permitted(self, access: Access, message: str) -> bool:
        ns, name = _notification_of(message)
        if access.recovery or ns == NCN_NS:
            return True
        rules = self.rules()
        if not rules.enabled:
            return True
        module = self.model.module_of.get(ns, "")
        verdict = None
        for rule in rules.rules_for(access.user, access.groups):
            if "read" in rule.operations and rule.kind in ("any", "notification") and \
                    rule.module in ("*", module) and rule.target in ("", "*", name):
                verdict = rule.permit
                break
        if verdict is None:
            verdict = (ns, name) not in self._rpc_denied and rules.read_default
        if not verdict:
            with self._lock:
                self.denied_notifications += 1
        return verdict

    def filtered(self, access: Access, send: Callable[[str], None]) -> Callable[[str], None]:
        """``send`` for one NETCONF subscriber: each notification judged as it goes out."""
        def judged(message: str) -> None:
            if self.notification_permitted(access, message):
                send(message)
        return judged

    # -- operational state -----------------------------------------------------------------
    def state_node(self) -> TopNode:
        return Counters(NACM_NS, "nacm", lambda: [
            f'<nacm xmlns="{NACM_NS}"><denied-operations>{self.denied_operations}'
            f"</denied-operations><denied-data-writes>{self.denied_data_writes}"
            f"</denied-data-writes><denied-notifications>{self.denied_notifications}"
            "</denied-notifications></nacm>"])


@dataclass(frozen=True)
class Counters(TopNode):
    """/nacm's state: joined to /nacm's configuration where a reply has both."""


def _with_counters(nodes: list[TopNode]) -> list[TopNode]:
    counters = next((n for n in nodes if isinstance(n, Counters)), None)
    config = next((n for n in nodes if n.namespace == NACM_NS and n.name == "nacm"
                   and not isinstance(n, Counters)), None)
    if counters is None or config is None:
        return nodes

    def joined() -> list[str]:
        tree = etree.fromstring(config.text().encode(), parser=_PARSER)
        state = etree.fromstring(counters.text().encode(), parser=_PARSER)
        # in schema order: after the leaves that come first, before groups and rule-list
        later = next((i for i, c in enumerate(tree) if isinstance(c.tag, str) and
                      local_name(c.tag) in ("groups", "rule-list")), len(tree))
        for offset, leaf in enumerate(list(state)):  # a copy: insert moves each one
            tree.insert(later + offset, leaf)
        return [etree.tostring(tree, encoding="unicode")]

    merged = TopNode(NACM_NS, "nacm", joined)
    return [merged if n is config else n for n in nodes if n is not counters]


def _notification_of(message: str) -> tuple[str, str]:
    """The namespace and name of a notification message's content."""
    match = _CONTENT.search(message)
    if match is not None and (match.group(1) or None) == (match.group(3) or None):
        return match.group(4), match.group(2)
    root = etree.fromstring(message.encode(), parser=_PARSER)
    content = next((c for c in root if isinstance(c.tag, str)
                    and local_name(c.tag) != "eventTime"), None)
    if content is None:
        return "", ""
    qname = etree.QName(content)
    return qname.namespace or "", qname.localname


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False

