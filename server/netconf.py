"""NETCONF over SSH (RFC 6241, RFC 6242) on python-netconf's session class.

python-netconf supplies the per-session reader thread; this module replaces what it does
not do well for this server: hello leniency, fast and size-limited framing, and sending
replies built as text. The SSH server itself (limits, algorithms, host keys) is
ssh_server.py.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple
from xml.sax.saxutils import escape, quoteattr

import paramiko
from lxml import etree
from netconf import base as nc_base
from netconf.error import ChannelClosed

from .auth import SshAuthenticator
from .errors import RpcError, RpcErrors
from .framing import (
    ChannelEOF,
    FrameReader,
    FramingError,
    MessageRefused,
    end_of_message,
    frame_chunks,
    frame_eom,
)
from .gc_pause import collector_paused
from .operations import NC, Operations, Reply, SessionInfo
from .request_limits import (
    HEAD,
    MAX_MESSAGE_ID,
    check_rpc_attributes,
    head_problem,
    root_start_tag,
    xml_problem,
)
from .session_codec import HollowEdit, NeedsTree, hollow_edit
from .ssh_limits import SshLimits
from .ssh_server import SshServer, load_or_create_host_keys

log = logging.getLogger(__name__)

BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True,
                          remove_comments=True)


def _parse(text: bytes) -> etree._Element:
    return etree.fromstring(text, parser=_PARSER)


XML_NS = "http://www.w3.org/XML/1998/namespace"
# A client's hello lists capabilities; nothing near the size limit of a request.
HELLO_LIMIT = 1 << 20
STREAM_BLOCK = 256 << 10
FIRST_STREAM_BLOCK = 32 << 10
HELLO_TIMEOUT = 60


class _Incoming:
    """A request as received: its text, and its hollowed edit when it is a bulk one.
    Handling takes them out: python-netconf's loop, and the receiving thread, hold the
    last request until the next one arrives, and it may be hundreds of megabytes."""

    __slots__ = ("hollow", "message")

    def __init__(self, message: bytes, hollow: HollowEdit | None):
        self.message: bytes | None = message
        self.hollow = hollow

    def take(self) -> tuple[bytes, HollowEdit | None]:
        message, hollow = self.message or b" ", self.hollow
        self.message = self.hollow = None
        return message, hollow


class _ReadFailed(NamedTuple):
    """Receiving broke off (end of the channel, broken framing)."""

    error: Exception


class NetconfSession(nc_base.NetconfSession):
    """One client session: hello, then rpc after rpc until close-session or EOF."""

    def __init__(self, channel: paramiko.Channel, server: NetconfListener, _extra, debug):
        self.server = server
        self.ops: Operations = server.operations
        self.channel = channel
        sid = server.allocate_session_id()
        super().__init__(channel, debug, sid)
        self.reader = FrameReader(channel.recv, server.max_message, head_problem, HEAD)
        self.send_lock = threading.Lock()
        transport = channel.get_transport()
        peer = transport.getpeername()[0] if transport else "unknown"
        self.info = SessionInfo(sid, transport.get_username() if transport else "?", peer,
                                close=self.close, notify=self.send_notification)
        self._open_session(True)

    # -- hello -------------------------------------------------------------------------
    def _open_session(self, is_server: bool) -> None:
        # Known from its hello on: a client may name this session (kill-session) as soon
        # as it has read the session-id, before the server has read the client's hello.
        self.server.register(self)
        self.channel.settimeout(HELLO_TIMEOUT)
        try:
            caps = "".join(f"<capability>{escape(c)}</capability>" for c in self.ops.capabilities())
            hello = (f'<?xml version="1.0" encoding="UTF-8"?><hello xmlns="{NC}"><capabilities>'
                     f"{caps}</capabilities><session-id>{self.session_id}</session-id></hello>")
            self.channel.sendall(frame_eom(hello.encode()))
            client_caps = self._read_client_hello()
        except (ValueError, etree.XMLSyntaxError) as exc:  # a hello, but not a valid one
            log.warning("session %s: no valid hello from the client (%s); closing",
                        self.session_id, exc or type(exc).__name__)
            self.info.bad_hello = True
            self.close()
            return
        except (TimeoutError, ChannelEOF, OSError) as exc:
            log.warning("session %s: no hello from the client (%s); closing",
                        self.session_id, exc or type(exc).__name__)
            self.close()
            return
        self.channel.settimeout(None)
        if BASE_11 in client_caps:
            self.new_framing = True
        elif BASE_10 not in client_caps:
            log.warning("session %s: client offers neither base 1.0 nor 1.1; closing",
                        self.session_id)
            self.info.bad_hello = True
            self.close()
            return
        self.capabilities = client_caps
        self.session_open = True
        log.info("session %s opened for %s from %s (base %s)", self.session_id,
                 self.info.username, self.info.source_host, "1.1" if self.new_framing else "1.0")
        # Two threads: one receives (and prepares) each request while the other handles
        # the one before, in order.
        self._inbox: queue.Queue[_Incoming | MessageRefused | _ReadFailed] = queue.Queue(1)
        self.reader_thread = threading.Thread(target=self._read_message_thread,
                                              name=f"netconf-{self.session_id}", daemon=True)
        self.reader_thread.keep_running = True
        self.reader_thread.start()
        threading.Thread(target=self._receive_ahead, name=f"netconf-{self.session_id}-in",
                         daemon=True).start()

    def _read_client_hello(self) -> set[str]:
        try:
            raw = self.reader.read_eom(HELLO_LIMIT).strip()  # a newline may precede <?xml
        except MessageRefused as exc:
            raise ValueError(f"the hello is refused: {exc}") from None
        root = etree.fromstring(raw, parser=_PARSER)
        problem = xml_problem(root)
        if problem is not None:
            raise ValueError(problem.message)
        if root.tag != f"{{{NC}}}hello":
            raise ValueError(f"expected hello, got {root.tag}")
        if root.find(f"{{{NC}}}session-id") is not None:
            raise ValueError("client hello carries a session-id")
        return {(c.text or "").strip() for c in root.iter(f"{{{NC}}}capability")}

    # -- messages ----------------------------------------------------------------------
    def _receive_ahead(self) -> None:
        """The receiving thread: reads each request while the one before is handled, and
        meanwhile does what a bulk edit needs no datastore for (Operations.prepare). Handling
        an edit spends much of its time in the kernel with the interpreter free: reading the
        next one fills that time."""
        while True:
            try:
                item = self._read_one()
            except Exception as exc:  # the handling thread raises it in its turn
                item = _ReadFailed(exc)
            if not self._hand_over(item):
                self._wake_handler()
                return
            if isinstance(item, _ReadFailed):
                return

    def _wake_handler(self) -> None:
        """The session is closing (killed, say) while the handling thread may wait for a
        request: it must learn there will be none, or wait forever."""
        try:
            self._inbox.put_nowait(_ReadFailed(EOFError("the session is closing")))
        except queue.Full:
            pass

    def _read_one(self) -> _Incoming | MessageRefused:
        try:
            message = self.reader.read_chunked() if self.new_framing else self.reader.read_eom()
        except MessageRefused as exc:
            return exc
        message = message or b" "  # an empty message is malformed, not end of session
        hollow = hollow_edit(message, _parse)
        # An envelope beyond the limits is answered as such; its edit is not prepared.
        if hollow is not None and xml_problem(hollow.root) is None and \
                check_rpc_attributes(hollow.root) is None:
            try:
                with collector_paused():
                    self.ops.prepare(hollow)
            except Exception:  # handling reads the edit again, and answers what is wrong
                log.debug("session %s: preparing an edit failed", self.session_id,
                          exc_info=True)
        return _Incoming(message, hollow)

    def _hand_over(self, item: _Incoming | MessageRefused | _ReadFailed) -> bool:
        """Queue ``item`` for the handling thread; False once that thread has ended."""
        while self.session_open and self.reader_thread.is_alive():
            try:
                self._inbox.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _receive_message(self) -> _Incoming | MessageRefused:
        item = self._inbox.get()
        if not isinstance(item, _ReadFailed):
            return item
        try:
            raise item.error
        except FramingError as exc:
            self._send_error(RpcError("malformed-message", f"broken chunked framing: {exc}",
                                      type="rpc"), None)
            raise ChannelClosed(self) from None
        except (ChannelEOF, OSError, EOFError):
            raise ChannelClosed(self) from None

    def _reader_handle_message(self, incoming: _Incoming | MessageRefused) -> None:
        if isinstance(incoming, MessageRefused):
            self._refused(incoming)
            return
        message, hollow = incoming.take()
        try:
            root = hollow.root if hollow is not None else _parse(message.strip())
        except etree.XMLSyntaxError as exc:
            self.info.in_bad_rpcs += 1
            self._send_error(RpcError("malformed-message" if self.new_framing else
                                      "operation-failed", f"the message is not well-formed "
                                      f"XML: {exc}", type="rpc"), None)
            return
        problem = xml_problem(root, None if hollow is not None else message)
        if problem is not None:
            self.info.in_bad_rpcs += 1
            log.warning("session %s: request refused: %s", self.session_id, problem.message)
            self._send_error(problem, _attr_echo(root)[0] if root.tag == f"{{{NC}}}rpc"
                             else None)
            return
        if root.tag != f"{{{NC}}}rpc":
            self.info.in_bad_rpcs += 1
            self._send_error(RpcError("malformed-message" if self.new_framing else
                                      "unknown-element", f"expected an rpc element, got "
                                      f"{etree.QName(root).localname}", type="rpc"), None)
            return
        self.info.request = hollow or message
        try:
            with collector_paused():
                self._handle_rpc(root)
        finally:
            self.info.request = None

    def _refused(self, refused: MessageRefused) -> None:
        """Answer a message refused while it arrived (the framing layer drops the rest of
        it), echoing what its first bytes hold of the rpc's attributes."""
        self.info.in_bad_rpcs += 1
        error = refused.reason if isinstance(refused.reason, RpcError) else RpcError(
            "too-big", f"the request is {refused.size} bytes or more; this server accepts "
            f"at most {self.server.max_message} bytes (--max-message-size)", type="rpc")
        log.warning("session %s: request refused at %d bytes: %s", self.session_id,
                    refused.size, error.message)
        self._send_error(error, _head_echo(refused.head))

    def _handle_rpc(self, rpc: etree._Element) -> None:
        attrs, problem = _attr_echo(rpc)
        self.info.in_rpcs += 1
        if problem is not None:
            log.warning("session %s: request refused: %s", self.session_id, problem.message)
            self._send_error(problem, attrs)
            return
        if rpc.get("message-id") is None:
            self._send_error(RpcError("missing-attribute", "rpc has no message-id",
                                      type="rpc", info={"bad-attribute": "message-id",
                                                        "bad-element": "rpc"}), attrs)
            return
        operations = [c for c in rpc if isinstance(c.tag, str)]
        if len(operations) != 1:
            self._send_error(RpcError("malformed-message" if self.new_framing else
                                      "operation-failed", "an rpc must hold exactly one "
                                      "operation", type="rpc"), attrs)
            return
        op = operations[0]
        name = etree.QName(op).localname
        started = time.perf_counter()
        try:
            body = self._dispatch(op)
        except RpcError as exc:
            log.info("session %s: %s failed: %s: %s", self.session_id, name, exc.tag,
                     exc.message)
            self._send_error(exc, attrs)
            return
        except RpcErrors as exc:
            self._send_errors(exc.errors, attrs)
            return
        except Exception:  # never a traceback to the client, but always one in the log
            log.exception("session %s: %s failed unexpectedly", self.session_id, name)
            self._send_error(RpcError("operation-failed", f"internal error while handling "
                                      f"{name}; see the server log"), attrs)
            return
        handled = time.perf_counter()
        sent = self._send_reply(body, attrs)
        log.debug("session %s: %s handled in %.3f s, %d reply bytes sent in %.3f s",
                  self.session_id, name, handled - started, sent,
                  time.perf_counter() - handled)
        if name == "close-session":
            self.close()

    def _dispatch(self, op: etree._Element) -> Reply:
        try:
            return self.ops.dispatch(self.info, op)
        except NeedsTree:
            # The edit's text, read without its tree, was not plain; nothing changed yet.
            message = self.info.request.message
            log.debug("session %s: the edit's entries are not plain text; reading them as "
                      "a tree", self.session_id)
            self.info.request = message
            try:
                root = _parse(message.strip())
            except etree.XMLSyntaxError as exc:
                self.info.in_rpcs -= 1
                self.info.in_bad_rpcs += 1
                raise RpcError("malformed-message" if self.new_framing else
                               "operation-failed", f"the message is not well-formed XML: "
                               f"{exc}", type="rpc") from None
            problem = xml_problem(root, message)  # the edit's content is parsed now
            if problem is not None:
                raise problem from None
            return self.ops.dispatch(self.info, next(c for c in root if isinstance(c.tag, str)))

    # -- sending -----------------------------------------------------------------------
    def _send_reply(self, body: Reply, attrs: str | None) -> int:
        """Send a reply, a large one block by block while it is still being produced;
        ``attrs`` is the rpc's attributes as the reply echoes them (:func:`_attr_echo`)."""
        head = (f'<?xml version="1.0" encoding="UTF-8"?><rpc-reply xmlns="{NC}"'
                f"{attrs or ''}>")
        pieces = [head, body, "</rpc-reply>"] if isinstance(body, str) else \
            itertools.chain((head,), body, ("</rpc-reply>",))
        blocks = _blocks(pieces)
        try:
            first = next(blocks)  # a failure before the first byte is still an rpc-error
        except RpcError as exc:
            return self._send_error(exc, attrs)
        except Exception:
            log.exception("session %s: building the reply failed", self.session_id)
            return self._send_error(RpcError("operation-failed", "internal error while "
                                             "building the reply; see the server log"), attrs)
        sent = 0
        with self.send_lock:
            try:
                for block, last in _with_end(first, blocks, not isinstance(body, str)):
                    framed = frame_chunks(block) if self.new_framing else block
                    if last:
                        framed += end_of_message(self.new_framing)
                    self.channel.sendall(framed)
                    sent += len(framed)
            except (OSError, EOFError) as exc:
                log.info("session %s: reply not delivered: %s", self.session_id, exc)
            except Exception:  # half a reply is out: the session cannot go on
                log.exception("session %s: reply failed after %d bytes; closing the session",
                              self.session_id, sent)
                self.channel.close()
        return sent

    def send_notification(self, message: str) -> None:
        """One notification message, between replies (the send lock keeps them whole)."""
        body = f'<?xml version="1.0" encoding="UTF-8"?>{message}'.encode()
        framed = frame_chunks(body) + end_of_message(True) if self.new_framing \
            else frame_eom(body)
        with self.send_lock:
            # In blocks: paramiko's sendall copies what is left after every packet, which
            # is quadratic in a large notification (a YANG-Push update of thousands of
            # changes), and a block costs one copy.
            for start in range(0, len(framed), STREAM_BLOCK):
                self.channel.sendall(framed[start:start + STREAM_BLOCK])
            self.info.out_notifications += 1

    def _send_error(self, error: RpcError, attrs: str | None) -> int:
        return self._send_errors([error], attrs)

    def _send_errors(self, errors: list[RpcError], attrs: str | None) -> int:
        self.info.out_rpc_errors += 1
        return self._send_reply("".join(e.to_xml() for e in errors), attrs)

    def send_message(self, msg: str) -> None:  # used by python-netconf internals only
        self._send_reply(msg, None)

    def _reader_exits(self) -> None:
        self.server.unregister(self)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.server.unregister(self)


