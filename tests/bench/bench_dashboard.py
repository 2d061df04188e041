"""Benchmark of the dashboard with a full day in memory: 24 hours of FinPulse output at 50 messages/s.

What a day at 50 msg/s puts on the dashboard's topics (4.3 M messages): per key (the simulator's 20 topics and 55
tickers) and per window spec of the worker's defaults (1m/1m, 5m/1m, 1h/5m), one trend window each, 237,600 in
all, with the five most negative messages of the last two hours' windows; the newest 50,000 scored messages (the
store's cap; older ones would be trimmed anyway); ~2 alert episodes per topic per day (fired and resolved) with two
deliveries each. Everything goes through ``LiveStore.add`` as JSON bytes, as the consumer hands it over.

Measured in one run, each against a baseline measured in the same run (10 minutes of data, same views):
- store memory (deep pandas size) and ingest rate;
- AppTest run time of each view (median of 3 warm runs; the first, cold run is reported separately);
- browser time to interactive of each view in headless Chromium, median of 5 visits (page opened -> content
  drawn and the script run finished), against a dashboard server holding the same store. Goal: < 2 s for every view.

``python -m tests.bench.bench_dashboard [--hours 24] [--rate 50] [--no-browser] [--json FILE]``
When Streamlit runs this file (the browser part does), it serves the dashboard over a synthetic store instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dashboard.live import FeedStatus  # noqa: E402
from dashboard.settings import DashboardSettings  # noqa: E402
from dashboard.store import LiveStore  # noqa: E402
from models.labels import TOPICS  # noqa: E402
from stream.records import format_time  # noqa: E402

VIEWS = ("overview", "drilldown", "alerts", "model")
WINDOW_SPECS = ((60, 60), (300, 60), (3600, 300))   # the worker's default [aggregate] windows: size, step
TICKERS = tuple(f"T{i:02d}" for i in range(55))
MESSAGES_HOURS = 2                                    # windows this recent carry their most negative messages
FEED = None                                           # the feed the AppTest scripts draw (set by ``appview_times``)


class StaticFeed:
    """A feed whose store is filled up front and whose status says it is live (no Kafka in the timing)."""

    def __init__(self, store: LiveStore):
        self.store = store
        self.status = FeedStatus(state="live", message="benchmark store", bootstrap_servers="(none)",
                                 loaded=True)


def synthetic_day(hours: float, rate: float, end: datetime, seed: int = 5):
    """Yield (kind, value bytes, key) in the order the consumer would hand them over, oldest first."""
    rng = random.Random(seed)
    keys = [("topic", t, 1.0 / len(TOPICS)) for t in TOPICS] + [("ticker", t, 0.4 / len(TICKERS)) for t in TICKERS]
    shocked = {("topic", rng.choice(TOPICS))}
    for size, step in WINDOW_SPECS:
        last_start = end - timedelta(seconds=end.timestamp() % step) - timedelta(seconds=size - step)
        starts = int(hours * 3600 // step)
        for n in range(starts, -1, -1):
            start = last_start - timedelta(seconds=n * step)
            recent = (end - start).total_seconds() < MESSAGES_HOURS * 3600
            for key_type, key, share in keys:
                count = max(1, int(rng.gauss(rate * size * share, 3)))
                bear = 0.8 if (key_type, key) in shocked and n < 10 else rng.uniform(0.1, 0.3)
                record = {"key_type": key_type, "key": key, "window_s": size, "window_start": format_time(start),
                          "window_end": format_time(start + timedelta(seconds=size)), "count": count,
                          "mean_score": round(rng.uniform(0.0, 0.3) - bear, 4), "bearish_share": round(bear, 4),
                          "bullish_share": round(rng.uniform(0.2, 0.4), 4), "news_count": count * 2 // 5,
                          "comment_count": count - count * 2 // 5, "final": n > 0, "model_version": "bench-model",
                          "emitted_at": format_time(min(end, start + timedelta(seconds=size)))}
                if recent:
                    record["most_negative"] = [{"id": f"{key}-{n}-{i}", "text": f"{key} tumbles after warning {i}",
                                                "sentiment_score": -0.9, "kind": "news",
                                                "url": f"https://news.example/{key}/{n}/{i}",
                                                "event_time": format_time(start)} for i in range(5)]
                yield "trends", json.dumps(record).encode(), f"{key_type}:{key}".encode()
    for i in range(int(hours * 2 * len(TOPICS) / 24) or 1):
        topic = TOPICS[i % len(TOPICS)]
        fired = end - timedelta(seconds=rng.uniform(600, hours * 3600))
        alert_id = f"topic:{topic}:60:{format_time(fired)}"
        for status, at in (("firing", fired), ("resolved", fired + timedelta(minutes=8))):
            if at > end:
                continue
            alert = {"id": alert_id, "status": status, "key_type": "topic", "key": topic, "window_s": 60,
                     "window_start": format_time(fired), "window_end": format_time(fired + timedelta(minutes=1)),
                     "severity": rng.choice(["info", "warning", "critical"]), "deviation": round(rng.uniform(4, 12), 2),
                     "observed": {"bearish_share": 0.7, "mean_score": -0.5, "count": 120},
                     "baseline": {"bearish_share": 0.2, "bearish_share_std": 0.05, "mean_score": 0.1,
                                  "mean_score_std": 0.08},
                     "started_at": format_time(fired), "emitted_at": format_time(at),
                     "resolved_at": format_time(at) if status == "resolved" else None,
                     "messages": [{"id": f"{alert_id}-{j}", "text": f"{topic} slump {j}", "sentiment_score": -0.9}
                                  for j in range(5)], "summary": f"{topic}: negative spike"}
            yield "alerts", json.dumps(alert).encode(), alert_id.encode()
            for endpoint in ("risk-webhook", "pagerduty"):
                event_id = f"{alert_id}:{status}"
                state = {"event_id": event_id, "alert_id": alert_id, "endpoint": endpoint, "status": "delivered",
                         "attempts": 1, "last_error": "", "updated_at": format_time(at + timedelta(seconds=1))}
                yield "deliveries", json.dumps(state).encode(), f"{event_id}|{endpoint}".encode()
    scored = min(DashboardSettings().max_scored_rows, int(hours * 3600 * rate))
    for i in range(scored):
        when = end - timedelta(seconds=(scored - i) / rate)
        topic = rng.choice(TOPICS)
        score = round(rng.uniform(-1, 1), 4)
        message = {"id": f"m{i}", "kind": "news" if i % 5 < 2 else "comment", "event_time": format_time(when),
                   "text": f"${rng.choice(TICKERS)} {topic} headline number {i} with a few more words to be realistic",
                   "topic": topic, "topic_confidence": 0.8, "sentiment": "bearish" if score < -0.2 else "neutral",
                   "sentiment_score": score, "tickers": [rng.choice(TICKERS)], "model_version": "bench-model",
                   "scored_at": format_time(when), "source": "simulated", "url": f"https://news.example/m{i}"}
        yield "scored", json.dumps(message).encode(), message["id"].encode()


def build_store(hours: float, rate: float) -> tuple[LiveStore, dict]:
    store = LiveStore(DashboardSettings())
    end = datetime.now(timezone.utc)
    records = list(synthetic_day(hours, rate, end))
    began = time.perf_counter()
    for kind, value, key in records:
        store.add(kind, value, key)
    snap = store.snapshot()
    seconds = time.perf_counter() - began
    return store, {"records": len(records), "ingest_s": seconds, "ingest_per_s": len(records) / seconds,
                   "memory_mb": snap.memory_bytes() / 2**20, "trend_rows": len(snap.trends),
                   "scored_rows": len(snap.scored), "message_rows": len(snap.window_messages),
                   "alert_rows": len(snap.alerts), "delivery_rows": len(snap.deliveries)}


def _view_script(view: str) -> None:
    from dashboard.ui import run
    from stream.config import Settings
    from tests.bench import bench_dashboard as bench

    run(feed=bench.FEED, page=view, settings=Settings(raw={}))


def appview_times(store: LiveStore, repeats: int = 3) -> dict[str, dict[str, float]]:
    """AppTest run time of each view: the first (cold) run and the median of ``repeats`` warm runs."""
    from streamlit.testing.v1 import AppTest

    from tests.bench import bench_dashboard as bench
    bench.FEED = StaticFeed(store)
    out = {}
    for view in VIEWS:
        at = AppTest.from_function(_view_script, args=(view,), default_timeout=120)
        began = time.perf_counter()
        at.run()
        cold = time.perf_counter() - began
        if at.exception:
            raise RuntimeError(f"{view} view failed: {at.exception[0].value}")
        warm = []
        for _ in range(repeats):
            began = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - began)
        out[view] = {"cold_s": cold, "warm_s": statistics.median(warm)}
    return out


def browser_times(hours: float, rate: float, repeats: int = 5) -> dict[str, float]:
    """Time to interactive of each view in headless Chromium against a server holding the synthetic store."""
    from stream.broker import free_port, wait_for_port
    from tests.browser import chromium_page
    from tests.procs import ManagedProcess

    port = free_port()
    server = ManagedProcess([sys.executable, "-m", "streamlit", "run", __file__, "--server.headless=true",
                             f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
                             "--server.fileWatcherType=none"], tempfile.mkdtemp(prefix="bench-dashboard-"), "streamlit",
                            env={"FINPULSE_BENCH_HOURS": str(hours), "FINPULSE_BENCH_RATE": str(rate)})
    with server.start():
        wait_for_port("127.0.0.1", port, 60, server.proc)
        out = {}
        with chromium_page(1500, 1200) as page:
            # The first visit builds the store in the server: not part of any view's time.
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator(".st-key-fp-unusual-1").wait_for(timeout=600_000)
            for view in VIEWS:
                path = "" if view == "overview" else view
                times = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    page.goto(f"http://127.0.0.1:{port}/{path}", wait_until="domcontentloaded")
                    page.locator("[data-testid=stVegaLiteChart], [data-testid=stDataFrame]").first.wait_for(timeout=120_000)
                    page.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                                           "?.getAttribute('data-test-script-state') === 'notRunning'", timeout=120_000)
                    times.append(time.perf_counter() - began)
                out[view] = statistics.median(times)
        return out


def serve() -> None:
    """What Streamlit runs when the browser part starts this file: the dashboard over a synthetic store."""
    import streamlit as st

    from dashboard.ui import run
    from stream.config import Settings

    @st.cache_resource(show_spinner="building the benchmark store…")
    def feed() -> StaticFeed:
        return StaticFeed(build_store(float(os.environ["FINPULSE_BENCH_HOURS"]), float(os.environ["FINPULSE_BENCH_RATE"]))[0])

    run(feed=feed(), settings=Settings(raw={"dashboard": {"refresh_s": 5}}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--baseline-hours", type=float, default=1 / 6)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    print(f"dashboard benchmark: {args.hours:g} h at {args.rate:g} msg/s vs a {args.baseline_hours:g} h baseline", flush=True)
    appview_times(LiveStore(DashboardSettings()), repeats=1)  # imports and caches warmed up, outside any timing
    results: dict = {}
    for name, hours in (("baseline", args.baseline_hours), ("day", args.hours)):
        store, figures = build_store(hours, args.rate)
        figures["appview"] = appview_times(store)
        results[name] = figures
        print(f"  {name}: {figures['records']:,} records ingested in {figures['ingest_s']:.1f}s "
              f"({figures['ingest_per_s']:,.0f}/s); store {figures['memory_mb']:.1f} MB: {figures['trend_rows']:,} windows, "
              f"{figures['scored_rows']:,} messages, {figures['message_rows']:,} window messages, "
              f"{figures['alert_rows']:,} alerts, {figures['delivery_rows']:,} deliveries", flush=True)
        if not args.no_browser:
            figures["browser_s"] = browser_times(hours, args.rate)
    base, day = results["baseline"], results["day"]
    print(f"\n  store memory: {day['memory_mb']:.1f} MB = {day['memory_mb'] / base['memory_mb']:.1f}x the baseline")
    print(f"  {'view':<10} {'AppTest warm':>12} {'ratio':>6} {'cold':>7} {'browser TTI':>12} {'ratio':>6}  goal < 2 s")
    for view in VIEWS:
        warm, cold = day["appview"][view]["warm_s"], day["appview"][view]["cold_s"]
        ratio = warm / base["appview"][view]["warm_s"]
        line = f"  {view:<10} {warm:>11.3f}s {ratio:>5.1f}x {cold:>6.2f}s"
        if "browser_s" in day:
            tti, tti_ratio = day["browser_s"][view], day["browser_s"][view] / base["browser_s"][view]
            line += f" {tti:>11.2f}s {tti_ratio:>5.1f}x  {'ok' if tti < 2 else 'OVER'}"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from streamlit import runtime

    if runtime.exists():
        serve()
    else:
        main()
