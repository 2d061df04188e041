"""SpikeDetector: warm-up, firing, hysteresis, cooldown, severity, stable ids, duplicates, per-key overrides and a
new model's windows."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from alerts.detect import DetectSettings, SpikeDetector, alert_id
from stream.config import ConfigError, Settings
from stream.records import TrendRecord

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
FIXED = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
KEY = "Energy | Oil"


def trend(minute: int, share: float, count: int = 40, key: str = KEY, window_s: int = 60, final: bool = True,
          key_type: str = "topic", model: str = "test-1") -> TrendRecord:
    start = T0 + timedelta(minutes=minute)
    return TrendRecord(key_type=key_type, key=key, window_s=window_s, window_start=start,
                       window_end=start + timedelta(seconds=window_s), count=count,
                       mean_score=round(0.2 - 1.2 * share, 4), bearish_share=share, bullish_share=0.3,
                       news_count=count // 2, comment_count=count - count // 2, final=final, model_version=model,
                       emitted_at=FIXED, most_negative=({"id": f"m{minute}", "text": "crude plunges",
                                                         "sentiment_score": -0.9},))


def calm_shares(n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [round(min(0.6, max(0.0, rng.gauss(0.25, 0.05))), 3) for _ in range(n)]


def run(detector: SpikeDetector, shares: list[float], first_minute: int = 0, **kwargs):
    return detector.feed(trend(first_minute + i, share, **kwargs) for i, share in enumerate(shares))


def detector(**settings) -> SpikeDetector:
    rule = {"fire_z": 4.0, "resolve_z": 2.0, "min_count": 15, "warmup_windows": 10, **settings}
    return SpikeDetector(DetectSettings(**rule), clock=lambda: FIXED)


def test_a_spike_fires_once_and_resolves_after_calm_windows_with_the_same_id():
    det = detector(resolve_windows=2)
    assert run(det, calm_shares(30)) == []
    alerts = run(det, [0.8, 0.78, 0.7, 0.26, 0.24, 0.25], first_minute=30)   # no worse than the first: no escalation
    assert [a.status for a in alerts] == ["firing", "resolved"]
    firing, resolved = alerts
    assert firing.id == resolved.id == alert_id("topic", KEY, 60, T0 + timedelta(minutes=30))
    assert firing.window_start == T0 + timedelta(minutes=30)
    assert resolved.window_start == T0 + timedelta(minutes=34)       # the second calm window
    assert resolved.resolved_at == T0 + timedelta(minutes=35)
    assert firing.observed["bearish_share"] == 0.8 and firing.baseline["bearish_share"] == pytest.approx(0.25, abs=0.05)
    assert firing.deviation >= 4 and firing.messages[0]["id"] == "m30"
    assert KEY in firing.summary and "Resolved" in resolved.summary


def test_hysteresis_keeps_firing_while_the_window_is_between_the_thresholds():
    det = detector(resolve_windows=1, resolve_z=2.0, fire_z=4.0)
    run(det, calm_shares(30))
    alerts = run(det, [0.8, 0.42, 0.41, 0.25], first_minute=30)   # 0.42 is ~3 sd: neither firing nor calm
    assert [(a.status, a.window_start.minute) for a in alerts] == [("firing", 30), ("resolved", 33)]


def test_no_alert_during_warm_up_or_on_thin_windows_or_on_volume_without_negativity():
    det = detector(warmup_windows=10, min_count=15)
    assert run(det, [0.25, 0.25, 0.9]) == []                          # not warmed up
    assert run(det, calm_shares(20), first_minute=3) == []
    assert run(det, [0.9], first_minute=23, count=8) == []          # too few messages
    assert run(det, calm_shares(10, seed=5), first_minute=24, count=400) == []   # a burst of ordinary volume


def test_a_gradual_drift_fires_because_the_baseline_does_not_follow_it():
    drift = [round(0.25 + 0.03 * step, 3) for step in range(1, 21)] + [0.85] * 5
    following = detector(learn_z=100.0)          # learning every window in full: the baseline keeps up
    run(following, calm_shares(30))
    assert run(following, drift, first_minute=30) == []
    clipped = detector(learn_z=2.0)
    run(clipped, calm_shares(30))
    (alert,) = run(clipped, drift, first_minute=30)
    assert alert.status == "firing" and alert.observed["bearish_share"] < 0.85


def test_cooldown_suppresses_a_second_episode_then_allows_it():
    det = detector(resolve_windows=1, cooldown_s=600)
    run(det, calm_shares(30))
    first = run(det, [0.8, 0.25], first_minute=30)
    assert [a.status for a in first] == ["firing", "resolved"]      # resolved at the end of minute 31 (32:00)
    assert run(det, [0.8, 0.25], first_minute=33) == []             # inside the cooldown
    later = run(det, [0.25] * 8 + [0.85], first_minute=35)
    assert [a.status for a in later] == ["firing"]
    assert later[0].id != first[0].id and later[0].started_at == T0 + timedelta(minutes=43)


def test_severity_grows_with_the_deviation():
    severities = []
    for share in (0.45, 0.55, 0.9):
        det = detector(fire_z=4.0, warning_z=6.0, critical_z=10.0)
        # Busy windows: with 200 messages the sampling error is small next to the baseline's own spread.
        run(det, calm_shares(30), count=200)
        (alert,) = run(det, [share], first_minute=30, count=200)
        severities.append((alert.deviation, alert.severity))
    assert [s for _, s in severities] == ["info", "warning", "critical"]
    assert severities[0][0] < severities[1][0] < severities[2][0]


def test_restart_with_restored_state_and_duplicate_trends_gives_the_same_alerts():
    shares = calm_shares(30) + [0.8, 0.8, 0.25, 0.25] + calm_shares(20, seed=3) + [0.9, 0.2, 0.2]
    trends = [trend(i, s) for i, s in enumerate(shares)]
    uninterrupted = detector().feed(trends)

    first = detector()
    alerts = first.feed(trends[:32])
    restored = detector()
    restored.states.update(json.loads(json.dumps(first.states)))    # the table value, via its changelog
    alerts += restored.feed(trends[28:])                             # redelivered trends overlap
    assert [(a.id, a.status, a.window_start) for a in alerts] == \
        [(a.id, a.status, a.window_start) for a in uninterrupted]
    assert [a.status for a in uninterrupted] == ["firing", "resolved", "firing", "resolved"]


def test_partials_other_window_sizes_and_unwatched_key_types_are_ignored():
    det = detector(key_types=["topic"])
    run(det, calm_shares(30))
    assert run(det, [0.9], first_minute=30, final=False) == []
    assert run(det, [0.9], first_minute=30, window_s=300) == []
    assert run(det, [0.9] * 40, key_type="ticker", key="XOM") == []
    assert len(run(det, [0.9], first_minute=30)) == 1


def test_per_key_overrides_apply_and_are_validated():
    settings = Settings(raw={"detect": {"fire_z": 4.0, "resolve_z": 2.0, "overrides": {
        f"topic:{KEY}": {"fire_z": 12.0, "critical_z": 15.0}, "ticker:*": {"window_s": 300}}}})
    config = settings.section("detect", DetectSettings)
    assert config.rule_for("topic", KEY).fire_z == 12.0
    assert config.rule_for("topic", "Macro").fire_z == 4.0
    assert config.rule_for("ticker", "XOM").window_s == 300
    det = SpikeDetector(config)
    run(det, calm_shares(30))
    assert run(det, [0.6], first_minute=30) == []                   # below this key's own threshold
    run(det, calm_shares(30), key="Macro")
    assert len(run(det, [0.6], first_minute=30, key="Macro")) == 1
    with pytest.raises(ConfigError, match="fire_z"):
        DetectSettings(overrides={"topic:*": {"fire_z": 1.0}})
    with pytest.raises(ConfigError, match="unknown setting"):
        DetectSettings(overrides={"topic:*": {"fire_zz": 5.0}})
    with pytest.raises(ConfigError, match="name a key"):
        DetectSettings(overrides={"Energy": {"fire_z": 5.0}})


def test_thresholds_that_could_never_work_are_refused_naming_their_values():
    """Before, a [detect] window_s no aggregation window has loaded and the worker never alerted, and negative rises
    or cooldowns loaded too."""
    from alerts.detect import check_windows

    sizes = (60, 300, 3600)
    check_windows(DetectSettings(overrides={"ticker:*": {"window_s": 300}}), sizes)
    with pytest.raises(ConfigError, match=r"^\[detect\] window_s = 120 is not a window \[aggregate\] windows makes "
                                          r"\(60, 300, 3600 s\)"):
        check_windows(DetectSettings(window_s=120), sizes)
    with pytest.raises(ConfigError, match=r'^\[detect.overrides."ticker:AAPL"\] window_s = 90 is not a window'):
        check_windows(DetectSettings(overrides={"ticker:AAPL": {"window_s": 90}}), sizes)
    with pytest.raises(ConfigError, match=r"min_share_rise = -1.0, cooldown_s = -5: the floors must be positive"):
        DetectSettings(min_share_rise=-1.0, cooldown_s=-5)
    with pytest.raises(ConfigError, match=r"\(got resolve_z = 2.0, fire_z = -3.0,"):
        DetectSettings(fire_z=-3.0)
    from tests.procs import run_without_broker
    done = run_without_broker("worker", FINPULSE_WORKER__SCORER="baseline", FINPULSE_DETECT__WINDOW_S="120")
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "configuration error: [detect] window_s = 120 is not a window" in output, output


def test_a_small_window_within_its_own_sampling_error_does_not_fire():
    """Seen in the demo: a ticker learned from calm, steady windows, then one 36-message window whose mean score
    dropped by 0.32. Its own sampling error (about 0.12 for 36 scores near -1, 0 and +1) explains that; the
    baseline's window-to-window spread (floored at 0.04) alone would have called it 8 deviations."""
    import dataclasses

    def window(minute, bearish, bullish, mean, count):
        return dataclasses.replace(trend(minute, bearish, count=count, key="NVDA", key_type="ticker"),
                                   bullish_share=bullish, mean_score=mean)

    det = detector(fire_z=5.5)
    calm = [window(i, 0.185, 0.43, 0.245, 36) for i in range(20)]
    assert det.feed(calm) == []
    assert det.feed([window(20, 0.3056, 0.2285, -0.0785, 36)]) == []
    # The same move over 400 messages is far outside sampling error: it fires.
    det = detector(fire_z=5.5)
    det.feed([window(i, 0.185, 0.43, 0.245, 400) for i in range(20)])
    (alert,) = det.feed([window(20, 0.3056, 0.2285, -0.0785, 400)])
    assert alert.status == "firing"


