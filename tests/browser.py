"""Real processes and a real browser for the dashboard's end-to-end test and benchmark.

- ``chromium_page()``: Debian's headless ``chromium`` driven through the Python ``playwright`` package's driver
  (Playwright's own browser download does not work here). A missing browser or driver is a test FAILURE with the
  fix in the message, never a skip: the Makefile's ``browser`` target installs chromium.
- ``FinPulseProcess``: one ``finpulse`` command (``python -m stream.cli …``) in its own process group with its
  output in a log file; stopping it stops exactly that group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
REPO = Path(__file__).resolve().parents[1]


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


class FinPulseProcess:
    """``python -m stream.cli ARGS`` as a child in its own session (so it and its children stop together)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", *args], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def wait_for_http(url: str, proc: FinPulseProcess, timeout_s: float = 90.0) -> None:
    """Until ``url`` answers 200 (Streamlit's health endpoint); fails early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.assert_running()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f}s:\n{proc.log_tail()}")


def finpulse_env(settings, **extra: str) -> dict[str, str]:
    """The environment a finpulse child needs to use ``settings`` (broker, topic prefix, worker app id…)."""
    from dashboard.cli import settings_environ

    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    env.update(settings_environ(settings.raw, None))
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra})
    return env
