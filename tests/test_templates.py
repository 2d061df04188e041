"""The ``template`` format: a body written in the config for tools FinPulse has no format for. The language (fields,
types, escapes), what the config refuses, and delivery over real HTTP by a real dispatcher from a real broker."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import pytest

from alerts.deliveries import DELIVERED, FAILED, delivery_key, webhook_id
from alerts.endpoints import Endpoint, load_delivery_config
from alerts.formats import (GROUP_TEMPLATE_FIELDS, TEMPLATE_FIELDS, GroupContext, group_template_fields, render,
                            render_group, template_fields)
from alerts.receiver import Receiver, ReceiverOptions
from alerts.templates import at_json_pointer
from alerts.signing import generate_secret
from stream.config import ConfigError, Settings, load_settings
from tests.test_formats import ctx, make_alert

GOOGLE_CHAT = {"text": "*{title}*\n{summary}\n{messages_text}\n<{dashboard_link}|Open in FinPulse>"}


def endpoint_config(**endpoint):
    table = {"name": "chat", "url": "https://chat.example.com/hook", "format": "template", **endpoint}
    return load_delivery_config(Settings(raw={"alerts": {"endpoints": [table]}})).endpoints[0]


def rendered(template, alert=None, **context):
    checked = endpoint_config(template=template).template
    return json.loads(render("template", alert or make_alert(), ctx(template=checked, **context)))


def test_a_placeholder_alone_keeps_its_type_and_inside_text_becomes_text():
    body = rendered({"share": "{observed_bearish_share}", "count": "{observed_count}", "messages": "{messages}",
                     "resolved": "{resolved_at}", "line": "{key}: {observed_bearish_share} of {observed_count}, "
                     "resolved {resolved_at}.", "list": "{messages_text}", "fixed": [1, True, None, "{severity}"],
                     "braces": "{{not a field}} {{{severity}}}"})
    assert body["share"] == 0.71 and body["count"] == 120 and body["resolved"] is None
    assert [m["id"] for m in body["messages"]] == ["n1", "c9"]
    assert body["line"] == "Energy | Oil: 0.71 of 120, resolved ."
    assert body["list"] == "-0.97  Refinery fire <!channel> & <https://evil.example|click>\n-0.90  Crude collapses"
    assert body["fixed"] == [1, True, None, "critical"]
    assert body["braces"] == "{not a field} {critical}"


def test_filters_make_text_cut_it_to_a_tools_limit_and_fill_what_is_empty():
    body = rendered({"count": "{observed_count|text}", "deviation": "{deviation|text}",
                     "cut": "{messages_text|max:20}", "short": "{key|max:20}", "edge": "{key|max:12}",
                     "resolved": "{resolved_at|default:still firing}", "topic": "{topic|default:-|max:3}",
                     "both": "[{resolved_at|default:open}] {escalated_from|default:first}"})
    assert body["count"] == "120" and body["deviation"] == "9.8"
    assert body["cut"] == "-0.97  Refinery fir…" and len(body["cut"]) == 20
    assert body["short"] == "Energy | Oil" and body["edge"] == "Energy | Oil"
    assert body["resolved"] == "still firing" and body["topic"] == "En…"
    assert body["both"] == "[open] first"


def test_map_turns_a_value_into_a_tools_own_word():
    body = rendered({"priority": "{severity|map:critical=P1,warning=P3,*=P5}", "kept": "{severity|map:info=P5}",
                     "state": "{status|map:firing=CRITICAL,resolved=RECOVERY}",
                     "chained": "{escalated_from|default:none|map:none=first}",
                     "spaced": "{severity|map: warning = P3 , critical = P1 }", "free": "{key|map:Energy=E}"})
    assert body == {"priority": "P1", "kept": "critical", "state": "CRITICAL", "chained": "first", "spaced": "P1",
                    "free": "Energy | Oil"}


def test_a_resolve_url_takes_fields_in_its_path_and_query_percent_encoded():
    from alerts.templates import fill_url

    url = endpoint_config(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/alerts/{key}/close?"
                          "by={key_type}&t=%7Bx%7D").resolve_url
    assert fill_url(url, {"key": "Energy | Oil/..?#&=%", "key_type": "topic"}) == \
        "https://chat.example.com/alerts/Energy%20%7C%20Oil%2F..%3F%23%26%3D%25/close?by=topic&t=%7Bx%7D"
    # A value that makes a whole path segment "." or ".." is written %2E: a client would resolve the segment.
    assert fill_url(url, {"key": "..", "key_type": "."}) == "https://chat.example.com/alerts/%2E%2E/close?by=.&t=%7Bx%7D"
    # Query parameters named like secrets may take a field (it is no secret), and others any literal value.
    assert endpoint_config(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/{alert_id}/close?"
                           "identifierType=alias&token={episode_id}&keyword=x").resolve_url


def test_text_from_a_message_cannot_leave_its_string():
    alert = make_alert(messages=({"id": "x", "text": '", "severity": "info", "x": "', "sentiment_score": -0.5},),
                       summary='"}]} {"injected": true')
    body = rendered({"text": "{summary} {messages_text}", "severity": "{severity}"}, alert)
    assert body == {"text": '"}]} {"injected": true -0.50  ", "severity": "info", "x": "', "severity": "critical"}


def test_a_key_named_like_a_secret_may_take_a_field_but_never_a_literal_value():
    assert rendered({"routing_key": "{alert_id}", "token_count": "{observed_count}", "project": {"key": "RISK"}}) == {
        "routing_key": "a7f3c2", "token_count": 120, "project": {"key": "RISK"}}
    with pytest.raises(ConfigError) as caught:
        endpoint_config(template={"password": "hunter2 {key}x"} | {"token": "hunter2"})
    assert "token looks like it carries a secret" in str(caught.value) and "hunter2" not in str(caught.value)


def test_a_google_chat_template_and_json_text_give_the_same_body():
    as_table = rendered(GOOGLE_CHAT)
    as_text = rendered(json.dumps(GOOGLE_CHAT))
    assert as_table == as_text
    assert as_table["text"].startswith("*Negative sentiment spike: topic Energy | Oil*\nBearish share on Energy")
    assert as_table["text"].endswith("<http://127.0.0.1:8501/alerts?alert=a7f3c2|Open in FinPulse>")


def test_every_documented_field_is_filled_and_no_other():
    alert = make_alert(escalated_from="warning")
    assert template_fields(alert, ctx()).keys() == TEMPLATE_FIELDS.keys()
    group = GroupContext(webhook_id="msg_g", event_id="g1", endpoint="chat", label="all")
    fields = group_template_fields(group, [(alert, ctx()), (make_alert("resolved"), ctx())])
    assert fields.keys() == GROUP_TEMPLATE_FIELDS.keys()
    assert fields["counts"] == {"escalation": 1, "resolved": 1} and fields["counts_text"] == "1 escalated, 1 resolved"
    assert [f["event"] for f in fields["alerts"]] == ["escalation", "resolved"]


def test_a_group_template_lists_every_event_most_severe_first():
    checked = endpoint_config(template=GOOGLE_CHAT, group_by=["all"],
                              group_template={"text": "{title}: {counts_text}\n{lines}", "ids": "{alerts}"})
    group = GroupContext(webhook_id="msg_g", event_id="g1", endpoint="chat", label="all", template=checked.group_template)
    members = [(make_alert("firing", severity="info", id="a1"), ctx()), (make_alert("resolved", id="a2"), ctx()),
               (make_alert("firing", severity="critical", id="a3"), ctx())]
    body = json.loads(render_group("template", group, members))
    title, *lines = body["text"].split("\n")
    assert title == "FinPulse: 3 alert events: 2 firing, 1 resolved"
    assert [line.split(" negative")[0] for line in lines] == ["FIRING [critical]", "FIRING [info]", "RESOLVED [critical]"]
    assert [a["alert_id"] for a in body["ids"]] == ["a1", "a2", "a3"]


@pytest.mark.parametrize("endpoint, refusal", [
    (dict(), "a template endpoint needs template"),
    (dict(template={"text": "{headlines}"}), "{headlines} is not a field (fields: alert_id, episode_id, event_id"),
    (dict(template={"text": "{key} {"}), "a lone '{' in '{key} {'"),
    (dict(template={"text": "}"}), "a lone '}'"),
    (dict(template={"text": "x" * 500 + "}"}), "a lone '}' in '" + "x" * 79 + "…'"),
    (dict(template={"text": "{key-type}"}), "{key-type} does not name a field: a field is a name of letters"),
    (dict(template={"text": "{deviation:.1f}"}), "{deviation:.1f} does not name a field"),
    (dict(template={"text": "{key|upper}"}), "{key|upper}: 'upper' is not a filter (filters: |text, |max:N"),
    (dict(template={"text": "{key|max:0}"}), "'max:0' is not a filter"),
    (dict(template={"{key}": "{headline}"}), "the key '{key}' holds a brace: keys are the template's own"),
    (dict(template={"auth": {"apiKey": "AKIA1234SECRET"}, "text": "{headline}"}),
     "apiKey looks like it carries a secret, and secrets never go in the config"),
    (dict(template='{"text": "{headline}"'), "a template given as a string is JSON text, and this is not"),
    (dict(template="{headline}"), "write a TOML table: template = { text = \"{headline}\" }"),
    (dict(template='{"a": "{key}", "a": "{severity}"}'), "gives the key(s) ['a'] twice"),
    (dict(template="[]"), "the body must be a non-empty JSON object or array"),
    (dict(template='"{headline}"'), "the body must be a non-empty JSON object or array"),
    (dict(template={"at": datetime(1979, 5, 27, 7, 32, tzinfo=timezone.utc), "text": "{key}"}),
     "a value JSON cannot carry (Object of type datetime is not JSON serializable)"),
    (dict(template={"x": float("nan")}), "a value JSON cannot carry (Out of range float values"),
    (dict(template='{"text": "\\ud800 {key}"}'), "a value JSON cannot carry ("),
    (dict(template=GOOGLE_CHAT, group_by=["all"]), "a grouped template endpoint needs group_template"),
    (dict(template=GOOGLE_CHAT, group_template={"text": "{lines}"}), "group_template is only sent with group_by"),
    (dict(template=GOOGLE_CHAT, group_by=["all"], group_template={"text": "{headline}"}),
     "group_template: {headline} is not a field (fields: title, label"),
    (dict(format="slack", url_env="T_SLACK", template=GOOGLE_CHAT), "template only means something with format"),
    (dict(template={"p": "{severity|map:critical}"}), "map takes name=value pairs separated by commas "
                                                      "(critical=P1,warning=P3,*=P5), not 'critical'"),
    (dict(template={"p": "{severity|map:critical=P1,}"}), "not ''"),
    (dict(template={"p": "{severity|map:critical=P1=P2}"}), "not 'critical=P1=P2'"),
    (dict(template={"p": "{severity|map:critical=P1,critical=P2}"}), "map gives 'critical' twice"),
    (dict(template={"p": "{severity|map:critcal=P1,*=P5}"}),
     "{severity|map:critcal=P1,*=P5}: severity is never 'critcal' (its values: 'info', 'warning', 'critical')"),
    (dict(template={"p": "{status|map:Firing=ALERT}"}), "status is never 'Firing'"),
    (dict(format="native", secret_env="T_S", resolve_url="https://chat.example.com/close"),
     "resolve_url only means something with format"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://{key}.example.com/close"),
     "resolve_url: {fields} may fill only a URL's path and query; its scheme, host and port are written out"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com{key}/close"), "may fill only a URL's path"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/{alertid}/close"),
     "resolve_url: {alertid} is not a field"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/{alert_id}/close}"), "'}' in the URL: a URL takes {name} for a field, and %7B / %7D for a brace"),
    (dict(template=GOOGLE_CHAT, resolve_url="ftp://chat.example.com/{alert_id}"), "the url must be http:// or https://"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://other.example.com/{alert_id}/close"),
     "resolve_url must be on url's scheme, host and port (https://chat.example.com/…), not https://other.example.com/…"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com:8443/{alert_id}/close"),
     "resolve_url must be on url's scheme, host and port"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/close", resolve_url_env="T_CLOSE"),
     "set resolve_url or resolve_url_env, not both"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/close", group_by=["all"],
          group_template={"text": "{lines}"}), "resolve_url cannot go with group_by"),
    (dict(template=GOOGLE_CHAT, resolve_template={"note": "{summary}"}, events=["firing", "escalation"]),
     "resolve_template is for resolves, and events = ['firing', 'escalation'] takes none; add \"resolved\" to "
     "events or remove it"),
    (dict(template=GOOGLE_CHAT, resolve_template={"note": "{counts_text}"}), "resolve_template: {counts_text} is not"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/{alert_id}/close?apiKey=LITERALKEY1"),
     "resolve_url carries a secret in its query (apiKey=), so it is a secret and never a value in the config: put "
     "the URL in an environment variable and name that in resolve_url_env (value not shown)"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://u:LITERALPASSWORD@chat.example.com/{alert_id}/close"),
     "resolve_url carries credentials (user:password@)"),
    (dict(template=GOOGLE_CHAT, url="https://chat.example.com/v1/spaces/S/messages?key=K&token=LITERALTOKEN"),
     "url carries a secret in its query (key, token=), so it is a secret and never a value in the config: put the "
     "URL in an environment variable and name that in url_env"),
    (dict(format="native", secret_env="T_S", incident_id_from="/id"), "incident_id_from only means something with"),
    (dict(format="native", secret_env="T_S", resolve_method="PATCH"), "resolve_method only means something with"),
    (dict(template=GOOGLE_CHAT, resolve_method="DELETE"), "resolve_method must be one of POST, PUT, PATCH, not 'DELETE'"),
    (dict(template=GOOGLE_CHAT, incident_id_from="result.sys_id"),
     "incident_id_from: 'result.sys_id' is not a JSON pointer into the answer: write it as \"/result/sys_id\""),
    (dict(template=GOOGLE_CHAT, incident_id_from="/a~2b"), "is not a JSON pointer"),
    (dict(template=GOOGLE_CHAT, resolve_url="https://chat.example.com/incident/{incident_id}"),
     "resolve_url fill {incident_id}, which comes from the answer to the firing: set incident_id_from, a JSON "
     "pointer to it"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", group_by=["all"], group_template={"text": "{lines}"}),
     "incident_id_from cannot go with group_by"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", events=["firing"]),
     "incident_id_from reads the answer to a firing for its resolve, and events = ['firing'] does not take both"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/result/sys_id/"), "is not a JSON pointer"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/close/{episode_id}"),
     "incident_id_from is read for the resolve, and neither resolve_url nor resolve_template fills {incident_id}: "
     "the resolve would go to url and open another incident"),
    (dict(template=GOOGLE_CHAT, resolve_method="PATCH"),
     "resolve_method = \"PATCH\" updates a record at its own URL: set resolve_url"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", min_severity="critical", events=["firing", "resolved"],
          resolve_url="https://chat.example.com/incident/{incident_id}"),
     "with min_severity = \"critical\", an episode that fires lower opens its incident here when it escalates, and "
     "events = ['firing', 'resolved'] leaves escalations out: add \"escalation\""),
    # An update of the open incident on an escalation: it needs the incident's id, a body, and somewhere to go.
    (dict(template=GOOGLE_CHAT, update_template={"urgency": "1"}),
     "update_template is for updating the incident an episode opened, and without incident_id_from nothing names "
     "it: set incident_id_from"),
    (dict(format="native", secret_env="T_S", update_template={"urgency": "1"}),
     "update_template only means something with format = \"template\""),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_method="PATCH"), "update_method without update_template, the update's body: set it"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, update_method="DELETE"),
     "update_method must be one of POST, PUT, PATCH, not 'DELETE'"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, events=["firing", "resolved"]),
     "update_template is sent for escalations, and events = ['firing', 'resolved'] takes none"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_template={"id": "{incident_id}"},
          update_template={"urgency": "1"}),
     "update_template needs update_url, where the update goes (e.g. \".../incident/{incident_id}\"), or a "
     "resolve_url it goes to"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, update_url="https://chat.example.com/notes/{episode_id}"),
     "neither update_url nor update_template fills {incident_id}: the update could not say which incident"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, update_url="https://elsewhere.example.com/incident/{incident_id}"),
     "update_url must be on url's scheme, host and port (https://chat.example.com/…), not "
     "https://elsewhere.example.com/…"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "{severty}"}), "update_template: {severty} is not"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, update_url="https://chat.example.com/i/{incident_id}?token=LITERALTOKEN"),
     "update_url carries a secret in its query (token=), so it is a secret and never a value in the config: updates "
     "to a URL that carries a secret go to the resolve's: put that URL in resolve_url_env and leave update_url out"),
    (dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_url="https://chat.example.com/incident/{incident_id}",
          update_template={"urgency": "1"}, min_severity="critical"),
     "with min_severity = \"critical\" the escalation that opens it is the highest: nothing is ever updated"),
])
def test_the_config_refuses_a_template_that_cannot_work(endpoint, refusal):
    with pytest.raises(ConfigError) as caught:
        endpoint_config(**endpoint)
    assert refusal in str(caught.value) and "LITERAL" not in str(caught.value)


def test_a_template_comes_from_the_config_file_as_a_table_or_json_text_and_from_the_environment(tmp_path):
    config = tmp_path / "finpulse.toml"
    config.write_text('''
[[alerts.endpoints]]
name = "chat"
url = "https://chat.example.com/hook"
format = "template"
template = { text = "{headline}", thread = { threadKey = "{alert_id}" } }

[[alerts.endpoints]]
name = "hec"
url = "https://splunk.example.com:8088/services/collector/event"
format = "template"
headers_env = { Authorization = "T_SPLUNK_AUTH" }
template = \'\'\'
{"sourcetype": "finpulse:alert", "time": "{emitted_at}", "event": "{alert}"}
\'\'\'
''')
    chat, hec = load_delivery_config(load_settings(config, {})).endpoints
    assert chat.template == {"text": "{headline}", "thread": {"threadKey": "{alert_id}"}}
    assert hec.template == {"sourcetype": "finpulse:alert", "time": "{emitted_at}", "event": "{alert}"}
    environ = {"FINPULSE_ALERTS__ENDPOINTS": json.dumps([
        {"name": "discord", "url": "https://discord.example.com/api/webhooks/1", "format": "template",
         "template": {"content": "{headline}", "allowed_mentions": {"parse": []}}}])}
    (discord,) = load_delivery_config(load_settings(config, environ)).endpoints
    assert discord.template == {"content": "{headline}", "allowed_mentions": {"parse": []}}


def test_template_endpoints_get_their_bodies_over_http(fp_settings, topics, monkeypatch):
    """A real dispatcher, reading alerts from the real broker, posts to a real receiver: one endpoint sends each event
    in its template (signed), another groups them under its group_template, a third takes firings only."""
    from tests.test_delivery import produce, serve_and_dispatch
    from tests.test_delivery import make_alert as fresh_alert
    from tests.test_grouping import settled

    secret = generate_secret()
    monkeypatch.setenv("T_TEMPLATE_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
    firing = fresh_alert("firing", id="tp", key="Rates", severity="warning")
    resolved = fresh_alert("resolved", id="tp", key="Rates", severity="warning")
    produce(fp_settings, topics.alerts, [firing, resolved])

    def settings_for(port):
        common = {"format": "template", "secret_env": "T_TEMPLATE_SECRET", "allow_private": True,
                  "template": {"text": "{headline}", "id": "{event_id}", "deviation": "{deviation}"}}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "endpoints": [
            {"name": "each", "url": f"http://127.0.0.1:{port}/each", **common},
            {"name": "grouped", "url": f"http://127.0.0.1:{port}/grouped", "group_by": ["all"], "group_wait_s": 0.5,
             "group_interval_s": 0.5, "group_template": '{"summary": "{counts_text}", "events": "{alerts}"}', **common},
            {"name": "tickets", "url": f"http://127.0.0.1:{port}/tickets", "events": ["firing"], **common},
        ]}})

    keys = {delivery_key(a.event_id, name) for a in (firing, resolved) for name in ("each", "grouped")}
    keys.add(delivery_key(firing.event_id, "tickets"))
    states = serve_and_dispatch(topics, settings_for, receiver, lambda dispatcher: settled(dispatcher, keys))
    assert not receiver.duplicates and not receiver.rejected
    each = [i for i in receiver.items if i["path"] == "/each"]
    assert [i["payload"]["id"] for i in each] == ["tp:firing", "tp:resolved"]
    assert each[0]["payload"]["text"].startswith("FIRING [warning] negative sentiment spike on topic Rates")
    assert each[0]["payload"]["deviation"] == firing.deviation
    assert each[0]["webhook_id"] == webhook_id(delivery_key("tp:firing", "each"))
    grouped = [i["payload"] for i in receiver.items if i["path"] == "/grouped"]
    assert [e["event_id"] for p in grouped for e in p["events"]] == ["tp:firing", "tp:resolved"]
    assert grouped[0]["summary"].startswith("1 firing")
    # The ticketing tool takes firings only: the resolve is not even recorded for it.
    assert [i["payload"]["id"] for i in receiver.items if i["path"] == "/tickets"] == ["tp:firing"]
    assert delivery_key(resolved.event_id, "tickets") not in states


def escalating_episode(alert_id: str):
    """A warning firing on Energy | Oil, its escalation to critical and its resolve, as the detector emits them."""
    from tests.test_delivery import make_alert as fresh_alert
    return (fresh_alert("firing", id=alert_id, key="Energy | Oil", severity="warning"),
            fresh_alert("firing", id=alert_id, key="Energy | Oil", severity="critical", escalated_from="warning"),
            fresh_alert("resolved", id=alert_id, key="Energy | Oil", severity="critical"))


def signed_receiver(monkeypatch, secret_env: str) -> Receiver:
    """A real receiver that takes what is signed with a fresh secret, which ``secret_env`` holds."""
    secret = generate_secret()
    monkeypatch.setenv(secret_env, secret)
    return Receiver(ReceiverOptions(secrets=[secret], quiet=True))


def test_a_resolve_goes_to_its_resolve_url_with_its_own_body_over_http(fp_settings, topics, monkeypatch):
    """Opsgenie's way, with a real dispatcher and a real receiver: the firing creates at url, the resolve closes at
    resolve_url (its path filled and percent-encoded) with resolve_template's body, signed; the same from a
    resolve_url_env, and the escalation still goes to url."""
    from tests.test_delivery import produce, serve_and_dispatch
    from tests.test_delivery import make_alert as fresh_alert
    from tests.test_grouping import settled

    receiver = signed_receiver(monkeypatch, "T_CLOSE_SECRET")
    firing, escalation, resolved = escalating_episode("og")
    # A ticker comes from a news item's tickers list: "..", filled into a path, must not climb out of it.
    dots = [fresh_alert(status, id="dots", key_type="ticker", key="..", severity="warning")
            for status in ("firing", "resolved")]
    produce(fp_settings, topics.alerts, [firing, escalation, resolved, *dots])

    def settings_for(port):
        monkeypatch.setenv("T_CLOSE_URL", f"http://127.0.0.1:{port}/env/{{episode_id}}/close")
        common = {"format": "template", "secret_env": "T_CLOSE_SECRET", "allow_private": True,
                  "template": {"alias": "{episode_id}", "priority": "{severity|map:critical=P1,*=P3}"}}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "endpoints": [
            {"name": "og", "url": f"http://127.0.0.1:{port}/v2/alerts", **common,
             "resolve_url": f"http://127.0.0.1:{port}/v2/alerts/{{key}}/close?identifierType=alias&by={{episode_id}}",
             "resolve_template": {"note": "{summary}", "source": "FinPulse"}},
            {"name": "og-env", "url": f"http://127.0.0.1:{port}/env", "resolve_url_env": "T_CLOSE_URL", **common},
        ]}})

    keys = {delivery_key(a.event_id, name) for a in (firing, escalation, resolved, *dots) for name in ("og", "og-env")}
    serve_and_dispatch(topics, settings_for, receiver, lambda dispatcher: settled(dispatcher, keys))
    assert not receiver.duplicates and not receiver.rejected
    targets = {r["webhook_id"]: r["target"] for r in receiver.requests}
    sent = sorted((targets[i["webhook_id"]], json.dumps(i["payload"], sort_keys=True)) for i in receiver.items)
    note = json.dumps({"note": resolved.summary, "source": "FinPulse"}, sort_keys=True)
    dots_note = json.dumps({"note": dots[1].summary, "source": "FinPulse"}, sort_keys=True)
    assert sent == sorted([
        ("/v2/alerts", '{"alias": "og", "priority": "P3"}'), ("/v2/alerts", '{"alias": "og", "priority": "P1"}'),
        ("/v2/alerts/Energy%20%7C%20Oil/close?identifierType=alias&by=og", note),
        ("/env", '{"alias": "og", "priority": "P3"}'), ("/env", '{"alias": "og", "priority": "P1"}'),
        ("/env/og/close", '{"alias": "og", "priority": "P1"}'),
        ("/v2/alerts", '{"alias": "dots", "priority": "P3"}'), ("/v2/alerts/%2E%2E/close?identifierType=alias&by=dots",
                                                                 dots_note),
        ("/env", '{"alias": "dots", "priority": "P3"}'), ("/env/dots/close", '{"alias": "dots", "priority": "P3"}')])
    assert targets[webhook_id(delivery_key(resolved.event_id, "og-env"))] == "/env/og/close"


def test_an_update_goes_to_the_incident_as_its_resolve_does_unless_told_otherwise():
    """ServiceNow's resolve PATCHes the incident; an update to the same URL without update_method was a POST there."""
    same = dict(template=GOOGLE_CHAT, incident_id_from="/id", resolve_method="PATCH",
                resolve_url="https://chat.example.com/incident/{incident_id}", update_template={"urgency": "1"})
    assert endpoint_config(**same).update_method == "PATCH"
    assert endpoint_config(**same, update_method="put").update_method == "PUT"
    assert endpoint_config(**same, update_url="https://chat.example.com/incident/{incident_id}/notes").update_method \
        == "POST"


