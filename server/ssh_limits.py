"""Limits on SSH connections and NETCONF sessions, and the `nfmig serve` options that set
them (enforced by ssh_server.py).

Kept apart from ssh_server.py so that building the command line imports nothing heavy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .option_table import add_group, number, seconds, settings_from

_WEEK = 7 * 86400


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


# option, SshLimits field, type, metavar, help (the default is appended)
_OPTIONS = (
    ("--login-grace-time", "login_grace_time", seconds(0.1, _WEEK), "SECONDS",
     "close a connection that has not logged in and opened its NETCONF session within this "
     "time, or that has held no session for this long since its last one closed"),
    ("--max-startups", "max_startups", number(1, 100_000), "N",
     "connections at once that are not logged in or hold no session; a new connection "
     "beyond N closes the oldest such connection of the source address holding the most of "
     "them, so connections held open by someone else cannot lock an operator out"),
    ("--max-sessions", "max_sessions", number(1, 100_000), "N",
     "NETCONF sessions at once, of all users; one more is refused with the SSH reason "
     "'resource shortage'"),
    ("--max-sessions-per-user", "max_sessions_per_user", number(1, 100_000), "N",
     "NETCONF sessions at once of one user; one more is refused the same way"),
    ("--idle-timeout", "idle_timeout", seconds(0, _WEEK), "SECONDS",
     "close a session that has sent no request for this long, has none in progress and "
     "holds no notification subscription (0: never)"),
)


def add_ssh_options(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "SSH connections and sessions", "Bounds on what clients, logged in or "
              "not, may hold open. Only modern SSH algorithms are offered (see the README).",
              SshLimits(), _OPTIONS, "ssh_")


def limits_from_args(args: argparse.Namespace) -> SshLimits:
    return settings_from(SshLimits, args, "ssh_")
