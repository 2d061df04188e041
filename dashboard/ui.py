"""The dashboard page: settings, sign-in, the shared live feed, the sidebar controls and navigation between views.

``run()`` is what ``dashboard/app.py`` (the ``streamlit run`` entry) calls. One ``LiveFeed`` per process and
configuration is shared by every browser session through ``st.cache_resource``; each view redraws itself from
the feed's store every ``refresh_s`` seconds inside ``st.fragment(run_every=…)``, so the page never reloads and
the sidebar keeps its state. A view that fails says so in one plain line and tries again on the next refresh.
The Ask view (``ask.py``) is the one page that is not live: it redraws when the analyst asks.
"""
from __future__ import annotations

import json
import logging
import zoneinfo
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Protocol

import pandas as pd
import streamlit as st

from models.interface import SCORERS_WITHOUT_A_MODEL
from models.settings import models_root
from stream.aggregate import AggregateSettings
from stream.config import ConfigError, KafkaSettings, Settings, load_settings

from . import shaping as sh
from .ask import render_ask
from .auth import require_sign_in
from .live import FeedStatus, LiveFeed
from .pages import (ADDRESS_TIME, PAGE_STYLE, VIEWS, WITHOUT_DATA, Controls, address_time, feed_banner, follow_link,
                    follow_list, forget_links, freshness_strip, keep_in_address, link_to_follow, window_label)
from .settings import DashboardSettings, dashboard_settings
from .store import LiveStore, Snapshot

log = logging.getLogger(__name__)
KEY_TYPES = {"topic": "Topics", "ticker": "Tickers"}
# The time range in the page's address: short codes, so that links stay readable.
FIXED_RANGE = "Fixed range"
RANGE_CODES = {"15m": "Last 15 minutes", "1h": "Last hour", "6h": "Last 6 hours", "24h": "Last 24 hours",
               "all": "Everything kept", "fixed": FIXED_RANGE}
CODE_OF_RANGE = {label: code for code, label in RANGE_CODES.items()}
DEFAULT_RANGE = "Last hour"
_CHOICES = "fp_sidebar_choices"
_WIDENED = "fp_range_widened"
_DEFAULT_WINDOW = "fp_default_window"   # the window size picked for the analyst, not by them
_FIXED_TZ = "fp_fixed_tz"     # the zone the From/To widgets' wall-clock values are in


class Feed(Protocol):
    store: LiveStore
    status: FeedStatus


_NOTHING = Snapshot.nothing()


def shown_snapshot(feed: Feed) -> Snapshot:
    """What the sidebar and the views draw from: nothing until the feed has read its history (a link's keys and
    window wait for it rather than being dropped as "not available"), then the store's newest snapshot."""
    return feed.store.snapshot() if feed.status.loaded else _NOTHING


def _release(feed: LiveFeed) -> None:
    feed.stop()


@st.cache_resource(show_spinner=False, on_release=_release)
def shared_feed(kafka_json: str, dashboard_json: str, worker_group: str, open_lookback_s: float) -> LiveFeed:
    """One background consumer per process and configuration (the arguments are the cache key)."""
    kafka = KafkaSettings(**json.loads(kafka_json))
    return LiveFeed(kafka, DashboardSettings(**json.loads(dashboard_json)), worker_group, open_lookback_s).start()


def feed_for(settings: Settings, cfg: DashboardSettings, open_lookback_s: float) -> LiveFeed:
    return shared_feed(json.dumps(asdict(settings.kafka), sort_keys=True), json.dumps(asdict(cfg), sort_keys=True),
                       settings.worker.app_id, open_lookback_s)


def _timezones(cfg: DashboardSettings) -> tuple[list[str], str]:
    zones = sorted(zoneinfo.available_timezones() | {"UTC"})
    browser = getattr(st.context, "timezone", None)
    for default in (cfg.timezone, browser, "UTC"):
        if default in zones:
            return zones, default
    return zones, "UTC"


