"""RESTCONF resources over the server's datastores: reads, edits and operations, each a
small blocking function the web layer runs off its event loop.

Everything goes through the same Datastores and Operations as NETCONF, so an edit here is
validated and applied exactly as an edit-config is: all of it, or nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, Session

from . import errors, nacm
from .datastore import CONFIG_DATASTORES, Datastores, EditOptions
from .errors import RpcError
from .filters import TopNode, limit_depth
from .nacm_config import NacmJsonWriter, NacmModel
from .operations import Operations, SessionInfo
from .request_limits import load_json, xml_problem
from .restconf_codec import (
    JSON,
    RESTCONF_NS,
    XML,
    Node,
    Step,
    Target,
    XmlWriter,
    parse_api_path,
    sessions_to_json,
)
from .restconf_query import (
    Query,
    bad_request,
    not_found,
    parse_fields,
    prune_fields,
)
from .session_codec import NC_NS, sessions_to_xml

DATASTORES = ("running", "candidate", "startup", "operational")
DATA_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
READ_METHODS = "GET, HEAD, OPTIONS"
SESSION = "nfmig-nat:nat-session"
# The RPCs RESTCONF offers: the model's own and the NETCONF ones that make sense without a
# session (no lock: a RESTCONF request is its own session; RFC 8040 §1.4).
OPERATIONS = ("ietf-netconf:commit", "ietf-netconf:cancel-commit",
              "ietf-netconf:discard-changes", "ietf-netconf:validate",
              "ietf-netconf:copy-config", "ietf-netconf:delete-config",
              "nfmig-nat:freeze", "nfmig-nat:thaw", "nfmig-nat:announce-migration",
              "nfmig-nat:track-changes", "nfmig-nat:changes", "nfmig-nat:session-digest")
# RESTCONF has no sessions; its requests share this NETCONF session id (outside the range
# NETCONF sessions get), so NETCONF locks and confirmed commits see it as one other party.
RESTCONF_SESSION_ID = 2**31 - 1
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True,
                          remove_comments=True)


@dataclass
class Body:
    """A reply's content: text and its media type (None: no content)."""

    text: str | None
    media: str | None = None


