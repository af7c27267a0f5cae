"""The NACM configuration (RFC 8341, /nacm in running): the rule-lists shipped with the
server, edits of the /nacm tree, the tree compiled into rules (:class:`RuleSet`) for
:mod:`.nacm` to enforce, and data nodes as a rule's path sees them.

Like the nat-policy, /nacm is small: it is held as an XML tree, edited with
:func:`.tree_edit.edit_node`, validated whole by libyang. Rule paths are stored in one form
whatever the client wrote: every step and key qualified by its module's name, each name
bound on the path element, so the XML reads back valid and the JSON is RFC 7951's form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import libyang
from lxml import etree

from . import errors
from .errors import RpcError
from .restconf_codec import JsonWriter, Node
from .schema import Schema, module_ns
from .tree_edit import edited

NACM_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
NACM_MODULE = "ietf-netconf-acm"
NACM_TAG = f"{{{NACM_NS}}}nacm"
NACM_PATH = "/ietf-netconf-acm:nacm"
# RFC 5277's create-subscription has no YANG module in this server; rules name it by the
# module name RFC 5277 gives its schema.
NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NOTIF_MODULE = "notifications"
ACCESS_OPERATIONS = frozenset({"create", "read", "update", "delete", "exec"})
WRITE_OPERATIONS = ("create", "update", "delete")

# The group users get when the users file names none for them: every users file written
# before groups existed, and `nfmig adduser` without --group, keep working as they did.
LEGACY_GROUP = "admin"


def _rule(name: str, module: str, access: str, action: str, comment: str,
          kind: str | None = None, target: str = "*") -> str:
    typed = f"<{kind}>{target}</{kind}>" if kind else ""
    return (f"<rule><name>{name}</name><module-name>{module}</module-name>{typed}"
            f"<access-operations>{access}</access-operations><action>{action}</action>"
            f"<comment>{comment}</comment></rule>")


def _exec(module: str, *rpcs: str, why: str = "") -> str:
    return "".join(_rule(f"{module}-{rpc}" if rpc != "*" else f"{module}-operations", module,
                         "exec", "permit", why or f"{module}:{rpc}", "rpc-name", rpc)
                   for rpc in rpcs)


_DENY_OTHER_EXEC = _rule("deny-other-operations", "*", "exec", "deny",
                         "Any other protocol operation, now or added later.", "rpc-name")
_READS = (_exec("ietf-netconf", "get", "get-config", "validate")
          + _exec("ietf-netconf-nmda", "get-data") + _exec("ietf-netconf-monitoring",
                                                          "get-schema")
          + _exec(NOTIF_MODULE, "create-subscription")
          # YANG-Push: a subscription is a read that goes on (a hot standby's, say)
          + _exec("ietf-subscribed-notifications", "establish-subscription",
                  "modify-subscription", "delete-subscription")
          + _exec("ietf-yang-push", "resync-subscription"))

# The rule-lists a server starts with while its startup holds no /nacm. Order matters (the
# first rule that matches decides, across the rule-lists of all of a user's groups): admin's
# permit-all comes first, so a user who is also in another group keeps it.
DEFAULT_CONFIG = (
    f'<nacm xmlns="{NACM_NS}">'
    "<groups><group><name>admin</name></group><group><name>migrator</name></group>"
    "<group><name>operator</name></group></groups>"
    "<rule-list><name>admin</name><group>admin</group>"
    + _rule("permit-all", "*", "*", "permit", "Everything. Users without a group line in "
            "the users file are in this group.")
    + "</rule-list><rule-list><name>migrator</name><group>migrator</group>"
    + _rule("nat-data", "nfmig-nat", "create read update delete", "permit",
            "Read and write sessions and the policy: a migration writes sessions, a "
            "switchover moves gateway addresses, --with-policy merges the policy.")
    + _rule("firewall-data", "nfmig-firewall", "create read update delete", "permit",
            "A firewall's pinholes and policy move with its connections.")
    + _exec("nfmig-nat", "*", why="freeze, thaw, announce-migration, track-changes, changes, "
            "session-digest.")
    + _READS
    + _exec("ietf-netconf", "edit-config", "lock", "unlock", "commit", "cancel-commit",
            "discard-changes")
    + _exec("ietf-netconf", "kill-session", why="A delete resent after its reply was lost "
            "first ends the migrator's old session.")
    + _exec("ietf-netconf-nmda", "edit-data")
    + _DENY_OTHER_EXEC
    + "</rule-list><rule-list><name>operator</name><group>operator</group>"
    + _rule("read-access-control", NACM_MODULE, "read", "permit",
            "Read-only means all of it, the access control too.")
    + _exec("nfmig-nat", "session-digest", why="A digest of the sessions: a read.")
    + _READS
    + _rule("deny-writes", "*", "create update delete", "deny", "No writes, whatever the "
            "write-default.")
    + _DENY_OTHER_EXEC
    + "</rule-list></nacm>")


def default_tree() -> etree._Element:
    return etree.fromstring(DEFAULT_CONFIG)


# -- paths ---------------------------------------------------------------------------------
class Step(NamedTuple):
    """One node of a rule's path: its tag, and the key (or ``.``) values it must have."""

    tag: str  # {namespace}name
    predicates: tuple[tuple[str, str], ...] = ()


