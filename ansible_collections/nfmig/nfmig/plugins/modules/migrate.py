#!/usr/bin/python
# Copyright: nfmig maintainers
# SPDX-License-Identifier: Apache-2.0
"""nfmig.nfmig.migrate: a migration of NAT sessions, run in-process with nfmig's Python API."""

from __future__ import annotations

DOCUMENTATION = r"""
module: migrate
short_description: Move or copy NAT sessions between NF instances with nfmig
version_added: 0.1.0
description:
  - Moves the selected NAT sessions from one or more source NF instances to a target
    (or to several, split by subscriber prefix) over NETCONF or RESTCONF, live, with
    nfmig's migrator run inside the module (the same steps and report as
    C(nfmig migrate)).
  - O(state=evacuated) is the desired state in which the sources hold none of the
    selected sessions; when no source holds any, nothing is run and the task is ok.
  - O(state=present) copies the selected sessions to the target and leaves them on the
    sources, switching nothing (C(nfmig migrate --keep-source)); when the targets already
    hold every one of them with the same translation, nothing is run.
  - In check mode the migration's dry run is run (everything up to validating the
    targets' candidate datastore, then discarded) and the task says how many sessions
    would move.
  - With C(--diff) the diff lists the sessions that moved (or would move), at most
    O(diff_limit) of them plus a count of the rest.
  - With O(plan), a whole site is evacuated instead, from the plan of C(nfmig evacuate)
    (many NATs, each moved by a migration of its own, O(parallel) at a time), run inside
    the module.
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
    support: full
  platform:
    platforms: posix
options:
  source:
    description:
      - The source NF instances, each C(netconf://[user@]host[:port]) (SSH, port 830 when
        left out) or C(restconf://[user@]host[:port]) (HTTPS, port 443).
      - Several sources move into one O(target) (many to one).
      - Exactly one of O(source) and O(plan) is given.
    type: list
    elements: str
    aliases: [sources]
  target:
    description:
      - The target NF instance, written as O(source) is.
      - Exactly one of O(target) and O(split) is given.
    type: str
  split:
    description:
      - One to many, by subscriber prefix. Each key is a prefix (for example
        V(10.0.1.0/24)) and its value the target that receives the sessions of those
        subscribers; the longest prefix wins, and sessions of other subscribers stay.
      - Cannot be combined with O(select).
    type: dict
  select:
    description:
      - Which sessions, as C(nfmig migrate --select) takes them. V(all), or
        C(subscriber=ADDRESS_OR_PREFIX) (several allowed), or one C(xpath=EXPRESSION)
        over the model (prefix C(nfnat)).
    type: list
    elements: str
    default: [all]
  state:
    description:
      - V(evacuated), the selected sessions move to the targets and leave the sources,
        and the traffic is switched over (O(switchover)).
      - V(present), the selected sessions are copied to the targets and stay on the
        sources; nothing is switched.
    type: str
    choices: [evacuated, present]
    default: evacuated
  switchover:
    description:
      - How the traffic moves once the targets hold the sessions (O(state=evacuated)).
        V(gateway) moves the sources' gateway-address entries to the target (whole NATs
        only), V(none) switches nothing, anything else is a shell command run on the
        host the module runs on, as with C(nfmig migrate --switchover).
    type: str
    default: gateway
  partial:
    description:
      - Leave on their source the sessions a target says it cannot hold and move the rest;
        without it such a migration is refused with their list.
    type: bool
    default: false
  with_policy:
    description:
      - Give a target whose nat-policy does not translate to the moved sessions' external
        addresses the source's policy (without its gateway addresses) in the same commit;
        without it such a migration is refused.
    type: bool
    default: false
  freeze:
    description:
      - Hold the selection's new sessions on the sources during the short window in which
        the last changes are written (V(false) for sources without the freeze operation;
        sessions they open meanwhile stay on them).
    type: bool
    default: true
  freeze_timeout:
    description:
      - Seconds (1 to 3600) after which a source thaws by itself even if the migrator
        vanishes.
    type: int
    default: 60
  confirm_timeout:
    description:
      - Seconds (1 to 86400) within which a target's confirmed commit must be confirmed,
        else the target reverts it.
    type: int
    default: 120
  compression:
    description:
      - SSH compression on C(netconf://) ends and gzip bodies on C(restconf://) ends,
        where the server offers them. V(auto) compresses for every end but those on the
        loopback of the host the module runs on.
    type: str
    choices: [auto, 'on', 'off']
    default: auto
  model:
    description:
      - The model the sessions are read and written through, C(nfmig-nat) or RFC 8512
        C(ietf-nat) mapping entries (every end must implement ietf-nat and
        nfmig-nat-ietf).
      - With V(ietf-nat) the sources are not read before the migration to decide whether
        anything is left to do; the migration runs, and the task is changed only when it
        moved sessions.
    type: str
    choices: [nfmig-nat, ietf-nat]
    default: nfmig-nat
  migration_id:
    description:
      - The migration's name in announcements and freeze (default, generated).
    type: str
  require_revision:
    description:
      - Refuse unless every end implements this nfmig-nat revision (a date).
    type: str
  require_features:
    description:
      - Refuse unless every end supports these nfmig-nat features.
    type: list
    elements: str
    default: []
  report_file:
    description:
      - Also write the migration's JSON report to this file, on the host the module runs
        on (as C(nfmig migrate --report-file); readable by C(nfmig report)).
    type: path
  diff_limit:
    description:
      - At most this many sessions are named in the diff; the rest are counted.
    type: int
    default: 1000
  plan:
    description:
      - A site evacuation plan, as C(nfmig evacuate PLAN) takes it, either the path of a
        YAML or JSON file on the host the module runs on, or the same mapping inline
        (C(defaults), and C(pairs) or C(sources) with a pool of C(targets)).
      - The plan's C(defaults) say how each of its migrations runs; the options of a
        single migration (O(select), O(state), O(switchover), O(freeze) and the others
        after O(state) in this list) do not apply. The connection options given (or
        filled from the host's variables) take the place of the plan's.
      - The task is changed when sessions moved, and fails when a NAT of the plan was not
        moved, with each such NAT's reason; the others are moved all the same.
      - In check mode every migration of the plan runs its dry run.
    type: raw
  plan_state_file:
    description:
      - With O(plan), where the job's state is kept (how far each pair got). When the
        file exists, the job it holds is continued (only what is not done runs), so running
        the task again after a failure or an interruption finishes the evacuation, and
        after a complete one does nothing (ok, not changed).
      - Without it every pair of the plan runs each time.
    type: path
  parallel:
    description:
      - With O(plan), how many migrations run at once.
    type: int
    default: 4
  per_target:
    description:
      - With O(plan), how many migrations write into one target at once.
    type: int
    default: 1
  windows:
    description:
      - With O(plan), how many NATs may be inside their freeze window at once.
    type: int
    default: 1
seealso:
  - module: nfmig.nfmig.sessions_info
  - module: nfmig.nfmig.standby
notes:
  - A failed migration fails the task with the migration's reason; before the targets
    confirm, everything is rolled back and every session stays where it was. Running the
    same task again after any failure completes it.
  - The task is changed only when sessions moved (or, in check mode, would move).
"""

