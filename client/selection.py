"""Which sessions a migration moves, and where each goes.

A :class:`Selection` is the whole NF, some subscribers (addresses or prefixes) or an XPath
expression; it becomes a get-data filter the server evaluates, a source-prefix list for
freeze, and an exact check on the client (the server's filter may select a superset).
A :class:`Split` sends each subscriber prefix to its own target.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import chain
from operator import methodcaller
from typing import Any, NamedTuple
from xml.sax.saxutils import escape, quoteattr

from lxml import etree
from nfmig.nf_backends.base import KEY_FIELDS, SESSION_FIELDS

from .netconf import NAT_NS, NC_NS

KEY_LEAVES = KEY_FIELDS
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SelectionError(ValueError):
    """A selection that cannot be used, with what to write instead."""


@dataclass(frozen=True)
class Selection:
    """What to move: every session (``kind`` "all"), the sessions of some source prefixes
    ("subscribers"), or the nat-session entries an XPath expression selects ("xpath")."""

    kind: str = "all"
    prefixes: tuple[Network, ...] = ()
    xpath: str | None = None

    @classmethod
    def all(cls) -> Selection:
        return cls()

    @classmethod
    def subscribers(cls, *addresses: str) -> Selection:
        """Sessions whose src_address is one of ``addresses`` or inside one of them (an
        address or a prefix such as 10.0.1.0/24)."""
        if not addresses:
            raise SelectionError("name at least one subscriber address or prefix")
        nets = []
        for text in addresses:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise SelectionError(f"{text!r} is not an IP address or prefix") from None
        return cls("subscribers", tuple(dict.fromkeys(nets)))

    @classmethod
    def from_xpath(cls, expression: str) -> Selection:
        """The nat-session entries ``expression`` selects or contains; the model's prefix is
        nfnat, e.g. ``/nfnat:nat-session[nfnat:dst_port=443]``."""
        if not expression.strip():
            raise SelectionError("the XPath expression is empty")
        try:
            etree.XPath(expression, namespaces={"nfnat": NAT_NS})
        except etree.XPathSyntaxError as exc:
            raise SelectionError(f"XPath {expression!r}: {exc}") from None
        return cls("xpath", xpath=expression.strip())

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Selection:
        """The CLI's ``--select`` values: ``subscriber=ADDR_OR_PREFIX`` (repeatable),
        ``xpath=EXPR`` (once) or ``all``."""
        subscribers: list[str] = []
        xpaths: list[str] = []
        for text in texts:
            name, sep, value = text.partition("=")
            if text.strip() == "all":
                continue
            if not sep or name not in ("subscriber", "xpath"):
                raise SelectionError(f"--select {text!r}: write subscriber=ADDR_OR_PREFIX, "
                                     "xpath=EXPR or all")
            (subscribers if name == "subscriber" else xpaths).append(value)
        if xpaths and (subscribers or len(xpaths) > 1):
            raise SelectionError("--select xpath=... cannot be combined with other "
                                 "selections; put the conditions into one expression")
        if xpaths:
            return cls.from_xpath(xpaths[0])
        return cls.subscribers(*subscribers) if subscribers else cls.all()

    def __str__(self) -> str:
        if self.kind == "subscribers":
            return " ".join(f"subscriber={_net_text(n)}" for n in self.prefixes)
        if self.kind == "xpath":
            return f"xpath={self.xpath}"
        return "all"

    # -- as the server sees it --------------------------------------------------------
    def filter_xml(self) -> str:
        """The get-data filter (RFC 8526 subtree-filter or xpath-filter) of this selection."""
        if self.kind == "all":
            return f'<subtree-filter><nat-session xmlns="{NAT_NS}"/></subtree-filter>'
        if self.kind == "subscribers" and all(_is_host(n) for n in self.prefixes):
            # content match nodes: the server keeps the entries whose leaf has that value
            entries = "".join(f'<nat-session xmlns="{NAT_NS}"><src_address>'
                              f"{n.network_address.compressed}</src_address></nat-session>"
                              for n in self.prefixes)
            return f"<subtree-filter>{entries}</subtree-filter>"
        if self.kind == "subscribers":
            condition = " or ".join(_prefix_condition(n) for n in self.prefixes)
            expression = f"/nfnat:nat-session[{condition}]"
        else:
            # whole entries only: an expression that selects leaves still moves whole sessions
            expression = f"({self.xpath})/ancestor-or-self::nfnat:nat-session"
        return (f'<xpath-filter xmlns:nfnat="{NAT_NS}">{escape(expression)}'
                "</xpath-filter>")

    def freeze_prefixes(self) -> list[str]:
        """freeze's source-prefix list; empty (every source) when the selection is not a
        set of prefixes: an XPath selection's sources are known only after the read."""
        if self.kind == "subscribers":
            return [_net_text(n, prefix=True) for n in self.prefixes]
        return []

    def matches(self, entry: Entry) -> bool:
        """The exact test on the client, over what the server's filter returned."""
        if self.kind != "subscribers":
            return True
        address = entry.address
        return address is not None and any(address in n for n in self.prefixes)


