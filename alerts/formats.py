"""How one alert event looks on the wire for each kind of endpoint.

- ``native``: FinPulse's own JSON, ``{"type", "timestamp", "data": <the AlertRecord>, "delivery": {...}}``, always
  signed per Standard Webhooks;
- ``slack``: an incoming-webhook message (fallback ``text`` plus Block Kit ``blocks``); message excerpts are
  escaped so a headline cannot ping ``<!channel>`` or forge links;
- ``pagerduty``: an Events API v2 ``trigger`` or ``resolve`` with ``dedup_key`` = the alert id (``<id>@<run id>``
  for a replay's alert), so the resolve closes the incident the trigger opened;
- ``alertmanager``: the list ``POST /api/v2/alerts`` takes. Firing and resolved events carry the same labels
  (Alertmanager identifies an alert by them; a replay's alert adds ``run_id``), and the resolved one sets ``endsAt``.

``render`` returns the body bytes; signing and sending are the dispatcher's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable
from urllib.parse import quote

from stream.records import AlertRecord, format_time

EVENT_TYPES = {"firing": "finpulse.alert.firing", "resolved": "finpulse.alert.resolved"}
PAGERDUTY_SEVERITY = {"info": "info", "warning": "warning", "critical": "critical"}
ALERTMANAGER_ALERTNAME = "FinPulseNegativeSentimentSpike"
# FinPulse sends each state once, while Alertmanager resolves an alert it has not heard about for resolve_timeout
# (5 min by default). A firing alert therefore states a far end; the resolved event replaces it with the real one.
ALERTMANAGER_FIRING_TTL = timedelta(hours=24)
SLACK_EXCERPTS = 3
PAGERDUTY_SUMMARY_MAX = 1024


@dataclass(frozen=True)
class DeliveryContext:
    """What a format may need beyond the alert itself."""
    webhook_id: str
    event_id: str
    endpoint: str
    attempt: int = 1
    sent_at: str = ""
    dashboard_url: str = ""
    routing_key: str = ""          # PagerDuty only; put in the body, never logged
    firing_severity: str = ""      # the severity the firing event was sent with (labels must not change)


def render(fmt: str, alert: AlertRecord, ctx: DeliveryContext) -> bytes:
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(_RENDERERS)})") from None
    return json.dumps(renderer(alert, ctx), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def headline(alert: AlertRecord) -> str:
    """One line a human reads first: status, severity, what moved and by how much."""
    obs, base = alert.observed or {}, alert.baseline or {}
    state = "RESOLVED" if alert.status == "resolved" else "FIRING"
    return (f"{state} [{alert.severity}] negative sentiment spike on {alert.key_type} {alert.key}: bearish share "
            f"{_pct(obs.get('bearish_share'))} vs baseline {_pct(base.get('bearish_share'))}, mean score "
            f"{_num(obs.get('mean_score'))} vs {_num(base.get('mean_score'))} ({_window(alert.window_s)} window)")


def dashboard_link(alert: AlertRecord, dashboard_url: str) -> str:
    if not dashboard_url:
        return ""
    return f"{dashboard_url.rstrip('/')}/?alert={quote(alert.id, safe='')}"


# ---------------------------------------------------------------- formats

def _native(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    return {
        "type": EVENT_TYPES.get(alert.status, f"finpulse.alert.{alert.status}"),
        "timestamp": format_time(alert.emitted_at),
        "data": alert.to_dict(),
        "delivery": {"webhook_id": ctx.webhook_id, "event_id": ctx.event_id, "endpoint": ctx.endpoint,
                     "attempt": ctx.attempt, "sent_at": ctx.sent_at},
    }


def _slack(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    obs, base = alert.observed or {}, alert.baseline or {}
    resolved = alert.status == "resolved"
    icon = ":large_green_circle:" if resolved else {"critical": ":red_circle:", "warning": ":large_orange_circle:"}.get(alert.severity, ":large_blue_circle:")
    title = f"{'Resolved' if resolved else 'Negative sentiment spike'}: {alert.key_type} {alert.key}"
    fields = [
        ("Severity", alert.severity),
        ("Window", f"{_window(alert.window_s)} from {format_time(alert.window_start)}"),
        ("Bearish share", f"{_pct(obs.get('bearish_share'))} (baseline {_pct(base.get('bearish_share'))})"),
        ("Mean score", f"{_num(obs.get('mean_score'))} (baseline {_num(base.get('mean_score'))})"),
        ("Messages", str(obs.get("count", "?"))),
        ("Deviation", f"{alert.deviation:.1f} σ"),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(title, 150), "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"{icon} {_slack_escape(alert.summary or headline(alert))}", 3000)},
         "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{_slack_escape(value)}"} for name, value in fields]},
    ]
    excerpts = [m for m in alert.messages[:SLACK_EXCERPTS] if m.get("text")]
    if excerpts and not resolved:
        lines = "\n".join(f"• {_num(m.get('sentiment_score'))}  {_slack_escape(m['text'])}" for m in excerpts)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"*Most negative messages*\n{lines}", 3000)}})
    link = dashboard_link(alert, ctx.dashboard_url)
    context = f"FinPulse alert `{_slack_escape(alert.id)}` · started {format_time(alert.started_at)}"
    if resolved and alert.resolved_at:
        context += f" · resolved {format_time(alert.resolved_at)}"
    if link:
        context += f" · <{link}|open in dashboard>"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(context, 3000)}]})
    return {"text": _slack_escape(headline(alert)), "blocks": blocks}


def _pagerduty(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    event: dict[str, Any] = {"routing_key": ctx.routing_key, "dedup_key": alert.episode_id}
    if alert.status == "resolved":
        event["event_action"] = "resolve"
        return event
    obs, base = alert.observed or {}, alert.baseline or {}
    event["event_action"] = "trigger"
    event["payload"] = {
        "summary": _cut(headline(alert), PAGERDUTY_SUMMARY_MAX),
        "source": f"finpulse/{alert.key_type}/{alert.key}",
        "severity": PAGERDUTY_SEVERITY.get(alert.severity, "error"),
        "timestamp": format_time(alert.started_at),
        "component": alert.key,
        "group": alert.key_type,
        "class": "negative_sentiment_spike",
        "custom_details": {
            "observed": obs, "baseline": base, "deviation": alert.deviation,
            "window": {"seconds": alert.window_s, "start": format_time(alert.window_start), "end": format_time(alert.window_end)},
            "most_negative": [{"id": m.get("id"), "score": m.get("sentiment_score"), "text": m.get("text")}
                              for m in alert.messages[:SLACK_EXCERPTS]],
            "model_version": alert.model_version,
        },
    }
    event["client"] = "FinPulse"
    link = dashboard_link(alert, ctx.dashboard_url)
    if link:
        event["client_url"] = link
        event["links"] = [{"href": link, "text": "FinPulse dashboard"}]
    return event


def _alertmanager(alert: AlertRecord, ctx: DeliveryContext) -> list[dict[str, Any]]:
    obs, base = alert.observed or {}, alert.baseline or {}
    labels = {
        "alertname": ALERTMANAGER_ALERTNAME,
        "severity": ctx.firing_severity or alert.severity,
        "key_type": alert.key_type,
        "key": alert.key,
        "window": f"{alert.window_s}s",
        "alert_id": alert.id,
        "source": "finpulse",
    }
    if alert.run_id:
        labels["run_id"] = alert.run_id
    if alert.status == "resolved":
        ends_at = alert.resolved_at or alert.emitted_at
    else:
        ends_at = alert.started_at + ALERTMANAGER_FIRING_TTL
    entry: dict[str, Any] = {
        "labels": labels,
        "annotations": {
            "summary": headline(alert),
            "description": alert.summary or headline(alert),
            "observed_bearish_share": _fixed(obs.get("bearish_share")),
            "baseline_bearish_share": _fixed(base.get("bearish_share")),
            "observed_mean_score": _fixed(obs.get("mean_score")),
            "baseline_mean_score": _fixed(base.get("mean_score")),
            "deviation": f"{alert.deviation:.2f}",
            "message_count": str(obs.get("count", "")),
        },
        "startsAt": format_time(alert.started_at),
        "endsAt": format_time(ends_at),
    }
    link = dashboard_link(alert, ctx.dashboard_url)
    if link:
        entry["generatorURL"] = link
    return [entry]


_RENDERERS: dict[str, Callable[[AlertRecord, DeliveryContext], Any]] = {
    "native": _native, "slack": _slack, "pagerduty": _pagerduty, "alertmanager": _alertmanager,
}


# ---------------------------------------------------------------- helpers

def _slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters: & < > (links, mentions and @channel all start with <)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, (int, float)) else "?"


def _num(value: Any) -> str:
    return f"{value:+.2f}" if isinstance(value, (int, float)) else "?"


def _fixed(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


def _window(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
