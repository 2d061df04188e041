"""``finpulse backtest``: alert precision/recall/lead time and the forward-return event study on hand-made runs
with known answers, then end to end on a real replay of a simulated shock; bad inputs fail clearly."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from stream.cli import main
from stream.kafka_io import RecordSender
from stream.records import ScoredRecord, format_time
from stream.replay.backtest import event_study, load_prices
from stream.replay.output import PartSink, alert_row, read_table, scored_row
from stream.simulate import Shock, generate, shock_truth
from tests.procs import write_config
from tests.test_formats import make_alert

DAY = datetime(2026, 3, 2, tzinfo=timezone.utc)


def at(hour: float, day: int = 0) -> datetime:
    return DAY + timedelta(days=day, hours=hour)


def finpulse(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def scored(ident: str, when: datetime, score: float, tickers: tuple[str, ...]) -> ScoredRecord:
    sentiment = "bearish" if score < -0.2 else "bullish" if score > 0.2 else "neutral"
    return ScoredRecord(id=ident, kind="comment", event_time=when, text=ident, topic="Markets", topic_confidence=0.5,
                        sentiment=sentiment, sentiment_score=score, tickers=tickers, model_version="m-1",
                        scored_at=when)


@pytest.fixture
def known_run(tmp_path) -> Path:
    """Three alert episodes (two match labeled events, one does not), two of them escalated, and one resolve;
    AAPL/MSFT prices on an hourly
    grid; ten AAPL mentions, the bearish ones just before a fall, the bullish ones just before a rise."""
    run = tmp_path / "known"
    sink = PartSink(run, "m-1", "cfg123")
    for alert in (make_alert(id="aapl", key_type="ticker", key="AAPL", emitted_at=at(10), severity="warning"),
                  make_alert(id="aapl", key_type="ticker", key="AAPL", emitted_at=at(10.25), severity="critical",
                             escalated_from="warning"),
                  make_alert("resolved", id="aapl", key_type="ticker", key="AAPL", emitted_at=at(11.5)),
                  make_alert(id="oil", key_type="topic", key="Energy | Oil", emitted_at=at(12) + timedelta(minutes=10)),
                  make_alert(id="msft", key_type="ticker", key="MSFT", emitted_at=at(15), severity="info"),
                  make_alert(id="msft", key_type="ticker", key="MSFT", emitted_at=at(15.5), severity="warning",
                             escalated_from="info")):
        sink.add("alerts", alert_row(alert))
    for i, score in enumerate((-0.9, -0.8, -0.6, -0.5, 0.0, 0.1, 0.5, 0.6, 0.8, 0.9)):
        record = scored(f"m{i}", at(10) if score < 0 else at(11), score, ("AAPL",))
        sink.add("scored", scored_row(record, "news", 0, i))
    sink.write(0)
    (run / "manifest.json").write_text(json.dumps({
        "run_id": "known", "from": format_time(at(0)), "to": format_time(at(0, 1)), "source": "kafka",
        "model_version": "m-1", "config_hash": "cfg123", "counts": {"inputs": 10}}))
    (tmp_path / "events.csv").write_text("key,start,end\nAAPL,2026-03-02T10:30:00Z,2026-03-02T11:00:00Z\n"
                                         "topic:Energy | Oil,2026-03-02T12:00:00Z,2026-03-02T12:30:00Z\n"
                                         "ticker:TSLA,2026-03-02T13:00:00Z,2026-03-02T13:30:00Z\n")
    prices = ["ticker,timestamp,price"]
    aapl = {9: 100.0, 10: 100.0, 11: 99.0, 12: 101.0}
    for hour in range(9, 36):      # to 11:00 the next day: 95 from 13:00 on
        prices.append(f"AAPL,{format_time(at(hour))},{aapl.get(hour, 95.0)}")
    prices += [f"MSFT,{format_time(at(15))},200", f"MSFT,{format_time(at(16))},202"]
    (tmp_path / "prices.csv").write_text("\n".join(prices) + "\n")
    return run


def test_precision_recall_lead_time_and_event_study_have_the_known_values(known_run, tmp_path):
    code, out, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run), "--events",
                              str(tmp_path / "events.csv"), "--prices", str(tmp_path / "prices.csv"))
    assert code == 0, out + err
    report = json.loads((known_run / "report.json").read_text())
    quality = report["alert_quality"]
    # Escalations are events of their episodes, not more alerts: they count neither as hits nor as false ones.
    assert (quality["alerts_firing"], quality["alerts_escalated"], quality["alerts_resolved"]) == (3, 2, 1)
    assert quality["precision"] == pytest.approx(2 / 3) and quality["recall"] == pytest.approx(2 / 3)
    leads = {e["key"]: e["lead_time_s"] for e in quality["events"]}
    assert leads == {"AAPL": 1800.0, "topic:Energy | Oil": -600.0, "ticker:TSLA": None}
    assert quality["lead_time_s"]["mean"] == pytest.approx(600.0)
    assert {a["id"]: a["matched_event"] is not None for a in quality["alerts"]} == {"aapl": True, "oil": True,
                                                                                   "msft": False}
    assert [(a["id"], a["fired_as"], a["severity"], a["escalations"]) for a in quality["alerts"]] == [
        ("aapl", "warning", "critical", 1), ("oil", "critical", "critical", 0), ("msft", "info", "warning", 1)]
    study = report["event_study"]
    after = study["after_bearish_alerts"]
    assert after["1h"]["n"] == 2 and after["1h"]["mean"] == pytest.approx((-0.01 + 0.01) / 2)
    assert after["1d"]["n"] == 1 and after["1d"]["mean"] == pytest.approx(-0.05)     # MSFT prices end too soon
    quintiles = study["by_sentiment_quantile"]
    assert [q["n"] for q in quintiles] == [2, 2, 2, 2, 2]
    assert quintiles[0]["score_max"] < 0 < quintiles[-1]["score_min"]
    assert quintiles[0]["mean_ret_1h"] == pytest.approx(-0.01)
    assert quintiles[-1]["mean_ret_1h"] == pytest.approx(101 / 99 - 1)
    assert (report["model_version"], report["config_hash"]) == ("m-1", "cfg123")
    html = (known_run / "report.html").read_text()
    assert html.count("<svg") >= 5 and "model m-1 · config cfg123" in html


def test_equal_sentiment_scores_fall_in_one_quantile_whatever_their_row_order(known_run, tmp_path):
    """Before, quantiles were cut by rank in row order: of equal scores, some fell in one quintile and some in the
    next, so a quintile's returns hung on the order the messages came in."""
    prices, alerts = load_prices(str(tmp_path / "prices.csv")), read_table(known_run, "alerts")
    scores = [-0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.6, 0.9]
    for order in (scores, scores[::-1]):
        frame = pd.DataFrame({"event_time": [pd.Timestamp(at(10 + i / 10)) for i in range(len(order))],
                              "sentiment_score": order, "tickers": [["AAPL"]] * len(order)})
        groups = [(q["score_min"], q["score_max"], q["n"]) for q in event_study(prices, alerts, frame)[
            "by_sentiment_quantile"]]
        assert groups == [(-0.9, 0.0, 7), (0.5, 0.5, 1), (0.6, 0.9, 2)], groups    # edges: 0.0 and 0.52