def test_a_json_pointer_reads_the_id_a_tool_answered_with():
    answer = {"result": {"sys_id": "9d3", "a/b": {"~x": 7}}, "list": [{"key": "RISK-12"}], "flag": True}
    assert at_json_pointer(answer, "/result/sys_id") == "9d3"
    assert at_json_pointer(answer, "/result/a~1b/~0x") == 7 and at_json_pointer(answer, "/list/0/key") == "RISK-12"
    assert at_json_pointer(answer, "/result/number") is None and at_json_pointer(answer, "/list/3/key") is None
    endpoint = Endpoint(endpoint_config(template=GOOGLE_CHAT, incident_id_from="/result/sys_id", resolve_method="PATCH",
                                        resolve_url="https://chat.example.com/incident/{incident_id}"), environ={})
    assert endpoint.incident_id_in(json.dumps(answer).encode()) == "9d3"
    assert endpoint.incident_id_in(b'{"result": {"sys_id": 12}}') == "12"
    # Nothing usable: no JSON, no such value, an object or a boolean where the id should be.
    for unusable in (b"created", b'{"result": {}}', b'{"result": {"sys_id": {"v": 1}}}', b'{"result": {"sys_id": true}}',
                     b'{"result": {"sys_id": ""}}', b'{"result": {"sys_id": "   "}}'):
        assert endpoint.incident_id_in(unusable) == "", unusable


