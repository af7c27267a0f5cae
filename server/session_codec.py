"""nat-session entries between the wire (XML) and the backend interface (Session tuples).

This is the bulk path: every session crosses it once per direction, so it formats and reads
text directly instead of building a tree per entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from itertools import chain, repeat
from operator import getitem, is_not, itemgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from lxml import etree
from nfmig.nf_backends.base import (
    KEY_FIELDS,
    SESSION_FIELDS,
    NewSessions,
    Session,
    new_session,
    session_key,
)

from .errors import RpcError, missing_element, unknown_element, unknown_namespace
from .schema import ListEntryChecker

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
OPERATION_ATTR = f"{{{NC_NS}}}operation"
EDIT_OPERATIONS = ("merge", "replace", "create", "delete", "remove")
_END = "</nat-session>"
_BLOCK = 1 << 18  # characters of a bulk edit read at a time: about 500 entries
_RAW_MINIMUM = 1 << 16  # bytes of a request from which the reader tries its text first
_NONES = repeat(None)  # the column of a leaf an edit's entries leave out
_NO_REMOVALS = MappingProxyType({})
_UNPREPARED = object()  # no entries read ahead for an edit (SessionDecoder.prepare)
_ONE_TEMPLATE_FROM = 16  # sessions from which a batch tries one template for all


def sessions_to_xml(sessions: Iterable[Session], namespace: str,
                    element: str = "nat-session") -> Iterator[str]:
    """One XML string per session, leaves in model order, absent leaves left out; each an
    ``element`` (a list entry elsewhere than nat-session, e.g. an rpc's output)."""
    return map(_Formatter(namespace, element).entry, sessions)


def session_batches_to_xml(batches: Iterable[list[Session]], namespace: str
                           ) -> Iterator[str]:
    """One XML string per list of sessions (what sessions_to_xml writes, joined): a large
    read formats its entries in one loop, and passes on a few strings instead of one per
    entry."""
    formatter = _Formatter(namespace)
    return map(formatter.entries, batches)


class _Formatter:
    """One %-template per pattern of present leaves: sessions share a handful of patterns
    (SNAT, DNAT, UDP...), and one % per entry is the cheapest way to format it."""

    def __init__(self, namespace: str, element: str = "nat-session"):
        self.open_tag = f'<{element} xmlns="{namespace}">'
        self.close_tag = f"</{element}>"
        self.templates: dict[tuple, tuple[str, Callable[[Session], tuple]]] = {}

    def entry(self, s: Session) -> str:
        template = self.templates.get(tuple(map(is_not, s, _NONES))) or self._template(s)
        return template[0] % template[1](s)

    def entries(self, batch: list[Session]) -> str:
        if len(batch) >= _ONE_TEMPLATE_FROM:
            text = self._entries_alike(batch)
            if text is not None:
                return text
        return "".join(map(self.entry, batch))

    def _entries_alike(self, batch: list[Session]) -> str | None:
        """A batch whose sessions all have the first one's leaves, in one % of its template
        repeated; None when they differ."""
        first = batch[0]
        for value, column in zip(first, zip(*batch, strict=True), strict=True):
            if (None in column) if value is not None else column.count(None) != len(column):
                return None
        template, pick = self.templates.get(tuple(map(is_not, first, _NONES))) or \
            self._template(first)
        return (template * len(batch)) % tuple(chain.from_iterable(map(pick, batch)))

    def _template(self, s: Session) -> tuple[str, Callable[[Session], tuple]]:
        present = tuple(map(is_not, s, _NONES))
        fields = [i for i, p in enumerate(present) if p]
        text = "".join(f"<{SESSION_FIELDS[i]}>%s</{SESSION_FIELDS[i]}>" for i in fields)
        pick = itemgetter(*fields)
        template = self.templates[present] = (
            f"{self.open_tag}{text}{self.close_tag}",
            (lambda s, pick=pick: (pick(s),)) if len(fields) == 1 else pick)
        return template


class SessionEdit(NamedTuple):
    """One nat-session element of an edit: its operation, its key, and the entry as the edit
    states it. A tuple, so a bulk edit makes its thousands of these in C (``_make``)."""

    operation: str
    key: tuple
    session: Session              # the leaves the edit sets; the others None
    present: tuple[str, ...]      # the names of the leaves the edit sets
    removed: Mapping[str, str]    # field -> "delete" | "remove", leaves the edit takes away
    checker: ListEntryChecker

    @property
    def values(self) -> dict[str, Any]:
        """The leaves the edit sets, by name."""
        return {name: getattr(self.session, name) for name in self.present}

    @property
    def path(self) -> str:
        """The entry's instance path, for error-path (built only when an error needs it)."""
        return self.checker.entry_path({k: str(v) for k, v in self.values.items()})

    def apply_to(self, existing: Session | None) -> Session:
        """The entry as it stands after this edit (for merge and replace)."""
        if self.operation == "replace" or existing is None:
            return self.session
        return existing._replace(**self.values, **{f: None for f in self.removed})


_new_edit = partial(tuple.__new__, SessionEdit)


class _Shape(NamedTuple):
    """The leaves of a plain entry in document order, and where each one's text starts in
    its "name>text" piece."""

    names: tuple[str, ...]
    cuts: tuple[slice, ...]
    openers: tuple[str, ...]  # each leaf's "name>", what its text piece must start with


class EntryColumns:
    """A bulk edit's entries as the uniform reader converts them: one layout of leaves, and
    each entry's operation and each leaf's values a column at a time. A write of whole new
    entries takes the columns as they are (new_sessions); edits() makes the SessionEdits
    everything else works on."""

    __slots__ = ("shape", "operations", "values", "checker")

    def __init__(self, shape: _Shape, checker: ListEntryChecker):
        self.shape = shape
        self.operations: list[str] = []
        self.values: list[list] = [[] for _ in shape.names]  # one column per leaf
        self.checker = checker

    def __len__(self) -> int:
        return len(self.operations)

    def extend(self, operations: list[str], values: list[list]) -> None:
        self.operations += operations
        for column, more in zip(self.values, values, strict=True):
            column += more

    def edits(self) -> list[SessionEdit]:
        return _make_edits(self.shape, self.operations, self.values, self.checker)

    def new_sessions(self) -> NewSessions:
        by_field = dict(zip(self.shape.names, self.values, strict=True))
        return NewSessions(tuple(map(by_field.get, SESSION_FIELDS)), len(self))


def _make_edits(shape: _Shape, operations: list[str], columns: list[list],
                checker: ListEntryChecker) -> list[SessionEdit]:
    """SessionEdits from converted columns, every tuple made in C."""
    by_field = dict(zip(shape.names, columns, strict=True))
    sessions = list(map(new_session, zip(*[by_field.get(f, _NONES)
                                            for f in SESSION_FIELDS], strict=False)))
    return list(map(_new_edit, zip(operations, map(session_key, sessions), sessions,
                                   repeat(shape.names), repeat(_NO_REMOVALS),
                                   repeat(checker), strict=False)))


def as_edits(bulk: EntryColumns | list[SessionEdit] | None) -> list[SessionEdit] | None:
    """What SessionDecoder.decode_bulk read, as SessionEdits."""
    return bulk.edits() if isinstance(bulk, EntryColumns) else bulk


class SessionDecoder:
    """Reads nat-session elements of an edit into SessionEdits, checking every leaf against
    the model (through :class:`ListEntryChecker`)."""

    def __init__(self, checker: ListEntryChecker, namespace: str):
        self.checker = checker
        self.namespace = namespace
        self._field_of = {f"{{{namespace}}}{name}": name for name in checker.leaves}
        self._field_of.update({name: name for name in checker.leaves})  # unqualified children
        self._shapes: dict[tuple[str, ...], _Shape | None] = {}
        if tuple(checker.keys) != KEY_FIELDS or set(checker.leaves) != set(SESSION_FIELDS):
            raise RuntimeError("the nat-session list of the YANG model and the backend "
                               "interface's Session disagree")

    def decode(self, element: etree._Element, inherited: str,
               leaf_attributes: bool = True) -> SessionEdit:
        """One entry of an edit. ``leaf_attributes=False`` promises that no leaf of the entry
        has an attribute (checked once for a whole edit; it saves a lookup per leaf)."""
        operation = element.get(OPERATION_ATTR)
        operation = inherited if operation is None else check_operation(operation,
                                                                         "nat-session")
        raw: dict[str, str] = {}
        removed: dict[str, str] = {}
        field_of = self._field_of
        for child in element:
            name = field_of.get(child.tag)
            if name is None:
                if not isinstance(child.tag, str):
                    continue  # comments, processing instructions
                raise self._unknown_child(element, child, raw)
            if name in raw or name in removed:
                raise RpcError("bad-element", f"leaf {name} appears twice in one entry",
                               path=self.checker.entry_path(raw), info={"bad-element": name})
            if leaf_attributes and child.attrib:
                leaf_op = child.get(OPERATION_ATTR)
                if leaf_op in ("delete", "remove") and name not in KEY_FIELDS:
                    removed[name] = leaf_op
                    continue
            raw[name] = child.text or ""
        for key in KEY_FIELDS:
            if key not in raw:
                raise missing_element(f"nat-session entry is missing its key leaf {key}",
                                      key, self.checker.entry_path(raw))
        values = {}
        leaves = self.checker.leaves
        for name, text in raw.items():
            try:
                values[name] = leaves[name].convert(text)
            except ValueError as exc:
                raise RpcError("invalid-value", f"{exc} (leaf {name})",
                               path=f"{self.checker.entry_path(raw)}/{name}",
                               info={"bad-element": name}) from None
        key = tuple(values[k] for k in KEY_FIELDS)
        return SessionEdit(operation, key, Session(**values), tuple(values), removed,
                           self.checker)

    def decode_all(self, config: etree._Element, inherited: str,
                   source: bytes | HollowEdit | None = None) -> list[SessionEdit] | None:
        """Every child of ``config`` when all are nat-session entries of plain leaves, or
        None: then :meth:`decode`, the authority on errors, reads them one by one. (See
        decode_bulk.)"""
        return as_edits(self.decode_bulk(config, inherited, source))

    def decode_bulk(self, config: etree._Element, inherited: str,
                    source: bytes | HollowEdit | None = None
                    ) -> EntryColumns | list[SessionEdit] | None:
        """decode_all, its entries still in columns when they are all alike.

        The bulk fast path. Instead of one lxml proxy per leaf, it splits text at its tags
        and converts the values a column at a time: the request's own text (``source``, the
        document ``config`` was parsed from) when it is written plainly, else lxml's
        serialisation of the (already parsed, so well-formed) tree. Anything unusual (other
        nodes, prefixes, attributes on leaves, entities, a value that does not convert)
        returns None; for a :class:`HollowEdit`, which has no tree to fall back on, it raises
        NeedsTree instead.
        """
        if isinstance(source, HollowEdit):
            if config is not source.config:
                raise NeedsTree()
            edits = source.prepared.pop(inherited, _UNPREPARED)
            if edits is _UNPREPARED:
                edits = self._decode_hollow(source, inherited)
            if edits is None:
                raise NeedsTree()
            return edits
        heads = self._entry_heads(config, inherited)
        body = _content_in(source, config) if source is not None else None
        if body is not None:
            edits = self._decode_text(body, heads)
            # The count ties the text to the tree: an entry or any other node the text
            # search missed or added makes it differ.
            if edits is not None and len(edits) == len(config):
                return edits
        # Attributes on leaves need no search of the tree: their start tags leave a ">" in
        # the leaf's text piece, which both readers refuse.
        text = etree.tostring(config, encoding="unicode", with_tail=False)
        start = text.find(">") + 1
        if text[start - 2] == "/":
            return []  # <config/>
        return self._decode_text(text[start:text.rindex("</")], heads)

    def prepare(self, edit: HollowEdit) -> None:
        """Read a hollowed edit's entries ahead of its handling, for decode_all to take:
        they depend on nothing but the text and the operation they inherit, so a server can
        read one edit while the one before it is written (much of that time is the kernel's,
        with the interpreter free)."""
        if edit.default_operation == "replace":
            return  # read as a tree (see Datastores.edit)
        inherited = edit.config.get(OPERATION_ATTR, edit.default_operation)
        edit.prepared[inherited] = self._decode_hollow(edit, inherited)

    def _decode_hollow(self, edit: HollowEdit, inherited: str
                       ) -> EntryColumns | list[SessionEdit] | None:
        return self._decode_text(edit.text, self._entry_heads(edit.config, inherited))

    def _decode_text(self, body: str, heads: dict[str, str]
                     ) -> EntryColumns | list[SessionEdit] | None:
        uniform = self._decode_uniform(body, heads)
        return uniform if uniform is not None else self._decode_layouts(body, heads)

    def _decode_layouts(self, body: str, heads: dict[str, str]) -> list[SessionEdit] | None:
        """decode_all's path for entries of several layouts: entries grouped by layout,
        each group converted a column at a time."""
        chunks = body.split(_END)
        if chunks.pop().strip():
            return None
        operations: list[str] = []
        groups: dict[tuple[str, ...], tuple[_Shape, list[int], list[tuple[str, ...]]]] = {}
        for index, chunk in enumerate(chunks):
            parts = chunk.split("<")
            operation = heads.get(parts[1].rstrip()) if len(parts) > 1 else None
            shape = self._shape(tuple(parts[3::2]))
            if operation is None or shape is None or parts[0].strip() or \
                    not all(map(str.startswith, parts[2::2], shape.openers)):
                return None
            operations.append(operation)
            _, indices, rows = groups.setdefault(shape.names, (shape, [], []))
            indices.append(index)
            rows.append(tuple(map(getitem, parts[2::2], shape.cuts)))
        edits: list[SessionEdit | None] = [None] * len(chunks)
        for shape, indices, rows in groups.values():
            columns = list(zip(*rows, strict=True))
            if any(">" in t or "&" in t for t in map("".join, columns)):
                return None  # a leaf with attributes, or an entity: not plain
            converted = self._convert(shape, columns)
            if converted is None:
                return None
            group = _make_edits(shape, [operations[i] for i in indices], converted,
                                 self.checker)
            for index, edit in zip(indices, group, strict=True):
                edits[index] = edit
        return edits  # type: ignore[return-value] # every index was filled

    def _decode_uniform(self, body: str, heads: dict[str, str]) -> EntryColumns | None:
        """decode_all's path for the common bulk edit: every entry with the same leaves in
        the same order. None when not uniform.

        Split at every "<", the pieces repeat with a fixed stride, so each column (a leaf's
        texts, an end tag) is one slice. It goes a block of entries at a time: one split of
        a 100k-entry edit makes millions of strings at once, and then costs three times as
        much per entry as a block that stays in the processor's cache."""
        # A mixed table (TCP and UDP) has entries of other layouts early on: the first
        # block finds them, before much is read. NUL and "&" (no XML text holds the first,
        # the second starts an entity) are looked for once here, not in every column.
        first_end = body.find(_END) + len(_END)
        stride = body.count("<", 0, first_end)
        if first_end < len(_END) or stride % 2 or "\0" in body or "&" in body:
            return None
        # Every end tag of the first entry: its leaves', then its own.
        closers = [*body[:first_end].split("<")[3::2], _END[1:]]
        shape = self._shape(tuple(closers[:-1]))
        if shape is None:
            return None
        entries = EntryColumns(shape, self.checker)
        start = 0
        while start < len(body):
            end = body.find(_END, start + _BLOCK)
            end = len(body) if end < 0 else end + len(_END)
            block = self._uniform_block(body[start:end], stride, closers, shape, heads)
            if block is None:
                return None
            entries.extend(*block)
            start = end
        return entries

    def _uniform_block(self, block: str, stride: int, closers: list[str], shape: _Shape,
                       heads: dict[str, str]) -> tuple[list[str], list[list]] | None:
        """The operations and leaf columns of a block of entries alike."""
        parts = block.split("<")
        if parts[0]:
            return None
        del parts[0]
        count, rest = divmod(len(parts), stride)
        if rest:
            return None
        # Every end tag the same as the first entry's: its leaves' at 2, 4, ... and its own
        # at the end of the stride.
        for index, closer in zip([*range(2, stride - 1, 2), stride - 1], closers, strict=True):
            if parts[index::stride].count(closer) != count:
                return None
        operations = self._operations(parts[0::stride], heads)
        if operations is None:
            return None
        leaves = self.checker.leaves
        converted = []
        for i, (name, opener) in enumerate(zip(shape.names, shape.openers, strict=True)):
            # A column's pieces ("name>text") joined by NUL, which no XML text holds (the
            # caller refused any): each piece begins with its opener exactly when the column
            # starts with it and NUL and opener separate one text per piece. Another start
            # tag, or one with attributes, does not begin with it.
            joined = "\0".join(parts[2 * i + 1::stride])
            if not joined.startswith(opener):
                return None
            try:
                values = leaves[name].convert_separated(joined[len(opener):], "\0" + opener)
            except ValueError:
                return None
            if len(values) != count:
                return None
            converted.append(values)
        return operations, converted

    def _convert(self, shape: _Shape, columns: list) -> list[list] | None:
        leaves = self.checker.leaves
        try:
            return [leaves[name].convert_many(column)
                    for name, column in zip(shape.names, columns, strict=True)]
        except ValueError:
            return None

    @staticmethod
    def _operations(entry_heads: list[str], heads: dict[str, str]) -> list[str] | None:
        meaning = {}
        for head in set(entry_heads):
            operation = heads.get(head.rstrip())
            if operation is None:
                return None
            meaning[head] = operation
        return list(map(meaning.__getitem__, entry_heads))

    def _entry_heads(self, config: etree._Element, inherited: str) -> dict[str, str]:
        """The start tags a plain entry may have, as lxml serialises ``config``'s children
        (after "<"), with the operation each one means."""
        declarations = [f' xmlns="{self.namespace}"']
        if config.nsmap.get(None) == self.namespace:
            declarations.append("")
        attributes = {"": inherited}
        for prefix, uri in config.nsmap.items():
            if prefix and uri == NC_NS:
                attributes.update({f' {prefix}:operation="{op}"': op for op in EDIT_OPERATIONS})
        heads = {f"nat-session{decl}{attr}>": op
                 for decl in declarations for attr, op in attributes.items()}
        # Clients that declare the base namespace on every entry that carries an operation
        # (lxml keeps the entry's declarations in their order, then its attributes).
        nc_decl = f' xmlns:nc="{NC_NS}"'
        for decl in declarations:
            for both in {decl + nc_decl, nc_decl + decl}:
                heads.update({f'nat-session{both} nc:operation="{op}">': op
                              for op in EDIT_OPERATIONS})
        return heads

    def _shape(self, closers: tuple[str, ...]) -> _Shape | None:
        """The leaf layout an entry's end tags (after "<") describe, when it is plain:
        known leaves, each once, keys included."""
        shape = self._shapes.get(closers)
        if shape is not None or closers in self._shapes:
            return shape
        names = tuple(c[1:].rstrip()[:-1] for c in closers)
        plain = (all(c.startswith("/") and c.rstrip().endswith(">") for c in closers)
                 and set(names) <= set(self.checker.leaves) and len(set(names)) == len(names)
                 and set(KEY_FIELDS) <= set(names))
        shape = _Shape(names, tuple(slice(len(n) + 1, None) for n in names),
                       tuple(n + ">" for n in names)) if plain else None
        if len(self._shapes) < 256:  # a few layouts in practice; bounded whatever comes
            self._shapes[closers] = shape
        return shape

    def _unknown_child(self, entry: etree._Element, child: etree._Element,
                       raw: dict) -> RpcError:
        qname = etree.QName(child)
        if qname.namespace not in (None, self.namespace):
            return unknown_namespace(
                f"element {qname.localname} in namespace {qname.namespace} is not part of "
                "nat-session", qname.localname, qname.namespace or "")
        return unknown_element(f"nat-session has no leaf named {qname.localname}",
                               qname.localname, self.checker.entry_path(raw))


class NeedsTree(Exception):
    """A hollowed edit's text is not plain entries: read the request again as one whole
    tree. Raised before anything is changed."""


class HollowEdit(NamedTuple):
    """A large edit parsed without its entries: ``root`` is the request with the content of
    its <config> cut out (``config``, now empty), ``text`` that content as written. A tree
    of some seventeen elements per entry is the largest cost of a bulk edit (100k entries:
    0.5 s or more), and the bulk reader reads the text anyway. That reader checks all a
    tree would have (every tag, entities, values); what it declines raises NeedsTree, and
    the request is parsed again whole from ``message``."""

    root: etree._Element
    config: etree._Element
    text: str
    message: bytes
    default_operation: str  # as the edit states it ("merge" when it does not)
    # inherited operation -> the entries SessionDecoder.prepare read (None: not plain)
    prepared: dict[str, EntryColumns | list[SessionEdit] | None]


_HOLLOW_MINIMUM = 1 << 16  # bytes of a request from which hollowing it pays: a tree of
#                              500 entries (256 KB) costs some 4 ms to build and free, and a
#                              move's first edit (64 KB) is on its critical path
_CONFIG_START = re.compile(rb"<((?:[A-Za-z_][\w.-]*:)?)config[\s>]")
_NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
_EDITS = {(NC_NS, "edit-config"): NC_NS, (_NCDS, "edit-data"): _NCDS}


def hollow_edit(message: bytes, parse: Callable[[bytes], etree._Element]
                ) -> HollowEdit | None:
    """``message`` parsed (with ``parse``) without the content of its edit's <config>, when
    it is a large edit-config or edit-data written plainly; else None."""
    if len(message) < _HOLLOW_MINIMUM:
        return None
    opening = _CONFIG_START.search(message)
    content = _content(message, opening, opening.group(1) + b"config") if opening else None
    if content is None:
        return None
    start, end, text = content
    envelope = message[:start] + message[end:]
    # A comment, CDATA section or processing instruction could hide the tag found above.
    declaration = 1 if envelope.lstrip().startswith(b"<?xml") else 0
    if b"<!" in envelope or envelope.count(b"<?") > declaration:
        return None
    try:
        root = parse(envelope)
    except etree.XMLSyntaxError:
        return None
    if not _in_utf8(root):
        return None
    operations = [child for child in root if isinstance(child.tag, str)]
    if len(operations) != 1:
        return None
    operation = etree.QName(operations[0])
    ns = _EDITS.get((operation.namespace, operation.localname))
    configs = [c for c in operations[0] if c.tag in (f"{{{ns}}}config", "config")]
    if ns is None or len(configs) != 1 or len(configs[0]) or (configs[0].text or "").strip():
        return None
    config = configs[0]
    if (config.prefix or "") != opening.group(1)[:-1].decode():
        return None
    default = operations[0].find(f"{{{ns}}}default-operation")
    return HollowEdit(root, config, text, message,
                      "merge" if default is None else (default.text or "").strip(), {})


def check_operation(value: str, where: str) -> str:
    if value not in EDIT_OPERATIONS:
        raise RpcError("bad-attribute", f"operation {value!r} on {where} is not one of "
                       f"{', '.join(EDIT_OPERATIONS)}", type="protocol",
                       info={"bad-attribute": "operation", "bad-element": where})
    return value


def _content_in(source: bytes, element: etree._Element) -> str | None:
    """The text between ``element``'s start and end tags as written in ``source``, found by
    its qualified name (its first start tag, its last end tag); None where that is not
    plain (another encoding, an empty element). The caller checks what it reads from it."""
    if len(source) < _RAW_MINIMUM or not _in_utf8(element):
        return None  # small edits gain nothing from it
    tag = (element.prefix + ":" + etree.QName(element).localname if element.prefix
           else etree.QName(element).localname).encode()
    content = _content(source, re.search(rb"<" + re.escape(tag) + rb"[\s>/]", source), tag)
    return content[2] if content is not None else None


def _content(source: bytes, opening: re.Match | None, tag: bytes
             ) -> tuple[int, int, str] | None:
    """Where the content of an element lies in ``source``, and that content as text: from
    the end of the start tag ``opening`` found to the last end tag named ``tag``. None for
    no start tag, an empty element, or text that is not UTF-8."""
    if opening is None:
        return None
    start = source.find(b">", opening.end() - 1) + 1
    end = source.rfind(b"</" + tag)
    if start <= 0 or source[start - 2:start] == b"/>" or end < start:
        return None
    try:
        return start, end, str(memoryview(source)[start:end], "utf-8")  # one copy
    except UnicodeDecodeError:
        return None


def _in_utf8(element: etree._Element) -> bool:
    """Whether the document ``element`` was parsed from says it is UTF-8 (or says nothing)."""
    encoding = element.getroottree().docinfo.encoding
    return not encoding or encoding.lower() in ("utf-8", "utf8")
