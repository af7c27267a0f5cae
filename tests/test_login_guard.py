"""Password guessing is slowed down, then locked out, per source address and per user, on
SSH and RESTCONF alike; unknown users cost what known ones do; a flood of logins does not
slow a legitimate client beyond a bound.

Real `nfmig serve` processes with short throttling settings, real clients (paramiko,
aiohttp). On loopback every 127.0.0.0/8 address reaches a server listening on 127.0.0.1,
so a client binding 127.0.0.x as its source is another source address to the server.
Each test uses source addresses and user names of its own: they share one server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import paramiko
import pytest
from nfmig.server.auth import User, add_user, hash_password
from nfmig.server.login_guard import Logins
from nfmig.server.login_policy import LoginPolicy

from .restconf_client import start_with_restconf

DELAY, MAX_DELAY, LOCK_AFTER, LOCKOUT, MAX_TRIES = 0.2, 1.6, 5, 4.0, 3
GUARDED = ("--login-delay", str(DELAY), "--login-max-delay", str(MAX_DELAY),
           "--login-lockout-after", str(LOCK_AFTER), "--login-lockout", str(LOCKOUT),
           "--max-auth-tries", str(MAX_TRIES))
USERS = ("ops", "ops2", "ops3", "victim", "bystander")
PASSWORD = "correct horse battery staple"  # the test users' password; hashed at 2^14


class Server:
    def __init__(self, workdir: Path, *args: str, cost: int = 14):
        workdir.mkdir(parents=True, exist_ok=True)
        for user in USERS:
            add_user(workdir / "users", user, password=PASSWORD, log2_n=cost)
        self.local, self.restconf_port = start_with_restconf(workdir, *args)
        self.port = self.local.port
        self.cert = self.local.state_dir / "restconf-cert.pem"

    def stop(self) -> None:
        self.local.stop()

    def log(self) -> str:
        return self.local.log.read_text()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("guarded"), *GUARDED)
    yield server
    server.stop()


# -- clients -------------------------------------------------------------------------------
def ssh_connect(port: int, source: str) -> paramiko.Transport:
    sock = socket.socket()
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=30)
    return transport


def ssh_try(transport: paramiko.Transport, user: str, password: str) -> tuple[str, float]:
    """ok, failed or closed, and how long the server took to answer."""
    started = time.perf_counter()
    try:
        transport.auth_password(user, password)
        result = "ok"
    except paramiko.AuthenticationException:
        result = "failed" if transport.is_active() else "closed"
    except (paramiko.SSHException, EOFError, OSError):
        result = "closed"
    return result, time.perf_counter() - started


def ssh_login(port: int, user: str, password: str, source: str) -> tuple[str, float]:
    transport = ssh_connect(port, source)
    try:
        return ssh_try(transport, user, password)
    finally:
        transport.close()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _restconf(server: Server, user: str, password: str, source: str,
                    path: str) -> tuple[int, float, dict]:
    tls = ssl.create_default_context(cafile=str(server.cert))
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=tls, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        async with session.get(f"https://127.0.0.1:{server.restconf_port}{path}",
                               headers=basic(user, password)) as reply:
            await reply.read()
            return reply.status, time.perf_counter() - started, dict(reply.headers)


def restconf_login(server: Server, user: str, password: str, source: str,
                   path: str = "/restconf/yang-library-version") -> tuple[int, float, dict]:
    return asyncio.run(_restconf(server, user, password, source, path))


def memory(pid: int) -> dict[str, int]:
    """Resident memory (VmRSS) and its peak (VmHWM) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) << 10
    return fields


def wait_out_lockout(since: float) -> None:
    time.sleep(max(0.0, since + LOCKOUT + 0.3 - time.monotonic()))


