"""Wiring: build the schema, backend, datastores and listeners of one server, run, stop."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from nfmig.nf_backends import Backend

from .auth import SshAuthenticator, load_users
from .change_tracking import ChangeFeed, ChangeTracking
from .datastore import Datastores
from .migration import MigrationChanges, MigrationWindows
from .netconf import NetconfListener, load_or_create_host_key
from .notifications import NotificationHub
from .operations import Operations
from .restconf import RestconfListener
from .schema import Schema
from .tls import load_or_create_certificate, server_context

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    state_dir: Path
    users_file: Path
    listen: str = "127.0.0.1"
    netconf_port: int = 830
    max_message_size: int = 256 << 20
    restconf_port: int | None = None  # None: no RESTCONF listener
    tls_cert: Path | None = None  # with tls_key; None: a self-signed one in state_dir
    tls_key: Path | None = None
    restconf_plain_http: bool = False  # loopback only


class Server:
    def __init__(self, config: ServerConfig, backend: Backend):
        self.config = config
        self.backend = backend
        users = load_users(config.users_file)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.schema = Schema()
        self.datastores = Datastores(self.schema, backend, config.state_dir)
        # The backend's one change listener, shared by notifications and change records.
        self.feed = ChangeFeed(backend)
        self.hub = NotificationHub(backend, self.schema.nat_ns, self.feed)
        self.windows = MigrationWindows(backend, self.hub, self.schema, self.schema.nat_ns)
        self.tracking = ChangeTracking(self.feed)
        self.changes = MigrationChanges(backend, self.tracking, self.schema,
                                        self.schema.nat_ns)
        self.operations = Operations(self.datastores, self.schema, self.hub, self.windows,
                                     self.changes)
        self._users = users
        self._auth = SshAuthenticator(users)
        self._host_key = load_or_create_host_key(config.state_dir)
        self.listener: NetconfListener | None = None
        self.restconf: RestconfListener | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start the backend, then serve; a failure on the way stops what had started (the
        backend's daemons and kernel state must not outlive a server that never ran)."""
        self.backend.start()
        try:
            self.datastores.load_startup()
            self.backend.apply_policy(self.datastores.policy)
            self.listener = NetconfListener(self.operations, self._auth, self._host_key,
                                            self.config.listen, self.config.netconf_port,
                                            self.config.max_message_size)
            if self.config.restconf_port is not None:
                self.restconf = self._start_restconf()
        except BaseException:
            self.stop()
            raise

    def _start_restconf(self) -> RestconfListener:
        config = self.config
        tls = None
        if not config.restconf_plain_http:
            cert, key = config.tls_cert, config.tls_key
            if cert is None or key is None:
                cert, key = load_or_create_certificate(config.state_dir, config.listen)
            try:
                tls = server_context(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise RuntimeError(f"cannot use the TLS certificate {cert} and key {key}: "
                                   f"{exc}") from None
        return RestconfListener(self.operations, self._users, config.listen,
                                config.restconf_port, tls, config.max_message_size)

    def stop(self) -> None:
        if self.restconf is not None:
            self.restconf.close()
        if self.listener is not None:
            self.listener.close()
        self.windows.close_all()
        self.tracking.close_all()
        try:
            self.backend.hold_new_sessions([])  # a window open at shutdown must not outlive us
        finally:
            self.backend.stop()
            self._stopped.set()

    def run_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopped.set())
        self._stopped.wait()
        log.info("stopping")
        self.stop()