# ---------------------------------------------------------------- escalation

def escalating_detector(warmed: bool = True) -> SpikeDetector:
    """Severity bands at 4 / 6 / 10 deviations; warmed on 30 calm windows of 200 messages (busy windows: the
    deviation is the baseline's, so each share below lands in one band)."""
    det = detector(fire_z=4.0, warning_z=6.0, critical_z=10.0, resolve_windows=2)
    if warmed:
        assert run(det, calm_shares(30), count=200) == []
    return det


def test_a_worsening_episode_escalates_once_per_band_and_never_down():
    det = escalating_detector()
    # info, info again, warning, info (lower: nothing), critical, critical again, warning (lower), then calm.
    alerts = run(det, [0.45, 0.46, 0.55, 0.45, 0.9, 0.95, 0.55, 0.25, 0.25], first_minute=30, count=200)
    assert [(a.event_kind, a.severity, a.escalated_from, a.window_start.minute) for a in alerts] == [
        ("firing", "info", "", 30), ("escalation", "warning", "info", 32), ("escalation", "critical", "warning", 34),
        ("resolved", "critical", "", 38)]
    firing, to_warning, to_critical, resolved = alerts
    assert firing.id == to_warning.id == to_critical.id == resolved.id
    assert {a.status for a in alerts[:3]} == {"firing"}
    assert to_warning.started_at == to_critical.started_at == firing.started_at == T0 + timedelta(minutes=30)
    # Each event is its own notification; the first firing keeps the id it always had.
    assert [a.event_id for a in alerts] == [f"{firing.id}:firing", f"{firing.id}:firing:warning",
                                            f"{firing.id}:firing:critical", f"{firing.id}:resolved"]
    # An escalation describes its own window.
    assert to_critical.observed["bearish_share"] == 0.9 and to_critical.messages[0]["id"] == "m34"
    assert to_critical.deviation > to_warning.deviation > firing.deviation
    assert to_critical.summary.startswith(f"Escalated from warning to critical on topic {KEY}")
    assert "peak" in resolved.summary and resolved.escalated_from == ""


