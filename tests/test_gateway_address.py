"""Gateway addresses as configuration of a Linux kernel NAT (nat-policy/gateway-address).

A Linux-backend server in a test bed NAT namespace puts the addresses written by NETCONF
edit-config on its interfaces and announces them (gratuitous ARP, unsolicited Neighbor
Advertisement), so that client and server follow an address from NAT to NAT with no help:
nothing here flushes a neighbour cache. Moving the entries from NAT A's server to NAT B's
moves a live TCP connection's traffic.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from ncclient.operations import RPCError
from nfmig.client.relay import move_sessions

from nfmig.testbed import TestBed

from . import test_linux_nat as kernel
from .test_linux_nat import (
    NAT_NS,
    Nat,
    assert_clean,
    expect,
    go,
    open_tcp,
    start_pair,
    translated_ports,
)

bed = kernel.bed  # the kernel NAT tests' test bed, with their packet counters

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
INSIDE = (TestBed.INSIDE_GATEWAY, "inside", 24)
OUTSIDE = (TestBed.EXTERNAL, "outside", 24)
BY_HAND = "10.0.0.250"  # an inside address of NAT A that no server configured
# IPv6 lives only in the namespaces of the one test that turns it on.
V6_CLIENT, V6_GATEWAY = "2001:db8:1::2", "2001:db8:1::1"
WAIT = 5.0  # seconds for a neighbour entry to follow an address


@pytest.fixture
def nats(bed, tmp_path):
    """A server on each NAT, with the kernel NAT tests' policy and no gateway address."""
    a, b = start_pair(bed, tmp_path)
    yield a, b
    a.close()
    b.close()


def entries(*gateways: tuple[str, str, int], operation: str | None = None) -> str:
    op = f' nc:operation="{operation}"' if operation else ""
    return "".join(f"<gateway-address{op}><address>{address}</address>"
                   + ("" if operation == "delete" else
                      f"<interface>{interface}</interface><prefix-length>{length}"
                      "</prefix-length>") + "</gateway-address>"
                   for address, interface, length in gateways)


def edit(nat: Nat, *gateways: tuple[str, str, int], operation: str | None = None) -> None:
    """One edit-config of gateway-address entries (merged, or with ``operation``)."""
    nat.client.m.edit_config(target="running", config=(
        f'<config xmlns="{NC}"><nat-policy xmlns="{NAT_NS}" xmlns:nc="{NC}">'
        f"{entries(*gateways, operation=operation)}</nat-policy></config>"))


def addresses(bed: TestBed, ns: str) -> dict[str, set[str]]:
    """address/prefix-length on each interface of ns."""
    links = json.loads(bed.run(ns, "ip", "-j", "addr", "show").stdout)
    return {link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
            for link in links}


def mac(bed: TestBed, ns: str, device: str) -> str:
    return bed.run(ns, "cat", f"/sys/class/net/{device}/address").stdout.strip()


def neighbour(bed: TestBed, ns: str, address: str) -> str | None:
    """The link-layer address ns has for ``address`` now, if any."""
    entries = json.loads(bed.run(ns, "ip", "-j", "neigh", "show", address).stdout or "[]")
    return entries[0].get("lladdr") if entries else None


