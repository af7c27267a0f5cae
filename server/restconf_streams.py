"""RESTCONF event streams (RFC 8040 §6) and their discovery (§9.3, ietf-restconf-monitoring).

One stream, NETCONF, in XML and JSON, as server-sent events. Every notification the server
publishes is also kept in a replay log bounded in count and bytes, so a client that comes
back with ``start-time`` gets what it missed (as long as the log still holds it);
``stop-time`` ends the stream at that time, ``filter`` is an XPath 1.0 expression on the
notification's content, with module names as prefixes (§4.8.4).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from aiohttp import web
from lxml import etree

from . import nacm
from .filters import TopNode
from .notifications import NOTIF_NS, NotificationHub, event_time
from .restconf_codec import JsonWriter, SchemaIndex
from .restconf_query import bad_request, check_names, not_found

STREAM = "NETCONF"
STREAM_PARAMS = ("start-time", "stop-time", "filter")
RCMON_NS = "urn:ietf:params:xml:ns:yang:ietf-restconf-monitoring"
RCMON = "ietf-restconf-monitoring"
# RFC 5277's replayComplete and notificationComplete (RFC 8040 §6.3 keeps them for RESTCONF)
NCN_NS = "urn:ietf:params:xml:ns:netmod:notification"
NCN = "nc-notifications"
# Stands for "scheme://host" in what the data layer produces; the web layer puts in the
# request's own, so a location is the URL the client reached this server by.
BASE_MARK = "restconf-base-url-of-this-request:"
CAPABILITIES = (
    "urn:ietf:params:restconf:capability:defaults:1.0?basic-mode=explicit",
    "urn:ietf:params:restconf:capability:depth:1.0",
    "urn:ietf:params:restconf:capability:fields:1.0",
    "urn:ietf:params:restconf:capability:filter:1.0",
    "urn:ietf:params:restconf:capability:replay:1.0",
    "urn:ietf:params:restconf:capability:with-defaults:1.0",
    "urn:ietf:params:restconf:capability:yang-patch:1.0",
)
REPLAY_COUNT = 1000  # notifications the replay log holds at most
REPLAY_BYTES = 8 << 20  # and bytes (a sessions-changed can carry 1000 changes)
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


class ReplayLog:
    """The last notifications published, oldest first, within both bounds."""

    def __init__(self, count: int = REPLAY_COUNT, size: int = REPLAY_BYTES):
        self.created = event_time()
        self._items: deque[tuple[datetime, str]] = deque()
        self._bytes = 0
        self._count, self._size = count, size
        self.lock = threading.RLock()  # a subscribe may publish (the backend starts watching)

    def record(self, message: str) -> None:
        start = message.find("<eventTime>") + len("<eventTime>")
        when = _parse_time(message[start:message.find("<", start)])
        with self.lock:
            self._items.append((when, message))
            self._bytes += len(message)
            while len(self._items) > self._count or self._bytes > self._size:
                self._bytes -= len(self._items.popleft()[1])

    def between(self, start: datetime, stop: datetime | None) -> list[str]:
        """The messages from ``start`` to ``stop`` (inclusive); call with the lock held."""
        return [m for t, m in self._items if t >= start and (stop is None or t <= stop)]


class EventStreams:
    """The stream resources, and restconf-state for the monitoring module."""

    def __init__(self, hub: NotificationHub, index: SchemaIndex, json_writer: JsonWriter):
        self.hub = hub
        self.index = index
        self.json = json_writer
        self.replay = ReplayLog()
        self._queues: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(2**31)
        hub.recorder = self.replay.record

    # -- discovery ---------------------------------------------------------------------
    def state_node(self) -> TopNode:
        return TopNode(RCMON_NS, "restconf-state", lambda: [self.state_xml()])

    def state_xml(self) -> str:
        caps = "".join(f"<capability>{escape(c)}</capability>" for c in CAPABILITIES)
        access = "".join(f"<access><encoding>{e}</encoding><location>{BASE_MARK}/restconf/"
                         f"streams/{STREAM}/{e}</location></access>" for e in ("xml", "json"))
        return (f'<restconf-state xmlns="{RCMON_NS}"><capabilities>{caps}</capabilities>'
                f"<streams><stream><name>{STREAM}</name><description>The server's "
                "notifications: migration-event and sessions-changed</description>"
                "<replay-support>true</replay-support><replay-log-creation-time>"
                f"{self.replay.created}</replay-log-creation-time>{access}</stream>"
                "</streams></restconf-state>")

    # -- the stream ----------------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        stream, encoding = request.match_info["stream"], request.match_info["encoding"]
        if stream != STREAM or encoding not in ("json", "xml"):
            raise not_found(f"no stream {stream}/{encoding}; GET /restconf/data/{RCMON}:"
                            "restconf-state lists the streams and their locations")
        start, stop, selector = self._parameters(request.rel_url.query)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        sid = next(self._ids)

        def deliver(message: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, message)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        replayed: list[str] = []
        with self.replay.lock:  # nothing published between the snapshot and the subscription
            if start is not None:
                replayed = self.replay.between(start, stop)
            live = stop is None or stop > datetime.now(UTC)
            if live:
                self.hub.subscribe(sid, deliver, None)
                self._queues[sid] = queue
        try:
            await response.write(b": subscribed\n\n")
            for message in replayed:
                await self._send(response, message, encoding, selector)
            if start is not None:  # what follows is live
                await _write_event(response, _marker("replayComplete", encoding))
            seen = set(replayed)
            stopped = not live
            while live:
                wait = None if stop is None else (stop - datetime.now(UTC)).total_seconds()
                if wait is not None and wait <= 0:
                    stopped = True
                    break
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    stopped = True
                    break
                if message is None:
                    break
                if message not in seen:
                    await self._send(response, message, encoding, selector)
            if stopped:  # stop-time reached; a server shutting down says nothing
                await _write_event(response, _marker("notificationComplete", encoding))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._queues.pop(sid, None)
            self.hub.unsubscribe(sid)
        return response

    def _parameters(self, query) -> tuple[datetime | None, datetime | None,
                                          Callable[[etree._Element], bool] | None]:
        check_names(query, STREAM_PARAMS, "on a stream")
        start = _time_parameter(query, "start-time")
        stop = _time_parameter(query, "stop-time")
        if start is not None and start > datetime.now(UTC):
            raise bad_request("start-time is in the future", "start-time")
        if stop is not None and start is None:
            raise bad_request("stop-time needs start-time (RFC 8040 §4.8.8)", "stop-time")
        if stop is not None and stop < start:
            raise bad_request("stop-time is before start-time", "stop-time")
        expression = query.get("filter")
        return start, stop, None if expression is None else self._filter(expression)

    def _filter(self, expression: str) -> Callable[[etree._Element], bool]:
        namespaces = {name: ns for name, ns in self.index.ns_of.items() if ns}
        try:
            xpath = etree.XPath(expression, namespaces=namespaces)
            xpath(etree.Element("probe"))  # undefined prefixes and functions show here
        except etree.XPathError as exc:
            raise bad_request(f"filter {expression!r} is not an XPath 1.0 expression this "
                              f"server can evaluate: {exc}", "filter") from None

        def selects(content: etree._Element) -> bool:
            try:  # a copy: the content alone is the document "/" starts from
                result = xpath(copy.deepcopy(content).getroottree())
            except etree.XPathError:
                return False
            return bool(result) if not isinstance(result, list) else len(result) > 0

        return selects

    async def _send(self, response: web.StreamResponse, message: str, encoding: str,
                    selector: Callable[[etree._Element], bool] | None) -> None:
        if not nacm.notification_permitted(message):  # judged as delivered (RFC 8341)
            return
        root = None
        if selector is not None:
            root = etree.fromstring(message.encode(), parser=_PARSER)
            content = next((c for c in root if c.tag != f"{{{NOTIF_NS}}}eventTime"), None)
            if content is None or not selector(content):
                return
        text = message if encoding == "xml" else self.notification_json(message, root)
        await _write_event(response, text)

    def notification_json(self, message: str, root: etree._Element | None = None) -> str:
        if root is None:
            root = etree.fromstring(message.encode(), parser=_PARSER)
        when = root.findtext(f"{{{NOTIF_NS}}}eventTime")
        content = [c for c in root if c.tag != f"{{{NOTIF_NS}}}eventTime"]
        members = self.json.members(content, None)
        return json.dumps({"ietf-restconf:notification": {"eventTime": when, **members}})

    def close(self) -> None:
        for queue in list(self._queues.values()):
            queue.put_nowait(None)


async def _write_event(response: web.StreamResponse, text: str) -> None:
    lines = "".join(f"data: {line}\n" for line in text.splitlines())
    await response.write(f"{lines}\n".encode())


def _marker(name: str, encoding: str) -> str:
    """replayComplete or notificationComplete, stamped now; no filter applies to them."""
    if encoding == "json":
        return json.dumps({"ietf-restconf:notification": {"eventTime": event_time(),
                                                          f"{NCN}:{name}": {}}})
    return (f'<notification xmlns="{NOTIF_NS}"><eventTime>{event_time()}</eventTime>'
            f'<{name} xmlns="{NCN_NS}"/></notification>')


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.strip())


def _time_parameter(query, name: str) -> datetime | None:
    text = query.get(name)
    if text is None:
        return None
    try:
        when = _parse_time(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise bad_request(f"{name} is a date-and-time with its offset (RFC 3339), e.g. "
                          "2026-01-31T12:00:00Z", name)
    return when

