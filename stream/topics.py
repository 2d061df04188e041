"""FinPulse's Kafka topics: their names, and creating them all up front with the app's partition count.

Brokers that auto-create topics pick their own partition count (tansu: 4), which breaks co-partitioning between
``finpulse.scored`` and the tables' changelogs. So every command that needs a topic calls ``ensure_topics`` first.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from .config import KafkaSettings

log = logging.getLogger(__name__)


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
        return f"{self.prefix}.trends"

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
                 self.trends, self.alerts, self.deliveries, self.silences)
        return tuple(name for name in names if name)

    def compacted(self) -> frozenset[str]:
        return frozenset(name for name in (self.deliveries, self.silences) if name)

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


class BrokerUnreachable(RuntimeError):
    """No broker answered at the configured bootstrap servers within the time allowed."""


def admin_client(kafka: KafkaSettings, timeout_s: float = 30.0) -> KafkaAdminClient:
    """Connect, retrying while the broker starts up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, client_id="finpulse-admin",
                                    request_timeout_ms=10_000)
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"Kafka at {kafka.bootstrap_servers} is unreachable: {exc}") from None
            time.sleep(0.25)


def ensure_topics(kafka: KafkaSettings, names: list[str] | tuple[str, ...], compacted: frozenset[str] = frozenset(),
                  partitions: int | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the ones created. Existing topics are left as they are,
    but a partition count other than the configured one is logged: co-partitioning depends on it."""
    partitions = partitions or kafka.partitions
    admin = admin_client(kafka, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        created = []
        for name in missing:
            config = {"cleanup.policy": "compact"} if name in compacted else {}
            try:
                admin.create_topics([NewTopic(name, partitions, kafka.replication_factor, topic_configs=config)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions", ", ".join(created), partitions)
        present = [n for n in names if n in existing]
        if present:
            for meta in admin.describe_topics(present):
                count = len(meta.get("partitions") or [])
                if count and count != partitions:
                    log.warning("topic %s has %d partitions, FinPulse is configured for %d", meta["topic"], count, partitions)
        return created
    finally:
        admin.close()
