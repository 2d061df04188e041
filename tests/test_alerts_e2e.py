"""Rolling tables and spike alerts end to end: real tansu broker, real ``finpulse worker`` and ``finpulse simulate``
processes, default [aggregate] and [detect] settings.

- A SIMULATED stream with a negative shock on one topic fires exactly one firing alert for that topic, within one
  window of the shock's start, and a resolved alert (same id) after the shock ends; the same stream without the
  shock fires no alert at all.
- ``kill -9`` of the worker in the middle of its backlog, 300 input messages delivered a second time (as an
  at-least-once producer would), then a restart: the final windows (topic and ticker) are those of an uninterrupted
  run on the same input, and both equal the pure ``WindowAggregator`` over the same records (so the tables were
  recovered from their changelog and no message was counted twice).
- A broker outage (15 s, connections refused) in the middle of the backlog leaves the same final windows, the same
  worker carrying on.
- A SIGTERM in the middle of the backlog (batches are publishing trends when it lands) and a restart leave the same
  final windows: a stopping worker finishes each batch's table writes before Faust acks it.
- A worker stopped and started with another model recovers its detection state and relearns the baselines of the
  keys the old model's windows set.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from models.baseline import KeywordBaselineScorer
from stream.aggregate import AggregateSettings, WindowAggregator
from stream.config import Settings
from stream.kafka_io import RecordSender
from stream.input_watermark import BACKLOG_HEADER
from stream.records import (AlertRecord, ScoredRecord, TrendRecord, format_time, parse_input, parse_time,
                            severity_rank)
from stream.simulate import Shock, generate, shock_truth
from stream.topics import TopicNames, ensure_topics
from tests.network import BrokerLink, broker_behind_link
from tests.procs import (consumer_lag, isolated_settings, json_values, read_all, run_finpulse, start_worker,
                         wait_for_records, wait_until_consumed, with_section)

pytestmark = pytest.mark.slow

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)     # minute-aligned, like the windows
RATE = 8.0
SHOCK = Shock("Energy | Oil", at_s=13 * 60, duration_s=240, strength=0.85, volume_factor=3.0)
TRUTH = shock_truth(START, SHOCK)
STREAM_END = TRUTH.end + timedelta(minutes=9)
LATENESS = timedelta(seconds=AggregateSettings().allowed_lateness_s)


def isolated(settings: Settings, tmp_path, tag: str) -> Settings:
    """``settings`` with a topic prefix, app id and data dir of its own (for a second run in one test)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    out = settings.with_overrides({"kafka": {"topic_prefix": prefix},
                                   "worker": {"app_id": f"{prefix}-worker", "data_dir": str(tmp_path / tag)}})
    names = TopicNames(prefix)
    ensure_topics(out.kafka, names.all(), names.compacted())
    return out


def simulate(settings: Settings, tmp_path, count: int, *extra: str) -> None:
    """``finpulse simulate`` (as fast as it can) from START at RATE."""
    code, output = run_finpulse(settings, "simulate", "--count", str(count), "--max-speed", "--rate", str(RATE),
                                "--start", format_time(START), *extra, log_dir=tmp_path, name="simulate")
    assert code == 0, output[-3000:]


def finals(records) -> dict[str, TrendRecord]:
    """Final trends by window id (a re-emitted duplicate is the same window)."""
    out = {}
    for value in json_values(records):
        trend = TrendRecord.from_dict(value)
        if trend.final:
            out[trend.window_id] = trend
    return out


def shock_topic_done(records) -> bool:
    """The shock topic's 1-minute windows have closed up to well after the shock (time to resolve)."""
    return any(t.key_type == "topic" and t.key == TRUTH.topic and t.window_s == 60
               and t.window_start >= TRUTH.end + timedelta(minutes=6) for t in finals(records).values())


def run_stream(settings: Settings, tmp_path, *simulate_args: str) -> list[AlertRecord]:
    count = int((STREAM_END - START).total_seconds() * RATE)
    with start_worker(settings, tmp_path):
        simulate(settings, tmp_path, count, "--shock-topic", SHOCK.topic, "--shock-at", str(SHOCK.at_s),
                 "--shock-duration", str(SHOCK.duration_s), "--shock-strength", str(SHOCK.strength), *simulate_args)
        names = TopicNames(settings.kafka.topic_prefix)
        wait_for_records(settings, names.trends, shock_topic_done, timeout=300,
                         what="the shock topic's windows closed past the shock")
        wait_until_consumed(settings, names.trends)     # the detector has judged those windows
        return [AlertRecord.from_dict(v) for v in json_values(read_all(settings, names.alerts))]


