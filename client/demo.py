"""`nfmig demo`: two NAT instances on loopback; every session moves from A to B."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .local import LocalServer, start_local_server
from .netconf import NatClient, timed


def run_demo(sessions: int) -> int:
    if os.geteuid() == 0:
        from .demo_hetero import run_hetero_demo

        return run_hetero_demo()
    print("note: not root, so the demo uses two simulated NATs (no kernel state); run it as "
          "root to see a live connection move from a Linux kernel NAT to the SDN NAT")
    with tempfile.TemporaryDirectory(prefix="nfmig-demo-") as tmp:
        servers: list[LocalServer] = []
        try:
            a = start_local_server(Path(tmp) / "nat-a", "--sessions", str(sessions))
            servers.append(a)
            b = start_local_server(Path(tmp) / "nat-b")
            servers.append(b)
            print(f"NAT A: simulated, {sessions} sessions, NETCONF on 127.0.0.1:{a.port}")
            print(f"NAT B: simulated, empty, NETCONF on 127.0.0.1:{b.port}")
            return _migrate(a, b, sessions)
        finally:
            for s in servers:
                s.stop()


def _migrate(a: LocalServer, b: LocalServer, expected: int) -> int:
    src = NatClient("127.0.0.1", a.port, a.user, a.password, hostkey_verify=False)
    dst = NatClient("127.0.0.1", b.port, b.user, b.password, hostkey_verify=False)
    try:
        (body, reply_bytes), t_get = timed(src.get_sessions)
        moved = body.count("<nat-session")
        request_bytes, t_edit = timed(dst.edit, body)
        _, t_del = timed(src.delete_sessions, body)
        left_on_a = src.get_sessions()[0].count("<nat-session")
        on_b = dst.get_sessions()[0].count("<nat-session")
    finally:
        src.close()
        dst.close()
    print(f"get-data on A      {t_get:7.3f} s  {reply_bytes:>10,} bytes  {moved} sessions")
    print(f"edit-config on B   {t_edit:7.3f} s  {request_bytes:>10,} bytes")
    print(f"delete on A        {t_del:7.3f} s")
    print(f"after: A has {left_on_a} sessions, B has {on_b}")
    ok = moved == expected and on_b == expected and left_on_a == 0
    print("migration complete" if ok else "migration INCOMPLETE")
    return 0 if ok else 1
