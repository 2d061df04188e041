"""The dashboard's views, run with Streamlit's AppTest against records produced into the real tansu broker and
read by the dashboard's real background consumer; plus the store's bounds and the pure data shaping.

Each AppTest run re-reads the live store, so tests wait (bounded) until the consumer has caught up rather than
sleeping a fixed time; nothing here asserts on timings.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
import pytest
import torch
from kafka import KafkaProducer
from safetensors.torch import save_file
from kafka import errors as kafka_errors
from streamlit.testing.v1 import AppTest

from dashboard import charts
from dashboard import shaping as sh
from dashboard.cli import settings_environ, streamlit_command
from dashboard.live import SILENT_AFTER_S, FeedStatus, broker_answered
from dashboard.model_card import confusion_matrices, head_reports, metric_table
from dashboard.pages import unusual_line
from dashboard.settings import DashboardSettings
from alerts.silences import expired_now, new_silence, write_silence
from dashboard.store import LiveStore
from models.labels import SENTIMENTS, TOPICS
from models.metrics import head_report
from stream.broker import EmbeddedBroker, free_port
from stream.config import Settings
from stream.records import utcnow
from stream.topics import TopicNames, ensure_topics
from tests.dashboard_data import SHOCK_TOPIC, TICKERS, Synthetic, produce, synthesize
from tests.network import broker_behind_link
from tests.procs import isolated_settings

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
WAIT_S = 60


# ---------------------------------------------------------------- helpers

def _env_for(monkeypatch, settings: Settings, **dashboard) -> None:
    """Point the app (which reads settings from the environment, as `finpulse dashboard` passes them) at a broker."""
    for key, value in settings_environ(settings.raw, None).items():
        monkeypatch.setenv(key, value)
    for key, value in {"refresh_s": 0.5, **dashboard}.items():
        monkeypatch.setenv(f"FINPULSE_DASHBOARD__{key.upper()}", str(value))
    monkeypatch.delenv("FINPULSE_DASHBOARD_PASSWORD", raising=False)
    monkeypatch.delenv("FINPULSE_CONFIG", raising=False)


def _view_script(page: str) -> None:
    from dashboard.ui import run
    run(page=page)


def _ask_script(model_dir: str) -> None:
    from dashboard.ask import render_ask
    from stream.config import WorkerSettings
    render_ask(WorkerSettings(scorer="model", model_dir=model_dir), "")


def _markdown(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown]


def _links(at: AppTest) -> list[tuple[str, str, dict[str, str]]]:
    """Each in-app link as (label, target view, query parameters)."""
    return [(link.value, link.proto.page, {k: v[0] for k, v in parse_qs(link.proto.query_string).items()})
            for link in at.page_link]


def _ranked(at: AppTest) -> list[str]:
    """The Overview's ranking lines: links to the drill-down in the app, markdown links when a view is drawn alone."""
    return [text for text in [label for label, _, _ in _links(at)] + _markdown(at) if re.match(r"\[?\*\*\d+\. ", text)]


def _chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def run_until(at: AppTest, ready, what: str) -> AppTest:
    """Re-run the app until ``ready(at)``: the background consumer fills the store asynchronously."""
    deadline = time.monotonic() + WAIT_S
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        # A view that fails is caught and reported on the page (so the rest keeps refreshing): still a failure here.
        assert not [e.value for e in at.error if "could not be drawn" in e.value], [e.value for e in at.error]
        if ready(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard never showed {what}; markdown: {_markdown(at)[:8]}, "
                                 f"info: {[i.value for i in at.info]}, warnings: {[w.value for w in at.warning]}")
        time.sleep(0.3)


@pytest.fixture(autouse=True)
def _stop_feeds():
    yield
    from dashboard.ui import shared_feed
    shared_feed.clear()  # on_release stops each background consumer


