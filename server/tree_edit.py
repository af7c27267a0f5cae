"""NETCONF edit operations (RFC 6241 §7.2) on small configuration trees held as XML.

Used for everything except the bulk session list: the NAT policy, and whatever small
configuration the model grows. The schema (from libyang) says which children are leaves,
leaf-lists, containers or keyed lists, which is all the edit semantics need.
"""

from __future__ import annotations

import copy

import libyang
from lxml import etree

from .errors import RpcError, data_exists, data_missing
from .session_codec import OPERATION_ATTR, check_operation


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _schema_child(snode: libyang.SNode, name: str) -> libyang.SNode | None:
    for child in snode.children():
        if child.name() == name:
            return child
    return None


def _same_instance(snode: libyang.SNode, a: etree._Element, b: etree._Element) -> bool:
    if snode.nodetype() == libyang.SNode.LEAFLIST:
        return (a.text or "") == (b.text or "")
    if snode.nodetype() == libyang.SNode.LIST:
        keys = [k.name() for k in snode.keys()]
        return all(_key_text(a, k) == _key_text(b, k) for k in keys)
    return True


def _key_text(element: etree._Element, key: str) -> str | None:
    for child in element:
        if isinstance(child.tag, str) and _local(child.tag) == key:
            return child.text
    return None


def strip_operations(element: etree._Element) -> etree._Element:
    clean = copy.deepcopy(element)
    for node in clean.iter():
        node.attrib.pop(OPERATION_ATTR, None)
    return clean


def edited(current: etree._Element | None, edits: list[etree._Element],
           snode: libyang.SNode, path: str) -> etree._Element | None:
    """What ``edits`` (top-level elements, each with its operation, merge by default) make
    of a copy of the top-level node ``current``; None when they leave none. ``current`` is
    not changed: the caller decides whether the result is applied, staged or dropped."""
    holder = etree.Element("config")
    if current is not None:
        holder.append(copy.deepcopy(current))
    for edit in edits:
        edit_node(holder, edit, snode, "merge", path)
    return holder[0] if len(holder) else None


def edit_node(target_parent: etree._Element, edit: etree._Element, snode: libyang.SNode,
              inherited: str, path: str) -> None:
    """Apply one edit element under ``target_parent`` (which holds the current config)."""
    operation = check_operation(edit.get(OPERATION_ATTR, inherited), path)
    existing = next((c for c in target_parent if isinstance(c.tag, str)
                     and _local(c.tag) == snode.name() and _same_instance(snode, c, edit)), None)
    if operation in ("delete", "remove"):
        if existing is None:
            if operation == "delete":
                raise data_missing(f"{path} does not exist, so it cannot be deleted", path)
            return
        target_parent.remove(existing)
        return
    if operation == "create" and existing is not None:
        raise data_exists(f"{path} already exists", path)
    inner = snode.nodetype() in (libyang.SNode.CONTAINER, libyang.SNode.LIST)
    if operation == "replace" or existing is None or not inner:
        replacement = strip_operations(edit) if operation == "replace" or not inner else None
        if replacement is None:
            replacement = etree.Element(edit.tag, nsmap=edit.nsmap)
            _copy_keys(snode, edit, replacement)
        if existing is not None:
            target_parent.replace(existing, replacement)
        else:
            target_parent.append(replacement)
        if replacement is not None and operation != "replace" and inner:
            _edit_children(replacement, edit, snode, operation, path)
        return
    _edit_children(existing, edit, snode, operation, path)


def _copy_keys(snode: libyang.SNode, source: etree._Element, target: etree._Element) -> None:
    if snode.nodetype() != libyang.SNode.LIST:
        return
    for key in snode.keys():
        for child in source:
            if isinstance(child.tag, str) and _local(child.tag) == key.name():
                target.append(copy.deepcopy(child))


def _edit_children(target: etree._Element, edit: etree._Element, snode: libyang.SNode,
                   operation: str, path: str) -> None:
    keys = {k.name() for k in snode.keys()} if snode.nodetype() == libyang.SNode.LIST else set()
    for child in edit:
        if not isinstance(child.tag, str) or _local(child.tag) in keys:
            continue
        name = _local(child.tag)
        child_schema = _schema_child(snode, name)
        if child_schema is None:
            raise RpcError("unknown-element", f"{path} has no child named {name}", path=path,
                           info={"bad-element": name})
        edit_node(target, child, child_schema, operation, f"{path}/{name}")
