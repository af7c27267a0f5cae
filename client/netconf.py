"""A thin NETCONF client for nfmig servers, on ncclient (raw RPCs for RFC 8526 get-data)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from xml.sax.saxutils import escape

from ncclient import manager
from ncclient.operations.rpc import RPC, RPCReply
from ncclient.transport import session as nc_session
from ncclient.transport import ssh as nc_ssh
from ncclient.transport.errors import TransportError

from . import streaming

# ncclient's session thread checks its send queue only between 100 ms waits for input, which
# puts up to 100 ms in front of every request; a short wait sends it at once. (For sessions
# opened with ncclient's own connect; ours write their requests themselves: send_at_once.)
nc_session.TICK = 0.002
# ...and reads 4 KB per wake-up, re-scanning its partial chunk each time; 256 KB reads take a
# fifth off the client's CPU time for a 10k-session reply. A read of all the channel holds
# (at most its 8 MB window) does better still: a read of less moves the rest of paramiko's
# buffer down, a copy of up to the whole window each time.
nc_ssh.BUF_SIZE = 16 << 20

# ...and sends a request by queueing it for its session thread, which frames it (a copy) and
# writes it by slicing off what each channel write took (a copy of the rest each time:
# quadratic, 4.7 s for a 100k-session, 51 MB edit). The caller's thread writes it instead,
# at once, framed on the fly in whole blocks.
_SEND_BLOCK = 256 << 10


def send_at_once(m: manager.Manager) -> manager.Manager:
    """``m`` with its session writing each request itself (see above)."""
    session = m._session
    channel = session._channel
    lock = threading.Lock()  # requests of several threads go out one after the other

    def send(message: str | tuple[bytes, ...]) -> None:
        """``message``: the request's text, or its bytes in pieces (see PiecesRpc)."""
        if not session.connected:
            raise TransportError("Not connected to NETCONF server")
        pieces = (message.encode(),) if isinstance(message, str) else message
        size = sum(map(len, pieces))
        if session._base == nc_session.NetconfBase.BASE_11:
            head, tail = b"\n#%d\n" % size, nc_session.END_DELIM
        else:
            head, tail = b"", nc_session.MSG_DELIM
        with lock:
            for block in _framed_blocks(pieces, head, tail):
                channel.sendall(block)

    session.send = send
    return m


def _framed_blocks(pieces: tuple[bytes, ...], head: bytes, tail: bytes) -> Iterator[bytes]:
    """``head``, the ``pieces`` and ``tail`` in blocks of about _SEND_BLOCK bytes, every byte
    copied once."""
    block: list = [head]
    room = _SEND_BLOCK
    for piece in pieces:
        view = memoryview(piece)
        while view:
            if not room:
                yield b"".join(block)
                block, room = [], _SEND_BLOCK
            block.append(view[:room])
            room -= len(block[-1])
            view = view[len(block[-1]):]
    block.append(tail)
    yield b"".join(block)


# ...and opens its channel with paramiko's default windows: 32 KB packets in a 2 MB window
# cap a bulk reply at about 70 MB/s here (a MAC and a lock hand-off per packet); 256 KB
# packets in an 8 MB window, what the server offers its clients, carry 2.2 times that.
WINDOW = 8 << 20
MAX_PACKET = 256 << 10
_IDLE_WAIT = 1.0  # seconds a bulk session's thread waits for input before it looks again


class _BulkSSHSession(nc_ssh.SSHSession):
    """ncclient's SSH session, its channel opened with the windows above. connect() makes
    the transport and opens the channel in one call; authentication comes between."""

    def _auth(self, *args, **kwargs):
        transport = self._transport
        # A request's last bytes would wait for the acknowledgement of its earlier ones
        # (Nagle), which the server may delay by 40 ms. (Not for a proxy command's pipe.)
        sock = transport.sock
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                                socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.default_window_size = WINDOW
        transport.default_max_packet_size = MAX_PACKET
        _prefer_gcm(transport)
        return super()._auth(*args, **kwargs)

    def _transport_register(self, selector, event) -> None:
        """The session thread's wait for input. Its requests go out from the caller's thread
        (send_at_once), so it has no queue to look at every TICK: waking up that often for
        nothing costs a bulk move a sixth of the client's CPU, in hand-offs of the
        interpreter lock to and from the thread relaying the move."""
        super()._transport_register(selector, event)
        wait = selector.select
        selector.select = lambda timeout=None: wait(_IDLE_WAIT)


