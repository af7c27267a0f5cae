"""`nfmig demo`: two NAT instances on loopback; every session moves from A to B."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from .endpoints import Credentials, Endpoint
from .local import LocalServer, start_local_server
from .migrate import Migration, Options
from .report import Report


def run_demo(sessions: int) -> int:
    if os.geteuid() == 0:
        from .demo_hetero import run_hetero_demo

        return run_hetero_demo()
    print("note: not root, so the demo uses two simulated NATs (no kernel state); run it as "
          "root to see a live connection move from a Linux kernel NAT to the SDN NAT")
    with tempfile.TemporaryDirectory(prefix="nfmig-demo-") as tmp:
        servers: list[LocalServer] = []
        try:
            password = secrets.token_urlsafe(16)
            a = start_local_server(Path(tmp) / "nat-a", "--sessions", str(sessions),
                                   password=password)
            servers.append(a)
            b = start_local_server(Path(tmp) / "nat-b", password=password)
            servers.append(b)
            print(f"NAT A: simulated, {sessions} sessions, NETCONF on 127.0.0.1:{a.port}")
            print(f"NAT B: simulated, empty, NETCONF on 127.0.0.1:{b.port}")
            return _migrate(a, b, sessions)
        finally:
            for s in servers:
                s.stop()


def _migrate(a: LocalServer, b: LocalServer, expected: int) -> int:
    report = migrate_between(a, b)
    print(report.summary())
    src, dst = a.client(), b.client()
    try:
        left_on_a = src.get_sessions()[0].count("<nat-session")
        on_b = dst.get_sessions()[0].count("<nat-session")
    finally:
        src.close()
        dst.close()
    print(f"after: A has {left_on_a} sessions, B has {on_b}")
    ok = report.ok and on_b == expected and left_on_a == 0
    print("migration complete" if ok else "migration INCOMPLETE")
    return 0 if ok else 1


def migrate_between(a: LocalServer, b: LocalServer, **options) -> Report:
    """What `nfmig migrate` does, from A's server to B's (both started with one password)."""
    credentials = Credentials(password=a.password, verify_host_keys=False)
    return Migration([Endpoint("127.0.0.1", a.port, a.user)],
                     Endpoint("127.0.0.1", b.port, b.user), None,
                     Options(credentials=credentials, **options)).run()
