"""WindowAggregator: event-time hopping windows, lateness, batch independence, and offset/id dedupe; the live
aggregation's agent and timer taking turns on the key states (``KeyTypeAggregation``)."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest

from stream.aggregate import (AggregateSettings, KeyTypeAggregation, KeyWindows, PartialSchedule, SourcedRecord,
                              StreamClock, WindowAggregator)
from stream.config import ConfigError, Settings
from stream.records import ScoredRecord, TrendRecord, epoch_ms

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
FIXED = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def scored(i: int, second: float, score: float = 0.0, topic: str = "Energy | Oil", kind: str = "news",
           tickers: tuple[str, ...] = ()) -> ScoredRecord:
    sentiment = "bearish" if score < -0.2 else "bullish" if score > 0.2 else "neutral"
    return ScoredRecord(id=f"m{i}", kind=kind, event_time=T0 + timedelta(seconds=second), text=f"message {i}",
                        topic=topic, topic_confidence=0.9, sentiment=sentiment, sentiment_score=score,
                        tickers=tickers, model_version="test-1", scored_at=FIXED)


def aggregator(key_type: str = "topic", **overrides) -> WindowAggregator:
    config = {"windows": ["1m/1m"], "allowed_lateness_s": 10, **overrides}
    return WindowAggregator(AggregateSettings(**config), key_type, clock=lambda: FIXED)


def by_id(trends: list[TrendRecord]) -> dict[str, TrendRecord]:
    return {t.window_id: t for t in trends}


def test_tumbling_window_closes_after_lateness_with_its_summary():
    agg = aggregator()
    records = [scored(0, 5, -0.8), scored(1, 20, 0.6, kind="comment"), scored(2, 59.9, 0.0),
               scored(3, 65)]
    first = agg.feed(records)
    assert first.final == []                     # watermark 65 s < end 60 s + lateness 10 s
    closed = agg.feed([scored(4, 70)]).final
    assert [t.window_id for t in closed] == ["topic:Energy | Oil:60:2026-03-02T09:00:00.000Z"]
    trend = closed[0]
    assert (trend.count, trend.news_count, trend.comment_count) == (3, 2, 1)
    assert trend.mean_score == pytest.approx(-0.2 / 3, abs=1e-6)
    assert trend.bearish_share == pytest.approx(1 / 3, abs=1e-6)
    assert trend.bullish_share == pytest.approx(1 / 3, abs=1e-6)
    assert trend.final and trend.window_end - trend.window_start == timedelta(seconds=60)
    assert [ref["id"] for ref in trend.most_negative] == ["m0"]


def test_hopping_windows_count_each_message_in_every_window_that_contains_it():
    agg = aggregator(windows=["3m/1m"])
    agg.feed([scored(0, 130)])                    # 09:02:10 is in windows starting 09:00, 09:01, 09:02
    closed = by_id(agg.flush())
    assert sorted(closed) == [f"topic:Energy | Oil:180:2026-03-02T09:0{m}:00.000Z" for m in (0, 1, 2)]
    assert all(t.count == 1 for t in closed.values())


def test_late_message_inside_lateness_counts_and_later_one_is_dropped():
    agg = aggregator()
    agg.feed([scored(0, 10), scored(1, 65)])      # window 09:00 still open until watermark 70 s
    inside = agg.feed([scored(2, 50)])
    assert inside.applied == 1 and inside.late == 0
    closed = agg.feed([scored(3, 75)]).final
    assert closed[0].count == 2
    too_late = agg.feed([scored(4, 30)])          # its only window closed at 70 s
    assert too_late.late == 1 and too_late.applied == 0
    assert all(t.window_start != T0 for t in agg.flush())


def test_close_grace_keeps_windows_open_for_lagging_partitions_for_a_few_wall_clock_seconds():
    agg = aggregator(close_grace_s=5.0)
    state = KeyWindows()
    key = "Energy | Oil"
    # A backlog: one partition is already at 09:03 when another's records for 09:00-09:01 arrive.
    first = agg.apply(key, state, [SourcedRecord(scored(0, 10)), SourcedRecord(scored(1, 185))], now=100.0)
    assert first.final == []
    lagging = agg.apply(key, state, [SourcedRecord(scored(2, 20)), SourcedRecord(scored(3, 70))], now=102.0)
    assert lagging.late == 0 and lagging.final == []       # 09:01 did not even exist yet, and still counts
    assert agg.settle(key, state, now=104.9) == []
    closed = agg.settle(key, state, now=105.0)
    assert [(t.window_start.minute, t.count) for t in closed] == [(0, 2), (1, 1)]
    late = agg.apply(key, state, [SourcedRecord(scored(4, 30))], now=106.0)
    assert late.late == 1


def test_windows_that_only_wait_out_the_close_grace_are_not_republished():
    """Their final trend comes within the grace: running figures of them would be read by nobody."""
    agg = aggregator(close_grace_s=5.0)
    state = KeyWindows()
    key = "Energy | Oil"
    agg.apply(key, state, [SourcedRecord(scored(0, 10)), SourcedRecord(scored(1, 65))], now=100.0)
    assert [t.window_start.minute for t in agg.open_trends(key, state)] == [0, 1]   # 09:00 may still take a late one
    agg.apply(key, state, [SourcedRecord(scored(2, 75))], now=101.0)     # past 09:01 + 10 s lateness: 09:00 is done
    assert [t.window_start.minute for t in agg.open_trends(key, state)] == [1]
    minute_0 = f"60:{int(T0.timestamp() * 1000)}"
    assert agg.open_trends(key, state, [minute_0]) == []
    assert [t.window_start.minute for t in agg.settle(key, state, now=106.0)] == [0]


def test_a_key_waits_for_the_input_watermark_its_records_carry():
    """A backlog in which the news is read minutes of event time ahead of the comments: records stamped with the
    comments' progress keep the key's windows open for the comments however long (wall clock) they take; once
    every input has caught up (no stamp), the windows close with everything."""
    agg = aggregator(close_grace_s=5.0)
    state = KeyWindows()
    key = "Energy | Oil"

    def at(second: float) -> int:
        return int((T0 + timedelta(seconds=second)).timestamp() * 1000)

    ahead = agg.apply(key, state, [SourcedRecord(scored(0, 185), input_watermark_ms=at(10))], now=100.0)
    assert ahead.final == [] and agg.settle(key, state, now=160.0) == []
    behind = agg.apply(key, state, [SourcedRecord(scored(1, 20, kind="comment"), input_watermark_ms=at(20)),
                                    SourcedRecord(scored(2, 70, kind="comment"), input_watermark_ms=at(70))], now=160.0)
    assert behind.late == 0 and behind.applied == 2
    caught_up = agg.apply(key, state, [SourcedRecord(scored(3, 190, kind="comment"))], now=170.0)
    closed = caught_up.final + agg.settle(key, state, now=175.0)
    assert [(t.window_start.minute, t.news_count, t.comment_count) for t in closed] == [(0, 0, 1), (1, 0, 1)]
    later = agg.apply(key, state, [SourcedRecord(scored(4, 400))], now=180.0).final + agg.settle(key, state, now=185.0)
    assert [(t.window_start.minute, t.news_count, t.comment_count) for t in later] == [(3, 1, 1)]


def test_after_a_backlog_a_partitions_clock_moves_on_to_its_newest_record_once_the_input_caught_up():
    """Records stamped behind hold their partition's clock; the first one published with the input caught up (no
    stamp) lets every partition's clock move on to its newest record, so quiet keys close their windows even if
    no message follows the backlog."""
    clock = StreamClock()
    clock.saw(0, 10_000, now=1.0, newest_ms=185_000)    # news at 185 s, stamped with the comments' 10 s
    clock.saw(1, 70_000, now=1.0, newest_ms=90_000)
    assert clock.time_for(0, now=2.0) == 10_000 and clock.time_for(1, now=2.0) == 70_000
    clock.saw(1, 95_000, now=3.0, newest_ms=95_000)     # unstamped: the scoring agent had read all its input
    clock.input_caught_up()
    assert clock.time_for(0, now=4.0) == 185_000 and clock.time_for(1, now=4.0) == 95_000


def test_a_message_too_late_for_one_of_its_windows_counts_as_late():
    agg = aggregator(windows=["1m/1m", "5m/5m"])
    agg.feed([scored(0, 10), scored(1, 75)])      # watermark 75 s: 09:00's minute closed (60 s + 10 s)
    late = agg.feed([scored(2, 30)])
    assert late.applied == 1 and late.late == 1   # in its five minutes, not in its minute
    assert {(t.window_s, t.count) for t in agg.flush()} == {(300, 3), (60, 1)}


def test_final_windows_do_not_depend_on_batch_boundaries():
    records = [scored(i, i * 3.7 % 400 + (i // 50) * 60, (i % 7 - 3) / 3, topic=("A", "B")[i % 2])
               for i in range(300)]
    whole = aggregator(windows=["1m/1m", "5m/1m"])
    one_batch = whole.feed(records).final + whole.flush()
    pieces = aggregator(windows=["1m/1m", "5m/1m"])
    many_batches = []
    for start in range(0, len(records), 17):
        many_batches += pieces.feed(records[start:start + 17]).final
    many_batches += pieces.flush()
    assert by_id(many_batches) == by_id(one_batch)
    assert len(one_batch) > 10


def test_most_negative_keeps_the_k_lowest_scores_in_a_stable_order():
    agg = aggregator(top_negative=3)
    agg.feed([scored(i, i, score) for i, score in enumerate([-0.1, -0.9, 0.5, -0.9, -0.4, -0.2, -0.95])])
    (trend,) = agg.flush()
    assert [(r["id"], r["sentiment_score"]) for r in trend.most_negative] == [("m6", -0.95), ("m1", -0.9), ("m3", -0.9)]


def test_ticker_windows_count_a_message_under_each_of_its_tickers():
    agg = aggregator("ticker")
    agg.feed([scored(0, 1, tickers=("XOM", "CVX")), scored(1, 2, tickers=("XOM",)), scored(2, 3)])
    counts = {t.key: t.count for t in agg.flush()}
    assert counts == {"XOM": 2, "CVX": 1}


def test_a_ticker_window_names_the_topic_most_of_its_messages_are_about():
    agg = aggregator("ticker")
    agg.feed([scored(0, 1, tickers=("XOM",)), scored(1, 2, tickers=("XOM",), topic="Macro"),
              scored(2, 3, tickers=("XOM", "AAPL")), scored(3, 4, tickers=("AAPL",), topic="Earnings"),
              scored(4, 5, tickers=("MSFT",), topic="Macro"), scored(5, 6, tickers=("MSFT",), topic="Earnings")])
    # A partial trend, then the state written to the table and read back (as a restarted worker does), then final.
    (partial,) = [t for t in agg.open_trends("XOM", agg.states["XOM"])]
    assert partial.topic == "Energy | Oil"
    agg.states = {k: KeyWindows.from_dict(json.loads(json.dumps(s.to_dict()))) for k, s in agg.states.items()}
    topics = {t.key: t.topic for t in agg.flush()}
    # XOM: 2 of 3 Energy | Oil; AAPL and MSFT tie 1-1: the first by name.
    assert topics == {"XOM": "Energy | Oil", "AAPL": "Earnings", "MSFT": "Earnings"}
    topic_agg = aggregator("topic")
    topic_agg.feed([scored(0, 1, tickers=("XOM",))])
    (topic_trend,) = topic_agg.flush()
    assert topic_trend.topic == "" and "topics" not in json.dumps(topic_agg.states["Energy | Oil"].to_dict())


def test_a_ticker_window_written_before_topics_were_counted_still_closes():
    agg = aggregator("ticker")
    agg.feed([scored(0, 1, tickers=("XOM",))])
    old = agg.states["XOM"].to_dict()
    for window in old["windows"].values():
        del window["topics"]
    agg.states = {"XOM": KeyWindows.from_dict(old)}
    agg.feed([scored(1, 2, tickers=("XOM",), topic="Macro")])
    (trend,) = agg.flush()
    assert (trend.count, trend.topic) == (2, "Macro")      # it counts what it saw since


def sourced(records: list[ScoredRecord], partition: int = 0, first_offset: int = 0) -> list[SourcedRecord]:
    return [SourcedRecord(r, partition, first_offset + n) for n, r in enumerate(records)]


def test_restart_from_an_older_offset_applies_nothing_twice():
    """The table value is restored from the changelog (JSON), then Faust re-delivers from the last commit."""
    records = [scored(i, i * 2.5, -0.5 if i % 3 else 0.4) for i in range(200)]
    events = sourced(records)

    reference = aggregator()
    ref_state = KeyWindows()
    expected = reference.apply("Energy | Oil", ref_state, events).final

    agg = aggregator()
    state = KeyWindows()
    got = agg.apply("Energy | Oil", state, events[:120]).final
    restored = KeyWindows.from_dict(json.loads(json.dumps(state.to_dict())))
    redelivered = agg.apply("Energy | Oil", restored, events[90:])   # committed offset lagged the table
    assert redelivered.duplicates == 30
    got += redelivered.final
    assert by_id(got) == by_id(expected)
    assert restored.to_dict() == ref_state.to_dict()


def test_rescored_duplicates_at_new_offsets_are_skipped_by_message_id():
    records = [scored(i, i * 2.0, -0.5 if i % 4 else 0.3) for i in range(100)]
    agg = aggregator()
    state = agg.states["Energy | Oil"] = KeyWindows()
    got = agg.apply("Energy | Oil", state, sourced(records[:60])).final
    # The scorer crashed and re-scored messages 40..59: they come back at new offsets.
    again = agg.apply("Energy | Oil", state, sourced(records[40:], first_offset=60))
    assert again.duplicates == 20 and again.applied == 40
    got += again.final + agg.flush()
    reference = aggregator()
    assert by_id(got) == by_id(reference.feed(records).final + reference.flush())


def test_window_settings_are_validated_and_read_from_the_environment():
    settings = Settings(raw={"aggregate": {"windows": "2m/1m, 1h/5m", "allowed_lateness_s": "45"}})
    config = settings.section("aggregate", AggregateSettings)
    assert [(s.size_s, s.step_s) for s in config.specs()] == [(120, 60), (3600, 300)]
    assert config.allowed_lateness_s == 45
    for bad in (["5m/2m"], ["soon"], [], ["1m", "60s/30s"]):
        with pytest.raises(ConfigError, match="windows"):
            AggregateSettings(windows=bad)


def test_a_quiet_key_follows_the_stream_time_so_its_windows_close_without_a_message_of_its_own():
    agg = aggregator(close_grace_s=5.0)
    state = KeyWindows()
    key = "Energy | Oil"
    agg.apply(key, state, [SourcedRecord(scored(0, 10, -0.9), 0, 1), SourcedRecord(scored(1, 30, -0.9), 0, 2)],
              now=100.0)
    assert not agg.follow_stream(state, stream_ms=_ms(65), now=101.0)     # 09:01:05 < end 09:01:00 + lateness 10 s
    assert agg.follow_stream(state, stream_ms=_ms(75), now=101.0)
    assert not agg.follow_stream(state, stream_ms=_ms(75), now=102.0)     # already there: nothing to write
    assert agg.settle(key, state, now=105.9) == []                        # the close grace holds as for a message
    closed = agg.settle(key, state, now=106.0)
    assert [(t.window_start, t.count, t.bearish_share) for t in closed] == [(T0, 2, 1.0)]
    late = agg.apply(key, state, [SourcedRecord(scored(2, 40), 0, 3)], now=107.0)
    assert late.late == 1                                                 # its window closed, as for any key


def test_stream_clock_follows_a_partition_then_the_slowest_active_one_once_it_is_idle():
    from stream.aggregate import IDLE_PARTITION_S, StreamClock
    clock = StreamClock()
    clock.saw(0, 5_000, now=0.0)
    clock.saw(1, 9_000, now=0.0)
    clock.saw(2, 7_000, now=0.0)
    assert clock.time_for(0, now=1.0) == 5_000          # a backlog: partition 0 lags, its keys wait for it
    clock.saw(1, 20_000, now=IDLE_PARTITION_S + 1)
    clock.saw(2, 15_000, now=IDLE_PARTITION_S + 1)
    assert clock.time_for(0, now=IDLE_PARTITION_S + 2) == 15_000   # partition 0 idle: the slowest active one
    assert clock.time_for(3, now=IDLE_PARTITION_S + 2) == 15_000   # a partition never seen: the same
    assert clock.time_for(0, now=3 * IDLE_PARTITION_S) is None     # nothing active: time stands still


def _ms(second: float) -> int:
    return int((T0 + timedelta(seconds=second)).timestamp() * 1000)


def test_partials_are_republished_at_most_every_interval_or_sixtieth_of_their_window():
    minute, five, hour = "60:1000", "300:1000", "3600:1000"
    schedule = PartialSchedule(interval_s=5.0)
    schedule.note(b"Oil", [minute, five, hour])
    schedule.note(b"Gold", [])                         # nothing changed: nothing to publish
    assert schedule.due(0.0) == {b"Oil": {minute, five, hour}} and not schedule.changed
    schedule.note(b"Oil", [minute, five, hour])
    assert schedule.due(4.0) == {}                     # within the interval
    assert schedule.due(5.0) == {b"Oil": {minute, five}}   # five minutes / 60 = 5 s; the hour waits for 60 s
    assert schedule.due(59.0) == {}
    assert schedule.due(60.0) == {b"Oil": {hour}} and not schedule.changed
    assert schedule.due(200.0) == {} and schedule.next_at == {}   # entries go once their time passed unchanged
    schedule.note(b"Oil", [hour])
    schedule.keep_only({b"Gold"})                      # the key moved to another worker
    assert schedule.due(300.0) == {}


def test_open_windows_are_refreshed_though_unchanged_until_they_close():
    minute, hour = "60:1000", "3600:1000"
    schedule = PartialSchedule(interval_s=5.0, refresh_s=300.0)
    schedule.note(b"Oil", [minute, hour])
    assert schedule.due(0.0) == {b"Oil": {minute, hour}}
    assert schedule and schedule.due(299.0) == {}       # nothing changed: nothing yet
    assert schedule.due(300.0) == {b"Oil": {minute, hour}}
    schedule.forget(b"Oil", [minute])                   # it closed
    assert schedule.due(600.0) == {b"Oil": {hour}}
    schedule.keep_only(set())
    assert not schedule and schedule.due(900.0) == {}


def test_while_a_backlog_drains_only_windows_the_clock_has_not_passed_are_noted():
    passed, current = "60:1000", "600:1000"            # windows ending 61 s and 601 s after the epoch
    schedule = PartialSchedule(interval_s=5.0)
    schedule.hold(100.0)
    schedule.note(b"Oil", [passed, current])
    assert schedule.due(100.0) == {b"Oil": {current}}   # live: published while the backlog drains
    schedule.note(b"Oil", [passed])
    assert schedule.due(110.0) == {}                    # history the watermark races through: not
    schedule.hold(50.0)
    schedule.note(b"Oil", [passed])                     # noted in time, due once the clock has passed it: not
    assert schedule.due(70.0) == {} and not schedule.changed
    schedule.resume([(b"Oil", [passed, current])])      # drained: every window still open
    assert schedule.due(111.0) == {b"Oil": {passed, current}}


def test_a_dashboard_reads_open_windows_back_one_refresh_or_the_longest_window():
    assert AggregateSettings().open_span_s() == 300 + 5 + 1
    assert AggregateSettings(windows=["1m/1m"]).open_span_s() == 60 + 30 + 5 + 5 + 1
    with pytest.raises(ConfigError, match="partial_refresh_s"):
        AggregateSettings(partial_refresh_s=1.0)


class MemoryTable(dict):
    """What the aggregation reads and writes of its Faust table, in memory: here every write is delivered at once."""

    async def writes_delivered(self) -> None:
        return None


class AggregationRig:
    """A ``KeyTypeAggregation`` on an in-memory table, with a wall clock the test sets (``now``) and every trend it
    publishes recorded in order. ``holds``: (reached, released) event pairs that hold the next publishings of closed
    windows open, one each, so a test can take turns at exactly that point."""

    def __init__(self, config: AggregateSettings, now: float, owned_partitions=lambda: {0}):
        self.now = now
        self.published: list[TrendRecord] = []
        self.holds: list[tuple[asyncio.Event, asyncio.Event]] = []
        self.table = MemoryTable()
        self.aggregation = KeyTypeAggregation(config, "topic", 100, self.table, self._publish,
                                              owned_partitions=owned_partitions, clock=lambda: self.now)

    async def _publish(self, trends: list[TrendRecord]) -> None:
        if any(trend.final for trend in trends) and self.holds:
            reached, released = self.holds.pop(0)
            reached.set()
            await released.wait()
        self.published.extend(trends)

    async def batch(self, now: float, items: list[tuple[bytes, SourcedRecord]]) -> None:
        self.now = now
        await self.aggregation.apply_batch(items)

    async def tick(self, now: float, generation: int = 0) -> list[TrendRecord]:
        """The timer's turn at ``now``: what it published (taken out of ``published``)."""
        self.now = now
        await self.aggregation.settle_and_publish(generation)
        taken, self.published = self.published, []
        return taken


