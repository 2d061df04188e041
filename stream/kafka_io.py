"""Small Kafka helpers shared by FinPulse's producers (ingest, simulate), tools and tests.

* ``RecordSender``: produce records with the Kafka timestamp set to their event time, then ``flush()`` waits until
  the broker has every one of them (raises if any failed). Used by ``finpulse ingest`` and ``finpulse simulate``::

      async with RecordSender(settings.kafka, client_id="finpulse-ingest") as sender:
          for item in items:
              await sender.send(topic, item.to_json(), key=item.id.encode(), event_time=item.event_time)
          await sender.flush()

* ``read_topic``/``tail_topic``: read every record of a topic up to its *true* end. The end is the high watermark
  of a fetch response, not ``end_offsets()``: the embedded tansu broker answers ListOffsets with the base offset of
  the last record batch + 1, which is too low whenever that batch holds more than one record (see
  ``stream.tansu_compat``). Apache Kafka gives the same answer both ways.
* ``true_ends``: the true end of given partitions from the ends ``end_offsets()`` reported, for code that must know
  it before reading (the replay, the tansu shim of Faust's recovery); ``topic_sizes``: how many records whole
  topics hold, by the same true ends.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError

from .config import KafkaSettings
from .kafka_security import client_security
from .records import epoch_ms


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """``client.stop()``, except for one aiokafka defect: its ``Fetcher.close`` (0.14) awaits the fetches it has
    just cancelled, so a consumer stopped while a fetch waits to retry (the broker unreachable) raised
    ``CancelledError`` out of ``stop()``, cutting short the rest of a clean stop (a traceback and exit code 1, or a
    reader's own error hidden). That one is swallowed; a cancellation of the caller's own task still propagates."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        logging.getLogger(__name__).warning("a Kafka client stopped while its fetch from the broker was failing "
                                            "(is the broker reachable?)")


def bootstrap_list(bootstrap_servers: str) -> list[str]:
    return [s.strip() for s in bootstrap_servers.split(",") if s.strip()]


def kafka_timestamp_ms(event_time: datetime | None) -> int | None:
    """The Kafka record timestamp for an event time; None (broker time) for times before 1970, which Kafka
    cannot store."""
    if event_time is None:
        return None
    ms = epoch_ms(event_time)
    return ms if ms >= 0 else None


class DeliveryStalled(KafkaTimeoutError):
    """The broker took none of the records waiting for it for ``[kafka] delivery_timeout_s``; ``delivered``: how
    many it had taken from this sender before."""

    def __init__(self, message: str, delivered: int) -> None:
        super().__init__(message)
        self.delivered = delivered


def gave_up_retrying(error: BaseException) -> bool:
    """Whether aiokafka failed a send only because its retries ran out (a retriable error, or its timeout), not
    because the broker refused the record (too large, not authorised, ...)."""
    return isinstance(error, KafkaTimeoutError) or (isinstance(error, KafkaError) and error.retriable)


