"""Wiring: build the schema, backend, datastores and listeners of one server, run, stop."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from nfmig.nf_backends import Backend

from .auth import SshAuthenticator, UsersFileError, load_users
from .change_tracking import ChangeFeed, ChangeTracking
from .datastore import Datastores
from .login_guard import Logins
from .login_policy import LoginPolicy
from .migration import MigrationChanges, MigrationWindows
from .nacm import Nacm
from .netconf import NetconfListener
from .notifications import NotificationHub
from .operations import Operations
from .private_files import make_private
from .restconf import RestconfListener
from .schema import Schema
from .ssh_limits import SshLimits
from .ssh_server import load_or_create_host_keys
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
    login: LoginPolicy = field(default_factory=LoginPolicy)  # failed-login throttling
    ssh: SshLimits = field(default_factory=SshLimits)  # connections, sessions, timeouts
    nacm_recovery_user: str | None = None  # NACM does not apply to it, from loopback


class Server:
    def __init__(self, config: ServerConfig, backend: Backend):
        self.config = config
        self.backend = backend
        users = load_users(config.users_file)
        # Before anything is written: the state directory, its files, the users file private.
        make_private(config.state_dir, config.users_file)
        self.schema = Schema(nf=getattr(backend, "nf", "nat"))
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
        recovery = config.nacm_recovery_user
        if recovery is not None and recovery not in users:
            raise UsersFileError(f"--nacm-recovery-user {recovery}: no such user in "
                                 f"{config.users_file}")
        self.operations.nacm = Nacm(self.schema, lambda: self.datastores.nacm_tree, users,
                                    recovery)
        if recovery is not None:
            log.warning("NACM: sessions of %s from this host are recovery sessions, not "
                        "subject to access control", recovery)
        self._users = users
        self._logins = Logins(users, config.login)  # SSH and RESTCONF count failures together
        self._auth = SshAuthenticator(users, self._logins)
        self._host_keys = load_or_create_host_keys(config.state_dir)
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
            self.listener = NetconfListener(self.operations, self._auth, self._host_keys,
                                            self.config.listen, self.config.netconf_port,
                                            self.config.max_message_size, self.config.ssh)
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
                                config.restconf_port, tls, config.max_message_size,
                                logins=self._logins)

    def stop(self) -> None:
        if self.restconf is not None:
            self.restconf.close()
        if self.listener is not None:
            self.listener.close()
        self._logins.close()
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
