"""Shared fixtures: a real `nfmig serve` process on loopback, and clients for it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ncclient import manager

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    user: str
    password: str
    state_dir: Path
    log: Path

    def connect(self, **kw) -> manager.Manager:
        return manager.connect(host="127.0.0.1", port=self.port, username=self.user,
                               password=kw.pop("password", self.password), hostkey_verify=False,
                               allow_agent=False, look_for_keys=False, timeout=60, **kw)

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(tmp: Path, *extra: str) -> RunningServer:
    tmp.mkdir(parents=True, exist_ok=True)
    users = tmp / "users"
    password = secrets.token_urlsafe(12)
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users), "admin",
                    "--password", password], check=True, capture_output=True)
    port_file = tmp / "port"
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nfmig", "serve", "--users", str(users), "--state-dir",
             str(tmp / "state"), "--netconf-port", "0", "--port-file", str(port_file), *extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return RunningServer(proc, int(port_file.read_text()), "admin", password, tmp / "state", log)


def stop_server(server: RunningServer) -> None:
    if server.alive():
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("nat"), "--max-message-size", "1m")
    yield srv
    stop_server(srv)


@pytest.fixture
def nc(server):
    m = server.connect()
    yield m
    if m.connected:
        m.close_session()
