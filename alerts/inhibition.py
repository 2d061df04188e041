"""Inhibition, as Alertmanager's: while an alert matching a rule's ``source`` fires, the alerts matching its
``target`` that agree with it on the ``equal`` fields are not notified.

The case it is for: a story moves a whole topic. "Energy | Oil" fires, and so do XOM, CVX and BP, whose messages
are about the same story; the risk desk needs the one topic alert, not four pages. The rule::

    [[alerts.inhibit]]
    source = ["key_type=topic"]          # matchers on the alert that mutes (as silences write them)
    target = ["key_type=ticker"]         # matchers on the alerts it mutes (``endpoint=`` too: mute at one endpoint)
    equal = ["about"]                    # fields both must have alike: here, the topic the ticker alert is about

mutes a ticker alert while a topic alert about the same topic fires. The fields are a silence's (``key``,
``key_type``, ``severity``, ``about``; ``endpoint`` on the target side); an alert never mutes itself.

What fires is read by ``FiringAlerts`` from the alerts topic itself (every partition, no consumer group, from
``LOOKBACK_S`` back), so a dispatcher sees the source alerts of every partition, whoever delivers them. The dispatcher
decides as for silences (``alerts.dispatch``): an inhibited event is recorded ``silenced``, naming the alert that
muted it (``inhibited:<alert id>``), checked again before each attempt; when the source resolves, a muted episode
still open goes out then. Replays are never inhibited.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from stream.config import ConfigError, KafkaSettings
from stream.kafka_io import FollowedTopic
from stream.records import AlertRecord

from .silences import Matcher, alert_fields

EQUAL_FIELDS = ("key", "key_type", "severity", "about")
RULE_KEYS = {"source", "target", "equal"}
# How far back the alerts topic is read at start for episodes still firing: one open longer mutes nothing after a
# restart (the detector resolves an episode once its windows are back to normal, normally within hours).
LOOKBACK_S = 7 * 24 * 3600
INHIBITED = "inhibited:"           # a delivery's ``silence`` field: muted by this alert id


@dataclass(frozen=True)
class InhibitRule:
    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...]

    @classmethod
    def parse(cls, table: Mapping, where: str) -> "InhibitRule":
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: write each rule as a table ([[alerts.inhibit]])")
        unknown = sorted(set(table) - RULE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown {unknown}; a rule has source, target and equal")
        sides = {}
        for side in ("source", "target"):
            texts = table.get(side) or []
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise ConfigError(f"{where}: {side} is a list of matchers, e.g. [\"key_type=topic\"]")
            matchers = tuple(m for text in texts for m in Matcher.parse(text))
            if not any(m.op in ("=", "=~") for m in matchers):
                raise ConfigError(f"{where}: {side} needs at least one = or =~ matcher: without one it matches "
                                  f"almost every alert")
            sides[side] = matchers
        if any(m.name == "endpoint" for m in sides["source"]):
            raise ConfigError(f"{where}: source cannot name an endpoint: an alert fires for every endpoint")
        equal = table.get("equal") or []
        if isinstance(equal, str) or not all(isinstance(e, str) for e in equal):
            raise ConfigError(f"{where}: equal is a list of field names, e.g. [\"about\"]")
        bad = sorted(set(equal) - set(EQUAL_FIELDS))
        if bad:
            raise ConfigError(f"{where}: equal names {bad}: use {', '.join(EQUAL_FIELDS)}")
        return cls(sides["source"], sides["target"], tuple(equal))

    def mutes(self, source: AlertRecord, target: AlertRecord, endpoint: str) -> bool:
        if source.id == target.id:
            return False
        source_fields, target_fields = alert_fields(source), alert_fields(target, endpoint)
        return (all(m.matches(source_fields) for m in self.source)
                and all(m.matches(target_fields) for m in self.target)
                and all(source_fields[name] == target_fields[name] for name in self.equal))

    def __str__(self) -> str:
        return (f"source [{', '.join(map(str, self.source))}] mutes target [{', '.join(map(str, self.target))}]"
                + (f" with equal {', '.join(self.equal)}" if self.equal else ""))


def parse_rules(tables: Iterable) -> list[InhibitRule]:
    """``[alerts] inhibit``, validated."""
    if isinstance(tables, (str, Mapping)):
        raise ConfigError("[alerts] inhibit must be a list of tables ([[alerts.inhibit]])")
    return [InhibitRule.parse(table, f"[[alerts.inhibit]] {i}") for i, table in enumerate(tables)]


class FiringAlerts(FollowedTopic):
    """The live alerts topic as the episodes firing now (latest event of an alert id not a resolve), read from
    ``LOOKBACK_S`` back at start and followed (``poll``)."""

    def __init__(self, kafka: KafkaSettings, topic: str):
        super().__init__(kafka, topic)
        self.firing: dict[str, AlertRecord] = {}
        self.ended = 0          # episodes seen resolving since start: a muted episode may go out now

    def from_ms(self) -> int:
        return int((time.time() - LOOKBACK_S) * 1000)

    def apply(self, raw: bytes | None) -> AlertRecord | None:
        try:
            alert = AlertRecord.from_json(raw)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None     # the dispatcher reports malformed alerts; here they mute nothing
        if alert.run_id:
            return None
        if alert.status == "resolved":
            self.ended += self.firing.pop(alert.id, None) is not None
        else:
            self.firing[alert.id] = alert
        return alert

    def muting(self, rules: list[InhibitRule], alert: AlertRecord, endpoint: str) -> tuple[AlertRecord, InhibitRule] | None:
        """The firing alert (and its rule) that mutes ``alert`` for ``endpoint``, the earliest fired; None if none."""
        for source in sorted(self.firing.values(), key=lambda a: (a.started_at, a.id)):
            for rule in rules:
                if rule.mutes(source, alert, endpoint):
                    return source, rule
        return None