def test_a_negative_shock_fires_one_alert_for_its_topic_and_resolves(fp_settings, tmp_path):
    alerts = run_stream(fp_settings, tmp_path)
    topic_alerts = [a for a in alerts if a.key_type == "topic"]
    # One episode: its firing, then perhaps escalations as the shock deepens (each to a higher severity), its resolve.
    kinds = [(a.key, a.event_kind) for a in topic_alerts]
    assert [k for k in kinds if k[1] != "escalation"] == [(TRUTH.topic, "firing"), (TRUTH.topic, "resolved")], \
        [a.summary for a in topic_alerts]
    assert kinds[0][1] == "firing" and kinds[-1][1] == "resolved", [a.summary for a in topic_alerts]
    severities = [severity_rank(a.severity) for a in topic_alerts if a.status == "firing"]
    assert severities == sorted(set(severities)) and len({a.id for a in topic_alerts}) == 1
    (alert,) = [a for a in topic_alerts if a.event_kind == "firing"]
    window = timedelta(seconds=alert.window_s)
    assert TRUTH.start - window <= alert.window_start <= TRUTH.start + window
    assert alert.observed["bearish_share"] > alert.baseline["bearish_share"] + 0.2
    assert alert.messages and all(m["id"] and m["text"] and m["sentiment_score"] < 0 for m in alert.messages)
    resolved = next(a for a in topic_alerts if a.status == "resolved")
    assert resolved.id == alert.id and resolved.window_start >= TRUTH.end
    # Ticker alerts may only concern the shocked topic's companies (their volume rises with it).
    assert {a.key for a in alerts if a.key_type == "ticker"} <= set(TRUTH.tickers)


def test_the_same_stream_without_the_shock_fires_nothing(fp_settings, tmp_path):
    alerts = run_stream(fp_settings, tmp_path, "--no-shock")
    assert alerts == [], [a.summary for a in alerts]


def test_a_worker_restarted_with_another_model_relearns_each_baseline_from_its_saved_state(fp_settings, tmp_path):
    """A deploy: the worker stopped, then started with another model. The detection state it recovers names the
    model that scored each key's windows, so the new model's first windows relearn each baseline's level rather than
    being judged against the old model's (two models disagree on the same messages as much as a shock). A worker
    that recovered no state would learn every key afresh and say nothing of the change."""
    from models.modeling import FinPulseClassifier, save_model
    from tests.models_fixtures import make_tiny_base
    base = str(make_tiny_base(tmp_path / "tiny-bert"))
    version = save_model(FinPulseClassifier.from_base(base, seed=3), base, tmp_path / "model", base_model=base,
                         recipe="test", max_length=48)
    settings = isolated(fp_settings, tmp_path, "deploy")
    names = TopicNames(settings.kafka.topic_prefix)
    switch = START + timedelta(minutes=8)

    def topic_windows_closed_from(start):
        return lambda records: any(t.key_type == "topic" and t.window_start >= start for t in finals(records).values())
    with start_worker(settings, tmp_path, "worker-baseline") as worker:
        simulate(settings, tmp_path, int((switch - START).total_seconds() * RATE), "--no-shock")
        wait_for_records(settings, names.trends, topic_windows_closed_from(switch - timedelta(minutes=3)),
                         timeout=300, what="the first model's windows closed")
        wait_until_consumed(settings, names.trends)     # the detector has judged them and saved its state
        assert worker.stop() == 0, worker.tail()
    old = KeywordBaselineScorer.model_version
    assert "learned again" not in worker.output()

    deployed = with_section(settings, "worker", scorer="model", model_dir=str(tmp_path / "model"), device="cpu")
    with start_worker(deployed, tmp_path, "worker-model") as worker:
        simulate(settings, tmp_path, int(4 * 60 * RATE), "--no-shock", "--seed", "2", "--start", format_time(switch))
        wait_for_records(settings, names.trends, topic_windows_closed_from(switch + timedelta(minutes=1)),
                         timeout=300, what="the new model's windows closed")
        wait_until_consumed(settings, names.trends)
        assert worker.stop() == 0, worker.tail()
    relearned = re.findall(rf"topic (.+?) \(60s windows\): scored by {re.escape(version)}, not {re.escape(old)}: its "
                           r"baseline's level is learned again", worker.output())
    judged_before = {t.key for t in finals(read_all(settings, names.trends)).values()
                     if t.key_type == "topic" and t.window_start < switch - timedelta(minutes=3)}
    assert relearned and set(relearned) <= judged_before, worker.tail()


