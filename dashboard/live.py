"""The dashboard's one background Kafka consumer: a daemon thread that follows FinPulse's output topics into a
``LiveStore`` and keeps a ``FeedStatus`` the views show (connection state, consumer lag, throughput).

It reads without a consumer group (every dashboard replica sees every partition and commits nothing), starting
``retention_hours`` back (by record timestamp) on the time-ordered topics and from the beginning of the compacted
deliveries and silences topics. Scored messages start no further back than the store's row cap needs, and the open
windows' running figures (``finpulse.open-windows``) no further back than a window still open can have been
published (``open_lookback_s``: every open window is republished at least every ``[aggregate] partial_refresh_s``,
so about 5 minutes).

What the topics held when the feed first reached them is its *history*: until it has read all of it
(``FeedStatus.loaded``), the views draw nothing but its progress, because a ranking drawn from part of it judges
the newest windows against the wrong ones (the records come oldest first, so a partly read history has old
windows and, from the open-windows topic, the newest, without those in between). When Kafka is unreachable
or a topic is missing, the thread says so in ``FeedStatus.message`` and retries with backoff, resuming from the
offsets it had reached; it never raises into the page. A broker that goes away mid-session is not always an error
the thread sees: kafka-python's ``poll`` returns nothing, as it does on a quiet stream, and some of its calls wait
on metadata for as long as the broker is gone. So the thread notes when the broker last answered (a fetch that
brought records, or the worker's committed offsets it asks for every few seconds), and ``LiveFeed.status``, read by the page,
calls the feed unreachable once that is ``SILENT_AFTER_S`` ago, whatever the thread is doing.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import BrokerResponseError, KafkaError, RequestTimedOutError

from stream.client_logs import tame_kafka_client_logs
from stream.config import ConfigError, KafkaSettings
from stream.kafka_security import client_security, refusal_before_connecting, why_unreachable
from stream.topics import TopicNames

from .settings import DashboardSettings
from .store import LiveStore

log = logging.getLogger(__name__)

# How often partitions, consumer lag and the dead-letter count are re-read (seconds).
_METADATA_EVERY_S = 5.0
_MAX_BACKOFF_S = 5.0
# A broker that has answered none of that for this long is taken for gone (three rounds of lag figures).
SILENT_AFTER_S = 15.0


@dataclass(frozen=True)
class FeedStatus:
    """What the page says about the feed. ``state``: connecting | waiting | live | unreachable | stopped."""
    state: str = "connecting"
    message: str = "connecting to Kafka…"
    bootstrap_servers: str = ""
    records_read: dict[str, int] = field(default_factory=dict)
    read_rate_per_s: float = 0.0
    # Records on each topic this dashboard has not read yet (fetch high watermark minus position).
    dashboard_lag: dict[str, int] = field(default_factory=dict)
    # Input records the worker's consumer group has not committed yet, per input topic (None: unknown).
    worker_lag: dict[str, int] | None = None
    deadletter_count: int | None = None
    # When the broker last answered (time.time()); 0 before it first did.
    answered_at: float = 0.0
    # Records of the history read so far and in all (None until the first fetches say where every partition ends).
    history_read: tuple[int, int] | None = None
    # The whole history has been read: from now on the views draw (and stay drawn whatever comes after).
    loaded: bool = False
    updated_at: float = 0.0

    @property
    def reachable(self) -> bool:
        return self.state in ("waiting", "live")

    def as_of(self, now: float) -> "FeedStatus":
        """This status as the page should see it at ``now``: unreachable once the broker has been silent for
        ``SILENT_AFTER_S``, though the thread has not (yet) seen an error."""
        silent_s = now - self.answered_at
        if not self.reachable or not self.answered_at or silent_s < SILENT_AFTER_S:
            return self
        return replace(self, state="unreachable", message=(
            f"Kafka at {self.bootstrap_servers} has not answered for {silent_s:.0f} s; retrying. What is shown "
            f"is what was read until then."))


def broker_answered(exc: BaseException) -> bool:
    """Whether a failed request still had an answer from the broker: an error it sent back (a group the dashboard's
    user may not describe, say), not a connection that failed or a request that timed out. A broker that refuses
    the worker group's offsets on a quiet stream must not read as gone."""
    return isinstance(exc, BrokerResponseError) and not isinstance(exc, RequestTimedOutError)


class RefusedConnection(ConnectionError):
    """A broker answers but refuses the feed's TLS or login; the text says why."""


