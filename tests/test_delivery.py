"""Alert delivery end to end: a real tansu broker, real `finpulse dispatch` and `finpulse receiver` processes (or the
same classes in-process), real HTTP on 127.0.0.1. Alerts are produced straight into the alerts topic."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from alerts.attempts import classify, parse_retry_after
from alerts.deliveries import (DELIVERED, EXPIRED, FAILED, PENDING, SILENCED, DeliveryState, delivery_key,
                               new_pending, read_delivery_states, redelivery_plan, requeued, webhook_id)
from alerts.dispatch import Dispatcher, full_jitter, route
from alerts.endpoints import Endpoint, EndpointSettings, blocked_reason, build_endpoints, load_delivery_config
from alerts.formats import ALERTMANAGER_FIRING_TTL
from alerts.receiver import Receiver, ReceiverOptions
from alerts.signing import generate_secret
from stream.broker import EmbeddedBroker, free_port
from stream.config import ConfigError, Settings, load_settings
from stream.kafka_io import read_topic_async
from stream.records import AlertRecord, format_time, utcnow
from tests.exposition import probe, scrape
from stream.topics import TopicNames
from tests.network import broker_behind_link
from tests.procs import ManagedProcess, isolated_settings
from tests.test_formats import make_alert as formats_alert

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def make_alert(status: str = "firing", severity: str = "critical", **changes) -> AlertRecord:
    """The formats tests' alert, emitted now: the dispatcher does not send alerts older than max_alert_age_s."""
    return formats_alert(status, severity, **{"emitted_at": utcnow(), **changes})


def produce(settings: Settings, topic: str, alerts: list[AlertRecord | bytes]) -> None:
    """Put alerts on the topic the way the detector does: keyed so that one episode stays on one partition."""
    async def _send():
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for alert in alerts:
                if isinstance(alert, bytes):
                    await producer.send_and_wait(topic, alert, key=b"garbage")
                else:
                    await producer.send_and_wait(topic, alert.to_json(), key=f"{alert.key_type}:{alert.key}".encode())
        finally:
            await producer.stop()
    asyncio.run(_send())


