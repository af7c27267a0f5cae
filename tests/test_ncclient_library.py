"""nfmig uses ncclient as a library: importing or using its client changes nothing of
ncclient for anyone else in the process, and a migration's steps go out as ncclient's own
operation classes (the ones ncclient lacks as RPC subclasses of nfmig's), against a real
`nfmig serve` on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ncclient import operations
from ncclient.operations.rpc import RPC, RPCError
from ncclient.transport.parser import DefaultXMLParser
from ncclient.transport.ssh import SSHSession
from nfmig.client import netconf
from nfmig.client.endpoints import Connection, Credentials, Endpoint

# Prints what differs in ncclient's modules and classes after the code given as argv[1] ran:
# module globals by value (their repr) and identity, class attributes by identity.
_SNAPSHOT = r'''
import importlib, inspect, json, pkgutil, sys
import ncclient

for info in pkgutil.walk_packages(ncclient.__path__, "ncclient."):
    try:
        importlib.import_module(info.name)
    except ImportError:  # an optional transport's library is not installed
        pass

def snapshot():
    found = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "ncclient" or module is None:
            continue
        for attr, value in vars(module).items():
            found[f"{name}.{attr}"] = (repr(value)[:200], id(value))
            if inspect.isclass(value) and value.__module__ == name:
                for cattr, cvalue in vars(value).items():
                    found[f"{name}.{attr}.{cattr}"] = ("", id(cvalue))
    return found

before = snapshot()
exec(sys.argv[1])
after = snapshot()
print(json.dumps(sorted(k for k in before if k in after and before[k] != after[k])))
'''

IMPORT_CLIENT = """
import importlib, pkgutil, nfmig.client
for info in pkgutil.iter_modules(nfmig.client.__path__):
    importlib.import_module(f"nfmig.client.{info.name}")
"""

USE_CONNECTION = """
from nfmig.client.endpoints import Connection, Credentials, Endpoint
conn = Connection(Endpoint("127.0.0.1", {port}, {user!r}, password={password!r}),
                  Credentials(verify_host_keys=False), timeout=30)
conn.get_data("running")
conn.lock("candidate")
conn.unlock("candidate")
conn.close()
"""


def changed_in_ncclient(code: str) -> list[str]:
    """What of ncclient ``code`` changed, run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _SNAPSHOT, code], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def connection(server) -> Connection:
    return Connection(Endpoint("127.0.0.1", server.port, server.user, password=server.password),
                      Credentials(verify_host_keys=False), timeout=30)


@pytest.fixture
def conn(server):
    c = connection(server)
    yield c
    c.close()


@pytest.fixture
def sent(monkeypatch) -> list[RPC]:
    """Every operation requested in this process, in order."""
    requested: list[RPC] = []
    original = RPC._request

    def recording(self, op):
        requested.append(self)
        return original(self, op)

    monkeypatch.setattr(RPC, "_request", recording)
    return requested


# -- nothing of ncclient changes -----------------------------------------------------------
def test_importing_the_client_changes_nothing_of_ncclient():
    assert changed_in_ncclient(IMPORT_CLIENT) == []


def test_using_a_connection_changes_nothing_of_ncclient(server):
    code = USE_CONNECTION.format(port=server.port, user=server.user, password=server.password)
    assert changed_in_ncclient(code) == []


def test_a_connections_session_has_none_of_its_methods_replaced(conn):
    session = conn.session
    assert isinstance(session, SSHSession)
    assert not [name for name in vars(session) if callable(getattr(type(session), name, None))]


def test_a_plain_ncclient_session_next_to_a_connection_is_ncclients_own(conn, nc):
    session = nc._session
    assert type(session) is SSHSession
    assert not {"send", "run", "_transport_read"} & vars(session).keys()
    assert type(session.parser) is DefaultXMLParser
    assert type(conn.session) is netconf.BulkSSHSession


def test_a_plain_ncclient_session_next_to_a_connection_answers_as_usual(conn, nc):
    conn.get_data("running")
    assert nc.get_config("running").ok
    conn.get_data("running")
    assert nc.get_config("running").ok


# -- the operations ------------------------------------------------------------------------
def test_lock_and_unlock_go_out_as_ncclients_lock_and_unlock(conn, sent):
    conn.lock("candidate")
    conn.unlock("candidate")
    assert [type(r) for r in sent] == [operations.Lock, operations.Unlock]


def test_validate_goes_out_as_ncclients_validate(conn, sent):
    conn.validate("candidate")
    assert [type(r) for r in sent] == [operations.Validate]


def test_discard_changes_goes_out_as_ncclients_discard_changes(conn, sent):
    conn.discard_changes()
    assert [type(r) for r in sent] == [operations.DiscardChanges]


def test_a_confirmed_commit_and_its_confirmation_go_out_as_ncclients_commit(conn, sent):
    conn.commit(confirmed=True, timeout=60, persist="lib-1")
    conn.commit(persist_id="lib-1")
    assert [type(r) for r in sent] == [operations.Commit, operations.Commit]


def test_cancel_commit_goes_out_as_ncclients_cancel_commit(conn, sent):
    conn.commit(confirmed=True, timeout=60, persist="lib-2")
    conn.cancel_commit("lib-2")
    assert type(sent[-1]) is operations.CancelCommit


def test_kill_session_goes_out_as_ncclients_kill_session(server, conn, sent):
    other = connection(server)
    try:
        conn.kill_session(other.session_id)
        killed_with = sent[-1]  # before the other's close may send a close-session of its own
    finally:
        other.close()
    assert type(killed_with) is operations.KillSession


def test_extending_a_persistent_confirmed_commit_goes_out_as_an_ncclient_commit(conn, sent):
    conn.commit(confirmed=True, timeout=60, persist="lib-3")
    conn.commit(confirmed=True, timeout=60, persist="lib-3", persist_id="lib-3")
    conn.cancel_commit("lib-3")
    assert isinstance(sent[1], operations.Commit)


def test_a_confirmed_commit_extended_from_another_session_stays_persistent(server, conn):
    conn.commit(confirmed=True, timeout=60, persist="lib-4")
    other = connection(server)
    other.commit(confirmed=True, timeout=60, persist="lib-4", persist_id="lib-4")
    other.close()  # a commit tied to its session would be rolled back with it
    conn.cancel_commit("lib-4")  # fails when no commit of that persist id is pending


def test_get_data_and_edit_config_go_out_as_operation_classes_of_nfmigs(conn, sent):
    conn.edit_config("", "candidate")
    conn.get_data("candidate")
    conn.discard_changes()
    assert [type(r) for r in sent[:2]] == [netconf.BulkEditConfig, netconf.GetData]


def test_the_models_own_rpcs_go_out_as_one_rpc_class(conn, sent):
    conn.nat_rpc("thaw", **{"migration-id": "none-such"})  # thawing a closed window is fine
    assert [type(r) for r in sent] == [netconf.NatRpc]


def test_an_rpc_error_is_raised_as_ncclients_and_leaves_the_session_usable(conn):
    with pytest.raises(RPCError):
        conn.cancel_commit("no-such-commit")
    assert conn.connected
    conn.get_data("running")


def test_a_connection_counts_the_bytes_of_each_operation_both_ways(conn):
    sent, received = conn.bytes_sent, conn.bytes_received
    conn.get_data("running")
    assert conn.bytes_sent > sent
    assert conn.bytes_received > received
