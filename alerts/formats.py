"""How one alert event looks on the wire for each kind of endpoint.

- ``native``: FinPulse's own JSON, ``{"type", "timestamp", "data": <the AlertRecord>, "delivery": {...}}``, always
  signed per Standard Webhooks. ``type`` is ``finpulse.alert.firing``, ``.escalated`` or ``.resolved``; an
  escalation's ``data`` has ``status`` "firing", the new ``severity`` and ``escalated_from``;
- ``slack``: an incoming-webhook message (fallback ``text`` plus Block Kit ``blocks``); message excerpts are
  escaped so a headline cannot ping ``<!channel>`` or forge links; an escalation says from what to what;
- ``pagerduty``: an Events API v2 ``trigger`` or ``resolve`` with ``dedup_key`` = the alert id (``<id>@<run id>``
  for a replay's alert), so the resolve closes the incident the trigger opened. An escalation is another
  ``trigger`` with the same ``dedup_key`` and the new severity: PagerDuty updates the open alert;
- ``teams``: a Microsoft Teams message for a Workflows webhook ("When a Teams webhook request is received"): one
  Adaptive Card (1.4) with the headline in the severity's colour, the figures as a FactSet, the most negative
  messages and an "Open in FinPulse" button. Text that comes from the data (messages, keys, summaries) goes in
  ``TextRun`` elements, which Teams never reads as Markdown, so a headline cannot forge a link;
- ``alertmanager``: the list ``POST /api/v2/alerts`` takes. Alertmanager identifies an alert by its labels and
  routes on ``severity``, so severity stays a label, and the other labels (``alert_id``, key, window; ``run_id``
  for a replay) stay the same for every event of the episode. An escalation ends the label sets of the severities
  this endpoint was sent before (``endsAt`` = the escalating window's end) and starts the new one, in one post; the
  resolve ends every label set the endpoint was sent (``DeliveryContext.sent_severities``), so nothing stays open.
- ``template``: the endpoint's own ``template`` filled with the event's ``TEMPLATE_FIELDS`` (``alerts.templates``),
  for any tool that takes JSON; a resolve's is its ``resolve_template`` when it has one (``body_template``).

Grouped endpoints (``alerts.grouping``) get one notification for many alert events, ``render_group``:

- ``native``: ``{"type": "finpulse.alert.group", "timestamp", "group": {"label", "count", "counts"}, "alerts":
  [...], "delivery": {...}}``; each item of ``alerts`` is exactly the native body that event would have had alone
  (its own ``type``, ``data`` and ``delivery.event_id`` / ``delivery.webhook_id``), in emission order, so a
  receiver can keep deduplicating per event while the request's webhook-id is the group's;
- ``slack``: one message: the counts, then one line per event, most severe first and resolves last, at most
  ``SLACK_GROUP_LINES`` of them and "+N more";
- ``teams``: one card: the counts, then one line per event as for Slack;
- ``alertmanager``: one POST whose list holds every event's entries (Alertmanager groups them again by its own
  route's ``group_by``);
- ``template``: the endpoint's ``group_template`` filled with ``GROUP_TEMPLATE_FIELDS`` (each member's own fields
  in ``alerts``);
- ``pagerduty``: not grouped (the config refuses it): Events v2 takes one event per dedup_key.

``render`` and ``render_group`` return the body bytes; signing and sending are the dispatcher's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable
from urllib.parse import quote

from stream.aggregate import KEY_TYPES
from stream.records import SEVERITIES, AlertRecord, format_time, severity_rank

from .templates import cut, fill

EVENT_TYPES = {"firing": "finpulse.alert.firing", "escalation": "finpulse.alert.escalated",
               "resolved": "finpulse.alert.resolved"}
EVENT_KINDS = tuple(EVENT_TYPES)   # what AlertRecord.event_kind can be
PAGERDUTY_SEVERITY = {"info": "info", "warning": "warning", "critical": "critical"}
ALERTMANAGER_ALERTNAME = "FinPulseNegativeSentimentSpike"
# FinPulse sends each state once, while Alertmanager resolves an alert it has not heard about for resolve_timeout
# (5 min by default). A firing alert therefore states a far end; the resolved event replaces it with the real one.
ALERTMANAGER_FIRING_TTL = timedelta(hours=24)
SLACK_EXCERPTS = 3
SLACK_GROUP_LINES = 10  # one headline is about 200 characters: ten stay inside a section's 3000
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
    # The severities of the episode's earlier firing and escalations taken on for this endpoint, lowest first:
    # the Alertmanager label sets this event must end.
    sent_severities: tuple[str, ...] = ()
    template: Any = None           # the template format's body template (checked when the config was loaded)
    incident_id: str = ""          # what the endpoint answered the episode's firing with, at its incident_id_from
    update: bool = False           # an escalation sent as an update of the incident the episode opened there


@dataclass(frozen=True)
class GroupContext:
    """What a grouped notification carries beyond its members: its own identity and its group."""
    webhook_id: str
    event_id: str
    endpoint: str
    label: str                     # e.g. "key_type=topic", or "all"
    attempt: int = 1
    sent_at: str = ""
    dashboard_url: str = ""
    template: Any = None           # the template format's group_template


def render(fmt: str, alert: AlertRecord, ctx: DeliveryContext) -> bytes:
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(_RENDERERS)})") from None
    return _body(renderer(alert, ctx))


def render_group(fmt: str, group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> bytes:
    """One notification for ``members`` (each event with the context it would have had alone), in their order."""
    try:
        renderer = _GROUP_RENDERERS[fmt]
    except KeyError:
        raise ValueError(f"format {fmt!r} takes no grouped notifications (grouped: {', '.join(_GROUP_RENDERERS)})") from None
    return _body(renderer(group, members))


def _body(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def headline(alert: AlertRecord) -> str:
    """One line a human reads first: status, severity, what moved and by how much."""
    obs, base = alert.observed or {}, alert.baseline or {}
    state = {"resolved": "RESOLVED", "escalation": "ESCALATED"}.get(alert.event_kind, "FIRING")
    severity = f"{alert.escalated_from} → {alert.severity}" if alert.escalated_from else alert.severity
    return (f"{state} [{severity}] negative sentiment spike on {subject(alert)}: bearish share "
            f"{_pct(obs.get('bearish_share'))} vs baseline {_pct(base.get('bearish_share'))}, mean score "
            f"{_num(obs.get('mean_score'))} vs {_num(base.get('mean_score'))} ({_window(alert.window_s)} window)")


def subject(alert: AlertRecord) -> str:
    """What the alert is on: ``topic Energy | Oil``, or ``ticker XOM (Energy | Oil)`` with the story behind it."""
    about = f" ({alert.topic})" if alert.key_type == "ticker" and alert.topic else ""
    return f"{alert.key_type} {alert.key}{about}"


def card_title(alert: AlertRecord) -> str:
    """A chat card's title: what happened, on what."""
    what = ("Resolved" if alert.status == "resolved" else
            f"Escalated from {alert.escalated_from} to {alert.severity}" if alert.escalated_from else
            "Negative sentiment spike")
    return f"{what}: {subject(alert)}"


