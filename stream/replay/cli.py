"""Subcommands owned by ``stream.replay``: ``replay``, ``export``, ``backtest`` and ``runs``."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys

from models.interface import CPU_PRECISIONS

from .plan import ReplayError

SCORERS = ["auto", "model", "baseline", "noop"]
REPLAY_EXAMPLES = """examples:
  finpulse replay --from 2026-03-02T09:00Z --to 2026-03-02T17:00Z --run-id oil-day
  finpulse replay --from 2026-03-02T09:00Z --to 2026-03-02T17:00Z --run-id oil-day-new \\
      --model var/models/<version> --config thresholds.toml    # another model, other [detect] thresholds
  finpulse replay --from 2026-03-02T09:00Z --to 2026-03-02T17:00Z --run-id oil-day-z4 \
      --scores-from oil-day --config z4.toml      # other thresholds on oil-day's scores: no re-scoring
  finpulse replay --from 2026-01-01T00:00Z --to 2026-02-01T00:00Z --run-id jan --archive var/archive
  finpulse replay --from 2026-03-02T09:00Z --to 2026-03-02T10:00Z --run-id oil-hour --warmup 2h
  finpulse backtest --run-id oil-day --events events.csv --prices prices.csv
  finpulse backtest --run-id oil-day --run-id oil-day-z4 --events events.csv    # side by side
  finpulse runs                                    # every run: range, warm-up, model, status, counts
  finpulse runs delete oil-day --yes               # its topics and its Parquet directory
