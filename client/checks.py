"""What a migration checks before anything moves: sessions from several sources must not
collide on one target; each target validates its candidate and names the sessions it
cannot hold (refused, or left on their source with ``partial``); and a target's NAT policy
must translate to the addresses its new sessions are translated to, so that the
subscribers' next connections get the same external address there (or it gets the
source's policy, ``with_policy``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from lxml import etree
from ncclient.operations.rpc import RPCError

from .ends import MigrationError
from .netconf import NAT_NS, NC_NS
from .selection import refused_sessions, removal_xml

if TYPE_CHECKING:
    from .ends import TargetEnd

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class Checks:
    """The checks' part of :class:`~nfmig.client.migrate.Migration`."""

    def _check(self) -> None:
        """Sessions from several sources into one target must not collide: not the same
        key twice, not one translated endpoint for two sessions."""
        if len(self.sources) < 2:
            return
        with self._phase("check"):
            conflicts = conflicts_between_sources(self.targets)
            if conflicts:
                shown = "; ".join(conflicts[:3])
                more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
                raise MigrationError(f"{len(conflicts)} conflicts between the sources, nothing "
                                     f"was moved: {shown}{more}", "refused", conflicts)

    def _check_policies(self) -> None:
        """Each target's policy must translate to the external addresses of the sessions it
        gets (the subscribers' next connections go out there), or, with ``with_policy``,
        gets the source's policy in the same commit."""
        for t in self.targets:
            if not t.entries:
                continue
            if self.options.with_policy:  # a firewall's rules of the selected subscribers
                for source in {s for _, s in t.entries}:
                    self._carry_subscribers(t, source)
            with self._phase("prepare", t):
                policy = t.conn.get_data("running", policy_filter())
                missing = uncovered(t, policy)
            if not missing:
                continue
            if self.options.with_policy:
                self._carry_policy(t)
                continue
            if not translated_to(policy):
                self.report.warnings.append(
                    f"{t} has no external-address in its nat-policy: the moved sessions keep "
                    "their translation, but the subscribers' new sessions there will not be "
                    "translated (--with-policy carries the source's policy)")
                continue
            shown = ", ".join(f"{address} ({n} sessions)" for address, n in missing.items())
            raise MigrationError(
                f"{t}'s nat-policy does not translate to {shown}: configure its "
                "external-address (or address-mapping) first, or carry the source's policy "
                "with --with-policy; nothing was moved", "refused")

    def _carry_policy(self, t: TargetEnd) -> None:
        sources = {s for _, s in t.entries}
        if len(sources) > 1:
            raise MigrationError(f"--with-policy needs one source for {t}, not "
                                 f"{len(sources)}", "refused")
        (source,) = sources
        with self._phase("prepare", source):
            policy = carried_policy(source.conn.get_data("running", policy_filter()))
        if policy is not None:
            with self._phase("edit", t):
                t.conn.edit_config(policy, "candidate")
            with self._phase("validate", t):
                t.conn.validate("candidate")

    def _validate(self) -> None:
        """Each target validates its candidate, and says which sessions it cannot hold (an
        IPv6 or destination NAT session on a NAT without them): the migration refuses
        with that list, or with ``partial`` leaves those on their source and moves the
        rest."""
        for t in self.targets:
            if not t.staged:
                continue
            with self._phase("validate", t) as record:
                try:
                    t.conn.validate("candidate")
                    continue
                except RPCError as exc:
                    refused = refused_sessions(exc)
                    if refused is None:
                        raise
                record.detail = f"{len(refused)} sessions it cannot hold"
            self._leave_behind(t, refused)

    def _leave_behind(self, t: TargetEnd, refused: dict[tuple, str]) -> None:
        entries = [e for e, _ in t.entries if e.key in refused]
        listed = [f"{t.endpoint} cannot hold {e.key_text()}: {refused[e.key]}"
                  for e in entries]
        if not self.options.partial:
            raise MigrationError(f"{t} cannot hold {len(refused)} of the selected sessions, "
                                 "nothing was moved (--partial moves the others)",
                                 "refused", listed)
        self.report.warnings += [f"stays on its source: {line}" for line in listed[:20]]
        self.report.stayed += len(entries)
        with self._phase("edit", t):
            t.conn.edit_config(removal_xml(entries), "candidate")
        gone = set(refused)
        self.left_behind |= gone
        t.entries = [(e, s) for e, s in t.entries if e.key not in gone]
        for s in self.sources:
            s.entries = [e for e in s.entries if e.key not in gone]
        self._count_selected()
        with self._phase("validate", t):
            t.conn.validate("candidate")


def conflicts_between_sources(targets: list[TargetEnd]) -> list[str]:
    """Not the same key twice, not one translated endpoint for two sessions, per target."""
    conflicts = []
    for t in targets:
        keys: dict[tuple, object] = {}
        endpoints: dict[tuple, tuple] = {}
        for entry, src in t.entries:
            if entry.key in keys:
                conflicts.append(f"session {entry.key_text()} is on both "
                                 f"{keys[entry.key].endpoint} and {src.endpoint}")
                continue
            keys[entry.key] = src
            if entry.endpoint is None:
                continue
            other = endpoints.get(entry.endpoint)
            if other is not None:
                proto, address, port = entry.endpoint
                conflicts.append(f"translated endpoint {proto} {address}:{port} is used by "
                                 f"{other[0].key_text()} on {other[1].endpoint} and by "
                                 f"{entry.key_text()} on {src.endpoint}")
            else:
                endpoints[entry.endpoint] = (entry, src)
    return conflicts


def policy_filter() -> str:
    return f'<subtree-filter><nat-policy xmlns="{NAT_NS}"/></subtree-filter>'


def translated_to(policy_text: str) -> set[str]:
    """The addresses a NAT policy (get-data's content) translates new sessions to."""
    if "nat-policy" not in policy_text:
        return set()
    root = etree.fromstring(f"<data>{policy_text}</data>".encode(), parser=_PARSER)
    found = {(e.text or "").strip() for e in root.iter(f"{{{NAT_NS}}}external-address")}
    return {a for a in found if a}


def uncovered(t: TargetEnd, policy_text: str) -> Counter:
    """Translated addresses of the target's sessions its policy does not translate to,
    with how many sessions use each."""
    covered = translated_to(policy_text)
    return Counter(e.endpoint[1] for e, _ in t.entries
                   if e.endpoint is not None and e.endpoint[1] not in covered)


def carried_policy(policy_text: str) -> str | None:
    """A source's policy as the edit that gives a target the same translation: merged,
    without the gateway addresses (the switchover moves those)."""
    if "nat-policy" not in policy_text:
        return None
    root = etree.fromstring(f"<data>{policy_text}</data>".encode(), parser=_PARSER)
    policy = root.find(f"{{{NAT_NS}}}nat-policy")
    if policy is None:
        return None
    for gateway in policy.findall(f"{{{NAT_NS}}}gateway-address"):
        policy.remove(gateway)
    for node in policy.iter():
        node.attrib.pop(f"{{{NC_NS}}}operation", None)
    etree.cleanup_namespaces(policy)
    return etree.tostring(policy, encoding="unicode")