@pytest.fixture
def produced(fp_settings):
    data = synthesize(utcnow())
    produce(fp_settings, data)
    return data


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model directory as `finpulse train` leaves it, as far as the Model view reads it: the card, the
    evaluation (from the real metrics code), and the files the registry checks for."""
    path = tmp_path / "models" / "finpulse-minilm-test"
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 200)
    predicted = np.where(rng.random(200) < 0.8, truth, rng.integers(0, 3, 200))
    topic_truth = rng.integers(0, len(TOPICS), 300)
    metrics = {"model_version": "finpulse-minilm-test",
               "test": {"sentiment": head_report(truth, predicted, SENTIMENTS),
                        "topic": head_report(topic_truth, topic_truth, TOPICS)},
               "validation": {"sentiment": head_report(truth, truth, SENTIMENTS)}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "README.md").write_text("# finpulse-minilm-test\n\nA model card for the dashboard test.\n")
    (path / "config.json").write_text(json.dumps({"finpulse_format": 1, "model_version": "finpulse-minilm-test",
                                                  "topics": list(TOPICS), "sentiments": list(SENTIMENTS),
                                                  "encoder": {"model_type": "bert"}, "pooling": "mean",
                                                  "max_length": 48}))
    save_file({"weight": torch.zeros(2)}, str(path / "model.safetensors"))   # whole, as the registry checks it
    (path / "tokenizer.json").write_text("{}")
    return path


# ---------------------------------------------------------------- views on a real broker

def test_overview_puts_the_shocked_topic_first_with_its_alert(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_file(APP, default_timeout=60)
    run_until(at, lambda a: any(m.startswith("**1. ") for m in _ranked(a)), "the unusual ranking")
    first = _ranked(at)[0]
    assert "Energy \\| Oil" in first and "alert firing" in first and "critical" in first
    alerts = [m for m in _markdown(at) if "firing since" in m or "resolved" in m]
    # The shock fired as a warning and escalated: one alert, shown at its highest severity.
    assert "Energy \\| Oil" in alerts[0] and "critical" in alerts[0] and "escalated from warning" in alerts[0]
    assert sum("Energy \\| Oil" in m for m in alerts) == 1
    assert any("Earnings" in m and "resolved" in m for m in alerts)
    # One click from a ranked key to its drill-down, and from an alert to the messages behind it, in this tab.
    links = _links(at)
    assert (first, "drilldown", {"key_type": "topic", "key": SHOCK_TOPIC}) in links
    firing = next(a for a in produced.alerts if a.key == SHOCK_TOPIC)
    assert ("Messages behind this alert", "alerts", {"alert": firing.id}) in links
    assert any(c.value.startswith(":green[●] Live: last update") and "finpulse-minilm-test" in c.value
               for c in at.caption)
    assert {m.label for m in at.metric} >= {"Latest data", "Firing alerts", "Messages in newest window"}
    assert next(m for m in at.metric if m.label == "Firing alerts").value == "1"
    assert [spec["mark"]["type"] for spec in _chart_specs(at)] == ["rect", "bar"]  # heatmap, volume bars
    assert at.get("download_button")                          # the displayed windows as CSV


def test_overview_filters_tickers_and_converts_time_zone(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings, timezone="Asia/Tokyo")
    at = AppTest.from_file(APP, default_timeout=60)
    run_until(at, lambda a: any(m.startswith("**1. ") for m in _ranked(a)), "the unusual ranking")
    at.radio(key="fp_key_type").set_value("ticker").run()
    at.multiselect(key="fp_keys_ticker").set_value(["MSFT"]).run()
    ranked = _ranked(at)
    assert len(ranked) == 1 and "MSFT" in ranked[0]
    newest = max(t.emitted_at for t in produced.trends)  # the open window, published "now"
    shown = next(m for m in at.metric if m.label == "Latest data").value
    assert shown == newest.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo")).strftime("%H:%M:%S")


def test_drilldown_shows_band_episodes_messages_and_split(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    at.query_params["key_type"] = "topic"
    at.query_params["key"] = SHOCK_TOPIC
    run_until(at, lambda a: len(_chart_specs(a)) >= 3, "the drill-down charts")
    assert at.selectbox(key="fp_drill_key").value == SHOCK_TOPIC
    layered = [c for c in _chart_specs(at) if "layer" in c]
    # the alert episode shaded under band, baseline and signal (closed windows' line, open ones' dotted line,
    # points), and a rule where it fired
    assert len(layered) == 2 and all([layer["mark"]["type"] for layer in c["layer"]] ==
                                     ["rect", "area", "line", "line", "line", "point", "rule"] for c in layered)
    negative = at.dataframe[0].value  # most negative, then most positive
    assert len(negative) == 5 and negative["sentiment_score"].is_monotonic_increasing
    assert (negative["sentiment_score"] < -0.3).all()
    assert negative["url"].str.startswith("https://news.example/").any()
    assert any(c.value.startswith("news: ") for c in at.caption)

    at.selectbox(key="fp_drill_key").set_value("Earnings").run()
    layers = [len(c["layer"]) for c in _chart_specs(at) if "layer" in c]
    assert layers == [7, 7]  # Earnings' fired and resolved episode is on its charts as well


def test_the_drill_down_lists_every_kept_message_of_a_window_and_an_alert_opens_the_window_that_fired(
        fp_settings, produced, monkeypatch):
    """The messages behind a move: a window chosen in the drill-down lists its messages, most negative first. A
    window whose messages are all kept lists them all; an older one, the few its record kept, and says why. The
    Alerts view links to the window that fired, and the address keeps the choice."""
    _env_for(monkeypatch, fp_settings)
    newest_closed = max((t for t in produced.trends if t.key == SHOCK_TOPIC and t.final), key=lambda t: t.window_start)
    fired = next(a for a in produced.alerts if a.key == SHOCK_TOPIC)
    kept = {m.id for m in produced.scored if m.topic == SHOCK_TOPIC
            and newest_closed.window_start <= m.event_time < newest_closed.window_end}
    assert len(kept) == newest_closed.count > 5   # the fixture keeps every message of the newest windows
    at = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    at.query_params.update(key_type="topic", key=SHOCK_TOPIC, at=f"{newest_closed.window_start:%Y-%m-%dT%H:%M}Z")
    run_until(at, lambda a: len(a.dataframe) == 1, "the window's messages (one table)")
    assert at.selectbox(key="fp_drill_at").value == f"{newest_closed.window_start:%Y-%m-%dT%H:%M}Z"
    framed = [c["layer"][-1]["mark"] for c in _chart_specs(at) if "layer" in c]    # the window, on both charts
    assert len(framed) == 2 and all(m["type"] == "rect" and m["stroke"] and m["fill"] is None for m in framed)
    listed = at.dataframe[0].value
    assert set(listed["id"]) == kept and listed["sentiment_score"].is_monotonic_increasing
    assert any(c.value.startswith(f"{len(kept)} message(s) with a time in this window") and "keeps the newest"
               not in c.value for c in at.caption), [c.value for c in at.caption]

    at.selectbox(key="fp_drill_at").set_value(f"{fired.window_start:%Y-%m-%dT%H:%M}Z").run()
    assert set(at.dataframe[0].value["id"]) == {m["id"] for m in fired.messages}     # only what its record kept
    assert any(c.value.startswith(f"{len(fired.messages)} message(s)") and "keeps the newest 50,000" in c.value
               for c in at.caption), [c.value for c in at.caption]
    assert _address(at)["at"] == [f"{fired.window_start:%Y-%m-%dT%H:%M}Z"]
    at.selectbox(key="fp_drill_at").set_value("").run()       # back to the whole range
    assert len(at.dataframe) == 2 and "at" not in _address(at)     # the most negative and the most positive
    assert [len(c["layer"]) for c in _chart_specs(at) if "layer" in c] == [7, 7]    # no frame

    alerts = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    alerts.query_params["alert"] = fired.id
    run_until(alerts, lambda a: any("in the drill-down" in m for m in _markdown(a)), "the drill-down link")
    (link,) = [m for m in _markdown(alerts) if "in the drill-down, at the window that fired" in m]
    assert f"window=60&at={fired.window_start:%Y-%m-%dT%H}%3A{fired.window_start:%M}Z" in link, link


def test_a_window_the_address_names_outside_the_range_is_said_and_kept_until_the_analyst_picks_one(
        fp_settings, produced, monkeypatch):
    """A link to a window the range does not show (a day old here): the page says so and keeps ``at`` in the
    address (a wider range may show it); a window the analyst picks then replaces it there."""
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    day_old = (utcnow() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%MZ")
    at.query_params.update(key_type="topic", key=SHOCK_TOPIC, at=day_old)
    run_until(at, lambda a: any("asked for the window" in c.value for c in a.caption), "the note on the window")
    assert at.selectbox(key="fp_drill_at").value == "" and _address(at)["at"] == [day_old]
    assert len(at.dataframe) == 2       # the range's most negative and most positive meanwhile
    newest = f"{max(t.window_start for t in produced.trends if t.key == SHOCK_TOPIC):%Y-%m-%dT%H:%M}Z"
    at.selectbox(key="fp_drill_at").set_value(newest).run()
    assert not any("asked for the window" in c.value for c in at.caption), [c.value for c in at.caption]
    assert _address(at)["at"] == [newest] and len(at.dataframe) == 1


def _address(at: AppTest) -> dict[str, list[str]]:
    """The page's query string as the app left it: name -> values (AppTest keeps one list per name)."""
    return {name: list(values) if isinstance(values, (list, tuple)) else [values]
            for name, values in at.query_params.items() if values}


def test_the_address_keeps_the_view_and_opening_it_again_shows_the_same(fp_settings, produced, monkeypatch):
    """An analyst's choices go into the address (defaults left out); the address opened in a new session selects
    the same range, key type, keys, zone and drill-down key."""
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    run_until(at, lambda a: len(_chart_specs(a)) >= 3, "the drill-down charts")
    assert set(_address(at)) == {"key"}              # every sidebar choice is its default: none is written
    at.selectbox(key="fp_range").set_value("Last 6 hours").run()
    at.radio(key="fp_key_type").set_value("ticker").run()
    at.multiselect(key="fp_keys_ticker").set_value(["XOM", "AAPL"]).run()
    at.selectbox(key="fp_tz").set_value("Europe/London").run()
    at.selectbox(key="fp_drill_key").set_value("MSFT").run()
    address = _address(at)
    assert {k: v for k, v in address.items()} == {"range": ["6h"], "key_type": ["ticker"], "keys": ["XOM", "AAPL"],
                                                   "tz": ["Europe/London"], "key": ["MSFT"]}

    shared = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    for name, values in address.items():
        shared.query_params[name] = values if len(values) > 1 else values[0]
    run_until(shared, lambda a: len(_chart_specs(a)) >= 3, "the drill-down charts from the address")
    assert shared.selectbox(key="fp_range").value == "Last 6 hours"
    assert shared.radio(key="fp_key_type").value == "ticker"
    assert shared.multiselect(key="fp_keys_ticker").value == ["XOM", "AAPL"]
    assert shared.selectbox(key="fp_tz").value == "Europe/London"
    assert shared.selectbox(key="fp_drill_key").value == "MSFT"
    assert _address(shared) == address
    assert not shared.warning and not shared.exception