def wait_for(predicate, what: str, timeout_s: float = 120.0, every_s: float = 0.25):
    """Poll until ``predicate()`` returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out waiting for {what}")


def finpulse(args: list[str], env: dict, log_dir: Path, name: str) -> ManagedProcess:
    """A `finpulse ARGS` subprocess with the environment ``kafka_env`` built, its output in ``<log_dir>/<name>.log``."""
    return ManagedProcess([sys.executable, "-m", "stream.cli", *args], log_dir, name, env=env).start()


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def kafka_env(settings: Settings, **alerts) -> dict[str, str]:
    """The process environment that points `finpulse` at the test's broker, topics and [alerts] settings; a
    `finpulse dispatch` serves its metrics on a free port of its own (``FINPULSE_ALERTS__METRICS_PORT``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    kafka, worker = settings.kafka, settings.worker
    env.update({"FINPULSE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "FINPULSE_KAFKA__TOPIC_PREFIX": kafka.topic_prefix, "FINPULSE_WORKER__APP_ID": worker.app_id,
                "FINPULSE_ALERTS__METRICS_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"})
    for name, value in alerts.items():
        env[f"FINPULSE_ALERTS__{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


# ---------------------------------------------------------------- retry policy and the address guard

def test_retry_policy_pieces():
    assert parse_retry_after("7") == 7.0
    now = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after("Sun, 22 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Sun, 22 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert classify(202, None, b"").ok
    throttled = classify(429, "3", b"slow down")
    assert not throttled.ok and throttled.retryable and throttled.retry_after == 3.0 and "slow down" in throttled.error
    assert classify(503, None, b"").retryable and classify(408, None, b"").retryable
    assert not classify(400, "3", b"bad").retryable and classify(400, "3", b"bad").retry_after is None
    assert not classify(404, None, b"").retryable
    assert not classify(302, None, b"").retryable
    delays = [full_jitter(n, 1.0, 8.0) for n in range(1, 8) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays) and max(delays) > 4.0
    assert all(full_jitter(1, 1.0, 8.0) <= 1.0 for _ in range(50))


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.0.1", "169.254.169.254",
                                     "0.0.0.0", "100.64.0.1", "::1", "::", "fe80::1", "fc00::1", "fd12::1",
                                     "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:c0a8:101::1", "64:ff9b::a00:1"])
def test_non_public_addresses_are_refused(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_are_allowed(address):
    assert blocked_reason(address) is None


def test_endpoint_config_validation_and_secrets_stay_out_of_reprs(monkeypatch):
    secret = generate_secret()
    monkeypatch.setenv("T_SECRET", secret)
    monkeypatch.setenv("T_SLACK_URL", "https://hooks.slack.com/services/T0/B0/TOPSECRETTOKEN")

    def config(**endpoint):
        return load_delivery_config(Settings(raw={"alerts": {"endpoints": [{"name": "e", "secret_env": "T_SECRET", **endpoint}]}}))

    for url in ("http://127.0.0.1:8787/x", "http://[::1]/x", "http://[::ffff:10.0.0.1]/x", "http://169.254.169.254/latest",
                "http://[fe80::1]/x", "http://0.0.0.0/x"):
        with pytest.raises(ConfigError, match="refused"):
            config(url=url)
        assert config(url=url, allow_private=True).endpoints[0].allow_private
    assert config(url="https://93.184.216.34/hook")
    for bad, match in ((dict(url="ftp://example.com/x"), "http"), (dict(url="https://x.example", format="carrier-pigeon"), "format"),
                       (dict(url="https://x.example", min_severity="high"), "min_severity"),
                       (dict(format="pagerduty"), "routing_key_env"), (dict(), "url"),
                       (dict(url="https://x.example", name="a|b"), "name")):
        with pytest.raises(ConfigError, match=match):
            config(**bad)
    for url in ("https://x.example:99999/x", "https://x.example:0443x/x", "https://[::1/x"):
        with pytest.raises(ConfigError, match=r"the url's host or port cannot be read \(a port is a number from 1 to"):
            config(url=url)
    monkeypatch.setenv("T_BAD_PORT_URL", "https://x.example:SECRETPORT/x")
    with pytest.raises(ConfigError, match="url from .T_BAD_PORT_URL.: the url's host or port cannot be read") as caught:
        Endpoint(EndpointSettings(name="e", url_env="T_BAD_PORT_URL", secret_env=["T_SECRET"]))
    assert "SECRETPORT" not in str(caught.value)
    with pytest.raises(ConfigError, match="unknown setting"):
        config(url="https://x.example", secret="inline")
    with pytest.raises(ConfigError, match="T_MISSING is not set"):
        Endpoint(EndpointSettings(name="e", url="https://x.example", secret_env=["T_MISSING"]))

    slack = Endpoint(EndpointSettings(name="s", url_env="T_SLACK_URL", format="slack", secret_env=["T_SECRET"]))
    shown = repr(slack) + repr(slack.signing_secrets) + repr(slack.url)
    assert "TOPSECRETTOKEN" not in shown and secret not in shown and "hooks.slack.com" in shown
    assert slack.scrub(f"error at https://hooks.slack.com/services/T0/B0/TOPSECRETTOKEN with {secret}") == "error at *** with ***"


def test_secrets_put_where_env_var_names_belong_are_refused_without_being_printed(tmp_path):
    """`finpulse dispatch --check` on a config holding secrets themselves in secret_env, routing_key_env and url_env,
    and a Slack URL inline: each is refused (exit 2), and no output shows any of them."""
    secrets = {"secret_env": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "routing_key_env": "e93facc04764012d7bfb002500d5d1a6",
               "url_env": "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"}
    slack_url = "https://hooks.slack.com/services/T111/B111/INLINESECRETTOKEN"
    teams_url = "https://prod-01.westeurope.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=TEAMSSIG123"
    refusals = [("secret_env must name", {"name": "risk", "url": "https://risk.example.com/hook", "secret_env": secrets["secret_env"]}),
                ("routing_key_env must name", {"name": "pd", "format": "pagerduty", "routing_key_env": secrets["routing_key_env"]}),
                ("url_env must name", {"name": "slack", "format": "slack", "url_env": secrets["url_env"]}),
                ("secret_env = (value not shown)", {"name": "risk", "url": "https://risk.example.com/hook", "secret_env": 42}),
                ("name that in url_env", {"name": "slack", "format": "slack", "url": slack_url}),
                ("carries its signature (sig=)", {"name": "teams", "format": "teams", "url": teams_url})]
    for expected, endpoint in refusals:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
        env["FINPULSE_ALERTS__ENDPOINTS"] = json.dumps([endpoint])
        done = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--check"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode == 2 and expected in output and "configuration error" in output, output
        assert not any(s in output for s in [*secrets.values(), slack_url, "T111", "INLINESECRETTOKEN", "TEAMSSIG123"]), output



def test_a_dispatcher_whose_broker_went_away_stops_cleanly(tmp_path):
    """Ctrl-C to `finpulse dispatch` after its broker went away: it stops at once, exit code 0, no traceback. Before
    (``stream.kafka_io.stop_client``), aiokafka's consumer raised CancelledError out of ``stop()`` while its fetches
    were failing: exit code 1, a traceback, and the rest of the stop skipped."""
    dispatcher = None
    try:
        with EmbeddedBroker(log_file=tmp_path / "tansu.log") as own_broker:
            settings = isolated_settings(own_broker.bootstrap_servers, tmp_path)
            env = kafka_env(settings, endpoints=[{"name": "desk", "url": "http://127.0.0.1:9/hook",
                                                  "allow_private": True, "secret_env": "T_GONE_SECRET"}])
            env["T_GONE_SECRET"] = generate_secret()
            dispatcher = ManagedProcess([sys.executable, "-m", "stream.cli", "dispatch"], tmp_path, "dispatch", env=env)
            dispatcher.start().wait_for("Ctrl-C stops", timeout=60)
        time.sleep(3)       # its fetches fail and wait to retry
        os.killpg(dispatcher.pid, signal.SIGINT)
        code = dispatcher.wait(timeout=30)
    finally:
        if dispatcher is not None:
            dispatcher.kill()
    output = dispatcher.output()
    assert code == 0 and "Traceback" not in output and re.search(r"dispatcher \S+ stopped", output), dispatcher.tail()


@pytest.mark.parametrize("command", [["dispatch", "--status"], ["dispatch", "--redeliver"], ["dispatch"]])
def test_dispatch_commands_say_in_one_line_that_kafka_is_unreachable(command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    env["FINPULSE_ALERTS__ENDPOINTS"] = json.dumps([{"name": "desk", "url": "https://risk.example.com/hook",
                                                     "secret_env": "T_UNREACHABLE_SECRET"}])
    env["T_UNREACHABLE_SECRET"] = generate_secret()
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "stream.cli", "--bootstrap-servers", address, *command], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"finpulse: cannot reach Kafka at {address}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_example_config_is_valid_with_every_example_endpoint_enabled(tmp_path, pki):
    # The example's certificate files, made real: the test CA's and its client certificate.
    tls = tmp_path / "tls"
    tls.mkdir()
    for example, made in (("bank-root-ca.pem", "ca.pem"), ("finpulse-client.pem", "client.pem"),
                          ("finpulse-client.key", "client.key")):
        (tls / example).write_bytes(pki[made].read_bytes())
    text = (REPO / "finpulse.example.toml").read_text().replace("/etc/finpulse/tls/", f"{tls}/")
    # Uncomment the example endpoints too: "# name = ..." lines and "# [[alerts.endpoints]]" headers of [alerts].
    before, rest = text.split("\n[alerts]\n")
    alerts, after = rest.split("\n[dashboard]\n")
    enabled = re.sub(r"(?m)^# (\[\[alerts\.endpoints\]\]|[a-z_]+ = .*)$", r"\1", alerts)
    path = tmp_path / "finpulse.toml"
    path.write_text(f"{before}\n[alerts]\n{enabled}\n[dashboard]\n{after}")
    environ = {name: generate_secret() for name in ("FINPULSE_WEBHOOK_SECRET", "FINPULSE_RISK_SECRET_NEW", "FINPULSE_RISK_SECRET_OLD")}
    environ.update(FINPULSE_SLACK_WEBHOOK_URL="https://hooks.slack.com/services/T0/B0/X", FINPULSE_PAGERDUTY_ROUTING_KEY="R" * 32,
                   FINPULSE_TEAMS_WEBHOOK_URL="https://prod-01.westeurope.logic.azure.com/workflows/w/invoke?sig=S",
                   RISK_GATEWAY_AUTH="Bearer gateway-token", FINPULSE_RISK_PROXY_URL="http://finpulse:pw@proxy.bank.internal:3128",
                   FINPULSE_GOOGLE_CHAT_URL="https://chat.googleapis.com/v1/spaces/S/messages?key=K&token=T",
                   FINPULSE_SPLUNK_AUTH="Splunk 00000000-0000-0000-0000-000000000000",
                   FINPULSE_OPSGENIE_AUTH="GenieKey 00000000-0000-0000-0000-000000000000",
                   FINPULSE_SERVICENOW_AUTH="Basic ZmlucHVsc2U6cHc=", FINPULSE_JIRA_AUTH="Basic ZmlucHVsc2U6dG9rZW4=")
    plain = load_delivery_config(load_settings(REPO / "finpulse.example.toml", environ={}))
    assert [e.name for e in plain.endpoints] == ["demo-receiver"]
    config = load_delivery_config(load_settings(path, environ={}))
    endpoints = build_endpoints(config, environ)
    assert [e.name for e in endpoints] == ["demo-receiver", "risk-desk", "risk-gateway", "slack-markets", "teams-risk",
                                           "pagerduty-risk", "alertmanager", "google-chat", "splunk", "opsgenie",
                                           "servicenow", "jira"]
    assert endpoints[8].settings.template == {"sourcetype": "finpulse:alert", "source": "finpulse", "event": "{alert}"}
    assert endpoints[9].resolve_url.reveal().endswith("/v2/alerts/{episode_id}/close?identifierType=alias")
    servicenow, jira = endpoints[10:]
    assert (servicenow.settings.incident_id_from, servicenow.settings.resolve_method) == ("/result/sys_id", "PATCH")
    assert (jira.settings.incident_id_from, jira.settings.resolve_method) == ("/key", "POST")
    assert jira.settings.template["fields"]["project"] == {"key": "RISK"}
    assert (servicenow.sends_updates, servicenow.settings.update_method, servicenow.update_url) == (
        True, "PATCH", servicenow.resolve_url)
    assert jira.update_url.reveal().endswith("/rest/api/2/issue/{incident_id}/comment") and jira.sends_updates
    assert len(endpoints[1].signing_secrets) == 2 and endpoints[5].url.reveal() == "https://events.pagerduty.com/v2/enqueue"
    gateway = endpoints[2]
    assert gateway.request_headers() == {"X-Team": "risk", "Authorization": "Bearer gateway-token"}
    assert gateway.proxy.url == "http://proxy.bank.internal:3128" and gateway.tls is not True


def serve_and_dispatch(topics, settings_for, receiver: Receiver, steps):
    """Serve ``receiver`` on a free port, run a real Dispatcher with ``settings_for(port)`` and await
    ``steps(dispatcher)`` while it runs; returns what ``steps`` returns."""
    async def scenario():
        runner = web.AppRunner(receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        dispatcher = Dispatcher(settings_for(runner.addresses[0][1]), topics)
        await dispatcher.start()
        try:
            return await steps(dispatcher)
        finally:
            await dispatcher.stop()
            await runner.cleanup()
    return asyncio.run(scenario())


def dispatch_until_settled(topics, receiver: Receiver, deliveries: int, settings_for, polls: int = 600) -> dict:
    """Run a real Dispatcher against ``receiver`` (``serve_and_dispatch``) until ``deliveries`` delivery states
    exist and all are final (or ``polls`` tenths of a second pass); returns the states."""
    async def settle(dispatcher):
        for _ in range(polls):
            if len(dispatcher.log.states) == deliveries and all(s.terminal for s in dispatcher.log.states.values()):
                break
            await asyncio.sleep(0.1)
        return dict(dispatcher.log.states)
    return serve_and_dispatch(topics, settings_for, receiver, settle)


# ---------------------------------------------------------------- routing, filters, replay isolation, the guard

def test_routing_filters_replays_and_private_addresses(fp_settings, topics, caplog, monkeypatch):
    """One in-process dispatcher, one in-process receiver, five endpoints: who gets what."""
    secret, routing_key = generate_secret(), "PDROUTINGKEY0123456789"
    monkeypatch.setenv("T_ROUTE_SECRET", secret)
    monkeypatch.setenv("T_ROUTE_PD_KEY", routing_key)
    energy = make_alert("firing", id="en1", severity="critical")
    energy_resolved = make_alert("resolved", id="en1", severity="info")
    ticker = make_alert("firing", id="tk1", key_type="ticker", key="AAPL", severity="info")
    # Two runs replaying the same episode, and that episode live: the receiver deduplicates by webhook-id.
    replayed, replayed_again = make_alert("firing", id="rp1", run_id="bt-1"), make_alert("firing", id="rp1", run_id="bt-2")
    live_rp1 = make_alert("firing", id="rp1", key="Rates")
    produce(fp_settings, topics.alerts, [energy, ticker, replayed, energy_resolved, replayed_again, live_rp1])

    async def scenario():
        receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
        runner = web.AppRunner(receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"127.0.0.1:{runner.addresses[0][1]}"
        common = {"secret_env": "T_ROUTE_SECRET", "allow_private": True}
        settings = fp_settings.with_overrides({"alerts": {
            "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "replay_endpoint": "backtest",
            "endpoints": [
                {"name": "desk", "url": f"http://{base}/desk", "min_severity": "warning", **common},
                {"name": "energy-am", "url": f"http://{base}/api/v2/alerts", "format": "alertmanager", "keys": ["Energy*"], **common},
                {"name": "pd", "url": f"http://{base}/pd", "format": "pagerduty", "routing_key_env": "T_ROUTE_PD_KEY", **common},
                {"name": "backtest", "url": f"http://{base}/backtest", **common},
                {"name": "guarded", "url": f"http://localhost:{base.split(':')[1]}/guarded", "secret_env": "T_ROUTE_SECRET"},
            ]}})
        dispatcher = Dispatcher(settings, topics)
        await dispatcher.start()
        try:
            expected_states = 3 + 2 + 4 + 2 + 4   # desk, energy-am, pd, backtest, guarded
            for _ in range(600):
                states = dispatcher.log.states.values()
                if len(dispatcher.log.states) == expected_states and all(s.terminal for s in states):
                    break
                await asyncio.sleep(0.1)
            return receiver, dict(dispatcher.log.states), repr(dispatcher.endpoints)
        finally:
            await dispatcher.stop()
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG):
        receiver, states, endpoints_repr = asyncio.run(scenario())

    wanted = {("desk", "en1:firing"), ("desk", "en1:resolved"),    # a resolve follows its firing, whatever its severity
              ("desk", "rp1:firing"), ("energy-am", "en1:firing"), ("energy-am", "en1:resolved"),
              ("pd", "en1:firing"), ("pd", "tk1:firing"), ("pd", "en1:resolved"), ("pd", "rp1:firing"),
              # Replays reach the replay endpoint only, each run as its own event; live alerts never go there.
              ("backtest", "rp1@bt-1:firing"), ("backtest", "rp1@bt-2:firing")}
    paths = {"desk": "/desk", "energy-am": "/api/v2/alerts", "pd": "/pd", "backtest": "/backtest"}
    expected = Counter({(webhook_id(delivery_key(event, name)), paths[name]): 1 for name, event in wanted})
    assert Counter((item["webhook_id"], item["path"]) for item in receiver.items) == expected
    am = [i["payload"] for i in receiver.items if i["path"] == "/api/v2/alerts"]
    assert am[0][0]["labels"] == am[1][0]["labels"] and am[1][0]["labels"]["severity"] == "critical"
    assert not receiver.duplicates
    pd = {i["payload"]["event_action"]: i["payload"] for i in receiver.items if i["path"] == "/pd" and i["payload"]["dedup_key"] == "en1"}
    assert pd["resolve"]["routing_key"] == routing_key and pd["trigger"]["dedup_key"] == pd["resolve"]["dedup_key"] == "en1"
    guarded = {k: s for k, s in states.items() if s.endpoint == "guarded"}
    assert len(guarded) == 4 and all(s.state == FAILED and s.attempts == 1 and "refused" in s.last_error
                                     and "loopback" in s.last_error for s in guarded.values())
    assert all(s.state == DELIVERED for s in states.values() if s.endpoint != "guarded")
    assert not any(s.alert["run_id"] for s in states.values() if s.endpoint != "backtest")
    assert routing_key not in caplog.text and secret not in caplog.text and "refused" in caplog.text
    assert routing_key not in endpoints_repr and secret not in endpoints_repr


def test_route_sends_an_escalation_to_whoever_was_given_the_episode_even_if_its_filters_now_refuse_it(monkeypatch):
    """The filters of an endpoint can change while an episode is open (a config reload between the firing and the
    escalation): what the endpoint was given still decides that it hears of the escalation and of the resolve."""
    monkeypatch.setenv("T_ROUTE_ONLY_SECRET", generate_secret())
    desk, pager = (Endpoint(EndpointSettings(name=name, url="https://risk.example.com/x", secret_env=["T_ROUTE_ONLY_SECRET"],
                                             keys=["Rates*"], min_severity=severity))
                   for name, severity in (("desk", "info"), ("pager", "critical")))
    up = make_alert("firing", id="r1", severity="critical", escalated_from="info")
    assert route(up, [desk, pager], given=lambda e: False) == []
    assert route(up, [desk, pager], given=lambda e: e is desk) == [desk]
    assert route(make_alert("resolved", id="r1"), [desk, pager], given=lambda e: e is desk) == [desk]
    assert route(make_alert("firing", id="r1"), [desk, pager], given=lambda e: True) == []   # a firing: filters only
    rates = make_alert("firing", id="r2", key="Rates | Fed", severity="critical", escalated_from="warning")
    assert route(rates, [desk, pager], given=lambda e: False) == [desk, pager]


def test_an_escalation_goes_where_an_incident_may_be_open_only_as_an_update_and_opens_one_where_none_can_be():
    """An endpoint that opens incidents: where its firing was delivered or is on its way, the escalation goes only as
    an update; where every earlier event was refused, silenced or expired, nothing is open and the escalation opens
    the incident (it was dropped, and the episode never reached the tool)."""
    def incident_endpoint(name: str, **update):
        return Endpoint(load_delivery_config(Settings(raw={"alerts": {"endpoints": [
            {"name": name, "url": "https://snow.example.com/api/incident", "format": "template",
             "template": {"d": "{title}"}, "incident_id_from": "/id",
             "resolve_url": "https://snow.example.com/api/incident/{incident_id}", **update}]}})).endpoints[0],
            environ={})
    plain, updating = incident_endpoint("plain"), incident_endpoint("updating", update_template={"urgency": "1"})
    escalation = make_alert("firing", id="u1", severity="critical", escalated_from="warning")
    both = [plain, updating]
    assert route(escalation, both, given=lambda e: True, may_be_open=lambda e: True) == [updating]
    assert route(escalation, both, given=lambda e: True, may_be_open=lambda e: False) == both
    assert route(escalation, both, given=lambda e: False, may_be_open=lambda e: False) == both


def test_route_gives_an_endpoint_only_the_kinds_of_event_it_takes(monkeypatch):
    """``events``: a ticketing tool that opens a ticket per request takes firings only; a resolve still never goes to
    an endpoint that saw nothing of its episode because the one that did takes no resolves."""
    monkeypatch.setenv("T_ROUTE_EVENTS_SECRET", generate_secret())
    tickets, desk = (Endpoint(EndpointSettings(name=name, url="https://risk.example.com/x", events=events,
                                               secret_env=["T_ROUTE_EVENTS_SECRET"]))
                     for name, events in (("tickets", ["firing"]), ("desk", [])))
    firing, resolved = make_alert("firing", id="e1"), make_alert("resolved", id="e1")
    escalation = make_alert("firing", id="e1", severity="critical", escalated_from="info")
    assert route(firing, [tickets, desk], given=lambda e: False) == [tickets, desk]
    assert route(escalation, [tickets, desk], given=lambda e: True) == [desk]
    assert route(resolved, [tickets, desk], given=lambda e: True) == [desk]
    assert route(resolved, [tickets, desk], given=lambda e: e is tickets) == []
    with pytest.raises(ConfigError, match=r"events \['resolve'\] unknown \(use firing, escalation, resolved\)"):
        load_delivery_config(Settings(raw={"alerts": {"endpoints": [
            {"name": "x", "url": "https://risk.example.com/x", "secret_env": "T", "events": ["resolve"]}]}}))


def test_an_escalation_reaches_who_now_accepts_it_and_who_got_the_firing_in_order(fp_settings, topics, monkeypatch):
    """An episode fires as info, escalates to warning, then to critical, then resolves. A critical-only pager gets
    the escalation to critical and the resolve, not the info firing; an info desk gets all four in order; a
    warning-and-up PagerDuty service is triggered by the warning escalation, re-triggered at critical (same
    dedup_key) and resolved; Alertmanager sees the old severity's label set ended as the new one starts, and the
    resolve ends them all."""
    secret, routing_key = generate_secret(), "PDROUTINGKEYESCALATE0"
    monkeypatch.setenv("T_ESC_SECRET", secret)
    monkeypatch.setenv("T_ESC_PD_KEY", routing_key)
    fired = make_alert("firing", id="esc1", severity="info")
    episode = [fired,
               make_alert("firing", id="esc1", severity="warning", escalated_from="info"),
               make_alert("firing", id="esc1", severity="critical", escalated_from="warning"),
               make_alert("resolved", id="esc1", severity="critical")]
    produce(fp_settings, topics.alerts, episode)

    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
    common = {"secret_env": "T_ESC_SECRET", "allow_private": True}
    states = dispatch_until_settled(topics, receiver, 4 + 2 + 3 + 4, lambda port: fp_settings.with_overrides({"alerts": {
        "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "desk", "url": f"http://127.0.0.1:{port}/desk", **common},
            {"name": "pager", "url": f"http://127.0.0.1:{port}/pager", "min_severity": "critical", **common},
            {"name": "pd", "url": f"http://127.0.0.1:{port}/pd", "format": "pagerduty", "min_severity": "warning",
             "routing_key_env": "T_ESC_PD_KEY", **common},
            {"name": "am", "url": f"http://127.0.0.1:{port}/am", "format": "alertmanager", **common}]}}))
    events = ["esc1:firing", "esc1:firing:warning", "esc1:firing:critical", "esc1:resolved"]
    assert [a.event_id for a in episode] == events
    wanted = {"desk": events, "pager": events[2:], "pd": events[1:], "am": events}
    assert set(states) == {delivery_key(e, name) for name, evs in wanted.items() for e in evs}
    assert all(s.state == DELIVERED for s in states.values())

    def arrived(path):
        return [item for item in receiver.items if item["path"] == path]
    for name, evs in wanted.items():
        # In order on each endpoint, each once, each under its own webhook-id.
        assert [i["webhook_id"] for i in arrived(f"/{name}")] == [webhook_id(delivery_key(e, name)) for e in evs]
    assert not receiver.duplicates
    desk = [i["payload"] for i in arrived("/desk")]
    assert [p["type"] for p in desk] == ["finpulse.alert.firing", "finpulse.alert.escalated",
                                         "finpulse.alert.escalated", "finpulse.alert.resolved"]
    assert [(p["data"]["severity"], p["data"]["escalated_from"]) for p in desk] == [
        ("info", ""), ("warning", "info"), ("critical", "warning"), ("critical", "")]
    pager = [i["payload"] for i in arrived("/pager")]
    assert [(p["type"], p["data"]["severity"]) for p in pager] == [("finpulse.alert.escalated", "critical"),
                                                                     ("finpulse.alert.resolved", "critical")]
    pd = [i["payload"] for i in arrived("/pd")]
    assert [(p["event_action"], p.get("payload", {}).get("severity")) for p in pd] == [
        ("trigger", "warning"), ("trigger", "critical"), ("resolve", None)]
    assert {p["dedup_key"] for p in pd} == {"esc1"} and all(p["routing_key"] == routing_key for p in pd)
    still_firing = format_time(fired.started_at + ALERTMANAGER_FIRING_TTL)     # a firing's far end
    am = [[(entry["labels"]["severity"], entry["endsAt"] != still_firing) for entry in i["payload"]] for i in arrived("/am")]
    # (severity label, ended): each post ends the label sets sent before and opens the new one; the resolve ends all.
    assert am == [[("info", False)], [("info", True), ("warning", False)],
                  [("info", True), ("warning", True), ("critical", False)],
                  [("info", True), ("warning", True), ("critical", True)]]
    identity = {k: v for k, v in arrived("/am")[0]["payload"][0]["labels"].items() if k != "severity"}
    assert all({k: v for k, v in e["labels"].items() if k != "severity"} == identity
               for i in arrived("/am") for e in i["payload"])


def test_failures_are_recorded_at_the_horizon_and_at_once_for_client_errors(fp_settings, topics, monkeypatch):
    """A closed port is retried until the retry horizon, then recorded as failed with its attempts and last error;
    a 401 (the receiver holds another key) fails at once. A failed firing does not block its resolve: it is
    recorded failed too, without an attempt when its own window ended while it waited behind the firing."""
    monkeypatch.setenv("T_FAIL_SECRET", generate_secret())
    alerts = [make_alert("firing", id="f1"), make_alert("resolved", id="f1")]
    produce(fp_settings, topics.alerts, alerts)

    receiver = Receiver(ReceiverOptions(secrets=[generate_secret()], quiet=True))
    common = {"secret_env": "T_FAIL_SECRET", "allow_private": True}
    states = dispatch_until_settled(topics, receiver, 4, lambda port: fp_settings.with_overrides({"alerts": {
        "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            # The horizon runs from when the alerts were emitted: it leaves time for the dispatcher to join its group.
            {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/x", "retry_horizon_s": 10, **common},
            {"name": "wrong-key", "url": f"http://127.0.0.1:{port}/x", **common},
        ]}}))
    # What the dispatcher recorded is what a new reader of the deliveries topic sees.
    def essentials(found):
        return {k: (v.state, v.attempts, v.last_error, v.last_status, v.seq) for k, v in found.items()}
    assert essentials(read_delivery_states(fp_settings.kafka, topics.deliveries)) == essentials(states)
    firing, resolve = states[delivery_key("f1:firing", "gone")], states[delivery_key("f1:resolved", "gone")]
    assert firing.state == FAILED and firing.attempts >= 2 and firing.last_error.startswith("gave up after")
    assert "Cannot connect" in firing.last_error and firing.next_attempt_at is None
    assert resolve.state == FAILED and resolve.next_attempt_at is None
    assert resolve.last_error.startswith(("gave up after", "the retry window ended"))
    for event in ("f1:firing", "f1:resolved"):
        wrong = states[delivery_key(event, "wrong-key")]
        assert wrong.state == FAILED and wrong.attempts == 1 and wrong.last_status == 401 and "bad_signature" in wrong.last_error
    assert receiver.rejected == {"bad_signature": 2} and not receiver.items


def test_a_retry_after_of_a_day_pauses_the_endpoint_for_backoff_max_s_only(fp_settings, topics, monkeypatch):
    """A 429 with Retry-After: 86400 neither fails the delivery nor pauses the endpoint for a day: the wait is capped
    at backoff_max_s, so the firing and the resolve queued behind it arrive within seconds."""
    secret = generate_secret()
    monkeypatch.setenv("T_RA_SECRET", secret)
    produce(fp_settings, topics.alerts, [make_alert("firing", id="ra1"), make_alert("resolved", id="ra1")])

    receiver = Receiver(ReceiverOptions(secrets=[secret], throttle=1, retry_after_s=86400, quiet=True))
    states = dispatch_until_settled(topics, receiver, 2, lambda port: fp_settings.with_overrides({"alerts": {
        "backoff_initial_s": 0.1, "backoff_max_s": 0.5, "endpoints": [
            {"name": "desk", "url": f"http://127.0.0.1:{port}/x", "secret_env": "T_RA_SECRET",
             "allow_private": True, "retry_horizon_s": 600}]}}), polls=300)
    firing, resolve = states[delivery_key("ra1:firing", "desk")], states[delivery_key("ra1:resolved", "desk")]
    assert (firing.state, firing.attempts, resolve.state, resolve.attempts) == (DELIVERED, 2, DELIVERED, 1)
    assert [r["status"] for r in receiver.requests] == [429, 200, 200]
    assert receiver.requests[1]["at"] - receiver.requests[0]["at"] < 5


def test_a_new_dispatcher_expires_old_alerts_and_retries_only_within_their_window(fp_settings, topics, monkeypatch):
    """A new dispatcher group reads the topic from its start: five 5-day-old firing/resolve pairs are recorded
    expired, never sent; a fresh pair is delivered. A resolve older than max_alert_age_s whose firing reaches the
    endpoint is still sent (it closes the incident). A retry window runs from the alert's emitted_at: an alert
    emitted 100 s ago with a 101 s horizon gives up on a closed port within seconds. `--status` lists the expired."""
    secret = generate_secret()
    monkeypatch.setenv("T_OLD_SECRET", secret)
    now = utcnow()
    old = [make_alert(status, id=f"old{i}", key=f"Topic {i}", emitted_at=now - timedelta(days=5))
           for i in range(5) for status in ("firing", "resolved")]
    fresh = [make_alert("firing", id="new1"), make_alert("resolved", id="new1"),
             make_alert("firing", id="late", key="Late"), make_alert("resolved", id="late", key="Late", emitted_at=now - timedelta(hours=7)),
             make_alert("firing", id="gone1", key="Gone", emitted_at=now - timedelta(seconds=100))]
    produce(fp_settings, topics.alerts, old + fresh)

    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
    common = {"secret_env": "T_OLD_SECRET", "allow_private": True}
    states = dispatch_until_settled(topics, receiver, 15, lambda port: fp_settings.with_overrides({"alerts": {
        "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "desk", "url": f"http://127.0.0.1:{port}/x", "keys": ["Topic*", "Energy*", "Late"], **common},
            {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/x", "keys": ["Gone"], "retry_horizon_s": 101,
             **common}]}}), polls=300)
    for alert in old:
        expired = states[delivery_key(alert.event_id, "desk")]
        assert expired.state == EXPIRED and expired.attempts == 0
        assert "max_alert_age_s" in expired.last_error or "its firing expired" in expired.last_error
    sent = [delivery_key(a.event_id, "desk") for a in fresh[:4]]
    assert all(states[k].state == DELIVERED for k in sent)
    assert Counter(item["webhook_id"] for item in receiver.items) == Counter({webhook_id(k): 1 for k in sent})
    gone = states[delivery_key("gone1:firing", "gone")]
    assert gone.state == FAILED and gone.deadline_at == DeliveryState.from_json(gone.to_json()).deadline_at
    assert abs((gone.deadline_at - fresh[4].emitted_at).total_seconds() - 101) < 0.01
    status = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--status"], cwd=REPO, env=kafka_env(fp_settings),
                            capture_output=True, text=True, timeout=120)
    assert "'expired': 10" in status.stdout and status.stdout.count("  expired ") == 10, status.stdout + status.stderr