EXAMPLES = r"""
- name: Evacuate each NAT of the site to its spare
  nfmig.nfmig.migrate:
    source: "netconf://{{ ansible_host }}:830"
    target: "netconf://{{ spare_nat }}:830"
    known_hosts: /etc/nfmig/known_hosts
  delegate_to: localhost

- name: Copy one subscriber's sessions, keep them on the source
  nfmig.nfmig.migrate:
    source: netconf://admin@nat-a.example.net
    target: netconf://admin@nat-b.example.net
    select:
      - subscriber=10.0.1.0/24
    state: present
  delegate_to: localhost

- name: Split a NAT by subscriber prefix over two others, giving them its policy
  nfmig.nfmig.migrate:
    source: netconf://admin@nat-a.example.net
    split:
      10.0.1.0/24: netconf://admin@nat-b.example.net
      10.0.2.0/24: netconf://admin@nat-c.example.net
    with_policy: true
    switchover: none
  delegate_to: localhost

- name: Evacuate a whole site from its plan, continuing the job when run again
  nfmig.nfmig.migrate:
    plan: /etc/nfmig/site-a.yaml
    plan_state_file: /var/lib/nfmig/site-a.state
    parallel: 4
  delegate_to: localhost
  run_once: true

- name: What would move (check mode, with the list of sessions)
  nfmig.nfmig.migrate:
    source: netconf://admin@nat-a.example.net
    target: netconf://admin@nat-b.example.net
  delegate_to: localhost
  check_mode: true
  diff: true
  register: would
"""

