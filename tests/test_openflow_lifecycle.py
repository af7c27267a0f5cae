"""The SDN NAT through real `nfmig serve` processes: its processes live and die with the
server (and a killed app comes back), a freeze with the default selection, gateway
addresses as configuration, what the backend cannot hold refused, and `nfmig migrate` from
it to a Linux NAT with the command line's defaults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root: the Open vSwitch NAT tests must not skip", pytrace=False)
    pytest.skip("network namespaces and Open vSwitch need root", allow_module_level=True)

import paramiko  # noqa: E402
from lxml import etree  # noqa: E402
from ncclient.operations import RPCError  # noqa: E402
from nfmig.client.local import LocalServer, start_local_server  # noqa: E402
from nfmig.client.netconf import NatClient  # noqa: E402
from nfmig.nf_backends.ofnat_procs import record_path  # noqa: E402

from nfmig.testbed import TestBed  # noqa: E402

from . import test_hetero_migration as hetero  # noqa: E402
from .test_hetero_migration import assert_flowing, open_flows  # noqa: E402
from .test_linux_nat import NAT_NS, POLICY  # noqa: E402
from .test_openflow_nat import CONNECT, connect  # noqa: E402

bed = hetero.bed  # the hetero tests' bed: packet counters, checksum offload off

PASSWORD = "openflow-lifecycle-tests"
APP = "nfmig.nf_backends.ofnat_app"
CHILDREN = ("ovsdb-server", "ovs-vswitchd", APP)
NARROW = (f'<nat-policy xmlns="{NAT_NS}"><inside-prefix>{TestBed.INSIDE_PREFIX}</inside-prefix>'
          f"<external-address>{TestBed.EXTERNAL}</external-address>"
          "<port-min>20000</port-min><port-max>20003</port-max></nat-policy>")


class Served:
    """One NAT's `nfmig serve` and a NETCONF client of it."""

    def __init__(self, netns: str, workdir: Path, backend: str = "openflow",
                 policy: str = POLICY):
        self.netns = netns
        self.server = start_local_server(workdir, "--backend", backend, "--netns", netns,
                                         password=PASSWORD)
        try:
            self.client = NatClient("127.0.0.1", self.server.port, "admin", PASSWORD,
                                    hostkey_verify=False)
            self.client.edit(policy)
        except BaseException:
            self.server.stop()
            raise

    def sessions(self) -> list[tuple[str, str, str]]:
        """(protocol, translated address, translated port) of every session."""
        body, _ = self.client.get_sessions()
        return [(e.split("<protocol>")[1].split("<")[0],
                 e.split("<translated_address>")[1].split("<")[0],
                 e.split("<translated_port>")[1].split("<")[0])
                for e in body.split("<nat-session")[1:]]

    def rpc(self, name: str, leaves: str = "") -> None:
        self.client.m.dispatch(etree.fromstring(
            f'<{name} xmlns="{NAT_NS}">{leaves}</{name}>'))

    def children(self) -> dict[str, int]:
        return children_of(self.server.process.pid)

    def log(self) -> str:
        return self.server.log.read_text(errors="replace")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        finally:
            self.server.stop()


