"""The SSH transport against hostile and careless clients: connections held open without
logging in, sessions beyond the limits, idle sessions, weak algorithms, scans.

Every test runs a real `nfmig serve` and real clients (paramiko, ncclient, OpenSSH's ssh).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from ncclient import manager
from nfmig.client.local import LocalServer, start_local_server
from nfmig.server.ssh_server import (
    CIPHERS,
    HOST_KEY_ALGORITHMS,
    KEX,
    MACS,
    load_or_create_host_keys,
)

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
# A NETCONF 1.0 client's whole conversation: hello, then close-session.
HELLO_AND_CLOSE = (
    f'<?xml version="1.0" encoding="UTF-8"?><hello xmlns="{NC}"><capabilities><capability>'
    f"urn:ietf:params:netconf:base:1.0</capability></capabilities></hello>]]>]]>"
    f'<rpc message-id="1" xmlns="{NC}"><close-session/></rpc>]]>]]>')

SSH = shutil.which("ssh")
# ncclient tries every key class on a key file, DSA's too.
pytestmark = pytest.mark.filterwarnings("ignore:DSA is deprecated")


def _require(tool: str) -> str:
    """The path of an OpenSSH client tool; without it the test is skipped, or fails in CI."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} (OpenSSH client) is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _require_ssh() -> None:
    _require("ssh")


# -- servers and clients ---------------------------------------------------------------

class UserKey:
    def __init__(self, directory: Path, name: str):
        private = ed25519.Ed25519PrivateKey.generate()
        self.path = directory / f"id_{name}"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
        self.public = directory / f"id_{name}.pub"
        self.public.write_bytes(private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        self.pkey = paramiko.Ed25519Key.from_private_key_file(str(self.path))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, UserKey]:
    """Users alice and bob, who log in with Ed25519 keys: their logins take no password
    hashing time, so what is timed is the transport."""
    directory = tmp_path_factory.mktemp("keys")
    made = {name: UserKey(directory, name) for name in ("alice", "bob")}
    users = directory / "users"
    for name, key in made.items():
        subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users), name,
                        "--key", str(key.public)], check=True, capture_output=True)
    return made


def _serve(tmp_path_factory, keys: dict[str, UserKey], *args: str) -> Iterator[LocalServer]:
    workdir = tmp_path_factory.mktemp("ssh")
    # start_local_server appends its admin user to this file.
    shutil.copy(keys["alice"].public.parent / "users", workdir / "users")
    server = start_local_server(workdir, *args)
    try:
        yield server
    finally:
        server.stop()
        assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, keys):
    """A server with the default limits but a long grace time: the connections held open
    in the first test must outlast setting them up on a slow machine."""
    yield from _serve(tmp_path_factory, keys, "--login-grace-time", "300")


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory, keys):
    yield from _serve(tmp_path_factory, keys, "--login-grace-time", "2", "--idle-timeout", "3")


@pytest.fixture(scope="module")
def limited(tmp_path_factory, keys):
    yield from _serve(tmp_path_factory, keys, "--max-startups", "20", "--max-sessions", "3",
                      "--max-sessions-per-user", "2")


def login(server: LocalServer, key: UserKey | None = None, user: str = "alice",
          timeout: float = 60) -> manager.Manager:
    """A NETCONF session by ncclient: by key, or as admin by password when key is None."""
    if key is None:
        return manager.connect(host="127.0.0.1", port=server.port, username=server.user,
                               password=server.password, hostkey_verify=False,
                               allow_agent=False, look_for_keys=False, timeout=timeout)
    return manager.connect(host="127.0.0.1", port=server.port, username=user,
                           key_filename=str(key.path), hostkey_verify=False,
                           allow_agent=False, look_for_keys=False, timeout=timeout)


def timed_login(server: LocalServer, key: UserKey | None = None) -> float:
    """Seconds from connecting to a NETCONF session established (hello exchanged)."""
    started = time.perf_counter()
    session = login(server, key)
    elapsed = time.perf_counter() - started
    session.close_session()
    return elapsed


def silent(server: LocalServer) -> socket.socket:
    """A TCP connection that never says anything."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def handshaken(server: LocalServer, **restrict: tuple[str, ...]) -> paramiko.Transport:
    """An SSH connection through key exchange, not logged in; ``restrict`` sets the
    client's algorithm lists (kex, ciphers, digests, key_types)."""
    transport = paramiko.Transport(silent(server))
    options = transport.get_security_options()
    for name, algorithms in restrict.items():
        setattr(options, name, algorithms)
    transport.start_client(timeout=30)
    return transport


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (reading whatever it had sent before)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def log_size(server: LocalServer) -> int:
    return server.log.stat().st_size