def figures(alert: AlertRecord) -> list[tuple[str, str]]:
    """The figures a chat card lists, as (name, value)."""
    obs, base = alert.observed or {}, alert.baseline or {}
    return [
        ("Severity", f"{alert.escalated_from} → {alert.severity}" if alert.escalated_from else alert.severity),
        ("Window", f"{_window(alert.window_s)} from {format_time(alert.window_start)}"),
        ("Bearish share", f"{_pct(obs.get('bearish_share'))} (baseline {_pct(base.get('bearish_share'))})"),
        ("Mean score", f"{_num(obs.get('mean_score'))} (baseline {_num(base.get('mean_score'))})"),
        ("Messages", str(obs.get("count", "?"))),
        ("Deviation", f"{alert.deviation:.1f} σ"),
    ]


def dashboard_link(alert: AlertRecord, dashboard_url: str) -> str:
    if not dashboard_url:
        return ""
    return f"{dashboard_url.rstrip('/')}/alerts?alert={quote(alert.id, safe='')}"


# ---------------------------------------------------------------- formats

def _native(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    return {
        "type": EVENT_TYPES.get(alert.event_kind, f"finpulse.alert.{alert.status}"),
        "timestamp": format_time(alert.emitted_at),
        "data": alert.to_dict(),
        "delivery": {"webhook_id": ctx.webhook_id, "event_id": ctx.event_id, "endpoint": ctx.endpoint,
                     "attempt": ctx.attempt, "sent_at": ctx.sent_at},
    }


def _slack_icon(alert: AlertRecord) -> str:
    if alert.status == "resolved":
        return ":large_green_circle:"
    return {"critical": ":red_circle:", "warning": ":large_orange_circle:"}.get(alert.severity, ":large_blue_circle:")


def _slack(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    resolved = alert.status == "resolved"
    icon = _slack_icon(alert)
    title = card_title(alert)
    fields = figures(alert)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": cut(title, 150), "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": cut(f"{icon} {_slack_escape(alert.summary or headline(alert))}", 3000)},
         "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{_slack_escape(value)}"} for name, value in fields]},
    ]
    excerpts = [m for m in alert.messages[:SLACK_EXCERPTS] if m.get("text")]
    if excerpts and not resolved:
        lines = "\n".join(f"• {_num(m.get('sentiment_score'))}  {_slack_escape(m['text'])}" for m in excerpts)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": cut(f"*Most negative messages*\n{lines}", 3000)}})
    link = dashboard_link(alert, ctx.dashboard_url)
    context = f"FinPulse alert `{_slack_escape(alert.id)}` · started {format_time(alert.started_at)}"
    if resolved and alert.resolved_at:
        context += f" · resolved {format_time(alert.resolved_at)}"
    if link:
        context += f" · <{link}|open in dashboard>"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": cut(context, 3000)}]})
    return {"text": _slack_escape(headline(alert)), "blocks": blocks}


