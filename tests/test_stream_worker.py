"""The scoring worker end to end: real ``finpulse worker`` and ``finpulse simulate`` processes on the real tansu
broker. Every message is scored (at least once), bad input is dead-lettered with its reason, a ``kill -9`` loses
nothing, and two workers share the work."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from aiokafka import AIOKafkaProducer

from models.baseline import NoopScorer
from models.interface import Prediction, failed
from stream.app import Scoring, SourceMessage, _continued, deliver, finish_batch
from stream.input_watermark import read_stamp
from stream.kafka_io import RecordSender
from stream.records import DeadLetter, epoch_ms, format_time
from stream.simulate import Shock, SimMessage, generate
from stream.topics import TopicNames
from stream.broker import EmbeddedBroker, free_port
from tests.exposition import probe, scrape
from tests.network import broker_behind_link
from tests.procs import (WORKER_READY, consumer_lag, isolated_settings, json_values, read_all, run_finpulse,
                         start_finpulse, start_worker, until_ids, wait_for_records, wait_until_consumed, with_section)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
BASELINE_VERSION = "baseline-keywords-1"


def simulated(seed: int, count: int, rate: float = 50.0, **kw) -> list[SimMessage]:
    return list(generate(seed=seed, start=T0, rate=rate, count=count, shock=Shock(), **kw))


def simulate_args(seed: int, count: int, rate: float = 50.0) -> list[str]:
    return ["simulate", "--seed", str(seed), "--count", str(count), "--rate", str(rate), "--start", format_time(T0)]


async def produce(settings, topics, messages: list[SimMessage], extra: list[tuple[str, bytes | None]] = ()) -> None:
    async with RecordSender(settings.kafka) as sender:
        for m in messages:
            await sender.send(topics.input_for(m.kind), m.value(), key=m.id.encode() if m.id else None, event_time=m.event_time)
        for topic, value in extra:
            await sender.send(topic, value, key=b"extra")


def check_scored(records, expected: dict[str, SimMessage]) -> None:
    """Every expected id scored with its event time (field and Kafka timestamp), the model version, and the topic
    label as key."""
    for record in records:
        value = json.loads(record.value)
        message = expected[value["id"]]
        assert value["event_time"] == format_time(message.event_time)
        assert record.timestamp_ms == epoch_ms(message.event_time)
        assert value["model_version"] == BASELINE_VERSION
        assert record.key == value["topic"].encode()
        assert value["kind"] == message.kind and -1 <= value["sentiment_score"] <= 1
    assert {json.loads(r.value)["id"] for r in records} == set(expected)


@pytest.mark.slow
def test_ten_thousand_simulated_messages_are_all_scored(fp_settings, topics, tmp_path):
    expected = {m.id: m for m in simulated(seed=21, count=10_000)}
    with start_worker(fp_settings, tmp_path) as worker:
        code, out = run_finpulse(fp_settings, *simulate_args(21, 10_000), "--max-speed", log_dir=tmp_path)
        assert code == 0, out
        scored = wait_for_records(fp_settings, topics.scored, until_ids(expected), timeout=240,
                                  what="all 10,000 ids scored")
        assert worker.stop() == 0, worker.tail()           # SIGTERM: a clean exit
    check_scored(scored, expected)
    assert len(scored) == 10_000                            # no failure happened, so no redelivery either
    by_ticker = read_all(fp_settings, topics.scored_by_ticker)
    per_record = Counter()
    for record in by_ticker:
        value = json.loads(record.value)
        assert record.key.decode() in value["tickers"]
        per_record[value["id"]] += 1
    assert per_record == Counter({r["id"]: len(r["tickers"]) for r in json_values(scored) if r["tickers"]})
    assert "score agent stopped: scored 10000; dead-lettered 0" in worker.output()
    # Scored while input partitions still had a backlog, records carry how far the slowest of those was read
    # (stream.input_watermark), never past the newest event time of the input.
    # How many messages waited unread is stamped beside it: a backlog of 10,000 starts with thousands.
    stamps = [read_stamp(r.headers) for r in scored + by_ticker]
    newest = max(epoch_ms(m.event_time) for m in expected.values())
    assert any(s.watermark_ms is not None for s in stamps), "a backlog of 10,000 was read without an input watermark"
    assert all(s.watermark_ms <= newest for s in stamps if s.watermark_ms is not None)
    assert max(s.backlog for s in stamps) > 4 * fp_settings.worker.max_batch


@pytest.mark.slow
def test_a_worker_scoring_with_a_model_and_tokenizer_processes(fp_settings, topics, tmp_path):
    """The GPU configuration's moving parts on a CPU: a trained-model scorer whose texts are tokenized by worker
    processes spawned inside the Faust worker. Every message is scored with the model's version stamped, and
    SIGTERM still ends the worker cleanly (its tokenizer processes with it)."""
    from models.modeling import FinPulseClassifier, save_model
    from tests.models_fixtures import make_tiny_base
    base = str(make_tiny_base(tmp_path / "tiny-bert"))
    version = save_model(FinPulseClassifier.from_base(base, seed=3), base, tmp_path / "model", base_model=base,
                         recipe="test", max_length=48)
    settings = with_section(fp_settings, "worker", scorer="model", model_dir=str(tmp_path / "model"), device="cpu",
                            tokenizer_processes=2)
    expected = {m.id: m for m in simulated(seed=5, count=600)}
    with start_worker(settings, tmp_path) as worker:
        asyncio.run(produce(settings, topics, list(expected.values())))
        scored = wait_for_records(settings, topics.scored, until_ids(expected), timeout=180,
                                  what="all 600 ids scored by the model")
        tokenizers = spawned_descendants(worker.proc.pid)
        assert len(tokenizers) == 2, "the scorer's tokenizer processes are not running"
        assert worker.stop() == 0, worker.tail()
    assert "tokenizer processes unavailable" not in worker.output()
    # [worker] cpu_precision = auto: bf16 autocast where this CPU has bfloat16 instructions, else float32.
    from models.precision import resolve_cpu_precision
    runs = "bf16 autocast" if resolve_cpu_precision("auto") == "bf16" else "float32"
    assert f"loaded model {version} from {tmp_path / 'model'} (on cpu, {runs})" in worker.output()
    assert {json.loads(r.value)["model_version"] for r in scored} == {version}
    assert {json.loads(r.value)["id"] for r in scored} == set(expected)
    assert "dead-lettered 0" in worker.output()


def spawned_descendants(pid: int) -> list[str]:
    """Process ids of ``pid``'s descendants started by multiprocessing's spawn (from /proc)."""
    import pathlib
    parents, commands = {}, {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[stat.parent.name] = stat.read_text().rsplit(")", 1)[1].split()[1]
            commands[stat.parent.name] = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
    found, frontier = [], {str(pid)}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += frontier
    return [p for p in found if b"spawn_main" in commands.get(p, b"")]


def scored_count(settings, topics) -> int:
    return len(read_all(settings, topics.scored))


def unscored(settings, topics) -> str:
    """Where the input messages that have no scored record sit (a failure message)."""
    scored = {json.loads(r.value)["id"] for r in read_all(settings, topics.scored)}
    where = sorted(f"{r.topic.rsplit('.', 1)[-1]}[{r.partition}]@{r.offset}" for topic in (topics.news, topics.comments)
                   for r in read_all(settings, topic) if r.key is not None and r.key.decode() not in scored)
    return f"{len(where)} input message(s) not scored: {', '.join(where[:30])}{' ...' if len(where) > 30 else ''}"


@pytest.mark.parametrize("signals", [1, 2])
def test_a_worker_whose_broker_went_away_still_stops(tmp_path, signals):
    """SIGTERM to a worker whose broker is gone: Faust's stop waits for outputs the broker never takes (for a
    minute, or for ever). It ends ``[worker] stop_timeout_s`` after the signal, or at a second signal, with exit code 70
    and the reason; nothing was committed, so a restart would score that batch again."""
    worker = None
    try:
        with EmbeddedBroker(log_file=tmp_path / "tansu.log") as own_broker:
            settings = isolated_settings(own_broker.bootstrap_servers, tmp_path, worker={"stop_timeout_s": 4})
            topics = TopicNames(settings.kafka.topic_prefix)
            worker = start_worker(settings, tmp_path)
            asyncio.run(produce(settings, topics, simulated(seed=5, count=2_000)))
            wait_for_records(settings, topics.scored, lambda rs: len(rs) >= 100, timeout=60, what="100 scored")
        time.sleep(1)
        signalled = time.monotonic()
        for _ in range(signals):
            os.killpg(worker.pid, signal.SIGTERM)
            time.sleep(0.5)
        code = worker.wait(timeout=40)
        took = time.monotonic() - signalled
    finally:
        if worker is not None:
            worker.kill()
    why = "SIGTERM again while stopping" if signals == 2 else "still stopping 4s after SIGTERM (is the broker reachable?)"
    assert code == 70 and f"{why}: exiting now, the batch in hand not committed" in worker.output(), worker.tail()
    assert took < (3 if signals == 2 else 15), f"stopped {took:.1f}s after the first signal"


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_a_worker_rides_out_a_broker_outage_and_scores_every_message(tmp_path, outage):
    """The broker unreachable for 15 s mid-stream, as a broker restart (connections reset, new ones refused) or a
    network partition (nothing passes, nothing is refused): the worker keeps running, /readyz says why it is not
    ready while the broker is gone, and once it is back every message is scored. The clients' retries show as a
    few lines and a summary (about 1,100 lines in such an outage before ``stream.client_logs``)."""
    web_port = free_port()
    messages = simulated(seed=7, count=3_000)
    with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker):
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path, worker={"web_port": web_port})
        topics = TopicNames(settings.kafka.topic_prefix)
        with start_worker(settings, tmp_path) as worker:
            asyncio.run(produce(settings, topics, messages[:1_500]))
            wait_for_records(settings, topics.scored, lambda rs: len(rs) >= 100, timeout=60, what="100 scored")
            logged_before = len(worker.output().splitlines())
            link.cut(outage)
            deadline, readiness = time.monotonic() + 15, []
            while time.monotonic() < deadline:
                readiness.append(probe(f"http://127.0.0.1:{web_port}/readyz", timeout=2))
                time.sleep(1)
            logged_during = worker.output().splitlines()[logged_before:]
            link.restore()
            assert worker.running(), worker.tail()
            asyncio.run(produce(settings, topics, messages[1_500:]))
            scored = wait_for_records(settings, topics.scored, until_ids({m.id for m in messages}), timeout=120,
                                      what="every id scored after the outage")
            # Gone longer than the session timeout, the worker rejoins its group once the broker is back: /readyz
            # says "rebalancing" for the seconds that takes, which may outlast the scoring above.
            deadline, after = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                after = probe(f"http://127.0.0.1:{web_port}/readyz", timeout=2)
                if after[0] == 200:
                    break
                time.sleep(0.5)
            assert after[0] == 200, after
            assert worker.stop() == 0, worker.tail()
    not_ready = [body["checks"]["broker"] for status, body in readiness if status == 503]
    assert not_ready and not not_ready[-1]["ok"], readiness
    print(f"{outage}: /readyz {[status for status, _ in readiness]}, last reason: {not_ready[-1]['detail']}; "
          f"{len(logged_during)} lines logged during the outage")
    check_scored(scored, {m.id: m for m in messages})
    assert len(logged_during) < 100, f"{len(logged_during)} lines logged during the outage:\n" + "\n".join(logged_during[:20])
    if outage == "refuse":      # a retry storm; a partition's requests just wait
        assert "more like it in the last" in worker.output(), worker.tail()


@pytest.mark.slow
def test_sigterm_and_kill_9_mid_stream_then_restart_scores_every_message(fp_settings, topics, tmp_path):
    """A live stream (paced by the wall clock) while the worker is stopped with SIGTERM, restarted, killed with
    kill -9, and restarted again: every message ends up scored (duplicates allowed)."""
    count = 12_000
    expected = {m.id: m for m in simulated(seed=22, count=count, rate=500)}
    workers = [start_worker(fp_settings, tmp_path, "worker-1")]
    simulator = start_finpulse(fp_settings, *simulate_args(22, count, rate=500), log_dir=tmp_path, name="simulate")
    try:
        wait_for_records(fp_settings, topics.scored, lambda rs: len(rs) >= 1_500, timeout=120, what="1,500 scored")
        assert workers[0].stop() == 0, workers[0].tail()          # SIGTERM: finishes its batch, commits, leaves
        at_sigterm = scored_count(fp_settings, topics)
        assert at_sigterm < count, "the stream was over before the SIGTERM: the test would prove nothing"

        workers.append(start_worker(fp_settings, tmp_path, "worker-2"))
        wait_for_records(fp_settings, topics.scored, lambda rs: len(rs) >= at_sigterm + 1_500, timeout=120,
                         what="1,500 more scored")
        workers[1].kill()                                          # kill -9: no shutdown code runs
        at_kill = scored_count(fp_settings, topics)
        assert at_kill < count, "the stream was over before the kill: the test would prove nothing"

        workers.append(start_worker(fp_settings, tmp_path, "worker-3"))
        assert simulator.wait(180) == 0, simulator.tail()
        try:
            scored = wait_for_records(fp_settings, topics.scored, until_ids(expected), timeout=240,
                                      what="every id scored after the restarts")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{unscored(fp_settings, topics)}\n"
                                 f"committed/end: {consumer_lag(fp_settings, [topics.news, topics.comments])}\n"
                                 + "".join(f"{w.name}: {line}\n" for w in workers for line in w.output().splitlines()
                                           if "partitions assigned" in line or "score agent stopped" in line)
                                 + f"the worker's log ends:\n{workers[-1].tail(6000)}") from None
        assert workers[2].stop() == 0
    finally:
        for worker in workers:
            worker.kill()
        simulator.stop()
    check_scored(scored, expected)
    print(f"{len(scored) - len(expected)} duplicate(s) after SIGTERM and kill -9 (at-least-once)")


@pytest.mark.slow
def test_malformed_inputs_are_dead_lettered_with_their_reason_and_the_rest_scored(fp_settings, topics, tmp_path):
    max_chars = 500
    settings = with_section(fp_settings, "worker", max_text_chars=max_chars)
    messages = simulated(seed=23, count=900, malformed_share=0.3, max_text_chars=max_chars)
    # A message the parser accepts but no scored record could carry (a 550 kB url), and a null value.
    huge = {"id": "huge-url", "published_at": "2026-03-02T09:00:00Z", "headline": "Oil falls", "url": "u" * 550_000}
    extra = [(topics.news, json.dumps(huge).encode()), (topics.comments, None)]
    bad = [m for m in messages if m.expected_reason]
    good = {m.id: m for m in messages if not m.expected_reason}
    assert len(bad) >= 200 and set(Counter(m.expected_reason for m in bad)) >= {
        "invalid_json", "invalid_utf8", "not_an_object", "missing_field", "wrong_type", "bad_timestamp",
        "empty_text", "oversized_text"}
    asyncio.run(produce(settings, topics, messages, extra))
    with start_worker(settings, tmp_path) as worker:
        scored = wait_for_records(settings, topics.scored, until_ids(good), timeout=180, what="every valid id scored")
        letters = wait_for_records(settings, topics.deadletter, lambda rs: len(rs) >= len(bad) + len(extra),
                                   timeout=60, what="every malformed message dead-lettered")
        assert worker.stop() == 0
    check_scored(scored, good)
    inputs = {(r.topic, r.partition, r.offset): r.value for t in topics.inputs for r in read_all(settings, t)}
    expected_reasons = Counter((m.value(), m.expected_reason) for m in bad)
    expected_reasons[(json.dumps(huge).encode(), "oversized_text")] += 1
    expected_reasons[(b"", "invalid_json")] += 1
    got = Counter()
    for record in letters:
        letter = DeadLetter.from_json(record.value)
        assert letter.detail
        assert (inputs[(letter.source_topic, letter.source_partition, letter.source_offset)] or b"") == letter.original
        got[(letter.original, letter.reason)] += 1
    assert got == expected_reasons
    reasons = Counter(reason for (_, reason), n in expected_reasons.items() for _ in range(n))
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(reasons.items()))
    assert f"dead-lettered {sum(reasons.values())} ({counts})" in worker.output()


@pytest.mark.slow
def test_a_workers_metrics_count_what_it_scored_and_dead_lettered_and_readyz_waits_for_its_group(fp_settings, topics,
                                                                                               tmp_path):
    """A real worker's /readyz answers 503 (naming the consumer group) until it has joined, then 200; after it
    scored and dead-lettered known messages, its /metrics (a valid exposition) counts exactly those, by input topic
    and reason, and its consumer lag comes down to 0."""
    max_chars = 500
    port = free_port()
    # A long session timeout makes tansu's group join take seconds: the web server answers well before it.
    settings = with_section(with_section(fp_settings, "worker", max_text_chars=max_chars, web_port=port),
                            "kafka", session_timeout_s=12.0)
    base = f"http://127.0.0.1:{port}"
    messages = simulated(seed=31, count=600, malformed_share=0.3, max_text_chars=max_chars)
    good = {m.id: m for m in messages if not m.expected_reason}
    bad = [m for m in messages if m.expected_reason]
    with start_finpulse(settings, "worker", log_dir=tmp_path, name="worker") as worker:
        answers = []
        deadline = time.monotonic() + 120
        while not answers or answers[-1][0] != 200:
            status, body = probe(f"{base}/readyz", timeout=2)
            if status is not None:
                answers.append((status, body, WORKER_READY in worker.output()))
            assert worker.running() and time.monotonic() < deadline, worker.tail()
            time.sleep(0.1)
        status, body, ready_logged = answers[0]
        assert status == 503 and not ready_logged, answers[0]
        assert body["status"] == "not ready" and "consumer_group" in body["reason"], body
        assert body["checks"]["model"] == {"ok": True, "detail": f"{BASELINE_VERSION} loaded"}
        status, body, _ = answers[-1]
        assert WORKER_READY in worker.output()
        assert {name: check["ok"] for name, check in body["checks"].items()} == {
            "consumer_group": True, "broker": True, "model": True}
        assert probe(f"{base}/healthz")[0] == 200

        asyncio.run(produce(settings, topics, messages))
        wait_for_records(settings, topics.scored, until_ids(good), timeout=180, what="every valid id scored")
        wait_for_records(settings, topics.deadletter, lambda rs: len(rs) >= len(bad), timeout=60,
                         what="every malformed message dead-lettered")
        for topic in topics.inputs:
            wait_until_consumed(settings, topic)
        deadline = time.monotonic() + 60
        while True:          # the ends come with the next fetch, the committed offsets with the next commit
            metrics = scrape(f"{base}/metrics")
            lag = {dict(labels)["topic"]: value for labels, value in metrics.series("finpulse_consumer_lag_messages").items()}
            if all(lag.get(topic) == 0 for topic in topics.inputs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert worker.stop() == 0, worker.tail()

    assert all(lag.get(topic) == 0 for topic in topics.inputs), lag
    consumed = Counter(topics.input_for(m.kind) for m in messages)
    scored = Counter(topics.input_for(m.kind) for m in good.values())
    dead = Counter((topics.input_for(m.kind), m.expected_reason) for m in bad)
    assert metrics.series("finpulse_messages_consumed_total") == {
        frozenset({("topic", topic)}): n for topic, n in consumed.items()}
    assert metrics.series("finpulse_messages_scored_total") == {
        frozenset({("topic", topic)}): n for topic, n in scored.items()}
    assert metrics.series("finpulse_messages_dead_lettered_total") == {
        frozenset({("topic", topic), ("reason", reason)}): n for (topic, reason), n in dead.items()}
    assert metrics.value("finpulse_scorer_batch_texts_sum") == len(good)
    calls = metrics.value("finpulse_scorer_batch_texts_count")
    assert 1 <= calls == metrics.value("finpulse_scorer_latency_seconds_count")
    assert metrics.value("finpulse_score_batch_duration_seconds_count") >= calls
    assert metrics.value("finpulse_model_info", model_version=BASELINE_VERSION, device="-", precision="-") == 1
    assert metrics.types["finpulse_windows_closed_total"] == "counter"
    assert metrics.value("process_resident_memory_bytes") > 0


@pytest.mark.slow
def test_two_workers_split_the_partitions_and_together_score_everything(fp_settings, topics, tmp_path):
    expected = {m.id: m for m in simulated(seed=24, count=4_000)}
    with start_worker(fp_settings, tmp_path, "worker-a") as a:
        with start_worker(fp_settings, tmp_path, "worker-b") as b:
            a.wait_for("Worker ready", count=2, timeout=90)      # a rebalanced to share with b
            asyncio.run(produce(fp_settings, topics, list(expected.values())))
            scored = wait_for_records(fp_settings, topics.scored, until_ids(expected), timeout=180,
                                      what="every id scored by the pair")
            assert b.stop() == 0
        assert a.stop() == 0
    check_scored(scored, expected)
    shares = []
    for worker in (a, b):
        line = next(l for l in worker.output().splitlines() if "score agent stopped: scored" in l)
        shares.append(int(line.split("scored ")[1].split(";")[0]))
    assert all(share > 0 for share in shares), shares              # both did part of the work
    assert sum(shares) >= len(expected)
    assert len(scored) == sum(shares)                              # every record published is counted once


class PickyScorer:
    """A scorer that cannot read "garbled" texts (per-item error, as the Scorer contract says) and that raises
    for a whole batch containing "explode" (a broken scorer, which the worker must survive)."""
    model_version = "picky-1"

    def score(self, texts):
        if any("explode" in t for t in texts):
            raise RuntimeError("boom")
        return [failed("cannot read") if "garbled" in t else Prediction("Markets", 0.9, "bearish", -0.8)
                for t in texts]


def test_scoring_core_dead_letters_what_the_scorer_cannot_score_and_fans_out_tickers():
    topics = TopicNames("unit")
    scoring = Scoring(PickyScorer(), topics, max_text_chars=1_000)
    texts = ["$AAPL and $MSFT slump", "garbled $XOM", "this will explode", "{bad json"]
    values = [json.dumps({"id": f"c{n}", "created_at": 1, "text": text}).encode() for n, text in enumerate(texts[:3])]
    messages = [SourceMessage(topics.comments, 0, offset, None, value)
                for offset, value in enumerate(values + [texts[3].encode()])]
    valid, outputs = scoring.parse(messages)
    outputs += scoring.publishable(valid, scoring.score([item.text for _, item in valid]))
    by_topic = Counter(o.topic for o in outputs)
    assert by_topic == {topics.scored: 1, topics.scored_by_ticker: 2, topics.deadletter: 3}
    assert [o.key for o in outputs if o.topic == topics.scored_by_ticker] == [b"AAPL", b"MSFT"]
    letters = {DeadLetter.from_json(o.value).source_offset: DeadLetter.from_json(o.value)
               for o in outputs if o.topic == topics.deadletter}
    assert (letters[1].reason, letters[1].detail) == ("unscorable", "cannot read")
    assert (letters[2].reason, letters[2].detail) == ("unscorable", "RuntimeError: boom")
    assert letters[3].reason == "invalid_json"
    assert scoring.stats_line() == "scored 1; dead-lettered 3 (invalid_json=1, unscorable=2)"


def test_a_message_handoff_continued_after_its_first_step_behaves_as_if_a_task_ran_it():
    """The worker runs each hand-off's first step directly and lets a task continue it only if it blocked."""
    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []

        async def handoff(gate: asyncio.Future):
            try:
                value = await gate
                await asyncio.sleep(0)
                return value * 2
            except ValueError as exc:
                return f"caught {exc}"
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        def continued(gate):
            coro = handoff(gate)
            return asyncio.ensure_future(_continued(coro, coro.send(None)))

        gate = loop.create_future()
        task = continued(gate)
        gate.set_result(21)
        seen.append(await task)                                   # results come back in
        gate = loop.create_future()
        task = continued(gate)
        gate.set_exception(ValueError("bad"))
        seen.append(await task)                                   # so do exceptions
        task = continued(loop.create_future())
        await asyncio.sleep(0)
        task.cancel()                                             # and cancellation (a rebalance aborting it)
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(scenario()) == [42, "caught bad", "cancelled"]


