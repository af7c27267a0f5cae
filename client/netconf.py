"""A NETCONF client for nfmig servers on ncclient, used as a library: a session class of
nfmig's own for bulk work, and the operations ncclient lacks (RFC 8526 get-data and
edit-data, a bulk edit-config, the model's own rpcs) as ncclient operation classes."""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from xml.sax.saxutils import escape

from ncclient import manager
from ncclient.operations import Commit as NcCommit
from ncclient.operations.rpc import RPC, RPCReply
from ncclient.transport.errors import SessionCloseError, TransportError
from ncclient.transport.session import END_DELIM, MSG_DELIM, NetconfBase
from ncclient.transport.ssh import SSHSession
from ncclient.xml_ import new_ele, sub_ele
from nfmig.nf_backends.base import KEY_FIELDS
from nfmig.server.ssh_compression import DELAYED_ZLIB
from nfmig.server.ssh_compression import METHODS as COMPRESSION_METHODS

from .streaming import ChunkReader
from .wire import tcp_counts

# ncclient's session thread writes requests queued for it, looking at its queue only between
# waits for input (a delay in front of every request), and it writes a request by slicing
# off what each channel write took (a copy of the rest each time: quadratic in a bulk
# edit's size). Ours are written by the caller's thread, at once, framed on the fly in
# whole blocks.
_SEND_BLOCK = 256 << 10
# ncclient reads a few KB per wake-up, re-scanning its partial message each time. A read of
# all the channel holds (at most its window) does better than any smaller one: a read of
# less moves the rest of paramiko's buffer down, a copy of up to the whole window each time.
READ_SIZE = 16 << 20
# paramiko's default windows (32 KB packets in a 2 MB window) cap a bulk reply well below
# what the link carries (a MAC and a lock hand-off per packet); these are what the server
# offers its clients.
WINDOW = 8 << 20
MAX_PACKET = 256 << 10
# The session thread only reads, so it has nothing to look at between inputs; waking up
# often for nothing costs a bulk move CPU, in hand-offs of the interpreter lock to and from
# the thread relaying the move. The bound only limits how long a lost wake-up could stall.
_IDLE_WAIT = 1.0
# paramiko prefers AES-CTR with HMAC-SHA2, which costs markedly more CPU per byte than
# AES-GCM, and a bulk move passes every byte through four ciphers (both ends of two hops).
_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class BulkSSHSession(SSHSession):
    """ncclient's SSH session, made for bulk work: requests are written by the calling
    thread (see _SEND_BLOCK), the session thread reads whole windows and, on a :base:1.1
    session, hands them to a ChunkReader (client.streaming), which can pass a reply on while
    it is still arriving. Counts the NETCONF bytes written and read (framing included, the
    SSH layer's own overhead not); ``wire_counts`` gives what the connection carried.

    With ``compress`` it asks for SSH compression (server.ssh_compression) and takes it when
    the server offers it."""

    def __init__(self, device_handler, compress: bool = False):
        super().__init__(device_handler)
        self.compress = compress
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reader: ChunkReader | None = None  # once the hello chose :base:1.1
        self._send_lock = threading.Lock()  # requests of several threads, one after another

    def connect(self, *args, **kwargs) -> None:
        super().connect(*args, **kwargs)
        # The end-of-message framing of :base:1.0 cannot be read as it arrives.
        if self._base == NetconfBase.BASE_11:
            self.reader = self.parser = ChunkReader(self)

    def _auth(self, *args, **kwargs):
        transport = self._transport
        # A request's last bytes would wait for the acknowledgement of its earlier ones
        # (Nagle), which the server may delay. (Not for a proxy command's pipe.)
        sock = transport.sock
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                                socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # connect() opens the channel right after authenticating, with these
        transport.default_window_size = WINDOW
        transport.default_max_packet_size = MAX_PACKET
        _choose_algorithms(transport, self.compress)
        return super()._auth(*args, **kwargs)

    def wire_counts(self) -> tuple[int, int] | None:
        """(bytes sent, bytes received) by this session's TCP connection, as the kernel
        counted them (SSH packets, compressed and encrypted), or None if not known."""
        transport = self._transport
        return tcp_counts(transport.sock if transport is not None else None)

    @property
    def compression(self) -> str | None:
        """The compression of what this session sends, as negotiated."""
        transport = self._transport
        return transport.local_compression if transport is not None else None

    def send(self, message: str | tuple[bytes, ...]) -> None:
        """Write ``message`` (a request's text, or its UTF-8 bytes in pieces: see TextRpc),
        framed, before returning."""
        if not self.connected:
            raise TransportError("Not connected to NETCONF server")
        pieces = (message.encode(),) if isinstance(message, str) else message
        size = sum(map(len, pieces))
        if self._base == NetconfBase.BASE_11:
            head, tail = b"\n#%d\n" % size, END_DELIM
        else:
            head, tail = b"", MSG_DELIM
        with self._send_lock:
            for block in _framed_blocks(pieces, head, tail):
                self._channel.sendall(block)
            self.bytes_sent += len(head) + size + len(tail)

    def _transport_read(self) -> bytes:
        data = self._channel.recv(READ_SIZE)
        self.bytes_received += len(data)
        return data

    def run(self) -> None:
        """The session thread, reading only (ncclient's also writes what is queued, and
        wakes up every TICK to look). It ends as ncclient's does: quietly when the session is
        being closed, else with the error handed to every listener and the session closed."""
        selector = selectors.DefaultSelector()
        try:
            self._transport_register(selector, selectors.EVENT_READ)
            while True:
                if not selector.select(_IDLE_WAIT):
                    continue
                data = self._transport_read()
                if data:
                    self.parser.parse(data)
                elif self._closing.is_set():
                    break
                else:
                    raise SessionCloseError(self._buffer.getvalue())
        except Exception as exc:
            self.logger.debug("Broke out of main loop, error=%r", exc)
            self._dispatch_error(exc)
            self.close()
        finally:
            selector.close()


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


