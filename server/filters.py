"""Read filters: RFC 6241 §6 subtree filtering, XPath 1.0 selection, RFC 8526 max-depth.

All work on an lxml tree of the data (children of one wrapper element), and only run when a
request asks for them: an unfiltered read streams straight from the backend.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import libyang
from _libyang import ffi, lib
from lxml import etree

from .errors import RpcError
from .schema import Schema, YangError, module_ns


def _is_element(node) -> bool:
    return isinstance(node.tag, str)


def _matches(filter_el: etree._Element, data_el: etree._Element) -> bool:
    d = etree.QName(data_el)
    return _matches_name(filter_el, d.namespace, d.localname)


def _is_content_match(filter_el: etree._Element) -> bool:
    return len(filter_el) == 0 and filter_el.text is not None and filter_el.text.strip() != ""


# What a list's producer needs to select its entries itself: one {leaf: value} per filter
# node of content matches; it answers a producer of the selected entries, or None when it
# cannot select on those leaves (the filter then runs on the parsed entries).
Select = Callable[[list[dict[str, str]]], Callable[[], Iterable[str]] | None]


@dataclass(frozen=True)
class TopNode:
    """A top-level data node, or the run of entries of a top-level list, as XML produced on
    demand: a read that a filter narrows never serialises what it leaves out."""

    namespace: str | None  # None with name None: not known before parsing (stored text)
    name: str | None
    produce: Callable[[], Iterable[str]]
    select: Select | None = None  # see Select; for a list that can select its own entries

    def text(self) -> str:
        return "".join(self.produce())


def select_top_nodes(nodes: Iterable[TopNode], filter_el: etree._Element
                     ) -> list[tuple[TopNode, bool]]:
    """The nodes a subtree filter can select, each with whether it is selected whole.

    Only a node some top-level filter element matches by name can appear in the result
    (RFC 6241 §6.2.4); if one of those is a bare selection node the whole node is selected
    and needs no parsing, otherwise the node must go through :func:`subtree_filter`.
    """
    filters = [f for f in filter_el if _is_element(f)]
    picked = []
    for node in nodes:
        if node.name is None:
            picked.append((node, False))
            continue
        hits = [f for f in filters if _matches_name(f, node.namespace, node.name)]
        if hits:
            whole = any(not _is_content_match(f) and not any(_is_element(c) for c in f)
                        for f in hits)
            picked.append((node, whole))
    return picked


def content_matches(filter_el: etree._Element, namespace: str | None, name: str
                    ) -> list[dict[str, str]] | None:
    """The leaf values each filter node for the list ``name`` asks for, when every one of
    them holds content match nodes of distinct leaves and nothing else: such a node selects
    an entry whole when each of its content matches equals one of the entry's leaves (RFC
    6241 §6.2.5), and the nodes select the union. None for any other filter (selection or
    containment nodes, attributes, text, another namespace), which :func:`subtree_filter`
    decides on the parsed entries."""
    wanted = []
    for f in filter_el:
        if not _is_element(f) or not _matches_name(f, namespace, name):
            continue
        if f.attrib or (f.text or "").strip():
            return None
        values: dict[str, str] = {}
        for child in f:
            if not _is_element(child):
                continue  # comments and processing instructions select nothing
            leaf = etree.QName(child)
            if leaf.namespace not in (None, namespace) or leaf.localname in values or \
                    child.attrib or not _is_content_match(child):
                return None
            values[leaf.localname] = child.text.strip()
        if not values:
            return None  # a selection node: the whole list
        wanted.append(values)
    return wanted or None


def _matches_name(filter_el: etree._Element, namespace: str | None, name: str) -> bool:
    # A filter node without a namespace matches any namespace (lenient for hand-written
    # filters); with one, namespaces must agree as RFC 6241 §6.2.2 says.
    f = etree.QName(filter_el)
    return f.localname == name and (f.namespace is None or f.namespace == namespace)


def subtree_filter(data: etree._Element, filter_el: etree._Element) -> etree._Element:
    """A new wrapper holding what ``filter_el``'s children select from ``data``'s children."""
    out = etree.Element(data.tag, nsmap=data.nsmap)
    filters = [f for f in filter_el if _is_element(f)]
    if not filters:
        return out  # an empty filter selects nothing (RFC 6241 §6.4.2)
    for child in data:
        if _is_element(child):
            selected = _select(child, filters)
            if selected is not None:
                out.append(selected)
    return out


def _select(data_el: etree._Element, filters: list[etree._Element]) -> etree._Element | None:
    """The part of ``data_el`` that the sibling filter nodes select, or None."""
    for f in filters:
        if not _matches(f, data_el):
            continue
        if _is_content_match(f):
            return copy.deepcopy(data_el) if (data_el.text or "").strip() == f.text.strip() \
                else None
        children = [c for c in f if _is_element(c)]
        if not children:
            return copy.deepcopy(data_el)  # selection node
        result = _select_children(data_el, children)
        if result is not None:
            return result
    return None


def _select_children(data_el: etree._Element,
                     filters: list[etree._Element]) -> etree._Element | None:
    content = [f for f in filters if _is_content_match(f)]
    others = [f for f in filters if not _is_content_match(f)]
    data_children = [c for c in data_el if _is_element(c)]
    matched_content = []
    for f in content:
        hits = [c for c in data_children if _matches(f, c)
                and (c.text or "").strip() == f.text.strip()]
        if not hits:
            return None  # every content match node must match (RFC 6241 §6.2.5)
        matched_content.extend(hits)
    if not others:
        return copy.deepcopy(data_el)
    out = etree.Element(data_el.tag, nsmap=data_el.nsmap)
    picked = []
    for c in data_children:
        if c in matched_content:
            picked.append(copy.deepcopy(c))
            continue
        sub = _select(c, others)
        if sub is not None:
            picked.append(sub)
    if not picked and not content:
        return None
    out.extend(picked)
    return out


# A "/" that starts an absolute location path: at the start, or after an operator, bracket,
# comma or pipe (outside string literals, which the tokenizer below skips).
_TOKENS = re.compile(r"""("[^"]*"|'[^']*')|(//?)|([^"'/]+)""")
_PATH_STARTERS = ("(", "[", ",", "|", "=", "<", ">", "+", "-", "*", " and", " or")


