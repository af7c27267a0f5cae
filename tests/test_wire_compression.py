"""What crosses the wire: SSH compression on NETCONF, gzip on RESTCONF, and the bytes a
migration reports per session, each way, as the kernel counted them on its connections.

Real `nfmig serve` processes; clients: `nfmig migrate`, OpenSSH's ssh, paramiko, curl."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time

import paramiko
import pytest
from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.local import LocalServer, start_local_server
from nfmig.client.netconf import NAT_NS, NatClient
from nfmig.nf_backends.base import Session
from nfmig.server.session_codec import sessions_to_xml
from nfmig.server.ssh_compression import MAX_INFLATED

from .restconf_client import Restconf, start_with_restconf

# The goal for a whole migration, both directions together.
GOAL_PER_SESSION = 130
TABLE = 3000
TCP_STATES = ("established", "syn-sent", "syn-recv", "fin-wait", "close-wait", "time-wait")


def varied_table(n: int) -> list[Session]:
    """Sessions as a busy NAT holds them: TCP in several states and UDP, subscribers,
    servers, ports, timeouts and counters that differ from entry to entry."""
    rng = random.Random(n)
    table = []
    for i in range(n):
        udp = i % 3 == 0
        table.append(Session(
            "UDP" if udp else "TCP", f"10.0.0.{10 + i % 200}", 1024 + i // 200,
            f"198.51.100.{1 + rng.randrange(200)}", rng.choice((53, 123, 443, 80, 8443)),
            f"192.0.2.{1 + i % 4}", 1024 + i // 4, None, None,
            None if udp else rng.choice(TCP_STATES), None if udp else rng.randrange(15),
            None if udp else rng.randrange(15), rng.randrange(60, 432000),
            rng.randrange(1, 5000), rng.randrange(60, 10 ** 7), rng.randrange(0, 5000),
            rng.randrange(0, 10 ** 8)))
    return table


@pytest.fixture
def loaded_pair(tmp_path):
    """NAT A holding the varied table, NAT B empty; one operator account on both."""
    a = start_local_server(tmp_path / "a", "--backend", "simulated", "--sessions", "0")
    b = start_local_server(tmp_path / "b", "--backend", "simulated", "--sessions", "0",
                           password=a.password, scrypt_cost=14)
    try:
        client = NatClient("127.0.0.1", a.port, a.user, a.password, hostkey_verify=False)
        client.edit("".join(sessions_to_xml(varied_table(TABLE), NAT_NS)))
        client.m.close_session()
        yield a, b
    finally:
        a.stop()
        b.stop()


def migrate(a: LocalServer, b: LocalServer, *options: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "nfmig", "migrate", f"netconf://admin@127.0.0.1:{a.port}",
         f"netconf://admin@127.0.0.1:{b.port}", "--json", "--insecure-no-host-key-check",
         *options], env=dict(os.environ, NFMIG_PASSWORD=a.password), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_a_migration_carries_each_session_in_few_bytes_on_the_wire(loaded_pair):
    report = migrate(*loaded_pair, "--compression=on")
    assert report["sessions_moved"] == TABLE
    wire = report["bytes"]["wire"]
    per_session = wire["sent_per_session"] + wire["received_per_session"]
    assert per_session <= GOAL_PER_SESSION, wire
    # the messages themselves are an order of magnitude larger than what carried them
    messages = report["bytes"]["sent"] + report["bytes"]["received"]
    assert messages > 5 * (wire["sent"] + wire["received"]), report["bytes"]
    assert {e["compression"] for e in report["endpoints"]} == {"zlib@openssh.com"}


def test_without_compression_the_wire_carries_every_message_byte(loaded_pair):
    report = migrate(*loaded_pair, "--compression=off")
    assert report["sessions_moved"] == TABLE
    wire, counted = report["bytes"]["wire"], report["bytes"]
    # SSH packets carry the messages plus their own framing and MACs
    assert wire["sent"] >= counted["sent"] and wire["received"] >= counted["received"]
    assert {e["compression"] for e in report["endpoints"]} == {"none"}


def test_the_human_report_gives_the_wire_bytes_per_session(loaded_pair):
    a, b = loaded_pair
    result = subprocess.run(
        [sys.executable, "-m", "nfmig", "migrate", f"netconf://admin@127.0.0.1:{a.port}",
         f"netconf://admin@127.0.0.1:{b.port}", "--insecure-no-host-key-check",
         "--compression=on"],
        env=dict(os.environ, NFMIG_PASSWORD=a.password), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if "bytes on the wire" in x)
    assert "per session" in line and "compressed (zlib@openssh.com)" in line


@pytest.mark.parametrize("url, auto", [
    ("netconf://admin@127.0.0.1:830", False), ("netconf://admin@[::1]:830", False),
    ("netconf://admin@localhost:830", False), ("netconf://admin@192.0.2.7:830", True),
    ("restconf://admin@nat-b.example:443", True)])
def test_compression_by_default_spares_only_the_loopback(url, auto):
    endpoint = Endpoint.parse(url)
    assert Credentials().compresses(endpoint) is auto
    assert Credentials(compress=True).compresses(endpoint) is True
    assert Credentials(compress=False).compresses(endpoint) is False


# -- the server's side of SSH compression ------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_local_server(tmp_path_factory.mktemp("nat"), "--backend", "simulated",
                                 "--sessions", "10")
    yield started
    started.stop()


def _openssh() -> str:
    path = shutil.which("ssh")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ssh (OpenSSH client) is not installed")
        pytest.skip("ssh (OpenSSH client) is not installed")
    return path


@pytest.fixture
def keyed(tmp_path):
    """A server where carol logs in with an Ed25519 key (OpenSSH's client uses no
    password without a terminal)."""
    private = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)],
                   check=True)
    workdir = tmp_path / "nat"
    workdir.mkdir()
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users",
                    str(workdir / "users"), "carol", "--key", f"{private}.pub"],
                   check=True, capture_output=True)
    started = start_local_server(workdir, "--backend", "simulated", "--sessions", "10")
    yield started, private
    started.stop()


def test_openssh_with_compression_gets_delayed_zlib(keyed):
    ssh = _openssh()
    server, private = keyed
    hello = ('<hello xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"><capabilities>'
             "<capability>urn:ietf:params:netconf:base:1.0</capability></capabilities>"
             '</hello>]]>]]><rpc message-id="1" xmlns="urn:ietf:params:xml:ns:netconf:base'
             ':1.0"><close-session/></rpc>]]>]]>')
    result = subprocess.run(
        [ssh, "-F", "/dev/null", "-v", "-C", "-p", str(server.port), "-i", str(private),
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-s", "carol@127.0.0.1", "netconf"],
        input=hello, capture_output=True, text=True, timeout=60)
    assert "<ok/>" in result.stdout, result.stderr[-2000:]
    assert "compression: zlib@openssh.com" in result.stderr


def test_a_packet_inflating_beyond_the_bound_closes_only_its_connection(server):
    transport = paramiko.Transport(("127.0.0.1", server.port))
    transport.get_security_options().compression = ("zlib@openssh.com",)
    transport.connect(username=server.user, password=server.password)
    channel = transport.open_session()
    channel.invoke_subsystem("netconf")
    bomb = paramiko.Message()
    bomb.add_byte(bytes([paramiko.common.MSG_CHANNEL_DATA]))
    bomb.add_int(channel.remote_chanid)
    bomb.add_string(b"\0" * (4 * MAX_INFLATED))  # a few kilobytes once compressed
    transport._send_user_message(bomb)
    channel.settimeout(30)
    try:
        while channel.recv(65536):
            pass  # the server's hello, then the end of the connection
    except OSError:
        pass
    transport.join(30)
    assert not transport.is_active()
    transport.close()
    with NatClient("127.0.0.1", server.port, server.user, server.password,
                   hostkey_verify=False).m as fresh:
        assert fresh.connected
    deadline = time.monotonic() + 10  # the server logs a connection's end on its next look
    while "inflates to more than" not in server.log.read_text():
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.1)


# -- RESTCONF ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restconf(tmp_path_factory):
    started, port = start_with_restconf(tmp_path_factory.mktemp("rc"), "--backend",
                                        "simulated", "--sessions", "500")
    yield Restconf(started, port)
    started.stop()


def _curl_headers(result: subprocess.CompletedProcess) -> dict[str, str]:
    head = result.stdout.split("\n\n", 1)[0]
    return {k.strip().lower(): v.strip() for k, _, v in
            (line.partition(":") for line in head.splitlines()[1:])}


def test_restconf_compresses_a_large_reply_for_a_client_that_accepts_it(restconf):
    plain = restconf.curl("-i", f"{restconf.base}/restconf/data/nfmig-nat:nat-session")
    packed = restconf.curl("-i", "--compressed",
                           f"{restconf.base}/restconf/data/nfmig-nat:nat-session")
    assert _curl_headers(packed).get("content-encoding") in ("gzip", "deflate")
    assert "content-encoding" not in _curl_headers(plain)
    assert packed.stdout.split("\n\n", 1)[1] == plain.stdout.split("\n\n", 1)[1]
    assert int(_curl_headers(packed)["content-length"]) * 5 < \
        int(_curl_headers(plain)["content-length"])


def test_restconf_says_which_request_codings_it_takes(restconf):
    reply = restconf.get("/restconf/yang-library-version")
    assert "gzip" in reply.headers.get("Accept-Encoding", "")


def _session_body(port: int) -> bytes:
    return json.dumps({"nfmig-nat:nat-session": [{
        "protocol": "TCP", "src_address": "10.0.0.99", "src_port": port,
        "dst_address": "198.51.100.9", "dst_port": 443, "translated_address": "192.0.2.1",
        "translated_port": port, "tcp_state": "established"}]}).encode()


def test_restconf_takes_a_gzipped_request_body(restconf):
    reply = restconf.request("POST", "/restconf/data", gzip.compress(_session_body(40001)),
                             headers={"Content-Encoding": "gzip"})
    assert reply.status == 201, reply.text
    found = restconf.get("/restconf/data/nfmig-nat:nat-session=TCP,10.0.0.99,40001,"
                         "198.51.100.9,443")
    assert found.status == 200


def test_restconf_refuses_a_request_coding_it_does_not_know(restconf):
    reply = restconf.request("POST", "/restconf/data", _session_body(40002),
                             headers={"Content-Encoding": "compress"})
    assert reply.status == 415
    assert restconf.get("/restconf/data/nfmig-nat:nat-session=TCP,10.0.0.99,40002,"
                        "198.51.100.9,443").status == 404


def test_restconf_refuses_a_gzip_body_that_inflates_beyond_the_limit(restconf):
    body = b'{"nfmig-nat:nat-session": [' + b" " * (64 << 20) + b"]}"
    reply = restconf.request("POST", "/restconf/data", gzip.compress(body, 9),
                             headers={"Content-Encoding": "gzip"})
    assert reply.status == 413
    assert restconf.get("/restconf/yang-library-version").status == 200


def test_restconf_migration_reports_its_wire_bytes(tmp_path):
    a, a_port = start_with_restconf(tmp_path / "a", "--backend", "simulated", "--sessions",
                                    str(TABLE))
    b, b_port = start_with_restconf(tmp_path / "b", "--backend", "simulated", "--sessions",
                                    "0", password=a.password)
    try:
        bundle = tmp_path / "ca.pem"
        bundle.write_text("".join((s.state_dir / "restconf-cert.pem").read_text()
                                  for s in (a, b)))
        result = subprocess.run(
            [sys.executable, "-m", "nfmig", "migrate", f"restconf://admin@127.0.0.1:{a_port}",
             f"restconf://admin@127.0.0.1:{b_port}", "--json", "--ca-file", str(bundle),
             "--compression=on"],
            env=dict(os.environ, NFMIG_PASSWORD=a.password), capture_output=True, text=True,
            timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        wire = report["bytes"]["wire"]
        assert report["sessions_moved"] == TABLE
        assert wire is not None and wire["sent"] * 5 < report["bytes"]["sent"], \
            report["bytes"]
        assert wire["received"] * 5 < report["bytes"]["received"], report["bytes"]
    finally:
        a.stop()
        b.stop()

