"""Selecting input messages by *event time* from Kafka, exactly, and merging partitions in event-time order.

Kafka can only seek by offset, and ``offsets_for_times`` answers with the broker's write time (on tansu, and
approximately), so the replay searches the records themselves. A message's event time is its own time field
(``published_at`` / ``created_at``); when that cannot be read (a malformed message, which the replay will count as
rejected like the worker dead-letters it) the Kafka record timestamp stands in.

Timestamps within a partition are not monotonic, so the search assumes a bound ``D`` (``max_disorder_s``) on
disorder: a record is never more than ``D`` older than a record written before it in the same partition. One
record can break any bound (a typo, a wrong clock, a malformed message stamped with its write time), so no decision
rests on one record: a time is only believed when its ``NEIGHBOURS`` agree, and a time that is a stand-in (the
Kafka timestamp of a malformed message) decides nothing. Then:

* **Lower bound.** Any record with time ``< T1 - D`` proves every record before it has time ``< T1``. A binary
  search over offsets finds such a record as late as it can; each probe reads ``NEIGHBOURS`` records and believes
  their median. Reading starts right after the record that proved it.
* **Upper bound.** A record with time ``>= T2 + D`` proves every later record has time ``>= T2``: reading stops
  after ``NEIGHBOURS`` such records in a row, or at the partition's end as seen when the replay started (the fetch
  high watermark, not ``end_offsets``, which tansu reports too low). A shorter run of late records followed by
  earlier ones is counted in ``outliers``, as is a record older than its partition's frontier (see below).
* **Exact filter.** Every message read is kept iff its event time (ms) is in ``[T1, T2)``, so a boundary inside a
  record batch, or a partition whose clock is skewed against the others, changes nothing.
* **Progress total.** Two more binary searches find, per partition, the first offsets whose neighbours agree on a
  time ``>= T1`` and ``>= T2``: the records between them (``candidates``) are about the messages in the range, not
  everything up to the partition's end, nor ``D`` of records more at each end (with the default ``D`` of 15
  minutes, a bar counted half again an hour's messages, stalled, then jumped to its end). It only sizes progress
  bars: reading still starts and stops as described above.

**Merge.** The selected messages come out in the total order (event time, topic, partition, offset). Each
partition's *frontier* is (the median time of its last ``NEIGHBOURS`` records) - ``D``: nothing it yields later is
older. A message is released once it is older than every live partition's frontier, and the next record is always
read from the partition with the lowest frontier, so the output is a function of the data alone, never of fetch
timing. A record that breaks the bound is still replayed (in a deterministic place) and counted in
``disorder_exceeded``: raise ``max_disorder_s`` when that count is not zero.
"""
from __future__ import annotations

import asyncio
import heapq
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.config import KafkaSettings
from stream.kafka_io import bootstrap_list, stop_client, true_ends
from stream.kafka_security import client_security
from stream.records import InvalidRecord, epoch_ms, format_time, parse_time

TIME_FIELDS = {"news": "published_at", "comment": "created_at"}
NEIGHBOURS = 5          # odd: the median of this many records is one of them, and two outliers cannot move it


@dataclass(frozen=True, order=True)
class TimedMessage:
    """One input message with the event time it is selected and ordered by. Ordered by (time, topic, partition,
    offset): the replay's total order."""
    event_ms: int
    topic: str
    partition: int
    offset: int
    kind: str = field(compare=False)            # news | comment
    key: bytes | None = field(compare=False, repr=False)
    value: bytes | None = field(compare=False, repr=False)
    timestamp_ms: int = field(compare=False)    # the Kafka record timestamp
    fallback: bool = field(default=False, compare=False)    # event_ms is timestamp_ms: its own time is unreadable


def format_ms(ms: int) -> str:
    """Epoch ms as FinPulse writes times: ``2026-11-22T12:00:00.000Z``."""
    return format_time(datetime.fromtimestamp(ms / 1000, tz=timezone.utc))


def event_time_ms(value: bytes | None, kind: str) -> int | None:
    """The message's own event time in epoch ms, or None when unreadable."""
    try:
        return epoch_ms(parse_time(json.loads(value)[TIME_FIELDS[kind]], TIME_FIELDS[kind]))
    except (TypeError, ValueError, KeyError, IndexError, InvalidRecord, RecursionError, OverflowError):
        return None


