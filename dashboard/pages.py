"""Drawing the four views with Streamlit: Overview, Topic / ticker drill-down, Alerts, Model.

Each ``render_*`` takes the store snapshot, the feed status, the sidebar's ``Controls`` and the dashboard settings,
asks ``shaping`` for every number and ``charts`` for every chart, and only lays them out. Elements the browser
test looks for carry stable keys (``fp-unusual-<rank>``, ``fp-alert-<rank>``).

Views link to each other in the same tab (``view_link``): a ranked key opens its drill-down, an alert opens the
Alerts view on that alert, and the Alerts view opens the drill-down at the window that fired. The link's query
parameters (``?key_type=ticker&key=AAPL``, ``?alert=<id>``, ``?at=<a window's start>``) select once
(``follow_link``); the sidebar's choices survive the jump. Every choice that defines a view is kept in the page's
address (``keep_in_address``), so a reload or a link sent to a colleague shows the same view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from . import charts
from . import shaping as sh
from .ask import ask_button
from .live import FeedStatus
from .model_card import (ModelCard, confusion_matrices, find_model, head_reports, metric_table, per_class_table,
                         read_model_card)
from .settings import DashboardSettings
from .store import Snapshot

# Streamlit draws a page link on one line, cut with an ellipsis; a ranked key's line must wrap instead, or a laptop
# screen loses its numbers and its alert badge.
PAGE_STYLE = """<style>
[class*="st-key-fp-unusual-"] [data-testid="stPageLink-NavLink"] * { white-space: normal; overflow: visible; }
</style>"""
SEVERITY_BADGE = {"critical": ":red-badge[critical]", "warning": ":orange-badge[warning]", "info": ":blue-badge[info]"}
LINK = st.column_config.LinkColumn("link", display_text="open")
SCORE = st.column_config.NumberColumn("score", format="%+.2f")


@dataclass(frozen=True)
class Controls:
    filters: sh.ViewFilters
    tz: str
    range_label: str
    model_dir: str = ""
    models_dir: str = ""       # [models] models_dir: where the newest model is looked for
    # view name -> its st.Page, for links that stay in the app; empty when one view is drawn without navigation.
    pages: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def md(text: str) -> str:
    """Plain text made safe for st.markdown: '$AAPL' must not start LaTeX, '*' and '_' must not style."""
    for char in "\\`*_[]<>$#|~":
        text = text.replace(char, "\\" + char)
    return text


def fmt_time(ts: pd.Timestamp | None, tz: str, with_date: bool = False) -> str:
    if ts is None or pd.isna(ts):
        return "—"
    return ts.tz_convert(tz).strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def window_label(seconds: int | None) -> str:
    if not seconds:
        return "—"
    return f"{seconds // 3600} h" if seconds % 3600 == 0 else f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def view_link(c: Controls, view: str, label: str, params: dict[str, str], icon: str | None = None) -> None:
    """A link to another view that opens in this tab and keeps the sidebar's choices (``label`` is markdown).
    Without navigation (one view drawn alone) it is a plain link to the same address."""
    if view in c.pages:
        st.page_link(c.pages[view], label=label, query_params=params, icon=icon, width="stretch")
    else:
        st.markdown(f"[{label}]({view}?{urlencode(params)})")


_FOLLOWED = "fp_followed_links"
ADDRESS_TIME = "%Y-%m-%dT%H:%MZ"
ADDRESS_SECOND = "%Y-%m-%dT%H:%M:%SZ"


def follow_link(param: str, state_key: str, allowed, value_of=None) -> str:
    """Select what a link's ``?param=value`` names, once per visit of a view: the query string stays while the
    view reruns, and from then on the widget's own changes win. ``value_of`` turns the address's text into the
    widget's value (default: the text itself); ``allowed`` is what is offered, or a test of the text. Returns a
    note when the address names something not offered now (an aged-out key, a mistyped range), else ""."""
    wanted, followed = st.query_params.get(param), st.session_state.setdefault(_FOLLOWED, {})
    if wanted is None or followed.get(param) == wanted:
        return ""
    if not (allowed(wanted) if callable(allowed) else wanted in allowed):
        return f"{param}={wanted!r}"   # not followed: it may be offered once the data arrives
    st.session_state[state_key] = value_of(wanted) if value_of else wanted
    followed[param] = wanted
    return ""


def link_to_follow(param: str) -> str | None:
    """What the address names for ``param`` that no view has followed yet (None: nothing new)."""
    wanted = st.query_params.get(param)
    return None if wanted is None or st.session_state.get(_FOLLOWED, {}).get(param) == wanted else wanted


def follow_list(param: str, state_key: str, allowed) -> str:
    """``follow_link`` for a multi-valued choice (``?keys=XOM&keys=CVX``): the values offered now are selected,
    the others named in the returned note."""
    wanted, followed = tuple(st.query_params.get_all(param)), st.session_state.setdefault(_FOLLOWED, {})
    if not wanted or followed.get(param) == wanted:
        return ""
    followed[param] = wanted
    st.session_state[state_key] = [w for w in wanted if w in allowed]
    missing = [w for w in wanted if w not in allowed]
    return f"{param}={', '.join(missing)!r}" if missing else ""


def keep_in_address(param: str, value, default=None) -> None:
    """Write a choice into the page's address, defaults left out, so that a reload or a shared link shows the same
    view. What the address says is what the widget says, so it is marked followed: following it changes nothing."""
    multi = isinstance(value, (list, tuple))
    values = [str(v) for v in value] if multi else [] if value is None or value == default else [str(value)]
    if multi and list(value) == list(default or ()):
        values = []
    if st.query_params.get_all(param) != values:
        if values:
            st.query_params[param] = values if multi else values[0]
        else:
            del st.query_params[param]
    st.session_state.setdefault(_FOLLOWED, {})[param] = tuple(values) if multi else (values[0] if values else None)


def address_time(text: str) -> pd.Timestamp | None:
    """A time as the address writes it (``2026-12-03T09:30Z``; any ISO-8601 time, UTC when it names no zone)."""
    try:
        when = pd.Timestamp(text)
    except (ValueError, TypeError):
        return None
    if pd.isna(when):
        return None
    return when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")


def address_stamp(when: pd.Timestamp) -> str:
    """``when`` as the address writes it: UTC, to the minute, or to the second where it has seconds."""
    when = when.tz_convert("UTC")
    return when.strftime(ADDRESS_TIME if when.second == 0 else ADDRESS_SECOND)


def forget_links() -> None:
    """A new visit of a view (a link or the menu) follows its link again."""
    st.session_state.pop(_FOLLOWED, None)


def csv_download(frame: pd.DataFrame, tz: str, name: str, key: str) -> None:
    """The displayed data, times in the chosen zone; the CSV is only built when the button is clicked."""
    shown = sh.in_zone(frame.drop(columns=[c for c in ("messages",) if c in frame.columns]), tz)
    st.download_button("Download CSV", data=lambda: shown.to_csv(index=False), file_name=f"finpulse-{name}.csv",
                       mime="text/csv", key=key, on_click="ignore", icon=":material/download:")


def feed_banner(status: FeedStatus, snap: Snapshot) -> bool:
    """Say plainly what is wrong with the feed, if anything; True when there is data to draw. Nothing is drawn
    before the feed has read its history (``FeedStatus.loaded``): only how far it has got."""
    if status.state == "unreachable":
        st.warning(status.message, icon=":material/cloud_off:")
    elif status.state in ("waiting", "connecting") and snap.empty:
        st.info(status.message, icon=":material/hourglass_empty:")
    if not status.loaded:
        if status.reachable and status.history_read and status.history_read[1]:
            history_progress(status)
        return False
    if snap.empty and status.reachable:
        st.info(f"Connected to {status.bootstrap_servers}, but FinPulse's output topics are empty so far: "
                "waiting for the worker to publish windows. This page refreshes by itself.",
                icon=":material/hourglass_empty:")
    return not snap.empty


def history_progress(status: FeedStatus) -> None:
    read, total = status.history_read
    left = ""
    if status.read_rate_per_s > 0:
        left = f", about {sh.duration((total - read) / status.read_rate_per_s)} left"
    st.progress(read / total, text=f"Reading what FinPulse published before this dashboard started: {read:,} of "
                f"{total:,} records{left}. The views appear once it is all read, so that nothing is ranked or "
                "charted from part of it.")


def freshness_strip(snap: Snapshot, status: FeedStatus, cfg: DashboardSettings, tz: str) -> None:
    """One line on every view: is this live, how old is it, and which model scored it."""
    updated = sh.last_update(snap)
    fresh = sh.freshness(updated, pd.Timestamp.now(tz="UTC"), cfg.stale_after_s, status.worker_lag)
    if fresh is None:
        return
    versions = sh.model_versions(snap.scored, snap.trends)
    model = ""
    if not versions.empty and versions["model_version"].iloc[0]:
        model = f" · scored by `{versions['model_version'].iloc[0]}`"
        if len(versions) > 1:
            model += f" (earlier data: {', '.join(f'`{v}`' for v in versions['model_version'].iloc[1:4])})"
    as_of = fmt_time(updated, tz, with_date=True)
    with st.container(key="fp-freshness"):
        if not status.reachable:
            st.caption(f":orange[●] Not updating while Kafka is unreachable: data as of {as_of} "
                       f"({sh.duration(fresh.age_s)} ago){model}")
        elif fresh.stale:
            st.warning(f"{fresh.text} Last update: {as_of}.", icon=":material/schedule:")
            if model:
                st.caption(model.removeprefix(" · "))
        else:
            st.caption(f":green[●] {fresh.text} ({as_of}){model}")


# ---------------------------------------------------------------- Overview

def unusual_line(rank: int, row: pd.Series) -> str:
    """A ranked key, with both measures it is ranked by next to their usual values: either can be what moved."""
    unusual = "not enough history" if pd.isna(row["unusual"]) else f"{row['unusual']:+.1f}σ"
    usual_bearish = "" if pd.isna(row["baseline_bearish_share"]) else f" (usual {row['baseline_bearish_share']:.0%})"
    usual_score = "" if pd.isna(row["baseline_mean_score"]) else f" (usual {row['baseline_mean_score']:+.2f})"
    alert = f" · {SEVERITY_BADGE.get(row['severity'], row['severity'])} alert firing" if row["firing"] else ""
    return (f"**{rank}. {md(str(row['key']))}** — {unusual} · bearish {row['bearish_share']:.0%}{usual_bearish} · "
            f"sentiment {row['mean_score']:+.2f}{usual_score} · {int(row['count'])} msgs{alert}")


def alert_line(row: pd.Series, tz: str) -> str:
    """One episode: its highest severity, its state, and how it escalated if it did."""
    badge = SEVERITY_BADGE.get(row["severity"], md(str(row["severity"])))
    state = (f"firing since {fmt_time(row['episode_start'], tz)}" if row["firing"]
             else f"resolved {fmt_time(row['resolved_at'] if pd.notna(row['resolved_at']) else row['emitted_at'], tz)}")
    escalated = f" · escalated from {row['fired_as']}" if row["escalation"] else ""
    return (f"{badge} **{md(str(row['key']))}** ({row['key_type']}) — {state}{escalated} · {row['deviation']:.1f}σ  \n"
            f"{md(str(row['summary']))}")


def render_overview(snap: Snapshot, status: FeedStatus, c: Controls, cfg: DashboardSettings) -> None:
    f = c.filters
    windows = sh.key_windows(snap.trends, f)
    if windows.empty:
        st.info(f"No {f.key_type} windows in {c.range_label.lower()} yet.")
        return
    ranking = sh.unusual_now(snap.trends, snap.alerts, f)
    alerts_now = sh.alert_table(snap.alerts, snap.deliveries, sh.range_start(snap, f), f.keys, f.until)
    firing = alerts_now[alerts_now["firing"]] if not alerts_now.empty else alerts_now
    order = ranking["key"].tolist()

    cols = st.columns(4)
    cols[0].metric("Latest data", fmt_time(sh.newest_time(snap), c.tz))
    cols[1].metric("Firing alerts", len(firing))
    cols[2].metric(f"{f.key_type.capitalize()}s tracked", len(order))
    latest_start = windows["window_start"].max()
    cols[3].metric("Messages in newest window", int(windows.loc[windows["window_start"] == latest_start, "count"].sum()))

    left, right = st.columns([3, 2], gap="large")
    with left:
        st.subheader(f"Most unusual {f.key_type}s " + ("now" if f.until is None else
                                                         f"at {fmt_time(f.until, c.tz, with_date=True)}"))
        st.caption(f"Newest {window_label(sh.resolve_window(snap.trends, f.window_s))} window against each {f.key_type}'s own last "
                   f"{f.baseline_windows} windows, in standard deviations toward negative. Click one for its "
                   "charts and messages.")
        for rank, (_, row) in enumerate(ranking.head(10).iterrows(), start=1):
            with st.container(key=f"fp-unusual-{rank}"):
                view_link(c, "drilldown", unusual_line(rank, row), {"key_type": f.key_type, "key": str(row["key"])})
    with right:
        st.subheader("Alerts")
        if alerts_now.empty:
            st.caption(f"No alerts in {c.range_label.lower()}: none fired, and none is firing.")
        for rank, (_, row) in enumerate(alerts_now.head(8).iterrows(), start=1):
            with st.container(key=f"fp-alert-{rank}", border=True):
                st.markdown(alert_line(row, c.tz))
                view_link(c, "alerts", "Messages behind this alert", {"alert": str(row["id"])},
                          icon=":material/article:")

    st.subheader(f"Mean sentiment per {f.key_type}")
    st.altair_chart(charts.sentiment_heatmap(sh.in_zone(sh.heatmap(windows, order), c.tz), order), width="stretch")
    st.subheader("Volume")
    st.altair_chart(charts.volume_bars(sh.in_zone(sh.volume(windows), c.tz)), width="stretch", height=180)
    csv_download(windows, c.tz, f"{f.key_type}-windows", "fp-csv-overview")


# ---------------------------------------------------------------- Drill-down

def message_table(frame: pd.DataFrame, c: Controls, key: str) -> None:
    """The message text right after its time and score, full width: on a laptop screen the text is what must show.
    Under it, a button that asks the model why it read them so (the Ask view, when it is on)."""
    st.dataframe(sh.in_zone(frame, c.tz), key=key, hide_index=True, width="stretch",
                 column_order=["event_time", "sentiment_score", "text", "kind", "url"],
                 column_config={"event_time": st.column_config.DatetimeColumn("time", format="YYYY-MM-DD HH:mm:ss"),
                                "sentiment_score": SCORE, "url": LINK, "text": st.column_config.TextColumn("message", width="large")})
    ask_button(c.pages.get("ask"), frame["text"], f"{key}-ask")


def render_drilldown(snap: Snapshot, status: FeedStatus, c: Controls, cfg: DashboardSettings) -> None:
    f = c.filters
    keys = sh.keys_of(snap.trends, f.key_type)
    if not keys:
        st.info(f"No {f.key_type} windows yet.")
        return
    follow_link("key", "fp_drill_key", keys)
    if st.session_state.get("fp_drill_key") not in keys:
        ranking = sh.unusual_now(snap.trends, snap.alerts, f)
        st.session_state["fp_drill_key"] = ranking["key"].iloc[0] if not ranking.empty else keys[0]
    key_column, window_column = st.columns([2, 3])
    key = key_column.selectbox(f.key_type.capitalize(), keys, key="fp_drill_key")
    keep_in_address("key", key)
    series = sh.key_series(snap.trends, f.key_type, key, f.window_s, f.span, f.baseline_windows, f.until)
    if series.empty:
        st.info(f"No {window_label(sh.resolve_window(snap.trends, f.window_s))} windows for {key} in {c.range_label.lower()}.")
        return
    at = [address_stamp(start) for start in series["window_start"]]     # each window as the address names it
    with window_column:
        window = choose_window(series, at, c.tz)
    since = series["window_start"].min()
    until = series["window_end"].max()
    episodes = sh.in_zone(sh.alert_episodes(snap.alerts, f.key_type, key, since, until), c.tz)
    markers = sh.in_zone(sh.alert_markers(snap.alerts, f.key_type, key, since, until), c.tz)
    shown = sh.in_zone(series, c.tz).assign(at=at)
    chosen = sh.in_zone(pd.DataFrame([window]), c.tz) if window is not None else None
    left, right = st.columns(2)
    for column, metric, title, fmt in ((left, "mean_score", "Mean sentiment", "+.2f"),
                                       (right, "bearish_share", "Bearish share", ".0%")):
        # A new key after each pick starts the chart with no selection, so that clicking the same window again
        # (after choosing another in the box) is a change the chart reports.
        chart_key = f"fp-drill-{metric}-{st.session_state.get(_PICKS, 0)}"
        with column:
            st.subheader(title)
            st.altair_chart(charts.signal_with_band(shown, metric, title.lower(), episodes, markers, fmt, chosen),
                            width="stretch", height=280, key=chart_key, on_select=pick_clicked_window(chart_key),
                            selection_mode=charts.PICKED_WINDOW)
    st.caption("Hollow points on a dotted line: windows still open (their messages so far). "
               "Dashed: the baseline (mean of the previous final windows); grey band: ±2 standard deviations; "
               "shaded spans: alert episodes, from the window that fired to the one that resolved (or now), in the "
               "colour of the highest severity each reached; rules where each fired (solid) and escalated (dashed)"
               + ("; framed: the window whose messages are listed below." if window is not None else ".")
               + " Click a window to list its messages.")
    split = sh.kind_split(series)
    st.subheader("News and comments")
    st.altair_chart(charts.kind_split_bar(split), width="stretch")
    st.caption(" · ".join(f"{r.kind}: {r.messages} ({r.share:.0%})" for r in split.itertuples()))
    if window is None:
        negative, positive = sh.key_messages(snap, f.key_type, key, since, until=f.until)
        st.subheader("Most negative messages")
        message_table(negative, c, "fp-negative")
        st.subheader("Most positive messages")
        message_table(positive, c, "fp-positive")
    else:
        show_window_messages(snap, f.key_type, key, window, c, cfg)
    csv_download(series, c.tz, f"{f.key_type}-{key}", "fp-csv-drilldown")


_PICKS = "fp_drill_picks"     # windows picked on a chart so far


def pick_clicked_window(chart_key: str) -> Callable[[], None]:
    """A chart's click handler: the window clicked becomes the one whose messages are listed. It runs before the
    next run draws the "Messages of" box, so it may set the box's value; an empty selection changes nothing."""
    def picked() -> None:
        points = st.session_state[chart_key].selection.get(charts.PICKED_WINDOW) or []
        stamps = [point["at"] for point in points if point.get("at")]
        if stamps:
            st.session_state["fp_drill_at"] = stamps[0]
            st.session_state[_PICKS] = st.session_state.get(_PICKS, 0) + 1
    return picked


