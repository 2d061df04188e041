"""End to end in a real headless Chromium.

The first test runs the tansu broker, ``finpulse worker`` (scoring, windows, detection), ``finpulse simulate`` with a
negative shock and ``finpulse dashboard``, all real processes. The page is opened while the simulated stream is
still flowing; the test waits for live data, asserts that the shocked topic is at the top of the unusual ranking
with a firing alert, that the page redrew itself without reloading, and keeps screenshots of every view (light and
dark theme) in the artifacts directory.

The second plays an analyst on a laptop screen following a move through the views with clicks alone, over records
produced straight into the broker (``tests.dashboard_data``), keeps screenshots at that width, and opens the
address it ends on in a new session, which must show the same view.

The last asks the dashboard's model about the messages behind an alert (one click from the Alerts view) and about two
headlines typed in: it must read them as the worker's scorer does, and show each word's push.
"""
from __future__ import annotations

import re
from datetime import timedelta

import pytest

from stream.records import format_time, utcnow
from tests.browser import chromium_page, expect, running_dashboard
from tests.dashboard_data import produce, synthesize
from tests.models_fixtures import make_tiny_base, save_tiny_model
from tests.procs import run_finpulse, start_finpulse, start_worker, with_section

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOCK_TOPIC = "Energy | Oil"
HISTORY_MIN = 20          # minutes of simulated event time, ending about now
SHOCK_AT_MIN = 14         # the shock starts here and lasts past the end, so it is still on when the page looks
RATE = 15                 # messages per second of event time
WAIT_MS = 300_000         # the worker scores the backlog on a shared 2-core machine: be patient, not flaky


def produce_shock(settings):
    """Half an hour of synthesized records with an Energy | Oil shock, produced into the broker: (the data, the
    shock's first alert)."""
    data = synthesize(utcnow(), shock_key=SHOCK_TOPIC)
    produce(settings, data)
    return data, next(a for a in data.alerts if a.key == SHOCK_TOPIC)


def test_dashboard_shows_the_shock_live_in_a_browser(fp_settings, artifacts_dir, tmp_path):
    start = utcnow() - timedelta(minutes=HISTORY_MIN)
    with start_worker(fp_settings, tmp_path), running_dashboard(fp_settings, tmp_path, "--refresh", "1") as url, \
            start_finpulse(fp_settings, "simulate", "--start", format_time(start), "--rate", str(RATE),
                           "--count", str(HISTORY_MIN * 60 * RATE), "--max-speed", "--shock-topic", SHOCK_TOPIC,
                           "--shock-at", str(SHOCK_AT_MIN * 60), "--shock-duration", "3600", log_dir=tmp_path):
        with chromium_page() as page:
            page.goto(f"{url}/", wait_until="domcontentloaded")
            page.evaluate("window.__finpulse_marker = 'same page'")
            # Waits until the text is there (the stream arrives asynchronously), fails if it never is.
            top, first_alert = page.locator(".st-key-fp-unusual-1"), page.locator(".st-key-fp-alert-1")
            expect(top).to_contain_text(SHOCK_TOPIC, timeout=WAIT_MS)
            expect(top).to_contain_text("alert firing", timeout=WAIT_MS)
            expect(first_alert).to_contain_text(SHOCK_TOPIC)
            expect(first_alert).to_contain_text("firing since")

            # One more minute of the stream: the open page must redraw by itself, without reloading.
            latest = page.get_by_test_id("stMetricValue").first
            before = latest.inner_text()
            run_finpulse(fp_settings, "simulate", "--start", format_time(start + timedelta(minutes=HISTORY_MIN)),
                         "--rate", str(RATE), "--count", str(60 * RATE), "--max-speed", "--seed", "8",
                         "--shock-topic", SHOCK_TOPIC, "--shock-at", "0", "--shock-duration", "3600",
                         log_dir=tmp_path, name="simulate-more")
            expect(latest).not_to_have_text(before, timeout=WAIT_MS)
            assert page.evaluate("window.__finpulse_marker") == "same page", "the page reloaded"
            expect(top).to_contain_text(SHOCK_TOPIC)
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            page.wait_for_timeout(1500)  # let the charts finish drawing before the picture
            assert "Traceback" not in page.locator("body").inner_text()
            page.screenshot(path=f"{artifacts_dir}/dashboard-overview.png", full_page=True)
            for view in ("Topic / ticker", "Alerts", "Model"):
                page.get_by_role("link", name=view, exact=True).click()
                page.locator("[data-testid=stVegaLiteChart], [data-testid=stDataFrame]").first.wait_for(timeout=WAIT_MS)
                page.wait_for_timeout(1500)
                assert "Traceback" not in page.locator("body").inner_text()
                page.screenshot(path=f"{artifacts_dir}/dashboard-{view.split()[0].lower()}.png", full_page=True)
        with chromium_page(color_scheme="dark") as page:  # the system dark theme: charts must stay readable
            page.goto(f"{url}/", wait_until="domcontentloaded")
            expect(page.locator(".st-key-fp-unusual-1")).to_contain_text(SHOCK_TOPIC, timeout=WAIT_MS)
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            page.wait_for_timeout(1500)
            page.screenshot(path=f"{artifacts_dir}/dashboard-overview-dark.png", full_page=True)