async def reached(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 5.0)
    except TimeoutError:
        raise AssertionError(f"the scenario went another way: {what} never happened") from None


def test_a_tick_and_a_batch_take_turns_so_every_open_window_goes_out_with_the_figures_it_holds():
    """The agent notes a batch's changed windows, publishes the windows the batch closed, then writes the new states.
    A tick that read the states in that gap published the old ones and counted the windows as published: a new
    window was never shown, a changed one a message short (CI, under load). Here the publishing of closed windows
    is held open at will, so the tick's turn comes exactly there: right after the tick's own closing, with a batch
    waiting for the states."""
    oil, macro = b"Energy | Oil", b"Macro"

    def items(key: bytes, seconds: list[float], first_offset: int) -> list[tuple[bytes, SourcedRecord]]:
        topic = key.decode()
        return [(key, SourcedRecord(scored(first_offset + n, second, topic=topic), 0, first_offset + n))
                for n, second in enumerate(seconds)]

    async def scenario() -> AggregationRig:
        rig = AggregationRig(AggregateSettings(windows=["1m/1m"], allowed_lateness_s=10, close_grace_s=5,
                                               partial_interval_s=1), now=1000.0)
        aggregation = rig.aggregation
        await rig.batch(1000.0, items(oil, [5, 6], 0) + items(macro, [7], 2))
        await rig.batch(1001.0, items(oil, [75], 3))        # Oil's 09:00 window closes 5 s from now
        await rig.batch(1004.0, items(macro, [76], 4))      # Macro's 09:00 window closes 5 s from now

        tick_closes, batch_closes = (asyncio.Event(), asyncio.Event()), (asyncio.Event(), asyncio.Event())
        rig.holds += [tick_closes, batch_closes]
        rig.now = 1007.0
        tick = asyncio.create_task(aggregation.settle_and_publish(0))             # closes Oil's 09:00 window...
        await reached(tick_closes[0], "the tick closing Oil's 09:00 window")     # ...and is held publishing it
        batch = asyncio.create_task(aggregation.apply_batch(items(macro, [80], 5) + items(oil, [125], 6)))
        await asyncio.sleep(0)
        rig.now = 1010.0
        tick_closes[1].set()
        # The batch closed Macro's 09:00 window, changed its 09:01 and opened Oil's 09:02, and is held publishing.
        await reached(batch_closes[0], "the batch closing Macro's 09:00 window")
        next_tick = asyncio.create_task(aggregation.settle_and_publish(0))
        await asyncio.sleep(0.01)
        batch_closes[1].set()
        await asyncio.gather(tick, batch, next_tick)
        rig.now = 1020.0
        await aggregation.settle_and_publish(0)
        return rig

    rig = asyncio.run(scenario())
    published, table = rig.published, rig.table

    def window_of(trend: TrendRecord) -> tuple[str, str]:
        return trend.key, f"{trend.window_s}:{epoch_ms(trend.window_start)}"     # as the table names it

    last_partial: dict[tuple[str, str], TrendRecord] = {}
    closed: set[tuple[str, str]] = set()
    for trend in published:
        if trend.final:
            closed.add(window_of(trend))
        else:
            assert window_of(trend) not in closed, f"running figures of {window_of(trend)} went out after it closed"
            last_partial[window_of(trend)] = trend
    assert closed == {("Energy | Oil", f"60:{_ms(0)}"), ("Macro", f"60:{_ms(0)}")}
    open_windows = {(key.decode(), wid): window["count"] for key, value in table.items()
                    for wid, window in value["windows"].items()}
    assert sorted(open_windows) == [("Energy | Oil", f"60:{_ms(60)}"), ("Energy | Oil", f"60:{_ms(120)}"),
                                    ("Macro", f"60:{_ms(60)}")]
    for window, count in open_windows.items():
        shown = last_partial.get(window)
        assert shown is not None, f"the open window {window} was never published"
        assert shown.count == count, f"{window} was last published with {shown.count} messages; it holds {count}"