class Split:
    """One-to-many: the sessions of each subscriber prefix go to the target named for it
    (the longest matching prefix wins); sessions no prefix covers stay on the source."""

    def __init__(self, routes: Mapping[str, Any] | Iterable[tuple[str, Any]]):
        items = routes.items() if isinstance(routes, Mapping) else routes
        self.routes: list[tuple[Network, Any]] = []
        for prefix, target in items:
            net = Selection.subscribers(prefix).prefixes[0]
            if any(net == known for known, _ in self.routes):
                raise SelectionError(f"prefix {prefix} is split twice")
            self.routes.append((net, target))
        if not self.routes:
            raise SelectionError("a split needs at least one PREFIX=TARGET")
        self.routes.sort(key=lambda route: route[0].prefixlen, reverse=True)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Split:
        """The CLI's ``--split PREFIX=TARGET`` values."""
        routes = []
        for text in texts:
            prefix, sep, target = text.partition("=")
            if not sep or not prefix or not target:
                raise SelectionError(f"--split {text!r}: write PREFIX=netconf://user@host:port")
            routes.append((prefix, target))
        return cls(routes)

    @property
    def selection(self) -> Selection:
        return Selection("subscribers", tuple(net for net, _ in self.routes))

    def target_of(self, entry: Entry) -> Any | None:
        address = entry.address
        for net, target in self.routes:
            if address is not None and address in net:
                return target
        return None

    def selection_for(self, target: Any) -> Selection:
        return Selection("subscribers", tuple(n for n, t in self.routes if t == target))

    def __str__(self) -> str:
        return " ".join(f"{_net_text(n, prefix=True)}={t}" for n, t in self.routes)


def _is_host(net: Network) -> bool:
    return net.prefixlen == net.max_prefixlen


def _net_text(net: Network, prefix: bool = False) -> str:
    return net.with_prefixlen if prefix or not _is_host(net) else net.network_address.compressed


def _prefix_condition(net: Network) -> str:
    """An XPath 1.0 test that src_address is inside ``net``. XPath has no address type:
    IPv4 prefixes compare the leading octets as text and the partial octet as a number;
    IPv6 ones pass every IPv6 source and leave the exact test to the client."""
    leaf = "nfnat:src_address"
    if net.version == 6:
        return f"contains({leaf}, ':')"
    if net.prefixlen == 0:
        return f"not(contains({leaf}, ':'))"
    if _is_host(net):
        return f"{leaf}={quoteattr(str(net.network_address))}"
    octets = str(net.network_address).split(".")
    whole, bits = divmod(net.prefixlen, 8)
    head = ".".join(octets[:whole]) + "." if whole else ""
    tests = [f"starts-with({leaf}, {quoteattr(head)})"] if whole else []
    if bits:
        low = int(octets[whole])
        high = low + (1 << (8 - bits)) - 1
        rest = f"substring-after({leaf}, {quoteattr(head)})" if whole else leaf
        octet = f"number({rest})" if whole == 3 else f"number(substring-before({rest}, '.'))"
        tests.append(f"{octet} >= {low} and {octet} <= {high}")
    return "(" + " and ".join(tests) + ")"


