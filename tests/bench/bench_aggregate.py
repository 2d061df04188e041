"""The aggregation path's throughput on the embedded broker, as ratios to baselines measured in the same run.

1. **aggregate agent / aggregator alone**: a Faust worker whose aggregate agent (default ``[aggregate]`` windows)
   drains a backlog of scored records for 20 topics, pre-loaded into ``finpulse.scored``, against
   ``WindowAggregator.feed`` on the same records in batches of the same size: the same window arithmetic without
   Kafka, Faust or a table. The agent's side includes reading, one table read and write per key per batch,
   publishing the closed windows and waiting until the broker has them and the table's changelog records before a
   batch is acked. The agent must keep well ahead of what the scorer delivers (``bench stream``); no target.
2. **table writes awaited / not awaited**: the same agent, against one whose batches end without waiting for their
   table writes (Faust's own behaviour, which can lose them: ``stream.confirmed_table``): what the wait costs.

The agent's rate is records per second from its first batch's changelog writes to the write that completes the
backlog (Kafka timestamps of the ``aggregate-topic`` changelog; the first batch, with start-up, is not counted), the
baseline's over all its batches.

    python -m tests.bench aggregate [-- --records 100000 --json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from stream.aggregate import AggregateSettings, WindowAggregator
from stream.broker import EmbeddedBroker
from stream.config import Settings, load_settings
from stream.kafka_io import RecordSender, read_topic
from stream.records import ScoredRecord
from stream.topics import TopicNames, ensure_topics
from tests.bench.bench_stream import best_of_alternating
from tests.procs import ManagedProcess, write_config

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
TOPICS = [f"Bench topic {i:02d}" for i in range(20)]
SENTIMENTS = (("bearish", -0.8), ("neutral", 0.0), ("bullish", 0.7))
FIRST_BATCH_MS = 50


def scored_records(count: int, rate_per_s: float = 20.0) -> list[ScoredRecord]:
    """``count`` scored records, round-robin over 20 topics, at the demo's rate in event time."""
    return [ScoredRecord(id=f"b{i}", kind="news", event_time=START + timedelta(seconds=i / rate_per_s),
                         text=f"bench message {i}", topic=TOPICS[i % len(TOPICS)], topic_confidence=0.9,
                         sentiment=SENTIMENTS[i % 3][0], sentiment_score=SENTIMENTS[i % 3][1], tickers=(),
                         model_version="bench", scored_at=START)
            for i in range(count)]


def aggregator_alone_rate(records: list[ScoredRecord], batch: int) -> float:
    aggregator = WindowAggregator(AggregateSettings(), "topic")
    began = time.perf_counter()
    for i in range(0, len(records), batch):
        aggregator.feed(records[i:i + batch])
    return len(records) / (time.perf_counter() - began)


async def preload(settings: Settings, records: list[ScoredRecord]) -> None:
    names = TopicNames(settings.kafka.topic_prefix)
    async with RecordSender(settings.kafka, client_id="bench-aggregate", linger_ms=20) as sender:
        for record in records:
            await sender.send(names.scored, record.to_json(), key=record.topic.encode(),
                              event_time=record.event_time)
        await sender.flush()


def agent_rate(settings: Settings, count: int, log_dir: Path, name: str, confirmed: bool = True,
               timeout_s: float = 900.0) -> float:
    """Start the worker on the pre-loaded backlog, wait until its table has applied every record, stop it, and
    measure from the changelog: records applied after its first batch, over the time to the write that completes
    the backlog."""
    changelog = f"{settings.worker.app_id}-aggregate-topic-changelog"
    config = write_config(settings, log_dir / f"{name}.toml")
    cmd = [sys.executable, "-m", "tests.bench.bench_aggregate", "worker", str(config)] + ([] if confirmed else
                                                                                          ["--unconfirmed"])
    with ManagedProcess(cmd, log_dir, name).start() as worker:
        deadline = time.monotonic() + timeout_s
        try:
            worker.wait_for("Worker ready", timeout=180)
            while True:
                progress = _progress(read_topic(settings.kafka, changelog, 60))
                applied = progress[-1][1] if progress else 0
                if applied >= count:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: {applied} of {count} records aggregated in {timeout_s:.0f}s")
                time.sleep(1.0)
        except BaseException:
            print(worker.tail(), file=sys.stderr)
            raise
    writes = sorted(read_topic(settings.kafka, changelog, 60), key=lambda r: r.timestamp_ms)
    progress = _progress(writes)
    # The first batch's writes leave within a few milliseconds of each other; what it applied is start-up. The
    # end is the write that completes the backlog: the settle timer writes again later, when windows close.
    began_ms, applied_first = max(p for p in progress if p[0] <= progress[0][0] + FIRST_BATCH_MS)
    ended_ms = next(t for t, applied in progress if applied >= count)
    return (count - applied_first) / ((ended_ms - began_ms) / 1000.0)