def test_an_address_naming_what_is_not_there_falls_back_and_says_so(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("overview",), default_timeout=60)
    at.query_params["range"] = "99y"
    at.query_params["key_type"] = "ticker"
    at.query_params["keys"] = ["XOM", "NOPE"]
    at.query_params["tz"] = "Mars/Olympus"
    run_until(at, lambda a: any("keys=" in c.value for c in a.caption), "the note, once the tickers are in")
    assert at.selectbox(key="fp_range").value == "Last hour" and at.selectbox(key="fp_tz").value != "Mars/Olympus"
    assert at.multiselect(key="fp_keys_ticker").value == ["XOM"]
    (note,) = [c.value for c in at.caption if "not available now" in c.value]
    assert "range='99y'" in note and "tz='Mars/Olympus'" in note and "keys='NOPE'" in note
    assert not at.exception
    assert _address(at) == {"key_type": ["ticker"], "keys": ["XOM"]}       # the address now says what is shown


def test_a_dashboard_draws_nothing_from_part_of_its_history(fp_settings, monkeypatch):
    """Opened on a day of windows (41,760 of them, read oldest first), the dashboard shows how far it has read
    and no view until it is all in: its first ranking is the one the whole day gives, not one judged against part
    of it, and a link naming a ticker whose windows come last keeps it rather than dropping it as "not there"."""
    produce(fp_settings, synthesize(utcnow(), minutes=24 * 60, topics=TOPICS, tickers=TICKERS[:9], rate_per_s=4))
    late = synthesize(utcnow(), tickers=(TICKERS[9],))
    produce(fp_settings, Synthetic(trends=[t for t in late.trends if t.key == TICKERS[9]]))
    _env_for(monkeypatch, fp_settings)
    overview = AppTest.from_file(APP, default_timeout=60)
    linked = AppTest.from_function(_view_script, args=("overview",), default_timeout=60)
    linked.query_params["key_type"] = "ticker"
    linked.query_params["keys"] = TICKERS[9]
    progress: list[str] = []

    def ranked_while_the_link_waits(at: AppTest) -> bool:
        progress.extend(p.proto.text for p in at.get("progress"))
        linked.run()
        assert not [c.value for c in linked.caption if "not available now" in c.value]
        return bool(_ranked(at))

    first = _ranked(run_until(overview, ranked_while_the_link_waits, "the unusual ranking"))
    assert progress and all(text.startswith("Reading what FinPulse published before this dashboard started")
                            for text in progress), progress
    counts = [tuple(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) of ([\d,]+) records", text)[0])
              for text in progress]
    assert all(read < total for read, total in counts) and len({total for _, total in counts}) == 1, counts
    assert "Energy \\| Oil" in first[0] and not any("not enough history" in line for line in first), first
    time.sleep(3)      # had the first ranking been drawn from part of the day, the rest would be in by now
    assert _ranked(run_until(overview, lambda a: bool(_ranked(a)), "the ranking again")) == first
    run_until(linked, lambda a: a.multiselect(key="fp_keys_ticker").value == [TICKERS[9]], "the linked ticker")
    assert _address(linked) == {"key_type": ["ticker"], "keys": [TICKERS[9]]}


