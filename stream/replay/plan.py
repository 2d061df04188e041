"""Everything a replay (or an export) needs, checked before anything is written: ``ReplayPlan``.

``build_plan`` turns the command line into a plan or raises ``ReplayError`` with one clear sentence: a bad run id,
an empty or inverted time range, a bad warm-up, an unknown topic, a thresholds file that does not load or holds more
than thresholds, a model directory that is not a model, an archive of another schema version, a run id already used
with other arguments, a test endpoint that is not the one set aside for replays. Only after that does ``run.py``
create topics or files.

**The thresholds file** (``replay --config FILE``) holds only ``[aggregate]`` and ``[detect]``: what a run computes
from its scored messages (see ``THRESHOLD_SECTIONS``). Everything else (the broker, topic prefix, model, endpoints,
``[replay]``) comes from the main configuration (``finpulse --config FILE``, the environment, flags), so a file
copied from a full ``finpulse.toml`` cannot point a replay at another broker or another FinPulse's topics: any other
section is refused, naming it.

**Warm-up** (``--warmup DURATION``, default ``auto``). The detector needs ``warmup_windows`` windows of a key before
it may alert, and every window and baseline starts empty. So a run reads ``[from - warmup, from)`` too, scores and
aggregates it and lets the detector learn from it, and writes nothing of it (``run.py``). ``auto`` is the longest
``warmup_windows x window_s`` over ``[detect]`` and its overrides: just enough for a key with a full window every
minute. The warm-up's start is moved back to a boundary of the judged windows, so its first window is complete.

``[replay]`` settings (``ReplaySettings``)::

    [replay]
    out_dir = "var/replay"       # Parquet outputs go to <out_dir>/<run-id>/ unless --parquet says otherwise
    batch_size = 256             # texts per scorer call (fixed: it is part of the config hash, see below)
    part_records = 20000         # input messages per Parquet part; a checkpoint is written after each part
    max_disorder_s = 900         # how far out of order a partition's timestamps may be (see select.py)
    delivery_timeout_s = 120     # how long to wait for the test endpoint to acknowledge every alert

The **config hash** (``config_hash``) is ``Settings.fingerprint()`` of the *effective* settings that decide the
outputs: ``[aggregate]``, ``[detect]`` (with its overrides), ``[worker] max_text_chars`` and ``[replay]
batch_size``; defaults count as their values, so writing a default out does not change the hash.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from models.settings import models_root
from stream.aggregate import AggregateSettings, parse_duration_s
from stream.config import ConfigError, Settings
from stream.records import InvalidRecord, epoch_ms, parse_time
from stream.topics import TopicNames

from .archive import ArchiveError, ArchiveSelection
from .select import format_ms, topic_kinds

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TOPIC_CHOICES = ("news", "comments")
CHECKPOINT = "_checkpoint.json"
MANIFEST = "manifest.json"


# The sections a replay's thresholds file may hold: they decide what the run computes from its scored messages.
THRESHOLD_SECTIONS = ("aggregate", "detect")


class ReplayError(ValueError):
    """A replay, export or backtest that cannot run as asked; the message says why. Raised before anything is
    written, or by a running replay whose input fails (its last checkpoint stays)."""


@dataclass
class ReplaySettings:
    out_dir: str = "var/replay"
    batch_size: int = 256
    part_records: int = 20_000
    max_disorder_s: float = 900.0
    delivery_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.part_records < 1:
            raise ConfigError("[replay] batch_size and part_records must be at least 1")
        if self.max_disorder_s < 0 or self.delivery_timeout_s <= 0:
            raise ConfigError("[replay] max_disorder_s must be >= 0 and delivery_timeout_s > 0")
        # Parts end on batch boundaries, so a resumed run cuts the same batches as an uninterrupted one.
        self.part_records = -(-self.part_records // self.batch_size) * self.batch_size


@dataclass
class ReplayPlan:
    run_id: str
    from_ms: int
    to_ms: int
    topics: dict[str, str]                  # live input topic -> kind
    settings: Settings                      # the effective settings (base + --config overlay)
    replay: ReplaySettings
    names: TopicNames                       # the run's isolated output topics (inputs are the live ones)
    out_dir: Path
    scorer: Any
    config_hash: str
    warmup: "Warmup"
    archive: ArchiveSelection | None = None
    speed: float | None = None              # event seconds per wall second; None = as fast as possible
    test_endpoint: str | None = None
    resume: dict | None = None              # the checkpoint to continue from
    reused: Any = None                      # ReusedScores (--scores-from): the source run's predictions by id

    @property
    def model_version(self) -> str:
        return self.scorer.model_version

    @property
    def read_from_ms(self) -> int:
        """Where reading starts: the warm-up's start."""
        return self.warmup.start_ms

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed, and what the manifest says the outputs are."""
        return {"run_id": self.run_id, "from": format_ms(self.from_ms), "to": format_ms(self.to_ms),
                "warmup_from": format_ms(self.warmup.start_ms),
                "topics": sorted(self.topics), "source": "archive" if self.archive else "kafka",
                "model_version": self.model_version, "config_hash": self.config_hash,
                "batch_size": self.replay.batch_size, "part_records": self.replay.part_records,
                **({"scores_from": self.reused.source_run, "scores_from_dir": str(self.reused.source_dir)}
                   if self.reused is not None else {})}


@dataclass(frozen=True)
class Warmup:
    """The warm-up a run reads before ``--from``: ``[start_ms, from)``, of which nothing is written."""
    asked: str          # "auto" or the --warmup text
    seconds: int        # the duration asked (auto: computed), before moving the start to a window boundary
    start_ms: int       # where reading starts (<= from - seconds)
    rule: str           # how ``seconds`` was chosen, for people
    window_s: int       # the shortest judged window: a warm-up whose input starts this much late is short
    need_s: int = 0     # what the detector needs before it may alert (auto's choice)

    def describe(self) -> dict[str, Any]:
        return {"asked": self.asked, "seconds": self.seconds, "rule": self.rule, "from": format_ms(self.start_ms)}


# ---------------------------------------------------------------- pieces

def parse_user_time(text: str, what: str) -> datetime:
    """A time a person wrote: ISO-8601, or epoch seconds or milliseconds (``parse_time`` reads an epoch only as a
    number, as records carry it; here every time arrives as a string)."""
    text = text.strip()
    return parse_time(float(text) if re.fullmatch(r"[0-9]+(\.[0-9]*)?", text) else text, what)


def parse_range(start: str, end: str) -> tuple[int, int]:
    try:
        from_ms = epoch_ms(parse_user_time(start, "--from"))
        to_ms = epoch_ms(parse_user_time(end, "--to"))
    except InvalidRecord as exc:
        raise ReplayError(f"{exc.detail} (write ISO-8601 like 2026-11-22T12:00:00Z, or epoch seconds or milliseconds)") from None
    if to_ms <= from_ms:
        raise ReplayError(f"--to ({end}) must be after --from ({start}): the range [from, to) is empty")
    return from_ms, to_ms


def parse_topics(text: str, names: TopicNames) -> dict[str, str]:
    wanted = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TOPIC_CHOICES))
    if unknown or not wanted:
        raise ReplayError(f"unknown topic(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(TOPIC_CHOICES)} (comma-separated)")
    return topic_kinds(names, sorted(set(wanted)))


def check_run_id(run_id: str, live: TopicNames) -> TopicNames:
    if not run_id or not RUN_ID.match(run_id):
        raise ReplayError(f"run id {run_id!r} must be 1-64 letters, digits, '-' or '_' (no dots, no spaces), "
                          "starting with a letter or digit: it becomes part of topic and directory names")
    names = live.replay(run_id)
    clash = set(output_topics(names)) & set(live.all())
    if clash:
        raise ReplayError(f"run id {run_id!r} would write to live topic(s) {', '.join(sorted(clash))}")
    return names


def output_topics(names: TopicNames, with_deliveries: bool = False) -> list[str]:
    return [names.scored, names.trends, names.alerts] + ([names.deliveries] if with_deliveries else [])


def parse_speed(text: str | None) -> float | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*x?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ReplayError(f"--speed {text!r}: write a positive factor like 10x (event time runs 10 times faster)")
    return float(match.group(1))


def detect_rules(detect) -> list:
    """The ``[detect]`` rule and the rule of every override: each threshold set some key may be judged by."""
    rules = [detect.rule_for(key_type, "") for key_type in detect.key_types]
    for pattern in detect.overrides:
        key_type, _, key = pattern.partition(":")
        rules.append(detect.rule_for(key_type, key))
    return rules


def plan_warmup(text: str | None, from_ms: int, aggregate: AggregateSettings, detect) -> Warmup:
    """The warm-up for ``--warmup TEXT`` (None or ``auto``: the detector's own need; ``0``: a cold start)."""
    rules = detect_rules(detect)
    asked = (text or "auto").strip()
    need = max(rules, key=lambda r: r.warmup_windows * r.window_s)
    need_s = need.warmup_windows * need.window_s
    if asked == "auto":
        seconds = need_s
        rule = (f"auto: [detect] warmup_windows x window_s = {need.warmup_windows} x {need.window_s}s, the longest "
                "of [detect] and its overrides")
    else:
        if asked.isdigit() and int(asked):
            # Five seconds is almost never what ``--warmup 5`` meant, and a warm-up too short is silent: it only
            # shows as alerts missing near --from.
            raise ReplayError(f"--warmup {asked} has no unit: write {asked}m or {asked}h ({asked}s for seconds), "
                              "or auto (the detector's warmup_windows x window_s), or 0 for a cold start")
        try:
            seconds = parse_duration_s(asked)
        except ValueError as exc:
            raise ReplayError(f"--warmup: {exc}, or auto (the detector's warmup_windows x window_s), or 0") from None
        rule = f"--warmup {asked}"
    start_ms = from_ms - seconds * 1000
    if seconds:
        # Back to a start of every judged window size, so the warm-up's first windows are complete ones.
        judged = {r.window_s for r in rules}
        steps = [spec.step_s for spec in aggregate.specs() if spec.size_s in judged]
        boundary_ms = math.lcm(*steps) * 1000 if steps else 1000
        start_ms -= start_ms % boundary_ms
    return Warmup(asked=asked, seconds=seconds, start_ms=start_ms, rule=rule, window_s=min(r.window_s for r in rules),
                  need_s=need_s)


def parse_disorder(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return float(parse_duration_s(text))
    except ValueError as exc:
        raise ReplayError(f"--max-disorder: {exc}") from None


def overlay_config(settings: Settings, path: str | None) -> Settings:
    """The base settings with the thresholds of ``path`` (TOML: ``THRESHOLD_SECTIONS`` only) laid over them."""
    if not path:
        return settings
    file = Path(path)
    if not file.is_file():
        raise ReplayError(f"config file {file} does not exist")
    try:
        raw = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ReplayError(f"config file {file} is not valid TOML: {exc}") from None
    loose = sorted(k for k, v in raw.items() if not isinstance(v, dict))
    if loose:
        raise ReplayError(f"config file {file}: settings must be in sections like [detect]; found {', '.join(loose)}")
    others = sorted(set(raw) - set(THRESHOLD_SECTIONS))
    if others:
        raise ReplayError(f"--config {file} may hold only the replay's thresholds ([aggregate], [detect]); it also has "
                          f"[{'], ['.join(others)}]: put those in the main configuration (finpulse --config FILE "
                          "replay ..., or the environment)")
    return Settings(raw=settings.with_overrides(raw).raw, source_file=str(file))


def effective_config(settings: Settings, replay: ReplaySettings) -> tuple[Settings, str]:
    """(the settings that decide the outputs, their hash). Raises ReplayError for invalid sections."""
    from alerts.detect import DetectSettings, check_windows
    try:
        aggregate = settings.section("aggregate", AggregateSettings)
        detect = settings.section("detect", DetectSettings)
        check_windows(detect, (spec.size_s for spec in aggregate.specs()))
        max_text_chars = settings.worker.max_text_chars
    except (ConfigError, TypeError) as exc:
        raise ReplayError(f"configuration: {exc}") from None
    effective = Settings(raw={"aggregate": dataclasses.asdict(aggregate), "detect": dataclasses.asdict(detect),
                              "scoring": {"max_text_chars": max_text_chars, "batch_size": replay.batch_size}})
    return effective, effective.fingerprint()


def load_chosen_scorer(kind: str, model_dir: str | None, device: str, models_dir: str | None = None,
                       cpu_precision: str = "auto"):
    """The scorer, after checking that an explicit model directory really is a FinPulse model."""
    from models.interface import ModelError, load_scorer
    if model_dir:
        try:
            from models.registry import validate_model_dir
        except ImportError as exc:
            raise ReplayError(f"--model needs the trained-model code, which this build lacks ({exc})") from None
        try:
            validate_model_dir(model_dir)
        except Exception as exc:  # noqa: BLE001 - NotAModelDir and whatever reading the directory raised
            raise ReplayError(f"--model {model_dir}: not a FinPulse model directory: {exc}") from None
        kind = "model"
    try:
        return load_scorer(kind, model_dir, device, models_dir, cpu_precision=cpu_precision)
    except (ValueError, OSError, ModelError) as exc:
        raise ReplayError(f"cannot load the {kind} scorer: {exc}") from None


def scores_from_run(source_run: str, run_id: str, out_root: Path, scorer: str | None, model_dir: str | None,
                    device: str, models_dir: str | None, cpu_precision: str | None = None):
    """(ReusedScores, the scorer for what the source lacks) for ``--scores-from``: the source's model version,
    by name for the baseline and no-op scorers, else its directory under ``models_dir`` (or ``--model``), in int8
    where the source's was (``...+int8``)."""
    from models.baseline import KeywordBaselineScorer, NoopScorer
    from models.precision import AUTO, INT8
    from models.interface import base_version

    from .reuse import ReusedScores
    if scorer or cpu_precision:
        raise ReplayError(f"--scores-from takes the model of the run it reuses: "
                          f"--{'scorer' if scorer else 'cpu-precision'} does not go with it")
    if source_run == run_id:
        raise ReplayError("--scores-from names this run itself: give the run whose scores to reuse")
    # A run id under [replay] out_dir, or the directory of a run written elsewhere (--parquet).
    given = Path(source_run)
    source_dir = given if (given / MANIFEST).is_file() else out_root / source_run
    reused = ReusedScores.load(source_dir, source_run, out_root)
    version = reused.model_version
    by_name = {s.model_version: s for s in (KeywordBaselineScorer, NoopScorer)}
    if version in by_name and not model_dir:
        return reused, by_name[version]()
    path = model_dir or str(Path(models_dir or "var/models") / base_version(version))
    if not Path(path).is_dir():
        raise ReplayError(f"--scores-from {source_run}: its model {version} is not in {Path(path).parent}: messages "
                          f"the run has no score for (its warm-up, a wider range) are scored by that model; give its "
                          f"directory with --model DIR")
    quantized = version != base_version(version)
    fallback = load_chosen_scorer("model", path, "cpu" if quantized else device, models_dir,
                                  cpu_precision=INT8 if quantized else AUTO)
    if fallback.model_version != version:
        raise ReplayError(f"--model {path} is {fallback.model_version}, but run {source_run} was scored by {version}")
    return reused, fallback


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{path} is not readable JSON ({exc}): move it away to start the run afresh") from None


def _differences(saved: dict, identity: dict) -> str:
    """``key: <saved> then, <now> now`` for every key of ``identity`` whose value differs in ``saved``."""
    return "; ".join(f"{k}: {saved.get(k)!r} then, {identity[k]!r} now" for k in identity if saved.get(k) != identity[k])


def delete_hint(run_id: str, parquet: str | None = None) -> str:
    """How to delete the run (``parquet``: its directory, when ``--parquet`` put it outside ``[replay] out_dir``)."""
    where = f" --parquet {parquet}" if parquet else ""
    return f"delete it first with `finpulse runs delete {run_id}{where} --yes`"


def check_output_dir(out_dir: Path, identity: dict, parquet: str | None = None) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run. Refuses a finished run, another run's directory,
    and a checkpoint made with other arguments, saying which differ (``parquet``: the ``--parquet`` given)."""
    run_id = identity["run_id"]
    if (out_dir / MANIFEST).exists():
        saved = read_json(out_dir / MANIFEST)
        differ = _differences(saved, identity)
        how = f" with other arguments ({differ})" if differ else ""
        raise ReplayError(f"run {run_id!r} is already complete in {out_dir}{how}: choose another --run-id, or "
                          f"{delete_hint(run_id, parquet)}")
    checkpoint = out_dir / CHECKPOINT
    if checkpoint.exists():
        saved = read_json(checkpoint)
        if saved.get("identity") != identity:
            raise ReplayError(f"{out_dir} holds interrupted run {saved.get('identity', {}).get('run_id')!r} with other "
                              f"arguments ({_differences(saved.get('identity', {}), identity)}): re-run it exactly as "
                              f"before to resume, choose another --run-id, or {delete_hint(run_id, parquet)}")
        return saved
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReplayError(f"output directory {out_dir} is not empty and holds no replay checkpoint: choose another")
    return None


def existing_topics(settings: Settings, topics: list[str]) -> list[str]:
    from kafka.errors import KafkaError
    from stream.topics import BrokerUnreachable, admin_client
    try:
        admin = admin_client(settings.kafka, timeout_s=15)
    except BrokerUnreachable as exc:
        raise ReplayError(str(exc)) from None
    try:
        present = set(admin.list_topics())
    except KafkaError as exc:
        raise ReplayError(f"cannot list topics on {settings.kafka.bootstrap_servers}: {exc}") from None
    finally:
        admin.close()
    return [t for t in topics if t in present]


def live_topics_of(names: TopicNames) -> list[str]:
    """The topics only a live FinPulse whose prefix is the run's (``<prefix>.replay.<run-id>``) would have."""
    as_live = TopicNames(names.prefix)
    return [as_live.news, as_live.comments, as_live.scored_by_ticker, as_live.deadletter]


def dispatcher_group(settings: Settings, run_id: str) -> str:
    """The consumer group of a run's test-endpoint dispatcher."""
    return f"{settings.kafka.topic_prefix}-replay-{run_id}-dispatcher"


def check_topics_free(settings: Settings, names: TopicNames, resuming: bool, parquet: str | None = None) -> None:
    """The run's topic names must not belong to a live FinPulse (one whose prefix is ``<prefix>.replay.<run-id>``)
    nor, unless this run is being resumed, to an earlier run with the same id."""
    live_only = live_topics_of(names)
    present = existing_topics(settings, live_only + output_topics(names, with_deliveries=True))
    run_id = names.prefix.rsplit(".", 1)[-1]
    clash = [t for t in present if t in live_only]
    if clash:
        raise ReplayError(f"run id {run_id!r} collides with the live topics of a FinPulse using topic prefix "
                          f"{names.prefix!r} ({', '.join(clash)}): choose another --run-id")
    if present and not resuming:
        raise ReplayError(f"run id {run_id!r} is already used on this broker (topics {', '.join(present)} exist) and "
                          f"its checkpoint is not in this run's directory: choose another --run-id, or "
                          f"{delete_hint(run_id, parquet)}")


def endpoint_named(config, name: str):
    """The ``[[alerts.endpoints]]`` entry called ``name``, or None."""
    return next((e for e in config.endpoints if e.name == name), None)


def check_test_endpoint(settings: Settings, name: str | None) -> None:
    """A replay may deliver only to the endpoint ``[alerts] replay_endpoint`` sets aside, and only when named."""
    if not name:
        return
    from alerts.endpoints import load_delivery_config
    try:
        config = load_delivery_config(settings)
    except ConfigError as exc:
        raise ReplayError(f"--test-endpoint: [alerts] is not valid: {exc}") from None
    if endpoint_named(config, name) is None:
        known = ", ".join(e.name for e in config.endpoints) or "none"
        raise ReplayError(f"--test-endpoint {name!r} names no endpoint in [alerts] endpoints (known: {known})")
    if config.options.replay_endpoint != name:
        raise ReplayError(f"--test-endpoint {name!r} is not the endpoint set aside for replays: set [alerts] "
                          f"replay_endpoint = {name!r} (now {config.options.replay_endpoint or 'unset'!r}) so live "
                          "endpoints can never receive replay alerts")


# ---------------------------------------------------------------- the plan

def build_plan(settings: Settings, *, run_id: str, start: str, end: str, topics: str = "news,comments",
               config: str | None = None, scorer: str | None = None, model_dir: str | None = None,
               device: str | None = None, speed: str | None = None, archive: str | None = None,
               parquet: str | None = None, test_endpoint: str | None = None, max_disorder: str | None = None,
               batch_size: int | None = None, warmup: str | None = None, scores_from: str | None = None,
               cpu_precision: str | None = None) -> ReplayPlan:
    """Validate every argument (cheapest checks first) and load the scorer; write nothing."""
    live = TopicNames(settings.kafka.topic_prefix)
    names = check_run_id(run_id, live)
    from_ms, to_ms = parse_range(start, end)
    chosen_topics = parse_topics(topics, live)
    pace = parse_speed(speed)
    settings = overlay_config(settings, config)
    try:
        replay = settings.section("replay", ReplaySettings)
        if batch_size is not None:
            replay = dataclasses.replace(replay, batch_size=batch_size)
        worker = settings.worker
    except (ConfigError, TypeError) as exc:
        raise ReplayError(f"configuration: {exc}") from None
    replay.max_disorder_s = parse_disorder(max_disorder, replay.max_disorder_s)
    effective, config_hash = effective_config(settings, replay)
    from alerts.detect import DetectSettings
    warm = plan_warmup(warmup, from_ms, effective.section("aggregate", AggregateSettings),
                       effective.section("detect", DetectSettings))
    check_test_endpoint(settings, test_endpoint)
    selection = None
    if archive:
        try:
            selection = ArchiveSelection(archive, chosen_topics, warm.start_ms, to_ms)
        except ArchiveError as exc:
            raise ReplayError(f"--archive: {exc}") from None
    reused = None
    if scores_from:
        reused, chosen = scores_from_run(scores_from, run_id, Path(replay.out_dir), scorer, model_dir,
                                         device or worker.device, models_root(settings), cpu_precision)
    else:
        chosen = load_chosen_scorer(scorer or worker.scorer, model_dir or worker.model_dir or None,
                                    device or worker.device, models_root(settings),
                                    cpu_precision or worker.cpu_precision)
    out_dir = Path(parquet) if parquet else Path(replay.out_dir) / run_id
    plan = ReplayPlan(run_id=run_id, from_ms=from_ms, to_ms=to_ms, topics=chosen_topics, settings=settings,
                      replay=replay, names=names, out_dir=out_dir, scorer=chosen, config_hash=config_hash,
                      warmup=warm, archive=selection, speed=pace, test_endpoint=test_endpoint, reused=reused)
    plan.resume = check_output_dir(out_dir, plan.identity(), parquet)
    check_topics_free(settings, names, resuming=plan.resume is not None, parquet=parquet)
    if not archive:
        missing = sorted(set(chosen_topics) - set(existing_topics(settings, list(chosen_topics))))
        if missing:
            raise ReplayError(f"input topic(s) {', '.join(missing)} do not exist on {settings.kafka.bootstrap_servers}")
    return plan


__all__ = ["CHECKPOINT", "MANIFEST", "THRESHOLD_SECTIONS", "ReplayError", "ReplayPlan", "ReplaySettings", "Warmup",
           "build_plan", "check_run_id", "delete_hint", "dispatcher_group", "effective_config", "live_topics_of",
           "output_topics", "overlay_config", "parse_range", "parse_topics", "parse_user_time", "plan_warmup"]
