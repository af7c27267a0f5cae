"""A firewall's pinholes kept in step on its standbys (client.standby).

The YANG-Push feed a standby follows carries the nat-session list, the connections; a
firewall's pinholes (yang/nfmig-firewall) are read from the source every ``interval``
seconds over the same connection instead, and what changed goes to every standby: a
pinhole opened or closed, or renewed (its remaining lifetime longer than what was read
before, less the time since). A pinhole's lifetime counts down on the standby as on the
source, so one that is only ageing is not written again.
"""

from __future__ import annotations

import threading
import time

from lxml import etree

from .firewall_state import (
    FW_MODULE,
    FW_NS,
    PINHOLE_FILTER,
    parse_pinholes,
    pinhole_edit,
    pinhole_key,
    pinhole_leaf,
)

SLACK = 2  # seconds a reading may differ from the countdown before it counts as renewed


class PinholeFollower:
    """The source's pinholes as last read, and what each standby has yet to write."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.enabled = False  # the source is a firewall (decided on each connection)
        # key -> (the entry, its timeout as read, when it was read)
        self.known: dict[tuple, tuple[etree._Element, int, float]] = {}
        self._next = 0.0
        self.lock = threading.Lock()

    def poll(self, conn, now: float | None = None) -> str:
        """Read the source's pinholes if it is time; the edit (top-level pinhole nodes)
        that brings a standby from the last reading to this one, or "" for none."""
        now = time.monotonic() if now is None else now
        if not self.enabled or now < self._next:
            return ""
        self._next = now + self.interval
        entries = parse_pinholes(conn.get_data("running", PINHOLE_FILTER))
        with self.lock:
            current = {pinhole_key(e): e for e in entries}
            edits = []
            for key, entry in current.items():
                timeout = int(pinhole_leaf(entry, "timeout") or 0)
                before = self.known.get(key)
                renewed = before is not None and timeout > before[1] - (now - before[2]) + SLACK
                if before is None or renewed or \
                        pinhole_leaf(before[0], "reason") != pinhole_leaf(entry, "reason"):
                    edits.append(pinhole_edit(entry))
                    self.known[key] = (entry, timeout, now)
            for key in [k for k in self.known if k not in current]:
                edits.append(pinhole_edit(self.known.pop(key)[0], "remove"))
            return "".join(edits)

    def whole(self, held: list[etree._Element], now: float | None = None) -> str:
        """The edit that brings a standby holding ``held`` in step: every pinhole known,
        with what is left of its lifetime, and the removal of those the source lacks."""
        now = time.monotonic() if now is None else now
        with self.lock:
            edits = []
            for entry, timeout, read_at in self.known.values():
                left = int(timeout - (now - read_at))
                if left >= 1:
                    copy = etree.fromstring(etree.tostring(entry))
                    copy.find(f"{{{FW_NS}}}timeout").text = str(left)
                    edits.append(pinhole_edit(copy))
            edits += [pinhole_edit(e, "remove") for e in held if pinhole_key(e) not in self.known]
            return "".join(edits)


def is_firewall(modules: dict) -> bool:
    return FW_MODULE in modules
