"""``finpulse dispatch --test NAME``: a test alert sent for real, through the real CLI, to a real receiver over HTTP,
with no Kafka running."""
from __future__ import annotations

import json
import subprocess
import sys

from alerts.signing import generate_secret
from stream.broker import free_port
from tests.test_delivery import REPO, finpulse, get_json, wait_for


def test_a_test_alert_goes_to_the_endpoint_as_a_delivery_would_and_says_what_it_answered(tmp_path):
    secret, port = generate_secret(), free_port()
    hook = f"http://127.0.0.1:{port}"
    signed = {"secret_env": "T_TRIAL_SECRET", "allow_private": True}
    config = tmp_path / "finpulse.toml"
    config.write_text("\n".join("[[alerts.endpoints]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in e.items())
                                for e in [
        {"name": "desk", "url": f"{hook}/desk", "min_severity": "warning", **signed},
        {"name": "og", "url": f"{hook}/v2/alerts", "format": "template", **signed,
         "template": '{"alias": "{alert_id}", "message": "{title}", "priority": "{severity|map:warning=P3}"}',
         "resolve_url": f"{hook}/v2/alerts/{{alert_id}}/close?identifierType=alias",
         "resolve_template": '{"note": "{summary}"}'},
        {"name": "snow", "url": f"{hook}/api/now/table/incident", "format": "template", **signed,
         "template": '{"short_description": "{title}"}', "incident_id_from": "/id", "resolve_method": "PATCH",
         "resolve_url": f"{hook}/api/now/table/incident/{{incident_id}}", "resolve_template": '{"state": "6"}',
         "update_template": '{"urgency": "{severity|map:warning=2,*=3}"}', "update_method": "PATCH"},
        {"name": "grouped", "url": f"{hook}/grouped", "group_by": ["all"], **signed},
        {"name": "tickets", "url": f"{hook}/tickets", "events": ["firing"], **signed},
        {"name": "wrong-key", "url": f"{hook}/wrong", "allow_private": True, "secret_env": "T_TRIAL_OTHER"},
    ]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FINPULSE_BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "T_TRIAL_SECRET": secret, "T_TRIAL_OTHER": generate_secret()}
    receiver = finpulse(["receiver", "--port", str(port), "--store", "", "--secret-env", "T_TRIAL_SECRET", "--quiet"],
                        env, tmp_path, "receiver")
    try:
        wait_for(lambda: get_json(f"{hook}/healthz"), "the receiver to listen")
        runs = {name: subprocess.run([sys.executable, "-m", "stream.cli", "--config", str(config), "dispatch",
                                      "--test", name, "--resolve-after", "0.2"],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
                for name in ("desk", "og", "snow", "grouped", "tickets", "wrong-key")}
        received = get_json(f"{hook}/received")
    finally:
        receiver.kill()

    for name in ("desk", "og", "snow", "grouped", "tickets"):
        assert runs[name].returncode == 0, runs[name].stdout + runs[name].stderr
    assert "firing    taken: HTTP 200" in runs["desk"].stdout and "resolved  taken: HTTP 200" in runs["desk"].stdout
    assert "to 'tickets' (native, http://127.0.0.1:" in runs["tickets"].stdout and "resolved" not in \
        runs["tickets"].stdout.split("\n", 1)[1]
    wrong = runs["wrong-key"]
    assert wrong.returncode == 1 and wrong.stdout.count("NOT taken: HTTP 401") == 2, wrong.stdout + wrong.stderr
    assert "2 of 2 not taken" in wrong.stdout and env["T_TRIAL_OTHER"] not in wrong.stdout + wrong.stderr

    items = received["items"]
    by_path = {}
    for item in items:
        by_path.setdefault(item["path"], []).append(item["payload"])
    desk = by_path["/desk"]
    assert [p["type"] for p in desk] == ["finpulse.alert.firing", "finpulse.alert.resolved"]
    assert {p["data"]["key"] for p in desk} == {"FinPulse test"} and desk[0]["data"]["severity"] == "warning"
    assert "this is a test notification" in desk[0]["data"]["summary"]
    alias = by_path["/v2/alerts"][0]["alias"]
    # min_severity info: the test is an info alert, which the map leaves as it is.
    assert by_path["/v2/alerts"] == [{"alias": alias, "message": "Negative sentiment spike: topic FinPulse test",
                                      "priority": "info"}]
    assert by_path[f"/v2/alerts/{alias}/close"][0]["note"].startswith("Test alert resolved")
    assert [p["type"] for p in by_path["/grouped"]] == ["finpulse.alert.group"] * 2
    assert [p["type"] for p in by_path["/tickets"]] == ["finpulse.alert.firing"]
    assert "/wrong" not in by_path
    # The firing's answer named what it opened; the resolve closed that one, with the endpoint's method.
    [opened] = [item for item in items if item["path"] == "/api/now/table/incident"]
    assert f"firing    taken: HTTP 200, incident {opened['id']} (webhook-id" in runs["snow"].stdout, runs["snow"].stdout
    # With an update_template, an escalation (info to warning) between them updates it there.
    assert [(r["method"], r["path"]) for r in received["requests"] if r["path"].startswith("/api/")] == [
        ("POST", "/api/now/table/incident"), ("PATCH", f"/api/now/table/incident/{opened['id']}"),
        ("PATCH", f"/api/now/table/incident/{opened['id']}")]
    assert [item["payload"] for item in items if item["path"].startswith("/api/")] == [
        {"short_description": "Negative sentiment spike: topic FinPulse test"}, {"urgency": "2"}, {"state": "6"}]
    assert "escalation taken: HTTP 200 (webhook-id" in runs["snow"].stdout, runs["snow"].stdout
    assert "escalation" not in runs["og"].stdout     # it opens no incident to update: firing and resolve alone
    # Each run's alert is new: a second test is not taken for a duplicate of the first.
    assert len({p["data"]["id"] for path in ("/desk", "/tickets") for p in by_path[path]}) == 2