def test_on_a_laptop_an_alert_leads_to_its_messages_and_drilldown_in_one_click_each(fp_settings, artifacts_dir,
                                                                                    tmp_path):
    data, firing = produce_shock(fp_settings)
    with running_dashboard(fp_settings, tmp_path) as url:
        with chromium_page(1280, 800) as page:
            page.goto(f"{url}/", wait_until="domcontentloaded")
            page.evaluate("window.__finpulse_marker = 'same page'")
            top = page.locator(".st-key-fp-unusual-1 a")
            expect(top).to_contain_text(SHOCK_TOPIC, timeout=WAIT_MS)
            expect(page.get_by_text("Live: last update")).to_be_visible()
            # At this width a ranked line wraps: cut with an ellipsis it would lose its numbers and alert badge.
            assert top.evaluate("a => [...a.querySelectorAll('*')].every(e => e.scrollWidth <= e.clientWidth + 1)")
            range_box = page.locator(".st-key-fp_range input")
            page.locator(".st-key-fp_range [data-testid=stSelectbox]").click()
            page.get_by_role("option", name="Last 6 hours").click()
            expect(range_box).to_have_value("Last 6 hours")
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=f"{artifacts_dir}/dashboard-laptop-overview.png", full_page=True)

            # The shock fired as a warning and escalated: one card, at its highest severity, saying so.
            expect(page.locator(".st-key-fp-alert-1")).to_contain_text("escalated from warning")
            page.locator(".st-key-fp-alert-1").get_by_role("link", name="Messages behind this alert").click()
            expect(page.locator(".st-key-fp_alert input")).to_have_value(f"critical · {SHOCK_TOPIC} · firing",
                                                                         timeout=WAIT_MS)
            messages = page.get_by_test_id("stDataFrame").nth(1)    # the alert table, its messages, deliveries
            for message in firing.messages:
                expect(messages).to_contain_text(message["text"])
            expect(range_box).to_have_value("Last 6 hours")       # the sidebar's choices survived the jump
            page.wait_for_timeout(1000)
            page.screenshot(path=f"{artifacts_dir}/dashboard-laptop-alert.png", full_page=True)

            page.get_by_role("link", name=f"Open {SHOCK_TOPIC} in the drill-down, at the window that fired").click()
            expect(page.get_by_role("combobox", name="Topic", exact=True)).to_have_value(SHOCK_TOPIC, timeout=WAIT_MS)
            # Opened at the window that fired, its messages listed: the messages behind the move.
            window_box = page.get_by_role("combobox", name="Messages of")
            expect(window_box).to_have_value(re.compile(rf"{firing.observed['count']} messages · mean"),
                                             timeout=WAIT_MS)
            window_table = page.get_by_test_id("stDataFrame")     # one table: the window's messages
            expect(window_table).to_have_count(1)
            for message in firing.messages:
                expect(window_table).to_contain_text(message["text"])
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            assert page.evaluate("window.__finpulse_marker") == "same page", "a link reloaded the page"
            assert "Traceback" not in page.locator("body").inner_text()
            page.wait_for_timeout(1500)
            page.screenshot(path=f"{artifacts_dir}/dashboard-laptop-drilldown.png", full_page=True)
            # The address says what is shown, sidebar choices included: it is the link an analyst sends.
            page.wait_for_url(re.compile(r"/drilldown\?.*range=6h"), timeout=WAIT_MS)
            link = page.url
            # A click on a chart lists the messages of the window nearest to it (here one well before the shock).
            fired_window = window_box.input_value()
            area = page.locator("[data-testid=stVegaLiteChart]").first.bounding_box()
            page.mouse.click(area["x"] + area["width"] * 0.4, area["y"] + area["height"] * 0.4)
            expect(window_box).not_to_have_value(fired_window, timeout=WAIT_MS)
            expect(window_box).to_have_value(re.compile(r"\d+ messages · mean"))
        assert "key=Energy+%7C+Oil" in link or "key=Energy%20%7C%20Oil" in link, link
        assert f"at={firing.window_start:%Y-%m-%dT%H:%M}Z" in link.replace("%3A", ":"), link
        with chromium_page(1280, 800) as colleague:       # a new session opens the link
            colleague.goto(link, wait_until="domcontentloaded")
            expect(colleague.get_by_role("combobox", name="Topic", exact=True)).to_have_value(SHOCK_TOPIC,
                                                                                            timeout=WAIT_MS)
            expect(colleague.locator(".st-key-fp_range input")).to_have_value("Last 6 hours")
            expect(colleague.get_by_role("combobox", name="Messages of")).to_have_value(
                re.compile(rf"{firing.observed['count']} messages · mean"))
            assert "Traceback" not in colleague.locator("body").inner_text()


