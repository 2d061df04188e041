"""``finpulse dispatch --test NAME``: a test alert sent for real to one endpoint, to prove the wiring end to end.

``--check`` stops at the TLS handshake and ``--preview`` sends nothing: neither shows that the tool at the other end
takes the body, the signature or the token. The test sends a test episode, marked as one in every text a tool
shows (its key is "FinPulse test", its summary says nothing is wrong), as the endpoint would get a real one: its
firing, an escalation where the endpoint updates the incident it opened (``update_template``), then its resolve so
that a tool that opened an incident closes it again, each rendered in the endpoint's
format (a group notification when the endpoint groups) and sent by the dispatcher's own sender (the address guard,
TLS, proxy, headers, signing, a ``resolve_url``, the incident id the firing's answer named). Each gets one attempt,
and what the endpoint answered is printed.

The endpoint's ``events`` are kept (an endpoint that takes firings only is sent the firing only); its severity and
key filters, silences and inhibition are not: the test alert has the endpoint's ``min_severity`` and is sent
because it was asked for. Nothing is written to Kafka (it need not run), so ``--status`` never lists a test, and
each run's alert has an id of its own: a tool that deduplicates sees a new incident each time.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from typing import Callable

from stream.config import ConfigError
from stream.records import SEVERITIES, AlertRecord, format_time, utcnow

from .attempts import Outcome, WebhookSender
from .endpoints import AlertDeliveryConfig, Endpoint
from .formats import DeliveryContext, GroupContext, body_template, render, render_group
from .preview import example_episode

TEST_KEY = "FinPulse test"


def trial_episode(severity: str, escalating: bool = False) -> list[AlertRecord]:
    """A firing and its resolve, at ``severity``, saying in their texts that they are a test; ``escalating``: an
    escalation to the next severity between them, where there is one."""
    firing, escalation, resolved = example_episode()
    marked = dict(id=f"test-{secrets.token_hex(6)}", key_type="topic", key=TEST_KEY, topic=TEST_KEY,
                  severity=severity, emitted_at=utcnow())
    note = "nothing is wrong: this is a test notification from `finpulse dispatch --test`"
    firing = replace(firing, **marked, started_at=utcnow(), summary=f"Test alert: {note}",
                     messages=({"id": "test-1", "kind": "news", "text": "A test message: no market moved",
                                "sentiment_score": -0.5},))
    higher = SEVERITIES[SEVERITIES.index(severity) + 1:]
    escalated = [replace(firing, severity=higher[0], escalated_from=severity,
                         summary=f"Test alert escalated to {higher[0]}: {note}")] if escalating and higher else []
    resolved = replace(resolved, **{**marked, "severity": escalated[-1].severity if escalated else severity},
                       resolved_at=utcnow(), summary=f"Test alert resolved: {note}")
    return [firing, *escalated, resolved]


async def send_trial(config: AlertDeliveryConfig, name: str, resolve_after_s: float,
                    out: Callable[[str], None] = print) -> int:
    """Send the test episode to endpoint ``name``; 0 when the endpoint took every request, 1 otherwise."""
    settings = next((e for e in config.endpoints if e.name == name), None)
    if settings is None:
        raise ConfigError(f"no endpoint named {name!r} (endpoints: {', '.join(e.name for e in config.endpoints) or 'none'})")
    endpoint = Endpoint(settings)
    episode = [alert for alert in trial_episode(settings.min_severity, endpoint.sends_updates)
               if endpoint.wants(alert)]
    out(f"sending test alert {episode[0].id if episode else '-'} to {name!r} ({endpoint.format}, "
        f"{endpoint.display_url}): {', '.join(a.event_kind for a in episode) or 'nothing: its events take neither'}")
    sender = WebhookSender()
    sender.open()
    failed, incident_id, delivered = 0, "", []
    try:
        for n, alert in enumerate(episode):
            if n and not failed and resolve_after_s > 0:   # nothing opened: go on
                doing = "resolving" if alert.status == "resolved" else "updating"
                out(f"  {doing} in {resolve_after_s:g} s (the tool may need a moment to open what it was sent)")
                try:
                    await asyncio.sleep(resolve_after_s)
                except asyncio.CancelledError:   # Ctrl-C
                    out(f"  stopped before the {alert.event_kind}: test alert {alert.id} stays open at {name!r} if it "
                        f"opened there; close it there")
                    raise
            # As a delivery would be sent after these: an update only of what was opened.
            sent = tuple(a.severity for a in delivered) or ((alert.severity,) if alert.status == "resolved" else ())
            update = endpoint.updates(alert, bool(delivered))
            outcome, webhook_id = await _send(sender, endpoint, alert, config.options.dashboard_url, incident_id,
                                              sent, update)
            if outcome.ok:
                delivered.append(alert)
            failed += not outcome.ok
            incident_id = incident_id or outcome.incident_id
            opened = endpoint.opens_incidents and alert.status == "firing" and not update
            named = (f", incident {outcome.incident_id}" if outcome.incident_id else
                     f", but nothing at {settings.incident_id_from} in its answer" if outcome.ok and opened else "")
            out(f"  {alert.event_kind:<9} {_said(outcome)}{named} (webhook-id {webhook_id})")
    finally:
        await sender.close()
    if failed:
        out(f"{failed} of {len(episode)} not taken; a real alert would be retried on 408, 425, 429, 5xx and "
            f"timeouts, not on the others")
    return 1 if failed else 0


async def _send(sender: WebhookSender, endpoint: Endpoint, alert: AlertRecord, dashboard_url: str,
                incident_id: str, sent_before: tuple[str, ...], update: bool) -> tuple[Outcome, str]:
    webhook_id = f"msg_{alert.id.replace('-', '_')}_{alert.event_kind}"
    sent_at = format_time(utcnow())
    ctx = DeliveryContext(webhook_id=webhook_id, event_id=alert.event_id, endpoint=endpoint.name, sent_at=sent_at,
                          dashboard_url=dashboard_url,
                          routing_key=endpoint.routing_key.reveal() if endpoint.routing_key else "",
                          sent_severities=sent_before, update=update,
                          template=body_template(endpoint.settings, alert, update), incident_id=incident_id)
    try:
        url = endpoint.url_for(alert, ctx) if endpoint.grouping is None else None
    except ValueError as exc:   # a resolve or an update with no incident named: a delivery records the same
        return Outcome(ok=False, retryable=False, error=str(exc)), webhook_id
    try:
        if endpoint.grouping is None:
            body = render(endpoint.format, alert, ctx)
        else:
            group = GroupContext(webhook_id=webhook_id, event_id=f"{alert.event_id}:test-group", endpoint=endpoint.name,
                                 label=endpoint.grouping.label(alert), sent_at=sent_at, dashboard_url=dashboard_url,
                                 template=endpoint.settings.group_template)
            body = render_group(endpoint.format, group, [(alert, ctx)])
    except Exception as exc:  # noqa: BLE001 - say it, as a delivery would record it
        return Outcome(ok=False, retryable=False, error=f"cannot render the {endpoint.format} body: "
                                                        f"{type(exc).__name__}: {endpoint.scrub(str(exc))}"), webhook_id
    return await sender.send(endpoint, webhook_id, body, url, endpoint.method_for(alert, ctx),
                             endpoint.opens_incident_with(alert, ctx)), webhook_id


def _said(outcome: Outcome) -> str:
    if outcome.ok:
        return f"taken: HTTP {outcome.status}"
    retry = f", Retry-After {outcome.retry_after:g} s" if outcome.retry_after is not None else ""
    return f"NOT taken: {outcome.error}{retry}"
