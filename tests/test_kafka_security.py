"""FinPulse on a secured Kafka: TLS with a client certificate, SASL logins, and what each mistake says.

- Every client FinPulse makes (topic creation, ``finpulse simulate``, the worker's Faust app, a replay, the
  dispatcher with its delivery log, silences and firing-alert readers, the dashboard's feed) works through a real TLS
  listener that wants a client certificate (``tests.network.TlsFront`` before a real tansu broker: this tansu cannot
  serve TLS).
- A client set up wrong for that listener (no TLS, no CA, no certificate) is told in one line what to set.
- A real tansu broker that requires SASL logins: a client without one, a SCRAM user it does not know and a mechanism
  it does not take are each told what is wrong (and the password is never printed). This tansu cannot be given a
  user (it keeps them in storage it cannot be handed here), so no login can succeed: the login itself is
  aiokafka's and kafka-python's, with the settings ``stream.kafka_security.client_security`` gives both.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from alerts.deliveries import DELIVERED, read_delivery_states
from alerts.signing import generate_secret
from dashboard.live import LiveFeed
from dashboard.settings import DashboardSettings
from stream.broker import EmbeddedBroker, free_port
from stream.config import ConfigError, KafkaSettings, Settings
from stream.kafka_io import RecordSender
from stream.kafka_security import client_security, why_unreachable, without_connection_settings
from stream.records import ScoredRecord, format_time
from stream.topics import TopicNames
from tests.network import broker_behind_tls
from tests.procs import (ManagedProcess, isolated_settings, json_values, run_finpulse, run_without_broker,
                         start_finpulse, start_worker, wait_for_records)
from tests.test_delivery import get_json, make_alert, wait_for

PASSWORD = "correct-horse-battery-staple-7731"
START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def tls_settings(pki, **changes) -> dict[str, str]:
    return {"security_protocol": "SSL", "ca_file": str(pki["ca.pem"]), "client_cert_file": str(pki["client.pem"]),
            "client_key_file": str(pki["client.key"]), **changes}


@pytest.mark.slow
def test_every_finpulse_client_works_through_a_tls_listener_that_wants_a_client_certificate(tmp_path, pki):
    with broker_behind_tls(tmp_path / "tansu.log", pki, mutual=True) as (front, broker):
        settings = isolated_settings(broker.bootstrap_servers, tmp_path, kafka=tls_settings(pki))   # topics: admin
        names = TopicNames(settings.kafka.topic_prefix)
        code, output = run_finpulse(settings, "topics", "--check", log_dir=tmp_path, name="check")
        count = len(names.all())
        assert code == 0 and f"(SSL): {count} of {count} FinPulse topics present" in output, output[-3000:]
        missing = settings.with_overrides({"kafka": {"topic_prefix": "nothing-here", "partitions": 4}})
        code, output = run_finpulse(missing, "topics", "--check", log_dir=tmp_path, name="check-missing")
        assert code == 1 and f"0 of {count}" in output and "nothing-here.news: missing" in output, output[-3000:]
        eight = settings.with_overrides({"kafka": {"partitions": 8}})
        code, output = run_finpulse(eight, "topics", "--check", log_dir=tmp_path, name="check-partitions")
        assert code == 1 and f"{names.news}: 4 partitions, FinPulse is configured for 8" in output, output[-3000:]
        with start_worker(settings, tmp_path) as worker:
            code, output = run_finpulse(settings, "simulate", "--count", "240", "--max-speed", "--rate", "0.4",
                                        "--start", format_time(START),
                                        log_dir=tmp_path, name="simulate")
            assert code == 0, output[-2000:]
            scored = wait_for_records(settings, names.scored, lambda records: len(records) >= 240, timeout=120,
                                      what="every simulated message scored")
            wait_for_records(settings, names.trends, lambda records: any(v["final"] for v in json_values(records)),
                             timeout=120, what="a closed window")
            assert "(SSL)" in worker.output()
        assert len({ScoredRecord.from_dict(v).id for v in json_values(scored)}) == 240

        code, output = run_finpulse(settings, "replay", "--from", format_time(START),
                                    "--to", format_time(START + timedelta(minutes=10)), "--run-id", "tls",
                                    "--parquet", str(tmp_path / "replay"), "--no-progress", log_dir=tmp_path,
                                    name="replay", timeout=300)
        assert code == 0, output[-3000:]
        assert json.loads((tmp_path / "replay" / "manifest.json").read_text())["counts"]["inputs"] == 240

        feed = LiveFeed(settings.kafka, DashboardSettings(), settings.worker.app_id, 600).start()
        try:
            wait_for(lambda: feed.status.state == "live" and len(feed.store.snapshot().scored) >= 240,
                       "the dashboard's feed to follow the topics over TLS")
        finally:
            feed.stop()

        secret, port = generate_secret(), free_port()
        alerts_settings = settings.with_overrides({"alerts": {
            "metrics_port": free_port(),
            "endpoints": [{"name": "desk", "url": f"http://127.0.0.1:{port}/webhook", "secret_env": "T_TLS_SECRET",
                           "allow_private": True}]}})
        env = {"T_TLS_SECRET": secret}
        receiver = start_finpulse(settings, "receiver", "--port", str(port), "--secret-env", "T_TLS_SECRET",
                                  "--quiet", log_dir=tmp_path, name="receiver", env=env)
        dispatcher = start_finpulse(alerts_settings, "dispatch", log_dir=tmp_path, name="dispatch", env=env)
        try:
            alert = make_alert(id="tls-1", key="Energy | Oil")

            async def send() -> None:
                async with RecordSender(settings.kafka) as sender:
                    await sender.send(names.alerts, alert.to_json(), key=b"topic:Energy | Oil")
                    await sender.flush()

            asyncio.run(send())
            states = wait_for(lambda: (lambda s: s and all(v.state == DELIVERED for v in s.values()) and s)(
                read_delivery_states(settings.kafka, names.deliveries)), "the alert delivered")
            assert len(states) == 1
            received = wait_for(lambda: (get_json(f"http://127.0.0.1:{port}/received") or {}).get("requests"),
                                  "the receiver to have the alert")
            assert len(received) == 1
            assert dispatcher.stop(60) == 0, dispatcher.tail(3000)
        finally:
            dispatcher.kill()
            receiver.kill()
        assert front.connections > 0


def finpulse_topics(bootstrap: str, tmp_path, name: str, env: dict[str, str] | None = None, **kafka) -> str:
    """``finpulse topics`` with these [kafka] settings; its one-line error (it must fail)."""
    settings = Settings(raw={"kafka": {"bootstrap_servers": bootstrap, **kafka}})
    code, output = run_finpulse(settings, "topics", log_dir=tmp_path, name=name, timeout=120, env=env)
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("finpulse: ")]
    return line


def test_tls_mistakes_are_each_said_in_one_line(tmp_path, pki):
    with broker_behind_tls(tmp_path / "tansu.log", pki, mutual=True) as (front, broker):
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "plain")
        assert "speaks TLS" in said and 'security_protocol = SSL' in said, said
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "no-ca", security_protocol="SSL")
        assert "failed verification" in said and "ca_file" in said, said
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "no-cert", security_protocol="SSL",
                               ca_file=str(pki["ca.pem"]))
        assert "client_cert_file" in said, said
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "other-ca", security_protocol="SSL",
                               ca_file=str(pki["client.pem"]))
        assert f"the CA certificates in {pki['client.pem']} did not sign it" in said, said


def test_a_listener_that_never_answers_the_tls_handshake_is_said_not_waited_on(broker, tmp_path):
    """A plain listener holding a TLS client's connection (as a load balancer or a firewall may): kafka-python waited
    for the handshake without a limit, and the command printed nothing until it was killed."""
    said = finpulse_topics(broker.bootstrap_servers, tmp_path, "stalled", security_protocol="SSL")
    assert "no TLS handshake" in said and "PLAINTEXT" in said, said


def test_a_broker_name_that_does_not_resolve_is_said(tmp_path):
    said = finpulse_topics("kafka-1.finpulse.invalid:9092", tmp_path, "dns")
    assert "kafka-1.finpulse.invalid cannot be resolved (DNS)" in said, said


def test_an_encrypted_client_key_needs_its_passphrase_and_never_prompts_for_it(pki, tmp_path, monkeypatch):
    encrypted = tmp_path / "client-encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki["client.key"]), "-aes256", "-passout", "pass:k3y-Phrase",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    settings = tls_settings(pki, client_key_file=str(encrypted))
    with pytest.raises(ConfigError) as refused:
        client_security(KafkaSettings(**settings))
    assert "is encrypted" in str(refused.value) and "client_key_password_env" in str(refused.value)
    monkeypatch.setenv("T_KEY_PASSPHRASE", "not-the-phrase")
    with pytest.raises(ConfigError) as refused:
        client_security(KafkaSettings(**settings, client_key_password_env="T_KEY_PASSPHRASE"))
    assert "cannot be loaded with the passphrase" in str(refused.value) and "not-the-phrase" not in str(refused.value)
    monkeypatch.setenv("T_KEY_PASSPHRASE", "k3y-Phrase")
    assert client_security(KafkaSettings(**settings, client_key_password_env="T_KEY_PASSPHRASE"))["ssl_context"]


def test_a_broker_that_wants_a_login_says_what_is_wrong_and_the_password_is_never_printed(tmp_path):
    env = {"FINPULSE_KAFKA_PASSWORD": PASSWORD}
    scram = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "finpulse"}
    with EmbeddedBroker(log_file=tmp_path / "tansu.log", requires_authentication=True) as broker:
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "no-login")
        assert "without a login" in said and "SASL_PLAINTEXT" in said, said
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "scram", env=env, **scram)
        assert "did not accept the credentials" in said and "finpulse" in said and "unknown-user" in said, said
        said = finpulse_topics(broker.bootstrap_servers, tmp_path, "plain-mechanism", env=env,
                               **{**scram, "sasl_mechanism": "PLAIN"})
        assert "sasl_mechanism PLAIN" in said, said
        # The worker connects (and is refused) the same way, and says so the same way.
        settings = Settings(raw={"kafka": {"bootstrap_servers": broker.bootstrap_servers, **scram},
                                 "worker": {"scorer": "baseline", "data_dir": str(tmp_path / "worker")}})
        code, output = run_finpulse(settings, "worker", log_dir=tmp_path, name="worker", timeout=120, env=env)
        assert code == 2 and "did not accept the credentials" in output, output[-3000:]
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("*.log"))
    assert PASSWORD not in logs


def test_a_login_without_its_password_is_refused_before_connecting(tmp_path):
    settings_env = {"FINPULSE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "FINPULSE_KAFKA__SASL_MECHANISM": "PLAIN",
                    "FINPULSE_KAFKA__SASL_USERNAME": "finpulse"}
    done = run_without_broker("topics", timeout=60, **settings_env)
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr and "FINPULSE_KAFKA_PASSWORD" in done.stderr, done.stderr


@pytest.mark.parametrize("settings, says", [
    ({"security_protocol": "TLS"}, "SSL (TLS, as Kafka names it)"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_username": "u"}, "not 'OAUTHBEARER'"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "needs sasl_username"),
    ({"sasl_username": "u"}, "sends no credentials"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "ca_file": "x.pem"},
     "does not use TLS"),
    ({"security_protocol": "SSL", "client_key_file": "k.pem"}, "without client_cert_file"),
])
def test_security_settings_that_cannot_work_are_refused(settings, says):
    with pytest.raises(ConfigError) as refused:
        KafkaSettings(**settings)
    assert says in str(refused.value)


def test_client_settings_carry_tls_and_the_login_to_both_kafka_libraries(pki, monkeypatch):
    monkeypatch.setenv("T_KAFKA_PASSWORD", PASSWORD)
    kafka = KafkaSettings(security_protocol="sasl_ssl", sasl_mechanism="scram-sha-256", sasl_username="finpulse",
                          sasl_password_env="T_KAFKA_PASSWORD", ca_file=str(pki["ca.pem"]))
    options = client_security(kafka)
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert options["sasl_plain_username"] == "finpulse" and options["sasl_plain_password"] == PASSWORD
    assert options["ssl_context"].check_hostname
    assert PASSWORD not in repr(kafka)
    with pytest.raises(ConfigError) as refused:
        client_security(KafkaSettings(security_protocol="SSL", ca_file=str(pki["server.key"]) + ".missing"))
    assert "ca_file" in str(refused.value)


def test_the_embedded_broker_is_reached_in_plain_text_whatever_the_real_cluster_needs(tmp_path):
    """``finpulse broker`` (and ``make demo``) with a secured cluster's settings in the environment, as an operator
    has them for the real cluster: the embedded broker takes plain connections, so its topics are still created."""
    secured = {"FINPULSE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "FINPULSE_KAFKA__SASL_MECHANISM": "PLAIN",
               "FINPULSE_KAFKA__SASL_USERNAME": "finpulse", "FINPULSE_KAFKA_PASSWORD": PASSWORD}
    broker = ManagedProcess([sys.executable, "-m", "stream.cli", "broker", "--port", str(free_port())], tmp_path,
                            "broker", env=secured).start()
    try:
        broker.wait_for("tansu broker ready", 90)
    finally:
        assert broker.stop(30) == 0, broker.tail(3000)
    # The demo's processes get the environment without those settings (they read the demo's own config).
    assert without_connection_settings({**secured, "FINPULSE_KAFKA__PARTITIONS": "8"}) == {
        "FINPULSE_KAFKA_PASSWORD": PASSWORD, "FINPULSE_KAFKA__PARTITIONS": "8"}


def test_a_refused_login_is_explained_from_inside_an_event_loop_too(tmp_path, monkeypatch):
    """A replay creates its topics from its async run, and the check behind a refused connection logs in with
    aiokafka: ``asyncio.run`` there raised "cannot be called from a running event loop" (with SASL_SSL, on every
    connection)."""
    monkeypatch.setenv("FINPULSE_KAFKA_PASSWORD", PASSWORD)
    with EmbeddedBroker(log_file=tmp_path / "tansu.log", requires_authentication=True) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512", sasl_username="finpulse")

        async def from_async_code() -> str | None:
            return why_unreachable(kafka)

        said = asyncio.run(from_async_code())
    assert said and "did not accept the credentials" in said and "unknown-user" in said, said
