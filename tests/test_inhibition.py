"""Inhibition (``[[alerts.inhibit]]``): the rules and their refusals, then delivery end to end with a real tansu
broker, a real dispatcher and a real HTTP receiver. Nothing is timed: the test looks at what arrived and what was
recorded."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

from alerts.deliveries import DELIVERED, SILENCED, delivery_key, webhook_id
from alerts.inhibition import INHIBITED, InhibitRule, parse_rules
from alerts.receiver import Receiver, ReceiverOptions
from alerts.signing import generate_secret
from stream.config import ConfigError
from tests.test_delivery import REPO, kafka_env, make_alert, produce, serve_and_dispatch

TOPIC_MUTES_ITS_TICKERS = {"source": ["key_type=topic"], "target": ["key_type=ticker"], "equal": ["about"]}


def test_a_topic_alert_mutes_the_ticker_alerts_about_it_and_nothing_else():
    (rule,) = parse_rules([TOPIC_MUTES_ITS_TICKERS])
    energy = make_alert(id="en", key="Energy | Oil")
    xom = make_alert(id="xom", key_type="ticker", key="XOM", topic="Energy | Oil")
    aapl = make_alert(id="aapl", key_type="ticker", key="AAPL", topic="Earnings")
    assert rule.mutes(energy, xom, "risk")
    assert not rule.mutes(energy, aapl, "risk")                      # about another topic
    assert not rule.mutes(xom, energy, "risk")                       # a ticker alert mutes nothing
    assert not rule.mutes(energy, make_alert(id="ge", key="Metals"), "risk")
    assert not rule.mutes(energy, make_alert(id="old", key_type="ticker", key="CVX"), "risk")   # about unknown
    # Severity-only rules: a critical alert mutes the warnings of the same key; never itself.
    (by_severity,) = parse_rules([{"source": ["severity=critical"], "target": ["severity=warning"], "equal": ["key"]}])
    assert by_severity.mutes(energy, make_alert(id="en2", key="Energy | Oil", severity="warning"), "risk")
    assert not by_severity.mutes(energy, make_alert(id="en", key="Energy | Oil", severity="warning"), "risk")
    at_pager = InhibitRule.parse({**TOPIC_MUTES_ITS_TICKERS, "target": ["key_type=ticker", "endpoint=pager"]}, "r")
    assert at_pager.mutes(energy, xom, "pager") and not at_pager.mutes(energy, xom, "slack")


@pytest.mark.parametrize("table, refusal", [
    ({"source": ["key_type=topic"], "target": ["key_type=ticker"], "equals": ["about"]}, "unknown ['equals']"),
    ({"source": [], "target": ["key_type=ticker"]}, "source needs at least one = or =~ matcher"),
    ({"source": ["severity!=info"], "target": ["key_type=ticker"]}, "source needs at least one = or =~ matcher"),
    ({"source": "key_type=topic", "target": ["key_type=ticker"]}, "source is a list of matchers"),
    ({"source": ["endpoint=pager"], "target": ["key_type=ticker"]}, "source cannot name an endpoint"),
    ({"source": ["key_type=topic"], "target": ["key_type=ticker"], "equal": ["sector"]}, "equal names ['sector']"),
    ({"source": ["sector=Energy"], "target": ["key_type=ticker"]}, "unknown name 'sector'"),
])
def test_rules_that_make_no_sense_are_refused(table, refusal):
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        parse_rules([table])


def test_a_muted_ticker_alert_is_recorded_not_sent_and_goes_out_when_its_topic_alert_resolves(fp_settings, topics,
                                                                                            monkeypatch):
    """Energy | Oil fires; XOM's alert about Energy | Oil is muted (recorded silenced, naming Energy's alert),
    AAPL's about Earnings is not. Energy resolves while XOM's episode is still open: XOM's firing goes out then,
    and later its resolve."""
    secret = generate_secret()
    monkeypatch.setenv("T_INH_SECRET", secret)
    receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))

    def settings_for(port):
        return fp_settings.with_overrides({"alerts": {
            "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "inhibit": [TOPIC_MUTES_ITS_TICKERS],
            "endpoints": [{"name": "risk", "url": f"http://127.0.0.1:{port}/risk", "secret_env": "T_INH_SECRET",
                           "allow_private": True}]}})

    energy = make_alert("firing", id="en", key="Energy | Oil")
    xom = make_alert("firing", id="xom", key_type="ticker", key="XOM", topic="Energy | Oil")
    aapl = make_alert("firing", id="aapl", key_type="ticker", key="AAPL", topic="Earnings")

    async def state_of(dispatcher, event_id, wanted):
        for _ in range(1200):
            if (s := dispatcher.log.get(delivery_key(event_id, "risk"))) is not None and s.state in wanted:
                return s
            await asyncio.sleep(0.05)
        pytest.fail(f"{event_id} never reached {wanted}: {dispatcher.log.get(delivery_key(event_id, 'risk'))}")

    async def steps(dispatcher):
        produce_now = lambda alerts: asyncio.to_thread(produce, fp_settings, topics.alerts, alerts)  # noqa: E731
        await produce_now([energy])
        await state_of(dispatcher, "en:firing", {DELIVERED})
        while "en" not in dispatcher.firing.firing:
            await asyncio.sleep(0.05)
        await produce_now([xom, aapl])
        muted = await state_of(dispatcher, "xom:firing", {SILENCED, DELIVERED})
        await state_of(dispatcher, "aapl:firing", {DELIVERED})
        await produce_now([make_alert("resolved", id="en", key="Energy | Oil")])
        reopened = await state_of(dispatcher, "xom:firing", {DELIVERED})
        await produce_now([make_alert("resolved", id="xom", key_type="ticker", key="XOM", topic="Energy | Oil")])
        closed = await state_of(dispatcher, "xom:resolved", {DELIVERED, SILENCED})
        return muted, reopened, closed

    muted, reopened, closed = serve_and_dispatch(topics, settings_for, receiver, steps)
    assert muted.state == SILENCED and muted.silence == INHIBITED + "en"
    assert "inhibited by firing alert en (topic Energy | Oil, critical)" in muted.last_error
    assert reopened.unsilenced_at is not None and closed.state == DELIVERED
    sent = [i["webhook_id"] for i in receiver.items]
    hook = {e: webhook_id(delivery_key(e, "risk")) for e in ("en:firing", "aapl:firing", "en:resolved", "xom:firing",
                                                            "xom:resolved")}
    # Energy's resolve and XOM's firing go out side by side (one chain each): either may arrive first.
    assert sent[:2] == [hook["en:firing"], hook["aapl:firing"]] and sent[-1] == hook["xom:resolved"]
    assert sorted(sent[2:4]) == sorted([hook["en:resolved"], hook["xom:firing"]]) and len(sent) == 5

    # `dispatch --status` names the rule and counts what it muted and is still muted (none: XOM went out).
    env = {**kafka_env(fp_settings), "FINPULSE_ALERTS__INHIBIT": json.dumps([TOPIC_MUTES_ITS_TICKERS])}
    status = subprocess.run([sys.executable, "-m", "stream.cli", "dispatch", "--status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert ("inhibition: 1 rule(s); source [key_type=topic] mutes target [key_type=ticker] with equal about; "
            "0 alert event(s) muted") in status.stdout
