"""How failed logins are slowed down and bounded, and the `nfmig serve` options that set it.

Kept apart from login_guard.py so that building the command line imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields


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
    cache_ttl: float = 60.0  # seconds a verified RESTCONF password is remembered

    def delay_for(self, failures: int) -> float:
        if failures <= 0 or self.delay <= 0:
            return 0.0
        return min(self.max_delay, self.delay * 2 ** min(failures - 1, 30))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def _number(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not least <= value <= 1_000_000:
            raise argparse.ArgumentTypeError(f"must be between {least} and 1000000")
        return value
    return parse


# option, LoginPolicy field, type, metavar, help (the default is appended)
_OPTIONS = (
    ("--login-delay", "delay", _seconds, "SECONDS",
     "wait before the next login after one failure, from the same address or for the same "
     "user; doubles with each further failure (0: no delay)"),
    ("--login-max-delay", "max_delay", _seconds, "SECONDS", "longest such wait"),
    ("--login-lockout-after", "lockout_after", _number(0), "N",
     "failed logins after which the address or user is refused for --login-lockout "
     "seconds (0: never)"),
    ("--login-lockout", "lockout", _seconds, "SECONDS",
     "how long a lockout lasts, and how long failures are remembered"),
    ("--max-auth-tries", "max_auth_tries", _number(0), "N",
     "failed authentication attempts on one SSH connection before it is closed (0: "
     "paramiko's own limit of 10)"),
    ("--login-workers", "workers", _number(1), "N",
     "password hashes computed at once (each scrypt hash takes 128 MiB)"),
    ("--login-queue", "queue", _number(0), "N",
     "logins waiting for a hash worker; more are refused at once"),
    ("--login-cache", "cache_ttl", _seconds, "SECONDS",
     "how long RESTCONF remembers a verified password (as a keyed hash; 0: never)"),
)


def add_login_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "failed logins", "Guessing is slowed down per source address and per user name, "
        "the same on SSH and RESTCONF.")
    defaults = LoginPolicy()
    for option, name, kind, metavar, text in _OPTIONS:
        group.add_argument(option, dest=f"login_{name}", type=kind, metavar=metavar,
                           default=getattr(defaults, name),
                           help=f"{text} (default {getattr(defaults, name)})")


def policy_from_args(args: argparse.Namespace) -> LoginPolicy:
    names = {f.name for f in fields(LoginPolicy)}
    return LoginPolicy(**{name: getattr(args, f"login_{name}") for name in names
                          if hasattr(args, f"login_{name}")})