"""
NOTHING_SELECTED = ("no input message has an event time in [--from, --to): check the range and --topics; history "
                    "loaded after newer data is found only with a --max-disorder that covers the gap (the ingest "
                    "that wrote it said how much)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-run a past event-time range with a chosen model and thresholds into isolated "
                                      "outputs (topics finpulse.replay.<run-id>.* and Parquet)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Re-scores the input messages whose event time lies in [--from, --to) with the model "
                                   "and thresholds given, and writes scored records, trends and alerts to the run's own "
                                   "topics and to Parquet (<out_dir>/<run-id>/, with manifest.json). Live topics, "
                                   "consumer groups and alert endpoints are never touched. Before --from it reads a "
                                   "warm-up (--warmup) that builds windows and detector baselines as live had them, "
                                   "and writes nothing of it. Interrupted (Ctrl-C, a crash), the same command resumes "
                                   "from its last checkpoint.",
                       epilog=REPLAY_EXAMPLES)
    _range_args(p)
    p.add_argument("--run-id", required=True, help="names the run's topics and output directory ([A-Za-z0-9_-])")
    p.add_argument("--model", dest="model_dir", metavar="DIR", help="a trained model directory (default: as [worker])")
    p.add_argument("--scorer", choices=SCORERS, help="which scorer (default [worker] scorer; --model implies model)")
    p.add_argument("--scores-from", metavar="RUN_ID",
                   help="reuse the scores of that earlier run (its id, or its directory) instead of scoring again (a "
                        "threshold trial: give --config); messages it has none for, like the warm-up, are scored by "
                        "its model")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="how the model computes on a CPU (default: as [worker] cpu_precision); int8 is stamped on "
                        "the outputs' model version (<version>+int8)")
    p.add_argument("--config", dest="replay_config", metavar="FILE",
                   help="TOML with the replay's thresholds, laid over the settings: only [aggregate] and [detect] "
                        "(any other section is refused: the broker, topics and endpoints come from finpulse --config)")
    p.add_argument("--warmup", metavar="DURATION",
                   help="read and score this long before --from to build windows and baselines, writing nothing of "
                        "it: e.g. 30m, 2h, 0 for a cold start (default auto: [detect] warmup_windows x window_s)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", help="pace the records sent to the run's topics at this multiple of event time, e.g. "
                                      "10x (what is computed and written to Parquet is the same)")
    pace.add_argument("--max-speed", action="store_true", help="as fast as possible (the default)")
    p.add_argument("--archive", metavar="DIR", help="read inputs from a `finpulse export` archive instead of Kafka")
    p.add_argument("--parquet", metavar="DIR", help="Parquet output directory (default [replay] out_dir/<run-id>)")
    p.add_argument("--test-endpoint", metavar="NAME",
                   help="deliver the run's alerts to this endpoint, which must be [alerts] replay_endpoint")
    p.add_argument("--batch-size", type=int, help="texts per scorer call (default [replay] batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_replay)

    p = sub.add_parser("export", help="archive input topics to Parquet partitioned by event-time day (replay --archive "
                                      "reads it, past Kafka's retention)")
    _range_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="archive directory (new, or an archive to add to)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)

    p = sub.add_parser("backtest", help="score a replay run's alerts against labeled events and prices: HTML + JSON report")
    p.add_argument("--run-id", required=True, action="append", dest="run_ids", metavar="RUN_ID",
                   help="the replay run to judge (as given to finpulse replay); give several to compare them side by "
                        "side (each gets its own report too)")
    p.add_argument("--parquet", metavar="DIR", help="the run's output directory (default [replay] out_dir/<run-id>)")
    p.add_argument("--events", metavar="CSV", help="labeled events: key,start,end (key: AAPL, ticker:AAPL or topic:<label>)")
    p.add_argument("--prices", metavar="CSV", help="prices: ticker,timestamp,price")
    p.add_argument("--out", metavar="DIR", help="where report.html and report.json go (default: the run's directory); "
                                               "comparing runs, comparison.json goes there and each run's report to "
                                               "its own directory")
    p.add_argument("--match-before", default="1h",
                   help="an alert this long before an event's start still detects it (default 1h)")
    p.set_defaults(func=_backtest)

    p = sub.add_parser("runs", help="list replay runs (directories and topics), or delete one")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    p.set_defaults(func=_runs_list)
    runs = p.add_subparsers(dest="runs_command", metavar="ACTION")
    p = runs.add_parser("list", help="every run in [replay] out_dir or on the broker (the default)")
    # SUPPRESS: absent here, `runs --json list` keeps the --json given before the action.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="one JSON object per run instead of a table")
    p.set_defaults(func=_runs_list)
    p = runs.add_parser("delete", help="delete a run: its topics, its test-endpoint consumer group and its Parquet "
                                       "directory (never anything that is not that run's)")
    p.add_argument("run_id", metavar="RUN_ID", help="the run to delete, as given to finpulse replay --run-id")
    p.add_argument("--parquet", metavar="DIR", help="the run's directory, if not [replay] out_dir/<run-id>")
    p.add_argument("--yes", action="store_true", help="delete; without it, only say what would be deleted")
    p.set_defaults(func=_runs_delete)


def _range_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="start", required=True, metavar="T1",
                   help="event time, ISO-8601 (without an offset: UTC) or epoch seconds/milliseconds (inclusive)")
    p.add_argument("--to", dest="end", required=True, metavar="T2",
                   help="event time, ISO-8601 (without an offset: UTC) or epoch seconds/milliseconds (exclusive)")
    p.add_argument("--topics", default="news,comments", help="input topics: news, comments or both (default both)")
    p.add_argument("--max-disorder", metavar="DURATION",
                   help="how far out of order timestamps may be within a partition (default [replay] max_disorder_s)")


def _device(value: str) -> str:
    # Checked here, as the scorer would only see it after the input is read (and the baseline never).
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return value


def _fail(command: str, exc: Exception) -> int:
    print(f"finpulse {command}: error: {exc}", file=sys.stderr)
    return 2


def _warn(command: str, warnings: list[str]) -> None:
    for warning in warnings:
        print(f"finpulse {command}: warning: {warning}", file=sys.stderr)


def _replay(args, settings) -> int:
    from .plan import build_plan
    from .run import ReplayInterrupted, run_replay
    from .select import selection_warnings, span_warnings
    try:
        plan = build_plan(settings, run_id=args.run_id, start=args.start, end=args.end, topics=args.topics,
                          config=args.replay_config, scorer=args.scorer, model_dir=args.model_dir, device=args.device,
                          speed=args.speed, archive=args.archive, parquet=args.parquet,
                          test_endpoint=args.test_endpoint, max_disorder=args.max_disorder, batch_size=args.batch_size,
                          warmup=args.warmup, scores_from=args.scores_from,
                          cpu_precision=args.cpu_precision)
    except ReplayError as exc:
        return _fail("replay", exc)
    if plan.archive is not None:
        _warn("replay", archive_gap_warnings(plan.archive.uncovered, plan.from_ms))
    warmup = plan.warmup
    if 0 < warmup.seconds < warmup.need_s:
        _warn("replay", [f"--warmup {warmup.asked} is shorter than the {warmup.need_s}s the detector learns before it "
                         f"may alert ([detect] warmup_windows x window_s): keys are not warm at --from, so alerts "
                         f"near it may be missing (--warmup auto reads just enough)"])
    if plan.resume:
        print(f"resuming run {plan.run_id} after input message {plan.resume['inputs_done']}", flush=True)
    try:
        manifest = run_replay(plan, show_progress=not args.no_progress)
    except ReplayInterrupted as exc:
        print(f"finpulse replay: {exc}", file=sys.stderr)
        return 130
    except ReplayError as exc:
        return _fail("replay", exc)
    counts = manifest["counts"]
    rate = counts.get("inputs", 0) / manifest["elapsed_s"] if manifest["elapsed_s"] else 0.0
    warmup = manifest["warmup"]
    print(f"replay {plan.run_id}: {counts.get('inputs', 0)} messages -> {counts.get('scored', 0)} scored, "
          f"{sum(counts['rejected'].values())} rejected, {counts.get('trends', 0)} windows, "
          f"{counts.get('alerts_firing', 0)} alerts fired / {counts.get('alerts_escalation', 0)} escalated / "
          f"{counts.get('alerts_resolved', 0)} resolved "
          f"in {manifest['elapsed_s']:.1f}s ({rate:.0f} msg/s); warm-up from {warmup['from']} "
          f"({warmup['inputs']} messages, {warmup['alerts_held_back']} alert events held back); model "
          f"{manifest['model_version']}, config {manifest['config_hash']}; Parquet in {plan.out_dir}; topics "
          f"{', '.join(manifest['topics_out'])}")
    if plan.reused is not None:
        print(f"scores of run {plan.reused.source_run} reused for {counts.get('scores_reused', 0)} messages; "
              f"{counts.get('scores_computed', 0)} it had none for were scored by {plan.model_version}")
    _warn("replay", selection_warnings(counts, plan.replay.max_disorder_s) + warmup_warnings(manifest)
          + span_warnings(manifest.get("incomplete_input", {}), "they are missing from this replay"))
    if not counts.get("inputs"):
        _warn("replay", [NOTHING_SELECTED])
    if plan.test_endpoint:
        print(f"test endpoint {plan.test_endpoint}: {counts.get('test_endpoint_delivered', 0)} delivered, "
              f"{counts.get('test_endpoint_failed', 0)} failed, {counts.get('test_endpoint_unfinished', 0)} unfinished")
        if counts.get("test_endpoint_failed") or counts.get("test_endpoint_unfinished"):
            return 1
    return 0


def archive_gap_warnings(gaps: list[tuple[int, int]], from_ms: int) -> list[str]:
    """The archive's gaps, those of the warm-up apart from those of the range itself."""
    from .select import format_ms
    warnings = []
    for what, part in (("warm-up", [(a, min(b, from_ms)) for a, b in gaps if a < from_ms]),
                       ("range", [(max(a, from_ms), b) for a, b in gaps if b > from_ms])):
        if part:
            spans = ", ".join(f"{format_ms(a)} to {format_ms(b)}" for a, b in part)
            missing = "this replay's warm-up lacks them" if what == "warm-up" else "they are missing from this replay"
            warnings.append(f"the archive holds no export of {spans}: messages of that time are not read, "
                            f"{missing} (export them first)")
    return warnings


