"""What an edit of the nat-session list should do, worked out without the server's code.

The reference is libyang (its own context here, the model and ietf-netconf loaded) for each
entry, RFC 7950 and RFC 6241 for what an edit adds around it, and the simulated NAT's rules
for what it holds. Given a request's bytes and what running held, :meth:`Oracle.outcome`
says whether the server must accept the edit and what running then holds.

What an edit adds around libyang, by the RFCs:
- keys first, in key order (RFC 7950 §7.8.5); a leaf at most once;
- the only attribute on an entry or a leaf is the base namespace's operation, one of
  merge, replace, create, delete, remove; a key cannot be deleted or removed;
- a leaf whose operation is delete or remove names what goes: its value is not looked at,
  but it is still a leaf of the list with nothing but text in it;
- entry operations as RFC 6241 §7.2 has them, default-operation merge, replace or none;
  a leaf's delete fails on a leaf the entry does not hold (data-missing), remove does not;
- one entry per key in an edit.
Where RFC 6241 leaves nested operations open, this follows the server's reading: a leaf's
merge, replace or create sets its value as a leaf without an operation would (so a create
does not fail on a held leaf, and under default-operation none it sets nothing), and inside
an entry's replace a leaf's delete takes the leaf out whether or not it was held.
XML comments are dropped by the XML layer before anything reads the entries (XML lets a
processor do so), so a comment inside a value joins the text around it. Whatever the server
refuses for any reason, nothing changes.

What the simulated NAT adds: a session whose addresses are not all of one IP version, or
ICMP over IPv6 or ICMPv6 over IPv4, is refused (the whole edit with it); no two sessions
share a translated endpoint (protocol, translated address and port); absent counters read
as 0, an absent timeout is the policy's for the protocol and state, and a timeout counts
down.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import libyang
from lxml import etree
from nfmig.yang import YANG_DIR

NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
RESTCONF = "urn:ietf:params:xml:ns:yang:ietf-restconf"
OP = f"{{{NC}}}operation"
OPERATIONS = ("merge", "replace", "create", "delete", "remove")
KEYS = ("protocol", "src_address", "src_port", "dst_address", "dst_port")
LEAVES = (*KEYS, "translated_address", "translated_port", "translated_dst_address",
          "translated_dst_port", "tcp_state", "src_window_scale", "dst_window_scale",
          "timeout", "orig_packets", "orig_bytes", "reply_packets", "reply_bytes")
COUNTERS = ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes")
INTEGERS = frozenset({"src_port", "dst_port", "translated_port", "translated_dst_port",
                      "src_window_scale", "dst_window_scale", "timeout", *COUNTERS})
PROTOCOL_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "ICMPv6": 58}

_PARSER = etree.XMLParser(remove_comments=True, resolve_entities=False, huge_tree=True)


class Refused(Exception):
    """The server must answer the edit with an error, and change nothing."""


@dataclass
class Entry:
    operation: str
    values: dict                      # leaf -> canonical value (int for integers)
    taken: dict                       # leaf -> "delete" | "remove"

    @property
    def key(self) -> tuple:
        return tuple(self.values[k] for k in KEYS)


@dataclass
class Held:
    """A session running holds, as get-data shows it; its timeout as counted down."""

    values: dict
    expires: float = 0.0
    rewrites: int = 0

    def timeout(self, now: float) -> float:
        return self.expires - now


@dataclass
class Policy:
    tcp_established: int = 432000
    tcp_transitory: int = 120
    udp: int = 120
    icmp: int = 30

    def timeout_for(self, protocol: str, state: str | None) -> int:
        if protocol == "TCP":
            return self.tcp_established if state in (None, "established") else \
                self.tcp_transitory
        return self.udp if protocol == "UDP" else self.icmp


@dataclass
class Oracle:
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self):
        libyang.configure_logging(False)
        self.ctx = libyang.Context(str(YANG_DIR))
        self.ctx.load_module("ietf-netconf")
        self.ctx.load_module("nfmig-nat")

    # -- reading a request ----------------------------------------------------------------
    def config_of(self, payload: bytes, kind: str) -> tuple[etree._Element, str, str | None]:
        """The element holding the entries, the default operation and the operation
        <config> states. ``kind``: edit-config, edit-data or patch (a RESTCONF body)."""
        try:
            root = etree.fromstring(payload, _PARSER)
        except etree.XMLSyntaxError:
            raise Refused("not well-formed") from None
        if kind == "patch":
            if root.tag != f"{{{RESTCONF}}}data":
                raise Refused("not a data body")
            return root, "merge", None
        ns = NC if kind == "edit-config" else NCDS
        operation = root.find(f"{{{ns}}}{kind}")
        config = operation.find(f"{{{ns}}}config")
        default = operation.findtext(f"{{{ns}}}default-operation", "merge")
        stated = config.get(OP)
        if stated is not None and stated not in OPERATIONS:
            raise Refused(f"operation {stated} on config")
        return config, default, stated

    def entries(self, holder: etree._Element, inherited: str) -> list[Entry]:
        if (holder.text or "").strip():
            raise Refused("text among the nodes")
        found = []
        for child in holder:
            if (child.tail or "").strip():
                raise Refused("text among the nodes")
            if not isinstance(child.tag, str) or child.tag == f"{{{NS}}}nat-policy":
                continue  # the policy a replace keeps (the run's own, always valid)
            if child.tag != f"{{{NS}}}nat-session":
                raise Refused(f"{child.tag} is not an entry")
            found.append(self.entry(child, inherited))
        return found

    def entry(self, element: etree._Element, inherited: str) -> Entry:
        operation = _operation(element) or inherited
        leaves = [c for c in element if isinstance(c.tag, str)]
        names = [etree.QName(c).localname for c in leaves]
        if tuple(names[:len(KEYS)]) != KEYS:
            raise Refused("keys not first, in order")
        if len(set(names)) != len(names):
            raise Refused("a leaf twice")
        taken = {}
        checked = copy.deepcopy(element)
        for leaf, original in zip([c for c in checked if isinstance(c.tag, str)], leaves,
                                  strict=True):
            how = _operation(original)
            if how not in ("delete", "remove"):
                continue
            name = etree.QName(original)
            if name.localname in KEYS:
                raise Refused("a key taken away")
            if name.namespace != NS or name.localname not in LEAVES or len(original):
                raise Refused("what is taken away is no plain leaf")
            taken[name.localname] = how
            leaf.getparent().remove(leaf)  # its value is not looked at; the tail stays
            _keep_tail(leaf, checked)
        values = self._libyang_values(etree.tostring(checked, encoding="unicode",
                                                     with_tail=False))
        return Entry(operation, values, taken)

    def _libyang_values(self, text: str) -> dict:
        """The leaves of the one entry ``text`` holds as libyang reads it strictly, each
        value canonical (as libyang prints it), integers as int."""
        try:
            tree = self.ctx.parse_data_mem(text, "xml", parse_only=True, strict=True,
                                           no_state=True)
        except libyang.LibyangError as exc:
            raise Refused(str(exc)) from None
        try:
            if tree is None or tree.name() != "nat-session" or tree.next() is not None:
                raise Refused("not one entry")
            printed = etree.fromstring(tree.print_mem("xml", pretty=False))
        finally:
            if tree is not None:
                tree.free()
        return {etree.QName(leaf).localname: int(leaf.text)
                if etree.QName(leaf).localname in INTEGERS else leaf.text for leaf in printed}

    # -- the edit -------------------------------------------------------------------------
    def outcome(self, held: dict[tuple, Held], payload: bytes, kind: str,
                forced: str | None = None) -> dict[tuple, Held]:
        """What running holds after the request (raises Refused: it must be refused).
        ``forced``: the operation a RESTCONF method sets on its entries."""
        holder, default, stated = self.config_of(payload, kind)
        if forced is not None:  # set on each entry, over any it states
            for child in holder:
                if isinstance(child.tag, str):
                    child.set(OP, forced)
        entries = self.entries(holder, stated or default)
        keys = [entry.key for entry in entries]
        if len(set(keys)) != len(keys):
            raise Refused("an entry twice")
        if default == "replace":
            results = {entry.key: dict(entry.values) for entry in entries}
            gone = set(held) - set(results)
        else:
            results, gone = {}, set()
            for entry in entries:
                existing = held.get(entry.key)
                result = _settle(entry, None if existing is None else existing.values)
                if result is None:
                    if existing is not None:
                        gone.add(entry.key)
                else:
                    results[entry.key] = result
        self._check_nat(held, results, gone)
        now = time.monotonic()
        after = {k: v for k, v in held.items() if k not in gone}
        for key, values in results.items():
            after[key] = self._held(values, held.get(key), now)
        return after

    def _held(self, values: dict, before: Held | None, now: float) -> Held:
        stored = {name: values.get(name) for name in LEAVES}
        for name in COUNTERS:
            stored[name] = stored[name] or 0
        if stored["timeout"] is None:
            stored["timeout"] = self.policy.timeout_for(stored["protocol"], stored["tcp_state"])
        if before is not None and values.get("timeout") is before.values["timeout"] and \
                values.get("timeout") is not None:
            # the timeout it held, as counted down and written again
            return Held(stored, before.expires, before.rewrites + 1)
        return Held(stored, now + stored["timeout"])

    @staticmethod
    def _check_nat(held: dict[tuple, Held], results: dict[tuple, dict], gone: set) -> None:
        for values in results.values():
            v6 = ":" in values["src_address"]
            addresses = [values.get(n) for n in ("dst_address", "translated_address",
                                                  "translated_dst_address")]
            if any((":" in a) != v6 for a in addresses if a):
                raise Refused("addresses of both IP versions")
            if values["protocol"] == ("ICMP" if v6 else "ICMPv6"):
                raise Refused("ICMP of the other IP version")
        owners = {_endpoint(h.values): key for key, h in held.items()
                  if h.values.get("translated_address") is not None}
        claimed = {}
        for key, values in results.items():
            if values.get("translated_address") is None:
                continue
            endpoint = _endpoint(values)
            if claimed.get(endpoint, key) != key:
                raise Refused("one translated endpoint for two sessions")
            claimed[endpoint] = key
            owner = owners.get(endpoint)
            if owner is not None and owner != key and owner not in gone:
                raise Refused("translated endpoint in use")


def _settle(entry: Entry, existing: dict | None) -> dict | None:
    """RFC 6241 §7.2 for one entry over what running holds (None: nothing)."""
    op = entry.operation
    if op == "create" and existing is not None:
        raise Refused("data-exists")
    if op in ("delete", "remove"):
        if op == "delete" and existing is None:
            raise Refused("data-missing")
        return None
    if existing is None:
        if op == "none" or "delete" in entry.taken.values():
            raise Refused("data-missing")
        return dict(entry.values)
    if op == "replace":
        return dict(entry.values)
    if any(how == "delete" and existing.get(name) is None
           for name, how in entry.taken.items()):
        raise Refused("data-missing")
    merged = dict(existing) if op == "none" else {**existing, **entry.values}
    for name in entry.taken:
        merged[name] = None
    return merged


def _operation(element: etree._Element) -> str | None:
    for name, value in element.attrib.items():
        if name != OP or value not in OPERATIONS:
            raise Refused(f"attribute {name}={value!r}")
    return element.get(OP)


def _keep_tail(removed: etree._Element, parent: etree._Element) -> None:
    """Text after a removed leaf must still be seen (lxml drops it with the element)."""
    if removed.tail:
        parent.text = (parent.text or "") + removed.tail


def _endpoint(values: dict) -> tuple:
    return (PROTOCOL_NUMBERS[values["protocol"]], values["translated_address"],
            values.get("translated_port"))


def stored_view(held: dict[tuple, Held]) -> dict[tuple, dict]:
    return {key: h.values for key, h in held.items()}