def test_after_a_rebalance_the_timer_publishes_and_closes_only_the_keys_of_partitions_still_owned():
    """A memory store keeps the keys a worker wrote after their partition moved to another worker: the timer takes
    stock of its keys after each rebalance and leaves the others' alone (their new owner publishes and closes them)."""
    async def scenario() -> dict[str, list[TrendRecord]]:
        owned = {0, 1}
        rig = AggregationRig(AggregateSettings(windows=["1m/1m"], allowed_lateness_s=10, close_grace_s=0,
                                               partial_interval_s=1, partial_refresh_s=60),
                             now=1000.0, owned_partitions=lambda: set(owned))
        await rig.batch(1000.0, [(b"Energy | Oil", SourcedRecord(scored(0, 5), 0, 0)),
                                 (b"Macro", SourcedRecord(scored(1, 6, topic="Macro"), 1, 0))])
        rounds = {"first": await rig.tick(1000.0, 0),
                  "refreshed": await rig.tick(1070.0, 0)}            # unchanged, but a refresh is due
        owned.discard(1)                                            # partition 1 moves to another worker
        rounds["after the rebalance"] = await rig.tick(1140.0, 1)
        # Oil's clock passes its 09:00 window; Macro's partition is idle, so it would follow Oil's.
        await rig.batch(1141.0, [(b"Energy | Oil", SourcedRecord(scored(2, 80), 0, 1))])
        rounds["closing"] = await rig.tick(1142.0, 1)
        return rounds

    rounds = asyncio.run(scenario())
    seen = {name: sorted({(trend.key, "final" if trend.final else "running") for trend in trends})
            for name, trends in rounds.items()}
    assert seen == {"first": [("Energy | Oil", "running"), ("Macro", "running")],
                    "refreshed": [("Energy | Oil", "running"), ("Macro", "running")],
                    "after the rebalance": [("Energy | Oil", "running")],
                    "closing": [("Energy | Oil", "final"), ("Energy | Oil", "running")]}


