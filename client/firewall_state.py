"""What a migration between stateful firewalls moves beyond their connections (which are
nat-session entries like a NAT's): the pinholes of the selected subscribers, and with
``with_policy`` their rule sets (yang/nfmig-firewall).

Pinholes are read from each source and written to the targets' running datastore in the
window (the sources frozen, the sessions not yet confirmed): a failure there fails the
migration, which takes back what it wrote. They are deleted from the sources with the
sessions. A pinhole's lifetime moves as what is left of it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from lxml import etree

from .ends import MigrationError

if TYPE_CHECKING:
    from .ends import SourceEnd, TargetEnd
    from .negotiate import Facts

log = logging.getLogger(__name__)

FW_MODULE = "nfmig-firewall"
FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)
_KEY = ("protocol", "remote-address", "local-address", "local-port")


def firewall_problems(ends: list[tuple[str, str, Facts]]) -> list[str]:
    """A firewall's state moves only to a firewall: every end implements nfmig-firewall,
    or none does."""
    having = [endpoint for endpoint, _, facts in ends if FW_MODULE in facts.modules]
    if not having or len(having) == len(ends):
        return []
    lacking = [f"{role} {endpoint}" for endpoint, role, facts in ends
               if FW_MODULE not in facts.modules]
    return [f"{', '.join(lacking)} does not implement {FW_MODULE} while {having[0]} does: "
            "a firewall's pinholes and rules would be lost"]


class FirewallState:
    """The firewall part of :class:`~nfmig.client.migrate.Migration`."""

    def _init_firewall_state(self) -> None:
        """What the firewall part remembers of one migration (called by its constructor)."""
        self._pinholes_there: dict[TargetEnd, set[tuple[str, ...]]] = {}  # before the window
        self._pinholes_read: dict[SourceEnd, list[etree._Element]] = {}
        self._pinholes_written: dict[TargetEnd, list[etree._Element]] = {}  # new there
        self._policies_before: dict[TargetEnd, str] = {}  # what a failure puts back

    @property
    def _firewalls(self) -> bool:
        return all(e.facts is not None and FW_MODULE in e.facts.modules for e in self.ends)

    def _survey_pinholes(self) -> None:
        """Before the window: the pinholes each target holds already, which a failed
        migration must leave there."""
        if not self._firewalls:
            return
        for t in self.targets:
            with self._phase("pinholes", t):
                self._pinholes_there[t] = {pinhole_key(e) for e in parse_pinholes(
                    t.conn.get_data("running", PINHOLE_FILTER))}

    def _move_pinholes(self) -> None:
        """The selected pinholes of each source, written to the target of their local
        address (running: their lifetime runs from when they are written)."""
        if not self._firewalls:
            return
        routed: dict[TargetEnd, list[etree._Element]] = {}
        for s in self.sources:
            with self._phase("pinholes", s):
                entries = [e for e in parse_pinholes(s.conn.get_data("running", PINHOLE_FILTER))
                           if self._selected_address(pinhole_leaf(e, "local-address"))]
            self._pinholes_read[s] = entries
            for entry in entries:
                routed.setdefault(self._target_for(pinhole_leaf(entry, "local-address")),
                                  []).append(entry)
        for t, entries in routed.items():
            there = self._pinholes_there.get(t, set())
            with self._phase("pinholes", t) as record:
                t.conn.edit_config("".join(pinhole_edit(e) for e in entries), "running")
                record.detail = f"{len(entries)} pinholes"
            self._pinholes_written[t] = [e for e in entries if pinhole_key(e) not in there]
        self.report.pinholes_moved = sum(map(len, routed.values()))

    def _delete_pinholes(self) -> None:
        """The moved pinholes leave their sources (after the sessions)."""
        if self.options.keep_source:
            return
        for s, entries in self._pinholes_read.items():
            if not entries:
                continue
            with self._phase("pinholes", s, fatal=False) as record:
                s.conn.edit_config("".join(pinhole_edit(e, "remove") for e in entries), "running")
            if not record.ok:
                self.report.warnings.append(f"{len(entries)} pinholes are still on {s} (and "
                                            "on their target)")

    def _take_back_firewall_state(self) -> None:
        """A failed migration: the pinholes it wrote to targets that lacked them go, and
        the rule sets it merged into a target's firewall-policy are undone."""
        for t, before in self._policies_before.items():
            if t.conn is None:
                continue
            try:
                t.conn.edit_config(before if before else
                                   f'<firewall-policy xmlns="{FW_NS}" xmlns:nc="{NC_NS}" '
                                   'nc:operation="remove"/>', "running")
            except Exception as exc:  # the report says what stayed
                log.warning("the firewall-policy of %s not put back: %s", t, exc)
                self.report.warnings.append(f"{t} keeps the rule sets carried to it")
        for t, entries in self._pinholes_written.items():
            if not entries or t.conn is None:
                continue
            try:
                t.conn.edit_config("".join(pinhole_edit(e, "remove") for e in entries), "running")
            except Exception as exc:  # the report says where they are
                log.warning("pinholes written to %s not taken back: %s", t, exc)
                self.report.warnings.append(f"{len(entries)} pinholes are also on {t}")

    def _carry_subscribers(self, t: TargetEnd, source: SourceEnd) -> None:
        """``with_policy``: the source's rule sets of the selected subscribers merged into
        the target's firewall-policy (written in running: a dry run writes nothing)."""
        if not self._firewalls or self.options.dry_run:
            return
        with self._phase("prepare", source):
            text = source.conn.get_data("running", _POLICY)
        root = etree.fromstring(f"<data>{text}</data>".encode(), parser=_PARSER)
        subscribers = [s for s in root.iterfind(f"{{{FW_NS}}}firewall-policy/"
                                                f"{{{FW_NS}}}subscriber")
                       if any(self._selected_address(p.text or "", prefix=True)
                              for p in s.iterfind(f"{{{FW_NS}}}prefix"))]
        if not subscribers:
            return
        policy = etree.Element(f"{{{FW_NS}}}firewall-policy", nsmap={None: FW_NS})
        policy.extend(subscribers)
        with self._phase("edit", t):
            if t not in self._policies_before:  # what a failure puts back
                self._policies_before[t] = _replacing(t.conn.get_data("running", _POLICY))
            t.conn.edit_config(etree.tostring(policy, encoding="unicode"), "running")

    def _selected_address(self, address: str, prefix: bool = False) -> bool:
        """Whether the selection takes what ``address`` (or, with ``prefix``, a
        subscriber's prefix) holds: all of it, or what a subscriber prefix covers. An
        XPath selection takes the pinholes of the sources of the sessions it moves."""
        selection = self.selection
        if selection.kind == "all":
            return True
        if selection.kind == "subscribers":
            try:
                net = ipaddress.ip_network(address, strict=False)
            except ValueError:
                return False
            return any(net.version == n.version and (net.subnet_of(n) or n.subnet_of(net))
                       for n in selection.prefixes)
        return address in {e.key[1] for s in self.sources for e in s.entries}

    def _target_for(self, address: str) -> TargetEnd:
        if self.split is None:
            return self.targets[0]
        ip = ipaddress.ip_address(address)
        endpoint = next((t for net, t in self.split.routes if ip in net), None)
        target = next((t for t in self.targets if t.endpoint == endpoint), None)
        if target is None:
            raise MigrationError(f"no target for the pinholes of {address}", "refused")
        return target