def _median(items):
    return sorted(items)[len(items) // 2]


@dataclass
class SelectionStats:
    """What a selection read, for the manifest and the progress bar."""
    candidates: int = 0          # records between where the range's times begin and end: about the selection's size
    read: int = 0
    selected: int = 0
    disorder_exceeded: int = 0
    outliers: int = 0            # records far from their neighbours' times, which decided nothing
    stopped_early: int = 0       # partitions left at a run of records past the range, before their end
    probes: int = 0
    start_offsets: dict[str, int] = field(default_factory=dict)   # "topic[partition]" -> first offset read
    # The part of [from, to) the selection can vouch for having whole (see ``complete_span``), and why not all of it.
    complete_from_ms: int | None = None
    complete_to_ms: int | None = None
    deleted: dict[str, int] = field(default_factory=dict)  # "topic[partition]" -> its first offset: older ones are gone
    arriving_from_ms: int | None = None     # messages of this time on may still be written


@dataclass
class _Cursor:
    """Reads one partition forward from ``next_offset`` to ``stop_offset`` (exclusive)."""
    tp: TopicPartition
    kind: str
    next_offset: int
    stop_offset: int
    frontier_ms: float = -math.inf
    buffer: deque = field(default_factory=deque)
    recent: deque = field(default_factory=lambda: deque(maxlen=NEIGHBOURS))   # times the frontier is taken from
    late_run: int = 0            # records in a row at or after the stop bound

    @property
    def order(self) -> tuple[float, str, int]:
        return (self.frontier_ms, self.tp.topic, self.tp.partition)


class KafkaSelection:
    """The messages of ``topics`` (name -> kind) with event time in [from_ms, to_ms), merged in event-time order.

    ``async with KafkaSelection(...) as selection: async for message in selection: ...``. ``total`` (after entering)
    is about how many messages it will yield (records found between where the partitions' times reach from and to),
    for progress bars."""

    def __init__(self, kafka: KafkaSettings, topics: dict[str, str], from_ms: int, to_ms: int,
                 max_disorder_s: float):
        self.kafka = kafka
        self.topics = topics
        self.from_ms = from_ms
        self.to_ms = to_ms
        self.disorder_ms = int(max_disorder_s * 1000)
        self.stats = SelectionStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._cursors: list[_Cursor] = []

    @property
    def total(self) -> int:
        return self.stats.candidates

    async def __aenter__(self) -> "KafkaSelection":
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_list(self.kafka.bootstrap_servers), group_id=None,
            enable_auto_commit=False, fetch_max_wait_ms=100, request_timeout_ms=15_000,
            max_partition_fetch_bytes=1 << 20, **client_security(self.kafka))
        await self._consumer.start()
        try:
            await self._plan()
        except BaseException:
            await stop_client(self._consumer)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await stop_client(self._consumer)

    async def _plan(self) -> None:
        consumer = self._consumer
        tps: list[tuple[TopicPartition, str]] = []
        for topic, kind in sorted(self.topics.items()):
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise LookupError(f"topic {topic} does not exist on {self.kafka.bootstrap_servers}")
            tps.extend((TopicPartition(topic, p), kind) for p in sorted(parts))
        consumer.assign([tp for tp, _ in tps])
        began_ms = int(time.time() * 1000)
        starts = await consumer.beginning_offsets([tp for tp, _ in tps])
        ends = await true_ends(self.kafka, await consumer.end_offsets([tp for tp, _ in tps]))
        # The partitions are searched at the same time: each probe is one fetch round trip.
        firsts = await asyncio.gather(*(self._lower_bound(tp, kind, starts[tp], ends[tp]) for tp, kind in tps))
        at_from = await asyncio.gather(*(self._first_at(tp, kind, self.from_ms, first, ends[tp])
                                         for (tp, kind), first in zip(tps, firsts)))
        at_to = await asyncio.gather(*(self._first_at(tp, kind, self.to_ms, begin, ends[tp])
                                       for (tp, kind), begin in zip(tps, at_from)))
        # A partition whose first records are gone (retention) and whose search found nothing before the range: what
        # was deleted may have been in it. The times its remaining first records have bound how far that reaches.
        truncated = [(tp, kind) for (tp, kind), first in zip(tps, firsts) if 0 < starts[tp] == first]
        heads = await asyncio.gather(*(self._records_at(tp, kind, starts[tp], ends[tp]) for tp, kind in truncated))
        first_times = {f"{tp.topic}[{tp.partition}]": (starts[tp], _median([m.event_ms for m in head if not m.fallback])
                                                        if any(not m.fallback for m in head) else None)
                       for (tp, _), head in zip(truncated, heads)}
        first_times = {name: (offset, first_ms) for name, (offset, first_ms) in first_times.items()
                       if first_ms is None or first_ms + self.disorder_ms > self.from_ms}   # may reach the range
        self.stats.complete_from_ms, self.stats.complete_to_ms = complete_span(
            self.from_ms, self.to_ms, self.disorder_ms, began_ms, first_times)
        self.stats.deleted = {name: offset for name, (offset, _) in first_times.items()}
        self.stats.arriving_from_ms = began_ms - self.disorder_ms if began_ms - self.disorder_ms < self.to_ms else None
        for (tp, kind), first, begin, last in zip(tps, firsts, at_from, at_to):
            self._cursors.append(_Cursor(tp, kind, first, ends[tp]))
            self.stats.start_offsets[f"{tp.topic}[{tp.partition}]"] = first
            self.stats.candidates += max(0, last - begin)
            consumer.seek(tp, first)

    async def _records_at(self, tp: TopicPartition, kind: str, offset: int, end: int) -> list[TimedMessage]:
        """Up to ``NEIGHBOURS`` records from ``offset`` on (fewer near the end)."""
        self._consumer.seek(tp, offset)
        self.stats.probes += 1
        records: list[TimedMessage] = []
        deadline = time.monotonic() + self.kafka.delivery_timeout_s
        while len(records) < NEIGHBOURS and offset < end:
            if time.monotonic() > deadline:
                raise self._stalled(tp, offset, end)
            batch = await self._consumer.getmany(tp, timeout_ms=200, max_records=NEIGHBOURS - len(records))
            for record in batch.get(tp, ()):
                offset = record.offset + 1
                if record.offset >= end:
                    break
                records.append(_timed(record, kind))
        return records

    async def _lower_bound(self, tp: TopicPartition, kind: str, start: int, end: int) -> int:
        """The first offset to read: just after the latest record found with time < from - D (see the docstring)."""
        safe_before = self.from_ms - self.disorder_ms
        lo, hi = start - 1, end          # lo: a record proven old enough (or before the log); hi: not proven
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probe = [m for m in await self._records_at(tp, kind, mid, end) if not m.fallback]
            # A record proves it only when the records around it agree (it is their median): one may be a typo.
            # The median may lie at or past ``hi``: a proof all the same, and the search ends there.
            median = _median(probe) if probe else None
            if median is not None and median.event_ms < safe_before:
                lo = median.offset
            else:
                hi = mid
        return lo + 1

    async def _first_at(self, tp: TopicPartition, kind: str, time_ms: int, first: int, end: int) -> int:
        """About where the partition reaches ``time_ms``: the first offset from ``first`` found whose neighbours
        agree on a time >= it (or the partition's end). For the progress total only."""
        lo, hi = first - 1, end          # lo: not found at or past the time; hi: found (or the end)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probe = [m for m in await self._records_at(tp, kind, mid, end) if not m.fallback]
            if probe and _median(probe).event_ms >= time_ms:
                hi = mid
            else:
                lo = mid
        return hi

    async def _pull(self, cursor: _Cursor) -> TimedMessage | None:
        """The cursor's next record, or None when it is done. A broker that serves none of the partition's remaining
        records for ``[kafka] delivery_timeout_s`` (gone, or cut off) raises ``TimeoutError``: an empty fetch looks
        the same as a slow one, and the replay would wait for ever."""
        deadline = time.monotonic() + self.kafka.delivery_timeout_s
        while not cursor.buffer:
            if cursor.next_offset >= cursor.stop_offset:
                return None
            if time.monotonic() > deadline:
                raise self._stalled(cursor.tp, cursor.next_offset, cursor.stop_offset)
            batch = await self._consumer.getmany(cursor.tp, timeout_ms=500)
            for record in batch.get(cursor.tp, ()):
                if record.offset >= cursor.stop_offset:
                    break
                cursor.buffer.append(_timed(record, cursor.kind))
            if cursor.buffer:
                cursor.next_offset = cursor.buffer[-1].offset + 1
        return cursor.buffer.popleft()

    def _stalled(self, tp: TopicPartition, offset: int, end: int) -> TimeoutError:
        return TimeoutError(f"Kafka at {self.kafka.bootstrap_servers} served none of the records of {tp.topic}"
                            f"[{tp.partition}] from offset {offset} (of {end}) in {self.kafka.delivery_timeout_s:g}s "
                            "([kafka] delivery_timeout_s); is the broker running and reachable?")

    def __aiter__(self) -> AsyncIterator[TimedMessage]:
        return self._merge()

    async def _merge(self) -> AsyncIterator[TimedMessage]:
        stats = self.stats
        heap: list[TimedMessage] = []
        live = list(self._cursors)
        last_released = -math.inf
        stop_at = self.to_ms + self.disorder_ms
        while heap or live:
            threshold = min((c.frontier_ms for c in live), default=math.inf)
            if heap and heap[0].event_ms < threshold:
                message = heapq.heappop(heap)
                last_released = message.event_ms
                yield message
                continue
            cursor = min(live, key=lambda c: c.order)
            message = await self._pull(cursor)
            if message is None:
                live.remove(cursor)
                continue
            stats.read += 1
            if not message.fallback:
                if message.event_ms >= stop_at:
                    cursor.late_run += 1
                    if cursor.late_run == NEIGHBOURS:
                        stats.stopped_early += 1
                        live.remove(cursor)      # everything after these records is at or after ``to``
                    continue
                stats.outliers += cursor.late_run    # the partition came back: those late records were outliers
                cursor.late_run = 0
                if message.event_ms < cursor.frontier_ms:
                    stats.outliers += 1
                cursor.recent.append(message.event_ms)
                if len(cursor.recent) == NEIGHBOURS:
                    cursor.frontier_ms = max(cursor.frontier_ms, _median(cursor.recent) - self.disorder_ms)
            if self.from_ms <= message.event_ms < self.to_ms:
                if message.event_ms < last_released:
                    stats.disorder_exceeded += 1
                stats.selected += 1
                heapq.heappush(heap, message)