def follows(bed: TestBed, ns: str, address: str, lladdr: str) -> bool:
    """Whether ns's neighbour entry for ``address`` comes to name ``lladdr`` in time."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if neighbour(bed, ns, address) == lladdr:
            return True
        time.sleep(0.02)
    return False


def pings(bed: TestBed, ns: str, address: str) -> bool:
    return bed.run(ns, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0


def test_written_gateway_addresses_carry_traffic_and_go_when_removed(bed, nats):
    a, _ = nats
    bed.run(a.netns, "ip", "addr", "add", f"{BY_HAND}/24", "dev", "inside")
    edit(a, INSIDE, OUTSIDE)
    on = addresses(bed, a.netns)
    assert "10.0.0.1/24" in on["inside"] and "192.0.2.1/24" in on["outside"]
    assert pings(bed, bed.client, TestBed.INSIDE_GATEWAY)
    server, client, peer = open_tcp(bed, 5501, 1 << 16)
    assert peer[0] == TestBed.EXTERNAL
    go(server, client)
    assert expect(server, "done") == peer
    expect(client, "done")
    assert_clean(bed)

    edit(a, INSIDE, OUTSIDE, operation="delete")
    on = addresses(bed, a.netns)
    assert "10.0.0.1/24" not in on["inside"] and "192.0.2.1/24" not in on["outside"]
    assert f"{BY_HAND}/24" in on["inside"]  # the server never configured it: it stays
    assert "gateway-address" not in a.client.m.get_config(source="running").data_xml


def test_an_address_that_cannot_be_added_fails_the_whole_edit(bed, nats):
    a, _ = nats
    # The test bed's NATs have IPv6 off: the second address cannot be put on inside.
    with pytest.raises(RPCError):
        edit(a, INSIDE, (V6_GATEWAY, "inside", 64))
    on = addresses(bed, a.netns)
    assert "10.0.0.1/24" not in on["inside"], "the address that worked was not taken back"
    assert "gateway-address" not in a.client.m.get_config(source="running").data_xml
    assert f"gateway-address {V6_GATEWAY}/64" in a.server.log.read_text()
    edit(a, INSIDE)  # the NAT is fine afterwards
    assert "10.0.0.1/24" in addresses(bed, a.netns)["inside"]


def test_moving_the_entries_from_a_to_b_moves_a_live_tcp_connection(bed, nats):
    a, b = nats
    edit(a, INSIDE, OUTSIDE)
    server, client, peer = open_tcp(bed, 5502, 1 << 20)
    assert neighbour(bed, bed.client, TestBed.INSIDE_GATEWAY) == mac(bed, a.netns, "inside")
    assert neighbour(bed, bed.server, TestBed.EXTERNAL) == mac(bed, a.netns, "outside")

    body = move_sessions(a.client, b.client).sessions_xml  # copy, switch, then delete
    edit(a, INSIDE, OUTSIDE, operation="delete")
    edit(b, INSIDE, OUTSIDE)
    a.client.delete_sessions(body)
    # Only B's announcements tell the peers: nothing flushes their neighbour caches.
    assert follows(bed, bed.client, TestBed.INSIDE_GATEWAY, mac(bed, b.netns, "inside"))
    assert follows(bed, bed.server, TestBed.EXTERNAL, mac(bed, b.netns, "outside"))
    assert translated_ports(b, "TCP") == {tuple(peer)}
    go(server, client)
    assert expect(server, "done") == peer
    expect(client, "done")
    assert_clean(bed)  # no reset: no packet of the connection met NAT A after the move
    assert translated_ports(a, "TCP") == set()
    assert "10.0.0.1/24" not in addresses(bed, a.netns)["inside"]


def test_an_ipv6_gateway_address_is_announced_by_a_neighbor_advertisement(bed, nats):
    a, b = nats
    for ns, device in ((bed.client, "eth0"), (a.netns, "inside"), (b.netns, "inside")):
        bed.run(ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{device}.disable_ipv6=0")
    bed.run(bed.client, "ip", "addr", "add", f"{V6_CLIENT}/64", "dev", "eth0", "nodad")
    gateway = (V6_GATEWAY, "inside", 64)
    edit(a, gateway)
    assert f"{V6_GATEWAY}/64" in addresses(bed, a.netns)["inside"]
    assert pings(bed, bed.client, V6_GATEWAY)
    assert neighbour(bed, bed.client, V6_GATEWAY) == mac(bed, a.netns, "inside")

    # The first unsolicited Neighbor Advertisement (ICMPv6 type 136) to all nodes.
    capture = bed.popen(bed.client, "tcpdump", "-l", "-n", "-t", "-e", "-i", "eth0", "-c", "1",
                        "icmp6 and ip6[40] == 136 and ip6 dst ff02::1",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(5):  # its notes on stderr end with "listening on eth0 ..."
        if capture.stderr.readline().startswith("listening"):
            break
    else:
        pytest.fail("the capture did not start")
    edit(a, gateway, operation="delete")
    edit(b, gateway)
    b_mac = mac(bed, b.netns, "inside")
    assert follows(bed, bed.client, V6_GATEWAY, b_mac)
    out, _ = capture.communicate(timeout=WAIT)
    assert out.startswith(f"{b_mac} > 33:33:00:00:00:01"), out  # to all nodes, from B
    assert f"neighbor advertisement, tgt is {V6_GATEWAY}" in out, out
    assert pings(bed, bed.client, V6_GATEWAY)