def _choose_algorithms(transport, compress: bool) -> None:
    """Key the session again, now preferring AES-GCM and (``compress``) asking for
    compression, if the server offers what the first key exchange did not give (it has
    happened before ncclient lets anyone choose)."""
    options = transport.get_security_options()
    again = False
    if transport.remote_cipher not in _GCM:
        ciphers = options.ciphers
        options.ciphers = (*(c for c in _GCM if c in ciphers),
                           *(c for c in ciphers if c not in _GCM))
        again = any(c in ciphers for c in _GCM)
    if compress and transport.remote_compression != DELAYED_ZLIB:
        options.compression = COMPRESSION_METHODS
        again = True
    if again:
        transport.renegotiate_keys()


def connect(timeout: float = 600, compress: bool = False, **kwds) -> manager.Manager:
    """``manager.connect`` over SSH (same keywords), on a BulkSSHSession; ``compress`` asks
    for SSH compression."""
    handler = manager.make_device_handler(None)
    session = BulkSSHSession(handler, compress)
    try:
        session.connect(timeout=timeout, **kwds)
    except BaseException:
        if session.transport:
            session.close()
        raise
    return manager.Manager(session, handler, timeout=timeout)


NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
KEY_LEAVES = KEY_FIELDS


class TextReply(RPCReply):
    """A reply kept as text: parsed into a tree only when it may carry an rpc-error.

    Bulk replies are forwarded as text (get-data on one server, an edit on another), so
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
    """An operation written as XML text, or as UTF-8 pieces sent as they are (a relayed bulk
    edit goes out without being decoded, joined and encoded again: BulkSSHSession.send);
    its reply kept as text. Building a tree of a bulk edit, as ncclient's operations do,
    would cost more than the server's handling of it."""

    REPLY_CLS = TextReply

    def _wrap(self, operation: str | tuple[bytes, ...]) -> str | tuple[bytes, ...]:
        if isinstance(operation, str):
            return f"{rpc_start(self._id)}{operation}</rpc>"
        return (rpc_start(self._id).encode(), *operation, b"</rpc>")

    def request(self, operation: str | tuple[bytes, ...]) -> TextReply:
        return self._request(operation)


class GetData(TextRpc):
    """RFC 8526 get-data of one datastore."""

    @staticmethod
    def operation(datastore: str, filter_xml: str = "") -> str:
        """The get-data element; ``filter_xml``: a <subtree-filter> or <xpath-filter>."""
        return (f'<get-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>ds:{datastore}'
                f"</datastore>{filter_xml}</get-data>")

    def request(self, datastore: str = "operational",  # type: ignore[override]
                filter_xml: str = "") -> TextReply:
        return self._request(self.operation(datastore, filter_xml))


# The model's namespace once on <config>, not on each of thousands of entries (see
# take_entry_namespace), and the edit's operation prefix declared once for all of them.
_NC_CONFIG = (f'<nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">'.encode(), b"</nc:config>")
_NCDS_CONFIG = (f'<nmda:config xmlns:nmda="{NCDS}" xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">'
                .encode(), b"</nmda:config>")


class EditData(TextRpc):
    """RFC 8526 edit-data (merge) of top-level nodes given as UTF-8 text (entries may carry
    nc:operation), sent without being decoded."""

    def request(self, body: bytes, datastore: str = "running"  # type: ignore[override]
                ) -> TextReply:
        start, end = _NCDS_CONFIG
        return self._request((f'<edit-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>'
                              f"ds:{datastore}</datastore>".encode(), start, body, end,
                              b"</edit-data>"))