def _choices(snap, key_type: str) -> tuple:
    """What the sidebar offers; when the data changes it, the whole page reruns to offer the new choices."""
    return tuple(sh.window_sizes(snap.trends)), tuple(sh.keys_of(snap.trends, key_type))


def sidebar(feed: Feed, cfg: DashboardSettings, model_dir: str, models_dir: str = "",
            pages: dict | None = None) -> Controls:
    """The controls every view shares. Each is kept in the page's address (``?range=6h&key_type=ticker&keys=XOM&
    tz=Europe/London``, defaults left out), and an address that names them selects them: a reload or a shared link
    shows the same view. A value the address names that is not offered (a mistyped range, a ticker aged out) is
    left out, and the sidebar says so."""
    snap = shown_snapshot(feed)
    sizes = sh.window_sizes(snap.trends)
    zones, default_zone = _timezones(cfg)
    notes = [follow_link("range", "fp_range", RANGE_CODES, RANGE_CODES.get),
             follow_link("key_type", "fp_key_type", KEY_TYPES),
             follow_link("tz", "fp_tz", set(zones))]
    st.session_state.setdefault("fp_tz", default_zone)
    _keep_fixed_range_in_zone(st.session_state["fp_tz"])
    notes += [follow_link(param, f"fp_fixed_{param}", lambda text: address_time(text) is not None,
                          lambda text: wall_clock(address_time(text), st.session_state["fp_tz"]))
              for param in ("from", "to")]
    if sizes:  # before the first windows arrive, a window in the address waits for them
        notes.append(follow_link("window", "fp_window", {str(size) for size in sizes}, int))
    # Defaults through the state, not the widgets' index: a widget given both warns on the page.
    st.session_state.setdefault("fp_range", DEFAULT_RANGE)
    widen_to = _range_for_linked_alert(snap)
    if widen_to:   # once: the link is followed in this run, and the analyst can narrow the range again
        st.session_state[_WIDENED] = (widen_to, f"Time range widened from {st.session_state['fp_range'].lower()} to "
                                                f"{widen_to.lower()} to show the alert the link names.")
        st.session_state["fp_range"] = widen_to
    with st.sidebar:
        st.title("FinPulse")
        range_label = st.selectbox("Time range", [*sh.TIME_RANGES, FIXED_RANGE], key="fp_range")
        fixed = _fixed_range_inputs(snap) if range_label == FIXED_RANGE else None
        chosen = st.session_state.get("fp_window")
        if sizes and (chosen not in sizes or (chosen == st.session_state.get(_DEFAULT_WINDOW) != sizes[0]
                                              and "window" not in st.query_params)):
            # The first windows arrived, the chosen size aged out, or a smaller size than the default picked so
            # far arrived (the running figures of longer windows can come first): the smallest, till one is chosen.
            st.session_state["fp_window"] = st.session_state[_DEFAULT_WINDOW] = sizes[0]
        window_s = st.selectbox("Window", sizes, format_func=window_label, key="fp_window",
                                disabled=not sizes, placeholder="no windows yet")
        key_type = st.radio("Show", list(KEY_TYPES), format_func=KEY_TYPES.get, key="fp_key_type", horizontal=True)
        options = sh.keys_of(snap.trends, key_type)
        keys_state = f"fp_keys_{key_type}"
        if options:
            notes.append(follow_list("keys", keys_state, set(options)))
        if keys_state in st.session_state:
            # Keys can age out of the store; a stale choice must not break the widget.
            st.session_state[keys_state] = [k for k in st.session_state[keys_state] if k in options]
        keys = st.multiselect(f"Only these {key_type}s", options, key=keys_state, placeholder=f"all {key_type}s")
        tz = st.selectbox("Time zone", zones, key="fp_tz")
        widened = st.session_state.get(_WIDENED)
        if widened and widened[0] == range_label:
            st.caption(f":material/unfold_more: {widened[1]}")
        ignored = [note for note in notes if note]
        if ignored:
            st.caption(f":material/link_off: The address asked for {'; '.join(ignored)}: not available now, so "
                       "left out.")
        # Not the feed's state: the sidebar is drawn again only when its choices change, so it would go stale
        # (a page opened while connecting said "connecting" all through its history); the view body shows it.
        st.caption(f"Refreshes every {cfg.refresh_s:g} s · keeps {cfg.retention_hours:g} h")
    if sizes:  # not before the data is there: the address may name windows and keys still on their way
        keep_in_address("range", CODE_OF_RANGE[range_label], default=CODE_OF_RANGE[DEFAULT_RANGE])
        keep_in_address("from", fixed and fixed[0].strftime(ADDRESS_TIME))
        keep_in_address("to", fixed and fixed[1].strftime(ADDRESS_TIME))
        keep_in_address("key_type", key_type, default="topic")
        keep_in_address("tz", tz, default=default_zone)
        keep_in_address("window", window_s, default=sizes[0])
        keep_in_address("keys", list(keys), default=[])
    st.session_state[_CHOICES] = (tuple(sizes), tuple(options))
    shared = dict(key_type=key_type, window_s=window_s, keys=tuple(keys), min_count=cfg.min_window_count,
                  baseline_windows=cfg.baseline_windows)
    if fixed:
        filters = sh.ViewFilters.fixed(*fixed, **shared)
        range_label = " – ".join(t.tz_convert(tz).strftime("%Y-%m-%d %H:%M") for t in fixed)
    else:
        filters = sh.ViewFilters(span=sh.TIME_RANGES.get(range_label, sh.TIME_RANGES[DEFAULT_RANGE]), **shared)
        range_label = range_label if range_label in sh.TIME_RANGES else DEFAULT_RANGE
    return Controls(filters=filters, tz=tz, range_label=range_label, model_dir=model_dir, models_dir=models_dir,
                    pages=pages or {})


