"""Where a migration connects: `netconf://user@host:port` endpoints, credentials, host keys,
and one NETCONF connection per endpoint that counts the bytes it moves each way."""

from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

import paramiko
from ncclient import manager
from ncclient.operations import (
    CancelCommit,
    Commit,
    DiscardChanges,
    KillSession,
    Lock,
    Unlock,
    Validate,
)
from ncclient.operations.errors import MissingCapabilityError, TimeoutExpiredError
from ncclient.operations.rpc import RPC, RPCError, RPCReply
from ncclient.transport.errors import (
    AuthenticationError,
    SessionCloseError,
    SSHError,
    SSHUnknownHostError,
    TransportError,
)
from ncclient.xml_ import to_ele

from .netconf import (
    BulkEditConfig,
    BulkSSHSession,
    ExtendCommit,
    GetData,
    NatRpc,
    config_size,
    connect,
    take_entry_namespace,
)
from .relay import EditPipeline
from .streaming import ChunkReader

log = logging.getLogger(__name__)

DEFAULT_PORT = 830
_POLL = 0.05  # seconds between looks at the session while waiting for a reply
PASSWORD_ENV = "NFMIG_PASSWORD"
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


class EndpointError(Exception):
    """An endpoint cannot be used: bad address, unreachable, refused, or an unknown host key.
    The message says what to change."""


@dataclass(frozen=True)
class Endpoint:
    """One NF instance's NETCONF server."""

    host: str
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = field(default=None, compare=False, repr=False)
    scheme: str = "netconf"  # or restconf (HTTPS)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``netconf://user@host:port`` (port 830 when left out; IPv6 hosts in brackets), or
        ``restconf://user@host:port`` (HTTPS, port 443 when left out)."""
        if "://" not in text:
            raise EndpointError(f"{text!r}: write endpoints as netconf://user@host:port "
                                "or restconf://user@host:port")
        parts = urlsplit(text)
        if parts.scheme not in ("netconf", "restconf"):
            raise EndpointError(f"{text!r}: only netconf:// and restconf:// endpoints are "
                                "supported")
        if parts.password is not None:
            raise EndpointError(f"{text!r}: do not put a password in the endpoint; use "
                                f"{PASSWORD_ENV}, --password-file or the prompt")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise EndpointError(f"{text!r}: an endpoint has no path or query")
        try:
            port = parts.port or (DEFAULT_PORT if parts.scheme == "netconf" else 443)
        except ValueError:
            raise EndpointError(f"{text!r}: the port is not a number in 1..65535") from None
        if not parts.hostname:
            raise EndpointError(f"{text!r}: no host")
        return cls(parts.hostname, port, unquote(parts.username) if parts.username else None,
                   scheme=parts.scheme)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}://{user}{host}:{self.port}"


@dataclass
class Credentials:
    """How to authenticate to every endpoint of a migration.

    A password (from an endpoint, this object, a file or NFMIG_PASSWORD) is used alone, so
    an agent's keys never use up a server's authentication attempts. Without one, the SSH
    key file, the agent and the usual key files are tried, then ``prompt`` if it is set.
    """

    password: str | None = field(default=None, repr=False)
    key_file: Path | None = None
    known_hosts: Path | None = DEFAULT_KNOWN_HOSTS
    verify_host_keys: bool = True  # for restconf:// ends: verify the TLS certificate
    prompt: Callable[[Endpoint], str] | None = None
    ca_file: Path | None = None  # restconf:// ends: CA file (default: the system's)
    # SSH compression on netconf:// ends, gzip bodies on restconf:// ends, where the server
    # offers them: a session table shrinks about tenfold on the wire, for some CPU time at
    # both ends. None: for every end but those on this host (loopback), where no link
    # is spared and the CPU time is lost.
    compress: bool | None = None

    def compresses(self, endpoint: Endpoint) -> bool:
        """Whether to compress what is exchanged with ``endpoint``."""
        if self.compress is not None:
            return self.compress
        if endpoint.host.lower() == "localhost":
            return False
        try:
            return not ipaddress.ip_address(endpoint.host).is_loopback
        except ValueError:
            return True  # a name: a host elsewhere, as far as this side knows

    @classmethod
    def from_sources(cls, password_file: Path | None = None, interactive: bool = False,
                     **kwargs) -> Credentials:
        """The password from ``password_file`` (its first line), else NFMIG_PASSWORD, else a
        prompt on the terminal when ``interactive``."""
        password = None
        if password_file is not None:
            try:
                lines = Path(password_file).read_text().splitlines()
            except OSError as exc:
                raise EndpointError(f"cannot read the password file {password_file}: "
                                    f"{exc.strerror or exc}") from None
            password = lines[0] if lines else ""
            if not password:
                raise EndpointError(f"the password file {password_file} is empty")
        elif os.environ.get(PASSWORD_ENV):
            password = os.environ[PASSWORD_ENV]
        prompt = _ask_password if interactive and password is None else None
        return cls(password=password, prompt=prompt, **kwargs)


