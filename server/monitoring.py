"""NETCONF monitoring (RFC 6022): /netconf-state, its sessions and their statistics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

import libyang

from .schema import module_ns, module_revision

NCM = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"


class NetconfStatistics:
    """RFC 6022's /netconf-state/statistics: the counters of the sessions that ended, to
    which those of the open ones are added when read."""

    _COUNTERS = ("in_rpcs", "in_bad_rpcs", "out_rpc_errors", "out_notifications")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.start_time = now()
        self.in_sessions = 0
        self.in_bad_hellos = 0
        self.dropped_sessions = 0
        self.ended_totals = dict.fromkeys(self._COUNTERS, 0)

    def ended(self, info: Any) -> None:
        """Count a session that ended (the caller holds the lock)."""
        for name in self._COUNTERS:
            self.ended_totals[name] += getattr(info, name)
        if info.bad_hello:
            self.in_bad_hellos += 1
        elif not info.ended_by_request:  # neither close-session nor kill-session
            self.dropped_sessions += 1

    def xml(self, current: list[Any]) -> str:
        total = {name: value + sum(getattr(s, name) for s in current)
                 for name, value in self.ended_totals.items()}
        return (f"<statistics><netconf-start-time>{self.start_time}</netconf-start-time>"
                f"<in-bad-hellos>{self.in_bad_hellos}</in-bad-hellos>"
                f"<in-sessions>{self.in_sessions}</in-sessions>"
                f"<dropped-sessions>{self.dropped_sessions}</dropped-sessions>"
                f"<in-rpcs>{total['in_rpcs']}</in-rpcs>"
                f"<in-bad-rpcs>{total['in_bad_rpcs']}</in-bad-rpcs>"
                f"<out-rpc-errors>{total['out_rpc_errors']}</out-rpc-errors>"
                f"<out-notifications>{total['out_notifications']}</out-notifications>"
                "</statistics>")


def netconf_state_xml(capabilities: Iterable[str], locks: dict[str, int | None],
                      modules: Iterable[libyang.Module], sessions: list[Any],
                      statistics: str) -> str:
    """/netconf-state: ``locks`` the session holding each datastore's lock (or None),
    ``sessions`` the open sessions (operations.SessionInfo), ``statistics`` the
    NetconfStatistics' text. Every module is fetched with get-schema (location NETCONF)."""
    caps = "".join(f"<capability>{escape(c)}</capability>" for c in capabilities)
    stores = "".join(f"<datastore><name>{d}</name>"
                     + (f"<locks><global-lock><locked-by-session>{sid}</locked-by-session>"
                        f"<locked-time>{now()}</locked-time></global-lock></locks>"
                        if sid else "")
                     + "</datastore>" for d, sid in locks.items())
    schemas = "".join(
        f"<schema><identifier>{m.name()}</identifier><version>{module_revision(m)}"
        f"</version><format>yang</format><namespace>{module_ns(m)}</namespace>"
        "<location>NETCONF</location></schema>" for m in modules)
    rows = "".join(
        f"<session><session-id>{s.session_id}</session-id><transport>ncm:netconf-ssh"
        f"</transport><username>{escape(s.username)}</username><source-host>"
        f"{s.source_host}</source-host><login-time>{s.login_time}</login-time>"
        f"<in-rpcs>{s.in_rpcs}</in-rpcs><in-bad-rpcs>{s.in_bad_rpcs}</in-bad-rpcs>"
        f"<out-rpc-errors>{s.out_rpc_errors}</out-rpc-errors>"
        f"<out-notifications>{s.out_notifications}</out-notifications></session>"
        for s in sessions)
    return (f'<netconf-state xmlns="{NCM}" xmlns:ncm="{NCM}"><capabilities>{caps}'
            f"</capabilities><datastores>{stores}</datastores><schemas>{schemas}</schemas>"
            f"<sessions>{rows}</sessions>{statistics}</netconf-state>")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
