#!/usr/bin/python
# Copyright: nfmig maintainers
# SPDX-License-Identifier: Apache-2.0
"""nfmig.nfmig.standby: hot-standby replication as a background `nfmig standby` process."""

from __future__ import annotations

DOCUMENTATION = r"""
module: standby
short_description: Start, stop and watch nfmig hot-standby replication
version_added: 0.1.0
description:
  - Keeps hot-standby copies of a NAT's sessions in other NF instances, as
    C(nfmig standby) does, the source followed by a YANG-Push subscription and every
    change written to each standby.
  - Replication lasts as long as the source is to be protected, far longer than a task, so
    O(state=started) starts it as a detached C(nfmig standby) process on the host the
    module runs on (its own session, output into a log file beside O(status_file)), which
    keeps its status in O(status_file). The replication is known by that file, and the
    file's C(.pid) companion names the process.
  - O(state=stopped) ends it (its last status is kept in O(status_file)), and
    O(state=status) returns the status file's content.
author:
  - nfmig maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
  - nfmig.nfmig.connection
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  state:
    description:
      - V(started), replication runs (started when it does not, restarted when it runs
        with other options); V(stopped), it does not; V(status), only read its status.
    type: str
    choices: [started, stopped, status]
    default: started
  status_file:
    description:
      - Where the replication keeps its status (JSON, rewritten every half second; what
        C(nfmig failover --status-file) reads). Names the replication; its process id is
        kept in the same path with C(.pid) added and its output in C(.log).
    type: path
    required: true
  source:
    description:
      - The NAT to follow, C(netconf://[user@]host[:port]). Required with
        O(state=started).
    type: str
  targets:
    description:
      - The standbys, C(netconf://[user@]host[:port]) each. Required with
        O(state=started).
    type: list
    elements: str
  select:
    description:
      - Which sessions, V(all) or C(subscriber=ADDRESS_OR_PREFIX) (several allowed).
    type: list
    elements: str
    default: [all]
  dampening:
    description:
      - The source gathers the changes of this many milliseconds (10 to 60000) into one
        notification.
    type: int
    default: 20
  hold:
    description:
      - Lifetime, in seconds (60 to 65535), a standby session keeps at least while the
        source refreshes it unseen.
    type: int
    default: 3600
  failover_after:
    description:
      - Fail over to the first reachable standby once the source has been unreachable
        this many seconds (by default, never by itself).
    type: float
  wait:
    description:
      - With O(state=started), wait until the source and every standby are connected,
        at most O(timeout) seconds, and fail when they are not by then.
      - With O(state=stopped), how the process is waited for does not depend on it.
    type: bool
    default: true
notes:
  - The module's O(timeout) bounds how long O(wait) and stopping wait; the replication's
    own replies are bounded by C(nfmig standby)'s defaults.
  - The password reaches the process in its environment (E(NFMIG_PASSWORD)), never on
    its command line.
seealso:
  - module: nfmig.nfmig.migrate
"""

EXAMPLES = r"""
- name: Keep a hot standby of each NAT in its spare
  nfmig.nfmig.standby:
    source: "netconf://{{ ansible_host }}:830"
    targets:
      - "netconf://{{ spare_nat }}:830"
    status_file: "/var/lib/nfmig/standby-{{ inventory_hostname }}.json"
  delegate_to: localhost

- name: How far behind the standbys are
  nfmig.nfmig.standby:
    state: status
    status_file: "/var/lib/nfmig/standby-{{ inventory_hostname }}.json"
  delegate_to: localhost
  register: replication

- name: Stop the replication
  nfmig.nfmig.standby:
    state: stopped
    status_file: "/var/lib/nfmig/standby-{{ inventory_hostname }}.json"
  delegate_to: localhost
"""

RETURN = r"""
running:
  description: Whether the replication process runs after the task.
  returned: always
  type: bool
  sample: true
pid:
  description: The replication process's id, while it runs.
  returned: when RV(running)
  type: int
  sample: 41234
status:
  description:
    - The status file's content, the source, its session and change counts, and per
      standby whether it is connected, what it applied, what is pending and its lag.
  returned: when the status file exists
  type: dict
  sample:
    source: netconf://admin@127.0.0.1:8830
    source_connected: true
    sessions: 10000
    targets:
      - {endpoint: "netconf://admin@127.0.0.1:8831", connected: true, pending: 0}
log_file:
  description: Where the replication process writes its output.
  returned: always
  type: str
  sample: /var/lib/nfmig/standby-nat-a.json.log
"""

# Ansible's layout: the documentation first, then the code.
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.nfmig.nfmig.plugins.module_utils.nfmig_common import (  # noqa: E402
    PASSWORD_ENV,
    EndpointError,
    SelectionError,
    check_timeouts,
    connection_argument_spec,
    endpoint,
    require_nfmig,
    selection,
)


