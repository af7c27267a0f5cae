"""A NAT refuses, naming the entry, every session it cannot hold: an edit of running or a
commit that carries one fails as a whole, and the datastore stays readable as it was."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from ncclient import manager
from ncclient.operations import RPCError
from nfmig.client.local import start_local_server

from .conftest import NAT_NS, NC_NS

MIXED = ("TCP", "10.62.0.5", 7002, "198.51.100.9", 443, "2001:db8::6", 40000)
REVERSE_MIX = ("UDP", "2001:db8::5", 7002, "2001:db8::9", 53, "10.62.0.5", 40001)
ICMP_OVER_V6 = ("ICMP", "2001:db8::5", 7, "2001:db8::9", 0, "2001:db8::1", 7)
FINE = ("UDP", "10.0.0.2", 5000, "192.0.2.100", 53, "192.0.2.1", 5000)
FIELDS = ("protocol", "src_address", "src_port", "dst_address", "dst_port",
          "translated_address", "translated_port")


def entry(values: tuple) -> str:
    leaves = "".join(f"<{f}>{v}</{f}>" for f, v in zip(FIELDS, values, strict=True))
    return f'<nat-session xmlns="{NAT_NS}">{leaves}</nat-session>'


def config(*entries: str) -> str:
    return f'<config xmlns="{NC_NS}">{"".join(entries)}</config>'


def sessions(m: manager.Manager, datastore: str = "running") -> str:
    reply = m.get_config(source=datastore,
                         filter=("subtree", f'<nat-session xmlns="{NAT_NS}"/>'))
    return reply.data_xml


@pytest.fixture(params=["simulated", "linux"])
def nat(request, tmp_path):
    """A server of each kind, its sessions empty; the Linux one in a namespace of its own."""
    if request.param == "simulated":
        server = start_local_server(tmp_path)
        yield server
        server.stop()
        return
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the kernel NAT tests must not skip", pytrace=False)
        pytest.skip("network namespaces and conntrack need root")
    netns = f"nfmig-refusal-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        server = start_local_server(tmp_path, "--backend", "linux", "--netns", netns)
        try:
            yield server
        finally:
            server.stop()
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


@pytest.fixture
def m(nat):
    session = manager.connect(host="127.0.0.1", port=nat.port, username=nat.user,
                              password=nat.password, hostkey_verify=False, allow_agent=False,
                              look_for_keys=False, timeout=60)
    yield session
    session.close_session()


def refused(m: manager.Manager, *entries: str, target: str = "running") -> RPCError:
    with pytest.raises(RPCError) as caught:
        m.edit_config(target=target, config=config(*entries))
    return caught.value


def test_a_session_mixing_ipv4_and_ipv6_is_refused_naming_it(m):
    error = refused(m, entry(MIXED))
    assert "not all of one IP version" in error.message
    assert "10.62.0.5" in (error.path or "")
    assert "nat-session" not in sessions(m)


def test_the_reverse_mix_is_refused_not_stored_under_another_key(m):
    error = refused(m, entry(REVERSE_MIX))
    assert "not all of one IP version" in error.message
    assert "nat-session" not in sessions(m)


def test_icmp_over_ipv6_is_refused(m):
    error = refused(m, entry(ICMP_OVER_V6))
    assert "ICMP does not run over IPv6" in error.message


def test_an_edit_with_one_unholdable_session_applies_none_of_it(m):
    bulk = [entry(("UDP", "10.0.0.2", 1024 + i, "192.0.2.100", 53, "192.0.2.1", 1024 + i))
            for i in range(600)]  # past the size from which edits are read as text
    refused(m, *bulk[:300], entry(MIXED), *bulk[300:])
    assert "nat-session" not in sessions(m)


def test_the_datastore_stays_readable_after_a_refusal(m):
    refused(m, entry(MIXED))
    m.edit_config(target="running", config=config(entry(FINE)))
    assert "192.0.2.100" in sessions(m)


def test_a_commit_of_an_unholdable_session_is_refused_and_applies_nothing(m):
    m.edit_config(target="candidate", config=config(entry(FINE), entry(MIXED)))
    with pytest.raises(RPCError) as caught:
        m.commit()
    assert "not all of one IP version" in caught.value.message
    assert "nat-session" not in sessions(m)
    m.discard_changes()