def self_contained(html: str) -> bool:
    """Nothing to fetch: no scripts, no src/href attributes, no stylesheet links, no @import."""
    return not re.search(r"<script|\ssrc=|\shref=|<link|@import", html)


def test_backtest_of_a_real_replay_finds_the_simulated_shock(fp_settings, topics, tmp_path):
    start = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    shock = Shock("Energy | Oil", at_s=240, duration_s=120)
    messages = list(generate(seed=4, start=start, rate=10, count=4000, shock=shock))

    async def produce():
        async with RecordSender(fp_settings.kafka) as sender:
            for m in messages:
                await sender.send(topics.input_for(m.kind), m.value(),
                                  key=m.id.encode(), event_time=m.event_time)
    asyncio.run(produce())
    config = write_config(fp_settings.with_overrides({"detect": {"warmup_windows": 3}}), tmp_path / "finpulse.toml")
    run_dir = tmp_path / "run"
    code, out, err = finpulse("--config", str(config), "replay", "--from", format_time(start), "--to",
                              format_time(start + timedelta(minutes=6)), "--run-id", "bt", "--parquet", str(run_dir),
                              "--no-progress")
    assert code == 0, out + err
    truth = shock_truth(start, shock)
    (tmp_path / "events.csv").write_text(f"key,start,end\ntopic:{truth.topic},{format_time(truth.start)},"
                                         f"{format_time(truth.end)}\n")
    prices = ["ticker,timestamp,price"] + [f"{t},{format_time(start + timedelta(minutes=5 * i))},{100 - i * 0.1:.2f}"
                                           for t in truth.tickers for i in range(0, 400)]
    (tmp_path / "prices.csv").write_text("\n".join(prices) + "\n")
    code, out, err = finpulse("--config", str(config), "backtest", "--run-id", "bt", "--parquet", str(run_dir),
                              "--events", str(tmp_path / "events.csv"), "--prices", str(tmp_path / "prices.csv"),
                              "--out", str(tmp_path / "report"))
    assert code == 0, out + err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert report["alert_quality"]["recall"] == 1.0
    assert report["alert_quality"]["events"][0]["lead_time_s"] <= 0       # a sentiment spike follows the shock
    assert report["event_study"]["by_sentiment_quantile"]
    assert (report["model_version"], report["config_hash"]) == (manifest["model_version"], manifest["config_hash"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert self_contained(html) and "<svg" in html
    assert f"model {manifest['model_version']} · config {manifest['config_hash']}" in html


def test_events_the_run_could_not_alert_on_are_left_out_of_recall(known_run, tmp_path):
    """The run replayed 2026-03-02 (a day): an event the day before and one the day after are not misses (before,
    recall fell from 2/3 to 2/5); one starting within --match-before after the run's end could still be matched
    by an early alert, so it counts (here: a miss)."""
    events = (tmp_path / "events.csv").read_text() + (
        "AAPL,2026-03-01T10:00:00Z,2026-03-01T11:00:00Z\n"
        "AAPL,2026-03-03T10:00:00Z,2026-03-03T11:00:00Z\n"
        "AAPL,2026-03-03T00:30:00Z,2026-03-03T01:00:00Z\n")
    (tmp_path / "more_events.csv").write_text(events)
    code, out, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run), "--events",
                              str(tmp_path / "more_events.csv"))
    assert code == 0, out + err
    quality = json.loads((known_run / "report.json").read_text())["alert_quality"]
    assert (quality["events_labeled"], quality["events_detected"], quality["events_outside_range"]) == (4, 2, 2)
    assert quality["recall"] == pytest.approx(2 / 4) and quality["precision"] == pytest.approx(2 / 3)
    assert "labeled events outside the run (not counted)" in (known_run / "report.html").read_text()


