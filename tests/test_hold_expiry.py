"""A migration window ends by itself even when the server that opened it is gone.

rpc freeze makes the backend hold new sessions; the server's timer releases the hold when
the window times out. The hold also carries that timeout into the backend, so a server
killed while frozen leaves nothing behind: a Linux NAT's kernel drops the held sources'
new connections until the window's end and then lets them through by itself.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from lxml import etree
from nfmig.nf_backends.simulated import SimulatedBackend
from nfmig.server.migration import MigrationWindows
from nfmig.server.notifications import NotificationHub
from nfmig.server.schema import Schema

from nfmig.testbed import TestBed

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"


def freeze(migration_id: str, timeout: int, *prefixes: str) -> etree._Element:
    leaves = "".join(f"<source-prefix>{p}</source-prefix>" for p in prefixes)
    return etree.fromstring(f'<freeze xmlns="{NAT_NS}"><migration-id>{migration_id}'
                            f"</migration-id>{leaves}<timeout>{timeout}</timeout></freeze>")


def thaw(migration_id: str) -> etree._Element:
    return etree.fromstring(f'<thaw xmlns="{NAT_NS}"><migration-id>{migration_id}'
                            "</migration-id></thaw>")


# -- the server hands the window's end to the backend ------------------------------------
class RecordingBackend(SimulatedBackend):
    def __init__(self) -> None:
        super().__init__()
        self.holds: list[tuple[list[str], float | None]] = []

    def hold_new_sessions(self, prefixes: list[str], timeout: float | None = None) -> None:
        self.holds.append((prefixes, timeout))
        super().hold_new_sessions(prefixes, timeout)


def test_the_hold_lasts_as_long_as_the_longest_open_window():
    backend = RecordingBackend()
    schema = Schema()
    windows = MigrationWindows(backend, NotificationHub(backend, NAT_NS), schema, NAT_NS)
    try:
        windows.freeze(None, freeze("long", 30, "10.1.0.0/16"))
        windows.freeze(None, freeze("short", 5, "10.2.0.0/16"))
        (first, first_timeout), (both, both_timeout) = backend.holds
        assert first == ["10.1.0.0/16"] and 29 < first_timeout <= 30
        assert both == ["10.1.0.0/16", "10.2.0.0/16"] and 29 < both_timeout <= 30
        windows.thaw(None, thaw("long"))
        assert backend.holds[-1][0] == ["10.2.0.0/16"] and 4 < backend.holds[-1][1] <= 5
        windows.thaw(None, thaw("short"))
        assert backend.holds[-1] == ([], None)
    finally:
        windows.close_all()


def test_a_simulated_hold_ends_at_its_timeout_by_itself():
    backend = SimulatedBackend()
    backend.hold_new_sessions(["10.0.0.0/8"], timeout=0.3)
    now = time.monotonic()
    assert backend._open_session(now, 1) is None  # 10.0.0.2: held
    time.sleep(0.35)
    assert backend._open_session(time.monotonic(), 1) is not None
    backend.hold_new_sessions(["10.0.0.0/8"])  # no timeout: until released
    assert backend._open_session(time.monotonic() + 3600, 2) is None
    backend.hold_new_sessions([])
    assert backend._open_session(time.monotonic(), 2) is not None


# -- a Linux NAT whose server is killed while frozen -------------------------------------
WINDOW = 3  # seconds
PORT = 5401


@pytest.fixture
def kernel():
    """The kernel NAT tests' helpers; importing them skips (or in CI fails) when not root."""
    from . import test_linux_nat

    return test_linux_nat


def held_elements(bed: TestBed, ns: str) -> str:
    done = bed.run(ns, "nft", "list", "set", "inet", "nfmig_hold", "held4", check=False)
    return done.stdout if done.returncode == 0 else ""


def test_the_kernel_thaws_a_nat_whose_server_died_frozen(kernel, tmp_path):
    with TestBed() as bed:
        nat = kernel.Nat(bed, bed.nat_a, tmp_path / "a")
        try:
            bed.activate(bed.nat_a)
            listener = kernel.listen(bed, PORT)
            assert kernel.connects(bed, PORT), "no connection through the NAT before freeze"

            nat.client.m.dispatch(freeze("killed", WINDOW, TestBed.INSIDE_PREFIX))
            frozen = time.monotonic()
            os.killpg(nat.server.process.pid, signal.SIGKILL)
            nat.server.process.wait(timeout=10)

            assert TestBed.INSIDE_PREFIX in held_elements(bed, bed.nat_a)
            assert not kernel.connects(bed, PORT, timeout=1.0), "a new connection passed"
            assert time.monotonic() - frozen < WINDOW, "the check came after the window"

            opened = None
            while time.monotonic() < frozen + WINDOW + 5:
                if kernel.connects(bed, PORT, timeout=0.5):
                    opened = time.monotonic()
                    break
            assert opened is not None, "new connections still fail after the window's end"
            assert opened - frozen > WINDOW - 1, "the hold ended long before its timeout"
            assert TestBed.INSIDE_PREFIX not in held_elements(bed, bed.nat_a)
            assert not nat.server.alive()  # nobody restarted it
            listener.kill()
        finally:
            if nat.server.alive():
                nat.close()
            nat.server.stop()