def window_option(window: dict | None, tz: str, with_date: bool) -> str:
    if window is None:
        return "the whole range: its most negative and most positive"
    still_open = "" if window["final"] else " · still open"
    return (f"{fmt_time(window['window_start'], tz, with_date)}–{fmt_time(window['window_end'], tz)} · "
            f"{int(window['count'])} messages · mean {window['mean_score']:+.2f} · bearish "
            f"{window['bearish_share']:.0%}{still_open}")


def choose_window(series: pd.DataFrame, at: list[str], tz: str) -> dict | None:
    """The window whose messages the drill-down lists, newest first (``?at=<its start>`` in the address: an alert
    links to the window that fired), or None for the whole range's most negative and most positive. ``at``: each
    window of ``series`` as the address names it."""
    windows = dict(zip(at, series.to_dict("records")))
    note = follow_link("at", "fp_drill_at", lambda text: (when := address_time(text)) is not None
                       and address_stamp(when) in windows, lambda text: address_stamp(address_time(text)))
    if st.session_state.get("fp_drill_at") not in windows:
        st.session_state["fp_drill_at"] = ""
    with_date = series["window_start"].min().tz_convert(tz).date() != series["window_end"].max().tz_convert(tz).date()
    chosen = st.selectbox("Messages of", ["", *reversed(windows)], key="fp_drill_at",
                          format_func=lambda stamp: window_option(windows.get(stamp), tz, with_date))
    if note and not chosen:   # kept in the address: the window may come into the range with the data or the range
        st.caption(f":material/link_off: The address asked for the window {note}: not in the range shown.")
    else:
        keep_in_address("at", chosen, default="")
    return windows.get(chosen)


