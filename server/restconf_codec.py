"""RESTCONF's representations: RFC 7951 JSON to and from the XML the datastores speak,
request URIs (RFC 8040 §3.5.3 api-path) to data paths, and the errors document.

Conversion walks the libyang schema, so a member the model does not have is refused by name
and every value gets the JSON type RFC 7951 gives its YANG type. The bulk list (nat-session)
has its own column-wise writer, as session_codec has for XML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from urllib.parse import unquote
from xml.sax.saxutils import escape, quoteattr

import libyang
from lxml import etree
from nfmig.nf_backends.base import SESSION_FIELDS, Session

from . import errors
from .errors import RpcError
from .schema import Schema, module_ns

RESTCONF_NS = "urn:ietf:params:xml:ns:yang:ietf-restconf"
JSON = "application/yang-data+json"
WD_NS = "urn:ietf:params:xml:ns:netconf:default:1.0"  # RFC 6243's default attribute
WD_DEFAULT = f"{{{WD_NS}}}default"
WD_ANNOTATION = {"ietf-netconf-with-defaults:default": True}  # the same, RFC 7952 JSON
XML = "application/yang-data+xml"
_NUMBER = {libyang.Type.INT8, libyang.Type.INT16, libyang.Type.INT32, libyang.Type.UINT8,
           libyang.Type.UINT16, libyang.Type.UINT32}
_NUMBER_TEXT = {libyang.Type.INT64, libyang.Type.UINT64, libyang.Type.DEC64}
_KINDS = {libyang.SNode.CONTAINER: "container", libyang.SNode.LIST: "list",
          libyang.SNode.LEAF: "leaf", libyang.SNode.LEAFLIST: "leaf-list",
          libyang.SNode.ANYDATA: "anydata", libyang.SNode.ANYXML: "anydata"}


@dataclass
class Node:
    """What conversion needs of one schema node."""

    name: str
    module: str
    ns: str
    kind: str  # container | list | leaf | leaf-list | anydata
    keys: tuple[str, ...] = ()
    value: str = "string"  # number | text-number | boolean | empty | identityref | union | string
    config: bool = True
    user_ordered: bool = False
    snode: libyang.SNode | None = field(default=None, repr=False)
    _children: dict[str, Node] | None = field(default=None, repr=False)


class SchemaIndex:
    """Schema nodes by name, top level and below, made once per server."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.ns_of = {m.name(): module_ns(m) for m in schema.ctx}
        self.module_of = {ns: name for name, ns in self.ns_of.items()}
        self.top: dict[str, Node] = {}
        self.rpcs: dict[str, libyang.SNode] = {}
        self.notifs: dict[str, Node] = {}
        for module in schema.ctx:
            if not module.implemented():
                continue
            for snode in module.children():
                if snode.nodetype() == libyang.SNode.RPC:
                    self.rpcs[f"{module.name()}:{snode.name()}"] = snode
                elif snode.nodetype() == libyang.SNode.NOTIF:
                    self.notifs[f"{module.name()}:{snode.name()}"] = Node(
                        snode.name(), module.name(), self.ns_of[module.name()], "container",
                        snode=snode, config=False)
                elif snode.nodetype() in _KINDS:
                    node = self._node(snode)
                    self.top[f"{node.module}:{node.name}"] = node

    def _node(self, snode: libyang.SNode) -> Node:
        module = snode.module().name()
        kind = _KINDS[snode.nodetype()]
        node = Node(snode.name(), module, self.ns_of[module], kind, snode=snode,
                    config=not snode.config_false())
        if kind == "list":
            node.keys = tuple(k.name() for k in snode.keys())
        if kind in ("list", "leaf-list"):
            node.user_ordered = bool(snode.cdata.flags & 0x40)  # LYS_ORDBY_USER
        if kind in ("leaf", "leaf-list"):
            node.value = _value_kind(snode.type())
        return node

    def children(self, node: Node) -> dict[str, Node]:
        if node._children is None:  # built whole, then shown: requests run in threads
            node._children = {child.name(): self._node(child)
                              for child in (node.snode.children() if node.kind in (
                                  "container", "list") else ()) if child.nodetype() in _KINDS}
        return node._children

    def rpc_input(self, name: str) -> Node | None:
        """The input of an rpc as a container-like node (None: no such rpc)."""
        snode = self.rpcs.get(name)
        if snode is None:
            return None
        module, local = name.split(":")
        node = Node(local, module, self.ns_of[module], "container")
        node._children = {}
        for child in snode.input().children() if snode.input() else ():
            if child.nodetype() in _KINDS:
                node._children[child.name()] = self._node(child)
        return node