def test_one_alert_episode_detects_one_event(known_run, tmp_path):
    """The AAPL episode fired at 10:00; --match-before 1h lets it match a 10:30 event and an 11:00 one. It detects
    the first only: before, it detected both, recall counted the second as found and credited it a 60-minute lead.
    A second AAPL episode would have been free to detect the second event."""
    (tmp_path / "two_events.csv").write_text("key,start,end\nAAPL,2026-03-02T11:00:00Z,2026-03-02T11:10:00Z\n"
                                             "AAPL,2026-03-02T10:30:00Z,2026-03-02T10:45:00Z\n")
    code, out, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run), "--events",
                              str(tmp_path / "two_events.csv"))
    assert code == 0, out + err
    quality = json.loads((known_run / "report.json").read_text())["alert_quality"]
    assert (quality["events_labeled"], quality["events_detected"]) == (2, 1)
    assert [(e["start"][11:16], e["detected"], e["lead_time_s"], e["alerts"]) for e in quality["events"]] == [
        ("11:00", False, None, 1), ("10:30", True, 1800.0, 1)]
    assert quality["recall"] == pytest.approx(1 / 2) and quality["lead_time_s"]["median"] == 1800.0
    assert {a["id"]: a["matched_event"] for a in quality["alerts"]}["aapl"] == "AAPL @ 2026-03-02 10:30"


