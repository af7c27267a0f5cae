"""`nfmig migrate --model ietf-nat`: the migration's sessions read and written as RFC 8512
mapping-entries instead of nfmig-nat nat-sessions.

The migrator keeps working on nat-session entries (its selection, collision checks,
rollback and report are written for them); :class:`IetfNatConnection` wraps each end's
connection and translates at the wire, with the server's own declaration of the mapping
(nfmig.server.ietf_nat, which needs nothing of the server to import): a read of the
sessions becomes a get-data of the mapping-table, whose entries are handed back as
nat-session entries, and an edit of nat-session entries is sent as mapping-entries. The
migration's own operations (freeze, track-changes, changes, session-digest) have no
ietf-nat counterpart and stay nfmig-nat's; the ends must implement both modules, and
nfmig-nat-ietf, whose leaves carry what a mapping-entry lacks, so nothing is lost.

Indices: a mapping-entry's key is a per-server index. A session already on a target keeps
the index it has there; a new one gets the index it had on its source when that is free on
the target, else the next free one. Each end's table (index of every key) is read once,
with the first read or edit of sessions on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree
from nfmig.nf_backends.base import (
    KEY_FIELDS,
    PROTOCOL_NUMBERS,
    SESSION_FIELDS,
    Session,
    session_key,
)
from nfmig.server.ietf_nat import (
    AUGMENT_NS,
    INSTANCE_ID,
    LEAVES,
    NAT_NS,
    host_prefix,
    session_from_wire,
)

from .negotiate import Facts

NFMIG_NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
MODULES = ("ietf-nat", "nfmig-nat-ietf")
_TABLE_FILTER = (f'<subtree-filter><nat xmlns="{NAT_NS}"><instances><instance>'
                 f"<id>{INSTANCE_ID}</id><mapping-table/></instance></instances></nat>"
                 "</subtree-filter>")
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True,
                          remove_comments=True)


@dataclass
class IndexPlan:
    """What the ends of one migration share: the index each session had on its source."""

    source_index: dict[tuple, int] = field(default_factory=dict)


def problems(ends: list[tuple[str, str, Facts]]) -> list[str]:
    """Why these ends cannot move sessions through ietf-nat (empty: they can)."""
    found = []
    for endpoint, role, facts in ends:
        missing = [m for m in MODULES if m not in facts.modules]
        if missing:
            found.append(f"{role} {endpoint} does not implement {' and '.join(missing)} "
                         "(--model ietf-nat needs ietf-nat and its nfmig-nat-ietf augment)")
        elif not {"napt44"} <= facts.modules["ietf-nat"].features:
            found.append(f"{role} {endpoint}: ietf-nat lacks the feature napt44")
    return found


class IetfNatConnection:
    """A connection (NETCONF or RESTCONF) whose session reads and writes go through
    ietf-nat; everything else passes through unchanged."""

    def __init__(self, conn: Any, plan: IndexPlan, source: bool):
        self._conn = conn
        self._plan = plan
        self._source = source
        self._index: dict[tuple, int] | None = None  # this end's key -> index
        self._used: set[int] = set()
        self._next = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    @property
    def reader(self) -> None:
        """No streamed reads: a reply is translated whole."""
        return None

    def reopen(self, connect_timeout: float = 10) -> IetfNatConnection:
        return IetfNatConnection(self._conn.reopen(connect_timeout), self._plan, self._source)

    # -- reads -------------------------------------------------------------------------
    def get_data(self, datastore: str, filter_xml: str = "") -> str:
        """A read of nat-session entries answered from the mapping-table (the whole
        table: the migrator applies its selection to what it reads)."""
        if "nat-session" not in filter_xml:
            return self._conn.get_data(datastore, filter_xml)
        sessions = self._read_table(datastore)
        return "".join(map(nat_session_xml, sessions))

    def _read_table(self, datastore: str) -> list[Session]:
        text = self._conn.get_data(datastore, _TABLE_FILTER)
        root = etree.fromstring(f"<data>{text}</data>".encode(), parser=_PARSER)
        sessions, index = [], {}
        for entry in root.iter(f"{{{NAT_NS}}}mapping-entry"):
            values = {}
            for child in entry:
                if not isinstance(child.tag, str):
                    continue
                start = child.find(f"{{{NAT_NS}}}start-port-number")
                values[etree.QName(child).localname] = (start if start is not None
                                                        else child).text or ""
            session = session_from_wire(values)
            sessions.append(session)
            index[session.key] = int(values["index"])
        self._index = index
        self._used = set(index.values())
        if self._source:
            self._plan.source_index.update(index)
        return sessions

    # -- writes ------------------------------------------------------------------------
    def edit_config(self, body: str, target: str = "candidate") -> int:
        """An edit of nat-session entries sent as mapping-entries (others unchanged)."""
        if "nat-session" not in body:
            return self._conn.edit_config(body, target)
        if self._index is None:
            self._read_table("running")
        root = etree.fromstring(f'<x xmlns:nc="{NC_NS}">{body}</x>'.encode(), parser=_PARSER)
        entries, others = [], []
        for element in root:
            if not isinstance(element.tag, str):
                continue
            if etree.QName(element).localname != "nat-session":
                others.append(etree.tostring(element, encoding="unicode"))
                continue
            entry = self._entry(element)
            if entry is not None:
                entries.append(entry)
        mapped = (f'<nat xmlns="{NAT_NS}" xmlns:nfi="{AUGMENT_NS}" xmlns:nc="{NC_NS}">'
                  f"<instances><instance><id>{INSTANCE_ID}</id><mapping-table>"
                  f"{''.join(entries)}</mapping-table></instance></instances></nat>"
                  if entries else "")
        return self._conn.edit_config("".join(others) + mapped, target)

    def _entry(self, element: etree._Element) -> str | None:
        values = {etree.QName(c).localname: (c.text or "").strip() for c in element
                  if isinstance(c.tag, str)}
        operation = element.get(f"{{{NC_NS}}}operation")
        session = _session(values)
        key = session_key(session)
        index = self._index_for(key, create=operation not in ("delete", "remove"))
        if index is None:
            return None  # taking away what this end does not hold changes nothing
        head = "<mapping-entry" + (f' nc:operation="{operation}"' if operation else "") + ">"
        if operation in ("delete", "remove"):
            return f"{head}<index>{index}</index></mapping-entry>"
        return f"{head}<index>{index}</index>{mapping_leaves(session)}</mapping-entry>"

    def _index_for(self, key: tuple, create: bool) -> int | None:
        assert self._index is not None
        index = self._index.get(key)
        if index is not None or not create:
            return index
        index = self._plan.source_index.get(key)
        if index is None or index in self._used:
            while self._next in self._used:
                self._next += 1
            index = self._next
        self._index[key] = index
        self._used.add(index)
        return index


def _session(values: dict[str, str]) -> Session:
    """A Session from nat-session leaf texts (the migrator's entries: canonical values)."""
    fields: dict[str, object] = {}
    for name in SESSION_FIELDS:
        text = values.get(name)
        if text is None:
            continue
        numeric = name.endswith(("_port", "_scale", "_packets", "_bytes")) or name == "timeout"
        fields[name] = int(text) if numeric else text
    missing = [k for k in KEY_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"a nat-session entry without its key leaf {missing[0]}")
    return Session(**fields)


def mapping_leaves(session: Session) -> str:
    """A session's mapping-entry leaves after index (type left to the target: a written
    entry is dynamic-explicit there), in schema order."""
    parts = []
    for leaf in LEAVES:
        value = getattr(session, leaf.field)
        if value is None:
            continue
        if leaf.kind == "protocol":
            value = PROTOCOL_NUMBERS[value]
        elif leaf.kind == "prefix":
            value = host_prefix(value)
        text = escape(str(value))
        if leaf.kind == "port":
            parts.append(f"<{leaf.node}><start-port-number>{text}</start-port-number>"
                         f"</{leaf.node}>")
        else:
            name = f"nfi:{leaf.node}" if leaf.augment else leaf.node
            parts.append(f"<{name}>{text}</{name}>")
    return "".join(parts)


def nat_session_xml(session: Session) -> str:
    leaves = "".join(f"<{name}>{escape(str(value))}</{name}>"
                     for name, value in zip(SESSION_FIELDS, session, strict=True)
                     if value is not None)
    return f'<nat-session xmlns="{NFMIG_NAT_NS}">{leaves}</nat-session>'