# -- guessing slows down, then is locked out, then recovers --------------------------------
def test_ssh_guessing_slows_down_then_locks_out_then_recovers(guarded):
    times = []
    for guess in range(LOCK_AFTER - 1):
        result, took = ssh_login(guarded.port, "ops", f"guess-{guess}", "127.0.0.3")
        assert result == "failed"
        times.append(took)
    with ThreadPoolExecutor(1) as pool:
        last = pool.submit(ssh_login, guarded.port, "ops", "guess-last", "127.0.0.3")
        time.sleep(0.3)  # the last guess now waits out its 1.6 s in its connection's thread
        result, took = ssh_login(guarded.port, "bystander", PASSWORD, "127.0.0.9")
        assert result == "ok" and took < 4 * DELAY, took  # another client is not held up
        assert not last.done()
        result, took = last.result()
    assert result == "failed"
    times.append(took)
    last_failure = time.monotonic()
    print("SSH wrong passwords answered after", [f"{t:.2f} s" for t in times])
    # Attempt k waits DELAY * 2^(k-2) before its password is checked (none for the first).
    assert times[3] >= 4 * DELAY and times[4] >= 8 * DELAY, times
    assert times[0] < 4 * DELAY and times[4] > times[0] + 1.0, times
    # Locked: even the right password is refused, and at once (no delay, no hash).
    result, took = ssh_login(guarded.port, "ops", PASSWORD, "127.0.0.3")
    assert result == "failed" and took < 1.0
    wait_out_lockout(last_failure)
    result, took = ssh_login(guarded.port, "ops", PASSWORD, "127.0.0.3")
    assert result == "ok" and took < 4 * DELAY, took  # and nothing left to wait out
    log = guarded.log()
    failed = [line for line in log.splitlines()
              if "login failed: user 'ops' from 127.0.0.3 (SSH password)" in line]
    assert len(failed) == LOCK_AFTER  # each failed login logged once, with source and user
    assert "address 127.0.0.3 and user 'ops' locked out" in failed[-1]
    assert "guess-" not in log and PASSWORD not in log  # never the password


def test_restconf_guessing_slows_down_then_locks_out_both_protocols(guarded):
    times = []
    for guess in range(LOCK_AFTER):
        status, took, _ = restconf_login(guarded, "ops2", f"guess-{guess}", "127.0.0.4")
        assert status == 401
        times.append(took)
    last_failure = time.monotonic()
    print("RESTCONF wrong passwords answered after", [f"{t:.2f} s" for t in times])
    assert times[3] >= 4 * DELAY and times[4] >= 8 * DELAY, times
    assert times[0] < 4 * DELAY and times[4] > times[0] + 1.0, times
    status, took, headers = restconf_login(guarded, "ops2", PASSWORD, "127.0.0.4")
    assert status == 429 and took < 1.0 and int(headers["Retry-After"]) >= 1
    # SSH and RESTCONF count together: the address is locked on SSH as well.
    assert ssh_login(guarded.port, "ops", PASSWORD, "127.0.0.4")[0] == "failed"
    wait_out_lockout(last_failure)
    status, took, _ = restconf_login(guarded, "ops2", PASSWORD, "127.0.0.4")
    assert status == 200 and took < 4 * DELAY, took
    failed = [line for line in guarded.log().splitlines()
              if "login failed: user 'ops2' from 127.0.0.4 (RESTCONF Basic)" in line]
    assert len(failed) == LOCK_AFTER


def test_ssh_connection_is_closed_after_max_auth_tries(guarded):
    transport = ssh_connect(guarded.port, "127.0.0.5")
    try:
        results = [ssh_try(transport, "ops3", f"wrong-{n}")[0] for n in range(MAX_TRIES)]
        assert results == ["failed"] * (MAX_TRIES - 1) + ["closed"]
        assert not transport.is_active()
    finally:
        transport.close()
    assert "disconnecting 127.0.0.5 (user 'ops3') after 3 failed authentication" in \
        guarded.log()