def test_a_ticker_alert_names_its_windows_topic_and_keeps_the_firings_for_the_whole_episode():
    det = escalating_detector()
    assert run(det, calm_shares(30), count=200, key="XOM", key_type="ticker") == []
    shares = [0.45, 0.9, 0.25, 0.25]
    stories = ["Energy | Oil", "Macro", "Macro", "Macro"]    # the escalating window is mostly about Macro
    alerts = det.feed(replace(trend(30 + i, share, count=200, key="XOM", key_type="ticker"), topic=story)
                      for i, (share, story) in enumerate(zip(shares, stories)))
    assert [(a.event_kind, a.topic) for a in alerts] == [("firing", "Energy | Oil"), ("escalation", "Energy | Oil"),
                                                         ("resolved", "Energy | Oil")]
    (topic_alert,) = run(escalating_detector(), [0.9], first_minute=30, count=200)
    assert topic_alert.topic == KEY == topic_alert.about_topic


def test_an_episode_that_fires_critical_never_escalates_and_a_new_episode_starts_over():
    det = escalating_detector()
    first = run(det, [0.9, 0.95, 0.25, 0.25], first_minute=30, count=200)
    assert [(a.event_kind, a.severity) for a in first] == [("firing", "critical"), ("resolved", "critical")]
    later = run(det, [0.25] * 10 + [0.42, 0.9], first_minute=34, count=200)
    assert [(a.event_kind, a.severity, a.escalated_from) for a in later] == [
        ("firing", "info", ""), ("escalation", "critical", "info")]     # straight from info to critical: one event
    assert later[0].id != first[0].id


