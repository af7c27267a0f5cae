"""How failed logins are slowed down and bounded, and the `nfmig serve` options that set it.

Kept apart from login_guard.py so that building the command line imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from .option_table import add_group, number, seconds, settings_from


def default_workers() -> int:
    """Half the CPUs, at least one, at most four: password hashes never take all of them."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class LoginPolicy:
    """Throttling of failed logins, the same for SSH and RESTCONF (login_guard.py)."""

    delay: float = 0.25  # seconds before the attempt after one failure; doubles each time
    max_delay: float = 8.0
    lockout_after: int = 10  # failures of an address or user before it is locked; 0: never
    lockout: float = 300.0  # seconds locked; also how long failures are remembered
    max_auth_tries: int = 6  # failed attempts on one SSH connection before disconnecting
    workers: int = field(default_factory=default_workers)  # concurrent password hashes
    queue: int = 16  # logins waiting for a worker; beyond, refused at once
    cache_ttl: float = 60.0  # seconds a verified password is remembered

    def delay_for(self, failures: int) -> float:
        if failures <= 0 or self.delay <= 0:
            return 0.0
        return min(self.max_delay, self.delay * 2 ** min(failures - 1, 30))


# option, LoginPolicy field, type, metavar, help (the default is appended)
_OPTIONS = (
    ("--login-delay", "delay", seconds(0, 86400), "SECONDS",
     "wait before the next login after one failure, from the same address or for the same "
     "user; doubles with each further failure (0: no delay)"),
    ("--login-max-delay", "max_delay", seconds(0, 86400), "SECONDS", "longest such wait"),
    ("--login-lockout-after", "lockout_after", number(0, 1_000_000), "N",
     "failed logins after which the address or user is refused for --login-lockout "
     "seconds (0: never)"),
    ("--login-lockout", "lockout", seconds(0, 86400), "SECONDS",
     "how long a lockout lasts, and how long failures are remembered"),
    ("--max-auth-tries", "max_auth_tries", number(0, 1_000_000), "N",
     "failed authentication attempts on one SSH connection before it is closed (0: "
     "paramiko's own limit of 10)"),
    ("--login-workers", "workers", number(1, 1_000_000), "N",
     "password hashes computed at once (each scrypt hash takes 128 MiB)"),
    ("--login-queue", "queue", number(0, 1_000_000), "N",
     "logins waiting for a hash worker; more are refused at once"),
    ("--login-cache", "cache_ttl", seconds(0, 86400), "SECONDS",
     "how long a verified password is remembered, for SSH and RESTCONF logins alike "
     "(as a keyed hash; 0: never)"),
)


def add_login_options(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "failed logins", "Guessing is slowed down per source address and per "
              "user name, the same on SSH and RESTCONF.", LoginPolicy(), _OPTIONS, "login_")


def policy_from_args(args: argparse.Namespace) -> LoginPolicy:
    return settings_from(LoginPolicy, args, "login_")