# paramiko prefers AES-CTR with HMAC-SHA2, which costs half as much CPU again per byte as
# AES-GCM, and a bulk move passes every byte through four ciphers (both ends of two hops).
_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_gcm(transport) -> None:
    """Key the session again, now preferring AES-GCM, if the server offers it (the first
    key exchange has happened before ncclient lets anyone choose)."""
    if transport.remote_cipher in _GCM:
        return
    options = transport.get_security_options()
    ciphers = options.ciphers
    options.ciphers = (*(c for c in _GCM if c in ciphers), *(c for c in ciphers if c not in _GCM))
    transport.renegotiate_keys()


def connect(timeout: float = 600, **kwds) -> manager.Manager:
    """``manager.connect`` over SSH (same keywords) for bulk work: wide channel windows, and
    requests written in whole blocks."""
    handler = manager.make_device_handler(None)
    session = _BulkSSHSession(handler)
    try:
        session.connect(timeout=timeout, **kwds)
    except BaseException:
        if session.transport:
            session.close()
        raise
    streaming.install(session)
    return send_at_once(manager.Manager(session, handler, timeout=timeout))


NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
KEY_LEAVES = ("protocol", "src_address", "src_port", "dst_address", "dst_port")


class TextReply(RPCReply):
    """A reply kept as text: parsed into a tree only when it may carry an rpc-error.

    Bulk replies are forwarded as text (get-data on one server, edit-config on another), so
    building a 10k-entry tree only to look for errors would cost as much as the server's
    whole reply. No "rpc-error" anywhere in the text means there is no error element.
    """

    def parse(self) -> None:
        if self._parsed:
            return
        if "rpc-error" in self._raw or len(self._raw) < 65536:
            super().parse()
        else:
            self._parsed = True


def rpc_start(message_id: str) -> str:
    """The XML declaration and <rpc> start tag of a request; "</rpc>" ends it."""
    return f'<?xml version="1.0" encoding="UTF-8"?><rpc xmlns="{NC_NS}" message-id="{message_id}">'


class TextRpc(RPC):
    """An RPC whose operation element is given as XML text, sent as is."""

    REPLY_CLS = TextReply

    def _wrap(self, operation: str) -> str:
        return f"{rpc_start(self._id)}{operation}</rpc>"

    def request(self, operation: str) -> TextReply:
        return self._request(operation)


class PiecesRpc(TextRpc):
    """A TextRpc whose operation is given as UTF-8 pieces, sent as they are: a relayed bulk
    edit goes out without being decoded, joined, and encoded again."""

    def _wrap(self, operation: tuple[bytes, ...]) -> tuple[bytes, ...]:
        return (rpc_start(self._id).encode(), *operation, b"</rpc>")

    def request(self, operation: tuple[bytes, ...]) -> TextReply:  # type: ignore[override]
        return self._request(operation)


