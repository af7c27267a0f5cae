"""The nat-policy: small, so held as an XML tree, edited as one (see :mod:`.tree_edit`) and
validated whole by libyang; the backend gets it as a NatPolicy.

Nothing here keeps state: which policy is running or staged is the datastores' business
(:mod:`.datastore`).
"""

from __future__ import annotations

import copy

from lxml import etree
from nfmig.nf_backends.base import AddressMapping, GatewayAddress, NatPolicy, Timeouts

from .schema import Schema
from .tree_edit import edited

POLICY_PATH = "/nfmig-nat:nat-policy"


class PolicyModel:
    """The model's nat-policy: edits planned over a policy tree, checked against the schema,
    and the result turned into the backend's NatPolicy."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.ns = schema.nat_ns
        self._schema_node = schema.find(POLICY_PATH)

    def plan(self, current: etree._Element | None,
             edits: list[etree._Element]) -> etree._Element | None:
        """The policy that ``edits`` (nat-policy elements, with their operations) make of
        ``current``, validated; None when they leave no policy. ``current`` is not
        changed: the caller decides whether the result is applied, staged or dropped."""
        if not edits:
            return current
        # lenient: a client that left the namespace out
        edits = [_with_namespace(e, self.ns) if etree.QName(e).namespace is None else e
                 for e in edits]
        policy = edited(current, edits, self._schema_node, POLICY_PATH)
        if policy is not None:
            self.validate(policy)
        return policy

    def validate(self, policy: etree._Element) -> None:
        """Raise the RpcError libyang's verdict makes when ``policy`` is not valid."""
        self.schema.check_config(etree.tostring(policy))

    def to_backend(self, policy: etree._Element | None) -> NatPolicy:
        """The backend's view of a (valid) policy tree, the model's defaults filled in; no
        policy is the empty NatPolicy."""
        if policy is None:
            return NatPolicy()
        tree = self.schema.parse_xml(etree.tostring(policy))
        try:
            data = tree.print_dict(include_implicit_defaults=True, absolute=False)
        finally:
            tree.free()
        p = data.get("nat-policy", {})
        t = p.get("timeouts", {})
        return NatPolicy(
            inside_interface=p.get("inside-interface"),
            outside_interface=p.get("outside-interface"),
            inside_prefix=list(p.get("inside-prefix", [])),
            external_address=list(p.get("external-address", [])),
            address_mapping=[AddressMapping(m["inside-prefix"], m["external-address"])
                             for m in p.get("address-mapping", [])],
            gateway_address=[GatewayAddress(g["address"], g["interface"],
                                            g["prefix-length"])
                             for g in p.get("gateway-address", [])],
            port_min=p.get("port-min", 1024), port_max=p.get("port-max", 65535),
            timeouts=Timeouts(t.get("tcp-established", 432000), t.get("tcp-transitory", 120),
                              t.get("udp", 120), t.get("icmp", 30)),
        )


def _with_namespace(element: etree._Element, ns: str) -> etree._Element:
    clone = copy.deepcopy(element)
    for node in clone.iter():
        if isinstance(node.tag, str) and not node.tag.startswith("{"):
            node.tag = f"{{{ns}}}{node.tag}"
    return clone
