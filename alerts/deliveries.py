"""Delivery state, kept in Kafka: one ``DeliveryState`` per (alert event, endpoint) on the compacted
``finpulse.deliveries`` topic, keyed ``"<event_id>|<endpoint>"`` (event_id is ``"<alert id>:<status>"``, or
``"<alert id>:firing:<severity>"`` for an escalation, with ``"<alert id>@<run id>"`` in place of the alert id for a
replay's alert: see ``AlertRecord.event_id``).

Every change is a new record: ``pending`` when the dispatcher takes the event on (before it commits the alert's
offset), ``pending`` again after each failed attempt (attempts, last error, next retry time), then ``delivered`` or
``failed`` (gave up: not retryable, or past the retry horizon). ``expired`` is recorded instead of ``pending`` for
an alert too old to send when the dispatcher takes it on (``[alerts] max_alert_age_s``); it is never sent.
``silenced`` is recorded instead of ``pending`` for an event that a silence (``alerts.silences``) withholds from the
endpoint, naming it in ``silence``; it is left once only, when the silence has ended and the episode is still open
there (``unsilenced``: pending again, a fresh retry window). The latest record per key is the truth; compaction
keeps exactly that. A restarted dispatcher rebuilds its state by reading the topic to its true end, so pending
deliveries survive restarts and acknowledged ones are never sent again.

Besides ``silenced`` (above), ``failed`` is the one final state that can be left again: ``finpulse dispatch --redeliver`` writes ``pending`` once more
(``requeued``: a fresh retry horizon, ``requeued_at`` set, ``requeues`` counted, same key and webhook id), and the
dispatcher owning the alert's partition picks it up from the topic (``DeliveryLog.poll``). ``delivered`` is final.

Grouped endpoints (``alerts.grouping``) add one record per group notification, keyed ``"group:<hash>|<endpoint>"``:
no alert, ``members`` (its members' delivery keys, in order), ``group_label``, its own webhook id and retry window.
Each member's own record names it in ``group`` ("" while the member waits for a notification); its final state is
the notification's (see ``alerts.dispatch`` for the order of the writes and what a restart does).

``read_delivery_states()`` gives the same view to anyone else (the dashboard, tests).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import ClassVar, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from stream.config import KafkaSettings
from stream.kafka_io import bootstrap_list, stop_client
from stream.kafka_security import client_security
from stream.records import AlertRecord, _Record, epoch_ms, severity_rank, utcnow

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED, EXPIRED, SILENCED = "pending", "delivered", "failed", "expired", "silenced"
TERMINAL = frozenset({DELIVERED, FAILED, EXPIRED, SILENCED})
# A resolve is delivered after its firing and escalations, whatever order they reach the dispatcher in (those come
# from one partition, so their offsets order them).
STATUS_ORDER = {"firing": 0, "resolved": 1}


def delivery_key(event_id: str, endpoint: str) -> str:
    return f"{event_id}|{endpoint}"


def webhook_id(key: str) -> str:
    """The Standard Webhooks message id of one delivery: stable across retries and restarts, opaque, header-safe."""
    return "msg_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class DeliveryState(_Record):
    event_id: str
    endpoint: str
    state: str                         # pending | delivered | failed | expired | silenced
    alert: dict                        # the AlertRecord being delivered (to_dict form)
    alerts_partition: int              # where the alert came from: the dispatcher owning it resumes it
    alerts_offset: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime              # the endpoint's retry horizon after the alert was emitted (see new_pending)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str = ""               # scrubbed of secrets
    last_status: int | None = None     # HTTP status of the last attempt, if it got one
    delivered_at: datetime | None = None
    webhook_id: str = ""
    seq: int = 0                       # increases with every change of this key: newer wins when merging
    requeued_at: datetime | None = None  # when `finpulse dispatch --redeliver` last turned it from failed to pending
    requeues: int = 0                  # how many times it was re-queued
    # Grouped endpoints (``alerts.grouping``). A member (one alert event) names the group notification that carries
    # it, "" while it waits for one; a group notification has no alert and lists its members' keys, in order.
    group: str = ""
    members: tuple[str, ...] = ()
    group_label: str = ""              # a group notification's group, e.g. "key_type=topic"
    silence: str = ""                  # silenced: the id of the silence that withheld it
    unsilenced_at: datetime | None = None  # when it was taken on again because its silence had ended
    incident_id: str = ""              # a delivered firing: the id the endpoint's answer gave (incident_id_from)

    _time_fields: ClassVar[tuple[str, ...]] = ("created_at", "updated_at", "deadline_at", "next_attempt_at",
                                               "delivered_at", "requeued_at", "unsilenced_at")

    @property
    def key(self) -> str:
        return delivery_key(self.event_id, self.endpoint)

    @property
    def alert_record(self) -> AlertRecord:
        return AlertRecord.from_dict(self.alert)

    @property
    def alert_id(self) -> str:
        return self.alert.get("id", "")

    @property
    def alert_status(self) -> str:
        return self.alert.get("status", "")

    @property
    def alert_severity(self) -> str:
        return self.alert.get("severity", "")

    @property
    def order(self) -> tuple[int, int]:
        return (STATUS_ORDER.get(self.alert_status, len(STATUS_ORDER)), self.alerts_offset)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def is_group(self) -> bool:
        """A group notification (many alert events in one request), not one alert event's delivery."""
        return bool(self.members)


