"""The switchover of a live migration: traffic leaves the sources for the targets.

Sessions move first, the traffic after them, the sources delete last: a session deleted
while its packets still reach the source is answered with a reset there. Three ways:

- ``gateway`` (the default): the gateway addresses an nfmig NAT answers for are its
  configuration (``nat-policy/gateway-address``). They are written into the target in the
  same confirmed commit as the last sessions (the target announces them to its neighbours
  as it takes them), and taken off the source once that commit is confirmed. Only a
  migration of whole NATs (selection ``all``, one target) moves them: a subscriber's
  traffic is steered by routing outside the NATs, which a hook does.
- a command (``--switchover CMD``): run once the targets hold every session, told the
  migration in its environment; it exits 0 once the traffic has moved.
- ``none``: nothing is switched (the traffic moves by other means, or there is none).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from lxml import etree

from .ends import failure_after_commit
from .netconf import NAT_NS, NC_NS

GATEWAY = "gateway"
NONE = "none"
HOOK_TIMEOUT = 120  # seconds a switchover command may take
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class SwitchoverError(Exception):
    """The traffic could not be switched (the sessions are on both sides then)."""


@dataclass(frozen=True)
class GatewayAddress:
    address: str
    interface: str
    prefix_length: str

    def xml(self, operation: str | None = None) -> str:
        op = f' xmlns:nc="{NC_NS}" nc:operation="{operation}"' if operation else ""
        leaves = "" if operation == "remove" else (
            f"<interface>{self.interface}</interface>"
            f"<prefix-length>{self.prefix_length}</prefix-length>")
        return f"<gateway-address{op}><address>{self.address}</address>{leaves}" \
               "</gateway-address>"


def gateway_filter() -> str:
    """get-data's filter for the gateway addresses in a datastore."""
    return (f'<subtree-filter><nat-policy xmlns="{NAT_NS}"><gateway-address/></nat-policy>'
            "</subtree-filter>")


def parse_gateways(data_text: str) -> list[GatewayAddress]:
    """The gateway-address entries in the content of a get-data reply's <data>."""
    if "gateway-address" not in data_text:
        return []
    root = etree.fromstring(f"<data>{data_text}</data>".encode(), parser=_PARSER)
    found = []
    for entry in root.iter(f"{{{NAT_NS}}}gateway-address"):
        found.append(GatewayAddress(
            (entry.findtext(f"{{{NAT_NS}}}address") or "").strip(),
            (entry.findtext(f"{{{NAT_NS}}}interface") or "").strip(),
            (entry.findtext(f"{{{NAT_NS}}}prefix-length") or "").strip()))
    return found


def activation_xml(gateways: list[GatewayAddress]) -> str:
    """The edit that gives a target these gateway addresses."""
    return f'<nat-policy xmlns="{NAT_NS}">{"".join(g.xml() for g in gateways)}</nat-policy>'


def deactivation_xml(gateways: list[GatewayAddress]) -> str:
    """The edit that takes these gateway addresses off a source (absent ones are fine)."""
    return (f'<nat-policy xmlns="{NAT_NS}">{"".join(g.xml("remove") for g in gateways)}'
            "</nat-policy>")


class Switching:
    """The switchover's part of :class:`~nfmig.client.migrate.Migration`."""

    def _plan_switchover(self) -> None:
        how = self.options.switchover
        if self.options.keep_source or self.options.dry_run:
            self.report.switchover = "not switched (the sources keep their sessions)"
            return
        if how == NONE:
            self.report.switchover = "none"
            return
        if how != GATEWAY:
            self.report.switchover = "command"
            return
        if self.split is not None or self.selection.kind != "all":
            self.report.switchover = "none"
            self.report.warnings.append(
                "the gateway addresses move only with whole NATs (selection all, one "
                "target): the traffic of this selection is not switched; give "
                "--switchover CMD to steer it")
            return
        for s in self.sources:
            with self._phase("prepare", s):
                s.gateways = parse_gateways(
                    s.conn.get_data("running", gateway_filter()))
        moving = [g for s in self.sources for g in s.gateways]
        self.targets[0].gateways = moving
        self.report.switchover = "gateway " + (
            ", ".join(f"{g.address}/{g.prefix_length} ({g.interface})" for g in moving)
            if moving else "(no gateway-address configured on the sources: nothing "
                           "switched)")
        if not moving:
            self.report.warnings.append("the sources configure no gateway-address: the "
                                        "migration switches no traffic")

    def _switchover(self) -> None:
        """Traffic to the targets: gateway addresses on the targets first, then off the
        sources (in-flight packets still find the source's sessions), or the command."""
        how = self.options.switchover
        if self.options.keep_source or how == NONE:
            return
        started = time.perf_counter()
        if how != GATEWAY:
            with self._phase("switchover"):
                try:
                    run_hook(how, self._hook_environment())
                except SwitchoverError as exc:
                    raise failure_after_commit(f"switchover: {exc}") from None
        else:
            for t in self.targets:
                if t.gateways:
                    with self._phase("switchover", t, fatal=False) as record:
                        t.conn.edit_config(activation_xml(t.gateways), "running")
                    if not record.ok:
                        raise failure_after_commit(f"switchover on {t}: {record.detail}; the "
                                                   "sources still carry the traffic")
            for s in self.sources:
                if s.gateways:
                    with self._phase("switchover", s, fatal=False) as record:
                        s.conn.edit_config(deactivation_xml(s.gateways), "running")
                    if not record.ok:
                        raise failure_after_commit(
                            f"switchover on {s}: {record.detail}; it and the target both "
                            "answer for the gateway addresses")
        self.report.switchover_seconds = round(time.perf_counter() - started, 6)

    def _hook_environment(self) -> dict[str, str]:
        return {"NFMIG_MIGRATION_ID": self.migration_id,
                "NFMIG_SOURCES": " ".join(str(s.endpoint) for s in self.sources),
                "NFMIG_TARGETS": " ".join(str(t.endpoint) for t in self.targets),
                "NFMIG_SELECTION": self.report.selection,
                "NFMIG_SESSIONS": str(sum(len(t.entries) for t in self.targets))}


def run_hook(command: str, environment: dict[str, str]) -> None:
    """Run the switchover command through the shell; SwitchoverError unless it exits 0."""
    env = {**os.environ, **environment}
    try:
        done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=HOOK_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SwitchoverError(f"the switchover command did not end within {HOOK_TIMEOUT} s")\
            from None
    except OSError as exc:
        raise SwitchoverError(f"the switchover command could not run: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise SwitchoverError(f"the switchover command exited with {done.returncode}"
                              + (f": {said[-1]}" if said else ""))
