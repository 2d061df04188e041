"""The backtest's HTML page: one self-contained file (inline CSS and SVG charts, no scripts, nothing fetched), so it
opens offline and can be mailed or archived as is.

Charts: a timeline of alerts against labeled events per key, the lead time of each labeled event, forward returns
after bearish alerts against all price times, forward returns by sentiment quintile, and the mean sentiment per hour.
Every chart and the header carry the run's model version and config hash.
"""
from __future__ import annotations

from html import escape
from typing import Any, Sequence

import pandas as pd

WIDTH, ROW_H, PAD_L, PAD_R, PAD_T, PAD_B = 760, 22, 170, 20, 46, 40
COLORS = ("#3b6fb6", "#d08a2e", "#6a9f58", "#b0413e")
SEVERITY_COLORS = {"info": "#3b6fb6", "warning": "#d08a2e", "critical": "#b0413e"}
MAX_TIMELINE_KEYS = 25


def _svg(height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>{"".join(body)}</svg>')


def _heading(title: str, label: str) -> list[str]:
    return [_text(10, 18, title, size=13, extra='font-weight="bold"'), _text(10, 34, label, size=10, extra='fill="#666"')]


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{escape(text)}</text>'


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f}%"


def bar_chart(title: str, label: str, categories: Sequence[str],
              series: Sequence[tuple[str, Sequence[float | None]]], fmt=_fmt_pct) -> str:
    """Grouped vertical bars around a zero line (values may be negative); None is drawn as 'n/a'."""
    height = 290
    plot_h = height - PAD_T - PAD_B - 16
    values = [v for _, vs in series for v in vs if v is not None]
    top, bottom = max(values + [0.0]), min(values + [0.0])
    span = (top - bottom) or 1.0
    zero_y = PAD_T + plot_h * top / span
    group_w = (WIDTH - PAD_L - PAD_R) / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    body = [*_heading(title, label),
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{zero_y:.1f}" y2="{zero_y:.1f}" stroke="#555"/>']
    for g, category in enumerate(categories):
        x0 = PAD_L + g * group_w + group_w * 0.1
        body.append(_text(x0 + group_w * 0.4, PAD_T + plot_h + 28, category, anchor="middle"))
        for s, (_, vs) in enumerate(series):
            value = vs[g]
            x = x0 + s * bar_w
            if value is None:
                body.append(_text(x + bar_w / 2, zero_y - 4, "n/a", anchor="middle", size=9))
                continue
            y = PAD_T + plot_h * (top - max(value, 0.0)) / span
            h = max(1.0, plot_h * abs(value) / span)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                        f'fill="{COLORS[s % len(COLORS)]}"><title>{escape(fmt(value))}</title></rect>')
            label_y = y - 3 if value >= 0 else y + h + 11
            body.append(_text(x + bar_w / 2, label_y, fmt(value), anchor="middle", size=9))
    for s, (name, _) in enumerate(series):
        lx = PAD_L + s * 150
        body.append(f'<rect x="{lx}" y="{height - 18}" width="10" height="10" fill="{COLORS[s % len(COLORS)]}"/>')
        body.append(_text(lx + 14, height - 9, name, size=10))
    return _svg(height, body, title)


def line_chart(title: str, label: str, times: Sequence[pd.Timestamp], values: Sequence[float], y_label: str) -> str:
    height = 230
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, height - PAD_T - PAD_B
    body = [*_heading(title, label), _text(10, PAD_T + plot_h / 2, y_label, size=10)]
    if len(times) == 0:
        return _svg(height, body + [_text(PAD_L, PAD_T + 20, "no data")], title)
    t0, t1 = times[0].value, times[-1].value
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    span_t, span_v = (t1 - t0) or 1, (high - low) or 1.0

    def xy(t: pd.Timestamp, v: float) -> tuple[float, float]:
        return PAD_L + plot_w * (t.value - t0) / span_t, PAD_T + plot_h * (high - v) / span_v

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in zip(times, values)))
    zero_y = xy(times[0], 0.0)[1]
    body += [f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{zero_y:.1f}" y2="{zero_y:.1f}" stroke="#aaa"/>',
             f'<polyline points="{points}" fill="none" stroke="{COLORS[0]}" stroke-width="2"/>',
             _text(PAD_L, height - 12, f"{times[0]:%Y-%m-%d %H:%M}"),
             _text(WIDTH - PAD_R, height - 12, f"{times[-1]:%Y-%m-%d %H:%M}", anchor="end"),
             _text(PAD_L - 4, PAD_T + 8, f"{high:+.2f}", anchor="end", size=9),
             _text(PAD_L - 4, PAD_T + plot_h, f"{low:+.2f}", anchor="end", size=9)]
    return _svg(height, body, title)


