"""YANG-Push over NETCONF: RFC 8639 dynamic subscriptions (establish-, modify-, delete-,
kill-subscription), RFC 8641 datastore subscriptions (on-change with dampening-period,
sync-on-start and excluded-change; periodic; resync-subscription) of the nat-session list,
carried as RFC 8640 says (notifications on the subscribing session, rpc-errors with the
identity as error-app-tag and the module's error-info).

Every subscription of the server is fed by one listener on the backend's change feed
(joined while any subscription exists: watching the NAT costs). A session may hold several
subscriptions; they end with it. Targets: the operational and running datastores (the
nat-session list is the NAT's table in both). What is left out: event-stream targets
(create-subscription serves the NETCONF stream), configured subscriptions, replay, QoS
(dscp, weighting, dependency), JSON encoding, and every node but nat-session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from itertools import count

from lxml import etree
from nfmig.nf_backends.base import Backend, SessionEvent
from nfmig.yang import NAT_MODULE, NAT_NS

from . import errors, nacm, push_format
from .change_tracking import ChangeFeed
from .errors import RpcError
from .filters import TopNode
from .push_format import SN_MODULE, SN_NS, YP_MODULE, YP_NS
from .push_select import FilterProblem, Selection, subtree_selection, xpath_selection
from .push_state import subscriptions_xml
from .push_subscription import Policy, PushSubscription
from .schema import ListEntryChecker, Schema

log = logging.getLogger(__name__)

DS_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
SUBSCRIBABLE = ("operational", "running")
MIN_PERIOD = 100  # centiseconds: a periodic push-update is the whole selection
PER_SESSION = 16  # subscriptions one NETCONF session may hold
TOTAL = 256  # subscriptions of the whole server
CHANGE_TYPES = ("create", "delete", "insert", "move", "replace")
# establish-subscription's parameters, by local name (sn's own and yang-push's augment)
_SN_PARAMS = {"stop-time", "encoding", "stream", "stream-filter-name", "stream-subtree-filter",
              "stream-xpath-filter", "replay-start-time", "dscp", "weighting", "dependency"}
_YP_PARAMS = {"datastore", "datastore-subtree-filter", "datastore-xpath-filter",
              "selection-filter-ref", "periodic", "on-change"}
# those of features this server does not offer: unknown, as RFC 7950 has it
_UNOFFERED = {"replay-start-time", "dscp", "weighting", "dependency"}


class SubscriptionError(RpcError):
    """An rpc-error of RFC 8639 §2.4.6 as RFC 8640 carries it: error-app-tag is the
    identity (module:name), error-info the module's yang-data with the reason and hints."""

    def __init__(self, identity: str, message: str, info: str, *, tag: str = "invalid-value",
                 hints: dict[str, str] | None = None):
        super().__init__(tag, message, app_tag=identity)
        module, _, name = identity.partition(":")
        ns = SN_NS if module == SN_MODULE else YP_NS
        container_ns = SN_NS if info in ("delete-subscription-error-info",) else YP_NS
        hint_text = "".join(f"<{k}>{_escape(v)}</{k}>" for k, v in (hints or {}).items())
        self.info_xml = (f'<{info} xmlns="{container_ns}"><reason xmlns:r="{ns}">r:{name}'
                         f"</reason>{hint_text}</{info}>")

    def to_xml(self) -> str:
        text = super().to_xml()
        return f"{text[:-len('</rpc-error>')]}<error-info>{self.info_xml}</error-info></rpc-error>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _establish_error(identity: str, message: str, **hints: str) -> SubscriptionError:
    tag = "resource-denied" if identity.endswith("insufficient-resources") else "invalid-value"
    return SubscriptionError(identity, message, "establish-subscription-datastore-error-info",
                             tag=tag, hints={k.replace("_", "-"): v for k, v in hints.items()})


