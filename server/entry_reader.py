"""The strict reader of an edit's nat-session entries: libyang decides.

Whatever the bulk text reader (session_codec) declines comes here. Each entry goes to
libyang as the request's XML parser left it (comments dropped, as XML lets a processor do),
parsed strictly (unknown elements, namespaces and metadata, a wrong value, text or a
processing instruction inside an entry, a child inside a leaf: all refused) and printed
back, so the values an edit stores are libyang's canonical ones. Around libyang, what
RFC 6241 and RFC 7950 add for an edit:

- the keys come first, in the order of the key statement (RFC 7950 §7.8.5; libyang itself
  lets other leaves come before them);
- the only attribute is the base namespace's operation (merge, replace, create, delete,
  remove); other metadata (yang:insert, for one) has no meaning for this list;
- a leaf appears at most once;
- a non-key leaf whose operation is delete or remove only names what to take away
  (RFC 6241 §7.2): its value is not looked at, so libyang is shown a valid one in its place;
  a key cannot be taken away.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, Session
from nfmig.nf_backends.batch import SessionEdit

from . import errors
from .errors import RpcError
from .schema import ListEntryChecker, YangError

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
OPERATION_ATTR = f"{{{NC_NS}}}operation"
EDIT_OPERATIONS = ("merge", "replace", "create", "delete", "remove")
_TAKE_AWAY = ("delete", "remove")
_LEAF_ATTRIBUTES = etree.XPath("boolean(*/@*)")
_CHUNK = 200  # entries per libyang parse: it finds a top-level node's place by a walk of
#               the siblings before it, so one parse of a whole bulk edit is quadratic


def check_operation(value: str, where: str) -> str:
    if value not in EDIT_OPERATIONS:
        raise RpcError("bad-attribute", f"operation {value!r} on {where} is not one of "
                       f"{', '.join(EDIT_OPERATIONS)}", type="protocol",
                       info={"bad-attribute": "operation", "bad-element": where})
    return value


class EntryReader:
    """Reads nat-session elements into SessionEdits through libyang, or raises RpcError."""

    def __init__(self, checker: ListEntryChecker, namespace: str):
        self.checker = checker
        self.schema = checker.schema
        self._names = {f"{{{namespace}}}{name}": name for name in checker.leaves}
        self._key_tags = [f"{{{namespace}}}{key}" for key in KEY_FIELDS]
        self._numeric = frozenset(n for n, leaf in checker.leaves.items() if leaf.numeric)

    def read(self, entries: list[etree._Element], inherited: str,
             recognise: Callable[[str, str], list | None] | None = None) -> list:
        """The edits of ``entries``, in order; ``inherited`` is the operation of an entry
        that states none. ``recognise`` (text, inherited) may read libyang's printing of
        the entries, in which every value is canonical, ahead of the reader's own walk."""
        edits = []
        for start in range(0, len(entries), _CHUNK):
            text = "".join(map(self._libyang_text, entries[start:start + _CHUNK]))
            try:
                printed = self.schema.canonical_xml(text)
            except YangError as exc:
                raise exc.to_rpc_error() from None
            chunk = recognise(printed, inherited) if recognise is not None else None
            edits += chunk if chunk is not None else [
                self._edit(entry, inherited) for entry in etree.fromstring(f"<e>{printed}</e>")]
        return edits

    def _libyang_text(self, entry: etree._Element) -> str:
        """The entry as libyang is to read it, once what libyang lets through is checked."""
        if len(entry.attrib):
            self._check_attributes(entry, "nat-session")
        leaves = [child for child in entry if isinstance(child.tag, str)]
        tags = [leaf.tag for leaf in leaves]
        if tags[:len(KEY_FIELDS)] != self._key_tags:
            self._misplaced_key(leaves)
        if len(set(tags)) != len(tags):
            name = next(t for i, t in enumerate(tags) if t in tags[:i])
            raise RpcError("bad-element", f"leaf {_local(name)} appears twice in one entry",
                           path=self.checker.entry_path(self._key_texts(leaves)),
                           info={"bad-element": _local(name)})
        if not _LEAF_ATTRIBUTES(entry):
            return etree.tostring(entry, encoding="unicode", with_tail=False)
        placeholders = {}
        for index, leaf in enumerate(leaves):
            name = _local(leaf.tag)
            operation = self._check_attributes(leaf, name)
            if operation in _TAKE_AWAY:
                if name in KEY_FIELDS:
                    raise RpcError("bad-attribute", f"key leaf {name} cannot be taken away "
                                   f"({operation}); take the entry away instead",
                                   type="protocol", info={"bad-attribute": "operation",
                                                          "bad-element": name})
                known = self._names.get(leaf.tag)
                if known is not None and not len(leaf):
                    placeholders[index] = self.checker.leaves[known].placeholder
        if placeholders:
            entry = deepcopy(entry)
            leaves = [child for child in entry if isinstance(child.tag, str)]
            for index, value in placeholders.items():
                leaves[index].text = value
        return etree.tostring(entry, encoding="unicode", with_tail=False)

    def _misplaced_key(self, leaves: list[etree._Element]) -> None:
        """RpcError for keys that are not the entry's first leaves, in key order. Keys
        in place by name, one in another namespace, pass: libyang names that one."""
        names = [_local(leaf.tag) for leaf in leaves]
        path = self.checker.entry_path(self._key_texts(leaves))
        for position, key in enumerate(KEY_FIELDS):
            if names[position:position + 1] != [key]:
                if key not in names:
                    raise errors.missing_element(
                        f"nat-session entry is missing its key leaf {key}", key, path)
                raise RpcError("bad-element", f"key leaf {key} of nat-session must be its "
                               f"child number {position + 1}: the keys come first, in the "
                               "order of the key statement", path=path,
                               info={"bad-element": key})
    @staticmethod
    def _check_attributes(element: etree._Element, where: str) -> str | None:
        """The element's operation; RpcError for any other attribute or a bad value."""
        operation = None
        for name, value in element.attrib.items():
            if name != OPERATION_ATTR:
                qname = etree.QName(name)
                raise RpcError("unknown-attribute", f"{where} has no attribute "
                               f"{qname.localname}" + (f" in namespace {qname.namespace}"
                                                       if qname.namespace else ""),
                               type="protocol", info={"bad-attribute": qname.localname,
                                                      "bad-element": where})
            operation = check_operation(value, where)
        return operation

    @staticmethod
    def _key_texts(leaves: list[etree._Element]) -> dict[str, str]:
        return {_local(leaf.tag): (leaf.text or "") for leaf in leaves
                if _local(leaf.tag) in KEY_FIELDS}

    def _edit(self, entry: etree._Element, inherited: str) -> SessionEdit:
        """One edit from libyang's printing of an entry: keys first, every value
        canonical, every attribute an operation libyang checked."""
        values: dict = {}
        removed: dict[str, str] = {}
        for leaf in entry:
            name = self._names[leaf.tag]
            operation = leaf.get(OPERATION_ATTR)
            if operation in _TAKE_AWAY:
                removed[name] = operation
                continue
            text = leaf.text or ""
            values[name] = int(text) if name in self._numeric else text
        session = Session(**values)
        return SessionEdit(entry.get(OPERATION_ATTR, inherited), session, tuple(values),
                           removed)


def _local(tag: str) -> str:
    return tag[tag.rfind("}") + 1:]
