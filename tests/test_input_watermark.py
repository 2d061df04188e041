"""The scoring agent's input lag (``stream.input_watermark``): the slowest input partition that still has a
backlog, how many messages wait, and the headers that carry both to the aggregation windows."""
from __future__ import annotations

from stream.input_watermark import BACKLOG_HEADER, HEADER, IDLE_S, InputLag, InputProgress, draining, read_stamp, stamp


def test_the_input_watermark_is_the_newest_event_time_of_the_slowest_partition_with_a_backlog():
    ends = {("news", 0): 100, ("comments", 0): 500, ("comments", 1): 40}  # the next offset each will get

    def highwater(topic: str, partition: int) -> int | None:
        return ends.get((topic, partition))

    progress = InputProgress()
    progress.saw("news", 0, 49, 600_000, now=0.0)        # half its backlog read, up to 600 s of event time
    progress.saw("comments", 0, 98, 200_000, now=0.0)     # a fifth of its backlog, up to 200 s
    progress.saw("comments", 0, 99, 150_000, now=0.0)     # a record older than the newest: the newest stands
    progress.saw("comments", 1, 39, 50_000, now=0.0)      # caught up: it holds nothing back
    # Unread: news 100 - 49 - 1 = 50, comments/0 500 - 99 - 1 = 400; comments/1 none.
    assert progress.lag(highwater, now=1.0) == InputLag(200_000, 450)
    ends[("comments", 0)] = 100                           # the comments caught up: the news is the slowest
    assert progress.lag(highwater, now=1.0) == InputLag(600_000, 50)
    progress.saw("news", 0, 99, None, now=2.0)            # a dead letter moves the offset, not the time
    assert progress.lag(highwater, now=2.0) == InputLag(None, 0)    # no backlog anywhere: no stamp

    ends[("news", 0)] = 400
    assert progress.lag(highwater, now=2.0 + IDLE_S) == InputLag(600_000, 300)
    # Not read for longer than IDLE_S though behind (revoked, or stuck): the windows must not wait for it.
    assert progress.lag(highwater, now=2.1 + IDLE_S) == InputLag(None, 0)
    ends.clear()                                          # no fetch has told the high watermarks yet
    progress.saw("news", 0, 100, 700_000, now=50.0)
    assert progress.lag(highwater, now=50.0) == InputLag(None, 0)


def test_a_backlog_is_more_than_four_full_batches_waiting():
    assert not draining(0, 256) and not draining(1024, 256) and draining(1025, 256)

def test_the_stamp_travels_as_headers_and_anything_else_reads_as_no_lag():
    assert stamp(InputLag()) == ()
    assert read_stamp(stamp(InputLag(1_764_000_000_123, 40))) == InputLag(1_764_000_000_123, 40)
    assert read_stamp([("other", b"1"), *stamp(InputLag(5, 3))]) == InputLag(5, 3)
    assert read_stamp({HEADER: b"7", BACKLOG_HEADER: b"2"}) == (7, 2)   # Faust may hand headers over as a mapping
    assert read_stamp([(HEADER, b"7")]) == InputLag(7, 0)          # stamped before the backlog was: none counted
    assert read_stamp(None) == read_stamp([]) == read_stamp([("other", b"1")]) == InputLag()
    assert read_stamp([(HEADER, b"soon"), (BACKLOG_HEADER, b"9")]) == InputLag()
