"""Runs nfmig.nfmig.sessions_info with the connection options a task leaves out taken from the
inventory host's variables (see plugin_utils/connection_vars.py)."""

from __future__ import annotations

from ansible_collections.nfmig.nfmig.plugins.plugin_utils.connection_vars import (
    ConnectionVarsAction,
)


class ActionModule(ConnectionVarsAction):
    pass
