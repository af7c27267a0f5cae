"""Users file and SSH authentication: hashed passwords (scrypt) and public keys.

The file has one line per credential::

    NAME password scrypt$131072$8$1$SALT$HASH
    NAME key ssh-ed25519 AAAA... [comment]
    NAME group GROUP                    (NACM groups, one line each; see nacm.py)

It is written with mode 0600 and holds no clear-text password. A hash names its own scrypt
parameters (N, r, p), so hashes written with older, cheaper parameters keep verifying.

Login throttling, the worker pool that runs the hashes and the per-connection attempt cap
live in login_guard.py; :class:`SshAuthenticator` is the SSH side of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import paramiko
from paramiko.common import DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, cMSG_DISCONNECT

if TYPE_CHECKING:
    from .login_guard import Logins

log = logging.getLogger(__name__)

# Current guidance for scrypt (OWASP's password storage cheat sheet): N = 2^17, r = 8, p = 1,
# i.e. 128 MiB and a few hundred milliseconds per hash.
DEFAULT_LOG2_N = 17
_R, _P = 8, 1
# Bounds on the parameters a users file may name: a hash line is trusted input, but a typo
# must not make every login allocate gigabytes.
MIN_LOG2_N, MAX_LOG2_N = 10, 20
_MAX_R, _MAX_P = 32, 16
_MAX_MEMORY = 1 << 30


class ScryptParams(NamedTuple):
    n: int
    r: int
    p: int

    @property
    def work(self) -> int:
        """Relative cost of one hash (time and memory grow with N * r, time with p)."""
        return self.n * self.r * self.p

    @property
    def maxmem(self) -> int:
        """The memory bound hashlib.scrypt must be given: OpenSSL refuses more than 32 MiB
        unless told, and needs 128 * r * (N + 2) bytes for V plus 128 * r * p for B."""
        return 128 * self.r * (self.n + 2) + 128 * self.r * self.p + 65536

    def __str__(self) -> str:
        return f"N=2^{self.n.bit_length() - 1}, r={self.r}, p={self.p}"


DEFAULT_PARAMS = ScryptParams(1 << DEFAULT_LOG2_N, _R, _P)


def _check_params(params: ScryptParams) -> ScryptParams:
    n, r, p = params
    if (n < 2 or n & (n - 1) or not MIN_LOG2_N <= n.bit_length() - 1 <= MAX_LOG2_N
            or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P or params.maxmem > _MAX_MEMORY):
        raise ValueError(f"scrypt parameters out of range: N={n} r={r} p={p}")
    return params


def hash_password(password: str, log2_n: int = DEFAULT_LOG2_N) -> str:
    """The users-file form of ``password``: scrypt with N = 2^``log2_n``, r = 8, p = 1.

    Lower ``log2_n`` only for secrets that need no stretching (a random 128-bit token a
    test generates); a password a person chose needs the default."""
    params = _check_params(ScryptParams(1 << log2_n, _R, _P))
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=params.n, r=params.r,
                            p=params.p, dklen=32, maxmem=params.maxmem)
    return "$".join(["scrypt", str(params.n), str(params.r), str(params.p),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


class _Parsed(NamedTuple):
    params: ScryptParams
    salt: bytes
    digest: bytes


def _parse_hash(stored: str) -> _Parsed:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown password hash scheme {scheme!r}")
    params = _check_params(ScryptParams(int(n), int(r), int(p)))
    raw_digest = base64.b64decode(digest, validate=True)
    if not 16 <= len(raw_digest) <= 64:
        raise ValueError("password hash of an unexpected length")
    return _Parsed(params, base64.b64decode(salt, validate=True), raw_digest)


def hash_params(stored: str) -> ScryptParams | None:
    """The scrypt parameters ``stored`` names, or None when it is not a usable hash."""
    try:
        return _parse_hash(stored).params
    except (ValueError, TypeError):
        return None


def verify_password(password: str, stored: str) -> bool:
    try:
        parsed = _parse_hash(stored)
    except (ValueError, TypeError):
        return False
    try:
        actual = hashlib.scrypt(password.encode(errors="surrogatepass"), salt=parsed.salt,
                                n=parsed.params.n, r=parsed.params.r, p=parsed.params.p,
                                dklen=len(parsed.digest), maxmem=parsed.params.maxmem)
    except (ValueError, MemoryError) as exc:  # OpenSSL could not allocate: a refusal
        log.error("password hash could not be computed: %s", exc)
        return False
    return hmac.compare_digest(actual, parsed.digest)


def dummy_hash(params: ScryptParams) -> str:
    """A hash no password matches, with ``params``: verifying a login for an unknown user
    against it costs what a known user's costs, so the time does not tell them apart. Random
    salt and digest: nothing has to be computed to make it."""
    return "$".join(["scrypt", str(params.n), str(params.r), str(params.p),
                     base64.b64encode(os.urandom(16)).decode(),
                     base64.b64encode(os.urandom(32)).decode()])


class UsersFileError(Exception):
    pass


@dataclass
class User:
    name: str
    password_hashes: list[str] = field(default_factory=list)
    keys: list[paramiko.PKey] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # NACM groups; none: see nacm.py


def _parse_key(key_type: str, blob: str) -> paramiko.PKey:
    data = base64.b64decode(blob)
    return paramiko.PKey.from_type_string(key_type, data)


def load_users(path: Path) -> dict[str, User]:
    path = Path(path)
    if not path.exists():
        raise UsersFileError(f"users file {path} does not exist (create it with "
                             "'nfmig adduser --users FILE NAME --password ...')")
    users: dict[str, User] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3 or parts[1] not in ("password", "key", "group"):
            raise UsersFileError(f"{path}:{number}: expected 'NAME password HASH', "
                                 "'NAME key TYPE BASE64' or 'NAME group GROUP'")
        user = users.setdefault(parts[0], User(parts[0]))
        if parts[1] == "group":
            if len(parts) != 3 or not valid_group(parts[2]):
                raise UsersFileError(f"{path}:{number}: a group line is 'NAME group GROUP', "
                                     "GROUP not starting with '*'")
            user.groups.append(parts[2])
        elif parts[1] == "password":
            # Found now rather than as a login that can never succeed.
            if hash_params(parts[2]) is None:
                raise UsersFileError(f"{path}:{number}: not a password hash nfmig can verify "
                                     "(scrypt$N$r$p$SALT$HASH within sane bounds)")
            user.password_hashes.append(parts[2])
        else:
            if len(parts) < 4:
                raise UsersFileError(f"{path}:{number}: key line needs TYPE and BASE64")
            try:
                user.keys.append(_parse_key(parts[2], parts[3]))
            except Exception as exc:  # paramiko raises several types for a bad key
                raise UsersFileError(f"{path}:{number}: unreadable public key: {exc}") from None
    if not users:
        raise UsersFileError(f"users file {path} has no users")
    return users


def valid_group(name: str) -> bool:
    """Whether ``name`` can be an NACM group (RFC 8341's group-name-type: not '*...')."""
    return bool(name) and not name.startswith("*") and not any(c.isspace() for c in name)


def add_user(path: Path, name: str, password: str | None = None,
             pubkey_file: Path | None = None, *, log2_n: int | None = None,
             groups: tuple[str, ...] | list[str] = ()) -> None:
    """Append a password (hashed with N = 2^``log2_n``, by default 2^17) or a public key
    for ``name``, and a line for each of ``groups`` (only those when neither is given)."""
    if not name or any(c.isspace() for c in name):
        raise UsersFileError(f"invalid user name {name!r}")
    bad = [g for g in groups if not valid_group(g)]
    if bad:
        raise UsersFileError(f"invalid group name {bad[0]!r}")
    line = ""
    if password is None and pubkey_file is None:
        if not groups:
            raise UsersFileError("give a password, a key or a group")
    elif password is not None:
        if not password:
            raise UsersFileError("empty password")
        try:
            stored = hash_password(password, DEFAULT_LOG2_N if log2_n is None else log2_n)
            line = f"{name} password {stored}"
        except ValueError as exc:
            raise UsersFileError(str(exc)) from None
    else:
        fields = Path(pubkey_file).read_text().split()
        if len(fields) < 2:
            raise UsersFileError(f"{pubkey_file}: not an OpenSSH public key")
        _parse_key(fields[0], fields[1])
        line = f"{name} key {' '.join(fields[:3])}"
    lines = [line] if line else []
    lines += [f"{name} group {g}" for g in groups]
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write("".join(f"{one}\n" for one in lines))


class _Connection:
    """What the authenticator keeps about one SSH connection while it authenticates."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures = 0


class SshAuthenticator(paramiko.ServerInterface):
    """paramiko's view of the users file, plus the netconf subsystem.

    One object serves every connection; paramiko calls it from each connection's own
    transport thread, which is why waiting out a throttling delay here stalls nobody else.
    That thread is also how a call is tied to its connection (source address, attempts)."""

    def __init__(self, users: dict[str, User], logins: Logins | None = None):
        from .login_guard import Logins
        from .login_policy import LoginPolicy

        self.users = users
        self.logins = logins if logins is not None else Logins(users, LoginPolicy())
        self._lock = threading.Lock()
        self._connections: weakref.WeakKeyDictionary[paramiko.Transport, _Connection] = \
            weakref.WeakKeyDictionary()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password"

    def check_auth_password(self, username: str, password: str | bytes) -> int:
        transport = _current_transport()
        if isinstance(password, bytes):  # not UTF-8: no stored password can match it
            password = password.decode("utf-8", "surrogateescape")
        outcome = self.logins.check_password(
            _peer(transport), username, password, "SSH password",
            alive=(lambda: transport.active) if transport is not None else None)
        if outcome.ok:
            return paramiko.AUTH_SUCCESSFUL
        self._count_failure(transport, username)
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        transport = _current_transport()
        outcome = self.logins.check_key(_peer(transport), username,
                                        self._key_matches(username, key), key.get_name())
        if outcome.ok:
            return paramiko.AUTH_SUCCESSFUL
        self._count_failure(transport, username)
        return paramiko.AUTH_FAILED

    def _key_matches(self, username: str, key: paramiko.PKey) -> bool:
        user = self.users.get(username)
        return bool(user) and any(k == key for k in user.keys)

    def _count_failure(self, transport: paramiko.Transport | None, username: str) -> None:
        """As SSH servers commonly do: after that many failed attempts on one connection
        the client is disconnected, so each new batch of guesses costs a new handshake."""
        if transport is None:
            return
        with self._lock:
            state = self._connections.setdefault(transport, _Connection())
            state.failures += 1
            failures = state.failures
        cap = self.logins.policy.max_auth_tries
        if cap and failures >= cap:
            log.warning("disconnecting %s (user %s) after %d failed authentication attempts "
                        "on one connection", _peer(transport), shown_name(username), failures)
            _disconnect(transport, "Too many authentication failures")

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel, name: str) -> bool:
        return name == "netconf"


def _current_transport() -> paramiko.Transport | None:
    """paramiko runs authentication in the connection's Transport thread."""
    thread = threading.current_thread()
    return thread if isinstance(thread, paramiko.Transport) else None


def _peer(transport: paramiko.Transport | None) -> str:
    if transport is None:
        return "unknown"
    try:
        return str(transport.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "unknown"


def shown_name(name: str) -> str:
    """A client-chosen user name as it may appear in a log line: quoted with its control
    characters escaped (no forged log lines), and bounded."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _disconnect(transport: paramiko.Transport, reason: str) -> None:
    """Send SSH_MSG_DISCONNECT and close. Called from the transport's own thread: the reply
    paramiko then tries to send finds the connection closed, which ends that thread the
    way a client hanging up does."""
    message = paramiko.Message()
    message.add_byte(cMSG_DISCONNECT)
    message.add_int(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE)
    message.add_string(reason)
    message.add_string("en")
    try:
        transport._send_message(message)
    except (OSError, EOFError):
        pass
    transport.close()
