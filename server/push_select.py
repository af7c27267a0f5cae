"""What a YANG-Push subscription selects of the nat-session list (RFC 8641 §3.6), as a test
of each Session made once when the subscription is established.

A subscription's filter is judged against every change the NAT reports (tens of thousands
a second), so it is compiled here into plain Python over the Session tuple, not evaluated
on XML. Two forms are taken:

- ``datastore-subtree-filter`` (RFC 6241 §6 subtree filtering): one or more
  ``<nat-session xmlns="...nfmig-nat"/>`` elements, each with content match nodes (a leaf
  with a value: the entry's leaf must equal it) and selection nodes (an empty leaf: only
  those leaves, and the keys, are sent);
- ``datastore-xpath-filter``: ``/nfmig-nat:nat-session`` with predicates of the entry's own
  leaves. Equalities joined by ``and`` are compiled; any other test of the entry's own
  leaves (selects_by_own_leaves) is run by lxml on the one entry, slower but exact.

Anything else is refused by the caller with the RFC's identities (filter-unsupported,
on-change-unsupported): only the session list reports its changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, SESSION_FIELDS, Session

from .filters import selects_by_own_leaves
from .schema import ListEntryChecker
from .session_codec import sessions_to_xml

Match = Callable[[Session], bool]
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class FilterProblem(Exception):
    """The filter cannot be served: ``kind`` is "unsupported" (this server cannot select
    that), "not-session" (it selects data other than nat-session) or "empty" (nothing)."""

    def __init__(self, kind: str, hint: str):
        super().__init__(hint)
        self.kind = kind
        self.hint = hint


@dataclass(frozen=True)
class Selection:
    """``matches`` (None: every session), whether the test reads non-key leaves (then an
    update can move a session out of the selection), and the leaves sent (None: all)."""

    matches: Match | None = None
    by_state: bool = False
    keep: tuple[int, ...] | None = None

    def pick(self, sessions: list[Session]) -> list[Session]:
        """The selected sessions of a batch, with only the leaves the filter asks for."""
        if self.matches is not None:
            sessions = list(filter(self.matches, sessions))
        if self.keep is not None:
            sessions = [self.trim(s) for s in sessions]
        return sessions

    def trim(self, session: Session) -> Session:
        if self.keep is None:
            return session
        keep = self.keep
        return Session._make(value if i in keep else None for i, value in enumerate(session))


EVERYTHING = Selection()


def subtree_selection(holder: etree._Element, checker: ListEntryChecker,
                      namespace: str) -> Selection:
    """The selection of a datastore-subtree-filter (its element ``holder``)."""
    tops = [child for child in holder if isinstance(child.tag, str)]
    if not tops:
        raise FilterProblem("empty", "the subtree filter is empty and selects nothing")
    tests: list[list[tuple[int, object]]] = []
    kept: set[int] = set()
    whole = False
    for top in tops:
        qname = etree.QName(top)
        if qname.namespace != namespace or qname.localname != "nat-session":
            raise FilterProblem("not-session", f"only /nfmig-nat:nat-session can be "
                                f"subscribed to here, not {qname.localname} "
                                f"({qname.namespace or 'no namespace'})")
        test, selected = [], []
        for leaf in top:
            if not isinstance(leaf.tag, str):
                continue
            name = etree.QName(leaf)
            if name.namespace not in (namespace, None) or name.localname not in checker.leaves:
                raise FilterProblem("unsupported", f"nat-session has no leaf "
                                    f"{name.localname!r}")
            if len(leaf):
                raise FilterProblem("unsupported", f"{name.localname} is a leaf: it holds "
                                    "no elements")
            text = (leaf.text or "").strip()
            index = SESSION_FIELDS.index(name.localname)
            if text:
                test.append((index, _value(checker, name.localname, text)))
            else:
                selected.append(index)
        tests.append(test)
        # RFC 6241 §6.2.5: content match nodes alone select the whole entry; beside
        # selection nodes they are sent along with them.
        if selected:
            kept.update(selected, (i for i, _ in test))
        else:
            whole = True
    return Selection(_any_of(tests), _reads_state(tests), _kept(kept, whole))


_STEP = r"/\s*(?:([\w.-]+):)?nat-session"
_PREDICATE = re.compile(r"\s*\[([^\[\]]*)\]")
_EQUALITY = re.compile(r"""\s*(?:([\w.-]+):)?([\w-]+)\s*=\s*(?:'([^']*)'|"([^"]*)"|([0-9]+))\s*""")