def test_a_late_older_record_is_answered_with_the_newest_state(fp_settings, topics, monkeypatch):
    """Two overlapping `--redeliver` runs: the second one's re-queue (an older seq) lands after the dispatcher's
    `delivered`. The merge ignores it; the owning dispatcher writes `delivered` again, so the last record of the key
    (the one compaction keeps) is the newest state, and nothing is sent twice."""
    monkeypatch.setenv("T_STALE_SECRET", generate_secret())
    produce(fp_settings, topics.alerts, [make_alert("firing", id="st1")])
    key = delivery_key("st1:firing", "desk")

    async def last_records() -> dict[str, DeliveryState]:
        """Per key, its last record on the topic (records are in offset order): what compaction would keep."""
        records = await read_topic_async(fp_settings.kafka, topics.deliveries)
        return {r.key.decode(): DeliveryState.from_json(r.value) for r in records}

    async def scenario():
        receiver = Receiver(ReceiverOptions(secrets=[os.environ["T_STALE_SECRET"]], quiet=True))
        runner = web.AppRunner(receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        settings = fp_settings.with_overrides({"alerts": {"endpoints": [
            {"name": "desk", "url": f"http://127.0.0.1:{runner.addresses[0][1]}/x", "secret_env": "T_STALE_SECRET",
             "allow_private": True}]}})
        dispatcher = Dispatcher(settings, topics)
        await dispatcher.start()
        try:
            for _ in range(300):
                delivered = dispatcher.log.get(key)
                if delivered is not None and delivered.state == DELIVERED:
                    break
                await asyncio.sleep(0.1)
            late = replace(delivered, state=PENDING, seq=delivered.seq - 1, delivered_at=None, requeues=1,
                           requeued_at=delivered.updated_at)
            producer = AIOKafkaProducer(bootstrap_servers=fp_settings.kafka.bootstrap_servers, acks="all")
            await producer.start()
            await producer.send_and_wait(topics.deliveries, late.to_json(), key=key.encode())
            await producer.stop()
            for _ in range(300):
                last = await last_records()
                if last[key].seq > delivered.seq:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # time to (wrongly) send it again
            return delivered, last[key], dispatcher.log.get(key), receiver
        finally:
            await dispatcher.stop()
            await runner.cleanup()

    delivered, last, known, receiver = asyncio.run(scenario())
    assert delivered.state == DELIVERED
    as_written = DeliveryState.from_json(delivered.to_json())  # times travel at millisecond precision
    assert last.state == DELIVERED and last.seq == delivered.seq + 1 and last.delivered_at == as_written.delivered_at
    assert known.state == DELIVERED and known.seq == last.seq
    assert [item["webhook_id"] for item in receiver.items] == [webhook_id(key)]


def test_dispatch_check_reports_refused_endpoints(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    env["T_CHECK_SECRET"] = generate_secret()
    endpoints = [{"name": "local-demo", "url": "http://127.0.0.1:8787/webhook", "secret_env": "T_CHECK_SECRET", "allow_private": True},
                 {"name": "sneaky", "url": "http://localhost:8787/webhook", "secret_env": "T_CHECK_SECRET"}]
    env["FINPULSE_ALERTS__ENDPOINTS"] = json.dumps(endpoints)
    done = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "ok (private addresses allowed)" in lines["local-demo"]
    assert "REFUSED" in lines["sneaky"] and "loopback" in lines["sneaky"]
    assert env["T_CHECK_SECRET"] not in done.stdout + done.stderr


def test_redelivery_plan_requeues_failed_only():
    """Only failed deliveries are re-queued (firing before resolve), filtered by endpoint and alert id; a delivered
    one never is, nor a failed one to an endpoint no longer configured, nor a firing whose resolve got through."""
    def state(alert_id, event, endpoint, final, offset=0):
        """``event``: firing, resolved, or firing:<severity> for an escalation from info."""
        status, _, escalated_to = event.partition(":")
        alert = (make_alert(status, id=alert_id, severity=escalated_to, escalated_from="info") if escalated_to
                 else make_alert(status, id=alert_id, severity="info"))
        return replace(new_pending(alert, endpoint, 0, offset, 60.0), state=final, seq=3)
    states = [state("a", "resolved", "desk", FAILED, 1), state("a", "firing", "desk", FAILED),
              state("a", "firing", "ops", DELIVERED), state("b", "firing", "desk", FAILED),
              state("c", "firing", "pd", FAILED), state("c", "resolved", "pd", DELIVERED, 1),
              state("d", "firing", "gone", FAILED), state("e", "firing", "desk", PENDING),
              state("f", "firing", "desk", FAILED), state("f", "resolved", "desk", EXPIRED, 1),
              # g escalated to critical, which reached desk: its failed info firing stays failed; h's escalation
              # to warning failed while its critical one is still failed too: both go, in order.
              state("g", "firing", "desk", FAILED), state("g", "firing:critical", "desk", DELIVERED, 1),
              state("h", "firing:warning", "desk", FAILED, 1), state("h", "firing:critical", "desk", FAILED, 2),
              # i's escalation (an update of its incident) failed, and its resolve closed the incident since.
              state("i", "firing", "desk", DELIVERED), state("i", "firing:critical", "desk", FAILED, 1),
              state("i", "resolved", "desk", DELIVERED, 2)]
    horizons = {"desk": 30.0, "ops": 30.0, "pd": 30.0}
    chosen, skipped = redelivery_plan(states, horizons)
    assert [s.key for s in chosen] == ["a:firing|desk", "a:resolved|desk", "b:firing|desk",
                                       "h:firing:warning|desk", "h:firing:critical|desk"]
    closed = ("its resolve was delivered already (sending the {} now would reopen it, or update what the endpoint "
              "saw closed)")
    assert {s.key: why for s, why in skipped} == {"c:firing|pd": closed.format("firing"),
                                                  "i:firing:critical|desk": closed.format("escalation"),
                                                  "d:firing|gone": "the endpoint is not configured",
                                                  "f:firing|desk": "its resolve expired (sent now, the firing would open an incident nothing closes)",
                                                  "g:firing|desk": "an escalation to critical was delivered already "
                                                                   "(sending this now would lower the incident's severity)"}
    assert [s.key for s in redelivery_plan(states, horizons, alert_id="a")[0]] == ["a:firing|desk", "a:resolved|desk"]
    assert [s.key for s in redelivery_plan(states, horizons, endpoint="ops")[0]] == []
    again = requeued(chosen[0], 30.0)
    assert (again.state, again.requeues, again.webhook_id, again.key) == (PENDING, 1, chosen[0].webhook_id, chosen[0].key)
    assert again.next_attempt_at <= again.deadline_at and (again.deadline_at - again.requeued_at).total_seconds() == 30.0
    for final in (DELIVERED, PENDING):
        with pytest.raises(ValueError, match="only a failed delivery"):
            requeued(replace(chosen[0], state=final), 30.0)


# ---------------------------------------------------------------- outages and restarts, with real processes

@pytest.mark.slow
def test_outage_throttling_and_restarts_deliver_everything_exactly_once(fp_settings, topics, tmp_path):
    """Receiver down (connection refused), then 500s, then 429 + Retry-After, then up; the dispatcher is killed
    (-9) twice on the way. Every alert event reaches every endpoint, stored once; nothing acknowledged before a
    kill is sent again; a resolve never arrives before its firing."""
    secret = generate_secret()
    port = free_port()
    retry_after_s = 2
    endpoints = [
        {"name": "desk", "url": f"http://127.0.0.1:{port}/webhook", "secret_env": "T_E2E_SECRET", "allow_private": True,
         "retry_horizon_s": 600},
        {"name": "am", "url": f"http://127.0.0.1:{port}/api/v2/alerts", "format": "alertmanager",
         "secret_env": "T_E2E_SECRET", "allow_private": True, "retry_horizon_s": 600},
    ]
    # One request at a time, so that "nothing went to an endpoint during its Retry-After pause" is exact; a
    # Retry-After is honoured up to backoff_max_s, so that is above it here.
    env = kafka_env(fp_settings, endpoints=endpoints, backoff_initial_s="0.2", backoff_max_s="2.5", max_concurrency="1")
    env["T_E2E_SECRET"] = secret
    store = tmp_path / "received.jsonl"
    names = [e["name"] for e in endpoints]

    batch1 = [make_alert(status, id=f"b1-{i}", key=f"Topic {i}") for i in range(4) for status in ("firing", "resolved")]
    batch2 = [make_alert(status, id=f"b2-{i}", key=f"Topic {i}") for i in range(2) for status in ("firing", "resolved")]
    expected = {delivery_key(a.event_id, n) for a in batch1 + batch2 for n in names}
    procs: list[ManagedProcess] = []

    def start(name: str, *args: str) -> ManagedProcess:
        procs.append(finpulse(list(args), env, tmp_path, name))
        return procs[-1]

    def states():
        return read_delivery_states(fp_settings.kafka, topics.deliveries)

    try:
        produce(fp_settings, topics.alerts, batch1)

        # 1. Nobody listens: every firing is attempted, refused, kept pending and retried (once the breaker opens,
        #    the pending firings take turns to probe); its resolve waits behind it.
        first = start("dispatch-1", "dispatch")
        def all_refused():
            s = states()
            return (len(s) == 8 * len(names) and all(v.state == PENDING for v in s.values())
                    and all(v.attempts >= 2 for v in s.values() if v.alert_status == "firing") and s)
        refused = wait_for(all_refused, "every firing to be attempted twice against a closed port")
        for state in refused.values():
            if state.alert_status == "firing":
                assert "Cannot connect" in state.last_error and state.next_attempt_at
            else:
                assert state.attempts == 0
        first.kill()

        # 2. The receiver comes up failing (500s, then 429 with Retry-After); a new dispatcher resumes the pending
        #    deliveries and is killed once the first one is acknowledged.
        #    The receiver answers slowly (--delay), so the kill lands with deliveries still pending or in flight.
        receiver = start("receiver", "receiver", "--port", str(port), "--store", str(store), "--secret-env", "T_E2E_SECRET",
                         "--fail-first", "3", "--throttle", "2", "--retry-after", str(retry_after_s), "--delay", "0.5")
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), "the receiver to listen")
        second = start("dispatch-2", "dispatch")
        wait_for(lambda: any(v.state == DELIVERED for v in states().values()), "a first acknowledged delivery")
        second.kill()
        at_kill = states()
        acknowledged = {k for k, v in at_kill.items() if v.state == DELIVERED}
        assert any(v.state == PENDING for v in at_kill.values()), "the kill was meant to interrupt pending deliveries"

        # 3. While no dispatcher runs: new alerts, an at-least-once duplicate, garbage and a replay's alert.
        produce(fp_settings, topics.alerts, batch2 + [batch1[0], batch2[0], b"\xffnot json",
                                                      make_alert("firing", id="replayed", run_id="bt-7")])
        third = start("dispatch-3", "dispatch")
        final = wait_for(lambda: (lambda s: len(s) == len(expected) and all(v.state == DELIVERED for v in s.values()) and s)(states()),
                         "every delivery to be acknowledged")
        assert third.stop(60) == 0, third.tail(3000)
        seen = get_json(f"http://127.0.0.1:{port}/received")
    finally:
        for proc in procs:
            proc.kill()

    assert seen is not None, receiver.tail(3000)
    stored = [json.loads(line) for line in store.read_text().splitlines()]
    # Every event reached every endpoint exactly once (by webhook-id, which is per event and endpoint).
    assert set(final) == expected
    assert Counter(item["webhook_id"] for item in stored) == Counter({webhook_id(k): 1 for k in expected})
    assert not any(item["payload"].get("data", {}).get("run_id") for item in stored if isinstance(item["payload"], dict))
    # What was acknowledged before the kill was never sent again.
    assert acknowledged and not {webhook_id(k) for k in acknowledged} & set(seen["duplicates"])
    # The failures really happened, and were retried through.
    assert seen["injected"] == {"500": 3, "429": 2}
    assert any(v.attempts >= 3 for v in final.values())
    # A resolve never arrives before its firing at the same endpoint.
    order = {item["webhook_id"]: n for n, item in enumerate(stored)}
    for alert in batch1 + batch2:
        if alert.status == "resolved":
            for name in names:
                assert order[webhook_id(delivery_key(f"{alert.id}:firing", name))] < order[webhook_id(delivery_key(alert.event_id, name))]
    # Retry-After was honoured: after a 429, nothing went to that endpoint for the announced time.
    requests = seen["requests"]
    for n, request in enumerate(requests):
        if request["status"] == 429:
            later = [r["at"] for r in requests[n + 1:] if r["path"] == request["path"]]
            assert later and later[0] - request["at"] >= retry_after_s - 0.05
    status = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert f"{len(expected)} deliveries {{'delivered': {len(expected)}}}" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_a_broker_outage_mid_delivery_delays_alerts_but_delivers_each_once(tmp_path):
    """A network partition from the broker for 12 s while a slow receiver takes a batch of alerts, and a second batch once it
    is back: the dispatcher keeps running (what it had recorded as pending goes on being sent; the records that
    say so wait for the broker), its /readyz says the broker is gone, and every alert reaches the receiver exactly
    once (by webhook id), each resolve after its firing."""
    secret, port = generate_secret(), free_port()
    alerts = [make_alert(status, id=f"o-{i}", key=f"Topic {i}") for i in range(8) for status in ("firing", "resolved")]
    store = tmp_path / "received.jsonl"
    procs: list[ManagedProcess] = []
    with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker):
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path)
        names = TopicNames(settings.kafka.topic_prefix)
        env = kafka_env(settings, endpoints=[{"name": "desk", "url": f"http://127.0.0.1:{port}/webhook",
                                              "secret_env": "T_OUTAGE_SECRET", "allow_private": True}],
                        backoff_initial_s="0.2", backoff_max_s="2", max_concurrency="1")
        env["T_OUTAGE_SECRET"] = secret
        readyz = f"http://127.0.0.1:{env['FINPULSE_ALERTS__METRICS_PORT']}/readyz"
        try:
            procs.append(finpulse(["receiver", "--port", str(port), "--store", str(store), "--secret-env",
                                   "T_OUTAGE_SECRET", "--delay", "0.4", "--quiet"], env, tmp_path, "receiver"))
            wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), "the receiver to listen")
            dispatcher = finpulse(["dispatch"], env, tmp_path, "dispatch")
            procs.append(dispatcher)
            wait_for(lambda: probe(readyz, timeout=2)[0] == 200, "the dispatcher to be ready")
            produce(settings, names.alerts, alerts[:10])
            at_cut = wait_for(lambda: (get_json(f"http://127.0.0.1:{port}/received") or {}).get("requests"),
                              "a first delivery", every_s=0.05)
            link.cut("blackhole")
            readiness = []
            for _ in range(12):
                readiness.append(probe(readyz, timeout=2))
                time.sleep(1)
            during = (get_json(f"http://127.0.0.1:{port}/received") or {}).get("requests", [])
            link.restore()
            assert dispatcher.running(), dispatcher.tail()
            produce(settings, names.alerts, alerts[10:])
            final = wait_for(lambda: (lambda s: len(s) == len(alerts) and all(v.state == DELIVERED for v in s.values())
                                      and s)(read_delivery_states(settings.kafka, names.deliveries)),
                             "every delivery to be acknowledged after the outage")
            wait_for(lambda: probe(readyz, timeout=2)[0] == 200, "the dispatcher to be ready again")
            assert dispatcher.stop(60) == 0, dispatcher.tail(3000)
        finally:
            for proc in procs:
                proc.kill()
    not_ready = [body["checks"]["dispatcher"]["detail"] for status, body in readiness if status == 503]
    assert not_ready and "broker" in not_ready[-1], readiness
    assert len(at_cut) < 10, "the outage was meant to land mid-batch"
    print(f"{len(at_cut)} alert(s) delivered before the outage, {len(during)} by its end, all {len(alerts)} after")
    stored = [json.loads(line) for line in store.read_text().splitlines()]
    assert Counter(item["webhook_id"] for item in stored) == Counter({webhook_id(k): 1 for k in final})
    order = {item["webhook_id"]: n for n, item in enumerate(stored)}
    for alert in alerts:
        if alert.status == "resolved":
            assert (order[webhook_id(delivery_key(f"{alert.id}:firing", "desk"))]
                    < order[webhook_id(delivery_key(alert.event_id, "desk"))])