# ---------------------------------------------------------------- kill -9 and restart

KILL_COUNT = 4000     # 8 minutes of event time: enough windows to close, small enough for a busy machine
FIRST_PART = 2400     # the killed run gets this much first; after the kill, a redelivery and then the rest
REDELIVERED = slice(FIRST_PART - 160, FIRST_PART)   # the first part's last 20 s: their windows are still open


def simulated_input() -> list:
    """What ``finpulse simulate --no-shock`` would produce with the same arguments (the generator is deterministic)."""
    return list(generate(seed=7, start=START, rate=RATE, count=KILL_COUNT, shock=None))


def produce(settings: Settings, messages) -> None:
    """Messages to the input topics, keyed by id like ``finpulse simulate``; a message produced twice is an
    at-least-once redelivery (same id, new offset)."""
    names = TopicNames(settings.kafka.topic_prefix)

    async def send_all():
        async with RecordSender(settings.kafka, client_id="test-input") as sender:
            for m in messages:
                await sender.send(names.input_for(m.kind), m.value(),
                                  key=m.id.encode(), event_time=m.event_time)

    asyncio.run(send_all())


def expected_final_trends(settings: Settings) -> dict[str, TrendRecord]:
    """The final trends of the pure aggregator over the same simulated input, by window id."""
    return pure_windows(settings)[0]


def pure_windows(settings: Settings) -> tuple[dict[str, TrendRecord], dict[str, TrendRecord]]:
    """(final trends, trends of the windows still open at the end) by window id: the pure aggregator over the same
    simulated input, scored by the same (deterministic) scorer."""
    items = [parse_input(m.value(), m.kind, settings.worker.max_text_chars) for m in simulated_input()]
    scorer = KeywordBaselineScorer()
    predictions = scorer.score([item.text for item in items])
    records = [ScoredRecord(id=item.id, kind=item.kind, event_time=item.event_time, text=item.text,
                            topic=p.topic, topic_confidence=p.topic_confidence, sentiment=p.sentiment,
                            sentiment_score=p.sentiment_score, tickers=item.tickers,
                            model_version=scorer.model_version, scored_at=START)
               for item, p in zip(items, predictions)]
    config = settings.section("aggregate", AggregateSettings)
    final, still_open = {}, {}
    for key_type in ("topic", "ticker"):
        aggregator = WindowAggregator(config, key_type)
        final.update({t.window_id: t for t in aggregator.feed(records).final})
        still_open.update({t.window_id: t for key, state in aggregator.states.items()
                           for t in aggregator.open_trends(key, state)})
    return final, still_open


def comparable(trend: TrendRecord) -> dict:
    data = trend.to_dict()
    del data["emitted_at"]
    data["mean_score"] = round(data["mean_score"], 5)    # summation order may differ in the last bit
    data["most_negative"] = [ref["id"] for ref in data["most_negative"]]   # excerpts are cut by the scorer
    return data


