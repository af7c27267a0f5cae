#!/usr/bin/python
# Copyright: nfmig maintainers
# SPDX-License-Identifier: Apache-2.0
"""nfmig.nfmig.sessions_info: what one NF instance holds, read over NETCONF."""

from __future__ import annotations

DOCUMENTATION = r"""
module: sessions_info
short_description: Count and list the NAT sessions of an NF instance
version_added: 0.1.0
description:
  - Reads an NF instance's C(nat-state) (its session count and counters) and the
    sessions of a selection over NETCONF or RESTCONF, with nfmig's client, and returns
    their count by protocol and, when asked, the first of them.
  - Changes nothing.
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
  endpoint:
    description:
      - The NF instance, C(netconf://[user@]host[:port]) (SSH, port 830 when left out)
        or C(restconf://[user@]host[:port]) (HTTPS, port 443).
    type: str
    required: true
  select:
    description:
      - Which sessions to count and list. V(all), or C(subscriber=ADDRESS_OR_PREFIX)
        (several allowed), or one C(xpath=EXPRESSION) over the model (prefix C(nfnat)).
    type: list
    elements: str
    default: [all]
  datastore:
    description:
      - The datastore the sessions are read from; V(operational) is what the NAT holds.
    type: str
    choices: [operational, running]
    default: operational
  list_sessions:
    description:
      - Also return the selected sessions themselves (at most O(limit) of them).
    type: bool
    default: false
  limit:
    description:
      - At most this many sessions are returned in RV(sessions).
    type: int
    default: 1000
seealso:
  - module: nfmig.nfmig.migrate
"""

EXAMPLES = r"""
- name: Count the sessions of each NAT
  nfmig.nfmig.sessions_info:
    endpoint: "netconf://{{ ansible_host }}:830"
  delegate_to: localhost
  register: nat

- name: Fail when a NAT still holds sessions after its evacuation
  ansible.builtin.assert:
    that: nat.session_count == 0

- name: The first 20 sessions of one subscriber
  nfmig.nfmig.sessions_info:
    endpoint: netconf://admin@nat-a.example.net
    select:
      - subscriber=10.0.1.7
    list_sessions: true
    limit: 20
  delegate_to: localhost
"""

RETURN = r"""
session_count:
  description: Sessions in the NAT's table (C(nat-state/session-count)).
  returned: success
  type: int
  sample: 10000
implementation:
  description: Which NAT implementation serves the instance.
  returned: success
  type: str
  sample: simulated
sessions_created:
  description: Sessions created by traffic since the instance started.
  returned: success
  type: int
  sample: 120
sessions_expired:
  description: Sessions removed by idle timeout since the instance started.
  returned: success
  type: int
  sample: 7
sessions_imported:
  description: Sessions written through the management interface since it started.
  returned: success
  type: int
  sample: 10000
selected:
  description: Sessions of the selection in O(datastore).
  returned: success
  type: int
  sample: 250
by_protocol:
  description: The selected sessions counted by protocol.
  returned: success
  type: dict
  sample: {TCP: 200, UDP: 45, ICMP: 5}
sessions:
  description:
    - The first O(limit) selected sessions, in the order the NF instance sent them.
  returned: when O(list_sessions=true)
  type: list
  elements: dict
  contains:
    protocol:
      description: The flow's protocol.
      type: str
      returned: always
    src_address:
      description: The inside host's address.
      type: str
      returned: always
    src_port:
      description: The inside host's port (or ICMP identifier).
      type: str
      returned: always
    dst_address:
      description: The outside host's address.
      type: str
      returned: always
    dst_port:
      description: The outside host's port.
      type: str
      returned: always
    translated_address:
      description: The address the flow is translated to, if any.
      type: str
      returned: always
    translated_port:
      description: The port the flow is translated to, if any.
      type: str
      returned: always
  sample:
    - {protocol: TCP, src_address: 10.0.1.7, src_port: "40001",
       dst_address: 198.51.100.9, dst_port: "443",
       translated_address: 192.0.2.1, translated_port: "61001"}
truncated:
  description: Whether more sessions were selected than RV(sessions) holds.
  returned: when O(list_sessions=true)
  type: bool
  sample: false
"""

# Ansible's layout: the documentation first, then the code.
import re  # noqa: E402
from collections import Counter  # noqa: E402
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
_STATE_LEAF = re.compile(r"<(implementation|session-count|sessions-created|sessions-expired|"
                         r"sessions-imported)>\s*([^<]*?)\s*<")
KEY_NAMES = ("protocol", "src_address", "src_port", "dst_address", "dst_port")


def nat_state(conn: Any) -> dict[str, Any]:
    """The nat-state leaves, numbers as numbers."""
    text = conn.get_data("operational", STATE_FILTER)
    state: dict[str, Any] = {"implementation": None, "session_count": None,
                             "sessions_created": None, "sessions_expired": None,
                             "sessions_imported": None}
    for name, value in _STATE_LEAF.findall(text):
        key = name.replace("-", "_")
        state[key] = value if key == "implementation" else int(value)
    return state


def session_dict(entry: Any) -> dict[str, Any]:
    out = dict(zip(KEY_NAMES, entry.key, strict=True))
    translated = entry.endpoint or (None, None, None)  # (protocol, address, port)
    out["translated_address"] = translated[1]
    out["translated_port"] = translated[2] or None
    return out


def main() -> None:
    spec = {
        "endpoint": {"type": "str", "required": True},
        "select": {"type": "list", "elements": "str", "default": ["all"]},
        "datastore": {"type": "str", "choices": ["operational", "running"],
                      "default": "operational"},
        "list_sessions": {"type": "bool", "default": False},
        "limit": {"type": "int", "default": 1000},
        **connection_argument_spec(),
    }
    module = AnsibleModule(spec, supports_check_mode=True)
    require_nfmig(module)
    check_timeouts(module)
    p = module.params
    try:
        where = endpoint(p["endpoint"], p)
        chosen = selection(p["select"])
        conn = open_connection(where, credentials(p), p["timeout"], p["connect_timeout"])
    except (SelectionError, EndpointError, ValueError) as exc:
        module.fail_json(msg=str(exc))
    try:
        result: dict[str, Any] = nat_state(conn)
        entries = read_selected(conn, chosen, p["datastore"])
    except Exception as exc:  # an rpc-error or a lost connection: one line, not a trace
        module.fail_json(msg=f"reading {where} failed: {exc}")
    finally:
        conn.close()
    result["selected"] = len(entries)
    result["by_protocol"] = dict(Counter(e.key[0] for e in entries))
    if p["list_sessions"]:
        limit = max(p["limit"], 0)
        result["sessions"] = [session_dict(e) for e in entries[:limit]]
        result["truncated"] = len(entries) > limit
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