def _with_end(first: bytes, blocks: Iterator[bytes], streamed: bool
              ) -> Iterator[tuple[bytes, bool]]:
    """Each block, and whether the end marker follows it. A reply in one piece takes the
    marker along with its last block; a streamed one sends each block as soon as it is
    made (finding the last would mean making the next first: a large reply's first bytes
    would wait for its second block), and the marker alone after them."""
    if streamed:
        yield first, False
        for block in blocks:
            yield block, False
        yield b"", True
        return
    for following in itertools.chain(blocks, (None,)):
        yield first, following is None
        first = following


def _blocks(pieces: Iterable[str], size: int = STREAM_BLOCK,
            first: int = FIRST_STREAM_BLOCK) -> Iterator[bytes]:
    """Join small pieces into blocks of about ``size`` bytes; the first one smaller, so
    that a client relaying a large reply can start at once."""
    buffered: list[str] = []
    length = 0
    for piece in pieces:
        buffered.append(piece)
        length += len(piece)
        if length >= first:
            yield "".join(buffered).encode()
            buffered, length, first = [], 0, size
    if buffered:
        yield "".join(buffered).encode()


def _attr_echo(rpc: etree._Element) -> tuple[str, RpcError | None]:
    """The rpc's attributes as its rpc-reply carries them (RFC 6241 §4.2), and what is
    wrong with them if they are beyond the limits (then only a message-id within its
    limit is echoed). Each namespace is declared once, under the client's own prefix."""
    problem = check_rpc_attributes(rpc)  # before reading them: see MAX_ATTRIBUTES
    if problem is None:
        items = rpc.items()
    else:
        message_id = rpc.get("message-id")
        items = [("message-id", message_id)] if message_id is not None and \
            len(message_id) <= MAX_MESSAGE_ID else []
    return _attr_text(items, rpc.nsmap), problem