def test_a_resolve_closes_the_incident_the_firings_answer_named_over_http(fp_settings, topics, monkeypatch, caplog):
    """ServiceNow's way, with a real dispatcher and a real receiver (which answers what it stored with its number,
    as a tool names what it opened): the firing is POSTed and its answer's id read at incident_id_from; the
    escalation is not sent (POSTed, it opened a second incident nothing closed) unless the endpoint sends it as an
    update of the open one (update_template: here a PATCH to resolve_url, the default, whose answer opens nothing);
    the resolve is a PATCH to
    resolve_url with that id. Where the firing was below min_severity, the escalation opens the incident and the
    resolve closes that one. An endpoint whose tool answers without the id cannot say which incident to close: its
    resolve fails at once, saying why, and sends nothing."""
    from tests.test_delivery import produce, serve_and_dispatch

    from aiohttp import web

    class RefusesAFirstRequest(Receiver):
        """As a tool refuses a body it cannot take (a field too long): the first request to /refused, with 400."""
        refused = False

        def _answer(self, request, body):
            if request.path == "/refused" and not self.refused:
                self.refused = True
                return web.json_response({"error": "short_description: too long"}, status=400)
            return super()._answer(request, body)

    secret = generate_secret()
    monkeypatch.setenv("T_SNOW_SECRET", secret)
    receiver = RefusesAFirstRequest(ReceiverOptions(secrets=[secret], quiet=True))
    firing, escalation, resolved = escalating_episode("sn")
    produce(fp_settings, topics.alerts, [firing, escalation, resolved])

    def settings_for(port):
        common = {"format": "template", "secret_env": "T_SNOW_SECRET", "allow_private": True,
                  "template": {"short_description": "{title}", "urgency": "{severity|map:critical=1,*=2}"},
                  "resolve_method": "patch", "resolve_template": {"state": "6", "close_notes": "{summary}"}}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "endpoints": [
            {"name": "snow", "url": f"http://127.0.0.1:{port}/api/now/table/incident", "incident_id_from": "/id",
             "resolve_url": f"http://127.0.0.1:{port}/api/now/table/incident/{{incident_id}}", **common},
            {"name": "critical", "url": f"http://127.0.0.1:{port}/critical", "incident_id_from": "/id",
             "min_severity": "critical", "resolve_url": f"http://127.0.0.1:{port}/critical/{{incident_id}}", **common},
            {"name": "no-id", "url": f"http://127.0.0.1:{port}/other", "incident_id_from": "/result/sys_id",
             "resolve_url": f"http://127.0.0.1:{port}/other/{{incident_id}}", **common},
            {"name": "updated", "url": f"http://127.0.0.1:{port}/upd", "incident_id_from": "/id",
             "resolve_url": f"http://127.0.0.1:{port}/upd/{{incident_id}}", **common, "update_method": "patch",
             "update_template": {"urgency": "{severity|map:critical=1,*=2}", "work_notes": "{summary}"}},
            {"name": "updated-no-id", "url": f"http://127.0.0.1:{port}/upd-other", "incident_id_from": "/result/sys_id",
             "resolve_url": f"http://127.0.0.1:{port}/upd-other/{{incident_id}}", **common,
             "update_url": f"http://127.0.0.1:{port}/upd-other/{{incident_id}}/notes",
             "update_template": {"note": "{summary}"}},
            {"name": "refused", "url": f"http://127.0.0.1:{port}/refused", "incident_id_from": "/id",
             "resolve_url": f"http://127.0.0.1:{port}/refused/{{incident_id}}", **common,
             "update_template": {"urgency": "{severity|map:critical=1,*=2}"}},
        ]}})

    keys = {delivery_key(a.event_id, name) for a in (firing, resolved) for name in ("snow", "no-id")}
    keys |= {delivery_key(a.event_id, "critical") for a in (escalation, resolved)}
    keys |= {delivery_key(a.event_id, name) for a in (firing, escalation, resolved)
             for name in ("updated", "updated-no-id", "refused")}

    async def all_final(dispatcher):
        for _ in range(900):
            if all(k in dispatcher.log.states and dispatcher.log.states[k].terminal for k in keys):
                await asyncio.sleep(0.5)     # anything more it would send, it would have taken on by now
                return dict(dispatcher.log.states)
            await asyncio.sleep(0.1)
        pytest.fail(f"not final: {sorted(k for k in keys if k not in dispatcher.log.states)}")
    states = serve_and_dispatch(topics, settings_for, receiver, all_final)
    assert not receiver.duplicates and not receiver.rejected
    assert set(states) == keys       # no escalation taken on where the firing had opened the incident
    stored_as = {item["webhook_id"]: item["id"] for item in receiver.items}
    incident = stored_as[webhook_id(delivery_key(firing.event_id, "snow"))]
    assert states[delivery_key(firing.event_id, "snow")].incident_id == incident
    sent = [(r["method"], r["target"]) for r in receiver.requests if r["path"].startswith("/api")]
    assert sent == [("POST", "/api/now/table/incident"), ("PATCH", f"/api/now/table/incident/{incident}")]
    closing = next(i for i in receiver.items if i["method"] == "PATCH" and i["path"].startswith("/api"))
    assert closing["payload"] == {"state": "6", "close_notes": resolved.summary}
    assert all(states[delivery_key(a.event_id, "snow")].state == DELIVERED for a in (firing, resolved))
    # What `dispatch --status` shows beside a resolve that failed: the incident to close by hand.
    from alerts.dispatch import _incident_of
    assert _incident_of(states[delivery_key(resolved.event_id, "snow")], states) == incident
    assert _incident_of(states[delivery_key(resolved.event_id, "no-id")], states) == ""

    opened = stored_as[webhook_id(delivery_key(escalation.event_id, "critical"))]
    assert [(r["method"], r["target"]) for r in receiver.requests if r["path"].startswith("/critical")] == [
        ("POST", "/critical"), ("PATCH", f"/critical/{opened}")]

    unresolvable = states[delivery_key(resolved.event_id, "no-id")]
    assert unresolvable.state == FAILED and unresolvable.attempts == 1, unresolvable
    assert unresolvable.last_error.startswith("no incident id to resolve: nothing 'no-id' was sent of this episode "
                                              "named one") and "not retried" in unresolvable.last_error
    assert [r["method"] for r in receiver.requests if r["path"].startswith("/other")] == ["POST"]

    # Updated: the escalation is a PATCH of the open incident with update_template's body; the resolve closes it.
    opened = stored_as[webhook_id(delivery_key(firing.event_id, "updated"))]
    assert [(r["method"], r["target"]) for r in receiver.requests if r["path"].startswith("/upd/")
            or r["path"] == "/upd"] == [("POST", "/upd"), ("PATCH", f"/upd/{opened}"), ("PATCH", f"/upd/{opened}")]
    assert [i["payload"] for i in receiver.items if i["path"].startswith("/upd/")] == [
        {"urgency": "1", "work_notes": escalation.summary}, {"state": "6", "close_notes": resolved.summary}]
    assert states[delivery_key(escalation.event_id, "updated")].state == DELIVERED
    assert states[delivery_key(escalation.event_id, "updated")].incident_id == ""   # it opened nothing
    assert _incident_of(states[delivery_key(escalation.event_id, "updated")], states) == opened
    from alerts.dispatch import _incident_note
    assert _incident_note(states[delivery_key(escalation.event_id, "updated")], states) == f"  update of incident {opened}"
    assert _incident_note(states[delivery_key(resolved.event_id, "updated")], states) == f"  incident {opened}"
    # Without an id from the firing's answer, the update cannot say which incident either: it fails as the resolve.
    update = states[delivery_key(escalation.event_id, "updated-no-id")]
    assert update.state == FAILED and update.attempts == 1 and update.last_error.startswith(
        "no incident id to update: nothing 'updated-no-id' was sent of this episode named one"), update
    assert [r["method"] for r in receiver.requests if r["path"].startswith("/upd-other")] == ["POST"]
    # A refused firing opened nothing: the escalation opens the incident (it was an update of nothing, failed).
    assert states[delivery_key(firing.event_id, "refused")].state == FAILED
    opened = stored_as[webhook_id(delivery_key(escalation.event_id, "refused"))]
    assert [(r["method"], r["target"], r["status"]) for r in receiver.requests if r["path"].startswith("/refused")] \
        == [("POST", "/refused", 400), ("POST", "/refused", 200), ("PATCH", f"/refused/{opened}", 200)]
    [opening] = [i["payload"] for i in receiver.items if i["path"] == "/refused"]
    assert opening == {"short_description": "Escalated from warning to critical: topic Energy | Oil", "urgency": "1"}
    # Only an answer to what opened an incident is read for its id, and missed when it has none.
    missed = [r.getMessage() for r in caplog.records if "taken, but its answer has nothing at" in r.getMessage()]
    assert sorted(m.split(": taken")[0] for m in missed) == [
        "delivery sn:firing to no-id", "delivery sn:firing to updated-no-id"], missed


