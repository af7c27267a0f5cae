"""The OpenFlow stateful firewall: the OpenFlow NAT on Open vSwitch (openflow.py) with
translation off, a router between its inside and outside interfaces that drops everything
it does not track or admit.

Everything of the NAT is reused: the private switch and the app's process, its control
socket, bundles, flow dumps, change reports, holds, gateway addresses, ARP and next hops.
What differs (ofw_rules, ofw_app):
- a connection is a flow pair that rewrites nothing (a session whose translated leaves are
  absent), its original flow on the port of its source: a connection opened from outside
  reads back with the remote as its source;
- the app opens connections from inside by the subscribers' outbound rules, and from
  outside only on the packet-ins of the inbound-service and pinhole flows this backend
  writes (TCP only with a SYN: tracking is strict);
- inbound services and pinholes are flows in the switch, each change of them one bundle;
  a pinhole's flow has its lifetime as hard timeout, so the switch ends it by itself, and
  keeps its reason in its cookie.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable

from .base import Backend, BackendError, NatPolicy, Session, SessionEvent
from .firewall import (
    L4_PROTOCOLS,
    FirewallBackend,
    FirewallPolicy,
    Pinhole,
    PinholeKey,
    check_nat_policy,
    translation_refusal,
)
from .flows import Ports
from .ofnat_life import PORTS, exit_server
from .ofw_rules import (
    Rules,
    check_pinhole,
    check_policy,
    pair_messages,
    pinhole_filter,
    pinhole_lines,
    read_pinholes,
    request,
    service_lines,
)
from .openflow import OpenflowBackend
from .ovs import OF_VERSION, OvsError


class OpenflowFirewallBackend(OpenflowBackend, FirewallBackend):
    app_module = "nfmig.nf_backends.ofw_app"

    def __init__(self, netns: str, inside: str = "inside", outside: str = "outside",
                 on_fatal: Callable[[], None] = exit_server):
        super().__init__(netns, inside, outside, on_fatal)
        self._fw_policy = FirewallPolicy()
        self._fw_lock = threading.Lock()  # one change of the policy or pinholes at a time

    # -- what a firewall holds -----------------------------------------------------------
    def refusal(self, session: Session) -> str | None:
        return Backend.refusal(self, session) or translation_refusal(session) \
            or _refusal(session)

    def _check_session(self, s: Session) -> None:
        why = translation_refusal(s) or _refusal(s)
        if why is not None:
            raise BackendError(f"this firewall cannot hold the session: {why}", s.key,
                               "not supported")

    def _pair_messages(self, sessions: Iterable[tuple[int, Session, int]], ports: Ports
                       ) -> list[bytes]:
        return pair_messages(sessions, ports, self._rules().source_inside)

    def _rules(self) -> Rules:
        """Which side an address is on, as the app decides it (ofw_app)."""
        return Rules(request(self._fw_policy), self._policy.inside_prefix)

    def _report(self, events: list[SessionEvent]) -> None:
        # The app's sessions name their own source as translated endpoint (ofw_app).
        super()._report([(what, s if s is None or s.translated_address is None
                          else s._replace(translated_address=None, translated_port=None))
                         for what, s in events])

    def _app_config(self) -> dict:
        return {"firewall": request(self._fw_policy)}

    # -- policy --------------------------------------------------------------------------
    def apply_policy(self, policy: NatPolicy) -> None:
        check_nat_policy(policy)
        super().apply_policy(policy)

    def apply_firewall_policy(self, policy: FirewallPolicy) -> None:
        """The outbound rules go to the app, the inbound services into the switch (one
        bundle); if the switch refuses them, the app gets the old rules back."""
        check_policy(policy)
        with self._fw_lock:
            old = self._fw_policy
            self.ctl.ask("firewall", **request(policy))
            try:
                self._bundle(service_lines(policy, PORTS.outside))
            except BackendError:
                self._quietly("restore the firewall policy",
                              lambda: self.ctl.ask("firewall", **request(old)))
                raise
            self._fw_policy = policy

    # -- pinholes ------------------------------------------------------------------------
    def pinholes(self) -> list[Pinhole]:
        return read_pinholes(self.ovs.ofctl("dump-flows", "--no-names", pinhole_filter()))

    def apply_pinholes(self, put: list[Pinhole], remove: list[PinholeKey]) -> None:
        for p in put:
            check_pinhole(p)
        # A key this firewall could never have opened is not there: nothing to close.
        remove = [tuple(k) for k in remove if _holdable_key(k)]
        lines = pinhole_lines(put, remove, PORTS.outside)
        if lines:
            with self._fw_lock:
                self._bundle(lines)

    def _bundle(self, lines: list[str]) -> None:
        """Flow changes (ovs-ofctl flow lines with their command) all at once or none."""
        try:
            self.ovs.run("ovs-ofctl", "-O", OF_VERSION, "--bundle", "add-flows",
                         self.ovs.mgmt, "-", stdin="\n".join(lines) + "\n")
        except OvsError as exc:
            raise BackendError(f"the switch refused the change, nothing applied: {exc}",
                               None, "failed") from None


def _refusal(s: Session) -> str | None:
    if s.protocol not in L4_PROTOCOLS:
        return f"the OpenFlow firewall tracks TCP and UDP only, not {s.protocol}"
    if ":" in s.src_address or ":" in s.dst_address:
        return "the OpenFlow firewall is IPv4-only"
    return None


def _holdable_key(key: PinholeKey) -> bool:
    protocol, remote, local, port = key
    try:
        return protocol in L4_PROTOCOLS and 0 < int(port) < 65536 and all(
            ipaddress.ip_address(a).version == 4 for a in (remote, local))
    except ValueError:
        return False
