"""``finpulse runs``: the replay runs there are, and deleting one.

A run lives in two places: its Parquet directory (``[replay] out_dir/<run-id>/``, or wherever ``--parquet`` put it)
and its topics on the broker (``<prefix>.replay.<run-id>.{scored,trends,alerts,deliveries}``). ``list_runs`` joins
both: the directories under ``out_dir`` that hold a manifest (complete) or a checkpoint (interrupted), and the run
ids of the broker's replay topics (a run whose directory is elsewhere, or gone, shows as ``topics only``).

``plan_deletion`` finds what ``delete_run`` may remove, and refuses anything that is not one replay run's:

* the directory only when its manifest or checkpoint names that run, and it holds nothing a replay or a backtest
  does not write (part files, manifest, checkpoint, report);
* the topics only under the run's own output names, and none when those names are the live topics of another
  FinPulse (one whose prefix is ``<prefix>.replay.<run-id>``);
* the consumer group of the run's test-endpoint dispatcher: left behind, it would resume a re-created run's alerts
  topic at the old run's offsets and skip its first alerts.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from stream.config import Settings
from stream.records import epoch_ms, format_time, parse_time
from stream.topics import TopicNames

from .output import TABLES
from .plan import (CHECKPOINT, MANIFEST, ReplayError, ReplaySettings, check_run_id, dispatcher_group, live_topics_of,
                   output_topics, read_json)

REPORT_FILES = ("report.json", "report.html")
# What a replay writes at the top of its directory (the dot files: writes in flight when it stopped).
RUN_FILES = {MANIFEST, CHECKPOINT, f".{MANIFEST}.tmp", f".{CHECKPOINT}.tmp", *REPORT_FILES}
PART_FILE = re.compile(r"^\.?part-\d{5}\.parquet(\.tmp)?$")
OUTPUT_SUFFIXES = ("scored", "trends", "alerts", "deliveries")


@dataclass
class RunInfo:
    """One run as ``finpulse runs`` shows it."""
    run_id: str
    status: str                      # complete | interrupted | topics only
    directory: str | None = None
    start: str | None = None
    end: str | None = None
    warmup_s: int | None = None
    model_version: str | None = None
    scores_from: str | None = None   # the run whose scores it reused (finpulse replay --scores-from)
    inputs: int | None = None        # messages of [from, to) done so far
    scored: int | None = None
    alerts_firing: int | None = None
    created_at: str | None = None
    topics: list[str] | None = field(default_factory=list)    # None: unknown (the broker did not answer)


def _mtime(path: Path) -> str:
    return format_time(datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc))


def read_run_dir(directory: Path) -> RunInfo | None:
    """The run a directory holds (from its manifest, else its checkpoint), or None when it holds none."""
    if (directory / MANIFEST).is_file():
        source, status = directory / MANIFEST, "complete"
    elif (directory / CHECKPOINT).is_file():
        source, status = directory / CHECKPOINT, "interrupted"
    else:
        return None
    try:
        saved = read_json(source)
    except ReplayError:
        return None
    identity = saved if status == "complete" else saved.get("identity", {})
    counts = saved.get("counts", {})
    return RunInfo(run_id=str(identity.get("run_id", directory.name)), status=status, directory=str(directory),
                   start=identity.get("from"), end=identity.get("to"), warmup_s=_warmup_of(identity),
                   model_version=identity.get("model_version"), scores_from=identity.get("scores_from"),
                   inputs=counts.get("inputs", 0),
                   scored=counts.get("scored", 0), alerts_firing=counts.get("alerts_firing", 0),
                   created_at=saved.get("created_at") or _mtime(source))


def _warmup_of(identity: dict) -> int | None:
    """How long before ``from`` the run started reading, in seconds (None for runs made before warm-ups)."""
    if not identity.get("warmup_from") or not identity.get("from"):
        return None
    return (epoch_ms(parse_time(identity["from"])) - epoch_ms(parse_time(identity["warmup_from"]))) // 1000


def replay_topics_by_run(settings: Settings, present: set[str]) -> dict[str, list[str]]:
    """{run id: its output topics} among the topic names ``present``; names that are the live topics of a FinPulse
    with prefix ``<prefix>.replay.<id>`` are not a run's."""
    prefix = f"{settings.kafka.topic_prefix}.replay."
    by_run: dict[str, list[str]] = {}
    foreign: set[str] = set()
    for topic in sorted(present):
        if not topic.startswith(prefix):
            continue
        run_id, _, suffix = topic[len(prefix):].partition(".")
        if suffix in OUTPUT_SUFFIXES:
            by_run.setdefault(run_id, []).append(topic)
        else:
            foreign.add(run_id)
    return {run_id: topics for run_id, topics in by_run.items() if run_id not in foreign}


def _broker_topics(settings: Settings) -> set[str]:
    from kafka.errors import KafkaError
    from stream.topics import BrokerUnreachable, admin_client
    try:
        admin = admin_client(settings.kafka, timeout_s=15)
    except BrokerUnreachable as exc:
        raise ReplayError(str(exc)) from None
    try:
        return set(admin.list_topics())
    except KafkaError as exc:
        raise ReplayError(f"cannot list topics on {settings.kafka.bootstrap_servers}: {exc}") from None
    finally:
        admin.close()


