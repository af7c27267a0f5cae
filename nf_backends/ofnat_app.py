"""The OpenFlow NAT application (os-ken), run as its own process by the openflow backend.

    python -m nfmig.nf_backends.ofnat_app  (configured through NFMIG_OFNAT as JSON, or the
                                            JSON file its "file" names)

It runs in the NAT's network namespace next to its Open vSwitch and:
- answers ARP for the gateway addresses the namespace's inside/outside interfaces carry (the
  kernel there is silenced, so an address there means "this NAT owns it now"; it keeps them
  in memory from netlink, see ofnat_state.InterfaceAddresses) and for those the backend
  gives it ("gateways", the policy's gateway-address list), with the interface's own MAC
  address; it announces a newly given one with a gratuitous ARP out of its port (one put on
  an interface by hand is announced by whoever put it there);
- resolves next hops by ARP and installs their flows in table 1 (MAC rewrite, TTL, output):
  those of its sessions ahead of their first packet, as soon as it owns a gateway address
  they are on-link peers of (it gets one, or sessions are imported while it has one: the
  first packets after a switch-over are forwarded at once, not queued behind an ARP
  exchange), by ARP probes (sender 0.0.0.0: a request from the gateway address would point
  the peer at us before the announcement does, and one direction of its connections
  would move before the other); any other when a packet needs it (one request per
  ASK_AGAIN, from the gateway address);
- on a table-miss packet-in of a new TCP or UDP connection from the inside, allocates a
  translated port (never one in use, imported sessions included) from the address mapping or
  the external addresses and installs the session's flow pair (see flows.py); an ICMP echo
  request gets a pair that keeps its identifier, if no other echo session holds its addresses;
- learns window scales from the handshakes it sees, releases a session's port when its flows
  expire or are deleted, and reports the sessions it creates, updates (the reply of the
  handshake gives the peer's window scale) and ends to watchers;
- holds new sessions of the prefixes it is told to ("hold"; IPv6 ones are ignored: this NAT
  translates IPv4 only).

It starts with the policy, holds, gateways, window scales and counters the backend gives it
in its configuration (a restart after a crash carries on from there), and makes no session
of its own until the backend has told it every session the switch holds ("resume"). That
state lives in ofnat_state.py.

The backend talks to it over a unix socket with line-delimited JSON (ofnat_control.py: one
request, one reply; "watch" turns the connection into an event stream, on which "flush"
asks for a marker after every change made up to then, flow expiries included). Bulk
imports do not pass through here:
the backend reserves their ports here ("reserve"), installs the flows itself in one bundle,
then says whether the switch took them ("settle"). Only expiries are reported to the app by
the switch, not the backend's deletes: thousands of those at once would keep it busy. A
request it cannot handle is answered with an error; it never ends the app.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.lib.packet import arp, ethernet, icmp, ipv4, packet, tcp, udp
from os_ken.ofproto import ofproto_v1_3

from . import flows
from .ofnat_control import ControlChannel
from .ofnat_state import InterfaceAddresses, NatState, Watchers

log = logging.getLogger("nfmig.ofnat")
CONFIG = json.loads(os.environ.get("NFMIG_OFNAT", "{}"))
if "file" in CONFIG:  # the state to start from can be larger than an environment allows
    CONFIG.update(json.loads(Path(CONFIG["file"]).read_text()))
HOLD_COOKIE = 0x6E67 << flows.COOKIE_SHIFT
NO_SCALE = None
MAX_PENDING = 64  # packets waiting for one next hop's ARP reply
ASK_AGAIN = 0.1  # seconds before an unresolved next hop is asked for again
MAX_AHEAD = 1024  # next hops resolved ahead of their first packet at once
AHEAD_WAIT = 0.05  # seconds an announcement may wait for the next hops to be resolved
COUNT_WAIT = 2.0  # seconds the switch may take to count its flows


STATE = NatState()
STATE.load(CONFIG)


class OfNat(ControlChannel, app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = STATE  # for the control channel (ofnat_control)
        self.inside = CONFIG.get("inside_port", 1)
        self.outside = CONFIG.get("outside_port", 2)
        self.ifnames = {self.inside: CONFIG.get("inside", "inside"),
                        self.outside: CONFIG.get("outside", "outside")}
        self.macs = {port: Path(f"/sys/class/net/{name}/address").read_text().strip()
                     for port, name in self.ifnames.items()}
        # Next hops, shared by the event loop, the control thread and the address watcher;
        # notified when a wanted one is resolved.
        self.hops = threading.Condition()
        self.neighbours: dict[str, tuple[str, int]] = {}  # ip -> (mac, port)
        self.pending: dict[str, list] = {}  # ip -> packets waiting for its MAC
        self.asked: dict[str, tuple[float, bool]] = {}  # ip -> when we last asked, by probe
        self.routed: dict[str, tuple[str, int]] = {}  # ip -> (mac, port) of its table-1 flow
        self.wanted: set[str] = set()  # ips whose table-1 flow goes in once resolved
        self.addrs = InterfaceAddresses(self.ifnames.values())
        self.dp = None
        self.watchers = Watchers(self._barrier)
        self.unannounced: list[tuple[str, str]] = []  # (side, address) given before the switch
        self.ready = threading.Event()
        self.counts: dict[int, list] = {}  # xid -> [answered, flow count] (ofnat_control)
        self.addrs.watch(lambda _ifname: self._resolve_ahead())  # an address: we own it
        control = CONFIG.get("socket")
        if control:
            threading.Thread(target=self._serve_control, args=(control,), daemon=True).start()

    # -- switch set-up -------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev) -> None:
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        to_controller = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)]
        self._flow(dp, flows.GUARD_TABLE, 50, parser.OFPMatch(eth_type=0x0806),
                   to_controller)
        for port, mac in self.macs.items():  # anything else misses the table: dropped
            self._flow(dp, flows.GUARD_TABLE, 40, parser.OFPMatch(in_port=port, eth_dst=mac),
                       [], goto=flows.NAT_TABLE)
        self._flow(dp, flows.NAT_TABLE, 2, parser.OFPMatch(in_port=self.inside,
                                                           eth_type=0x0800), to_controller)
        self._flow(dp, flows.NEXT_HOP_TABLE, 0, parser.OFPMatch(), to_controller)
        # Flows the backend deletes (thousands at once) are its business: only expiries
        # come here.
        removed = 1 << ofp.OFPRR_IDLE_TIMEOUT | 1 << ofp.OFPRR_HARD_TIMEOUT
        packet_in = 1 << ofp.OFPR_NO_MATCH | 1 << ofp.OFPR_ACTION
        dp.send_msg(parser.OFPSetAsync(dp, [packet_in, 0], [7, 7], [removed, 0]))
        self.dp = dp
        self._apply_holds()
        self.watchers.reconnected()
        for side, address in self.unannounced:
            self._announce(side, address)
        self.unannounced = []
        self.ready.set()
        log.info("switch %016x connected", dp.id)

    def _flow(self, dp, table: int, priority: int, match, actions, cookie: int = 0,
              idle: int = 0, goto: int | None = None, command=None, flags: int = 0) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)] if actions \
            else []
        if goto is not None:
            inst.append(parser.OFPInstructionGotoTable(goto))
        dp.send_msg(parser.OFPFlowMod(
            dp, cookie=cookie or flows.BASE_COOKIE, table_id=table, priority=priority,
            idle_timeout=idle, match=match, instructions=inst, flags=flags,
            command=ofp.OFPFC_ADD if command is None else command))

    def _apply_holds(self) -> None:
        dp = self.dp
        if dp is None:
            return
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(parser.OFPFlowMod(dp, cookie=HOLD_COOKIE, cookie_mask=(1 << 64) - 1,
                                      table_id=flows.NAT_TABLE, command=ofp.OFPFC_DELETE,
                                      out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))
        for net in STATE.held:
            self._flow(dp, flows.NAT_TABLE, 10, parser.OFPMatch(
                in_port=self.inside, eth_type=0x0800,
                ipv4_src=(str(net.network_address), str(net.netmask))), [], cookie=HOLD_COOKIE)

    # -- packets -------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev) -> None:
        msg = ev.msg
        pkt = packet.Packet(msg.data)
        in_port = msg.match["in_port"]
        eth = pkt.get_protocol(ethernet.ethernet)
        if eth is None:
            return
        found_arp = pkt.get_protocol(arp.arp)
        if found_arp is not None:
            self._arp(msg.datapath, in_port, found_arp)
            return
        ip = pkt.get_protocol(ipv4.ipv4)
        if ip is None:
            return
        if msg.cookie >> flows.COOKIE_SHIFT == flows.MAGIC:
            self._handshake_reply(msg, pkt)
        elif msg.table_id == flows.NEXT_HOP_TABLE:
            self._forward(msg.datapath, ip.dst, msg.data)
        elif in_port == self.inside:
            if ip.src not in self.neighbours:
                self._learn(msg.datapath, ip.src, eth.src, in_port)
            self._new_session(msg, pkt, ip)

    def _arp(self, dp, in_port: int, a) -> None:
        owned = self._addresses(in_port)
        if a.src_ip not in owned and a.src_ip != "0.0.0.0":
            self._learn(dp, a.src_ip, a.src_mac, in_port)
        if a.opcode == arp.ARP_REQUEST and a.dst_ip in owned:
            mac = self.macs[in_port]
            reply = packet.Packet()
            reply.add_protocol(ethernet.ethernet(a.src_mac, mac, 0x0806))
            reply.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=mac, src_ip=a.dst_ip,
                                       dst_mac=a.src_mac, dst_ip=a.src_ip))
            self._send(dp, in_port, reply)

    def _learn(self, dp, address: str, mac: str, port: int) -> None:
        """A neighbour's MAC: the packets waiting for it go, and its table-1 flow goes in
        if it is wanted ahead or was installed with another MAC."""
        hop = (mac, port)
        with self.hops:
            self.neighbours[address] = hop
            self.asked.pop(address, None)
            waiting = self.pending.pop(address, [])
            route = address in self.wanted or self.routed.get(address, hop) != hop
        for data in waiting:  # before the flow: nothing overtakes them through it
            self._send(dp, port, data, self._actions(dp, mac, port))
        if waiting or route:
            self._route(dp, address, mac, port)
        if route:
            with self.hops:  # its flow is on its way to the switch
                self.wanted.discard(address)
                self.hops.notify_all()

    def _addresses(self, port: int) -> set[str]:
        """The gateway addresses this NAT owns now on that side: the interface's own and
        those the backend gave us."""
        given = STATE.gateways["inside" if port == self.inside else "outside"]
        return given | {str(i.ip) for i in self.addrs.on(self.ifnames[port])}

    def _owns_any(self) -> bool:
        """Whether an address is on our interfaces (the backend's gateways go there too)."""
        return any(self.addrs.on(name) for name in self.ifnames.values())

    def _resolve_ahead(self, peers: Iterable[str] | None = None, fresh: bool = False
                       ) -> set[str]:
        """Ahead of their first packet, the next hops of the sessions (all of them, or
        those talking to ``peers``) that are on-link peers of a gateway address we own
        now: the table-1 flows of those whose MAC we know, and an ARP probe for the others,
        whose flows go in with the reply (``fresh``: with the interfaces' addresses of
        this very moment). Returns those still unresolved. A failure here only costs
        their first packets the wait for an ARP reply."""
        try:
            if fresh:
                self.addrs.update()
            return self._resolve(peers)
        except Exception:
            log.exception("could not resolve next hops ahead")
            return set()

    def _await_hops(self, unresolved: set[str]) -> None:
        """Until these next hops are resolved (their flows sent), AHEAD_WAIT at most."""
        started = time.monotonic()
        with self.hops:
            done = self.hops.wait_for(lambda: not unresolved & self.wanted, AHEAD_WAIT)
            left = sorted(unresolved & self.wanted)
        log.info("%d next hop(s) resolved ahead in %.1f ms%s", len(unresolved) - len(left),
                 (time.monotonic() - started) * 1000,
                 "" if done else f"; no answer yet from {', '.join(left[:8])}")

    def _resolve(self, peers: Iterable[str] | None) -> set[str]:
        dp = self.dp
        nets = {port: [i.network for i in self.addrs.on(name)]
                for port, name in self.ifnames.items()}
        if dp is None or not any(nets.values()):
            return set()
        if peers is None:
            with STATE.lock:
                peers = list(STATE.peers)
        owned = self._addresses(self.inside) | self._addresses(self.outside)
        todo = []
        for peer in peers:
            port = self._side(peer)
            address = ipaddress.ip_address(peer)
            if peer not in owned and any(address in net for net in nets[port]):
                todo.append(peer)
        if len(todo) > MAX_AHEAD:
            log.warning("%d next hops to resolve ahead; the first %d are", len(todo),
                        MAX_AHEAD)
            todo = todo[:MAX_AHEAD]
        unresolved = set()
        for peer in todo:
            with self.hops:
                known = self.neighbours.get(peer)
                if known is None:
                    self.wanted.add(peer)
                    unresolved.add(peer)
                elif self.routed.get(peer) == known:
                    continue
            if known is None:
                self._ask(dp, peer, probe=True)
            else:
                self._route(dp, peer, *known)
        return unresolved

    def _announce(self, side: str, address: str) -> None:
        """A gratuitous ARP (an ARP announcement) for a gateway address we own now, out of
        its side's port: neighbours point their entry for it at our MAC at once."""
        dp = self.dp
        if dp is None:
            self.unannounced.append((side, address))
            return
        port = self.inside if side == "inside" else self.outside
        mac = self.macs[port]
        announcement = packet.Packet()
        announcement.add_protocol(ethernet.ethernet("ff:ff:ff:ff:ff:ff", mac, 0x0806))
        announcement.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac=mac, src_ip=address,
                                          dst_mac="00:00:00:00:00:00", dst_ip=address))
        self._send(dp, port, announcement)
        log.info("announced %s on %s", address, self.ifnames[port])

    def _send(self, dp, port: int, pkt_or_data, actions=None, in_port=None) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        if isinstance(pkt_or_data, packet.Packet):
            pkt_or_data.serialize()
            pkt_or_data = pkt_or_data.data
        dp.send_msg(parser.OFPPacketOut(
            dp, buffer_id=ofp.OFP_NO_BUFFER,
            in_port=ofp.OFPP_CONTROLLER if in_port is None else in_port,
            actions=actions or [parser.OFPActionOutput(port)], data=pkt_or_data))

    def _side(self, address: str) -> int:
        ip = ipaddress.ip_address(address)
        inside = STATE.prefixes or [n for n, _ in STATE.mappings]
        return self.inside if any(ip in n for n in inside) else self.outside

    def _forward(self, dp, dst: str, data: bytes) -> None:
        """Send a translated packet to its next hop (on-link), resolving it first."""
        with self.hops:
            known = self.neighbours.get(dst)
            if known is None:
                queue = self.pending.setdefault(dst, [])
                if len(queue) < MAX_PENDING:
                    queue.append(data)
        if known is None:
            self._ask(dp, dst)
            return
        mac, port = known
        actions = self._route(dp, dst, mac, port)
        self._send(dp, port, data, actions)

    def _actions(self, dp, mac: str, port: int) -> list:
        parser = dp.ofproto_parser
        return [parser.OFPActionSetField(eth_src=self.macs[port]),
                parser.OFPActionSetField(eth_dst=mac), parser.OFPActionDecNwTtl(),
                parser.OFPActionOutput(port)]

    def _route(self, dp, dst: str, mac: str, port: int) -> list:
        """The next hop's flow in table 1; returns its actions."""
        actions = self._actions(dp, mac, port)
        self._flow(dp, flows.NEXT_HOP_TABLE, 10,
                   dp.ofproto_parser.OFPMatch(eth_type=0x0800, ipv4_dst=dst), actions)
        with self.hops:
            self.routed[dst] = (mac, port)
        return actions

    def _ask(self, dp, dst: str, probe: bool = False) -> None:
        """An ARP request for dst (none if one went out less than ASK_AGAIN ago, unless
        that was a probe and this is not), from the gateway address whose subnet holds it,
        else from any we own, else (or if a ``probe``, which changes no neighbour's cache)
        from 0.0.0.0."""
        now = time.monotonic()
        with self.hops:
            last = self.asked.get(dst)
            if last is not None and now - last[0] < ASK_AGAIN and (probe or not last[1]):
                return
            if len(self.asked) > 4096:  # those never answered
                self.asked = {k: v for k, v in self.asked.items() if now - v[0] < ASK_AGAIN}
            self.asked[dst] = (now, probe)
        port = self._side(dst)
        address = ipaddress.ip_address(dst)
        on_link = sorted(str(i.ip) for i in self.addrs.on(self.ifnames[port])
                         if address in i.network)
        own = [] if probe else on_link or sorted(self._addresses(port))
        mac = self.macs[port]
        request = packet.Packet()
        request.add_protocol(ethernet.ethernet("ff:ff:ff:ff:ff:ff", mac, 0x0806))
        request.add_protocol(arp.arp(opcode=arp.ARP_REQUEST, src_mac=mac,
                                     src_ip=own[0] if own else "0.0.0.0",
                                     dst_mac="00:00:00:00:00:00", dst_ip=dst))
        self._send(dp, port, request)

    def _new_session(self, msg, pkt, ip) -> None:
        dp = msg.datapath
        l4 = pkt.get_protocol(tcp.tcp) or pkt.get_protocol(udp.udp)
        echo = pkt.get_protocol(icmp.icmp)
        if l4 is not None:
            proto = "TCP" if isinstance(l4, tcp.tcp) else "UDP"
            key = (proto, ip.src, l4.src_port, ip.dst, l4.dst_port)
        elif echo is not None and echo.type == icmp.ICMP_ECHO_REQUEST:
            proto, key = "ICMP", ("ICMP", ip.src, echo.data.id, ip.dst, 0)
        else:
            return  # other protocols: not translated by this NAT
        sid = flows.session_id(key)
        with STATE.lock:
            if not STATE.accepting or any(ipaddress.ip_address(ip.src) in n
                                          for n in STATE.held):
                return
            if sid not in STATE.sessions:
                external = STATE.external_for(ip.src)
                port = None if external is None else (
                    key[2] if proto == "ICMP" else STATE.allocate(proto, external))
                if port is None or not STATE.free([*key, external, port], sid):
                    log.warning("no translation for %s", key)
                    return
                entry = [*key, external, port]
                STATE.add(sid, entry)
                STATE.created += 1
                if proto == "TCP":
                    STATE.scales[sid] = [_window_scale(l4), None]
                self._install(dp, entry, sid)
                self.watchers.emit("created", entry, STATE.scales.get(sid))
        parser = dp.ofproto_parser
        # Through table 0 again, as from its own port, so that the new pair matches it.
        self._send(dp, 0, msg.data, [parser.OFPActionOutput(dp.ofproto.OFPP_TABLE)],
                   in_port=self.inside)

    def _install(self, dp, e: list, sid: int, punt_reply: bool = True) -> None:
        """The session's pair; the inbound flow first also copies packets to us, until the
        handshake's reply has told us the peer's window scale."""
        parser, ofp = dp.ofproto_parser, dp.ofproto
        proto, src, sport, dst, dport, ext, port = e
        if proto == "ICMP":
            self._install_echo(dp, e, sid)
            return
        number = 6 if proto == "TCP" else 17
        field = "tcp" if proto == "TCP" else "udp"
        idle = min(flows.MAX_IDLE, STATE.timeouts[proto])
        rem = ofp.OFPFF_SEND_FLOW_REM
        if punt_reply:
            self._flow(dp, flows.NAT_TABLE, flows.PRIORITY, parser.OFPMatch(
                in_port=self.inside, eth_type=0x0800, ip_proto=number, ipv4_src=src,
                ipv4_dst=dst, **{f"{field}_src": sport, f"{field}_dst": dport}),
                [parser.OFPActionSetField(ipv4_src=ext),
                 parser.OFPActionSetField(**{f"{field}_src": port})],
                cookie=flows.cookie(sid, False), idle=idle, goto=flows.NEXT_HOP_TABLE,
                flags=rem)
        back = [parser.OFPActionSetField(ipv4_dst=src),
                parser.OFPActionSetField(**{f"{field}_dst": sport})]
        if punt_reply and proto == "TCP":
            back.insert(0, parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER))
        self._flow(dp, flows.NAT_TABLE, flows.PRIORITY, parser.OFPMatch(
            in_port=self.outside, eth_type=0x0800, ip_proto=number, ipv4_src=dst,
            ipv4_dst=ext, **{f"{field}_src": dport, f"{field}_dst": port}), back,
            cookie=flows.cookie(sid, True), idle=idle, goto=flows.NEXT_HOP_TABLE, flags=rem,
            command=None if punt_reply else ofp.OFPFC_MODIFY_STRICT)

    def _install_echo(self, dp, e: list, sid: int) -> None:
        """An echo session's pair: OpenFlow has no field for the identifier, which passes
        unchanged (see ofnat_state.claims)."""
        parser = dp.ofproto_parser
        _proto, src, _id, dst, _dport, ext, _port = e
        idle = min(flows.MAX_IDLE, STATE.timeouts["ICMP"])
        flags = dp.ofproto.OFPFF_SEND_FLOW_REM
        for inbound, in_port, (a, b), kind, rewrite in (
                (False, self.inside, (src, dst), flows.ECHO_REQUEST, {"ipv4_src": ext}),
                (True, self.outside, (dst, ext), flows.ECHO_REPLY, {"ipv4_dst": src})):
            self._flow(dp, flows.NAT_TABLE, flows.PRIORITY, parser.OFPMatch(
                in_port=in_port, eth_type=0x0800, ip_proto=1, ipv4_src=a, ipv4_dst=b,
                icmpv4_type=kind), [parser.OFPActionSetField(**rewrite)],
                cookie=flows.cookie(sid, inbound), idle=idle, goto=flows.NEXT_HOP_TABLE,
                flags=flags)

    def _handshake_reply(self, msg, pkt) -> None:
        sid = (msg.cookie >> 1) & flows.SESSION_MASK
        segment = pkt.get_protocol(tcp.tcp)
        with STATE.lock:
            entry = STATE.sessions.get(sid)
            if entry is None or segment is None:
                return
            learned = False
            if segment.bits & tcp.TCP_SYN:
                scales = STATE.scales.setdefault(sid, [None, None])
                before = list(scales)
                scales[1] = _window_scale(segment)
                if scales[0] is None or scales[1] is None:
                    scales[0] = scales[1] = 0  # scaling is on only if both offered it
                learned = scales != before
            self._install(msg.datapath, entry, sid, punt_reply=False)
            if learned:  # the session reads back with the peer's scale now
                self.watchers.emit("updated", entry, scales)

    @set_ev_cls(ofp_event.EventOFPFlowRemoved, MAIN_DISPATCHER)
    def _flow_removed(self, ev) -> None:
        msg = ev.msg
        if msg.cookie >> flows.COOKIE_SHIFT != flows.MAGIC:
            return
        sid = (msg.cookie >> 1) & flows.SESSION_MASK
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        if msg.reason == ofp.OFPRR_DELETE:
            return  # deleted by the backend (which releases the port) or by us below
        # One direction idled out: the session ends, both flows and its port.
        dp.send_msg(parser.OFPFlowMod(
            dp, cookie=flows.cookie(sid, False), cookie_mask=(1 << 64) - 2,
            table_id=flows.NAT_TABLE,
            command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))
        with STATE.lock:
            entry = STATE.remove(sid)
            if entry is not None:
                STATE.expired += 1
        if entry is not None:
            self.watchers.emit("deleted", entry)

    # -- reports to watchers (ofnat_state.Watchers) -------------------------------------
    def _barrier(self, xid: int) -> bool:
        dp = self.dp
        if dp is None:
            return False
        request = dp.ofproto_parser.OFPBarrierRequest(dp)
        request.xid = xid
        dp.send_msg(request)
        return True

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _barrier_reply(self, ev) -> None:
        self.watchers.answered(ev.msg.xid)

    def _switch_agrees(self) -> bool | None:
        """Whether the switch holds an outbound flow for exactly as many sessions as we
        know (None: no switch). One it has idled out whose flow-removed message is still to
        come makes one fewer: Open vSwitch sends those only once nothing uses the flow any
        more, and after its barrier replies. Counted after every flow sent for the sessions
        we know (under the state's lock, which the event loop holds from a change to its
        flows sent), and only if no batch of the backend is under way meanwhile."""
        dp = self.dp
        if dp is None:
            return None
        ofp, parser = dp.ofproto, dp.ofproto_parser
        xid = self.watchers.next_xid()
        waiter = self.counts[xid] = [threading.Event(), None]
        try:
            with STATE.lock:
                if STATE.pending:
                    return False
                known, batch = len(STATE.sessions), STATE.batch
                request = parser.OFPAggregateStatsRequest(
                    dp, 0, flows.NAT_TABLE, ofp.OFPP_ANY, ofp.OFPG_ANY,
                    flows.MAGIC << flows.COOKIE_SHIFT, 0xFFFF << flows.COOKIE_SHIFT | 1,
                    parser.OFPMatch())
                request.xid = xid
                dp.send_msg(request)
            if not waiter[0].wait(COUNT_WAIT):
                raise RuntimeError("the switch did not count its flows")
        finally:
            self.counts.pop(xid, None)
        with STATE.lock:
            if STATE.pending or STATE.batch != batch:
                return False
        return waiter[1] == known

    @set_ev_cls(ofp_event.EventOFPAggregateStatsReply, MAIN_DISPATCHER)
    def _counted(self, ev) -> None:
        # In turn with the switch's other messages: its flow-removed messages sent before
        # have been handled (and their changes are waiting to be written).
        waiter = self.counts.get(ev.msg.xid)
        if waiter is not None:
            waiter[1] = ev.msg.body.flow_count
            waiter[0].set()


def _window_scale(segment) -> int | None:
    for option in segment.option or []:
        if isinstance(option, tcp.TCPOptionWindowScale):
            return option.shift_cnt
    return None


def main(app_module: str = "nfmig.nf_backends.ofnat_app") -> None:
    """Run the app of ``app_module`` (this one, or one built on it)."""
    from os_ken import cfg

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg.CONF(args=["--ofp-listen-host", "127.0.0.1",
                   "--ofp-tcp-listen-port", str(CONFIG["of_port"])], project="os_ken")
    app_manager.AppManager.run_apps([app_module])


if __name__ == "__main__":
    main()