def test_preview_shows_each_format_the_example_episode_without_secrets_or_kafka(tmp_path):
    """`finpulse dispatch --preview NAME` through the real CLI: no broker runs and no secret is set."""
    import subprocess
    import sys

    from alerts.preview import preview
    from tests.test_delivery import REPO

    config = tmp_path / "finpulse.toml"
    config.write_text('''
[alerts]
dashboard_url = "https://finpulse.example.com"
[[alerts.endpoints]]
name = "chat"
url = "https://chat.example.com/hook"
format = "template"
template = { text = "{title}", severity = "{severity}", share = "{observed_bearish_share}" }
group_by = ["all"]
group_template = { text = "{title}: {counts_text}" }
[[alerts.endpoints]]
name = "pd"
format = "pagerduty"
routing_key_env = "T_PREVIEW_NEVER_SET"
''')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FINPULSE_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(config), "dispatch", "--preview", "chat"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bodies = [json.loads(part.split("\n", 1)[1]) for part in done.stdout.split("\n# ")[1:]]
    assert [b["severity"] for b in bodies[:3]] == ["warning", "critical", "critical"]
    assert bodies[0] == {"text": "Negative sentiment spike: ticker XOM (Energy | Oil)", "severity": "warning", "share": 0.68}
    assert bodies[3] == {"text": "FinPulse: 3 alert events: 1 firing, 1 escalated, 1 resolved"}
    assert "nothing was sent" in done.stdout

    fields = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--fields"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert fields.returncode == 0 and "{messages_text}" in fields.stdout and "{counts_text}" in fields.stdout

    settings = load_settings(config, {})
    pagerduty = preview(load_delivery_config(settings), "pd", "")
    assert '"routing_key": "***"' in pagerduty and '"event_action": "resolve"' in pagerduty
    for name, endpoint in (("native", {"url": "https://x.example.com", "secret_env": "T_NEVER"}),
                           ("slack", {"url_env": "T_NEVER"}), ("teams", {"url_env": "T_NEVER"}),
                           ("alertmanager", {"url": "https://am.example.com"})):
        one = Settings(raw={"alerts": {"endpoints": [{"name": name, "format": name, "group_by": ["all"], **endpoint}]}})
        shown = preview(load_delivery_config(one), name, "")
        assert shown.count("\n# ") == 4, shown   # firing, escalation, resolve, the group
    by_severity = Settings(raw={"alerts": {"endpoints": [{
        "name": "sev", "url": "https://x.example.com", "format": "template", "template": {"text": "{title}"},
        "group_by": ["severity"], "group_template": {"text": "{title}: {counts_text}"}}]}})
    groups = [part for part in preview(load_delivery_config(by_severity), "sev", "").split("\n# ")
              if part.startswith("a group")]
    assert groups == ['a group notification (severity=warning: firing)\n'
                      '{\n  "text": "FinPulse: 1 alert event (severity=warning): 1 firing"\n}',
                      'a group notification (severity=critical: escalation, resolved)\n'
                      '{\n  "text": "FinPulse: 2 alert events (severity=critical): 1 escalated, 1 resolved"\n}']
    with pytest.raises(ConfigError, match="no endpoint named 'x' .endpoints: chat, pd."):
        preview(load_delivery_config(settings), "x", "")