def command(p: dict[str, Any]) -> list[str]:
    """The `nfmig standby` command line, without secrets (they go in the environment)."""
    argv = [sys.executable, "-m", "nfmig", "standby", str(endpoint(p["source"], p)),
            *(str(endpoint(t, p)) for t in p["targets"]),
            "--status-file", p["status_file"], "--dampening", str(p["dampening"]),
            "--hold", str(p["hold"])]
    for text in p["select"]:
        argv += ["--select", text]
    if p["failover_after"] is not None:
        argv += ["--failover-after", str(p["failover_after"])]
    if p["private_key_file"]:
        argv += ["--ssh-key", p["private_key_file"]]
    if p["known_hosts"]:
        argv += ["--known-hosts", p["known_hosts"]]
    if p["ca_file"]:
        argv += ["--ca-file", p["ca_file"]]
    if not p["host_key_checking"]:
        argv.append("--insecure-no-host-key-check")
    return argv


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a process that has ended but waits to be reaped by a parent
    that is not this module is a zombie, which /proc still lists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def running(pid_file: Path) -> tuple[int | None, list[str] | None]:
    """The replication's pid and command line, when its process still runs (and is the
    one that was started: pids are reused)."""
    try:
        record = json.loads(pid_file.read_text())
        pid, argv = int(record["pid"]), list(record["argv"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None, None
    if not alive(pid) or b"standby" not in cmdline:
        return None, None
    return pid, argv


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stop(pid: int, timeout: float) -> None:
    """SIGTERM (the process writes its last status and exits), SIGKILL if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def start(module: AnsibleModule, argv: list[str], status: Path, pid_file: Path,
          log: Path) -> int:
    p = module.params
    env = dict(os.environ)
    env.pop(PASSWORD_ENV, None)
    if p["password"]:
        env[PASSWORD_ENV] = p["password"]
    elif os.environ.get(PASSWORD_ENV):
        env[PASSWORD_ENV] = os.environ[PASSWORD_ENV]
    status.unlink(missing_ok=True)  # a status left by an earlier run says nothing now
    status.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Its own session and no inherited descriptors: the process outlives the module,
        # and Ansible, which waits for the module's output to close, does not wait for it.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=str(status.parent),
                                   start_new_session=True, close_fds=True)
    pid_file.write_text(json.dumps({"pid": process.pid, "argv": argv}))
    os.chmod(pid_file, 0o600)
    if not p["wait"]:
        return process.pid
    deadline = time.monotonic() + p["timeout"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_file.unlink(missing_ok=True)
            module.fail_json(msg=f"nfmig standby exited with status {process.returncode}",
                             log=log.read_text(errors="replace")[-4000:], log_file=str(log))
        current = read_status(status)
        if current and current.get("source_connected") and all(
                t.get("connected") for t in current.get("targets", [])):
            return process.pid
        time.sleep(0.2)
    current = read_status(status)
    stop(process.pid, 10)
    process.wait()
    pid_file.unlink(missing_ok=True)
    module.fail_json(msg=f"the replication was not connected within {p['timeout']} s; "
                     "stopped it", status=current, log_file=str(log),
                     log=log.read_text(errors="replace")[-4000:])
    return process.pid  # not reached: fail_json exits


def main() -> None:
    spec = {
        "state": {"type": "str", "choices": ["started", "stopped", "status"],
                  "default": "started"},
        "status_file": {"type": "path", "required": True},
        "source": {"type": "str"},
        "targets": {"type": "list", "elements": "str"},
        "select": {"type": "list", "elements": "str", "default": ["all"]},
        "dampening": {"type": "int", "default": 20},
        "hold": {"type": "int", "default": 3600},
        "failover_after": {"type": "float"},
        "wait": {"type": "bool", "default": True},
        **connection_argument_spec(),
    }
    module = AnsibleModule(spec, supports_check_mode=True,
                           required_if=[("state", "started", ("source", "targets"))])
    require_nfmig(module)
    check_timeouts(module)
    p = module.params
    status = Path(p["status_file"]).absolute()
    pid_file = status.with_name(status.name + ".pid")
    log = status.with_name(status.name + ".log")
    pid, argv = running(pid_file)
    result: dict[str, Any] = {"log_file": str(log)}
    changed = False
    if p["state"] == "started":
        try:
            if not 10 <= p["dampening"] <= 60_000 or not 60 <= p["hold"] <= 65_535:
                raise ValueError("dampening must be 10..60000 ms and hold 60..65535 s")
            selection(p["select"])  # refused here rather than by the process
            wanted = command(p)
        except (SelectionError, EndpointError, ValueError) as exc:
            module.fail_json(msg=str(exc))
        if pid is None or argv != wanted:
            changed = True
            if not module.check_mode:
                if pid is not None:
                    stop(pid, p["timeout"])
                pid = start(module, wanted, status, pid_file, log)
    elif p["state"] == "stopped" and pid is not None:
        changed = True
        if not module.check_mode:
            stop(pid, p["timeout"])
            pid_file.unlink(missing_ok=True)
            pid = None
    result["running"] = pid is not None
    if pid is not None:
        result["pid"] = pid
    current = read_status(status)
    if current is not None:
        result["status"] = current
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