def lines_about(server: LocalServer, port: int, since: int) -> list[str]:
    """The server's log lines about the client connection from local ``port``, logged after
    the log had ``since`` bytes (a client port number is used again later)."""
    with open(server.log, "rb") as f:
        f.seek(since)
        text = f.read().decode()
    return [line for line in text.splitlines() if re.search(rf"\bport {port}\b", line)]


def ssh(server: LocalServer, *options: str, key: UserKey | None = None, user: str = "alice",
        send: str = HELLO_AND_CLOSE, verbose: bool = False) -> subprocess.CompletedProcess:
    """OpenSSH's ssh to the netconf subsystem, with no configuration but ``options``."""
    command = [SSH, "-F", "/dev/null", "-p", str(server.port), "-o", "BatchMode=yes",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null",
               "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=30",
               "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no",
               "-o", "KbdInteractiveAuthentication=no"]
    if verbose:
        command.append("-v")
    if key is not None:
        command += ["-i", str(key.path)]
    for option in options:
        command += ["-o", option]
    command += ["-s", f"{user}@127.0.0.1", "netconf"]
    return subprocess.run(command, input=send, capture_output=True, text=True, timeout=60)


# -- the accept loop under attack ------------------------------------------------------

def test_login_is_quick_while_300_connections_are_held_without_logging_in(plain, keys):
    before = [timed_login(plain, keys["alice"]) for _ in range(2)]
    quiet = [silent(plain) for _ in range(200)]
    started = time.perf_counter()
    unauthenticated = [handshaken(plain) for _ in range(100)]
    handshakes = time.perf_counter() - started
    try:
        by_key = [timed_login(plain, keys["alice"]) for _ in range(3)]
        by_password = timed_login(plain)
        # The attack was in force all along: the server dropped none of it.
        assert not any(closed_by_server(s) for s in quiet)
        assert all(t.is_active() and not t.is_authenticated() for t in unauthenticated)
    finally:
        for transport in unauthenticated:
            transport.close()
        for sock in quiet:
            sock.close()
    print(f"\nlogin (key) without attack: {statistics.median(before):.3f} s; with 200 silent "
          f"TCP and 100 unauthenticated SSH connections held: "
          f"{', '.join(f'{t:.3f}' for t in by_key)} s (by password {by_password:.3f} s); "
          f"100 handshakes took {handshakes:.1f} s")
    assert max(by_key) < 1.0
    assert by_password < 10  # password hashing is deliberately slow; it must still work


def test_connection_not_logged_in_within_the_grace_time_is_closed(timeouts, keys):
    since = log_size(timeouts)
    connected = {}
    quiet = silent(timeouts)
    connected["quiet"] = time.monotonic()
    unauthenticated = handshaken(timeouts)
    connected["unauthenticated"] = time.monotonic()
    logged_in = handshaken(timeouts)
    connected["logged in"] = time.monotonic()
    logged_in.auth_publickey("alice", keys["alice"].pkey)  # but no NETCONF session
    expected = ((quiet.getsockname()[1], "not logged in within 2 s"),
                (unauthenticated.sock.getsockname()[1], "not logged in within 2 s"),
                (logged_in.sock.getsockname()[1], "no NETCONF session open for 2 s"))
    is_closed = {"quiet": lambda: closed_by_server(quiet),
                 "unauthenticated": lambda: not unauthenticated.is_active(),
                 "logged in": lambda: not logged_in.is_active()}
    lasted = {}
    try:
        deadline = time.monotonic() + 30
        while len(lasted) < 3 and time.monotonic() < deadline:
            for name, closed in is_closed.items():
                if name not in lasted and closed():
                    lasted[name] = time.monotonic() - connected[name]
            time.sleep(0.02)
    finally:
        quiet.close()
        unauthenticated.close()
        logged_in.close()
    # Closed by the server after --login-grace-time 2 (it counts from its accept, a little
    # after the client's connect), and not much later.
    assert len(lasted) == 3 and all(1.9 < t < 20 for t in lasted.values()), lasted
    for port, reason in expected:
        assert wait_until(lambda port=port: lines_about(timeouts, port, since), timeout=5)
        lines = lines_about(timeouts, port, since)
        assert len(lines) == 1 and reason in lines[0] and "127.0.0.1" in lines[0], lines