def test_events_of_the_warm_up_are_left_out_of_recall(known_run, tmp_path):
    """The run read a warm-up from 23:00 the day before. An event that began in the warm-up (and lasts into the run)
    was alerted on, or not, before the run's range: not a miss (before, it counted as one). Nor is an event whose
    alert the warm-up raised and held back: the outputs cannot show it. An alert matching a left-out event still
    counts as a true alert in precision."""
    manifest = json.loads((known_run / "manifest.json").read_text())
    manifest["warmup"] = {"from": "2026-03-01T23:00:00.000Z", "rule": "--warmup 1h", "inputs": 40, "short": False,
                          "first_input": "2026-03-01T23:00:01.000Z", "alerts_held_back": 1,
                          "held_back": [{"id": "nvda", "key_type": "ticker", "key": "NVDA",
                                         "emitted_at": "2026-03-01T23:50:00.000Z"}]}
    (known_run / "manifest.json").write_text(json.dumps(manifest))
    events = (tmp_path / "events.csv").read_text() + (
        "MSFT,2026-03-01T23:30:00Z,2026-03-02T16:00:00Z\n"      # began in the warm-up; the 15:00 MSFT alert matches it
        "NVDA,2026-03-02T00:20:00Z,2026-03-02T00:40:00Z\n")     # in range, but alerted on in the warm-up
    (tmp_path / "warm_events.csv").write_text(events)
    code, out, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run), "--events",
                              str(tmp_path / "warm_events.csv"))
    assert code == 0, out + err
    quality = json.loads((known_run / "report.json").read_text())["alert_quality"]
    assert (quality["events_labeled"], quality["events_detected"]) == (3, 2)
    assert (quality["events_outside_range"], quality["events_alerted_in_warmup"]) == (1, 1)
    assert quality["recall"] == pytest.approx(2 / 3) and quality["precision"] == pytest.approx(3 / 3)
    html = (known_run / "report.html").read_text()
    assert "labeled events alerted on in the warm-up (not counted)" in html
    assert "warm-up from 2026-03-01T23:00:00.000Z (--warmup 1h): 40 messages read" in html


def backtest_report(known_run: Path, out: Path, events: Path, prices: Path) -> dict:
    """``finpulse backtest`` of the known run against these files: its report.json."""
    code, printed, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run), "--out", str(out),
                                  "--events", str(events), "--prices", str(prices))
    assert code == 0, printed + err
    return json.loads((out / "report.json").read_text())


def test_epoch_times_in_the_csv_files_read_as_their_iso_equivalents(known_run, tmp_path):
    """Events in epoch seconds and prices in epoch milliseconds, as the docs offer (before: "is not ISO-8601")."""
    def to_epoch(name: str, columns: tuple[str, ...], scale: int) -> Path:
        frame = pd.read_csv(tmp_path / name, dtype=str)
        for column in columns:
            frame[column] = [str(int(pd.Timestamp(t).timestamp() * scale)) for t in frame[column]]
        frame.to_csv(tmp_path / f"epoch_{name}", index=False)
        return tmp_path / f"epoch_{name}"

    events, prices = to_epoch("events.csv", ("start", "end"), 1), to_epoch("prices.csv", ("timestamp",), 1000)
    plain = (tmp_path / "events.csv", tmp_path / "prices.csv")
    reports = {"iso": backtest_report(known_run, tmp_path / "iso", *plain),
               "epoch": backtest_report(known_run, tmp_path / "epoch", events, prices)}
    assert "AAPL,1772447400," in events.read_text() and "AAPL,1772445600000," in prices.read_text()   # 10:30, 10:00
    for section in ("alert_quality", "event_study"):
        assert reports["epoch"][section] == reports["iso"][section]