def _value_kind(ytype: libyang.Type) -> str:
    base = ytype.base()
    if base == libyang.Type.LEAFREF:
        return _value_kind(ytype.leafref_type())
    if base == libyang.Type.UNION:
        # RFC 7951 §6.10: each member type's own JSON type; one kind when they agree.
        kinds = {_value_kind(t) for t in ytype.union_types()}
        return kinds.pop() if len(kinds) == 1 else "union"
    if base in _NUMBER:
        return "number"
    if base in _NUMBER_TEXT:
        return "text-number"
    if base == libyang.Type.BOOL:
        return "boolean"
    if base == libyang.Type.EMPTY:
        return "empty"
    if base == libyang.Type.IDENT:
        return "identityref"
    return "string"


# -- api-path ------------------------------------------------------------------------------
@dataclass
class Step:
    node: Node
    keys: tuple[str, ...] | None  # list key values (or the leaf-list value) from the URI


@dataclass
class Target:
    """A data resource named by a request URI: the steps from the top, ``[]`` for the
    datastore itself."""

    steps: list[Step]

    @property
    def node(self) -> Node | None:
        return self.steps[-1].node if self.steps else None

    def xpath(self) -> str:
        """The XPath 1.0 selecting the resource in data whose prefixes are module names."""
        parts = []
        for step in self.steps:
            name = f"{step.node.module}:{step.node.name}"
            if step.keys and step.node.kind == "list":
                name += "".join(f"[{step.node.module}:{k}={_literal(v)}]"
                                for k, v in zip(step.node.keys, step.keys, strict=True))
            elif step.keys:
                name += f"[.={_literal(step.keys[0])}]"
            parts.append(name)
        return "/" + "/".join(parts)

    def instance_path(self) -> str:
        """The resource as an instance identifier (error-path, Location)."""
        parts = []
        parent = None
        for step in self.steps:
            name = step.node.name if parent == step.node.module else \
                f"{step.node.module}:{step.node.name}"
            parent = step.node.module
            if step.keys and step.node.kind == "list":
                name += "".join(f"[{k}={_literal(v)}]"
                                for k, v in zip(step.node.keys, step.keys, strict=True))
            elif step.keys:
                name += f"[.={_literal(step.keys[0])}]"
            parts.append(name)
        return "/" + "/".join(parts)

    def wrap(self, inner: str, upto: int | None = None) -> str:
        """``inner`` placed inside the resource's ancestors (and their keys), as XML."""
        steps = self.steps[:upto] if upto is not None else self.steps
        opens, closes = [], []
        parent_ns = None
        for step in steps:
            node = step.node
            decl = f' xmlns="{node.ns}"' if node.ns != parent_ns else ""
            parent_ns = node.ns
            keys = "".join(f"<{k}>{escape(v)}</{k}>"
                           for k, v in zip(node.keys, step.keys or (), strict=False))
            opens.append(f"<{node.name}{decl}>{keys}")
            closes.append(f"</{node.name}>")
        return "".join(opens) + inner + "".join(reversed(closes))


