"""Users file and SSH authentication: hashed passwords (scrypt) and public keys.

The file has one line per credential::

    NAME password scrypt$16384$8$1$SALT$HASH
    NAME key ssh-ed25519 AAAA... [comment]

It is written with mode 0600 and holds no clear-text password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

log = logging.getLogger(__name__)

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return "$".join(["scrypt", str(_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class UsersFileError(Exception):
    pass


@dataclass
class User:
    name: str
    password_hashes: list[str] = field(default_factory=list)
    keys: list[paramiko.PKey] = field(default_factory=list)


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
        if len(parts) < 3 or parts[1] not in ("password", "key"):
            raise UsersFileError(f"{path}:{number}: expected 'NAME password HASH' or "
                                 "'NAME key TYPE BASE64'")
        user = users.setdefault(parts[0], User(parts[0]))
        if parts[1] == "password":
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


def add_user(path: Path, name: str, password: str | None = None,
             pubkey_file: Path | None = None) -> None:
    if not name or any(c.isspace() for c in name):
        raise UsersFileError(f"invalid user name {name!r}")
    if password is not None:
        if not password:
            raise UsersFileError("empty password")
        line = f"{name} password {hash_password(password)}"
    else:
        fields = Path(pubkey_file).read_text().split()
        if len(fields) < 2:
            raise UsersFileError(f"{pubkey_file}: not an OpenSSH public key")
        _parse_key(fields[0], fields[1])
        line = f"{name} key {' '.join(fields[:3])}"
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


class SshAuthenticator(paramiko.ServerInterface):
    """paramiko's view of the users file, plus the netconf subsystem."""

    def __init__(self, users: dict[str, User]):
        self.users = users
        self._lock = threading.Lock()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password"

    def check_auth_password(self, username: str, password: str) -> int:
        user = self.users.get(username)
        if user and any(verify_password(password, h) for h in user.password_hashes):
            log.info("user %s authenticated by password", username)
            return paramiko.AUTH_SUCCESSFUL
        log.warning("password authentication failed for user %r", username)
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        user = self.users.get(username)
        if user and any(k == key for k in user.keys):
            log.info("user %s authenticated by public key", username)
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_subsystem_request(self, channel, name: str) -> bool:
        return name == "netconf"
