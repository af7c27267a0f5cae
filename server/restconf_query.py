"""The query parameters of RESTCONF reads (RFC 8040 §4.8): their parsing, fields, the
with-defaults modes (RFC 6243), insert/point, and the 4xx errors they share."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from . import errors
from .errors import RpcError
from .filters import WITH_DEFAULTS
from .restconf_codec import Node, SchemaIndex


def not_found(message: str, path: str | None = None) -> RpcError:
    error = errors.invalid_value(message, path=path)
    error.status = 404  # RFC 8040 §7: invalid-value is 404 when the resource is not there
    return error


def check_names(params, allowed: tuple[str, ...], where: str) -> None:
    """Each query parameter known ``where`` it is given, and given once."""
    for name in params:
        if name not in allowed:
            raise bad_request(f"query parameter {name!r} is not allowed {where} "
                              f"(allowed: {', '.join(allowed) or 'none'})", name)
        if len(params.getall(name)) > 1:
            raise bad_request(f"query parameter {name!r} appears more than once", name)


def bad_request(message: str, parameter: str) -> RpcError:
    return errors.invalid_value(message, info={"bad-element": parameter})


@dataclass
class Query:
    """The query parameters of a read (RFC 8040 §4.8)."""

    content: str = "all"
    depth: int | None = None
    fields: str | None = None
    with_defaults: str | None = None

    @classmethod
    def parse(cls, params, allowed: tuple[str, ...]) -> Query:
        check_names(params, allowed, "here")
        query = cls()
        content = params.get("content", "all")
        if content not in ("all", "config", "nonconfig"):
            raise bad_request("content is all, config or nonconfig", "content")
        query.content = content
        depth = params.get("depth", "unbounded")
        if depth != "unbounded":
            if not depth.isdigit() or not 1 <= int(depth) <= 65535:
                raise bad_request("depth is 1..65535 or unbounded", "depth")
            query.depth = int(depth)
        query.fields = params.get("fields")
        if query.fields is not None and not query.fields.strip():
            raise bad_request("fields is empty", "fields")
        wd = params.get("with-defaults")
        if wd is not None and wd not in WITH_DEFAULTS:
            raise bad_request(f"with-defaults is {', '.join(WITH_DEFAULTS)}", "with-defaults")
        query.with_defaults = wd
        return query

    @property
    def plain(self) -> bool:
        return self.depth is None and self.fields is None and self.with_defaults in (
            None, "explicit")


# -- fields (RFC 8040 §4.8.3) -------------------------------------------------------------
def parse_fields(expr: str) -> dict:
    """``a;b/c;d(e;f)`` as nested dicts of the names selected."""
    pos = 0

    def parse_list(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while True:
            node = parse_path()
            for k, v in node.items():
                out[k] = merge(out.get(k), v)
            if pos < len(expr) and expr[pos] == ";":
                pos += 1
                continue
            if end and pos < len(expr) and expr[pos] == end:
                pos += 1
                return out
            if end is None and pos == len(expr):
                return out
            raise bad_request(f"fields {expr!r} is not a valid fields expression", "fields")

    def parse_path() -> dict:
        nonlocal pos
        start = pos
        while pos < len(expr) and expr[pos] not in ";/()":
            pos += 1
        name = expr[start:pos].split(":")[-1]
        if not name:
            raise bad_request(f"fields {expr!r} has an empty name", "fields")
        sub: dict = {}
        if pos < len(expr) and expr[pos] == "/":
            pos += 1
            sub = parse_path()
        elif pos < len(expr) and expr[pos] == "(":
            pos += 1
            sub = parse_list(")")
        return {name: sub}

    def merge(a: dict | None, b: dict) -> dict:
        if a is None:
            return b
        if not a or not b:
            return {}
        merged = dict(a)
        for k, v in b.items():
            merged[k] = merge(a.get(k), v)
        return merged

    return parse_list(None)


def prune_fields(el: etree._Element, wanted: dict, node: Node | None,
                 index: SchemaIndex) -> None:
    """Keep only the children ``wanted`` selects ({} below a name: all of it), and a list
    entry's keys always: without them the reply would not be a valid instance."""
    keys = node.keys if node is not None and node.kind == "list" else ()
    children = index.children(node) if node is not None else {}
    for child in list(el):
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        if name in wanted:
            if wanted[name]:
                prune_fields(child, wanted[name], children.get(name), index)
        elif name not in keys:
            el.remove(child)


def check_insert(query, node: Node | None) -> None:
    """insert/point (RFC 8040 §4.8.5, §4.8.6): only for ordered-by user lists, which this
    model has none of; checked so a client learns that, not silently ignored."""
    insert = query.get("insert")
    point = query.get("point")
    for name in query:
        if name not in ("insert", "point"):
            raise errors.invalid_value(f"query parameter {name!r} is not allowed here",
                                       info={"bad-element": name})
    if insert is None and point is None:
        return
    if insert is not None and insert not in ("first", "last", "before", "after"):
        raise errors.invalid_value("insert is first, last, before or after",
                                   info={"bad-element": "insert"})
    if insert in ("before", "after") and point is None:
        raise errors.invalid_value(f"insert={insert} needs point",
                                   info={"bad-element": "point"})
    if point is not None and insert not in ("before", "after"):
        raise errors.invalid_value("point goes only with insert=before or after",
                                   info={"bad-element": "point"})
    if node is None or not node.user_ordered:
        raise errors.invalid_value(f"{getattr(node, 'name', 'the datastore')} is not an "
                                   "ordered-by user list; insert and point do not apply",
                                   info={"bad-element": "insert"})