def test_alerts_view_links_deliveries_and_messages(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    resolved_id = next(a.id for a in produced.alerts if a.status == "resolved")
    firing = next(a for a in produced.alerts if a.key == SHOCK_TOPIC)
    at.query_params["alert"] = resolved_id       # as the Overview's "Messages behind this alert" link opens it
    run_until(at, lambda a: any(m.label == "Firing" for m in a.metric) and a.dataframe, "the alert table")
    assert at.selectbox(key="fp_alert").value == resolved_id
    assert any("resolved" in m and "Earnings" in m for m in _markdown(at))
    assert any("No delivery recorded" in c.value for c in at.caption)
    at.selectbox(key="fp_alert").set_value(firing.id).run()
    assert at.selectbox(key="fp_alert").value == firing.id   # the link selected once; the analyst's choice wins
    at.run()
    assert at.selectbox(key="fp_alert").value == firing.id
    assert next(m for m in at.metric if m.label == "Firing").value == "1"
    assert next(m for m in at.metric if m.label == "Resolved").value == "1"
    table = at.dataframe[0].value  # the alert table, its messages, its deliveries
    (shock,) = [row for _, row in table.iterrows() if row["key"] == SHOCK_TOPIC]     # one row per episode
    assert (shock["severity"], shock["escalation"]) == ("critical", "warning → critical")
    assert "risk-webhook: delivered" in shock["deliveries"] and "pagerduty: failed (5 tries)" in shock["deliveries"]
    firing, escalation = (a for a in produced.alerts if a.key == SHOCK_TOPIC)
    messages = at.dataframe[1].value      # behind the firing and behind the escalation
    assert set(messages["id"]) == {m["id"] for m in firing.messages + escalation.messages}
    assert any(c.value.startswith(f"{len(messages)} message(s): the most negative of each window that fired or "
                                  f"escalated") for c in at.caption), [c.value for c in at.caption]
    deliveries = at.dataframe[2].value.set_index(["event_id", "endpoint"])
    assert deliveries.loc[(escalation.event_id, "pagerduty"), "status"] == "failed"
    assert "503" in deliveries.loc[(escalation.event_id, "pagerduty"), "last_error"]
    assert deliveries.loc[(firing.event_id, "risk-webhook"), "status"] == "delivered"
    assert deliveries.loc[(escalation.event_id, "risk-webhook"), "status"] == "delivered"
    assert len(deliveries) == 3
    assert any("drilldown?key_type=topic&key=Energy+%7C+Oil" in m for m in _markdown(at))


def test_a_link_to_an_alert_that_ended_before_the_range_widens_the_range_once(fp_settings, monkeypatch):
    """A webhook's "open in FinPulse" link (``?alert=ID``) to an episode that resolved about two hours ago: the
    default last hour would not list it, so the range becomes the last 6 hours (the shortest that does) and the
    sidebar says why; narrowing it again is the analyst's choice, and it stays."""
    data = synthesize(utcnow(), minutes=240, window_s=600)
    produce(fp_settings, data)
    resolve = next(a for a in data.alerts if a.status == "resolved")
    newest = max(t.emitted_at for t in data.trends)
    assert timedelta(hours=1) < newest - resolve.emitted_at < timedelta(hours=6)
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    at.query_params["alert"] = resolve.id
    run_until(at, lambda a: any(s.key == "fp_alert" and s.value == resolve.id for s in a.selectbox), "the linked alert")
    assert at.selectbox(key="fp_range").value == "Last 6 hours"
    assert any("widened from last hour to last 6 hours" in c.value for c in at.caption)
    assert _address(at) == {"range": ["6h"], "alert": [resolve.id]}

    at.selectbox(key="fp_range").set_value("Last hour").run()
    at.run()
    assert at.selectbox(key="fp_range").value == "Last hour"
    assert at.selectbox(key="fp_alert").options == [f"critical · {SHOCK_TOPIC} · firing"]     # the old one left out
    assert not any("widened" in c.value for c in at.caption)
    assert not at.exception


@pytest.mark.parametrize("ask_model, scorer, offered", [(True, "auto", True), (False, "auto", False),
                                                        (True, "baseline", False)])
def test_the_ask_view_is_offered_only_where_there_is_a_model_to_ask(fp_settings, produced, model_dir, monkeypatch,
                                                                    ask_model, scorer, offered):
    """With ``[dashboard] ask_model = false``, or a worker that scores without a model, the app has no Ask view, so
    no "Why these scores?" button under the messages behind an alert opens it."""
    _env_for(monkeypatch, fp_settings, ask_model=str(ask_model).lower())
    monkeypatch.setenv("FINPULSE_WORKER__SCORER", scorer)
    monkeypatch.setenv("FINPULSE_WORKER__MODEL_DIR", str(model_dir))
    firing = next(a for a in produced.alerts if a.key == SHOCK_TOPIC)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["alert"] = firing.id      # the whole app, with its navigation, opened on the Alerts view
    run_until(at, lambda a: any(s.key == "fp_alert" and s.value == firing.id for s in a.selectbox) and a.dataframe,
              "the Alerts view on the linked alert")
    assert len(at.dataframe[1].value) > 0      # the messages behind it, under which the button goes
    assert ("Why these scores? Ask the model" in [b.label for b in at.button]) is offered


def test_a_link_to_the_root_address_naming_an_alert_opens_the_alerts_view(fp_settings, produced, monkeypatch):
    """Webhooks sent before December 2026 link to ``/?alert=ID``: the whole app (with its navigation) opens the
    Alerts view on that alert rather than the Overview."""
    _env_for(monkeypatch, fp_settings)
    resolved_id = next(a.id for a in produced.alerts if a.status == "resolved")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["alert"] = resolved_id
    run_until(at, lambda a: any(s.key == "fp_alert" and s.value == resolved_id for s in a.selectbox),
              "the Alerts view on the linked alert")
    assert not _ranked(at)      # not the Overview


def test_a_fixed_range_shows_what_was_on_then_and_its_address_opens_it_in_another_zone(fp_settings, produced,
                                                                                     monkeypatch):
    """An analyst looks back at the earlier Earnings episode: a fixed range from before it fired to before the
    Energy shock. The Alerts view lists that episode and not the shock (which began after the range); the address
    holds the range in UTC; a colleague in Tokyo opens it and sees the same instants in Tokyo time; switching the
    zone in a session keeps the instants too."""
    _env_for(monkeypatch, fp_settings)
    earnings = next(a for a in produced.alerts if a.status == "resolved")
    shock = next(a for a in produced.alerts if a.key == SHOCK_TOPIC)
    start, end = earnings.started_at - timedelta(minutes=2), shock.started_at - timedelta(minutes=1)
    address = {"range": "fixed", "from": start.strftime("%Y-%m-%dT%H:%MZ"), "to": end.strftime("%Y-%m-%dT%H:%MZ")}
    at = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    for name, value in address.items():
        at.query_params[name] = value
    run_until(at, lambda a: any(s.key == "fp_alert" for s in a.selectbox), "the alert table")
    assert at.selectbox(key="fp_range").value == "Fixed range"
    assert at.datetime_input(key="fp_fixed_from").value == start.replace(second=0, microsecond=0, tzinfo=None)
    assert at.selectbox(key="fp_alert").options == [f"warning · {earnings.key} · resolved"]   # not the shock
    assert {k: v[0] for k, v in _address(at).items() if k != "alert"} == address
    assert any("A fixed range does not follow new data" in c.value for c in at.caption)

    at.selectbox(key="fp_tz").set_value("Asia/Tokyo").run()
    assert at.datetime_input(key="fp_fixed_from").value == (start + timedelta(hours=9)).replace(
        second=0, microsecond=0, tzinfo=None)
    assert {k: v[0] for k, v in _address(at).items() if k != "alert"} == {**address, "tz": "Asia/Tokyo"}

    colleague = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    for name, value in {**address, "tz": "Asia/Tokyo"}.items():
        colleague.query_params[name] = value
    run_until(colleague, lambda a: any(s.key == "fp_alert" for s in a.selectbox), "the alert table from the link")
    assert colleague.datetime_input(key="fp_fixed_to").value == (end + timedelta(hours=9)).replace(
        second=0, microsecond=0, tzinfo=None)
    assert colleague.selectbox(key="fp_alert").options == [f"warning · {earnings.key} · resolved"]
    assert not colleague.warning and not colleague.exception

    # The other views draw the same range: the Overview ranks what was unusual at its end, where Earnings was over.
    overview = AppTest.from_function(_view_script, args=("overview",), default_timeout=60)
    for name, value in address.items():
        overview.query_params[name] = value
    run_until(overview, lambda a: bool(_ranked(a)), "the ranking of the fixed range")
    assert any("Most unusual topics at " in h.value for h in overview.subheader)
    assert next(m for m in overview.metric if m.label == "Firing alerts").value == "0"
    drilldown = AppTest.from_function(_view_script, args=("drilldown",), default_timeout=60)
    for name, value in {**address, "key": SHOCK_TOPIC}.items():
        drilldown.query_params[name] = value
    run_until(drilldown, lambda a: len(_chart_specs(a)) >= 3, "the drill-down charts of the fixed range")
    assert not drilldown.exception


def test_alerts_view_lists_the_silences_in_force_and_to_come(fp_settings, produced, monkeypatch):
    """Silences written as `finpulse silence` writes them: the one in force and the one to come are listed with who
    and why; an expired one is not."""
    now = utcnow()
    oil = new_silence(["topic=Energy | Oil"], now - timedelta(minutes=5), now + timedelta(hours=4), "ana", "OPEC meeting")
    later = new_silence(["ticker=XOM"], now + timedelta(days=1), now + timedelta(days=1, hours=1), "bo", "earnings call")
    over = new_silence(["key=Rates"], now - timedelta(minutes=5), now + timedelta(hours=1), "cy", "was noise")

    async def write():
        for silence in (oil, later, over, expired_now(over)):
            await write_silence(fp_settings.kafka, TopicNames(fp_settings.kafka.topic_prefix).silences, silence)
    asyncio.run(write())
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_function(_view_script, args=("alerts",), default_timeout=60)
    run_until(at, lambda a: any("silence(s) in force" in e.label for e in a.expander), "the silences")
    (expander,) = [e for e in at.expander if "silence(s) in force" in e.label]
    assert "1 silence(s) in force, 1 to come" in expander.label
    listed = at.dataframe[0].value       # the silences come first on the page
    assert list(listed["id"]) == [oil.id, later.id]
    assert list(listed["state"]) == ["in force", "to come"]
    assert listed.iloc[0]["matchers"] == "key_type=topic, key=Energy | Oil" and listed.iloc[0]["comment"] == "OPEC meeting"
    assert listed.iloc[1]["created_by"] == "bo"


def test_model_view_shows_version_metrics_confusion_and_lag(fp_settings, produced, model_dir, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    monkeypatch.setenv("FINPULSE_WORKER__MODEL_DIR", str(model_dir))
    at = AppTest.from_function(_view_script, args=("model",), default_timeout=60)
    run_until(at, lambda a: any(m.value.startswith("**Model scoring now:** `finpulse") for m in a.markdown),
              "the model version")
    assert "**Model scoring now:** `finpulse-minilm-test`" in [m.value for m in at.markdown]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Worker lag (input records)"] == "0"   # no input yet, and the feed could ask the broker
    assert metrics["Dead-lettered inputs"] == "0"
    table = at.table[0].value  # headline metrics per head
    assert table.loc["topic", "accuracy"] == 1.0 and 0.7 < table.loc["sentiment", "accuracy"] < 0.95
    assert sum("layer" in s and s["layer"][0]["mark"]["type"] == "rect" for s in _chart_specs(at)) == 2  # both heads' matrices
    assert any("model card" in e.label.lower() for e in at.expander)
    assert not any("refit" in c.value for c in at.caption)


def test_model_view_names_the_reference_whose_figures_a_refit_shows(fp_settings, produced, model_dir, monkeypatch):
    metrics_file = model_dir / "metrics.json"
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()),
                                        "refit_of": "finpulse-minilm-full-20261204-0a1b2c3d"}))
    _env_for(monkeypatch, fp_settings)
    monkeypatch.setenv("FINPULSE_WORKER__MODEL_DIR", str(model_dir))
    at = AppTest.from_function(_view_script, args=("model",), default_timeout=60)
    run_until(at, lambda a: len(a.table) > 0, "the evaluation table")
    assert any(c.value.startswith("Held-out figures of finpulse-minilm-full-20261204-0a1b2c3d: this model is its "
                                  "refit") for c in at.caption)


