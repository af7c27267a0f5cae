"""Configuration work inside one network namespace without starting a process for it.

A thread joins the namespace (setns acts on the calling thread only) and runs nftables
transactions there through libnftables, the library behind the nft command, writes the
namespace's sysctls, changes its interfaces' addresses over rtnetlink and sends gratuitous
ARP (rtnl.py). Starting `ip netns exec NS nft -f -` costs about 15 ms a time,
the library call well under one: a migration's freeze and thaw are each one nftables
transaction on the source, inside the window.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .rtnl import Announcer, Rtnl

CLONE_NEWNET = 0x40000000
_LIBNFTABLES = "libnftables.so.1"


class NamespaceError(Exception):
    """The namespace cannot be joined, or a request in it failed (the library's message)."""


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(_LIBNFTABLES)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class NamespaceWorker:
    """One thread living in ``netns_path``; its requests run there, one at a time."""

    def __init__(self, netns_path: str):
        self.netns_path = netns_path
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._ready: Future = Future()
        self._route: Rtnl | None = None
        self._announcer = Announcer()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"netns-{os.path.basename(netns_path)}")
        self._thread.start()
        self._ready.result()  # raises NamespaceError when the namespace cannot be joined

    def nft(self, ruleset: str) -> str:
        """Run one nftables transaction or listing (the text `nft -f` reads) in the
        namespace; what it prints."""
        return self._call(lambda: self._run_nft(ruleset))

    def sysctl(self, values: dict[str, str]) -> None:
        """Set kernel parameters of the namespace (name with dots or slashes: value)."""
        self._call(lambda: self._write_sysctls(values))

    def addresses(self) -> set[tuple[str, int, str]]:
        """Every IPv4 and IPv6 address of the namespace: (address, prefix length, device)."""
        return self._call(lambda: self._rtnl().addresses())

    def add_addresses(self, addresses: list[tuple[str, int, str]]) -> None:
        """Put each (address, prefix length, device) on its device, in order; raises
        NamespaceError naming the first that fails (those before it stay)."""
        self._call(lambda: self._each(addresses, "add"))

    def delete_addresses(self, addresses: list[tuple[str, int, str]]) -> None:
        """Take each away; one that is not there is skipped."""
        self._call(lambda: self._each(addresses, "delete"))

    def announce(self, device: str, address: str) -> None:
        """A gratuitous ARP for an IPv4 address of ``device``."""
        self._call(lambda: self._announcer.announce(device, address))

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)

    # -- in the namespace's thread ------------------------------------------------------
    def _call(self, job: Callable[[], Any]) -> Any:
        if not self._thread.is_alive():
            raise NamespaceError(f"the worker of namespace {self.netns_path} has stopped")
        done: Future = Future()
        self._jobs.put((job, done))
        return done.result()

    def _serve(self) -> None:
        try:
            self._join()
            self._lib = _library()
            self._ctx = self._lib.nft_ctx_new(0)
            self._lib.nft_ctx_buffer_error(self._ctx)
            self._lib.nft_ctx_buffer_output(self._ctx)
        except (OSError, NamespaceError) as exc:
            self._ready.set_exception(NamespaceError(str(exc)))
            return
        self._ready.set_result(None)
        try:
            while (item := self._jobs.get()) is not None:
                job, done = item
                try:
                    done.set_result(job())
                except Exception as exc:  # handed to the caller
                    done.set_exception(exc)
        finally:
            self._lib.nft_ctx_free(self._ctx)
            if self._route is not None:
                self._route.close()
            self._announcer.close()

    def _join(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise NamespaceError(f"cannot join network namespace {self.netns_path}: "
                                     f"{os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def _rtnl(self) -> Rtnl:
        if self._route is None:
            self._route = Rtnl()  # made here: its socket belongs to this namespace
        return self._route

    def _each(self, addresses: list[tuple[str, int, str]], how: str) -> None:
        route = self._rtnl()
        for address, prefixlen, device in addresses:
            try:
                getattr(route, how)(address, prefixlen, device)
            except OSError as exc:
                if how == "delete" and exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    continue
                raise NamespaceError(f"{address}/{prefixlen} on {device}: "
                                     f"{exc.strerror or exc}") from None

    def _run_nft(self, ruleset: str) -> str:
        failed = self._lib.nft_run_cmd_from_buffer(self._ctx, ruleset.encode()) != 0
        # read even on a failure: what is left in the buffer would prefix the next output
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(
            errors="replace")
        if failed:
            message = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(
                errors="replace").strip()
            raise NamespaceError(message or "nftables refused the transaction")
        return output

    @staticmethod
    def _write_sysctls(values: dict[str, str]) -> None:
        # /proc/sys/net answers for the namespace of the thread that opens it
        for name, value in values.items():
            path = "/proc/sys/" + name.replace(".", "/") if "/" not in name else \
                "/proc/sys/" + name
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as exc:
                raise NamespaceError(f"sysctl {name}={value}: {exc.strerror}") from None
