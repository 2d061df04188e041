"""The wire formats of one alert event: native JSON, Slack, PagerDuty Events v2 and Alertmanager."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from alerts.formats import ALERTMANAGER_ALERTNAME, DeliveryContext, headline, render
from alerts.receiver import describe_payload
from stream.records import AlertRecord, format_time

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def make_alert(status: str = "firing", severity: str = "critical", **changes) -> AlertRecord:
    fields = dict(
        id="a7f3c2", status=status, key_type="topic", key="Energy | Oil", window_s=300,
        window_start=T0, window_end=T0 + timedelta(minutes=5), severity=severity,
        observed={"bearish_share": 0.71, "mean_score": -0.52, "count": 120},
        baseline={"bearish_share": 0.22, "bearish_share_std": 0.05, "mean_score": 0.04, "mean_score_std": 0.06},
        deviation=9.8, started_at=T0 + timedelta(minutes=5), emitted_at=T0 + timedelta(minutes=5, seconds=2),
        resolved_at=T0 + timedelta(minutes=30) if status == "resolved" else None,
        messages=({"id": "n1", "text": "Refinery fire <!channel> & <https://evil.example|click>", "sentiment_score": -0.97},
                  {"id": "c9", "text": "Crude collapses", "sentiment_score": -0.9}),
        summary="Bearish share on Energy | Oil jumped to 71% (baseline 22%)", model_version="m-20261122",
    )
    fields.update(changes)
    return AlertRecord(**fields)


def ctx(**changes) -> DeliveryContext:
    base = dict(webhook_id="msg_abc", event_id="a7f3c2:firing", endpoint="risk", attempt=2,
                sent_at="2026-11-22T12:05:03.000Z", dashboard_url="http://127.0.0.1:8501/")
    base.update(changes)
    return DeliveryContext(**base)


def rendered(fmt: str, alert: AlertRecord, context: DeliveryContext | None = None):
    return json.loads(render(fmt, alert, context or ctx()))


def test_native_carries_the_whole_record_and_delivery_metadata():
    alert = make_alert()
    body = rendered("native", alert)
    assert body["type"] == "finpulse.alert.firing"
    assert AlertRecord.from_dict(body["data"]) == alert
    assert body["delivery"] == {"webhook_id": "msg_abc", "event_id": "a7f3c2:firing", "endpoint": "risk",
                                "attempt": 2, "sent_at": "2026-11-22T12:05:03.000Z"}
    resolved = rendered("native", make_alert("resolved"))
    assert resolved["type"] == "finpulse.alert.resolved" and resolved["data"]["resolved_at"] == format_time(T0 + timedelta(minutes=30))


def test_slack_message_escapes_untrusted_text_and_links_to_the_dashboard():
    body = rendered("slack", make_alert())
    assert body["text"].startswith("FIRING [critical]")
    blocks = body["blocks"]
    assert blocks[0]["type"] == "header" and "Energy | Oil" in blocks[0]["text"]["text"]
    everything = json.dumps(blocks)
    assert "<!channel>" not in everything and "&lt;!channel&gt;" in everything
    assert "<https://evil.example" not in everything
    assert "Refinery fire" in everything and "Crude collapses" in everything
    assert "<http://127.0.0.1:8501/alerts?alert=a7f3c2|open in dashboard>" in blocks[-1]["elements"][0]["text"]
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in blocks[1]["fields"]}
    assert fields["*Bearish share*"] == "71% (baseline 22%)" and fields["*Severity*"] == "critical"
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in blocks)
    resolved = rendered("slack", make_alert("resolved"))
    assert resolved["text"].startswith("RESOLVED") and "Refinery fire" not in json.dumps(resolved)


def _card(body: dict) -> dict:
    (attachment,) = body["attachments"]
    assert body["type"] == "message" and attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    return card


def _elements(card: dict) -> list[dict]:
    """Every text element of the card, as (type, text, style): TextRuns inside RichTextBlocks, TextBlocks, facts."""
    out = []
    for element in card["body"]:
        if element["type"] == "RichTextBlock":
            out += [run for run in element["inlines"]]
        elif element["type"] == "TextBlock":
            out.append(element)
        elif element["type"] == "FactSet":
            out += [{"type": "Fact", "text": f"{f['title']}: {f['value']}"} for f in element["facts"]]
    return out


def test_teams_card_shows_untrusted_text_as_plain_runs_and_links_to_the_alert():
    alert = make_alert()
    card = _card(rendered("teams", alert))
    texts = _elements(card)
    title = texts[0]
    assert (title["type"], title["text"], title["color"]) == ("TextRun", "Negative sentiment spike: topic Energy | Oil",
                                                             "Attention")
    assert "Severity: critical" in [t["text"] for t in texts] and "Bearish share: 71% (baseline 22%)" in [
        t["text"] for t in texts]
    # Message text (a forged Slack link, a Markdown link) only ever in TextRuns, which Teams never reads as Markdown.
    hostile = make_alert(messages=({"id": "n1", "text": "Click [here](https://evil.example) **now**", "sentiment_score": -0.9},))
    runs = [t for t in _elements(_card(rendered("teams", hostile))) if "evil.example" in t["text"]]
    assert runs and all(t["type"] == "TextRun" for t in runs)
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Open in FinPulse",
                                "url": "http://127.0.0.1:8501/alerts?alert=a7f3c2"}]
    resolved = _card(rendered("teams", make_alert("resolved")))
    assert _elements(resolved)[0]["color"] == "Good" and _elements(resolved)[0]["text"].startswith("Resolved: ")
    assert not any("Refinery" in t["text"] for t in _elements(resolved))        # no excerpts on a resolve
    escalated = _card(rendered("teams", make_alert(severity="critical", escalated_from="warning")))
    assert _elements(escalated)[0]["text"] == "Escalated from warning to critical: topic Energy | Oil"
    ticker = _card(rendered("teams", make_alert(key_type="ticker", key="XOM", topic="Energy | Oil")))
    assert _elements(ticker)[0]["text"].endswith("ticker XOM (Energy | Oil)")
    assert "actions" not in _card(rendered("teams", alert, ctx(dashboard_url="")))


def test_pagerduty_trigger_and_resolve_share_the_dedup_key():
    trigger = rendered("pagerduty", make_alert(), ctx(routing_key="R0UT1NGKEY"))
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "a7f3c2"
    assert trigger["routing_key"] == "R0UT1NGKEY"
    payload = trigger["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "finpulse/topic/Energy | Oil"
    assert len(payload["summary"]) <= 1024 and payload["timestamp"] == format_time(T0 + timedelta(minutes=5))
    assert payload["custom_details"]["observed"]["count"] == 120
    assert trigger["links"][0]["href"] == "http://127.0.0.1:8501/alerts?alert=a7f3c2"
    resolve = rendered("pagerduty", make_alert("resolved"), ctx(routing_key="R0UT1NGKEY"))
    assert resolve == {"routing_key": "R0UT1NGKEY", "dedup_key": "a7f3c2", "event_action": "resolve"}
    long = rendered("pagerduty", make_alert(key="X" * 2000))
    assert len(long["payload"]["summary"]) == 1024


def test_alertmanager_labels_are_stable_from_firing_to_resolved():
    firing = rendered("alertmanager", make_alert(severity="critical"))
    # The resolve ends the label sets the endpoint was sent, whatever severity it carries itself.
    resolved = rendered("alertmanager", make_alert("resolved", severity="info"), ctx(sent_severities=("critical",)))
    assert isinstance(firing, list) and len(firing) == 1
    assert firing[0]["labels"] == resolved[0]["labels"]
    assert firing[0]["labels"]["alertname"] == ALERTMANAGER_ALERTNAME and firing[0]["labels"]["severity"] == "critical"
    assert firing[0]["startsAt"] == resolved[0]["startsAt"] == format_time(T0 + timedelta(minutes=5))
    assert resolved[0]["endsAt"] == format_time(T0 + timedelta(minutes=30))
    assert firing[0]["endsAt"] > resolved[0]["endsAt"]   # firing: far in the future, until the resolve arrives
    assert firing[0]["generatorURL"] == "http://127.0.0.1:8501/alerts?alert=a7f3c2"
    assert firing[0]["annotations"]["observed_bearish_share"] == "0.710"
    assert all(isinstance(v, str) for v in {**firing[0]["labels"], **firing[0]["annotations"]}.values())
    assert "generatorURL" not in rendered("alertmanager", make_alert(), ctx(dashboard_url=""))[0]


def test_headline_and_unknown_format():
    assert headline(make_alert()) == ("FIRING [critical] negative sentiment spike on topic Energy | Oil: bearish share "
                                      "71% vs baseline 22%, mean score -0.52 vs +0.04 (5 min window)")
    assert "?" in headline(make_alert(observed={}, baseline={}))
    with pytest.raises(ValueError):
        render("carrier-pigeon", make_alert(), ctx())


def test_a_ticker_alert_says_which_topic_moves_the_ticker_in_every_format():
    xom = make_alert(key_type="ticker", key="XOM", topic="Energy | Oil")
    assert "negative sentiment spike on ticker XOM (Energy | Oil):" in headline(xom)
    assert rendered("slack", xom)["blocks"][0]["text"]["text"] == "Negative sentiment spike: ticker XOM (Energy | Oil)"
    assert rendered("pagerduty", xom, ctx(routing_key="R" * 32))["payload"]["custom_details"]["topic"] == "Energy | Oil"
    assert rendered("alertmanager", xom)[0]["labels"]["topic"] == "Energy | Oil"
    assert rendered("native", xom)["data"]["topic"] == "Energy | Oil"
    # One from before alerts carried a topic: no topic label appears (labels never change within an episode).
    older = make_alert(key_type="ticker", key="XOM")
    assert "topic" not in rendered("alertmanager", older)[0]["labels"] and "spike on ticker XOM:" in headline(older)


def test_a_replays_alert_is_told_apart_from_the_live_one_by_its_run_id():
    live, replayed = make_alert(), make_alert(run_id="energy-v2")
    assert (live.event_id, replayed.event_id) == ("a7f3c2:firing", "a7f3c2@energy-v2:firing")
    assert rendered("pagerduty", live)["dedup_key"] == "a7f3c2"
    assert rendered("pagerduty", replayed)["dedup_key"] == "a7f3c2@energy-v2"
    assert "run_id" not in rendered("alertmanager", live)[0]["labels"]
    assert rendered("alertmanager", replayed)[0]["labels"]["run_id"] == "energy-v2"


# ---------------------------------------------------------------- escalation

def escalation(**changes) -> AlertRecord:
    """The episode ``a7f3c2`` (fired as info) escalated to critical by a later, worse window."""
    return make_alert(severity="critical", escalated_from="info", window_start=T0 + timedelta(minutes=10),
                      window_end=T0 + timedelta(minutes=15), emitted_at=T0 + timedelta(minutes=15, seconds=2),
                      summary="Escalated from info to critical on topic Energy | Oil", **changes)


def test_an_escalation_is_its_own_event_of_the_same_episode():
    up = escalation()
    assert (up.status, up.event_kind, up.episode_id) == ("firing", "escalation", "a7f3c2")
    assert up.event_id == "a7f3c2:firing:critical" and up.event_id_of("firing") == make_alert().event_id
    assert up.firing_event_ids() == ("a7f3c2:firing", "a7f3c2:firing:warning", "a7f3c2:firing:critical")
    replayed = escalation(run_id="energy-v2")
    assert replayed.event_id == "a7f3c2@energy-v2:firing:critical"
    assert AlertRecord.from_json(up.to_json()) == up
    # A record written before escalation existed reads as a plain firing.
    older = {k: v for k, v in make_alert().to_dict().items() if k != "escalated_from"}
    assert AlertRecord.from_dict(older).event_kind == "firing"


def test_native_and_the_receiver_say_an_escalation_explicitly():
    body = rendered("native", escalation(), ctx(event_id="a7f3c2:firing:critical"))
    assert body["type"] == "finpulse.alert.escalated"
    assert body["data"]["status"] == "firing" and body["data"]["severity"] == "critical"
    assert body["data"]["escalated_from"] == "info" and body["delivery"]["event_id"] == "a7f3c2:firing:critical"
    assert rendered("native", make_alert())["data"]["escalated_from"] == ""
    assert describe_payload(body).startswith("ESCALATED [info → critical] topic 'Energy | Oil'")
    assert describe_payload(rendered("native", make_alert())).startswith("FIRING [critical]")


def test_headline_and_slack_say_from_what_to_what():
    assert headline(escalation()).startswith("ESCALATED [info → critical] negative sentiment spike on topic Energy | Oil")
    body = rendered("slack", escalation())
    assert body["text"].startswith("ESCALATED [info → critical]")
    assert body["blocks"][0]["text"]["text"] == "Escalated from info to critical: topic Energy | Oil"
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in body["blocks"][1]["fields"]}
    assert fields["*Severity*"] == "info → critical"
    assert "Refinery fire" in json.dumps(body)          # the worse window's messages


def test_pagerduty_escalation_is_a_trigger_on_the_same_dedup_key_with_the_new_severity():
    first = rendered("pagerduty", make_alert(severity="info"), ctx(routing_key="R0UT1NGKEY"))
    up = rendered("pagerduty", escalation(), ctx(routing_key="R0UT1NGKEY"))
    assert (up["event_action"], up["dedup_key"]) == ("trigger", first["dedup_key"])
    assert (first["payload"]["severity"], up["payload"]["severity"]) == ("info", "critical")
    assert up["payload"]["summary"].startswith("ESCALATED [info → critical]")
    assert up["payload"]["custom_details"]["escalated_from"] == "info"
    assert "escalated_from" not in first["payload"]["custom_details"]


def test_alertmanager_escalation_ends_the_old_severity_and_the_resolve_ends_every_one_sent():
    firing = rendered("alertmanager", make_alert(severity="info"))
    up = rendered("alertmanager", escalation(), ctx(sent_severities=("info",)))
    assert len(up) == 2
    ended, opened = up
    # Only severity tells the two label sets apart: the alert's identity (alert_id, key, window) stays.
    assert ended["labels"] == firing[0]["labels"]
    assert opened["labels"] == {**firing[0]["labels"], "severity": "critical"}
    assert ended["endsAt"] == format_time(T0 + timedelta(minutes=15)) and ended["annotations"]["superseded_by"] == "critical"
    assert opened["endsAt"] == firing[0]["endsAt"] and opened["startsAt"] == firing[0]["startsAt"]
    assert opened["annotations"]["escalated_from"] == "info"
    # An endpoint that skipped the info firing (min_severity) gets the critical alert only.
    (alone,) = rendered("alertmanager", escalation(), ctx())
    assert alone["labels"] == opened["labels"]
    resolved = rendered("alertmanager", make_alert("resolved", severity="critical"), ctx(sent_severities=("info", "critical")))
    assert [r["labels"]["severity"] for r in resolved] == ["info", "critical"]
    assert {r["endsAt"] for r in resolved} == {format_time(T0 + timedelta(minutes=30))}
    (only_critical,) = rendered("alertmanager", make_alert("resolved", severity="critical"), ctx(sent_severities=("critical",)))
    assert only_critical["labels"] == opened["labels"]


def test_a_teams_endpoint_gets_the_card_over_http(fp_settings, topics, monkeypatch):
    """A real dispatcher posting to a real receiver standing in for the Teams Workflows URL (given in url_env, as
    the config requires: the real one carries its signature in the query)."""
    from alerts.deliveries import DELIVERED, delivery_key
    from alerts.receiver import Receiver, ReceiverOptions
    from alerts.signing import generate_secret
    from tests.test_delivery import dispatch_until_settled, produce
    from tests.test_delivery import make_alert as fresh_alert

    secret = generate_secret()
    monkeypatch.setenv("T_TEAMS_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))

    def settings_for(port):
        monkeypatch.setenv("T_TEAMS_URL", f"http://127.0.0.1:{port}/teams?sig=abc")
        return fp_settings.with_overrides({"alerts": {"dashboard_url": "http://dash.example", "endpoints": [
            {"name": "teams", "format": "teams", "url_env": "T_TEAMS_URL", "secret_env": "T_TEAMS_SECRET",
             "allow_private": True}]}})

    produce(fp_settings, topics.alerts, [fresh_alert("firing", id="tm", key="Rates", severity="warning")])
    states = dispatch_until_settled(topics, receiver, 1, settings_for)
    assert states[delivery_key("tm:firing", "teams")].state == DELIVERED
    (item,) = receiver.items
    card = _card(item["payload"])
    assert _elements(card)[0]["text"] == "Negative sentiment spike: topic Rates" and _elements(card)[0]["color"] == "Warning"
    assert card["actions"][0]["url"] == "http://dash.example/alerts?alert=tm"