# -- entries on the client ------------------------------------------------------------------
_ENTRY = re.compile(r"<nat-session\b[^>]*>.*?</nat-session>", re.S)
_LEAF = re.compile(r"<(?:[\w.-]+:)?(protocol|src_address|src_port|dst_address|dst_port|"
                   r"translated_address|translated_port)\b[^>]*>\s*([^<]*?)\s*<")


class Entry(NamedTuple):
    """One nat-session as read: its key, translated endpoint and XML text (forwarded to
    the target as it came: a session is parsed once, on the client, for what it decides)."""

    key: tuple[str, ...]
    endpoint: tuple[str, str, str] | None  # (protocol, translated_address, translated_port)
    xml: str

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.key[1])
        except ValueError:
            return None

    def key_text(self) -> str:
        proto, src, sport, dst, dport = self.key
        return f"{proto} {src}:{sport} -> {dst}:{dport}"


_new_entry = partial(tuple.__new__, Entry)  # an Entry made in C from a 3-tuple


def parse_entries(data_text: str) -> list[Entry]:
    """The nat-session entries in the content of a get-data reply's <data>.

    Entries written the usual way (``<nat-session xmlns="...">`` with unprefixed or
    self-declared leaves) are cut from the text with two regular expressions, three times
    faster than an XML tree of 10k entries; anything else goes through lxml."""
    if "nat-session" not in data_text:
        return []
    plain = _parse_plain(data_text)
    if plain is not None:
        return plain
    entries = []
    for text in _ENTRY.findall(data_text):
        if 'xmlns="' + NAT_NS + '"' not in text[:200]:
            return _parse_tree(data_text)
        values = dict(_LEAF.findall(text))
        key = tuple(values.get(k) for k in KEY_LEAVES)
        if None in key or "&" in "".join(key):
            return _parse_tree(data_text)
        entries.append(Entry(key, _endpoint(values), text))
    return entries if entries else _parse_tree(data_text)


def _parse_plain(data_text: str) -> list[Entry] | None:
    """Entries exactly as nfmig servers write them: ``<nat-session xmlns="...">``, then
    unprefixed leaves without attributes or entities, each at most once in the model's
    order, entries back to back. One expression over the whole text, a column at a time;
    None for anything else."""
    text = data_text.strip()
    matches = list(_WRITTEN.finditer(text))
    texts = list(map(re.Match.group, matches))
    # Matches never overlap: only when they tile the whole text do their lengths add up.
    if sum(map(len, texts)) != len(text):
        return None
    keys = map(_KEY_GROUPS, matches)
    endpoints = [(protocol, address, port or "") if address else None
                 for protocol, address, port in map(_ENDPOINT_GROUPS, matches)]
    return list(map(_new_entry, zip(keys, endpoints, texts, strict=True)))


def _written_entry() -> re.Pattern:
    """The expression _parse_plain reads: the key leaves, then every other leaf optional,
    in the model's order; the key leaves and the translated endpoint captured."""
    def leaf(name: str, capture: bool) -> str:
        value = "([^<&]*)" if capture else "[^<&]*"
        return f"<{name}>{value}</{name}>"
    captured = ("translated_address", "translated_port")
    return re.compile(
        re.escape(f'<nat-session xmlns="{NAT_NS}">')
        + "".join(leaf(k, True) for k in KEY_LEAVES)
        + "".join(f"(?:{leaf(n, n in captured)})?" for n in SESSION_FIELDS[len(KEY_LEAVES):])
        + "</nat-session>")


_WRITTEN = _written_entry()
_KEY_GROUPS = methodcaller("group", 1, 2, 3, 4, 5)
_ENDPOINT_GROUPS = methodcaller("group", 1, 6, 7)


def _endpoint(values: dict[str, str]) -> tuple[str, str, str] | None:
    if not values.get("translated_address"):
        return None
    return (values["protocol"], values["translated_address"],
            values.get("translated_port", ""))


