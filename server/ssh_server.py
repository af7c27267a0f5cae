"""The SSH side of the NETCONF server: accepting connections, limits, algorithms, host keys.

Every connection gets its own paramiko transport thread; the accept loop only accepts and
hands the socket over, so a client that never speaks, or speaks slowly, delays nobody.
One housekeeping thread enforces the time limits of all connections and sessions:

* login grace time: a connection that holds no session (not logged in yet, or logged in
  without opening a NETCONF session, or left without one) is closed after this long;
* max startups: the number of such connections at once; a new one beyond the limit closes
  the oldest one of the source address that holds the most of them, so that anyone who
  merely keeps connections open cannot lock operators out (they would have to open that
  many connections within the time a real client needs to log in);
* sessions in total and per user, counted when a client opens a session channel, which is
  refused with "resource shortage" beyond a limit;
* idle timeout: a session that has sent no request, has none in progress and holds no
  notification subscription for this long is closed.

Algorithms are the modern ones only (see KEX, CIPHERS, MACS, HOST_KEY_ALGORITHMS), with
compression after login (ssh_compression.py) for the clients that ask for it; the
host keys (Ed25519, ECDSA P-256, RSA 3072 signing with SHA-2) are generated into the state
directory on first start.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .ssh_compression import CompressingTransport
from .ssh_limits import SshLimits

log = logging.getLogger(__name__)

# Preference order as announced (a server takes the client's first choice among these).
KEX = ("curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "ecdh-sha2-nistp384",
       "ecdh-sha2-nistp521", "diffie-hellman-group18-sha512",
       "diffie-hellman-group16-sha512", "diffie-hellman-group-exchange-sha256")
CIPHERS = ("chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com",
           "aes128-gcm@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")
MACS = ("hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512",
        "hmac-sha2-256")
HOST_KEY_ALGORITHMS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                       "ecdsa-sha2-nistp521", "rsa-sha2-512", "rsa-sha2-256")
# Client keys signing with SHA-1 (ssh-rsa) or DSA are refused for public key logins.
WEAK_PUBKEY_ALGORITHMS = ("ssh-rsa", "ssh-dss")

# Bulk edits arrive as megabytes: a wide window and large packets let them flow without
# waiting for window adjustments.
WINDOW = 8 << 20
MAX_PACKET = 256 << 10

# How often the housekeeping thread looks at the connections: the precision of the limits.
TICK = 0.25

# paramiko's own log lines (a traceback for every port scan or failed handshake) go to this
# logger as debug messages: each connection's fate is logged once, here, with its source.
PARAMIKO_LOG = f"{__name__}.paramiko"


class _DebugOnly(logging.Filter):
    """Lowers paramiko's records to debug level, and lets them through only when this
    module logs debug messages (nfmig -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


_paramiko_log = logging.getLogger(PARAMIKO_LOG)
_paramiko_log.addFilter(_DebugOnly())
# paramiko's debug output is one line per packet; its info and above say what went wrong.
_paramiko_log.setLevel(logging.INFO)


# -- host keys -------------------------------------------------------------------------

def _new_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _new_ecdsa() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


# File name, paramiko class, generator; the ECDSA file name is the one earlier versions
# wrote, so their key (and the clients' known_hosts entries) stays.
HOST_KEY_FILES = (
    ("ssh_host_ed25519_key", paramiko.Ed25519Key, _new_ed25519),
    ("ssh_host_ecdsa_key", paramiko.ECDSAKey, _new_ecdsa),
    ("ssh_host_rsa_key", paramiko.RSAKey, _new_rsa),
)


def load_or_create_host_keys(state_dir: Path) -> list[paramiko.PKey]:
    """The server's SSH host keys, each generated into ``state_dir`` (mode 0600, OpenSSH
    format) when its file is missing."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for name, key_class, generate in HOST_KEY_FILES:
        path = state_dir / name
        if not path.exists():
            _write_private(path, generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption()))
            key = key_class.from_private_key_file(str(path))
            log.info("generated SSH host key %s (%s %s)", path, key.get_name(),
                     key.fingerprint)
        else:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)  # a private key readable by others is no secret
            try:
                key = key_class.from_private_key_file(str(path))
            except (paramiko.SSHException, OSError, ValueError) as exc:
                raise RuntimeError(f"cannot read the SSH host key {path}: {exc}") from None
        keys.append(key)
    return keys


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a new file of mode 0600, all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale temporary file may have had another mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# -- algorithms ------------------------------------------------------------------------

def _restrict(options: paramiko.transport.SecurityOptions, name: str,
              wanted: Sequence[str]) -> None:
    """Keep, of what this paramiko knows, only the ``wanted`` algorithms."""
    known = set(getattr(options, name))
    setattr(options, name, tuple(a for a in wanted if a in known))


def server_algorithms(transport: paramiko.Transport, group_exchange: bool) -> None:
    """Restrict ``transport`` (before it starts) to the modern algorithms; group exchange
    only when the system's primes are loaded (``Transport.load_server_moduli``): paramiko
    would announce it without them, then fail the clients that choose it."""
    options = transport.get_security_options()
    _restrict(options, "kex", [k for k in KEX if group_exchange or "group-exchange" not in k])
    _restrict(options, "ciphers", CIPHERS)
    _restrict(options, "digests", MACS)
    _restrict(options, "key_types", HOST_KEY_ALGORITHMS)


# -- connections -----------------------------------------------------------------------

@dataclass
class _Slot:
    """A session channel a connection holds, from its opening until it closes."""

    username: str
    session: object | None = None
    activity: Hashable | None = None
    idle_since: float = 0.0


class _Gate(paramiko.ServerInterface):
    """One connection's view of the server: authentication as the users file says,
    session channels as the limits allow."""

    def __init__(self, connection: SshConnection, authenticator: paramiko.ServerInterface):
        self.connection = connection
        self.auth = authenticator

    def get_allowed_auths(self, username: str) -> str:
        return self.auth.get_allowed_auths(username)

    def check_auth_none(self, username: str) -> int:
        return self._note(username, self.auth.check_auth_none(username))

    def check_auth_password(self, username: str, password: str) -> int:
        return self._note(username, self.auth.check_auth_password(username, password))

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return self._note(username, self.auth.check_auth_publickey(username, key))

    def check_auth_interactive(self, username: str, submethods: str):
        return self._note(username, self.auth.check_auth_interactive(username, submethods))

    def check_auth_interactive_response(self, responses):
        return self.auth.check_auth_interactive_response(responses)

    def _note(self, username: str, result):
        # paramiko forgets who logged in once the connection is gone; its end is logged
        # after that.
        if result == paramiko.AUTH_SUCCESSFUL:
            self.connection.user = username
        return result

    def get_banner(self):
        return self.auth.get_banner()

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return self.connection.listener._reserve(self.connection, chanid)

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return self.auth.check_channel_subsystem_request(channel, name)

    def check_channel_pty_request(self, channel: paramiko.Channel, term: bytes, width: int,
                                  height: int, pixelwidth: int, pixelheight: int,
                                  modes: bytes) -> bool:
        # OpenSSH's `ssh -tt -s netconf`, and client libraries that do the same, ask for a
        # terminal before the subsystem and drop the session when it is refused. NETCONF
        # needs none: granted, and ignored (no terminal exists; the channel stays bytes).
        return True

    def check_channel_window_change_request(self, channel: paramiko.Channel, width: int,
                                            height: int, pixelwidth: int,
                                            pixelheight: int) -> bool:
        return True  # the terminal granted above resized: nothing to do


class SshConnection:
    """One client's SSH connection: its transport, and the session channels it holds."""

    def __init__(self, listener: SshServer, sock: socket.socket, addr: tuple):
        self.listener = listener
        self.sock = sock
        self.source = addr[0]
        self.peer = f"{addr[0]} port {addr[1]}"
        self.opened = time.monotonic()
        self.unused_since: float | None = self.opened  # None while it holds a session
        self.slots: dict[int, _Slot] = {}
        self.user: str | None = None  # once logged in
        self.reported = False  # its end is decided (closing) and logged
        # Replies are small writes after large reads: Nagle's algorithm would hold one back
        # until the client acknowledged the last, which it delays (40 ms on Linux).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = CompressingTransport(
            sock, default_window_size=WINDOW, default_max_packet_size=MAX_PACKET,
            disabled_algorithms={"pubkeys": list(WEAK_PUBKEY_ALGORITHMS)})
        self.transport.set_log_channel(PARAMIKO_LOG)
        server_algorithms(self.transport, listener.group_exchange)
        for key in listener.host_keys:
            self.transport.add_server_key(key)
        # The login grace time is enforced here, with a clear log line; paramiko's own
        # timeouts only back it up.
        grace = listener.limits.login_grace_time
        self.transport.banner_timeout = grace + 5
        self.transport.handshake_timeout = grace + 5

    def start(self) -> None:
        # With an event, paramiko negotiates in the transport's thread and returns at once.
        self.transport.start_server(event=threading.Event(),
                                    server=_Gate(self, self.listener.authenticator))

    def waiting(self) -> bool:
        """Open, not closing, and holding no session: what --max-startups counts."""
        return self.unused_since is not None and not self.reported and \
            self.transport.is_active()

    def close(self) -> None:
        """Close at once: shutting the socket down wakes the transport's thread, which
        would otherwise notice only at its next poll."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.transport.close()


class SshServer:
    """Accepts SSH connections on one address and port and enforces :class:`SshLimits`;
    a subclass makes a session of each session channel (:meth:`_open_session`)."""

    def __init__(self, authenticator: paramiko.ServerInterface,
                 host_keys: Sequence[paramiko.PKey], address: str, port: int,
                 limits: SshLimits, name: str = "SSH"):
        self.authenticator = authenticator
        self.host_keys = list(host_keys)
        self.limits = limits
        self.name = name
        self._lock = threading.Lock()
        self._connections: list[SshConnection] = []
        self._slots_open = 0
        self._stop = threading.Event()
        # Group exchange needs the system's list of primes; without it, it is not offered.
        self.group_exchange = paramiko.Transport.load_server_moduli()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            # A deep backlog: a burst of connections waits for the accept loop, which only
            # accepts, instead of being refused by the kernel.
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._wake_w, self._wake_r = socket.socketpair()
        self._threads = [
            threading.Thread(target=self._accept_loop, name="ssh-accept", daemon=True),
            threading.Thread(target=self._housekeeping, name="ssh-limits", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("%s over SSH listening on %s port %d", name, address, self.port)

    # -- what a subclass provides ------------------------------------------------------
    def _open_session(self, channel: paramiko.Channel) -> object:
        """Make the session of an accepted session channel (called in a thread of its own;
        it may block until the session is established). It must call
        :meth:`session_ended` with the channel when the session ends."""
        raise NotImplementedError

    def _activity(self, session: object) -> Hashable | None:
        """A value that changes whenever ``session`` does something, or None while it is
        busy or waiting for something that is not its client (never idle then)."""
        return None

    def _close_session(self, session: object) -> None:
        session.close()

    # -- accepting ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                client, addr = self._sock.accept()
            except OSError as exc:
                # Out of file descriptors, say: the limits below keep ours bounded, but
                # other parts of the process may hold many; wait instead of spinning.
                log.warning("cannot accept an SSH connection: %s", exc)
                time.sleep(0.1)
                continue
            try:
                self._admit(client, addr)
            except Exception as exc:  # never let one connection end the accept loop
                log.info("SSH connection from %s port %s ended before login: %s", addr[0],
                         addr[1], exc)
                client.close()

    def _admit(self, client: socket.socket, addr: tuple) -> None:
        connection = SshConnection(self, client, addr)
        # Started before it is listed: a listed connection that is not active has ended.
        connection.start()
        with self._lock:
            waiting = [c for c in self._connections if c.waiting()]
            victim = _eviction_victim(waiting) if len(waiting) >= self.limits.max_startups \
                else None
            if victim is not None:
                victim.reported = True
            self._connections.append(connection)
        if victim is not None:
            log.warning("SSH connection from %s closed to make room: %d connections hold "
                        "no session, the limit (--max-startups); it was the oldest of the "
                        "address holding the most", victim.peer, len(waiting))
            victim.close()

    # -- sessions ----------------------------------------------------------------------
    def _reserve(self, connection: SshConnection, chanid: int) -> int:
        """A session channel opens (in the transport's thread): count it against the
        limits, and accept it in a thread of its own."""
        user = connection.transport.get_username()
        limits = self.limits
        with self._lock:
            mine = sum(1 for c in self._connections for s in c.slots.values()
                       if s.username == user)
            if self._slots_open >= limits.max_sessions:
                refusal = f"{self._slots_open} sessions are open, the limit (--max-sessions)"
            elif mine >= limits.max_sessions_per_user:
                refusal = (f"user {user} has {mine} sessions open, the limit "
                           "(--max-sessions-per-user)")
            else:
                refusal = None
                connection.slots[chanid] = _Slot(user, idle_since=time.monotonic())
                connection.unused_since = None
                self._slots_open += 1
        if refusal:
            log.warning("session refused to user %s from %s: %s", user, connection.peer,
                        refusal)
            return paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
        threading.Thread(target=self._start_session, args=(connection,),
                         name="ssh-session-start", daemon=True).start()
        return paramiko.OPEN_SUCCEEDED

    def _start_session(self, connection: SshConnection) -> None:
        channel = connection.transport.accept(timeout=self.limits.login_grace_time)
        if channel is None:  # the connection ended before the channel came
            return
        try:
            session = self._open_session(channel)
        except Exception:
            log.exception("session of user %s from %s could not start",
                          connection.transport.get_username(), connection.peer)
            channel.close()
            self.session_ended(channel)
            return
        with self._lock:
            slot = connection.slots.get(channel.get_id())
            if slot is not None:
                slot.session = session

    def session_ended(self, channel: paramiko.Channel) -> None:
        """A session is over: its channel no longer counts (called more than once is fine)."""
        transport = channel.get_transport()
        with self._lock:
            for connection in self._connections:
                if connection.transport is transport:
                    if connection.slots.pop(channel.get_id(), None) is not None:
                        self._slots_open -= 1
                        if not connection.slots:
                            connection.unused_since = time.monotonic()
                    return

    # -- time limits -------------------------------------------------------------------
    def _housekeeping(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self._enforce(time.monotonic())
            except Exception:  # a bug here must not end the enforcement of every limit
                log.exception("enforcing the SSH limits failed")

    def _enforce(self, now: float) -> None:
        grace, idle = self.limits.login_grace_time, self.limits.idle_timeout
        ended: list[SshConnection] = []
        overdue: list[SshConnection] = []
        in_session: list[tuple[SshConnection, _Slot]] = []
        with self._lock:
            for connection in self._connections:
                if not connection.transport.is_active():
                    ended.append(connection)
                elif connection.unused_since is not None:
                    if now - connection.unused_since >= grace and not connection.reported:
                        connection.reported = True
                        overdue.append(connection)
                elif idle:
                    in_session.extend((connection, slot) for slot in connection.slots.values()
                                      if slot.session is not None)
            for connection in ended:
                self._connections.remove(connection)
                self._slots_open -= len(connection.slots)
                connection.slots.clear()
        # Sessions are asked outside the lock: answering may take locks of their own.
        idle_sessions = []
        for connection, slot in in_session:
            activity = self._activity(slot.session)
            if activity is None or activity != slot.activity:
                slot.activity, slot.idle_since = activity, now
            elif now - slot.idle_since >= idle:
                slot.idle_since = now  # closing takes a moment; once is enough
                idle_sessions.append((connection, slot))
        for connection in ended:
            self._report_end(connection)
        for connection in overdue:
            user = connection.user
            if user is None:
                log.warning("SSH connection from %s closed: not logged in within %g s "
                            "(--login-grace-time)", connection.peer, grace)
            else:
                log.warning("SSH connection of user %s from %s closed: no NETCONF session "
                            "open for %g s (--login-grace-time)", user, connection.peer, grace)
            connection.close()
        for connection, slot in idle_sessions:
            log.warning("session of user %s from %s closed: idle for %g s (--idle-timeout)",
                        slot.username, connection.peer, idle)
            # Closing sends on the channel, which may wait for a slow client: not here.
            threading.Thread(target=self._close_idle, args=(connection, slot.session),
                             name="ssh-idle-close", daemon=True).start()

    def _close_idle(self, connection: SshConnection, session: object) -> None:
        try:
            self._close_session(session)
        except Exception as exc:
            log.info("closing the idle session of %s: %s", connection.peer, exc)

    def _report_end(self, connection: SshConnection) -> None:
        """Log, once, how a connection ended that nobody here closed."""
        if connection.reported:
            return
        connection.reported = True
        exc = connection.transport.get_exception()
        if connection.user is not None:
            if isinstance(exc, paramiko.SSHException):  # a protocol violation, not an end
                log.warning("SSH connection of user %s from %s closed: %s", connection.user,
                            connection.peer, _describe(exc))
            else:
                log.debug("SSH connection of user %s from %s ended", connection.user,
                          connection.peer)
            return
        log.info("SSH connection from %s ended before login: %s", connection.peer,
                 _describe(exc))

    # -- the end -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting, and close every connection."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake_w.send(b"!")
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()
        self._wake_w.close()
        self._wake_r.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.reported = True
            connection.close()


def _eviction_victim(waiting: Iterable[SshConnection]) -> SshConnection | None:
    """The oldest connection of the source address holding the most of ``waiting``."""
    by_source: dict[str, list[SshConnection]] = {}
    for connection in waiting:
        by_source.setdefault(connection.source, []).append(connection)
    if not by_source:
        return None
    crowded = max(by_source.values(), key=len)
    return min(crowded, key=lambda c: c.unused_since or c.opened)


def _describe(exc: BaseException | None) -> str:
    """What a failed handshake's exception means, in a few words."""
    # paramiko wraps a failure to read the client's identification line; what happened
    # underneath is the exception it was raised from.
    while exc is not None and str(exc).startswith("Error reading SSH protocol banner") \
            and exc.__context__ is not None:
        exc = exc.__context__
    if exc is None or isinstance(exc, EOFError):
        return "the client closed the connection"
    if isinstance(exc, TimeoutError):
        return "no SSH identification from the client in time"
    text = str(exc).strip()
    if isinstance(exc, paramiko.IncompatiblePeer):
        return f"no algorithm in common ({text})"
    return text or type(exc).__name__


__all__ = ["CIPHERS", "HOST_KEY_ALGORITHMS", "KEX", "MACS", "SshConnection", "SshLimits",
           "SshServer", "load_or_create_host_keys", "server_algorithms"]