@pytest.mark.parametrize("url, refusal", [
    ("https://{key}.example.com/close", "(resolve_url from $T_CLOSE): {fields} may fill only a URL's path"),
    ("https://elsewhere.example.com/close", "resolve_url must be on url's scheme, host and port"),
    ("", "environment variable T_CLOSE is not set"),
])
def test_a_resolve_url_from_the_environment_is_checked_when_the_endpoint_is_built(url, refusal):
    from alerts.endpoints import Endpoint

    settings = endpoint_config(template=GOOGLE_CHAT, resolve_url_env="T_CLOSE")
    with pytest.raises(ConfigError) as caught:
        Endpoint(settings, {"T_CLOSE": url})
    assert refusal in str(caught.value) and (not url or url not in str(caught.value))
    assert Endpoint(settings, {"T_CLOSE": "https://chat.example.com/{alert_id}/x"}).resolve_url is not None


def test_an_answer_that_echoes_a_secret_urls_path_or_query_is_scrubbed_from_the_error():
    """A URL from the environment is a secret, its path and query too (a Slack token sits in the path, a Teams
    signature in the query); servers that answer "Cannot POST <path>" would put them in the stored error."""
    import asyncio

    from aiohttp import web

    from alerts.attempts import WebhookSender
    from alerts.endpoints import Endpoint
    from alerts.templates import fill_url

    async def echo(request):
        # Whole, and in pieces: "bad signature QUERYSECRET for segment PATHSECRET" was stored as it came.
        return web.Response(status=404, text=f"Cannot POST {request.path_qs}; path {request.path}; query "
                                             f"{request.query_string}; bad signature {request.query.get('sig')} for "
                                             f"segment {request.path.split('/')[2]}")

    async def scenario():
        app = web.Application()
        app.router.add_post("/{tail:.*}", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        settings = endpoint_config(url="", url_env="T_URL", allow_private=True, template=GOOGLE_CHAT,
                                   resolve_url_env="T_CLOSE")
        endpoint = Endpoint(settings, {"T_URL": f"http://127.0.0.1:{port}/hooks/PATHSECRET/in?sig=QUERYSECRET",
                                       "T_CLOSE": f"http://127.0.0.1:{port}/hooks/PATHSECRET/{{alert_id}}/close"})
        sender = WebhookSender()
        sender.open()
        try:
            return [await sender.send(endpoint, "msg_1", b"{}"),
                    await sender.send(endpoint, "msg_2", b"{}", fill_url(endpoint.resolve_url.reveal(),
                                                                         {"alert_id": "a1"}))]
        finally:
            await sender.close()
            await runner.cleanup()

    outcomes = asyncio.run(scenario())
    for outcome in outcomes:
        assert outcome.status == 404 and not outcome.retryable
        assert "SECRET" not in outcome.error and outcome.error.startswith("HTTP 404: Cannot POST ***"), outcome.error


def test_preview_says_where_a_resolve_goes_and_names_a_secret_url_by_its_variable():
    from alerts.preview import preview

    opsgenie = {"name": "og", "url": "https://api.example.com/v2/alerts", "format": "template",
                "template": {"alias": "{alert_id}"}, "resolve_template": {"note": "{summary}"}}
    shown = preview(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
        {**opsgenie, "resolve_url": "https://api.example.com/v2/alerts/{alert_id}/close?identifierType=alias"}]}})),
        "og", "")
    assert "\n# firing\n" in shown and "\n# escalation\n" in shown
    assert ('# resolved, to https://api.example.com/v2/alerts/a1b2c3d4e5f6/close?identifierType=alias\n'
            '{\n  "note": "XOM is back within its baseline"\n}') in shown
    hidden = preview(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
        {**opsgenie, "resolve_url_env": "T_NEVER_SET"}]}})), "og", "")
    assert "# resolved, to the URL in $T_NEVER_SET\n" in hidden
    # A tool that names what it opened: the resolve's method, and an example of the id its answer gave.
    snow = preview(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
        {**opsgenie, "incident_id_from": "/result/sys_id", "resolve_method": "PATCH",
         "resolve_url": "https://api.example.com/api/now/table/incident/{incident_id}",
         "resolve_template": {"state": "6", "id": "{incident_id}"}}]}})), "og", "")
    sys_id = "9d385017c611228701d22104cc95c371"
    assert (f'# resolved, PATCH to https://api.example.com/api/now/table/incident/{sys_id}\n'
            f'{{\n  "state": "6",\n  "id": "{sys_id}"\n}}') in snow
    assert "# escalation: not sent (its incident is open: one incident an episode, and without update_template" in snow
    # ... and one that updates the open incident when the episode escalates: the update, where it goes, how.
    updated = preview(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
        {**opsgenie, "incident_id_from": "/result/sys_id", "resolve_method": "PATCH",
         "resolve_url": "https://api.example.com/api/now/table/incident/{incident_id}",
         "update_template": {"urgency": "{severity|map:critical=1,*=2}"}, "update_method": "PATCH"}]}})), "og", "")
    assert (f'# escalation, an update of the incident, PATCH to https://api.example.com/api/now/table/incident/'
            f'{sys_id}\n{{\n  "urgency": "1"\n}}') in updated
    assert '# firing\n{\n  "alias": "a1b2c3d4e5f6"\n}' in updated      # the firing still opens it, at url
    # Where the firing is below min_severity, the escalation opens the incident at url (it was shown as sent, and as
    # not sent, its incident being open).
    critical = preview(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
        {**opsgenie, "incident_id_from": "/result/sys_id", "resolve_method": "PATCH", "min_severity": "critical",
         "resolve_url": "https://api.example.com/api/now/table/incident/{incident_id}"}]}})), "og", "")
    assert "# firing: not sent (below min_severity = critical; an escalation that reaches it is)" in critical
    assert '# escalation\n{\n  "alias": "a1b2c3d4e5f6"\n}' in critical and "its incident is open" not in critical
    assert f"# resolved, PATCH to https://api.example.com/api/now/table/incident/{sys_id}\n" in critical


