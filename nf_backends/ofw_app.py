"""The OpenFlow firewall application (os-ken): the NAT application (ofnat_app.OfNat) with
translation off, run as its own process by the openflow firewall backend.

    python -m nfmig.nf_backends.ofw_app  (configured as ofnat_app is, plus "firewall": the
                                          policy as ofw_rules.request() gives it)

Everything but the making of connections is the NAT app's: ARP and gateway addresses, next
hops, window scales learnt from handshakes, expiries, holds, the control channel, change
reports. A connection is a session whose translated endpoint is its own source (so the
NAT's state, which claims a session's reply tuple, claims its key) and whose flows rewrite
nothing (ofw_rules). It opens:
- from inside, on a packet-in of the NAT's inside miss flow, if its source is a
  subscriber's and the subscriber's outbound rules allow it;
- from outside, on a packet-in of an inbound-service or pinhole flow (the backend writes
  those: their match is the admission, so nothing else from outside reaches us);
and for TCP only with a SYN: a segment of a connection we do not track is dropped (strict
tracking, as the model asks). A hold keeps new connections of the held prefixes from
opening in both directions.
"""

from __future__ import annotations

import ipaddress
import logging

from os_ken.controller import ofp_event
from os_ken.controller.handler import MAIN_DISPATCHER, set_ev_cls
from os_ken.lib.packet import ethernet, ipv4, packet, tcp, udp

from . import flows, ofnat_app
from .ofnat_app import CONFIG, HOLD_COOKIE, STATE, OfNat, _window_scale
from .ofw_rules import PINHOLE_MAGIC, SERVICE_MAGIC, Rules

log = logging.getLogger("nfmig.ofw")
ADMITTING = (PINHOLE_MAGIC, SERVICE_MAGIC)