def children_of(pid: int) -> dict[str, int]:
    """The server's switch daemons and app: what each is -> its pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            for name in CHILDREN:
                if cmdline.startswith(name) or f"-m {name}" in cmdline:
                    found[name] = int(stat.parent.name)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def session(sport: int, tport: int) -> str:
    return (f'<nat-session xmlns="{NAT_NS}"><protocol>TCP</protocol>'
            f"<src_address>{TestBed.CLIENT}</src_address><src_port>{sport}</src_port>"
            f"<dst_address>{TestBed.SERVER}</dst_address><dst_port>80</dst_port>"
            f"<translated_address>{TestBed.EXTERNAL}</translated_address>"
            f"<translated_port>{tport}</translated_port><tcp_state>established</tcp_state>"
            "</nat-session>")


def gateway(address: str, interface: str, length: int, operation: str = "merge") -> str:
    return (f'<nat-policy xmlns="{NAT_NS}"><gateway-address xmlns:nc='
            f'"urn:ietf:params:xml:ns:netconf:base:1.0" nc:operation="{operation}">'
            f"<address>{address}</address><interface>{interface}</interface>"
            f"<prefix-length>{length}</prefix-length></gateway-address></nat-policy>")


def mac(bed: TestBed, ns: str, dev: str) -> str:
    return bed.run(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()


def neighbour(bed: TestBed, address: str) -> str | None:
    out = bed.run(bed.client, "ip", "neigh", "show", address, "dev", "eth0").stdout
    found = re.search(r"lladdr (\S+)", out)
    return found.group(1) if found else None


@pytest.fixture
def sdn(bed, tmp_path):
    nat = Served(bed.nat_b, tmp_path / "sdn", policy=NARROW)
    yield nat
    nat.close()


def test_freeze_with_the_default_selection_holds_and_the_app_lives_on(bed, sdn):
    sdn.client.edit(session(31000, 20000))
    app = sdn.children()[APP]
    sdn.rpc("freeze", "<migration-id>m-1</migration-id><timeout>30</timeout>")
    assert sdn.sessions() == [("TCP", TestBed.EXTERNAL, "20000")]  # get-data works
    bed.activate(bed.nat_b)
    done = bed.run(bed.client, sys.executable, "-c", CONNECT, TestBed.SERVER, "5601",
                   check=False, timeout=20)
    assert done.returncode != 0  # held: no session for a new connection
    sdn.rpc("thaw", "<migration-id>m-1</migration-id>")
    assert connect(bed, 5602)[0] == TestBed.EXTERNAL
    assert sdn.children()[APP] == app and "Traceback" not in sdn.log()
    rundir = json.loads(record_path(bed.nat_b).read_text())["dir"]
    assert "AddrFormatError" not in (Path(rundir) / "app.log").read_text()


def test_a_killed_app_comes_back_with_the_sessions_the_switch_holds(bed, sdn):
    sdn.client.edit(session(32000, 20000) + session(32001, 20001) + session(32002, 20002))
    bed.activate(bed.nat_b)
    assert connect(bed, 5611)[:2] == [TestBed.EXTERNAL, "20003"]  # the app's own session
    old = sdn.children()[APP]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: sdn.children().get(APP, old) != old and sdn.children()[APP], 15,
                   "a new app")
    wait_for(lambda: "runs again" in sdn.log(), 30, "the app runs again")
    assert "ended with status -9; starting it again" in sdn.log()
    assert sorted(sdn.sessions()) == [("TCP", TestBed.EXTERNAL, str(p))
                                      for p in range(20000, 20004)]
    # The ports of the switch's sessions are the new app's to know: all four are taken.
    with pytest.raises(RPCError, match="translated endpoint"):
        sdn.client.edit(session(32010, 20001))
    sdn.client.edit(f'<nat-session xmlns="{NAT_NS}" xmlns:nc="urn:ietf:params:xml:ns:'
                    'netconf:base:1.0" nc:operation="delete"><protocol>TCP</protocol>'
                    f"<src_address>{TestBed.CLIENT}</src_address><src_port>32001</src_port>"
                    f"<dst_address>{TestBed.SERVER}</dst_address><dst_port>80</dst_port>"
                    "</nat-session>")
    assert connect(bed, 5612)[:2] == [TestBed.EXTERNAL, "20001"]  # new sessions again
    assert sdn.server.alive() and sdn.children()[APP] == new


def test_a_killed_server_takes_its_switch_and_app_along_and_a_successor_cleans_up(
        bed, tmp_path):
    first = Served(bed.nat_b, tmp_path / "first", policy=NARROW)
    try:
        children = first.children()
        assert set(children) == set(CHILDREN)
        rundir = Path(json.loads(record_path(bed.nat_b).read_text())["dir"])
        with pytest.raises(RuntimeError, match="another nfmig server"):
            start_local_server(tmp_path / "second", "--backend", "openflow", "--netns",
                               bed.nat_b, password=PASSWORD)
        first.client.close()
        os.kill(first.server.process.pid, signal.SIGKILL)  # the server alone
        first.server.process.wait()
        wait_for(lambda: not any(map(alive, children.values())), 5,
                 f"the server's children {children} end")
        assert rundir.exists()  # left behind: the successor removes it
    finally:
        first.server.stop()
    successor = Served(bed.nat_b, tmp_path / "successor", policy=NARROW)
    try:
        assert "cleaned up after an OpenFlow NAT server that did not stop" in successor.log()
        assert not rundir.exists()
        rundir = Path(json.loads(record_path(bed.nat_b).read_text())["dir"])
        successor.client.edit(session(33000, 20000))
        assert successor.sessions() == [("TCP", TestBed.EXTERNAL, "20000")]
        bed.activate(bed.nat_b)
        assert connect(bed, 5621)[0] == TestBed.EXTERNAL
    finally:
        successor.close()
    assert not record_path(bed.nat_b).exists() and not rundir.exists()
    # The namespace's kernel is as it was before the first server silenced it.
    assert bed.run(bed.nat_b, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert "nfmig_ovs" not in bed.run(bed.nat_b, "nft", "list", "tables").stdout


def test_a_gateway_address_of_the_policy_is_answered_and_announced(bed, sdn):
    # The client knows the inside gateway as NAT A's first (A's kernel answers for it).
    bed.activate_addresses(bed.nat_a, inside=[TestBed.INSIDE_GATEWAY])
    bed.run(bed.client, "ping", "-c", "1", "-W", "2", TestBed.INSIDE_GATEWAY)
    assert neighbour(bed, TestBed.INSIDE_GATEWAY) == mac(bed, bed.nat_a, "inside")
    bed.deactivate_addresses(bed.nat_a, inside=[TestBed.INSIDE_GATEWAY])
    time.sleep(1.2)  # the kernel ignores a new MAC for an entry younger than its locktime
    sdn.client.edit(gateway(TestBed.INSIDE_GATEWAY, "inside", 24)
                    + gateway(TestBed.EXTERNAL, "outside", 24))
    ours = mac(bed, bed.nat_b, "inside")
    wait_for(lambda: neighbour(bed, TestBed.INSIDE_GATEWAY) == ours, 3,
             "the client's entry for the gateway turns to NAT B's MAC (gratuitous ARP)")
    probe = ["arping", "-c", "1", "-w", "2", "-I", "eth0", TestBed.INSIDE_GATEWAY]
    answered = bed.run(bed.client, *probe, check=False)
    assert answered.returncode == 0 and ours in answered.stdout.lower()
    done = bed.run(bed.client, "ping", "-c", "2", "-W", "2", TestBed.SERVER, check=False)
    assert done.returncode == 0, done.stdout  # through NAT B, addressed by its policy
    assert "10.0.0.1/24" in bed.run(bed.nat_b, "ip", "-4", "addr", "show", "inside").stdout
    sdn.client.edit(gateway(TestBed.INSIDE_GATEWAY, "inside", 24, "delete"))
    assert bed.run(bed.client, *probe, check=False).returncode != 0
    assert "10.0.0.1/" not in bed.run(bed.nat_b, "ip", "-4", "addr", "show", "inside").stdout
    sdn.close()  # a stopped NAT answers for nothing
    assert sdn.server.process.returncode == 0 and "CRITICAL" not in sdn.log()
    assert "192.0.2.1/" not in bed.run(bed.nat_b, "ip", "-4", "addr", "show", "outside").stdout


def test_an_ipv6_gateway_address_is_refused_naming_it_and_nothing_changes(sdn):
    with pytest.raises(RPCError) as refused:
        sdn.client.edit(gateway("2001:db8::1", "outside", 64))
    assert "2001:db8::1" in str(refused.value) and "IPv4-only" in str(refused.value)
    assert "gateway-address" not in sdn.client.m.get_config(source="running").data_xml
    sdn.client.edit(session(34000, 20000))  # the NAT goes on as before
    assert sdn.sessions() == [("TCP", TestBed.EXTERNAL, "20000")]


@pytest.mark.parametrize("entry", [
    ("TCP", "2001:db8::2", "2001:db8:1::1", "2001:db8::1", ""),
    ("TCP", "10.0.0.2", "198.51.100.9", "192.0.2.1",
     "<translated_dst_address>10.0.0.80</translated_dst_address>"
     "<translated_dst_port>8080</translated_dst_port>"),
    ("ICMPv6", "2001:db8::2", "2001:db8:1::1", "2001:db8::1", ""),
], ids=["ipv6", "destination-nat", "icmpv6"])
def test_a_session_this_nat_cannot_hold_is_refused_naming_it(sdn, entry):
    protocol, src, dst, translated, extra = entry
    sport, dport = ("5000", "80") if protocol == "TCP" else ("7", "0")
    with pytest.raises(RPCError) as refused:
        sdn.client.edit(f'<nat-session xmlns="{NAT_NS}"><protocol>{protocol}</protocol>'
                        f"<src_address>{src}</src_address><src_port>{sport}</src_port>"
                        f"<dst_address>{dst}</dst_address><dst_port>{dport}</dst_port>"
                        f"<translated_address>{translated}</translated_address>"
                        f"<translated_port>5000</translated_port>{extra}</nat-session>")
    assert "the OpenFlow NAT" in str(refused.value)
    assert f"[protocol='{protocol}'][src_address='{src}']" in refused.value.path
    assert sdn.sessions() == []


def known_hosts(*servers: LocalServer) -> str:
    lines = []
    for server in servers:
        key = paramiko.ECDSAKey.from_private_key_file(
            str(server.state_dir / "ssh_host_ecdsa_key"))
        lines.append(f"[127.0.0.1]:{server.port} {key.get_name()} {key.get_base64()}\n")
    return "".join(lines)


@pytest.mark.parametrize("source", ["openflow", "linux"])
def test_nfmig_migrate_between_the_sdn_nat_and_a_linux_nat_with_the_defaults(
        bed, tmp_path, source):
    """The source owns the gateway addresses by its policy; `nfmig migrate` with nothing but
    the two ends (default selection, freeze and switchover; host keys checked against
    ~/.ssh/known_hosts) moves its sessions and its gateway addresses to the other NAT, and
    the connections carry on there."""
    sdn = Served(bed.nat_b, tmp_path / "sdn")
    try:
        linux = Served(bed.nat_a, tmp_path / "linux", backend="linux")
    except BaseException:
        sdn.close()
        raise
    src, dst = (sdn, linux) if source == "openflow" else (linux, sdn)
    try:
        src.client.edit(gateway(TestBed.INSIDE_GATEWAY, "inside", 24)
                        + gateway(TestBed.EXTERNAL, "outside", 24))
        servers, clients, peers = open_flows(bed, 5631)
        assert peers[0][0] == TestBed.EXTERNAL
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "known_hosts").write_text(known_hosts(sdn.server, linux.server))
        done = subprocess.run(
            [sys.executable, "-m", "nfmig", "migrate", f"netconf://admin@127.0.0.1:"
             f"{src.server.port}", f"netconf://admin@127.0.0.1:{dst.server.port}", "--json"],
            env={**os.environ, "HOME": str(home), "NFMIG_PASSWORD": PASSWORD},
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:] + sdn.log()[-3000:]
        report = json.loads(done.stdout)
        assert report["result"] == "success" and report["sessions_moved"] == 2
        assert report["switchover"] == "gateway 10.0.0.1/24 (inside), 192.0.2.1/24 (outside)"
        assert report["freeze_window"]["seconds"] > 0
        assert sorted(dst.sessions()) == sorted([("TCP", *peers[0]), ("UDP", *peers[1])])
        assert src.sessions() == []
        assert "gateway-address" not in src.client.m.get_config(source="running").data_xml
        assert "10.0.0.1/" not in bed.run(src.netns, "ip", "-4", "addr", "show",
                                          "inside").stdout
        assert_flowing(bed, servers, clients, peers)  # no switch by hand: the migration did
        assert sdn.server.alive() and APP in sdn.children()
    finally:
        linux.close()
        sdn.close()
