"""The namespace test bed: reachability through the active NAT, switch-over and cleanup."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the test bed tests must not skip", pytrace=False)
    pytest.skip("network namespaces need root", allow_module_level=True)

from nfmig.testbed import TestBed  # noqa: E402


@pytest.fixture
def bed():
    testbed = TestBed()
    try:
        testbed.build()
        yield testbed
    finally:
        testbed.destroy()


def ping(bed: TestBed, ns: str, address: str) -> bool:
    return bed.run(ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def ipv4_addresses(bed: TestBed, ns: str, dev: str) -> list[str]:
    out = bed.run(ns, "ip", "-j", "-4", "addr", "show", "dev", dev).stdout
    return [info["local"] for link in json.loads(out) for info in link["addr_info"]]


def test_active_nat_routes_client_to_gateway(bed):
    bed.activate(bed.nat_a)
    assert ping(bed, bed.client, TestBed.INSIDE_GATEWAY)
    assert ping(bed, bed.server, TestBed.EXTERNAL)


def test_switch_over_moves_gateway_addresses(bed):
    bed.activate(bed.nat_a)
    assert ping(bed, bed.server, TestBed.EXTERNAL)  # the server now knows NAT A's MAC

    bed.switch_over(bed.nat_a, bed.nat_b)

    assert ipv4_addresses(bed, bed.nat_b, "inside") == [TestBed.INSIDE_GATEWAY]
    assert ipv4_addresses(bed, bed.nat_a, "inside") == []
    assert ipv4_addresses(bed, bed.nat_a, "outside") == []
    assert ping(bed, bed.server, TestBed.EXTERNAL)
    link = json.loads(bed.run(bed.nat_b, "ip", "-j", "link", "show", "dev", "outside").stdout)
    neigh = json.loads(bed.run(bed.server, "ip", "-j", "neigh", "show", "to", TestBed.EXTERNAL,
                               "dev", "eth0").stdout)
    assert [entry.get("lladdr") for entry in neigh] == [link[0]["address"]]


def test_destroy_removes_every_namespace(bed):
    sleeper = bed.popen(bed.client, "sleep", "60")

    bed.destroy()

    assert sleeper.poll() is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10, check=True).stdout.split()
    assert not [name for name in names if name.startswith(f"{bed.prefix}-")]


def test_failed_build_leaves_no_namespace(monkeypatch):
    testbed = TestBed()

    def broken() -> None:
        raise RuntimeError("wiring failed")

    monkeypatch.setattr(testbed, "_wire_switch", broken)
    try:
        with pytest.raises(RuntimeError, match="wiring failed"):
            testbed.build()
        assert not [ns for ns in testbed.namespaces if os.path.exists(testbed.ns_path(ns))]
    finally:
        testbed.destroy()


def test_nat_namespaces_track_tcp_strictly(bed):
    def sysctl(key: str) -> str:
        return bed.run(bed.nat_a, "sysctl", "-n", key).stdout.strip()

    assert sysctl("net.netfilter.nf_conntrack_tcp_loose") == "0"
    assert sysctl("net.netfilter.nf_conntrack_tcp_be_liberal") == "0"
    assert sysctl("net.netfilter.nf_conntrack_acct") == "1"


def route(bed: TestBed, source: str) -> dict:
    out = bed.run(bed.client, "ip", "-j", "route", "get", TestBed.SERVER, "from", source).stdout
    return json.loads(out)[0]


def test_route_client_sends_one_address_through_the_other_gateway(bed):
    bed.add_client_addresses(["10.0.0.11", "10.0.0.12"])
    bed.activate(bed.nat_a)
    bed.activate_addresses(bed.nat_b, inside=[TestBed.SECOND_GATEWAY])

    bed.route_client("10.0.0.12", TestBed.SECOND_GATEWAY)

    assert route(bed, "10.0.0.12")["gateway"] == TestBed.SECOND_GATEWAY
    assert route(bed, "10.0.0.11")["gateway"] == TestBed.INSIDE_GATEWAY
    assert ping(bed, bed.client, TestBed.SECOND_GATEWAY)


def test_route_client_with_no_gateway_restores_the_default_route(bed):
    bed.add_client_addresses(["10.0.0.12"])
    bed.route_client("10.0.0.12", TestBed.SECOND_GATEWAY)

    bed.route_client("10.0.0.12", None)

    assert route(bed, "10.0.0.12")["gateway"] == TestBed.INSIDE_GATEWAY


def test_moving_one_outside_address_leaves_the_others(bed):
    bed.activate(bed.nat_a)
    bed.activate_addresses(bed.nat_a, outside=["192.0.2.2"])
    assert ping(bed, bed.server, "192.0.2.2")  # the server now knows NAT A's MAC for it

    bed.deactivate_addresses(bed.nat_a, outside=["192.0.2.2"])
    bed.activate_addresses(bed.nat_b, outside=["192.0.2.2"])

    assert ipv4_addresses(bed, bed.nat_a, "outside") == [TestBed.EXTERNAL]
    assert ipv4_addresses(bed, bed.nat_b, "outside") == ["192.0.2.2"]
    assert ping(bed, bed.server, "192.0.2.2")
    link = json.loads(bed.run(bed.nat_b, "ip", "-j", "link", "show", "dev", "outside").stdout)
    neigh = json.loads(bed.run(bed.server, "ip", "-j", "neigh", "show", "to", "192.0.2.2",
                               "dev", "eth0").stdout)
    assert [entry.get("lladdr") for entry in neigh] == [link[0]["address"]]


@pytest.mark.parametrize("call", [
    lambda bed: bed.activate_addresses(bed.nat_b, outside=["198.51.100.1"]),
    lambda bed: bed.activate_addresses(bed.nat_b, inside=["192.0.2.2"]),
    lambda bed: bed.route_client("10.0.0.12", "10.0.1.1"),
    lambda bed: bed.route_client("10.0.0.255", TestBed.SECOND_GATEWAY),
], ids=["outside", "inside", "gateway", "broadcast"])
def test_addresses_outside_the_bed_prefixes_are_refused(bed, call):
    with pytest.raises(ValueError, match="not a host address"):
        call(bed)


def test_move_subscriber_moves_its_external_address_and_route(bed):
    bed.add_client_addresses(["10.0.0.11", "10.0.0.12"])
    bed.activate(bed.nat_a)
    bed.activate_addresses(bed.nat_a, outside=["192.0.2.2"])
    bed.activate_addresses(bed.nat_b, inside=[TestBed.SECOND_GATEWAY])

    bed.move_subscriber("10.0.0.12", "192.0.2.2", bed.nat_a, bed.nat_b,
                        via=TestBed.SECOND_GATEWAY)

    assert ipv4_addresses(bed, bed.nat_a, "outside") == [TestBed.EXTERNAL]
    assert ipv4_addresses(bed, bed.nat_b, "outside") == ["192.0.2.2"]
    assert route(bed, "10.0.0.12")["gateway"] == TestBed.SECOND_GATEWAY
    assert route(bed, "10.0.0.11")["gateway"] == TestBed.INSIDE_GATEWAY