def test_a_thin_window_does_not_escalate():
    det = escalating_detector()
    assert [a.severity for a in run(det, [0.45], first_minute=30, count=200)] == ["info"]
    assert run(det, [0.95], first_minute=31, count=10) == []         # under min_count: no judgement either way
    assert [a.event_kind for a in run(det, [0.9], first_minute=32, count=200)] == ["escalation"]


def test_escalation_is_restart_safe_and_a_replay_feed_gives_the_same_events():
    shares = calm_shares(30) + [0.45, 0.55, 0.9, 0.9, 0.25, 0.25]
    trends = [trend(i, s, count=200) for i, s in enumerate(shares)]

    def events(alerts):
        return [(a.event_id, a.severity, a.escalated_from, a.window_start) for a in alerts]

    uninterrupted = escalating_detector(warmed=False).feed(trends)
    assert [a.event_kind for a in uninterrupted] == ["firing", "escalation", "escalation", "resolved"]
    assert events(escalating_detector(warmed=False).feed(trends)) == events(uninterrupted)    # a replay: the same

    # The state written after the escalation to warning (minute 31) survives; the worker dies before writing the
    # state of minute 32, whose escalation to critical was already published: the restarted one publishes it again.
    first = escalating_detector(warmed=False)
    published = first.feed(trends[:32])
    saved = json.loads(json.dumps(first.states))       # the table value, via its changelog
    published += first.feed(trends[32:33])
    restored = escalating_detector(warmed=False)
    restored.states.update(saved)
    again = restored.feed(trends[28:])                 # redelivered trends overlap
    assert events(again)[0] == events(published)[-1]   # the same event (same event id) again, not a new one
    assert events(published[:-1] + again) == events(uninterrupted)
    # A state saved after the escalation remembers it: nothing is sent twice.
    resumed = escalating_detector(warmed=False)
    resumed.states.update(json.loads(json.dumps(first.states)))
    assert events(resumed.feed(trends[30:])) == events(uninterrupted[3:])


def test_a_state_saved_before_escalation_existed_escalates_from_its_firing_severity():
    det = escalating_detector()
    (firing,) = run(det, [0.45], first_minute=30, count=200)
    episode = det.states[f"topic:{KEY}"]["60"]["episode"]
    del episode["severity"]                                       # what an older worker wrote
    (escalation,) = run(det, [0.9], first_minute=31, count=200)
    assert (escalation.escalated_from, escalation.severity, escalation.id) == ("info", "critical", firing.id)


def test_a_new_models_windows_set_the_baseline_level_again_rather_than_fire():
    """A deploy: the same news, scored by a model that reads this topic 0.3 more bearish (two quick models trained
    alike but for the seed differed by up to 0.15 in a topic's bearish share and 0.23 in its mean score). Judged
    against the old model's baseline that is a spike; the detector learns the new level from the new model's first
    windows instead, and a real shock after them still fires."""
    shifted = [round(share + 0.3, 3) for share in calm_shares(20, seed=3)]
    kept = detector(relearn_windows=0)
    run(kept, calm_shares(30))
    assert [a.status for a in run(kept, shifted, first_minute=30, model="test-2")][:1] == ["firing"]

    det = detector()                      # relearn_windows = 3
    run(det, calm_shares(30))
    assert run(det, shifted, first_minute=30, model="test-2") == []
    state = det.states[f"topic:{KEY}"]["60"]
    assert state["model_version"] == "test-2" and "relearn" not in state
    assert state["share"] == pytest.approx(0.55, abs=0.05)
    alerts = run(det, [1.0, 1.0, 0.55, 0.55, 0.55], first_minute=50, model="test-2")
    assert [a.status for a in alerts] == ["firing", "resolved"] and alerts[0].model_version == "test-2"


def test_the_same_model_switched_to_int8_is_judged_on_without_relearning():
    det = detector()
    run(det, calm_shares(30), model="test-1")
    assert run(det, [0.8], first_minute=30, model="test-1+int8") != []    # judged at once
    state = det.states[f"topic:{KEY}"]["60"]
    assert state["model_version"] == "test-1+int8" and "relearn" not in state
    assert run(det, [0.8], first_minute=31, model="test-2+int8") == [] and "relearn" in state


def test_a_state_from_before_model_versions_were_kept_learns_its_version_without_relearning():
    det = detector()
    run(det, calm_shares(30))
    state = det.states[f"topic:{KEY}"]["60"]
    del state["model_version"]            # as saved before detection kept it
    assert run(det, [0.8], first_minute=30) != []    # judged at once: no relearning
    assert state["model_version"] == "test-1" and "relearn" not in state


def test_relearn_windows_must_not_be_negative():
    with pytest.raises(ConfigError, match="relearn_windows"):
        DetectSettings(relearn_windows=-1)