def show_window_messages(snap: Snapshot, key_type: str, key: str, window: dict, c: Controls,
                         cfg: DashboardSettings) -> None:
    """Every kept message of one window, most negative first: the messages behind a move."""
    start, end, count = window["window_start"], window["window_end"], int(window["count"])
    messages = sh.messages_in_window(snap, key_type, key, start, end)
    st.subheader(f"Messages of {fmt_time(start, c.tz)}–{fmt_time(end, c.tz)}")
    caption = (f"{len(messages)} message(s) with a time in this window, most negative first (the window's figures "
               f"count {count}).")
    if len(messages) < count:
        # Not all of them are kept: say why, so that a short list is not read as the window's whole story.
        caption += (f" The dashboard keeps the newest {cfg.max_scored_rows:,} scored messages (`[dashboard] "
                    "max_scored_rows`); of older windows, the few most negative each window recorded.")
    st.caption(caption)
    message_table(messages, c, "fp-window-messages")


# ---------------------------------------------------------------- Alerts

def show_silences(snap: Snapshot, tz: str) -> None:
    """The silences risk teams set (`finpulse silence`): alerts they match still show here, unnotified."""
    silences = sh.silences_in_force(snap.silences, pd.Timestamp.now(tz="UTC"))
    if silences.empty:
        return
    in_force = int((silences["state"] == "in force").sum())
    with st.expander(f":material/notifications_off: {in_force} silence(s) in force, {len(silences) - in_force} to come: "
                     "the alerts they match are shown here but not notified", expanded=in_force > 0):
        st.dataframe(sh.in_zone(silences, tz), key="fp-silences", hide_index=True,
                     column_order=["state", "matchers", "starts_at", "ends_at", "created_by", "comment", "id"],
                     column_config={"starts_at": st.column_config.DatetimeColumn("from", format="YYYY-MM-DD HH:mm"),
                                    "ends_at": st.column_config.DatetimeColumn("until", format="YYYY-MM-DD HH:mm"),
                                    "created_by": "by", "comment": "why"})