def complete_span(from_ms: int, to_ms: int, disorder_ms: int, began_ms: int,
                  first_times: dict[str, tuple[int, int | None]]) -> tuple[int, int]:
    """The part ``[a, b)`` of ``[from_ms, to_ms)`` that a selection begun at wall time ``began_ms`` has whole, under
    the disorder bound ``D`` (``disorder_ms``; module docstring).

    * **End.** Reading stops at the partitions' ends as they were when it began, and a message written later is
      never more than ``D`` older than then (its producer stamps it about when it writes it, the bound a live stream
      keeps): ``b = min(to, began - D)``. History loaded later, older than that, is not covered (``finpulse ingest``
      warns when it writes such history).
    * **Start.** ``first_times`` names the partitions whose oldest records were deleted (their first offset is not
      0) and in which no record before the range was found, with the median time of their first records (None when
      none is readable or the partition is empty). A deleted record was written before those, so it is at most
      ``D`` newer than them: ``a = max(from, that time + D)``; with no time to go by, nothing is vouched for."""
    start, end = from_ms, min(to_ms, began_ms - disorder_ms)
    for _, first_ms in first_times.values():
        start = max(start, to_ms if first_ms is None else first_ms + disorder_ms)
    return min(start, to_ms), max(min(start, to_ms), end)


