"""``finpulse dispatch --preview NAME`` and ``--fields``: what an endpoint would be sent, without sending anything.

The preview renders an example episode (its firing, an escalation and its resolve, and the group notifications
they would make when the endpoint groups: one per group its ``group_by`` puts them in) in the endpoint's format, so
a template can be tried before any alert fires; a resolve that goes to a ``resolve_url`` says where (with an example
``{incident_id}`` where the endpoint reads one from the answer to the firing). It needs
neither Kafka nor the endpoint's secrets: a PagerDuty routing key shows as ``***``, a URL from the environment by
its variable's name.
"""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

from stream.config import ConfigError
from stream.records import SEVERITIES, AlertRecord, format_time, severity_rank, utcnow

from .endpoints import AlertDeliveryConfig, EndpointSettings, updates_incident
from .formats import (GROUP_TEMPLATE_FIELDS, TEMPLATE_FIELDS, DeliveryContext, GroupContext, body_template, render,
                      render_group, template_fields)
from .grouping import GroupPolicy
from .templates import FILTERS, fill_url


EXAMPLE_INCIDENT_ID = "9d385017c611228701d22104cc95c371"   # a ServiceNow sys_id, as a tool names what it opened


def example_episode() -> list[AlertRecord]:
    """A ticker alert's firing, its escalation to critical and its resolve, as the detector emits them."""
    start = utcnow().replace(second=0, microsecond=0) - timedelta(minutes=3)
    firing = AlertRecord(
        id="a1b2c3d4e5f6", status="firing", key_type="ticker", key="XOM", window_s=60, window_start=start,
        window_end=start + timedelta(minutes=1), severity="warning",
        observed={"bearish_share": 0.68, "mean_score": -0.49, "count": 41},
        baseline={"bearish_share": 0.21, "bearish_share_std": 0.05, "mean_score": 0.06, "mean_score_std": 0.07},
        deviation=9.4, started_at=start + timedelta(minutes=1), emitted_at=start + timedelta(minutes=1, seconds=1),
        messages=({"id": "n-1", "kind": "news", "text": "Refinery outage halts Gulf Coast output", "sentiment_score": -0.93},
                  {"id": "c-7", "kind": "comment", "text": "$XOM dumping hard on the outage", "sentiment_score": -0.88}),
        summary="Bearish share on XOM jumped to 68% (baseline 21%) over 41 messages", model_version="example",
        topic="Energy | Oil")
    escalation = replace(firing, severity="critical", escalated_from="warning", deviation=14.2,
                         window_start=firing.window_end, window_end=firing.window_end + timedelta(minutes=1),
                         emitted_at=firing.emitted_at + timedelta(minutes=1),
                         summary="Bearish share on XOM rose to 81% (baseline 21%) over 77 messages",
                         observed={"bearish_share": 0.81, "mean_score": -0.66, "count": 77})
    resolved = replace(firing, status="resolved", severity="critical", resolved_at=firing.emitted_at + timedelta(minutes=6),
                       emitted_at=firing.emitted_at + timedelta(minutes=6), messages=(),
                       summary="XOM is back within its baseline")
    return [firing, escalation, resolved]