def test_a_body_that_cannot_be_rendered_fails_its_delivery_and_the_episode_goes_on(fp_settings, topics, monkeypatch):
    """A rendering fault (here a template changed behind the config check's back) is recorded as the delivery's
    failure with its reason, not retried, and the episode's next event is still taken on; before, the exception
    stopped the episode's chain until the dispatcher restarted."""
    import asyncio

    from alerts.deliveries import DELIVERED, FAILED
    from tests.test_delivery import produce, serve_and_dispatch
    from tests.test_delivery import make_alert as fresh_alert
    from tests.test_grouping import settled

    firing = fresh_alert("firing", id="rf", key="Rates", severity="warning")
    resolved = fresh_alert("resolved", id="rf", key="Rates", severity="warning")
    secret = generate_secret()
    monkeypatch.setenv("T_RENDER_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))

    def settings_for(port):
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "endpoints": [
            {"name": "chat", "url": f"http://127.0.0.1:{port}/chat", "format": "template", "allow_private": True,
             "secret_env": "T_RENDER_SECRET", "template": {"text": "{headline}"}}]}})

    async def steps(dispatcher):
        dispatcher.endpoints["chat"].settings.template = {"at": datetime(2026, 12, 7, tzinfo=timezone.utc)}
        await asyncio.to_thread(produce, fp_settings, topics.alerts, [firing])
        for _ in range(300):
            state = dispatcher.log.get(delivery_key(firing.event_id, "chat"))
            if state is not None and state.terminal:
                break
            await asyncio.sleep(0.1)
        dispatcher.endpoints["chat"].settings.template = {"text": "{headline}"}
        await asyncio.to_thread(produce, fp_settings, topics.alerts, [resolved])
        return await settled(dispatcher, {delivery_key(resolved.event_id, "chat")})

    states = serve_and_dispatch(topics, settings_for, receiver, steps)
    failed = states[delivery_key(firing.event_id, "chat")]
    assert failed.state == FAILED and failed.attempts == 1
    assert failed.last_error.startswith("cannot render the template body: TypeError: Object of type datetime")
    assert states[delivery_key(resolved.event_id, "chat")].state == DELIVERED
    assert [i["payload"]["text"][:8] for i in receiver.items] == ["RESOLVED"]