def live_final_trends(settings: Settings, tmp_path, expected: dict[str, TrendRecord],
                      kill_after: int = 0, graceful: bool = False,
                      outage: tuple[BrokerLink, str] | None = None) -> tuple[dict[str, TrendRecord], str]:
    """(final trends by window id, the last worker's output) of one live run over the simulated input, which waits
    as a backlog when the worker starts. With ``kill_after``, the worker is killed (-9; SIGTERM when ``graceful``)
    once that many windows closed, part of the input is delivered again, the rest of the input arrives, and a new
    worker takes over. With ``outage`` (the link the broker is reached through, and how to cut it), the broker is
    unreachable for 15 s instead, and the same worker carries on."""
    names = TopicNames(settings.kafka.topic_prefix)
    messages = simulated_input()
    produce(settings, messages[:FIRST_PART] if kill_after else messages)
    done = lambda records: set(expected) <= set(finals(records))   # noqa: E731
    worker = start_worker(settings, tmp_path, "worker")
    try:
        if kill_after:
            seen = wait_for_records(settings, names.trends, lambda rs: len(finals(rs)) >= kill_after, timeout=300,
                                    what=f"{kill_after} final windows before the kill")
            if outage:
                link, mode = outage
                link.cut(mode)
                time.sleep(15)
                link.restore()
                assert worker.running(), worker.tail()
            elif graceful:
                assert worker.stop() == 0, worker.tail()
            else:
                worker.kill()
            assert not done(seen), "the worker finished before it could be stopped mid-stream"
            produce(settings, messages[REDELIVERED] + messages[FIRST_PART:])
            if not outage:
                worker = start_worker(settings, tmp_path, "worker-restarted")
        try:
            wait_for_records(settings, names.trends, done, timeout=300, what="every expected final window")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{missing_windows(expected, finals(read_all(settings, names.trends)))}\n"
                                 f"committed/end: {consumer_lag(settings, _stream_topics(names))}\n"
                                 f"the worker's log ends:\n{worker.tail(6000)}") from None
    finally:
        worker.stop()
    return finals(read_all(settings, names.trends)), worker.output()


def test_a_backlog_publishes_no_running_figures_of_the_windows_it_closes(fp_settings, tmp_path):
    """Draining a backlog, the worker closes windows seconds after it opens them: their running figures would fill
    finpulse.open-windows for nobody (stream.input_watermark). None is published for a window of the backlog's first
    minutes; once it has drained, each window still open shows its running figures, the pure aggregator's."""
    settings = fp_settings.with_overrides({"worker": {"max_batch": 32},     # a backlog: over 4 x 32 unread
                                           "aggregate": {"windows": ["1m/1m", "5m/1m"], "partial_interval_s": 1}})
    names = TopicNames(settings.kafka.topic_prefix)
    expected, still_open = pure_windows(settings)
    early = {wid for wid, t in expected.items() if t.window_end <= START + timedelta(minutes=3)}
    assert len(early) > 100

    def latest(records) -> dict[str, TrendRecord | None]:
        """The newest record of each window on open-windows (None: its tombstone, the window closed)."""
        return {r.key.decode(): r.value and TrendRecord.from_json(r.value) for r in records}

    def shows_every_open_window(records) -> bool:
        newest = latest(records)
        return all(wid in newest and (newest[wid] is None or comparable(newest[wid]) == comparable(trend))
                   for wid, trend in still_open.items())

    produce(settings, simulated_input())
    with start_worker(settings, tmp_path) as worker:
        wait_for_records(settings, names.trends, lambda records: set(expected) <= set(finals(records)), timeout=300,
                         what="every expected final window")
        try:
            records = wait_for_records(settings, names.open_windows, shows_every_open_window, timeout=120,
                                       what="the running figures of every window left open")
        except AssertionError as exc:
            newest = latest(read_all(settings, names.open_windows))
            raise AssertionError(f"{exc}\n{open_window_differences(still_open, newest)}\n"
                                 f"committed/end: {consumer_lag(settings, _stream_topics(names))}\n"
                                 f"the worker's log ends:\n{worker.tail(6000)}") from None
    published_early = {r.key.decode() for r in records if r.value is not None} & early
    assert not published_early, f"{len(published_early)} of the backlog's {len(early)} early windows were published"
    # The live worker also closes windows the pure one leaves open (quiet keys follow the stream's time), but none
    # that the stream's last message has not passed: those all show their final figures.
    newest, last_event = latest(records), max(m.event_time for m in simulated_input())
    surely_open = [wid for wid, t in still_open.items() if t.window_end + LATENESS > last_event]
    assert len(surely_open) > 50 and all(newest[wid] is not None for wid in surely_open)