def wall_clock(when: pd.Timestamp, tz: str) -> datetime:
    """What the From/To widgets hold: ``when`` as a naive wall-clock time in ``tz``."""
    return when.tz_convert(tz).tz_localize(None).to_pydatetime()


def _from_wall_clock(value: datetime, tz: str) -> pd.Timestamp:
    return pd.Timestamp(value).tz_localize(tz, ambiguous=True, nonexistent="shift_forward").tz_convert("UTC")


def _keep_fixed_range_in_zone(tz: str) -> None:
    """The From/To widgets hold wall-clock times: when the time zone changes, move them so that the range stays
    the same instants."""
    before = st.session_state.get(_FIXED_TZ)
    if before and before != tz:
        for name in ("fp_fixed_from", "fp_fixed_to"):
            if st.session_state.get(name) is not None:
                st.session_state[name] = wall_clock(_from_wall_clock(st.session_state[name], before), tz)
    st.session_state[_FIXED_TZ] = tz


def _fixed_range_inputs(snap) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """From/To for a fixed range, in the chosen zone (first shown: the last hour of the data). Returns the range
    in UTC, or None (and says why) when it ends before it begins."""
    tz = st.session_state["fp_tz"]
    if st.session_state.get("fp_fixed_from") is None or st.session_state.get("fp_fixed_to") is None:
        end = (sh.newest_time(snap) or pd.Timestamp.now(tz="UTC")).ceil("min")
        st.session_state["fp_fixed_from"] = wall_clock(end - pd.Timedelta(hours=1), tz)
        st.session_state["fp_fixed_to"] = wall_clock(end, tz)
    start = st.datetime_input("From", key="fp_fixed_from", step=timedelta(minutes=1), format="YYYY-MM-DD")
    end = st.datetime_input("To", key="fp_fixed_to", step=timedelta(minutes=1), format="YYYY-MM-DD")
    if start is None or end is None or end <= start:
        st.caption(":orange[The range must end after it begins:] showing the last hour instead.")
        return None
    st.caption(f"Times in {tz}. A fixed range does not follow new data.")
    return _from_wall_clock(start, tz), _from_wall_clock(end, tz)