def render_alerts(snap: Snapshot, status: FeedStatus, c: Controls, cfg: DashboardSettings) -> None:
    show_silences(snap, c.tz)
    since = sh.range_start(snap, c.filters)
    table = sh.alert_table(snap.alerts, snap.deliveries, since, c.filters.keys, c.filters.until)
    if table.empty:
        st.info(f"No alerts in {c.range_label.lower()}.")
        return
    cols = st.columns(3)
    cols[0].metric("Firing", int(table["firing"].sum()))
    cols[1].metric("Resolved", int((~table["firing"]).sum()))
    failed = int((snap.deliveries["status"] == "failed").sum()) if not snap.deliveries.empty else 0
    cols[2].metric("Failed deliveries", failed)
    # Shares as whole percents, like everywhere else on the page ("63%", not "62.86%").
    shown = sh.in_zone(table, c.tz).assign(observed_bearish_share=table["observed_bearish_share"] * 100,
                                           baseline_bearish_share=table["baseline_bearish_share"] * 100)
    # Streamlit draws a missing time as a grey "None" and has no setting for it: the header's tooltip says what it means.
    resolved = st.column_config.DatetimeColumn("resolved", format="YYYY-MM-DD HH:mm:ss",
                                               help="when the episode resolved; None while it still fires")
    st.dataframe(shown, key="fp-alert-table", hide_index=True,
                 column_order=["status", "severity", "escalation", "key_type", "key", "topic", "episode_start", "resolved_at", "deviation",
                               "observed_bearish_share", "baseline_bearish_share", "deliveries", "summary"],
                 column_config={"episode_start": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm:ss"),
                                "resolved_at": resolved,
                                "deviation": st.column_config.NumberColumn("deviation", format="%.1f σ"),
                                "escalation": st.column_config.TextColumn("escalated"),
                                "observed_bearish_share": st.column_config.NumberColumn("bearish", format="%.0f%%"),
                                "baseline_bearish_share": st.column_config.NumberColumn("usual", format="%.0f%%"),
                                "key_type": "type", "topic": "about"})
    csv_download(table, c.tz, "alerts", "fp-csv-alerts")

    labels = {row.id: f"{row.severity} · {row.key} · {row.status}" for row in table.itertuples()}
    follow_link("alert", "fp_alert", labels)
    chosen = st.selectbox("Alert", list(labels), format_func=labels.get, key="fp_alert")
    keep_in_address("alert", chosen)
    row = table[table["id"] == chosen].iloc[0]
    st.markdown(alert_line(row, c.tz))
    view_link(c, "drilldown", f"Open {md(str(row['key']))} in the drill-down, at the window that fired",
              {"key_type": str(row["key_type"]), "key": str(row["key"]), "window": str(int(row["window_s"])),
               **({"at": address_stamp(row["episode_start"])} if pd.notna(row["episode_start"]) else {})},
              icon=":material/troubleshoot:")
    cols = st.columns(3)
    cols[0].metric("Bearish share", f"{row['observed_bearish_share']:.0%}",
                   f"{(row['observed_bearish_share'] - row['baseline_bearish_share']) * 100:+.0f} pts vs usual", delta_color="inverse")
    cols[1].metric("Mean sentiment", f"{row['observed_mean_score']:+.2f}",
                   f"{row['observed_mean_score'] - row['baseline_mean_score']:+.2f} vs usual")
    cols[2].metric("Messages in window", int(row["observed_count"]) if pd.notna(row["observed_count"]) else "—")
    # What the analyst came for first; the delivery state (for the risk team) after it.
    st.subheader("Messages behind this alert")
    messages = sh.alert_messages(snap.alerts, chosen)
    if messages.empty:
        st.caption("The alert carries no messages.")
    else:
        # An alert carries a handful of its windows' messages, not all of them ("Messages in window" above): say so.
        st.caption(f"{len(messages)} message(s): the most negative of each window that fired or escalated this alert, "
                   "as its alert events carry them (up to `[detect] top_messages` each).")
        message_table(messages, c, "fp-alert-messages")
    st.subheader("Delivery per endpoint")
    deliveries = sh.alert_deliveries(snap.deliveries, chosen)
    if deliveries.empty:
        st.caption("No delivery recorded for this alert yet.")
    else:
        st.dataframe(sh.in_zone(deliveries, c.tz), key="fp-deliveries", hide_index=True,
                     column_config={"event_id": "event", "attempts": "tries", "last_error": "last error",
                                    "updated_at": st.column_config.DatetimeColumn("updated", format="YYYY-MM-DD HH:mm:ss")})


