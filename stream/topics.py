"""FinPulse's Kafka topics: their names, and creating them all up front with the app's partition count.

Brokers that auto-create topics pick their own partition count (tansu: 4), which breaks co-partitioning between
``finpulse.scored`` and the tables' changelogs. So every command that needs a topic calls ``ensure_topics`` first.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from .config import KafkaSettings
from .kafka_security import client_security, refusal_before_connecting, uses_tls, why_unreachable

log = logging.getLogger(__name__)

# The open windows' topic is compacted by window id, and a closing window's tombstone removes its partials: its
# segments roll every 10 minutes (compaction cleans rolled segments only; the default is a week), and a tombstone
# stays an hour, so a reader that started before a window closed still learns of it.
OPEN_WINDOWS_CONFIG = {"segment.ms": "600000", "delete.retention.ms": "3600000"}


@dataclass(frozen=True)
class TopicNames:
    prefix: str = "finpulse"

    @property
    def news(self) -> str:
        return f"{self.prefix}.news"

    @property
    def comments(self) -> str:
        return f"{self.prefix}.comments"

    @property
    def scored(self) -> str:
        return f"{self.prefix}.scored"

    @property
    def scored_by_ticker(self) -> str:
        """Internal: one slim record per (message, ticker), keyed by ticker, so ticker tables co-partition."""
        return f"{self.prefix}.scored-by-ticker"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def trends(self) -> str:
        """Closed windows (final trends), keyed by ``key_type:key``: what alerts, backtests and history read."""
        return f"{self.prefix}.trends"

    @property
    def open_windows(self) -> str:
        """Compacted, keyed by window id: the running figures of the windows still open (partial trends), republished
        every few seconds for the dashboard, and a tombstone when the window closes. Kept out of ``trends``, where
        they made 95% of the records, so reading a day of closed windows back does not read every partial too."""
        return f"{self.prefix}.open-windows"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def deliveries(self) -> str:
        """Compacted: the delivery state of every (alert event, endpoint), so pending deliveries survive restarts."""
        return f"{self.prefix}.deliveries"

    @property
    def silences(self) -> str:
        """Compacted: the silences risk teams set (``alerts.silences``), one record per silence id."""
        return f"{self.prefix}.silences"

    def input_for(self, kind: str) -> str:
        """The input topic of a message kind ("news" or "comment")."""
        return self.news if kind == "news" else self.comments

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.news, self.comments)

    def all(self) -> tuple[str, ...]:
        names = (self.news, self.comments, self.scored, self.scored_by_ticker, self.deadletter,
                 self.trends, self.open_windows, self.alerts, self.deliveries, self.silences)
        return tuple(name for name in names if name)

    def compacted(self) -> dict[str, dict[str, str]]:
        """The compacted topics, each with the topic configs it is created with beside ``cleanup.policy``."""
        configs = {self.deliveries: {}, self.silences: {}, self.open_windows: OPEN_WINDOWS_CONFIG}
        return {name: config for name, config in configs.items() if name}

    def replay(self, run_id: str) -> "TopicNames":
        """Isolated outputs of a replay run: finpulse.replay.<run-id>.scored etc. Inputs stay the live ones."""
        return ReplayTopicNames(prefix=f"{self.prefix}.replay.{run_id}", live_prefix=self.prefix)


@dataclass(frozen=True)
class ReplayTopicNames(TopicNames):
    live_prefix: str = "finpulse"

    @property
    def news(self) -> str:
        return f"{self.live_prefix}.news"

    @property
    def comments(self) -> str:
        return f"{self.live_prefix}.comments"

    @property
    def silences(self) -> str:
        """None (""): silences are for live notifications; a backtest's alerts all reach its test endpoint."""
        return ""

    @property
    def open_windows(self) -> str:
        """None (""): a replay publishes closed windows only."""
        return ""


class BrokerUnreachable(RuntimeError):
    """No broker answered at the configured bootstrap servers within the time allowed; ``reason``: why, where a
    broker does answer but refuses FinPulse's TLS or login (``stream.kafka_security.why_unreachable``)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def admin_client(kafka: KafkaSettings, timeout_s: float = 30.0) -> KafkaAdminClient:
    """Connect, retrying while the broker starts up; at once where a broker answers but refuses the connection's
    TLS or login (no retry mends that)."""
    deadline = time.monotonic() + timeout_s
    reason = refusal_before_connecting(kafka)
    if reason:
        raise BrokerUnreachable(f"Kafka at {kafka.bootstrap_servers} refuses the connection: {reason}", reason)
    asked_why = uses_tls(kafka)       # and nothing was found
    while True:
        try:
            # Each try waits 5 s for a broker (kafka-python's own default is 30 s), so a refusal is asked about soon.
            return KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, client_id="finpulse-admin",
                                    request_timeout_ms=10_000, bootstrap_timeout_ms=5_000, **client_security(kafka))
        except (KafkaError, OSError) as exc:
            reason = None if asked_why else why_unreachable(kafka)
            asked_why = True
            if reason or time.monotonic() > deadline:
                raise BrokerUnreachable(f"Kafka at {kafka.bootstrap_servers} is unreachable: {reason or exc}",
                                        reason) from None
            time.sleep(0.25)


def ensure_topics(kafka: KafkaSettings, names: list[str] | tuple[str, ...],
                  compacted: Mapping[str, Mapping[str, str]] | None = None, partitions: int | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the ones created. ``compacted``: topic -> its configs beyond
    ``cleanup.policy=compact`` (``TopicNames.compacted()``). Existing topics are left as they are, but a partition
    count other than the configured one is logged: co-partitioning depends on it."""
    compacted = compacted or {}
    partitions = partitions or kafka.partitions
    admin = admin_client(kafka, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        created = []
        for name in missing:
            config = {"cleanup.policy": "compact", **compacted[name]} if name in compacted else {}
            try:
                admin.create_topics([NewTopic(name, partitions, kafka.replication_factor, topic_configs=config)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions", ", ".join(created), partitions)
        for topic, count in _other_partition_counts(admin, [n for n in names if n in existing], partitions):
            log.warning("topic %s has %d partitions, FinPulse is configured for %d", topic, count, partitions)
        return created
    finally:
        admin.close()


def check_topics(kafka: KafkaSettings, names: list[str] | tuple[str, ...], timeout_s: float = 30.0) -> list[str]:
    """What is wrong with FinPulse's topics on the cluster, creating nothing (``finpulse topics --check``): the ones
    missing, and the ones with another partition count. Connecting is the check of the connection settings."""
    admin = admin_client(kafka, timeout_s)
    try:
        existing = set(admin.list_topics())
        problems = [f"{name}: missing" for name in names if name not in existing]
        for topic, count in _other_partition_counts(admin, [n for n in names if n in existing], kafka.partitions):
            problems.append(f"{topic}: {count} partitions, FinPulse is configured for {kafka.partitions} "
                            f"([kafka] partitions)")
        return problems
    finally:
        admin.close()


def _other_partition_counts(admin: KafkaAdminClient, topics: list[str], partitions: int) -> list[tuple[str, int]]:
    if not topics:
        return []
    # kafka-python 3 names the topic "name" (2.x: "topic"); reading "topic" raised KeyError where a count differed.
    counts = [(meta.get("name") or meta.get("topic"), len(meta.get("partitions") or []))
              for meta in admin.describe_topics(topics)]
    return [(topic, count) for topic, count in counts if count and count != partitions]
