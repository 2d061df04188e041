"""What each view shows, computed from a store ``Snapshot`` with pandas only (no Streamlit, no charts), so every
number on the page can be tested on its own.

Time runs on the data's clock: "the last hour" is the hour before the newest record in the store, which keeps
simulated, replayed and live streams alike. Frames returned here keep UTC times; ``in_zone`` converts them for
display in the analyst's chosen time zone just before rendering.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .store import Snapshot

TIME_RANGES: dict[str, pd.Timedelta | None] = {
    "Last 15 minutes": pd.Timedelta(minutes=15),
    "Last hour": pd.Timedelta(hours=1),
    "Last 6 hours": pd.Timedelta(hours=6),
    "Last 24 hours": pd.Timedelta(hours=24),
    "Everything kept": None,
}
SEVERITY_RANK = {"critical": 3, "warning": 2, "info": 1}
# Charts show at most this many time buckets, whatever the span: more would only cost the browser.
MAX_BUCKETS = 120
# A baseline spread below this (in share or score units) would make tiny wobbles look like huge deviations.
MIN_SPREAD = 0.02


@dataclass(frozen=True)
class ViewFilters:
    key_type: str = "topic"            # topic | ticker
    window_s: int | None = None        # None: the smallest window size present
    span: pd.Timedelta | None = pd.Timedelta(hours=1)    # how long the range is (None: everything kept)
    keys: tuple[str, ...] = ()         # empty: every key
    min_count: int = 5
    baseline_windows: int = 30
    # A fixed range ends here and begins ``span`` earlier; None: the range follows the data (the last ``span``).
    until: pd.Timestamp | None = None

    @classmethod
    def fixed(cls, start: pd.Timestamp, end: pd.Timestamp, **others) -> "ViewFilters":
        return cls(span=end - start, until=end, **others)


# ---------------------------------------------------------------- choices offered by the controls

def window_sizes(trends: pd.DataFrame) -> list[int]:
    return sorted(int(w) for w in trends["window_s"].dropna().unique()) if not trends.empty else []


def keys_of(trends: pd.DataFrame, key_type: str) -> list[str]:
    if trends.empty:
        return []
    return sorted(trends.loc[trends["key_type"] == key_type, "key"].unique().tolist())


def newest_time(snap: Snapshot) -> pd.Timestamp | None:
    """The data clock: when the newest window update, message or alert was published."""
    candidates = [snap.trends["emitted_at"].max() if not snap.trends.empty else None,
                  snap.scored["event_time"].max() if not snap.scored.empty else None,
                  snap.alerts["emitted_at"].max() if not snap.alerts.empty else None]
    present = [c for c in candidates if c is not None and pd.notna(c)]
    return max(present) if present else None


def last_update(snap: Snapshot) -> pd.Timestamp | None:
    """When the worker last published anything the store holds, on the worker's wall clock (a window update, an
    alert or a scored message), unlike ``newest_time``'s event times: this is what says whether data still flows."""
    candidates = [snap.trends["emitted_at"].max() if not snap.trends.empty else None,
                  snap.alerts["emitted_at"].max() if not snap.alerts.empty else None,
                  snap.scored["scored_at"].max() if not snap.scored.empty else None]
    present = [c for c in candidates if c is not None and pd.notna(c)]
    return max(present) if present else None


@dataclass(frozen=True)
class Freshness:
    """Whether the page shows live data: ``stale`` once nothing new was published for ``stale_after_s``."""
    stale: bool
    age_s: float
    text: str


