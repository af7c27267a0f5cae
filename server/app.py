"""Wiring: build the schema, backend, datastores and listeners of one server, run, stop."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from nfmig.nf_backends import Backend

from .auth import SshAuthenticator, load_users
from .datastore import Datastores
from .migration import MigrationWindows
from .netconf import NetconfListener, load_or_create_host_key
from .notifications import NotificationHub
from .operations import Operations
from .schema import Schema

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    state_dir: Path
    users_file: Path
    listen: str = "127.0.0.1"
    netconf_port: int = 830
    max_message_size: int = 256 << 20


class Server:
    def __init__(self, config: ServerConfig, backend: Backend):
        self.config = config
        self.backend = backend
        users = load_users(config.users_file)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.schema = Schema()
        self.datastores = Datastores(self.schema, backend, config.state_dir)
        self.hub = NotificationHub(backend, self.schema.nat_ns)
        self.windows = MigrationWindows(backend, self.hub, self.schema, self.schema.nat_ns)
        self.operations = Operations(self.datastores, self.schema, self.hub, self.windows)
        self._auth = SshAuthenticator(users)
        self._host_key = load_or_create_host_key(config.state_dir)
        self.listener: NetconfListener | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self.backend.start()
        self.datastores.load_startup()
        self.backend.apply_policy(self.datastores.policy)
        self.listener = NetconfListener(self.operations, self._auth, self._host_key,
                                        self.config.listen, self.config.netconf_port,
                                        self.config.max_message_size)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.windows.close_all()
        self.backend.hold_new_sessions([])  # a window open at shutdown must not outlive us
        self.backend.stop()
        self._stopped.set()

    def run_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopped.set())
        self._stopped.wait()
        log.info("stopping")
        self.stop()