def _literal(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def parse_api_path(index: SchemaIndex, path: str, base: Target | None = None) -> Target:
    """The data resource of ``path`` (after /data/ or /ds/NAME/, or below ``base``), checked
    against the model. Unknown nodes are 400 unknown-element, wrong key counts 400
    invalid-value (RFC 8040 §3.5.3)."""
    steps: list[Step] = list(base.steps) if base else []
    parent: Node | None = base.node if base else None
    segments = [s for s in path.split("/") if s != ""]
    for position, raw in enumerate(segments):
        name, has_keys, key_text = raw.partition("=")
        name = unquote(name)
        module, _, local = name.rpartition(":")
        if parent is None:
            if not module:
                raise errors.unknown_element(f"{name!r}: the first node of a resource names "
                                             "its module (module:node)", name, type="protocol")
            node = index.top.get(name)
        else:
            node = index.children(parent).get(local)
            if node is not None and module and module != node.module:
                node = None
        if node is None:
            raise errors.unknown_element(f"{name!r} is not a data node here", local or name,
                                         type="protocol")
        keys = None
        if has_keys:
            keys = tuple(unquote(k) for k in key_text.split(","))
            wanted = len(node.keys) if node.kind == "list" else 1
            if node.kind not in ("list", "leaf-list") or len(keys) != wanted:
                raise errors.invalid_value(
                    f"{node.name} takes {wanted if node.kind in ('list', 'leaf-list') else 0} "
                    f"key values in the URI, not {len(keys)}", info={"bad-element": node.name})
        elif node.kind == "list" and position < len(segments) - 1:
            raise errors.invalid_value(f"{node.name} is a list: name one entry "
                                       f"({node.name}=KEY,...) to go below it",
                                       info={"bad-element": node.name})
        steps.append(Step(node, keys))
        parent = node
    return Target(steps)


# -- XML -> JSON ---------------------------------------------------------------------------
class JsonWriter:
    """XML data (lxml elements) to RFC 7951 JSON values, guided by the schema."""

    def __init__(self, index: SchemaIndex):
        self.index = index

    def members(self, elements: Iterable[etree._Element], parent: Node | None,
                out: dict | None = None) -> dict:
        """The JSON members for sibling elements (lists and leaf-lists gathered)."""
        out = {} if out is None else out
        for el in elements:
            if not isinstance(el.tag, str):
                continue
            qname = etree.QName(el)
            node = self._node_of(qname, parent)
            if node is None:
                continue  # not in the model (cannot happen for our own data)
            name = node.name if parent is not None and parent.module == node.module else \
                f"{node.module}:{node.name}"
            value = self.value(el, node)
            if node.kind in ("list", "leaf-list"):
                out.setdefault(name, []).append(value)
            else:
                out[name] = value
                if node.kind == "leaf" and el.get(WD_DEFAULT) == "true":
                    out[f"@{name}"] = WD_ANNOTATION
        return out

    def _node_of(self, qname: etree.QName, parent: Node | None) -> Node | None:
        if parent is None:
            name = f"{self.index.module_of.get(qname.namespace or '')}:{qname.localname}"
            return self.index.top.get(name) or self.index.notifs.get(name)
        return self.index.children(parent).get(qname.localname)

    def value(self, el: etree._Element, node: Node):
        if node.kind in ("container", "list"):
            return self.members(el, node)
        if node.kind == "anydata":
            return {}
        text = el.text or ""
        kind = node.value
        if kind == "number":
            try:
                return int(text)
            except ValueError:
                return text
        if kind == "boolean":
            return text.strip() == "true"
        if kind == "empty":
            return [None]
        if kind == "identityref":
            prefix, _, local = text.strip().rpartition(":")
            module = self.index.module_of.get(el.nsmap.get(prefix or None, ""), node.module)
            return f"{module}:{local}"
        return text


# -- JSON -> XML ---------------------------------------------------------------------------
class XmlWriter:
    """RFC 7951 JSON values to XML text, guided by the schema: unknown members and values of
    the wrong JSON type are refused here, the model's own checks come after."""

    def __init__(self, index: SchemaIndex):
        self.index = index

    def members(self, obj: dict, parent: Node | None, path: str = "") -> str:
        if not isinstance(obj, dict):
            raise errors.invalid_value(f"{path or '/'}: expected a JSON object",
                                       path=path or None)
        out = []
        children = self.index.children(parent) if parent is not None else None
        for name, value in obj.items():
            node = children.get(name) if children is not None else None
            if node is not None and node.kind == "leaf" and node.value != "identityref":
                # the common case, a plain leaf of the parent's module, without detours
                text = _LEAF_TEXT.get((node.value, type(value)), _no_text)(value)
                if text is None:
                    text = self.value(value, node, f"{path}/{name}")
                out.append(f"<{name}>{text}</{name}>")
                continue
            node = self._node_of(name, parent, path)
            xmlns = f' xmlns="{node.ns}"' if parent is None or parent.ns != node.ns else ""
            where = f"{path}/{name}"
            if node.kind in ("list", "leaf-list"):
                if not isinstance(value, list):
                    raise errors.invalid_value(f"{where}: a {node.kind} is a JSON array",
                                               path=where, info={"bad-element": node.name})
                items = value
            else:
                items = [value]
            for item in items:
                text = self.value(item, node, where)
                attrs = xmlns
                if node.value == "identityref" and ":" in text and node.kind != "container":
                    module, _, local = text.partition(":")
                    attrs += f" xmlns:{module}={quoteattr(self.index.ns_of.get(module, ''))}"
                out.append(f"<{node.name}{attrs}>{text}</{node.name}>")
        return "".join(out)

    def _node_of(self, name: str, parent: Node | None, path: str) -> Node:
        module, _, local = name.rpartition(":")
        if parent is None:
            if not module:
                raise errors.unknown_element(f"top-level member {name!r} needs its module "
                                             "name (module:node)", name, path=path or None)
            node = self.index.top.get(name)
            if node is None and module not in self.index.ns_of:
                raise errors.unknown_namespace(f"no module {module!r} here", name, module)
        else:
            node = self.index.children(parent).get(local)
            if node is not None and module and module != node.module:
                node = None
        if node is None:
            raise errors.unknown_element(f"{path or '/'} has no member {name!r}", local,
                                         path=path or None)
        return node

    def value(self, value, node: Node, where: str) -> str:
        if node.kind in ("container", "list"):
            return self.members(value, node, where)
        if node.kind == "anydata":
            raise errors.not_supported(f"{where}: anydata input is not supported",
                                       type="application")
        kind = node.value
        bad = None
        if kind == "number":
            if isinstance(value, bool) or not isinstance(value, int):
                bad = "a JSON number"
        elif kind == "text-number":
            if not isinstance(value, str):  # RFC 7951 §6.1 (as libyang's strict parsing)
                bad = "a JSON string holding the number"
        elif kind == "union":
            if value is None or isinstance(value, list | dict | float):
                bad = "a JSON string, number or boolean as one of its member types is"
            elif isinstance(value, bool):
                value = "true" if value else "false"
        elif kind == "boolean":
            if not isinstance(value, bool):
                bad = "true or false"
            value = "true" if value else "false"
        elif kind == "empty":
            if value != [None]:
                bad = "[null]"
            value = ""
        elif kind == "identityref":
            if not isinstance(value, str):
                bad = "a JSON string"
        elif not isinstance(value, str):
            bad = "a JSON string"
        if bad:
            shown = json.dumps(value)[:80]  # an error stays small, whatever was sent
            raise errors.invalid_value(f"{where}: {node.name} is {bad} in JSON "
                                       f"(RFC 7951), not {shown}", path=where,
                                       info={"bad-element": node.name})
        return escape(str(value))


def _string_text(value: str) -> str:
    return escape(value) if "&" in value or "<" in value or ">" in value else value


def _no_text(value) -> None:
    return None


# The XML text of a leaf's JSON value by (value kind, JSON type), when that pair is valid as
# it stands; other pairs go through XmlWriter.value, which refuses them with the reason.
_LEAF_TEXT: dict[tuple[str, type], Callable] = {
    ("number", int): str, ("text-number", str): _string_text, ("string", str): _string_text,
    ("boolean", bool): lambda v: "true" if v else "false",
}


# -- nat-session as JSON, column-wise ------------------------------------------------------
def sessions_to_json(sessions: Iterable[Session], top_level: bool = False) -> Iterator[str]:
    """One JSON object text per session (RFC 7951: 64-bit counters as strings), leaves in
    model order, absent leaves left out; comma-separated pieces of one array's content."""
    text64 = {"orig_packets", "orig_bytes", "reply_packets", "reply_bytes"}
    strings = {"protocol", "src_address", "dst_address", "translated_address",
               "translated_dst_address", "tcp_state"}
    templates: dict[tuple[bool, ...], tuple[str, Callable]] = {}
    first = True
    for s in sessions:
        present = tuple([v is not None for v in s])
        template = templates.get(present)
        if template is None:
            fields = [i for i, p in enumerate(present) if p]
            parts = []
            for i in fields:
                name = SESSION_FIELDS[i]
                quoted = name in strings or name in text64
                parts.append(f'"{name}":"%s"' if quoted else f'"{name}":%s')
            pick = itemgetter(*fields)
            template = templates[present] = (
                "{" + ",".join(parts) + "}",
                (lambda s, pick=pick: (pick(s),)) if len(fields) == 1 else pick)
        # Addresses, enumerations and numbers need no JSON escaping.
        piece = template[0] % template[1](s)
        if first:
            first = False
            yield piece
        else:
            yield "," + piece


# -- errors --------------------------------------------------------------------------------
STATUS = {
    "in-use": 409, "invalid-value": 400, "too-big": 413, "missing-attribute": 400,
    "bad-attribute": 400, "unknown-attribute": 400, "bad-element": 400,
    "unknown-element": 400, "unknown-namespace": 400, "access-denied": 403,
    "lock-denied": 409, "resource-denied": 409, "rollback-failed": 500,
    "data-exists": 409, "data-missing": 409, "operation-not-supported": 501,
    "operation-failed": 500, "partial-operation": 500, "malformed-message": 400,
    "missing-element": 400,
}
# Validation rules of the model (must, min/max-elements) fail the client's data, not the
# server: RFC 8040 §7 allows 412 for operation-failed, and a 500 would blame the server.
CLIENT_APP_TAGS = ("must-violation", "too-many-elements", "too-few-elements",
                   "data-not-unique")


def status_of(error: RpcError) -> int:
    """RFC 8040 §7's status code for an error-tag (one table for the whole server)."""
    status = getattr(error, "status", None)
    if status:
        return status
    if error.tag == "operation-failed" and error.app_tag in CLIENT_APP_TAGS:
        return 412
    return STATUS.get(error.tag, 500)


_INDEX: list[SchemaIndex] = []
_STEP = re.compile(r"/(?:([\w.-]+):)?([\w.-]+)((?:\[[\w.-]+='[^']*'\])*)")


def _instance_path(path: str | None) -> bool:
    """Whether ``path`` is an instance-identifier error-path may carry: nodes of the model,
    each list with all its keys. The datastore layer names a refused entry by the keys it
    could read, which may be fewer; that text then goes into the message instead."""
    if not path or not _INDEX:
        return False
    index, parent, pos = _INDEX[0], None, 0
    while pos < len(path):
        match = _STEP.match(path, pos)
        if match is None:
            return False
        module, name, predicates = match.groups()
        if parent is None:
            node = index.top.get(f"{module}:{name}") if module else None
        else:
            node = index.children(parent).get(name)
        if node is None:
            return False
        keys = dict(re.findall(r"\[([\w.-]+)='([^']*)'\]", predicates))
        if node.kind == "list" and (set(keys) != set(node.keys) or not all(keys.values())):
            return False
        children = index.children(node) if keys else {}
        if any(index.schema.check_value(children[k].snode, v) for k, v in keys.items()):
            return False
        if node.kind != "list" and keys:
            return False
        parent, pos = node, match.end()
    return True


def _message(e: RpcError) -> str:
    if e.path and not _instance_path(e.path):
        return f"{e.message} (at {e.path})"
    return e.message


def errors_json(errs: list[RpcError]) -> str:
    items = []
    for e in errs:
        item = {"error-type": e.type, "error-tag": e.tag}
        if e.app_tag:
            item["error-app-tag"] = e.app_tag
        if _instance_path(e.path):
            item["error-path"] = e.path
        item["error-message"] = _message(e)
        if e.info:
            item["error-info"] = {k: str(v) for k, v in e.info.items()}
        items.append(item)
    return json.dumps({"ietf-restconf:errors": {"error": items}})


def errors_xml(errs: list[RpcError]) -> str:
    out = [f'<errors xmlns="{RESTCONF_NS}">']
    for e in errs:
        out.append(f"<error><error-type>{e.type}</error-type><error-tag>{e.tag}</error-tag>")
        if e.app_tag:
            out.append(f"<error-app-tag>{escape(e.app_tag)}</error-app-tag>")
        if _instance_path(e.path):
            out.append(f"<error-path{_path_prefixes(e.path)}>{escape(_xml_path(e.path))}"
                       "</error-path>")
        out.append(f"<error-message>{escape(_message(e))}</error-message>")
        if e.info:
            out.append("<error-info>" + "".join(f"<{k}>{escape(str(v))}</{k}>"
                                                for k, v in e.info.items()) + "</error-info>")
        out.append("</error>")
    out.append("</errors>")
    return "".join(out)


_MODULE_NS: dict[str, str] = {}


def _xml_path(path: str) -> str:
    """An error-path (checked by _instance_path) in the XML encoding: every node and key
    name qualified (RFC 7950 §9.13.2), where JSON names a module only where it changes."""
    out, module, pos = [], "", 0
    while pos < len(path):
        match = _STEP.match(path, pos)
        module = match.group(1) or module
        keys = "".join(f"[{k if k == '.' else f'{module}:{k}'}='{v}']"
                       for k, v in re.findall(r"\[([\w.-]+)='([^']*)'\]", match.group(3)))
        out.append(f"/{module}:{match.group(2)}{keys}")
        pos = match.end()
    return "".join(out)


def _path_prefixes(path: str) -> str:
    """Namespace declarations for the module-name prefixes an error-path uses."""
    names = {part.split(":")[0].lstrip("/").split("[")[-1] for part in path.split("/")
             if ":" in part.split("[")[0]}
    return "".join(f" xmlns:{n}={quoteattr(_MODULE_NS[n])}" for n in sorted(names)
                   if n in _MODULE_NS)


def remember_namespaces(index: SchemaIndex) -> None:
    _MODULE_NS.update(index.ns_of)
    _INDEX[:] = [index]


def media_type(header: str | None, default: str = JSON) -> str | None:
    """The representation an Accept header asks for: JSON, XML or None (none we have)."""
    if not header:
        return default
    best, best_q = None, -1.0
    for part in header.split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0
        choice = {JSON: JSON, XML: XML, "application/json": JSON, "application/xml": XML,
                  "text/xml": XML, "*/*": default, "application/*": default}.get(kind.lower())
        if choice and q > best_q and q > 0:
            best, best_q = choice, q
    return best