def test_lockout_of_one_address_and_user_spares_the_user_elsewhere(guarded):
    """Guessing victim's password from 127.0.0.2 locks that address out, and victim out
    for new addresses; victim from 127.0.0.6, where it logged in before, goes on as if
    nothing happened."""
    assert ssh_login(guarded.port, "victim", PASSWORD, "127.0.0.6")[0] == "ok"
    for guess in range(LOCK_AFTER):
        assert ssh_login(guarded.port, "victim", f"guess-{guess}", "127.0.0.2")[0] == "failed"
    result, took = ssh_login(guarded.port, "victim", PASSWORD, "127.0.0.6")
    assert result == "ok" and took < 4 * DELAY, took
    status, took, _ = restconf_login(guarded, "victim", PASSWORD, "127.0.0.6")
    assert status == 200 and took < 4 * DELAY, took
    # The attacking address is locked for every user, the victim for unknown addresses.
    assert ssh_login(guarded.port, "ops3", PASSWORD, "127.0.0.2")[0] == "failed"
    assert restconf_login(guarded, "victim", PASSWORD, "127.0.0.7")[0] == 429
    # A user the attack did not touch logs in from an address it never used before.
    assert restconf_login(guarded, "ops3", PASSWORD, "127.0.0.8")[0] == 200


def test_guessing_one_user_from_many_addresses_is_slowed_and_locked_per_user(guarded):
    """Each address guesses once, so no address counts more than one failure: the user's
    count alone makes each attempt wait longer, and then locks the user."""
    times = []
    for n in range(LOCK_AFTER):
        result, took = ssh_login(guarded.port, "nobody-here", "guess", f"127.0.1.{n + 1}")
        assert result == "failed"
        times.append(took)
    assert times[3] >= 4 * DELAY and times[4] >= 8 * DELAY, times
    status, took, _ = restconf_login(guarded, "nobody-here", "guess", "127.0.1.99")
    assert status == 429 and took < 1.0


# -- an unknown user costs what a known one does -------------------------------------------
def test_unknown_user_takes_as_long_as_a_known_one(tmp_path):
    # No delays or lockouts here: only the cost of checking a password is compared, with
    # a hash expensive enough (2^15) to stand out from the noise of the round trip.
    server = Server(tmp_path, "--login-delay", "0", "--login-lockout-after", "0",
                    "--max-auth-tries", "0", cost=15)
    try:
        ssh = {"ops": ssh_connect(server.port, "127.0.0.1"),
               "no-such-user": ssh_connect(server.port, "127.0.0.1")}  # one user each
        try:
            pairs = [tuple(ssh_try(ssh[user], user, "wrong")[1] for user in ssh)
                     for _ in range(6)]  # taking turns, so that load hits both alike
        finally:
            for transport in ssh.values():
                transport.close()
        rc_pairs = asyncio.run(_wrong_password_pairs(server, 6))
    finally:
        server.stop()
    for via, timed in (("SSH", pairs), ("RESTCONF", rc_pairs)):
        known, unknown = zip(*timed, strict=True)
        print(f"{via} wrong password: known user {min(known) * 1000:.0f} ms at least, median "
              f"{statistics.median(known) * 1000:.0f} ms; unknown user "
              f"{min(unknown) * 1000:.0f} ms, median {statistics.median(unknown) * 1000:.0f} ms")
        # Each pair is timed back to back, under the same load of the moment. Before, an
        # unknown user was answered in a fraction (a third or less) of a known one's time;
        # the wide bound is for loaded CI machines (the exact cost is compared below).
        ratio = statistics.median(u / k for k, u in timed)
        assert 0.6 < ratio < 1.67, (known, unknown)