def test_a_webhook_link_opens_its_alert_even_on_a_cold_dashboard(fp_settings, tmp_path):
    """A risk analyst follows the link in a webhook sent before December 2026 (``/?alert=ID``, the root address) to
    an episode that resolved about two hours ago, while the dashboard has no data yet: once the records arrive, the
    page shows the Alerts view on that alert, its range widened to the last 6 hours, and the address says so."""
    data = synthesize(utcnow(), minutes=240, window_s=600, shock_key=SHOCK_TOPIC)
    resolve = next(a for a in data.alerts if a.status == "resolved")
    with running_dashboard(fp_settings, tmp_path, "--refresh", "1") as url:
        with chromium_page(1280, 800) as page:
            page.goto(f"{url}/?alert={resolve.id}", wait_until="domcontentloaded")
            page.wait_for_url(re.compile(r"/alerts\?"), timeout=WAIT_MS)
            produce(fp_settings, data)
            expect(page.locator(".st-key-fp_alert input")).to_have_value(f"warning · {resolve.key} · resolved",
                                                                         timeout=WAIT_MS)
            expect(page.locator(".st-key-fp_range input")).to_have_value("Last 6 hours", timeout=WAIT_MS)
            expect(page.get_by_text("Time range widened from last hour to last 6 hours")).to_be_visible(timeout=WAIT_MS)
            page.wait_for_url(re.compile(r"/alerts\?.*range=6h"), timeout=WAIT_MS)
            assert "Traceback" not in page.locator("body").inner_text()


def test_a_fixed_range_link_shows_that_time_in_the_readers_zone(fp_settings, artifacts_dir, tmp_path):
    """A link to a fixed range (UTC in the address) opened in Chromium: the From/To inputs show it in the link's
    zone, the Alerts view lists the episode that was on then and not the later shock."""
    data, shock = produce_shock(fp_settings)
    earnings = next(a for a in data.alerts if a.status == "resolved")
    start, end = earnings.started_at - timedelta(minutes=2), shock.started_at - timedelta(minutes=1)
    utc = "%Y-%m-%dT%H:%MZ"
    with running_dashboard(fp_settings, tmp_path) as url:
        with chromium_page(1280, 800) as page:
            page.goto(f"{url}/alerts?range=fixed&from={start.strftime(utc)}&to={end.strftime(utc)}"
                      f"&tz=Asia/Tokyo", wait_until="domcontentloaded")
            expect(page.locator(".st-key-fp_alert input")).to_have_value(f"warning · {earnings.key} · resolved",
                                                                         timeout=WAIT_MS)
            tokyo = (start + timedelta(hours=9)).strftime("%Y-%m-%dT%H:%M")
            expect(page.locator(".st-key-fp_fixed_from input")).to_have_value(re.compile(re.escape(tokyo)),
                                                                              timeout=WAIT_MS)
            expect(page.get_by_text("Times in Asia/Tokyo. A fixed range does not follow new data.")).to_be_visible(
                timeout=WAIT_MS)
            # Firing 0, Resolved 1: the Earnings episode only; the shock began after the range.
            expect(page.get_by_test_id("stMetricValue").nth(0)).to_have_text("0", timeout=WAIT_MS)
            expect(page.get_by_test_id("stMetricValue").nth(1)).to_have_text("1", timeout=WAIT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=f"{artifacts_dir}/dashboard-laptop-fixed-range.png", full_page=True)
            assert "Traceback" not in page.locator("body").inner_text()


