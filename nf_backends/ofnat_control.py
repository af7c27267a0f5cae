"""The OpenFlow NAT application's control channel (a part of ofnat_app.OfNat): the unix
socket the backend talks to, one JSON request per line and one reply per request.

"watch" turns a connection into a stream of the app's changes (ofnat_state.Watchers), on
which "flush" (with a token) asks for a marker instead of a reply: it goes after every
change the app made up to the request, flow expiries included. Open vSwitch answers a
barrier request before it sends the flow-removed messages of flows it has just idled out
(it sends them once nothing uses the flow any more), so a barrier is not enough: the app
has the switch count the sessions' outbound flows (a request answered after the messages
sent before it) until the count is that of the sessions it knows. A request the app
cannot handle is answered with an error; it never ends the app.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .ofnat_state import NatState, Watchers

log = logging.getLogger("nfmig.ofnat")
LIMBO_WAIT = 1.0  # seconds the switch's flows may disagree with the sessions we know
RECOUNT = 0.002  # seconds between two counts of them


class ControlChannel:
    """The control socket's side of the app: a base of OfNat, whose state, watchers,
    switch and next-hop work (_apply_holds, _resolve_ahead, _await_hops, _announce,
    _owns_any) it uses."""

    state: NatState
    watchers: Watchers
    dp: object
    ready: threading.Event

    def _flush(self, conn: socket.socket, token: int) -> None:
        """The marker ``token`` once every change made up to now is waiting to be written
        (it goes after them): the app has handled what the switch sent before, and the
        switch's count of session flows agrees with ours, so no flow it has ended is left
        whose flow-removed message is still to come. Until they agree (LIMBO_WAIT at most:
        then the marker says changes may be lost)."""
        deadline = time.monotonic() + LIMBO_WAIT
        try:
            while self._switch_agrees() is False:
                if time.monotonic() > deadline:
                    log.warning("flush: the switch's session flows and ours still differ "
                                "after %g s; changes may have been lost", LIMBO_WAIT)
                    self.watchers.mark(conn, token, lost=True)
                    return
                time.sleep(RECOUNT)
        except Exception as exc:
            log.exception("flush failed")
            self.watchers.mark(conn, token, error=f"{type(exc).__name__}: {exc}")
            return
        self.watchers.mark(conn, token)

    def _serve_control(self, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The backend connects as soon as the path exists: it appears only once we listen.
        listener.bind(path + ".new")
        listener.listen(8)
        os.rename(path + ".new", path)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            try:
                self._requests(conn, lines)
            finally:
                self.watchers.remove(conn)

    def _requests(self, conn: socket.socket, lines) -> None:
        for line in lines:
            try:
                request = json.loads(line)
                if request["op"] == "watch":
                    self.watchers.add(conn)
                    continue
                if request["op"] == "flush":  # on a watch stream: the marker answers
                    self._flush(conn, request["token"])
                    continue
                answer = self._answer(request)
            except OSError:
                return
            except Exception as exc:  # a request fails, never the app
                log.exception("control request failed: %.200s", line)
                answer = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            try:
                conn.sendall((answer + "\n").encode())
            except OSError:
                return

    def _answer(self, r: dict) -> str:
        op, state = r["op"], self.state
        if op == "ready":
            return json.dumps({"ok": self.ready.wait(r.get("timeout", 10))})
        if op == "policy":
            state.set_policy(r)
        elif op == "hold":
            state.hold(r["prefixes"])
            self._apply_holds()
            if self.dp is not None:  # the hold is in place when we answer
                self.dp.send_barrier()
        elif op == "gateways":
            with state.lock:
                state.gateways = {side: set(r[side]) for side in ("inside", "outside")}
            # The backend has just put them on the interfaces: next hops first, so that the
            # traffic the announcements bring finds them.
            unresolved = self._resolve_ahead(fresh=True)
            announce = r.get("announce", [])
            if announce and unresolved:
                self._await_hops(unresolved)
            for side, address in announce:
                self._announce(side, address)
        elif op == "resume":
            state.accepting = True
        elif op == "reserve":
            return state.reserve(r["sessions"], r.get("drop", []))
        elif op == "settle":
            added = state.settle(r["batch"], r["ok"])
            if added and self.dp is not None and self._owns_any():
                self._resolve_ahead(state.peers_of(added))
        elif op == "scales":
            with state.lock:
                return json.dumps({"scales": {str(k): v for k, v in state.scales.items()}})
        elif op == "stats":
            with state.lock:
                return json.dumps({"created": state.created, "expired": state.expired})
        else:
            return json.dumps({"error": f"unknown operation {op}"})
        return '{"ok": true}'