def _range_for_linked_alert(snap) -> str:
    """A link to an alert (a webhook's "open in FinPulse", a colleague's address) shows that alert: when the time
    range would leave its episode out (it ended before the range begins), the shortest range that lists it, else ""
    (the link followed already, the alert not in the store yet, or listed as it is)."""
    alert_id = link_to_follow("alert")
    current = st.session_state.get("fp_range", DEFAULT_RANGE)
    if alert_id is None or current == FIXED_RANGE:     # a fixed range is a deliberate choice: left as it is
        return ""
    showing = sh.range_showing(snap, alert_id, sh.TIME_RANGES, current)
    return showing if showing != current else ""


def live_view(name: str, feed: Feed, controls: Controls, cfg: DashboardSettings) -> None:
    title, _, render = VIEWS[name]

    @st.fragment(run_every=cfg.refresh_s)
    def body() -> None:
        snap = shown_snapshot(feed)
        if _choices(snap, controls.filters.key_type) != st.session_state.get(_CHOICES) or _range_for_linked_alert(snap):
            st.rerun(scope="app")
        has_data = feed_banner(feed.status, snap)
        try:
            if has_data:
                freshness_strip(snap, feed.status, cfg, controls.tz)
                render(snap, feed.status, controls, cfg)
            elif name in WITHOUT_DATA:
                WITHOUT_DATA[name](controls)
        except Exception as exc:  # one broken view must not take the page down or print a traceback on it
            log.exception("dashboard view %s failed", name)
            st.error(f"The {title} view could not be drawn this time ({type(exc).__name__}); retrying on the next refresh.")

    body()


def run(feed: Feed | None = None, page: str | None = None, settings: Settings | None = None) -> None:
    """Draw the dashboard. ``page`` draws one view without navigation; ``feed`` replaces the Kafka feed."""
    st.set_page_config(page_title="FinPulse", page_icon=":material/monitoring:", layout="wide")
    st.html(PAGE_STYLE)
    try:
        settings = settings or load_settings()
        cfg = dashboard_settings(settings)
        # How far back the open windows' figures are read: the worker's windows say (see LiveFeed).
        open_lookback_s = settings.section("aggregate", AggregateSettings).open_span_s()
    except ConfigError as exc:
        st.error(f"FinPulse's configuration cannot be used: {exc}")
        return
    if not require_sign_in(cfg):
        return
    feed = feed or feed_for(settings, cfg, open_lookback_s)
    if page is not None:
        live_view(page, feed, sidebar(feed, cfg, settings.worker.model_dir, models_root(settings)), cfg)
        return

    def page_for(name: str):
        def draw() -> None:
            live_view(name, feed, controls, cfg)
        draw.__name__ = f"view_{name}"
        return draw

    pages = {name: st.Page(page_for(name), title=title, icon=icon, url_path=name, default=(name == "overview"))
             for name, (title, icon, _) in VIEWS.items()}
    if cfg.ask_model and settings.worker.scorer not in SCORERS_WITHOUT_A_MODEL:   # else there is no model to ask
        def ask_view() -> None:   # not a live view: it redraws when asked, not every refresh_s
            render_ask(settings.worker, models_root(settings))
        pages["ask"] = st.Page(ask_view, title="Ask the model", icon=":material/psychology:", url_path="ask")
    current = st.navigation(list(pages.values()), position="top")
    if "alert" in st.query_params and current.url_path == pages["overview"].url_path:
        # A link to an alert opens the Alerts view; webhooks before 2026-12 linked to the root address.
        st.switch_page(pages["alerts"], query_params=st.query_params.to_dict())
    if st.session_state.get("fp_view") != current.url_path:
        st.session_state["fp_view"] = current.url_path
        forget_links()
    # The views link to each other through these pages, so the sidebar is drawn knowing them.
    controls = sidebar(feed, cfg, settings.worker.model_dir, models_root(settings), pages)
    current.run()