def test_a_batch_finishes_even_when_the_agent_is_cancelled():
    """take_events acks a batch when its body ends: a shutdown must not end the body before the outputs are out."""
    async def scenario() -> list[str]:
        done: list[str] = []

        async def work() -> None:
            await asyncio.sleep(0.3)
            done.append("delivered")

        batch = asyncio.ensure_future(finish_batch(work()))
        await asyncio.sleep(0.05)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        return done

    assert asyncio.run(scenario()) == ["delivered"]


def test_a_dead_letter_too_large_for_the_broker_is_delivered_without_its_original(fp_settings, topics):
    scoring = Scoring(NoopScorer(), topics, max_text_chars=100)
    letter = scoring.dead_letter(SourceMessage(topics.news, 2, 41, b"k", b"x" * 50_000), "invalid_json", "bad")

    async def send_with_small_limit() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=fp_settings.kafka.bootstrap_servers, max_request_size=20_000)
        await producer.start()
        try:
            async def send(record):
                return await producer.send(record.topic, record.value, key=record.key)
            await deliver(send, [letter], scoring.without_original)
        finally:
            await producer.stop()

    asyncio.run(send_with_small_limit())
    [record] = read_all(fp_settings, topics.deadletter)
    delivered = DeadLetter.from_json(record.value)
    assert delivered.original == b"" and delivered.reason == "invalid_json"
    assert f"{topics.news}[2]@41" in delivered.detail


def test_worker_rejects_bad_configuration_clearly(fp_settings, tmp_path):
    code, out = run_finpulse(with_section(fp_settings, "kafka", tansu_compat="sometimes"), "worker",
                             log_dir=tmp_path, timeout=60)
    assert code == 2 and "tansu_compat" in out
    code, out = run_finpulse(with_section(fp_settings, "worker", fetch_bytes_per_partition=0), "worker",
                             log_dir=tmp_path, timeout=60)
    assert code == 2 and "fetch_bytes_per_partition must be positive" in out
    code, out = run_finpulse(with_section(fp_settings, "worker", stop_timeout_s=0), "worker", log_dir=tmp_path,
                             timeout=60)
    assert code == 2 and "stop_timeout_s must be above 0" in out
