"""The offset guard (``stream.offset_guard``): on FinPulse's own topics a jump in offsets is never a gap Faust may
mark as processed; the guard asks for the partition to be read again from the offset it expected. The end-to-end
proof is the restart tests (``test_stream_worker``, ``test_alerts_e2e``): a killed worker's successor must score
and count every message."""
from __future__ import annotations

import logging
from typing import NamedTuple

from stream.offset_guard import OFFSET_JUMPS, REREADS, OffsetGuard


class TP(NamedTuple):
    topic: str
    partition: int


NEWS, CHANGELOG = TP("p.news", 0), TP("app-aggregate-topic-changelog", 0)


def test_records_in_order_pass_and_a_jump_after_a_seek_sends_the_partition_back():
    guard = OffsetGuard({"p.news"})
    guard.sought(NEWS, 235)                       # "seek stream partitions to committed offsets"
    assert guard.admit(NEWS, 489) == 235          # Faust would have taken 235-488 for a gap and committed past them
    guard.sought(NEWS, 235)
    assert [guard.admit(NEWS, o) for o in (235, 236, 237)] == [None, None, None]
    assert guard.admit(NEWS, 239) == 238          # a hole of one record counts too


def test_a_reread_below_the_expected_offset_is_left_to_faust_and_the_first_record_sets_the_pace():
    guard = OffsetGuard({"p.news"})
    assert guard.admit(NEWS, 17) is None          # nothing known yet (no commit: the reset policy chose)
    assert guard.admit(NEWS, 18) is None
    assert guard.admit(NEWS, 10) is None          # older than expected: Faust drops it as already read
    assert guard.admit(NEWS, 20) == 19


def test_records_gone_from_the_broker_are_read_for_a_few_times_then_skipped_with_an_error(caplog):
    guard = OffsetGuard({"p.news"})
    skipped_before = OFFSET_JUMPS.labels("p.news", "skipped").value
    for _ in range(REREADS):
        guard.sought(NEWS, 100)
        assert guard.admit(NEWS, 5000) == 100
    guard.sought(NEWS, 100)
    with caplog.at_level(logging.ERROR):
        assert guard.admit(NEWS, 5000) is None    # the same jump again: retention deleted them
    assert "records 100-4999 are not on the broker" in caplog.text
    assert OFFSET_JUMPS.labels("p.news", "skipped").value == skipped_before + 1
    assert guard.admit(NEWS, 5001) is None
    assert guard.admit(NEWS, 5003) == 5002        # and a later jump is caught again


def test_compacted_and_foreign_topics_are_not_guarded_and_a_revoke_forgets():
    guard = OffsetGuard({"p.news"})
    guard.sought(CHANGELOG, 3)
    assert guard.admit(CHANGELOG, 90) is None     # compaction leaves real gaps
    guard.sought(NEWS, 7)
    guard.forget([NEWS])
    assert guard.admit(NEWS, 70) is None          # a new owner starts from its own seek