class YangPush:
    """The dynamic subscriptions of one server, by id; the rpcs that manage them."""

    def __init__(self, backend: Backend, feed: ChangeFeed, schema: Schema, namespace: str):
        self.backend = backend
        self.feed = feed
        self.namespace = namespace
        self.checker = ListEntryChecker(schema, f"/{NAT_MODULE}:nat-session")
        self._subscriptions: dict[int, PushSubscription] = {}
        self._active: tuple[PushSubscription, ...] = ()  # what each report goes to
        self._ids = count(1)
        self._lock = threading.Lock()
        # Joining and leaving the feed (leaving may wait for the backend's watcher); never
        # taken by a report.
        self._membership = threading.Lock()
        self._listening = False

    def handlers(self) -> dict[str, Callable]:
        return {f"{{{SN_NS}}}establish-subscription": self.establish_subscription,
                f"{{{SN_NS}}}modify-subscription": self.modify_subscription,
                f"{{{SN_NS}}}delete-subscription": self.delete_subscription,
                f"{{{SN_NS}}}kill-subscription": self.kill_subscription,
                f"{{{YP_NS}}}resync-subscription": self.resync_subscription}

    def holds(self, session_id: int) -> bool:
        """Whether the session has a subscription (then it is not idle)."""
        return any(s.session_id == session_id for s in self._active)

    def state_node(self) -> TopNode:
        """/subscriptions in the operational datastore (server/push_state.py)."""
        def rows() -> list[str]:
            with self._lock:
                subscriptions = list(self._subscriptions.values())
            return [subscriptions_xml(subscriptions)]
        return TopNode(SN_NS, "subscriptions", rows)

    # -- rpcs ----------------------------------------------------------------------------
    def establish_subscription(self, session, op: etree._Element) -> str:
        policy = self._policy(op)
        if session.notify is None:
            raise errors.not_supported("subscriptions are served over NETCONF only; this "
                                       "session cannot receive notifications",
                                       type="application")
        if not nacm.reads_whole(self.namespace, "nat-session"):
            raise _establish_error(f"{YP_MODULE}:unchanging-selection", "the user may not "
                                   "read nat-session, so nothing would ever be sent")
        send = session.notify
        access = nacm.current()
        if access is not None:  # notification-name rules, judged as each one goes out
            send = access.engine.filtered(access, send)
        request = session.request
        with self._lock:
            if len(self._subscriptions) >= TOTAL or sum(
                    s.session_id == session.session_id
                    for s in self._subscriptions.values()) >= PER_SESSION:
                raise _establish_error(f"{SN_MODULE}:insufficient-resources", "too many "
                                       f"subscriptions (at most {PER_SESSION} per session, "
                                       f"{TOTAL} in all)")
            subscription = PushSubscription(
                next(self._ids), session.session_id, policy, self.backend, self.namespace,
                NAT_MODULE, send, lambda: session.request is not request, self._ended)
            self._subscriptions[subscription.id] = subscription
        try:
            self._join(subscription)
        except BaseException:
            with self._lock:
                self._subscriptions.pop(subscription.id, None)
            raise
        subscription.start()
        log.info("session %s: subscription %s to %s nat-session, %s", session.session_id,
                 subscription.id, policy.datastore, ", ".join(
                     f"{k} {v}" for k, v in policy.centiseconds.items()) or "on-change")
        return f'<id xmlns="{SN_NS}">{subscription.id}</id>'

    def modify_subscription(self, session, op: etree._Element) -> str:
        """dampening-period, period / anchor-time, stop-time and the filter may change; a
        changed filter sends the new selection whole (as sync-on-start would)."""
        subscription = self._own(session, op, "modify")
        policy = subscription.policy
        unknown = [c for c in op if isinstance(c.tag, str) and _local(c) not in
                   {"id", "stop-time", "datastore", "datastore-subtree-filter",
                    "datastore-xpath-filter", "periodic", "on-change"}]
        if unknown:
            raise SubscriptionError(f"{SN_MODULE}:filter-unsupported", f"modify-subscription "
                                    f"cannot change {_local(unknown[0])} here",
                                    "modify-subscription-datastore-error-info")
        datastore = _child(op, "datastore")
        if datastore is not None and _datastore(datastore) != policy.datastore:
            raise SubscriptionError(f"{SN_MODULE}:filter-unsupported", "the datastore of a "
                                    "subscription cannot change",
                                    "modify-subscription-datastore-error-info")
        changes: dict = {}
        trigger = _child(op, "on-change" if policy.on_change else "periodic")
        if _child(op, "periodic" if policy.on_change else "on-change") is not None:
            raise SubscriptionError(f"{SN_MODULE}:filter-unsupported", "an on-change "
                                    "subscription stays on-change, a periodic one periodic",
                                    "modify-subscription-datastore-error-info")
        if trigger is not None:
            changes.update(self._trigger(trigger, policy.on_change, modify=True))
        stop = _child(op, "stop-time")
        if stop is not None:
            changes["stop"] = _time(stop)
        selection = self._selection(op, policy.on_change, required=False,
                                    info="modify-subscription-datastore-error-info")
        for name, value in changes.items():
            setattr(policy, name, value)
        if selection is not None:
            policy.selection = selection
            policy.filter_xml = _filter_xml(op)
            if policy.on_change:
                subscription.resync()
        return "<ok/>"

    def delete_subscription(self, session, op: etree._Element) -> str:
        """RFC 8639 §2.4.4: nothing more is sent for it once the reply is out."""
        subscription = self._own(session, op, "delete")
        subscription.end()
        self._ended(subscription)
        return "<ok/>"

    def kill_subscription(self, session, op: etree._Element) -> str:
        """Any session's subscription (NACM keeps this rpc to administrators: the module
        marks it default-deny-all); its subscriber is told with subscription-terminated."""
        subscription = self._find(op, "kill")
        subscription.end(push_format.subscription_terminated(
            subscription.id, f"{SN_MODULE}:no-such-subscription"))
        self._ended(subscription)
        return "<ok/>"

    def resync_subscription(self, session, op: etree._Element) -> str:
        _only_params(op, {"id"})
        subscription = self._subscriptions.get(_id(op))
        if subscription is None or subscription.session_id != session.session_id or \
                not subscription.policy.on_change:
            raise SubscriptionError(f"{YP_MODULE}:no-such-subscription-resync",
                                    "no on-change subscription with that id on this session",
                                    "resync-subscription-error")
        subscription.resync()
        return "<ok/>"

    def session_ended(self, session_id: int) -> None:
        """The session's subscriptions end with it (RFC 8639 §2.4: dynamic ones do)."""
        with self._lock:
            mine = [s for s in self._subscriptions.values() if s.session_id == session_id]
        for subscription in mine:
            subscription.end(wait=False)
            self._ended(subscription)

    def close_all(self) -> None:
        with self._lock:
            every = list(self._subscriptions.values())
        for subscription in every:
            subscription.end(wait=False)
            self._ended(subscription)

    # -- the change feed -----------------------------------------------------------------
    def _take(self, events: list[SessionEvent]) -> None:
        for subscription in self._active:
            subscription.take(events)

    def _join(self, subscription: PushSubscription) -> None:
        with self._membership:
            if not self._listening:
                self.feed.subscribe(self._take)
                self._listening = True
            with self._lock:
                self._active += (subscription,)

    def _ended(self, subscription: PushSubscription) -> None:
        with self._membership:
            with self._lock:
                if self._subscriptions.get(subscription.id) is subscription:
                    del self._subscriptions[subscription.id]
                self._active = tuple(s for s in self._active if s is not subscription)
                idle = self._listening and not self._active
            if idle:
                self.feed.unsubscribe(self._take)
                self._listening = False

    def _own(self, session, op: etree._Element, what: str) -> PushSubscription:
        subscription = self._find(op, what)
        if subscription.session_id != session.session_id:
            raise _no_such(what, "that subscription was established by another session")
        return subscription

    def _find(self, op: etree._Element, what: str) -> PushSubscription:
        if what != "modify":
            _only_params(op, {"id"})
        subscription = self._subscriptions.get(_id(op))
        if subscription is None or subscription.ending:
            raise _no_such(what, "no subscription with that id")
        return subscription

    # -- establish-subscription's input --------------------------------------------------
    def _policy(self, op: etree._Element) -> Policy:
        for child in op:
            if not isinstance(child.tag, str):
                continue
            name, ns = _local(child), etree.QName(child).namespace
            if name in _UNOFFERED or ns not in (SN_NS, YP_NS) or \
                    name not in _SN_PARAMS | _YP_PARAMS:
                raise errors.unknown_element(f"establish-subscription has no parameter "
                                             f"{name} here", name, type="protocol")
        if any(_child(op, n) is not None for n in ("stream", "stream-filter-name",
                                                   "stream-subtree-filter",
                                                   "stream-xpath-filter")):
            raise errors.not_supported("event stream subscriptions are not offered by "
                                       "establish-subscription here; create-subscription "
                                       "(RFC 5277) serves the NETCONF stream",
                                       type="application")
        datastore_el = _child(op, "datastore")
        if datastore_el is None:
            raise errors.missing_element("establish-subscription needs a target: "
                                         "yp:datastore (ds:operational or ds:running)",
                                         "datastore", type="protocol")
        datastore = _datastore(datastore_el)
        encoding = _child(op, "encoding")
        if encoding is not None and _identity(encoding, SN_NS) != "encode-xml":
            raise _establish_error(f"{SN_MODULE}:encoding-unsupported", "only encode-xml "
                                   "is offered (the encoding of the NETCONF session)")
        on_change, periodic = _child(op, "on-change"), _child(op, "periodic")
        if (on_change is None) == (periodic is None):
            raise errors.missing_element("establish-subscription needs one update trigger: "
                                         "yp:on-change or yp:periodic",
                                         "on-change", type="protocol")
        selection = self._selection(op, on_change is not None, required=True,
                                    info="establish-subscription-datastore-error-info")
        assert selection is not None
        policy = Policy(datastore, selection, on_change is not None,
                        filter_xml=_filter_xml(op))
        for name, value in self._trigger(on_change if on_change is not None else periodic,
                                         on_change is not None).items():
            setattr(policy, name, value)
        stop = _child(op, "stop-time")
        if stop is not None:
            policy.stop = _time(stop)
        return policy

    def _trigger(self, trigger: etree._Element, on_change: bool, modify: bool = False
                 ) -> dict:
        allowed = {"dampening-period"} | (set() if modify else {"sync-on-start",
                                                                 "excluded-change"}) \
            if on_change else {"period", "anchor-time"}
        for child in trigger:
            if isinstance(child.tag, str) and (_local(child) not in allowed or
                                               etree.QName(child).namespace != YP_NS):
                raise errors.unknown_element(f"{_local(trigger)} has no parameter "
                                             f"{_local(child)} here", _local(child),
                                             type="protocol")
        out: dict = {}
        if on_change:
            damp = _centiseconds(trigger, "dampening-period", 0)
            out.update(dampening=damp / 100, centiseconds={"dampening-period": damp})
            if not modify:
                sync = (_text(trigger, "sync-on-start") or "true")
                if sync not in ("true", "false"):
                    raise errors.invalid_value(f"sync-on-start {sync!r} is not a boolean",
                                               info={"bad-element": "sync-on-start"})
                excluded = [(c.text or "").strip() for c in trigger
                            if _local(c) == "excluded-change"]
                bad = [e for e in excluded if e not in CHANGE_TYPES]
                if bad:
                    raise errors.invalid_value(f"excluded-change {bad[0]!r} is not one of "
                                               f"{', '.join(CHANGE_TYPES)}",
                                               info={"bad-element": "excluded-change"})
                out.update(sync_on_start=sync == "true", excluded=frozenset(excluded))
            return out
        period = _centiseconds(trigger, "period", None)
        if period is None:
            raise errors.missing_element("periodic needs a period (centiseconds)", "period",
                                         type="protocol")
        if period < MIN_PERIOD:
            raise _establish_error(f"{YP_MODULE}:period-unsupported", f"the period is at "
                                   f"least {MIN_PERIOD} centiseconds here (each update is "
                                   "the whole selection)", period_hint=str(MIN_PERIOD))
        out.update(period=period / 100, centiseconds={"period": period})
        anchor = _child(trigger, "anchor-time")
        if anchor is not None:
            out["anchor"] = _time(anchor)
        return out

    def _selection(self, op: etree._Element, on_change: bool, *, required: bool,
                   info: str) -> Selection | None:
        subtree = _child(op, "datastore-subtree-filter")
        xpath = _child(op, "datastore-xpath-filter")
        if _child(op, "selection-filter-ref") is not None:
            raise SubscriptionError(f"{SN_MODULE}:filter-unsupported", "this server has no "
                                    "configured filters (/sn:filters) to refer to", info)
        if subtree is None and xpath is None:
            if not required:
                return None
            raise SubscriptionError(
                f"{YP_MODULE}:on-change-unsupported" if on_change else
                f"{SN_MODULE}:filter-unsupported", "only /nfmig-nat:nat-session can be "
                "subscribed to here: give a datastore-subtree-filter or datastore-xpath-filter "
                "selecting it", info, hints={"filter-failure-hint": "/nfmig-nat:nat-session"})
        try:
            if subtree is not None:
                return subtree_selection(subtree, self.checker, self.namespace)
            return xpath_selection(xpath.text or "", xpath.nsmap, self.checker,
                                   self.namespace, NAT_MODULE)
        except FilterProblem as problem:
            identity = {"empty": f"{YP_MODULE}:unchanging-selection",
                        "not-session": f"{YP_MODULE}:on-change-unsupported" if on_change
                        else f"{SN_MODULE}:filter-unsupported"}.get(
                            problem.kind, f"{SN_MODULE}:filter-unsupported")
            raise SubscriptionError(identity, problem.hint, info,
                                    hints={"filter-failure-hint": problem.hint}) from None


