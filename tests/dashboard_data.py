"""Realistic FinPulse output records (trends, alerts, scored messages, delivery states) for the dashboard's tests
and benchmark, built with the real record classes, plus a producer that writes them into a broker the way the
worker does (keyed, with the event time as the Kafka record timestamp).

``synthesize`` makes a stream of closed one-minute windows for a set of topics and tickers, the newest window
still open (partial), with a negative shock on one key over its last few windows, a firing alert for it, a resolved
alert on another key, and delivery states for both endpoints of the firing alert.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from kafka import KafkaProducer

from alerts.detect import alert_id
from models.labels import TOPICS
from stream.aggregate import trend_outgoing
from stream.config import Settings
from stream.records import AlertRecord, MessageRef, ScoredRecord, TrendRecord, epoch_ms, format_time
from stream.topics import TopicNames

SHOCK_TOPIC = "Energy | Oil"
DEFAULT_TOPICS = (SHOCK_TOPIC, "Earnings", "Fed | Central Banks", "Markets", "Macro", "Currencies")
TICKERS = ("AAPL", "MSFT", "XOM", "CVX", "JPM", "TSLA", "NVDA", "AMZN", "BP", "SHEL")
_BEARISH_TEXT = ("{t} plunges as crude slumps on weak demand warning", "Selloff deepens: {t} falls after downgrade",
                 "{t} misses estimates, shares tumble", "Investors fear more losses for {t}")
_BULLISH_TEXT = ("{t} surges after record quarter", "Analysts upgrade {t}, shares rally",
                 "{t} beats estimates and raises guidance")
_NEUTRAL_TEXT = ("{t} holds steady ahead of earnings", "What to watch for {t} this week")


@dataclass
class Synthetic:
    trends: list[TrendRecord] = field(default_factory=list)
    alerts: list[AlertRecord] = field(default_factory=list)
    scored: list[ScoredRecord] = field(default_factory=list)
    deliveries: dict[str, dict] = field(default_factory=dict)   # compacted key -> delivery state


def _message(rng: random.Random, key: str, when: datetime, score: float, ident: str, model_version: str) -> ScoredRecord:
    template = rng.choice(_BEARISH_TEXT if score < -0.2 else _BULLISH_TEXT if score > 0.2 else _NEUTRAL_TEXT)
    kind = "news" if rng.random() < 0.4 else "comment"
    topic = key if key in TOPICS else rng.choice(TOPICS)
    tickers = (key,) if key not in TOPICS else (rng.choice(TICKERS),)
    return ScoredRecord(
        id=ident, kind=kind, event_time=when, text=template.format(t=f"${tickers[0]}"), topic=topic,
        topic_confidence=0.8, sentiment="bearish" if score < -0.2 else "bullish" if score > 0.2 else "neutral",
        sentiment_score=round(score, 4), tickers=tickers, model_version=model_version, scored_at=when,
        source="simulated", url=f"https://news.example/{ident}" if kind == "news" else "")


def synthesize(end: datetime, *, minutes: int = 30, window_s: int = 60, topics: tuple[str, ...] = DEFAULT_TOPICS,
               tickers: tuple[str, ...] = TICKERS[:3], rate_per_s: float = 5.0, shock_key: str = SHOCK_TOPIC,
               shock_windows: int = 4, scored_limit: int = 400, seed: int = 3,
               model_version: str = "finpulse-minilm-test") -> Synthetic:
    """``minutes`` of windows aligned to ``window_s``, the newest one open at ``end`` (partial); the last
    ``shock_windows`` windows of ``shock_key`` turn sharply bearish. Scored messages are made for the newest windows,
    ``scored_limit`` at most."""
    rng = random.Random(seed)
    out = Synthetic()
    keys = [("topic", t) for t in topics] + [("ticker", t) for t in tickers]
    per_window = max(1, int(rate_per_s * window_s / max(1, len(topics))))
    windows = max(1, minutes * 60 // window_s)
    last_start = datetime.fromtimestamp(end.timestamp() // window_s * window_s, tz=end.tzinfo)
    first_start = last_start - timedelta(seconds=(windows - 1) * window_s)
    scored_budget = scored_limit
    for w in reversed(range(windows)):  # newest first, so the scored budget goes to recent windows
        start = first_start + timedelta(seconds=w * window_s)
        stop = start + timedelta(seconds=window_s)
        partial = w == windows - 1
        for key_type, key in keys:
            shocked = key == shock_key and w >= windows - shock_windows
            bear_p = 0.85 if shocked else rng.uniform(0.12, 0.28)
            count = max(1, int(per_window * (0.5 if partial else 1.0) * rng.uniform(0.7, 1.3)))
            scores = [rng.uniform(-1, -0.3) if rng.random() < bear_p else rng.uniform(-0.2, 0.9) for _ in range(count)]
            ids = [f"{key_type}-{key}-{w}-{i}".replace(" ", "").replace("|", "") for i in range(count)]
            elapsed = min(window_s, (end - start).total_seconds())  # the open window only holds messages until now
            messages = [_message(rng, key, start + timedelta(seconds=rng.uniform(0, elapsed)), s, i, model_version)
                        for s, i in zip(scores, ids)]
            worst = sorted(messages, key=lambda m: m.sentiment_score)[:3]
            refs = tuple(MessageRef(id=m.id, text=m.text, sentiment_score=m.sentiment_score, kind=m.kind, url=m.url,
                                    event_time=format_time(m.event_time)).to_dict() for m in worst)
            news = sum(m.kind == "news" for m in messages)
            out.trends.append(TrendRecord(
                key_type=key_type, key=key, window_s=window_s, window_start=start, window_end=stop, count=count,
                mean_score=round(sum(scores) / count, 4),
                bearish_share=round(sum(m.sentiment == "bearish" for m in messages) / count, 4),
                bullish_share=round(sum(m.sentiment == "bullish" for m in messages) / count, 4),
                news_count=news, comment_count=count - news, final=not partial, model_version=model_version,
                emitted_at=stop if not partial else end, most_negative=refs))
            if scored_budget > 0 and key_type == "topic":
                out.scored.extend(messages[:scored_budget])
                scored_budget -= len(messages[:scored_budget])
    _add_alerts(out, last_start, window_s, shock_key, shock_windows, topics, model_version)
    return out


def _add_alerts(out: Synthetic, last_start: datetime, window_s: int, shock_key: str, shock_windows: int,
                topics: tuple[str, ...], model_version: str) -> None:
    shock_start = last_start - timedelta(seconds=(shock_windows - 1) * window_s)
    shock_trend = next(t for t in out.trends if t.key == shock_key and t.window_start == shock_start)
    key_type = shock_trend.key_type
    firing = AlertRecord(
        id=alert_id(key_type, shock_key, window_s, shock_start), status="firing", key_type=key_type,
        key=shock_key, window_s=window_s, window_start=shock_start, window_end=shock_trend.window_end,
        severity="warning", observed={"bearish_share": shock_trend.bearish_share, "mean_score": shock_trend.mean_score,
                                       "count": shock_trend.count},
        baseline={"bearish_share": 0.2, "bearish_share_std": 0.05, "mean_score": 0.15, "mean_score_std": 0.1},
        deviation=round((shock_trend.bearish_share - 0.2) / 0.05, 2), started_at=shock_start,
        emitted_at=shock_trend.window_end, messages=shock_trend.most_negative,
        summary=f"{shock_key}: bearish share {shock_trend.bearish_share:.0%} vs 20% usual", model_version=model_version)
    other = next(t for t in topics if t != shock_key)
    old_start = shock_start - timedelta(seconds=12 * window_s)
    old = AlertRecord(
        id=alert_id("topic", other, window_s, old_start), status="firing", key_type="topic", key=other,
        window_s=window_s, window_start=old_start, window_end=old_start + timedelta(seconds=window_s), severity="warning",
        observed={"bearish_share": 0.5, "mean_score": -0.2, "count": 20},
        baseline={"bearish_share": 0.2, "bearish_share_std": 0.08, "mean_score": 0.1, "mean_score_std": 0.1},
        deviation=3.75, started_at=old_start, emitted_at=old_start + timedelta(seconds=window_s),
        summary=f"{other}: bearish share 50% vs 20% usual", model_version=model_version)
    resolved_at = old_start + timedelta(seconds=4 * window_s)
    # The shock fires as a warning and escalates to critical with its next window.
    worse = next(t for t in out.trends if t.key == shock_key and t.window_start == shock_start + timedelta(seconds=window_s))
    escalation = replace(
        firing, severity="critical", escalated_from="warning", window_start=worse.window_start,
        window_end=worse.window_end, emitted_at=worse.window_end, messages=worse.most_negative,
        deviation=round(firing.deviation * 1.5, 2), summary=f"Escalated from warning to critical on {shock_key}")
    out.alerts += [old, AlertRecord(**{**old.__dict__, "status": "resolved", "emitted_at": resolved_at,
                                       "resolved_at": resolved_at}), firing, escalation]
    # The desk got the firing and the escalation; the critical-only pager only the escalation, and it failed.
    for event, status, endpoint, error in ((firing, "delivered", "risk-webhook", ""),
                                           (escalation, "delivered", "risk-webhook", ""),
                                           (escalation, "failed", "pagerduty", "HTTP 503 from events.pagerduty.example")):
        out.deliveries[f"{event.event_id}|{endpoint}"] = {
            "event_id": event.event_id, "endpoint": endpoint, "state": status,
            "attempts": 1 if status == "delivered" else 5, "last_error": error,
            "updated_at": format_time(event.emitted_at + timedelta(seconds=2))}


def produce(settings: Settings, data: Synthetic) -> None:
    """Write everything to the live topics of ``settings``' prefix, as the worker and dispatcher would."""
    import json

    names = TopicNames(settings.kafka.topic_prefix)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20)
    try:
        for t in data.trends:
            for out in trend_outgoing(t, names):
                producer.send(out.topic, out.value, key=out.key, timestamp_ms=out.timestamp_ms)
        for a in data.alerts:
            producer.send(names.alerts, a.to_json(), key=a.id.encode(), timestamp_ms=epoch_ms(a.emitted_at))
        for s in data.scored:
            producer.send(names.scored, s.to_json(), key=s.id.encode(), timestamp_ms=epoch_ms(s.event_time))
        for key, state in data.deliveries.items():
            producer.send(names.deliveries, json.dumps(state).encode(), key=key.encode())
        producer.flush(30)
    finally:
        producer.close()
