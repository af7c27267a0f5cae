"""Start nfmig servers on loopback as child processes (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .netconf import NatClient


@dataclass
class LocalServer:
    process: subprocess.Popen
    port: int
    user: str
    password: str
    state_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"netconf://{self.user}@127.0.0.1:{self.port}"

    def client(self) -> NatClient:
        """A NETCONF session to it (host key not checked: it is this host's own child)."""
        from .netconf import NatClient

        return NatClient("127.0.0.1", self.port, self.user, self.password,
                         hostkey_verify=False)

    def edit(self, body: str) -> None:
        """edit-config of running with ``body``'s top-level nodes, in a session of its own."""
        client = self.client()
        try:
            client.edit(body)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_local_server(workdir: Path, *serve_args: str, startup_timeout: float = 60,
                       verbose: bool = False, password: str | None = None,
                       scrypt_cost: int | None = None) -> LocalServer:
    """`nfmig serve` on 127.0.0.1 for user admin with ``password`` (a fresh random one when
    None), port chosen by the kernel. ``scrypt_cost`` (log2 N) hashes the password: by
    default 14 for a password made here, nfmig's default (17) for one given."""
    workdir.mkdir(parents=True, exist_ok=True)
    users = workdir / "users"
    if password is None:
        # A letter first: a password that starts with "-" reads as an option to command
        # lines that take it as an argument (netconf-console2 -p PASSWORD).
        password = "p" + secrets.token_urlsafe(16)
        # A random 128-bit secret gains nothing from key stretching; a cheaper hash keeps
        # the many logins of tests and demos fast.
        scrypt_cost = 14 if scrypt_cost is None else scrypt_cost
    cost = [] if scrypt_cost is None else [f"--scrypt-cost={scrypt_cost}"]
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users), "admin",
                    f"--password={password}", *cost], check=True, capture_output=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nfmig", *(["-v"] if verbose else []), "serve",
             "--users", str(users), "--state-dir", str(workdir / "state"),
             "--netconf-port", "0", "--port-file", str(port_file),
             *serve_args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + startup_timeout
    try:
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nfmig serve did not start; its log:\n{log.read_text()}")
            time.sleep(0.05)
    except BaseException:  # Ctrl-C too: the caller has no handle yet to stop the server
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    return LocalServer(proc, int(port_file.read_text()), "admin", password, workdir / "state",
                       log)
