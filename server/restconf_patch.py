"""YANG Patch (RFC 8072): several edits of one datastore applied as one edit, all or none."""

from __future__ import annotations

import json

from lxml import etree

from . import errors
from .errors import RpcError, RpcErrors
from .restconf_codec import JSON, Target, errors_json, errors_xml, parse_api_path, status_of
from .restconf_handlers import Resources, bad_request

YANG_PATCH_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-patch"
OPERATIONS = ("create", "delete", "insert", "merge", "move", "replace", "remove")
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True,
                          remove_comments=True)


def apply_yang_patch(resources: Resources, datastore: str, target: Target, body: bytes,
                     media: str) -> tuple[int, str]:
    """The status code and yang-patch-status document of one YANG Patch request."""
    patch_id = ""
    try:
        patch_id, edits = (_read_json if media == JSON else _read_xml)(body)
        text = "".join(_edit_xml(resources, target, edit, media) for edit in edits)
        resources.edit_text(datastore, text)
    except RpcError as exc:
        return status_of(exc), _status(patch_id, [exc], media)
    except RpcErrors as exc:
        return status_of(exc.errors[0]), _status(patch_id, exc.errors, media)
    return 200, _status(patch_id, [], media)


def _read_json(body: bytes) -> tuple[str, list[dict]]:
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RpcError("malformed-message", f"the body is not JSON: {exc}", type="rpc") \
            from None
    patch = doc.get("ietf-yang-patch:yang-patch") if isinstance(doc, dict) else None
    if not isinstance(patch, dict) or len(doc) != 1:
        raise bad_request("the body is one member, ietf-yang-patch:yang-patch", "yang-patch")
    patch_id = patch.get("patch-id")
    edits = patch.get("edit")
    if not isinstance(patch_id, str) or not patch_id:
        raise errors.missing_element("yang-patch needs a patch-id", "patch-id")
    if not isinstance(edits, list) or not edits:
        raise errors.missing_element("yang-patch needs at least one edit", "edit")
    unknown = set(patch) - {"patch-id", "comment", "edit"}
    if unknown:
        raise errors.unknown_element(f"yang-patch has no member {sorted(unknown)[0]!r}",
                                     sorted(unknown)[0])
    return patch_id, edits


def _read_xml(body: bytes) -> tuple[str, list[dict]]:
    try:
        root = etree.fromstring(body, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise RpcError("malformed-message", f"the body is not XML: {exc}", type="rpc") \
            from None
    if root.tag != f"{{{YANG_PATCH_NS}}}yang-patch":
        raise bad_request(f'the body is <yang-patch xmlns="{YANG_PATCH_NS}">', "yang-patch")
    patch_id = (root.findtext(f"{{{YANG_PATCH_NS}}}patch-id") or "").strip()
    if not patch_id:
        raise errors.missing_element("yang-patch needs a patch-id", "patch-id")
    edits = []
    for edit in root.iterfind(f"{{{YANG_PATCH_NS}}}edit"):
        item: dict = {}
        for child in edit:
            name = etree.QName(child).localname
            item[name] = child if name == "value" else (child.text or "").strip()
        edits.append(item)
    if not edits:
        raise errors.missing_element("yang-patch needs at least one edit", "edit")
    return patch_id, edits


def _edit_xml(resources: Resources, base: Target, edit: dict, media: str) -> str:
    """One edit as XML text placed under the datastore's top, with its operation."""
    if not isinstance(edit, dict):
        raise bad_request("each edit is an object", "edit")
    edit_id, operation = edit.get("edit-id"), edit.get("operation")
    if not edit_id:
        raise errors.missing_element("every edit needs an edit-id", "edit-id")
    if operation not in OPERATIONS:
        raise bad_request(f"edit {edit_id}: operation is one of {', '.join(OPERATIONS)}",
                          "operation")
    if operation in ("insert", "move"):
        raise bad_request(f"edit {edit_id}: {operation} needs an ordered-by user list, and "
                          "this model has none", "operation")
    path = edit.get("target")
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.missing_element(f"edit {edit_id}: target is a path starting with /",
                                     "target")
    target = parse_api_path(resources.index, path, base)
    if not target.steps:
        raise bad_request(f"edit {edit_id}: the target names a data node", "target")
    node = target.node
    if operation in ("delete", "remove"):
        if "value" in edit:
            raise bad_request(f"edit {edit_id}: {operation} takes no value", "value")
        element = etree.Element(f"{{{node.ns}}}{node.name}")
        keys = target.steps[-1].keys or ()
        if node.kind == "list":
            for name, value in zip(node.keys, keys, strict=False):
                etree.SubElement(element, f"{{{node.ns}}}{name}").text = value
        elif node.kind == "leaf-list" and keys:
            element.text = keys[0]
        inner = [element]
    else:
        inner = _value(resources, target, edit, media, edit_id)
        resources.check_same_node(target, inner)
    for element in inner:
        element.set("{urn:ietf:params:xml:ns:netconf:base:1.0}operation", operation)
    text = "".join(etree.tostring(e, encoding="unicode") for e in inner)
    return target.wrap(text, len(target.steps) - 1)


def _value(resources: Resources, target: Target, edit: dict, media: str,
           edit_id: str) -> list[etree._Element]:
    value = edit.get("value")
    if value is None:
        raise errors.missing_element(f"edit {edit_id}: {edit['operation']} needs a value",
                                     "value")
    parent = target.steps[-2].node if len(target.steps) > 1 else None
    if media == JSON:
        xml = resources.xml.members(value, parent)
        holder = etree.fromstring(f"<x>{xml}</x>".encode(), parser=_PARSER)
        return list(holder)
    return [c for c in value if isinstance(c.tag, str)]


def _status(patch_id: str, errs: list[RpcError], media: str) -> str:
    if media == JSON:
        status: dict = {"patch-id": patch_id}
        if errs:
            status["errors"] = json.loads(errors_json(errs))["ietf-restconf:errors"]
        else:
            status["ok"] = [None]
        return json.dumps({"ietf-yang-patch:yang-patch-status": status})
    inner = "<ok/>" if not errs else errors_xml(errs).replace(
        ' xmlns="urn:ietf:params:xml:ns:yang:ietf-restconf"', "")
    return (f'<yang-patch-status xmlns="{YANG_PATCH_NS}"><patch-id>{patch_id}</patch-id>'
            f"{inner}</yang-patch-status>")
