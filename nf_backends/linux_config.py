"""The configuration of the Linux NAT's network namespace: the nftables NAT table and the
conntrack timeouts a policy makes, the gateway addresses it puts on the interfaces (and
announces), and the hold table a migration sets. The kernel's session table is
:mod:`nfmig.nf_backends.linux`'s.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import NamedTuple

from .base import BackendError, NatPolicy
from .netns_worker import NamespaceError, NamespaceWorker

# The backend's logger: what the namespace's configuration reports reads as before it had
# a module of its own.
log = logging.getLogger("nfmig.nf_backends.linux")

TABLE = "nfmig"
HOLD_TABLE = "nfmig_hold"  # its own table: replacing the NAT policy must not drop a hold
# (version, nftables family, set name, key type) of the held sources' sets
HOLD_SETS = ((4, "ip", "held4", "ipv4_addr"), (6, "ip6", "held6", "ipv6_addr"))
_DEVICE_NAME = re.compile(r"[^\s/:]{1,15}")  # what Linux accepts as an interface name


class NamespaceConfig:
    """What this server has made of one network namespace's configuration: the NAT rules
    and timeouts of the policy in force, its gateway addresses, and the hold."""

    def __init__(self, netns: str, lock: threading.Lock,
                 ruleset: Callable[[NatPolicy], str] | None = None):
        """``lock``: the backend's, so that a change of the rules never interleaves with a
        batch of session writes. ``ruleset``: the nftables transaction that puts a policy's
        rules in force (by default the NAT's); another NF on the same session machinery
        brings its own."""
        self.netns = netns
        self._ruleset = ruleset or _ruleset
        self.netns_path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        self._lock = lock
        self._worker: NamespaceWorker | None = None
        self._hold_table = False  # the hold table is in place (replaced at start)
        self._policy = NatPolicy()
        self._gateways: list[_Gateway] = []  # addresses this server put on interfaces
        # What the kernel was last given, so that a policy edit that changes only the
        # gateway addresses (a migration's switchover) does not reload rules and timeouts.
        self._loaded: tuple[str, dict[str, str]] | None = None

    @property
    def policy(self) -> NatPolicy:
        """The policy in force (the empty one until apply() is called)."""
        return self._policy

    def start(self) -> None:
        """Load the current rules: loading a NAT table instantiates conntrack and NAT in
        the namespace, which the session side needs before it opens its sockets."""
        try:
            self._worker = NamespaceWorker(self.netns_path)
        except NamespaceError as exc:
            raise BackendError(str(exc), None, "failed") from None
        self.nft(self._ruleset(self._policy))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def sysctl(self, values: dict[str, str]) -> None:
        """Set kernel parameters of the namespace (name: value)."""
        try:
            self._in_namespace().sysctl(values)
        except NamespaceError as exc:
            raise BackendError(f"in namespace {self.netns}: {exc}", None, "failed") from None

    # -- hold --------------------------------------------------------------------------
    def hold(self, prefixes: list[str], timeout: float | None = None) -> None:
        """Drop new connections from ``prefixes``, each held for ``timeout`` seconds (None:
        until replaced) by the kernel itself; no prefixes, or no time left, holds none.
        The hold table stays, with its sets emptied: only the sets' elements change, so
        a freeze registers no hook (which costs tens of milliseconds on a busy NAT)."""
        with self._lock:
            if not self._hold_table:
                self.nft(_hold_table())
                self._hold_table = True
            self.nft(_hold_elements(prefixes, timeout))

    # -- policy ------------------------------------------------------------------------
    def apply(self, policy: NatPolicy) -> None:
        """The NAT rules and timeouts, then the gateway addresses (the rules first: the
        traffic an address attracts must find them). All or nothing: when an address
        cannot be put on its interface, the addresses this call added are taken away
        again and the previous rules and timeouts come back."""
        loaded = (self._ruleset(policy), _timeout_sysctls(policy))
        wanted = _gateways_of(policy)
        with self._lock:
            previous = self._policy
            reload = loaded != self._loaded
            if reload:
                self._loaded = None  # unknown until both are in
                self.nft(loaded[0])
            try:
                if reload:
                    self.sysctl(loaded[1])
                if {g.identity for g in wanted} != {g.identity for g in self._gateways}:
                    self._add_gateways(wanted)
            except BackendError:
                if reload:
                    self._restore_rules(previous)
                raise
            self._loaded = loaded
            # Only now the addresses of the previous policy that this one lacks go: the
            # new ones are in place first.
            kept, had = {g.identity for g in wanted}, {g.identity for g in self._gateways}
            self._remove_gateways([g for g in self._gateways if g.identity not in kept])
            new = [g for g in wanted if g.identity not in had]
            self._gateways = wanted
            self._policy = policy
        self._announce(new)

    def _restore_rules(self, policy: NatPolicy) -> None:
        try:
            self.nft(_ruleset(policy))
            self.sysctl(_timeout_sysctls(policy))
            self._loaded = (self._ruleset(policy), _timeout_sysctls(policy))
        except BackendError as exc:
            log.error("the previous NAT rules could not be restored: %s", exc)

    # -- gateway addresses -------------------------------------------------------------
    def _add_gateways(self, gateways: list[_Gateway]) -> None:
        """Put the addresses on their interfaces (in one ip batch); on a failure take away
        those this call added, and raise BackendError naming the address."""
        if not gateways:
            return
        v6_devices = sorted({g.device for g in gateways if g.version == 6})
        if v6_devices:
            # The kernel announces an IPv6 address it adds with an unsolicited Neighbor
            # Advertisement when ndisc_notify is on, at once when the interface does no
            # duplicate address detection (which would also fail while the instance the
            # address moves from still holds it).
            try:
                self.sysctl({f"net/ipv6/conf/{device}/{key}": value
                             for device in v6_devices
                             for key, value in (("accept_dad", "0"), ("ndisc_notify", "1"))})
            except BackendError as exc:
                first = next(g for g in gateways if g.version == 6)
                raise BackendError(f"gateway-address {first.with_prefixlen}: IPv6 settings of "
                                   f"{first.device} failed: {exc}", None, "failed") from None
        present = self._addresses()
        try:
            self._in_namespace().add_addresses([g.native for g in gateways])
        except NamespaceError as exc:
            added = [g.native for g in gateways if g.identity not in present]
            try:
                self._in_namespace().delete_addresses(added)
            except NamespaceError as undo:
                log.error("gateway addresses added before a failure stay in %s: %s",
                          self.netns, undo)
            raise BackendError(f"gateway-address {exc} cannot be put there in namespace "
                               f"{self.netns}", None, "failed") from None

    def _remove_gateways(self, gateways: list[_Gateway]) -> None:
        """Take away addresses this server put there; one already gone is no error."""
        if gateways:
            try:
                self._in_namespace().delete_addresses([g.native for g in gateways])
            except NamespaceError as exc:
                log.warning("removing gateway addresses in %s: %s", self.netns, exc)

    def _announce(self, gateways: list[_Gateway]) -> None:
        """A gratuitous ARP for each new IPv4 address (the kernel announced the IPv6 ones
        as it added them)."""
        for g in gateways:
            if g.version == 4:
                try:
                    self._in_namespace().announce(g.device, g.address)
                except (NamespaceError, OSError) as exc:
                    log.warning("gratuitous ARP for %s on %s in %s failed: %s", g.address,
                                g.device, self.netns, exc)

    def _addresses(self) -> set[tuple]:
        """What is on the namespace's interfaces now, as _Gateway.identity."""
        try:
            return {_Gateway(*found).identity for found in self._in_namespace().addresses()}
        except (NamespaceError, OSError) as exc:
            raise BackendError(f"the addresses of namespace {self.netns} cannot be read: "
                               f"{exc}", None, "failed") from None

    # -- commands in the namespace -----------------------------------------------------
    def nft(self, ruleset: str) -> str:
        """One nftables transaction or listing in the namespace, from its worker thread;
        what it prints. BackendError when nftables refuses it."""
        try:
            return self._in_namespace().nft(ruleset)
        except NamespaceError as exc:
            raise BackendError(f"nft in namespace {self.netns} failed: {exc}", None,
                               "failed") from None

    def _in_namespace(self) -> NamespaceWorker:
        if self._worker is None:
            raise BackendError("the linux backend is not started", None, "failed")
        return self._worker


class _Gateway(NamedTuple):
    """A gateway address as this backend puts it on an interface."""

    address: str
    prefix_length: int
    device: str

    @property
    def version(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def with_prefixlen(self) -> str:
        return f"{self.address}/{self.prefix_length}"

    @property
    def native(self) -> tuple[str, int, str]:
        """(address, prefix length, device), as the namespace worker takes it."""
        return self.address, self.prefix_length, self.device

    @property
    def identity(self) -> tuple:
        """What the kernel tells addresses of one interface apart by: the prefix length
        too for IPv4, the address alone for IPv6."""
        return (self.address, self.prefix_length if self.version == 4 else None, self.device)


def _gateways_of(policy: NatPolicy) -> list[_Gateway]:
    """The policy's gateway addresses on the namespace's interfaces (named by the policy,
    else "inside" and "outside")."""
    devices = {"inside": policy.inside_interface or "inside",
               "outside": policy.outside_interface or "outside"}
    gateways = []
    for g in policy.gateway_address:
        device = devices.get(g.interface)
        if device is None or not _DEVICE_NAME.fullmatch(device) or device in (".", ".."):
            raise BackendError(f"gateway-address {g.with_prefixlen}: no interface "
                               f"{device or g.interface!r} can carry it", None, "invalid")
        gateways.append(_Gateway(str(ipaddress.ip_address(g.address)), g.prefix_length,
                                 device))
    return gateways


def _timeout_sysctls(policy: NatPolicy) -> dict[str, str]:
    t = policy.timeouts
    return {"net.netfilter.nf_conntrack_tcp_timeout_established": str(t.tcp_established),
            "net.netfilter.nf_conntrack_udp_timeout": str(t.udp),
            "net.netfilter.nf_conntrack_udp_timeout_stream": str(t.udp),
            "net.netfilter.nf_conntrack_icmp_timeout": str(t.icmp)}


def _ruleset(policy: NatPolicy) -> str:
    """One nftables transaction replacing the table: source NAT from the inside prefixes
    out of the outside interface, to the external addresses and port range; the address
    mappings come first, as a NAT rule ends the chain for the packet it matches."""
    lines = []
    for family, version in (("ip", 4), ("ip6", 6)):
        prefixes = [p for p in policy.inside_prefix
                    if ipaddress.ip_network(p, strict=False).version == version]
        externals = [a for a in policy.external_address
                     if ipaddress.ip_address(a).version == version]
        lines += [f"table {family} {TABLE}", f"delete table {family} {TABLE}"]
        rules = [*_mapping_rules(family, version, policy),
                 *_snat_rules(family, policy, prefixes, externals)]
        lines += [f"table {family} {TABLE} {{", "  chain postrouting {",
                  "    type nat hook postrouting priority srcnat; policy accept;",
                  *(f"    {rule}" for rule in rules), "  }", "}"]
    return "\n".join(lines) + "\n"



def _hold_table() -> str:
    """The hold table, empty, replacing whatever an earlier server left: new connections
    from sources in its sets are dropped; an element with a timeout ends by itself."""
    lines = [f"table inet {HOLD_TABLE}", f"delete table inet {HOLD_TABLE}",
             f"table inet {HOLD_TABLE} {{"]
    for _version, _family, set_name, key_type in HOLD_SETS:
        lines += [f"  set {set_name} {{", f"    type {key_type}",
                  "    flags interval, timeout", "  }"]
    lines += ["  chain forward {",
              "    type filter hook forward priority filter - 10; policy accept;",
              *(f"    ct state new {family} saddr @{set_name} drop"
                for _, family, set_name, _ in HOLD_SETS), "  }", "}"]
    return "\n".join(lines) + "\n"


def _hold_elements(prefixes: list[str], timeout: float | None) -> str:
    """One transaction that replaces the hold sets' elements by ``prefixes``."""
    lines = [f"flush set inet {HOLD_TABLE} {set_name}" for _, _, set_name, _ in HOLD_SETS]
    if not prefixes or (timeout is not None and timeout <= 0):
        return "\n".join(lines) + "\n"
    # At least a millisecond, the kernel's unit; none: until replaced.
    expiry = "" if timeout is None else f" timeout {max(1, math.ceil(timeout * 1000))}ms"
    networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    for version, _family, set_name, _key_type in HOLD_SETS:
        # An interval set refuses overlapping elements: merge them first.
        held = ipaddress.collapse_addresses(n for n in networks if n.version == version)
        elements = ", ".join(f"{network}{expiry}" for network in held)
        if elements:
            lines.append(f"add element inet {HOLD_TABLE} {set_name} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def _outside_match(policy: NatPolicy) -> list[str]:
    return [f'oifname "{policy.outside_interface}"'] if policy.outside_interface else []


def _mapping_rules(family: str, version: int, policy: NatPolicy) -> list[str]:
    """Each mapped prefix to its own address, longest prefix first so that it wins; TCP and
    UDP with the policy's port range, other protocols (ICMP) with the address only."""
    ports = f"{policy.port_min}-{policy.port_max}"
    rules = []
    for mapping in policy.mappings_most_specific_first():
        network = ipaddress.ip_network(mapping.inside_prefix, strict=False)
        if network.version != version:
            continue
        match = [*_outside_match(policy), f"{family} saddr {network}"]
        target = mapping.external_address if version == 4 else f"[{mapping.external_address}]"
        rules += [" ".join([*match, "meta l4proto { tcp, udp }",
                            f"snat {family} to {target}:{ports}"]),
                  " ".join([*match, f"snat {family} to {target}"])]
    return rules


def _snat_rules(family: str, policy: NatPolicy, prefixes: list[str], externals: list[str]
                ) -> list[str]:
    """TCP and UDP get the policy's port range; other protocols (ICMP) only the address."""
    if policy.external_address and not externals:
        return []  # this family has no external address: nothing to translate
    match = _outside_match(policy)
    if prefixes:
        match.append(f"{family} saddr {{ {', '.join(prefixes)} }}")
    ports = f"{policy.port_min}-{policy.port_max}"
    with_ports = [*match, "meta l4proto { tcp, udp }"]
    if not externals:
        return [" ".join([*with_ports, f"masquerade to :{ports}"]),
                " ".join([*match, "masquerade"])]
    ordered = sorted(ipaddress.ip_address(a) for a in externals)
    first, last = ordered[0], ordered[-1]
    if len(externals) > 1 and int(last) - int(first) != len(externals) - 1:
        raise BackendError("the Linux NAT translates to one external address or one "
                           "contiguous range of them", None, "not supported")
    target = str(first) if len(externals) == 1 else f"{first}-{last}"
    if family == "ip6":
        target = f"[{first}]" if len(externals) == 1 else f"[{first}]-[{last}]"
    return [" ".join([*with_ports, f"snat {family} to {target}:{ports}"]),
            " ".join([*match, f"snat {family} to {target}"])]