def xpath_selection(select: str, nsmap: dict, checker: ListEntryChecker, namespace: str,
                    module: str) -> Selection:
    """The selection of a datastore-xpath-filter. Module names are prefixes as RFC 8641
    has it (the module's own name binds to its namespace unless the XML binds it)."""
    namespaces = {module: namespace, **{k: v for k, v in nsmap.items() if k}}
    select = select.strip()
    if not select:
        raise FilterProblem("empty", "the xpath filter is empty and selects nothing")
    head = re.match(_STEP, select)
    if head is None or namespaces.get(head.group(1) or "") != namespace:
        raise FilterProblem("not-session", "only /nfmig-nat:nat-session (entries picked by "
                            "predicates of their own leaves) can be subscribed to here")
    tests: list[tuple[int, object]] = []
    pos = head.end()
    while pos < len(select):
        found = _PREDICATE.match(select, pos)
        if found is None:
            break
        equalities = _equalities(found.group(1), namespaces, checker, namespace)
        if equalities is None:
            break
        tests += equalities
        pos = found.end()
    if not select[pos:].strip():
        return Selection(_any_of([tests]), _reads_state([tests]))
    if not selects_by_own_leaves(_qualified(select, module, checker), namespaces, namespace,
                                 "nat-session"):
        raise FilterProblem("unsupported", "an xpath filter here selects nat-session "
                            "entries by predicates of their own leaves only")
    return Selection(_by_lxml(select, namespaces, namespace), True)


def _literals_apart(select: str) -> list[str]:
    """The expression cut at its string literals (every odd piece is one)."""
    return re.split(r"""('[^']*'|"[^"]*")""", select)


def _qualified(select: str, module: str, checker: ListEntryChecker) -> str:
    """The expression with the entry's leaves named without a prefix given the module's
    (a leaf's name is not one of XPath's words), for the check of what it reads."""
    leaf = re.compile(rf"(?<![\w:.-])({'|'.join(map(re.escape, checker.leaves))})(?![\w(.:-])")
    parts = _literals_apart(select)
    return "".join(p if i % 2 else leaf.sub(rf"{module}:\1", p) for i, p in enumerate(parts))


def _equalities(text: str, namespaces: dict, checker: ListEntryChecker, namespace: str
                ) -> list[tuple[int, object]] | None:
    """``leaf = 'v' and leaf = 5 ...`` compiled, or None for any other predicate."""
    out = []
    for part in re.split(r"\band\b", text):
        found = _EQUALITY.fullmatch(part)
        if found is None or found.group(2) not in checker.leaves:
            return None
        if found.group(1) is not None and namespaces.get(found.group(1)) != namespace:
            return None
        literal = next(g for g in found.group(3, 4, 5) if g is not None)
        name = found.group(2)
        try:
            value = _value(checker, name, literal)
        except FilterProblem:
            return None  # a comparison XPath makes differently (numbers, say): lxml's job
        out.append((SESSION_FIELDS.index(name), value))
    return out


def _value(checker: ListEntryChecker, name: str, text: str) -> object:
    """A leaf's value as the Session holds it (canonical: the form the backend reports)."""
    try:
        return checker.leaves[name].convert(text)
    except ValueError as exc:
        raise FilterProblem("unsupported", f"{name} {text!r} is no valid value: {exc}") \
            from None


def _any_of(tests: list[list[tuple[int, object]]]) -> Match | None:
    if any(not test for test in tests):
        return None  # one alternative takes every entry
    if len(tests) == 1 and len(tests[0]) == 1:
        (index, value), = tests[0]
        get = itemgetter(index)
        return lambda s: get(s) == value
    compiled = [(itemgetter(*[i for i, _ in test]),
                 tuple(v for _, v in test) if len(test) > 1 else test[0][1]) for test in tests]
    return lambda s: any(get(s) == want for get, want in compiled)


def _reads_state(tests: list[list[tuple[int, object]]]) -> bool:
    return any(index >= len(KEY_FIELDS) for test in tests for index, _ in test)


def _kept(kept: set[int], whole: bool) -> tuple[int, ...] | None:
    if whole or not kept:
        return None
    return tuple(sorted(kept.union(range(len(KEY_FIELDS)))))


def _by_lxml(select: str, namespaces: dict, namespace: str) -> Match:
    """The XPath run on each entry alone, as a document of its own (the predicate reads the
    entry's own leaves only, so that is where it is true or false). The entry and the
    expression are taken out of the module's namespace, so that a leaf named without a
    prefix is the entry's leaf, as in the equalities compiled above."""
    ours = [p for p, ns in namespaces.items() if p and ns == namespace]
    plain = re.compile(rf"\b(?:{'|'.join(map(re.escape, ours))}):") if ours else None
    parts = _literals_apart(select)
    if plain is not None:
        parts = [p if i % 2 else plain.sub("", p) for i, p in enumerate(parts)]
    try:
        path = etree.XPath("".join(parts))
    except etree.XPathError as exc:
        raise FilterProblem("unsupported", f"xpath filter {select!r}: {exc}") from None
    declaration = f' xmlns="{namespace}"'

    def matches(session: Session) -> bool:
        text = next(iter(sessions_to_xml([session], namespace))).replace(declaration, "", 1)
        try:
            found = path(etree.fromstring(text, parser=_PARSER))
        except etree.XPathError:
            return False
        return bool(found) if isinstance(found, list) else False
    return matches