def timeline(title: str, label: str, start: pd.Timestamp, end: pd.Timestamp, firing: pd.DataFrame,
             events: pd.DataFrame | None) -> str:
    """One row per key: labeled events as shaded spans, alert episodes (``backtest.episodes``) as markers at their
    firing, coloured by the highest severity they reached."""
    keys = list(dict.fromkeys([f"{t}:{k}" for t, k in zip(firing["key_type"], firing["key"])]
                              + ([] if events is None else list(events["key"]))))[:MAX_TIMELINE_KEYS]
    height = PAD_T + ROW_H * max(1, len(keys)) + PAD_B
    plot_w = WIDTH - PAD_L - PAD_R
    span = (end.value - start.value) or 1

    def x_of(t: pd.Timestamp) -> float:
        return PAD_L + plot_w * min(max((t.value - start.value) / span, 0.0), 1.0)

    body = _heading(title, label)
    for row, key in enumerate(keys):
        y = PAD_T + row * ROW_H
        body.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y + ROW_H / 2:.1f}" y2="{y + ROW_H / 2:.1f}" stroke="#eee"/>')
        body.append(_text(PAD_L - 6, y + ROW_H / 2 + 4, key[:28], anchor="end", size=10))
        if events is not None:
            for _, event in events[events["key"] == key].iterrows():
                x0, x1 = x_of(event["start"]), x_of(event["end"])
                body.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(2.0, x1 - x0):.1f}" height="{ROW_H - 6}" '
                            f'fill="#f2c14e" fill-opacity="0.5"><title>{escape(key)}: labeled event</title></rect>')
        type_, _, name = key.partition(":")
        matches = firing[((firing["key_type"] == type_) & (firing["key"] == name)) | (firing["key"] == key)]
        for _, alert in matches.iterrows():
            x = x_of(alert["emitted_at"])
            color = SEVERITY_COLORS.get(alert["severity"], COLORS[3])
            body.append(f'<path d="M{x:.1f},{y + 4} l5,{ROW_H - 8} l-10,0 z" fill="{color}"><title>'
                        f'{escape(alert["id"])} {escape(alert["severity"])} at {alert["emitted_at"]:%Y-%m-%d %H:%M:%S}'
                        f'</title></path>')
    body += [_text(PAD_L, height - 12, f"{start:%Y-%m-%d %H:%M}"),
             _text(WIDTH - PAD_R, height - 12, f"{end:%Y-%m-%d %H:%M}", anchor="end")]
    if not keys:
        body.append(_text(PAD_L, PAD_T + 14, "no alerts and no labeled events"))
    return _svg(height, body, title)


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:820px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}th{background:#f4f4f4}
.label{color:#555;font-size:12px}.warning{color:#8a4b00;font-size:13px}.figures td:first-child{font-weight:bold}svg{display:block;margin:10px 0}"""


def _warmup_note(warmup: dict | None) -> str:
    """The warm-up the run read before its range, and a warning when the input did not reach back that far."""
    if not warmup:
        return '<p class="label">warm-up: none recorded (a run made before warm-ups: it started cold)</p>'
    note = (f'<p class="label">warm-up from {escape(warmup["from"])} ({escape(warmup["rule"])}): '
            f'{warmup["inputs"]} messages read, nothing of them in the outputs; {warmup["alerts_held_back"]} alert '
            "events held back</p>")
    if warmup["short"]:
        reach = "no input message" if warmup["first_input"] is None else f'input only from {warmup["first_input"]}'
        note += (f'<p class="warning">The warm-up was short ({escape(reach)}): keys not warmed up could not alert '
                 "near the start of the range.</p>")
    return note


def render_html(report: dict[str, Any], episodes: pd.DataFrame, events: pd.DataFrame | None) -> str:
    """The report as one HTML document (``report`` is the JSON-able report; ``episodes`` (one row per alert
    episode, ``backtest.episodes``) and ``events`` are frames)."""
    label = f"model {report['model_version']} · config {report['config_hash']} · run {report['run_id']}"
    quality = report["alert_quality"]
    start, end = pd.Timestamp(report["from"]), pd.Timestamp(report["to"])
    parts = [f"<h1>FinPulse backtest: run {escape(report['run_id'])}</h1>",
             f'<p class="label">{escape(label)} · event time {escape(report["from"])} to {escape(report["to"])} '
             f'({escape(report["source"])})</p>',
             _warmup_note(report.get("warmup")),
             "<h2>Alert quality</h2>",
             _table([{"figure": "alerts (episodes)", "value": quality["alerts_firing"]},
                     {"figure": "of which escalated", "value": quality["alerts_escalated"]},
                     {"figure": "precision", "value": _ratio(quality["precision"])},
                     {"figure": "recall", "value": _ratio(quality["recall"])},
                     {"figure": "labeled events outside the run (not counted)",
                      "value": quality.get("events_outside_range", 0)},
                     {"figure": "labeled events alerted on in the warm-up (not counted)",
                      "value": quality.get("events_alerted_in_warmup", 0)},
                     {"figure": "median lead time (s)", "value": (quality.get("lead_time_s") or {}).get("median")}],
                    ["figure", "value"]),
             timeline("Alerts (triangles, by highest severity) and labeled events (spans)", label, start, end, episodes,
                      events)]
    if quality["events"]:
        detected = [e for e in quality["events"] if e["lead_time_s"] is not None]
        parts.append(bar_chart("Lead time per detected event, minutes (positive: the alert came first)", label, [e["event"][:22] for e in detected],
                               [("lead time (min)", [e["lead_time_s"] / 60 for e in detected])],
                               fmt=lambda v: f"{v:+.1f}"))
        parts.append(_table(quality["events"], ["event", "detected", "first_alert", "first_alert_at", "lead_time_s", "alerts"]))
    parts += ["<h2>Alerts</h2>", _table(quality["alerts"], ["id", "key_type", "key", "severity", "fired_as",
                                                               "escalations", "emitted_at", "deviation", "matched_event"])]
    study = report.get("event_study")
    if study:
        parts.append("<h2>Event study: forward returns</h2>")
        horizons = list(study["after_bearish_alerts"])
        parts.append(bar_chart("Mean forward return after bearish alerts vs all price times", label, horizons,
                               [("after bearish alerts", [study["after_bearish_alerts"][h]["mean"] for h in horizons]),
                                ("all price times", [study["all_price_times"][h]["mean"] for h in horizons])]))
        parts.append(_table([{"horizon": h, **{f"alerts {k}": v for k, v in study["after_bearish_alerts"][h].items()},
                              **{f"all {k}": v for k, v in study["all_price_times"][h].items()}} for h in horizons],
                            ["horizon", "alerts n", "alerts mean", "alerts median", "alerts share_negative", "all n",
                             "all mean"]))
        quantiles = study["by_sentiment_quantile"]
        if quantiles:
            parts.append(bar_chart("Mean forward return by sentiment quintile (Q1 = most bearish)", label,
                                   [f"Q{q['quantile']}" for q in quantiles],
                                   [(f"{h}", [q[f"mean_ret_{h}"] for q in quantiles]) for h in horizons]))
            parts.append(_table(quantiles, ["quantile", "n", "score_min", "score_max", *[f"mean_ret_{h}" for h in horizons],
                                            *[f"n_{h}" for h in horizons]]))
    over_time = report.get("sentiment_over_time") or {"bucket": "", "points": []}
    points = over_time["points"]
    parts.append("<h2>Sentiment</h2>")
    parts.append(line_chart(f"Mean sentiment score per {over_time['bucket']}", label,
                            [pd.Timestamp(p["at"]) for p in points], [p["mean_score"] for p in points], "mean score"))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>FinPulse backtest "
            f"{escape(report['run_id'])}</title><style>{STYLE}</style></head><body>{''.join(parts)}"
            f"<p class=\"label\">{escape(label)}</p></body></html>\n")
