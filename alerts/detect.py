"""Negative-spike detection: each key's closed windows against that key's own baseline, as ``AlertRecord``s.

``SpikeDetector`` is pure Python; the worker's ``detect`` agent and replay/backtest run the same code. Replay::

    detector = SpikeDetector(settings.section("detect", DetectSettings), run_id="r1")
    alerts = detector.feed(final_trends)      # TrendRecords in window order per key (partials are ignored)

How it decides, per key and per detection window size (``window_s``, 60 s by default):

* Baseline: exponentially weighted mean and variance of the window's bearish share and of its mean score (weight
  ``alpha``; the first windows use a plain running mean so the baseline is usable after ``warmup_windows``). Only
  ordinary windows update it: windows of an episode, suppressed spikes and windows under ``min_count`` do not, and
  a window more than ``learn_z`` deviations worse than the baseline counts only up to that bound (mean only), so a
  gradual drift does not drag the baseline along and still fires, while a lasting change of level is learned.
* A window spikes when it has ``min_count`` messages and either its bearish share rose by ``fire_z`` standard
  deviations and at least ``min_share_rise``, or its mean score fell by ``fire_z`` deviations and at least
  ``min_score_drop``. The share's deviation is at least the binomial noise of a window of that size, and both have
  floors, so a very stable baseline does not turn noise into alerts.
* A spike outside the cooldown starts an episode: one ``firing`` alert. The episode resolves (one ``resolved`` alert,
  same id) after ``resolve_windows`` consecutive windows below ``resolve_z`` (hysteresis); then no new episode may
  start for ``cooldown_s``. Severity grows with the deviation: info, then warning at ``warning_z``, critical at
  ``critical_z``.
* Escalation: while the episode is open, a window that spikes at a higher severity than any sent for the episode
  emits one more ``firing`` alert, same id, with that window's figures and ``escalated_from`` the severity it rose
  from: at most one per severity, never one downwards. The resolve carries the highest severity reached. The
  highest severity sent is part of the key's state, so a restart or a replay emits the same escalation again
  (same event id, ``<id>:firing:<severity>``), never a second one.
* A new model: windows scored by another model version than the key's baseline learned from set the baseline's
  level again (``relearn_windows``, 3 by default) and are not judged, so a deploy does not read as news.
* The alert id is a hash of (key type, key, window size, episode start window), so a replay or a restarted worker
  emits the same id for the same episode. Duplicate or older windows (re-emitted after a crash) are ignored.

``[detect]`` holds the defaults; ``[detect.overrides."topic:Energy | Oil"]`` or ``[detect.overrides."ticker:*"]``
override any threshold for one key or one key type.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from models.interface import base_version
from stream.config import ConfigError, build_dataclass
from stream.metrics import counter
from stream.records import AlertRecord, TrendRecord, epoch_ms, severity_rank, utcnow

log = logging.getLogger(__name__)

ALERTS_EMITTED = counter("finpulse_alerts_emitted_total", "Alert events published, by kind (firing, escalation, "
                         "resolved) and severity.", ["kind", "severity"])
BASELINES_RELEARNED = counter("finpulse_detect_baselines_relearned_total", "Key baselines whose level is learned "
                              "again because their windows came from another model version.")


@dataclass
class DetectRule:
    """The thresholds for one key. Defaults are tuned with tests/bench/bench_alerts.py."""
    window_s: int = 60                 # which closed windows are judged (a size from [aggregate] windows)
    min_count: int = 15                # fewer messages than this: too noisy to judge or to learn from
    warmup_windows: int = 10           # windows learned before the first alert can fire
    alpha: float = 0.1                 # weight of each new window in the baseline
    fire_z: float = 5.5                # deviations (and min_share_rise / min_score_drop) that start an episode
    min_share_rise: float = 0.15
    min_score_drop: float = 0.15
    resolve_z: float = 2.0             # below this for resolve_windows windows in a row: resolved (hysteresis)
    learn_z: float = 2.0               # windows worse than this count only up to it in the baseline
    resolve_windows: int = 2
    cooldown_s: int = 600              # no new episode this long after one resolved
    share_std_floor: float = 0.03      # the smallest deviation a baseline may claim
    score_std_floor: float = 0.04
    warning_z: float = 8.0             # severity: info below, warning from here, critical from critical_z
    critical_z: float = 12.0
    top_messages: int = 5
    # Windows scored by a model other than the one the baseline learned from set the baseline's level again, and
    # are not judged: another model reads the same news at another level. 0: keep judging against the old baseline.
    relearn_windows: int = 3

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.min_count < 1 or self.warmup_windows < 1 or self.resolve_windows < 1:
            raise ConfigError("[detect] window_s, min_count, warmup_windows and resolve_windows must be positive")
        if self.relearn_windows < 0:
            raise ConfigError("[detect] relearn_windows must be 0 or more")
        if not 0 < self.alpha <= 1:
            raise ConfigError("[detect] alpha must be in (0, 1]")
        if not 0 <= self.resolve_z < self.fire_z or self.warning_z > self.critical_z or self.learn_z <= 0:
            raise ConfigError(f"[detect] need 0 <= resolve_z < fire_z, warning_z <= critical_z and learn_z > 0 (got "
                              f"resolve_z = {self.resolve_z}, fire_z = {self.fire_z}, warning_z = {self.warning_z}, "
                              f"critical_z = {self.critical_z}, learn_z = {self.learn_z})")
        negative = [name for name in ("min_share_rise", "min_score_drop", "cooldown_s", "top_messages")
                    if getattr(self, name) < 0]
        negative += [name for name in ("share_std_floor", "score_std_floor") if getattr(self, name) <= 0]
        if negative:
            raise ConfigError(f"[detect] {', '.join(f'{n} = {getattr(self, n)}' for n in negative)}: the floors must "
                              f"be positive, the others 0 or more")


@dataclass
class DetectSettings(DetectRule):
    """``[detect]``: the default rule, which key types are watched, and per-key overrides."""
    key_types: list[str] = field(default_factory=lambda: ["topic", "ticker"])
    # "topic:<label>" or "ticker:<symbol>" (exact) or "topic:*"/"ticker:*" -> {setting: value}
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern in self.overrides:
            key_type, sep, key = pattern.partition(":")
            if not sep or key_type not in ("topic", "ticker") or not key:
                raise ConfigError(f"[detect] override {pattern!r}: name a key as 'topic:<label>', 'ticker:<symbol>' "
                                  "or 'topic:*' / 'ticker:*'")
            self.rule_for(key_type, key)    # fails now, with the override's name, rather than at the first trend

    def rule_for(self, key_type: str, key: str) -> DetectRule:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(DetectRule)}
        for pattern in (f"{key_type}:*", f"{key_type}:{key}"):
            if pattern in self.overrides:
                where = f"detect.overrides.{pattern}"
                if not isinstance(self.overrides[pattern], dict):
                    raise ConfigError(f"[{where}] must be a table of settings")
                try:
                    rule = build_dataclass(DetectRule, {**base, **self.overrides[pattern]}, where)
                except ConfigError as exc:
                    raise ConfigError(f"[{where}] {exc}") from None
                base.update(dataclasses.asdict(rule))
        return DetectRule(**base)


def alert_id(key_type: str, key: str, window_s: int, episode_start: datetime) -> str:
    """Stable per episode: the same inputs always give the same id (replay, restart)."""
    basis = f"{key_type}\x1f{key}\x1f{window_s}\x1f{epoch_ms(episode_start)}"
    return "alert-" + hashlib.sha256(basis.encode("utf-8")).hexdigest()[:20]


def _ewma_update(state: dict[str, float], name: str, x: float, weight: float, with_variance: bool) -> None:
    """Exponentially weighted mean (and variance) of ``name`` in ``state``."""
    diff = x - state[name]
    state[name] += weight * diff
    if with_variance:
        state[name + "_var"] = (1.0 - weight) * (state[name + "_var"] + weight * diff * diff)


def _new_state() -> dict[str, Any]:
    return {"n": 0, "share": 0.0, "share_var": 0.0, "score": 0.0, "score_var": 0.0,
            "last_start_ms": None, "cooldown_until_ms": None, "episode": None}


class SpikeDetector:
    """Per-key baselines and episodes. State per (key type, key) is a JSON-able dict: ``{window_s: {...}}``."""

    def __init__(self, settings: DetectSettings, run_id: str = "", clock: Callable[[], datetime] = utcnow):
        self.settings = settings
        self.run_id = run_id
        self.clock = clock
        self.states: dict[str, dict[str, Any]] = defaultdict(dict)   # used by feed(); the agent keeps a table
        self._rules: dict[tuple[str, str], DetectRule] = {}

    def rule(self, key_type: str, key: str) -> DetectRule:
        found = self._rules.get((key_type, key))
        if found is None:
            found = self._rules[(key_type, key)] = self.settings.rule_for(key_type, key)
        return found

    def wants(self, trend: TrendRecord) -> bool:
        return (trend.final and trend.key_type in self.settings.key_types
                and trend.window_s == self.rule(trend.key_type, trend.key).window_s)

    def feed(self, trends: Iterable[TrendRecord]) -> list[AlertRecord]:
        """Replay interface: observe trends with the detector's own per-key state."""
        alerts = []
        for trend in trends:
            alerts.extend(self.observe(self.states[f"{trend.key_type}:{trend.key}"], trend))
        return alerts

    def observe(self, key_state: dict[str, Any], trend: TrendRecord) -> list[AlertRecord]:
        """Observe one trend of the key whose state is ``key_state`` (mutated); return the alerts it causes."""
        if not self.wants(trend):
            return []
        rule = self.rule(trend.key_type, trend.key)
        state = key_state.setdefault(str(trend.window_s), _new_state())
        start_ms = epoch_ms(trend.window_start)
        if state["last_start_ms"] is not None and start_ms <= state["last_start_ms"]:
            return []   # a duplicate (re-emitted after a crash) or out of order: already judged
        state["last_start_ms"] = start_ms
        if self._relearning(state, trend, rule):
            return []

        enough = trend.count >= rule.min_count
        warmed = state["n"] >= rule.warmup_windows
        share_sd = max(math.sqrt(state["share_var"]), rule.share_std_floor,
                       math.sqrt(max(state["share"] * (1 - state["share"]), 0.0) / max(trend.count, 1)))
        # The window's own sampling error, from its shares (scores sit near -1, 0 and +1): a baseline learned from few
        # windows can claim a far smaller spread than one window of a few dozen messages can show by chance.
        message_var = max(trend.bullish_share + trend.bearish_share - trend.mean_score ** 2, 0.0)
        score_sd = max(math.sqrt(state["score_var"]), rule.score_std_floor, math.sqrt(message_var / max(trend.count, 1)))
        share_rise = trend.bearish_share - state["share"]
        score_drop = state["score"] - trend.mean_score
        deviation = max(share_rise / share_sd, score_drop / score_sd)
        spiking = enough and warmed and (
            (share_rise / share_sd >= rule.fire_z and share_rise >= rule.min_share_rise)
            or (score_drop / score_sd >= rule.fire_z and score_drop >= rule.min_score_drop))
        stats = {"share_sd": share_sd, "score_sd": score_sd, "deviation": deviation}

        episode = state["episode"]
        if episode is not None:
            calm = not enough or deviation < rule.resolve_z
            episode["calm"] = episode["calm"] + 1 if calm else 0
            episode["peak"] = max(episode["peak"], deviation)
            if episode["calm"] >= rule.resolve_windows:
                state["episode"] = None
                state["cooldown_until_ms"] = epoch_ms(trend.window_end) + rule.cooldown_s * 1000
                self._learn(state, trend, rule, stats)
                return [self._resolved(episode, state, trend, stats)]
            # Remembered in the state, which is written after the alerts: a restart re-emits the same escalation.
            sent = _episode_severity(episode)
            if spiking and severity_rank(_severity(deviation, rule)) > severity_rank(sent):
                firing = AlertRecord.from_dict(episode["firing"])
                alert = self._alert(state, trend, rule, stats, firing.started_at, escalated_from=sent,
                                    topic=firing.topic)
                episode["severity"] = alert.severity
                return [alert]
            return []
        if spiking:
            cooldown = state["cooldown_until_ms"]
            if cooldown is not None and start_ms < cooldown:
                return []
            alert = self._alert(state, trend, rule, stats, trend.window_start)
            state["episode"] = {"id": alert.id, "started_ms": start_ms, "calm": 0, "peak": deviation,
                                "severity": alert.severity, "firing": alert.to_dict()}
            return [alert]
        self._learn(state, trend, rule, stats)
        return []

    @staticmethod
    def _relearning(state: dict[str, Any], trend: TrendRecord, rule: DetectRule) -> bool:
        """Whether this window goes to learning the baseline's level again, after the key's windows came from
        another model version: two quick models trained alike but for the seed differed by up to 0.23 in a topic's
        mean score and 0.15 in its bearish share on the same messages, as much as a shock. The next
        ``relearn_windows`` windows (with ``min_count`` messages) set the level (their plain mean) and are judged no
        further: no episode starts, escalates or resolves on them. The spread is kept: a model moves the level far
        more than the noise from window to window."""
        known, version = state.get("model_version"), trend.model_version
        if version:
            state["model_version"] = version
            # The same model in int8 is other arithmetic, not another reading (95-97% the same labels).
            if known and base_version(version) != base_version(known) and rule.relearn_windows:
                state["relearn"] = 0
                BASELINES_RELEARNED.inc()
                log.info("%s %s (%ss windows): scored by %s, not %s: its baseline's level is learned again from the "
                         "next %d windows", trend.key_type, trend.key, trend.window_s, version, known,
                         rule.relearn_windows)
        if "relearn" not in state:
            return False
        if trend.count >= rule.min_count:
            learned = state["relearn"] = state["relearn"] + 1
            state["share"] += (trend.bearish_share - state["share"]) / learned
            state["score"] += (trend.mean_score - state["score"]) / learned
            if learned >= rule.relearn_windows:
                del state["relearn"]
        return True

    @staticmethod
    def _learn(state: dict[str, Any], trend: TrendRecord, rule: DetectRule, stats: dict[str, float]) -> None:
        """Fold an ordinary window into the baseline. After warm-up each value is clipped to ``learn_z`` deviations
        of the baseline, so a gradual drift cannot drag the baseline along with it (it stays visible as a growing
        deviation) while a lasting change of level is still learned, slowly."""
        if trend.count < rule.min_count:
            return
        warmed = state["n"] >= rule.warmup_windows
        state["n"] += 1
        weight = max(rule.alpha, 1.0 / state["n"])      # a plain running mean until 1/alpha windows
        share_cap = state["share"] + rule.learn_z * stats["share_sd"] if warmed else math.inf
        score_cap = state["score"] - rule.learn_z * stats["score_sd"] if warmed else -math.inf
        # A clipped value moves the mean but not the variance: it would otherwise inflate it and hide the drift.
        _ewma_update(state, "share", min(trend.bearish_share, share_cap), weight, trend.bearish_share <= share_cap)
        _ewma_update(state, "score", max(trend.mean_score, score_cap), weight, trend.mean_score >= score_cap)

    def _baseline(self, state: dict[str, Any], stats: dict[str, float]) -> dict[str, float]:
        return {"bearish_share": round(state["share"], 4), "bearish_share_std": round(stats["share_sd"], 4),
                "mean_score": round(state["score"], 4), "mean_score_std": round(stats["score_sd"], 4)}

    @staticmethod
    def _observed(trend: TrendRecord) -> dict[str, Any]:
        return {"bearish_share": round(trend.bearish_share, 4), "mean_score": round(trend.mean_score, 4),
                "count": trend.count}

    def _alert(self, state: dict[str, Any], trend: TrendRecord, rule: DetectRule, stats: dict[str, float],
               started_at: datetime, escalated_from: str = "", topic: str | None = None) -> AlertRecord:
        """The firing that opens an episode starting with ``trend``, or, with ``escalated_from``, an escalation of
        the open episode that started at ``started_at``: either way this window's figures. ``topic``: the episode's
        (an escalation keeps its firing's, so that every event of the episode is about one topic)."""
        deviation = stats["deviation"]
        severity = _severity(deviation, rule)
        what = (f"Escalated from {escalated_from} to {severity} on" if escalated_from else "Negative spike on")
        summary = (f"{what} {trend.key_type} {trend.key}: bearish share {trend.bearish_share:.0%} vs "
                   f"baseline {state['share']:.0%} ± {stats['share_sd']:.0%}, mean score {trend.mean_score:+.2f} vs "
                   f"{state['score']:+.2f}, {deviation:.1f} sd over {trend.count} messages in the "
                   f"{trend.window_s}s window from {trend.window_start:%H:%M:%S} UTC")
        return AlertRecord(
            id=alert_id(trend.key_type, trend.key, trend.window_s, started_at), status="firing",
            key_type=trend.key_type, key=trend.key, window_s=trend.window_s, window_start=trend.window_start,
            window_end=trend.window_end, severity=severity, observed=self._observed(trend),
            baseline=self._baseline(state, stats), deviation=round(deviation, 3), started_at=started_at,
            emitted_at=self.clock(), messages=tuple(trend.most_negative[: rule.top_messages]), summary=summary,
            model_version=trend.model_version, run_id=self.run_id, escalated_from=escalated_from,
            topic=topic if topic is not None else trend.about_topic)

    def _resolved(self, episode: dict[str, Any], state: dict[str, Any], trend: TrendRecord,
                  stats: dict[str, float]) -> AlertRecord:
        firing = AlertRecord.from_dict(episode["firing"])
        lasted = trend.window_end - firing.started_at
        summary = (f"Resolved on {trend.key_type} {trend.key}: bearish share back to {trend.bearish_share:.0%} "
                   f"(baseline {state['share']:.0%}) after {_minutes(lasted)}; peak {episode['peak']:.1f} sd")
        return dataclasses.replace(
            firing, status="resolved", window_start=trend.window_start, window_end=trend.window_end,
            severity=_episode_severity(episode), observed=self._observed(trend), baseline=self._baseline(state, stats),
            deviation=round(stats["deviation"], 3), emitted_at=self.clock(), resolved_at=trend.window_end,
            summary=summary, model_version=trend.model_version)


