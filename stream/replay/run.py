"""Running a replay: the selected inputs, re-scored and re-aggregated exactly as the live worker would, into the
run's own topics and Parquet files.

Per batch of ``[replay] batch_size`` messages (in replay order):

1. ``stream.app.Scoring`` parses, scores and builds the scored records: the worker's own code, so ids, labels,
   excerpts, tickers and dead-letter decisions are the worker's. Rejected messages are counted, not published.
2. The records go through ``stream.aggregate.WindowAggregator`` (topic and ticker) and each closed window through
   ``alerts.detect.SpikeDetector``: the classes the live agents run, with the plan's ``[aggregate]``/``[detect]``.
3. Scored records, closed windows and alerts go to ``<prefix>.replay.<run-id>.{scored,trends,alerts}`` (keyed as
   the live topics are, Kafka timestamps = event time; with ``--speed`` their sending is paced by event time) and
   to the current Parquet part.

**Warm-up.** The selection starts at the warm-up's start (``plan.warmup``, before ``--from``). Warm-up messages are
parsed, scored and aggregated like the others, and the detector learns from the warm-up's windows, so windows and
baselines are where a live worker's would be at ``--from``. None of it is written: no scored record, no window, no
alert. The outputs hold exactly the scored records of ``[--from, --to)``, the windows wholly inside it, and the
alerts of episodes that started in it (the resolve of an episode that fired in the warm-up is left out with its
firing). What the warm-up read, and the alerts it held back, are counted in the manifest's ``warmup``.

A window that starts before the warm-up or ends after ``--to`` misses messages the live system counted: it is
neither reported nor judged (``windows_cut``). A window that straddles ``--from`` is complete when the warm-up
covers it: it is judged (the detector learns from it), not reported. At the end, the windows that end by ``--to``
are closed: they have all their messages.

**Resuming after Ctrl-C** (checkpoint + deterministic re-read). After each part (``[replay] part_records`` inputs)
the part's files are written, the Kafka outputs flushed, and ``_checkpoint.json`` saved: the number of inputs
done, the identity of the last one, and the aggregator and detector states. Running the same command again reads
the same ordered selection, skips the inputs already done (reading is cheap; they are not scored again), restores
the states and continues (a run stopped before its first part has a checkpoint too, of no input: it starts
again). The Parquet output is byte-identical to an uninterrupted run's; the output *topics* may
hold duplicates of the records produced after the last checkpoint (at-least-once: consumers deduplicate by id,
``window_id`` and alert ``event_id``, as they do for the live topics).

**Test endpoint.** With ``--test-endpoint NAME`` the real alert dispatcher (``alerts.dispatch.Dispatcher``) runs
alongside, configured with that one endpoint only and reading the run's own alerts topic (its delivery state goes
to ``<prefix>.replay.<run-id>.deliveries``); the replay ends when every alert is delivered or failed. Without it
nothing is sent anywhere: the live dispatcher reads only the live alerts topic.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import AsyncIterator, Iterable

from aiokafka.errors import KafkaError
from tqdm import tqdm

from alerts.detect import DetectSettings, SpikeDetector, state_key
from models.interface import runs_on
from stream.aggregate import AggregateSettings, KeyWindows, WindowAggregator, trend_key
from stream.app import Scoring, SourceMessage
from stream.kafka_io import DeliveryStalled, RecordSender
from stream.records import AlertRecord, ScoredRecord, TrendRecord, epoch_ms, format_time, utcnow
from stream.topics import ensure_topics

from .output import OUTPUT_SCHEMA_VERSION, PartSink, alert_row, scored_row, trend_row
from .plan import CHECKPOINT, MANIFEST, ReplayError, ReplayPlan, dispatcher_group, endpoint_named, output_topics
from .select import KafkaSelection, SelectionStats, TimedMessage, format_ms

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 2
INCOMPLETE_FIELDS = ("complete_from_ms", "complete_to_ms", "deleted", "arriving_from_ms")


class ReplayInterrupted(Exception):
    """Ctrl-C during a replay; the message says where the next run resumes."""


class _InputFailed(Exception):
    """Reading the input failed (the broker gone, say); the run stops where its last checkpoint is."""


def identity_of(message: TimedMessage) -> list:
    return [message.event_ms, message.topic, message.partition, message.offset]


@dataclass
class WarmupTally:
    """What the warm-up read and computed; none of it is in the outputs. ``held_back`` lists the firing alerts the
    warm-up raised (id, key, emitted_at): the backtest leaves out the labeled events they already alerted on."""
    inputs: int = 0
    scored: int = 0
    rejected: Counter = field(default_factory=Counter)
    windows: int = 0                  # windows the detector learned from: closed in the warm-up or straddling --from
    alerts_held_back: int = 0         # alert events (firing, resolved) of episodes that started in the warm-up
    first_input_ms: int | None = None
    held_back: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rejected": dict(sorted(self.rejected.items()))}

    @classmethod
    def from_dict(cls, saved: dict) -> "WarmupTally":
        return cls(**{**saved, "rejected": Counter(saved["rejected"])})


@dataclass
class _Share:
    """The warm-up's or the range's messages of one batch, parsed: the valid ones with their items, the rejections."""
    messages: list[TimedMessage]
    valid: list
    rejected: Counter


class ReplayRunner:
    """One replay run. ``await runner.run()`` returns the manifest (and leaves the outputs in place)."""

    def __init__(self, plan: ReplayPlan, show_progress: bool = True):
        self.plan = plan
        self.show_progress = show_progress
        settings = plan.settings
        aggregate = settings.section("aggregate", AggregateSettings)
        self.lateness = timedelta(seconds=aggregate.allowed_lateness_s)
        self.aggregators = [WindowAggregator(aggregate, key_type, run_id=plan.run_id) for key_type in ("topic", "ticker")]
        self._clock = None
        self.detector = SpikeDetector(settings.section("detect", DetectSettings), run_id=plan.run_id,
                                      clock=lambda: self._clock)
        self.scoring = Scoring(plan.scorer, plan.names, settings.worker.max_text_chars)
        self.sink = PartSink(plan.out_dir, plan.model_version, plan.config_hash)
        self.counts: Counter[str] = Counter()
        # Rejections by reason, counted when their batch is done (the next batch is parsed before that).
        self.rejected: Counter[str] = Counter()
        self.files: list[str] = []
        self.inputs_done = 0          # inputs whose outputs are complete in memory (or written)
        self.checkpointed = 0         # inputs whose outputs are on disk and in Kafka
        self.last_input: list | None = None
        self.alerts: list[AlertRecord] = []
        self.warmup = WarmupTally()
        self.created_at = format_time(utcnow())
        self.selection_stats = SelectionStats()
        self.seconds = 0.0
        self._pace_origin: tuple[float, int] | None = None
        if plan.resume:
            self._restore(plan.resume)

    # ------------------------------------------------------------ checkpoint

    def _restore(self, saved: dict) -> None:
        self.inputs_done = self.checkpointed = saved["inputs_done"]
        self.last_input = saved["last_input"]
        self.counts.update(saved["counts"])
        self.files = list(saved["files"])
        for aggregator, states in zip(self.aggregators, saved["aggregators"]):
            aggregator.states = {key: KeyWindows.from_dict(state) for key, state in states.items()}
        self.detector.states = defaultdict(dict, saved["detector"])
        self.rejected.update(saved["rejected"])
        self.alerts = [AlertRecord.from_dict(a) for a in saved["alerts"]]
        self.warmup = WarmupTally.from_dict(saved["warmup"])
        self.created_at = saved["created_at"]

    def _save_checkpoint(self) -> None:
        state = {
            "version": CHECKPOINT_VERSION, "identity": self.plan.identity(), "inputs_done": self.inputs_done,
            "last_input": self.last_input, "counts": dict(self.counts), "files": self.files,
            "aggregators": [{key: s.to_dict() for key, s in a.states.items()} for a in self.aggregators],
            "detector": dict(self.detector.states), "rejected": dict(self.rejected),
            "alerts": [a.to_dict() for a in self.alerts], "warmup": self.warmup.to_dict(), "created_at": self.created_at,
        }
        path = self.plan.out_dir / CHECKPOINT
        tmp = path.with_name(f".{CHECKPOINT}.tmp")
        tmp.write_text(json.dumps(state, separators=(",", ":")))
        os.replace(tmp, path)
        self.checkpointed = self.inputs_done

    # ------------------------------------------------------------ the run

    async def run(self) -> dict:
        plan = self.plan
        started = time.monotonic()
        with_deliveries = bool(plan.test_endpoint)
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        if not plan.resume:
            # Before the run's topics exist: with them and no checkpoint, the same command would find its run id
            # taken. This one (no input done) makes it a resume.
            self._save_checkpoint()
        ensure_topics(plan.settings.kafka, output_topics(plan.names, with_deliveries),
                      compacted=plan.names.compacted())
        dispatcher = await self._start_dispatcher() if with_deliveries else None
        progress = None
        try:
            async with RecordSender(plan.settings.kafka, client_id=f"finpulse-replay-{plan.run_id}") as sender:
                async with _open_source(plan) as source:
                    self.selection_stats = getattr(source, "stats", self.selection_stats)
                    # The total counts the warm-up's messages too: it is about what will be read. A resumed run
                    # starts the bar at its checkpoint, so the rate counts only what it replays.
                    progress = tqdm(total=source.total, initial=self.inputs_done, unit="msg",
                                    desc=f"replay {plan.run_id}", dynamic_ncols=True, mininterval=0.5,
                                    disable=not self.show_progress)
                    if self.inputs_done:
                        progress.set_postfix_str(f"reading past the {self.inputs_done} messages done before")
                    await self._replay(_as_async(source), sender, progress)
                    progress.total = progress.n
                await self._finish(sender)
            if dispatcher is not None:
                self.counts.update(await self._await_deliveries(dispatcher))
        except asyncio.CancelledError:
            raise ReplayInterrupted(self._resume_hint()) from None
        except (_InputFailed, DeliveryStalled) as exc:
            # The broker went away (or its link): where the run stands is what the person needs to go on.
            raise ReplayError(f"{exc}; {self._resume_hint('stopped')}") from None
        finally:
            if progress is not None:
                progress.close()
            if dispatcher is not None:
                await dispatcher.stop()
        self.seconds = time.monotonic() - started
        return self.manifest()

    def _resume_hint(self, what: str = "interrupted") -> str:
        return (f"{what} after {self.inputs_done} input message(s); outputs are saved up to message "
                f"{self.checkpointed} in {self.plan.out_dir}. Run the same command again to resume from there.")

    async def _replay(self, messages: AsyncIterator[TimedMessage], sender: RecordSender, progress) -> None:
        batch_size = self.plan.replay.batch_size
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-replay-scorer")
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        reader = asyncio.create_task(self._read_batches(messages, batch_size, queue, progress))
        in_flight = None      # (batch, parsed messages, their predictions' future): scored while the previous is emitted
        try:
            while True:
                batch = await queue.get()
                if isinstance(batch, Exception):
                    raise batch
                scoring = None
                if batch is not None:
                    shares = self._parse(batch)
                    items = [item for share in shares for _, item in share.valid]
                    future = loop.run_in_executor(executor, self._predict, items) if items else None
                    scoring = (batch, shares, future)
                if in_flight is not None:
                    await self._finish_batch(*in_flight, sender, progress)
                if scoring is None:
                    break
                in_flight = scoring
            await reader
        finally:
            reader.cancel()
            # Wait for the batch being scored (at most one): left running, it went on into a scorer the run then
            # closed, and a Ctrl-C printed its "cannot schedule new futures after shutdown" traceback.
            executor.shutdown(wait=True, cancel_futures=True)

    def _predict(self, items: list) -> list:
        """The model's predictions, or with ``--scores-from`` the source run's (the model's where it has none)."""
        if self.plan.reused is None:
            return self.scoring.score([item.text for item in items])
        return self.plan.reused.predict(items, self.scoring.score)

    def _parse(self, batch: list[TimedMessage]) -> tuple[_Share, _Share]:
        """The warm-up's and the range's messages of one batch, parsed (apart: their rejections are counted apart)."""
        shares = []
        for in_warmup in (True, False):
            messages = [m for m in batch if (m.event_ms < self.plan.from_ms) == in_warmup]
            before = Counter(self.scoring.rejected)
            valid, _ = self.scoring.parse([SourceMessage(m.topic, m.partition, m.offset, m.key, m.value)
                                           for m in messages])
            shares.append(_Share(messages, valid, self.scoring.rejected - before))
        return shares[0], shares[1]

    async def _finish_batch(self, batch: list[TimedMessage], shares: tuple[_Share, _Share], future,
                            sender: RecordSender, progress) -> None:
        predictions = await future if future is not None else []
        warm, live = shares
        warm_records = self._scored(warm, predictions[:len(warm.valid)])
        live_records = self._scored(live, predictions[len(warm.valid):])
        if warm.messages:
            tally = self.warmup
            tally.inputs += len(warm.messages)
            tally.scored += len(warm_records)
            tally.rejected.update(warm.rejected)
            first = min(m.event_ms for m in warm.messages)
            tally.first_input_ms = first if tally.first_input_ms is None else min(tally.first_input_ms, first)
        self.rejected.update(live.rejected)
        if self.plan.reused is not None:
            items = [item for share in shares for _, item in share.valid]
            reused = self.plan.reused.covered(items)
            self.counts["scores_reused"] += reused
            self.counts["scores_computed"] += len(items) - reused
        await self._emit(live, live_records, sender)
        records = [record for record, _, _ in warm_records + live_records]
        if records:
            for aggregator in self.aggregators:
                await self._windows_closed(aggregator.feed(records).final, sender)
        self.inputs_done += len(batch)
        self.last_input = identity_of(batch[-1])
        progress.update(len(batch))
        phase = "warm-up, " if batch[-1].event_ms < self.plan.from_ms else ""
        progress.set_postfix_str(f"{phase}event time {format_ms(batch[-1].event_ms)}", refresh=False)
        if self.inputs_done % self.plan.replay.part_records == 0:
            await self._end_part(sender)

    async def _read_batches(self, messages: AsyncIterator[TimedMessage], batch_size: int, queue: asyncio.Queue,
                            progress) -> None:
        """Fill ``queue`` with batches (the scorer works on one while the next is read); skip what a checkpoint
        already covers, checking that the input is the same as when it was made. A failure goes into the queue
        too: the replay waits on nothing else, and would wait forever."""
        try:
            await self._read_into(messages, batch_size, queue, progress)
        except (KafkaError, OSError, LookupError) as exc:
            await queue.put(_InputFailed(f"reading the input failed: {exc}"))
        except Exception as exc:  # noqa: BLE001 - ReplayError, or a bug: raised by the replay loop either way
            await queue.put(exc)

    async def _read_into(self, messages: AsyncIterator[TimedMessage], batch_size: int, queue: asyncio.Queue,
                         progress) -> None:
        skip, position, batch = self.inputs_done, 0, []
        async for message in messages:
            position += 1
            if position <= skip:
                if position == skip:
                    if identity_of(message) != self.last_input:
                        raise ReplayError(f"the input changed since the checkpoint: message {skip} is now "
                                          f"{identity_of(message)}, was {self.last_input}; start a new run")
                    progress.unpause()      # the time spent reading past them is not the replay's rate
                continue
            batch.append(message)
            if len(batch) == batch_size:
                await queue.put(batch)
                batch = []
        if position < skip:
            raise ReplayError(f"the input changed since the checkpoint: it now has {position} messages, the "
                              f"checkpoint covers {skip}; start a new run")
        if batch:
            await queue.put(batch)
        await queue.put(None)

    def _scored(self, share: _Share, predictions) -> list[tuple[ScoredRecord, dict, SourceMessage]]:
        """(scored record, its JSON fields, its input message) for each of ``share``'s valid messages the scorer
        could score; the others are added to the share's rejections."""
        before = Counter(self.scoring.rejected)
        scored = []
        for out in self.scoring.publishable(share.valid, predictions):
            if out.topic != self.plan.names.scored:
                continue    # per-ticker copies, and dead letters (unscorable, oversized record): counted by Scoring
            # Read back from the worker's JSON, as the live aggregator reads it. The run id is stamped, and
            # scored_at becomes the event time (no wall clock); the bytes keep ``to_json``'s layout.
            data = json.loads(out.value)
            data["scored_at"], data["run_id"] = data["event_time"], self.plan.run_id
            scored.append((ScoredRecord.from_dict(data), data, out.source))
        share.rejected.update(self.scoring.rejected - before)
        return scored

    async def _emit(self, share: _Share, scored, sender: RecordSender) -> None:
        """The range's scored records, to Parquet and the run's topic."""
        plan, names = self.plan, self.plan.names
        for record, data, message in scored:
            self.sink.add("scored", scored_row(record, message.topic, message.partition, message.offset))
            if plan.speed is not None:
                await self._pace(record.event_time)
            await sender.send(names.scored, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
                              key=record.topic.encode("utf-8"), event_time=record.event_time)
        self.counts["inputs"] += len(share.messages)
        self.counts["scored"] += len(scored)

    async def _windows_closed(self, trends: Iterable[TrendRecord], sender: RecordSender) -> None:
        plan, names = self.plan, self.plan.names
        for trend in trends:
            start_ms = epoch_ms(trend.window_start)
            if start_ms < plan.read_from_ms or epoch_ms(trend.window_end) > plan.to_ms:
                self.counts["windows_cut"] += 1
                continue
            # When a live worker would close it at the earliest: deterministic, unlike the wall clock.
            trend = dataclasses.replace(trend, emitted_at=trend.window_end + self.lateness)
            reported = start_ms >= plan.from_ms
            if reported:
                self.counts["trends"] += 1
                self.sink.add("trends", trend_row(trend))
                await sender.send(names.trends, trend.to_json(), key=trend_key(trend), event_time=trend.window_end)
            else:
                self.warmup.windows += 1
            self._clock = trend.emitted_at
            for alert in self.detector.feed([trend]):
                if reported and epoch_ms(alert.started_at) >= plan.from_ms:
                    self.counts[f"alerts_{alert.event_kind}"] += 1     # alerts_firing counts episodes
                    self.alerts.append(alert)
                    self.sink.add("alerts", alert_row(alert))
                    await sender.send(names.alerts, alert.to_json(), key=state_key(trend), event_time=alert.window_end)
                else:
                    self._hold_back(alert)

    def _hold_back(self, alert: AlertRecord) -> None:
        """An alert event of an episode that started in the warm-up: counted, and its firing remembered for the
        backtest (an escalation or resolve of it is not another episode)."""
        self.warmup.alerts_held_back += 1
        if alert.event_kind == "firing":
            self.warmup.held_back.append({"id": alert.id, "key_type": alert.key_type, "key": alert.key,
                                          "emitted_at": format_time(alert.emitted_at)})

    async def _pace(self, event_time) -> None:
        event_ms = epoch_ms(event_time)
        if self._pace_origin is None:
            self._pace_origin = (time.monotonic(), event_ms)
        wall0, event0 = self._pace_origin
        delay = wall0 + (event_ms - event0) / 1000 / self.plan.speed - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)

    async def _end_part(self, sender: RecordSender) -> None:
        part = (self.inputs_done - 1) // self.plan.replay.part_records
        self.files.extend(self.sink.write(part))
        await sender.flush()
        self._save_checkpoint()

    async def _finish(self, sender: RecordSender) -> None:
        for aggregator in self.aggregators:
            await self._windows_closed(aggregator.flush(), sender)
        # The end's rows start a part of their own when the last part is full: so a run resumed from that part's
        # checkpoint writes exactly the same files.
        part = self.inputs_done // self.plan.replay.part_records
        self.files.extend(self.sink.write(part))
        self.files = sorted(set(self.files))
        await sender.flush()
        for name in ("disorder_exceeded", "outliers", "stopped_early"):
            self.counts[name] = getattr(self.selection_stats, name)
        manifest = self.manifest()
        tmp = self.plan.out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.plan.out_dir / MANIFEST)
        (self.plan.out_dir / CHECKPOINT).unlink(missing_ok=True)

    def manifest(self) -> dict:
        """What the run is: the outputs' README. Deterministic but for ``created_at`` (when the run was first
        started, wall clock)."""
        plan = self.plan
        counts = dict(sorted(self.counts.items()))
        counts["rejected"] = dict(sorted(self.rejected.items()))
        effective = {"aggregate": dataclasses.asdict(plan.settings.section("aggregate", AggregateSettings)),
                     "detect": dataclasses.asdict(plan.settings.section("detect", DetectSettings))}
        # How the scores were computed: bf16 or float32 moves a row or two in a thousand.
        scored_on = dict(zip(("device", "precision"), runs_on(plan.scorer)))
        stats = self.selection_stats
        # Only where Kafka could not vouch for all of the range (select.complete_span): the wall clock decides it.
        incomplete = ({"incomplete_input": {name: getattr(stats, name) for name in INCOMPLETE_FIELDS}}
                      if stats.complete_to_ms is not None
                      and (stats.complete_from_ms, stats.complete_to_ms) != (plan.read_from_ms, plan.to_ms) else {})
        return {**plan.identity(), "output_schema_version": OUTPUT_SCHEMA_VERSION, "counts": counts,
                "files": sorted(self.files), "topics_out": output_topics(plan.names), "config": effective,
                "scored_on": scored_on, "warmup": self._warmup_summary(), **incomplete, "created_at": self.created_at}

    def _warmup_summary(self) -> dict:
        """The warm-up asked for, how far back the input really reached, and what it read (``WarmupTally``)."""
        warmup, tally = self.plan.warmup, self.warmup
        first = tally.first_input_ms
        # Short when the input starts a whole judged window after the warm-up's start, or has nothing in it.
        short = warmup.seconds > 0 and (first is None or first - warmup.start_ms >= warmup.window_s * 1000)
        covered_s = 0 if first is None else (self.plan.from_ms - max(first, warmup.start_ms)) // 1000
        tally_fields = {k: v for k, v in tally.to_dict().items() if k not in ("first_input_ms", "held_back")}
        return {**warmup.describe(), "first_input": None if first is None else format_ms(first),
                "covered_s": covered_s, "short": short, **tally_fields, "held_back": tally.held_back}

    # ------------------------------------------------------------ the test endpoint

    async def _start_dispatcher(self):
        from alerts.dispatch import Dispatcher
        from alerts.endpoints import load_delivery_config
        plan = self.plan
        endpoint = endpoint_named(load_delivery_config(plan.settings), plan.test_endpoint)
        only_test = plan.settings.with_overrides({"alerts": {
            "endpoints": [dataclasses.asdict(endpoint)], "replay_endpoint": plan.test_endpoint,
            "group_id": dispatcher_group(plan.settings, plan.run_id)}})
        dispatcher = Dispatcher(only_test, plan.names)
        await dispatcher.start()
        return dispatcher

    async def _await_deliveries(self, dispatcher) -> Counter:
        from alerts.deliveries import DELIVERED, delivery_key
        from alerts.dispatch import route
        endpoint = dispatcher.endpoints[self.plan.test_endpoint]
        keys, given = set(), set()    # what the dispatcher takes on; the episodes it gave the endpoint a firing of
        for alert in self.alerts:
            if route(alert, [endpoint], lambda _: alert.id in given):
                keys.add(delivery_key(alert.event_id, endpoint.name))
                if alert.status == "firing":
                    given.add(alert.id)
        deadline = time.monotonic() + self.plan.replay.delivery_timeout_s
        while True:
            states = [dispatcher.log.get(k) for k in keys]
            if all(s is not None and s.terminal for s in states) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        delivered = sum(1 for s in states if s is not None and s.state == DELIVERED)
        finished = sum(1 for s in states if s is not None and s.terminal)
        return Counter({"test_endpoint_delivered": delivered, "test_endpoint_failed": finished - delivered,
                        "test_endpoint_unfinished": len(keys) - finished})


