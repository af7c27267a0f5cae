"""Logins that resist guessing and enumeration, for SSH and RESTCONF alike.

* Every failed password login counts against its source address (an IPv6 source by its
  /64, which one host usually owns whole) and against the user name. The next attempt from
  either waits ``delay * 2^(failures - 1)`` (at most ``max_delay``) *before* its password
  is checked, so a client cannot skip the wait by hanging up early; after
  ``lockout_after`` failures the address or user is refused outright for ``lockout``
  seconds. Failures are forgotten ``lockout`` seconds after the last one.
* A user's own lockout does not hold back an address that user has logged in from before:
  someone guessing elsewhere must not lock the operator out of their own workstation. The
  address's count still applies there.
* A successful login takes back the failures that address had made for that user (a
  typo), not anyone else's.
* The delay is waited out where it stalls nobody else: the SSH connection's own transport
  thread, or an ``asyncio.sleep`` in RESTCONF's event loop.
* Passwords are checked in a small worker pool with a bounded queue (a current scrypt hash
  takes 128 MiB and a few hundred milliseconds): a flood of logins queues there, and
  beyond the queue is refused at once instead of exhausting memory or CPU.
* An unknown user, or one with no password, is checked against a dummy hash with the
  users file's strongest parameters, and a user whose hash an earlier version made cheaper
  is topped up with dummy work to that cost: every answer takes as long as any other.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from .auth import (
    DEFAULT_PARAMS,
    MIN_LOG2_N,
    ScryptParams,
    User,
    dummy_hash,
    hash_params,
    verify_password,
)
from .auth import shown_name as shown
from .login_policy import LoginPolicy

log = logging.getLogger(__name__)

_CAPACITY = 10_000  # addresses, user names, address/user pairs each: bounded memory
_REPORT_EVERY = 10.0  # seconds between log lines about refusals of one kind


class Outcome(NamedTuple):
    """How a login ended: ``reason`` is ok, failed, locked (``retry_after`` seconds) or
    busy (the password workers' queue is full)."""

    reason: str
    user: str = ""
    retry_after: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


def address_key(address: str) -> str:
    """The unit an address is counted in: an IPv4 address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Record:
    """Failures of one address or one user name."""

    __slots__ = ("failures", "last", "locked_until", "pending", "refused", "reported")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0  # when the last failure happened (monotonic)
        self.locked_until = 0.0
        self.pending = 0  # attempts under way: they raise the delay of those that follow
        self.refused = 0  # refusals while locked not yet logged
        self.reported = float("-inf")


class _Table(OrderedDict):
    """Records by key, least recently touched first, at most ``_CAPACITY`` of them. The
    oldest goes first even when locked: making a record takes a counted attempt, so pushing
    a lock out costs an attacker ``_CAPACITY`` attempts, from ``_CAPACITY / lockout_after``
    addresses."""

    def touch(self, key, factory):
        value = self.get(key)
        if value is None:
            value = self[key] = factory()
            while len(self) > _CAPACITY:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


@dataclass
class Attempt:
    """A password login under way, between :meth:`LoginGuard.begin` and ``settle``."""

    address: str
    user: str
    via: str
    delay: float
    _address: _Record
    _user: _Record
    _user_applies: bool
    settled: bool = False


class LoginGuard:
    """The failure counts of addresses and users, and the decisions made from them."""

    def __init__(self, policy: LoginPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses = _Table()
        self._users = _Table()
        self._pairs = _Table()  # (address, user) -> [failures, last]
        self._trusted = _Table()  # (address, user) that logged in: user lockout skips them

    def _current(self, record: _Record, now: float) -> _Record:
        if record.locked_until and record.locked_until <= now:
            record.failures, record.locked_until = 0, 0.0
        elif (record.failures and not record.locked_until
              and now - record.last > self.policy.lockout):
            record.failures = 0
        return record

    def _records(self, address: str, user: str, now: float) -> tuple[_Record, _Record, bool]:
        key = address_key(address)
        arec = self._current(self._addresses.touch(key, _Record), now)
        urec = self._current(self._users.touch(user[:256], _Record), now)
        return arec, urec, (key, user[:256]) not in self._trusted

    def locked(self, address: str, user: str, via: str, *, user_lock: bool = True) -> float:
        """Seconds until ``address`` (or ``user``, unless ``user_lock`` is False or the
        address is trusted for it) may try again; 0 when it may now. A refusal is logged,
        at most one line per address or user every few seconds."""
        now = self._clock()
        key = address_key(address)
        with self._lock:
            # Looked up, never created: a refused request must not be able to push a
            # locked record out of its bounded table (with names made up by the thousand).
            arec = self._addresses.get(key)
            urec = self._users.get(user[:256])
            if not (user_lock and (key, user[:256]) not in self._trusted):
                urec = None
            for record, what in ((arec, f"address {address}"), (urec, f"user {shown(user)}")):
                if record is None:
                    continue
                self._current(record, now)
                if record.locked_until > now:
                    record.refused += 1
                    if now - record.reported >= _REPORT_EVERY:
                        log.warning("login refused: %s is locked out for another %.0f s "
                                    "(%s, user %s from %s; %d refused since the last report)",
                                    what, record.locked_until - now, via, shown(user),
                                    address, record.refused)
                        record.reported, record.refused = now, 0
                    return record.locked_until - now
        return 0.0

    def begin(self, address: str, user: str, via: str) -> Attempt:
        """Start a password attempt: how long it must wait comes from the failures (and
        attempts under way) of its address and, unless trusted there, its user."""
        now = self._clock()
        with self._lock:
            arec, urec, user_applies = self._records(address, user, now)
            failures = arec.failures + arec.pending
            if user_applies:
                failures = max(failures, urec.failures + urec.pending)
            arec.pending += 1
            urec.pending += 1
        return Attempt(address, user, via, self.policy.delay_for(failures), arec, urec,
                       user_applies)

    def _count(self, record: _Record, now: float) -> bool:
        """One more failure on ``record``; True when that starts its lockout."""
        record.failures += 1
        record.last = now
        policy = self.policy
        if (policy.lockout_after and record.failures >= policy.lockout_after
                and record.locked_until <= now):
            record.locked_until = now + policy.lockout
            return True
        return False

    def settle(self, attempt: Attempt, ok: bool | None, *, busy: bool = False) -> None:
        """End ``attempt``: True logged in, False a wrong password, None abandoned before
        its password was checked (nothing learnt, nothing counted). ``busy``: refused
        unchecked because every hash worker was taken; that counts against the address
        alone, so that a flood from a few addresses locks itself out and frees the
        workers, while nobody can lock a user out by flooding."""
        if attempt.settled:
            return
        attempt.settled = True
        now = self._clock()
        policy = self.policy
        key = address_key(attempt.address)
        pair = (key, attempt.user[:256])
        with self._lock:
            arec, urec = attempt._address, attempt._user
            arec.pending = max(0, arec.pending - 1)
            urec.pending = max(0, urec.pending - 1)
            locked = busy and self._count(arec, now)
            if ok is None:
                if locked:
                    log.warning("address %s locked out for %.0f s after %d failed or "
                                "refused logins", attempt.address, policy.lockout,
                                arec.failures)
                return
            if ok:
                mine = self._pairs.pop(pair, [0, 0.0])[0]
                arec.failures = max(0, arec.failures - mine)
                urec.failures = max(0, urec.failures - mine)
                self._trusted.touch(pair, lambda: True)
                return
            counts = self._pairs.touch(pair, lambda: [0, 0.0])
            if now - counts[1] > policy.lockout:
                counts[0] = 0
            counts[0] += 1
            counts[1] = now
            locks = [what for record, what in ((arec, f"address {attempt.address}"),
                                               (urec, f"user {shown(attempt.user)}"))
                     if self._count(record, now)]
            afail, ufail = arec.failures, urec.failures
            next_delay = policy.delay_for(max(afail, ufail if attempt._user_applies else 0))
        # One line per failed login, with its source and user, never the password.
        log.warning("login failed: user %s from %s (%s); %d failures from this address, %d "
                    "for this user; next attempt waits %.2f s%s", shown(attempt.user),
                    attempt.address, attempt.via, afail, ufail, next_delay,
                    f"; {' and '.join(locks)} locked out for {policy.lockout:.0f} s"
                    if locks else "")


class HashPool:
    """Password hashes on a few worker threads (hashlib.scrypt releases the GIL), with at
    most ``queue`` waiting: beyond that :meth:`submit` refuses at once."""

    def __init__(self, workers: int, queue: int):
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers),
                                            thread_name_prefix="login-hash")
        self._slots = threading.BoundedSemaphore(max(1, workers) + max(0, queue))

    def submit(self, fn: Callable, *args) -> Future | None:
        if not self._slots.acquire(blocking=False):
            return None
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # shut down
            self._slots.release()
            return None
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Reporter:
    """At most one log line every few seconds for a refusal that can come in floods."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._last = float("-inf")

    def __call__(self, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now - self._last < _REPORT_EVERY:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning(message + " (%d such refusals since the last report)", *args, count)


class _Verified:
    """Passwords verified lately, for ``ttl`` seconds: an NMS that opens a session per
    operation, and RESTCONF's Basic that sends the password with every request, would
    otherwise pay a whole scrypt hash (128 MiB) each time. Kept in memory as an HMAC under
    a key made at start, never the password itself; only a password that was right is
    ever remembered, so a guess learns nothing from it."""

    _LIMIT = 1024

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._key = os.urandom(32)
        self._known: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def _token(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(errors="surrogatepass"),
                        hashlib.sha256).digest()

    def knows(self, user: str, password: str) -> bool:
        token = self._token(user, password)
        with self._lock:
            expires = self._known.get(token)
            if expires is None:
                return False
            if expires > time.monotonic():
                return True
            del self._known[token]
            return False

    def remember(self, user: str, password: str) -> None:
        if self.ttl <= 0:
            return
        token = self._token(user, password)
        with self._lock:
            self._known[token] = time.monotonic() + self.ttl
            while len(self._known) > self._LIMIT:
                self._known.popitem(last=False)


class Logins:
    """The server's one login service: users, failure counts and hash workers, shared by
    SSH and RESTCONF so that guesses on one protocol count on the other too."""

    def __init__(self, users: dict[str, User], policy: LoginPolicy):
        self.users = users
        self.policy = policy
        self.guard = LoginGuard(policy)
        self.pool = HashPool(policy.workers, policy.queue)
        self._verified = _Verified(policy.cache_ttl)
        self._busy = _Reporter()
        params = [p for u in users.values() for h in u.password_hashes
                  if (p := hash_params(h)) is not None]
        # The strongest parameters in use: an unknown user must cost what a known one does.
        self.target: ScryptParams = max(params, key=lambda p: p.work, default=DEFAULT_PARAMS)
        self._padding: dict[int, list[str]] = {}  # work lacking -> dummy hashes making it up
        weak = sorted({u.name for u in users.values() for h in u.password_hashes
                       if (p := hash_params(h)) is not None and p.work < DEFAULT_PARAMS.work})
        if weak:
            log.warning("password hashes weaker than the current default (%s) for: %s; add "
                        "the password again with 'nfmig adduser' to strengthen it",
                        DEFAULT_PARAMS, ", ".join(weak))

    def close(self) -> None:
        self.pool.close()

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is one of ``name``'s, at the same cost whether or not the
        user exists: every stored hash is computed (no early exit), then dummy hashes for
        whatever work they lack of one hash at the strongest parameters in use. An unknown
        user gets one such dummy; a user whose hash an earlier version made cheaper gets
        the difference, so neither answers sooner than anyone else."""
        user = self.users.get(name)
        ok, spent = False, 0
        for stored in user.password_hashes if user else ():
            ok |= verify_password(password, stored)
            params = hash_params(stored)
            spent += params.work if params is not None else 0
        for dummy in self._dummies(self.target.work - spent):
            verify_password(password, dummy)
        return ok

    def _dummies(self, lacking: int) -> list[str]:
        """Dummy hashes (the target's r and p, N a power of two each) whose work adds up to
        ``lacking``, to the nearest smallest N allowed."""
        if lacking <= 0:
            return []
        made = self._padding.get(lacking)
        if made is None:
            target = self.target
            n_lacking = lacking // (target.r * target.p)
            made = [dummy_hash(ScryptParams(1 << bit, target.r, target.p))
                    for bit in range(MIN_LOG2_N, n_lacking.bit_length())
                    if n_lacking >> bit & 1]
            self._padding[lacking] = made  # a few distinct amounts: one per hash strength
        return made

    def _checked(self, attempt: Attempt, password: str) -> Outcome:
        """Runs on a hash worker: verify and count, so that the count is kept even when the
        client that asked has gone away meanwhile."""
        try:
            ok = self.verify(attempt.user, password)
        except BaseException:
            self.guard.settle(attempt, None)
            raise
        self.guard.settle(attempt, ok)
        if ok:
            self._verified.remember(attempt.user, password)
            log.log(logging.INFO if attempt.via.startswith("RESTCONF") else logging.DEBUG,
                    "user %s logged in from %s (%s)", shown(attempt.user), attempt.address,
                    attempt.via)
            return Outcome("ok", attempt.user)
        return Outcome("failed", attempt.user)

    def _start(self, address: str, user: str, password: str, via: str
               ) -> Outcome | Attempt:
        """A locked address or user is refused before anything else, a password verified
        lately is taken at once, any other attempt begins (after its delay)."""
        retry = self.guard.locked(address, user, via)
        if retry:
            return Outcome("locked", user, retry)
        if self._verified.knows(user, password):
            return Outcome("ok", user)
        return self.guard.begin(address, user, via)

    def _after_wait(self, attempt: Attempt, password: str) -> Outcome | Future:
        # The lockout may have begun while this attempt waited (parallel guesses).
        retry = self.guard.locked(attempt.address, attempt.user, attempt.via)
        if retry:
            self.guard.settle(attempt, None)
            return Outcome("locked", attempt.user, retry)
        future = self.pool.submit(self._checked, attempt, password)
        if future is None:
            self.guard.settle(attempt, None, busy=True)
            self._busy("login refused: user %s from %s (%s): every password worker busy "
                       "and the queue full", shown(attempt.user), attempt.address,
                       attempt.via)
            return Outcome("busy", attempt.user, 1.0)
        return future

    def check_password(self, address: str, user: str, password: str, via: str,
                       alive: Callable[[], bool] | None = None) -> Outcome:
        """A password login, waiting in the calling thread (an SSH connection's own).
        ``alive`` false ends the wait early: the connection is gone."""
        started = self._start(address, user, password, via)
        if isinstance(started, Outcome):
            return started
        deadline = time.monotonic() + started.delay
        while (remaining := deadline - time.monotonic()) > 0:
            if alive is not None and not alive():
                self.guard.settle(started, None)
                return Outcome("failed", user)
            time.sleep(min(remaining, 0.1))
        result = self._after_wait(started, password)
        if isinstance(result, Outcome):
            return result
        try:
            return result.result()
        except CancelledError:  # the pool was shut down before the hash ran: stopping
            self.guard.settle(started, None)
            return Outcome("failed", user)

    async def check_password_async(self, address: str, user: str, password: str,
                                   via: str) -> Outcome:
        """A password login for a coroutine: the delay and the hash never block its loop."""
        started = self._start(address, user, password, via)
        if isinstance(started, Outcome):
            return started
        try:
            if started.delay:
                await asyncio.sleep(started.delay)
        except BaseException:  # the request was cancelled: its client has gone
            self.guard.settle(started, None)
            raise
        result = self._after_wait(started, password)
        if isinstance(result, Outcome):
            return result
        # Shielded: a cancelled request leaves the hash to finish and be counted.
        return await asyncio.shield(asyncio.wrap_future(result))

    def check_key(self, address: str, user: str, matches: bool, key_type: str) -> Outcome:
        """A public-key login. A key cannot be guessed, so it neither waits nor counts
        toward a lockout, and a user's lockout does not stop it; a locked address does."""
        via = f"SSH publickey {key_type}"
        retry = self.guard.locked(address, user, via, user_lock=False)
        if retry:
            return Outcome("locked", user, retry)
        if matches:
            log.debug("user %s offered an accepted key from %s (%s)", shown(user), address,
                      via)
            return Outcome("ok", user)
        log.info("public key refused: user %s from %s (%s)", shown(user), address, via)
        return Outcome("failed", user)


class BasicAuth:
    """RESTCONF's HTTP Basic against the login service (the password comes with every
    request: the service remembers one it verified lately)."""

    def __init__(self, logins: Logins):
        self.logins = logins

    async def check(self, header: str | None, address: str) -> Outcome:
        if not header or not header.startswith("Basic "):
            return Outcome("failed")
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode() \
                .partition(":")
        except (ValueError, UnicodeDecodeError):
            return Outcome("failed")
        return await self.logins.check_password_async(address, user, password,
                                                      "RESTCONF Basic")
