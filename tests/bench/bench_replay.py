"""Replay throughput as a ratio to the live worker's, with the same scorer, in the same run (goal >= 1.0: replaying
the past is never slower than living it).

Both sides read the same SIMULATED messages, pre-loaded into one set of input topics on the embedded broker:

* **live**: the real ``finpulse worker`` (scoring, aggregation, detection: everything it runs in production) on
  those topics. Two rates, from the wall-clock stamps of its outputs: *scoring* is messages per second between its
  first and last scored batch (``scored_at``; start-up and the first batch not counted), the scoring stage alone;
  *end to end* is messages per second from its first scored batch to the last window it closed (the latest
  ``emitted_at`` of a final trend, once the trends topic is quiet), i.e. the same work a replay does. The ratio
  that counts is against end to end; the one against scoring alone is printed too.
* **replay**: ``finpulse replay`` of the whole range, in this process, once the worker has stopped; its rate is
  messages over the whole run (planning the selection, creating topics, reading, scoring, aggregating, detecting,
  producing to its topics, writing Parquet, closing the last windows): start-up included, so the ratio is
  conservative.

Each side runs ``--repeat`` times, alternating, and each side's best run counts (the machine may be shared).
``--scorer`` picks the scorer for both (default ``baseline``: the stream overheads dominate, the hard case for
replay; ``auto``/``model``: the newest trained model, where scoring dominates both).

Then a threshold trial (``--scores-from``) on the last replay's scores, same inputs: its rate as a ratio to the full
replay's, which is what a threshold sweep saves per run.

    python -m tests.bench replay [-- --messages 20000 --scorer baseline --json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from stream.broker import EmbeddedBroker
from stream.config import Settings
from stream.records import format_time
from stream.replay.plan import build_plan
from stream.replay.run import run_replay
from stream.simulate import Shock, generate
from stream.kafka_io import read_topic, topic_sizes
from stream.records import parse_time
from stream.topics import TopicNames
from tests.bench.bench_stream import batch_rate, best_of_alternating, preload, read_scored
from tests.procs import start_worker

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
TARGET = 1.0
QUIET_S = 7.0     # longer than [aggregate] partial_interval_s: no trend at all for this long means the worker is done


def last_window_closed(settings: Settings) -> float:
    """Epoch seconds at which the worker closed its last window, once its trends topic has been quiet a while."""
    topic = TopicNames(settings.kafka.topic_prefix).trends
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < QUIET_S:
        time.sleep(1.0)
        size = asyncio.run(topic_sizes(settings.kafka, [topic]))[topic]   # a count, not a read of the whole topic
        if size != seen:
            seen, quiet_since = size, time.monotonic()
    finals = [json.loads(t.value) for t in read_topic(settings.kafka, topic) if json.loads(t.value)["final"]]
    return max(parse_time(t["emitted_at"]) for t in finals).timestamp()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tests.bench replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--scorer", default="baseline", choices=["auto", "model", "baseline"])
    parser.add_argument("--max-batch", type=int, default=256, help="the worker's max_batch and the replay's batch_size")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (each side's best run counts)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)

    # About 400 s of event time whatever the count: enough for windows to close (and the shock to alert) live.
    rate = max(5.0, args.messages / 400)
    messages = list(generate(seed=42, start=START, rate=rate, count=args.messages, shock=Shock(at_s=120)))
    valid = sum(1 for m in messages if not m.expected_reason)
    end = messages[-1].event_time + timedelta(seconds=1)
    print(f"SIMULATED input: {len(messages)} messages over {(end - START).total_seconds():.0f}s of event time, "
          f"4 partitions, embedded tansu broker; scorer {args.scorer}, batches of {args.max_batch}", flush=True)
    figures: dict[str, float | str] = {"messages": len(messages), "scorer": args.scorer, "max_batch": args.max_batch}
    with tempfile.TemporaryDirectory(prefix="finpulse-bench-replay-") as tmp, \
            EmbeddedBroker(log_file=Path(tmp) / "tansu.log") as broker:
        tmp_path = Path(tmp)

        def settings_for(prefix: str) -> Settings:
            return Settings(raw={
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 4, "topic_prefix": prefix},
                "worker": {"app_id": f"{prefix}-worker", "scorer": args.scorer, "max_batch": args.max_batch,
                           "max_wait_s": 0.2, "data_dir": str(tmp_path / prefix), "log_level": "info"},
                "replay": {"batch_size": args.max_batch, "out_dir": str(tmp_path / "replay")},
            })

        prepared: dict[int, Settings] = {}
        scoring_rates: list[float] = []

        def live_run(attempt: int) -> float:
            settings = prepared[attempt] = settings_for(f"bench-replay{attempt}")
            asyncio.run(preload(settings, messages))
            with start_worker(settings, tmp_path, f"worker{attempt}", ready_timeout=180):
                values = asyncio.run(read_scored(settings, valid))
                closed_at = last_window_closed(settings)
            first_scored = min(parse_time(json.loads(v)["scored_at"]) for v in values).timestamp()
            scoring_rates.append(batch_rate(values))
            return valid / (closed_at - first_scored)

        def replay_run(attempt: int) -> float:
            plan = build_plan(prepared[attempt], run_id=f"bench{attempt}", start=format_time(START),
                              end=format_time(end))
            manifest = run_replay(plan, show_progress=False)
            figures.setdefault("model_version", manifest["model_version"])
            return manifest["counts"]["inputs"] / manifest["elapsed_s"]

        figures["live_end_to_end_per_s"], figures["replay_per_s"] = best_of_alternating(
            args.repeat, ("live worker, end to end", live_run), ("replay", replay_run))
        figures["live_scoring_per_s"] = max(scoring_rates)
        # A threshold trial on the last replay's scores (--scores-from), on the same inputs: what a sweep costs.
        last = max(prepared)
        trial = run_replay(build_plan(prepared[last], run_id="bench-trial", start=format_time(START),
                                      end=format_time(end), scores_from=f"bench{last}"), show_progress=False)
        figures["trial_per_s"] = trial["counts"]["inputs"] / trial["elapsed_s"]
    figures["ratio_replay_to_live"] = round(figures["replay_per_s"] / figures["live_end_to_end_per_s"], 3)
    figures["ratio_replay_to_live_scoring"] = round(figures["replay_per_s"] / figures["live_scoring_per_s"], 3)
    figures["ratio_trial_to_replay"] = round(figures["trial_per_s"] / figures["replay_per_s"], 3)
    ok = figures["ratio_replay_to_live"] >= TARGET
    print(f"\n{'':40}{'msg/s':>10}\n"
          f"{'live worker, end to end':40}{figures['live_end_to_end_per_s']:>10,.0f}\n"
          f"{'live worker, scoring stage alone':40}{figures['live_scoring_per_s']:>10,.0f}\n"
          f"{'replay (whole run, start-up included)':40}{figures['replay_per_s']:>10,.0f}\n"
          f"replay / live end to end = {figures['ratio_replay_to_live']:.2f} (goal >= {TARGET}: "
          f"{'met' if ok else 'NOT met'}); replay / live scoring stage = "
          f"{figures['ratio_replay_to_live_scoring']:.2f}; model {figures.get('model_version')}\n"
          f"threshold trial on those scores (--scores-from): {figures['trial_per_s']:,.0f} msg/s = "
          f"{figures['ratio_trial_to_replay']:.2f} x the full replay", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
