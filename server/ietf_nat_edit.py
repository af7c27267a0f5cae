"""An edit of /ietf-nat:nat read into the SessionEdits a nat-session edit would be.

libyang reads the subtree first, strictly, as it reads every edit the bulk reader declines
(unknown nodes, state data, a value out of its type, a missing key: its own rpc-error);
then the walk below keeps what a session can be and refuses the rest with an rpc-error
that says why: a prefix wider than one host (a mapping of a prefix is not a session), a
port range, a protocol the NAT keeps no sessions of, a static entry, another instance than
1, any other node of the instance (the NAT's policy is configured through nfmig-nat).

An entry is found by its index (:class:`~server.ietf_nat.IndexTable`): an entry already
held is that session, whose five-tuple cannot change (it is the session's key); a new
index must give the whole five-tuple, and one that names a session held under another
index is refused. Operations follow RFC 6241 at every level: on a leaf (delete, remove:
the session leaf taken away), on an entry (the session's edit), on mapping-table,
instance or nat (delete and remove of mapping-table take every session away; replace
makes the entries given the whole table; nothing takes instance 1 away).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

from lxml import etree
from nfmig.nf_backends.base import (
    KEY_FIELDS,
    PROTOCOL_NAMES,
    SESSION_FIELDS,
    Session,
    SessionKey,
)
from nfmig.nf_backends.batch import SessionEdit, key_text

from . import errors
from .entry_reader import OPERATION_ATTR, check_operation
from .errors import RpcError
from .filters import TopNode
from .ietf_nat import (
    BY_NODE,
    EXPLICIT,
    IMPLICIT,
    INSTANCE_ID,
    NAT_NS,
    IndexTable,
    entry_path,
    nat_node,
)
from .schema import Schema, YangError

_TAKE_AWAY = ("delete", "remove")
_CONTAINERS = ("nat", "instances", "instance", "mapping-table")
# A valid value for a leaf an edit takes away (libyang checks the value all the same).
_PLACEHOLDER = {"protocol": "6", "prefix": "0.0.0.0/32", "number": "0", "counter": "0",
                "enum": "none", "start-port-number": "0", "end-port-number": "0",
                "type": IMPLICIT, "index": "0"}
Lookup = Callable[[list[SessionKey]], dict[SessionKey, Session]]


@dataclass
class Claims:
    """What an edit of mapping-entries records in the index table once it succeeds."""

    written: dict[SessionKey, tuple[int, str]] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)


@dataclass
class _Entry:
    index: int
    operation: str
    values: dict[str, object]
    removed: dict[str, str]
    kind: str | None


class EditReader:
    """Reads nat elements of an edit; see the module's description."""

    def __init__(self, schema: Schema, table: IndexTable):
        self.schema = schema
        self.table = table

    def read(self, elements: list[etree._Element], inherited: str, lookup: Lookup,
             all_keys: Callable[[], Iterable[SessionKey]], claims: Claims
             ) -> list[SessionEdit]:
        """The SessionEdits of ``elements`` (each a /ietf-nat:nat) over the view that
        ``lookup`` (the sessions held among some keys) and ``all_keys`` show; what the
        edit records in the index table goes into ``claims``. Raises RpcError."""
        entries: list[_Entry] = []
        clear = False
        for element in elements:
            tree = self._checked(element)
            for nat in tree:
                clear |= self._walk(nat, inherited, 0, entries)
        edits = self._edits(entries, lookup, claims)
        if clear:  # every session the edit does not write goes
            written = {e.key for e in edits}
            edits += [SessionEdit("remove", Session(*k), KEY_FIELDS) for k in all_keys()
                      if k not in written]
        return edits

    # -- libyang's reading ---------------------------------------------------------------
    def _checked(self, element: etree._Element) -> etree._Element:
        """The subtree as libyang reads it strictly, printed back canonical."""
        if any(e.get(OPERATION_ATTR) in _TAKE_AWAY and not len(e) and not (e.text or "")
               .strip() for e in element.iter() if isinstance(e.tag, str)):
            element = deepcopy(element)
            for e in element.iter():
                if isinstance(e.tag, str) and e.get(OPERATION_ATTR) in _TAKE_AWAY and \
                        not len(e) and not (e.text or "").strip():
                    e.text = self._placeholder(e)
        try:
            printed = self.schema.canonical_xml(etree.tostring(element, encoding="unicode"))
        except YangError as exc:
            raise exc.to_rpc_error() from None
        return etree.fromstring(f"<x>{printed}</x>".encode())

    @staticmethod
    def _placeholder(element: etree._Element) -> str | None:
        qname = etree.QName(element)
        leaf = BY_NODE.get((qname.namespace, qname.localname))
        if leaf is not None:
            return _PLACEHOLDER.get(leaf.kind)
        return _PLACEHOLDER.get(qname.localname)

    # -- the containers ------------------------------------------------------------------
    def _walk(self, element: etree._Element, inherited: str, depth: int,
              entries: list[_Entry]) -> bool:
        """The entries under one container (nat, instances, instance, mapping-table);
        whether the edit takes every session not written away."""
        name = _CONTAINERS[depth]
        operation = _operation(element, name, inherited)
        if depth == 2:
            self._check_instance(element, operation)
        elif operation in _TAKE_AWAY and depth < 3:
            raise errors.operation_failed(
                f"{name} holds NAT instance {INSTANCE_ID}, which is this NAT itself and "
                "cannot be taken away; delete its mapping-table or entries instead",
                path=_container_path(depth))
        if operation in _TAKE_AWAY:
            return True
        clear = operation == "replace"
        for child in element:
            if not isinstance(child.tag, str):
                continue
            qname = etree.QName(child)
            if depth == 3:
                entries.append(self._entry(child, operation))
            elif qname.localname == _CONTAINERS[depth + 1] and qname.namespace == NAT_NS:
                clear |= self._walk(child, operation, depth + 1, entries)
            elif not (depth == 2 and qname.localname == "id"):
                raise errors.not_supported(
                    f"{_container_path(depth)}/{qname.localname} is not served: this NAT "
                    "takes its sessions through ietf-nat (mapping-table) and its policy "
                    "through nfmig-nat (nat-policy)", type="application")
        if operation == "replace" and depth < 3 and not any(
                isinstance(c.tag, str) and etree.QName(c).localname != "id" for c in element):
            return True
        return clear

    @staticmethod
    def _check_instance(element: etree._Element, operation: str) -> None:
        ident = element.findtext(f"{{{NAT_NS}}}id")
        if ident != str(INSTANCE_ID):
            raise errors.invalid_value(
                f"this server is one NAT instance, id {INSTANCE_ID}; there is no instance "
                f"{ident}", path=f"/ietf-nat:nat/instances/instance[id='{ident}']",
                info={"bad-element": "id"})
        if operation in _TAKE_AWAY:
            raise errors.operation_failed(
                f"instance {INSTANCE_ID} is this NAT itself and cannot be taken away; "
                "delete its mapping-table or entries instead", path=_container_path(3))
        if operation == "create":
            raise errors.data_exists(f"instance {INSTANCE_ID} exists (it is this NAT)",
                                     _container_path(3))

    # -- the entries ---------------------------------------------------------------------
    def _entry(self, element: etree._Element, inherited: str) -> _Entry:
        operation = _operation(element, "mapping-entry", inherited)
        index = int(element.findtext(f"{{{NAT_NS}}}index") or 0)
        values: dict[str, object] = {}
        removed: dict[str, str] = {}
        kind = None
        for child in element:
            if not isinstance(child.tag, str):
                continue
            qname = etree.QName(child)
            name = qname.localname
            op = _operation(child, name, None)
            if qname.namespace == NAT_NS and name in ("index", "type"):
                if op in _TAKE_AWAY and name == "index":
                    raise _take_key(index, name)
                if name == "type" and op not in _TAKE_AWAY:
                    kind = (child.text or "").strip()
                    if kind not in (IMPLICIT, EXPLICIT):
                        raise errors.invalid_value(
                            f"mapping-entry {index} is {kind}: this NAT holds sessions "
                            f"(dynamic mappings, {EXPLICIT} when written), not static "
                            "mappings", path=entry_path(index, "type"))
                continue
            leaf = BY_NODE[(qname.namespace, name)]  # libyang knows no other child
            if leaf.kind == "port":
                start = child.find(f"{{{NAT_NS}}}start-port-number")
                end = child.find(f"{{{NAT_NS}}}end-port-number")
                start_op = _operation(start, "start-port-number", None) \
                    if start is not None else None
                if end is not None and _operation(end, "end-port-number", None) not in \
                        _TAKE_AWAY and (start is None or end.text != start.text):
                    raise errors.invalid_value(
                        f"mapping-entry {index}: {name} is a range of ports; a session has "
                        "one port (give start-port-number alone)",
                        path=entry_path(index, name), info={"bad-element": name})
                if start_op in _TAKE_AWAY and op not in _TAKE_AWAY:
                    op = start_op
                if op not in _TAKE_AWAY and start is None:
                    raise errors.missing_element(
                        f"mapping-entry {index}: {name} needs start-port-number",
                        "start-port-number", entry_path(index, name))
                text = start.text if start is not None else ""
            else:
                text = child.text or ""
            if op in _TAKE_AWAY:
                if leaf.key:
                    raise _take_key(index, name)
                removed[leaf.field] = op
                continue
            values[leaf.field] = self._value(leaf.kind, text.strip(), index, name)
        return _Entry(index, operation, values, removed, kind)

    @staticmethod
    def _value(kind: str, text: str, index: int, name: str) -> object:
        if kind == "protocol":
            number = int(text)
            if number not in PROTOCOL_NAMES:
                raise errors.invalid_value(
                    f"mapping-entry {index}: transport-protocol {number} is not one this NAT "
                    "keeps sessions of (1 ICMP, 6 TCP, 17 UDP, 58 ICMPv6)",
                    path=entry_path(index, name), info={"bad-element": name})
            return PROTOCOL_NAMES[number]
        if kind == "prefix":
            address, _, length = text.partition("/")
            if length != ("128" if ":" in address else "32"):
                raise errors.invalid_value(
                    f"mapping-entry {index}: {name} {text} is a prefix, not one address; a "
                    f"mapping of a prefix is not a session (give a /32 or /128)",
                    path=entry_path(index, name), info={"bad-element": name})
            return address
        if kind == "enum":
            return text
        return int(text)

    def _edits(self, entries: list[_Entry], lookup: Lookup, claims: Claims
               ) -> list[SessionEdit]:
        seen: set[int] = set()
        wanted: set[SessionKey] = set()
        for e in entries:
            if e.index in seen:
                raise errors.invalid_value(f"mapping-entry {e.index} appears twice in this "
                                           "edit", path=entry_path(e.index),
                                           app_tag="data-not-unique")
            seen.add(e.index)
            held = self.table.key_of(e.index)
            if held is not None:
                wanted.add(held)
            given = _key_of(e.values)
            if given is not None:
                wanted.add(given)
        live = lookup(list(wanted)) if wanted else {}
        edits = []
        for e in entries:
            held = self.table.key_of(e.index)
            if held is not None and held not in live and held not in claims.written:
                held = None  # the session of that index is gone: the index is free
            edit = self._edit(e, held, live, claims)
            if edit is not None:
                edits.append(edit)
        return edits

    def _edit(self, e: _Entry, held: SessionKey | None, live: dict, claims: Claims
              ) -> SessionEdit | None:
        given = {f: e.values[f] for f in KEY_FIELDS if f in e.values}
        if held is not None:
            changed = [f for f, v in given.items() if held[KEY_FIELDS.index(f)] != v]
            if changed:
                raise errors.invalid_value(
                    f"mapping-entry {e.index} is the session {key_text(held)}; its protocol "
                    "and internal addresses and ports are that session's key and cannot "
                    "change (delete the entry and create another)",
                    path=entry_path(e.index), info={"bad-element": "mapping-entry"})
        if e.operation in _TAKE_AWAY:
            if held is None:
                if e.operation == "delete":
                    raise errors.data_missing(f"mapping-entry {e.index} does not exist, so "
                                              "it cannot be deleted", entry_path(e.index))
                return None
            # The index stays in the table until the session is gone from running and
            # the candidate (IndexTable.prune): a delete staged in the candidate may be
            # discarded.
            return SessionEdit(e.operation, Session(*held), KEY_FIELDS)
        if held is None:
            missing = [f for f in KEY_FIELDS if f not in given]
            if missing:
                if e.operation == "none":
                    raise errors.data_missing(f"mapping-entry {e.index} does not exist",
                                              entry_path(e.index))
                node = next(leaf.node for leaf in BY_NODE.values() if leaf.field == missing[0])
                raise errors.missing_element(
                    f"mapping-entry {e.index} is new, and a new entry gives the session's "
                    f"whole key: {node} is missing", node, entry_path(e.index))
            held = tuple(given[f] for f in KEY_FIELDS)
            other = self.table.index_of(held)
            if other is not None and other != e.index and (held in live or any(
                    i == other for i, _ in claims.written.values())):
                raise errors.data_exists(f"the session {key_text(held)} is mapping-entry "
                                         f"{other} already", entry_path(e.index))
        values = {**dict(zip(KEY_FIELDS, held, strict=True)), **e.values}
        present = tuple(f for f in SESSION_FIELDS if f in values)
        claims.written[held] = (e.index, e.kind or self.table.type_of(held) or EXPLICIT)
        return SessionEdit(e.operation, Session(**values), present, e.removed)