def _pagerduty(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    event: dict[str, Any] = {"routing_key": ctx.routing_key, "dedup_key": alert.episode_id}
    if alert.status == "resolved":
        event["event_action"] = "resolve"
        return event
    obs, base = alert.observed or {}, alert.baseline or {}
    event["event_action"] = "trigger"
    event["payload"] = {
        "summary": cut(headline(alert), PAGERDUTY_SUMMARY_MAX),
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
            **({"topic": alert.about_topic} if alert.about_topic else {}),
            **({"escalated_from": alert.escalated_from} if alert.escalated_from else {}),
        },
    }
    event["client"] = "FinPulse"
    link = dashboard_link(alert, ctx.dashboard_url)
    if link:
        event["client_url"] = link
        event["links"] = [{"href": link, "text": "FinPulse dashboard"}]
    return event


def _alertmanager(alert: AlertRecord, ctx: DeliveryContext) -> list[dict[str, Any]]:
    if alert.status == "resolved":
        ended = ctx.sent_severities or (alert.severity,)
        return [_alertmanager_entry(alert, severity, alert.resolved_at or alert.emitted_at, ctx) for severity in ended]
    # An escalation ends the label sets sent before: Alertmanager would keep them firing until their far endsAt.
    superseded = [_alertmanager_entry(alert, severity, alert.window_end, ctx)
                  for severity in ctx.sent_severities if severity != alert.severity]
    return superseded + [_alertmanager_entry(alert, alert.severity, alert.started_at + ALERTMANAGER_FIRING_TTL, ctx)]