# ---------------------------------------------------------------- sources

class _ArchiveSource:
    """The archive selection in the shape of a Kafka one (an async context with ``total``)."""

    def __init__(self, selection):
        self.selection = selection
        self.total = selection.total

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def __iter__(self):
        return iter(self.selection)


def _open_source(plan: ReplayPlan):
    if plan.archive is not None:
        return _ArchiveSource(plan.archive)
    return KafkaSelection(plan.settings.kafka, plan.topics, plan.read_from_ms, plan.to_ms, plan.replay.max_disorder_s)


async def _as_async(source) -> AsyncIterator[TimedMessage]:
    if hasattr(source, "__aiter__"):
        async for message in source:
            yield message
    else:
        for i, message in enumerate(source):
            yield message
            if i % 1000 == 999:
                await asyncio.sleep(0)     # let the scorer's results and the producer through


def run_replay(plan: ReplayPlan, show_progress: bool = True) -> dict:
    """Run ``plan`` to the end; raises ``ReplayInterrupted`` on Ctrl-C (after the last checkpoint is safe)."""
    runner = ReplayRunner(plan, show_progress)
    try:
        manifest = asyncio.run(runner.run())
    except KeyboardInterrupt:
        raise ReplayInterrupted(runner._resume_hint()) from None
    manifest["elapsed_s"] = round(runner.seconds, 3)
    return manifest


__all__ = ["ReplayInterrupted", "ReplayRunner", "run_replay"]