def _ask_password(endpoint: Endpoint) -> str:
    return getpass.getpass(f"password for {endpoint}: ")


class Connection:
    """A NETCONF session to one endpoint: each step of a migration as an ncclient operation
    (those ncclient lacks from client.netconf), waited for here (see _request).

    Counts the NETCONF bytes in each direction (the SSH layer's own overhead, a few
    percent, is not included), and what the connection carried (:meth:`wire_counts`)."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, timeout: float = 600,
                 connect_timeout: float = 30):
        self.endpoint = endpoint
        self.credentials = credentials
        self.timeout = timeout
        self.broken = False
        password = endpoint.password or credentials.password
        try:
            self.m = _connect(endpoint, credentials, password, connect_timeout)
        except AuthenticationError:
            if password is not None or credentials.prompt is None:
                raise EndpointError(f"{endpoint}: authentication failed"
                                    + ("" if password else " (no password given, and no SSH "
                                       "key was accepted)")) from None
            password = credentials.prompt(endpoint)
            try:
                self.m = _connect(endpoint, credentials, password, connect_timeout)
            except AuthenticationError:
                raise EndpointError(f"{endpoint}: authentication failed") from None
        self.password = password  # a reconnection after a failure must not prompt again
        self.m.timeout = timeout
        self.m.huge_tree = True
        self.session: BulkSSHSession = self.m._session
        self._wire: tuple[int, int] | None = None

    def reopen(self, connect_timeout: float = 10) -> Connection:
        """A new session to the same endpoint, authenticated as this one was."""
        return Connection(replace(self.endpoint, password=self.password), self.credentials,
                          self.timeout, connect_timeout)

    @property
    def bytes_sent(self) -> int:
        return self.session.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.session.bytes_received

    def wire_counts(self) -> tuple[int, int] | None:
        """(bytes sent, bytes received) on this session's TCP connection (SSH packets,
        compressed and encrypted) until now, or until it was closed; None if not known."""
        counts = self.session.wire_counts()
        if counts is not None:
            self._wire = counts
        return self._wire

    @property
    def compression(self) -> str | None:
        return self.session.compression

    @property
    def capabilities(self) -> list[str]:
        return list(self.m.server_capabilities)

    @property
    def connected(self) -> bool:
        return self.m.connected and not self.broken

    @property
    def reader(self) -> ChunkReader | None:
        """What takes a reply as it arrives (a :base:1.1 session), or None."""
        return self.session.reader

    def pipeline(self, target: str = "candidate") -> EditPipeline:
        """Edit-configs of blocks of entries into ``target``, each sent without waiting for
        the replies to those before (see client.relay)."""
        return EditPipeline(self.m, BulkEditConfig, target, self.timeout)

    @property
    def session_id(self) -> str | None:
        """The server's id of this NETCONF session (for kill-session)."""
        return self.m.session_id

    def _call(self, operation: type[RPC], *args, **kwargs) -> RPCReply:
        """``operation(...).request(*args, **kwargs)``; its reply. Raises ncclient's
        RPCError for an rpc-error in it (with all of them when there are several)."""
        if not self.connected:
            raise TransportError(f"{self.endpoint}: not connected")
        try:
            return self._request(operation, args, kwargs)
        except (RPCError, MissingCapabilityError):
            raise
        except Exception:
            self.broken = True  # once anything but an answer came back, the session is done
            raise

    def _request(self, operation: type[RPC], args: tuple, kwargs: dict) -> RPCReply:
        # ncclient reports a lost transport only to the requests waiting at that moment; a
        # request sent just after would wait out the whole timeout. So wait in short steps
        # and give up as soon as the session is gone.
        session = self.session
        request = operation(session, self.m._device_handler, async_mode=True,
                            timeout=self.timeout, huge_tree=True)
        request.request(*args, **kwargs)
        deadline = time.monotonic() + self.timeout
        while not request.event.wait(_POLL):
            if not session.connected or not session.is_alive():
                raise TransportError("the connection was lost")
            if time.monotonic() > deadline:
                raise TimeoutExpiredError(f"no reply within {self.timeout} s")
        if request.error is not None:
            raise request.error
        reply = request.reply
        reply.parse()
        if reply.error is not None:
            errors = reply.errors
            raise RPCError(to_ele(reply.xml), errs=errors) if len(errors) > 1 else reply.error
        return reply

    def get_data(self, datastore: str, filter_xml: str = "") -> str:
        """RFC 8526 get-data; the content of <data> as text."""
        return data_of(self._call(GetData, datastore, filter_xml).xml)

    def edit_config(self, body: str, target: str = "candidate") -> int:
        """edit-config (merge) of top-level nodes given as text; returns the size of its
        <config>. (A target need not implement RFC 8526 edit-data.)"""
        config = take_entry_namespace(body.encode())
        self._call(BulkEditConfig, config, target)
        return config_size(config, BulkEditConfig)

    def lock(self, datastore: str) -> None:
        self._call(Lock, datastore)

    def unlock(self, datastore: str) -> None:
        self._call(Unlock, datastore)

    def validate(self, source: str = "candidate") -> None:
        self._call(Validate, source)

    def commit(self, confirmed: bool = False, timeout: int | None = None,
               persist: str | None = None, persist_id: str | None = None) -> None:
        """A commit, confirmed within ``timeout`` seconds when ``confirmed``; ``persist``
        names a confirmed commit any session may confirm or extend with ``persist_id``."""
        confirm_timeout = None if timeout is None else str(timeout)
        if confirmed and persist and persist_id:
            self._call(ExtendCommit, confirm_timeout, persist, persist_id)
        else:
            self._call(Commit, confirmed, confirm_timeout, persist, persist_id)

    def cancel_commit(self, persist_id: str | None = None) -> None:
        self._call(CancelCommit, persist_id)

    def discard_changes(self) -> None:
        self._call(DiscardChanges)

    def kill_session(self, session_id: str) -> None:
        self._call(KillSession, session_id)

    def nat_rpc(self, name: str, **leaves: str | int | list[str] | None) -> None:
        """One of the model's own operations (freeze, thaw, announce-migration)."""
        self._call(NatRpc, name, nat_rpc_input(**leaves))

    def nat_rpc_output(self, name: str, **leaves: str | int | list[str] | None) -> str:
        """One of the model's operations that answers with output: its children as text."""
        reply = self._call(NatRpc, name, nat_rpc_input(**leaves)).xml
        start = reply.find(">", reply.find("<rpc-reply")) + 1
        end = reply.rfind("</rpc-reply>")
        inner = reply[start:end] if 0 < start < end else ""
        return "" if inner.strip() in ("<ok/>", "") else inner

    def cut(self) -> None:
        """Drop the transport without a goodbye, as a broken network would."""
        sock = getattr(self.session.transport, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.wire_counts()  # the socket may be gone once the session is closed
        try:
            if self.connected:
                self.m.close_session()
                self.wire_counts()
                return
        except Exception:  # closing a broken session must not hide why it broke
            log.debug("%s: close-session failed", self.endpoint, exc_info=True)
        try:
            self.session.close()  # ends ncclient's and paramiko's threads
        except Exception:
            log.debug("%s: close failed", self.endpoint, exc_info=True)


def open_connection(endpoint: Endpoint, credentials: Credentials, timeout: float = 600,
                    connect_timeout: float = 30) -> Connection:
    """A connection of the endpoint's protocol: a RestconfConnection (which has the same
    methods) for a restconf:// end. The RESTCONF client, and the HTTP library under it, are
    loaded only for such an end: a NETCONF migration starts without them."""
    if endpoint.scheme == "restconf":
        from .restconf import RestconfConnection

        return RestconfConnection(endpoint, credentials, timeout, connect_timeout)
    return Connection(endpoint, credentials, timeout, connect_timeout)


def _connect(endpoint: Endpoint, credentials: Credentials, password: str | None,
             timeout: float) -> manager.Manager:
    hostkey_b64 = None
    if credentials.verify_host_keys:
        hostkey_b64 = _known_host_key(endpoint, credentials.known_hosts or DEFAULT_KNOWN_HOSTS)
    key_file = str(credentials.key_file) if credentials.key_file else None
    try:
        return connect(
            host=endpoint.host, port=endpoint.port,
            username=endpoint.user or getpass.getuser(), password=password,
            key_filename=key_file, allow_agent=password is None,
            look_for_keys=password is None and key_file is None,
            hostkey_verify=credentials.verify_host_keys, hostkey_b64=hostkey_b64,
            timeout=timeout, compress=credentials.compresses(endpoint))
    except SSHUnknownHostError:
        raise EndpointError(
            f"{endpoint}: the server's host key does not match the one in "
            f"{credentials.known_hosts}; the server's key changed or someone is in the "
            "middle. Nothing was done") from None
    except AuthenticationError:
        raise
    except (SSHError, TransportError, OSError, paramiko.SSHException) as exc:
        raise EndpointError(f"{endpoint}: cannot connect: {describe(exc)}") from None


def _known_host_key(endpoint: Endpoint, known_hosts: Path) -> str:
    """The endpoint's host key from a known-hosts file, as base64 (ncclient then accepts
    that key only); the default location ncclient reads is not used, so the file given is
    the whole truth."""
    path = Path(known_hosts).expanduser()
    keys = paramiko.HostKeys()
    try:
        keys.load(str(path))
    except FileNotFoundError:
        pass
    except (OSError, paramiko.SSHException) as exc:
        raise EndpointError(f"cannot read the known-hosts file {path}: {exc}") from None
    names = [endpoint.host] if endpoint.port == 22 else [f"[{endpoint.host}]:{endpoint.port}"]
    for name in names:
        entry = keys.lookup(name)
        if entry:
            return next(iter(entry.values())).get_base64()
    raise EndpointError(
        f"{endpoint}: the host key of {names[0]} is not in {path}; add the server's host "
        "key to that file (or name another with --known-hosts), or pass "
        "--insecure-no-host-key-check to skip the check (tests only)")


def data_of(reply: str) -> str:
    """The content of a get-data reply's <data>, as text."""
    start = reply.find(">", reply.find("<data")) + 1
    end = reply.rfind("</data>")
    return reply[start:end] if start > 0 and end > start else ""


def describe(exc: BaseException) -> str:
    """One line about a NETCONF failure, for a person."""
    if isinstance(exc, RPCError):
        parts = [exc.message or exc.tag or "rpc-error"]
        if exc.path:
            parts.append(f"(at {exc.path.strip()})")
        if exc.tag and exc.tag not in (exc.message or ""):
            parts.insert(0, f"{exc.tag}:")
        return " ".join(parts)
    if isinstance(exc, SessionCloseError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutExpiredError):
        return "no reply in time"
    if isinstance(exc, EndpointError):
        return str(exc)
    if isinstance(exc, TransportError | SSHError | OSError):
        text = str(exc).strip()
        return f"connection lost: {text}" if text else "connection lost"
    if type(exc).__module__.startswith("nfmig."):
        return str(exc)  # our own errors are written for a person already
    return f"{type(exc).__name__}: {exc}"


def nat_rpc_input(**leaves: str | int | list[str] | None) -> str:
    """The input leaves of one of the model's operations as XML: None leaves out, a list
    repeats the leaf."""
    inner = []
    for leaf, value in leaves.items():
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            inner.append(f"<{leaf}>{escape(str(item))}</{leaf}>")
    return "".join(inner)