def _attr_text(items: list[tuple[str, str]], nsmap: dict[str | None, str]) -> str:
    prefix_of = {ns: prefix for prefix, ns in nsmap.items() if prefix}
    declared: dict[str, str] = {}
    out = []
    for name, value in items:
        if name.startswith("{"):
            ns, local = name[1:].split("}", 1)
            if ns == XML_NS:  # bound to "xml" by definition, and never declared
                prefix = "xml"
            else:
                prefix = declared.get(ns)
                if prefix is None:
                    prefix = prefix_of.get(ns) or _free_prefix(nsmap, declared)
                    declared[ns] = prefix
            name = f"{prefix}:{local}"
        out.append(f" {name}={quoteattr(value)}")
    return "".join(f" xmlns:{p}={quoteattr(ns)}" for ns, p in declared.items()) + \
        "".join(out)


def _free_prefix(nsmap: dict[str | None, str], declared: dict[str, str]) -> str:
    taken = {p for p in nsmap if p} | set(declared.values())
    return next(p for p in (f"a{i}" for i in itertools.count()) if p not in taken)


def _head_echo(head: bytes) -> str | None:
    """The attributes to echo for a request refused from its first bytes: those of its
    rpc start tag, if that tag is complete there and well-formed."""
    tag = root_start_tag(head)
    if tag is None:
        return None
    try:
        root = _parse(tag)
    except etree.XMLSyntaxError:
        return None
    return _attr_echo(root)[0] if root.tag == f"{{{NC}}}rpc" else None