class OfFirewall(OfNat):
    def __init__(self, *args, **kwargs):
        # Before the NAT app's start: its control thread may ask for the rules at once.
        self.fw_request = CONFIG.get("firewall") or {}
        self.rules = Rules()
        self._new_rules()
        super().__init__(*args, **kwargs)

    def _new_rules(self) -> None:
        self.rules = Rules(self.fw_request, [str(n) for n in STATE.prefixes])

    def _answer(self, r: dict) -> str:
        if r["op"] == "firewall":
            with STATE.lock:
                self.fw_request = r
                self._new_rules()
            return '{"ok": true}'
        answer = super()._answer(r)
        if r["op"] == "policy":  # its inside prefixes say which side an address is on
            with STATE.lock:
                self._new_rules()
        return answer

    # -- new connections -----------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev) -> None:
        msg = ev.msg
        if msg.cookie >> flows.COOKIE_SHIFT not in ADMITTING:
            super()._packet_in(ev)
            return
        pkt = packet.Packet(msg.data)
        eth, ip = pkt.get_protocol(ethernet.ethernet), pkt.get_protocol(ipv4.ipv4)
        if eth is None or ip is None:
            return
        if ip.src not in self.neighbours:  # the way back to it: the frame's sender
            self._learn(msg.datapath, ip.src, eth.src, msg.match["in_port"])
        self._open(msg, pkt, ip, inbound=True)

    def _new_session(self, msg, pkt, ip) -> None:
        """The inside miss flow's packet-in: an outbound connection, perhaps."""
        self._open(msg, pkt, ip, inbound=False)

    def _open(self, msg, pkt, ip, inbound: bool) -> None:
        dp = msg.datapath
        segment = pkt.get_protocol(tcp.tcp)
        l4 = segment or pkt.get_protocol(udp.udp)
        if l4 is None:
            return  # this firewall tracks TCP and UDP only
        proto = "TCP" if segment is not None else "UDP"
        key = (proto, ip.src, l4.src_port, ip.dst, l4.dst_port)
        sid = flows.session_id(key)
        opens = segment is None or (segment.bits & tcp.TCP_SYN
                                    and not segment.bits & tcp.TCP_ACK)
        with STATE.lock:
            if sid not in STATE.sessions:
                ours = ipaddress.ip_address(ip.dst if inbound else ip.src)
                rules = self.rules
                if not opens or not STATE.accepting or any(ours in n for n in STATE.held):
                    return
                # An inbound connection's source must read as outside, or its pair would
                # be laid out the other way round (see _install).
                if rules.source_inside(ip.src, ip.dst) == inbound:
                    return
                if not inbound and not rules.allows_outbound(proto, ip.src, ip.dst,
                                                             l4.dst_port):
                    return
                entry = [*key, ip.src, l4.src_port]
                if not STATE.free(entry, sid):
                    return
                STATE.add(sid, entry)
                STATE.created += 1
                if segment is not None:
                    STATE.scales[sid] = [_window_scale(segment), None]
                self._install(dp, entry, sid)
                self.watchers.emit("created", entry, STATE.scales.get(sid))
        parser = dp.ofproto_parser
        # Through table 0 again, as from its own port, so that the new pair matches it.
        self._send(dp, 0, msg.data, [parser.OFPActionOutput(dp.ofproto.OFPP_TABLE)],
                   in_port=msg.match["in_port"])

    def _install(self, dp, e: list, sid: int, punt_reply: bool = True) -> None:
        """The connection's pair, rewriting nothing: the original flow on its source's
        port. The reply flow first also copies packets to us (the NAT app's handshake
        reply, which learns the peer's window scale and installs it again without)."""
        parser, ofp = dp.ofproto_parser, dp.ofproto
        proto, src, sport, dst, dport = e[:5]
        there, back = (self.inside, self.outside) if self.rules.source_inside(src, dst) \
            else (self.outside, self.inside)
        number, field = (6, "tcp") if proto == "TCP" else (17, "udp")
        idle = min(flows.MAX_IDLE, STATE.timeouts[proto])
        rem = ofp.OFPFF_SEND_FLOW_REM

        def match(in_port: int, a: str, pa: int, b: str, pb: int):
            return parser.OFPMatch(in_port=in_port, eth_type=0x0800, ip_proto=number,
                                   ipv4_src=a, ipv4_dst=b,
                                   **{f"{field}_src": pa, f"{field}_dst": pb})

        if punt_reply:
            self._flow(dp, flows.NAT_TABLE, flows.PRIORITY, match(there, src, sport, dst, dport),
                       [], cookie=flows.cookie(sid, False), idle=idle,
                       goto=flows.NEXT_HOP_TABLE, flags=rem)
        punt = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)] \
            if punt_reply and proto == "TCP" else []
        self._flow(dp, flows.NAT_TABLE, flows.PRIORITY, match(back, dst, dport, src, sport),
                   punt, cookie=flows.cookie(sid, True), idle=idle, goto=flows.NEXT_HOP_TABLE,
                   flags=rem, command=None if punt_reply else ofp.OFPFC_MODIFY_STRICT)

    # -- what differs from a NAT beyond connections ---------------------------------------
    def _apply_holds(self) -> None:
        """The NAT's holds (no new connection from a held source) and, over the inbound
        services and pinholes, none to a held destination either."""
        super()._apply_holds()
        dp = self.dp
        if dp is None:
            return
        parser = dp.ofproto_parser
        for net in STATE.held:
            self._flow(dp, flows.NAT_TABLE, 10, parser.OFPMatch(
                in_port=self.outside, eth_type=0x0800,
                ipv4_dst=(str(net.network_address), str(net.netmask))), [], cookie=HOLD_COOKIE)

    def _side(self, address: str) -> int:
        """Inside: a subscriber's address, one of the policy's inside prefixes, or an
        on-link peer of the inside interface; no address is translated to tell."""
        ip = ipaddress.ip_address(address)
        inside = self.rules.is_inside(address) or any(
            ip in i.network for i in self.addrs.on(self.ifnames[self.inside]))
        return self.inside if inside else self.outside


def main() -> None:
    ofnat_app.main("nfmig.nf_backends.ofw_app")


if __name__ == "__main__":
    main()