def test_unreachable_kafka_says_so_and_recovers_when_it_appears(monkeypatch, tmp_path):
    port = free_port()
    settings = Settings(raw={"kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "topic_prefix": "late"}})
    _env_for(monkeypatch, settings)
    at = AppTest.from_file(APP, default_timeout=60)
    run_until(at, lambda a: any("unreachable" in w.value for w in a.warning), "the unreachable message")
    assert not at.exception and not at.error
    with EmbeddedBroker(port, log_file=tmp_path / "tansu.log"):
        names = TopicNames("late")
        ensure_topics(settings.kafka, names.all(), names.compacted())
        produce(settings, synthesize(utcnow()))
        run_until(at, lambda a: any(m.startswith("**1. ") for m in _ranked(a)), "data after Kafka came up")
        assert not any("unreachable" in w.value for w in at.warning)


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_a_broker_lost_mid_session_is_said_with_the_data_kept_and_the_feed_resumes(monkeypatch, tmp_path, outage):
    """The broker goes away while an analyst watches (a restart, or a partition: kafka-python's poll just returns
    nothing, as on a quiet stream, and the page used to say "live" all along): the page says Kafka is unreachable
    and keeps what it had read, then follows again once the broker is back, new data included."""
    with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker):
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path)
        produce(settings, synthesize(utcnow()))
        _env_for(monkeypatch, settings)
        at = AppTest.from_function(_view_script, args=("overview",), default_timeout=60)
        run_until(at, lambda a: _ranked(a), "the ranking")
        ranked, as_of = _ranked(at), _live_as_of(at)
        assert as_of, [c.value for c in at.caption]
        link.cut(outage)
        run_until(at, lambda a: any("unreachable" in w.value or "has not answered" in w.value for w in a.warning),
                  "that Kafka is unreachable")
        assert _ranked(at) == ranked
        assert any("Not updating while Kafka is unreachable" in c.value for c in at.caption)
        link.restore()
        produce(settings, synthesize(utcnow()))
        run_until(at, lambda a: not a.warning and _live_as_of(a) not in (None, as_of),
                  "the feed following again, with what was published after the outage")


def test_a_feed_is_unreachable_after_a_silence_and_a_refusal_from_the_broker_is_an_answer():
    now = time.time()
    live = FeedStatus(state="live", message="following", bootstrap_servers="kafka:9092", answered_at=now - 3)
    assert live.as_of(now) is live and live.as_of(now).reachable
    silent = live.as_of(now + SILENT_AFTER_S)
    assert silent.state == "unreachable" and not silent.reachable
    assert silent.message.startswith(f"Kafka at kafka:9092 has not answered for {SILENT_AFTER_S + 3:.0f} s; retrying")
    assert FeedStatus(state="connecting").as_of(now).state == "connecting"      # no answer yet: not silent
    assert broker_answered(kafka_errors.GroupAuthorizationFailedError())
    for no_answer in (kafka_errors.KafkaConnectionError(), kafka_errors.NodeNotReadyError(),
                      kafka_errors.KafkaTimeoutError(), kafka_errors.RequestTimedOutError(), OSError()):
        assert not broker_answered(no_answer), no_answer


def _live_as_of(at: AppTest) -> str | None:
    """The time of the newest data in the freshness line, when that line says the data is live."""
    for caption in at.caption:
        found = re.match(r":green\[●\] .*\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\)", caption.value)
        if found:
            return found.group(1)
    return None


def test_stale_data_says_how_old_and_whether_the_worker_is_behind(fp_settings, monkeypatch):
    """The broker answers but nothing new was published for 30 minutes: every view says so, and the worker group's
    lag tells "no input arriving" from "input waiting that the worker does not process" (a stopped worker)."""
    produce(fp_settings, synthesize(utcnow() - timedelta(minutes=30)))
    _env_for(monkeypatch, fp_settings, stale_after_s=120)
    at = AppTest.from_function(_view_script, args=("overview",), default_timeout=60)

    def warned(what: str):
        return lambda a: any(what in w.value for w in a.warning)

    run_until(at, warned("check the ingest feeds"), "the stale-data warning with no input waiting")
    stale = next(w.value for w in at.warning if "No new data for" in w.value)
    assert "No new data for 30 min" in stale and not any("Live:" in c.value for c in at.caption)
    producer = KafkaProducer(bootstrap_servers=fp_settings.kafka.bootstrap_servers)
    try:
        for i in range(7):
            producer.send(TopicNames(fp_settings.kafka.topic_prefix).news, json.dumps({"id": f"n{i}"}).encode())
        producer.flush(30)
    finally:
        producer.close()
    run_until(at, warned("input messages are waiting that the worker has not processed"), "the stopped-worker hint")
    assert _ranked(at)  # the last known state is still shown under the warning


