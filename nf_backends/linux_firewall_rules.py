"""The nftables text of the Linux stateful firewall (:mod:`nfmig.nf_backends.linux_firewall`):
the rules a firewall-policy makes, the pinhole sets and their transactions, and the reading
of those sets back.

The firewall's table holds a forward chain and one pinhole set per address family. A policy
change declares the table, the sets and the chain (a no-op for what is there already),
flushes the chain and fills it again, in one transaction: the new rules take over atomically
and the pinholes, elements of the sets, stay as they are.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Iterator

from .base import BackendError, NatPolicy
from .firewall import L4_PROTOCOLS, FirewallPolicy, Pinhole, PinholeKey
from .linux_config import TABLE as NAT_TABLE

TABLE = "nfmig_fw"
# version -> (nftables family of its address matches, pinhole set, address type)
FAMILIES = {4: ("ip", "pin4", "ipv4_addr"), 6: ("ip6", "pin6", "ipv6_addr")}
NFT_PROTOCOLS = {"TCP": "tcp", "UDP": "udp"}
_PROTOCOL_OF = {"tcp": "TCP", "udp": "UDP", "6": "TCP", "17": "UDP"}
REASONS = ("return-path", "related")
MAX_TIMEOUT = (1 << 32) - 1  # the model's uint32 seconds
_DEVICE_NAME = re.compile(r'[^\s/:"]{1,15}')  # an interface name, safe inside quotes
_ELEMENTS = re.compile(r"elements = \{(.*?)\}", re.S)
_ELEMENT = re.compile(r"(\w+) \. ([0-9A-Fa-f.:]+) \. ([0-9A-Fa-f.:]+) \. (\d+)"
                      r"(?: timeout (\w+))?(?: expires (\w+))?")
_DURATION_PART = re.compile(r"(\d+)(ms|d|h|m|s)")
_MS = {"d": 86400000, "h": 3600000, "m": 60000, "s": 1000, "ms": 1}


def _invalid(message: str) -> BackendError:
    return BackendError(message, None, "invalid")


# -- the policy ----------------------------------------------------------------------------
def ruleset(nat: NatPolicy, policy: FirewallPolicy) -> str:
    """One transaction that puts ``policy`` in force on the interfaces ``nat`` names (see
    the module's description). The NAT's own tables go too: a namespace a NAT served
    before must translate nothing now."""
    interfaces = _interfaces(nat)
    lines = [line for family in ("ip", "ip6")
             for line in (f"table {family} {NAT_TABLE}", f"delete table {family} {NAT_TABLE}")]
    lines += [f"table inet {TABLE} {{",
              *(f"  set {name} {{ type inet_proto . {kind} . {kind} . inet_service; "
                "flags timeout; }" for _, name, kind in FAMILIES.values()),
              "  chain forward { type filter hook forward priority filter; policy drop; }",
              "}", f"flush chain inet {TABLE} forward",
              f"table inet {TABLE} {{", "  chain forward {",
              *(f"    {rule}" for rule in _rules(interfaces, policy)), "  }", "}"]
    return "\n".join(lines) + "\n"


def _interfaces(nat: NatPolicy) -> tuple[list[str], list[str]]:
    """The matches of an outbound and of an inbound packet's way through: the interfaces
    the policy names (none named: the addresses alone decide)."""
    inside, outside = nat.inside_interface, nat.outside_interface
    for name in (inside, outside):
        if name is not None and not _DEVICE_NAME.fullmatch(name):
            raise _invalid(f"no interface {name!r} can be matched")
    way_out, way_in = [], []
    if inside:
        way_out.append(f'iifname "{inside}"')
        way_in.append(f'oifname "{inside}"')
    if outside:
        way_out.append(f'oifname "{outside}"')
        way_in.insert(0, f'iifname "{outside}"')
    return way_out, way_in


def _rules(interfaces: tuple[list[str], list[str]], policy: FirewallPolicy) -> list[str]:
    way_out, way_in = interfaces
    rules = ["ct state established,related accept", "ct state invalid drop",
             # strict whatever the conntrack sysctls say: only a SYN opens a connection
             "tcp flags & (fin|syn|rst|ack) != syn drop"]
    for subscriber in policy.subscribers:
        networks = _networks(subscriber.prefixes, f"subscriber {subscriber.name}")
        for version, (family, _, _) in FAMILIES.items():
            own = _set_of(networks, version)
            if not own:
                continue
            source = [*way_out, f"{family} saddr {own}"]
            if subscriber.outbound == "allow-all":
                rules.append(" ".join([*source, "accept"]))
            else:
                rules += [" ".join([*source, *match, "accept"])
                          for match in _outbound_matches(subscriber.outbound_rules, family,
                                                         version)]
            for service in subscriber.inbound_services:
                remote = _networks(service.remote_prefixes,
                                   f"inbound-service {service.port} of {subscriber.name}")
                remotes = _set_of(remote, version)
                if remote and not remotes:
                    continue  # only remotes of the other IP version may connect
                rules.append(" ".join([
                    *way_in, f"{family} daddr {own}",
                    *([f"{family} saddr {remotes}"] if remotes else []),
                    f"meta l4proto {NFT_PROTOCOLS[service.protocol]}",
                    f"th dport {service.port}", "accept"]))
    for family, name, _ in FAMILIES.values():
        rules.append(" ".join(["ct state new", *way_in,
                               f"meta l4proto . {family} saddr . {family} daddr . th dport",
                               f"@{name} accept"]))
    return rules


def _outbound_matches(rules: Iterable, family: str, version: int) -> Iterator[list[str]]:
    """What each outbound rule matches beyond the source, for one IP version (a rule whose
    destination is of the other version matches nothing of this one)."""
    for rule in rules:
        match = []
        if rule.destination_prefix is not None:
            network = _networks((rule.destination_prefix,), f"outbound-rule {rule.name}")[0]
            if network.version != version:
                continue
            match.append(f"{family} daddr {network}")
        match.append(f"meta l4proto {NFT_PROTOCOLS[rule.protocol]}" if rule.protocol
                     else "meta l4proto { tcp, udp }")  # the model: absent is TCP and UDP
        if rule.destination_port is not None:
            match.append(f"th dport {rule.destination_port}")
        yield match


def _networks(prefixes: Iterable[str], owner: str
              ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(p, strict=False) for p in prefixes]
    except ValueError as exc:
        raise _invalid(f"{owner}: {exc}") from None


def _set_of(networks: list, version: int) -> str:
    """The networks of one IP version as an nftables anonymous set ("" when none)."""
    chosen = [str(n) for n in networks if n.version == version]
    return f"{{ {', '.join(chosen)} }}" if chosen else ""


def check_policy(policy: FirewallPolicy) -> None:
    """Refuse, before anything changes, what the model does not allow: a subscriber named
    twice, an unknown protocol or outbound kind, a port out of range, prefixes that are not
    prefixes or that two subscribers share."""
    seen: set[str] = set()
    owned: list[tuple] = []  # (subscriber, network) of every prefix so far
    for subscriber in policy.subscribers:
        name = subscriber.name
        if not 1 <= len(name) <= 64 or name in seen:
            raise _invalid(f"subscriber name {name!r} is empty, too long or given twice")
        seen.add(name)
        if not subscriber.prefixes:
            raise _invalid(f"subscriber {name} has no prefix")
        if subscriber.outbound not in ("allow-all", "listed"):
            raise _invalid(f"subscriber {name}: outbound {subscriber.outbound!r} is neither "
                           "allow-all nor listed")
        for network in _networks(subscriber.prefixes, f"subscriber {name}"):
            clash = next((other for other, net in owned
                          if net.version == network.version and net.overlaps(network)), None)
            if clash is not None:
                raise _invalid(f"subscribers {clash} and {name} share addresses ({network})")
            owned.append((name, network))
        for rule in subscriber.outbound_rules:
            _check_protocol(rule.protocol, f"outbound-rule {rule.name} of {name}",
                            optional=True)
            _check_port(rule.destination_port, f"outbound-rule {rule.name} of {name}")
            _networks([rule.destination_prefix] if rule.destination_prefix else [],
                      f"outbound-rule {rule.name} of {name}")
        for service in subscriber.inbound_services:
            _check_protocol(service.protocol, f"inbound-service of {name}")
            _check_port(service.port, f"inbound-service of {name}")
            _networks(service.remote_prefixes, f"inbound-service {service.port} of {name}")


def _check_protocol(protocol: str | None, owner: str, optional: bool = False) -> None:
    if not (protocol in L4_PROTOCOLS or (optional and protocol is None)):
        raise _invalid(f"{owner}: protocol {protocol!r} is not one of {L4_PROTOCOLS}")


def _check_port(port: int | None, owner: str) -> None:
    if port is not None and not (isinstance(port, int) and 0 <= port <= 65535):
        raise _invalid(f"{owner}: port {port!r} is not a port number")


# -- pinholes ------------------------------------------------------------------------------
def checked_pinhole(pinhole: Pinhole) -> Pinhole:
    """``pinhole`` with its addresses in the text nftables prints them in (so that its key
    names what is read back), or BackendError naming what the model does not allow."""
    protocol, remote, local, port, reason, timeout = pinhole
    _check_protocol(protocol, f"pinhole {pinhole.key}")
    _check_port(port, f"pinhole {pinhole.key}")
    if port is None:
        raise _invalid(f"pinhole {pinhole.key}: no local port")
    try:
        remote_ip, local_ip = ipaddress.ip_address(remote), ipaddress.ip_address(local)
    except ValueError as exc:
        raise _invalid(f"pinhole {pinhole.key}: {exc}") from None
    if remote_ip.version != local_ip.version:
        raise _invalid(f"pinhole {pinhole.key}: its addresses are not of one IP version")
    if reason not in REASONS:
        raise _invalid(f"pinhole {pinhole.key}: reason {reason!r} is not one of {REASONS}")
    if not (isinstance(timeout, int) and 1 <= timeout <= MAX_TIMEOUT):
        raise _invalid(f"pinhole {pinhole.key}: timeout {timeout!r} is not 1..{MAX_TIMEOUT}")
    return Pinhole(protocol, str(remote_ip), str(local_ip), port, reason, timeout)


def pinhole_transaction(put: list[Pinhole], remove: list[PinholeKey]) -> str:
    """One transaction that opens ``put`` (renewing any already open) and closes ``remove``
    (checked pinholes; keys as :func:`checked_pinhole` writes them). An element is
    deleted before it is added with its new timeout, and added first so that the delete
    finds it whether it was there or not: nftables 1.0 has no delete-if-present."""
    lines: list[str] = []
    every = [*(p.key for p in put), *remove]
    for verb, keys in (("add", [(k, " timeout 1s") for k in every]),
                       ("delete", [(k, "") for k in every]),
                       ("add", [(p.key, f" timeout {_duration(p.timeout)}") for p in put])):
        for version, (_, name, _) in FAMILIES.items():
            elements = [f"{_element(key)}{extra}" for key, extra in keys
                        if ipaddress.ip_address(key[1]).version == version]
            if elements:
                lines.append(f"{verb} element inet {TABLE} {name} {{ {', '.join(elements)} }}")
    return "\n".join(lines) + "\n"


def _element(key: PinholeKey) -> str:
    protocol, remote, local, port = key
    return f"{NFT_PROTOCOLS[protocol]} . {remote} . {local} . {port}"


def _duration(seconds: int) -> str:
    """Seconds as nftables' time text: it refuses a number of seconds that large in one
    piece (e.g. 4294967295s), but not as days, hours, minutes and seconds."""
    parts, left = [], seconds
    for unit in ("d", "h", "m"):
        count, left = divmod(left, _MS[unit] // 1000)
        if count:
            parts.append(f"{count}{unit}")
    if left or not parts:
        parts.append(f"{left}s")
    return "".join(parts)


def listing() -> str:
    """The command that prints every pinhole: the whole table, as nftables 1.0 lists only
    the last of several sets named in one buffer."""
    return f"list table inet {TABLE}\n"


def parse_pinholes(text: str) -> list[tuple[PinholeKey, int]]:
    """(key, remaining whole seconds, rounded up and at least 1) of every element that the
    output of :func:`listing` shows; an element without an expiry (put there by hand) has
    the longest lifetime the model can say."""
    found = []
    for elements in _ELEMENTS.findall(text):
        for protocol, remote, local, port, timeout, expires in _ELEMENT.findall(elements):
            name = _PROTOCOL_OF.get(protocol)
            if name is None:
                continue
            left = expires or timeout
            seconds = MAX_TIMEOUT if not left else \
                min(MAX_TIMEOUT, max(1, math.ceil(_milliseconds(left) / 1000)))
            found.append(((name, remote, local, int(port)), seconds))
    return found


def _milliseconds(duration: str) -> int:
    """nftables' time text (e.g. 1d2h3m4s567ms) in milliseconds."""
    return sum(int(value) * _MS[unit] for value, unit in _DURATION_PART.findall(duration))
