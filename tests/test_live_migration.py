"""A live migration's order and its exactly-once promise, through real `nfmig serve`
processes (simulated NAT) on loopback: copy while traffic flows, bring the copy up to date
under a short freeze, confirm, switch the traffic, then delete on the source; and after any
fault, every session on exactly one side or, where the report says so, on both until the
same command is run again."""

from __future__ import annotations

import shlex
import socket
import sys
import threading
import time

from nfmig.client.endpoints import Endpoint
from nfmig.client.local import start_local_server
from nfmig.client.migrate import Migration, Options
from nfmig.server.auth import add_user

from nfmig.cli import main
from tests.test_migrate import NAT_NS, NO_HOST_KEY_CHECK, PASSWORD, Nat, migrate, session

GATEWAYS = (f'<nat-policy xmlns="{NAT_NS}">'
            "<gateway-address><address>10.0.0.1</address><interface>inside</interface>"
            "<prefix-length>24</prefix-length></gateway-address>"
            "<gateway-address><address>192.0.2.1</address><interface>outside</interface>"
            "<prefix-length>24</prefix-length></gateway-address></nat-policy>")


def gateways(nat) -> set[str]:
    text = nat.conn.get_data("running", f'<subtree-filter><nat-policy xmlns="{NAT_NS}">'
                             "<gateway-address/></nat-policy></subtree-filter>")
    return {part.split("</address>")[0] for part in text.split("<address>")[1:]}


def on(phase: str, nat, action):
    """An on_phase hook that runs ``action`` once, when ``phase`` starts on ``nat``."""
    done = []

    def hook(name: str, endpoint: str | None) -> None:
        if name == phase and endpoint == nat.url and not done:
            done.append(True)
            action()
    return hook


# -- the order ----------------------------------------------------------------------------
def test_the_copy_runs_unfrozen_and_the_window_holds_only_the_last_steps(nats):
    a, b = nats(200, 0)
    report = migrate([a], b)
    assert report.result == "success", report.reason
    names = [p.name for p in report.phases]
    assert names.index("commit") < names.index("freeze") < names.index("delta") \
        < names.index("confirm") < names.index("thaw") < names.index("delete")
    copy = sum(p.seconds for p in report.phases if p.name in ("read", "edit", "commit"))
    assert report.freeze_seconds is not None and report.freeze_seconds < copy + 1.0


def test_sessions_opened_during_the_copy_follow_it_and_none_is_on_both_sides(tmp_path,
                                                                             nats):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    add_user(workdir / "users", "ops", password=PASSWORD, log2_n=14)  # a cheap test hash
    a = Nat(start_local_server(workdir, "--sessions", "2000", "--traffic", "500"))
    (b,) = nats(0)
    try:
        # the simulated traffic opens sessions every half second: let some open in between
        report = migrate([a], b, on_phase=on("verify", b, lambda: time.sleep(1.1)))
        assert report.result == "success", report.reason
        assert report.delta["new"] > 0, report.delta  # opened between the copy and freeze
        tracked = [p for p in report.phases if p.name == "track"]
        assert tracked and all(p.ok and p.detail is None for p in tracked)  # by its record
        on_b = set(b.sessions())
        assert len(on_b) == report.sessions_moved >= 2000
        assert not on_b & set(a.sessions())  # what A opened after the thaw stays on A
    finally:
        a.stop()


def test_gateway_addresses_move_from_the_source_to_the_target(nats):
    a, b = nats(20, 0)
    a.plant(GATEWAYS)
    report = migrate([a], b)
    assert report.result == "success", report.reason
    assert gateways(b) == {"10.0.0.1", "192.0.2.1"} and gateways(a) == set()
    assert report.switchover.startswith("gateway 10.0.0.1/24 (inside)")
    names = [p.name for p in report.phases]
    assert names.index("confirm") < names.index("switchover") < names.index("delete")
    ends = [p.endpoint for p in report.phases if p.name == "switchover"]
    assert ends == [b.url, a.url]  # the target answers first, then the source lets go


def test_a_subscriber_selection_moves_no_gateway_and_says_so(nats):
    a, b = nats(10, 0)
    a.plant(GATEWAYS, session("10.1.0.7", 4000))
    from nfmig.client.selection import Selection
    report = migrate([a], b, Selection.subscribers("10.1.0.7"))
    assert report.result == "success", report.reason
    assert gateways(a) == {"10.0.0.1", "192.0.2.1"} and gateways(b) == set()
    assert any("--switchover CMD" in w for w in report.warnings)


def test_the_switchover_command_runs_once_the_target_holds_every_session(nats, tmp_path):
    a, b = nats(25, 0)
    seen = tmp_path / "seen"
    probe = (f"{shlex.quote(sys.executable)} -c \"import os,sys; open(sys.argv[1],'w')"
             ".write(os.environ['NFMIG_MIGRATION_ID']+' '+os.environ['NFMIG_SESSIONS'])\" "
             f"{shlex.quote(str(seen))}")
    report = migrate([a], b, switchover=probe, migration_id="m-hook")
    assert report.result == "success", report.reason
    assert seen.read_text() == "m-hook 25"
    assert len(b.sessions()) == 25 and a.sessions() == {}