def _filter_xml(op: etree._Element) -> str:
    """The datastore filter as given, to show it back in /subscriptions."""
    given = _child(op, "datastore-subtree-filter")
    if given is None:
        given = _child(op, "datastore-xpath-filter")
        if given is None:
            return ""
        # The XPath may name the module as its prefix (as RESTCONF paths do) without an
        # XML namespace declaration: shown back, the prefix must be declared.
        nsmap = {NAT_MODULE: NAT_NS, **{k: v for k, v in given.nsmap.items() if k}}
        given = etree.Element(given.tag, nsmap=nsmap)
        given.text = _child(op, "datastore-xpath-filter").text
    given.tail = None
    return etree.tostring(given, encoding="unicode")


def _no_such(what: str, message: str) -> SubscriptionError:
    info = {"modify": "modify-subscription-datastore-error-info"}.get(
        what, "delete-subscription-error-info")
    return SubscriptionError(f"{SN_MODULE}:no-such-subscription", message, info)


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _child(op: etree._Element, name: str) -> etree._Element | None:
    for ns in (YP_NS, SN_NS):
        found = op.find(f"{{{ns}}}{name}")
        if found is not None:
            return found
    return None


def _text(op: etree._Element, name: str) -> str | None:
    el = _child(op, name)
    return None if el is None else (el.text or "").strip()