def test_checking_costs_the_same_cpu_time_for_unknown_and_known_users():
    """What the end-to-end test above sees through the noise of a round trip, measured
    exactly: the CPU time of checking a password, unaffected by other processes' load."""
    from nfmig.server.auth import User, hash_password
    from nfmig.server.login_guard import LoginPolicy, Logins

    users = {"new": User("new", [hash_password("pw", 15)]),
             "old": User("old", [hash_password("pw", 14)])}  # an earlier version's cost
    logins = Logins(users, LoginPolicy(workers=1))
    try:
        def cpu(name: str) -> float:
            started = time.thread_time()
            assert not logins.verify(name, "wrong")
            return time.thread_time() - started
        costs: dict[str, list[float]] = {"new": [], "old": [], "no-such-user": []}
        for _ in range(5):
            for name, spent in costs.items():
                spent.append(cpu(name))
    finally:
        logins.close()
    new, old, unknown = (statistics.median(costs[n]) for n in ("new", "old", "no-such-user"))
    print(f"CPU time of a wrong password: known user {new * 1000:.0f} ms, unknown user "
          f"{unknown * 1000:.0f} ms, user with an old 2^14 hash {old * 1000:.0f} ms")
    assert 0.85 < unknown / new < 1.18, costs
    # Topped up with dummy hashes of the work it lacks: before, a tenth of the time. Two
    # hashes of half the memory run cheaper per unit of N (they stay closer to the CPU
    # caches, and by how much depends on what else the machine runs): the bound leaves
    # room for that, and still tells a topped-up check from one that is not.
    assert 0.65 < old / new < 1.35, costs


async def _wrong_password_pairs(server: Server, count: int) -> list[tuple[float, float]]:
    """(known user, unknown user) times of a wrong password over RESTCONF, each on a
    connection of its own that stays open (no TLS handshake in what is timed)."""
    tls = ssl.create_default_context(cafile=str(server.cert))
    url = f"https://127.0.0.1:{server.restconf_port}/restconf/yang-library-version"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as known, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as unknown:
        async def timed(session, user) -> float:
            started = time.perf_counter()
            async with session.get(url, headers=basic(user, "wrong")) as reply:
                await reply.read()
                assert reply.status == 401
            return time.perf_counter() - started
        await timed(known, "ops")  # the connections are set up
        await timed(unknown, "no-such-user")
        return [(await timed(known, "ops"), await timed(unknown, "no-such-user"))
                for _ in range(count)]


# -- a flood of logins ---------------------------------------------------------------------
FLOOD = textwrap.dedent("""
    import asyncio, base64, collections, json, ssl, sys, time
    import aiohttp

    port, cert, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    statuses = collections.Counter()

    async def guesser(n):
        tls = ssl.create_default_context(cafile=cert)
        # Many source addresses, so that per-address lockouts do not end the flood at once.
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.2.{n % 50 + 1}", 0), ssl=tls)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline, i = time.monotonic() + seconds, 0
            while time.monotonic() < deadline:
                i += 1
                auth = base64.b64encode(f"guess{n}-{i}:wrong".encode()).decode()
                try:
                    async with session.get(f"https://127.0.0.1:{port}/restconf/data",
                                           headers={"Authorization": "Basic " + auth}) as r:
                        await r.read()
                        statuses[r.status] += 1
                except aiohttp.ClientError:
                    statuses["error"] += 1

    async def main():
        await asyncio.gather(*(guesser(n) for n in range(100)))

    asyncio.run(main())
    print(json.dumps({str(k): v for k, v in statuses.items()}))
""")


async def _latencies(server: Server, count: int, pause: float) -> list[float]:
    tls = ssl.create_default_context(cafile=str(server.cert))
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.get(
                    f"https://127.0.0.1:{server.restconf_port}/restconf/data",
                    headers=basic("ops", PASSWORD)) as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            out.append(time.perf_counter() - started)
            await asyncio.sleep(pause)
    return out