def _severity(deviation: float, rule: DetectRule) -> str:
    return "critical" if deviation >= rule.critical_z else "warning" if deviation >= rule.warning_z else "info"


def _episode_severity(episode: dict[str, Any]) -> str:
    """The highest severity sent for the episode (states written before escalation existed hold only the firing)."""
    return episode.get("severity") or episode["firing"]["severity"]


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:.0f} min"


def state_key(trend: TrendRecord) -> bytes:
    """The detect table's key: the trend's Kafka key, so the table co-partitions with ``finpulse.trends``."""
    return f"{trend.key_type}:{trend.key}".encode("utf-8")


def check_windows(detect: DetectSettings, window_sizes) -> None:
    """Raise ConfigError unless every rule (``[detect]`` and each override) judges a window size that
    ``[aggregate] windows`` makes (``window_sizes``, in seconds): a rule on another size never sees a window, and
    its keys never alert."""
    sizes = sorted(set(window_sizes))
    rules = {"[detect] window_s": detect.window_s}
    for pattern in detect.overrides:
        rules[f"[detect.overrides.\"{pattern}\"] window_s"] = detect.rule_for(*pattern.split(":", 1)).window_s
    for where, size in rules.items():
        if size not in sizes:
            raise ConfigError(f"{where} = {size} is not a window [aggregate] windows makes ({', '.join(map(str, sizes))} "
                              f"s): no window of that size closes, so nothing would ever alert")