def test_events_and_prices_from_a_european_spreadsheet_read_as_the_comma_files(known_run, tmp_path):
    """Semicolons between fields, a comma in the prices' decimals, the byte-order mark of Excel's "CSV UTF-8"."""
    def as_excel(name: str) -> Path:
        frame = pd.read_csv(tmp_path / name, dtype=str)
        if "price" in frame:
            frame["price"] = frame["price"].str.replace(".", ",", regex=False)
        out = tmp_path / f"excel_{name}"
        out.write_bytes(b"\xef\xbb\xbf" + frame.to_csv(index=False, sep=";").encode())
        return out

    events, prices = as_excel("events.csv"), as_excel("prices.csv")
    assert ";" in events.read_text(encoding="utf-8-sig") and "," in prices.read_text().split("\n")[1]
    plain = (tmp_path / "events.csv", tmp_path / "prices.csv")
    reports = {"comma": backtest_report(known_run, tmp_path / "comma", *plain),
               "excel": backtest_report(known_run, tmp_path / "excel", events, prices)}
    for section in ("alert_quality", "event_study"):
        assert reports["excel"][section] == reports["comma"][section]


def test_bad_backtest_inputs_fail_clearly_and_write_nothing(known_run, tmp_path):
    (tmp_path / "no_end.csv").write_text("key,start\nAAPL,2026-03-02T10:00:00Z\n")
    (tmp_path / "bad_time.csv").write_text("key,start,end\nAAPL,soon,2026-03-02T10:00:00Z\n")
    (tmp_path / "backwards.csv").write_text("key,start,end\nAAPL,2026-03-02T10:00:00Z,2026-03-02T09:00:00Z\n")
    (tmp_path / "bad_price.csv").write_text("ticker,timestamp,price\nAAPL,2026-03-02T10:00:00Z,-3\n")
    (tmp_path / "events.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "_checkpoint.json").write_text("{}")
    cases = [
        (["--parquet", str(tmp_path / "half")], "holds no complete replay run: manifest.json is missing (it is interrupted"),
        (["--run-id", "other"], "holds run 'known', not 'other'"),
        (["--events", str(tmp_path / "no_end.csv")], "needs columns key, start, end; missing end"),
        (["--events", str(tmp_path / "bad_time.csv")], "line 2: start='soon' is not ISO-8601"),
        (["--events", str(tmp_path / "backwards.csv")], "line 2: an event needs a key and end >= start"),
        (["--prices", str(tmp_path / "bad_price.csv")], "line 2: price '-3' is not a positive number"),
        (["--prices", str(tmp_path / "missing.csv")], "prices file"),
        (["--events", str(tmp_path / "events.xlsx")], "events.xlsx is a spreadsheet: save it as CSV and pass that"),
        (["--match-before", "soon"], "--match-before"),
    ]
    for extra, message in cases:
        args = ["backtest", "--run-id", "known", "--parquet", str(known_run), "--out", str(tmp_path / "out"), *extra]
        if "--run-id" in extra:
            args = ["backtest", "--parquet", str(known_run), "--out", str(tmp_path / "out"), *extra]
        code, out, err = finpulse(*args)
        assert code == 2 and message in err, (extra, out + err)
        assert not (tmp_path / "out").exists()


def test_a_run_written_before_escalations_existed_still_reads(known_run, tmp_path):
    """Alert parts without the escalated_from column (output schema 1), next to a part with it (a run resumed by a
    newer FinPulse): every old row reads as no escalation, and the backtest counts its episodes as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stream.replay.output import SCHEMAS, read_table

    old_schema = pa.schema([f for f in SCHEMAS["alerts"] if f.name != "escalated_from"])
    old = [{**alert_row(make_alert(id="old", key="Rates", emitted_at=at(13))), "config_hash": "cfg123"}]
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), known_run / "alerts" / "part-00001.parquet")
    alerts = read_table(known_run, "alerts")
    assert alerts.loc[alerts["id"] == "old", "escalated_from"].tolist() == [""]
    assert (alerts["escalated_from"] != "").sum() == 2
    code, out, err = finpulse("backtest", "--run-id", "known", "--parquet", str(known_run))
    assert code == 0, out + err
    quality = json.loads((known_run / "report.json").read_text())["alert_quality"]
    assert (quality["alerts_firing"], quality["alerts_escalated"]) == (4, 2)
