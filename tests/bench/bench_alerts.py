"""Alert quality on SIMULATED scenarios with known shock times: precision, recall and median detection delay.

Each scenario is a stream from ``stream.simulate.generate`` (20 topics, news and comments), scored by the worker's
own ``Scoring`` code with a real scorer (the keyword baseline by default, ``--scorer auto`` for the trained model),
aggregated by ``WindowAggregator`` and judged by ``SpikeDetector`` with their default settings: the same code the
worker's agents run, without Kafka so that 24 scenarios take a minute or two. Topic and ticker windows are both
aggregated and judged, at the detection window size only (the other window sizes do not feed the detector).

Scenarios (positives must fire once, on their topic, during the event; negatives must not fire at all):
- sharp shocks: varied topic (busy and quiet ones), strength, duration and extra volume;
- gradual drifts: the shocked topic turns bearish step by step over 6-15 minutes, then stays there;
- volume bursts that are not negative: one topic at 3-8x its volume with its usual sentiment mix;
- pure noise: no event.

Scoring counts episodes: an alert is an episode's firing (its escalations and its resolve are not more alerts). A
firing alert on the event's topic that starts between one window before the event and its end is a true positive
(the first one only: a second episode for the same event counts as a false positive, it is flapping); every other
firing alert is a false positive. Delay = the firing window's end + the allowed lateness (when the
window closes) - the event's start, in event time.

Ticker alerts are judged the same way, per ticker: the shocked topic's tickers (the simulator's ground truth) may
each fire once during the event; any other firing ticker alert is a false positive. Ticker recall is the share of
positive scenarios with at least one of their tickers alerted (a quiet ticker need not reach the detector's
minimum volume).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator

from tqdm import tqdm

from alerts.detect import DetectSettings, SpikeDetector
from models.interface import load_scorer
from stream.aggregate import AggregateSettings, WindowAggregator
from stream.app import Scoring, SourceMessage
from stream.records import AlertRecord, ScoredRecord
from stream.simulate import Shock, SimMessage, generate, topic_tickers
from stream.topics import TopicNames

RATE = 20.0               # messages per event-second, all topics together (the demo's rate)
WARMUP_S = 20 * 60        # history before the event, so every topic has a baseline
AFTER_S = 12 * 60         # stream after the event ends, so the episode can resolve
DEPLOY_AT_S = 15 * 60     # --deploy: the new model scores from here (warm baselines, relearnt before any event)
START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
BASE_BEARISH = 0.25       # the simulator's usual bearish share


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str                  # shock | drift | burst | noise
    topic: str | None = None
    duration_s: float = 0.0
    strength: float = 0.0      # final share of the topic's messages that are bearish (on top of the usual mix)
    volume_factor: float = 1.0
    ramp_s: float = 0.0        # drifts: how long the strength takes to build up
    seed: int = 1

    @property
    def positive(self) -> bool:
        return self.kind in ("shock", "drift")

    @property
    def tickers(self) -> frozenset[str]:
        """The shocked topic's tickers: the only ones whose alerts are true."""
        return frozenset(topic_tickers(self.topic)) if self.positive else frozenset()

    @property
    def event_start(self) -> datetime:
        return START + timedelta(seconds=WARMUP_S)

    @property
    def event_end(self) -> datetime:
        return self.event_start + timedelta(seconds=self.duration_s)

    def segments(self) -> list[tuple[float, Shock | None]]:
        """(length in seconds, the shock active during it) pieces that make up the stream."""
        if self.kind == "noise":
            return [(WARMUP_S + 15 * 60 + AFTER_S, None)]
        if self.kind == "drift":
            steps = max(1, int(self.ramp_s // 60))
            ramp = [(self.ramp_s / steps, Shock(self.topic, 0, self.ramp_s / steps, self.strength * (i + 1) / steps,
                                               self.volume_factor)) for i in range(steps)]
            hold = self.duration_s - self.ramp_s
            event = ramp + [(hold, Shock(self.topic, 0, hold, self.strength, self.volume_factor))]
        else:
            event = [(self.duration_s, Shock(self.topic, 0, self.duration_s, self.strength, self.volume_factor))]
        return [(WARMUP_S, None), *event, (AFTER_S, None)]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("shock oil 85% 4m x3", "shock", "Energy | Oil", 240, 0.85, 3.0, seed=11),
    Scenario("shock earnings 70% 3m x2", "shock", "Earnings", 180, 0.70, 2.0, seed=12),
    Scenario("shock markets 60% 5m x1", "shock", "Markets", 300, 0.60, 1.0, seed=13),
    Scenario("shock financials 90% 2m x3", "shock", "Financials", 120, 0.90, 3.0, seed=14),
    Scenario("shock macro 55% 6m x1.5", "shock", "Macro", 360, 0.55, 1.5, seed=15),
    Scenario("shock legal 80% 3m x2", "shock", "Legal | Regulation", 180, 0.80, 2.0, seed=16),
    Scenario("shock stock moves 65% 4m x1", "shock", "Stock Movement", 240, 0.65, 1.0, seed=17),
    Scenario("shock currencies 75% 5m x2", "shock", "Currencies", 300, 0.75, 2.0, seed=18),
    Scenario("shock product 70% 8m x1", "shock", "Company | Product News", 480, 0.70, 1.0, seed=19),
    Scenario("shock fed 60% 3m x2", "shock", "Fed | Central Banks", 180, 0.60, 2.0, seed=20),
    Scenario("shock IPO 90% 4m x3 (quiet topic)", "shock", "IPO", 240, 0.90, 3.0, seed=21),
    Scenario("shock dividend 80% 5m x2 (quiet topic)", "shock", "Dividend", 300, 0.80, 2.0, seed=22),
    Scenario("drift oil to 85% over 10m", "drift", "Energy | Oil", 900, 0.85, 1.0, ramp_s=600, seed=31),
    Scenario("drift analysts to 75% over 6m", "drift", "Analyst Update", 600, 0.75, 1.5, ramp_s=360, seed=32),
    Scenario("drift metals to 80% over 15m", "drift", "Gold | Metals | Materials", 1200, 0.80, 1.0, ramp_s=900, seed=33),
    Scenario("drift politics to 70% over 8m", "drift", "Politics", 780, 0.70, 2.0, ramp_s=480, seed=34),
    Scenario("burst markets x5 5m", "burst", "Markets", 300, 0.0, 5.0, seed=41),
    Scenario("burst earnings x4 10m", "burst", "Earnings", 600, 0.0, 4.0, seed=42),
    Scenario("burst oil x8 3m", "burst", "Energy | Oil", 180, 0.0, 8.0, seed=43),
    Scenario("burst commentary x3 15m", "burst", "Stock Commentary", 900, 0.0, 3.0, seed=44),
    Scenario("noise seed 51", "noise", seed=51),
    Scenario("noise seed 52", "noise", seed=52),
    Scenario("noise seed 53", "noise", seed=53),
    Scenario("noise seed 54", "noise", seed=54),
)


def stream_of(scenario: Scenario) -> Iterator[SimMessage]:
    """The scenario's messages in event-time order: each segment is its own simulated stream (seeded per
    segment), cut at the segment's end."""
    begin = START
    for index, (length_s, shock) in enumerate(scenario.segments()):
        end = begin + timedelta(seconds=length_s)
        segment = generate(seed=scenario.seed * 1000 + index, start=begin, rate=RATE, count=None, shock=shock)
        yield from itertools.takewhile(lambda m, end=end: m.event_time < end, segment)
        begin = end


def scored_records(scenario: Scenario, scoring: Scoring, names: TopicNames, batch: int = 512,
                   deployed: Scoring | None = None) -> Iterator[list[ScoredRecord]]:
    """The worker's parse -> score -> publish path, batch by batch, as the ScoredRecords of ``finpulse.scored``;
    from ``DEPLOY_AT_S`` on, by ``deployed`` where given (a worker restarted on a new model)."""
    topic_of = {"news": names.news, "comment": names.comments}
    messages = stream_of(scenario)
    offset = itertools.count()
    while chunk := list(itertools.islice(messages, batch)):
        if deployed is not None and chunk[0].event_time >= START + timedelta(seconds=DEPLOY_AT_S):
            scoring = deployed
        source = [SourceMessage(topic_of[m.kind], 0, next(offset), None, m.value()) for m in chunk]
        valid, _ = scoring.parse(source)
        predictions = scoring.score([item.text for _, item in valid])
        yield [ScoredRecord.from_json(out.value) for out in scoring.publishable(valid, predictions)
               if out.topic == names.scored]


@dataclass
class Outcome:
    scenario: Scenario
    alerts: list[AlertRecord]
    true_positive: AlertRecord | None
    false_positives: list[AlertRecord]
    delay_s: float | None
    ticker_hits: list[AlertRecord]           # the first firing of each shocked ticker, during the event
    ticker_false_positives: list[AlertRecord]


def in_event(scenario: Scenario, alert: AlertRecord, window_s: int) -> bool:
    return scenario.event_start - timedelta(seconds=window_s) <= alert.started_at < scenario.event_end


def judge(scenario: Scenario, alerts: list[AlertRecord], window_s: int, lateness_s: int) -> Outcome:
    firing = [a for a in alerts if a.event_kind == "firing" and a.key_type == "topic"]
    hit = None
    if scenario.positive:
        hit = next((a for a in firing if a.key == scenario.topic and in_event(scenario, a, window_s)), None)
    delay = None if hit is None else (hit.window_end - scenario.event_start).total_seconds() + lateness_s
    ticker_hits: dict[str, AlertRecord] = {}
    ticker_false: list[AlertRecord] = []
    for alert in (a for a in alerts if a.event_kind == "firing" and a.key_type == "ticker"):
        if alert.key in scenario.tickers and alert.key not in ticker_hits and in_event(scenario, alert, window_s):
            ticker_hits[alert.key] = alert
        else:
            ticker_false.append(alert)
    return Outcome(scenario, alerts, hit, [a for a in firing if a is not hit], delay, list(ticker_hits.values()),
                   ticker_false)


def run_scenario(scenario: Scenario, scoring: Scoring, names: TopicNames, aggregate: AggregateSettings,
                 detect: DetectSettings, deployed: Scoring | None = None) -> Outcome:
    aggregators = [WindowAggregator(aggregate, key_type) for key_type in ("topic", "ticker")]
    detector = SpikeDetector(detect)
    alerts: list[AlertRecord] = []
    for batch in scored_records(scenario, scoring, names, deployed=deployed):
        for aggregator in aggregators:
            alerts += detector.feed(aggregator.feed(batch).final)
    for aggregator in aggregators:
        alerts += detector.feed(aggregator.flush())
    return judge(scenario, alerts, detect.window_s, aggregate.allowed_lateness_s)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorer", default="baseline", choices=["baseline", "auto", "model"])
    parser.add_argument("--limit", type=int, default=0, help="run only the first N scenarios")
    parser.add_argument("--ticker-min-count", type=int, default=0,
                        help="judge tickers with this min_count (a [detect.overrides.\"ticker:*\"] setting); 0: the default")
    parser.add_argument("--kind", choices=["shock", "drift", "burst", "noise"], help="run only this kind of scenario")
    parser.add_argument("--deploy", metavar="MODEL",
                        help=f"a worker restarted on this model {DEPLOY_AT_S // 60} minutes in scores the rest")
    parser.add_argument("--relearn-windows", type=int, help="[detect] relearn_windows (default: its default)")
    args = parser.parse_args(argv or [])   # called as main() by the bench runner: defaults

    names = TopicNames("bench")
    scorer = load_scorer(args.scorer)
    scoring = Scoring(scorer, names, max_text_chars=20_000)
    deployed = Scoring(load_scorer("model", args.deploy), names, max_text_chars=20_000) if args.deploy else None
    overrides = {"ticker:*": {"min_count": args.ticker_min_count}} if args.ticker_min_count else {}
    relearn = {} if args.relearn_windows is None else {"relearn_windows": args.relearn_windows}
    detect = DetectSettings(key_types=["topic", "ticker"], overrides=overrides, **relearn)
    aggregate = AggregateSettings(windows=[f"{detect.window_s}s/{detect.window_s}s"])
    scenarios = [s for s in SCENARIOS if args.kind in (None, s.kind)]
    scenarios = scenarios[: args.limit] if args.limit else scenarios
    outcomes = [run_scenario(s, scoring, names, aggregate, detect, deployed)
                for s in tqdm(scenarios, desc="alert scenarios", unit="scenario")]

    deploy = (f", then {deployed.scorer.model_version} from minute {DEPLOY_AT_S // 60} (relearn_windows "
              f"{detect.relearn_windows})" if deployed else "")
    print(f"\nAlert quality on {len(outcomes)} SIMULATED scenarios (scorer {scorer.model_version}{deploy}, "
          f"{detect.window_s}s windows, lateness {aggregate.allowed_lateness_s}s)")
    print(f"{'scenario':42} {'expect':7} {'detected':9} {'delay s':>8} {'false alerts':>12} "
          f"{'tickers hit':>11} {'false ticker alerts':>19}")
    for o in outcomes:
        detected = "yes" if o.true_positive else "no"
        delay = f"{o.delay_s:.0f}" if o.delay_s is not None else "-"
        tickers = f"{len(o.ticker_hits)}/{len(o.scenario.tickers)}" if o.scenario.positive else "-"
        print(f"{o.scenario.name:42} {'alert' if o.scenario.positive else 'none':7} {detected:9} {delay:>8} "
              f"{len(o.false_positives):>12} {tickers:>11} {len(o.ticker_false_positives):>19}")
        for alert in o.false_positives + o.ticker_false_positives:
            print(f"{'':4}false alert: {alert.summary}")
    positives = sum(o.scenario.positive for o in outcomes)
    tp = sum(o.true_positive is not None for o in outcomes)
    fp = sum(len(o.false_positives) for o in outcomes)
    delays = [o.delay_s for o in outcomes if o.delay_s is not None]
    escalated = sum(1 for o in outcomes if o.true_positive is not None
                    and any(a.event_kind == "escalation" and a.id == o.true_positive.id for a in o.alerts))
    figures = {
        "scenarios": len(outcomes), "positives": positives, "true_positives": tp, "false_positives": fp,
        "true_positives_escalated": escalated,
        "precision": round(tp / (tp + fp), 3) if tp + fp else 1.0,
        "recall": round(tp / positives, 3) if positives else 1.0,
        "median_delay_s": statistics.median(delays) if delays else None,
        "median_delay_sharp_s": statistics.median([o.delay_s for o in outcomes if o.delay_s is not None
                                                   and o.scenario.kind == "shock"] or [0]),
    }
    ticker_tp = sum(len(o.ticker_hits) for o in outcomes)
    ticker_fp = sum(len(o.ticker_false_positives) for o in outcomes)
    figures.update({
        "ticker_true_positives": ticker_tp, "ticker_false_positives": ticker_fp,
        "ticker_precision": round(ticker_tp / (ticker_tp + ticker_fp), 3) if ticker_tp + ticker_fp else 1.0,
        "ticker_recall": round(sum(bool(o.ticker_hits) for o in outcomes if o.scenario.positive) / positives, 3)
        if positives else 1.0,
    })
    print(f"\nprecision {figures['precision']:.3f} (goal >= 0.9)   recall {figures['recall']:.3f} (goal >= 0.9)   "
          f"median detection delay {figures['median_delay_s']} s (sharp shocks {figures['median_delay_sharp_s']} s); "
          f"{escalated} of {tp} detected events escalated while firing")
    print(f"tickers: precision {figures['ticker_precision']:.3f}   events with a ticker alert "
          f"{figures['ticker_recall']:.3f}   ({ticker_tp} shocked tickers alerted, {ticker_fp} false ticker alerts)")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
