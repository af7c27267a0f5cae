"""The OpenFlow firewall's rules and flows, shared by its backend (openflow_firewall.py) and
its app (ofw_app.py): free of os-ken, so the backend does not load it.

- :class:`Rules`: the policy the app decides new outbound connections by, and which side
  an address is on (a connection's original direction is the side of its source).
- Connections are flow pairs as the NAT's sessions are (flows.py: the same cookies, table,
  priority and idle timeouts), but neither flow rewrites anything and the original flow
  matches on the port of the connection's source, which is the outside one for a
  connection opened from outside.
- Inbound services and pinholes are flows on the outside port, under the session flows,
  that send a new inbound connection's packet to the app (nothing else from outside goes
  there); the backend writes them as ovs-ofctl flow lines in one bundle.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import struct
from collections.abc import Callable, Iterable

from . import flows
from .base import BackendError, Session
from .firewall import L4_PROTOCOLS, FirewallPolicy, Pinhole, PinholeKey

PINHOLE_MAGIC, SERVICE_MAGIC = 0x6E68, 0x6E69  # cookies' top 16 bits, apart from flows.py's
PINHOLE_PRIORITY, SERVICE_PRIORITY = 8, 6  # under the holds (10) and the sessions
RETURN_PATH = 1  # a pinhole cookie's low bit: its reason is return-path (else related)
REASONS = ("related", "return-path")
MAX_TIMEOUT = 65535  # OpenFlow's timeouts are 16 bits
TOP = f"/{0xFFFF << flows.COOKIE_SHIFT:#x}"
MEMO = 1 << 16  # addresses whose side is remembered


class Rules:
    """The subscribers' prefixes and outbound rules, as the app's "firewall" request (see
    request()) has them; ``inside``: further inside prefixes (the nat-policy's)."""

    def __init__(self, request: dict | None = None, inside: Iterable[str] = ()) -> None:
        net = ipaddress.ip_network
        self.subscribers = [
            ([net(p, strict=False) for p in s["prefixes"]], s["outbound"] == "allow-all",
             [(proto, None if dst is None else net(dst, strict=False), port)
              for proto, dst, port in s["rules"]])
            for s in (request or {}).get("subscribers", [])]
        self.inside_nets = [n for nets, _all, _rules in self.subscribers for n in nets]
        self.inside_nets += [net(p, strict=False) for p in inside]
        self._sides: dict[str, bool] = {}  # a bulk write names few addresses many times

    def is_inside(self, address: str) -> bool:
        inside = self._sides.get(address)
        if inside is None:
            if len(self._sides) > MEMO:
                self._sides.clear()
            ip = ipaddress.ip_address(address)
            inside = self._sides[address] = any(ip in n for n in self.inside_nets)
        return inside

    def source_inside(self, src: str, dst: str) -> bool:
        """Whether a connection from src to dst came from inside: its source is a
        subscriber's (or an inside prefix's); failing that, its destination is not."""
        return self.is_inside(src) or not self.is_inside(dst)

    def allows_outbound(self, protocol: str, src: str, dst: str, dport: int) -> bool:
        """Whether the subscriber owning src may open this connection (no subscriber:
        nothing opens)."""
        source, target = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        for nets, allow_all, rules in self.subscribers:
            if any(source in n for n in nets):
                return allow_all or any(
                    (proto is None or proto == protocol) and (to is None or target in to)
                    and (port is None or port == dport) for proto, to, port in rules)
        return False


def request(policy: FirewallPolicy) -> dict:
    """The policy as the app takes it (its "firewall" request and configuration)."""
    return {"subscribers": [
        {"name": s.name, "prefixes": list(s.prefixes), "outbound": s.outbound,
         "rules": [[r.protocol, r.destination_prefix, r.destination_port]
                   for r in s.outbound_rules]} for s in policy.subscribers]}


def check_policy(policy: FirewallPolicy) -> None:
    """BackendError (nothing applied) for what this firewall cannot put in force."""
    for s in policy.subscribers:
        prefixes = [*s.prefixes, *(r.destination_prefix for r in s.outbound_rules),
                    *(p for i in s.inbound_services for p in i.remote_prefixes)]
        for prefix in filter(None, prefixes):
            try:
                version = ipaddress.ip_network(prefix, strict=False).version
            except ValueError:
                raise BackendError(f"subscriber {s.name}: {prefix!r} is not a prefix", None,
                                   "invalid") from None
            if version != 4:
                raise BackendError(f"subscriber {s.name}: the OpenFlow firewall is "
                                   f"IPv4-only, not {prefix}", None, "not supported")
        if s.outbound not in ("allow-all", "listed"):
            raise BackendError(f"subscriber {s.name}: outbound {s.outbound!r}", None,
                               "invalid")
        for proto in [*(r.protocol for r in s.outbound_rules if r.protocol),
                      *(i.protocol for i in s.inbound_services)]:
            if proto not in L4_PROTOCOLS:
                raise BackendError(f"subscriber {s.name}: protocol {proto!r}", None,
                                   "invalid")


def check_pinhole(p: Pinhole) -> None:
    key = p.key
    if p.protocol not in L4_PROTOCOLS or p.reason not in REASONS:
        raise BackendError(f"pinhole {key}: protocol or reason not known", None, "invalid")
    for address in (p.remote_address, p.local_address):
        if ipaddress.ip_address(address).version != 4:
            raise BackendError(f"pinhole {key}: the OpenFlow firewall is IPv4-only", None,
                               "not supported")
    if not 0 < p.local_port < 65536 or not 0 < p.timeout <= MAX_TIMEOUT:
        raise BackendError(f"pinhole {key}: the port must be 1-65535 and the timeout "
                           f"1-{MAX_TIMEOUT} s (an OpenFlow hard timeout)", None,
                           "not supported")


# -- connections: flow pairs that rewrite nothing (OpenFlow 1.5 flow-mod bodies) -------------
_PAIR = struct.Struct("!QQBBHHHIIIHH" "HH" "II" "IH" "IB" "I4s" "I4s" "IH" "IH" "5x" "HHB3x")


def pair_messages(sessions: Iterable[tuple[int, Session, int]], ports: flows.Ports,
                  source_inside: Callable[[str, str], bool]) -> list[bytes]:
    """Flow-mod bodies adding each (session id, session, idle timeout)'s pair: the original
    flow (cookie bit 0, which flows.read_sessions reads the key from) on the port of the
    session's source."""
    oxm, aton, pack = flows.oxm, socket.inet_aton, _PAIR.pack
    head = (flows.ANY, flows.ANY, flows.ANY, flows.SEND_FLOW_REM | flows.RESET_COUNTS, 0, 1,
            51, oxm(flows.IN_PORT, 4))
    base = flows.MAGIC << flows.COOKIE_SHIFT
    messages = []
    for sid, s, idle in sessions:
        number = flows.L4_NUMBERS[s.protocol]
        sport_field, dport_field = (oxm(f, 2) for f in flows.L4_FIELDS[s.protocol])
        src, dst = aton(s.src_address), aton(s.dst_address)
        there, back = (ports.inside, ports.outside) \
            if source_inside(s.src_address, s.dst_address) else (ports.outside, ports.inside)
        for direction, in_port, a, b, pa, pb in ((0, there, src, dst, s.src_port, s.dst_port),
                                                 (1, back, dst, src, s.dst_port, s.src_port)):
            messages.append(pack(
                base | (sid << 1) | direction, 0, flows.NAT_TABLE, flows.ADD, idle, 0,
                flows.PRIORITY, *head, in_port, oxm(flows.ETH_TYPE, 2), 0x0800,
                oxm(flows.IP_PROTO, 1), number, oxm(flows.IPV4_SRC, 4), a,
                oxm(flows.IPV4_DST, 4), b, sport_field, pa, dport_field, pb,
                flows.GOTO_TABLE, 8, flows.NEXT_HOP_TABLE))
    return messages


# -- inbound services and pinholes: ovs-ofctl flow lines ---------------------------------------
def _to_app(priority: int, protocol: str, outside: int, **match: object) -> str:
    fields = "".join(f",{k}={v}" for k, v in match.items())
    return f"table={flows.NAT_TABLE},priority={priority},{flows.L4[protocol]}," \
           f"in_port={outside}{fields}"


def service_lines(policy: FirewallPolicy, outside: int) -> list[str]:
    """The lines replacing every inbound-service flow by those of ``policy``."""
    lines = [f"delete table={flows.NAT_TABLE},cookie={SERVICE_MAGIC << flows.COOKIE_SHIFT:#x}"
             f"{TOP}"]
    for s in policy.subscribers:
        for service in s.inbound_services:
            for prefix in s.prefixes:
                for remote in service.remote_prefixes or (None,):
                    match = {} if remote is None else {"nw_src": _net(remote)}
                    flow = _to_app(SERVICE_PRIORITY, service.protocol, outside, **match,
                                   nw_dst=_net(prefix), tp_dst=service.port)
                    lines.append(f"add {flow},cookie={SERVICE_MAGIC << flows.COOKIE_SHIFT:#x},"
                                 "actions=controller")
    return lines


def _net(prefix: str) -> str:
    return ipaddress.ip_network(prefix, strict=False).with_prefixlen


def _pinhole_match(protocol: str, remote: str, local: str, port: int, outside: int) -> str:
    return _to_app(PINHOLE_PRIORITY, protocol, outside, nw_src=remote, nw_dst=local,
                   tp_dst=port)


def pinhole_lines(put: list[Pinhole], remove: list[PinholeKey], outside: int) -> list[str]:
    """Lines closing ``remove`` then opening (or renewing: an add over a flow restarts its
    hard timeout) ``put``."""
    lines = [f"delete_strict {_pinhole_match(*key, outside)}" for key in remove]
    for p in put:
        cookie = (PINHOLE_MAGIC << flows.COOKIE_SHIFT) | (p.reason == "return-path")
        lines.append(f"add {_pinhole_match(*p.key, outside)},cookie={cookie:#x},"
                     f"hard_timeout={p.timeout},actions=controller")
    return lines


def pinhole_filter() -> str:
    return f"table={flows.NAT_TABLE},cookie={PINHOLE_MAGIC << flows.COOKIE_SHIFT:#x}{TOP}"


_FIELD = re.compile(r"([a-z_]+)=([^,\s]+)")
_PROTOCOL = re.compile(r"priority=\d+,(tcp|udp),")


def read_pinholes(dump: str) -> list[Pinhole]:
    """The pinholes of a dump-flows listing (pinhole_filter()), with their remaining
    lifetime: the hard timeout less the flow's age, at least 1 (the switch removes an
    expired flow within a second or so)."""
    found = []
    for line in dump.splitlines():
        fields = dict(_FIELD.findall(line))
        protocol = _PROTOCOL.search(line)
        if protocol is None or "hard_timeout" not in fields:
            continue
        age = float(fields["duration"].rstrip("s"))
        left = max(1, math.ceil(int(fields["hard_timeout"]) - age))
        reason = REASONS[int(fields["cookie"], 16) & RETURN_PATH]
        found.append(Pinhole(protocol.group(1).upper(), fields["nw_src"], fields["nw_dst"],
                             int(fields["tp_dst"]), reason, left))
    return found
