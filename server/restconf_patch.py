"""YANG Patch (RFC 8072): several edits of one datastore applied as one edit, all or none.

Every edit becomes one element of a single edit-config ``<config>`` (its operation as the
NETCONF operation attribute), and that one config goes to the datastore in one call, so a
patch of 10k session edits costs about what one 10k-entry edit-config costs. A patch whose
edits all name entries of one list of leaves, written the usual way, is cut from its text
with one pattern per edit (no element per leaf, no api-path parse); any other patch is read
edit by edit from its XML tree, each value element moved into the config, not copied.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote
from xml.sax.saxutils import escape

from lxml import etree

from . import errors
from .errors import RpcError, RpcErrors
from .restconf_codec import (
    JSON,
    Node,
    Step,
    Target,
    errors_json,
    errors_xml,
    parse_api_path,
    status_of,
)
from .restconf_handlers import Resources
from .restconf_query import bad_request
from .session_codec import NC_NS, OPERATION_ATTR

YANG_PATCH_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-patch"
OPERATIONS = ("create", "delete", "insert", "merge", "move", "replace", "remove")
_YP = f"{{{YANG_PATCH_NS}}}"
_PATCH_CHILDREN = {f"{_YP}patch-id", f"{_YP}comment", f"{_YP}edit"}
_EDIT_CHILDREN = {f"{_YP}{n}" for n in ("edit-id", "operation", "target", "point", "where",
                                       "value")}
# What _bulk_xml reads: the patch's own members before the first edit; the first target.
_HEAD_MEMBERS = re.compile(
    rf'<yang-patch xmlns="{YANG_PATCH_NS}">(?:\s|<patch-id>[^<]*</patch-id>|'
    r"<comment>[^<]*</comment>)*(?=<edit>)")
_PATCH_ID = re.compile(r"<patch-id>([^<]*)</patch-id>")
_XML_DECLARATION = re.compile(r"<\?xml[^>]*\?>\s*")
_FIRST_TARGET = re.compile(r"<target>/([\w.-]+:[\w.-]+)=")
_BULK_OPERATIONS = ("merge", "create", "replace", "delete", "remove")
_BULK_PATTERNS: dict[tuple[str, str], re.Pattern] = {}


def _bulk_edit_pattern(node: Node) -> re.Pattern:
    """One edit of an entry of ``node``: edit-id, operation, the target's key text, then
    (unless the edit has no value) the entry's content and its keys."""
    pattern = _BULK_PATTERNS.get((node.ns, node.name))
    if pattern is None:
        keys = "".join(rf"\s*<{k}>([^<]*)</{k}>" for k in node.keys)
        pattern = _BULK_PATTERNS[(node.ns, node.name)] = re.compile(
            r"<edit>\s*<edit-id>([^<]+)</edit-id>\s*<operation>([^<]+)</operation>\s*"
            rf"<target>/{re.escape(node.module)}:{re.escape(node.name)}=([^<]*)</target>\s*"
            rf'(?:<value>\s*<{node.name} xmlns="{re.escape(node.ns)}">({keys}[^&]*?)'
            rf"</{node.name}>\s*</value>\s*)?</edit>\s*")
    return pattern


def _target_of(edit: re.Match) -> str:
    found = re.search(r"<target>([^<]*)</target>", edit.group(0))
    return found.group(1) if found else ""


_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True,
                          remove_comments=True)


def apply_yang_patch(resources: Resources, datastore: str, target: Target, body: bytes,
                     media: str, reply: str | None = None) -> tuple[int, str]:
    """The status code and yang-patch-status document (in ``reply``, else the patch's own
    encoding) of one YANG Patch request. A failure names the edit it concerns (RFC 8072
    §2.3): an edit refused while it was read, or the edit whose target holds the error-path
    of what the datastore refused; anything else is a global error."""
    reply = reply or media
    builder = _Builder(resources, target)
    try:
        config = builder.build(body, media)
    except RpcError as exc:
        groups = {builder.edit_id: [exc]}
    else:
        try:
            resources.edit_config(datastore, config)
        except (RpcError, RpcErrors) as exc:
            groups = builder.edits_of(exc.errors if isinstance(exc, RpcErrors) else [exc],
                                      body, media)
        else:
            return 200, _status(builder.patch_id, {}, reply)
    first = next(iter(groups.values()))[0]
    return status_of(first), _status(builder.patch_id or _patch_id_of(body), groups, reply)