# ---------------------------------------------------------------- Faust wiring

def install(app, settings, names) -> None:
    """Register the detect agent (consumes final trends, keeps detector state in a table, produces alerts)."""
    from stream.app import Outgoing, deliver, faust_send, finish_batch, micro_batches

    detector = SpikeDetector(settings.section("detect", DetectSettings))
    worker = settings.worker
    trends = app.topic(names.trends, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    table = app.Table("detect-state", default=None, key_type=bytes, partitions=settings.kafka.partitions,
                      use_partitioner=True, help="spike detector baselines and open episodes per key")

    send = faust_send(app)

    async def process(events) -> None:
        by_key: dict[bytes, list[TrendRecord]] = defaultdict(list)
        for event in events:
            try:
                trend = TrendRecord.from_json(event.value)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("skipping malformed trend at %s[%d]@%d: %s", event.message.topic,
                            event.message.partition, event.message.offset, exc)
                continue
            if detector.wants(trend):
                by_key[event.key or state_key(trend)].append(trend)
        states, raised = {}, []
        for key_bytes, key_trends in by_key.items():
            # A copy: the table's value must change only by assignment (which writes the changelog).
            key_state = states[key_bytes] = copy.deepcopy(table.get(key_bytes) or {})
            raised += [(key_bytes, alert) for trend in key_trends for alert in detector.observe(key_state, trend)]
        for _, alert in raised:
            log.info("alert %s %s: %s", alert.id, alert.event_kind, alert.summary)
        # Alerts reach the broker before the state that remembers them is written: a crash in between emits
        # the same alert (same id) again instead of never.
        await deliver(send, [Outgoing(names.alerts, key, alert.to_json(), epoch_ms(alert.window_end))
                             for key, alert in raised])
        for _, alert in raised:
            ALERTS_EMITTED.labels(alert.event_kind, alert.severity).inc()
        for key_bytes, key_state in states.items():
            table[key_bytes] = key_state      # once per key per batch
        await table.writes_delivered()

    @app.agent(trends, name="detect")
    async def detect(stream):
        async for events in micro_batches(app, stream, worker):
            # Alerts published but the state not yet written when a stop lands: the batch must still finish,
            # or Faust acks it and the restart forgets the episode (and raises the alert again under a new id).
            await finish_batch(process(events))

__all__ = ["DetectRule", "DetectSettings", "SpikeDetector", "alert_id", "install", "state_key"]