def _alertmanager_entry(alert: AlertRecord, severity: str, ends_at: datetime, ctx: DeliveryContext) -> dict[str, Any]:
    """The episode's alert under the label set of ``severity``; the rest of the labels never change."""
    obs, base = alert.observed or {}, alert.baseline or {}
    labels = {
        "alertname": ALERTMANAGER_ALERTNAME,
        "severity": severity,
        "key_type": alert.key_type,
        "key": alert.key,
        "window": f"{alert.window_s}s",
        "alert_id": alert.id,
        "source": "finpulse",
    }
    if alert.topic:
        # Routes can match the story a ticker moves with; fixed for the episode (its firing's), like every label.
        labels["topic"] = alert.topic
    if alert.run_id:
        labels["run_id"] = alert.run_id
    annotations = {
        "summary": headline(alert),
        "description": alert.summary or headline(alert),
        "observed_bearish_share": _fixed(obs.get("bearish_share")),
        "baseline_bearish_share": _fixed(base.get("bearish_share")),
        "observed_mean_score": _fixed(obs.get("mean_score")),
        "baseline_mean_score": _fixed(base.get("mean_score")),
        "deviation": f"{alert.deviation:.2f}",
        "message_count": str(obs.get("count", "")),
    }
    if alert.escalated_from:
        annotations["escalated_from"] = alert.escalated_from
    if alert.status == "firing" and severity != alert.severity:
        annotations["superseded_by"] = alert.severity
    entry: dict[str, Any] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": format_time(alert.started_at),
        "endsAt": format_time(ends_at),
    }
    link = dashboard_link(alert, ctx.dashboard_url)
    if link:
        entry["generatorURL"] = link
    return entry


def _teams_colour(alert: AlertRecord) -> str:
    if alert.status == "resolved":
        return "Good"
    return {"critical": "Attention", "warning": "Warning"}.get(alert.severity, "Accent")


def _plain_text(text: str, **style: Any) -> dict[str, Any]:
    """Text from the data, shown as it is: a TextRun is never read as Markdown (no links, no emphasis)."""
    return {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": str(text), **style}]}


def _teams_card(body: list[dict[str, Any]], link: str, link_title: str) -> dict[str, Any]:
    card: dict[str, Any] = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
                            "version": "1.4", "body": body, "msteams": {"width": "Full"}}
    if link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": link_title, "url": link}]
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]}