def _progress(changelog: list) -> list[tuple[int, int]]:
    """(timestamp, records applied so far) after each changelog write, summed over source partitions: a
    partition's records are applied in order, so the highest offset any key state holds tells how far it got."""
    next_offsets: dict[str, int] = {}
    progress = []
    for write in changelog:
        for partition, offset in ((json.loads(write.value) if write.value else {}).get("offsets") or {}).items():
            next_offsets[partition] = max(next_offsets.get(partition, 0), int(offset) + 1)
        progress.append((write.timestamp_ms, sum(next_offsets.values())))
    return progress


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.bench aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="scored records in the backlog")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (each side's best run counts)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)

    records = scored_records(args.records)
    print(f"SIMULATED backlog: {args.records} scored records, {len(TOPICS)} topics, batches of {args.max_batch}, "
          "4 partitions, embedded tansu broker", flush=True)
    figures: dict[str, float | int] = {"records": args.records, "max_batch": args.max_batch}
    with tempfile.TemporaryDirectory(prefix="finpulse-bench-") as tmp, \
            EmbeddedBroker(log_file=Path(tmp) / "tansu.log") as broker:
        tmp_path = Path(tmp)

        def alone_run(attempt: int) -> float:
            return aggregator_alone_rate(records, args.max_batch)

        def agent_run(attempt: int, confirmed: bool = True) -> float:
            prefix = f"bench-agg{attempt}{'' if confirmed else '-unconfirmed'}"
            settings = Settings(raw={
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 4, "topic_prefix": prefix},
                "worker": {"app_id": f"{prefix}-worker", "data_dir": str(tmp_path / prefix), "scorer": "noop",
                           "max_batch": args.max_batch, "max_wait_s": 0.2}})
            names = TopicNames(prefix)
            ensure_topics(settings.kafka, names.all(), names.compacted())
            asyncio.run(preload(settings, records))
            return agent_rate(settings, args.records, tmp_path, f"worker-{prefix}", confirmed)

        (figures["aggregator_alone_per_s"], figures["agent_per_s"],
         figures["agent_unconfirmed_per_s"]) = best_of_alternating(
            args.repeat, ("aggregator alone", alone_run), ("Faust aggregate agent", agent_run),
            ("the same, table writes not awaited", lambda attempt: agent_run(attempt, confirmed=False)))
    figures["agent_vs_alone"] = figures["agent_per_s"] / figures["aggregator_alone_per_s"]
    figures["confirmed_vs_unconfirmed"] = figures["agent_per_s"] / figures["agent_unconfirmed_per_s"]
    print(f"  WindowAggregator alone              {figures['aggregator_alone_per_s']:>9,.0f} records/s")
    print(f"  Faust aggregate agent, backlog      {figures['agent_per_s']:>9,.0f} records/s   "
          f"ratio {figures['agent_vs_alone']:.2f} to the aggregator alone")
    print(f"  the same, table writes not awaited  {figures['agent_unconfirmed_per_s']:>9,.0f} records/s   "
          f"waiting for them costs {1 - figures['confirmed_vs_unconfirmed']:.0%} (ratio "
          f"{figures['confirmed_vs_unconfirmed']:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def _worker(config_path: str, unconfirmed: bool = False) -> int:
    """The benchmark's worker process: ``finpulse worker`` with the scoring and aggregate agents only;
    ``unconfirmed``: batches end without waiting for their table writes (Faust's own behaviour, the baseline)."""
    import logging

    from stream.confirmed_table import ConfirmedTable
    from stream.worker import run_worker

    if unconfirmed:
        async def not_awaited(table) -> None:
            table._unconfirmed.clear()
        ConfirmedTable.writes_delivered = not_awaited

    settings = load_settings(config_path)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return run_worker(settings, extensions=("stream.aggregate",))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(_worker(sys.argv[2], unconfirmed="--unconfirmed" in sys.argv[3:]))
    main(sys.argv[1:])
