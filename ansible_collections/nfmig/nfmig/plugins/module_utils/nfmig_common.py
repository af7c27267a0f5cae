"""What the nfmig modules share: the options of the doc fragment nfmig.nfmig.connection,
the nfmig client imported once with its failure kept for the task's message, and endpoints
and credentials built from the options."""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

try:
    from nfmig.client.endpoints import (
        PASSWORD_ENV,
        Credentials,
        Endpoint,
        EndpointError,
        open_connection,
    )
    from nfmig.client.selection import Selection, SelectionError, parse_entries

    NFMIG_IMPORT_ERROR: str | None = None
except ImportError:
    # The module reports it as a task failure (missing_required_lib): the interpreter that
    # runs it is usually not the one Ansible itself runs in.
    NFMIG_IMPORT_ERROR = traceback.format_exc()
    PASSWORD_ENV = "NFMIG_PASSWORD"

    class EndpointError(Exception):  # type: ignore[no-redef]
        """Stands in until require_nfmig fails the task."""

    SelectionError = EndpointError  # type: ignore[misc]
    open_connection = None  # type: ignore[assignment]


def connection_argument_spec() -> dict[str, dict[str, Any]]:
    """The options of the doc fragment nfmig.nfmig.connection."""
    return {
        "user": {"type": "str"},
        "password": {"type": "str", "no_log": True},
        "private_key_file": {"type": "path"},
        "known_hosts": {"type": "path"},
        "host_key_checking": {"type": "bool", "default": True},
        "ca_file": {"type": "path"},
        "timeout": {"type": "int", "default": 600},
        "connect_timeout": {"type": "int", "default": 30},
    }


def require_nfmig(module: Any) -> None:
    """Fail the task, saying what to install where, when nfmig cannot be imported."""
    if NFMIG_IMPORT_ERROR is None:
        return
    from ansible.module_utils.basic import missing_required_lib

    module.fail_json(msg=missing_required_lib(
        "nfmig", reason="set ansible_python_interpreter to a Python that has nfmig installed"),
        exception=NFMIG_IMPORT_ERROR)


def credentials(params: dict[str, Any], compress: bool | None = None) -> Credentials:
    """The nfmig Credentials of the connection options. Without a password the CLI's
    environment variable is read, so an operator's shell works the same for both."""
    password = params.get("password") or os.environ.get(PASSWORD_ENV) or None
    known = params.get("known_hosts")
    extra: dict[str, Any] = {}
    if known:
        extra["known_hosts"] = Path(known)
    return Credentials(
        password=password,
        key_file=Path(params["private_key_file"]) if params.get("private_key_file") else None,
        verify_host_keys=params.get("host_key_checking", True),
        ca_file=Path(params["ca_file"]) if params.get("ca_file") else None,
        compress=compress, **extra)


def endpoint(text: str, params: dict[str, Any]) -> Endpoint:
    """``netconf://[user@]host[:port]`` or ``restconf://...``; an endpoint that names no
    user gets the ``user`` option's."""
    parsed = Endpoint.parse(text)
    if parsed.user is None and params.get("user"):
        parsed = replace(parsed, user=params["user"])
    return parsed


def selection(texts: list[str] | None) -> Selection:
    return Selection.parse(texts or [])


def check_timeouts(module: Any) -> None:
    for name in ("timeout", "connect_timeout"):
        if not 1 <= module.params[name] <= 86400:
            module.fail_json(msg=f"{name} must be 1..86400 seconds")


def read_selected(conn: Any, chosen: Selection, datastore: str = "operational") -> list:
    """The entries of ``chosen`` a datastore holds (the server's filter may select a
    superset; the selection's own test is exact)."""
    text = conn.get_data(datastore, chosen.filter_xml())
    return [e for e in parse_entries(text) if chosen.matches(e)]


__all__ = ["NFMIG_IMPORT_ERROR", "EndpointError", "SelectionError", "check_timeouts",
           "connection_argument_spec", "credentials", "endpoint", "open_connection",
           "read_selected", "require_nfmig", "selection"]
