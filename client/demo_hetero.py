"""`nfmig demo` as root: a live TCP connection through the Linux kernel NAT moves, with its
session, to the SDN NAT (Open vSwitch + the OpenFlow NAT app) and keeps flowing.

The two NATs share nothing but the YANG model: NAT A's session is a conntrack entry, NAT B's
is a pair of flows. Hosts live in network namespaces of a test bed built for the demo and
removed afterwards, as is NAT B's private Open vSwitch.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

from nfmig.testbed import TestBed
from nfmig.testbed_ovs import without_checksum_offload

from .demo_linux import gateway_policy, move_live_stream
from .local import LocalServer, start_local_server


def run_hetero_demo() -> int:
    print("A Linux kernel NAT (A) and an SDN NAT on Open vSwitch (B) in network namespaces; "
          "a live TCP stream moves from A to B.")
    with TestBed() as bed, tempfile.TemporaryDirectory(prefix="nfmig-demo-") as tmp:
        without_checksum_offload(bed)
        servers: list[LocalServer] = []
        password = secrets.token_urlsafe(16)
        try:
            for name, backend, ns in (("a", "linux", bed.nat_a), ("b", "openflow", bed.nat_b)):
                servers.append(start_local_server(Path(tmp) / name, "--backend", backend,
                                                  "--netns", ns, password=password))
                server = servers[-1]
                server.edit(gateway_policy(gateways=name == "a"))
                print(f"NAT {name.upper()}: {backend} in namespace {ns}, NETCONF on "
                      f"127.0.0.1:{server.port}")
            return move_live_stream(bed, *servers)
        finally:
            for server in servers:
                server.stop()
