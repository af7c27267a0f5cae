"""A YANG-Push subscriber (RFC 8639, RFC 8641 over NETCONF as RFC 8640 carries it): the
subscription to a NAT's sessions, and its notifications read as changes of the session table.

``establish-subscription`` asks for the operational datastore's nat-session list (or a
subset by subtree filter), on change, with a dampening period, starting with the whole
selection (sync-on-start). The server then sends a ``push-update`` with every selected
session, and one ``push-change-update`` per dampening period with the sessions that were
created, changed or ended (a YANG Patch: one edit per session). Any YANG-Push collector can
read the same feed; this module is what the standby replicator (client.standby) reads it with.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import NamedTuple
from urllib.parse import unquote
from xml.sax.saxutils import escape

from lxml import etree

from .netconf import NAT_NS, TextRpc
from .selection import Entry, parse_entries

SN_NS = "urn:ietf:params:xml:ns:yang:ietf-subscribed-notifications"
YP_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-push"
DS_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
NOTIFICATION_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)
_KEYED_TARGET = re.compile(r"/nfmig-nat:nat-session=([^/]*)$")
_EVENT_TIME = re.compile(r"<eventTime>([^<]+)</eventTime>")
_CLOCKS_AGREE = 60.0  # seconds: an eventTime older than this, or ahead, is another clock's
_SUBSCRIPTION = re.compile(r"<push-change-update[^>]*>\s*<id>([^<]+)</id>")
_SESSION = re.compile(r"<nat-session\b.*?</nat-session>", re.S)
_DELETE_TARGET = re.compile(r"<operation>\s*(?:delete|remove)\s*</operation>\s*"
                            r"<target>([^<]*)</target>")


class Change(NamedTuple):
    """A session of the source as it is now (``entry``), or ended (``entry`` None)."""

    key: tuple[str, ...]
    entry: Entry | None
    seen: float  # time.monotonic() when the subscriber read it


class Update(NamedTuple):
    """One notification of a subscription, read: ``whole`` for a push-update (every selected
    session: what is not in it has ended), else the changes of a push-change-update;
    ``ended`` for subscription-terminated (with its reason)."""

    subscription: str
    whole: bool
    changes: list[Change]
    ended: str | None = None


class EstablishSubscription(TextRpc):
    """RFC 8639 establish-subscription of the operational datastore's nat-session list (RFC
    8641 on-change, with ``dampening`` in centiseconds); its reply holds the id."""

    def request(self, subtree: str = "", dampening: int = 5,  # type: ignore[override]
                sync_on_start: bool = True) -> object:
        selection = subtree or f'<nat-session xmlns="{NAT_NS}"/>'
        return self._request(
            f'<establish-subscription xmlns="{SN_NS}" xmlns:yp="{YP_NS}" '
            f'xmlns:ds="{DS_NS}"><yp:datastore>ds:operational</yp:datastore>'
            f"<yp:datastore-subtree-filter>{selection}</yp:datastore-subtree-filter>"
            f"<yp:on-change><yp:dampening-period>{int(dampening)}</yp:dampening-period>"
            f"<yp:sync-on-start>{'true' if sync_on_start else 'false'}</yp:sync-on-start>"
            "</yp:on-change></establish-subscription>")


class DeleteSubscription(TextRpc):
    def request(self, subscription: str) -> object:  # type: ignore[override]
        return self._request(f'<delete-subscription xmlns="{SN_NS}"><id>'
                             f"{escape(subscription)}</id></delete-subscription>")


def subscription_id(reply_xml: str | bytes) -> str:
    """The id in an establish-subscription reply."""
    raw = reply_xml.encode() if isinstance(reply_xml, str) else reply_xml
    root = etree.fromstring(raw, parser=_PARSER)
    found = root.findtext(f"{{{SN_NS}}}id")
    if not found:
        raise ValueError("the establish-subscription reply holds no id")
    return found.strip()


def read_notification(xml: str | bytes, now: float | None = None) -> Update | None:
    """A YANG-Push notification as an Update; None for any other notification. Each
    change is dated by the notification's eventTime when this host's clock agrees with it
    (the change is then as old as the source says), else by when it was read."""
    if isinstance(xml, bytes):
        xml = xml.decode()
    seen = time.monotonic() if now is None else now
    seen = _event_age(xml, seen)
    if "<push-change-update" in xml[:400]:
        quick = _quick_changes(xml, seen)
        if quick is not None:
            return quick
    root = etree.fromstring(xml.encode(), parser=_PARSER)
    for child in root:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child)
        if name.namespace == YP_NS and name.localname == "push-update":
            return Update(_id(child), True, _whole(child, seen))
        if name.namespace == YP_NS and name.localname == "push-change-update":
            return Update(_id(child), False, _changes(child, seen))
        if name.namespace == SN_NS and name.localname == "subscription-terminated":
            reason = child.findtext(f"{{{SN_NS}}}reason") or "terminated"
            return Update(_id(child, SN_NS), False, [], reason.strip())
    return None


def _id(element: etree._Element, namespace: str = YP_NS) -> str:
    return (element.findtext(f"{{{namespace}}}id") or "").strip()


def _sessions_text(container: etree._Element | None) -> str:
    if container is None:
        return ""
    return "".join(etree.tostring(s, encoding="unicode")
                   for s in container.iter(f"{{{NAT_NS}}}nat-session"))


def _whole(update: etree._Element, seen: float) -> list[Change]:
    text = _sessions_text(update.find(f"{{{YP_NS}}}datastore-contents"))
    return [Change(e.key, e, seen) for e in parse_entries(text)]


def _changes(update: etree._Element, seen: float) -> list[Change]:
    patch = update.find(f"{{{YP_NS}}}datastore-changes")
    changes: list[Change] = []
    if patch is None:
        return changes
    for edit in patch.iter("{*}edit"):
        operation = (edit.findtext("{*}operation") or "").strip()
        if operation in ("delete", "remove"):
            key = target_key(edit.findtext("{*}target") or "")
            if key is not None:
                changes.append(Change(key, None, seen))
            continue
        for entry in parse_entries(_sessions_text(edit.find("{*}value"))):
            changes.append(Change(entry.key, entry, seen))
    return changes


def _event_age(xml: str, seen: float) -> float:
    """``seen`` moved back to the notification's eventTime, if this host's clock agrees."""
    found = _EVENT_TIME.search(xml, 0, 400)
    if found is None:
        return seen
    try:
        stamp = datetime.fromisoformat(found.group(1).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return seen
    age = time.time() - stamp
    return seen - age if 0 <= age < _CLOCKS_AGREE else seen


def _quick_changes(xml: str, seen: float) -> Update | None:
    """A push-change-update read by its text alone (thousands of edits a second): every
    value is a nat-session, every edit without one a delete. None when the text is not laid
    out that plainly (the tree then decides)."""
    found = _SUBSCRIPTION.search(xml)
    values = _SESSION.findall(xml)
    deletes = _DELETE_TARGET.findall(xml)
    if found is None or len(values) + len(deletes) != xml.count("<edit>"):
        return None
    changes = [Change(e.key, e, seen) for e in parse_entries("".join(values))]
    if len(changes) != len(values):
        return None
    for target in deletes:
        key = target_key(target)
        if key is None:
            return None
        changes.append(Change(key, None, seen))
    return Update(found.group(1), False, changes)


def target_key(target: str) -> tuple[str, ...] | None:
    """The key of ``/nfmig-nat:nat-session=TCP,10.0.0.7,40000,...`` (RFC 8040 section 3.5.3:
    comma-separated, percent-encoded values), or None for another target."""
    found = _KEYED_TARGET.search(target.strip())
    if found is None:
        return None
    values = tuple(unquote(v) for v in found.group(1).split(","))
    return values if len(values) == 5 else None
