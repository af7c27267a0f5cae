"""Moving sessions between two real servers with the source's reply still arriving
(client.relay), and the chunk reader under it (client.streaming)."""

from __future__ import annotations

import ctypes
import os
import random
import socket
import threading

import pytest
from ncclient.transport.errors import NetconfFramingError
from nfmig.client.local import start_local_server
from nfmig.client.netconf import _SEND_BLOCK, NatClient, _framed_blocks
from nfmig.client.relay import EntryStream, MoveError, _Relay, move_sessions
from nfmig.client.streaming import ChunkReader
from nfmig.nf_backends.base import Session
from nfmig.server.session_codec import sessions_to_xml

from .conftest import NAT_NS, NC_NS

COUNT = 3000  # about 1.5 MB of entries: edits of 256 KB, 512 KB, then the rest
SMALL = 64 << 10


def open_client(server) -> NatClient:
    return NatClient("127.0.0.1", server.port, server.user, server.password,
                     hostkey_verify=False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = []
    try:
        for name in ("source", "target"):
            started.append(start_local_server(tmp_path_factory.mktemp(name)))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def clients(servers):
    source, target = open_client(servers[0]), open_client(servers[1])
    yield source, target
    source.close()
    target.close()


@pytest.fixture(autouse=True)
def empty(clients):
    for client in clients:
        body, _ = client.get_sessions("running")
        if body:
            client.delete_sessions(body)
    yield


def udp(port: int, src: str = "10.0.0.2", nat_port: int | None = None) -> Session:
    return Session("UDP", src, port, "192.0.2.100", 53, "192.0.2.1",
                   port if nat_port is None else nat_port, timeout=60)


def fill(client: NatClient, sessions: list[Session]) -> None:
    client.edit("".join(sessions_to_xml(sessions, NAT_NS)))


def ports(client: NatClient) -> list[int]:
    body, _ = client.get_sessions("running")
    return sorted(int(p.split("<")[0]) for p in body.split("<src_port>")[1:])


def test_a_move_copies_every_session_in_several_edits(clients):
    source, target = clients
    fill(source, [udp(1024 + i) for i in range(COUNT)])
    moved = move_sessions(source, target)
    assert moved.edits >= 3
    assert moved.sessions_xml.count("</nat-session>") == COUNT
    assert ports(target) == list(range(1024, 1024 + COUNT))


def test_a_move_leaves_the_source_its_sessions(clients):
    source, target = clients
    fill(source, [udp(1024 + i) for i in range(100)])
    move_sessions(source, target)
    assert ports(source) == list(range(1024, 1124))


def test_a_move_copies_only_the_sessions_that_match(clients):
    source, target = clients
    fill(source, [udp(2000 + i, src=f"10.0.0.{2 + i % 2}") for i in range(1000)])
    move_sessions(source, target, match={"src_address": "10.0.0.3"}, block=SMALL)
    assert ports(target) == list(range(2001, 3000, 2))


def test_a_move_of_an_empty_selection_sends_no_edit(clients):
    source, target = clients
    moved = move_sessions(source, target)
    assert (moved.sessions_xml, moved.edits) == ("", 0)


def test_a_refused_edit_leaves_the_target_with_only_what_it_held(clients):
    source, target = clients
    fill(source, [udp(3000 + i) for i in range(1000)])
    # The target gives the translated port of the last session to another one already.
    fill(target, [udp(9999, src="10.0.0.99", nat_port=3999)])
    with pytest.raises(MoveError) as refused:
        move_sessions(source, target, block=SMALL)
    assert "port taken" in str(refused.value) or "in use" in str(refused.value)
    assert "the target holds none of the sessions" in str(refused.value)
    assert ports(target) == [9999]


def test_the_source_session_serves_requests_again_after_a_move(clients):
    source, target = clients
    fill(source, [udp(4000 + i) for i in range(10)])
    move_sessions(source, target)
    assert source.get_sessions("running")[0].count("<nat-session") == 10
    fill(source, [udp(5000)])
    assert 5000 in ports(source)


def test_entries_that_arrive_with_the_end_of_the_reply_are_all_moved(clients):
    _, target = clients
    relay = _Relay(target, "m1", 64, 64, timeout=60)  # every piece is a whole block
    entries = "".join(sessions_to_xml([udp(6000 + i) for i in range(3)], NAT_NS))
    relay.feed(f'<rpc-reply xmlns="{NC_NS}" message-id="m1"><data xmlns="urn:x">'
               f"{entries}</data></rpc-reply>".encode())
    relay.feed(None)
    assert relay.outcome().edits == 1
    assert ports(target) == [6000, 6001, 6002]


def test_a_reply_that_goes_on_after_its_last_entry_fails_the_move(clients):
    _, target = clients
    relay = _Relay(target, "m2", 64, 64, timeout=60)
    entries = "".join(sessions_to_xml([udp(6100)], NAT_NS))
    relay.feed(f'<rpc-reply xmlns="{NC_NS}" message-id="m2"><data xmlns="urn:x">'
               f"{entries}<other/></data></rpc-reply>".encode())
    relay.feed(None)
    with pytest.raises(MoveError, match="does not end after its last session"):
        relay.outcome()
    assert ports(target) == []


class Held(EntryStream):
    """Takes blocks into a list, each only once the test lets it."""

    def __init__(self) -> None:
        super().__init__("m4", 64, 64)
        self.taken: list[bytes] = []
        self.taking, self.go_on = threading.Event(), threading.Event()

    def take(self, entries: bytes) -> None:
        self.taking.set()
        self.go_on.wait(10)
        self.taken.append(entries)


def test_a_stream_stopped_while_a_block_is_taken_takes_none_after_it():
    stream = Held()
    entries = "".join(sessions_to_xml([udp(6300 + i) for i in range(3)], NAT_NS)).encode()
    head = f'<rpc-reply xmlns="{NC_NS}" message-id="m4"><data xmlns="urn:x">'.encode()
    feeding = threading.Thread(target=stream.feed, args=(head + entries,))
    feeding.start()
    assert stream.taking.wait(10)
    assert not stream.fail(RuntimeError("stop"), wait=0.1)  # the block is still being taken
    stream.go_on.set()
    feeding.join(10)
    assert stream.fail(RuntimeError("stop"), wait=10)
    stream.feed(entries)
    stream.feed(None)
    assert len(stream.taken) == 1 and str(stream.failure) == "stop"


# -- the chunk reader ---------------------------------------------------------------------
class Dispatched:
    """Stands in for ncclient's session: collects what the reader hands over whole."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def _dispatch_message(self, raw: str) -> None:
        self.messages.append(raw)


def framed(message: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        out += b"\n#%d\n" % size + message[pos:pos + size]
        pos += size
    return out + b"\n##\n"


def feed_in_pieces(reader: ChunkReader, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 7, 13, 100])
        reader.parse(data[pos:pos + step])
        pos += step


@pytest.mark.parametrize("seed", range(5))
def test_the_chunk_reader_hands_over_messages_whole_however_the_reads_fall(seed):
    session = Dispatched()
    reader = ChunkReader(session)
    first, second = b"<rpc-reply>" + b"x" * 300 + b"</rpc-reply>", b"<rpc-reply><ok/></rpc-reply>"
    feed_in_pieces(reader, framed(first, [100, 200, 23]) + framed(second, [len(second)]), seed)
    assert session.messages == [first.decode(), second.decode()]


def test_a_tap_takes_the_next_message_piece_by_piece_and_ncclient_the_one_after():
    session = Dispatched()
    reader = ChunkReader(session)
    pieces: list[bytes | None] = []
    reader.tap = pieces.append
    tapped, after = b"<rpc-reply>" + b"y" * 500 + b"</rpc-reply>", b"<rpc-reply><ok/></rpc-reply>"
    data = framed(tapped, [250, len(tapped) - 250]) + framed(after, [len(after)])
    feed_in_pieces(reader, data, 1)
    assert pieces[-1] is None and b"".join(pieces[:-1]) == tapped
    assert session.messages == [after.decode()]


def test_a_bad_chunk_header_is_a_framing_error():
    reader = ChunkReader(Dispatched())
    with pytest.raises(NetconfFramingError):
        reader.parse(b"\n#12x\n<rpc-reply/>\n##\n")


@pytest.mark.parametrize("size", [0, 1, _SEND_BLOCK, _SEND_BLOCK + 1, 3 * _SEND_BLOCK])
def test_a_request_is_written_framed_in_blocks_of_the_send_size(size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    head, tail = b"\n#%d\n" % size, b"\n##\n"
    blocks = list(_framed_blocks((data,), head, tail))
    assert b"".join(blocks) == head + data + tail
    assert len(blocks) == max(1, -(-size // _SEND_BLOCK))
    assert all(len(block) <= _SEND_BLOCK + len(head) + len(tail) for block in blocks)


def test_a_request_in_pieces_is_written_in_the_same_blocks_as_whole():
    data = bytes(range(256)) * (3 * _SEND_BLOCK // 256) + b"tail"
    head, tail = b"\n#%d\n" % len(data), b"\n##\n"
    cuts = [0, 1, 1, 5000, _SEND_BLOCK, _SEND_BLOCK + 7, 2 * _SEND_BLOCK, len(data)]
    pieces = tuple(data[a:b] for a, b in zip(cuts, cuts[1:], strict=False))
    assert list(_framed_blocks(pieces, head, tail)) == list(_framed_blocks((data,), head, tail))


def test_entries_that_are_not_utf8_fail_the_move_and_the_target_keeps_nothing(clients):
    _, target = clients
    relay = _Relay(target, "m3", 64, 64, timeout=60)
    good = "".join(sessions_to_xml([udp(6200), udp(6201)], NAT_NS)).encode()
    bad = "".join(sessions_to_xml([udp(6202)], NAT_NS)).encode()
    relay.feed(f'<rpc-reply xmlns="{NC_NS}" message-id="m3"><data xmlns="urn:x">'.encode()
               + good)
    relay.feed(bad.replace(b"10.0.0.2", b"10.0.0.\xff") + b"</data></rpc-reply>")
    relay.feed(None)
    with pytest.raises(MoveError, match="not UTF-8") as failed:
        relay.outcome()
    assert "the target holds none of the sessions" in str(failed.value)
    assert ports(target) == []


_PIDFD_GETFD = 438  # the system call's number in Linux's common table (x86-64, arm64...)


def _no_delay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _server_end(pid: int, client_sock: socket.socket) -> socket.socket:
    """A duplicate of the socket through which process ``pid`` talks to ``client_sock``
    (pidfd_getfd, as the server's parent)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            fd = libc.syscall(_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            sock = socket.socket(fileno=fd)
            try:
                if sock.type == socket.SOCK_STREAM and \
                        sock.getpeername() == client_sock.getsockname():
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise LookupError("the server has no socket connected to the client")


def test_the_client_writes_requests_without_waiting_for_acknowledgements(clients):
    # Nagle's algorithm would hold a request's last bytes until the server acknowledged
    # the earlier ones, which it may delay by 40 ms.
    _, target = clients
    assert _no_delay(target.m._session._transport.sock)


def test_the_server_writes_replies_without_waiting_for_acknowledgements(servers, clients):
    _, target = clients
    client_sock = target.m._session._transport.sock
    with _server_end(servers[1].process.pid, client_sock) as server_sock:
        assert _no_delay(server_sock)