class Resources:
    """The datastores seen as RESTCONF resources."""

    def __init__(self, ops: Operations):
        self.ops = ops
        self.ds: Datastores = ops.ds
        self.schema = ops.schema
        self.index = ops.index
        self.state_extra: list[TopNode] = []  # state only RESTCONF has (restconf-state)
        self.json = NacmJsonWriter(self.index, NacmModel(ops.schema).module_of)
        self.xml = XmlWriter(self.index)

    def session_info(self, user: str, peer: str) -> SessionInfo:
        return SessionInfo(RESTCONF_SESSION_ID, user, peer)

    # -- reads -------------------------------------------------------------------------
    def read(self, datastore: str, path: str, query: Query, media: str) -> Body:
        """GET of the datastore (``path`` "") or of a data resource in it."""
        target = parse_api_path(self.index, path)
        bulk = not target.steps or (len(target.steps) == 1 and target.node.name ==
                                    "nat-session" and target.steps[0].keys is None)
        if bulk and query.plain and nacm.reads_whole(self.ds.ns, "nat-session"):
            return self._read_fast(datastore, target, query, media)
        nodes = self._top_nodes(datastore, target, query.content)
        content = "config" if datastore != "operational" else query.content
        data = self._tree(self.ops.defaults.apply(nodes, query.with_defaults, content,
                                                  nacm.reads_whole))
        picked = self._select(data, target)
        if query.depth is not None:
            holder = etree.Element("x")
            for el in picked:
                holder.append(el)
            # the target's schema node for each (the datastore's: each top-level node's)
            node_of = (lambda _el: target.node) if target.steps else self._top_schema_node
            limit_depth(holder, query.depth, node_of, self.index.children)
            picked = list(holder)
        if query.fields is not None:
            picked = self._fields(picked, target, parse_fields(query.fields))
        return self._render(picked, target, media)

    def _read_fast(self, datastore: str, target: Target, query: Query, media: str) -> Body:
        nodes = self._top_nodes(datastore, target, query.content)
        sessions = [n for n in nodes if n.name == "nat-session"]
        others = [n for n in nodes if n.name != "nat-session"]
        if media == XML:
            if target.steps:
                return Body("".join(p for n in sessions for p in n.produce()), XML)
            parts = [f'<data xmlns="{RESTCONF_NS}">']
            for node in nodes:
                parts.extend(node.produce())
            parts.append("</data>")
            return Body("".join(parts), XML)
        rows = "".join(sessions_to_json(self.session_rows(datastore))) if sessions else None
        if target.steps:
            return Body(f'{{"{SESSION}":[{rows or ""}]}}', JSON)
        members = self.json.members(self._tree(others), None) if others else {}
        text = json.dumps(members, separators=(",", ":"))[1:-1]
        if rows is not None:
            text = f'{text},"{SESSION}":[{rows}]' if text else f'"{SESSION}":[{rows}]'
        return Body(f'{{"ietf-restconf:data":{{{text}}}}}', JSON)

    def session_rows(self, datastore: str) -> Iterator[Session]:
        """The sessions a datastore holds (candidate: running with its pending changes)."""
        return self.ds.sessions(datastore)

    def _top_nodes(self, datastore: str, target: Target, content: str) -> list[TopNode]:
        nodes: list[TopNode] = []
        if content != "nonconfig":
            nodes += self.ds.config_nodes("running" if datastore == "operational"
                                          else datastore)
        if datastore == "operational" and content != "config":
            # module URLs as the server's files: the web layer makes them RESTCONF URLs
            nodes += self.ops.state_nodes(lambda name, revision: f"file://"
                                          f"{self.schema.yang_dir}/{name}@{revision}.yang")
            nodes += self.state_extra
        if target.steps:
            top = target.steps[0].node
            nodes = [n for n in nodes if n.name is None or (n.name, n.namespace) == (top.name,
                                                                                    top.ns)]
            if top.name == "nat-session" and target.steps[0].keys:
                session = self._one_session(datastore, target.steps[0])
                nodes = [n for n in nodes if n.name != "nat-session"]
                if session is not None:
                    nodes.append(TopNode(top.ns, top.name, lambda: sessions_to_xml(
                        [session], top.ns)))
        return nacm.readable(nodes)  # what the user may not read is left out

    def _one_session(self, datastore: str, step: Step) -> Session | None:
        key = self.session_key(step.keys or ())
        if datastore == "startup":
            return None if not self.ds.startup_path.exists() else _startup_session(
                self, key)
        return self.ds.session(datastore, key)

    def session_key(self, values: tuple[str, ...]) -> tuple:
        leaves = self.ds.decoder.checker.leaves
        try:
            return tuple(leaves[name].convert(v) for name, v in zip(KEY_FIELDS, values,
                                                                    strict=True))
        except ValueError as exc:
            raise errors.invalid_value(f"the URI's key of nat-session: {exc}",
                                       info={"bad-element": "nat-session"}) from None

    @staticmethod
    def _tree(nodes: Iterable[TopNode]) -> etree._Element:
        text = "".join(n.text() for n in nodes)
        return etree.fromstring(f"<data>{text}</data>".encode(), parser=_PARSER)

    def _select(self, data: etree._Element, target: Target) -> list[etree._Element]:
        if not target.steps:
            return list(data)
        nsmap = {n.module: n.ns for n in (s.node for s in target.steps)}
        found = data.xpath("/data" + target.xpath(), namespaces=nsmap)
        if not found:
            raise not_found(f"{target.instance_path()} does not exist in this datastore",
                            target.instance_path())
        return found

    def _fields(self, picked: list[etree._Element], target: Target, wanted: dict
                ) -> list[etree._Element]:
        """fields on the resource (or, for a datastore, on its top-level nodes)."""
        if target.steps:
            for el in picked:
                prune_fields(el, wanted, target.node, self.index)
            return picked
        kept = []
        for el in picked:
            qname = etree.QName(el)
            if qname.localname in wanted:
                node = self.index.top.get(f"{self.index.module_of.get(qname.namespace)}:"
                                          f"{qname.localname}")
                if wanted[qname.localname]:
                    prune_fields(el, wanted[qname.localname], node, self.index)
                kept.append(el)
        return kept

    def _top_schema_node(self, el: etree._Element) -> Node | None:
        qname = etree.QName(el)
        return self.index.top.get(f"{self.index.module_of.get(qname.namespace)}:"
                                  f"{qname.localname}")

    def _render(self, picked: list[etree._Element], target: Target, media: str) -> Body:
        if media == XML:
            if not target.steps:
                inner = "".join(etree.tostring(e, encoding="unicode") for e in picked)
                return Body(f'<data xmlns="{RESTCONF_NS}">{inner}</data>', XML)
            return Body("".join(etree.tostring(e, encoding="unicode", with_tail=False)
                                for e in picked), XML)
        parent = target.steps[-2].node if len(target.steps) > 1 else None
        members = self.json.members(picked, parent)
        if parent is not None:  # RFC 7951: a resource's member is named with its module
            node = target.node
            members = {f"{node.module}:{k.split(':')[-1]}": v for k, v in members.items()}
        if not target.steps:
            members = {"ietf-restconf:data": members}
        return Body(json.dumps(members, separators=(",", ":")), JSON)

    def allowed_methods(self, store: str | None, path: str) -> str:
        """The methods a data resource allows (OPTIONS' Allow): reads only for the
        operational datastore and for state data (config false), which nothing writes."""
        target = parse_api_path(self.index, path)
        if store == "operational" or (target.steps and not target.node.config):
            return READ_METHODS
        return DATA_METHODS

    def exists(self, datastore: str, target: Target) -> bool:
        if not target.steps:
            return True
        try:
            self.read(datastore, _uri_of(target), Query(), JSON)
        except RpcError as exc:
            if getattr(exc, "status", None) == 404:
                return False
            raise
        return True

    def etags(self, datastore: str, target: Target) -> set[str]:
        """The entity tags of the resource's current representations (JSON and XML)."""
        if not self.exists(datastore, target):
            return set()
        uri = _uri_of(target)
        return {etag(self.read(datastore, uri, Query(), m).text or "") for m in (JSON, XML)}

    # -- edits -------------------------------------------------------------------------
    def body_elements(self, text: bytes, media: str, parent: Node | None,
                      wrapper: str | None = None) -> list[etree._Element]:
        """The request's content as XML elements: the nodes it holds (under ``wrapper``,
        e.g. ietf-restconf:data, when the resource is a datastore)."""
        if media == JSON:
            obj = load_json(text)
            if wrapper is not None:
                if not isinstance(obj, dict) or list(obj) != [wrapper]:
                    raise bad_request(f"the body is one member, {wrapper}", wrapper)
                obj = obj[wrapper]
            xml = self.xml.members(obj, parent)
            holder = etree.fromstring(f"<x>{xml}</x>".encode(), parser=_PARSER)
            return list(holder)
        root = parse_body(text)
        if wrapper is not None:
            if root.tag != f"{{{RESTCONF_NS}}}data":
                raise bad_request(f"the body is <data xmlns=\"{RESTCONF_NS}\">", "data")
            return [c for c in root if isinstance(c.tag, str)]
        return [root]

    def edit(self, datastore: str, target: Target, inner: list[etree._Element],
             operation: str | None, upto: int | None = None,
             default_operation: str = "merge") -> None:
        """One edit of the datastore: ``inner`` placed at the target's parent (or ``upto``
        steps deep), with ``operation`` on each inner element."""
        if datastore not in ("running", "candidate"):
            raise errors.not_supported(f"{datastore} cannot be edited this way",
                                       type="application")
        for el in inner:
            if operation is not None:
                el.set(f"{{{NC_NS}}}operation", operation)
        body = "".join(etree.tostring(e, encoding="unicode") for e in inner)
        depth = len(target.steps) - 1 if upto is None else upto
        self.edit_text(datastore, target.wrap(body, depth), default_operation)

    def edit_text(self, datastore: str, text: str, default_operation: str = "merge") -> None:
        """An edit of top-level nodes given as XML text (operations as nc:operation)."""
        if datastore not in ("running", "candidate"):
            raise errors.not_supported(f"{datastore} cannot be edited this way",
                                       type="application")
        config = etree.fromstring(f'<config xmlns:nc="{NC_NS}">{text}</config>'.encode(),
                                  parser=_PARSER)
        self.ds.edit(datastore, config, EditOptions(default_operation=default_operation),
                     RESTCONF_SESSION_ID)

    def edit_config(self, datastore: str, config: etree._Element) -> None:
        """An edit of ``config``'s children (operations as nc:operation), merged."""
        if datastore not in ("running", "candidate"):
            raise errors.not_supported(f"{datastore} cannot be edited this way",
                                       type="application")
        self.ds.edit(datastore, config, EditOptions(), RESTCONF_SESSION_ID)

    def replace_datastore(self, datastore: str, inner: list[etree._Element]) -> None:
        body = "".join(etree.tostring(e, encoding="unicode") for e in inner)
        config = etree.fromstring(f"<config>{body}</config>".encode(), parser=_PARSER)
        if datastore == "startup":
            self.ds.copy_config(config, "startup", RESTCONF_SESSION_ID)
        else:
            self.edit(datastore, Target([]), inner, None, 0, default_operation="replace")

    def check_same_node(self, target: Target, inner: list[etree._Element]) -> None:
        """PUT's body is the resource itself: same node, same keys as the URI."""
        node = target.node
        if len(inner) != 1 or etree.QName(inner[0]).localname != node.name:
            raise bad_request(f"the body must hold exactly the resource {node.name}",
                              node.name)
        keys = target.steps[-1].keys
        if keys and node.kind == "list":
            for name, value in zip(node.keys, keys, strict=True):
                found = inner[0].findtext(f"{{{node.ns}}}{name}")
                if found is None:  # a nested entry's body is read without its namespace
                    found = inner[0].findtext(name)
                if found is None:
                    inner[0].insert(0, etree.Element(f"{{{node.ns}}}{name}"))
                    inner[0][0].text = value
                elif found.strip() != value and not self.same_key(name, found, value):
                    raise bad_request(f"key {name} is {found!r} in the body but {value!r} in "
                                      "the URI", name)
        elif keys and (inner[0].text or "").strip() != keys[0]:
            raise bad_request("the leaf-list value differs from the URI's", node.name)

    def same_key(self, name: str, a: str, b: str) -> bool:
        """Whether two texts of key leaf ``name`` are the same value (e.g. IPv6 forms)."""
        leaf = self.ds.decoder.checker.leaves.get(name)
        try:
            return leaf is not None and leaf.convert(a) == leaf.convert(b)
        except ValueError:
            return False

    # -- operations --------------------------------------------------------------------
    def invoke(self, name: str, text: bytes, media: str, session: SessionInfo) -> str:
        """POST of an operation: its input as the NETCONF element, dispatched as NETCONF
        would; the reply's XML body."""
        if name not in OPERATIONS:
            raise not_found(f"no operation {name!r} here; GET /restconf/operations lists them")
        module, local = name.split(":")
        node = self.index.rpc_input(name)
        ns = self.index.ns_of[module]
        inner = ""
        if text.strip():
            if media == JSON:
                obj = load_json(text)
                if not isinstance(obj, dict) or list(obj) != [f"{module}:input"]:
                    raise bad_request(f"the body is one member, {module}:input", "input")
                inner = self.xml.members(obj[f"{module}:input"], node)
            else:
                root = parse_body(text)
                if root.tag != f"{{{ns}}}input":
                    raise bad_request(f'the body is <input xmlns="{ns}">', "input")
                inner = "".join(etree.tostring(c, encoding="unicode") for c in root)
        element = etree.fromstring(f'<{local} xmlns="{ns}">{inner}</{local}>'.encode(),
                                   parser=_PARSER)
        reply = self.ops.dispatch(session, element)
        return reply if isinstance(reply, str) else "".join(reply)

    def operations_json(self) -> str:
        return json.dumps({"ietf-restconf:operations": {n: [None] for n in OPERATIONS}})

    def operations_xml(self) -> str:
        parts = []
        for name in OPERATIONS:
            module, local = name.split(":")
            parts.append(f'<{local} xmlns="{self.index.ns_of[module]}"/>')
        return f'<operations xmlns="{RESTCONF_NS}">{"".join(parts)}</operations>'