class BulkEditConfig(TextRpc):
    """edit-config (merge) of top-level nodes given as UTF-8 text, as EditData; for servers
    without RFC 8526 (ncclient's EditConfig builds a tree of the whole config first)."""

    def request(self, body: bytes, target: str = "candidate"  # type: ignore[override]
                ) -> TextReply:
        start, end = _NC_CONFIG
        return self._request((f"<edit-config><target><{target}/></target>".encode(), start,
                              body, end, b"</edit-config>"))


def config_size(body: bytes, edit: type[EditData] | type[BulkEditConfig] = EditData) -> int:
    """The size of the <config> element ``edit`` sends ``body`` in."""
    start, end = _NCDS_CONFIG if edit is EditData else _NC_CONFIG
    return len(start) + len(body) + len(end)


_ENTRY_NS = f' xmlns="{NAT_NS}"'.encode()


def take_entry_namespace(body: bytes) -> bytes:
    """``body`` without the model's namespace declaration on each entry: it is on <config>.
    Fewer bytes on the wire, and one declaration for the server's XML parser to resolve
    (its bulk reader takes either as fast: a relay passes entries on as they came)."""
    return body.replace(_ENTRY_NS, b"")


class NatRpc(TextRpc):
    """One of the nfmig-nat model's own operations (freeze, thaw, announce-migration,
    track-changes, changes, ...); its input leaves given as XML text."""

    def request(self, name: str, input_xml: str = "") -> TextReply:  # type: ignore[override]
        return self._request(f'<{name} xmlns="{NAT_NS}">{input_xml}</{name}>')


class ExtendCommit(NcCommit):
    """A follow-up confirmed commit that extends a pending persistent one from any session:
    it names that commit (persist-id) and keeps it persistent (persist). RFC 6241 allows
    both in one commit; ncclient's Commit refuses them together, and without persist the
    server would tie the extended commit to this session."""

    def request(self, timeout: str | None, persist: str,  # type: ignore[override]
                persist_id: str):
        self._assert(":confirmed-commit")
        node = new_ele("commit")
        sub_ele(node, "confirmed")
        if timeout is not None:
            sub_ele(node, "confirm-timeout").text = timeout
        sub_ele(node, "persist").text = persist
        sub_ele(node, "persist-id").text = persist_id
        return self._request(node)


class NatClient:
    """A bulk client of one nfmig server (which implements RFC 8526)."""

    def __init__(self, host: str, port: int, username: str, password: str | None = None,
                 hostkey_verify: bool = True, timeout: int = 600, compress: bool = False):
        self.m = connect(host=host, port=port, username=username, password=password,
                         hostkey_verify=hostkey_verify, allow_agent=password is None,
                         look_for_keys=password is None, timeout=timeout, compress=compress)
        self.m.huge_tree = True

    @property
    def session(self) -> BulkSSHSession:
        return self.m._session

    @property
    def reader(self) -> ChunkReader | None:
        return self.session.reader

    def get_sessions(self, datastore: str = "operational",
                     match: dict[str, str] | None = None) -> tuple[str, int]:
        """The nat-session entries of a datastore as XML text, and the reply's size.

        ``match`` keeps only the entries whose leaves have these values (subtree filter
        content match nodes, e.g. ``{"src_address": "10.0.0.12"}``: one subscriber).
        """
        reply = self.m.execute(GetData, datastore, sessions_filter(match)).xml
        start = reply.find("<nat-session")
        end = reply.rfind("</data>")
        body = reply[start:end] if start >= 0 else ""
        return body, len(reply.encode())

    def edit(self, config_body: str, target: str = "running") -> int:
        """edit-data of ``config_body`` (top-level nodes); returns the <config> size."""
        body = take_entry_namespace(config_body.encode())
        self.m.execute(EditData, body, target)
        return config_size(body)

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


def sessions_filter(match: dict[str, str] | None) -> str:
    """The subtree filter of a datastore's nat-session entries (see get_sessions)."""
    leaves = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in (match or {}).items())
    return f'<subtree-filter><nat-session xmlns="{NAT_NS}">{leaves}</nat-session></subtree-filter>'


_KEYS_ENTRY = ('<nat-session nc:operation="OPERATION">'
               + "".join(f"<{k}>%s</{k}>" for k in KEY_LEAVES) + "</nat-session>")
# An entry as servers write it: its key leaves first, in the model's order, plain text.
_KEYS_FIRST = re.compile(
    f'<nat-session xmlns="{NAT_NS}">'
    + "".join(f"<{k}>([^<&]*)</{k}>" for k in KEY_LEAVES))


def _leading_keys(sessions_xml: str) -> list[tuple[str, ...]] | None:
    """The keys of every entry when each starts with its key leaves as servers write
    them (one expression over the text, much faster than reading whole entries);
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