_NAME = r"[A-Za-z_][\w.-]*"
_STEP = re.compile(rf"/(?:({_NAME}):)?({_NAME})")
_PREDICATE = re.compile(rf"\[\s*(?:(?:{_NAME}:)?({_NAME})|(\.))\s*=\s*"
                        r"""(?:'([^']*)'|"([^"]*)")\s*\]""")


def parse_path(text: str, resolve: Callable[[str], str | None]) -> tuple[Step, ...]:
    """The steps of a node-instance-identifier (RFC 8341): ``/prefix:name`` steps, each with
    optional ``[key='value']`` (or ``[.='value']``) predicates. A prefix is resolved by
    ``resolve`` (an XML prefix or a module name, to a namespace); a step without one is in
    its parent's module (the JSON form). Raises ValueError."""
    text = text.strip()
    steps: list[Step] = []
    ns: str | None = None
    pos = 0
    while pos < len(text):
        match = _STEP.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected {text[pos:pos + 20]!r}")
        prefix, name = match.groups()
        if prefix is not None:
            ns = resolve(prefix)
            if ns is None:
                raise ValueError(f"no module for the prefix {prefix!r}")
        if ns is None:
            raise ValueError(f"the first step {name!r} names no module")
        pos = match.end()
        predicates = []
        while pos < len(text) and text[pos] == "[":
            found = _PREDICATE.match(text, pos)
            if found is None:
                raise ValueError(f"a predicate must be [key='value'] or [.='value'], not "
                                 f"{text[pos:pos + 30]!r}")
            key, dot, single, double = found.groups()
            predicates.append((dot or key, single if single is not None else double))
            pos = found.end()
        steps.append(Step(f"{{{ns}}}{name}", tuple(predicates)))
    if not steps:
        raise ValueError("an empty path")
    return tuple(steps)


def format_path(steps: tuple[Step, ...], module_of: Callable[[str], str],
                json: bool = False) -> str:
    """The stored (XML) form: every name qualified by its module's name; or RFC 7951's
    JSON form, where a name is qualified only where its module changes."""
    out = []
    last = None
    for step in steps:
        ns, _, name = step.tag[1:].partition("}")
        module = module_of(ns)
        out.append(f"/{module}:{name}" if not json or module != last else f"/{name}")
        last = module
        for key, value in step.predicates:
            quoted = f"'{value}'" if "'" not in value else f'"{value}"'
            qualified = key if key == "." or json else f"{module}:{key}"
            out.append(f"[{qualified}={quoted}]")
    return "".join(out)


class NacmJsonWriter(JsonWriter):
    """RESTCONF's JSON writer, with /nacm's rule paths in RFC 7951's form (held in the
    XML form, whose prefixes JSON would repeat where it must not)."""

    def __init__(self, index, module_of: dict[str, str]):
        super().__init__(index)
        self._module_of = module_of

    def value(self, el: etree._Element, node: Node):
        if node.kind == "leaf" and node.name == "path" and node.ns == NACM_NS:
            try:
                steps = parse_path(el.text or "", lambda prefix: el.nsmap.get(prefix))
            except ValueError:
                return el.text or ""
            return format_path(steps, lambda ns: self._module_of.get(ns, ""), json=True)
        return super().value(el, node)


# -- the compiled configuration ------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    name: str
    module: str  # a module name, or "*"
    kind: str  # "any" (no rule-type), "rpc", "notification" or "data" (a path)
    target: str  # rpc-name or notification-name ("*" matches any); "" otherwise
    path: tuple[Step, ...] | None
    operations: frozenset[str]
    permit: bool


