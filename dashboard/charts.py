"""Altair charts for the views, built from the frames ``shaping`` returns (already in the analyst's time zone).

Readable in light and dark themes: axis, label and title colours are left to Streamlit's theme; data colours are
mid-tone schemes that keep their contrast on both backgrounds (red-blue diverging for sentiment, with red as
negative; fixed severity colours for alert episodes). Text drawn on cells picks black or white from the cell value.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

SEVERITY_ORDER = ["critical", "warning", "info"]
SEVERITY_COLORS = alt.Scale(domain=SEVERITY_ORDER, range=["#d62728", "#ff7f0e", "#1f77b4"])
KIND_COLORS = alt.Scale(domain=["news", "comments"], range=["#4c78a8", "#f58518"])
_TIME_AXIS = alt.Axis(format="%H:%M", labelOverlap=True, title=None)
_SIGNAL = "#4c78a8"
PICKED_WINDOW = "window"    # the selection a click on a drill-down chart makes


def sentiment_heatmap(cells: pd.DataFrame, order: list[str]) -> alt.Chart:
    """Mean sentiment per key (rows, most unusual first) and time bucket (columns)."""
    return alt.Chart(cells).mark_rect().encode(
        x=alt.X("time:T", axis=_TIME_AXIS), x2="time_end:T",
        y=alt.Y("key:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
        color=alt.Color("mean_score:Q", title="mean sentiment",
                        scale=alt.Scale(scheme="redblue", domain=[-1, 1], domainMid=0)),
        tooltip=[alt.Tooltip("key:N"), alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"),
                 alt.Tooltip("mean_score:Q", format="+.2f", title="mean sentiment"),
                 alt.Tooltip("bearish_share:Q", format=".0%", title="bearish share"),
                 alt.Tooltip("count:Q", title="messages")],
    ).properties(height=alt.Step(24))


def volume_bars(volume: pd.DataFrame) -> alt.Chart:
    return alt.Chart(volume).mark_bar().encode(
        x=alt.X("time:T", axis=_TIME_AXIS), x2="time_end:T",
        y=alt.Y("messages:Q", title="messages", stack="zero"),
        color=alt.Color("kind:N", scale=KIND_COLORS, legend=alt.Legend(orient="top", title=None)),
        tooltip=[alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"), "kind:N", "messages:Q"],
    ).properties(height=160)


def signal_with_band(series: pd.DataFrame, metric: str, title: str, episodes: pd.DataFrame, markers: pd.DataFrame,
                     fmt: str, chosen: pd.DataFrame | None = None) -> alt.LayerChart:
    """One signal of one key over time, its baseline (dashed) and ±2σ band, each alert episode as a shaded span
    (coloured by the highest severity it reached, from its first window to the window that resolved it, or to now),
    a rule where it fired and where it escalated (coloured by the severity of that event; escalations dashed), and
    a frame around the ``chosen`` window (one row: ``window_start``, ``window_end``), whose messages the page lists.
    Where ``series`` has an ``at`` column, a click selects the nearest window (the ``PICKED_WINDOW`` selection)."""
    # Windows still open (the newest, and with hopping windows the last few) hold only the messages so far: a
    # 5-minute window seconds old swings with a handful of them. Hollow points on a dotted line, so that a
    # last point far from the others reads as unfinished, not as the move being over.
    closed = series["final"].astype(bool)
    series = series.assign(window_state=closed.map({True: "closed", False: "still open: its messages so far"}))
    positions = np.flatnonzero(closed.to_numpy())
    open_tail = series.iloc[positions[-1] if len(positions) else 0:]     # from the last closed window on
    window_start = alt.X("window_start:T", axis=_TIME_AXIS)
    base = alt.Chart(series).encode(x=window_start)
    band = base.mark_area(opacity=0.18, color="#888888").encode(
        y=alt.Y(f"{metric}_low:Q", title=title), y2=f"{metric}_high:Q")
    baseline = base.mark_line(strokeDash=[4, 3], color="#888888").encode(y=f"{metric}_baseline:Q")
    closed_line = base.transform_filter("datum.final").mark_line(color=_SIGNAL).encode(y=f"{metric}:Q")
    open_line = alt.Chart(open_tail).mark_line(color=_SIGNAL, strokeDash=[2, 2]).encode(x=window_start, y=f"{metric}:Q")
    points = base.mark_point(shape="circle", filled=True, size=30, stroke=_SIGNAL, strokeWidth=1.5).encode(
        y=f"{metric}:Q",
        fill=alt.condition("datum.final", alt.value(_SIGNAL), alt.value("white")),
        tooltip=[alt.Tooltip("window_start:T", format="%Y-%m-%d %H:%M", title="window"),
                 alt.Tooltip("window_state:N", title="state"),
                 alt.Tooltip(f"{metric}:Q", format=fmt, title=title),
                 alt.Tooltip(f"{metric}_baseline:Q", format=fmt, title="baseline"),
                 alt.Tooltip("count:Q", title="messages")])
    if "at" in series:
        # A click anywhere picks the window nearest in time (``at``: its start as the page's address writes it);
        # nearest along x only, so the height of the click does not matter. Hovering shows that window's figures.
        points = points.add_params(alt.selection_point(name=PICKED_WINDOW, fields=["at"], encodings=["x"],
                                                       on="click", nearest=True, empty=False))
    signal = [band, baseline, closed_line, open_line, points]
    # Unfilled, so the points and an episode's colour show through; on top, so it is never hidden.
    framed = [] if chosen is None else [alt.Chart(chosen).mark_rect(fill=None, stroke="#444444", strokeWidth=1.5).encode(
        x="window_start:T", x2="window_end:T",
        tooltip=[alt.Tooltip("window_start:T", format="%Y-%m-%d %H:%M:%S", title="messages listed: window")])]
    if episodes.empty:
        return alt.layer(*signal, *framed).properties(height=220)
    # Only the severities on this chart in the legend, under it, so a narrow chart keeps its width for the data.
    present = set(episodes["severity"]) | set(markers["severity"])
    colour = alt.Color("severity:N", scale=SEVERITY_COLORS, title="alert",
                       legend=alt.Legend(orient="bottom", values=[s for s in SEVERITY_ORDER if s in present]))
    span_tooltip = [alt.Tooltip("started:T", format="%Y-%m-%d %H:%M", title="fired"),
                    alt.Tooltip("resolved_at:T", format="%Y-%m-%d %H:%M", title="resolved"), "status:N",
                    alt.Tooltip("severity:N", title="highest severity"), alt.Tooltip("fired_as:N", title="fired as"),
                    alt.Tooltip("escalation:N", title="escalated"),
                    alt.Tooltip("deviation:Q", format=".1f", title="deviation (σ)"), "summary:N"]
    spans = alt.Chart(episodes).mark_rect(opacity=0.16).encode(x="time:T", x2="time_end:T", color=colour,
                                                                tooltip=span_tooltip)
    rules = alt.Chart(markers).mark_rule(strokeWidth=2).encode(
        x="time:T", color=colour,
        strokeDash=alt.StrokeDash("event:N", scale=alt.Scale(domain=["fired", "escalated"], range=[[1, 0], [5, 3]]),
                                  legend=None),
        tooltip=[alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"), "event:N", "severity:N",
                 alt.Tooltip("escalated_from:N", title="escalated from"),
                 alt.Tooltip("deviation:Q", format=".1f", title="deviation (σ)"), "summary:N"])
    return alt.layer(spans, *signal, rules, *framed).properties(height=220)


def kind_split_bar(split: pd.DataFrame) -> alt.Chart:
    return alt.Chart(split).mark_bar().encode(
        y=alt.Y("kind:N", title=None, sort=["news", "comments"]),
        x=alt.X("share:Q", title="share of messages", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("kind:N", scale=KIND_COLORS, legend=None),
        tooltip=["kind:N", "messages:Q", alt.Tooltip("share:Q", format=".0%")],
    ).properties(height=alt.Step(26))


def throughput_line(frame: pd.DataFrame) -> alt.Chart:
    return alt.Chart(frame).mark_line(color="#4c78a8").encode(
        x=alt.X("time:T", axis=_TIME_AXIS), y=alt.Y("messages_per_min:Q", title="messages / min"),
        tooltip=[alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"), alt.Tooltip("messages_per_min:Q", format=".0f")],
    ).properties(height=180)


def confusion_heatmap(matrix: pd.DataFrame) -> alt.LayerChart:
    """Rows: the true label; columns: the predicted one; colour: share of the true label's examples."""
    labels = list(dict.fromkeys(matrix["actual"]))
    base = alt.Chart(matrix).encode(
        x=alt.X("predicted:N", sort=labels, title="predicted", axis=alt.Axis(labelLimit=220, labelAngle=-40)),
        y=alt.Y("actual:N", sort=labels, title="actual", axis=alt.Axis(labelLimit=220)))
    cells = base.mark_rect().encode(
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="share of row"),
        tooltip=["actual:N", "predicted:N", "count:Q", alt.Tooltip("share:Q", format=".1%")])
    if len(labels) > 6:  # 400 numbers on the topic matrix are unreadable and slow to draw: the tooltip has them
        return alt.layer(cells).properties(height=alt.Step(18), width=alt.Step(18))
    text = base.mark_text(fontSize=11).encode(
        text=alt.Text("count:Q", format=".0f"),
        color=alt.condition(alt.datum.share > 0.5, alt.value("white"), alt.value("black")))
    return alt.layer(cells, text).properties(height=alt.Step(40), width=alt.Step(60))
