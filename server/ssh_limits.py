"""Limits on SSH connections and NETCONF sessions, and the `nfmig serve` options that set
them (enforced by ssh_server.py).

Kept apart from ssh_server.py so that building the command line imports nothing heavy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SshLimits:
    """What one SSH server allows; the defaults suit an operator network with a few
    migrators and operators per NF instance."""

    login_grace_time: float = 30.0  # seconds a connection may hold no session
    max_startups: int = 500  # connections holding no session, at once
    max_sessions: int = 64  # NETCONF sessions in total
    max_sessions_per_user: int = 16
    idle_timeout: float = 3600.0  # seconds; 0: sessions never time out

    def __post_init__(self) -> None:
        if self.login_grace_time <= 0:
            raise ValueError("the login grace time must be positive")
        if min(self.max_startups, self.max_sessions, self.max_sessions_per_user) < 1:
            raise ValueError("the connection and session limits must be at least 1")
        if self.idle_timeout < 0:
            raise ValueError("the idle timeout must not be negative")


def _seconds(least: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not least <= value <= 7 * 86400:
            raise argparse.ArgumentTypeError(f"must be between {least:g} and 604800 seconds")
        return value
    return parse


def _number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError("must be between 1 and 100000")
    return value


# option, SshLimits field, type, metavar, help (the default is appended)
_OPTIONS = (
    ("--login-grace-time", "login_grace_time", _seconds(0.1), "SECONDS",
     "close a connection that has not logged in and opened its NETCONF session within this "
     "time, or that has held no session for this long since its last one closed"),
    ("--max-startups", "max_startups", _number, "N",
     "connections at once that are not logged in or hold no session; a new connection "
     "beyond N closes the oldest such connection of the source address holding the most of "
     "them, so connections held open by someone else cannot lock an operator out"),
    ("--max-sessions", "max_sessions", _number, "N",
     "NETCONF sessions at once, of all users; one more is refused with the SSH reason "
     "'resource shortage'"),
    ("--max-sessions-per-user", "max_sessions_per_user", _number, "N",
     "NETCONF sessions at once of one user; one more is refused the same way"),
    ("--idle-timeout", "idle_timeout", _seconds(0), "SECONDS",
     "close a session that has sent no request for this long, has none in progress and "
     "holds no notification subscription (0: never)"),
)


def add_ssh_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "SSH connections and sessions", "Bounds on what clients, logged in or not, may hold "
        "open. Only modern SSH algorithms are offered (see the README).")
    defaults = SshLimits()
    for option, name, kind, metavar, text in _OPTIONS:
        group.add_argument(option, dest=f"ssh_{name}", type=kind, metavar=metavar,
                           default=getattr(defaults, name),
                           help=f"{text} (default {getattr(defaults, name):g})")


def limits_from_args(args: argparse.Namespace) -> SshLimits:
    names = {f.name for f in fields(SshLimits)}
    return SshLimits(**{name: getattr(args, f"ssh_{name}") for name in names
                        if hasattr(args, f"ssh_{name}")})