@dataclass
class RuleSet:
    """/nacm as the engine reads it, the model's defaults filled in."""

    enabled: bool = True
    read_default: bool = True
    write_default: bool = False
    exec_default: bool = True
    external_groups: bool = True
    members: dict[str, set[str]] = field(default_factory=dict)  # group -> user names
    rule_lists: list[tuple[frozenset[str], tuple[Rule, ...]]] = field(default_factory=list)
    _cache: dict[tuple, tuple[Rule, ...]] = field(default_factory=dict)

    def rules_for(self, user: str, external: frozenset[str]) -> tuple[Rule, ...]:
        """The rules of every rule-list of the user's groups (those the users file gives,
        when enable-external-groups, and those /nacm/groups lists the user in), in order."""
        key = (user, external)
        rules = self._cache.get(key)
        if rules is None:
            groups = set(external) if self.external_groups else set()
            groups |= {g for g, users in self.members.items() if user in users}
            rules = tuple(r for names, rule_list in self.rule_lists
                          if "*" in names or names & groups for r in rule_list)
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[key] = rules
        return rules


def _leaf(parent: etree._Element, name: str, default: str | None = None) -> str | None:
    text = parent.findtext(f"{{{NACM_NS}}}{name}")
    return default if text is None else text.strip()


def compile_rules(tree: etree._Element | None, resolve: Callable[[etree._Element, str],
                                                                  str | None]) -> RuleSet:
    """The RuleSet of a /nacm tree (None: no /nacm, the defaults alone). ``resolve`` finds
    the namespace of a path's prefix in the context of its element. Raises ValueError for a
    path the engine cannot evaluate."""
    rules = RuleSet()
    if tree is None:
        return rules
    rules.enabled = _leaf(tree, "enable-nacm", "true") == "true"
    rules.read_default = _leaf(tree, "read-default", "permit") == "permit"
    rules.write_default = _leaf(tree, "write-default", "deny") == "permit"
    rules.exec_default = _leaf(tree, "exec-default", "permit") == "permit"
    rules.external_groups = _leaf(tree, "enable-external-groups", "true") == "true"
    q = f"{{{NACM_NS}}}"
    for group in tree.iterfind(f"{q}groups/{q}group"):
        rules.members[_leaf(group, "name", "")] = {
            (u.text or "").strip() for u in group.iterfind(f"{q}user-name")}
    for rule_list in tree.iterfind(f"{q}rule-list"):
        names = frozenset((g.text or "").strip() for g in rule_list.iterfind(f"{q}group"))
        compiled = []
        for rule in rule_list.iterfind(f"{q}rule"):
            kind, target, path = "any", "", None
            if (rpc := _leaf(rule, "rpc-name")) is not None:
                kind, target = "rpc", rpc
            elif (notification := _leaf(rule, "notification-name")) is not None:
                kind, target = "notification", notification
            elif (element := rule.find(f"{q}path")) is not None:
                kind = "data"
                path = parse_path(element.text or "",
                                  lambda prefix, el=element: resolve(el, prefix))
            access = (_leaf(rule, "access-operations", "*") or "*").split()
            compiled.append(Rule(_leaf(rule, "name", ""), _leaf(rule, "module-name", "*"),
                                 kind, target, path,
                                 ACCESS_OPERATIONS if "*" in access else frozenset(access),
                                 _leaf(rule, "action") == "permit"))
        rules.rule_lists.append((names, tuple(compiled)))
    return rules