def new_pending(alert: AlertRecord, endpoint: str, partition: int, offset: int, horizon_s: float,
                window_from: datetime | None = None) -> DeliveryState:
    """A delivery taken on now, retried until ``horizon_s`` after ``window_from`` (default: now)."""
    now = utcnow()
    key = delivery_key(alert.event_id, endpoint)
    return DeliveryState(event_id=alert.event_id, endpoint=endpoint, state=PENDING, alert=alert.to_dict(),
                         alerts_partition=partition, alerts_offset=offset, created_at=now, updated_at=now,
                         deadline_at=(window_from or now) + timedelta(seconds=horizon_s), next_attempt_at=now,
                         webhook_id=webhook_id(key))


def requeued(state: DeliveryState, horizon_s: float) -> DeliveryState:
    """A failed delivery made pending again: due now, with a fresh retry horizon; same key, so same webhook id.
    Only ``failed`` can be re-queued: a delivered one never is."""
    if state.state != FAILED:
        raise ValueError(f"only a failed delivery can be re-queued; {state.key} is {state.state}")
    now = utcnow()
    # A member of a failed group notification leaves it: it goes out in a new group (or alone), never in the old one.
    return replace(state, state=PENDING, deadline_at=now + timedelta(seconds=horizon_s), next_attempt_at=now,
                   delivered_at=None, requeued_at=now, requeues=state.requeues + 1, group="")


def unsilenced(state: DeliveryState, horizon_s: float) -> DeliveryState:
    """A silenced delivery taken on after its silence ended: pending, due now, with a fresh retry window (the
    event is old by then, but the incident it opens is still open)."""
    if state.state != SILENCED:
        raise ValueError(f"only a silenced delivery can be taken on again; {state.key} is {state.state}")
    now = utcnow()
    return replace(state, state=PENDING, deadline_at=now + timedelta(seconds=horizon_s), next_attempt_at=now,
                   unsilenced_at=now, last_error="")