def _teams(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    resolved = alert.status == "resolved"
    facts = [*figures(alert), ("Started", format_time(alert.started_at))]
    if resolved and alert.resolved_at:
        facts.append(("Resolved", format_time(alert.resolved_at)))
    body: list[dict[str, Any]] = [
        _plain_text(card_title(alert), weight="Bolder", size="Medium", color=_teams_colour(alert)),
        _plain_text(alert.summary or headline(alert)),
        {"type": "FactSet", "facts": [{"title": name, "value": value} for name, value in facts]},
    ]
    excerpts = [m for m in alert.messages[:SLACK_EXCERPTS] if m.get("text")]
    if excerpts and not resolved:
        body.append({"type": "TextBlock", "text": "Most negative messages", "weight": "Bolder", "spacing": "Medium"})
        body += [_plain_text(f"{_num(m.get('sentiment_score'))}  {m['text']}") for m in excerpts]
    body.append(_plain_text(f"FinPulse alert {alert.id}", isSubtle=True, size="Small"))
    return _teams_card(body, dashboard_link(alert, ctx.dashboard_url), "Open in FinPulse")


# ---------------------------------------------------------------- templates (alerts.templates)

# The fields a template (alerts.templates) may name: name -> what it holds (a config error lists them).
TEMPLATE_FIELDS: dict[str, str] = {
    "alert_id": "the episode's id (its firing, escalations and resolve share it)",
    "episode_id": "what a tool should key one incident on: alert_id, and \"@<run id>\" after it for a replay's "
                  "alert (a replay's episodes share their ids with the live ones)",
    "event_id": "this notification's id: <episode>:firing, <episode>:firing:<severity> or <episode>:resolved",
    "webhook_id": "the webhook-id header's value (deduplicate on it)",
    "event": "firing | escalation | resolved",
    "status": "firing | resolved (an escalation is firing)",
    "severity": "info | warning | critical (a resolve: the highest reached)",
    "escalated_from": "an escalation: the severity it rose from; else \"\"",
    "key_type": "topic | ticker",
    "key": "the topic or ticker",
    "topic": "what it is about: the topic, or a ticker's dominant topic when it fired (\"\" if unknown)",
    "subject": "\"topic Energy | Oil\" or \"ticker XOM (Energy | Oil)\"",
    "title": "a card's title: \"Negative sentiment spike: ticker XOM (Energy | Oil)\"",
    "headline": "one line: status, severity, subject, observed vs baseline",
    "summary": "the detector's sentence about the window",
    "observed_bearish_share": "the window's bearish share (0-1)",
    "observed_mean_score": "the window's mean score (-1 to 1)",
    "observed_count": "the window's message count",
    "baseline_bearish_share": "the baseline's bearish share",
    "baseline_mean_score": "the baseline's mean score",
    "deviation": "how many baseline standard deviations the window moved",
    "window_s": "the window's length in seconds",
    "window": "the window's length as text (\"1 min\")",
    "window_start": "the window's start (UTC, ISO 8601)",
    "window_end": "the window's end",
    "started_at": "when the episode started",
    "resolved_at": "when it resolved (null while firing)",
    "emitted_at": "when this event was emitted",
    "messages": "the most negative messages: a list of {id, text, sentiment_score, ...}",
    "messages_text": "the same as one text, a \"-0.82  text\" line each",
    "dashboard_link": "the alert in the dashboard (\"\" without [alerts] dashboard_url)",
    "model_version": "the model that scored the window",
    "run_id": "a replay's run id (\"\" for a live alert)",
    "endpoint": "this endpoint's name",
    "attempt": "this attempt's number (1 for the first)",
    "sent_at": "when this attempt was sent",
    "alert": "the whole alert record, as the native format's data",
    "incident_id": "the id this endpoint's tool answered the episode's firing with, read at its incident_id_from (a "
                   "ServiceNow sys_id, a Jira issue key): where an update or a resolve goes; \"\" until the firing is "
                   "answered",
}

# The fields whose values are a fixed set: a |map: name outside it could never match (the config check says so).
TEMPLATE_FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "event": EVENT_KINDS, "status": ("firing", "resolved"), "severity": SEVERITIES,
    "escalated_from": ("", *SEVERITIES[:-1]), "key_type": KEY_TYPES,
}

GROUP_TEMPLATE_FIELDS: dict[str, str] = {
    "title": "\"FinPulse: 3 alert events (key_type=topic)\"",
    "label": "the group: \"all\", or \"key_type=topic\", \"severity=critical,topic=Rates\"...",
    "count": "how many alert events it carries",
    "counts": "how many of each: {\"firing\": 2, \"escalation\": 1, \"resolved\": 1} (absent kinds left out)",
    "counts_text": "the same as text: \"2 firing, 1 escalated, 1 resolved\"",
    "lines": "one text, a headline per line for each event, most severe first and resolves last",
    "alerts": "each event's fields (the single-event template's), in emission order",
    "event_id": "this notification's id",
    "webhook_id": "the webhook-id header's value",
    "dashboard_link": "the dashboard's alerts page (\"\" without [alerts] dashboard_url)",
    "endpoint": "this endpoint's name",
    "attempt": "this attempt's number",
    "sent_at": "when this attempt was sent",
}


