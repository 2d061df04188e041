"""``finpulse dashboard``: start the Streamlit app headless, with FinPulse's merged settings.

The settings reach the Streamlit process as ``FINPULSE_<SECTION>__<KEY>`` variables (scalar values) plus
``FINPULSE_CONFIG`` for the file itself, so global flags such as ``--bootstrap-servers`` apply there too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from stream.config import tcp_port
from stream.kafka_security import client_security, describe

APP = Path(__file__).resolve().parent / "app.py"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="the Streamlit dashboard analysts watch (live trends, alerts, model)")
    p.add_argument("--host", help="address to listen on (default [dashboard] host, 127.0.0.1)")
    p.add_argument("--port", type=tcp_port, help="port to listen on (default [dashboard] port, 8501)")
    p.add_argument("--refresh", type=float, dest="refresh_s", metavar="SECONDS", help="how often views redraw")
    p.add_argument("--retention-hours", type=float, help="how much history the dashboard keeps in memory")
    p.add_argument("--auth", choices=["auto", "none", "password", "oidc"],
                   help="access control (password: from the variable named by [dashboard] password_env)")
    p.set_defaults(func=_dashboard)


def settings_environ(raw: Mapping[str, Any], source_file: str | None) -> dict[str, str]:
    """Scalar settings as FINPULSE_ variables; tables and lists stay in the config file, which is passed along."""
    env = {"FINPULSE_CONFIG": str(Path(source_file).resolve())} if source_file else {}
    for section, values in raw.items():
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            if isinstance(value, (str, int, float, bool)):
                env[f"FINPULSE_{section.upper()}__{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def streamlit_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless=true", f"--server.address={host}", f"--server.port={port}",
            "--server.fileWatcherType=none", "--server.runOnSave=false", "--browser.gatherUsageStats=false",
            "--client.showErrorDetails=none", "--client.toolbarMode=viewer", "--logger.level=warning"]


def _dashboard(args, settings) -> int:
    from .settings import dashboard_settings

    overrides = {k: getattr(args, k) for k in ("host", "port", "refresh_s", "retention_hours", "auth")}
    settings = settings.with_overrides({"dashboard": overrides})
    cfg = dashboard_settings(settings)  # a bad value fails here, with the CLI's plain message
    client_security(settings.kafka)     # so does a Kafka password or client certificate that cannot be had
    env = {**os.environ, **settings_environ(settings.raw, settings.source_file)}
    print(f"FinPulse dashboard on http://{cfg.host}:{cfg.port} (Kafka {settings.kafka.bootstrap_servers}, "
          f"{describe(settings.kafka)})", flush=True)
    # exec: signals (Ctrl-C, the demo's SIGTERM) reach Streamlit itself.
    os.execve(sys.executable, streamlit_command(cfg.host, cfg.port), env)
    return 0  # not reached
