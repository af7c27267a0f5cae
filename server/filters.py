"""Read filters: RFC 6241 §6 subtree filtering, XPath 1.0 selection, RFC 8526 max-depth.

All work on an lxml tree of the data (children of one wrapper element), and only run when a
request asks for them: an unfiltered read streams straight from the backend.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxml import etree

from .errors import RpcError


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


def limit_depth(data: etree._Element, max_depth: int) -> None:
    """Drop nodes deeper than ``max_depth`` (top-level nodes are depth 1)."""
    def prune(el: etree._Element, depth: int) -> None:
        for child in list(el):
            if depth >= max_depth:
                el.remove(child)
            else:
                prune(child, depth + 1)
    for top in data:
        prune(top, 1)