RETURN = r"""
result:
  description:
    - The migration's outcome, V(success), V(dry-run) (check mode), or V(unchanged)
      when nothing was left to do and no migration ran.
  returned: success
  type: str
  sample: success
moved:
  description: Sessions moved (O(state=evacuated)) or copied (O(state=present)).
  returned: always
  type: int
  sample: 10000
would_move:
  description:
    - Sessions the migration moves; in check mode, those the dry run found to move.
  returned: always
  type: int
  sample: 10000
sessions:
  description: Sessions selected on the sources.
  returned: always
  type: int
  sample: 10000
freeze_ms:
  description:
    - How long new sessions were held on the sources, in milliseconds; null when no
      freeze window was opened.
  returned: when a migration ran
  type: float
  sample: 41.3
migration_id:
  description: The migration's name, as announced to the NF instances.
  returned: when a migration ran
  type: str
  sample: nfmig-20261205T101500-0a1b2c
precheck_seconds:
  description:
    - Seconds spent reading the ends to decide whether the desired state holds already
      (null with O(model=ietf-nat), which has no such read).
  returned: always
  type: float
  sample: 0.04
report:
  description:
    - The migration's report as C(nfmig migrate --json) prints it, sessions, bytes each
      way, seconds per phase, the freeze window, warnings.
    - With O(plan), the site's report as C(nfmig evacuate --json) prints it, its totals
      and per NAT its state and its migration's report.
  returned: when a migration ran
  type: dict
  sample:
    result: success
    sessions_selected: 10000
    sessions_moved: 10000
    total_seconds: 1.9
    phase_seconds: {connect: 0.05, read: 0.4, edit: 0.6}
    freeze_window: {seconds: 0.041}
"""

# Ansible's layout: the documentation first, then the code.
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.nfmig.nfmig.plugins.module_utils.nfmig_common import (  # noqa: E402
    EndpointError,
    SelectionError,
    check_timeouts,
    connection_argument_spec,
    credentials,
    endpoint,
    open_connection,
    read_selected,
    require_nfmig,
    selection,
)

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
STATE_FILTER = f'<subtree-filter><nat-state xmlns="{NAT_NS}"/></subtree-filter>'
_COUNT = re.compile(r"<session-count>\s*(\d+)\s*<")