class LiveFeed:
    """Start once per process (``start()``); read ``store.snapshot()`` and ``status`` from any session."""

    def __init__(self, kafka: KafkaSettings, cfg: DashboardSettings, worker_group: str, open_lookback_s: float):
        self.kafka = kafka
        self.cfg = cfg
        self.worker_group = worker_group
        self.open_lookback_s = open_lookback_s
        self.names = TopicNames(kafka.topic_prefix)
        # Closed and open windows land in the same frame: the store keeps a window's final record over its partials.
        self.kinds = {self.names.trends: "trends", self.names.open_windows: "trends", self.names.alerts: "alerts",
                      self.names.scored: "scored", self.names.deliveries: "deliveries",
                      self.names.silences: "silences"}
        self.store = LiveStore(cfg)
        self._status = FeedStatus(bootstrap_servers=kafka.bootstrap_servers)
        self._positions: dict[TopicPartition, int] = {}
        # Each partition's history: from where reading started to its end when the first fetch answered.
        self._history_start: dict[TopicPartition, int] = {}
        self._history_end: dict[TopicPartition, int] = {}
        self._admin: KafkaAdminClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finpulse-dashboard-feed", daemon=True)

    def start(self) -> "LiveFeed":
        tame_kafka_client_logs()     # the dashboard runs in Streamlit's process, not under the finpulse command
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def status(self) -> FeedStatus:
        return self._status.as_of(time.time())

    def _set(self, **changes) -> None:
        self._status = replace(self._status, updated_at=time.time(), **changes)

    def _answered(self) -> None:
        self._set(answered_at=time.time())

    # -------------------------------------------------------- the thread

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            consumer = None
            try:
                reason = refusal_before_connecting(self.kafka)
                if reason:
                    raise RefusedConnection(reason)
                consumer = KafkaConsumer(
                    bootstrap_servers=self.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                    client_id="finpulse-dashboard", request_timeout_ms=10_000, bootstrap_timeout_ms=5_000,
                    max_poll_records=5_000, reconnect_backoff_max_ms=2_000, **client_security(self.kafka))
                self._answered()       # it bootstrapped: the broker answered
                self._follow(consumer)
                backoff = 0.5
            except ConfigError as exc:     # a Kafka password or certificate that cannot be had: say so
                self._set(state="unreachable", message=f"FinPulse's Kafka settings cannot be used: {exc}")
                log.warning("dashboard feed: %s", self._status.message)
                self._stop.wait(_MAX_BACKOFF_S)
            except (KafkaError, OSError, ValueError) as exc:
                # kafka-python reports an unreachable broker as several different errors; all mean "retry". One
                # that fails TLS or a login says only that it could not bootstrap: why_unreachable asks why.
                reason = str(exc) if isinstance(exc, RefusedConnection) else why_unreachable(self.kafka)
                said = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
                self._set(state="unreachable", message=(
                    f"Kafka at {self.kafka.bootstrap_servers} refuses the connection: {reason}" if reason else
                    f"Kafka at {self.kafka.bootstrap_servers} is unreachable ({said[:160]})")
                    + "; retrying every few seconds…")
                log.warning("dashboard feed: %s", self._status.message)
                self._stop.wait(backoff)
                backoff = min(_MAX_BACKOFF_S, backoff * 2)
            except Exception:  # the feed must outlive any surprise; the page shows a plain message
                log.exception("dashboard feed failed; restarting it")
                self._set(state="unreachable", message="the data feed hit an unexpected error; restarting it…")
                self._stop.wait(_MAX_BACKOFF_S)
            finally:
                for client in (consumer, self._admin):
                    if client is not None:
                        try:
                            client.close()
                        except Exception:  # closing a broken client must not mask why it broke
                            pass
                self._admin = None
        self._set(state="stopped", message="the data feed is stopped")

    def _follow(self, consumer: KafkaConsumer) -> None:
        assigned: set[TopicPartition] = set()
        last_meta = 0.0
        read_since, read_count = time.monotonic(), 0
        records_read = dict(self._status.records_read)
        while not self._stop.is_set():
            if time.monotonic() - last_meta > _METADATA_EVERY_S:
                last_meta = time.monotonic()
                assigned = self._assign(consumer, assigned)
                self._measure_lag(consumer, assigned)
            if not assigned:
                self._stop.wait(1.0)
                continue
            batches = consumer.poll(timeout_ms=500, max_records=5_000)
            if batches:
                self._answered()
            for tp, records in batches.items():
                kind = self.kinds[tp.topic]
                for record in records:
                    if record.value is None and tp.topic == self.names.open_windows:
                        continue     # a closed window's tombstone: its final record is on the trends topic
                    self.store.add(kind, record.value, record.key)
                self._positions[tp] = records[-1].offset + 1
                records_read[kind] = records_read.get(kind, 0) + len(records)
                read_count += len(records)
            if not self._status.loaded:
                self._measure_history(consumer, assigned)
            elapsed = time.monotonic() - read_since
            if elapsed >= 2.0:
                self._set(records_read=dict(records_read), read_rate_per_s=read_count / elapsed)
                read_since, read_count = time.monotonic(), 0

    def _assign(self, consumer: KafkaConsumer, assigned: set[TopicPartition]) -> set[TopicPartition]:
        """(Re)read topic metadata; assign new partitions and seek them to where reading should start."""
        wanted: set[TopicPartition] = set()
        missing = []
        for topic in self.kinds:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                missing.append(topic)
                continue
            wanted.update(TopicPartition(topic, p) for p in parts)
        if wanted != assigned:
            consumer.assign(sorted(wanted))
            for tp in wanted - assigned:
                if tp not in self._positions:
                    self._positions[tp] = self._start_offset(consumer, tp)
                self._history_start.setdefault(tp, self._positions[tp])
                consumer.seek(tp, self._positions[tp])
        if missing:
            self._set(state="waiting", message=f"waiting for topic(s) {', '.join(missing)} to exist on "
                      f"{self.kafka.bootstrap_servers} (is the worker running?)")
        elif self._status.state != "live":
            self._set(state="live", message=f"following {self.kafka.bootstrap_servers}")
        return wanted

    def _start_offset(self, consumer: KafkaConsumer, tp: TopicPartition) -> int:
        begin = consumer.beginning_offsets([tp])[tp]
        if tp.topic in (self.names.deliveries, self.names.silences):
            return begin  # compacted state: read it all
        end = consumer.end_offsets([tp])[tp]
        start = begin
        lookback_s = self.cfg.retention_hours * 3600
        if tp.topic == self.names.open_windows:
            lookback_s = min(lookback_s, self.open_lookback_s)
        since_ms = int((time.time() - lookback_s) * 1000)
        try:
            found = consumer.offsets_for_times({tp: since_ms}).get(tp)
            # None: nothing written since then. An end offset reported too low only means a few extra records.
            start = max(begin, found.offset if found is not None else end)
        except (KafkaError, ValueError) as exc:
            log.info("offsets_for_times unavailable on %s (%s): reading %s from the beginning", tp, exc, tp.topic)
        if tp.topic == self.names.scored:
            partitions = len(consumer.partitions_for_topic(tp.topic) or ()) or 1
            start = max(start, end - self.cfg.max_scored_rows // partitions)
        return start

    def _measure_history(self, consumer: KafkaConsumer, assigned: set[TopicPartition]) -> None:
        """How much of the history is read. A partition's end is its fetch high watermark when the first fetch
        answers (``end_offsets`` can report too low an end on tansu); the feed is loaded once every assigned
        partition's end is known and reached."""
        read = total = 0
        ends_known = bool(assigned)
        for tp in assigned:
            if tp not in self._history_end:
                high = consumer.highwater(tp)
                if high is None:
                    ends_known = False
                    continue
                self._history_end[tp] = high
            start, end = self._history_start[tp], self._history_end[tp]
            total += max(0, end - start)
            # The consumer's position, not the last record's offset + 1: it also steps over compacted-away offsets.
            read += max(0, min(end, consumer.position(tp)) - start)
        # Until every end is known the total would grow: no figure rather than a wrong one.
        self._set(history_read=(read, total) if ends_known else None, loaded=ends_known and read == total)

    def _measure_lag(self, consumer: KafkaConsumer, assigned: set[TopicPartition]) -> None:
        lag: dict[str, int] = {}
        for tp in assigned:
            high = consumer.highwater(tp)
            position = self._positions.get(tp)
            if high is not None and position is not None:
                lag[self.kinds[tp.topic]] = lag.get(self.kinds[tp.topic], 0) + max(0, high - position)
        self._set(dashboard_lag=lag, worker_lag=self._worker_lag(consumer),
                  deadletter_count=self._topic_size(consumer, self.names.deadletter))

    def _worker_lag(self, consumer: KafkaConsumer) -> dict[str, int] | None:
        """The worker group's committed offsets on the input topics against their end offsets. Asking for the
        committed offsets is also how the feed knows the broker answers: kafka-python may serve ends and
        partitions from what it knew, without asking."""
        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self.kafka.bootstrap_servers,
                                               client_id="finpulse-dashboard-admin", request_timeout_ms=5_000,
                                               **client_security(self.kafka))
            committed = self._admin.list_group_offsets({self.worker_group: None}).get(self.worker_group, {})
        except (KafkaError, OSError, ValueError) as exc:
            log.debug("worker lag unavailable: %s", exc)
            if broker_answered(exc):
                self._answered()
            return None
        self._answered()
        lag: dict[str, int] = {}
        for topic in self.names.inputs:
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            if not tps:
                continue
            ends = consumer.end_offsets(tps)
            total = 0
            for tp in tps:
                done = committed.get(tp)
                done_offset = done.offset if done is not None and done.offset >= 0 else 0
                total += max(0, ends[tp] - done_offset)
            lag[topic] = total
        return lag

    @staticmethod
    def _topic_size(consumer: KafkaConsumer, topic: str) -> int | None:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return None
        tps = [TopicPartition(topic, p) for p in parts]
        ends, begins = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        return int(sum(max(0, ends[tp] - begins[tp]) for tp in tps))
