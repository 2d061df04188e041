"""Grouped notifications, per endpoint and opt-in: what Alertmanager's ``group_by`` / ``group_wait`` /
``group_interval`` do, so that a market-wide shock reaches a Slack channel or a risk team's webhook as a few
notifications instead of dozens.

- ``group_by`` (``GROUP_BY``) splits an endpoint's alert events into groups: ``key_type`` (topics apart from
  tickers), ``severity``, ``topic`` (the topic an alert is about: a topic alert's own key, a ticker alert's dominant
  topic when it fired; ticker alerts emitted before they carried one share the group ``topic=-``), or ``all`` alone
  (one group for everything the endpoint receives). Unset, the endpoint gets every event on its own, as before.
- ``group_wait_s``: the first event of a group that has not notified lately waits this long for others.
  ``group_interval_s``: after a notification, the group's next one (whatever arrived meanwhile) goes out this long
  after it (``GroupPolicy.next_flush``).
- A group notification is a delivery of its own (``new_group``): one record on the deliveries topic listing its
  members' delivery keys, with its own webhook-id; the members' records name it. The dispatcher
  (``alerts.dispatch``) writes it, then its members, then sends it; its outcome becomes theirs.
- PagerDuty is refused: Events v2 takes one event per dedup_key, and grouping incidents is PagerDuty's own job.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from stream.config import ConfigError
from stream.records import utcnow

from .deliveries import PENDING, DeliveryState, delivery_key, webhook_id

GROUP_BY = ("key_type", "severity", "topic", "all")
DEFAULT_GROUP_WAIT_S = 30.0
DEFAULT_GROUP_INTERVAL_S = 300.0
NO_TOPIC = "-"  # the topic label of an alert that names none (ticker alerts emitted before they carried one)


@dataclass(frozen=True)
class GroupPolicy:
    """How one endpoint groups: by what, and how long a group waits."""
    group_by: tuple[str, ...]
    wait_s: float
    interval_s: float

    @classmethod
    def of(cls, settings) -> "GroupPolicy | None":
        """The policy of an endpoint's settings; None when it does not group."""
        if not settings.group_by:
            return None
        wait = DEFAULT_GROUP_WAIT_S if settings.group_wait_s is None else settings.group_wait_s
        interval = DEFAULT_GROUP_INTERVAL_S if settings.group_interval_s is None else settings.group_interval_s
        return cls(tuple(settings.group_by), wait, interval)

    def label(self, alert) -> str:
        """The group of ``alert``, as text: ``"all"``, or ``"key_type=topic"``, ``"severity=critical,topic=Rates"``..."""
        if self.group_by == ("all",):
            return "all"
        values = {"key_type": alert.key_type, "severity": alert.severity, "topic": alert.about_topic or NO_TOPIC}
        return ",".join(f"{name}={values[name]}" for name in self.group_by)

    def next_flush(self, now: float, last_flush: float | None) -> float:
        """When a group with a new event notifies: ``wait_s`` from now if it has not notified within the last
        ``interval_s``, else ``interval_s`` after its last notification (epoch seconds)."""
        if last_flush is None or last_flush + self.interval_s <= now:
            return now + self.wait_s
        return last_flush + self.interval_s


def check_grouping(settings, where: str) -> None:
    """Refuse grouping settings that cannot work; raise ConfigError saying what to change."""
    timing = [name for name in ("group_wait_s", "group_interval_s") if getattr(settings, name) is not None]
    if not settings.group_by:
        if timing:
            raise ConfigError(f"{where}: {' and '.join(timing)} mean nothing without group_by "
                              f"(e.g. group_by = [\"key_type\"]); remove them or set group_by")
        return
    if settings.format == "pagerduty":
        raise ConfigError(f"{where}: a pagerduty endpoint cannot group: Events v2 takes one event per dedup_key (one "
                          f"per alert, so each can be resolved), and grouping incidents is PagerDuty's own job "
                          f"(Event Orchestration, Intelligent Alert Grouping); remove group_by")
    unknown = sorted(set(settings.group_by) - set(GROUP_BY))
    if unknown:
        raise ConfigError(f"{where}: group_by {unknown} unknown (use {', '.join(GROUP_BY)})")
    if len(set(settings.group_by)) != len(settings.group_by):
        raise ConfigError(f"{where}: group_by names a label twice")
    if "all" in settings.group_by and len(settings.group_by) > 1:
        raise ConfigError(f"{where}: group_by = [\"all\"] (one group for everything) goes alone")
    policy = GroupPolicy.of(settings)
    if policy.wait_s < 0 or policy.interval_s < 0:
        raise ConfigError(f"{where}: group_wait_s and group_interval_s cannot be negative")
    longest = max(policy.wait_s, policy.interval_s)
    if longest >= settings.retry_horizon_s:
        raise ConfigError(f"{where}: a grouped alert event can wait {longest:g}s (group_wait_s / group_interval_s) "
                          f"before its notification goes out, not less than the endpoint's retry_horizon_s "
                          f"({settings.retry_horizon_s:g}s): it would give up before the first attempt; shorten "
                          f"the wait or lengthen the horizon")


def member_order(state: DeliveryState) -> tuple:
    """The order of the events in a group notification: as they were emitted, an episode's firing before its
    escalations before its resolve (they come from one partition, so offsets order them)."""
    return (state.alert.get("emitted_at", ""), state.order)


def new_group(endpoint: str, label: str, members: Sequence[DeliveryState]) -> DeliveryState:
    """The pending group notification carrying ``members`` (pending deliveries of one endpoint, in order).

    Its key hashes the members' keys (and how often each was re-queued), so it is stable for what it carries, and
    members re-queued by ``--redeliver`` go out under a new key and webhook-id even when they are grouped together
    again exactly as before: the failed notification keeps its record, and a receiver that saw its webhook-id does
    not drop the new one as a duplicate. It belongs to the dispatcher owning the lowest alerts partition among its
    members; its retry window ends with the earliest of theirs."""
    keys = tuple(m.key for m in members)
    carried = (f"{m.key}#{m.requeues}" if m.requeues else m.key for m in members)
    event_id = "group:" + hashlib.sha256("\n".join(carried).encode("utf-8")).hexdigest()[:24]
    home = min(members, key=lambda m: (m.alerts_partition, m.alerts_offset))
    now = utcnow()
    return DeliveryState(event_id=event_id, endpoint=endpoint, state=PENDING, alert={},
                         alerts_partition=home.alerts_partition, alerts_offset=home.alerts_offset, created_at=now,
                         updated_at=now, deadline_at=min(m.deadline_at for m in members), next_attempt_at=now,
                         webhook_id=webhook_id(delivery_key(event_id, endpoint)), members=keys, group_label=label)
