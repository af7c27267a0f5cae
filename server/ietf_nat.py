"""The NAT's sessions as RFC 8512 (ietf-nat) mapping-entries: the translation, both ways.

An nfmig server serves its one session table twice: as nfmig-nat ``nat-session`` entries
and as the ``mapping-entry`` list of ietf-nat instance 1. There is one data path: a read of
the mapping-table formats the same backend sessions (``Backend.session_batches``, with a
candidate's changes over them) that a nat-session read formats, text straight from the
tuples as session_codec does, never a libyang tree of the table; an edit of mapping-entries
becomes the same :class:`SessionEdit` list a nat-session edit becomes
(ietf_nat_edit.py), so the backend's batch, its all-or-nothing rule, the candidate,
confirmed commits and access control (judged on the sessions written) are the ones
nat-session edits go through.

The correspondence is declared once, in :data:`LEAVES` (the nfmig-nat model's own
description of its mapping onto ietf-nat): each Session field, the mapping-entry node that
carries it and how its value is written. What ietf-nat has no node for (TCP state, window
scales, counters) goes into the augment module nfmig-nat-ietf, so that sessions moved
through ietf-nat between nfmig servers lose nothing; an NMS that knows only ietf-nat
ignores those leaves.

``index``, the list's key, means nothing to the NF: :class:`IndexTable` keeps it, per
server, beside the session key (stable while the session lives; a written entry keeps the
index its writer gave, a session the NF made gets the next free one when first read), and
with it the entry's ``type`` (dynamic-implicit unless written).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from nfmig.nf_backends.base import (
    KEY_FIELDS,
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    SESSION_FIELDS,
    Session,
    SessionKey,
    session_key,
)

if TYPE_CHECKING:  # the client imports this module too, without the server's libyang
    from .filters import TopNode

NAT_NS = "urn:ietf:params:xml:ns:yang:ietf-nat"
AUGMENT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat-ietf"
AUGMENT_MODULE = "nfmig-nat-ietf"
NAT_TAG = f"{{{NAT_NS}}}nat"
INSTANCE_ID = 1  # the one NAT instance a server is
IMPLICIT, EXPLICIT = "dynamic-implicit", "dynamic-explicit"
ENTRY_PATH = (f"/ietf-nat:nat/instances/instance[id='{INSTANCE_ID}']/mapping-table/"
              "mapping-entry")


@dataclass(frozen=True)
class Leaf:
    """One Session field as a mapping-entry node. ``kind``: protocol (the IANA number of
    the nfmig-nat enum), prefix (a host address as a /32 or /128 prefix), port (a
    port-number container of start-port-number alone), number, counter (uint64: a JSON
    string), enum."""

    field: str
    node: str
    kind: str
    augment: bool = False

    @property
    def key(self) -> bool:
        return self.field in KEY_FIELDS

    @property
    def namespace(self) -> str:
        return AUGMENT_NS if self.augment else NAT_NS


# In the mapping-entry's schema order (the augment's leaves after ietf-nat's own).
LEAVES: tuple[Leaf, ...] = (
    Leaf("protocol", "transport-protocol", "protocol"),
    Leaf("src_address", "internal-src-address", "prefix"),
    Leaf("src_port", "internal-src-port", "port"),
    Leaf("translated_address", "external-src-address", "prefix"),
    Leaf("translated_port", "external-src-port", "port"),
    Leaf("dst_address", "internal-dst-address", "prefix"),
    Leaf("dst_port", "internal-dst-port", "port"),
    Leaf("translated_dst_address", "external-dst-address", "prefix"),
    Leaf("translated_dst_port", "external-dst-port", "port"),
    Leaf("timeout", "lifetime", "number"),
    Leaf("tcp_state", "tcp-state", "enum", augment=True),
    Leaf("src_window_scale", "src-window-scale", "number", augment=True),
    Leaf("dst_window_scale", "dst-window-scale", "number", augment=True),
    Leaf("orig_packets", "orig-packets", "counter", augment=True),
    Leaf("orig_bytes", "orig-bytes", "counter", augment=True),
    Leaf("reply_packets", "reply-packets", "counter", augment=True),
    Leaf("reply_bytes", "reply-bytes", "counter", augment=True),
)
assert sorted(leaf.field for leaf in LEAVES) == sorted(SESSION_FIELDS), \
    "every Session field has exactly one mapping-entry node"
BY_NODE: dict[tuple[str, str], Leaf] = {(leaf.namespace, leaf.node): leaf for leaf in LEAVES}
_ORDER = [SESSION_FIELDS.index(leaf.field) for leaf in LEAVES]  # Session index per leaf


def host_prefix(address: str) -> str:
    return address + ("/128" if ":" in address else "/32")


def _wire(leaf: Leaf) -> Callable[[object], object]:
    if leaf.kind == "protocol":
        return PROTOCOL_NUMBERS.__getitem__
    if leaf.kind == "prefix":
        return host_prefix
    return lambda value: value


_WIRE = [_wire(leaf) for leaf in LEAVES]


def session_from_wire(values: dict[str, str]) -> Session:
    """A Session from mapping-entry leaf texts by node name (the canonical forms a reader
    of a server's reply sees: a host prefix, a port's start-port-number, a protocol
    number); for clients that read mapping-entries. Raises ValueError."""
    fields: dict[str, object] = {}
    for leaf in LEAVES:
        text = values.get(leaf.node)
        if text is None:
            continue
        if leaf.kind == "protocol":
            fields[leaf.field] = PROTOCOL_NAMES[int(text)]
        elif leaf.kind == "prefix":
            address, _, length = text.partition("/")
            if length not in ("32", "128"):
                raise ValueError(f"{leaf.node} {text} is not one host's address")
            fields[leaf.field] = address
        elif leaf.kind == "enum":
            fields[leaf.field] = text
        else:
            fields[leaf.field] = int(text)
    return Session(**fields)


# -- the index of each session ---------------------------------------------------------------
class IndexTable:
    """mapping-entry index <-> session key, and the type of written entries, for one
    server. Entries of sessions that are gone are pruned when the table has doubled since
    the last pruning (``live`` says which keys are still held), so it stays the size of the
    table it indexes."""

    def __init__(self, live: Callable[[list[SessionKey]], set[SessionKey]]):
        self._live = live
        self._lock = threading.Lock()
        self._index: dict[SessionKey, int] = {}
        self._key: dict[int, SessionKey] = {}
        self._type: dict[SessionKey, str] = {}
        self._next = 1
        self._prune_at = 4096

    def indices(self, keys: list[SessionKey]) -> list[int]:
        """The index of each key; a key without one gets the next free index."""
        with self._lock:
            index = self._index
            if all(k in index for k in keys):
                return [index[k] for k in keys]
            out = []
            for k in keys:
                i = index.get(k)
                if i is None:
                    while self._next in self._key:
                        self._next += 1
                    i = self._next
                    self._next += 1
                    index[k] = i
                    self._key[i] = k
                out.append(i)
            grown = len(index) > self._prune_at
        if grown:
            self.prune()
        return out

    def types(self, keys: Iterable[SessionKey]) -> list[str]:
        get = self._type.get
        return [get(k, IMPLICIT) for k in keys]

    def key_of(self, index: int) -> SessionKey | None:
        return self._key.get(index)

    def index_of(self, key: SessionKey) -> int | None:
        return self._index.get(key)

    def type_of(self, key: SessionKey) -> str | None:
        return self._type.get(key)

    def settle(self, claims: dict[SessionKey, tuple[int, str]], gone: set[int]) -> None:
        """What an edit that succeeded wrote: each written key's index and type, and the
        indices of the entries it deleted."""
        with self._lock:
            for i in gone:
                k = self._key.pop(i, None)
                if k is not None:
                    self._index.pop(k, None)
                    self._type.pop(k, None)
            for k, (i, kind) in claims.items():
                old = self._index.get(k)
                if old is not None and old != i:
                    self._key.pop(old, None)
                other = self._key.get(i)
                if other is not None and other != k:  # a gone session's index, reused
                    self._index.pop(other, None)
                    self._type.pop(other, None)
                self._index[k] = i
                self._key[i] = k
                self._type[k] = kind
            grown = len(self._index) > self._prune_at
        if grown:
            self.prune()

    def prune(self) -> None:
        """Forget the entries of sessions no longer held."""
        with self._lock:
            keys = list(self._index)
        held = self._live(keys)
        with self._lock:
            for k in keys:
                if k not in held:
                    i = self._index.pop(k, None)
                    self._type.pop(k, None)
                    if i is not None and self._key.get(i) == k:
                        del self._key[i]
            self._next = 1
            self._prune_at = max(4096, 2 * len(self._index))


# -- reads -----------------------------------------------------------------------------------
_HEAD = (f'<nat xmlns="{NAT_NS}" xmlns:nfi="{AUGMENT_NS}"><instances><instance>'
         f"<id>{INSTANCE_ID}</id>")
_TAIL = "</instance></instances></nat>"


def _xml_part(leaf: Leaf) -> str:
    if leaf.kind == "port":
        return f"<{leaf.node}><start-port-number>%s</start-port-number></{leaf.node}>"
    name = f"nfi:{leaf.node}" if leaf.augment else leaf.node
    return f"<{name}>%s</{name}>"


def _json_part(leaf: Leaf) -> str:
    name = f"{AUGMENT_MODULE}:{leaf.node}" if leaf.augment else leaf.node
    if leaf.kind == "port":
        return f'"{name}":{{"start-port-number":%s}}'
    quoted = leaf.kind in ("prefix", "enum", "counter")  # RFC 7951: uint64 as a string
    return f'"{name}":"%s"' if quoted else f'"{name}":%s'


class EntryFormatter:
    """Mapping-entries as text, XML or RFC 7951 JSON, one %-template per pattern of present
    leaves (sessions share a handful), as session_codec formats nat-session entries."""

    def __init__(self, table: IndexTable, json: bool = False):
        self.table = table
        self.json = json
        self._templates: dict[tuple[bool, ...], tuple[str, list[int]]] = {}

    def entries(self, batch: list[Session]) -> str:
        if not batch:
            return ""
        keys = list(map(session_key, batch))
        indices = self.table.indices(keys)
        types = self.table.types(keys)
        parts = []
        for s, i, kind in zip(batch, indices, types, strict=True):
            present = tuple(s[j] is not None for j in _ORDER)
            template = self._templates.get(present) or self._template(present)
            values = [i, kind]
            values += [_WIRE[n](s[_ORDER[n]]) for n in template[1]]
            parts.append(template[0] % tuple(values))
        return ",".join(parts) if self.json else "".join(parts)

    def _template(self, present: tuple[bool, ...]) -> tuple[str, list[int]]:
        chosen = [n for n, p in enumerate(present) if p]
        if self.json:
            text = '{"index":%s,"type":"%s",' + ",".join(_json_part(LEAVES[n])
                                                         for n in chosen) + "}"
        else:
            text = ("<mapping-entry><index>%s</index><type>%s</type>"
                    + "".join(_xml_part(LEAVES[n]) for n in chosen) + "</mapping-entry>")
        template = self._templates[present] = (text.replace(",}", "}"), chosen)
        return template


def nat_xml(batches: Iterable[list[Session]], table: IndexTable, state: str = ""
            ) -> Iterator[str]:
    """/ietf-nat:nat of these sessions, in pieces: instance 1 and its mapping-table (left
    out when no session is held; the instance is there whatever it holds), then ``state``
    (the instance's statistics, in an operational read)."""
    formatter = EntryFormatter(table)
    opened = False
    yield _HEAD
    for batch in batches:
        if not batch:
            continue
        if not opened:
            opened = True
            yield "<mapping-table>"
        yield formatter.entries(batch)
    yield ("</mapping-table>" if opened else "") + state + _TAIL


def nat_json(batches: Iterable[list[Session]], table: IndexTable) -> Iterator[str]:
    """The same as the member ``"ietf-nat:nat": {...}`` of an RFC 7951 document."""
    formatter = EntryFormatter(table, json=True)
    opened = False
    yield f'"ietf-nat:nat":{{"instances":{{"instance":[{{"id":{INSTANCE_ID}'
    for batch in batches:
        if not batch:
            continue
        text = formatter.entries(batch)
        if not opened:
            opened = True
            yield ',"mapping-table":{"mapping-entry":[' + text
        else:
            yield "," + text
    yield ("]}" if opened else "") + "}]}}"


def nat_node(batches: Callable[[], Iterable[list[Session]]], table: IndexTable) -> TopNode:
    """/ietf-nat:nat as a datastore's top-level node, produced on demand."""
    node = _node_class()(NAT_NS, "nat", lambda: nat_xml(batches(), table))
    object.__setattr__(node, "joined", lambda state: nat_xml(batches(), table, state))
    return node


def statistics_node(started: str) -> TopNode:
    """The instance's state: its statistics (RFC 8512 makes discontinuity-time mandatory:
    when this server began to serve the NAT). An operational read joins it to the
    configuration's node (:func:`with_statistics`)."""
    state = f"<statistics><discontinuity-time>{started}</discontinuity-time></statistics>"
    node = _node_class()(NAT_NS, "nat", lambda: [_HEAD, state, _TAIL])
    object.__setattr__(node, "state", state)
    return node


def with_statistics(nodes: list[TopNode]) -> list[TopNode]:
    """A read's nodes with the instance's statistics inside its configuration's node, when
    it has both (two /ietf-nat:nat nodes would be two instances of one container)."""
    ours = [n for n in nodes if hasattr(n, "joined") or hasattr(n, "state")]
    config = next((n for n in ours if hasattr(n, "joined")), None)
    state = next((n for n in ours if hasattr(n, "state")), None)
    if config is None or state is None:
        return nodes
    joined = _node_class()(NAT_NS, "nat", lambda: config.joined(state.state))
    return [joined if n is config else n for n in nodes if n is not state]


@cache
def _node_class() -> type:
    from .filters import TopNode

    class NatNode(TopNode):
        """/ietf-nat:nat, marked for with_statistics (an attribute set after creation)."""

    return NatNode


def entry_path(index: int | str, leaf: str | None = None) -> str:
    return f"{ENTRY_PATH}[index='{index}']" + (f"/{leaf}" if leaf else "")
