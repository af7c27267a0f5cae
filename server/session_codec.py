"""nat-session entries between the wire (XML) and the backend interface (Session tuples).

This is the bulk path: every session crosses it once per direction. Writing, it formats
text directly. Reading an edit, it first tries a recogniser of the plain form a bulk edit
is written in (a regular expression per layout of leaves, whose entries must tile the whole
content of <config>; values only in libyang's canonical form); whatever that does not fully
recognise goes to the strict reader (entry_reader: libyang, entry by entry). The recogniser
is an optimisation only: for any input it reads what the strict reader would, or declines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, compress, repeat
from operator import is_not, itemgetter
from typing import NamedTuple

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, SESSION_FIELDS, Session, new_session
from nfmig.nf_backends.batch import NOTHING_REMOVED, SessionEdit, new_edit

from .entry_reader import EDIT_OPERATIONS, NC_NS, OPERATION_ATTR, EntryReader, check_operation
from .schema import ListEntryChecker

__all__ = ["NC_NS", "OPERATION_ATTR", "check_operation"]

_END = "</nat-session>"
_BLOCK = 1 << 18  # characters of a bulk edit read at a time: about 500 entries
_RAW_MINIMUM = 1 << 16  # bytes of a request from which the reader tries its text first
_NONES = repeat(None)  # the column of a leaf an edit's entries leave out
_UNPREPARED = object()  # no entries read ahead for an edit (SessionDecoder.prepare)
_ONE_TEMPLATE_FROM = 16  # sessions from which a batch tries one template for all
_XML_SPACE = " \t\r\n"


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




def _entry_pattern(layout: tuple[str, ...]) -> re.Pattern[str]:
    """An entry as the recogniser takes it: a start tag (its attributes captured, to be
    looked up among the few it knows), then the leaves of ``layout`` (model order, keys
    first), each as <name>value</name> with XML space between; a value is captured as
    written, without markup, references or ">". In the general layout (all leaves) every
    non-key leaf is optional."""
    space = f"[{_XML_SPACE}]*+"  # possessive: never given back, so the engine keeps no
    #                              state to backtrack into
    leaves = []
    for name in layout:
        leaf = f"{space}<{name}>([^<&>]++)</{name}>"
        leaves.append(leaf if name in KEY_FIELDS or layout != SESSION_FIELDS
                      else f"(?:{leaf})?")
    return re.compile(f"<nat-session([^>]*)>{''.join(leaves)}{space}{_END}")


_ANY_LAYOUT = _entry_pattern(SESSION_FIELDS)
_FIRST_TAGS = re.compile(r"<([^<>/\s]+)>")  # the start tags of a plain entry's leaves
_LAYOUTS_KEPT = 64  # a few layouts in practice; bounded whatever comes
_NO_NAMESPACES = etree.Element("config")  # where libyang's printing declares them all


class SessionDecoder:
    """Reads the nat-session elements of an edit into SessionEdits: the recogniser when it
    takes the whole edit, else the strict reader."""

    def __init__(self, checker: ListEntryChecker, namespace: str):
        self.checker = checker
        self.namespace = namespace
        self.strict = EntryReader(checker, namespace)
        self._leaves = [checker.leaves[name] for name in SESSION_FIELDS]
        self._present: dict[int, tuple[str, ...]] = {}
        self._patterns = {SESSION_FIELDS: _ANY_LAYOUT}
        # Whether the last edit read mixed layouts: a bulk copy sends a table in many
        # edits alike, so the next one starts with the general pattern instead of first
        # splitting with its first entry's only to find it does not cover the block. A
        # guess only: either pattern reads exactly what it reads.
        self._last_mixed = False
        if tuple(checker.keys) != KEY_FIELDS or set(checker.leaves) != set(SESSION_FIELDS):
            raise RuntimeError("the nat-session list of the YANG model and the backend "
                               "interface's Session disagree")

    def decode(self, element: etree._Element, inherited: str) -> SessionEdit:
        """One entry of an edit, read strictly."""
        return self.read_strictly([element], inherited)[0]

    def read_strictly(self, entries: list[etree._Element], inherited: str
                      ) -> list[SessionEdit]:
        """nat-session elements as libyang reads them (see entry_reader). Raises RpcError."""
        return self.strict.read(entries, inherited, self._read_printed)

    def _read_printed(self, printed: str, inherited: str) -> list[SessionEdit] | None:
        """Entries as libyang prints them (each declaring its namespaces, every value
        canonical), when the recogniser takes them."""
        return self._decode_text(printed, self._entry_heads(_NO_NAMESPACES, inherited))

    def decode_all(self, config: etree._Element, inherited: str,
                   source: bytes | HollowEdit | None = None) -> list[SessionEdit]:
        """Every child of ``config``, all nat-session entries. Raises RpcError."""
        edits = self.decode_bulk(config, inherited, source)
        return edits if edits is not None else self.read_strictly(
            [child for child in config if isinstance(child.tag, str)], inherited)

    def decode_bulk(self, config: etree._Element, inherited: str,
                    source: bytes | HollowEdit | None = None) -> list[SessionEdit] | None:
        """The entries of ``config`` when the recogniser takes them all, or None: then the
        strict reader is to read them (a :class:`HollowEdit`, which has no tree for it,
        raises NeedsTree instead).

        The text read is the request's own (``source``, the document ``config`` was parsed
        from) when it is large, else lxml's serialisation of the tree."""
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
            # The count ties the text found to the tree: what the search found is all
            # entries, and as many as the tree has children.
            if edits is not None and len(edits) == len(config):
                return edits
        if not len(config):
            return None if (config.text or "").strip(_XML_SPACE) else []
        text = etree.tostring(config, encoding="unicode", with_tail=False)
        start = text.find(">") + 1
        edits = self._decode_text(text[start:text.rindex("</")], heads)
        return edits if edits is not None and len(edits) == len(config) else None

    def prepare(self, edit: HollowEdit) -> None:
        """Read a hollowed edit's entries ahead of its handling, for decode_bulk to take:
        they depend on nothing but the text and the operation they inherit, so a server can
        read one edit while the one before it is written (much of that time is the kernel's,
        with the interpreter free)."""
        if edit.default_operation == "replace":
            return  # read as a tree (see Datastores.edit)
        inherited = edit.config.get(OPERATION_ATTR, edit.default_operation)
        edit.prepared[inherited] = self._decode_hollow(edit, inherited)

    def _decode_hollow(self, edit: HollowEdit, inherited: str) -> list[SessionEdit] | None:
        return self._decode_text(edit.text, self._entry_heads(edit.config, inherited))

    def _decode_text(self, body: str, heads: dict[str, str]) -> list[SessionEdit] | None:
        """The entries ``body`` holds, when it is nothing but plain entries and XML space;
        else None. A block of entries at a time: one split of a 100k-entry edit makes
        millions of strings at once, and then costs much more per entry than a block that
        stays in the processor's cache. Each block is split with the pattern of its first
        entry's layout (most bulk edits have one), and again with the general pattern when
        that leaves anything unread (a mixed table: then the rest go to it directly)."""
        operations: list[str] = []
        columns: dict[str, list | None] = dict.fromkeys(SESSION_FIELDS)  # None: none yet
        mixed = self._last_mixed
        start = 0
        while start < len(body):
            end = body.find(_END, start + _BLOCK)
            end = len(body) if end < 0 else end + len(_END)
            block = body[start:end] if start or end < len(body) else body
            layout = SESSION_FIELDS if mixed else self._first_layout(block)
            pieces = self._split(block, layout)
            if pieces is None and layout != SESSION_FIELDS:
                mixed, layout = True, SESSION_FIELDS
                pieces = self._split(block, layout)
            if pieces is None:
                return None
            stride = 2 + len(layout)
            block_heads = pieces[1::stride]
            meaning = {head: heads.get(head) for head in set(block_heads)}
            if None in meaning.values():
                return None
            done = len(operations)
            operations += map(meaning.__getitem__, block_heads)
            for name, column in columns.items():
                if name in layout:
                    more = pieces[2 + layout.index(name)::stride]
                    if column is None:
                        columns[name] = [None] * done + more if done else more
                    else:
                        column += more
                elif column is not None:
                    column += repeat(None, len(block_heads))
            start = end
        self._last_mixed = any(column is not None and 0 < column.count(None) < len(column)
                               for column in columns.values())
        try:
            values = list(map(_canonical, self._leaves, columns.values()))
        except _Declined:
            return None
        return self._edits(operations, values)

    def _first_layout(self, block: str) -> tuple[str, ...]:
        """The leaves of the block's first entry, if it is plain (else the general layout)."""
        first = block[:block.find(_END)]
        names = tuple(_FIRST_TAGS.findall(first, first.find(">") + 1))
        return names if names in self._patterns else SESSION_FIELDS if not \
            set(names) <= set(SESSION_FIELDS) else self._learn(names)

    def _learn(self, layout: tuple[str, ...]) -> tuple[str, ...]:
        """``layout``, its pattern compiled, when it is one the general pattern takes."""
        order = [SESSION_FIELDS.index(name) for name in layout]
        if layout[:len(KEY_FIELDS)] != KEY_FIELDS or order != sorted(set(order)) or \
                len(self._patterns) >= _LAYOUTS_KEPT:
            return SESSION_FIELDS
        self._patterns[layout] = _entry_pattern(layout)
        return layout

    def _split(self, block: str, layout: tuple[str, ...]) -> list[str] | None:
        """The block split by the layout's pattern (text before each entry, its head, its
        values), when the text around the entries is only XML space; else None."""
        pieces = self._patterns[layout].split(block)
        if "".join(pieces[0::2 + len(layout)]).strip(_XML_SPACE):
            return None
        return pieces

    def _edits(self, operations: list[str], columns: list[list | None]
               ) -> list[SessionEdit]:
        """SessionEdits from converted columns (None for a leaf no entry has, a None value
        where an entry leaves it out), every tuple made in C."""
        sessions = list(map(new_session, zip(*[_NONES if c is None else c for c in columns],
                                             strict=False)))
        mixed = [i for i, column in enumerate(columns)
                 if column is not None and None in column]
        if not mixed:
            present = repeat(tuple(name for name, column in zip(SESSION_FIELDS, columns,
                                                                strict=True)
                                   if column is not None))
        else:  # entries of several layouts: each one's, a bit per leaf it has
            layouts = [sum(1 << i for i, column in enumerate(columns)
                           if column is not None and i not in mixed)] * len(sessions)
            for i in mixed:
                bit = 1 << i
                layouts = [layout | bit if value is not None else layout
                           for layout, value in zip(layouts, columns[i], strict=True)]
            present = map(self._layout_names, layouts, sessions)
        return list(map(new_edit, zip(operations, sessions, present, repeat(NOTHING_REMOVED),
                                       strict=False)))

    def _layout_names(self, layout: int, session: Session) -> tuple[str, ...]:
        names = self._present.get(layout)
        if names is None:
            names = tuple(compress(SESSION_FIELDS, map(is_not, session, _NONES)))
            if len(self._present) < 4096:  # a few layouts in practice; bounded whatever comes
                self._present[layout] = names
        return names

    def _entry_heads(self, config: etree._Element, inherited: str) -> dict[str, str]:
        """The attributes a plain entry's start tag may have, exactly as written, with the
        operation each one means (the tags lxml writes included)."""
        declarations = [f' xmlns="{self.namespace}"']
        if config.nsmap.get(None) == self.namespace:
            declarations.append("")
        attributes = {"": inherited}
        for prefix, uri in config.nsmap.items():
            if prefix and uri == NC_NS:
                attributes.update({f' {prefix}:operation="{op}"': op for op in EDIT_OPERATIONS})
        heads = {decl + attr: op for decl in declarations for attr, op in attributes.items()}
        # Clients that declare the base namespace on every entry that carries an operation
        # (lxml keeps the entry's declarations in their order, then its attributes).
        nc_decl = f' xmlns:nc="{NC_NS}"'
        for decl in declarations:
            for both in {decl + nc_decl, nc_decl + decl}:
                heads.update({f'{both} nc:operation="{op}"': op for op in EDIT_OPERATIONS})
        return heads


