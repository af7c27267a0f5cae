"""How many of an evacuation's migrations may be in their freeze window at once, and what
the others do meanwhile.

Migrations run side by side in one process and on few cores; a freeze window is short,
and lengthened by anything else that wants the CPU while it is open (the migrator's own
threads as much as the servers of other NATs copying their tables). So a window opens only
when fewer than ``windows`` are open, and, ``quiet``, once the other migrations have
reached the end of the phase they are in: they wait at their next phase boundary until no
window is open or waiting, so their bulk copies resume right after. A phase that does not
end (a peer that stopped answering) holds a window back at most ``settle`` seconds. While a
window is open the process collects no cyclic garbage: a collection over the other
migrations' session tables would pause the window's thread with everyone else's.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class WindowGate:
    """Shared by the migrations of one evacuation; each is named by a key of its own."""

    def __init__(self, windows: int = 1, quiet: bool = True, settle: float = 2.0):
        if windows < 1:
            raise ValueError("at least one window must be allowed to open")
        self.windows = windows
        self.quiet = quiet
        self.settle = settle
        self._cond = threading.Condition()
        self._active: set[str] = set()  # running a phase
        self._inside: set[str] = set()  # in their window
        self._waiting = 0  # windows waiting to open
        self._collecting = True  # whether cyclic garbage collection was on before

    def begin(self, key: str) -> None:
        """A migration starts: it waits while windows are open or about to."""
        with self._cond:
            self._hold_back()
            self._active.add(key)

    def boundary(self, key: str) -> None:
        """A migration is between two phases (called from its own thread only: a thread
        of its own that waits here holds up nothing another migration needs)."""
        if not self.quiet:
            return
        with self._cond:
            if key in self._inside or not (self._waiting or self._inside):
                return
            self._active.discard(key)
            self._cond.notify_all()
            self._hold_back()
            self._active.add(key)

    def end(self, key: str) -> None:
        with self._cond:
            self._active.discard(key)
            self._cond.notify_all()

    @contextmanager
    def window(self, key: str) -> Iterator[None]:
        """Around one migration's window: opens when a slot is free and the others are
        quiet (or ``settle`` seconds have passed)."""
        with self._cond:
            self._waiting += 1
            self._active.discard(key)
            self._cond.notify_all()
            try:
                deadline = None
                while True:
                    if len(self._inside) >= self.windows:
                        self._cond.wait()
                        continue
                    if not self.quiet or not self._active:
                        break
                    deadline = deadline or time.monotonic() + self.settle
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._waiting -= 1
            if not self._inside:
                self._collecting = gc.isenabled()
                gc.disable()
            self._inside.add(key)
        try:
            yield
        finally:
            with self._cond:
                self._inside.discard(key)
                if not self._inside and self._collecting:
                    gc.enable()
                self._active.add(key)
                self._cond.notify_all()

    def _hold_back(self) -> None:
        while self.quiet and (self._waiting or self._inside):
            self._cond.wait()