def argument_spec() -> dict[str, dict[str, Any]]:
    return {
        "source": {"type": "list", "elements": "str", "aliases": ["sources"]},
        "target": {"type": "str"},
        "split": {"type": "dict"},
        "select": {"type": "list", "elements": "str", "default": ["all"]},
        "state": {"type": "str", "choices": ["evacuated", "present"],
                  "default": "evacuated"},
        "switchover": {"type": "str", "default": "gateway"},
        "partial": {"type": "bool", "default": False},
        "with_policy": {"type": "bool", "default": False},
        "freeze": {"type": "bool", "default": True},
        "freeze_timeout": {"type": "int", "default": 60},
        "confirm_timeout": {"type": "int", "default": 120},
        "compression": {"type": "str", "choices": ["auto", "on", "off"], "default": "auto"},
        "model": {"type": "str", "choices": ["nfmig-nat", "ietf-nat"],
                  "default": "nfmig-nat"},
        "migration_id": {"type": "str"},
        "require_revision": {"type": "str"},
        "require_features": {"type": "list", "elements": "str", "default": []},
        "report_file": {"type": "path"},
        "diff_limit": {"type": "int", "default": 1000},
        "plan": {"type": "raw"},
        "plan_state_file": {"type": "path"},
        "parallel": {"type": "int", "default": 4},
        "per_target": {"type": "int", "default": 1},
        "windows": {"type": "int", "default": 1},
        **connection_argument_spec(),
    }


def build(module: AnsibleModule) -> Any:
    """The Migration the options describe (nothing connects yet)."""
    from nfmig.client.migrate import Migration, Options
    from nfmig.client.selection import Split

    p = module.params
    if not p["switchover"].strip():
        raise ValueError("switchover needs gateway, none or a command")
    if not 1 <= p["freeze_timeout"] <= 3600:
        raise ValueError("freeze_timeout must be 1..3600 seconds")
    if not 1 <= p["confirm_timeout"] <= 86400:
        raise ValueError("confirm_timeout must be 1..86400 seconds")
    sources = [endpoint(s, p) for s in p["source"]]
    if p["split"]:
        if p["select"] not in ([], ["all"]):
            raise ValueError("split selects by prefix; it cannot be combined with select")
        chosen: Any = Split([(prefix, endpoint(str(t), p)) for prefix, t in p["split"].items()])
        targets = []
    else:
        chosen = selection(p["select"])
        targets = [endpoint(p["target"], p)]
    options = Options(
        keep_source=p["state"] == "present", dry_run=module.check_mode,
        switchover=p["switchover"].strip() if p["state"] == "evacuated" else "none",
        partial=p["partial"], with_policy=p["with_policy"], freeze=p["freeze"],
        freeze_timeout=p["freeze_timeout"], confirm_timeout=p["confirm_timeout"],
        migration_id=p["migration_id"], require_revision=p["require_revision"],
        require_features=tuple(p["require_features"]), model=p["model"],
        credentials=credentials(p, {"on": True, "off": False}.get(p["compression"])),
        rpc_timeout=p["timeout"], connect_timeout=p["connect_timeout"])
    return Migration(sources, targets, chosen, options)


def nothing_to_do(migration: Any, state: str) -> bool:
    """Whether the desired state holds already: no source holds a selected session
    (evacuated), or every target holds each selected session of the sources with the same
    translation (present). Reads only; the locks and checks are the migration's."""
    options = migration.options
    held: dict[tuple, Any] = {}
    for source in migration.sources:
        conn = open_connection(source.endpoint, options.credentials, options.rpc_timeout,
                               options.connect_timeout)
        try:
            if state == "evacuated" and migration.selection.kind == "all":
                # the whole table: its count says it, without reading every session
                count = session_count(conn)
                if count is not None:
                    if count:
                        return False
                    continue
            entries = read_selected(conn, migration.selection)
        finally:
            conn.close()
        if state == "evacuated" and entries:
            return False
        held.update((e.key, e) for e in entries)
    if state == "evacuated" or not held:
        return True
    for target in migration.targets:
        conn = open_connection(target.endpoint, options.credentials, options.rpc_timeout,
                               options.connect_timeout)
        try:
            there = {e.key: e.endpoint for e in read_selected(conn, target.selection,
                                                              "running")}
        finally:
            conn.close()
        for key in [k for k, e in held.items() if target.selection.matches(e)]:
            if key not in there or there[key] != held[key].endpoint:
                return False
            del held[key]
    return not held