def _only_params(op: etree._Element, names: set[str]) -> None:
    for child in op:
        if isinstance(child.tag, str) and (_local(child) not in names or
                                           etree.QName(child).namespace not in (SN_NS, YP_NS)):
            raise errors.unknown_element(f"{_local(op)} has no parameter {_local(child)}",
                                         _local(child), type="protocol")


def _id(op: etree._Element) -> int:
    text = _text(op, "id")
    if text is None:
        raise errors.missing_element(f"{_local(op)} needs the subscription's id", "id",
                                     type="protocol")
    if not text.isdigit() or int(text) >= 2**32:
        raise errors.invalid_value(f"id {text!r} is not a subscription id (uint32)",
                                   info={"bad-element": "id"})
    return int(text)


def _identity(el: etree._Element, namespace: str) -> str:
    """The local name of an identityref's value, or "" when it is not of ``namespace``."""
    prefix, _, name = (el.text or "").strip().rpartition(":")
    return name if el.nsmap.get(prefix or None) == namespace else ""


def _datastore(el: etree._Element) -> str:
    name = _identity(el, DS_NS)
    if name in SUBSCRIBABLE:
        return name
    raise SubscriptionError(f"{YP_MODULE}:datastore-not-subscribable",
                            f"datastore {(el.text or '').strip()!r} cannot be subscribed to "
                            "here: ds:operational or ds:running",
                            "establish-subscription-datastore-error-info")


def _centiseconds(trigger: etree._Element, name: str, default: int | None) -> int | None:
    text = _text(trigger, name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or int(text) >= 2**32:
        raise errors.invalid_value(f"{name} {text!r} is not a number of centiseconds "
                                   "(0 to 4294967295)", info={"bad-element": name})
    return int(text)


def _time(el: etree._Element) -> float:
    """A yang:date-and-time as time.time()."""
    text = (el.text or "").strip()
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            raise ValueError("no time zone")
    except ValueError:
        raise errors.invalid_value(f"{_local(el)} {text!r} is not a date-and-time (RFC 3339, "
                                   "with its time zone)", info={"bad-element": _local(el)}) \
            from None
    return when.timestamp()