def list_runs(settings: Settings) -> tuple[list[RunInfo], list[str]]:
    """(every run in ``[replay] out_dir`` or on the broker, by run id; warnings). An unreachable broker is a warning:
    the directories are listed all the same."""
    out_dir = Path(settings.section("replay", ReplaySettings).out_dir)
    runs: dict[str, RunInfo] = {}
    if out_dir.is_dir():
        for directory in sorted(p for p in out_dir.iterdir() if p.is_dir()):
            info = read_run_dir(directory)
            if info is not None:
                runs.setdefault(info.run_id, info)
    warnings = []
    try:
        present = _broker_topics(settings)
    except ReplayError as exc:
        warnings.append(f"{exc}: the runs' topics are not shown")
        for info in runs.values():
            info.topics = None
        return [runs[k] for k in sorted(runs)], warnings
    for run_id, topics in replay_topics_by_run(settings, present).items():
        runs.setdefault(run_id, RunInfo(run_id=run_id, status="topics only")).topics = topics
    return [runs[k] for k in sorted(runs)], warnings


# ---------------------------------------------------------------- deleting

@dataclass
class Deletion:
    """What deleting a run removes: nothing outside it."""
    run_id: str
    directory: Path | None
    topics: list[str]
    group: str | None

    def describe(self) -> list[str]:
        return ([f"directory {self.directory}"] if self.directory else []) + [f"topic {t}" for t in self.topics] + \
            ([f"consumer group {self.group}"] if self.group else [])


def check_run_directory(directory: Path, run_id: str) -> None:
    """Raises ReplayError unless ``directory`` is run ``run_id``'s and holds only what a replay writes."""
    info = read_run_dir(directory)
    if info is None:
        raise ReplayError(f"{directory} holds no replay run ({MANIFEST} or {CHECKPOINT}): not deleting it")
    if info.run_id != run_id:
        raise ReplayError(f"{directory} holds run {info.run_id!r}, not {run_id!r}: not deleting it")
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name in TABLES and entry.is_dir() and not entry.is_symlink():
            foreign += [str(f) for f in sorted(entry.iterdir()) if not (PART_FILE.match(f.name) and f.is_file())]
        elif not (entry.name in RUN_FILES and entry.is_file() and not entry.is_symlink()):
            foreign.append(str(entry))
    if foreign:
        raise ReplayError(f"{directory} holds what a replay does not write ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}): not deleting it; move those away first")


def plan_deletion(settings: Settings, run_id: str, parquet: str | None = None) -> Deletion:
    """What ``finpulse runs delete RUN_ID`` would remove; raises ReplayError for anything not the run's."""
    from kafka.errors import KafkaError
    from stream.topics import BrokerUnreachable, admin_client
    names = check_run_id(run_id, TopicNames(settings.kafka.topic_prefix))
    directory = Path(parquet) if parquet else Path(settings.section("replay", ReplaySettings).out_dir) / run_id
    if directory.exists():
        check_run_directory(directory, run_id)
    present = _broker_topics(settings)
    clash = sorted(set(live_topics_of(names)) & present)
    if clash:
        raise ReplayError(f"{names.prefix}.* are the live topics of another FinPulse ({', '.join(clash)}), not replay "
                          f"run {run_id!r}'s: not deleting them")
    topics = [t for t in output_topics(names, with_deliveries=True) if t in present]
    group = dispatcher_group(settings, run_id)
    try:
        admin = admin_client(settings.kafka, timeout_s=15)
        try:
            groups = {g["group_id"] for g in admin.list_groups()}
        finally:
            admin.close()
    except (BrokerUnreachable, KafkaError) as exc:
        raise ReplayError(f"cannot list consumer groups on {settings.kafka.bootstrap_servers}: {exc}") from None
    deletion = Deletion(run_id, directory if directory.exists() else None, topics, group if group in groups else None)
    if not deletion.describe():
        raise ReplayError(f"there is no replay run {run_id!r}: no directory {directory} and no topics "
                          f"{names.prefix}.* on {settings.kafka.bootstrap_servers}")
    return deletion


def delete_run(settings: Settings, deletion: Deletion) -> None:
    """Remove what ``deletion`` names: the topics and group first (a failure there leaves the directory, so the run
    still lists), then the directory."""
    from kafka.errors import KafkaError
    from stream.topics import admin_client
    admin = admin_client(settings.kafka, timeout_s=15)
    try:
        if deletion.topics:
            admin.delete_topics(deletion.topics)
        if deletion.group:
            refused = {g: answer for g, answer in dict(admin.delete_groups([deletion.group])).items() if answer != "OK"}
            if refused:
                raise ReplayError(f"the broker refused to delete consumer group {deletion.group}: {refused}; the "
                                  "run's topics are deleted, its directory is kept")
    except KafkaError as exc:
        raise ReplayError(f"the broker refused to delete run {deletion.run_id!r}'s topics or group: {exc}") from None
    finally:
        admin.close()
    if deletion.directory is not None:
        shutil.rmtree(deletion.directory)


def format_runs(runs: list[RunInfo]) -> str:
    """The runs as an aligned text table."""
    header = ("RUN ID", "STATUS", "FROM", "TO", "WARM-UP", "MODEL", "INPUTS", "SCORED", "ALERTS", "TOPICS", "CREATED")
    rows = [header] + [(r.run_id, r.status, r.start or "-", r.end or "-",
                        "-" if r.warmup_s is None else f"{r.warmup_s}s",
                        (r.model_version or "-") + (f" (scores of {r.scores_from})" if r.scores_from else ""),
                        *("-" if v is None else str(v) for v in (r.inputs, r.scored, r.alerts_firing)),
                        "?" if r.topics is None else str(len(r.topics)), r.created_at or "-") for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return os.linesep.join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


__all__ = ["Deletion", "RunInfo", "delete_run", "format_runs", "list_runs", "plan_deletion", "read_run_dir"]
