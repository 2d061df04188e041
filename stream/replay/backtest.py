"""``finpulse backtest``: how good were a replay run's alerts? A JSON and a self-contained HTML report.

Inputs: the run's Parquet outputs (``var/replay/<run-id>/``, which must be complete), and optionally

* ``--events events.csv`` with columns ``key,start,end``: labeled events. ``key`` is ``ticker:AAPL``,
  ``topic:Energy | Oil``, or a bare key (``AAPL``) that matches either kind. Times are ISO-8601 (or epoch).
* ``--prices prices.csv`` with columns ``ticker,timestamp,price``.

Alert quality counts alert episodes, not events: an episode is its firing (an escalation of it or its resolve is
not another alert), at the firing's ``emitted_at``, the event time at which the live system would have raised it,
with the highest severity it reached (``severity``), the one it fired with (``fired_as``) and how many times it
escalated (``escalations``):

* an alert *matches* an event with the same key when ``start - match_before <= alert time <= end``;
* only events whose first alert the run could raise count in recall: those that start in the run's
  ``[from, to + match_before)`` (an event that began earlier, in the warm-up or before it, was alerted on, or not,
  before the run's range; ``events_outside_range`` says how many were left out), and that no alert of the
  warm-up matched (``events_alerted_in_warmup``: the run's outputs hold no warm-up alert, see ``run.py``);
* **precision** = alerts matching some labeled event (counted in recall or not) / alerts; **recall** = counted
  events matched by some alert / counted events;
* an episode detects at most one event: each counted event, earliest start first, takes the first matching episode
  no earlier event took (one episode matching two events, ``match_before`` reaching back over the first, would
  otherwise count twice in recall and credit the second with a lead it never gave);
* **lead time** of a detected event = its start - the time of the episode that detected it (positive: the alert
  came first).

Event study (with prices): the **forward return** over ``h`` (1h, 1d) from time ``t`` is ``p(t+h) / p(t) - 1``,
with ``p(x)`` the last price at or before ``x``; it is left out when the prices do not reach ``t+h``. It is
reported after every alert episode on a ticker, from its firing (mean, median, share negative, against all price
times as a baseline), and for scored messages that name a ticker, by quintile of their sentiment score.

Every figure is labeled with the run's model version and config hash (from ``manifest.json``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from models.data import SPREADSHEET_SUFFIXES, csv_separator
from stream.aggregate import parse_duration_s
from stream.config import Settings
from stream.records import SEVERITIES, InvalidRecord, epoch_ms, severity_rank

from .output import read_table
from .plan import CHECKPOINT, MANIFEST, ReplayError, ReplaySettings, parse_user_time, read_json
from .report import render_html

HORIZONS = {"1h": pd.Timedelta(hours=1), "1d": pd.Timedelta(days=1)}
QUANTILES = 5


# ---------------------------------------------------------------- inputs

def load_run(run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    if not (run_dir / MANIFEST).is_file():
        hint = " (it is interrupted: run the replay again to finish it)" if (run_dir / CHECKPOINT).exists() else ""
        raise ReplayError(f"{run_dir} holds no complete replay run: {MANIFEST} is missing{hint}")
    return read_json(run_dir / MANIFEST), read_table(run_dir, "alerts"), read_table(run_dir, "scored")


def _read_csv(path: str, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    file = Path(path)
    if not file.is_file():
        raise ReplayError(f"{what} file {file} does not exist")
    if file.suffix.lower() in SPREADSHEET_SUFFIXES:
        raise ReplayError(f"{what} file {file} is a spreadsheet: save it as CSV and pass that")
    try:
        with open(file, encoding="utf-8-sig", errors="replace") as handle:
            separator = csv_separator(handle.readline())    # a spreadsheet's semicolons, say
        frame = pd.read_csv(file, sep=separator, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{what} file {file} is not readable CSV: {exc}") from None
    frame.columns = [c.strip().lower() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReplayError(f"{what} file {file} needs columns {', '.join(columns)}; missing {', '.join(missing)}")
    chosen = frame[list(columns)].copy()
    chosen.attrs["separator"] = separator
    return chosen


def _times(frame: pd.DataFrame, column: str, file: str) -> pd.Series:
    values = []
    for row, text in enumerate(frame[column], start=2):
        try:
            values.append(epoch_ms(parse_user_time(text, column)))
        except InvalidRecord as exc:
            raise ReplayError(f"{file} line {row}: {exc.detail}") from None
    return pd.to_datetime(pd.Series(values, index=frame.index, dtype="int64"), unit="ms", utc=True)


def load_events(path: str) -> pd.DataFrame:
    frame = _read_csv(path, ("key", "start", "end"), "events")
    frame = frame.assign(key=frame["key"].str.strip(), start=_times(frame, "start", path), end=_times(frame, "end", path))
    bad = frame.index[(frame["end"] < frame["start"]) | (frame["key"] == "")]
    if len(bad):
        raise ReplayError(f"{path} line {bad[0] + 2}: an event needs a key and end >= start")
    return frame.reset_index(drop=True)


def load_prices(path: str) -> pd.DataFrame:
    frame = _read_csv(path, ("ticker", "timestamp", "price"), "prices")
    written = frame["price"].str.strip()
    if frame.attrs["separator"] == ";":  # where lists take semicolons, decimals take commas: 101,5
        written = written.str.replace(r"^(\d+),(\d+)$", r"\1.\2", regex=True)
    prices = pd.to_numeric(written, errors="coerce")
    bad = frame.index[~(prices > 0)]
    if len(bad):
        raise ReplayError(f"{path} line {bad[0] + 2}: price {frame['price'][bad[0]]!r} is not a positive number")
    frame = frame.assign(ticker=frame["ticker"].str.strip().str.upper().str.lstrip("$"),
                         timestamp=_times(frame, "timestamp", path), price=prices)
    return frame.sort_values(["ticker", "timestamp"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- alert quality

def key_matches(event_key: str, key_type: str, key: str) -> bool:
    kind, sep, name = event_key.partition(":")
    if sep and kind in ("ticker", "topic"):
        return kind == key_type and name == key
    return event_key == key


def _hits(alerts: pd.DataFrame, event, match_before: pd.Timedelta) -> pd.DataFrame:
    """The alerts (columns key_type, key, emitted_at) that match ``event``."""
    same_key = alerts[pd.Series([key_matches(event["key"], kt, k) for kt, k in zip(alerts["key_type"], alerts["key"])],
                                index=alerts.index, dtype=bool)]
    return same_key[(same_key["emitted_at"] >= event["start"] - match_before) & (same_key["emitted_at"] <= event["end"])]


def episodes(alerts: pd.DataFrame) -> pd.DataFrame:
    """One row per alert episode: its firing event, with ``severity`` the highest the episode reached, ``fired_as``
    the severity it fired with and ``escalations`` how many escalation events it had; by firing time."""
    firing = alerts[alerts["status"] == "firing"]
    opened = firing[firing["escalated_from"] == ""]
    rank = firing["severity"].map(severity_rank)
    highest = rank.groupby(firing["id"]).max().map(lambda r: SEVERITIES[r])
    escalations = (firing["escalated_from"] != "").groupby(firing["id"]).sum()
    return (opened.assign(fired_as=opened["severity"], severity=opened["id"].map(highest),
                          escalations=opened["id"].map(escalations).astype(int))
            .sort_values(["emitted_at", "id"], kind="stable").reset_index(drop=True))


def alert_quality(alerts: pd.DataFrame, events: pd.DataFrame | None, match_before: pd.Timedelta,
                  replayed: tuple[pd.Timestamp, pd.Timestamp], held_back: list[dict] = ()) -> dict[str, Any]:
    """Precision, recall and lead times, per episode; ``held_back`` are the warm-up's firing alerts (manifest
    ``warmup``)."""
    firing = episodes(alerts)
    out: dict[str, Any] = {"alerts_firing": int(len(firing)), "alerts_escalated": int((firing["escalations"] > 0).sum()),
                           "alerts_resolved": int((alerts["status"] == "resolved").sum()),
                           "match_before_s": match_before.total_seconds()}
    if events is None:
        return {**out, "precision": None, "recall": None, "events": [], "alerts": _alert_rows(firing, {})}
    start, end = replayed
    warmup_alerts = pd.DataFrame(list(held_back), columns=["key_type", "key", "emitted_at"])
    warmup_alerts["emitted_at"] = pd.to_datetime(warmup_alerts["emitted_at"], utc=True)
    # Not misses: an event the run could not raise the first alert of, or whose first alert the warm-up held back.
    in_range = (events["start"] >= start) & (events["start"] - match_before < end)
    alerted_in_warmup = pd.Series([len(_hits(warmup_alerts, e, match_before)) > 0 for _, e in events.iterrows()],
                                  index=events.index, dtype=bool)
    out["events_outside_range"] = int((~in_range).sum())
    out["events_alerted_in_warmup"] = int((in_range & alerted_in_warmup).sum())
    counted = in_range & ~alerted_in_warmup
    matched_alerts: dict[str, str] = {}
    # One episode detects one event: the earliest-starting counted event it matches takes it, so an episode that
    # matches two labeled events (match_before reaches back over the first) does not count twice in recall.
    hits_of = {i: _hits(firing, event, match_before) for i, event in events.iterrows()}
    credited: dict[int, pd.Series] = {}
    taken: set[str] = set()
    for i in events[counted].sort_values("start", kind="stable").index:
        free = hits_of[i][~hits_of[i]["id"].isin(taken)]
        if len(free):
            credited[i] = free.iloc[0]
            taken.add(free.iloc[0]["id"])
    rows = []
    for i, event in events.iterrows():
        label = f"{event['key']} @ {event['start']:%Y-%m-%d %H:%M}"
        hits = hits_of[i]
        for alert_id in hits["id"]:
            matched_alerts.setdefault(alert_id, label)
        if not counted[i]:
            continue
        first = credited.get(i)
        if first is not None:
            matched_alerts[first["id"]] = label
        rows.append({"event": label, "key": event["key"], "start": event["start"], "end": event["end"],
                     "detected": first is not None, "first_alert": None if first is None else first["id"],
                     "first_alert_at": None if first is None else first["emitted_at"],
                     "lead_time_s": None if first is None else (event["start"] - first["emitted_at"]).total_seconds(),
                     "alerts": int(len(hits))})
    leads = [r["lead_time_s"] for r in rows if r["lead_time_s"] is not None]
    return {**out, "events_labeled": len(rows), "events_detected": sum(r["detected"] for r in rows),
            "precision": len(matched_alerts) / len(firing) if len(firing) else None,
            "recall": sum(r["detected"] for r in rows) / len(rows) if rows else None,
            "lead_time_s": _summary(leads), "events": rows, "alerts": _alert_rows(firing, matched_alerts)}


def _alert_rows(firing: pd.DataFrame, matched: dict[str, str]) -> list[dict]:
    return [{"id": a["id"], "key_type": a["key_type"], "key": a["key"], "severity": a["severity"],
             "fired_as": a["fired_as"], "escalations": a["escalations"], "emitted_at": a["emitted_at"],
             "deviation": a["deviation"], "matched_event": matched.get(a["id"])}
            for _, a in firing.iterrows()]


def _summary(values) -> dict[str, Any]:
    series = pd.Series(values, dtype="float64").dropna()
    if series.empty:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"n": int(series.size), "mean": float(series.mean()), "median": float(series.median()),
            "min": float(series.min()), "max": float(series.max())}


# ---------------------------------------------------------------- event study

def forward_returns(prices: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """``points`` (columns ticker, time) with ``ret_1h``/``ret_1d`` added (NaN where the prices do not reach)."""
    out = points.reset_index(drop=True).copy()
    out["time"] = _ns(out["time"])
    out["_row"] = range(len(out))
    last_seen = prices.groupby("ticker")["timestamp"].max()
    price_table = prices.rename(columns={"timestamp": "at"})[["ticker", "at", "price"]].sort_values("at", kind="stable")
    price_table["at"] = _ns(price_table["at"])
    base = _asof(out, price_table, "time")
    out["_p0"] = base
    for name, delta in HORIZONS.items():
        shifted = out.assign(time=out["time"] + delta)
        later = _asof(shifted, price_table, "time")
        reach = out["ticker"].map(_ns(last_seen)) >= out["time"] + delta
        out[f"ret_{name}"] = (later / out["_p0"] - 1).where(reach)
    return out.drop(columns=["_row", "_p0"])


def _ns(times: pd.Series) -> pd.Series:
    """One datetime resolution for merges (Parquet gives ms, CSV parsing us)."""
    return pd.to_datetime(times, utc=True).astype("datetime64[ns, UTC]")


def _asof(points: pd.DataFrame, prices: pd.DataFrame, on: str) -> pd.Series:
    """The last price at or before each point's time for its ticker, in ``points``' row order."""
    left = points[["_row", "ticker", on]].sort_values(on, kind="stable")
    merged = pd.merge_asof(left, prices, left_on=on, right_on="at", by="ticker", direction="backward")
    return merged.set_index("_row")["price"].reindex(points["_row"]).to_numpy()


def event_study(prices: pd.DataFrame, alerts: pd.DataFrame, scored: pd.DataFrame) -> dict[str, Any]:
    tickers = set(prices["ticker"])
    firing = episodes(alerts)
    firing = firing[(firing["key_type"] == "ticker") & firing["key"].isin(tickers)]
    after = forward_returns(prices, pd.DataFrame({"ticker": firing["key"], "time": firing["emitted_at"]}))
    baseline = forward_returns(prices, pd.DataFrame({"ticker": prices["ticker"], "time": prices["timestamp"]}))
    study: dict[str, Any] = {"tickers_with_prices": sorted(tickers), "after_bearish_alerts": {}, "all_price_times": {}}
    for name in HORIZONS:
        study["after_bearish_alerts"][name] = _return_summary(after[f"ret_{name}"])
        study["all_price_times"][name] = _return_summary(baseline[f"ret_{name}"])
    mentions = scored[["event_time", "sentiment_score", "tickers"]].explode("tickers").dropna(subset=["tickers"])
    mentions = mentions[mentions["tickers"].isin(tickers)]
    study["by_sentiment_quantile"] = []
    if len(mentions):
        points = forward_returns(prices, pd.DataFrame({"ticker": mentions["tickers"].to_numpy(),
                                                       "time": mentions["event_time"].to_numpy()}))
        points["score"] = mentions["sentiment_score"].to_numpy()
        bins = min(QUANTILES, len(points))
        # Equal scores share a group, whatever their row order: with many ties (a discrete score, a text repeated)
        # groups are unequal, and where ties span an edge there are fewer of them.
        points["quantile"] = pd.qcut(points["score"], bins, labels=False, duplicates="drop") + 1
        for q, group in points.groupby("quantile", sort=True):
            study["by_sentiment_quantile"].append({
                "quantile": int(q), "n": int(len(group)), "score_min": float(group["score"].min()),
                "score_max": float(group["score"].max()),
                **{f"mean_ret_{name}": _mean(group[f"ret_{name}"]) for name in HORIZONS},
                **{f"n_{name}": int(group[f"ret_{name}"].notna().sum()) for name in HORIZONS}})
    return study


def _mean(series: pd.Series) -> float | None:
    series = series.dropna()
    return float(series.mean()) if len(series) else None


def _return_summary(series: pd.Series) -> dict[str, Any]:
    values = series.dropna()
    return {"n": int(values.size), "mean": _mean(values), "median": float(values.median()) if len(values) else None,
            "share_negative": float((values < 0).mean()) if len(values) else None}


# ---------------------------------------------------------------- the report

def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.Timestamp):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):          # numpy scalars
        return _jsonable(value.item())
    return value


def run_backtest(settings: Settings, *, run_id: str, run_dir: str | None = None, events: str | None = None,
                 prices: str | None = None, out: str | None = None, match_before: str = "1h") -> dict[str, Any]:
    """Compute the report, write ``report.json`` and ``report.html``; returns the report (with ``paths``)."""
    directory = Path(run_dir) if run_dir else Path(settings.section("replay", ReplaySettings).out_dir) / run_id
    try:
        before = pd.Timedelta(seconds=parse_duration_s(match_before))
    except ValueError as exc:
        raise ReplayError(f"--match-before: {exc}") from None
    manifest, alerts, scored = load_run(directory)
    if manifest.get("run_id") != run_id:
        raise ReplayError(f"{directory} holds run {manifest.get('run_id')!r}, not {run_id!r}")
    labeled = load_events(events) if events else None
    price_table = load_prices(prices) if prices else None
    report = {
        "run_id": run_id, "model_version": manifest["model_version"], "config_hash": manifest["config_hash"],
        "config": manifest.get("config"), "scores_from": manifest.get("scores_from"),
        "from": manifest["from"], "to": manifest["to"], "source": manifest["source"], "counts": manifest["counts"],
        "inputs": {"events": events, "prices": prices},
        "warmup": manifest.get("warmup"),
        "alert_quality": alert_quality(alerts, labeled, before, (pd.Timestamp(manifest["from"]),
                                                                 pd.Timestamp(manifest["to"])),
                                       (manifest.get("warmup") or {}).get("held_back", [])),
        "event_study": event_study(price_table, alerts, scored) if price_table is not None else None,
        "sentiment_over_time": sentiment_over_time(scored),
    }
    report = _jsonable(report)
    target = Path(out) if out else directory
    target.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(target / "report.json"), "html": str(target / "report.html")}
    Path(paths["json"]).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    Path(paths["html"]).write_text(render_html(report, episodes(alerts), labeled))
    return {**report, "paths": paths}


def compare_runs(settings: Settings, run_ids: list[str], *, events: str | None = None, prices: str | None = None,
                 out: str | None = None, match_before: str = "1h") -> dict[str, Any]:
    """``finpulse backtest --run-id A --run-id B ...`` (run ids, or run directories): each run's report (written in
    its own directory, as for one run), and one table of them side by side: what differs in their thresholds, their alert episodes, precision,
    recall, median lead time and false alerts per day. Written as ``comparison.json`` in ``out`` when given."""
    if len(set(run_ids)) != len(run_ids):
        raise ReplayError("a run is named twice: give each --run-id once")
    reports = []
    for given in run_ids:
        # A run id under [replay] out_dir, or the directory of a run written elsewhere (replay --parquet).
        directory = Path(given) if (Path(given) / MANIFEST).is_file() else None
        run_id = json.loads((directory / MANIFEST).read_text()).get("run_id", given) if directory else given
        reports.append(run_backtest(settings, run_id=run_id, run_dir=str(directory) if directory else None,
                                    events=events, prices=prices, match_before=match_before))
    flat = [_flatten(report.get("config") or {}) for report in reports]
    differing = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)
    rows = []
    for report, settings_of_run in zip(reports, flat):
        quality = report["alert_quality"]
        days = (pd.Timestamp(report["to"]) - pd.Timestamp(report["from"])) / pd.Timedelta(days=1)
        false_alerts = sum(1 for a in quality["alerts"] if not a["matched_event"]) if events else None
        rows.append({"run_id": report["run_id"], "model_version": report["model_version"],
                     "scores_from": report.get("scores_from"), "settings": {k: settings_of_run.get(k) for k in differing},
                     "alerts": quality["alerts_firing"], "escalated": quality["alerts_escalated"],
                     "precision": quality["precision"], "recall": quality["recall"],
                     "median_lead_time_s": (quality.get("lead_time_s") or {}).get("median"),
                     "false_alerts_per_day": None if false_alerts is None else false_alerts / days,
                     "report": report["paths"]["html"]})
    comparison = _jsonable({"events": events, "match_before": match_before, "differing": differing, "runs": rows})
    if out:
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        (target / "comparison.json").write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
        comparison["path"] = str(target / "comparison.json")
    return comparison


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"detect": {"fire_z": 5.5}}`` -> ``{"detect.fire_z": 5.5}`` (overrides flatten the same way)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):     # an empty one (no overrides) adds nothing: a run without reads as None
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def format_comparison(comparison: dict) -> str:
    """The comparison as an aligned text table, one row per run."""
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)
    header = ("RUN ID", *comparison["differing"], "ALERTS", "ESCALATED", "PRECISION", "RECALL", "MEDIAN LEAD",
              "FALSE/DAY", "MODEL")
    rows = [header] + [(r["run_id"], *(json.dumps(r["settings"][k]) for k in comparison["differing"]),
                        str(r["alerts"]), str(r["escalated"]), number(r["precision"], ".2f"), number(r["recall"], ".2f"),
                        "-" if r["median_lead_time_s"] is None else f"{r['median_lead_time_s']:+.0f}s",
                        number(r["false_alerts_per_day"], ".1f"),
                        r["model_version"] + (f" (scores of {r['scores_from']})" if r["scores_from"] else ""))
                       for r in comparison["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# Bucket sizes for the sentiment line, by the span of the run: about 30 to 200 points.
BUCKETS = ((pd.Timedelta(hours=3), "1min", "minute"), (pd.Timedelta(days=2), "15min", "15 minutes"),
           (pd.Timedelta(days=10), "1h", "hour"))


def sentiment_over_time(scored: pd.DataFrame) -> dict[str, Any]:
    """Mean sentiment score per time bucket (sized to the run's span)."""
    if scored.empty:
        return {"bucket": "hour", "points": []}
    span = scored["event_time"].max() - scored["event_time"].min()
    freq, name = next(((f, n) for limit, f, n in BUCKETS if span <= limit), ("1D", "day"))
    series = scored.set_index("event_time")["sentiment_score"].resample(freq).agg(["mean", "count"])
    return {"bucket": name, "points": [{"at": t, "mean_score": row["mean"], "messages": int(row["count"])}
                                       for t, row in series.iterrows() if row["count"]]}


__all__ = ["alert_quality", "episodes", "event_study", "forward_returns", "key_matches", "load_events", "load_prices",
           "run_backtest"]
