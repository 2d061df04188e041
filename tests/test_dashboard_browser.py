"""End to end in a real headless Chromium: broker, records, ``finpulse dashboard`` as a real process, the page
opened in the browser, live data awaited, the shocked topic asserted at the top with its alert, a screenshot kept.
"""
from __future__ import annotations

from datetime import timedelta

import pytest

from stream.broker import free_port
from stream.records import utcnow
from tests.browser import FinPulseProcess, chromium_page, expect, finpulse_env, wait_for_http
from tests.dashboard_data import SHOCK_TOPIC, produce, synthesize

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT_MS = 120_000


def test_dashboard_shows_the_shock_live_in_a_browser(fp_settings, artifacts_dir, tmp_path):
    start = utcnow() - timedelta(minutes=2)
    produce(fp_settings, synthesize(start))
    port = free_port()
    dashboard = FinPulseProcess("dashboard", ["dashboard", "--port", str(port), "--refresh", "1"],
                                finpulse_env(fp_settings), tmp_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_stcore/health", dashboard)
        with chromium_page() as page:
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            # Waits until the text is there (live data arrives asynchronously), fails if it never is.
            top, first_alert = page.locator(".st-key-fp-unusual-1"), page.locator(".st-key-fp-alert-1")
            expect(top).to_contain_text(SHOCK_TOPIC, timeout=WAIT_MS)
            expect(top).to_contain_text("alert firing")
            expect(first_alert).to_contain_text(SHOCK_TOPIC)
            expect(first_alert).to_contain_text("critical")
            page.evaluate("window.__finpulse_marker = 'same page'")
            latest = page.get_by_test_id("stMetricValue").first.inner_text()

            # Two more minutes of data: the open page must redraw by itself, without reloading.
            produce(fp_settings, synthesize(start + timedelta(minutes=2), minutes=3, shock_windows=2, seed=4))
            page.wait_for_function(
                "before => document.querySelector('[data-testid=stMetricValue]')?.innerText !== before",
                arg=latest, timeout=WAIT_MS)
            assert page.evaluate("window.__finpulse_marker") == "same page"
            expect(top).to_contain_text(SHOCK_TOPIC)
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            page.wait_for_timeout(1500)  # let the charts finish drawing before the picture
            body = page.locator("body").inner_text()
            assert "Traceback" not in body and "Exception" not in body
            page.screenshot(path=f"{artifacts_dir}/dashboard-overview.png", full_page=True)
            for view in ("Topic / ticker", "Alerts", "Model"):
                page.get_by_role("link", name=view).click()
                page.locator("[data-testid=stVegaLiteChart], [data-testid=stDataFrame]").first.wait_for(timeout=WAIT_MS)
                page.wait_for_timeout(1500)
                assert "Traceback" not in page.locator("body").inner_text()
                page.screenshot(path=f"{artifacts_dir}/dashboard-{view.split()[0].lower()}.png", full_page=True)
        with chromium_page(color_scheme="dark") as page:  # the system dark theme: charts must stay readable
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            expect(page.locator(".st-key-fp-unusual-1")).to_contain_text(SHOCK_TOPIC, timeout=WAIT_MS)
            page.locator("[data-testid=stVegaLiteChart]").first.wait_for(timeout=WAIT_MS)
            page.wait_for_timeout(1500)
            page.screenshot(path=f"{artifacts_dir}/dashboard-overview-dark.png", full_page=True)
        dashboard.assert_running()
    finally:
        dashboard.stop()
