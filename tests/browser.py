"""A real browser for the dashboard's end-to-end test and benchmark.

``chromium_page()`` is Debian's headless ``chromium`` driven through the Python ``playwright`` package's driver
(Playwright's own browser download does not work here). A missing browser or driver is a test FAILURE with the fix
in the message, never a skip: the Makefile's ``browser`` target installs chromium. ``wait_for_http`` waits for a
``finpulse`` process (``tests.procs``) to serve a URL; ``running_dashboard`` starts ``finpulse dashboard`` and waits
for it.
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest

from tests.procs import FinpulseProcess

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def expect(locator):
    """Playwright's auto-waiting assertions (imported here so a missing package fails like a missing browser)."""
    try:
        from playwright.sync_api import expect as playwright_expect
    except ImportError:
        pytest.fail("the Python 'playwright' package is not installed: `.venv/bin/pip install playwright`", pytrace=False)
    return playwright_expect(locator)


def chromium_path() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if not found:
        pytest.fail("Debian's 'chromium' is not installed, so the dashboard's browser test cannot run: "
                    "`make browser` (or `apt-get install -y chromium`) installs it.", pytrace=False)
    return found


@contextmanager
def chromium_page(width: int = 1500, height: int = 1200, color_scheme: str = "light") -> Iterator:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python 'playwright' package (its driver runs Debian's chromium) is not installed: "
                    "`.venv/bin/pip install playwright`", pytrace=False)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme)
            yield context.new_page()
        finally:
            browser.close()


@contextmanager
def running_dashboard(settings, log_dir, *args: str) -> Iterator[str]:
    """``finpulse dashboard ARGS`` on a free port, started and answering: yields its address; on the way out it
    must still be running."""
    from stream.broker import free_port
    from tests.procs import start_finpulse
    port = free_port()
    with start_finpulse(settings, "dashboard", "--port", str(port), *args, log_dir=log_dir) as dashboard:
        wait_for_http(f"http://127.0.0.1:{port}/_stcore/health", dashboard)
        yield f"http://127.0.0.1:{port}"
        assert dashboard.running(), dashboard.tail()


def wait_for_http(url: str, proc: FinpulseProcess, timeout_s: float = 90.0) -> None:
    """Until ``url`` answers 200 (Streamlit's health endpoint); fails early, with its log, if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.running():
            raise AssertionError(f"{proc.name} exited before {url} answered:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f}s:\n{proc.tail()}")