def test_beyond_max_startups_the_oldest_waiting_connection_is_closed(limited, keys):
    since = log_size(limited)
    quiet = [silent(limited) for _ in range(30)]
    try:
        # --max-startups 20: each connection past the 20th closes the oldest one.
        assert wait_until(lambda: all(closed_by_server(s) for s in quiet[:10]), timeout=20)
        session = login(limited, keys["alice"])
        session.close_session()
        assert wait_until(lambda: closed_by_server(quiet[10]), timeout=20)
        assert not any(closed_by_server(s) for s in quiet[11:])
        for sock in quiet[:11]:
            lines = lines_about(limited, sock.getsockname()[1], since)
            assert len(lines) == 1 and "--max-startups" in lines[0], lines
    finally:
        for sock in quiet:
            sock.close()


# -- sessions --------------------------------------------------------------------------

def test_sessions_beyond_the_limits_are_refused_with_the_reason(limited, keys):
    _require_ssh()
    alice = [login(limited, keys["alice"]) for _ in range(2)]
    bob = []
    try:
        with pytest.raises(paramiko.ChannelException, match="Resource shortage"):
            login(limited, keys["alice"])  # --max-sessions-per-user 2
        bob.append(login(limited, keys["bob"], user="bob"))
        with pytest.raises(paramiko.ChannelException, match="Resource shortage"):
            login(limited, keys["bob"], user="bob")  # --max-sessions 3
        refused = ssh(limited, key=keys["bob"], user="bob")
        assert refused.returncode == 255
        assert "open failed: resource shortage" in refused.stderr
        log = limited.log.read_text()
        assert "user alice has 2 sessions open, the limit (--max-sessions-per-user)" in log
        assert "3 sessions are open, the limit (--max-sessions)" in log
        # A session that ends makes room.
        alice.pop().close_session()
        assert wait_until(lambda: _can_log_in(limited, keys["bob"], "bob"), timeout=20)
    finally:
        for session in alice + bob:
            session.close_session()


def _can_log_in(server: LocalServer, key: UserKey, user: str) -> bool:
    try:
        login(server, key, user=user).close_session()
        return True
    except paramiko.ChannelException:
        return False


def test_idle_session_is_closed_and_busy_or_subscribed_ones_are_not(timeouts, keys):
    idle = login(timeouts, keys["alice"])
    started = time.monotonic()
    busy = login(timeouts, keys["alice"])
    subscribed = login(timeouts, keys["bob"], user="bob")
    try:
        subscribed.create_subscription()
        # --idle-timeout 3: the idle one goes; the one asking every 0.3 s stays.
        while idle.connected and time.monotonic() - started < 30:
            busy.get_config(source="running")
            time.sleep(0.3)
        took = time.monotonic() - started
        assert not idle.connected
        assert took > 2.5  # not before its time (3 s, counted from a little before started)
        assert busy.connected and subscribed.connected
        assert "idle for 3 s (--idle-timeout)" in timeouts.log.read_text()
    finally:
        for session in (busy, subscribed):
            if session.connected:
                session.close_session()


# -- algorithms and host keys ----------------------------------------------------------

WEAK = [("KexAlgorithms", "kex", "diffie-hellman-group1-sha1"),
        ("KexAlgorithms", "kex", "diffie-hellman-group14-sha1"),
        ("KexAlgorithms", "kex", "diffie-hellman-group-exchange-sha1"),
        ("Ciphers", "ciphers", "aes128-cbc"),
        ("Ciphers", "ciphers", "3des-cbc"),
        ("MACs", "digests", "hmac-sha1"),
        ("MACs", "digests", "hmac-md5"),
        ("HostKeyAlgorithms", "key_types", "ssh-rsa"),
        ("HostKeyAlgorithms", "key_types", "ssh-dss")]
OPENSSH_REFUSAL = {"KexAlgorithms": "no matching key exchange method found",
                   "Ciphers": "no matching cipher found",
                   "MACs": "no matching MAC found",
                   "HostKeyAlgorithms": "no matching host key type found"}


@pytest.mark.parametrize(("option", "paramiko_name", "algorithm"), WEAK,
                         ids=[w[2] for w in WEAK])
def test_weak_algorithm_is_refused(plain, keys, option, paramiko_name, algorithm):
    _require_ssh()
    # A MAC is only negotiated with a cipher that needs one.
    extra = ("Ciphers=aes128-ctr",) if option == "MACs" else ()
    refused = ssh(plain, f"{option}={algorithm}", *extra, key=keys["alice"])
    assert refused.returncode == 255
    assert OPENSSH_REFUSAL[option] in refused.stderr, refused.stderr
    offer = re.search(r"Their offer: (\S+)", refused.stderr).group(1).split(",")
    assert algorithm not in offer
    restrict = {paramiko_name: (algorithm,)}
    if paramiko_name == "digests":
        restrict["ciphers"] = ("aes128-ctr",)
    with pytest.raises(paramiko.SSHException):
        handshaken(plain, **restrict).close()


