"""The text of YANG-Push notifications (RFC 8641 §3.7, in the NETCONF envelope of RFC 5277
as RFC 8640 carries them), made with string formatting from Session tuples: a
push-change-update may hold thousands of edits and a push-update a whole table, so no tree
is built (session_codec's templates format the entries).

- push-update: ``datastore-contents`` holds the selected nat-session entries;
- push-change-update: ``datastore-changes`` holds an ietf-yang-patch ``yang-patch`` (in the
  ietf-yang-push namespace, where its grouping is used), one edit per changed session:
  ``create`` (with its value), ``merge`` (changed: the whole entry as it is now),
  ``replace`` (ended and made again within one dampening period) or ``delete``. The
  target is the entry's RFC 8040 data resource identifier,
  ``/nfmig-nat:nat-session=TCP,10.0.0.1,1024,198.51.100.1,443`` (RFC 8072's
  target-resource-offset), each key value percent-encoded as RFC 8040 §3.5.3 says;
- subscription-terminated and subscription-completed (RFC 8639 §2.7).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import quote

from nfmig.nf_backends.base import Session

from .notifications import NOTIF_NS, event_time
from .session_codec import session_batches_to_xml, sessions_to_xml

SN_NS = "urn:ietf:params:xml:ns:yang:ietf-subscribed-notifications"
YP_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-push"
SN_MODULE = "ietf-subscribed-notifications"
YP_MODULE = "ietf-yang-push"
# yang-patch operations of the four kinds of coalesced change (see push_subscription)
CREATE, MERGE, REPLACE, DELETE = "create", "merge", "replace", "delete"


def notification(content: str) -> str:
    """One notification message around ``content`` (RFC 5277 §4: eventTime first)."""
    return (f'<notification xmlns="{NOTIF_NS}"><eventTime>{event_time()}</eventTime>'
            f"{content}</notification>")


def push_update(subscription_id: int, entries: Iterable[str]) -> Iterator[str]:
    """A push-update in pieces: the envelope's head, the entries as made, the tail."""
    yield (f'<notification xmlns="{NOTIF_NS}"><eventTime>{event_time()}</eventTime>'
           f'<push-update xmlns="{YP_NS}"><id>{subscription_id}</id><datastore-contents>')
    yield from entries
    yield "</datastore-contents></push-update></notification>"


def contents(batches: Iterable[list[Session]], namespace: str) -> Iterator[str]:
    """nat-session entries of lists of sessions, each list formatted in one go."""
    return session_batches_to_xml(batches, namespace)


def _target_key(value: object) -> str:
    text = str(value)
    # RFC 8040 §3.5.3: reserved characters percent-encoded; only IPv6 addresses have any
    return quote(text, safe="") if ":" in text else text


class PatchWriter:
    """push-change-update notifications of one subscription, numbered (patch-id)."""

    def __init__(self, subscription_id: int, namespace: str, module: str):
        self.subscription_id = subscription_id
        self.namespace = namespace
        self.prefix = f"/{module}:nat-session="
        self.patches = 0

    def message(self, edits: list[tuple[str, Session]]) -> str:
        """One push-change-update with ``edits`` (operation, session) in that order."""
        self.patches += 1
        values = iter(sessions_to_xml([s for op, s in edits if op != DELETE], self.namespace))
        parts = [f'<notification xmlns="{NOTIF_NS}"><eventTime>{event_time()}</eventTime>'
                 f'<push-change-update xmlns="{YP_NS}"><id>{self.subscription_id}</id>'
                 f"<datastore-changes><yang-patch><patch-id>{self.subscription_id}-"
                 f"{self.patches}</patch-id>"]
        prefix = self.prefix
        for number, (op, s) in enumerate(edits, 1):
            target = "%s%s,%s,%d,%s,%d" % (prefix, s[0], _target_key(s[1]), s[2],  # noqa: UP031
                                           _target_key(s[3]), s[4])
            if op == DELETE:
                parts.append(f"<edit><edit-id>{number}</edit-id><operation>delete</operation>"
                             f"<target>{target}</target></edit>")
            else:
                parts.append(f"<edit><edit-id>{number}</edit-id><operation>{op}</operation>"
                             f"<target>{target}</target><value>{next(values)}</value></edit>")
        parts.append("</yang-patch></datastore-changes></push-change-update></notification>")
        return "".join(parts)


def subscription_terminated(subscription_id: int, reason: str) -> str:
    """``reason``: an identity as module:name (ietf-subscribed-notifications or
    ietf-yang-push)."""
    module, _, name = reason.partition(":")
    ns = SN_NS if module == SN_MODULE else YP_NS
    return notification(f'<subscription-terminated xmlns="{SN_NS}"><id>{subscription_id}</id>'
                        f'<reason xmlns:r="{ns}">r:{name}</reason></subscription-terminated>')


def subscription_completed(subscription_id: int) -> str:
    return notification(f'<subscription-completed xmlns="{SN_NS}"><id>{subscription_id}</id>'
                        "</subscription-completed>")
