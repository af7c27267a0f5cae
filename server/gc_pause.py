"""Cyclic garbage collection paused while bulk requests run, and the heap handed back after.

A bulk request allocates tens of thousands of acyclic objects (entries, tuples, strings) that
reference counting frees anyway; the cyclic collector would rescan them, and a backend's whole
table, many times over (a fifth of a 10k edit, a third of a 100k get-data). Requests of
several sessions overlap, so the pauses are counted: the collector runs again when the last
one ends.

What a bulk request freed stays in the C allocator's arenas unless it is given back: each
server thread allocates from arenas of its own, and a move's messages of many megabytes
leave them fragmented, so a server that moved its table in and out again would hold more
memory each time. When the last of the requests that paused the collector ran long (a bulk
one), the collector runs once and the allocator returns its free memory to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_active = 0
_was_enabled = False
_since = 0.0  # time.monotonic() when the collector was paused
_BULK = 0.2  # seconds of paused requests after which the heap is tidied


def _trimmer():
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


_malloc_trim = _trimmer()


@contextmanager
def collector_paused() -> Iterator[None]:
    global _active, _was_enabled, _since
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            _since = time.monotonic()
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        tidy = False
        with _lock:
            _active -= 1
            if _active == 0:
                tidy = time.monotonic() - _since > _BULK
                if _was_enabled:
                    gc.enable()
        if tidy:
            _tidy()


def _tidy() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
