"""The migrator over RESTCONF: restconf:// ends alone and mixed with netconf:// ends, against
real servers that serve both protocols."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from nfmig.client.endpoints import Connection, Credentials, Endpoint, EndpointError
from nfmig.client.migrate import Migration, Options
from nfmig.client.restconf import RestconfConnection
from nfmig.client.selection import Selection, parse_entries

from .restconf_client import start_with_restconf


class Both:
    """One NAT server, reachable as netconf:// and restconf://."""

    def __init__(self, workdir: Path, sessions: int, password: str | None = None):
        self.server, self.restconf_port = start_with_restconf(workdir, "--sessions",
                                                              str(sessions), password=password)
        self.cert = self.server.state_dir / "restconf-cert.pem"

    def endpoint(self, scheme: str) -> Endpoint:
        port = self.restconf_port if scheme == "restconf" else self.server.port
        return Endpoint("127.0.0.1", port, self.server.user, self.server.password, scheme)

    def sessions(self) -> set[tuple]:
        conn = Connection(self.endpoint("netconf"), Credentials(verify_host_keys=False))
        try:
            return {e.key for e in parse_entries(conn.get_data("running",
                                                               Selection.all().filter_xml()))}
        finally:
            conn.close()


@pytest.fixture
def pair(tmp_path):
    password = secrets.token_urlsafe(12)  # one operator account on both NATs
    started = [Both(tmp_path / "a", 30, password), Both(tmp_path / "b", 0, password)]
    bundle = tmp_path / "ca.pem"  # both self-signed certificates, trusted for this test
    bundle.write_text("".join(b.cert.read_text() for b in started))
    yield started, Credentials(ca_file=bundle, verify_host_keys=False)
    for b in started:
        b.server.stop()


def run(source: Endpoint, target: Endpoint, credentials: Credentials, selection=None):
    return Migration([source], [target], selection, Options(credentials=credentials)).run()


def test_restconf_endpoint_parses_with_https_default_port():
    endpoint = Endpoint.parse("restconf://ops@nat-a")
    assert (endpoint.scheme, endpoint.port, endpoint.user) == ("restconf", 443, "ops")
    assert str(endpoint) == "restconf://ops@nat-a:443"


def test_other_schemes_are_refused_with_the_two_that_work():
    with pytest.raises(EndpointError, match="restconf://"):
        Endpoint.parse("http://nat-a")


def test_restconf_to_restconf_moves_every_session(pair):
    (a, b), credentials = pair
    before = a.sessions()
    report = run(a.endpoint("restconf"), b.endpoint("restconf"), credentials)
    assert report.result == "success", report.reason
    assert b.sessions() == before and a.sessions() == set()
    assert report.sessions_moved == 30


def test_netconf_source_to_restconf_target(pair):
    (a, b), credentials = pair
    before = a.sessions()
    report = run(a.endpoint("netconf"), b.endpoint("restconf"), credentials)
    assert report.result == "success", report.reason
    assert b.sessions() == before and a.sessions() == set()


def test_restconf_source_to_netconf_target_with_a_subscriber_selection(pair):
    (a, b), credentials = pair
    report = run(a.endpoint("restconf"), b.endpoint("netconf"), credentials,
                 Selection.subscribers("10.0.0.16/28"))
    assert report.result == "success", report.reason
    assert sorted(int(k[1].rsplit(".", 1)[1]) for k in b.sessions()) == list(range(16, 31))
    assert len(a.sessions()) == 15


def test_untrusted_certificate_is_refused_before_anything_moves(pair):
    (a, b), _ = pair
    before = a.sessions()
    report = run(a.endpoint("restconf"), b.endpoint("restconf"),
                 Credentials(verify_host_keys=True))
    assert report.result != "success"
    assert a.sessions() == before and b.sessions() == set()


def test_wrong_password_is_an_endpoint_error(pair):
    (a, _), credentials = pair
    endpoint = a.endpoint("restconf")
    wrong = Endpoint(endpoint.host, endpoint.port, endpoint.user, "wrong", "restconf")
    with pytest.raises(EndpointError, match="authentication failed"):
        RestconfConnection(wrong, credentials)


def test_command_checks_certificates_against_the_ca_file(pair, tmp_path):
    (a, b), credentials = pair
    before = a.sessions()
    password_file = tmp_path / "password"
    password_file.write_text(a.server.password + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "nfmig", "migrate", str(a.endpoint("restconf")),
         str(b.endpoint("restconf")), "--ca-file", str(credentials.ca_file),
         "--password-file", str(password_file), "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sessions_moved"] == 30
    assert b.sessions() == before and a.sessions() == set()


def test_gateway_addresses_move_between_restconf_ends(pair):
    (a, b), credentials = pair
    conn = Connection(a.endpoint("netconf"), Credentials(verify_host_keys=False))
    try:
        conn.edit_config(GATEWAY, "running")
    finally:
        conn.close()
    report = run(a.endpoint("restconf"), b.endpoint("restconf"), credentials)
    assert report.result == "success", report.reason
    assert gateways(a) == set() and gateways(b) == {"192.0.2.1"}


GATEWAY = ('<nat-policy xmlns="urn:nfmig:params:xml:ns:yang:nfmig-nat"><gateway-address>'
           "<address>192.0.2.1</address><interface>outside</interface>"
           "<prefix-length>24</prefix-length></gateway-address></nat-policy>")


def gateways(nat: Both) -> set[str]:
    conn = Connection(nat.endpoint("netconf"), Credentials(verify_host_keys=False))
    try:
        text = conn.get_data("running", '<subtree-filter><nat-policy xmlns="urn:nfmig:params'
                             ':xml:ns:yang:nfmig-nat"/></subtree-filter>')
    finally:
        conn.close()
    return {part.split("</address>")[0] for part in text.split("<address>")[1:]}