def test_an_analyst_asks_the_model_about_headlines_and_sees_which_words_moved_it(fp_settings, artifacts_dir,
                                                                                tmp_path):
    from models.explain import read_texts
    from models.scorer import BatchScorer
    model = save_tiny_model(make_tiny_base(tmp_path / "base"), tmp_path / "model")
    settings = with_section(fp_settings, "worker", scorer="model", model_dir=str(model), cpu_precision="float32")
    texts = ["Shares plunge after the company misses estimates", "Oil prices climb as OPEC cuts crude output"]
    expected = read_texts(BatchScorer.from_pretrained(model, device="cpu", tokenizer_processes=0), texts)
    data, firing = produce_shock(fp_settings)
    with running_dashboard(settings, tmp_path) as url:
        with chromium_page(1280, 800) as page:
            # The messages behind an alert, handed to the model with one click.
            page.goto(f"{url}/alerts?alert={firing.id}", wait_until="domcontentloaded")
            expect(page.locator(".st-key-fp_alert input")).to_have_value(f"critical · {SHOCK_TOPIC} · firing",
                                                                         timeout=WAIT_MS)
            page.get_by_role("button", name="Why these scores? Ask the model").first.click()
            page.wait_for_url(re.compile(r"/ask"), timeout=WAIT_MS)
            messages = [m["text"] for a in data.alerts if a.id == firing.id for m in a.messages]  # and escalation's
            expect(page.locator(".st-key-fp-ask-1")).to_be_visible(timeout=WAIT_MS)
            expect(page.locator(".fp-ask-text")).to_have_count(len(messages))
            read = page.locator(".fp-ask-text").all_inner_texts()
            assert sorted(" ".join(t.split()) for t in read) == sorted(" ".join(t.split()) for t in messages)

            page.goto(f"{url}/model", wait_until="domcontentloaded")
            page.get_by_role("link", name="Ask this model about a headline").click(timeout=WAIT_MS)
            page.wait_for_url(re.compile(r"/ask"), timeout=WAIT_MS)
            page.get_by_label("Headlines or comments, one a line").fill("\n".join([texts[0], "   ", texts[1], ""]))
            page.get_by_role("button", name="Ask the model").click()
            for number, reading in enumerate(expected, start=1):
                p = reading.prediction
                card = page.locator(f".st-key-fp-ask-{number}")
                expect(card).to_contain_text(f"{p.sentiment} · score {p.sentiment_score:+.2f}", timeout=WAIT_MS)
                expect(card).to_contain_text(f"{p.topic} ({p.topic_confidence:.0%})")
                words = card.locator(".fp-ask-text span")
                expect(words).to_have_count(len(reading.text.split()))
                strongest = max(range(len(reading.words)), key=lambda i: abs(reading.words[i].sentiment))
                expect(words.nth(strongest)).to_have_attribute(
                    "title", re.compile(re.escape(f"score {reading.words[strongest].sentiment:+.2f} with this word")))
            expect(page.locator(".st-key-fp-ask-3")).to_have_count(0)   # blank lines are not texts
            # Coloured by the topic instead: the word that made the first text's topic likeliest is on blue.
            # Scoped to the radio group: the table below has a "topic" column header too, once it has drawn.
            page.get_by_role("radiogroup", name="Colour words by").get_by_text("topic", exact=True).click()
            made_topic = max(range(len(expected[0].words)), key=lambda i: expected[0].words[i].topic)
            expect(page.locator(".st-key-fp-ask-1 .fp-ask-text span").nth(made_topic)).to_have_attribute(
                "style", re.compile(r"rgba\(37, 99, 235"), timeout=WAIT_MS)
            expect(page.get_by_test_id("stDataFrame")).to_contain_text(expected[1].prediction.topic)
            assert "Traceback" not in page.locator("body").inner_text()
            page.wait_for_timeout(1000)
            page.screenshot(path=f"{artifacts_dir}/dashboard-laptop-ask.png", full_page=True)