# ---------------------------------------------------------------- Model

@st.cache_data(ttl=30, show_spinner=False)
def cached_model_card(model_dir: str, models_dir: str = "") -> ModelCard | None:
    path = find_model(model_dir, models_dir)
    return read_model_card(path) if path is not None else None


def render_model(snap: Snapshot, status: FeedStatus, c: Controls, cfg: DashboardSettings) -> None:
    versions = sh.model_versions(snap.scored, snap.trends)
    scoring_now = versions["model_version"].iloc[0] if not versions.empty else "—"
    # A line of its own, not a metric: a metric's large figure cuts a version name short.
    st.markdown(f"**Model scoring now:** `{scoring_now.replace('`', '')}`")
    cols = st.columns(3)
    cols[0].metric("Scored per second (last minute)", f"{sh.scoring_rate(snap.scored):.1f}")
    cols[1].metric("Dead-lettered inputs", "—" if status.deadletter_count is None else status.deadletter_count)
    worker_lag = None if status.worker_lag is None else sum(status.worker_lag.values())
    cols[2].metric("Worker lag (input records)", "—" if worker_lag is None else worker_lag,
                   help="Input records the worker's consumer group has not committed yet.")
    cols = st.columns(3)
    cols[0].metric("Dashboard lag (records)", sum(status.dashboard_lag.values()) if status.dashboard_lag else 0)
    cols[1].metric("Dashboard reads per second", f"{status.read_rate_per_s:.0f}")

    rate = sh.throughput(snap.trends, sh.range_start(snap, c.filters), c.filters.until)
    if not rate.empty:
        st.subheader("Throughput")
        st.altair_chart(charts.throughput_line(sh.in_zone(rate, c.tz)), width="stretch", height=220)

    render_evaluation(c, None if versions.empty else scoring_now)
    if not versions.empty:
        st.subheader("Model versions in the kept messages")
        st.table(sh.in_zone(versions, c.tz).set_index("model_version"))