def session_count(conn: Any) -> int | None:
    """The source's nat-state/session-count, or None when it has none."""
    text = conn.get_data("operational", STATE_FILTER)
    found = _COUNT.search(text)
    return int(found.group(1)) if found else None


def session_diff(migration: Any, limit: int) -> dict[str, str]:
    """The sessions that moved (or would), each on the end it was on and the end it is on
    now; at most ``limit`` of them named, the rest counted."""
    keep = migration.options.keep_source
    before: list[str] = []
    after: list[str] = []
    total = 0
    for target in migration.targets:
        for entry, source in target.entries:
            total += 1
            if total > limit:
                continue
            key = entry.key_text()
            before.append(f"{key} on {source.endpoint}")
            after.extend([f"{key} on {source.endpoint}"] if keep else [])
            after.append(f"{key} on {target.endpoint}")
    if total > limit:
        more = f"... and {total - limit} more sessions"
        before.append(more)
        after.append(more)
    return {"before_header": "sessions before", "after_header": "sessions after",
            "before": "".join(line + "\n" for line in before),
            "after": "".join(line + "\n" for line in after)}


def write_report(module: AnsibleModule, data: dict) -> None:
    """The report into report_file, if the task names one (a warning if it cannot)."""
    path = module.params["report_file"]
    if path:
        try:
            Path(path).write_text(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            module.warn(f"cannot write {path}: {exc.strerror}")


def run_plan(module: AnsibleModule) -> None:
    """The site evacuation of ``plan``, in this process; exits the module."""
    try:
        from nfmig.client.evacuate import Evacuation, EvacuationOptions, Plan, PlanError
    except ImportError as exc:
        module.fail_json(msg=f"the nfmig installed has no site evacuation ({exc}); "
                         "upgrade it to use plan")
    p = module.params
    if p["state"] != "evacuated":
        module.fail_json(msg="a plan says whether sources are kept (defaults.keep-source); "
                         "leave state out")
    plan_arg = p["plan"]
    if not isinstance(plan_arg, (str, dict)):
        module.fail_json(msg="plan must be the path of a plan file or a mapping")
    try:
        if isinstance(plan_arg, dict) and p["user"]:
            defaults = dict(plan_arg.get("defaults") or {})
            defaults.setdefault("user", p["user"])
            plan_arg = {**plan_arg, "defaults": defaults}
        plan = Plan.load(plan_arg)
        state_file = Path(p["plan_state_file"]) if p["plan_state_file"] else None
        evacuation = Evacuation(plan, EvacuationOptions(
            parallel=p["parallel"], per_target=p["per_target"], windows=p["windows"],
            state_file=state_file, resume=state_file is not None and state_file.exists(),
            dry_run=True if module.check_mode else None,
            credentials=plan_credentials(plan.defaults.credentials(), p)))
    except (PlanError, EndpointError, ValueError) as exc:
        module.fail_json(msg=str(exc))
    report = evacuation.run()
    data = report.to_dict()
    write_report(module, data)
    totals = data["totals"]
    ran = [n["report"] for n in data["nats"] if n.get("report")]
    selected = sum(r["sessions_selected"] for r in ran)
    would = selected if report.dry_run else totals["sessions_moved"]
    freezes = [r["freeze_window"]["seconds"] for r in ran
               if r["freeze_window"]["seconds"] is not None]
    result: dict[str, Any] = {
        "result": data["result"], "moved": totals["sessions_moved"], "would_move": would,
        "sessions": selected, "report": data, "precheck_seconds": None,
        "freeze_ms": round(max(freezes) * 1000, 3) if freezes else None}
    if not report.ok:
        reasons = "; ".join(f"{n['id']} {n['source']}: {n.get('reason') or n['state']}"
                            for n in report.failed)
        module.fail_json(msg=f"evacuation {data['result']}: {totals['failed']} of "
                         f"{totals['nats']} NATs not moved ({reasons})", **result)
    if module._diff:
        result["diff"] = plan_diff(data)
    module.exit_json(changed=would > 0, **result)


def plan_credentials(base: Any, p: dict[str, Any]) -> Any:
    """The plan's credentials, with the module's connection options in their place where
    given (the plan's host key check can only be made stricter)."""
    if p["password"]:
        base.password, base.prompt = p["password"], None
    if p["private_key_file"]:
        base.key_file = Path(p["private_key_file"])
    if p["known_hosts"]:
        base.known_hosts = Path(p["known_hosts"])
    if p["ca_file"]:
        base.ca_file = Path(p["ca_file"])
    base.verify_host_keys = base.verify_host_keys and p["host_key_checking"]
    base.prompt = None  # no terminal to ask on
    return base


def plan_diff(data: dict[str, Any]) -> dict[str, str]:
    """Per NAT of the plan, where its sessions were and where they are."""
    before, after = [], []
    for n in data["nats"]:
        r = n.get("report")
        if not r:
            continue
        count = r["sessions_selected"] if r["dry_run"] else r["sessions_moved"]
        if count:
            before.append(f"NAT {n['id']}: {count} sessions on {n['source']}\n")
            kept = [f"NAT {n['id']}: {count} sessions on {n['source']}\n"] \
                if r["keep_source"] else []
            after.extend([*kept, f"NAT {n['id']}: {count} sessions on {n['target']}\n"])
    return {"before_header": "sessions before", "after_header": "sessions after",
            "before": "".join(before), "after": "".join(after)}


def main() -> None:
    module = AnsibleModule(argument_spec(), supports_check_mode=True,
                           mutually_exclusive=[("target", "split"), ("plan", "source"),
                                               ("plan", "target"), ("plan", "split")],
                           required_one_of=[("source", "plan")])
    require_nfmig(module)
    check_timeouts(module)
    p = module.params
    if p["plan"] is not None:
        for name in ("parallel", "per_target", "windows"):
            if p[name] < 1:
                module.fail_json(msg=f"{name} must be at least 1")
        run_plan(module)
    if not p["target"] and not p["split"]:
        module.fail_json(msg="one of the following is required: target, split")
    try:
        migration = build(module)
    except (SelectionError, EndpointError, ValueError) as exc:
        module.fail_json(msg=str(exc))
    precheck: float | None = None
    if p["model"] == "nfmig-nat":
        t0 = time.perf_counter()
        try:
            done = nothing_to_do(migration, p["state"])
            precheck = round(time.perf_counter() - t0, 6)
        except EndpointError as exc:
            module.fail_json(msg=str(exc))
        except Exception as exc:  # a reply the read could not use: say which, not a trace
            module.fail_json(msg=f"reading the selected sessions failed: {exc}")
        if done:
            module.exit_json(changed=False, result="unchanged", moved=0, would_move=0,
                             sessions=0, precheck_seconds=precheck,
                             msg="nothing to do: the desired state holds")
    report = migration.run()
    data = report.to_dict()
    write_report(module, data)
    for warning in report.warnings:
        module.warn(warning)
    would = report.sessions_selected if report.dry_run else report.sessions_moved
    result: dict[str, Any] = {
        "result": report.result, "moved": report.sessions_moved, "would_move": would,
        "sessions": report.sessions_selected, "migration_id": report.migration_id,
        "report": data, "precheck_seconds": precheck,
        "freeze_ms": None if report.freeze_seconds is None
        else round(report.freeze_seconds * 1000, 3)}
    if not report.ok:
        module.fail_json(msg=f"migration {report.result}: {report.reason}", **result)
    if module._diff:
        result["diff"] = session_diff(migration, max(p["diff_limit"], 0))
    module.exit_json(changed=would > 0, **result)


if __name__ == "__main__":
    main()
