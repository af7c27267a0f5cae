"""The OpenFlow NAT application's state (ofnat_app.py): sessions, the translated endpoints
they hold, the policy, holds and gateway addresses; shared by its OpenFlow and control
threads, and free of OpenFlow itself."""

from __future__ import annotations

import ipaddress
import json
import random
import threading

from . import flows


class NatState:
    """Sessions, ports in use, policy, holds and gateways; shared by the app's threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sessions: dict[int, list] = {}  # sid -> [proto, src, sport, dst, dport, ext, port]
        self.replies: dict[tuple, int] = {}  # claim (see claims()) -> sid
        self.ports: dict[tuple, int] = {}  # (proto, ext, port) -> sessions using it
        self.scales: dict[int, list] = {}  # sid -> [orig, reply] window scales seen
        self.prefixes: list = []
        self.externals: list[str] = []
        self.mappings: list[tuple] = []  # (network, external), longest prefix first
        self.port_min, self.port_max = 1024, 65535
        self.timeouts = {"TCP": 65535, "UDP": 120, "ICMP": 30}
        self.held: list = []
        self.gateways: dict[str, set[str]] = {"inside": set(), "outside": set()}
        self.accepting = True  # new connections get sessions (see "resume")
        self.created = self.expired = 0
        self.batch = 0
        self.pending: dict[int, tuple[dict, set]] = {}  # batch -> (old entries, dropped)

    def reserve(self, entries: list[list], drop: list[int]) -> str:
        """Claim these sessions' translated endpoints, all or none, for a batch that also
        deletes the sessions ``drop`` (their endpoints are free for the batch to claim, not
        yet for new connections). The reply names the batch and the sessions that were new,
        or the entry that collided. Entries are [*key, address, port] or [..., session id]."""
        with self.lock:
            dropped = set(drop)
            claimed: dict[tuple, int] = {}
            sids = []
            for index, e in enumerate(entries):
                sid = e[7] if len(e) > 7 else flows.session_id(tuple(e[:5]))
                for claim in claims(e):
                    owner = claimed.get(claim, self.replies.get(claim, sid))
                    if owner != sid and owner not in dropped:
                        return json.dumps({"error": "port taken", "index": index})
                    claimed[claim] = sid
                sids.append(sid)
            undo: dict[int, list | None] = {}
            for sid, e in zip(sids, entries, strict=True):
                undo.setdefault(sid, self.sessions.get(sid))
                self.add(sid, e[:7])
            self.batch += 1
            self.pending[self.batch] = (undo, dropped)
        return json.dumps({"ok": True, "batch": self.batch,
                           "new": [sid for sid, old in undo.items() if old is None]})

    def settle(self, batch: int, ok: bool) -> None:
        """The switch took the batch (ok: its deleted sessions free their endpoints) or
        refused it (every session it touched gets its reservation from before back)."""
        with self.lock:
            undo, dropped = self.pending.pop(batch)
            if ok:
                for sid in dropped:
                    self.remove(sid)
                return
            for sid, old in undo.items():
                self.remove(sid)
                if old is not None:
                    self.add(sid, old)
            for sid in dropped:  # a claim of the batch may have shadowed theirs
                e = self.sessions.get(sid)
                if e is not None:
                    self.replies.update(dict.fromkeys(claims(e), sid))

    def free(self, e: list, sid: int) -> bool:
        """Whether no other session claims what this entry would."""
        return all(self.replies.get(claim, sid) == sid for claim in claims(e))

    def add(self, sid: int, e: list) -> None:
        if sid in self.sessions:
            self.remove(sid)
        self.sessions[sid] = list(e)
        self.replies.update(dict.fromkeys(claims(e), sid))
        endpoint = (e[0], e[5], e[6])
        self.ports[endpoint] = self.ports.get(endpoint, 0) + 1

    def remove(self, sid: int) -> list | None:
        e = self.sessions.pop(sid, None)
        if e is None:
            return None
        for claim in claims(e):
            if self.replies.get(claim) == sid:
                del self.replies[claim]
        endpoint = (e[0], e[5], e[6])
        left = self.ports.get(endpoint, 1) - 1
        if left:
            self.ports[endpoint] = left
        else:
            self.ports.pop(endpoint, None)
        self.scales.pop(sid, None)
        return e

    def external_for(self, src: str) -> str | None:
        address = ipaddress.ip_address(src)
        for network, external in self.mappings:
            if address in network:
                return external
        if self.prefixes and not any(address in p for p in self.prefixes):
            return None
        return self.externals[0] if self.externals else None

    def allocate(self, proto: str, external: str) -> int | None:
        span = self.port_max - self.port_min + 1
        start = random.randrange(span)
        for i in range(span):
            port = self.port_min + (start + i) % span
            if (proto, external, port) not in self.ports:
                return port
        return None

    def set_policy(self, p: dict) -> None:
        with self.lock:
            self.prefixes = [ipaddress.ip_network(x, strict=False) for x in p["prefixes"]]
            self.externals = list(p["externals"])
            self.mappings = [(ipaddress.ip_network(n, strict=False), e)
                             for n, e in p["mappings"]]
            self.port_min, self.port_max = p["port_min"], p["port_max"]
            self.timeouts = {"TCP": p["tcp"], "UDP": p["udp"], "ICMP": p.get("icmp", 30)}

    def hold(self, prefixes: list[str]) -> None:
        """Hold the IPv4 prefixes among these (no IPv6 source ever reaches this NAT)."""
        nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
        with self.lock:
            self.held = [n for n in nets if n.version == 4]

    def load(self, config: dict) -> None:
        """The state the backend starts us with (after a crash: what it knew)."""
        if config.get("policy"):
            self.set_policy(config["policy"])
        self.hold(config.get("held", []))
        self.gateways = {side: set(config.get("gateways", {}).get(side, []))
                         for side in ("inside", "outside")}
        self.scales = {int(sid): v for sid, v in config.get("scales", {}).items()}
        self.created, self.expired = config.get("created", 0), config.get("expired", 0)
        self.accepting = config.get("accepting", True)


def claims(e: list) -> list[tuple]:
    """What a session [proto, src, sport, dst, dport, ext, port] holds that no other may:
    its reply tuple. An echo session's flows cannot match its identifier, so it holds its
    address pairs on both sides instead: one echo session per peer and address."""
    if e[0] == "ICMP":
        return [("ICMP", e[5], e[3]), ("ICMP-out", e[1], e[3])]
    return [(e[0], e[5], e[6], e[3], e[4])]