def parse_body(text: bytes) -> etree._Element:
    """An XML request body, refused (4xx) unless well-formed and within the limits
    (request_limits.xml_problem) before anything walks it."""
    try:
        root = etree.fromstring(text, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise errors.malformed(f"the body is not XML: {exc}") from None
    problem = xml_problem(root, text)
    if problem is not None:
        raise problem
    return root


def _startup_session(resources: Resources, key: tuple) -> Session | None:
    text = resources.ds.config_text("startup")
    config = etree.fromstring(f"<config>{text}</config>".encode(), parser=_PARSER)
    for edit in resources.ds.decoder.decode_all(config, "merge") or []:
        if edit.key == key:
            return Session(**edit.values)
    return None


def _uri_of(target: Target) -> str:
    parts = []
    for i, step in enumerate(target.steps):
        name = step.node.name if i and target.steps[i - 1].node.module == step.node.module \
            else f"{step.node.module}:{step.node.name}"
        if step.keys is not None:
            name += "=" + ",".join(quote(k, safe="") for k in step.keys)
        parts.append(name)
    return "/".join(parts)


def uri_of(target: Target) -> str:
    return _uri_of(target)


def etag(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:20] + '"'


def check_datastore(name: str) -> str:
    if name not in DATASTORES:
        raise not_found(f"no datastore {name!r}; this server has "
                        f"{', '.join('ietf-datastores:' + d for d in DATASTORES)}")
    return name


assert set(CONFIG_DATASTORES) < set(DATASTORES)