class _Builder:
    """Turns the edits of one patch into one edit-config <config> element."""

    def __init__(self, resources: Resources, base: Target):
        self.r = resources
        self.base = base
        self._lists: dict[str, Node | None] = {}  # "/module:list" -> its node, when a list
        self.patch_id = ""
        self.edit_id: str | None = None  # the edit being read; an error then is its own

    def build(self, body: bytes, media: str) -> etree._Element:
        """The patch's edits as one edit-config <config>."""
        self.patch_id, config = self.from_json(body) if media == JSON else self.from_xml(body)
        return config

    def edits_of(self, errs: list[RpcError], body: bytes, media: str
                 ) -> dict[str | None, list[RpcError]]:
        """The datastore's errors by the edit whose target holds their error-path (the
        deepest target, then the first edit); None for the patch as a whole. Reads the
        patch again, so a patch that applies pays nothing for it."""
        targets: list[tuple[str, str]] = []
        for edit_id, path in _edit_targets(body, media):
            try:
                targets.append((edit_id, self._target(path).instance_path()))
            except RpcError:
                continue
        groups: dict[str | None, list[RpcError]] = {}
        for error in errs:
            best, best_len = None, -1
            for edit_id, path in targets:
                if error.path and len(path) > best_len and error.path.startswith(path) \
                        and error.path[len(path):len(path) + 1] in ("", "/", "["):
                    best, best_len = edit_id, len(path)
            groups.setdefault(best, []).append(error)
        return groups

    # -- the patch document -------------------------------------------------------------
    def from_xml(self, body: bytes) -> tuple[str, etree._Element]:
        quick = self._from_text(body)
        if quick is not None:
            return quick
        self.edit_id = None
        try:
            root = etree.fromstring(body, parser=_PARSER)
        except etree.XMLSyntaxError as exc:
            raise RpcError("malformed-message", f"the body is not XML: {exc}", type="rpc") \
                from None
        if root.tag != f"{_YP}yang-patch":
            raise bad_request(f'the body is <yang-patch xmlns="{YANG_PATCH_NS}">',
                              "yang-patch")
        patch_id = self.patch_id = (root.findtext(f"{_YP}patch-id") or "").strip()
        if not patch_id:
            raise errors.missing_element("yang-patch needs a patch-id", "patch-id")
        pieces = self._bulk_xml(etree.tostring(root, encoding="unicode"))
        if pieces is not None:
            return patch_id, etree.fromstring(
                f'<config xmlns:nc="{NC_NS}">{"".join(pieces)}</config>'.encode(),
                parser=_PARSER)
        config = etree.Element("config", nsmap={"nc": NC_NS})
        seen = set()
        for edit in root:
            self.edit_id = None
            if not isinstance(edit.tag, str):
                continue
            if edit.tag not in _PATCH_CHILDREN:
                name = etree.QName(edit).localname
                raise errors.unknown_element(f"yang-patch has no member {name!r}", name)
            if edit.tag == f"{_YP}edit":
                self._xml_edit(edit, config, seen)
        self.edit_id = None
        if not seen:
            raise errors.missing_element("yang-patch needs at least one edit", "edit")
        return patch_id, config

    def from_json(self, body: bytes) -> tuple[str, etree._Element]:
        try:
            doc = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RpcError("malformed-message", f"the body is not JSON: {exc}", type="rpc") \
                from None
        patch = doc.get("ietf-yang-patch:yang-patch") if isinstance(doc, dict) else None
        if not isinstance(patch, dict) or len(doc) != 1:
            raise bad_request("the body is one member, ietf-yang-patch:yang-patch",
                              "yang-patch")
        unknown = set(patch) - {"patch-id", "comment", "edit"}
        if unknown:
            raise errors.unknown_element(f"yang-patch has no member {sorted(unknown)[0]!r}",
                                         sorted(unknown)[0])
        patch_id, edits = patch.get("patch-id"), patch.get("edit")
        if isinstance(patch_id, str):
            self.patch_id = patch_id
        if not isinstance(patch_id, str) or not patch_id:
            raise errors.missing_element("yang-patch needs a patch-id", "patch-id")
        if not isinstance(edits, list) or not edits:
            raise errors.missing_element("yang-patch needs at least one edit", "edit")
        seen: set[str] = set()
        text = "".join(self._json_edit(edit, seen) for edit in edits)
        self.edit_id = None
        try:
            config = etree.fromstring(f'<config xmlns:nc="{NC_NS}">{text}</config>'.encode(),
                                      parser=_PARSER)
        except etree.XMLSyntaxError as exc:  # values are escaped; this is a server bug
            raise RpcError("operation-failed", f"patch could not be assembled: {exc}") \
                from None
        return patch_id, config

    def _from_text(self, body: bytes) -> tuple[str, etree._Element] | None:
        """The bulk path on the request's own text, when it is UTF-8 written the usual way;
        the one parse of the assembled config checks what the patterns leave unchecked.
        None: the patch is parsed whole first (and any error reported from that)."""
        try:
            text = _XML_DECLARATION.sub("", body.decode().strip(), count=1)
        except UnicodeDecodeError:
            return None
        head = _HEAD_MEMBERS.match(text)
        patch_id = _PATCH_ID.search(head.group(0)) if head else None
        if patch_id is None or not patch_id.group(1).strip():
            return None
        self.patch_id = patch_id.group(1).strip()
        pieces = self._bulk_xml(text)
        if pieces is None:
            return None
        try:
            config = etree.fromstring(
                f'<config xmlns:nc="{NC_NS}">{"".join(pieces)}</config>'.encode(),
                parser=_PARSER)
        except etree.XMLSyntaxError:
            return None
        return patch_id.group(1).strip(), config

    def _bulk_xml(self, text: str) -> list[str] | None:
        """The edits as config text, cut from lxml's serialisation of the (so well-formed)
        patch when every edit is of an entry of one top-level list of leaves, written the
        usual way (unprefixed, the entry declaring its namespace, keys first, no entities);
        else None, and the element path reads the patch."""
        head = _HEAD_MEMBERS.match(text)
        if head is None or "&" in text or self.base.steps or not text.endswith(
                "</yang-patch>"):
            return None
        first = _FIRST_TARGET.search(text, head.end())
        node = self.r.index.top.get(first.group(1)) if first else None
        if node is None or node.kind != "list" or not all(
                c.kind == "leaf" for c in self.r.index.children(node).values()):
            return None
        edit_rx = _bulk_edit_pattern(node)
        pieces: list[str] = []
        seen: set[str] = set()
        pos, end = head.end(), len(text) - len("</yang-patch>")
        opening = f'<{node.name} nc:operation="%s" xmlns="{node.ns}">'
        closing = f"</{node.name}>"
        while pos < end:
            edit = edit_rx.match(text, pos)
            if edit is None:
                return None
            pos = edit.end()
            edit_id, operation, key_text, inner, *keys = edit.groups()
            uri_keys = key_text.split(",")
            if "%" in key_text:
                uri_keys = list(map(unquote, uri_keys))
            if (operation not in _BULK_OPERATIONS or edit_id in seen or
                    len(uri_keys) != len(node.keys) or
                    (inner is None) != (operation in ("delete", "remove"))):
                # refused with the general checks' reason, or read by the element path
                self._check_edit(edit_id, operation, _target_of(edit), inner is not None,
                                 seen)
                return None
            seen.add(edit_id)
            if inner is None:
                pieces.append(opening % operation + "".join(
                    f"<{k}>{escape(v)}</{k}>" for k, v in zip(node.keys, uri_keys,
                                                               strict=True)) + closing)
                continue
            if keys != uri_keys:
                self._check_keys(node, edit_id, keys, uri_keys)
            pieces.append(f"{opening % operation}{inner}{closing}")
        return pieces

    def _check_keys(self, node: Node, edit_id: str, found: list[str], wanted: list[str]
                    ) -> None:
        self.edit_id = edit_id
        for name, got, value in zip(node.keys, found, wanted, strict=True):
            got = got.strip()
            if got != value and not self.r.same_key(name, got, value):
                raise bad_request(f"edit {edit_id}: key {name} is {got!r} in the value but "
                                  f"{value!r} in the target", name)

    # -- one edit -------------------------------------------------------------------------
    def _xml_edit(self, edit: etree._Element, config: etree._Element, seen: set[str]) -> None:
        self.edit_id = _text(edit.find(f"{_YP}edit-id")) or None
        fields: dict[str, etree._Element] = {}
        for child in edit:
            if isinstance(child.tag, str):
                if child.tag not in _EDIT_CHILDREN:
                    name = etree.QName(child).localname
                    raise errors.unknown_element(f"an edit has no member {name!r}", name)
                fields[child.tag[len(_YP):]] = child
        edit_id, operation, path = (_text(fields.get(n)) for n in ("edit-id", "operation",
                                                                      "target"))
        target = self._check_edit(edit_id, operation, path, "value" in fields, seen)
        if operation in ("delete", "remove"):
            element = _key_element(target)
        else:
            values = [c for c in fields["value"] if isinstance(c.tag, str)]
            self._check_value(target, values, edit_id)
            element = values[0]
        if len(target.steps) == 1:
            config.append(element)  # moves it out of the patch document; nothing copied
            element.set(OPERATION_ATTR, operation)  # after the move: config's nc prefix
            return
        element.set(OPERATION_ATTR, operation)
        text = etree.tostring(element, encoding="unicode", with_tail=False)
        wrapped = target.wrap(text, len(target.steps) - 1)
        config.append(etree.fromstring(
            f'<x xmlns:nc="{NC_NS}">{wrapped}</x>'.encode(), parser=_PARSER)[0])

    def _json_edit(self, edit, seen: set[str]) -> str:
        if not isinstance(edit, dict):
            raise bad_request("each edit is an object", "edit")
        edit_id = edit.get("edit-id")
        self.edit_id = edit_id if isinstance(edit_id, str) and edit_id else None
        unknown = set(edit) - {"edit-id", "operation", "target", "point", "where", "value"}
        if unknown:
            raise errors.unknown_element(f"an edit has no member {sorted(unknown)[0]!r}",
                                         sorted(unknown)[0])
        edit_id, operation, path = edit.get("edit-id"), edit.get("operation"), \
            edit.get("target")
        target = self._check_edit(edit_id, operation, path, "value" in edit, seen)
        node = target.node
        if operation in ("delete", "remove"):
            keys = "".join(f"<{k}>{escape(v)}</{k}>"
                           for k, v in zip(node.keys, target.steps[-1].keys or (),
                                           strict=False))
            if node.kind == "leaf-list" and target.steps[-1].keys:
                keys = escape(target.steps[-1].keys[0])
            text = f'<{node.name} xmlns="{node.ns}">{keys}</{node.name}>'
        else:
            parent = target.steps[-2].node if len(target.steps) > 1 else None
            value = self._json_value(target, edit.get("value"), edit_id)
            text = self.r.xml.members(value, parent)
        # Our writer starts every element "<name" and then " xmlns=..." or ">".
        cut = len(node.name) + 1
        text = f'{text[:cut]} nc:operation="{operation}"{text[cut:]}'
        return target.wrap(text, len(target.steps) - 1)

    def _check_edit(self, edit_id, operation, path, has_value: bool, seen: set[str]
                    ) -> Target:
        self.edit_id = edit_id if isinstance(edit_id, str) and edit_id else None
        if self.edit_id is None:
            raise errors.missing_element("every edit needs an edit-id", "edit-id")
        if edit_id in seen:
            raise bad_request(f"edit-id {edit_id!r} appears twice in the patch", "edit-id")
        seen.add(edit_id)
        if operation not in OPERATIONS:
            raise bad_request(f"edit {edit_id}: operation is one of {', '.join(OPERATIONS)}",
                              "operation")
        if operation in ("insert", "move"):
            raise bad_request(f"edit {edit_id}: {operation} needs an ordered-by user list, "
                              "and this model has none", "operation")
        if not isinstance(path, str) or not path.startswith("/"):
            raise errors.missing_element(f"edit {edit_id}: target is a path starting with /",
                                         "target")
        target = self._target(path)
        if not target.steps:
            raise bad_request(f"edit {edit_id}: the target names a data node", "target")
        if operation in ("delete", "remove") and has_value:
            raise bad_request(f"edit {edit_id}: {operation} takes no value", "value")
        if operation not in ("delete", "remove") and not has_value:
            raise errors.missing_element(f"edit {edit_id}: {operation} needs a value",
                                         "value")
        return target

    def _target(self, path: str) -> Target:
        """The edit's target; ``/module:list=keys`` of a top-level list from a cache."""
        head, has_keys, keys = path.partition("=")
        if has_keys and not self.base.steps and "/" not in keys:
            if head not in self._lists:
                node = self.r.index.top.get(head[1:])
                self._lists[head] = node if node is not None and node.kind == "list" \
                    else None
            node = self._lists[head]
            if node is not None:
                values = tuple(map(unquote, keys.split(",")))
                if len(values) == len(node.keys):
                    return Target([Step(node, values)])
        return parse_api_path(self.r.index, path, self.base)

    # -- values ---------------------------------------------------------------------------
    def _check_value(self, target: Target, values: list[etree._Element], edit_id) -> None:
        """The value is the target node itself (one element, same keys as the target)."""
        node = target.node
        if len(values) != 1 or values[0].tag != f"{{{node.ns}}}{node.name}":
            raise bad_request(f"edit {edit_id}: the value must hold exactly the target "
                              f"{node.name}", node.name)
        keys = target.steps[-1].keys
        if node.kind != "list" or not keys:
            self.r.check_same_node(target, values)
            return
        wanted = {f"{{{node.ns}}}{k}": v for k, v in zip(node.keys, keys, strict=True)}
        found = 0
        for child in values[0]:
            value = wanted.get(child.tag)
            if value is not None:
                found += 1
                text = (child.text or "").strip()
                if text != value and not self.r.same_key(child.tag[len(node.ns) + 2:], text,
                                                         value):
                    raise bad_request(f"edit {edit_id}: key {etree.QName(child).localname} "
                                      f"is {text!r} in the value but {value!r} in the "
                                      "target", etree.QName(child).localname)
        if found != len(wanted):
            self.r.check_same_node(target, values)  # adds the keys the value left out

    def _json_value(self, target: Target, value, edit_id) -> dict:
        node = target.node
        names = (f"{node.module}:{node.name}", node.name)
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in names:
            raise bad_request(f"edit {edit_id}: the value is one member, "
                              f"{node.module}:{node.name}", node.name)
        name, inner = next(iter(value.items()))
        if node.kind not in ("list", "leaf-list"):
            return {f"{node.module}:{node.name}": inner}
        if not isinstance(inner, list) or len(inner) != 1:
            raise bad_request(f"edit {edit_id}: the value holds exactly one {node.name}",
                              node.name)
        keys = target.steps[-1].keys
        if node.kind == "list" and keys and isinstance(inner[0], dict):
            entry = inner[0]
            for key, wanted in zip(node.keys, keys, strict=True):
                got = entry.get(key)
                if got is None:
                    entry = {key: wanted, **entry}
                    continue
                text = got if isinstance(got, str) else str(got).lower() \
                    if isinstance(got, bool) else str(got)
                if text != wanted and not self.r.same_key(key, text, wanted):
                    raise bad_request(f"edit {edit_id}: key {key} is {text!r} in the value "
                                      f"but {wanted!r} in the target", key)
            inner = [entry]
        elif node.kind == "leaf-list" and keys and inner != [keys[0]] and \
                str(inner[0]) != keys[0]:
            raise bad_request(f"edit {edit_id}: the leaf-list value differs from the "
                              "target's", node.name)
        return {f"{node.module}:{node.name}": inner}