def combine(nat_sessions: list[SessionEdit], mapped: list[SessionEdit]) -> list[SessionEdit]:
    """The nat-session edits and the mapping-entry edits of one request as one list: a
    session both name (a document read whole, both views of the table in it, written
    back) is written once when both say the same of it; otherwise the edit is refused."""
    if not nat_sessions or not mapped:
        return nat_sessions + mapped
    first = {e.key: e for e in nat_sessions}
    out = list(nat_sessions)
    for edit in mapped:
        twin = first.get(edit.key)
        if twin is None:
            out.append(edit)
        elif twin.operation != edit.operation or twin.removed != edit.removed or any(
                getattr(twin.session, f) != getattr(edit.session, f) for f in edit.present):
            raise errors.invalid_value(
                f"the session {key_text(edit.key)} is written both as a nat-session and as "
                "a mapping-entry, differently", app_tag="data-not-unique")
    return out


def _key_of(values: dict[str, object]) -> SessionKey | None:
    if all(f in values for f in KEY_FIELDS):
        return tuple(values[f] for f in KEY_FIELDS)
    return None


def _operation(element: etree._Element, where: str, inherited: str | None) -> str | None:
    value = element.get(OPERATION_ATTR)
    return inherited if value is None else check_operation(value, where)


def _take_key(index: int, name: str) -> RpcError:
    return RpcError("bad-attribute", f"mapping-entry {index}: {name} is part of the "
                    "session's key and cannot be taken away; take the entry away instead",
                    type="protocol", info={"bad-attribute": "operation", "bad-element": name},
                    path=entry_path(index, name))