class RecordSender:
    """An async producer that remembers every delivery future until ``flush()``.

    ``send`` only queues (the producer batches by partition); at most ``max_pending`` deliveries are outstanding,
    beyond that ``send`` waits for the oldest ones, so memory stays bounded on endless inputs. aiokafka retries a
    record for ever while its partition's leader is known but unreachable (it has no ``delivery.timeout.ms``): when
    the broker takes none of the waiting records for ``[kafka] delivery_timeout_s``, ``send`` or ``flush`` raises
    ``DeliveryStalled``; ``delivered`` counts what the broker took until then. The producer's request timeout is the
    same setting, so aiokafka may give a record up first, with the retriable error it last met (the node not ready,
    the connection lost, a timeout): that is the same stall, and raises the same ``DeliveryStalled``.

    ``send`` notices a stall (or a record the broker refused) as soon as it happens, not only at the next flush: with
    the broker gone, aiokafka still took a hundred records a second into its buffer, so an ingest went on reading
    its file for minutes before the flush at ``max_pending`` said it had stalled.
    """

    def __init__(self, kafka: KafkaSettings, client_id: str = "finpulse", linger_ms: int = 5,
                 max_pending: int = 20_000):
        # The request timeout also bounds a send that waits for room in a full buffer.
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_list(kafka.bootstrap_servers),
                                          client_id=client_id, linger_ms=linger_ms, acks="all",
                                          max_request_size=2 * 1024 * 1024,
                                          request_timeout_ms=int(kafka.delivery_timeout_s * 1000),
                                          **client_security(kafka))
        self._servers = kafka.bootstrap_servers
        self._stall_timeout_s = kafka.delivery_timeout_s
        self._pending: list[asyncio.Future] = []
        self._max_pending = max_pending
        self.delivered = 0
        self._progress_at = 0.0     # monotonic: the last record taken, or the first sent while none waited
        self._checked_at = 0.0

    async def __aenter__(self) -> "RecordSender":
        try:
            await self._producer.start()
        except BaseException:
            await self._stop_producer()      # a start that failed (no broker) leaves it open otherwise
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            await self._stop_producer()

    async def _stop_producer(self) -> None:
        # aiokafka's stop waits for every queued record to be sent: for ever when the broker is gone. Not
        # asyncio.wait_for: before Python 3.12 it can swallow a Ctrl-C landing as the stop completes.
        stopping = asyncio.ensure_future(stop_client(self._producer))
        done, _ = await asyncio.wait({stopping}, timeout=self._stall_timeout_s)
        if not done:
            stopping.cancel()
            logging.getLogger(__name__).warning("the producer stopped with records the broker never took")

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None, event_time: datetime | None = None,
                   partition: int | None = None) -> None:
        now = time.monotonic()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            await self._check_progress(now)
        try:
            future = await self._producer.send(topic, value, key=key, partition=partition,
                                               timestamp_ms=kafka_timestamp_ms(event_time))
        except KafkaError as exc:
            if not gave_up_retrying(exc):
                raise
            # No room in the buffer, or no metadata, for the request timeout: the broker takes nothing.
            self._abandon(self._pending)
            raise self._stalled(len(self._pending)) from None
        if not self._pending:
            self._progress_at = time.monotonic()
        self._pending.append(future)
        if len(self._pending) >= self._max_pending:
            await self.flush()

    async def _check_progress(self, now: float) -> None:
        """Between flushes (about once a second): a record failed, or none was taken for the stall timeout."""
        still = [future for future in self._pending if not future.done()]
        finished = len(self._pending) - len(still)
        if any(future.exception() is not None for future in self._pending if future.done()):
            await self.flush()                       # raises it
        if finished:
            self.delivered += finished
            self._pending, self._progress_at = still, now
        elif still and now - self._progress_at > self._stall_timeout_s:
            self._abandon(still)
            self._pending = []
            raise self._stalled(len(still))

    async def flush(self) -> int:
        """Wait until every record sent so far is on the broker; return how many were. Raises the first error, or
        ``DeliveryStalled`` when the broker takes none of them for ``[kafka] delivery_timeout_s``."""
        pending, self._pending = self._pending, []
        waiting = set(pending)
        while waiting:
            done, waiting = await asyncio.wait(waiting, timeout=self._stall_timeout_s,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self._abandon(waiting)
                raise self._stalled(len(waiting))
            failed = [future for future in done if future.exception() is not None]
            self.delivered += len(done) - len(failed)
            if failed:
                self._abandon(waiting)
                error = failed[0].exception()
                if gave_up_retrying(error):
                    raise self._stalled(len(waiting) + len(failed)) from error
                raise error
        return len(pending)

    def _stalled(self, waiting: int) -> DeliveryStalled:
        return DeliveryStalled(f"Kafka at {self._servers} took none of the {waiting} records waiting for it in "
                               f"{self._stall_timeout_s:g}s ([kafka] delivery_timeout_s)", self.delivered)

    @staticmethod
    def _abandon(futures) -> None:
        """Given up on: their failures, once they come, are not logged one by one as never retrieved."""
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())


# ---------------------------------------------------------------- reading to the true end

@dataclass(frozen=True)
class ConsumedRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


