"""The switchover of a live migration: traffic leaves the sources for the targets.

Sessions move first, the traffic after them, the sources delete last: a session deleted
while its packets still reach the source is answered with a reset there. Three ways:

- ``gateway`` (the default): the gateway addresses an nfmig NAT answers for are its
  configuration (``nat-policy/gateway-address``). They are written into the target in the
  same confirmed commit as the last sessions (the target announces them to its neighbours
  as it takes them), and taken off the source once that commit is confirmed. Only a
  migration of whole NATs (selection ``all``, one target) moves them: a subscriber's
  traffic is steered by routing outside the NATs, which a hook does.
- a command (``--switchover CMD``): run once the targets hold every session, told the
  migration in its environment; it exits 0 once the traffic has moved.
- ``none``: nothing is switched (the traffic moves by other means, or there is none).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from lxml import etree

from .netconf import NAT_NS, NC_NS

GATEWAY = "gateway"
NONE = "none"
HOOK_TIMEOUT = 120  # seconds a switchover command may take
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class SwitchoverError(Exception):
    """The traffic could not be switched (the sessions are on both sides then)."""


@dataclass(frozen=True)
class GatewayAddress:
    address: str
    interface: str
    prefix_length: str

    def xml(self, operation: str | None = None) -> str:
        op = f' xmlns:nc="{NC_NS}" nc:operation="{operation}"' if operation else ""
        leaves = "" if operation == "remove" else (
            f"<interface>{self.interface}</interface>"
            f"<prefix-length>{self.prefix_length}</prefix-length>")
        return f"<gateway-address{op}><address>{self.address}</address>{leaves}" \
               "</gateway-address>"


def gateway_filter() -> str:
    """get-data's filter for the gateway addresses in a datastore."""
    return (f'<subtree-filter><nat-policy xmlns="{NAT_NS}"><gateway-address/></nat-policy>'
            "</subtree-filter>")


def parse_gateways(data_text: str) -> list[GatewayAddress]:
    """The gateway-address entries in the content of a get-data reply's <data>."""
    if "gateway-address" not in data_text:
        return []
    root = etree.fromstring(f"<data>{data_text}</data>".encode(), parser=_PARSER)
    found = []
    for entry in root.iter(f"{{{NAT_NS}}}gateway-address"):
        found.append(GatewayAddress(
            (entry.findtext(f"{{{NAT_NS}}}address") or "").strip(),
            (entry.findtext(f"{{{NAT_NS}}}interface") or "").strip(),
            (entry.findtext(f"{{{NAT_NS}}}prefix-length") or "").strip()))
    return found


def activation_xml(gateways: list[GatewayAddress]) -> str:
    """The edit that gives a target these gateway addresses."""
    return f'<nat-policy xmlns="{NAT_NS}">{"".join(g.xml() for g in gateways)}</nat-policy>'


def deactivation_xml(gateways: list[GatewayAddress]) -> str:
    """The edit that takes these gateway addresses off a source (absent ones are fine)."""
    return (f'<nat-policy xmlns="{NAT_NS}">{"".join(g.xml("remove") for g in gateways)}'
            "</nat-policy>")


def run_hook(command: str, environment: dict[str, str]) -> None:
    """Run the switchover command through the shell; SwitchoverError unless it exits 0."""
    env = {**os.environ, **environment}
    try:
        done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=HOOK_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SwitchoverError(f"the switchover command did not end within {HOOK_TIMEOUT} s")\
            from None
    except OSError as exc:
        raise SwitchoverError(f"the switchover command could not run: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise SwitchoverError(f"the switchover command exited with {done.returncode}"
                              + (f": {said[-1]}" if said else ""))