def preview(config: AlertDeliveryConfig, name: str, dashboard_url: str) -> str:
    """The bodies ``name`` would be sent for the example episode, as indented JSON under a line saying which."""
    endpoint = next((e for e in config.endpoints if e.name == name), None)
    if endpoint is None:
        raise ConfigError(f"no endpoint named {name!r} (endpoints: {', '.join(e.name for e in config.endpoints) or 'none'})")
    sent_at = format_time(utcnow())
    contexts, parts, sent = [], [], []
    # Each event as the endpoint would be sent it after those sent before it (a firing below its min_severity is not).
    for n, alert in enumerate(example_episode()):
        update = updates_incident(endpoint, alert, bool(sent))
        ctx = DeliveryContext(
            webhook_id=f"msg_example{n}", event_id=alert.event_id, endpoint=name, sent_at=sent_at,
            dashboard_url=dashboard_url, routing_key="***", template=body_template(endpoint, alert, update),
            sent_severities=tuple(a.severity for a in sent), update=update,
            incident_id=EXAMPLE_INCIDENT_ID if sent and endpoint.incident_id_from else "")
        why_not = _not_sent(endpoint, alert, bool(sent))
        parts.append(f"# {alert.event_kind}: not sent ({why_not})" if why_not else
                     f"# {alert.event_kind}{_elsewhere(endpoint, alert, ctx)}\n"
                     f"{_pretty(render(endpoint.format, alert, ctx))}")
        if not why_not:
            contexts.append((alert, ctx))
            sent.append(alert)
    policy = GroupPolicy.of(endpoint)
    if policy is not None:
        groups: dict[str, list] = {}
        for alert, ctx in contexts:
            groups.setdefault(policy.label(alert), []).append((alert, ctx))
        for n, (label, members) in enumerate(groups.items()):
            group = GroupContext(webhook_id=f"msg_examplegroup{n}", event_id=f"example-group-{n}", endpoint=name,
                                 label=label, sent_at=sent_at, dashboard_url=dashboard_url,
                                 template=endpoint.group_template)
            kinds = ", ".join(alert.event_kind for alert, _ in members)
            parts.append(f"# a group notification ({label}: {kinds})\n"
                         f"{_pretty(render_group(endpoint.format, group, members))}")
    return f"# what endpoint {name!r} ({endpoint.format}) would be sent for an example episode; nothing was sent\n" + \
        "\n".join(parts)


def _not_sent(endpoint: EndpointSettings, alert: AlertRecord, sent_before: bool) -> str:
    """Why the endpoint would not be sent this event of the example episode, after what it was sent before; "" if
    it would."""
    if endpoint.events and alert.event_kind not in endpoint.events:
        return f"events = {endpoint.events}"
    if alert.status == "firing" and severity_rank(alert.severity) < SEVERITIES.index(endpoint.min_severity):
        return f"below min_severity = {endpoint.min_severity}; an escalation that reaches it is"
    if alert.status == "resolved" and not sent_before and endpoint.incident_id_from:
        return "nothing of its episode opened an incident here"
    if alert.escalated_from and sent_before and endpoint.incident_id_from and endpoint.update_template is None:
        return ("its incident is open: one incident an episode, and without update_template an escalation is not sent "
                "as an update of it")
    return ""


def _elsewhere(endpoint: EndpointSettings, alert: AlertRecord, ctx: DeliveryContext) -> str:
    """Where a resolve or an update goes when it does not go to the endpoint's url (a secret URL is named, not
    shown)."""
    if ctx.update:
        prefix, method, url = ", an update of the incident", endpoint.update_method, endpoint.update_url
    elif alert.status == "resolved":
        prefix, method, url = "", endpoint.resolve_method, ""
    else:
        return ""
    method = f", {method}" if method != "POST" else ""
    if not url and endpoint.resolve_url_env:
        return f"{prefix}{method or ','} to the URL in ${endpoint.resolve_url_env}"
    url = url or endpoint.resolve_url
    if url:
        return f"{prefix}{method or ','} to {fill_url(url, template_fields(alert, ctx))}"
    return prefix + (method and f"{method} to its url")


def fields_help() -> str:
    """The fields a template may name, with what each holds."""
    width = max(map(len, [*TEMPLATE_FIELDS, *GROUP_TEMPLATE_FIELDS]))
    lines = ["template fields (one alert event):"]
    lines += [f"  {{{name}}}".ljust(width + 5) + text for name, text in TEMPLATE_FIELDS.items()]
    lines += ["", "group_template fields (one notification of several events):"]
    lines += [f"  {{{name}}}".ljust(width + 5) + text for name, text in GROUP_TEMPLATE_FIELDS.items()]
    lines += ["", "filters, after the name ({name|filter|filter:arg}; any filter makes text):"]
    lines += [f"  |{name}".ljust(width + 5) + text for name, text in FILTERS.items()]
    lines += ["", "A placeholder alone in a string keeps the field's JSON type; inside text it is written as text. "
                  "{{ and }} are literal braces."]
    return "\n".join(lines)


def _pretty(body: bytes) -> str:
    return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