def _rooted(xpath: str) -> str:
    """Rewrite absolute paths so they start below the wrapper element the data hangs from."""
    out: list[str] = []
    for literal, slash, other in _TOKENS.findall(xpath):
        if slash:
            before = "".join(out).rstrip()
            if not before or before.endswith(_PATH_STARTERS):
                out.append("/*" + slash)
                continue
            out.append(slash)
        else:
            out.append(literal or other)
    return "".join(out)


def xpath_filter(data: etree._Element, select: str, namespaces: dict) -> etree._Element:
    """The nodes ``select`` picks, with their ancestors (and list keys) to place them."""
    if not select.strip():
        raise RpcError("missing-attribute", "the xpath filter has an empty select",
                       type="protocol", info={"bad-attribute": "select", "bad-element": "filter"})
    doc = etree.ElementTree(data)
    nsmap = {k: v for k, v in namespaces.items() if k}
    try:
        found = doc.xpath(_rooted(select), namespaces=nsmap)
    except etree.XPathError as exc:
        raise RpcError("invalid-value", f"xpath filter {select!r}: {exc}",
                       info={"bad-element": "filter"}) from None
    out = etree.Element(data.tag, nsmap=data.nsmap)
    copies = {data: out}
    if not isinstance(found, list):
        return out  # a number, string or boolean selects no nodes
    for node in found:
        if not isinstance(node, etree._Element) or node is data:
            if node is data:
                return copy.deepcopy(data)
            continue
        _place(node, copies)
    return out


# "/P:name[TEST]": the entries of a top-level list picked by a test of each one's own leaves.
_ENTRY_TEST = re.compile(r"\s*/\s*([A-Za-z_][\w.-]*):([A-Za-z_][\w.-]*)\s*\[(.*)\]\s*", re.S)
_TEST_TOKEN = re.compile(r"""\s+|"[^"]*"|'[^']*'|\d+(?:\.\d*)?|\.\d+|!=|<=|>=|[=<>+(),-]"""
                         r"|([A-Za-z_][\w.-]*)(?::([A-Za-z_][\w.-]*))?")
# Functions and operator names of such a test: none looks beyond the node it is given.
_OWN_LEAF_WORDS = frozenset({
    "and", "or", "div", "mod", "not", "true", "false", "boolean", "number", "string",
    "concat", "contains", "starts-with", "substring", "substring-after", "substring-before",
    "string-length", "normalize-space", "translate"})


def selects_by_own_leaves(select: str, namespaces: dict, namespace: str, name: str) -> bool:
    """Whether ``select`` picks entries of the top-level list ``name`` by a test of each
    entry's own leaves only (names of its children, literals, numbers, operators and the
    functions above): then it picks the same entries from any run of the list as from the
    whole of it, and :func:`xpath_filter` may be given the list a part at a time."""
    found = _ENTRY_TEST.fullmatch(select)
    if found is None or namespaces.get(found.group(1)) != namespace or \
            found.group(2) != name:
        return False
    test, pos = found.group(3), 0
    while pos < len(test):
        token = _TEST_TOKEN.match(test, pos)
        if token is None or token.end() == pos:
            return False
        word, local = token.group(1), token.group(2)
        if word is not None and (namespaces.get(word) != namespace if local is not None
                                 else word not in _OWN_LEAF_WORDS):
            return False
        pos = token.end()
    return True


