"""The action plugins' shared part: the connection options a task leaves out, filled from
the inventory host's usual connection variables, then the module run where the task runs.

The variables are the task's host's, not those of the host it is delegated to: with
``delegate_to: localhost`` each inventory host stands for one NF instance and keeps its own
``ansible_user`` / ``ansible_password``, while the module runs on the controller."""

from __future__ import annotations

from typing import Any

from ansible import constants as C
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

# option -> the host variables that fill it, in order of precedence
VARIABLES: dict[str, tuple[str, ...]] = {
    "user": ("ansible_user", "ansible_ssh_user"),
    "password": ("ansible_password", "ansible_ssh_pass"),
    "private_key_file": ("ansible_ssh_private_key_file", "ansible_private_key_file"),
    "known_hosts": ("nfmig_known_hosts",),
    "host_key_checking": ("ansible_host_key_checking", "ansible_ssh_host_key_checking"),
}


class ConnectionVarsAction(ActionBase):
    """Runs the module of the same name with the connection options completed."""

    TRANSFERS_FILES = False

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        for option, names in VARIABLES.items():
            if args.get(option) is not None:
                continue
            value = self._first_var(task_vars, names)
            if value is not None:
                args[option] = value
        if args.get("host_key_checking") is None:
            args["host_key_checking"] = boolean(C.HOST_KEY_CHECKING, strict=False)
        result.update(self._execute_module(module_name=self._task.resolved_action,
                                           module_args=args, task_vars=task_vars))
        return result

    def _first_var(self, task_vars: dict[str, Any], names: tuple[str, ...]) -> Any:
        for name in names:
            if name in task_vars and task_vars[name] is not None:
                # host variables may be templates (a vaulted password, another variable)
                return self._templar.template(task_vars[name])
        return None