@pytest.mark.slow
def test_a_dispatchers_metrics_count_its_deliveries_and_show_the_endpoint_that_is_down(fp_settings, topics, tmp_path):
    """`finpulse dispatch` alone serves /metrics and probes. One alert to three endpoints: one takes it
    (delivered), one refuses it for good (a wrong signing key: 401, failed), one is down (connection refused:
    pending, its breaker open after one failure). The counters say exactly that; the gauges show the pending
    delivery, its age, the open breaker and the pause; the alerts topic's lag comes down to 0."""
    secret = generate_secret()
    port = free_port()
    endpoints = [
        {"name": "desk", "url": f"http://127.0.0.1:{port}/desk", "secret_env": "T_M_SECRET", "allow_private": True},
        {"name": "wrong-key", "url": f"http://127.0.0.1:{port}/wrong", "secret_env": "T_M_WRONG",
         "allow_private": True},
        {"name": "down", "url": f"http://127.0.0.1:{free_port()}/down", "secret_env": "T_M_SECRET",
         "allow_private": True, "breaker_failures": 1},
    ]
    # The down endpoint's next try is 30 s away: its one attempt stays the only one while the test looks.
    env = kafka_env(fp_settings, endpoints=endpoints, backoff_initial_s="30", backoff_max_s="60")
    env.update(T_M_SECRET=secret, T_M_WRONG=generate_secret())
    base = f"http://127.0.0.1:{env['FINPULSE_ALERTS__METRICS_PORT']}"
    names = [e["name"] for e in endpoints]
    alert = make_alert("firing", id="m1")
    procs: list[ManagedProcess] = []

    def settled():
        s = read_delivery_states(fp_settings.kafka, topics.deliveries)
        return {k.split("|")[1]: (v.state, v.attempts) for k, v in s.items()} == {
            "desk": (DELIVERED, 1), "wrong-key": (FAILED, 1), "down": (PENDING, 1)}

    try:
        procs.append(finpulse(["receiver", "--port", str(port), "--store", "", "--secret-env", "T_M_SECRET", "--quiet"],
                              env, tmp_path, "receiver"))
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), "the receiver to listen")
        produce(fp_settings, topics.alerts, [alert])
        dispatcher = finpulse(["dispatch"], env, tmp_path, "dispatch")
        procs.append(dispatcher)
        wait_for(settled, "one delivered, one failed and one pending delivery", timeout_s=60)
        metrics = wait_for(lambda: (lambda m: m.series("finpulse_consumer_lag_messages") == {
            frozenset({("topic", topics.alerts)}): 0} and m)(scrape(f"{base}/metrics")), "the alerts lag to read 0")
        ready = probe(f"{base}/readyz")
        alive = probe(f"{base}/healthz")
        received = get_json(f"http://127.0.0.1:{port}/received")
        assert dispatcher.stop() == 0, dispatcher.tail()
    finally:
        for proc in procs:
            proc.kill()

    assert received["count"] == 1 and received["rejected"] == {"bad_signature": 1}

    def by_endpoint(name: str) -> dict[str, float]:
        return {dict(labels)["endpoint"]: value for labels, value in metrics.series(name).items()}

    assert metrics.series("finpulse_deliveries_total") == {
        frozenset({("endpoint", e), ("state", s)}): int((e, s) in {("desk", DELIVERED), ("wrong-key", FAILED)})
        for e in names for s in (DELIVERED, FAILED, EXPIRED, SILENCED)}
    assert metrics.value("finpulse_silences_active") == 0
    assert metrics.series("finpulse_delivery_attempts_total") == {
        frozenset({("endpoint", e), ("outcome", o)}): int((e, o) in {("desk", "success"), ("wrong-key", "permanent"),
                                                                      ("down", "retryable")})
        for e in names for o in ("success", "retryable", "permanent")}
    assert {e: metrics.value("finpulse_delivery_attempt_duration_seconds_count", endpoint=e) for e in names} == {
        e: 1 for e in names}
    assert by_endpoint("finpulse_deliveries_in_flight") == {e: 0 for e in names}
    assert by_endpoint("finpulse_deliveries_pending") == {"desk": 0, "wrong-key": 0, "down": 1}
    assert by_endpoint("finpulse_endpoint_breaker_open") == {"desk": 0, "wrong-key": 0, "down": 1}
    assert by_endpoint("finpulse_endpoint_consecutive_failures") == {"desk": 0, "wrong-key": 0, "down": 1}
    oldest, paused = by_endpoint("finpulse_delivery_oldest_pending_age_seconds"), by_endpoint("finpulse_endpoint_paused_seconds")
    assert oldest["desk"] == oldest["wrong-key"] == 0 and 0 < oldest["down"] < 120
    assert paused["desk"] == paused["wrong-key"] == 0 and 0 < paused["down"] <= 30
    assert ready[0] == 200 and ready[1]["checks"]["dispatcher"]["ok"] is True, ready
    assert alive[0] == 200


