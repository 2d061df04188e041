"""Keep Faust from committing past records it never processed.

Faust's consumer takes any jump in a partition's offsets for a gap (compaction, transaction markers) and marks the
offsets in between as processed, so its next commit moves past them. Measured here (tansu; a worker started right
after another was killed with kill -9): just after the start's "seek stream partitions to committed offsets", the
first records to reach Faust came from a later position than the committed one (comments[0]: committed 235, first
record 489), Faust marked 235-488 as processed, and the 63 of them the killed worker had not scored were lost, and
so were their windows' counts downstream. The same happened on the scored topics the aggregation reads.

FinPulse's own topics are never compacted and never written in transactions, so their offsets are contiguous and
a jump is never a gap. ``install(app, topics)`` makes the consumer check every record of those topics against the
next offset it expects (known after each seek and each record read): a record from beyond it is dropped and the
partition is sought back, so the skipped records are read, in order, by the next fetch. A jump that is still there
after ``REREADS`` reads from the same place is let through with an error in the log: the broker no longer has those
records (retention deleted them while the worker was down), and waiting for them would stall the partition.
"""
from __future__ import annotations

import logging
from typing import Iterable

from .metrics import counter

log = logging.getLogger(__name__)

OFFSET_JUMPS = counter("finpulse_offset_jumps_total", "Records that reached the worker from beyond the next offset "
                       "expected on their partition, by topic and what was done: reread (the partition is read again "
                       "from the expected offset) or skipped (the records in between are no longer on the broker).",
                       ["topic", "outcome"])

REREADS = 3


class OffsetGuard:
    """What offset comes next on each guarded partition, and whether a record is the one expected."""

    def __init__(self, topics: Iterable[str]):
        self.topics = frozenset(topics)
        self.expected: dict = {}          # topic partition -> next offset to read (unknown until a seek or a read)
        self.retried: dict = {}           # topic partition -> (offset sought back to, how many times)

    def sought(self, tp, offset: int | None) -> None:
        """The consumer was sought to ``offset`` (None: to wherever its reset policy puts it)."""
        if tp.topic not in self.topics:
            return
        if offset is None or offset < 0:
            self.expected.pop(tp, None)
        else:
            self.expected[tp] = offset

    def forget(self, tps: Iterable) -> None:
        for tp in tps:
            self.expected.pop(tp, None)
            self.retried.pop(tp, None)

    def admit(self, tp, offset: int) -> int | None:
        """None when the record at ``offset`` may be processed (in order, a re-read Faust drops itself, or a topic
        not guarded); else the offset to read ``tp`` from again."""
        if tp.topic not in self.topics:
            return None
        expected = self.expected.get(tp)
        if expected is not None and offset > expected:
            at, times = self.retried.get(tp, (expected, 0))
            if at != expected or times < REREADS:
                self.retried[tp] = (expected, times + 1 if at == expected else 1)
                OFFSET_JUMPS.labels(tp.topic, "reread").inc()
                return expected
            OFFSET_JUMPS.labels(tp.topic, "skipped").inc()
            log.error("%s[%d]: records %d-%d are not on the broker (deleted by retention?): reading on from %d",
                      tp.topic, tp.partition, expected, offset - 1, offset)
        if expected is None or offset >= expected:
            self.expected[tp] = offset + 1
            self.retried.pop(tp, None)
        return None


def install(app, topics: Iterable[str]) -> OffsetGuard:
    """Guard ``topics`` on ``app``'s consumer (patches Faust's ``Consumer`` class once per process; apps that
    install no guard are unaffected)."""
    guard = OffsetGuard(topics)
    app.finpulse_offset_guard = guard
    _patch_consumer()
    return guard


def _guard_of(consumer) -> OffsetGuard | None:
    return getattr(consumer.app, "finpulse_offset_guard", None)


def _patch_consumer() -> None:
    from faust.transport.consumer import Consumer

    if getattr(Consumer.getmany, "finpulse_offset_guard", False):
        return
    getmany, perform_seek, seek, on_revoked = (Consumer.getmany, Consumer.perform_seek, Consumer.seek,
                                               Consumer.on_partitions_revoked)

    async def guarded_getmany(self, timeout: float):
        guard = _guard_of(self)
        if guard is None:
            async for item in getmany(self, timeout):
                yield item
            return
        rereading: set = set()
        async for tp, message in getmany(self, timeout):
            if tp in rereading:
                continue          # the rest of this fetch for tp is beyond the offset sought back to
            again = guard.admit(tp, message.offset)
            if again is None:
                yield tp, message
                continue
            rereading.add(tp)
            log.warning("%s[%d]: offsets jumped from %d to %d: reading from %d again, so that the records in "
                        "between are processed before any commit moves past them", tp.topic, tp.partition, again,
                        message.offset, again)
            await self.seek(tp, again)

    async def guarded_perform_seek(self) -> None:
        await perform_seek(self)
        guard = _guard_of(self)
        if guard is not None:
            for tp in self.assignment():
                guard.sought(tp, self._read_offset.get(tp))

    async def guarded_seek(self, partition, offset: int) -> None:
        await seek(self, partition, offset)
        guard = _guard_of(self)
        if guard is not None:
            guard.sought(partition, offset)

    async def guarded_revoked(self, revoked) -> None:
        guard = _guard_of(self)
        if guard is not None:
            guard.forget(revoked)
        await on_revoked(self, revoked)

    guarded_getmany.finpulse_offset_guard = True
    Consumer.getmany = guarded_getmany
    Consumer.perform_seek = guarded_perform_seek
    Consumer.seek = guarded_seek
    Consumer.on_partitions_revoked = guarded_revoked
