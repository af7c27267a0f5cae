"""Cyclic garbage collection paused while bulk requests run.

A bulk request allocates tens of thousands of acyclic objects (entries, tuples, strings) that
reference counting frees anyway; the cyclic collector would rescan them, and a backend's whole
table, many times over (a fifth of a 10k edit, a third of a 100k get-data). Requests of
several sessions overlap, so the pauses are counted: the collector runs again when the last
one ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_active = 0
_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    global _active, _was_enabled
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _was_enabled:
                gc.enable()