PINHOLE_FILTER = f'<subtree-filter><pinhole xmlns="{FW_NS}"/></subtree-filter>'
_POLICY = f'<subtree-filter><firewall-policy xmlns="{FW_NS}"/></subtree-filter>'


def _replacing(data_text: str) -> str:
    """The firewall-policy of a get-data reply as an edit that puts it back whole; empty
    when there is none."""
    root = etree.fromstring(f"<data>{data_text}</data>".encode(), parser=_PARSER)
    policy = root.find(f"{{{FW_NS}}}firewall-policy")
    if policy is None:
        return ""
    policy.set(f"{{{NC_NS}}}operation", "replace")
    return etree.tostring(policy, encoding="unicode")


def parse_pinholes(data_text: str) -> list[etree._Element]:
    root = etree.fromstring(f"<data>{data_text}</data>".encode(), parser=_PARSER)
    return root.findall(f"{{{FW_NS}}}pinhole")


def pinhole_leaf(entry: etree._Element, name: str) -> str:
    return (entry.findtext(f"{{{FW_NS}}}{name}") or "").strip()


def pinhole_key(entry: etree._Element) -> tuple[str, ...]:
    return tuple(pinhole_leaf(entry, name) for name in _KEY)


def pinhole_edit(entry: etree._Element, operation: str | None = None) -> str:
    """One pinhole as an edit: whole, or by its key with ``operation``."""
    if operation is None:
        return etree.tostring(entry, encoding="unicode")
    keys = "".join(f"<{name}>{pinhole_leaf(entry, name)}</{name}>" for name in _KEY)
    return (f'<pinhole xmlns="{FW_NS}" xmlns:nc="{NC_NS}" nc:operation="{operation}">'
            f"{keys}</pinhole>")