# -- edits ---------------------------------------------------------------------------------
class NacmModel:
    """Edits of /nacm planned over a tree, checked by libyang and by the rule compiler, the
    rule paths stored in their one form."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self._schema_node = schema.find(NACM_PATH)
        self.ns_of = {m.name(): module_ns(m) for m in schema.ctx}
        self.module_of = {ns: name for name, ns in self.ns_of.items()}
        self.module_of.setdefault(NOTIF_NS, NOTIF_MODULE)

    def resolve(self, element: etree._Element, prefix: str) -> str | None:
        """A path's prefix: an XML prefix bound where the path is, else a module name (the
        form JSON bodies write, which reach us as XML text without bindings)."""
        return element.nsmap.get(prefix) or self.ns_of.get(prefix)

    def plan(self, current: etree._Element | None, edits: list[etree._Element]
             ) -> etree._Element | None:
        """The /nacm that ``edits`` make of ``current`` (which is not changed), checked;
        None when they leave none."""
        if not edits:
            return current
        tree = edited(current, edits, self._schema_node, NACM_PATH)
        if tree is not None:
            self._normalise_paths(tree)
            self.check(tree)
        return tree

    def _normalise_paths(self, tree: etree._Element) -> None:
        for element in list(tree.iter(f"{{{NACM_NS}}}path")):
            try:
                steps = parse_path(element.text or "",
                                   lambda prefix, el=element: self.resolve(el, prefix))
            except ValueError as exc:
                raise errors.invalid_value(f"rule path {element.text!r}: {exc}",
                                           path=f"{NACM_PATH}/rule-list/rule/path") from None
            text = format_path(steps, lambda ns: self.module_of.get(ns, ""))
            modules = {self.module_of.get(s.tag[1:].partition("}")[0], "") for s in steps}
            nsmap = {None: NACM_NS, **{m: self.ns_of[m] for m in modules if m in self.ns_of}}
            stored = etree.Element(element.tag, nsmap=nsmap)
            stored.text = text
            element.getparent().replace(element, stored)

    def check(self, tree: etree._Element) -> None:
        """Raise the RpcError libyang's verdict (or the compiler's) makes of ``tree``."""
        self.schema.check_config(etree.tostring(tree))
        try:
            compile_rules(tree, self.resolve)
        except ValueError as exc:
            raise RpcError("invalid-value", f"a rule path cannot be evaluated: {exc}",
                           path=f"{NACM_PATH}/rule-list/rule/path") from None


# -- nodes as rules see them -------------------------------------------------------------
class Entry:
    """A nat-session entry being written, as a node of a path."""

    __slots__ = ("tag", "session")

    def __init__(self, tag: str, session: Any):
        self.tag = tag
        self.session = session


class LeafView:
    """A leaf of such an entry: no value a path predicate could test."""

    __slots__ = ("tag",)

    def __init__(self, ns: str, name: str):
        self.tag = f"{{{ns}}}{name}"


def local_name(tag: str) -> str:
    """``name`` of ``{namespace}name``."""
    return tag.rpartition("}")[2]


def node_value(node: Any, key: str) -> str | None:
    """The text of a node's key leaf (``.``: its own), as a path predicate tests it."""
    if isinstance(node, Entry):
        value = getattr(node.session, key, None)
        return None if value is None else str(value)
    if isinstance(node, LeafView):
        return None
    if key == ".":
        return (node.text or "").strip()
    wanted = node.tag[:node.tag.index("}") + 1] + key
    for child in node:  # keys come first: faster than a findtext path per call
        if child.tag == wanted:
            return (child.text or "").strip()
    return None


def path_matches(path: tuple, chain: list) -> bool:
    """Whether the node at the end of ``chain`` is the path's node or one of its
    descendants."""
    if len(path) > len(chain):
        return False
    for step, node in zip(path, chain, strict=False):
        if node.tag != step.tag:
            return False
        for key, value in step.predicates:
            if node_value(node, key) != value:
                return False
    return True


def _identity(kind: dict, ns: str, names: tuple[str, ...], element: etree._Element) -> Any:
    nodetype, keys = kind.get((ns, names), (0, ()))
    if nodetype == libyang.SNode.LEAFLIST:
        return (element.tag, (element.text or "").strip())
    if keys:
        return (element.tag, tuple(node_value(element, k) for k in keys))
    return element.tag


def changes(kind: dict, ns: str, old: etree._Element | None, new: etree._Element | None,
             chain: list) -> Iterator[tuple[str, list]]:
    """What turning ``old`` into ``new`` (the same node) does, node by node: (create,
    update or delete, the node's chain from the top)."""
    here = [*chain, new if new is not None else old]
    if old is None or new is None:
        op = "create" if old is None else "delete"
        for node in here[-1].iter():
            if isinstance(node.tag, str):
                yield op, [*chain, *_ancestry(here[-1], node)]
        return
    old_children = [c for c in old if isinstance(c.tag, str)]
    new_children = [c for c in new if isinstance(c.tag, str)]
    if not old_children and not new_children:
        if (old.text or "").strip() != (new.text or "").strip():
            yield "update", here
        return
    names = tuple(local_name(n.tag) for n in here)
    before = {_identity(kind, ns, (*names, local_name(c.tag)), c): c for c in old_children}
    after = {_identity(kind, ns, (*names, local_name(c.tag)), c): c for c in new_children}
    for identity, child in after.items():
        yield from changes(kind, ns, before.get(identity), child, here)
    for identity, child in before.items():
        if identity not in after:
            yield from changes(kind, ns, child, None, here)


def _ancestry(top: etree._Element, node: etree._Element) -> list[etree._Element]:
    chain = [node]
    while chain[0] is not top:
        chain.insert(0, chain[0].getparent())
    return chain