def _text(element: etree._Element | None) -> str | None:
    return None if element is None else (element.text or "").strip()


def _key_element(target: Target) -> etree._Element:
    node = target.node
    element = etree.Element(f"{{{node.ns}}}{node.name}")
    keys = target.steps[-1].keys or ()
    if node.kind == "list":
        for name, value in zip(node.keys, keys, strict=False):
            etree.SubElement(element, f"{{{node.ns}}}{name}").text = value
    elif node.kind == "leaf-list" and keys:
        element.text = keys[0]
    return element


def _status(patch_id: str, groups: dict[str | None, list[RpcError]], media: str) -> str:
    """yang-patch-status: ``ok``, or the global errors (key None) and each edit's errors."""
    if media == JSON:
        status: dict = {"patch-id": patch_id}
        if not groups:
            status["ok"] = [None]
        if None in groups:
            status["errors"] = _errors_member(groups[None])
        edits = [{"edit-id": k, "errors": _errors_member(v)} for k, v in groups.items()
                 if k is not None]
        if edits:
            status["edit-status"] = {"edit": edits}
        return json.dumps({"ietf-yang-patch:yang-patch-status": status})
    parts = [f'<yang-patch-status xmlns="{YANG_PATCH_NS}"><patch-id>{escape(patch_id)}'
             "</patch-id>"]
    if not groups:
        parts.append("<ok/>")
    if None in groups:
        parts.append(_errors_element(groups[None]))
    edits = [f"<edit><edit-id>{escape(k)}</edit-id>{_errors_element(v)}</edit>"
             for k, v in groups.items() if k is not None]
    if edits:
        parts.append(f"<edit-status>{''.join(edits)}</edit-status>")
    parts.append("</yang-patch-status>")
    return "".join(parts)