def test_a_scorer_at_its_limit_still_publishes_the_running_figures_of_windows_open_by_the_clock(fp_settings,
                                                                                               tmp_path):
    """A burst of news the scorer cannot keep up with (20,000 messages of the last 35 s, far more than 4 batches
    waiting) is not history: the windows it fills are still open by the clock, and their running figures are
    published while the scorer works through the queue. Windows the clock has passed get none until it has."""
    settings = fp_settings.with_overrides({"worker": {"max_batch": 2},      # a queue: over 4 x 2 unread
                                           "aggregate": {"windows": ["1m/1m", "10m/1m"], "partial_interval_s": 1}})
    names = TopicNames(settings.kafka.topic_prefix)
    burst = list(generate(seed=5, start=datetime.now(timezone.utc) - timedelta(seconds=35), rate=600, count=20_000,
                          shock=None))
    produce(settings, burst)
    with start_worker(settings, tmp_path):
        for topic in (names.news, names.comments):
            wait_until_consumed(settings, topic, timeout=300)
        scored = wait_for_records(settings, names.scored, lambda r: len(r) >= len(burst), timeout=120,
                                  what="every message scored")
        time.sleep(2)     # the last partials
        records = read_all(settings, names.open_windows)
    queued = [parse_time(value["scored_at"]) for record, value in zip(scored, json_values(scored))
              if int(dict(record.headers).get(BACKLOG_HEADER, b"0")) > 4 * 2]
    assert len(queued) > len(burst) / 2, f"the scorer kept up ({len(queued)} records scored with a queue)"
    partials = [TrendRecord.from_json(r.value) for r in records if r.value is not None]
    while_queued = [t for t in partials if t.emitted_at < max(queued) - timedelta(seconds=2)]
    assert len(while_queued) > 100, f"{len(while_queued)} of {len(partials)} running figures came while it queued"
    # (emitted_at is read a moment after the schedule's clock)
    assert all(t.window_end + timedelta(seconds=1) > t.emitted_at for t in while_queued)


def missing_windows(expected: dict[str, TrendRecord], got: dict[str, TrendRecord]) -> str:
    """Which expected final windows were not published, by key: the earliest and how many (a failure message)."""
    by_key: dict[str, list[TrendRecord]] = {}
    for wid in sorted(set(expected) - set(got)):
        trend = expected[wid]
        by_key.setdefault(f"{trend.key_type}:{trend.key}", []).append(trend)
    lines = [f"{key}: {len(trends)} window(s) from {min(t.window_start for t in trends):%H:%M:%S}"
             for key, trends in sorted(by_key.items())]
    return f"missing final windows ({sum(len(t) for t in by_key.values())}):\n" + "\n".join(lines)


def open_window_differences(expected: dict[str, TrendRecord], newest: dict[str, TrendRecord | None]) -> str:
    """How the newest running figures of the windows left open differ from the pure aggregator's (a failure
    message): the windows never published, and for the others the fields that differ."""
    never = sorted(wid for wid in expected if wid not in newest)
    lines = [f"never published ({len(never)}): " + ", ".join(f"{expected[w].key_type}:{expected[w].key} {w}"
                                                            for w in never[:20])]
    for wid, trend in sorted(expected.items()):
        got = newest.get(wid)
        if got is None:
            continue
        want, have = comparable(trend), comparable(got)
        fields = {f: (have[f], want[f]) for f in want if have.get(f) != want[f]}
        if fields:
            lines.append(f"{trend.key_type}:{trend.key} {wid} (live, pure): {fields}"[:600])
    return "\n".join(lines[:40])


def _stream_topics(names: TopicNames) -> list[str]:
    return [names.news, names.comments, names.scored, names.scored_by_ticker]


def test_kill_9_and_restart_leaves_the_same_tables_as_an_uninterrupted_run(fp_settings, tmp_path):
    expected = expected_final_trends(fp_settings)
    assert len(expected) > 100
    uninterrupted, _ = live_final_trends(isolated(fp_settings, tmp_path, "uninterrupted"), tmp_path / "a", expected)
    restarted, log = live_final_trends(isolated(fp_settings, tmp_path, "restarted"), tmp_path / "b", expected,
                                       kill_after=len(expected) // 4)
    want = {wid: comparable(t) for wid, t in expected.items()}
    assert {wid: comparable(t) for wid, t in uninterrupted.items()} == want
    assert {wid: comparable(t) for wid, t in restarted.items()} == want
    assert "already applied" in log      # the redelivered messages did reach the tables, and were skipped


def test_sigterm_mid_backlog_and_restart_leaves_the_same_tables(fp_settings, tmp_path):
    """A graceful stop lands while batches are publishing trends: each batch must still reach its table before
    Faust acks it, or its messages would be missing from their windows after the restart."""
    expected = expected_final_trends(fp_settings)
    restarted, _ = live_final_trends(isolated(fp_settings, tmp_path, "sigterm"), tmp_path, expected,
                                     kill_after=len(expected) // 4, graceful=True)
    assert {wid: comparable(t) for wid, t in restarted.items()} == {wid: comparable(t) for wid, t in expected.items()}


def test_a_broker_outage_mid_backlog_leaves_the_same_tables(tmp_path):
    """The broker refuses connections for 15 s while batches are publishing trends and writing tables (some writes
    and commits fail, some batches are consumed again): the final windows are the pure aggregator's, and none
    counts a message twice."""
    with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker):
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path)
        expected = expected_final_trends(settings)
        after, _ = live_final_trends(settings, tmp_path, expected, kill_after=len(expected) // 4,
                                     outage=(link, "refuse"))
    assert {wid: comparable(t) for wid, t in after.items()} == {wid: comparable(t) for wid, t in expected.items()}


