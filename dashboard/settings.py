"""The ``[dashboard]`` settings section: how much the dashboard keeps in memory, how often it refreshes, and who
may see it.

Environment: ``FINPULSE_DASHBOARD__REFRESH_S=5``, ``FINPULSE_DASHBOARD__AUTH=password`` and so on. The password
itself is never a setting: ``password_env`` names the environment variable that holds it.
"""
from __future__ import annotations

from dataclasses import dataclass

from stream.config import ConfigError, Settings, check_port

AUTH_MODES = ("auto", "none", "password", "oidc")


@dataclass
class DashboardSettings:
    host: str = "127.0.0.1"
    port: int = 8501
    # How often the open views redraw from the in-memory store (seconds).
    refresh_s: float = 2.0
    # The store keeps this much history, measured back from the newest record (so replayed or simulated
    # streams whose event time runs ahead of the wall clock are bounded the same way as live ones).
    retention_hours: float = 24.0
    # Row caps per kind of record, whatever the time span: they bound memory at high message rates.
    max_trend_rows: int = 300_000
    max_scored_rows: int = 50_000
    max_window_message_rows: int = 20_000
    max_alert_rows: int = 20_000
    max_delivery_rows: int = 20_000
    # "auto": password when the variable named by password_env is set, OIDC when st.secrets has an [auth]
    # section, otherwise open. "none" | "password" | "oidc" force a mode ("password" with no password set
    # shows nothing at all: access control fails closed).
    auth: str = "auto"
    password_env: str = "FINPULSE_DASHBOARD_PASSWORD"
    oidc_provider: str = ""
    # Default time zone for timestamps (IANA name); empty means the browser's.
    timezone: str = ""
    # A window with fewer messages than this is too noisy to rank a key as unusual.
    min_window_count: int = 5
    # How many earlier windows of a key form its baseline on the charts and in the unusualness ranking.
    baseline_windows: int = 30
    # Nothing new published for this long (worker wall clock: window updates, alerts, scored messages) and every
    # view says the data is stale, and why when Kafka tells (the worker's unprocessed input). The worker
    # republishes open windows every few seconds while messages flow, so quiet streams are the only false alarm.
    stale_after_s: float = 120.0
    # The Ask view loads the worker's model into the dashboard process (on first use, on the CPU: about 420 MB more)
    # to read typed headlines; false leaves the view out.
    ask_model: bool = True


def dashboard_settings(settings: Settings) -> DashboardSettings:
    section = settings.section("dashboard", DashboardSettings)
    if section.auth not in AUTH_MODES:
        raise ConfigError(f"[dashboard] auth = {section.auth!r}: use one of {', '.join(AUTH_MODES)}")
    if section.refresh_s <= 0 or section.retention_hours <= 0 or section.stale_after_s <= 0:
        raise ConfigError("[dashboard] refresh_s, retention_hours and stale_after_s must be positive")
    check_port("[dashboard] port", section.port, zero_allowed=False)
    return section
