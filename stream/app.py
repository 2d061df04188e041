"""The FinPulse Faust app: the scoring agent, plus the agents, tables and services other packages install.

``create_app(settings, scorer)`` builds the app. Its ``score`` agent reads ``finpulse.news`` and
``finpulse.comments`` (raw bytes) in micro-batches (``take_events(max_batch, within=max_wait_s)``) and per batch:

1. parses every message strictly (``records.parse_input``, the kind given by the source topic); a message that is
   not valid becomes a ``DeadLetter`` (original bytes, reason, source topic/partition/offset);
2. scores the valid texts with the ``Scorer`` in a worker thread (the event loop keeps fetching meanwhile); a text
   the scorer cannot score (``Prediction.error``) is dead-lettered as ``unscorable``;
3. publishes one ``ScoredRecord`` per message to ``finpulse.scored`` keyed by its topic label, and the same record
   once per ticker to ``finpulse.scored-by-ticker`` keyed by the ticker (so per-topic and per-ticker tables are
   co-partitioned with their source). Every record's Kafka timestamp is the message's event time;
4. waits until the broker has every record it produced (retrying failed sends) before the batch body ends, and
   only then does ``take_events`` ack the batch: at-least-once, offsets never run ahead of outputs.

Then each module of ``EXTENSIONS`` that is part of this build gets ``install(app, settings, names)`` to register
its own agents/tables/services (aggregation windows, spike detection, alert delivery).

``speed_up_message_handoff`` removes most of Faust's per-message task overhead (see its docstring), and
``stream.offset_guard`` keeps Faust from committing past records that reached it out of order.
``Scoring`` is the Faust-free core of steps 1-3, so benchmarks can run exactly the same work outside Faust.
``faust -A stream.app:app worker`` works too: the module-level ``app`` is built on first access from
``load_settings()`` (see ``stream.worker.prepare_app``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from aiokafka.errors import IllegalStateError, MessageSizeTooLargeError, RecordTooLargeError

from models.interface import Prediction, Scorer, failed, runs_on

from .config import Settings, WorkerSettings
from . import input_watermark, offset_guard, ops
from .kafka_io import bootstrap_list, kafka_timestamp_ms
from .kafka_security import faust_credentials
from .metrics import REGISTRY, SIZE_BUCKETS, Family, counter_family, gauge, histogram
from .records import (DeadLetter, InputItem, InvalidRecord, Kind, ScoredRecord, epoch_ms, excerpt, parse_input,
                      utcnow)
from .topics import TopicNames

log = logging.getLogger(__name__)
T = TypeVar("T")

EXTENSIONS = ("stream.aggregate", "alerts.detect", "alerts.dispatch")
# A dead letter carries at most this much of the original value and key (base64 grows them by a third and a
# Kafka record is 1 MB by default); the full original stays in the source topic at the recorded partition/offset.
DEAD_LETTER_ORIGINAL_MAX = 600_000
DEAD_LETTER_KEY_MAX = 64_000
# A scored record this large (a huge id, url or source: the text is an excerpt) could never be produced.
SCORED_RECORD_MAX = 512_000
STATS_INTERVAL_S = 30.0
SEND_RETRY_MAX_S = 30.0

SCORER_BATCH_TEXTS = histogram("finpulse_scorer_batch_texts", "Texts per scorer call (a micro-batch's valid messages).",
                               buckets=SIZE_BUCKETS)
SCORER_LATENCY = histogram("finpulse_scorer_latency_seconds", "Wall time of one scorer call, in seconds (the hand-off "
                           "to the scorer thread included).")
BATCH_DURATION = histogram("finpulse_score_batch_duration_seconds", "One micro-batch of the scoring agent, in seconds: "
                           "parse, score, publish, until the broker has every output.")
MODEL_INFO = gauge("finpulse_model_info", "The model version the worker scores with, on which device and in which "
                   "precision (value 1).", ["model_version", "device", "precision"])


@dataclass(frozen=True)
class SourceMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None       # None: a tombstone (a compacted topic forgets the key)
    timestamp_ms: int | None  # None: the time it is sent
    # The input message this record came from (scored records only): replay keeps its position beside the record.
    source: SourceMessage | None = dataclasses.field(default=None, compare=False)
    headers: tuple[tuple[str, bytes], ...] = ()


class Scoring:
    """Turns a batch of input messages into the records to publish. No Kafka, no Faust: callers consume and
    produce. ``parse`` and ``publishable`` run on the event loop (cheap); ``score`` blocks (run it in a thread)."""

    def __init__(self, scorer: Scorer, names: TopicNames, max_text_chars: int, clock=utcnow):
        self.scorer = scorer
        self.names = names
        self.max_text_chars = max_text_chars
        self.clock = clock
        self.kinds: dict[str, Kind] = {names.news: "news", names.comments: "comment"}
        # By input topic (and reason): read at scrape time by the worker's metrics, so scoring pays nothing more.
        self.consumed: Counter[str] = Counter()
        self.scored: Counter[str] = Counter()
        self.dead_lettered: Counter[tuple[str, str]] = Counter()

    def parse(self, messages: Sequence[SourceMessage]) -> tuple[list[tuple[SourceMessage, InputItem]], list[Outgoing]]:
        """(valid messages with their parsed items, dead letters for the others)."""
        valid, dead = [], []
        for message in messages:
            self.consumed[message.topic] += 1
            try:
                item = parse_input(message.value or b"", self.kinds[message.topic], self.max_text_chars)
            except InvalidRecord as exc:
                dead.append(self.dead_letter(message, exc.reason, exc.detail))
            except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the stream or lose the message
                log.exception("parse_input failed unexpectedly at %s[%d]@%d", message.topic, message.partition,
                              message.offset)
                dead.append(self.dead_letter(message, "unscorable", f"parser error {type(exc).__name__}: {exc}"))
            else:
                valid.append((message, item))
        return valid, dead

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        """The scorer's predictions; if the scorer raises for the batch, each text is scored alone so that only
        the texts it really cannot score fail."""
        try:
            predictions = self.scorer.score(texts)
            if len(predictions) != len(texts):
                raise RuntimeError(f"scorer returned {len(predictions)} predictions for {len(texts)} texts")
            return predictions
        except Exception as exc:  # noqa: BLE001 - isolate the failing texts instead of stopping the stream
            if len(texts) == 1:
                return [failed(f"{type(exc).__name__}: {exc}")]
            log.exception("scorer failed on a batch of %d: scoring its texts one by one", len(texts))
            return [self.score([text])[0] for text in texts]

    def publishable(self, valid: Sequence[tuple[SourceMessage, InputItem]], predictions: Sequence[Prediction],
                    input_lag: input_watermark.InputLag = input_watermark.InputLag()) -> list[Outgoing]:
        """Scored records (by topic and by ticker, stamped with the input's lag: ``stream.input_watermark``) and
        ``unscorable`` dead letters for one scored batch."""
        out: list[Outgoing] = []
        headers = input_watermark.stamp(input_lag)
        scored_at = self.clock()
        version = self.scorer.model_version
        names = self.names
        for (message, item), prediction in zip(valid, predictions):
            if prediction.error is not None:
                out.append(self.dead_letter(message, "unscorable", prediction.error))
                continue
            record = ScoredRecord(
                id=item.id, kind=item.kind, event_time=item.event_time, text=excerpt(item.text),
                topic=prediction.topic, topic_confidence=prediction.topic_confidence,
                sentiment=prediction.sentiment, sentiment_score=prediction.sentiment_score, tickers=item.tickers,
                model_version=version, scored_at=scored_at, source=item.source, url=item.url)
            value = record.to_json()
            if len(value) > SCORED_RECORD_MAX:
                out.append(self.dead_letter(message, "oversized_text", f"the scored record would be {len(value)} "
                                            f"bytes (limit {SCORED_RECORD_MAX}): id, url or source is too long"))
                continue
            timestamp_ms = kafka_timestamp_ms(item.event_time)
            out.append(Outgoing(names.scored, prediction.topic.encode("utf-8"), value, timestamp_ms, message, headers))
            for ticker in item.tickers:
                out.append(Outgoing(names.scored_by_ticker, ticker.encode("utf-8"), value, timestamp_ms, None, headers))
            self.scored[message.topic] += 1
        return out

    def dead_letter(self, message: SourceMessage, reason: str, detail: str) -> Outgoing:
        self.dead_lettered[(message.topic, reason)] += 1
        original, key = message.value or b"", message.key
        if len(original) > DEAD_LETTER_ORIGINAL_MAX:
            detail = f"{detail} (original is {len(original)} bytes: the first {DEAD_LETTER_ORIGINAL_MAX} are kept)"
            original = original[:DEAD_LETTER_ORIGINAL_MAX]
        if key is not None and len(key) > DEAD_LETTER_KEY_MAX:
            detail = f"{detail} (key is {len(key)} bytes: the first {DEAD_LETTER_KEY_MAX} are kept)"
            key = key[:DEAD_LETTER_KEY_MAX]
        letter = DeadLetter(reason=reason, detail=detail, source_topic=message.topic,
                            source_partition=message.partition, source_offset=message.offset,
                            original_b64=DeadLetter.encode_bytes(original), failed_at=self.clock(),
                            original_key_b64=DeadLetter.encode_bytes(key))
        return Outgoing(self.names.deadletter, key, letter.to_json(), None)

    def without_original(self, record: Outgoing) -> Outgoing | None:
        """A dead letter the broker refused as too large, minus the original bytes (they stay in the source topic
        at the recorded partition/offset). None for any other record."""
        if record.topic != self.names.deadletter:
            return None
        letter = DeadLetter.from_json(record.value)
        if not letter.original_b64 and not letter.original_key_b64:
            return None
        smaller = dataclasses.replace(letter, original_b64="", original_key_b64=None,
                                      detail=f"{letter.detail} (original too large for the broker: read it from "
                                             f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset})")
        return Outgoing(record.topic, None, smaller.to_json(), record.timestamp_ms)

    @property
    def rejected(self) -> Counter[str]:
        """Dead letters by reason, all input topics together (the stats line and replay's tallies)."""
        by_reason: Counter[str] = Counter()
        for (_, reason), count in self.dead_lettered.items():
            by_reason[reason] += count
        return by_reason

    def stats_line(self) -> str:
        rejected = self.rejected
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(rejected.items())) or "none"
        return f"scored {sum(self.scored.values())}; dead-lettered {sum(rejected.values())} ({reasons})"

    def metric_families(self) -> list[Family]:
        """The counts so far as Prometheus counters (``stream.metrics``)."""
        return [
            counter_family("finpulse_messages_consumed_total", "Input messages taken by the scoring agent, by input "
                           "topic.", ["topic"], self.consumed),
            counter_family("finpulse_messages_scored_total", "Input messages scored and published, by input topic.",
                           ["topic"], self.scored),
            counter_family("finpulse_messages_dead_lettered_total", "Input messages sent to the dead-letter topic "
                           "instead of being scored, by input topic and reason.", ["topic", "reason"],
                           self.dead_lettered),
        ]


SendFn = Callable[[Outgoing], Awaitable[asyncio.Future]]
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


def faust_send(app) -> SendFn:
    """``send`` for ``deliver`` through a Faust app's producer, with each record's Kafka timestamp."""
    async def send(record: Outgoing) -> asyncio.Future:
        # Faust takes seconds and truncates int(seconds * 1000): half a millisecond more makes that exact.
        timestamp = (record.timestamp_ms + 0.5) / 1000.0 if record.timestamp_ms is not None else None
        return await app.producer.send(record.topic, record.key, record.value, partition=None,
                                       timestamp=timestamp, headers=list(record.headers) or None)
    return send


async def deliver(send: SendFn, records: Sequence[Outgoing],
                  shrink: Callable[[Outgoing], Outgoing | None] = lambda record: None) -> None:
    """Send every record and wait for all deliveries (one gather per batch); resend the failed ones with backoff
    until the broker has them all. Never gives up: leaving with records undelivered would let the input offsets
    be committed without their outputs. A record the broker finds too large is replaced by ``shrink(record)``
    (when that gives one), so one huge record cannot wedge the stream."""
    backoff = 0.5
    while records:
        futures: list[Any] = []
        for record in records:
            try:
                futures.append(await send(record))
            except Exception as exc:  # noqa: BLE001 - treated like a failed delivery, below
                futures.append(exc)
        pending = [f for f in futures if not isinstance(f, BaseException)]
        results = iter(await asyncio.gather(*pending, return_exceptions=True))
        outcomes = [f if isinstance(f, BaseException) else next(results) for f in futures]
        retry = []
        for record, outcome in zip(records, outcomes):
            if isinstance(outcome, BaseException):
                smaller = shrink(record) if isinstance(outcome, _TOO_LARGE) else None
                retry.append(smaller or record)
        if retry:
            first = next(o for o in outcomes if isinstance(o, BaseException))
            log.error("%d of %d records not delivered (%r): retrying in %.1fs", len(retry), len(records), first,
                      backoff)
            await asyncio.sleep(backoff)
            backoff = min(SEND_RETRY_MAX_S, backoff * 2)
        records = retry


async def micro_batches(app, stream, worker: WorkerSettings) -> AsyncIterator[list]:
    """The agents' batches: ``stream.take_events`` (always with ``within``), and Faust's monitor told that the stream
    took events from their partitions. ``take_events`` reads the channel past the stream's sensors, so Faust's stall
    check saw no event processed at all and, through any backlog longer than ``stream_processing_timeout`` (5 min),
    logged "Stream has not started processing" for every partition every few seconds until the backlog ended,
    however much the agents had processed."""
    async for events in stream.take_events(worker.max_batch, within=worker.max_wait_s):
        inbound = getattr(app.monitor, "stream_inbound_time", None)
        if inbound is not None:
            now = time.monotonic()
            for event in events:
                inbound[event.message.tp] = now
        yield events


async def finish_batch(work: Awaitable[T]) -> T:
    """Run one batch's work to its end even when the agent (or timer) is cancelled (worker shutdown, rebalance):
    ``take_events`` acks the batch as soon as the loop body ends, so the body must not end before every output is
    delivered, table writes included (``stream.confirmed_table``). The cancellation is re-raised once the batch is
    done; otherwise its result is returned. An unexpected error ends the process at once, before Faust can commit
    the batch's offsets: a restart reads the batch again (a crash, not a loss)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                exit_without_commit("the batch was cancelled before its outputs were delivered")
            cancelled = True
        except Exception:  # noqa: BLE001 - see the docstring
            log.critical("a batch failed unexpectedly", exc_info=True)
            exit_without_commit("a batch failed")
    if cancelled:
        raise asyncio.CancelledError()
    return task.result()


def finishes_before_stop(app) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T | None]]]:
    """For an ``@app.timer`` whose work publishes (put it under the timer's decorator): a stopping worker waits for
    the run in progress, then stops its producer, and starts no new run.

    Without it: mode's ``Service.stop`` stops an app's child services (its producer among them) before it cancels
    the app's own tasks, timers included, so a run still publishing found the producer stopped (``NotReady: Producer
    service not yet started``) and, inside ``finish_batch``, retried until the process was killed; outside it, the
    run was cancelled with its records unsent.
    Faust sends ``app.on_before_shutdown`` once the consumer is stopped and before any child service stops: the
    runs in progress end there."""
    running: set[asyncio.Future] = set()

    @app.on_before_shutdown.connect
    async def wait_for_timer_runs(sender, **kwargs) -> None:
        if running:
            log.info("stopping: waiting for %d timer run(s) to deliver what they publish", len(running))
            await asyncio.gather(*running, return_exceptions=True)

    def decorate(fun: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T | None]]:
        @functools.wraps(fun)
        async def unless_stopping(*args: Any) -> T | None:
            if app.should_stop:      # the check and the registration below have no await between them
                return None
            run = asyncio.ensure_future(fun(*args))
            running.add(run)
            run.add_done_callback(running.discard)
            return await run
        return unless_stopping
    return decorate


def exit_without_commit(why: str) -> None:
    """End the process now, from any thread, before Faust commits another offset: at-least-once, as after a crash."""
    log.critical("%s: exiting now, the batch in hand not committed (a restart scores it again)", why)
    logging.shutdown()
    os._exit(70)


# ---------------------------------------------------------------- Faust's per-message hand-off

class _Continue:
    """Drives a coroutine that has already run its first step, exactly as a Task would have driven it: what it
    yields goes to the awaiting task, what the task sends or throws in (results, cancellation) goes back to it."""

    def __init__(self, coro, first_yield):
        self.coro, self.first_yield = coro, first_yield

    def __await__(self):
        value = self.first_yield
        while True:
            try:
                yield value
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task (e.g. cancellation): pass it on
                try:
                    value = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = self.coro.send(None)
                except StopIteration as stop:
                    return stop.value


async def _continued(coro, first_yield):
    return await _Continue(coro, first_yield)


def speed_up_message_handoff() -> None:
    """Faust hands each fetched message to the streams with ``wait_first(callback(message), suspend_flow.wait())``,
    which creates four tasks per message so that a rebalance (flow suspended) can abort a hand-off that blocks:
    measured, that is about a third of the worker's CPU per message. Almost every hand-off completes without ever
    blocking, so its first step now runs directly; only a hand-off that does block (flow control, a full buffer)
    goes through ``wait_first`` as before, continued from where it stopped. Same behaviour, far fewer tasks.
    Idempotent; patches Faust's ``Consumer`` class for this process."""
    from faust.transport.consumer import Consumer
    from mode.services import WaitResults

    if getattr(Consumer.wait_first, "finpulse_handoff", False):
        return
    wait_first = Consumer.wait_first

    async def wait_first_fast(self, *coros, timeout=None):
        if len(coros) != 2 or timeout is not None or not asyncio.iscoroutine(coros[0]):
            return await wait_first(self, *coros, timeout=timeout)
        handoff, suspended = coros
        try:
            first_yield = handoff.send(None)
        except BaseException as exc:
            suspended.close()          # never awaited: the hand-off ended without waiting for anything
            if isinstance(exc, StopIteration):
                return WaitResults([handoff], [exc.value], False)
            raise
        return await wait_first(self, _continued(handoff, first_yield), suspended)

    wait_first_fast.finpulse_handoff = True
    Consumer.wait_first = wait_first_fast


def create_app(settings: Settings, scorer: Scorer, extensions: Sequence[str] = EXTENSIONS):
    """The worker's Faust app (``stream.worker.prepare_app`` loads the scorer from ``[worker]``); ``extensions`` are
    the modules whose ``install(app, settings, names)`` adds their parts (a module missing from this build is
    skipped)."""
    import faust

    from .confirmed_table import ConfirmedTable

    kafka, worker = settings.kafka, settings.worker
    names = TopicNames(kafka.topic_prefix)
    app = faust.App(
        worker.app_id,
        broker=[f"kafka://{server}" for server in bootstrap_list(kafka.bootstrap_servers)],
        broker_credentials=faust_credentials(kafka),
        store="memory://",       # tables are rebuilt from their changelog topics on start
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,   # fewer re-scored messages after a crash (Faust's default is 2.8 s)
        consumer_max_fetch_size=worker.fetch_bytes_per_partition,
        datadir=worker.data_dir,
        web_enabled=worker.web_port > 0,
        web_port=worker.web_port or 6066,
        Table=ConfirmedTable,     # the agents wait for their table writes before a batch is acked
    )
    speed_up_message_handoff()
    offset_guard.install(app, set(names.all()) - set(names.compacted()))
    log_assignments(app, names)
    install_scoring(app, settings, names, scorer)
    ops.install_worker(app, scorer.model_version,
                       {names.news, names.comments, names.scored, names.scored_by_ticker, names.trends})
    for module_name in extensions:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                log.info("%s is not part of this build: skipped", module_name)
                continue
            raise
        module.install(app, settings, names)
    return app


def log_assignments(app, names: TopicNames) -> None:
    """Log which partitions of FinPulse's own topics this worker takes on each rebalance: with several workers (or a
    restart that the group has not yet noticed), it tells who was reading what."""
    own = set(names.all())

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:
        by_topic: dict[str, list[int]] = {}
        for tp in assigned:
            if tp.topic in own:
                by_topic.setdefault(tp.topic.removeprefix(names.prefix + "."), []).append(tp.partition)
        listed = " ".join(f"{topic}{sorted(parts)}" for topic, parts in sorted(by_topic.items())) or "none"
        log.info("partitions assigned (generation %s): %s", app.consumer_generation_id, listed)


def install_scoring(app, settings: Settings, names: TopicNames, scorer: Scorer) -> Scoring:
    """Register the ``score`` agent and its periodic statistics log on ``app``."""
    worker = settings.worker
    scoring = Scoring(scorer, names, worker.max_text_chars)
    inputs = app.topic(names.news, names.comments, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    # One thread: the scorer batches internally and may use every core; batches stay in order.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-scorer")

    send = faust_send(app)
    progress = input_watermark.InputProgress()

    def highwater(topic: str, partition: int) -> int | None:
        """The partition's end from the last fetch; None once it is no longer ours (revoked in a rebalance)."""
        from faust.types import TP
        tp = TP(topic, partition)
        if tp not in app.consumer.assignment():
            return None
        try:
            return app.consumer.highwater(tp)
        except IllegalStateError:  # revoked between the two calls
            return None

    async def process(events) -> None:
        started = time.perf_counter()
        messages = [SourceMessage(e.message.topic, e.message.partition, e.message.offset, e.key, e.value)
                    for e in events]
        valid, outputs = scoring.parse(messages)
        now = time.monotonic()
        # Every message read moves its partition on; the valid ones also say to what event time.
        event_ms = {(m.topic, m.partition, m.offset): epoch_ms(item.event_time) for m, item in valid}
        for m in messages:
            progress.saw(m.topic, m.partition, m.offset, event_ms.get((m.topic, m.partition, m.offset)), now)
        if valid:
            texts = [item.text for _, item in valid]
            scoring_started = time.perf_counter()
            predictions = await asyncio.get_running_loop().run_in_executor(executor, scoring.score, texts)
            SCORER_LATENCY.observe(time.perf_counter() - scoring_started)
            SCORER_BATCH_TEXTS.observe(len(texts))
            outputs.extend(scoring.publishable(valid, predictions, progress.lag(highwater, now)))
        await deliver(send, outputs, scoring.without_original)
        BATCH_DURATION.observe(time.perf_counter() - started)

    @app.agent(inputs, name="score")
    async def score(stream):
        try:
            async for events in micro_batches(app, stream, worker):
                await finish_batch(process(events))
        finally:
            log.info("score agent stopped: %s (model %s)", scoring.stats_line(), scorer.model_version)

    last_logged = {"line": ""}

    @app.timer(STATS_INTERVAL_S, name="score-stats")
    async def log_stats():
        line = scoring.stats_line()
        if line != last_logged["line"]:
            last_logged["line"] = line
            log.info("%s (model %s)", line, scorer.model_version)

    MODEL_INFO.labels(scorer.model_version, *runs_on(scorer)).set(1)
    REGISTRY.add_collector(scoring.metric_families)
    log.info("scoring with %s; batches of up to %d within %.2fs", scorer.model_version, worker.max_batch,
             worker.max_wait_s)
    return scoring


def __getattr__(name: str):
    """``stream.app:app`` for the Faust command line, built on first access from ``load_settings()``."""
    if name == "app":
        from .config import load_settings
        from .worker import prepare_app

        built = prepare_app(load_settings())
        globals()["app"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