class DeliveryLog:
    """The deliveries topic as a dict of latest states: read to its true end on demand, written one change at a time.

    On tansu ``end_offsets`` can report too low an end, so ``catch_up`` trusts only the high watermark of fetch
    responses received after it started, and returns once every partition's position has reached it.

    Stale records: the records of one key are totally ordered (one key, one partition), so a record older (lower
    ``seq``) than one read before it was written late, by a ``--redeliver`` that overlapped another (see
    ``redeliver_failed``). Merging ignores it, but it is now the key's last record, the one compaction keeps. The
    log notes such keys; the dispatcher owning them writes their newest state again (``stale_keys``,
    ``reassert``), so the newest state is also the last record.
    """

    def __init__(self, kafka: KafkaSettings, topic: str, writable: bool = True):
        self.kafka = kafka
        self.topic = topic
        self.writable = writable
        self.states: dict[str, DeliveryState] = {}
        self._newest_read_seq: dict[str, int] = {}   # per key, the highest seq read from the topic so far
        self._stale: set[str] = set()                # keys whose last record read is older than an earlier one
        self._reader: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        self._reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_list(self.kafka.bootstrap_servers), group_id=None,
                                        enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                        client_id="finpulse-deliveries-reader", **client_security(self.kafka))
        await self._reader.start()
        partitions = await self._partitions_of(self.topic)
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._reader.assign(self._partitions)
        await self._reader.seek_to_beginning(*self._partitions)
        if self.writable:
            self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_list(self.kafka.bootstrap_servers),
                                              acks="all", client_id="finpulse-deliveries-writer", linger_ms=2,
                                              **client_security(self.kafka))
            await self._producer.start()

    async def _partitions_of(self, topic: str, timeout_s: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            await self._reader.topics()  # refreshes metadata
            partitions = self._reader.partitions_for_topic(topic)
            if partitions:
                return partitions
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} does not exist (run `finpulse topics` first)")
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        for client in (self._producer, self._reader):
            if client is not None:
                await stop_client(client)
        self._producer = self._reader = None

    async def catch_up(self) -> int:
        """Apply every record written before this call; return how many were read."""
        started_ms = int(time.time() * 1000)
        count = 0
        while True:
            batch = await self._reader.getmany(*self._partitions, timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    self._apply(record.value)
                    count += 1
            if not batch and await self._at_end(started_ms):
                return count

    async def _at_end(self, since_ms: int) -> bool:
        for tp in self._partitions:
            polled = self._reader.last_poll_timestamp(tp)
            highwater = self._reader.highwater(tp)
            if polled is None or polled < since_ms or highwater is None:
                return False
            if await self._reader.position(tp) < highwater:
                return False
        return True

    async def poll(self) -> list[DeliveryState]:
        """Apply what has arrived since the last read, without waiting; return the deliveries it re-queued
        (written ``pending`` by ``--redeliver`` while this log knew them as failed, or not at all)."""
        reopened = []
        batch = await self._reader.getmany(*self._partitions, timeout_ms=0, max_records=5000)
        for records in batch.values():
            for record in records:
                state = self._apply(record.value)
                if state is not None:
                    reopened.append(state)
        return reopened

    def _apply(self, raw: bytes | None) -> DeliveryState | None:
        """Merge one record; return its state if it re-queued a delivery."""
        if raw is None:
            return None
        try:
            state = DeliveryState.from_json(raw)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("skipping an unreadable record on %s: %s", self.topic, exc)
            return None
        if state.seq < self._newest_read_seq.get(state.key, -1):
            self._stale.add(state.key)
        else:
            self._newest_read_seq[state.key] = state.seq
            self._stale.discard(state.key)
        known = self.states.get(state.key)
        if not self.merge(state) or state.state != PENDING or state.requeued_at is None:
            return None
        if known is None or known.terminal or known.requeued_at != state.requeued_at:
            return state
        return None

    def merge(self, state: DeliveryState) -> bool:
        """Keep ``state`` if it is at least as new as what is known; True if it was kept."""
        known = self.states.get(state.key)
        if known is None or state.seq >= known.seq:
            self.states[state.key] = state
            return True
        return False

    def get(self, key: str) -> DeliveryState | None:
        return self.states.get(key)

    def pending_for(self, partitions: Iterable[int]) -> list[DeliveryState]:
        wanted = set(partitions)
        return sorted((s for s in self.states.values() if s.state == PENDING and s.alerts_partition in wanted),
                      key=lambda s: (s.alert_id, s.order))

    def stale_keys(self, partitions: Iterable[int]) -> list[str]:
        """The keys of alerts from ``partitions`` whose last record on the topic is older than their newest state."""
        wanted = set(partitions)
        return sorted(k for k in self._stale if self.states[k].alerts_partition in wanted)

    async def reassert(self, key: str) -> DeliveryState:
        """Write the newest known state of ``key`` again, so that it is the key's last record."""
        # The lookup and save's merge run without an await between them: a change made meanwhile by a delivery in
        # flight cannot be overwritten by an older copy.
        self._stale.discard(key)
        return await self.save(self.states[key])

    async def save(self, state: DeliveryState) -> DeliveryState:
        """Write one change (seq bumped, updated_at now) and wait for the broker's ack, retrying while it is down."""
        known = self.states.get(state.key)
        state = replace(state, seq=(known.seq if known else state.seq) + 1, updated_at=utcnow())
        self.merge(state)
        payload = state.to_json()
        delay = 0.2
        while True:
            try:
                await self._producer.send_and_wait(self.topic, payload, key=state.key.encode("utf-8"),
                                                   timestamp_ms=epoch_ms(state.updated_at))
                return state
            except KafkaError as exc:
                log.warning("could not record delivery state %s (%s); retrying in %.1fs", state.key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def read_delivery_states(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> dict[str, DeliveryState]:
    """The latest state of every delivery on ``topic`` (blocking; for the dashboard, tests and tools)."""
    async def _read() -> dict[str, DeliveryState]:
        reader = DeliveryLog(kafka, topic, writable=False)
        try:
            await reader.start()
            await asyncio.wait_for(reader.catch_up(), timeout_s)
            return dict(reader.states)
        finally:
            await reader.stop()
    return asyncio.run(_read())


def redelivery_plan(states: Iterable[DeliveryState], horizons: Mapping[str, float], endpoint: str | None = None,
                    alert_id: str | None = None) -> tuple[list[DeliveryState], list[tuple[DeliveryState, str]]]:
    """What ``finpulse dispatch --redeliver`` does with the failed deliveries matching ``endpoint`` / ``alert_id``:
    the ones to re-queue (each chain's firing before its resolve) and the ones it leaves, with why.

    ``horizons`` are the configured endpoints' retry horizons: a failed delivery to an endpoint that is not
    configured any more stays failed. A failed group notification is never re-queued itself: its failed members
    are, each like a delivery of its own, and go out in a new group. So does a firing (or escalation) whose resolve already reached the endpoint:
    sent now, it would reopen an incident that the endpoint saw closed; and one that a higher escalation overtook
    there: sent now, it would lower the incident's severity."""
    states = list(states)
    by_key = {s.key: s for s in states}
    chosen: list[DeliveryState] = []
    skipped: list[tuple[DeliveryState, str]] = []
    for state in sorted(states, key=lambda s: (s.endpoint, s.alert_id, s.order)):
        if state.is_group:
            continue  # a failed group notification stays failed: its members are re-queued one by one
        if state.state != FAILED or (endpoint and state.endpoint != endpoint) or (alert_id and state.alert_id != alert_id):
            continue
        alert = state.alert_record
        resolve = by_key.get(delivery_key(alert.event_id_of("resolved"), state.endpoint))
        overtaken_by = [other.alert_severity for other in (by_key.get(delivery_key(e, state.endpoint))
                                                            for e in alert.firing_event_ids())
                        if other is not None and other.state == DELIVERED
                        and severity_rank(other.alert_severity) > severity_rank(alert.severity)]
        if state.endpoint not in horizons:
            skipped.append((state, "the endpoint is not configured"))
        elif state.alert_status == "firing" and resolve is not None and resolve.state == DELIVERED:
            skipped.append((state, f"its resolve was delivered already (sending the {alert.event_kind} now would "
                                   f"reopen it, or update what the endpoint saw closed)"))
        elif state.alert_status == "firing" and resolve is not None and resolve.state == EXPIRED:
            skipped.append((state, f"its resolve expired (sent now, the {alert.event_kind} would open an incident "
                                   f"nothing closes)"))
        elif state.alert_status == "firing" and overtaken_by:
            skipped.append((state, f"an escalation to {overtaken_by[-1]} was delivered already (sending this now "
                                   "would lower the incident's severity)"))
        else:
            chosen.append(state)
    return chosen, skipped


def summarize(states: Iterable[DeliveryState], groups: bool = False) -> dict[str, int]:
    """Count by state the alert events' deliveries, or with ``groups`` the group notifications."""
    out: dict[str, int] = {}
    for state in states:
        if state.is_group != groups:
            continue
        out[state.state] = out.get(state.state, 0) + 1
    return dict(sorted(out.items()))