def _consumed(message) -> ConsumedRecord:
    return ConsumedRecord(message.topic, message.partition, message.offset, message.key, message.value,
                          message.timestamp, tuple(message.headers or ()))


def _consumer(kafka: KafkaSettings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=bootstrap_list(kafka.bootstrap_servers), enable_auto_commit=False,
                            group_id=None, fetch_max_wait_ms=100, request_timeout_ms=10_000,
                            **client_security(kafka))


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} does not exist")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)


async def _read_until_caught_up(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], deadline: float,
                                on_batch: Callable[[list[ConsumedRecord]], None]) -> bool:
    """Fetch until every partition's position has reached its fetch high watermark (known only once a fetch
    response for it has arrived). Returns False when ``deadline`` passes first."""
    while time.monotonic() < deadline:
        batches = await consumer.getmany(*tps, timeout_ms=200)
        records = [_consumed(m) for msgs in batches.values() for m in msgs]
        if records:
            on_batch(records)
        caught_up = True
        for tp in tps:
            highwater = consumer.highwater(tp)
            if highwater is None or await consumer.position(tp) < highwater:
                caught_up = False
                break
        if caught_up:
            return True
    return False


async def open_reader(kafka: KafkaSettings, topic: str, timeout_s: float = 30.0,
                      from_ms: int | None = None) -> AIOKafkaConsumer:
    """A started consumer (no group) assigned every partition of ``topic``, at the beginning, or at the first record
    written at or after ``from_ms`` (the broker's timestamps: on tansu, when it wrote the batch); the caller stops
    it."""
    consumer = _consumer(kafka)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic, timeout_s)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if from_ms is not None:
            found = await consumer.offsets_for_times({tp: from_ms for tp in tps})
            for tp, at in found.items():
                if at is None:
                    await consumer.seek_to_end(tp)   # nothing that recent (tansu's end may be low: a few re-read)
                else:
                    consumer.seek(tp, at.offset)
        return consumer
    except BaseException:
        await stop_client(consumer)
        raise


async def read_to_end(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[ConsumedRecord]:
    """What ``consumer`` (from ``open_reader``) has not read yet of ``topic``, to its true end (the fetch high
    watermark: tansu's end_offsets can be too low), in partition then offset order."""
    out: list[ConsumedRecord] = []
    tps = sorted(consumer.assignment())
    if not await _read_until_caught_up(consumer, tps, time.monotonic() + timeout_s, out.extend):
        raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f}s ({len(out)} records read)")
    return sorted(out, key=lambda r: (r.partition, r.offset))


async def read_topic_async(kafka: KafkaSettings, topic: str, timeout_s: float = 30.0) -> list[ConsumedRecord]:
    """Every record now in ``topic``, all partitions, in partition then offset order."""
    consumer = await open_reader(kafka, topic, timeout_s)
    try:
        return await read_to_end(consumer, topic, timeout_s)
    finally:
        await stop_client(consumer)


class FollowedTopic:
    """Every partition of a small topic, no consumer group: read to its true end at ``start`` (from the beginning, or
    from ``from_ms()``) and followed with ``poll``, which never waits. A subclass says what a record means
    (``apply``): the silences in force, the alerts firing."""

    def __init__(self, kafka: KafkaSettings, topic: str):
        self.kafka, self.topic = kafka, topic
        self._reader: AIOKafkaConsumer | None = None

    def from_ms(self) -> int | None:
        return None

    def apply(self, raw: bytes | None):
        """Take one record's value into account; return what it was (None: nothing this reader keeps)."""
        raise NotImplementedError

    async def start(self) -> None:
        self._reader = await open_reader(self.kafka, self.topic, from_ms=self.from_ms())
        for record in await read_to_end(self._reader, self.topic):
            self.apply(record.value)

    async def stop(self) -> None:
        if self._reader is not None:
            await stop_client(self._reader)
            self._reader = None

    async def poll(self) -> list:
        """Apply the records written since the last look, without waiting; return what they were."""
        if self._reader is None:
            return []
        batch = await self._reader.getmany(timeout_ms=0, max_records=1000)
        applied = [self.apply(record.value) for records in batch.values() for record in records]
        return [value for value in applied if value is not None]