def duration(seconds: float) -> str:
    """'8 s', '14 min', '3 h 05 min': how long ago, to the precision an analyst reads at a glance."""
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def freshness(updated: pd.Timestamp | None, now: pd.Timestamp, stale_after_s: float,
              worker_lag: dict[str, int] | None) -> Freshness | None:
    """How old the newest published data is and, when it is too old, the likely reason (None: no data at all).

    The worker's consumer-group lag tells the two usual causes apart: input waiting unprocessed means the worker
    is stopped or stuck; no input waiting means nothing new is arriving (ingest or the sources are quiet)."""
    if updated is None or pd.isna(updated):
        return None
    age = max(0.0, (now - updated).total_seconds())   # a worker clock slightly ahead is not "in the future"
    if age < stale_after_s:
        return Freshness(False, age, f"Live: last update {duration(age)} ago")
    waiting = None if worker_lag is None else sum(worker_lag.values())
    if waiting:
        reason = (f"{waiting:,} input messages are waiting that the worker has not processed: it looks stopped or "
                  "stuck (is `finpulse worker` running?).")
    elif waiting == 0:
        reason = "The worker has processed all its input, so no new messages are arriving: check the ingest feeds."
    else:
        reason = "The worker's progress cannot be read from Kafka right now."
    return Freshness(True, age, f"No new data for {duration(age)}: the page shows the state as of that time. {reason}")


def resolve_window(trends: pd.DataFrame, window_s: int | None) -> int | None:
    sizes = window_sizes(trends)
    if not sizes:
        return None
    return window_s if window_s in sizes else sizes[0]


def span_start(snap: Snapshot, span: pd.Timedelta | None) -> pd.Timestamp | None:
    """Where a range of the last ``span`` begins on the data clock (None: everything kept)."""
    newest = newest_time(snap)
    return None if newest is None or span is None else newest - span


def range_start(snap: Snapshot, f: ViewFilters) -> pd.Timestamp | None:
    """Where the chosen time range begins: a fixed range's start, else ``span_start``."""
    return f.until - f.span if f.until is not None else span_start(snap, f.span)


def windows_in_range(frame: pd.DataFrame, span: pd.Timedelta | None, until: pd.Timestamp | None) -> pd.DataFrame:
    """The windows of ``frame`` in the range: those overlapping a fixed range ``[until - span, until)``; else those
    ending within ``span`` of the newest one (every one when ``span`` is None)."""
    if frame.empty:
        return frame
    if until is not None:
        return frame[(frame["window_end"] > until - span) & (frame["window_start"] < until)]
    if span is None:
        return frame
    return frame[frame["window_end"] >= frame["window_end"].max() - span]


# ---------------------------------------------------------------- overview

def key_windows(trends: pd.DataFrame, f: ViewFilters, span_limited: bool = True) -> pd.DataFrame:
    """The windows of the chosen key type and window size (and keys, when filtered), oldest first."""
    window_s = resolve_window(trends, f.window_s)
    if window_s is None:
        return trends.iloc[0:0]
    mask = (trends["key_type"] == f.key_type) & (trends["window_s"] == window_s)
    if f.keys:
        mask &= trends["key"].isin(f.keys)
    frame = trends[mask]
    if span_limited:
        frame = windows_in_range(frame, f.span, f.until)
    elif f.until is not None:
        frame = frame[frame["window_start"] < f.until]    # nothing after a fixed range: it is "now" there
    return frame.sort_values(["key", "window_start"], kind="stable")


def current_alerts(alerts: pd.DataFrame) -> pd.DataFrame:
    """One row per alert episode in its latest state (its newest event: the firing, its latest escalation or its
    resolve), firing ones first, then by severity and recency. ``severity`` is the highest the episode reached,
    ``fired_as`` the one it fired with and ``escalation`` says how it rose ("info → critical"; empty if it did not)."""
    if alerts.empty:
        return alerts.assign(firing=pd.Series(dtype=bool), severity_rank=pd.Series(dtype=int),
                             fired_as=pd.Series(dtype=str), escalation=pd.Series(dtype=str))
    events = alerts.assign(_resolved=alerts["status"] == "resolved").sort_values(["emitted_at", "_resolved"], kind="stable")
    latest = events.drop_duplicates("id", keep="last").drop(columns="_resolved")
    rank = events["severity"].map(SEVERITY_RANK).fillna(0).astype(int)
    highest = events.loc[rank.groupby(events["id"]).idxmax(), ["id", "severity"]].set_index("id")["severity"]
    # What it fired with: its firing's severity, or what its first kept escalation rose from (the firing may have
    # left the kept window already).
    firings = events[events["status"] == "firing"]
    fired_as = firings["escalated_from"].where(firings["escalated_from"] != "", firings["severity"]).groupby(firings["id"]).first()
    started = alerts.groupby("id")["window_start"].min()
    latest = latest.assign(severity=latest["id"].map(highest), fired_as=latest["id"].map(fired_as).fillna(latest["severity"]),
                           firing=latest["status"] == "firing", episode_start=latest["id"].map(started))
    severity_rank = latest["severity"].map(SEVERITY_RANK).fillna(0).astype(int)
    rose = latest["fired_as"].map(SEVERITY_RANK).fillna(0) < severity_rank
    latest = latest.assign(escalation=np.where(rose, latest["fired_as"] + " → " + latest["severity"], ""),
                           severity_rank=severity_rank)
    return latest.sort_values(["firing", "severity_rank", "emitted_at"], ascending=False, kind="stable").reset_index(drop=True)