class _Declined(Exception):
    """A value the recogniser does not vouch for: the strict reader is to read the edit."""


def _canonical(leaf, column: list | None) -> list | None:
    """A column of texts as values: None stays None (the leaf left out), and so does a
    column no entry has. Raises _Declined unless each text is its value's canonical form."""
    if column is None:
        return None
    if None not in column:
        values = leaf.canonical_column(column) if column else []
    else:
        present = [text for text in column if text is not None]
        if not present:
            return None
        converted = leaf.canonical_column(present)
        if converted is None:
            raise _Declined
        taken = iter(converted)
        values = [None if text is None else next(taken) for text in column]
    if values is None:
        raise _Declined
    return values


class NeedsTree(Exception):
    """A hollowed edit's text is not plain entries: read the request again as one whole
    tree. Raised before anything is changed."""


class HollowEdit(NamedTuple):
    """A large edit parsed without its entries: ``root`` is the request with the content of
    its <config> cut out (``config``, now empty), ``text`` that content as written. A tree
    of some seventeen elements per entry is the largest cost of a bulk edit (100k entries:
    0.5 s or more), and the bulk reader reads the text anyway. What that reader takes is
    well-formed and valid by construction (exact tags, no references, canonical values);
    what it declines raises NeedsTree, and the request is parsed again whole from
    ``message``."""

    root: etree._Element
    config: etree._Element
    text: str
    message: bytes
    default_operation: str  # as the edit states it ("merge" when it does not)
    # inherited operation -> the entries SessionDecoder.prepare read (None: not plain)
    prepared: dict[str, list[SessionEdit] | None]


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