def read_topic(kafka: KafkaSettings, topic: str, timeout_s: float = 30.0) -> list[ConsumedRecord]:
    """Synchronous ``read_topic_async`` (for tools and tests that have no event loop)."""
    return asyncio.run(read_topic_async(kafka, topic, timeout_s))


async def tail_topic_async(kafka: KafkaSettings, topic: str, until: Callable[[list[ConsumedRecord]], bool],
                           timeout_s: float) -> tuple[list[ConsumedRecord], bool]:
    """Read ``topic`` from the beginning, keep reading as records arrive, and stop as soon as ``until(records)``
    is true for everything read so far (checked after each fetch, and once caught up). Returns (records, met)."""
    consumer = _consumer(kafka)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        tps = await _partitions(consumer, topic, timeout_s)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumedRecord] = []
        met = until(out)
        while not met and time.monotonic() < deadline:
            batches = await consumer.getmany(*tps, timeout_ms=250)
            for msgs in batches.values():
                out.extend(_consumed(m) for m in msgs)
            met = until(out)
        return out, met
    finally:
        await stop_client(consumer)


async def true_ends(kafka: KafkaSettings, reported: Mapping[TopicPartition, int],
                    timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """Each partition's true end, given the end ``end_offsets()`` reported for it (possibly too low on tansu)."""
    if not reported:
        return {}
    consumer = _consumer(kafka)
    await consumer.start()
    try:
        return await _true_ends_from(consumer, reported, timeout_s)
    finally:
        await stop_client(consumer)


async def _true_ends_from(consumer: AIOKafkaConsumer, reported: Mapping[TopicPartition, int],
                          timeout_s: float) -> dict[TopicPartition, int]:
    """A fetch that starts just below the reported end stays small, and its response carries the high watermark."""
    tps = list(reported)
    consumer.assign(tps)
    for tp, end in reported.items():
        consumer.seek(tp, max(0, end - 1))
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [f"{tp.topic}[{tp.partition}]" for tp in tps if consumer.highwater(tp) is None]
            raise TimeoutError(f"no fetch response within {timeout_s:.0f}s for {', '.join(missing)}")
        await consumer.getmany(*tps, timeout_ms=100)
    return {tp: max(end, consumer.highwater(tp)) for tp, end in reported.items()}


async def newest_timestamp_ms(kafka: KafkaSettings, topic: str, last: int = 5, timeout_s: float = 10.0) -> int | None:
    """How recent ``topic`` is: per partition the median Kafka timestamp of its ``last`` records (one odd record
    cannot move it), the greatest of those; None when the topic holds nothing."""
    consumer = _consumer(kafka)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic, timeout_s)
        ends = await _true_ends_from(consumer, await consumer.end_offsets(tps), timeout_s)
        tails: dict[TopicPartition, list[int]] = {tp: [] for tp in tps if ends[tp] > 0}
        for tp in tails:
            consumer.seek(tp, max(0, ends[tp] - last))
        deadline = time.monotonic() + timeout_s
        while any(len(times) < min(last, ends[tp]) for tp, times in tails.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read the last records of {topic} within {timeout_s:.0f}s")
            batches = await consumer.getmany(*tails, timeout_ms=200)
            for tp, messages in batches.items():
                tails[tp] += [m.timestamp for m in messages if m.offset < ends[tp]]
        return max((sorted(times)[len(times) // 2] for times in tails.values() if times), default=None)
    finally:
        await stop_client(consumer)


async def topic_sizes(kafka: KafkaSettings, topics: Sequence[str], timeout_s: float = 10.0) -> dict[str, int]:
    """How many records each topic holds: the sum of its partitions' true ends (all FinPulse topics start at 0)."""
    consumer = _consumer(kafka)
    await consumer.start()
    try:
        tps = [tp for topic in topics for tp in await _partitions(consumer, topic, timeout_s)]
        ends = await _true_ends_from(consumer, await consumer.end_offsets(tps), timeout_s)
        return {topic: sum(ends[tp] for tp in tps if tp.topic == topic) for topic in topics}
    finally:
        await stop_client(consumer)
