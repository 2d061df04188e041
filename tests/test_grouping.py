"""Grouped notifications (``group_by``): the config, the grouped formats, and delivery end to end with a real tansu
broker, real dispatchers and real HTTP receivers. No timing is asserted: group_wait_s is small and the tests look
at what arrived, in what order, under which webhook-id."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

from alerts.deliveries import (DELIVERED, FAILED, PENDING, delivery_key, new_pending, read_delivery_states,
                               redelivery_plan, requeued, summarize, webhook_id)
from alerts.dispatch import redeliver_failed
from alerts.endpoints import load_delivery_config
from alerts.formats import SLACK_GROUP_LINES, DeliveryContext, GroupContext, render_group
from alerts.grouping import GroupPolicy, new_group
from alerts.receiver import Receiver, ReceiverOptions, describe_payload
from alerts.signing import generate_secret
from stream.broker import free_port
from stream.config import ConfigError, Settings
from stream.records import AlertRecord
from tests.procs import ManagedProcess
from tests.test_delivery import (REPO, finpulse, get_json, kafka_env, make_alert, produce, serve_and_dispatch,
                                 wait_for)


# ---------------------------------------------------------------- config

def endpoint_config(**endpoint):
    table = {"name": "e", "url": "https://risk.example.com/hook", "secret_env": "T_GROUP_SECRET", **endpoint}
    return load_delivery_config(Settings(raw={"alerts": {"endpoints": [table]}})).endpoints[0]


@pytest.mark.parametrize("endpoint, refusal", [
    (dict(format="pagerduty", routing_key_env="T_PD", group_by=["key_type"]), "grouping incidents is PagerDuty's own job"),
    (dict(group_by=["sector"]), "group_by ['sector'] unknown"),
    (dict(group_by=["all", "severity"]), "goes alone"),
    (dict(group_by=["severity", "severity"]), "twice"),
    (dict(group_wait_s=10.0), "group_wait_s mean nothing without group_by"),
    (dict(group_by=["key_type"], group_wait_s=700.0, retry_horizon_s=600.0), "not less than the endpoint's retry_horizon_s"),
    (dict(group_by=["key_type"], group_interval_s=600.0, retry_horizon_s=600.0), "it would give up before the first attempt"),
    (dict(group_by=["key_type"], group_wait_s=-1.0), "cannot be negative"),
])
def test_the_config_refuses_grouping_that_cannot_work(endpoint, refusal):
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        endpoint_config(**endpoint)


def test_group_labels_and_when_a_group_notifies():
    assert GroupPolicy.of(endpoint_config()) is None                       # off unless group_by is set
    policy = GroupPolicy.of(endpoint_config(group_by=["key_type", "topic"], group_wait_s=5, group_interval_s=60))
    assert policy.label(make_alert(key="Energy | Oil")) == "key_type=topic,topic=Energy | Oil"
    # A ticker alert is about the topic most of its window's messages were; one from before alerts said is about none.
    assert policy.label(make_alert(key_type="ticker", key="XOM", topic="Energy | Oil")) == "key_type=ticker,topic=Energy | Oil"
    assert policy.label(make_alert(key_type="ticker", key="XOM")) == "key_type=ticker,topic=-"
    by_topic = GroupPolicy.of(endpoint_config(group_by=["topic"]))
    assert by_topic.label(make_alert(key="Energy | Oil")) == by_topic.label(
        make_alert(key_type="ticker", key="XOM", topic="Energy | Oil")) == "topic=Energy | Oil"
    assert GroupPolicy.of(endpoint_config(group_by=["all"])).label(make_alert(key_type="ticker")) == "all"
    assert GroupPolicy.of(endpoint_config(group_by=["severity"])).label(make_alert(severity="warning")) == "severity=warning"
    defaults = GroupPolicy.of(endpoint_config(group_by=["severity"]))
    assert (defaults.wait_s, defaults.interval_s) == (30.0, 300.0)
    assert policy.next_flush(1000.0, None) == 1005.0                       # a new group waits group_wait_s
    assert policy.next_flush(1000.0, 990.0) == 1050.0                      # then group_interval_s after its last
    assert policy.next_flush(1000.0, 900.0) == 1005.0                      # a group quiet for longer starts anew


# ---------------------------------------------------------------- formats

def members(alerts: list[AlertRecord]) -> list[tuple[AlertRecord, DeliveryContext]]:
    return [(a, DeliveryContext(webhook_id=f"msg_{n}", event_id=a.event_id, endpoint="risk", attempt=1,
                                sent_at="2026-11-22T12:05:03.000Z")) for n, a in enumerate(alerts)]


GROUP = GroupContext(webhook_id="msg_group", event_id="group:abc", endpoint="risk", label="key_type=topic", attempt=2,
                     sent_at="2026-11-22T12:05:03.000Z", dashboard_url="http://127.0.0.1:8501/")


def test_native_group_carries_each_event_as_it_would_have_gone_alone():
    alerts = [make_alert("firing", id="a1", severity="warning"), make_alert("firing", id="a1", severity="critical",
                                                                            escalated_from="warning"),
              make_alert("resolved", id="a2", key="Rates")]
    body = json.loads(render_group("native", GROUP, members(alerts)))
    assert body["type"] == "finpulse.alert.group"
    assert body["group"] == {"label": "key_type=topic", "count": 3, "counts": {"firing": 1, "escalation": 1, "resolved": 1}}
    assert body["delivery"]["webhook_id"] == "msg_group" and body["delivery"]["attempt"] == 2
    assert [item["type"] for item in body["alerts"]] == ["finpulse.alert.firing", "finpulse.alert.escalated",
                                                        "finpulse.alert.resolved"]
    assert [(i["delivery"]["event_id"], i["delivery"]["webhook_id"]) for i in body["alerts"]] == [
        ("a1:firing", "msg_0"), ("a1:firing:critical", "msg_1"), ("a2:resolved", "msg_2")]
    assert [i["data"] for i in body["alerts"]] == [a.to_dict() for a in alerts]
    assert describe_payload(body) == "GROUP key_type=topic of 3: 1 firing, 1 escalation, 1 resolved"


def test_slack_group_lists_the_most_severe_first_with_a_cap():
    alerts = ([make_alert("firing", id=f"i{n}", severity="info", key=f"Topic {n}") for n in range(SLACK_GROUP_LINES)]
              + [make_alert("resolved", id="r1", key="Calm"), make_alert("firing", id="c1", key="Crash <!channel>")])
    body = json.loads(render_group("slack", GROUP, members(alerts)))
    lines = body["blocks"][2]["text"]["text"].splitlines()
    assert lines[0].startswith(":red_circle: FIRING [critical]") and "Crash &lt;!channel&gt;" in lines[0]
    assert len(lines) == SLACK_GROUP_LINES + 1 and lines[-1] == "+2 more"   # the resolve is among the rest
    assert body["blocks"][0]["text"]["text"] == "FinPulse: 12 alert events (key_type=topic)"
    assert body["blocks"][1]["text"]["text"] == "11 firing, 1 resolved"
    assert "<!channel>" not in json.dumps(body) and "/alerts|open the alerts>" in json.dumps(body)


def test_teams_group_is_one_card_most_severe_first_with_a_cap():
    from tests.test_formats import _card, _elements

    alerts = ([make_alert("firing", id=f"i{n}", severity="info", key=f"Topic {n}") for n in range(SLACK_GROUP_LINES)]
              + [make_alert("resolved", id="r1", key="Calm"), make_alert("firing", id="c1", key="Crash")])
    card = _card(json.loads(render_group("teams", GROUP, members(alerts))))
    texts = [t["text"] for t in _elements(card)]
    assert texts[0] == "FinPulse: 12 alert events (key_type=topic)" and texts[1] == "11 firing, 1 resolved"
    assert texts[2].startswith("FIRING [critical]") and "Crash" in texts[2]
    assert texts[2 + SLACK_GROUP_LINES] == "+2 more"
    assert card["actions"][0]["url"] == "http://127.0.0.1:8501/alerts"


def test_alertmanager_group_is_one_list_and_pagerduty_takes_no_group():
    alerts = [make_alert("firing", id="a1"), make_alert("firing", id="a2", key="Rates")]
    body = json.loads(render_group("alertmanager", GROUP, members(alerts)))
    assert [entry["labels"]["alert_id"] for entry in body] == ["a1", "a2"]
    with pytest.raises(ValueError, match="takes no grouped notifications"):
        render_group("pagerduty", GROUP, members(alerts))


# ---------------------------------------------------------------- delivery end to end

async def settled(dispatcher, keys: set[str], polls: int = 900) -> dict:
    """Wait until every delivery in ``keys`` is delivered (and every group notification is final)."""
    for _ in range(polls):
        states = dispatcher.log.states
        if (all(k in states and states[k].state == DELIVERED for k in keys)
                and all(s.terminal for s in states.values() if s.is_group)):
            return dict(states)
        await asyncio.sleep(0.1)
    pytest.fail(f"not delivered: {sorted(k for k in keys if dispatcher.log.get(k) is None or not dispatcher.log.get(k).terminal)}")


def test_a_burst_becomes_one_notification_per_group_while_an_ungrouped_endpoint_gets_each(fp_settings, topics, monkeypatch):
    """Five topic and four ticker alerts at once: the grouped endpoint (group_by key_type) gets one notification for
    the topics and one for the tickers, the ungrouped one nine; a Slack endpoint grouping everything gets one
    message. Their resolves, produced once the firings were delivered, come in later notifications. An escalation
    to another severity group waits until the firing it follows was delivered."""
    secret = generate_secret()
    monkeypatch.setenv("T_GROUP_SECRET", secret)
    storm = ([make_alert("firing", id=f"t{n}", key=f"Topic {n}", severity="critical" if n < 2 else "warning") for n in range(5)]
             + [make_alert("firing", id=f"k{n}", key_type="ticker", key=f"TK{n}") for n in range(4)])
    produce(fp_settings, topics.alerts, storm)

    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))

    def settings_for(port):
        base = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("T_GROUP_SLACK_URL", f"{base}/slack")
        common = {"secret_env": "T_GROUP_SECRET", "allow_private": True}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "grouped", "url": f"{base}/grouped", "group_by": ["key_type"], "group_wait_s": 1.0,
             "group_interval_s": 1.0, **common},
            {"name": "bysev", "url": f"{base}/bysev", "group_by": ["severity"], "group_wait_s": 1.0,
             "group_interval_s": 1.0, "keys": ["Esc"], **common},
            {"name": "slack", "url_env": "T_GROUP_SLACK_URL", "format": "slack", "group_by": ["all"],
             "group_wait_s": 1.0, "group_interval_s": 1.0, "key_types": ["topic"], **common},
            {"name": "single", "url": f"{base}/single", **common}]}})

    firings = {delivery_key(a.event_id, name) for a in storm for name in ("grouped", "single")}
    firings |= {delivery_key(a.event_id, "slack") for a in storm if a.key_type == "topic"}
    resolves = [make_alert("resolved", id=a.id, key_type=a.key_type, key=a.key, severity=a.severity) for a in storm[:3]]
    escalating = [make_alert("firing", id="esc", key="Esc", severity="warning"),
                  make_alert("firing", id="esc", key="Esc", severity="critical", escalated_from="warning")]

    async def steps(dispatcher):
        first = await settled(dispatcher, firings)
        await asyncio.to_thread(produce, fp_settings, topics.alerts, resolves + escalating)
        later = {delivery_key(a.event_id, n) for a in resolves for n in ("grouped", "single", "slack")}
        later |= {delivery_key(a.event_id, n) for a in escalating for n in ("bysev", "single", "grouped", "slack")}
        return first, await settled(dispatcher, firings | later)

    first, final = serve_and_dispatch(topics, settings_for, receiver, steps)
    arrived = {path: [i for i in receiver.items if i["path"] == path] for path in ("/grouped", "/single", "/slack", "/bysev")}
    assert not receiver.duplicates

    # Ungrouped: one request per event, as before.
    assert Counter(i["webhook_id"] for i in arrived["/single"]) == Counter(
        {webhook_id(delivery_key(a.event_id, "single")): 1 for a in storm + resolves + escalating})

    # Grouped by key_type: the storm in two notifications, one per key type; each event in exactly one.
    grouped = [i["payload"] for i in arrived["/grouped"]]
    assert [p["type"] for p in grouped] == ["finpulse.alert.group"] * len(grouped)
    storm_groups = {p["group"]["label"]: p for p in grouped[:2]}
    assert set(storm_groups) == {"key_type=topic", "key_type=ticker"}
    assert sorted(i["data"]["id"] for i in storm_groups["key_type=topic"]["alerts"]) == [f"t{n}" for n in range(5)]
    assert sorted(i["data"]["id"] for i in storm_groups["key_type=ticker"]["alerts"]) == [f"k{n}" for n in range(4)]
    events = [(i["delivery"]["event_id"], i["delivery"]["webhook_id"]) for p in grouped for i in p["alerts"]]
    assert Counter(events) == Counter({(a.event_id, webhook_id(delivery_key(a.event_id, "grouped"))): 1
                                       for a in storm + resolves + escalating})
    # The resolves came after their firings, in a later notification.
    order = {event: n for n, p in enumerate(grouped) for event in (i["delivery"]["event_id"] for i in p["alerts"])}
    assert all(order[a.event_id] > order[a.event_id_of("firing")] for a in resolves)
    # The records: each member names its notification, which lists it and carries its webhook-id.
    notifications = {k: s for k, s in final.items() if s.is_group and s.endpoint == "grouped"}
    assert {i["webhook_id"] for i in arrived["/grouped"]} == {s.webhook_id for s in notifications.values()}
    for key, notification in notifications.items():
        assert notification.state == DELIVERED and all(final[m].group == key for m in notification.members)
        assert all(final[m].state == DELIVERED for m in notification.members)

    # Slack, grouping everything: the five topic firings in one message, most severe first.
    slack = [i["payload"] for i in arrived["/slack"]]
    assert slack[0]["blocks"][0]["text"]["text"] == "FinPulse: 5 alert events"
    assert [line.split("]")[0] for line in slack[0]["blocks"][2]["text"]["text"].splitlines()] == [
        ":red_circle: FIRING [critical"] * 2 + [":large_orange_circle: FIRING [warning"] * 3
    assert "3 resolved" in slack[-1]["blocks"][1]["text"]["text"]

    # Grouped by severity: the escalation (severity=critical) never overtakes its firing (severity=warning).
    bysev = [i["payload"] for i in arrived["/bysev"]]
    assert [[(i["delivery"]["event_id"]) for i in p["alerts"]] for p in bysev] == [["esc:firing"], ["esc:firing:critical"]]
    assert [p["group"]["label"] for p in bysev] == ["severity=warning", "severity=critical"]

    status = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--status"], cwd=REPO,
                            env=kafka_env(fp_settings), capture_output=True, text=True, timeout=120)
    members_count = sum(1 for s in final.values() if not s.is_group)
    assert f"{members_count} deliveries {{'delivered': {members_count}}}" in status.stdout, status.stdout + status.stderr
    groups_count = sum(1 for s in final.values() if s.is_group)
    assert f"of them in {groups_count} group notifications {{'delivered': {groups_count}}}" in status.stdout


@pytest.mark.slow
def test_a_dispatcher_killed_between_recording_a_group_and_its_answer_resends_the_same_group(fp_settings, topics, tmp_path):
    """The receiver answers slowly; the dispatcher is killed (-9) once the group notification is recorded, while
    its request waits for the answer. The next dispatcher resends that notification: same members, same
    webhook-id, so the receiver stores it once and counts the resend as a duplicate."""
    secret = generate_secret()
    port = free_port()
    endpoint = {"name": "desk", "url": f"http://127.0.0.1:{port}/desk", "secret_env": "T_GK_SECRET",
                "allow_private": True, "group_by": ["key_type"], "group_wait_s": 0.5, "group_interval_s": 0.5}
    env = kafka_env(fp_settings, endpoints=[endpoint], backoff_initial_s="0.1", backoff_max_s="0.5")
    env["T_GK_SECRET"] = secret
    storm = [make_alert("firing", id=f"g{n}", key=f"Topic {n}") for n in range(4)]
    keys = {delivery_key(a.event_id, "desk") for a in storm}
    procs: list[ManagedProcess] = []

    def states():
        return read_delivery_states(fp_settings.kafka, topics.deliveries)

    def groups(found):
        return {k: s for k, s in found.items() if s.is_group}

    try:
        procs.append(finpulse(["receiver", "--port", str(port), "--store", str(tmp_path / "got.jsonl"),
                               "--secret-env", "T_GK_SECRET", "--delay", "4"], env, tmp_path, "receiver"))
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), "the receiver to listen")
        produce(fp_settings, topics.alerts, storm)
        procs.append(finpulse(["dispatch"], env, tmp_path, "dispatch-1"))
        recorded = wait_for(lambda: (lambda s: groups(s) and all(s[k].group for k in keys) and s)(states()),
                            "the group notification and its members to be recorded")
        procs[-1].kill()
        (notification,) = groups(recorded).values()
        assert notification.state == PENDING and set(notification.members) == keys
        # The killed dispatcher's request still reaches the receiver, which stores it after its delay.
        wait_for(lambda: (get_json(f"http://127.0.0.1:{port}/received") or {}).get("count") == 1,
                 "the first copy to be stored", timeout_s=30)

        procs.append(finpulse(["dispatch"], env, tmp_path, "dispatch-2"))
        final = wait_for(lambda: (lambda s: all(s[k].state == DELIVERED for k in keys) and s)(states()),
                         "the resent group to be acknowledged")
        seen = get_json(f"http://127.0.0.1:{port}/received")
    finally:
        for proc in procs:
            proc.kill()
    assert set(groups(final)) == {notification.key} and groups(final)[notification.key].state == DELIVERED
    assert [item["webhook_id"] for item in seen["items"]] == [notification.webhook_id]
    assert seen["duplicates"] == {notification.webhook_id: 1}
    payload = seen["items"][0]["payload"]
    assert sorted(i["delivery"]["event_id"] for i in payload["alerts"]) == sorted(a.event_id for a in storm)


def test_redelivery_requeues_the_members_of_a_failed_group_not_the_group():
    """A failed group notification stays failed; its failed members are re-queued each on its own, leaving it."""
    members_ = [replace(new_pending(make_alert("firing", id=f"m{n}", key=f"K{n}"), "desk", 0, n, 60.0), state=FAILED)
                for n in range(2)]
    notification = replace(new_group("desk", "all", members_), state=FAILED)
    members_ = [replace(m, group=notification.key) for m in members_]
    chosen, skipped = redelivery_plan(members_ + [notification], {"desk": 60.0})
    assert [s.key for s in chosen] == [m.key for m in members_] and not skipped
    assert all(requeued(m, 60.0).group == "" for m in chosen)
    # Grouped together again exactly as before, they go out as a new notification: its own key and webhook-id (the
    # failed one keeps its record; a receiver that saw the old webhook-id must not drop the new one as a duplicate).
    again = new_group("desk", "all", [requeued(m, 60.0) for m in chosen])
    assert again.key != notification.key and again.webhook_id != notification.webhook_id
    assert new_group("desk", "all", [replace(m, group="") for m in members_]).key == notification.key  # stable


def test_redelivered_members_of_a_failed_group_go_out_in_a_new_group(fp_settings, topics, monkeypatch):
    """The receiver refuses the first group notification (it verifies with another secret: 401, not retried), so
    the notification fails with its members. Once the receiver is fixed, `--redeliver` re-queues the members, not
    the notification: the running dispatcher groups them anew and sends a new notification (its own key and
    webhook-id), each member under its own unchanged event id and webhook-id; the old notification stays failed."""
    secret = generate_secret()
    monkeypatch.setenv("T_GROUP_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[generate_secret()], quiet=True))     # the wrong one, for now
    storm = [make_alert("firing", id=f"rd{n}", key=f"Topic {n}") for n in range(3)]
    keys = {delivery_key(a.event_id, "desk") for a in storm}
    produce(fp_settings, topics.alerts, storm)

    def settings_for(port):
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "desk", "url": f"http://127.0.0.1:{port}/desk", "secret_env": "T_GROUP_SECRET",
             "allow_private": True, "group_by": ["key_type"], "group_wait_s": 0.5, "group_interval_s": 0.5}]}})

    async def until(dispatcher, done, what):
        for _ in range(900):
            if done(dispatcher.log.states):
                return dict(dispatcher.log.states)
            await asyncio.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}")

    async def steps(dispatcher):
        failed = await until(dispatcher, lambda s: all(k in s and s[k].state == FAILED for k in keys), "the group to fail")
        receiver.options = replace(receiver.options, secrets=[secret])                 # the receiver is fixed
        requeued_states = await redeliver_failed(settings_for(0), topics, out=lambda line: None)
        final = await until(dispatcher, lambda s: all(s[k].state == DELIVERED for k in keys), "the new group")
        return failed, requeued_states, final

    failed, requeued_states, final = serve_and_dispatch(topics, settings_for, receiver, steps)
    (old,) = [s for s in failed.values() if s.is_group]
    assert old.state == FAILED and set(old.members) == keys and all(failed[k].group == old.key for k in keys)
    assert sorted(s.key for s in requeued_states) == sorted(keys)              # the members, not the notification
    groups = {k: s for k, s in final.items() if s.is_group}
    (new,) = [s for k, s in groups.items() if k != old.key]
    assert groups[old.key].state == FAILED and new.state == DELIVERED and new.webhook_id != old.webhook_id
    assert set(new.members) == keys and all(final[k].group == new.key and final[k].requeues == 1 for k in keys)
    assert summarize(final.values(), groups=True) == {"delivered": 1, "failed": 1}
    (arrived,) = receiver.items                                                  # the refused one was not stored
    assert arrived["webhook_id"] == new.webhook_id
    assert sorted((i["delivery"]["event_id"], i["delivery"]["webhook_id"]) for i in arrived["payload"]["alerts"]) == sorted(
        (a.event_id, webhook_id(delivery_key(a.event_id, "desk"))) for a in storm)
    assert receiver.rejected and not receiver.duplicates