def test_a_failing_switchover_command_keeps_the_sessions_on_both_sides(nats):
    a, b = nats(15, 0)
    before = a.sessions()
    report = migrate([a], b, switchover="echo no route >&2; exit 4")
    assert report.result == "failed"
    assert "exited with 4: no route" in report.reason
    assert not report.cleanup_complete
    assert a.sessions() == before and b.sessions() == before
    assert report.placement == {"source_only": 0, "target_only": 0, "both": 15, "neither": 0}
    rerun = migrate([a], b, switchover="none")
    assert rerun.result == "success", rerun.reason
    assert a.sessions() == {} and b.sessions() == before


def test_keep_source_then_finish_deletes_what_the_target_holds(nats):
    a, b = nats(12, 0)
    before = a.sessions()
    assert migrate([a], b, keep_source=True).result == "success"
    a.plant(session("10.8.8.8", 8000))  # opened after the copy: stays
    report = migrate([a], b, finish=True)
    assert report.result == "success", report.reason
    assert report.sessions_moved == 12
    assert set(a.sessions()) == {("TCP", "10.8.8.8", "8000", "198.51.100.9", "80")}
    assert b.sessions() == before
    assert any("1 sessions stay on source" in w for w in report.warnings)


# -- faults -------------------------------------------------------------------------------
def test_a_confirmation_later_than_the_confirm_timeout_fails_and_the_source_keeps_all(nats):
    a, b = nats(40, 0)
    before = a.sessions()
    report = migrate([a], b, confirm_timeout=1,
                     on_phase=on("confirm", b, lambda: time.sleep(2.5)))
    assert report.result == "failed"
    assert "confirm on target" in report.reason and "rolled back" in report.reason
    assert a.sessions() == before and b.sessions() == {}
    assert report.cleanup_complete, report.warnings
    assert report.placement == {"source_only": 40, "target_only": 0, "both": 0, "neither": 0}
    rerun = migrate([a], b)
    assert rerun.result == "success" and rerun.sessions_moved == 40
    assert b.sessions() == before and a.sessions() == {}


class StallingProxy:
    """A TCP relay to a server that can hold back what the server sends on the connections
    open at the moment it is told to (a lost or very late reply), while new connections
    pass."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.stalled: set[socket.socket] = set()
        self.open: list[tuple[socket.socket, socket.socket]] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.target))
            self.open.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while src in self.stalled and not self.stop.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass

    def stall_replies(self) -> None:
        self.stalled |= {server for _, server in self.open}

    def close(self) -> None:
        self.stop.set()
        for pair in self.open:
            for sock in pair:
                sock.close()
        self.listener.close()


def test_a_delete_whose_reply_is_lost_is_sent_again_and_nothing_leaves_the_target(nats):
    a, b = nats(60, 0)
    before = a.sessions()
    proxy = StallingProxy(a.server.port)
    try:
        source = Endpoint("127.0.0.1", proxy.port, "ops")
        report = Migration([source], b.endpoint, None, Options(
            credentials=NO_HOST_KEY_CHECK, rpc_timeout=3, freeze_timeout=30,
            on_phase=lambda name, end: proxy.stall_replies()
            if name == "delete" and end == str(source) and not proxy.stalled else None)).run()
    finally:
        proxy.close()
    assert report.result == "success", report.reason
    assert a.sessions() == {} and b.sessions() == before
    deletes = [p for p in report.phases if p.name == "delete"]
    assert [p.ok for p in deletes] == [False, True]


def test_the_cli_exit_code_says_the_sessions_are_on_both_sides(nats, capsys, tmp_path):
    a, b = nats(5, 0)
    password = tmp_path / "pw"
    password.write_text(PASSWORD + "\n")
    code = main(["migrate", a.url, b.url, "--password-file", str(password),
                 "--insecure-no-host-key-check", "--switchover", "exit 1"])
    assert code == 3
    err = capsys.readouterr().err
    assert "run the same migration again" in err
    assert len(a.sessions()) == 5 and len(b.sessions()) == 5


# -- what a target can hold -----------------------------------------------------------------
def policy(address: str) -> str:
    return f'<nat-policy xmlns="{NAT_NS}"><external-address>{address}</external-address>' \
           "</nat-policy>"


def test_a_target_whose_policy_translates_elsewhere_is_refused_before_anything_moves(nats):
    a, b = nats(0, 0)
    a.plant(policy("192.0.2.10"), *(session("10.1.0.1", 4000 + i, "192.0.2.10", 20000 + i)
                                    for i in range(3)))
    b.plant(policy("192.0.2.77"))
    report = migrate([a], b)
    assert report.result == "refused"
    assert "does not translate to 192.0.2.10 (3 sessions)" in report.reason
    assert "--with-policy" in report.reason
    assert len(a.sessions()) == 3 and b.sessions() == {}


def test_with_policy_the_target_gets_the_sources_policy_in_the_same_commit(nats):
    a, b = nats(0, 0)
    a.plant(policy("192.0.2.10"), GATEWAYS,
            *(session("10.1.0.1", 4000 + i, "192.0.2.10", 20000 + i) for i in range(3)))
    b.plant(policy("192.0.2.77"))
    report = migrate([a], b, with_policy=True)
    assert report.result == "success", report.reason
    text = b.conn.get_data("running", f'<subtree-filter><nat-policy xmlns="{NAT_NS}"/>'
                           "</subtree-filter>")
    assert "192.0.2.10" in text and "192.0.2.77" in text  # merged into the target's own
    assert gateways(b) == {"10.0.0.1", "192.0.2.1"}  # these came by the switchover
    assert len(b.sessions()) == 3 and a.sessions() == {}