def test_empty_topics_are_reported_plainly(fp_settings, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    at = AppTest.from_file(APP, default_timeout=60)
    run_until(at, lambda a: any("topics are empty" in i.value for i in a.info), "the empty-topics message")
    assert not at.exception and not at.error and not at.metric


def test_the_model_view_shows_the_models_evaluation_before_the_stream_has_data(fp_settings, model_dir, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    monkeypatch.setenv("FINPULSE_WORKER__MODEL_DIR", str(model_dir))
    at = AppTest.from_function(_view_script, args=("model",), default_timeout=60)
    run_until(at, lambda a: any("topics are empty" in i.value for i in a.info), "the empty-topics message")
    assert not at.exception and not at.error and not at.metric    # nothing live to show
    assert [s.value for s in at.subheader] == ["Evaluation"]
    assert at.table[0].value.loc["topic", "accuracy"] == 1.0
    assert any(c.value.startswith("Model card from") and "scored by" not in c.value for c in at.caption)


def test_the_ask_view_says_when_the_model_cannot_be_asked(model_dir):
    # A model directory that cannot be loaded (this one's weights are empty): said on the page, no traceback.
    at = AppTest.from_function(_ask_script, args=(str(model_dir),), default_timeout=60).run()
    at.text_area(key="fp_ask_text").input("Oil slides as OPEC+ talks stall\n\n")
    at.button[0].click().run()
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value.startswith(f"The model in `{model_dir}` could not be asked (")


def test_password_gate_shows_nothing_before_sign_in(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings)
    monkeypatch.setenv("FINPULSE_DASHBOARD_PASSWORD", "correct horse battery staple")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.text_input(key="fp_password") and not at.metric and not _chart_specs(at)
    at.text_input(key="fp_password").input("wrong")
    at.button[0].click().run()
    assert any(e.value == "Wrong password." for e in at.error) and not at.metric
    at.text_input(key="fp_password").input("correct horse battery staple")
    at.button[0].click()
    run_until(at, lambda a: any(m.startswith("**1. ") for m in _ranked(a)), "data after signing in")


def test_password_mode_without_a_password_fails_closed(fp_settings, produced, monkeypatch):
    _env_for(monkeypatch, fp_settings, auth="password")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert any("FINPULSE_DASHBOARD_PASSWORD is empty" in e.value for e in at.error)
    assert not at.metric and not _chart_specs(at) and not at.text_input


# ---------------------------------------------------------------- the store's bounds and the pure shaping

def _store(**cfg) -> LiveStore:
    return LiveStore(DashboardSettings(**cfg))


def test_store_keeps_final_windows_over_partials_and_bounds_time_and_rows():
    data = synthesize(utcnow(), minutes=60, topics=(SHOCK_TOPIC, "Earnings"), tickers=())
    store = _store(retention_hours=0.5, max_trend_rows=50)
    newest_partial = next(t for t in reversed(data.trends) if not t.final)
    for t in data.trends:
        store.add("trends", t.to_json())
    final_version = newest_partial.__class__(**{**newest_partial.__dict__, "final": True, "count": 999})
    store.add("trends", final_version.to_json())
    store.add("trends", newest_partial.to_json())  # a late duplicate of the partial must not win
    snap = store.snapshot()
    assert len(snap.trends) <= 50 and snap.trends["window_id"].is_unique
    assert snap.trends["window_end"].min() >= snap.trends["window_end"].max() - pd.Timedelta(minutes=30)
    row = snap.trends[snap.trends["window_id"] == final_version.window_id].iloc[0]
    assert bool(row["final"]) and row["count"] == 999


@pytest.mark.parametrize("folded_between", [False, True], ids=["one fold", "folded between"])
def test_a_windows_messages_come_from_the_record_its_row_does_in_any_arrival_order(folded_between):
    """A window's partial and final records can arrive out of order (the dashboard reads many partitions): its
    messages must follow the record the trends row keeps, not the one read last."""
    data = synthesize(utcnow(), minutes=10, topics=(SHOCK_TOPIC, "Earnings"), tickers=())
    partial = next(t for t in data.trends if not t.final and t.most_negative)
    ref = {**partial.most_negative[0], "id": "only-in-the-final"}
    final = replace(partial, final=True, most_negative=(ref,), emitted_at=partial.emitted_at + timedelta(seconds=5))
    newer_partial = replace(partial, emitted_at=final.emitted_at + timedelta(seconds=5))
    store = _store()
    store.add("trends", partial.to_json())
    store.add("trends", final.to_json())
    if folded_between:
        store.snapshot()
    store.add("trends", newer_partial.to_json())    # emitted later, but a partial: the final still wins
    snap = store.snapshot()
    row = snap.trends[snap.trends["window_id"] == final.window_id].iloc[0]
    messages = snap.window_messages[snap.window_messages["window_id"] == final.window_id]
    assert bool(row["final"]) and list(messages["id"]) == ["only-in-the-final"]


def test_store_dedupes_alerts_and_messages_and_applies_delivery_tombstones():
    data = synthesize(utcnow())
    store = _store(max_scored_rows=100)
    for a in data.alerts * 2:
        store.add("alerts", a.to_json())
    for m in data.scored + data.scored[:10]:
        store.add("scored", m.to_json())
    for key, state in data.deliveries.items():
        store.add("deliveries", json.dumps({**state, "state": "pending"}), key)
        store.add("deliveries", json.dumps(state), key)
    doomed = next(iter(data.deliveries))
    store.add("deliveries", None, doomed)
    assert not store.add("alerts", b"{not json")
    assert not store.add("trends", None)      # a tombstone where none belongs is one bad record, not a crash
    assert not store.add("scored", json.dumps({"id": "x"}))
    snap = store.snapshot()
    assert len(snap.alerts) == 4 and snap.alerts["event_id"].is_unique      # firing and escalation are two events
    assert set(snap.deliveries["alert_id"]) == {a.id for a in data.alerts if a.key == SHOCK_TOPIC}
    (episode,) = sh.current_alerts(snap.alerts).query("key == @SHOCK_TOPIC").itertuples()
    assert (episode.status, episode.severity, episode.fired_as, episode.escalation) == \
        ("firing", "critical", "warning", "warning → critical")
    marks = sh.alert_markers(snap.alerts, "topic", SHOCK_TOPIC, None, snap.alerts["emitted_at"].max())
    assert list(zip(marks["event"], marks["severity"])) == [("fired", "warning"), ("escalated", "critical")]
    assert len(snap.scored) == 100 and snap.scored["id"].is_unique
    assert snap.scored["event_time"].min() >= max(m.event_time for m in data.scored[:100]) - timedelta(hours=1)
    assert doomed not in set(snap.deliveries["delivery_key"])
    assert set(snap.deliveries["status"]) <= {"delivered", "failed"}
    assert snap.bad_records == 3


def test_unusual_ranking_uses_each_keys_own_history():
    data = synthesize(utcnow(), shock_key="Macro", topics=("Macro", "Markets", "Earnings"), tickers=())
    store = _store()
    for t in data.trends:
        store.add("trends", t.to_json())
    snap = store.snapshot()  # no alerts: the ranking must come from the windows alone
    ranking = sh.unusual_now(snap.trends, snap.alerts, sh.ViewFilters())
    assert ranking["key"].iloc[0] == "Macro" and ranking["unusual"].iloc[0] > 2
    assert not ranking["firing"].any()
    # Its line shows both measures it is ranked by next to their usual values.
    top = ranking.iloc[0]
    assert unusual_line(1, top) == (
        f"**1. Macro** — {top['unusual']:+.1f}σ · bearish {top['bearish_share']:.0%} (usual "
        f"{top['baseline_bearish_share']:.0%}) · sentiment {top['mean_score']:+.2f} (usual "
        f"{top['baseline_mean_score']:+.2f}) · {int(top['count'])} msgs")
    newcomer = top.copy()
    newcomer[["unusual", "baseline_bearish_share", "baseline_mean_score"]] = np.nan
    assert "not enough history" in unusual_line(2, newcomer) and "usual" not in unusual_line(2, newcomer)


def test_heatmap_buckets_stay_bounded_and_weighted():
    data = synthesize(utcnow(), minutes=600, topics=("Macro", "Markets"), tickers=(), shock_key="Macro")
    store = _store()
    for t in data.trends:
        store.add("trends", t.to_json())
    windows = sh.key_windows(store.snapshot().trends, sh.ViewFilters(span=None))
    cells = sh.heatmap(windows)
    assert cells.groupby("key").size().max() <= sh.MAX_BUCKETS + 1
    assert cells["count"].sum() == windows["count"].sum()


def test_every_time_range_has_a_code_for_the_address():
    from dashboard.ui import CODE_OF_RANGE, DEFAULT_RANGE, FIXED_RANGE
    assert set(CODE_OF_RANGE) == {*sh.TIME_RANGES, FIXED_RANGE} and DEFAULT_RANGE in sh.TIME_RANGES
    assert len(set(CODE_OF_RANGE.values())) == len(CODE_OF_RANGE)


def test_in_zone_shows_the_chosen_wall_clock():
    frame = pd.DataFrame({"t": pd.to_datetime(["2026-01-01T12:00:00Z"], utc=True)})
    assert str(sh.in_zone(frame, "America/New_York")["t"].iloc[0]) == "2026-01-01 07:00:00"


def test_model_card_prefers_the_test_section_and_labels_matrices():
    truth = np.array([0, 1, 2, 2])
    metrics = {"test": {"sentiment": {**head_report(truth, np.array([0, 1, 1, 2]), SENTIMENTS),
                                      "interval_95": {"accuracy": [0.25, 1.0]}}},
               "validation": {"sentiment": head_report(truth, truth, SENTIMENTS)}}
    reports = head_reports(metrics)
    assert list(reports) == ["sentiment"]
    table = metric_table(reports).set_index("head")
    assert table.loc["sentiment", "accuracy"] == 0.75 and table.loc["sentiment", "accuracy 95%"] == "0.250-1.000"
    assert list(table.columns[:4]) == ["n", "accuracy", "accuracy 95%", "macro_f1"]
    matrix = confusion_matrices(reports)["sentiment"].set_index(["actual", "predicted"])
    assert matrix.loc[("bullish", "neutral"), "count"] == 1 and matrix.loc[("bullish", "neutral"), "share"] == 0.5


def test_cli_passes_settings_to_streamlit_through_the_environment():
    env = settings_environ({"kafka": {"bootstrap_servers": "k:9092", "partitions": 4},
                            "alerts": {"endpoints": [{"name": "x"}]}, "dashboard": {"refresh_s": 1.5}}, None)
    assert env == {"FINPULSE_KAFKA__BOOTSTRAP_SERVERS": "k:9092", "FINPULSE_KAFKA__PARTITIONS": "4",
                   "FINPULSE_DASHBOARD__REFRESH_S": "1.5"}
    command = streamlit_command("0.0.0.0", 8600)
    assert "--server.headless=true" in command and "--server.port=8600" in command
    assert "--client.showErrorDetails=none" in command and command[3] == "run" and command[4].endswith("app.py")


def test_volume_counts_sliding_windows_once():
    data = synthesize(utcnow(), minutes=30, topics=("Macro", "Markets"), tickers=(), shock_key="Macro")
    store = _store()
    for t in data.trends:  # the same messages as tumbling 1-minute windows and as 5-minute windows every minute
        store.add("trends", t.to_json())
        sliding = t.__class__(**{**t.__dict__, "window_s": 300, "window_end": t.window_start + timedelta(minutes=5)})
        store.add("trends", sliding.to_json())
    trends = store.snapshot().trends
    one_min = sh.volume(sh.key_windows(trends, sh.ViewFilters(window_s=60, span=None)))
    five_min = sh.volume(sh.key_windows(trends, sh.ViewFilters(window_s=300, span=None)))
    aligned = sum(t.count for t in data.trends if t.window_start.minute % 5 == 0)
    assert five_min["messages"].sum() == aligned < one_min["messages"].sum()


def test_auth_mode_follows_the_configured_secret_sources():
    from dashboard.auth import auth_mode, password_matches

    cfg = DashboardSettings()
    assert auth_mode(cfg, environ={}, oidc=False) == "none"
    assert auth_mode(cfg, environ={"FINPULSE_DASHBOARD_PASSWORD": "s3cret"}, oidc=True) == "password"
    assert auth_mode(cfg, environ={}, oidc=True) == "oidc"
    assert auth_mode(DashboardSettings(auth="password"), environ={}, oidc=False) == "password"  # fails closed later
    assert password_matches("s3cret", "s3cret") and not password_matches("s3cre", "s3cret")
    assert not password_matches("", "")  # no password configured never lets anyone in


def _alerts_snapshot():
    data = synthesize(utcnow())
    store = _store()
    for t in data.trends:
        store.add("trends", t.to_json())
    for a in data.alerts:
        store.add("alerts", a.to_json())
    return data, store.snapshot()


def test_alert_episodes_span_from_firing_to_resolution_or_now_at_their_highest_severity():
    data, snap = _alerts_snapshot()
    newest = snap.trends["window_end"].max()
    firing, escalation = (a for a in data.alerts if a.key == SHOCK_TOPIC)
    shock = sh.alert_episodes(snap.alerts, "topic", SHOCK_TOPIC, None, newest)
    assert len(shock) == 1 and shock["time"].iloc[0] == firing.window_start and shock["time_end"].iloc[0] == newest
    # One span for the episode, in the colour of the severity it escalated to.
    assert list(shock.loc[0, ["status", "severity", "fired_as"]]) == ["firing", "critical", "warning"]
    marks = sh.alert_markers(snap.alerts, "topic", SHOCK_TOPIC, None, newest)
    assert list(zip(marks["time"], marks["event"], marks["severity"], marks["escalated_from"])) == [
        (firing.window_start, "fired", "warning", ""), (escalation.window_start, "escalated", "critical", "warning")]
    resolved = next(a for a in data.alerts if a.status == "resolved")
    earnings = sh.alert_episodes(snap.alerts, "topic", resolved.key, None, newest)
    assert (earnings["time"].iloc[0], earnings["time_end"].iloc[0]) == (resolved.started_at, resolved.resolved_at)
    assert list(sh.alert_markers(snap.alerts, "topic", resolved.key, None, newest)["event"]) == ["fired"]
    # A range that starts inside the firing episode still shows it, clipped to the range, with its escalation's rule
    # but not its fired rule; one that starts after the resolved episode ended shows neither that episode nor rules.
    since = pd.Timestamp(firing.window_start) + pd.Timedelta(seconds=30)
    clipped = sh.alert_episodes(snap.alerts, "topic", SHOCK_TOPIC, since, newest)
    assert clipped["time"].iloc[0] == since and clipped["started"].iloc[0] == firing.window_start
    assert list(sh.alert_markers(snap.alerts, "topic", SHOCK_TOPIC, since, newest)["event"]) == ["escalated"]
    assert sh.alert_episodes(snap.alerts, "topic", resolved.key, since, newest).empty
    assert sh.alert_markers(snap.alerts, "topic", resolved.key, since, newest).empty
    assert sh.alert_episodes(snap.alerts, "topic", "Macro", None, newest).empty

    # On the chart: the span coloured by its highest severity, a solid rule where it fired, a dashed one where it rose.
    series = sh.key_series(snap.trends, "topic", SHOCK_TOPIC, None, None, 30)
    spec = charts.signal_with_band(series, "bearish_share", "bearish share", shock, marks, ".0%").to_dict()
    spans, rules = spec["layer"][0], spec["layer"][-1]
    assert (spans["mark"]["type"], rules["mark"]["type"]) == ("rect", "rule")
    assert [row["severity"] for row in spec["datasets"][spans["data"]["name"]]] == ["critical"]
    assert [(row["event"], row["severity"]) for row in spec["datasets"][rules["data"]["name"]]] == \
        [("fired", "warning"), ("escalated", "critical")]
    assert rules["encoding"]["strokeDash"]["field"] == "event"
    assert spans["encoding"]["color"]["legend"]["values"] == ["critical", "warning"]


def test_alert_table_keeps_firing_episodes_that_fired_before_the_range():
    data, snap = _alerts_snapshot()
    firing = next(a for a in data.alerts if a.key == SHOCK_TOPIC)
    latest = max(a.emitted_at for a in data.alerts if a.key == SHOCK_TOPIC)   # its escalation
    since = pd.Timestamp(latest) + pd.Timedelta(minutes=1)   # "last 15 minutes" after a long episode
    table = sh.alert_table(snap.alerts, snap.deliveries, since)
    assert list(table["id"]) == [firing.id]      # still firing: listed; the resolved one ended before the range
    assert sh.alert_table(snap.alerts, snap.deliveries, since, keys=("Earnings",)).empty


def test_a_fixed_range_keeps_the_windows_alerts_and_messages_of_its_own_time():
    """A fixed range from before the earlier Earnings episode to its middle: windows overlapping it only, the
    episodes on at some time in it (Earnings; not the later shock), and the unusual ranking judged at its end, where
    Earnings was firing and the shock had not begun."""
    data, snap = _alerts_snapshot()
    earnings = next(a for a in data.alerts if a.status == "resolved")
    shock = next(a for a in data.alerts if a.key == SHOCK_TOPIC)
    start = pd.Timestamp(earnings.started_at) - pd.Timedelta(minutes=5)
    end = pd.Timestamp(earnings.started_at) + pd.Timedelta(minutes=2)
    f = sh.ViewFilters.fixed(start, end, window_s=60)
    windows = sh.key_windows(snap.trends, f)
    assert len(windows) and (windows["window_end"] > start).all() and (windows["window_start"] < end).all()
    assert windows["window_start"].min() <= start and windows["window_end"].max() >= end    # the range is covered
    assert sh.range_start(snap, f) == start
    table = sh.alert_table(snap.alerts, snap.deliveries, sh.range_start(snap, f), until=f.until)
    assert list(table["id"]) == [earnings.id]
    ranking = sh.unusual_now(snap.trends, snap.alerts, f).set_index("key")
    assert ranking.loc[earnings.key, "firing"] and not ranking.loc[SHOCK_TOPIC, "firing"]
    assert (ranking["window_start"] < end).all()
    # Live, the shock is firing and Earnings is not.
    live = sh.unusual_now(snap.trends, snap.alerts, sh.ViewFilters(window_s=60)).set_index("key")
    assert live.loc[SHOCK_TOPIC, "firing"] and not live.loc[earnings.key, "firing"]
    series = sh.key_series(snap.trends, "topic", shock.key, 60, f.span, 30, f.until)
    assert len(series) and (series["window_start"] < end).all() and series["bearish_share_baseline"].notna().any()


def test_freshness_says_live_or_stale_and_the_likely_reason():
    now = pd.Timestamp("2026-03-02T12:00:00Z")
    live = sh.freshness(now - pd.Timedelta(seconds=8), now, 120, {"news": 3})
    assert not live.stale and live.text == "Live: last update 8 s ago"
    ahead = sh.freshness(now + pd.Timedelta(seconds=2), now, 120, None)   # a worker clock a little ahead
    assert not ahead.stale and ahead.age_s == 0
    stopped = sh.freshness(now - pd.Timedelta(minutes=14), now, 120, {"news": 3_000, "comments": 400})
    assert stopped.stale and stopped.text.startswith("No new data for 14 min")
    assert "3,400 input messages are waiting" in stopped.text
    assert "check the ingest feeds" in sh.freshness(now - pd.Timedelta(hours=3), now, 120, {"news": 0}).text
    assert "cannot be read" in sh.freshness(now - pd.Timedelta(hours=3), now, 120, None).text
    assert sh.freshness(None, now, 120, None) is None
    assert [sh.duration(s) for s in (0, 89, 90, 3_000, 5_400, 11_100)] == ["0 s", "89 s", "2 min", "50 min",
                                                                            "1 h 30 min", "3 h 05 min"]


def test_store_maps_grouped_deliveries_to_their_episodes_and_leaves_group_notifications_out():
    """The dispatcher's own records (DeliveryState): a group notification lists its members and is left out; each
    member maps to its episode, with the dispatcher's state and the notification that carried it."""
    from dataclasses import replace as changed

    from alerts.deliveries import DELIVERED, new_pending
    from alerts.grouping import new_group

    data = synthesize(utcnow())
    firings = [a for a in data.alerts if a.status == "firing"][:2]
    members = [new_pending(a, "slack", 0, n, 600.0) for n, a in enumerate(firings)]
    notification = changed(new_group("slack", "all", members), state=DELIVERED)
    store = _store()
    for state in [notification, *(changed(m, state=DELIVERED, group=notification.key) for m in members)]:
        assert store.add("deliveries", state.to_json(), state.key)
    table = store.snapshot().deliveries
    assert list(table["event_id"]) == [a.event_id for a in firings]
    assert set(table["status"]) == {"delivered"} and set(table["group"]) == {notification.event_id}
    assert list(table["alert_id"]) == [a.id for a in firings]
    # A muted one says so: no silence a risk team set is behind it.
    muted = changed(members[0], state="silenced", silence="inhibited:" + firings[1].id, group="")
    assert store.add("deliveries", muted.to_json(), muted.key)
    assert store.snapshot().deliveries.set_index("event_id").loc[firings[0].event_id, "status"] == "inhibited"


def test_the_drill_down_draws_windows_still_open_apart_from_closed_ones():
    """A window still open holds only its messages so far (with 5-minute windows every minute, the last five): its
    point is hollow, on a dotted line from the last closed window, and its tooltip says so."""
    _, snap = _alerts_snapshot()
    series = sh.key_series(snap.trends, "topic", SHOCK_TOPIC, None, None, 30)
    assert series["final"].iloc[:-2].all() and len(series) > 3
    series.loc[series.index[-2:], "final"] = False          # the newest two windows still open (one is already)
    spec = charts.signal_with_band(series, "mean_score", "mean sentiment", pd.DataFrame(), pd.DataFrame(),
                                   "+.2f").to_dict()
    signal = [layer for layer in spec["layer"] if layer["mark"].get("color") == "#4c78a8"
              or layer["mark"].get("stroke") == "#4c78a8"]
    closed_line, open_line, points = signal
    assert closed_line["transform"] == [{"filter": "datum.final"}] and "strokeDash" not in closed_line["mark"]
    open_rows = spec["datasets"][open_line["data"]["name"]]
    assert open_line["mark"]["strokeDash"] and [row["final"] for row in open_rows] == [True, False, False]
    assert points["encoding"]["fill"]["condition"]["test"] == "datum.final"
    rows = spec["datasets"][points["data"]["name"]]
    assert [row["window_state"] for row in rows[-3:]] == ["closed"] + ["still open: its messages so far"] * 2