def render_evaluation(c: Controls, scoring_now: str | None = None) -> None:
    """The model's own account of itself (its card and held-out figures): it needs no stream data, so the Model
    view shows it before there is any (``scoring_now`` is then unknown)."""
    st.subheader("Evaluation")
    card = cached_model_card(c.model_dir, c.models_dir)
    if card is None:
        st.info("No trained model directory was found (run `finpulse train`)" +
                (f"; the stream is scored by {scoring_now}." if scoring_now else "."))
    else:
        st.caption(f"Model card from `{card.path}`" + ("" if card.version == scoring_now or not scoring_now else
                   f" (version {card.version}; the messages shown were scored by {scoring_now})"))
        if "ask" in c.pages:
            st.page_link(c.pages["ask"], label="Ask this model about a headline", icon=":material/psychology:")
        if card.problem:
            st.warning(card.problem)
        if card.metrics.get("refit_of"):
            st.caption(f"Held-out figures of {md(str(card.metrics['refit_of']))}: this model is its refit on every "
                       "labeled row, so no row was left to measure it on (its model card says more).")
        reports = head_reports(card.metrics)
        if reports:
            # Small tables as static HTML: a data grid per two-row table would slow the page down for nothing.
            st.table(metric_table(reports).set_index("head").style.format(precision=3))
            per_class = per_class_table(reports)
            if not per_class.empty:     # a metrics.json without per_class figures still shows the rest
                with st.expander("Per-class precision, recall and F1"):
                    st.table(per_class.set_index(["head", "class"]).style.format(precision=3))
        matrices = confusion_matrices(reports)
        for head, matrix in sorted(matrices.items(), key=lambda item: len(item[1])):
            st.markdown(f"**Confusion matrix: {md(head)}** (rows: true label, columns: predicted)")
            st.altair_chart(charts.confusion_heatmap(matrix), width="content")
        if card.readme:
            with st.expander("Model card (README.md)"):
                st.markdown(card.readme)


VIEWS: dict[str, tuple[str, str, Callable[[Snapshot, FeedStatus, Controls, DashboardSettings], None]]] = {
    "overview": ("Overview", ":material/monitoring:", render_overview),
    "drilldown": ("Topic / ticker", ":material/troubleshoot:", render_drilldown),
    "alerts": ("Alerts", ":material/notifications_active:", render_alerts),
    "model": ("Model", ":material/model_training:", render_model),
}
# What a view can show before the stream has given it any data (it says why there is none above it).
WITHOUT_DATA: dict[str, Callable[[Controls], None]] = {"model": render_evaluation}