def warmup_warnings(manifest: dict) -> list[str]:
    """What a person should know about a run's warm-up: the input did not reach back as far as it asked."""
    warmup = manifest["warmup"]
    if not warmup["short"]:
        return []
    if warmup["first_input"] is None:
        reach = "no input message lies in it: the run started cold, as with --warmup 0"
    else:
        reach = (f"the input reaches back only to {warmup['first_input']} ({warmup['covered_s']}s before "
                 f"--from)")
    return [f"the warm-up asked for [{warmup['from']}, {manifest['from']}) ({warmup['rule']}) but {reach}; keys "
            "whose baselines were not warmed cannot alert until they are, so alerts near --from may be missing or "
            "differ from what live said"]


def _export(args, settings) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from stream.topics import TopicNames

    from .archive import ArchiveError, check_export_dir, export_archive
    from .plan import ReplaySettings, parse_disorder, parse_range, parse_topics
    from .select import KafkaSelection, format_ms, selection_warnings, span_warnings

    try:
        from_ms, to_ms = parse_range(args.start, args.end)
        topics = parse_topics(args.topics, TopicNames(settings.kafka.topic_prefix))
        disorder = parse_disorder(args.max_disorder, settings.section("replay", ReplaySettings).max_disorder_s)
        out = Path(args.out)
        check_export_dir(out)
    except (ReplayError, ArchiveError) as exc:
        return _fail("export", exc)

    async def export() -> int:
        try:
            async with KafkaSelection(settings.kafka, topics, from_ms, to_ms, disorder) as selection:
                with tqdm(total=selection.total, unit="msg", desc="export", disable=args.no_progress) as progress:
                    result = await export_archive(selection, out, from_ms, to_ms, sorted(topics), progress,
                                                  (selection.stats.complete_from_ms, selection.stats.complete_to_ms))
                    progress.total = progress.n     # the total was an estimate (select.KafkaSelection.total)
        except LookupError as exc:
            return _fail("export", exc)
        except TimeoutError as exc:      # the broker gone: nothing of this export was kept (stream.replay.archive)
            return _fail("export", f"{exc}; nothing of this export was kept: run it again")
        print(f"exported {result.rows} message(s) to {out} ({len(result.files)} file(s), days "
              f"{', '.join(result.days) or 'none'})")
        stats = dataclasses.asdict(selection.stats)
        _warn("export", selection_warnings(stats, disorder) + span_warnings(
            stats, f"the archive records only {format_ms(stats['complete_from_ms'])} to "
                   f"{format_ms(stats['complete_to_ms'])} of the range as exported"))
        if not result.rows:
            _warn("export", [NOTHING_SELECTED])
        return 0

    return asyncio.run(export())


