"""The scoring agent's input watermark (``stream.input_watermark``): the slowest input partition that still has a
backlog, and the header that carries it to the aggregation windows."""
from __future__ import annotations

from stream.input_watermark import HEADER, IDLE_S, InputProgress, read_stamp, stamp


def test_the_input_watermark_is_the_newest_event_time_of_the_slowest_partition_with_a_backlog():
    ends = {("news", 0): 100, ("comments", 0): 500, ("comments", 1): 40}  # the next offset each will get

    def highwater(topic: str, partition: int) -> int | None:
        return ends.get((topic, partition))

    progress = InputProgress()
    progress.saw("news", 0, 49, 600_000, now=0.0)        # half its backlog read, up to 600 s of event time
    progress.saw("comments", 0, 98, 200_000, now=0.0)     # a fifth of its backlog, up to 200 s
    progress.saw("comments", 0, 99, 150_000, now=0.0)     # a record older than the newest: the newest stands
    progress.saw("comments", 1, 39, 50_000, now=0.0)      # caught up: it holds nothing back
    assert progress.low_watermark_ms(highwater, now=1.0) == 200_000
    ends[("comments", 0)] = 100                           # the comments caught up: the news is the slowest
    assert progress.low_watermark_ms(highwater, now=1.0) == 600_000
    progress.saw("news", 0, 99, None, now=2.0)            # a dead letter moves the offset, not the time
    assert progress.low_watermark_ms(highwater, now=2.0) is None    # no backlog anywhere: no stamp

    ends[("news", 0)] = 400
    assert progress.low_watermark_ms(highwater, now=2.0 + IDLE_S) == 600_000
    # Not read for longer than IDLE_S though behind (revoked, or stuck): the windows must not wait for it.
    assert progress.low_watermark_ms(highwater, now=2.1 + IDLE_S) is None
    ends.clear()                                          # no fetch has told the high watermarks yet
    progress.saw("news", 0, 100, 700_000, now=50.0)
    assert progress.low_watermark_ms(highwater, now=50.0) is None


def test_the_stamp_travels_as_a_header_and_anything_else_reads_as_none():
    assert stamp(None) == ()
    assert read_stamp(stamp(1_764_000_000_123)) == 1_764_000_000_123
    assert read_stamp([("other", b"1"), *stamp(5)]) == 5
    assert read_stamp({HEADER: b"7"}) == 7                # Faust may hand headers over as a mapping
    assert read_stamp(None) is None and read_stamp([]) is None and read_stamp([("other", b"1")]) is None
    assert read_stamp([(HEADER, b"soon")]) is None
