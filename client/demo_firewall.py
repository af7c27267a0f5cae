"""`nfmig demo --nf firewall`: a live TCP connection through a stateful firewall moves, with
its connection entry, to a firewall of another implementation and keeps flowing.

As root: the Linux firewall (nftables + conntrack, strict TCP tracking) as A and the
OpenFlow firewall on Open vSwitch as B, in the namespaces of a test bed built for the demo;
nothing is translated, so the server reaches the client's own address through the
firewall's outside gateway. Otherwise two simulated firewalls on loopback, whose
connections and pinholes move from A to B.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from nfmig.testbed import TestBed

from .demo import migrate_between
from .local import LocalServer, start_local_server
from .netconf import NAT_NS

FW_NS = "urn:nfmig:params:xml:ns:yang:nfmig-firewall"
SUBSCRIBER = (f'<firewall-policy xmlns="{FW_NS}"><subscriber><name>client</name>'
              f"<prefix>{TestBed.INSIDE_PREFIX}</prefix></subscriber></firewall-policy>")


def firewall_policy(gateways: bool) -> str:
    """The demo firewalls' configuration: interfaces and, for the active one, the gateway
    addresses (nfmig-nat's nat-policy, nothing translated), and one subscriber."""
    entries = "".join(
        f"<gateway-address><address>{address}</address><interface>{side}</interface>"
        "<prefix-length>24</prefix-length></gateway-address>"
        for address, side in ((TestBed.INSIDE_GATEWAY, "inside"),
                              (TestBed.EXTERNAL, "outside"))) if gateways else ""
    return (f'<nat-policy xmlns="{NAT_NS}"><inside-interface>inside</inside-interface>'
            f"<outside-interface>outside</outside-interface>{entries}</nat-policy>"
            + SUBSCRIBER)


def pinhole(port: int) -> str:
    return (f'<pinhole xmlns="{FW_NS}"><protocol>UDP</protocol><remote-address>'
            f"{TestBed.SERVER}</remote-address><local-address>{TestBed.CLIENT}"
            f"</local-address><local-port>{port}</local-port><timeout>600</timeout>"
            "</pinhole>")


def run_firewall_demo(sessions: int) -> int:
    if os.geteuid() == 0:
        return _live()
    print("note: not root, so the demo uses two simulated firewalls (no kernel state); run "
          "it as root to see a live connection move from the Linux firewall to the OpenFlow "
          "firewall")
    with tempfile.TemporaryDirectory(prefix="nfmig-demo-") as tmp:
        servers: list[LocalServer] = []
        try:
            password = secrets.token_urlsafe(16)
            for name, seed in (("a", sessions), ("b", 0)):
                servers.append(start_local_server(Path(tmp) / name, "--nf", "firewall",
                                                  "--sessions", str(seed), password=password))
            servers[0].edit(firewall_policy(True) + pinhole(5353))
            print(f"firewall A: simulated, {sessions} connections and a pinhole, NETCONF on "
                  f"127.0.0.1:{servers[0].port}")
            print(f"firewall B: simulated, empty, NETCONF on 127.0.0.1:{servers[1].port}")
            report = migrate_between(*servers, with_policy=True)
            print(report.summary())
            ok = report.ok and report.sessions_moved == sessions and report.pinholes_moved == 1
            print("migration complete" if ok else "migration INCOMPLETE")
            return 0 if ok else 1
        finally:
            for server in servers:
                server.stop()


def _live() -> int:
    from nfmig.testbed_ovs import without_checksum_offload

    from .demo_linux import move_live_stream

    print("A Linux stateful firewall (A) and an OpenFlow firewall on Open vSwitch (B) in "
          "network namespaces, strict TCP tracking on both; a live TCP stream moves from A "
          "to B.")
    with TestBed() as bed, tempfile.TemporaryDirectory(prefix="nfmig-demo-") as tmp:
        without_checksum_offload(bed)
        # nothing is translated: the server answers the client's own address, through the
        # firewalls' outside gateway address
        bed.run(bed.server, "ip", "route", "add", TestBed.INSIDE_PREFIX, "via",
                TestBed.EXTERNAL)
        servers: list[LocalServer] = []
        password = secrets.token_urlsafe(16)
        try:
            for name, backend, ns in (("a", "linux", bed.nat_a), ("b", "openflow", bed.nat_b)):
                servers.append(start_local_server(Path(tmp) / name, "--nf", "firewall",
                                                  "--backend", backend, "--netns", ns,
                                                  password=password))
                servers[-1].edit(firewall_policy(gateways=name == "a"))
                print(f"firewall {name.upper()}: {backend} in namespace {ns}, NETCONF on "
                      f"127.0.0.1:{servers[-1].port}")
            return move_live_stream(bed, *servers)
        finally:
            for server in servers:
                server.stop()

