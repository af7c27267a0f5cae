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
