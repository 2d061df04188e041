"""Event-time selection on a real tansu broker: exactly the messages with event time in [T1, T2), whatever the record
batches, partition clock skew, disorder within a partition or Kafka timestamps say; merged in one total order."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import pytest
from aiokafka import AIOKafkaConsumer

from stream.kafka_io import RecordSender
from stream.records import epoch_ms, format_time
from stream.replay.select import (NEIGHBOURS, KafkaSelection, complete_span, select_messages, span_warnings,
                                  topic_kinds)
from stream.topics import TopicNames
from tests.network import broker_behind_link
from tests.procs import isolated_settings, write_config
from tests.test_replay import finpulse

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=timezone.utc)
MINUTE_MS = 60_000


def news(ident: str, at: datetime) -> bytes:
    return json.dumps({"id": ident, "published_at": format_time(at), "headline": f"headline {ident}"}).encode()


def comment(ident: str, at: datetime) -> bytes:
    return json.dumps({"id": ident, "created_at": format_time(at), "text": f"comment {ident}"}).encode()


def produce(settings, rows) -> None:
    """rows: (topic, partition, value, Kafka timestamp as datetime, or None for the broker's time). Sent in one go,
    so the producer packs many records into each batch."""
    async def send():
        async with RecordSender(settings.kafka, linger_ms=20) as sender:
            for topic, partition, value, kafka_time in rows:
                await sender.send(topic, value, event_time=kafka_time, partition=partition)
    asyncio.run(send())


def select(settings, topics, start: datetime, end: datetime, disorder_s: float, wanted=("news", "comments")):
    return asyncio.run(select_messages(settings.kafka, topic_kinds(topics, list(wanted)), epoch_ms(start),
                                       epoch_ms(end), disorder_s))


@pytest.fixture
def skewed_inputs(fp_settings, topics):
    """1200 news over 4 partitions (one 15 min behind, one 7 min ahead, one stamped with the broker's time instead
    of the event time, all shuffled up to 90 s within a partition), 300 comments sharing some event times with
    news, and two malformed messages (selected by their Kafka timestamp)."""
    rng = random.Random(3)
    rows, expected_time = [], {}
    skew = {0: timedelta(0), 1: timedelta(minutes=-15), 2: timedelta(minutes=7), 3: timedelta(0)}
    for partition in range(4):
        for i in range(300):
            at = T0 + timedelta(seconds=20 * i) + skew[partition] + timedelta(milliseconds=rng.randint(-90_000, 90_000))
            ident = f"n{partition}-{i}"
            rows.append((topics.news, partition, news(ident, at), None if partition == 3 else at))
            expected_time[ident] = epoch_ms(at)
    for i in range(300):
        at = T0 + timedelta(seconds=20 * i) if i % 3 else datetime.fromtimestamp(
            expected_time[f"n0-{i}"] / 1000, tz=timezone.utc)      # ties with a news message
        rows.append((topics.comments, i % 4, comment(f"c{i}", at), at))
        expected_time[f"c{i}"] = epoch_ms(at)
    # In partition 0 where their times belong (its rows come first, 20 s apart; the second goes last).
    for position, ident, kafka_time in ((150, "bad-inside", T0 + timedelta(minutes=50)),
                                        (301, "bad-outside", T0 + timedelta(minutes=500))):
        rows.insert(position, (topics.news, 0, b"not json at all: " + ident.encode(), kafka_time))
        expected_time[ident] = epoch_ms(kafka_time)
    produce(fp_settings, rows)
    return expected_time


def identity(message) -> str:
    try:
        return json.loads(message.value)["id"]
    except ValueError:
        return message.value.decode().rsplit(" ", 1)[-1]


@pytest.mark.parametrize("start_min,end_min", [(40, 70), (0, 5), (-30, 400), (95, 200), (60, 60.001)])
def test_selects_exactly_the_event_time_range_across_skewed_partitions(fp_settings, topics, skewed_inputs,
                                                                       start_min, end_min):
    start, end = T0 + timedelta(minutes=start_min), T0 + timedelta(minutes=end_min)
    messages, stats = select(fp_settings, topics, start, end, disorder_s=300)
    expected = {i for i, t in skewed_inputs.items() if epoch_ms(start) <= t < epoch_ms(end)}
    got = [identity(m) for m in messages]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert [m.event_ms for m in messages] == [skewed_inputs[i] for i in got]
    assert messages == sorted(messages)      # (event time, topic, partition, offset): ties broken by topic
    assert stats.disorder_exceeded == 0 and stats.selected == len(expected)


def test_boundaries_inside_batches_are_inclusive_then_exclusive(fp_settings, topics, skewed_inputs):
    """T1 and T2 are the exact event times of two messages in the middle of record batches."""
    ordered = sorted(skewed_inputs.items(), key=lambda kv: kv[1])
    first_in, first_out = ordered[400], ordered[900]
    start = datetime.fromtimestamp(first_in[1] / 1000, tz=timezone.utc)
    end = datetime.fromtimestamp(first_out[1] / 1000, tz=timezone.utc)
    messages, _ = select(fp_settings, topics, start, end, disorder_s=300)
    got = {identity(m) for m in messages}
    assert first_in[0] in got and first_out[0] not in got
    assert got == {i for i, t in skewed_inputs.items() if first_in[1] <= t < first_out[1]}


def test_search_skips_what_precedes_the_range(fp_settings, topics, skewed_inputs):
    """The lower bound comes from a binary search over offsets (a few fetches), not from reading everything; so
    does the progress total's upper bound, which stays near the selection's size rather than the topic's."""
    messages, stats = select(fp_settings, topics, T0 + timedelta(minutes=80), T0 + timedelta(minutes=85), 300,
                             wanted=("news",))
    assert messages
    assert all(offset > 150 for name, offset in stats.start_offsets.items() if name.endswith(("[0]", "[3]")))
    assert stats.read < 400       # of 1202 news messages
    assert stats.probes < 120     # both bounds, 4 partitions
    assert abs(stats.candidates - len(messages)) <= 2 * 4 * NEIGHBOURS    # two boundaries, found in 4 partitions


def test_disorder_beyond_the_bound_is_counted_and_still_replayed(fp_settings, topics):
    rows = [(topics.news, 0, news(f"m{i}", T0 + timedelta(minutes=i)), T0 + timedelta(minutes=i)) for i in range(60)]
    late = T0 + timedelta(minutes=33, seconds=30)          # written after 38: five minutes out of order
    rows.insert(39, (topics.news, 0, news("late", late), late))
    produce(fp_settings, rows)
    messages, stats = select(fp_settings, topics, T0 + timedelta(minutes=30), T0 + timedelta(minutes=45), 60,
                             wanted=("news",))
    assert "late" in {identity(m) for m in messages}
    assert stats.disorder_exceeded == 1
    exact, exact_stats = select(fp_settings, topics, T0 + timedelta(minutes=30), T0 + timedelta(minutes=45), 600,
                                wanted=("news",))
    assert exact == sorted(exact) and exact_stats.disorder_exceeded == 0
    assert {identity(m) for m in exact} == {identity(m) for m in messages}


OUTLIERS = {      # one record among 1001 six seconds apart: where it goes, what it is
    "published long before, in the middle of the range": (500, lambda t, at: (t.news, 0, news("x", T0.replace(year=2001)), at)),
    "published long after, in the range": (350, lambda t, at: (t.news, 0, news("x", T0.replace(year=2062)), at)),
    "malformed, stamped long after, in the range": (400, lambda t, at: (t.news, 0, b"not json",
                                                                        T0.replace(year=2062))),
}


@pytest.mark.parametrize("case", list(OUTLIERS))
def test_one_record_far_off_in_time_neither_ends_nor_starts_the_selection(fp_settings, topics, tmp_path, case):
    """Before, one record whose time was >= to + D ended its partition, and one older than from - D that the start
    search happened to probe made reading start after it: most of the range was silently dropped."""
    position, outlier = OUTLIERS[case]
    rows = [(topics.news, 0, news(f"m{i}", T0 + timedelta(seconds=6 * i)), T0 + timedelta(seconds=6 * i))
            for i in range(1001)]
    rows[position] = outlier(topics, rows[position][3])
    produce(fp_settings, rows)
    start, end = T0 + timedelta(minutes=30), T0 + timedelta(minutes=60)     # records 300 to 599
    messages, stats = select(fp_settings, topics, start, end, 900, wanted=("news",))
    assert {identity(m) for m in messages} == {f"m{i}" for i in range(300, 600) if i != position}
    assert stats.outliers == (0 if "malformed" in case else 1)
    assert stats.stopped_early == 1 and stats.read < 700

    code, out, err = finpulse(write_config(fp_settings, tmp_path / "fp.toml"), "export", "--from", format_time(start),
                              "--to", format_time(end), "--topics", "news", "--out", str(tmp_path / "archive"),
                              "--max-disorder", "15m", "--no-progress")
    assert code == 0 and "exported 299 message(s)" in out, out + err
    assert ("1 record(s) had times far from their neighbours'" in err) == ("malformed" not in case), err


@pytest.mark.parametrize("mode", ["blackhole", "refuse"])
def test_a_broker_gone_while_reading_a_selection_raises_naming_the_partition_and_the_setting(tmp_path, mode):
    """With its broker cut off (``tests.network``), a selection read empty fetches and waited for ever: a replay or an
    export never ended. It now raises ``TimeoutError`` once no record came for ``[kafka] delivery_timeout_s``."""
    with broker_behind_link(tmp_path / "broker.log") as (link, broker):
        settings = isolated_settings(broker.bootstrap_servers, tmp_path, kafka={"delivery_timeout_s": 3})
        names = TopicNames(settings.kafka.topic_prefix)
        produce(settings, [(names.news, i % 4, news(f"n{i}", T0 + timedelta(seconds=i)), None) for i in range(400)])

        async def read_cut_off() -> BaseException:
            async with KafkaSelection(settings.kafka, {names.news: "news"}, epoch_ms(T0),
                                      epoch_ms(T0 + timedelta(hours=1)), 0) as selection:
                link.cut(mode)     # planned, and sought to the range: none of its records fetched yet
                with pytest.raises(TimeoutError) as stalled:
                    async for _ in selection:
                        pass
                return stalled.value

        error = asyncio.run(asyncio.wait_for(read_cut_off(), 60))    # (wait_for's own timeout has no message)
    assert f"served none of the records of {names.news}[" in str(error), repr(error)
    assert "[kafka] delivery_timeout_s" in str(error)


def test_the_span_a_selection_vouches_for_stops_where_messages_may_still_come_or_may_be_deleted():
    """``complete_span``: the part of a range that no message written later, and none deleted by retention, can
    belong to (D = 1 minute here). tansu cannot delete records, so the retention case is checked here alone."""
    start, end = epoch_ms(T0), epoch_ms(T0 + timedelta(hours=1))
    whole = complete_span(start, end, MINUTE_MS, end + 5 * MINUTE_MS, {})
    assert whole == (start, end)
    # Reading began 10 minutes before the range's end: what is written from then on is at most D older.
    assert complete_span(start, end, MINUTE_MS, end - 10 * MINUTE_MS, {}) == (start, end - 11 * MINUTE_MS)
    # A partition's records before offset 500 are gone; its first remaining ones are of 00:20: a deleted record is
    # at most D newer than them.
    deleted = {"news[1]": (500, start + 20 * MINUTE_MS)}
    assert complete_span(start, end, MINUTE_MS, end + MINUTE_MS, deleted) == (start + 21 * MINUTE_MS, end)
    # With no time to go by (nothing readable left), nothing is vouched for; nor when the two ends cross.
    assert complete_span(start, end, MINUTE_MS, end + MINUTE_MS, {"news[1]": (500, None)}) == (end, end)
    assert complete_span(start, end, MINUTE_MS, start + 10 * MINUTE_MS, deleted) == (start + 21 * MINUTE_MS,) * 2


def test_a_partition_whose_oldest_records_are_gone_is_named_and_bounds_what_is_vouched_for(fp_settings, topics,
                                                                                          monkeypatch):
    """News partition 0 holds one message a minute from 00:00; retention has deleted its first 30 (the broker
    reports offset 30 as its beginning: tansu cannot delete records, so only that answer is made up here). A
    selection of [00:10, 00:50) reads what is left, names the partition, and vouches only for the time after its
    first remaining records (00:32, their median) plus the disorder bound."""
    produce(fp_settings, [(topics.news, 0, news(f"n{i}", T0 + timedelta(minutes=i)), T0 + timedelta(minutes=i))
                          for i in range(60)])
    real_beginning_offsets = AIOKafkaConsumer.beginning_offsets

    async def after_retention(self, partitions):
        return {tp: 30 if (tp.topic, tp.partition) == (topics.news, 0) else offset
                for tp, offset in (await real_beginning_offsets(self, partitions)).items()}
    monkeypatch.setattr(AIOKafkaConsumer, "beginning_offsets", after_retention)

    messages, stats = select(fp_settings, topics, T0 + timedelta(minutes=10), T0 + timedelta(minutes=50), 60,
                             wanted=("news",))
    assert [identity(m) for m in messages] == [f"n{i}" for i in range(30, 50)]
    assert stats.deleted == {f"{topics.news}[0]": 30}
    assert (stats.complete_from_ms, stats.complete_to_ms) == (epoch_ms(T0 + timedelta(minutes=33)),
                                                              epoch_ms(T0 + timedelta(minutes=50)))
    assert stats.arriving_from_ms is None
    assert span_warnings(asdict(stats), "they are missing") == [
        f"{topics.news}[0] begins at offset 30: its older records were deleted (retention), and messages of the range "
        f"before {format_time(T0 + timedelta(minutes=33))} may have been among them: they are missing"]
