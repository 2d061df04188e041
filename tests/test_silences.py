"""Silences (``finpulse silence``): matchers and the sense checks, then delivery end to end with a real tansu broker,
real dispatchers and a real HTTP receiver. Nothing is timed: the tests look at what arrived and what was recorded."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import timedelta

import pytest

from alerts.deliveries import DELIVERED, FAILED, PENDING, SILENCED, delivery_key, read_delivery_states, webhook_id
from alerts.receiver import Receiver, ReceiverOptions
from alerts.signing import generate_secret
from alerts.silences import Matcher, expired_now, new_silence, read_silences, write_silence
from stream.config import ConfigError
from stream.records import utcnow
from tests.procs import run_without_broker
from tests.test_delivery import REPO, kafka_env, make_alert, produce, serve_and_dispatch


# ---------------------------------------------------------------- matchers and refusals

def fields(**changes):
    return {"key": "Energy | Oil", "key_type": "topic", "severity": "warning", "endpoint": "risk", **changes}


def test_matchers_match_as_alertmanagers_do():
    assert [str(m) for m in Matcher.parse("topic=Energy | Oil")] == ["key_type=topic", "key=Energy | Oil"]
    assert [str(m) for m in Matcher.parse("ticker=~XO.*")] == ["key_type=ticker", "key=~XO.*"]
    (regex,) = Matcher.parse("key=~Energy.*")
    assert regex.matches(fields()) and not regex.matches(fields(key="Metals | Energy"))     # the whole value
    (negative,) = Matcher.parse("severity!=critical")
    assert negative.matches(fields()) and not negative.matches(fields(severity="critical"))
    (not_regex,) = Matcher.parse("endpoint!~pager.*")
    assert not_regex.matches(fields()) and not not_regex.matches(fields(endpoint="pager-eu"))
    silence = new_silence(["topic=Energy | Oil", "severity!=critical"], utcnow(), utcnow() + timedelta(hours=1),
                          "ana", "OPEC meeting")
    assert silence.matches(make_alert(key="Energy | Oil", severity="warning"), "risk")
    assert not silence.matches(make_alert(key="Energy | Oil", severity="critical"), "risk")
    assert not silence.matches(make_alert(key_type="ticker", key="Energy | Oil", severity="warning"), "risk")
    # about= covers a topic's own alerts and those of the tickers its stories move.
    story = new_silence(["about=Energy | Oil"], utcnow(), utcnow() + timedelta(hours=1), "ana", "OPEC")
    assert story.matches(make_alert(key="Energy | Oil"), "risk")
    assert story.matches(make_alert(key_type="ticker", key="XOM", topic="Energy | Oil"), "risk")
    assert not story.matches(make_alert(key_type="ticker", key="AAPL", topic="Earnings"), "risk")
    ended = expired_now(silence)
    assert ended.ends_at <= utcnow() and not ended.active(utcnow()) and ended.id == silence.id


@pytest.mark.parametrize("matchers, start, end, comment, refusal", [
    ([], 0, 60, "why", "at least one --match"),
    (["severity!=critical"], 0, 60, "why", "at least one = or =~ matcher"),
    (["sector=Energy"], 0, 60, "why", "unknown name 'sector'"),
    (["key=~(unclosed"], 0, 60, "why", "not a regular expression"),
    (["severity=high"], 0, 60, "why", "severity is one of info, warning, critical"),
    (["ticker!=XOM"], 0, 60, "why", "ticker= takes = or =~"),
    (["key"], 0, 60, "why", "write NAME=VALUE"),
    (["key=XOM"], 60, 30, "why", "ends"),
    (["key=XOM"], -120, -60, "why", "ends in the past"),
    (["key=XOM"], 0, 60 * 24 * 100, "why", "at most 90 days"),
    (["key=XOM"], 0, 60, "  ", "say why"),
])
def test_silences_that_make_no_sense_are_refused(matchers, start, end, comment, refusal):
    now = utcnow()
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        new_silence(matchers, now + timedelta(minutes=start), now + timedelta(minutes=end), "ana", comment)


# ---------------------------------------------------------------- the command

def test_silence_command_adds_lists_and_expires(fp_settings, topics):
    env = kafka_env(fp_settings)

    def finpulse(*args):
        return subprocess.run([sys.executable, "-m", "stream.cli", "silence", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    added = finpulse("add", "--match", "topic=Energy | Oil", "--for", "4h", "--comment", "OPEC meeting", "--author", "ana")
    assert added.returncode == 0, added.stderr
    silence_id = added.stdout.split()[0]
    assert re.fullmatch(r"sil_[0-9a-f]{12}", silence_id)
    later = finpulse("add", "--match", "ticker=XOM", "--starts", "2099-01-01T09:00Z", "--until", "2099-01-01T10:00Z",
                     "--comment", "earnings call")
    assert later.returncode == 0, later.stderr
    listed = finpulse("list").stdout
    assert f"{silence_id}  active" in listed and "[key_type=topic, key=Energy | Oil]  by ana: OPEC meeting" in listed
    assert "pending  from 2099-01-01T09:00:00.000Z until 2099-01-01T10:00:00.000Z" in listed

    refused = finpulse("add", "--match", "severity=high", "--for", "1h", "--comment", "x")
    assert refused.returncode != 0 and "severity is one of info, warning, critical" in refused.stderr
    assert finpulse("expire", "sil_000000000000").returncode != 0

    assert finpulse("expire", silence_id).returncode == 0
    assert silence_id not in finpulse("list").stdout
    assert f"{silence_id}  expired" in finpulse("list", "--all").stdout
    stored = asyncio.run(read_silences(fp_settings.kafka, topics.silences))
    assert not stored[silence_id].active(utcnow()) and stored[silence_id].comment == "OPEC meeting"


# ---------------------------------------------------------------- delivery end to end

def test_silenced_alerts_are_recorded_not_sent_and_an_open_episode_goes_out_when_its_silence_ends(fp_settings, topics,
                                                                                                  monkeypatch):
    """Two endpoints. "topic=Energy | Oil" silences that topic everywhere; "endpoint=quiet" silences everything to
    the quiet endpoint; "key=Metals" silences Metals. Energy fires and resolves inside its silence: nothing is
    sent anywhere, both events are recorded silenced. Rates reaches risk, not quiet. Metals fires inside its silence;
    the silence is expired early while the episode is still open: the firing goes out then, then its resolve. A
    second dispatcher started afterwards sends nothing that was silenced."""
    secret = generate_secret()
    monkeypatch.setenv("T_SIL_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
    started = utcnow() - timedelta(minutes=1)

    def silence(*matchers):
        return new_silence(matchers, started, started + timedelta(hours=2), "ana", "test")

    energy, quiet, metals = silence("topic=Energy | Oil"), silence("endpoint=quiet"), silence("key=Metals")

    def settings_for(port):
        common = {"secret_env": "T_SIL_SECRET", "allow_private": True}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "risk", "url": f"http://127.0.0.1:{port}/risk", **common},
            {"name": "quiet", "url": f"http://127.0.0.1:{port}/quiet", **common}]}})

    async def write(*silences):
        for s in silences:
            await write_silence(fp_settings.kafka, topics.silences, s)

    asyncio.run(write(energy, quiet, metals))
    firings = [make_alert("firing", id="en", key="Energy | Oil"), make_alert("firing", id="ra", key="Rates"),
               make_alert("firing", id="me", key="Metals")]
    produce(fp_settings, topics.alerts, firings + [make_alert("resolved", id="en", key="Energy | Oil")])
    first = {delivery_key(e, n) for e in ("en:firing", "en:resolved", "ra:firing", "me:firing") for n in ("risk", "quiet")}

    async def until(dispatcher, keys, final=None):
        for _ in range(900):
            states = dispatcher.log.states
            if all(k in states and states[k].terminal and (final is None or states[k].state == final) for k in keys):
                return dict(states)
            await asyncio.sleep(0.1)
        pytest.fail(f"not settled: {sorted(k for k in keys if k not in dispatcher.log.states)}")

    async def steps(dispatcher):
        before = await until(dispatcher, first)
        await write(expired_now(metals))
        opened = await until(dispatcher, {delivery_key("me:firing", "risk")}, DELIVERED)
        await asyncio.to_thread(produce, fp_settings, topics.alerts, [make_alert("resolved", id="me", key="Metals")])
        return before, opened, await until(dispatcher, {delivery_key("me:resolved", n) for n in ("risk", "quiet")})

    before, opened, after = serve_and_dispatch(topics, settings_for, receiver, steps)
    state = {k: s.state for k, s in before.items()}
    assert state == {**{k: SILENCED for k in first}, delivery_key("ra:firing", "risk"): DELIVERED}
    assert before[delivery_key("en:firing", "risk")].silence == energy.id
    assert before[delivery_key("en:resolved", "risk")].silence == energy.id
    assert before[delivery_key("ra:firing", "quiet")].silence == quiet.id
    assert "silenced by " + metals.id in before[delivery_key("me:firing", "risk")].last_error
    # Metals' silence ended while its episode was open: the firing went out, at risk only (quiet is still silenced).
    assert opened[delivery_key("me:firing", "risk")].unsilenced_at is not None
    assert after[delivery_key("me:firing", "quiet")].state == SILENCED
    assert after[delivery_key("me:resolved", "risk")].state == DELIVERED
    assert after[delivery_key("me:resolved", "quiet")].state == SILENCED     # quiet never saw it open
    sent = [(i["path"], i["webhook_id"]) for i in receiver.items]
    assert sent == [("/risk", webhook_id(delivery_key(e, "risk"))) for e in ("ra:firing", "me:firing", "me:resolved")]

    # A new dispatcher (a restart) reads the same records and silences: it sends nothing more.
    async def idle(dispatcher):
        for _ in range(30):
            await asyncio.sleep(0.1)
    serve_and_dispatch(topics, settings_for, receiver, idle)
    assert [i["webhook_id"] for i in receiver.items] == [w for _, w in sent] and not receiver.duplicates
    stored = read_delivery_states(fp_settings.kafka, topics.deliveries)
    assert sum(s.state == SILENCED for s in stored.values()) == 7


def test_a_resolve_is_never_withheld_from_an_endpoint_that_has_the_incident_open(fp_settings, topics, monkeypatch):
    """The firing reached the endpoint before the silence began; an escalation inside the silence is withheld; the
    resolve inside it is sent anyway, because the endpoint has the incident open. Once the silence ends nothing more
    goes out: the episode is over."""
    secret = generate_secret()
    monkeypatch.setenv("T_SIL_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))

    def settings_for(port):
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "risk", "url": f"http://127.0.0.1:{port}/risk", "secret_env": "T_SIL_SECRET",
             "allow_private": True}]}})

    async def steps(dispatcher):
        produce_now = lambda alerts: asyncio.to_thread(produce, fp_settings, topics.alerts, alerts)  # noqa: E731
        await produce_now([make_alert("firing", id="rt", key="Rates", severity="warning")])
        while (s := dispatcher.log.get(delivery_key("rt:firing", "risk"))) is None or s.state != DELIVERED:
            await asyncio.sleep(0.1)
        now = utcnow()
        silence = new_silence(["key=Rates"], now, now + timedelta(hours=1), "ana", "known noise")
        await write_silence(fp_settings.kafka, topics.silences, silence)
        while dispatcher.silences.silencing(make_alert(key="Rates"), "risk", utcnow()) is None:
            await asyncio.sleep(0.1)
        await produce_now([make_alert("firing", id="rt", key="Rates", severity="critical", escalated_from="warning"),
                           make_alert("resolved", id="rt", key="Rates")])
        wanted = {delivery_key(e, "risk") for e in ("rt:firing:critical", "rt:resolved")}
        while not all((s := dispatcher.log.get(k)) is not None and s.terminal for k in wanted):
            await asyncio.sleep(0.1)
        await write_silence(fp_settings.kafka, topics.silences, expired_now(silence))
        for _ in range(30):     # the silence's end is acted on within a poll or two: give it a few
            await asyncio.sleep(0.1)
        return dict(dispatcher.log.states)

    states = serve_and_dispatch(topics, settings_for, receiver, steps)
    assert states[delivery_key("rt:firing:critical", "risk")].state == SILENCED
    assert states[delivery_key("rt:resolved", "risk")].state == DELIVERED
    assert [i["payload"]["type"] for i in receiver.items] == ["finpulse.alert.firing", "finpulse.alert.resolved"]


def attempts_at(receiver: Receiver, path: str) -> int:
    return sum(r["path"] == path for r in receiver.requests)


def test_a_silence_added_during_an_incident_stops_what_is_still_on_its_way(fp_settings, topics, monkeypatch):
    """Silences are checked again before every attempt and when a group notification is made, not only at an
    event's emission. risk is down: Rates' firing is retried there, its resolve waits behind it; a silence on Rates
    written meanwhile makes the firing `silenced` (no further attempt), and the resolve after it (nothing to close). desk groups (group_wait_s 10): Metals waits in its
    group when a silence on Metals begins, and the group sends nothing. The silence on Rates ends while a second
    Rates episode is open: that episode's firing goes out once risk is back up."""
    secret = generate_secret()
    monkeypatch.setenv("T_SIL_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True, fail_first=10 ** 6))

    def settings_for(port):
        common = {"secret_env": "T_SIL_SECRET", "allow_private": True}
        return fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "endpoints": [
            {"name": "risk", "url": f"http://127.0.0.1:{port}/risk", "breaker_failures": 1000, "keys": ["Rates"],
             **common},
            {"name": "desk", "url": f"http://127.0.0.1:{port}/desk", "group_by": ["key_type"], "group_wait_s": 10.0,
             "keys": ["Metals"], **common}]}})

    async def produce_now(alerts):
        await asyncio.to_thread(produce, fp_settings, topics.alerts, alerts)

    async def state_of(dispatcher, event_id, endpoint, wanted=None):
        key = delivery_key(event_id, endpoint)
        for _ in range(1200):
            if (s := dispatcher.log.get(key)) is not None and (wanted is None or s.state in wanted):
                return s
            await asyncio.sleep(0.05)
        pytest.fail(f"{event_id} to {endpoint} never reached {wanted}: {dispatcher.log.get(key)}")

    async def seen(dispatcher, silence):
        for _ in range(1200):
            if silence.id in dispatcher.silences.silences:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"the dispatcher never read silence {silence.id}")

    async def steps(dispatcher):
        await produce_now([make_alert("firing", id="rt", key="Rates"), make_alert("firing", id="me", key="Metals")])
        for _ in range(1200):
            if attempts_at(receiver, "/risk") >= 3:       # risk fails: the firing is being retried
                break
            await asyncio.sleep(0.05)
        await produce_now([make_alert("resolved", id="rt", key="Rates")])     # it waits behind its firing
        await state_of(dispatcher, "rt:resolved", "risk", {PENDING})
        await state_of(dispatcher, "me:firing", "desk")
        now = utcnow()
        rates = new_silence(["key=Rates"], now, now + timedelta(hours=1), "ana", "known noise")
        metals = new_silence(["key=Metals"], now, now + timedelta(hours=1), "ana", "known noise")
        for silence in (rates, metals):
            await write_silence(fp_settings.kafka, topics.silences, silence)
        await seen(dispatcher, metals)
        rates_firing = await state_of(dispatcher, "rt:firing", "risk", {SILENCED})
        attempts_then = attempts_at(receiver, "/risk")
        metals_firing = await state_of(dispatcher, "me:firing", "desk", {SILENCED})
        rates_resolve = await state_of(dispatcher, "rt:resolved", "risk", {SILENCED, DELIVERED, FAILED})
        # A second Rates episode inside the silence; the silence ends; risk comes back.
        await produce_now([make_alert("firing", id="rt2", key="Rates")])
        await state_of(dispatcher, "rt2:firing", "risk", {SILENCED})
        attempts_before_end = attempts_at(receiver, "/risk")
        receiver._fail_left = 0       # risk is back up
        await write_silence(fp_settings.kafka, topics.silences, expired_now(rates))
        reopened = await state_of(dispatcher, "rt2:firing", "risk", {DELIVERED})
        return rates_firing, attempts_then, metals_firing, rates_resolve, attempts_before_end, reopened

    rates_firing, attempts_then, metals_firing, rates_resolve, attempts_before_end, reopened = serve_and_dispatch(
        topics, settings_for, receiver, steps)
    assert rates_firing.attempts >= 3 and "silenced by " + rates_firing.silence in rates_firing.last_error
    assert attempts_before_end == attempts_then          # no attempt of Rates after its silence was seen
    assert metals_firing.silence and metals_firing.attempts == 0 and not metals_firing.group
    assert rates_resolve.state == SILENCED and rates_resolve.attempts == 0    # risk never saw the incident open
    assert reopened.unsilenced_at is not None
    assert [(i["path"], i["webhook_id"]) for i in receiver.items] == [("/risk", webhook_id(delivery_key("rt2:firing", "risk")))]
    assert attempts_at(receiver, "/desk") == 0


@pytest.mark.parametrize("bad, message", [(["--match", "x", "--for", "2h"], "matcher 'x': write NAME=VALUE"),
                                          (["--match", "ticker=TSLA", "--for", "forever"], "'forever' is not a duration")])
def test_a_silence_that_cannot_be_made_is_refused_before_anything_connects_to_kafka(bad, message):
    """No broker at all: the answer is about the silence, at once, not a Kafka timeout 30 seconds later."""
    done = run_without_broker("silence", "add", *bad, "--comment", "c", timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Kafka" not in done.stderr, done.stderr