def test_a_backlog_holds_the_running_figures_of_windows_the_clock_has_passed_and_says_so_at_most_once_a_minute(caplog):
    """Draining a backlog, the worker's windows close seconds after they open: their running figures would be read
    by nobody. Once it has drained, every window still open goes out. A scorer at its limit crosses the mark batch
    after batch: the two log lines come at most once a minute."""
    t0_s = T0.timestamp()

    async def scenario() -> dict[str, list[TrendRecord]]:
        rig = AggregationRig(AggregateSettings(windows=["1m/1m", "1h/1h"], allowed_lateness_s=10, close_grace_s=5,
                                               partial_interval_s=1), now=t0_s + 600)

        async def batch(offset: int, second: float, backlog: int, now: float) -> None:
            record = SourcedRecord(scored(offset, second), 0, offset, input_backlog=backlog)
            await rig.batch(now, [(b"Energy | Oil", record)])

        rounds = {"before": await rig.tick(t0_s + 599)}
        await batch(0, 5, backlog=1000, now=t0_s + 600)       # 09:00:05 read at 09:10: history
        rounds["draining"] = await rig.tick(t0_s + 601)
        await batch(1, 6, backlog=0, now=t0_s + 602)          # drained
        rounds["drained"] = await rig.tick(t0_s + 603)
        for n, now in enumerate((t0_s + 610, t0_s + 640)):    # crossing the mark again within the minute: no lines
            await batch(2 + 2 * n, 7, backlog=1000, now=now)
            await batch(3 + 2 * n, 8, backlog=0, now=now + 1)
        await batch(6, 9, backlog=1000, now=t0_s + 700)       # a minute on: the lines again
        await batch(7, 10, backlog=0, now=t0_s + 701)
        return rounds

    with caplog.at_level("INFO", logger="stream.aggregate"):
        rounds = asyncio.run(scenario())
    windows = {name: sorted(trend.window_s for trend in trends) for name, trends in rounds.items()}
    # Draining, only the hour window (open by the clock) goes out; drained, the minute window too (the hour is not
    # due again for a minute: 1/60 of its length).
    assert windows == {"before": [], "draining": [3600], "drained": [60]}
    lines = [record.getMessage() for record in caplog.records if "backlog" in record.getMessage()]
    assert [line.split(";")[0] for line in lines] == ["topic aggregation: draining a backlog (1000 messages unread)",
                                                      "topic aggregation: the backlog has drained"] * 2, lines