def test_a_topic_that_goes_quiet_still_closes_its_window_while_the_stream_moves_on(fp_settings, tmp_path):
    """A bearish minute on one topic, then silence on it while another topic's messages keep arriving: the quiet
    topic's window closes (and could alert) on stream time, not at its own next message."""
    settings = isolated(fp_settings, tmp_path, "quiet")
    names = TopicNames(settings.kafka.topic_prefix)
    quiet, busy = "Energy | Oil", "Fed | Central Banks"

    def scored(i: int, topic: str, second: float) -> ScoredRecord:
        return ScoredRecord(id=f"q{i}", kind="news", event_time=START + timedelta(seconds=second), text=f"m {i}",
                            topic=topic, topic_confidence=0.9, sentiment="bearish", sentiment_score=-0.9,
                            tickers=(), model_version="test", scored_at=START)

    async def send_all():
        async with RecordSender(settings.kafka, client_id="test-scored") as sender:
            for i in range(10):
                await sender.send(names.scored, scored(i, quiet, 5 + 5 * i).to_json(), key=quiet.encode())
            await sender.flush()
            # Longer than IDLE_PARTITION_S of wall clock: wherever the two topics' partitions fall, the quiet one's
            # partition goes idle and follows the busy one's.
            for step in range(80):
                await sender.send(names.scored, scored(100 + step, busy, 60 + 5 * step).to_json(), key=busy.encode())
                await sender.flush()
                await asyncio.sleep(0.5)

    def quiet_window_closed(records) -> bool:
        return any(t.key == quiet and t.window_s == 60 and t.window_start == START for t in finals(records).values())

    with start_worker(settings, tmp_path):
        asyncio.run(send_all())
        records = wait_for_records(settings, names.trends, quiet_window_closed, timeout=60,
                                   what="the quiet topic's 09:00 window closed")
    closed = next(t for t in finals(records).values() if t.key == quiet and t.window_s == 60)
    assert closed.count == 10 and closed.bearish_share == 1.0
    # The trends topic holds closed windows only; the open ones' running figures went to open-windows, keyed by
    # window id, and the window's closing wrote a tombstone there after them (compaction then drops them all).
    assert all(TrendRecord.from_dict(v).final for v in json_values(read_all(settings, names.trends)))
    on_open = [r for r in read_all(settings, names.open_windows) if r.key == closed.window_id.encode()]
    assert len(on_open) >= 2 and on_open[-1].value is None, [r.value for r in on_open]
    running = [TrendRecord.from_json(r.value) for r in on_open[:-1]]
    assert all(not t.final and 0 < t.count <= 10 for t in running)