def _place(node: etree._Element, copies: dict) -> None:
    chain = []
    parent = node.getparent()
    while parent is not None and parent not in copies:
        chain.append(parent)
        parent = parent.getparent()
    if parent is None:
        return
    holder = copies[parent]
    for ancestor in reversed(chain):
        shell = etree.SubElement(holder, ancestor.tag)
        for leaf in ancestor:  # keep leaf children that identify a list entry
            if _is_element(leaf) and len(leaf) == 0 and leaf is not node \
                    and leaf.tag.rsplit("}", 1)[-1] in _KEY_NAMES:
                shell.append(copy.deepcopy(leaf))
        copies[ancestor] = shell
        holder = shell
    if node not in copies:
        clone = copy.deepcopy(node)
        holder.append(clone)
        copies[node] = clone


# Key leaves of the lists a result may need to name its ancestors by.
_KEY_NAMES = {"protocol", "src_address", "src_port", "dst_address", "dst_port", "name",
              "identifier", "version", "format", "session-id"}


def limit_depth(data: etree._Element, max_depth: int, node_of: Callable[[etree._Element], Any],
                children: Callable[[Any], dict[str, Any]]) -> None:
    """Drop nodes deeper than ``max_depth`` (``data``'s children are depth 1), but never the
    keys of a list entry: without them the entry is not an instance of its list, whatever
    the depth (RFC 8040 §4.8.2; RFC 8526's max-depth alike). ``node_of`` gives a child's
    schema node (a restconf_codec.Node: ``kind``, ``keys``), ``children`` a node's
    children by name."""
    def prune(el: etree._Element, node: Any, depth: int) -> None:
        keys = node.keys if node is not None and node.kind == "list" else ()
        below = children(node) if node is not None and depth < max_depth else {}
        for child in list(el):
            if not _is_element(child):
                continue
            name = etree.QName(child).localname
            if depth >= max_depth:
                if name not in keys:
                    el.remove(child)
            else:
                prune(child, below.get(name), depth + 1)
    for top in data:
        if _is_element(top):
            prune(top, node_of(top), 1)


# -- with-defaults (RFC 6243) ----------------------------------------------------------------
WD_NS = "urn:ietf:params:xml:ns:netconf:default:1.0"  # RFC 6243 §6: the default attribute
WD_DEFAULT = f"{{{WD_NS}}}default"
WITH_DEFAULTS = ("report-all", "trim", "explicit", "report-all-tagged")
BASIC_MODE = "explicit"  # what a read without with-defaults gets: what was set, as set
_LIBYANG_DEFAULT = "{urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults}default"
_PRINT_MODE = {"report-all": lib.LYD_PRINT_WD_ALL, "trim": lib.LYD_PRINT_WD_TRIM,
               "report-all-tagged": lib.LYD_PRINT_WD_ALL_TAG}


