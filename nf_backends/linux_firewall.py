"""The Linux stateful firewall: the Linux NAT's session machinery with a firewall's rules.

The namespace routes between its inside and outside interfaces and translates nothing. Its
tracked connections are conntrack entries, read, written, reported and held exactly as the
Linux NAT (:class:`~nfmig.nf_backends.linux.LinuxBackend`) does for its sessions: an entry
written without NAT attributes is a connection that passes as it is, so a connection moved
by a migration continues on strict tracking without a new SYN. What differs is the nftables
table a policy makes (:mod:`nfmig.nf_backends.linux_firewall_rules`): per-subscriber rules
and the pinhole sets, instead of source NAT.
"""

from __future__ import annotations

import logging
import threading

from .base import BackendError, NatPolicy, Session
from .firewall import (
    FirewallBackend,
    FirewallPolicy,
    Pinhole,
    PinholeKey,
    check_nat_policy,
    translation_refusal,
)
from .linux import LinuxBackend
from .linux_firewall_rules import (
    check_policy,
    checked_pinhole,
    listing,
    parse_pinholes,
    pinhole_transaction,
    ruleset,
)
from .netns_worker import NamespaceError

log = logging.getLogger(__name__)

# The model has every firewall track TCP strictly: a segment that neither belongs to a
# tracked connection nor opens one with a SYN is invalid (and the rules drop it).
STRICT_TCP = {"net.netfilter.nf_conntrack_tcp_loose": "0",
              "net.netfilter.nf_conntrack_tcp_be_liberal": "0"}


class LinuxFirewallBackend(LinuxBackend, FirewallBackend):
    """A personal stateful firewall in a network namespace (yang/nfmig-firewall)."""

    name = "linux-firewall"

    def __init__(self, netns: str):
        super().__init__(netns, ruleset=self._ruleset)
        self._rules = FirewallPolicy()
        # Serialises the two policies' changes: each reloads the table that both make.
        self._policy_lock = threading.Lock()
        self._pinhole_lock = threading.Lock()
        self._reasons: dict[PinholeKey, str] = {}  # nftables keeps no reason with an element

    def _ruleset(self, policy: NatPolicy) -> str:
        return ruleset(policy, self._rules)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        super().start()  # the table with no subscriber: nothing new passes yet
        try:
            self._config.sysctl(STRICT_TCP)
        except (BackendError, NamespaceError) as exc:
            super().stop()
            raise BackendError(f"the firewall in {self.netns} cannot start: {exc}", None,
                               "failed") from None
        log.info("linux firewall in network namespace %s", self.netns)

    # -- policies ----------------------------------------------------------------------
    def apply_policy(self, policy: NatPolicy) -> None:
        """Interfaces, gateway addresses and timeouts; a firewall translates nothing."""
        check_nat_policy(policy)
        with self._policy_lock:
            self._config.apply(policy)

    def apply_firewall_policy(self, policy: FirewallPolicy) -> None:
        """The subscribers' rules, replacing the previous ones in one nftables
        transaction; a refused one leaves the previous rules in force."""
        check_policy(policy)
        with self._policy_lock:
            previous, self._rules = self._rules, policy
            try:
                self._config.apply(self._config.policy)
            except BackendError:
                self._rules = previous
                try:  # the table is unchanged; this puts the config's record right
                    self._config.apply(self._config.policy)
                except BackendError as exc:
                    log.error("the previous firewall rules of %s could not be restored: %s",
                              self.netns, exc)
                raise

    # -- sessions ----------------------------------------------------------------------
    def refusal(self, session: Session) -> str | None:
        return translation_refusal(session) or super().refusal(session)

    # -- pinholes ----------------------------------------------------------------------
    def pinholes(self) -> list[Pinhole]:
        """Every pinhole in the sets now, with its remaining lifetime and the reason it
        was opened for ("related" for one this backend did not open)."""
        with self._pinhole_lock:
            found = parse_pinholes(self._config.nft(listing()))
            # The reasons of pinholes that expired go with them.
            self._reasons = {key: self._reasons[key] for key, _ in found
                             if key in self._reasons}
            return [Pinhole(*key, reason=self._reasons.get(key, "related"), timeout=left)
                    for key, left in found]

    def apply_pinholes(self, put: list[Pinhole], remove: list[PinholeKey]) -> None:
        put = [checked_pinhole(p) for p in put]
        gone = [checked_pinhole(Pinhole(*key)).key for key in remove]
        keys = [p.key for p in put] + gone
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise BackendError(f"pinhole {twice} is named twice", None, "invalid")
        if not keys:
            return
        with self._pinhole_lock:
            try:
                self._config.nft(pinhole_transaction(put, gone))
            except BackendError as exc:
                raise BackendError(f"nftables refused the pinholes: {exc}", None,
                                   "failed") from None
            for key in gone:
                self._reasons.pop(key, None)
            self._reasons.update((p.key, p.reason) for p in put)
