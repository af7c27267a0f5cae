"""Shared fixtures: a real `nfmig serve` process on loopback, and clients for it."""

from __future__ import annotations

import pytest
from ncclient import manager
from nfmig.client.local import LocalServer, start_local_server

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


class RunningServer(LocalServer):
    def connect(self, **kw) -> manager.Manager:
        return manager.connect(host="127.0.0.1", port=self.port, username=self.user,
                               password=kw.pop("password", self.password), hostkey_verify=False,
                               allow_agent=False, look_for_keys=False, timeout=60, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_local_server(tmp_path_factory.mktemp("nat"), "--max-message-size", "1m")
    srv = RunningServer(**vars(started))
    yield srv
    srv.stop()


@pytest.fixture
def nc(server):
    m = server.connect()
    yield m
    if m.connected:
        m.close_session()


@pytest.fixture
def nats(tmp_path):
    """Start servers of the simulated NAT by their seed counts (test_migrate.start_nats);
    all stopped after the test."""
    from .test_migrate import start_nats

    started = []

    def make(*seeds: int) -> list:
        new = start_nats(tmp_path / str(len(started)), *seeds)
        started.extend(new)
        return new
    yield make
    for nat in started:
        nat.stop()