def template_fields(alert: AlertRecord, ctx: DeliveryContext) -> dict[str, Any]:
    """The fields of one alert event, as ``ctx`` sends it, for a template."""
    obs, base = alert.observed or {}, alert.baseline or {}
    record = alert.to_dict()
    return {
        "alert_id": alert.id, "episode_id": alert.episode_id, "event_id": ctx.event_id, "webhook_id": ctx.webhook_id, "event": alert.event_kind,
        "status": alert.status, "severity": alert.severity, "escalated_from": alert.escalated_from,
        "key_type": alert.key_type, "key": alert.key, "topic": alert.about_topic, "subject": subject(alert),
        "title": card_title(alert), "headline": headline(alert), "summary": alert.summary,
        "observed_bearish_share": obs.get("bearish_share"), "observed_mean_score": obs.get("mean_score"),
        "observed_count": obs.get("count"), "baseline_bearish_share": base.get("bearish_share"),
        "baseline_mean_score": base.get("mean_score"), "deviation": alert.deviation,
        "window_s": alert.window_s, "window": _window(alert.window_s),
        "window_start": record["window_start"], "window_end": record["window_end"],
        "started_at": record["started_at"], "resolved_at": record.get("resolved_at"),
        "emitted_at": record["emitted_at"], "messages": record.get("messages", []),
        "messages_text": "\n".join(f"{_num(m.get('sentiment_score'))}  {m.get('text', '')}" for m in alert.messages),
        "dashboard_link": dashboard_link(alert, ctx.dashboard_url), "model_version": alert.model_version,
        "run_id": alert.run_id, "endpoint": ctx.endpoint, "attempt": ctx.attempt, "sent_at": ctx.sent_at,
        "alert": record, "incident_id": ctx.incident_id,
    }