def _errors_member(errs: list[RpcError]) -> dict:
    """rc:errors as used by ietf-yang-patch: its members are unprefixed there."""
    return json.loads(errors_json(errs))["ietf-restconf:errors"]


def _errors_element(errs: list[RpcError]) -> str:
    """rc:errors as used by ietf-yang-patch: in ietf-yang-patch's namespace."""
    return errors_xml(errs).replace(' xmlns="urn:ietf:params:xml:ns:yang:ietf-restconf"', "",
                                    1)


def _edit_targets(body: bytes, media: str) -> list[tuple[str, str]]:
    """(edit-id, target) of each edit of a patch that was read whole once already."""
    if media == JSON:
        edits = json.loads(body)["ietf-yang-patch:yang-patch"]["edit"]
        return [(e["edit-id"], e["target"]) for e in edits]
    root = etree.fromstring(body, parser=_PARSER)
    return [(_text(e.find(f"{_YP}edit-id")) or "", _text(e.find(f"{_YP}target")) or "")
            for e in root.iterfind(f"{_YP}edit")]


def _patch_id_of(body: bytes) -> str:
    """The patch-id of a patch that could not be read, when its text shows one."""
    text = body.decode(errors="replace")
    found = _PATCH_ID.search(text) or re.search(r'"patch-id"\s*:\s*"([^"\\]*)"', text)
    return found.group(1).strip() if found else ""
