"""The dynamic subscriptions in the operational datastore (RFC 8639 /subscriptions, with
RFC 8641's datastore target and update trigger), each receiver's counters, and its backlog
on this server (nfmig-push-state): what an operator reads to see how far a hot-standby
replicator is behind."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from .push_format import SN_NS, YP_NS
from .push_subscription import Policy, PushSubscription

PUSH_STATE_NS = "urn:nfmig:params:xml:ns:yang:nfmig-push-state"
DS_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"


def subscriptions_xml(subscriptions: Iterable[PushSubscription]) -> str:
    rows = "".join(_subscription(s) for s in sorted(subscriptions, key=lambda s: s.id)
                   if not s.ending)
    return f'<subscriptions xmlns="{SN_NS}">{rows}</subscriptions>'


def _subscription(subscription: PushSubscription) -> str:
    policy = subscription.policy
    pending, age = subscription.backlog()
    stop = f"<stop-time>{_time(policy.stop)}</stop-time>" if policy.stop is not None else ""
    return (f"<subscription><id>{subscription.id}</id>"
            f'<datastore xmlns="{YP_NS}" xmlns:ds="{DS_NS}">ds:{policy.datastore}'
            f"</datastore>{policy.filter_xml}{stop}<encoding>encode-xml</encoding>"
            f"{_trigger(policy)}<receivers><receiver>"
            f"<name>session-{subscription.session_id}</name>"
            f"<sent-event-records>{subscription.sent_records}</sent-event-records>"
            f"<excluded-event-records>{subscription.excluded_records}"
            f"</excluded-event-records><state>active</state>"
            f'<pending-changes xmlns="{PUSH_STATE_NS}">{pending}</pending-changes>'
            f'<pending-age xmlns="{PUSH_STATE_NS}">{round(age * 1000)}</pending-age>'
            "</receiver></receivers></subscription>")


def _trigger(policy: Policy) -> str:
    if policy.on_change:
        excluded = "".join(f"<excluded-change>{c}</excluded-change>"
                           for c in sorted(policy.excluded))
        return (f'<on-change xmlns="{YP_NS}"><dampening-period>'
                f"{round(policy.dampening * 100)}</dampening-period><sync-on-start>"
                f"{'true' if policy.sync_on_start else 'false'}</sync-on-start>{excluded}"
                "</on-change>")
    anchor = (f"<anchor-time>{_time(policy.anchor)}</anchor-time>"
              if policy.anchor is not None else "")
    return (f'<periodic xmlns="{YP_NS}"><period>{round(policy.period * 100)}</period>'
            f"{anchor}</periodic>")


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