@pytest.mark.slow
def test_worker_restart_while_the_receiver_is_down_loses_nothing(fp_settings, topics, tmp_path):
    """The dispatcher inside the Faust worker (`finpulse worker`): pending deliveries of a worker killed with -9
    while the receiver is down are delivered, once each, by the restarted worker."""
    secret = generate_secret()
    port = free_port()
    endpoints = [{"name": "desk", "url": f"http://127.0.0.1:{port}/webhook", "secret_env": "T_W_SECRET", "allow_private": True}]
    env = kafka_env(fp_settings, endpoints=endpoints, backoff_initial_s="0.2", backoff_max_s="1.0")
    env.update({"T_W_SECRET": secret, "FINPULSE_WORKER__DATA_DIR": str(tmp_path / "worker"),
                "FINPULSE_WORKER__WEB_PORT": str(free_port())})
    alerts = [make_alert(status, id=f"w-{i}", key=f"Topic {i}") for i in range(3) for status in ("firing", "resolved")]
    expected = {delivery_key(a.event_id, "desk") for a in alerts}
    procs: list[ManagedProcess] = []
    try:
        produce(fp_settings, topics.alerts, alerts)
        procs.append(finpulse(["worker", "--scorer", "noop"], env, tmp_path, "worker-1"))
        wait_for(lambda: (lambda s: len(s) == len(expected) and all(v.attempts >= 1 for v in s.values()
                                                                     if v.alert_status == "firing") and s)(
            read_delivery_states(fp_settings.kafka, topics.deliveries)), "the first worker to try and fail")
        procs[-1].kill()
        procs.append(finpulse(["receiver", "--port", str(port), "--store", str(tmp_path / "got.jsonl"), "--secret-env", "T_W_SECRET"],
                              env, tmp_path, "receiver"))
        procs.append(finpulse(["worker", "--scorer", "noop"], env, tmp_path, "worker-2"))
        final = wait_for(lambda: (lambda s: len(s) == len(expected) and all(v.state == DELIVERED for v in s.values()) and s)(
            read_delivery_states(fp_settings.kafka, topics.deliveries)), "the restarted worker to deliver everything")
        seen = get_json(f"http://127.0.0.1:{port}/received")
    finally:
        for proc in procs:
            proc.kill()
    assert set(final) == expected
    assert Counter(item["webhook_id"] for item in seen["items"]) == Counter({webhook_id(k): 1 for k in expected})
    assert seen["duplicates"] == {}