def unusual_now(trends: pd.DataFrame, alerts: pd.DataFrame, f: ViewFilters) -> pd.DataFrame:
    """Each key's newest window (with at least ``min_count`` messages) against its own earlier final windows.

    ``unusual`` is in baseline standard deviations toward negative: the larger of the bearish-share rise and the
    mean-score fall, or the detector's own deviation when the key has a firing alert (the detector already judged
    it unusual). Sorted most unusual first; keys with too little history to judge (NaN) come last.
    """
    frame = key_windows(trends, f, span_limited=False)
    columns = ["key", "window_start", "window_end", "count", "mean_score", "bearish_share", "baseline_mean_score",
               "baseline_bearish_share", "history", "z_bearish", "z_score", "unusual", "firing", "severity"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    eligible = frame[frame["count"] >= f.min_count]
    latest = eligible.groupby("key", sort=False).tail(1).set_index("key")
    prior = frame[frame["final"]].join(latest["window_start"].rename("latest_start"), on="key")
    prior = prior[prior["window_start"] < prior["latest_start"]].groupby("key", sort=False).tail(f.baseline_windows)
    stats = prior.groupby("key").agg(baseline_mean_score=("mean_score", "mean"), score_std=("mean_score", "std"),
                                     baseline_bearish_share=("bearish_share", "mean"), bear_std=("bearish_share", "std"),
                                     history=("mean_score", "size"))
    out = latest[["window_start", "window_end", "count", "mean_score", "bearish_share"]].join(stats)
    out["history"] = out["history"].fillna(0).astype(int)
    enough = out["history"] >= 3
    out["z_bearish"] = ((out["bearish_share"] - out["baseline_bearish_share"]) / out["bear_std"].clip(lower=MIN_SPREAD)).where(enough)
    out["z_score"] = ((out["baseline_mean_score"] - out["mean_score"]) / out["score_std"].clip(lower=MIN_SPREAD)).where(enough)
    out["unusual"] = out[["z_bearish", "z_score"]].max(axis=1, skipna=True)

    live = current_alerts(alerts)
    if f.until is not None and not live.empty:
        # At the end of a fixed range: the episodes that were on then, not those on now.
        live = live.assign(firing=listed_episodes(live, f.until, f.until))
    window_s = resolve_window(trends, f.window_s)
    live = live[live["firing"] & (live["key_type"] == f.key_type) & (live["window_s"] == window_s)] if not live.empty else live
    out["firing"] = out.index.isin(live["key"]) if not live.empty else False
    out["severity"] = live.drop_duplicates("key").set_index("key")["severity"].reindex(out.index) if not live.empty else None
    if not live.empty:
        detector = live.groupby("key")["deviation"].max().reindex(out.index)
        out["unusual"] = np.fmax(out["unusual"], detector)
    out = out.reset_index().sort_values(["unusual", "count"], ascending=[False, False], na_position="last", kind="stable")
    return out[columns].reset_index(drop=True)


def tiling(windows: pd.DataFrame) -> pd.DataFrame:
    """Sliding windows (say 5m every 1m) overlap, so summing their counts would count messages several times:
    keep the windows that start on a multiple of their size, which tile time exactly (all of them, when tumbling)."""
    if windows.empty:
        return windows
    window_s = int(windows["window_s"].iloc[0])
    aligned = windows[windows["window_start"].dt.floor(f"{window_s}s") == windows["window_start"]]
    return aligned if not aligned.empty else windows


def bucket_size(span: pd.Timedelta, window_s: int) -> pd.Timedelta:
    """A multiple of the window size that keeps the chart at ``MAX_BUCKETS`` columns or fewer."""
    windows = max(1, int(np.ceil(span.total_seconds() / window_s / MAX_BUCKETS)))
    return pd.Timedelta(seconds=windows * window_s)


def heatmap(windows: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Count-weighted mean sentiment and bearish share per key and time bucket."""
    columns = ["key", "time", "time_end", "mean_score", "bearish_share", "count"]
    windows = tiling(windows)
    if windows.empty:
        return pd.DataFrame(columns=columns)
    window_s = int(windows["window_s"].iloc[0])
    size = bucket_size(windows["window_end"].max() - windows["window_start"].min(), window_s)
    frame = windows.assign(time=windows["window_start"].dt.floor(size),
                           _score=windows["mean_score"] * windows["count"],
                           _bear=windows["bearish_share"] * windows["count"])
    grouped = frame.groupby(["key", "time"], as_index=False).agg(count=("count", "sum"), _score=("_score", "sum"),
                                                                 _bear=("_bear", "sum"))
    safe = grouped["count"].where(grouped["count"] > 0)
    grouped["mean_score"] = (grouped["_score"] / safe).round(4)
    grouped["bearish_share"] = (grouped["_bear"] / safe).round(4)
    grouped["time_end"] = grouped["time"] + size
    if order:
        rank = {k: i for i, k in enumerate(order)}
        grouped = grouped.sort_values(["key", "time"], key=lambda s: s.map(rank) if s.name == "key" else s)
    return grouped[columns].reset_index(drop=True)


def volume(windows: pd.DataFrame) -> pd.DataFrame:
    """Messages per time bucket, split into news and comments (long format for stacked bars)."""
    windows = tiling(windows)
    if windows.empty:
        return pd.DataFrame(columns=["time", "time_end", "kind", "messages"])
    window_s = int(windows["window_s"].iloc[0])
    size = bucket_size(windows["window_end"].max() - windows["window_start"].min(), window_s)
    grouped = (windows.assign(time=windows["window_start"].dt.floor(size))
               .groupby("time", as_index=False)[["news_count", "comment_count"]].sum())
    grouped["time_end"] = grouped["time"] + size
    long = grouped.melt(id_vars=["time", "time_end"], var_name="kind", value_name="messages")
    long["kind"] = long["kind"].map({"news_count": "news", "comment_count": "comments"})
    return long.sort_values(["time", "kind"]).reset_index(drop=True)


# ---------------------------------------------------------------- drill-down

def key_series(trends: pd.DataFrame, key_type: str, key: str, window_s: int | None, span: pd.Timedelta | None,
               baseline_windows: int = 30, until: pd.Timestamp | None = None) -> pd.DataFrame:
    """One key's windows with a baseline band (mean ± 2 std of its previous final windows) for both signals.

    The band is computed over the whole kept history and then cut to the span, so the first windows shown still
    have a baseline.
    """
    window_s = resolve_window(trends, window_s)
    mask = (trends["key_type"] == key_type) & (trends["key"] == key) & (trends["window_s"] == window_s)
    series = trends[mask].sort_values("window_start").reset_index(drop=True)
    for metric in ("mean_score", "bearish_share"):
        history = series[metric].where(series["final"]).shift(1).rolling(baseline_windows, min_periods=3)
        base, spread = history.mean(), history.std().clip(lower=MIN_SPREAD)
        series[f"{metric}_baseline"] = base
        series[f"{metric}_low"] = base - 2 * spread
        series[f"{metric}_high"] = base + 2 * spread
    return windows_in_range(series, span, until).reset_index(drop=True)


def _alerts_of(alerts: pd.DataFrame, key_type: str, key: str) -> pd.DataFrame:
    return alerts[(alerts["key_type"] == key_type) & (alerts["key"] == key)] if not alerts.empty else alerts


def alert_episodes(alerts: pd.DataFrame, key_type: str, key: str, since: pd.Timestamp | None,
                   until: pd.Timestamp) -> pd.DataFrame:
    """This key's alert episodes that overlap ``since``..``until``, for shading on the drill-down charts.

    An episode runs from its first window's start to the end of the window that resolved it; one still firing
    runs to ``until`` (the newest window shown). ``severity`` is the highest it reached (``current_alerts``), so an
    escalation darkens the whole span. ``time``/``time_end`` are clipped to the shown range so the shading never
    stretches the axis; ``started``/``resolved_at`` keep the true times for the tooltip. An episode that began
    before the range but was still on inside it is shown: its start is not what matters, its overlap is.
    """
    columns = ["id", "time", "time_end", "started", "resolved_at", "status", "severity", "fired_as", "escalation",
               "deviation", "summary"]
    mine = _alerts_of(alerts, key_type, key)
    if mine.empty:
        return pd.DataFrame(columns=columns)
    episodes = current_alerts(mine)
    # A resolved event's window is the one that resolved it, so its end stands in for a missing resolved_at.
    resolved = episodes["resolved_at"].fillna(episodes["window_end"])
    ended = resolved.mask(episodes["firing"], until)
    out = episodes.assign(started=episodes["episode_start"], time=episodes["episode_start"], time_end=ended)
    if since is not None:
        out = out[out["time_end"] >= since]
        out = out.assign(time=out["time"].clip(lower=since))
    out = out[out["time"] <= until]
    return out[columns].sort_values("time").reset_index(drop=True)


def alert_markers(alerts: pd.DataFrame, key_type: str, key: str, since: pd.Timestamp | None,
                  until: pd.Timestamp) -> pd.DataFrame:
    """Where this key's alert episodes fired and escalated within ``since``..``until``, for rules on the
    drill-down charts (the resolve is where an episode's shaded span ends). ``event`` is fired or escalated, at the
    start of the window that caused it; ``severity`` is the one that event carried."""
    columns = ["id", "time", "event", "severity", "escalated_from", "deviation", "summary"]
    mine = _alerts_of(alerts, key_type, key)
    mine = mine[mine["status"] == "firing"] if not mine.empty else mine
    if mine.empty:
        return pd.DataFrame(columns=columns)
    marks = mine.assign(time=mine["window_start"], event=np.where(mine["escalated_from"] == "", "fired", "escalated"))
    marks = marks[marks["time"] <= until]
    if since is not None:
        marks = marks[marks["time"] >= since]
    return marks[columns].sort_values("time").reset_index(drop=True)


def _messages_about(snap: Snapshot, key_type: str, key: str) -> pd.DataFrame:
    """Every kept message about one key, once each, with scores and links. Scored messages are the first source; the
    windows' own most-negative lists fill in for messages that have already left the (row-capped) scored store."""
    columns = ["event_time", "kind", "sentiment_score", "text", "url", "id"]
    scored = snap.scored
    if not scored.empty:
        if key_type == "topic":
            about = scored[scored["topic"] == key]
        else:
            about = scored[[key in tickers for tickers in scored["tickers"]]]
        about = about[columns]
    else:
        about = pd.DataFrame(columns=columns)
    refs = snap.window_messages
    if not refs.empty:
        refs = refs[(refs["key_type"] == key_type) & (refs["key"] == key)]
        refs = refs.assign(event_time=refs["event_time"].fillna(refs["window_end"]))[columns]
    pool = pd.concat([f for f in (about, refs) if not f.empty], ignore_index=True) if not (about.empty and refs.empty) else about
    return pool.drop_duplicates("id", keep="first")


def key_messages(snap: Snapshot, key_type: str, key: str, since: pd.Timestamp | None, n: int = 5,
                 until: pd.Timestamp | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` most negative and most positive messages about one key in the range."""
    pool = _messages_about(snap, key_type, key)
    if since is not None and not pool.empty:
        pool = pool[pool["event_time"] >= since]
    if until is not None and not pool.empty:
        pool = pool[pool["event_time"] < until]
    negative = pool.nsmallest(n, "sentiment_score").reset_index(drop=True)
    positive = pool[pool["sentiment_score"] > 0].nlargest(n, "sentiment_score").reset_index(drop=True)
    return negative, positive


def messages_in_window(snap: Snapshot, key_type: str, key: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Every kept message about one key with a time in ``[start, end)`` (one window), most negative first."""
    pool = _messages_about(snap, key_type, key)
    if not pool.empty:
        pool = pool[(pool["event_time"] >= start) & (pool["event_time"] < end)]
    return pool.sort_values("sentiment_score", kind="stable").reset_index(drop=True)


def kind_split(series: pd.DataFrame) -> pd.DataFrame:
    """News versus comments over the shown windows: message counts and each kind's share."""
    news, comments = int(series["news_count"].sum()), int(series["comment_count"].sum())
    total = news + comments
    return pd.DataFrame({"kind": ["news", "comments"], "messages": [news, comments],
                         "share": [news / total if total else 0.0, comments / total if total else 0.0]})


# ---------------------------------------------------------------- alerts

def delivery_summary(deliveries: pd.DataFrame) -> pd.Series:
    """Per alert id: 'endpoint: status' for each endpoint of its newest event, e.g. 'pagerduty: failed (5 tries)'."""
    if deliveries.empty:
        return pd.Series(dtype=str)
    latest = deliveries.sort_values("updated_at", na_position="first").drop_duplicates(["alert_id", "endpoint"], keep="last")
    text = latest["endpoint"] + ": " + latest["status"] + np.where(
        latest["status"] == "failed", " (" + latest["attempts"].astype(str) + " tries)", "")
    return text.groupby(latest["alert_id"]).agg(", ".join)


def alert_table(alerts: pd.DataFrame, deliveries: pd.DataFrame, since: pd.Timestamp | None,
                keys: tuple[str, ...] = (), until: pd.Timestamp | None = None) -> pd.DataFrame:
    """Alert episodes (latest state) still firing or updated within the span, with their delivery status per
    endpoint. In a fixed range (``until``): the episodes that were on at some time in it (begun before its end,
    not resolved before its start)."""
    table = current_alerts(alerts)
    if table.empty:
        return table.assign(deliveries=pd.Series(dtype=str))
    table = table[listed_episodes(table, since, until)]
    if keys:
        table = table[table["key"].isin(keys)]
    # object first: with no deliveries at all the mapped column is float NaN, which a text fill would not suit.
    summary = table["id"].map(delivery_summary(deliveries)).astype(object).fillna("no delivery yet")
    return table.assign(deliveries=summary).reset_index(drop=True)


def listed_episodes(episodes: pd.DataFrame, since: pd.Timestamp | None, until: pd.Timestamp | None) -> pd.Series:
    """Which episodes (``current_alerts`` rows) a range lists. Following the data: those still firing (a firing
    episode's only event may be older than the range) or updated since ``since``. Fixed (``until``): those on at
    some time in it, begun before its end and not resolved before ``since``."""
    if until is not None:
        ended = episodes["resolved_at"].fillna(episodes["emitted_at"]).where(~episodes["firing"])
        return (episodes["episode_start"] < until) & (ended.isna() | (ended >= since))
    if since is None:
        return pd.Series(True, index=episodes.index)
    return episodes["firing"] | (episodes["emitted_at"] >= since)


def range_showing(snap: Snapshot, alert_id: str, ranges: dict[str, pd.Timedelta | None], current: str) -> str:
    """The time range whose Alerts view lists ``alert_id``: ``current`` when it does, else the shortest of ``ranges``
    that does; "" when the store does not hold the alert (not arrived yet, or aged out)."""
    table = current_alerts(snap.alerts)
    found = table[table["id"] == alert_id]
    if found.empty:
        return ""

    def lists_it(span: pd.Timedelta | None) -> bool:
        return bool(listed_episodes(found, span_start(snap, span), None).iloc[0])

    if current in ranges and lists_it(ranges[current]):
        return current
    by_length = sorted(ranges, key=lambda label: (ranges[label] is None, ranges[label] or pd.Timedelta(0)))
    return next(label for label in by_length if lists_it(ranges[label]))


def silences_in_force(silences: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """The silences not over yet (in force, or to come), ending first first, with a ``state`` column."""
    current = silences[silences["ends_at"] > now]
    return (current.assign(state=(current["starts_at"] > now).map({True: "to come", False: "in force"}))
            .sort_values(["ends_at", "id"]).reset_index(drop=True))


def alert_deliveries(deliveries: pd.DataFrame, alert_id: str) -> pd.DataFrame:
    columns = ["event_id", "endpoint", "status", "attempts", "last_error", "group", "updated_at"]
    if deliveries.empty:
        return pd.DataFrame(columns=columns)
    return deliveries.loc[deliveries["alert_id"] == alert_id, columns].sort_values(["event_id", "endpoint"]).reset_index(drop=True)


def alert_messages(alerts: pd.DataFrame, alert_id: str) -> pd.DataFrame:
    """The messages behind one alert episode (from its firing event, most negative first)."""
    columns = ["event_time", "kind", "sentiment_score", "text", "url", "id"]
    episode = alerts[alerts["id"] == alert_id].sort_values("emitted_at")
    refs = [m for msgs in episode["messages"] for m in (msgs or ())]
    if not refs:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame.from_records(refs).drop_duplicates("id")
    for name in columns:
        if name not in frame:
            frame[name] = None
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True, format="ISO8601", errors="coerce")
    frame["sentiment_score"] = pd.to_numeric(frame["sentiment_score"], errors="coerce")
    return frame[columns].sort_values("sentiment_score").reset_index(drop=True)


# ---------------------------------------------------------------- model

def model_versions(scored: pd.DataFrame, trends: pd.DataFrame) -> pd.DataFrame:
    """Which model versions scored the kept messages, newest first: the first row is the one scoring now."""
    if not scored.empty:
        source = scored[["model_version", "scored_at"]].rename(columns={"scored_at": "last_seen"})
    elif not trends.empty:
        source = trends[["model_version", "emitted_at"]].rename(columns={"emitted_at": "last_seen"})
    else:
        return pd.DataFrame(columns=["model_version", "last_seen", "messages"])
    return (source.groupby("model_version", as_index=False)
            .agg(last_seen=("last_seen", "max"), messages=("last_seen", "size"))
            .sort_values("last_seen", ascending=False).reset_index(drop=True))


def scoring_rate(scored: pd.DataFrame, over: pd.Timedelta = pd.Timedelta(minutes=1)) -> float:
    """Messages scored per second over the last ``over`` of the scored clock."""
    if scored.empty or scored["scored_at"].isna().all():
        return 0.0
    newest = scored["scored_at"].max()
    return float((scored["scored_at"] > newest - over).sum() / over.total_seconds())


def throughput(trends: pd.DataFrame, since: pd.Timestamp | None, until: pd.Timestamp | None = None) -> pd.DataFrame:
    """Messages per minute over time, from the closed topic windows (every message has exactly one topic)."""
    topics = trends[(trends["key_type"] == "topic") & trends["final"]] if not trends.empty else trends
    if topics.empty:
        return pd.DataFrame(columns=["time", "messages_per_min"])
    window_s = int(topics["window_s"].min())
    topics = topics[topics["window_s"] == window_s]
    if since is not None:
        topics = topics[topics["window_end"] >= since]
    if until is not None:
        topics = topics[topics["window_start"] < until]
    per_window = topics.groupby("window_start", as_index=False)["count"].sum()
    per_window["messages_per_min"] = per_window["count"] * 60.0 / window_s
    return per_window.rename(columns={"window_start": "time"})[["time", "messages_per_min"]]


# ---------------------------------------------------------------- display

def in_zone(frame: pd.DataFrame, tz: str) -> pd.DataFrame:
    """Every tz-aware time column converted to ``tz`` and made naive, so charts and tables show that zone's
    wall-clock time whatever the browser's own zone is."""
    converted = {}
    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            converted[name] = column.dt.tz_convert(tz).dt.tz_localize(None)
    return frame.assign(**converted) if converted else frame