def _runs_list(args, settings) -> int:
    import json

    from .runs import format_runs, list_runs
    runs, warnings = list_runs(settings)
    if args.json:
        for run in runs:
            print(json.dumps(dataclasses.asdict(run), sort_keys=True))
    elif runs:
        print(format_runs(runs))
    else:
        print("no replay runs")
    _warn("runs", warnings)
    return 0


def _runs_delete(args, settings) -> int:
    from pathlib import Path

    from .plan import ReplaySettings
    from .runs import delete_run, plan_deletion
    try:
        deletion = plan_deletion(settings, args.run_id, args.parquet)
        if not args.yes:
            print(f"would delete run {args.run_id}: {'; '.join(deletion.describe())}")
            print("run again with --yes to delete it")
            return 1
        delete_run(settings, deletion)
    except ReplayError as exc:
        return _fail("runs delete", exc)
    print(f"deleted run {args.run_id}: {'; '.join(deletion.describe())}")
    if deletion.directory is None and not args.parquet:
        print(f"no directory {Path(settings.section('replay', ReplaySettings).out_dir) / args.run_id} was there: if "
              f"the run wrote its Parquet elsewhere (--parquet DIR), delete it with `finpulse runs delete "
              f"{args.run_id} --parquet DIR --yes`")
    return 0


def _backtest(args, settings) -> int:
    from .backtest import compare_runs, format_comparison, run_backtest
    try:
        if len(args.run_ids) > 1:
            if args.parquet:
                raise ReplayError("--parquet names one run's directory: comparing runs reads them from [replay] out_dir")
            comparison = compare_runs(settings, args.run_ids, events=args.events, prices=args.prices, out=args.out,
                                      match_before=args.match_before)
            print(format_comparison(comparison))
            if "path" in comparison:
                print(f"comparison: {comparison['path']}; each run's report in its own directory")
            return 0
        (run_id,) = args.run_ids
        report = run_backtest(settings, run_id=run_id, run_dir=args.parquet, events=args.events,
                              prices=args.prices, out=args.out, match_before=args.match_before)
    except ReplayError as exc:
        return _fail("backtest", exc)
    print(f"backtest {run_id}: {report['paths']['html']} and {report['paths']['json']}")
    return 0