@pytest.mark.slow
def test_redeliver_sends_failed_deliveries_again_once_with_their_webhook_id(fp_settings, topics, tmp_path):
    """Endpoints down past a short retry horizon: every delivery is failed. The receiver comes up; `--redeliver
    --dry-run` changes nothing; `--redeliver --endpoint desk --alert r1` re-queues that chain and the running
    dispatcher delivers it once, firing then resolve, with the original webhook ids; the same command again
    re-queues nothing. The rest, re-queued while no dispatcher runs, is delivered by the next one to start."""
    secret = generate_secret()
    port = free_port()
    endpoints = [{"name": name, "url": f"http://127.0.0.1:{port}/{name}", "secret_env": "T_RD_SECRET",
                  "allow_private": True, "retry_horizon_s": 1.5} for name in ("desk", "ops")]
    env = kafka_env(fp_settings, endpoints=endpoints, backoff_initial_s="0.05", backoff_max_s="0.2")
    env["T_RD_SECRET"] = secret
    alerts = [make_alert("firing", id="r1"), make_alert("resolved", id="r1"), make_alert("firing", id="r2", key="Topic 2")]
    everything = {delivery_key(a.event_id, e["name"]) for a in alerts for e in endpoints}
    chain = [delivery_key("r1:firing", "desk"), delivery_key("r1:resolved", "desk")]
    procs: list[ManagedProcess] = []

    def states():
        return read_delivery_states(fp_settings.kafka, topics.deliveries)

    def essentials(found):
        return {k: (v.state, v.seq, v.attempts, v.requeues) for k, v in found.items()}

    def redeliver(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--redeliver", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert secret not in done.stdout + done.stderr and str(port) not in done.stdout
        return done.stdout

    def delivered(keys):
        return lambda: (lambda s: all(s[k].state == DELIVERED for k in keys) and s)(states())

    try:
        produce(fp_settings, topics.alerts, alerts)
        procs.append(finpulse(["dispatch"], env, tmp_path, "dispatch-1"))
        failed = wait_for(lambda: (lambda s: set(s) == everything and all(v.state == FAILED for v in s.values()) and s)(states()),
                          "every delivery to fail at its retry horizon", timeout_s=60)
        procs.append(finpulse(["receiver", "--port", str(port), "--store", str(tmp_path / "got.jsonl"), "--secret-env", "T_RD_SECRET"],
                              env, tmp_path, "receiver"))
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), "the receiver to listen")

        # A dry run lists what it would do and writes nothing.
        out = redeliver("--dry-run")
        assert out.count("would re-queue") == len(everything) and "nothing was written" in out
        assert "would re-queue  desk  r1 (firing)" in out
        time.sleep(2)
        assert essentials(states()) == essentials(failed)

        # One chain re-queued: the running dispatcher delivers it, once, in order, with the original webhook ids.
        out = redeliver("--endpoint", "desk", "--alert", "r1")
        assert [line for line in out.splitlines() if line.startswith("re-queued")] == [
            "re-queued  desk  r1 (firing)", "re-queued  desk  r1 (resolved)"]
        now = wait_for(delivered(chain), "the running dispatcher to deliver the re-queued chain", timeout_s=60)
        for key in chain:
            assert now[key].webhook_id == failed[key].webhook_id == webhook_id(key)
            assert now[key].requeues == 1 and now[key].requeued_at and now[key].deadline_at > failed[key].deadline_at
        assert all(now[k].state == FAILED for k in everything - set(chain))
        seen = get_json(f"http://127.0.0.1:{port}/received")
        assert [item["webhook_id"] for item in seen["items"]] == [failed[k].webhook_id for k in chain]

        # The same command again: nothing left to re-queue there, and delivered ones are never re-queued.
        out = redeliver("--endpoint", "desk", "--alert", "r1")
        assert "nothing re-queued" in out and "re-queued  " not in out
        assert "re-queued" not in redeliver("--alert", "r1", "--endpoint", "desk", "--dry-run").replace("nothing re-queued", "")
        time.sleep(1)
        assert essentials(states()) == essentials(now)

        # The rest, re-queued with no dispatcher running: the re-queue is on the topic, the next dispatcher sends it.
        procs[0].kill()
        out = redeliver()
        assert out.count("re-queued  ") == len(everything) - len(chain)
        assert all(v.state == PENDING for k, v in states().items() if k not in chain)
        procs.append(finpulse(["dispatch"], env, tmp_path, "dispatch-2"))
        final = wait_for(delivered(everything), "the restarted dispatcher to deliver the rest", timeout_s=60)
        assert "nothing re-queued" in redeliver()
        seen = get_json(f"http://127.0.0.1:{port}/received")
        status = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--status"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    assert Counter(item["webhook_id"] for item in seen["items"]) == Counter({webhook_id(k): 1 for k in everything})
    assert seen["duplicates"] == {}
    assert all(v.requeues == 1 for v in final.values())
    assert f"{len(everything)} deliveries {{'delivered': {len(everything)}}}" in status.stdout, status.stdout + status.stderr