def _container_path(depth: int) -> str:
    return ["/ietf-nat:nat", "/ietf-nat:nat/instances",
            f"/ietf-nat:nat/instances/instance[id='{INSTANCE_ID}']",
            f"/ietf-nat:nat/instances/instance[id='{INSTANCE_ID}']/mapping-table"][min(depth, 3)]


class MappingTable:
    """What a server's datastores need of ietf-nat: the index table, its node in a read,
    and the reader of edits, whose records are kept only when the edit succeeds."""

    def __init__(self, schema: Schema, live: Callable[[list[SessionKey]], set[SessionKey]]):
        self.table = IndexTable(live)
        self.reader = EditReader(schema, self.table)
        self._claims: Claims | None = None

    def node(self, batches: Callable[[], Iterable[list[Session]]]) -> TopNode:
        return nat_node(batches, self.table)

    @contextmanager
    def scope(self, keep: bool = True) -> Iterator[None]:
        """One edit (under the datastores' lock): what it claims is recorded if it
        returns, and when ``keep`` (not a test-only edit)."""
        self._claims = Claims()
        try:
            yield
            if keep:
                self.table.settle(self._claims.written, self._claims.gone)
        finally:
            self._claims = None

    def read(self, elements: list[etree._Element], inherited: str, lookup: Lookup,
             all_keys: Callable[[], Iterable[SessionKey]]) -> list[SessionEdit]:
        return self.reader.read(elements, inherited, lookup, all_keys,
                                self._claims if self._claims is not None else Claims())