def test_only_modern_algorithms_are_offered(plain, keys):
    _require_ssh()
    offers = {}
    for option, wanted in (("KexAlgorithms", "sntrup761x25519-sha512@openssh.com"),
                           ("Ciphers", "aes128-cbc"), ("MACs", "hmac-sha1"),
                           ("HostKeyAlgorithms", "ssh-dss")):
        extra = ("Ciphers=aes128-ctr",) if option == "MACs" else ()
        stderr = ssh(plain, f"{option}={wanted}", *extra, key=keys["alice"]).stderr
        offers[option] = re.search(r"Their offer: (\S+)", stderr).group(1).split(",")
    # Of the modern algorithms, those paramiko has; group exchange only with the system's
    # primes (paramiko finds them in either file).
    known = paramiko.Transport(socket.socket()).get_security_options()
    primes = any(Path(f).exists() for f in ("/etc/ssh/moduli", "/usr/local/etc/moduli"))
    assert offers["KexAlgorithms"] == [
        k for k in KEX if k in known.kex and (primes or "group-exchange" not in k)
    ] + ["kex-strict-s-v00@openssh.com"]  # the marker of strict key exchange
    assert offers["KexAlgorithms"][0] == "curve25519-sha256@libssh.org"
    assert offers["Ciphers"] == [c for c in CIPHERS if c in known.ciphers]
    assert {"aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr",
            "aes128-ctr"} <= set(offers["Ciphers"])
    assert offers["MACs"] == list(MACS)
    assert offers["HostKeyAlgorithms"] == ["ssh-ed25519", "ecdsa-sha2-nistp256",
                                           "rsa-sha2-512", "rsa-sha2-256"]
    assert set(offers["HostKeyAlgorithms"]) <= set(HOST_KEY_ALGORITHMS)


HOST_KEYS = {"ssh-ed25519": "ssh_host_ed25519_key", "ecdsa-sha2-nistp256": "ssh_host_ecdsa_key",
             "rsa-sha2-512": "ssh_host_rsa_key", "rsa-sha2-256": "ssh_host_rsa_key"}


@pytest.mark.parametrize("algorithm", list(HOST_KEYS))
def test_each_host_key_serves_a_client_that_wants_only_it(plain, keys, algorithm):
    _require_ssh()
    key = paramiko.PKey.from_path(plain.state_dir / HOST_KEYS[algorithm])
    done = ssh(plain, f"HostKeyAlgorithms={algorithm}", key=keys["alice"], verbose=True)
    assert "<ok/>" in done.stdout, done.stderr
    assert f"kex: host key algorithm: {algorithm}" in done.stderr
    assert f"Server host key: {key.get_name()} {key.fingerprint}" in done.stderr
    transport = handshaken(plain, key_types=(algorithm,))
    try:
        assert transport.host_key_type == algorithm
        assert transport.get_remote_server_key() == key
        transport.auth_publickey("alice", keys["alice"].pkey)
        assert transport.is_authenticated()
    finally:
        transport.close()


def test_host_keys_are_made_once_and_an_existing_ecdsa_key_is_kept(tmp_path):
    old = paramiko.ECDSAKey.generate(bits=256)
    old.write_private_key_file(str(tmp_path / "ssh_host_ecdsa_key"))  # the earlier format
    (tmp_path / "ssh_host_ecdsa_key").chmod(0o644)
    made = load_or_create_host_keys(tmp_path)
    assert [k.get_name() for k in made] == ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]
    assert made[1] == old
    assert made[2].get_bits() >= 3072
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ssh_host_ecdsa_key", "ssh_host_ed25519_key", "ssh_host_rsa_key"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())
    assert load_or_create_host_keys(tmp_path) == made


# -- logs ------------------------------------------------------------------------------

def test_scans_are_logged_once_per_connection_without_tracebacks(plain):
    since = log_size(plain)
    ports = []
    for _ in range(5):  # a port scan: connect, close
        sock = silent(plain)
        ports.append(sock.getsockname()[1])
        sock.close()
    http = silent(plain)  # the wrong protocol
    ports.append(http.getsockname()[1])
    http.sendall(b"GET / HTTP/1.0\r\n\r\n")
    time.sleep(0.2)
    http.close()
    found = subprocess.run([_require("ssh-keyscan"), "-p", str(plain.port),
                            "-t", "ed25519,ecdsa,rsa", "127.0.0.1"],
                           capture_output=True, text=True, timeout=60)
    assert len(found.stdout.splitlines()) == 3, found  # one line per host key
    for port in ports:
        assert wait_until(lambda port=port: lines_about(plain, port, since), timeout=10)
        lines = lines_about(plain, port, since)
        assert len(lines) == 1 and "ended before login" in lines[0], lines
    log = plain.log.read_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