class NatClient:
    def __init__(self, host: str, port: int, username: str, password: str | None = None,
                 hostkey_verify: bool = True, timeout: int = 600):
        self.m = connect(host=host, port=port, username=username, password=password,
                         hostkey_verify=hostkey_verify, allow_agent=password is None,
                         look_for_keys=password is None, timeout=timeout)
        self.m.huge_tree = True
        parser = self.m._session.parser
        self.reader = parser if isinstance(parser, streaming.ChunkReader) else None

    def get_sessions(self, datastore: str = "operational",
                     match: dict[str, str] | None = None) -> tuple[str, int]:
        """The nat-session entries of a datastore as XML text, and the reply's size.

        ``match`` keeps only the entries whose leaves have these values (subtree filter
        content match nodes, e.g. ``{"src_address": "10.0.0.12"}``: one subscriber).
        """
        reply = self.m.execute(TextRpc, get_sessions_operation(datastore, match)).xml
        start = reply.find("<nat-session")
        end = reply.rfind("</data>")
        body = reply[start:end] if start >= 0 else ""
        return body, len(reply.encode())

    def edit(self, config_body: str, target: str = "running") -> int:
        """edit-config of ``config_body`` (top-level nodes); returns the request size."""
        operation, size = edit_config_operation(config_body.encode(), target)
        self.m.execute(PiecesRpc, operation)
        return size

    def delete_sessions(self, sessions_xml: str, operation: str = "delete") -> int:
        """Delete every session named in ``sessions_xml`` (``operation="remove"``: those
        still there); returns the request size. Only the keys are sent, with the
        operation's prefix declared once for the whole edit."""
        if operation not in ("delete", "remove"):
            raise ValueError(f"operation must be delete or remove, not {operation!r}")
        keys = _leading_keys(sessions_xml)
        if keys is None:
            from .selection import parse_entries  # it builds on this module

            keys = [tuple(map(escape, entry.key)) for entry in parse_entries(sessions_xml)]
        entry = _KEYS_ENTRY.replace("OPERATION", operation)
        return self.edit("".join(map(entry.__mod__, keys)))

    def close(self) -> None:
        if self.m.connected:
            self.m.close_session()


def get_sessions_operation(datastore: str, match: dict[str, str] | None) -> str:
    """The get-data element for a datastore's nat-session entries (see get_sessions)."""
    leaves = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in (match or {}).items())
    return (f'<get-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>ds:{datastore}'
            f'</datastore><subtree-filter><nat-session xmlns="{NAT_NS}">{leaves}'
            "</nat-session></subtree-filter></get-data>")


_CONFIG_START = f'<nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">'.encode()
_CONFIG_END = b"</nc:config>"
_ENTRY_NS = f' xmlns="{NAT_NS}"'.encode()


def edit_config_operation(config_body: bytes, target: str, declare_once: bool = True
                          ) -> tuple[tuple[bytes, ...], int]:
    """The edit-config element for ``config_body`` (top-level nodes, UTF-8), as pieces for
    PiecesRpc, and the size of its <config>. ``declare_once``: take the model's namespace
    declaration off each entry (it is on <config>)."""
    # 4% fewer bytes on the wire, and one declaration for the server's XML parser to resolve
    # (its bulk reader takes either as fast; see relay).
    body = config_body.replace(_ENTRY_NS, b"") if declare_once else config_body
    pieces = (f"<edit-config><target><{target}/></target>".encode(), _CONFIG_START, body,
              _CONFIG_END, b"</edit-config>")
    return pieces, len(_CONFIG_START) + len(body) + len(_CONFIG_END)


_KEYS_ENTRY = ('<nat-session nc:operation="OPERATION">'
               + "".join(f"<{k}>%s</{k}>" for k in KEY_LEAVES) + "</nat-session>")
# An entry as servers write it: its key leaves first, in the model's order, plain text.
_KEYS_FIRST = re.compile(
    f'<nat-session xmlns="{NAT_NS}">'
    + "".join(f"<{k}>([^<&]*)</{k}>" for k in KEY_LEAVES))


def _leading_keys(sessions_xml: str) -> list[tuple[str, ...]] | None:
    """The keys of every entry when each starts with its key leaves as servers write
    them (one expression over the text, 15 times faster than reading whole entries);
    None when any entry is written otherwise."""
    if "<!" in sessions_xml:
        return None  # a comment or CDATA section: only a real XML reader tells
    keys = _KEYS_FIRST.findall(sessions_xml)
    # every entry's start and end tag name it, whatever its prefix: two names per key found
    return keys if 2 * len(keys) == sessions_xml.count("nat-session") else None


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0