def test_flood_of_wrong_logins_does_not_stall_a_legitimate_client(tmp_path):
    """100 concurrent guessers from 50 addresses against one password worker and a queue
    of 4: what does not fit is refused at once (503) instead of piling up, and a logged-in
    client's requests stay within a bound of their usual latency."""
    server = Server(tmp_path, "--login-workers", "1", "--login-queue", "4",
                    "--login-lockout-after", "5", "--login-delay", "0.2", cost=16)
    try:
        asyncio.run(_latencies(server, 1, 0))  # logs in (one hash); remembered from now on
        before = asyncio.run(_latencies(server, 15, 0.05))
        rss_before = memory(server.local.process.pid)["VmRSS"]
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(server.restconf_port), str(server.cert), "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # the flood is under way
            during = asyncio.run(_latencies(server, 30, 0.05))
            out, err = flood.communicate(timeout=60)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        statuses = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        assert statuses, err
        assert statuses.get("503", 0) > 0 and statuses.get("401", 0) > 0, statuses
        assert server.local.alive()
        peak = memory(server.local.process.pid)["VmHWM"]
    finally:
        server.stop()
    base, loaded = statistics.median(before), statistics.median(during)
    print(f"legitimate request: median {base * 1000:.0f} ms before, {loaded * 1000:.0f} ms "
          f"during the flood (max {max(during) * 1000:.0f} ms); flood answers {statuses}; "
          f"server memory {rss_before >> 20} MiB before, peak {peak >> 20} MiB")
    # A hash at 2^16 takes 64 MiB: 100 logins hashed at once would take 6.4 GiB; with one
    # worker the flood costs one hash and its connections, far less than four hashes.
    assert peak < rss_before + 4 * (64 << 20), (rss_before, peak)
    # The stated bound: the median stays under 250 ms more than before, no request takes a
    # second.
    assert loaded < base + 0.25 and max(during) < 1.0, (sorted(before), sorted(during))


# -- the bookkeeping itself, in process ----------------------------------------------------
def test_delays_double_up_to_the_cap_and_addresses_count_by_ipv6_64():
    from nfmig.server.login_guard import LoginPolicy, address_key

    policy = LoginPolicy(delay=0.25, max_delay=8)
    assert [policy.delay_for(n) for n in range(8)] == [0, 0.25, 0.5, 1, 2, 4, 8, 8]
    assert policy.delay_for(10_000) == 8
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("2001:db8:1:3::5") != address_key("2001:db8:1:2::5")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" == address_key("192.0.2.7")


def test_refused_requests_cannot_push_a_lockout_out_of_the_tables():
    from nfmig.server import login_guard
    from nfmig.server.login_guard import LoginGuard, LoginPolicy

    now = [1000.0]
    guard = LoginGuard(LoginPolicy(lockout_after=2, lockout=60), clock=lambda: now[0])
    for _ in range(2):
        guard.settle(guard.begin("192.0.2.1", "admin", "test"), False)
    assert guard.locked("192.0.2.9", "admin", "test") > 0  # the user, from elsewhere
    assert guard.locked("192.0.2.1", "someone", "test") > 0  # the address, for anyone
    for n in range(login_guard._CAPACITY + 10):  # refused: made-up names create nothing
        assert guard.locked("192.0.2.1", f"made-up-{n}", "test") > 0
    assert guard.locked("192.0.2.9", "admin", "test") > 0
    now[0] += 61
    assert guard.locked("192.0.2.9", "admin", "test") == 0
    assert guard.begin("192.0.2.9", "admin", "test").delay == 0  # forgotten with the lock


# -- a password verified lately -----------------------------------------------------------
def _service(ttl: float) -> tuple[User, Logins]:
    user = User("ops", [hash_password("right one", log2_n=14)])
    return user, Logins({"ops": user}, LoginPolicy(cache_ttl=ttl, workers=1))


def _login(logins: Logins, password: str) -> bool:
    return logins.check_password("127.0.0.1", "ops", password, "SSH password").ok


def test_a_password_verified_lately_is_taken_without_hashing_again():
    user, logins = _service(ttl=60)
    try:
        assert _login(logins, "right one")
        # Hashed again, it would now fail: the stored hash is another password's.
        user.password_hashes[:] = [hash_password("another", log2_n=14)]
        assert _login(logins, "right one")
        assert not _login(logins, "wrong")
    finally:
        logins.close()


def test_with_no_memory_every_login_is_hashed():
    user, logins = _service(ttl=0)
    try:
        assert _login(logins, "right one")
        user.password_hashes[:] = [hash_password("another", log2_n=14)]
        assert not _login(logins, "right one")
    finally:
        logins.close()