class NetconfListener(SshServer):
    """The NETCONF subsystem over :class:`SshServer`: each session channel becomes a
    :class:`NetconfSession`."""

    def __init__(self, operations: Operations, authenticator: SshAuthenticator,
                 host_keys: Sequence[paramiko.PKey], address: str = "127.0.0.1",
                 port: int = 830, max_message: int = 256 << 20,
                 limits: SshLimits | None = None):
        self.operations = operations
        self.max_message = max_message
        self._sid_lock = threading.Lock()
        self._next_sid = 1
        super().__init__(authenticator, host_keys, address, port, limits or SshLimits(),
                         name="NETCONF")

    def allocate_session_id(self) -> int:
        with self._sid_lock:
            sid = self._next_sid
            self._next_sid += 1
            return sid

    def register(self, session: NetconfSession) -> None:
        self.operations.session_started(session.info)

    def unregister(self, session: NetconfSession) -> None:
        self.session_ended(session.channel)
        if session.info.session_id in self.operations.sessions:
            released = self.operations.end_session(session.info.session_id)
            log.info("session %s closed%s", session.info.session_id,
                     f"; released locks on {', '.join(released)}" if released else "")

    def _open_session(self, channel: paramiko.Channel) -> NetconfSession:
        return NetconfSession(channel, self, None, False)

    def _activity(self, session: NetconfSession) -> Hashable | None:
        # Idle means: no request in progress, none received since the last look, and no
        # subscription (a subscriber waits for notifications, not for its client).
        info = session.info
        if not session.session_open or info.request is not None or \
                self.operations.hub.subscribed(info.session_id) or \
                self.operations.push.holds(info.session_id):
            return None
        return info.in_rpcs, info.in_bad_rpcs, info.out_rpc_errors


__all__ = ["NetconfListener", "NetconfSession", "load_or_create_host_keys"]
