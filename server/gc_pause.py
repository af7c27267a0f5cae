"""Cyclic garbage collection paused while bulk requests run, and the heap handed back after.

A bulk request allocates tens of thousands of acyclic objects (entries, tuples, strings) that
reference counting frees anyway; the cyclic collector would rescan them, and a backend's whole
table, many times over (a fifth of a 10k edit, a third of a 100k get-data). Requests of
several sessions overlap, so the pauses are counted: the collector runs again when the last
one ends.

What a bulk request freed stays in the C allocator's arenas unless it is given back: a
move's messages of many megabytes leave them fragmented, so a server that moved its table
in and out again would hold more memory each time. When the last of the requests that
paused the collector ran long (a bulk one) and the server then stays idle for IDLE seconds,
the collector runs once and the allocator returns its free memory to the system. Waiting
for the idle moment matters: a request's reply and message are freed after its handling
ends (sent, or replaced by the next message), and a heap trimmed before that keeps them.

Under steady load from several clients the requests overlap without end: the count never
falls to zero, and garbage with reference cycles (exceptions and their tracebacks, which
hold whole requests) would pile up for as long as the load lasts. So the collector also
runs when a request ends and it has been paused longer than MAX_PAUSED since it last ran.
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
_since = 0.0  # time.monotonic() when the collector was paused, or last ran while paused
_BULK = 0.2  # seconds of paused requests after which the heap is tidied
IDLE = 0.5  # seconds without a request before that tidying
AGAIN = 2.0  # seconds after it, a second one
MAX_PAUSED = 2.0  # seconds the collector stays paused at most while requests overlap
_timer: threading.Timer | None = None
_pending = False  # memory is owed back: a tidying waits for the server to be idle


def _libc() -> ctypes.CDLL | None:
    library = ctypes.util.find_library("c")
    return ctypes.CDLL(library) if library else None


def _trimmer():
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
    return trim


_malloc_trim = _trimmer()


def _tune_allocator() -> None:
    """C allocator settings for a server whose requests come and go in sizes of
    megabytes, from many threads. Blocks of 1 MiB and more are mapped on their own, so
    freeing one returns it to the system at once (by default that size limit grows with
    the largest block freed so far, up to 32 MiB, and such blocks then stay in the heap);
    and at most two arenas: each thread that allocates may otherwise get one of its own,
    and each keeps its free memory fragmented. Measured under eight clients moving 5000
    sessions each: half the peak memory, and half the memory left after the load; a 100k
    edit or get-data as fast as before (256 KiB: 10% slower, from fresh pages)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:  # glibc's names: M_MMAP_THRESHOLD -3, M_ARENA_MAX -8
        mallopt(-3, 1 << 20)
        mallopt(-8, 2)


_tune_allocator()


@contextmanager
def collector_paused() -> Iterator[None]:
    global _active, _was_enabled, _since, _pending
    started = time.monotonic()
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            _since = started
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        overdue = False
        with _lock:
            _active -= 1
            now = time.monotonic()
            # A long request, or a long run of overlapping ones, leaves memory to give
            # back: owed until an idle moment comes, however short the requests after it.
            if now - started > _BULK or now - _since > _BULK:
                _pending = True
            if _active == 0:
                if _was_enabled:
                    gc.enable()
                if _pending:
                    _tidy_when_idle()
            elif now - _since > MAX_PAUSED:
                overdue = True  # the others stay paused; this request's end is a fair moment
                _since = now
        if overdue:
            _tidy()


def _tidy_when_idle() -> None:
    """Wait for an idle moment (called with the lock held): IDLE seconds on, unless a
    wait is on already (restarting it at each request's end would let a client polling
    every moment put the tidying off for good)."""
    global _timer
    if _timer is not None and _timer.is_alive():
        return
    _timer = threading.Timer(IDLE, _tidy_if_idle)
    _timer.daemon = True
    _timer.start()


def _tidy_if_idle(again: bool = True) -> None:
    """Tidy unless a request runs; then once more a little later (AGAIN), for what the
    last requests still held as the first pass ran: a reply on its way to a slow
    client, a web response being written out of its buffer."""
    global _pending, _timer
    with _lock:
        if _active:
            # A request began meanwhile: its end starts the wait again, unless this was
            # the second pass (then what it would have found is left for the next time).
            _pending = _pending or again
            return
        _pending = False
        if again:
            _timer = threading.Timer(AGAIN, _tidy_if_idle, (False,))
            _timer.daemon = True
            _timer.start()
    _tidy()


def _tidy() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def release_memory() -> None:
    """Collect and give free memory back to the system now: after a large request that
    was refused before any handler (which would tidy as it ends) ran."""
    _tidy()
