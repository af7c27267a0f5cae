"""Failover: a standby takes over a lost NAT's traffic.

The standby already holds the source's sessions (client.standby); what makes it forward
them is the source's gateway addresses, written into its policy as a migration's switchover
does: it puts them on its interfaces and announces them (gratuitous ARP, unsolicited
Neighbor Advertisement), so the neighbours send it the traffic at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .endpoints import Connection, Credentials, Endpoint, open_connection
from .switchover import GatewayAddress, activation_xml


class FailoverError(Exception):
    pass


def fail_over(standby: Endpoint, gateways: list[GatewayAddress],
              credentials: Credentials, timeout: float = 30,
              conn: Connection | None = None) -> float:
    """Give ``standby`` the ``gateways`` (over ``conn`` if one is open to it: no login to
    wait for); the seconds it took."""
    if not gateways:
        raise FailoverError("the source had no gateway addresses to take over: its traffic "
                            "must be steered to the standby by other means")
    started = time.perf_counter()
    own = conn is None or not conn.connected
    if own:
        conn = open_connection(standby, credentials, timeout, min(timeout, 10))
    try:
        if not isinstance(conn, Connection):
            raise FailoverError(f"{standby}: failover is done over NETCONF")
        conn.edit_config(activation_xml(gateways), "running")
    finally:
        if own:
            conn.close()
    return time.perf_counter() - started


def gateways_from_status(path: Path) -> tuple[list[GatewayAddress], dict[str, Any]]:
    """The source's gateway addresses and the replication's last status, as `nfmig
    standby --status-file` wrote them."""
    try:
        status = json.loads(Path(path).read_text())
        gateways = [GatewayAddress(g["address"], g["interface"], g["prefix_length"])
                    for g in status.get("gateways", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailoverError(f"cannot read the standby status {path}: {exc}") from None
    return gateways, status


def lag_of(status: dict[str, Any], standby: Endpoint) -> dict[str, Any] | None:
    """What ``standby`` had not written yet when the status was last written: the changes
    a failover to it may lose."""
    for target in status.get("targets", []):
        if target.get("endpoint") == str(standby):
            return {"changes_pending": target.get("pending"),
                    "oldest_pending_ms": target.get("oldest_pending_ms"),
                    "status_written": status.get("written")}
    return None