def _parse_tree(data_text: str) -> list[Entry]:
    root = etree.fromstring(f'<data xmlns="{NAT_NS}">{data_text}</data>'.encode(),
                            parser=_PARSER)
    entries = []
    for element in root.iterchildren(f"{{{NAT_NS}}}nat-session"):
        values = {etree.QName(c).localname: (c.text or "").strip() for c in element
                  if isinstance(c.tag, str)}
        key = tuple(values.get(k, "") for k in KEY_LEAVES)
        entries.append(Entry(key, _endpoint(values),
                             etree.tostring(element, encoding="unicode", with_tail=False)))
    return entries


_FOLLOWED = re.compile(r"<(tcp_state|translated_dst_address|translated_dst_port)>\s*([^<]*?)\s*<")


def followed_state(entry: Entry) -> tuple:
    """What a copy of a session must follow when it changes on the source: its translation
    and TCP state. Counters and the remaining timeout change with every packet; the target
    counts on from the copy's and keeps its own timer."""
    return entry.endpoint, tuple(_FOLLOWED.findall(entry.xml))


_PATH_KEY = re.compile(r"\[(?:[\w.-]+:)?(protocol|src_address|src_port|dst_address|dst_port)"
                       r"""=(?:'([^']*)'|"([^"]*)")\]""")


def refused_sessions(error: Any) -> dict[tuple, str] | None:
    """The sessions a target said it cannot hold, from a validate's rpc-errors (each one's
    error-path names an entry, app-tag not-supported): key -> why. None when some error
    is about anything else."""
    errors = getattr(error, "errlist", None) or [error]
    refused = {}
    for e in errors:
        if e.app_tag != "not-supported" or not e.path or "nat-session" not in e.path:
            return None
        values = {name: a or b for name, a, b in _PATH_KEY.findall(e.path)}
        key = tuple(values.get(k) for k in KEY_LEAVES)
        if None in key:
            return None
        refused[key] = (e.message or "").strip()
    return refused


class Changes(NamedTuple):
    """What a source's change record holds (the output of rpc changes)."""

    sessions: list[Entry]  # created or updated since tracking began, as they are now
    ended: list[tuple[str, ...]]  # keys that no longer exist
    overflow: bool  # more changes than the server records: read the whole selection


def parse_changes(output: str) -> Changes:
    if not output.strip():
        return Changes([], [], False)
    root = etree.fromstring(f'<output xmlns="{NAT_NS}">{output}</output>'.encode(),
                            parser=_PARSER)
    if root.find(f"{{{NAT_NS}}}overflow") is not None:
        return Changes([], [], True)
    sessions = []
    for element in root.iterfind(f"{{{NAT_NS}}}session"):
        element.tag = f"{{{NAT_NS}}}nat-session"
        sessions.append(etree.tostring(element, encoding="unicode", with_tail=False))
    ended = [tuple((e.findtext(f"{{{NAT_NS}}}{k}") or "").strip() for k in KEY_LEAVES)
             for e in root.iterfind(f"{{{NAT_NS}}}ended")]
    return Changes(parse_entries("".join(sessions)), ended, False)


def entries_xml(entries: Iterable[Entry]) -> str:
    return "".join(e.xml for e in entries)


def removal_xml(entries: Iterable[Entry], operation: str = "remove") -> str:
    """Key-only entries with an operation: ``remove`` deletes an entry if it exists."""
    keys = [e.key for e in entries]
    values = list(chain.from_iterable(keys))
    joined = "".join(values)
    if "&" in joined or "<" in joined or ">" in joined:  # a tree-read key: escape it
        values = list(map(escape, values))
    template = (f'<nat-session xmlns:nc="{NC_NS}" nc:operation="{operation}">'
                + "".join(f"<{name}>%s</{name}>" for name in KEY_LEAVES) + "</nat-session>")
    return (template * len(keys)) % tuple(values)


def replacement_xml(entries: Iterable[Entry]) -> str:
    """Whole entries that replace what a target holds under their key (a rollback restores
    the sessions a target had before exactly, not merged with what the migration wrote)."""
    return "".join(e.xml.replace("<nat-session", f'<nat-session xmlns:nc="{NC_NS}" '
                                 'nc:operation="replace"', 1) for e in entries)