def span_warnings(counts: dict, missing: str) -> list[str]:
    """Why a selection (``SelectionStats`` fields) does not have all of its range; ``missing`` says what that
    means for the command that read it."""
    warnings = []
    for name, offset in counts.get("deleted", {}).items():
        warnings.append(f"{name} begins at offset {offset}: its older records were deleted (retention), and messages "
                        f"of the range before {format_ms(counts['complete_from_ms'])} may have been among them: "
                        f"{missing}")
    if counts.get("arriving_from_ms") is not None:
        warnings.append(f"the range reaches past {format_ms(counts['arriving_from_ms'])} (when reading began, less "
                        f"--max-disorder): messages of that time may still be written: {missing} (run it again "
                        "later for the rest)")
    return warnings


def selection_warnings(counts: dict, max_disorder_s: float) -> list[str]:
    """What a person should know about a selection, from its counts (``SelectionStats`` fields or a manifest's)."""
    warnings = []
    if counts.get("disorder_exceeded"):
        warnings.append(f"{counts['disorder_exceeded']} record(s) were more than {max_disorder_s:.0f}s out of order: "
                        "the selection may be incomplete and their order is not event-time order; raise --max-disorder")
    if counts.get("outliers"):
        warnings.append(f"{counts['outliers']} record(s) had times far from their neighbours' (a wrong clock or a "
                        "typo?): they were replayed if in range, but did not end or start the reading of a partition")
    return warnings


def _timed(record, kind: str) -> TimedMessage:
    own = event_time_ms(record.value, kind)
    return TimedMessage(record.timestamp if own is None else own, record.topic, record.partition, record.offset,
                        kind, record.key, record.value, record.timestamp, fallback=own is None)


async def select_messages(kafka: KafkaSettings, topics: dict[str, str], from_ms: int, to_ms: int,
                          max_disorder_s: float) -> tuple[list[TimedMessage], SelectionStats]:
    """The whole selection as a list (tests and small ranges)."""
    async with KafkaSelection(kafka, topics, from_ms, to_ms, max_disorder_s) as selection:
        return [m async for m in selection], selection.stats


def topic_kinds(names, wanted: Sequence[str]) -> dict[str, str]:
    """``{"news": ..., "comments": ...}`` choices -> {topic name: kind}."""
    available = {"news": (names.news, "news"), "comments": (names.comments, "comment")}
    return dict(available[w] for w in wanted)


__all__ = ["KafkaSelection", "SelectionStats", "TimedMessage", "complete_span", "event_time_ms", "format_ms",
           "select_messages", "selection_warnings", "span_warnings", "topic_kinds"]