def group_template_fields(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> dict[str, Any]:
    """The fields of a grouped notification of ``members``, for a group template."""
    alerts = [alert for alert, _ in members]
    return {
        "title": _group_title(group, alerts), "label": group.label, "count": len(alerts),
        "counts": _counts(alerts), "counts_text": _counts_text(alerts),
        "lines": "\n".join(headline(a) for a in _most_severe_first(alerts)),
        "alerts": [template_fields(alert, ctx) for alert, ctx in members],
        "event_id": group.event_id, "webhook_id": group.webhook_id, "dashboard_link": _alerts_page(group),
        "endpoint": group.endpoint, "attempt": group.attempt, "sent_at": group.sent_at,
    }


def body_template(endpoint: Any, alert: AlertRecord, update: bool = False) -> Any:
    """The body template an endpoint's settings give ``alert``: its ``resolve_template`` for a resolve when it has
    one, its ``update_template`` for an ``update`` of an open incident, else its ``template`` (None for formats
    that have no template)."""
    if alert.status == "resolved" and endpoint.resolve_template is not None:
        return endpoint.resolve_template
    return endpoint.update_template if update else endpoint.template


def _template(alert: AlertRecord, ctx: DeliveryContext) -> Any:
    return fill(ctx.template, template_fields(alert, ctx))


def _template_group(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> Any:
    if group.template is None:  # queued while the endpoint grouped; its group_template has gone since
        raise ValueError(f"endpoint {group.endpoint!r} has no group_template any more")
    return fill(group.template, group_template_fields(group, members))


_RENDERERS: dict[str, Callable[[AlertRecord, DeliveryContext], Any]] = {
    "native": _native, "slack": _slack, "teams": _teams, "pagerduty": _pagerduty, "alertmanager": _alertmanager,
    "template": _template,
}


# ---------------------------------------------------------------- grouped notifications

def _counts(alerts: list[AlertRecord]) -> dict[str, int]:
    """How many firings, escalations and resolves, in that order, leaving out the kinds that are absent."""
    kinds = [a.event_kind for a in alerts]
    return {kind: kinds.count(kind) for kind in ("firing", "escalation", "resolved") if kind in kinds}


def _counts_text(alerts: list[AlertRecord]) -> str:
    return ", ".join(f"{n} {'escalated' if kind == 'escalation' else kind}" for kind, n in _counts(alerts).items())


def _most_severe_first(alerts: list[AlertRecord]) -> list[AlertRecord]:
    """Most severe first, resolves last; sorted() is stable, so emission order stays within a rank."""
    return sorted(alerts, key=lambda a: (a.status == "resolved", -severity_rank(a.severity)))


def _group_title(group: GroupContext, alerts: list[AlertRecord]) -> str:
    events = "1 alert event" if len(alerts) == 1 else f"{len(alerts)} alert events"
    return f"FinPulse: {events}" + ("" if group.label == "all" else f" ({group.label})")


def _alerts_page(group: GroupContext) -> str:
    return f"{group.dashboard_url.rstrip('/')}/alerts" if group.dashboard_url else ""


def _native_group(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> dict[str, Any]:
    alerts = [alert for alert, _ in members]
    return {
        "type": "finpulse.alert.group",
        "timestamp": format_time(max(a.emitted_at for a in alerts)),
        "group": {"label": group.label, "count": len(alerts), "counts": _counts(alerts)},
        "alerts": [_native(alert, ctx) for alert, ctx in members],
        "delivery": {"webhook_id": group.webhook_id, "event_id": group.event_id, "endpoint": group.endpoint,
                     "attempt": group.attempt, "sent_at": group.sent_at},
    }


def _slack_group(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> dict[str, Any]:
    alerts = [alert for alert, _ in members]
    ranked = _most_severe_first(alerts)
    counts = _counts_text(alerts)
    title = _group_title(group, alerts)
    lines = [f"{_slack_icon(a)} {_slack_escape(headline(a))}" for a in ranked[:SLACK_GROUP_LINES]]
    if len(ranked) > SLACK_GROUP_LINES:
        lines.append(f"+{len(ranked) - SLACK_GROUP_LINES} more")
    context = f"FinPulse group notification `{_slack_escape(group.event_id)}`"
    if group.dashboard_url:
        context += f" · <{_alerts_page(group)}|open the alerts>"
    return {
        "text": _slack_escape(f"{title}: {counts}; most severe: {headline(ranked[0])}"),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": cut(title, 150), "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn", "text": cut(_slack_escape(counts), 3000)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": cut("\n".join(lines), 3000)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(context, 3000)}]},
        ],
    }


def _teams_group(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> dict[str, Any]:
    alerts = [alert for alert, _ in members]
    ranked = _most_severe_first(alerts)
    counts = _counts_text(alerts)
    title = _group_title(group, alerts)
    body = [_plain_text(title, weight="Bolder", size="Medium", color=_teams_colour(ranked[0])), _plain_text(counts)]
    body += [_plain_text(headline(a), color=_teams_colour(a)) for a in ranked[:SLACK_GROUP_LINES]]
    if len(ranked) > SLACK_GROUP_LINES:
        body.append(_plain_text(f"+{len(ranked) - SLACK_GROUP_LINES} more"))
    body.append(_plain_text(f"FinPulse group notification {group.event_id}", isSubtle=True, size="Small"))
    return _teams_card(body, _alerts_page(group), "Open the alerts")


def _alertmanager_group(group: GroupContext, members: list[tuple[AlertRecord, DeliveryContext]]) -> list[dict[str, Any]]:
    return [entry for alert, ctx in members for entry in _alertmanager(alert, ctx)]


_GROUP_RENDERERS: dict[str, Callable[[GroupContext, list[tuple[AlertRecord, DeliveryContext]]], Any]] = {
    "native": _native_group, "slack": _slack_group, "teams": _teams_group, "alertmanager": _alertmanager_group,
    "template": _template_group,
}


# ---------------------------------------------------------------- helpers

def _slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters: & < > (links, mentions and @channel all start with <)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
