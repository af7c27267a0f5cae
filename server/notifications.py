"""NETCONF event notifications (RFC 5277): subscriptions and the events that feed them.

There is one stream, NETCONF, carrying the model's notifications: sessions-changed, from the
backend's own change reports (taken from the change feed only while someone subscribes, since
following the table costs; sessions created and deleted, as the model's enumeration has it),
and migration-event, announced by migrators. Each subscriber gets its own
queue and sender thread, so a slow reader delays nobody else.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from lxml import etree
from nfmig.nf_backends.base import Backend, SessionEvent

from . import errors
from .change_tracking import ChangeFeed
from .errors import RpcError
from .filters import subtree_filter

log = logging.getLogger(__name__)

NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
STREAM = "NETCONF"
BATCH_LIMIT = 1000  # changes per sessions-changed notification
QUEUE_LIMIT = 10000  # notifications one subscriber may have waiting before some are dropped
REPORTED = ("created", "deleted")  # the changes sessions-changed reports (its event leaf)
CHANGE_LEAVES = ("protocol", "src_address", "src_port", "dst_address", "dst_port",
                 "translated_address", "translated_port")

Send = Callable[[str], None]


def event_time() -> str:
    """Now, as RFC 3339 date-and-time in UTC."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Subscription:
    """One session's subscription: what it selects, and a queue drained by its own thread."""

    def __init__(self, session_id: int, send: Send, selector: etree._Element | None):
        self.session_id = session_id
        self.selector = selector
        self.dropped = 0
        self._send = send
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._deliver, daemon=True,
                                        name=f"notifications-{session_id}")
        self._thread.start()

    def offer(self, message: str) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 100, 10000):
                log.warning("session %s reads notifications too slowly; %d dropped so far",
                            self.session_id, self.dropped)

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread ends anyway once the session's channel is gone
            pass

    def _deliver(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._send(message)
            except Exception as exc:  # the session is gone; its unregister ends us
                log.info("session %s: notification not delivered: %s", self.session_id, exc)
                return


class NotificationHub:
    """Subscriptions of every session, and publication to them."""

    def __init__(self, backend: Backend, namespace: str, feed: ChangeFeed | None = None):
        self.backend = backend
        self.feed = feed if feed is not None else ChangeFeed(backend)
        self.namespace = namespace
        self._subscriptions: dict[int, Subscription] = {}
        self._lock = threading.Lock()
        # Serializes joining and leaving the change feed; never taken by a publication, so
        # leaving (which may wait for the backend's watcher) cannot wait for one.
        self._membership = threading.Lock()
        # Sees every notification published, subscribers or not (a replay log).
        self.recorder: Send | None = None

    # -- subscriptions -----------------------------------------------------------------
    def subscribe(self, session_id: int, send: Send, selector: etree._Element | None) -> None:
        with self._membership:
            with self._lock:
                if session_id in self._subscriptions:
                    raise errors.in_use("this session already has a subscription; open "
                                        "another session for a second one")
                subscription = self._subscriptions[session_id] = Subscription(
                    session_id, send, selector)
                first = len(self._subscriptions) == 1
            if first:
                try:
                    self.feed.subscribe(self.sessions_changed)
                except BaseException:
                    with self._lock:
                        del self._subscriptions[session_id]
                    subscription.close()
                    raise
        log.info("session %s subscribed to the %s stream", session_id, STREAM)

    def unsubscribe(self, session_id: int) -> None:
        with self._membership:
            with self._lock:
                subscription = self._subscriptions.pop(session_id, None)
                if subscription is None:
                    return
                subscription.close()
                last = not self._subscriptions
            if last:
                self.feed.unsubscribe(self.sessions_changed)

    def subscribed(self, session_id: int) -> bool:
        return session_id in self._subscriptions

    # -- publication -------------------------------------------------------------------
    def publish(self, content: str) -> None:
        """Send one notification whose content (the model's notification element) is
        ``content`` to every subscriber whose filter selects it."""
        recorder = self.recorder
        head = f'<notification xmlns="{NOTIF_NS}"><eventTime>{event_time()}</eventTime>'
        if recorder is not None:  # first: a subscriber that replays from it misses nothing
            recorder(f"{head}{content}</notification>")
        with self._lock:
            subscriptions = list(self._subscriptions.values())
        if not subscriptions:
            return
        for subscription in subscriptions:
            selected = _select(content, subscription.selector)
            if selected:
                subscription.offer(f"{head}{selected}</notification>")

    def sessions_changed(self, events: list[SessionEvent]) -> None:
        """The backend's change report, as sessions-changed notifications: the sessions
        created and deleted (an update is no event of the notification's)."""
        events = [event for event in events if event[0] in REPORTED]
        for start in range(0, len(events), BATCH_LIMIT):
            changes = "".join(_change(what, session)
                              for what, session in events[start:start + BATCH_LIMIT])
            self.publish(f'<sessions-changed xmlns="{self.namespace}">{changes}'
                         "</sessions-changed>")


def _change(what: str, session) -> str:
    leaves = "".join(f"<{name}>{escape(str(value))}</{name}>"
                     for name, value in zip(CHANGE_LEAVES, (
                         session.protocol, session.src_address, session.src_port,
                         session.dst_address, session.dst_port, session.translated_address,
                         session.translated_port), strict=True)
                     if value is not None)
    return f"<change><event>{what}</event>{leaves}</change>"


def _select(content: str, selector: etree._Element | None) -> str:
    """What a subtree filter selects from one notification's content ("" for nothing)."""
    if selector is None:
        return content
    wrapper = etree.fromstring(f"<content>{content}</content>")
    selected = subtree_filter(wrapper, selector)
    return "".join(etree.tostring(node, encoding="unicode") for node in selected)


def parse_subscription(op: etree._Element) -> etree._Element | None:
    """The create-subscription request's filter (None: everything), after checking what
    this server supports: the NETCONF stream, subtree filters, no replay."""
    # RFC 5277's filter is the base namespace's filter type; some clients qualify it with
    # the notification namespace instead, so both are read.
    known = {f"{{{NOTIF_NS}}}{name}" for name in ("stream", "filter", "startTime", "stopTime")}
    known.add(f"{{{NC_NS}}}filter")
    for child in op:
        if isinstance(child.tag, str) and child.tag not in known:
            raise errors.unknown_element(f"create-subscription has no parameter "
                                         f"{etree.QName(child).localname}",
                                         etree.QName(child).localname)
    stream = op.findtext(f"{{{NOTIF_NS}}}stream")
    if stream is not None and stream.strip() != STREAM:
        raise errors.invalid_value(f"no stream named {stream.strip()!r}; this server has "
                                   f"only {STREAM}", info={"bad-element": "stream"})
    if op.find(f"{{{NOTIF_NS}}}startTime") is not None:
        raise RpcError("operation-failed", "replay is not supported: the NETCONF stream "
                       "keeps no history, so startTime cannot be honoured")
    if op.find(f"{{{NOTIF_NS}}}stopTime") is not None:
        raise errors.missing_element("stopTime needs startTime (RFC 5277 §2.1.1)",
                                     "startTime")
    selector = op.find(f"{{{NC_NS}}}filter")
    if selector is None:
        selector = op.find(f"{{{NOTIF_NS}}}filter")
    if selector is not None and selector.get("type", "subtree") != "subtree":
        raise errors.invalid_value("only subtree filters are supported on the stream",
                                   info={"bad-attribute": "type", "bad-element": "filter"})
    return selector