def test_an_open_window_is_republished_unchanged_and_by_a_restarted_worker(fp_settings, tmp_path):
    """A dashboard starting up reads only the last ``partial_refresh_s`` of open windows, so each one must appear
    there though nothing changes it: refreshed while it stays open, and republished by a restarted worker, which
    learns of it from the recovered table."""
    settings = fp_settings.with_overrides({"aggregate": {"partial_interval_s": 1, "partial_refresh_s": 2}})
    names = TopicNames(settings.kafka.topic_prefix)
    key = "Energy | Oil"
    window_id = f"topic:{key}:60:{format_time(START)}".encode()

    async def send_all():
        async with RecordSender(settings.kafka, client_id="test-scored") as sender:
            for i in range(3):
                record = ScoredRecord(id=f"r{i}", kind="news", event_time=START + timedelta(seconds=5 + 5 * i),
                                      text=f"m {i}", topic=key, topic_confidence=0.9, sentiment="bearish",
                                      sentiment_score=-0.9, tickers=(), model_version="test", scored_at=START)
                await sender.send(names.scored, record.to_json(), key=key.encode())

    def published(records) -> list[TrendRecord]:
        return [TrendRecord.from_json(r.value) for r in records if r.key == window_id and r.value is not None]

    with start_worker(settings, tmp_path, "worker"):
        asyncio.run(send_all())
        # The window's figures with all three messages, published once and then refreshed (unchanged) twice.
        complete = lambda rs: [t for t in published(rs) if t.count == 3]   # noqa: E731
        wait_for_records(settings, names.open_windows, lambda rs: len(complete(rs)) >= 3, timeout=60,
                         what="the window published, then refreshed twice")
    restarted_at = datetime.now(timezone.utc)
    with start_worker(settings, tmp_path, "worker-restarted"):
        since_restart = lambda rs: [t for t in published(rs) if t.emitted_at > restarted_at]   # noqa: E731
        again = since_restart(wait_for_records(settings, names.open_windows, since_restart, timeout=60,
                                               what="the window published by the restarted worker"))
    assert again[0].count == 3


def test_windows_a_worker_takes_over_in_a_rebalance_close_though_their_keys_stay_quiet(fp_settings, tmp_path):
    """Two workers share the partitions. Each topic gets a minute of messages and one a minute and a half later,
    which closes the first minute once the close grace has passed; worker a's grace is an hour, so its topics'
    windows are still waiting when it is killed. Worker b takes a's partitions over in the rebalance and must close
    them, though those topics never see another message: b has to learn about them from the recovered table."""
    from models.labels import TOPICS
    names = TopicNames(fp_settings.kafka.topic_prefix)
    labels = list(TOPICS[:12])      # spread over the partitions: some are a's, some b's

    def scored(label: str, i: int, second: float) -> ScoredRecord:
        return ScoredRecord(id=f"{label}-{i}", kind="news", event_time=START + timedelta(seconds=second),
                            text=f"m {i}", topic=label, topic_confidence=0.9, sentiment="bearish",
                            sentiment_score=-0.5, tickers=(), model_version="test", scored_at=START)

    async def send_all():
        async with RecordSender(fp_settings.kafka, client_id="test-scored") as sender:
            for label in labels:
                for i, second in enumerate([5, 20, 35, 50, 100]):
                    await sender.send(names.scored, scored(label, i, second).to_json(), key=label.encode())

    def closed_labels(records) -> set[str]:
        return {t.key for t in finals(records).values() if t.window_s == 60 and t.window_start == START}

    slow_to_close = fp_settings.with_overrides({"aggregate": {"close_grace_s": 3600}})
    quick_to_close = fp_settings.with_overrides({"aggregate": {"close_grace_s": 1}})
    a = start_worker(slow_to_close, tmp_path, "worker-a")
    try:
        with start_worker(quick_to_close, tmp_path, "worker-b") as b:
            a.wait_for("Worker ready", count=2, timeout=90)      # a rebalanced to share with b
            asyncio.run(send_all())
            wait_until_consumed(fp_settings, names.scored)
            # b's own topics close within a tick or two; a's wait out its hour.
            wait_for_records(fp_settings, names.trends, lambda rs: bool(closed_labels(rs)), timeout=30,
                             what="b closed its own topics' first minute")
            time.sleep(3)
            waiting_on_a = set(labels) - closed_labels(read_all(fp_settings, names.trends))
            assert waiting_on_a, "every topic fell on b's partitions: the test cannot tell a takeover from b's own"
            readies = b.output().count("Worker ready")
            a.kill()
            b.wait_for("Worker ready", count=readies + 1, timeout=90)     # b has a's partitions now
            records = wait_for_records(fp_settings, names.trends, lambda rs: closed_labels(rs) >= set(labels),
                                       timeout=60, what="every topic's first minute closed after the takeover")
    finally:
        a.stop()
    assert waiting_on_a and closed_labels(records) == set(labels)
    for trend in finals(records).values():
        if trend.window_s == 60 and trend.window_start == START:
            assert trend.count == 4 and trend.bearish_share == 1.0, trend