class Defaults:
    """The with-defaults retrieval modes over top-level nodes. Only the subtrees whose
    schema has a default below them go through libyang (the policy, /nacm, the monitoring
    counters); everything else, the session table above all, passes untouched."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.tops: dict[tuple[str, str], bool] = {}  # (namespace, name) -> config true
        for module in schema.modules():
            if not module.implemented():
                continue
            for snode in module.children():
                if snode.nodetype() in _DATA_KINDS and _has_default(snode):
                    self.tops[(module_ns(module), snode.name())] = not snode.config_false()

    def apply(self, nodes: list[TopNode], mode: str | None, content: str = "config",
              may_read: Callable[[str, str], bool] = lambda _ns, _name: True
              ) -> list[TopNode]:
        """``nodes`` as ``mode`` reports them. ``content`` says what the read holds, and
        what a container absent from it may be added as: "config" (a configuration
        datastore), "nonconfig" or "all"; and only if the user ``may_read`` it whole."""
        if mode in (None, BASIC_MODE):
            return nodes
        config = content == "config"
        out: list[TopNode] = []
        present: set[tuple[str | None, str | None]] = set()
        for node in nodes:
            key = (node.namespace, node.name)
            if node.name is None:  # stored text: its top-level nodes are known once parsed
                text, tops = self._each(node.text(), mode, config)
                present |= tops
                out.append(TopNode(None, None, lambda t=text: [t]))
            elif key in self.tops:
                present.add(key)
                out.append(TopNode(node.namespace, node.name, lambda n=node: [
                    self.reported(n.text(), n.namespace, n.name, mode, config)]))
            else:
                out.append(node)
        if mode != "trim" and content != "nonconfig":
            # a configuration container absent as a whole still has its defaults in use
            # (state is the server's to produce: what it leaves out has no defaults)
            for (ns, name), is_config in self.tops.items():
                if not is_config or (ns, name) in present or not may_read(ns, name):
                    continue
                text = self.reported(f'<{name} xmlns="{ns}"/>', ns, name, mode, True)
                if text:
                    out.append(TopNode(ns, name, lambda t=text: [t]))
        return out

    def _each(self, text: str, mode: str, config: bool) -> tuple[str, set]:
        holder = etree.fromstring(f"<x>{text}</x>".encode(), parser=_PARSER)
        tops = set()
        for child in list(holder):
            if not _is_element(child):
                continue
            qname = etree.QName(child)
            if (qname.namespace, qname.localname) not in self.tops:
                continue
            tops.add((qname.namespace, qname.localname))
            new = self.reported(etree.tostring(child, encoding="unicode"), qname.namespace,
                                qname.localname, mode, config)
            if new:
                holder.replace(child, etree.fromstring(new.encode(), parser=_PARSER))
            else:
                holder.remove(child)
        return "".join(etree.tostring(c, encoding="unicode") for c in holder), tops

    def reported(self, text: str, ns: str | None, name: str | None, mode: str,
                 config: bool) -> str:
        """One top-level node's text as ``mode`` reports it ("" when nothing is left)."""
        try:
            tree = self.schema.parse_xml(text, config=config)
        except YangError as exc:
            # configuration read among state without its state (/nacm without counters)
            # misses the mandatory state leaves: it is configuration alone
            try:
                tree = self.schema.parse_xml(text) if not config else None
            except YangError:
                tree = None
            if tree is None:
                raise RpcError("operation-failed", f"the defaults of {name} could not be "
                               f"worked out: {exc}") from None
        if tree is None:
            return ""
        try:
            printed = print_with_defaults(tree, mode)
        finally:
            tree.free()
        # libyang prints the default containers of other modules beside it (/nacm)
        new = etree.fromstring(f"<x>{printed}</x>".encode(), parser=_PARSER).find(
            f"{{{ns}}}{name}")
        if new is None:
            return ""
        tagged = mode == "report-all-tagged"
        new = _hoisted(new, {"wd": WD_NS} if tagged else {})
        if tagged:
            tag_defaults(new)
        return etree.tostring(new, encoding="unicode")


_DATA_KINDS = (libyang.SNode.CONTAINER, libyang.SNode.LIST, libyang.SNode.LEAF,
               libyang.SNode.LEAFLIST)
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)


def _has_default(snode) -> bool:
    kind = snode.nodetype()
    if kind == libyang.SNode.LEAF:
        return snode.default() is not None
    if kind == libyang.SNode.LEAFLIST:
        return any(True for _ in snode.defaults())
    if kind in (libyang.SNode.CONTAINER, libyang.SNode.LIST):
        return any(_has_default(c) for c in snode.children())
    return False


def _hoisted(top: etree._Element, extra: dict[str, str]) -> etree._Element:
    """``top`` with every prefix declared below it declared on it. libyang declares the
    prefix of an identityref value on the leaf; a copy of the leaf into an element
    where that namespace is already the default would lose the declaration (lxml keeps a
    namespace once, the prefix in the text then binds nothing). Declared at the top,
    every copy made by the filters keeps it. ``extra``: more prefixes to declare there."""
    nsmap = {**extra, **top.nsmap}
    for el in top.iter():
        for prefix, ns in el.nsmap.items():
            if nsmap.setdefault(prefix, ns) != ns:
                return top  # one prefix for two namespaces: left as printed
    if nsmap == top.nsmap:
        return top
    new = etree.Element(top.tag, attrib=dict(top.attrib), nsmap=nsmap)
    new.text = top.text
    new.extend(list(top))
    return new


def print_with_defaults(tree, mode: str) -> str:
    flags = lib.LYD_PRINT_WITHSIBLINGS | lib.LYD_PRINT_SHRINK | _PRINT_MODE[mode]
    buf = ffi.new("char **")
    if lib.lyd_print_mem(buf, tree.cdata, lib.LYD_XML, flags) != lib.LY_SUCCESS:
        raise RpcError("operation-failed", "the defaults could not be printed")
    try:
        return ffi.string(buf[0]).decode() if buf[0] else ""
    finally:
        lib.free(buf[0])


def tag_defaults(tree: etree._Element) -> None:
    """libyang tags defaults in the module's namespace; RFC 6243 §6 names the attribute in
    urn:ietf:params:xml:ns:netconf:default:1.0, which is what clients look for (declare
    it on ``tree`` first: its prefix is then wd). Namespace declarations are left as they
    are: prefixes in values (identityrefs, paths) use some that no name does."""
    for el in tree.iter():
        if el.attrib.pop(_LIBYANG_DEFAULT, None) == "true":
            el.set(WD_DEFAULT, "true")
