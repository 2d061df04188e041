"""docker-compose.yml read as Compose reads it (YAML), and its worker healthcheck's command run for real against a
probe server: it passes only when /readyz says ready. (No Docker engine is needed.)"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

from stream.broker import free_port
from stream.config import WorkerSettings
from stream.ops import READINESS, OpsServer

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_worker_healthcheck_asks_readyz_on_the_port_the_worker_serves_and_publishes():
    worker = compose()["services"]["worker"]
    environment = compose()["x-finpulse-env"]
    assert "FINPULSE_WORKER__WEB_PORT" not in environment      # so the worker serves on the default port
    port = WorkerSettings().web_port
    check = worker["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{port}/readyz" in check["test"][3]
    assert f"127.0.0.1:{port}:{port}" in worker["ports"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    assert compose()["services"]["dashboard"]["healthcheck"]["test"][3].count("/_stcore/health") == 1


def test_the_worker_healthcheck_command_passes_only_when_the_process_is_ready():
    code = compose()["services"]["worker"]["healthcheck"]["test"][3]
    port = free_port()
    command = [sys.executable, "-c", code.replace(f":{WorkerSettings().web_port}/", f":{port}/")]
    state = {"ready": False}

    def check():
        return state["ready"], "as the test says"

    async def run_check() -> int:
        done = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return await done.wait()

    async def scenario() -> list[int]:
        codes = [await run_check()]                     # nothing listens yet
        server = OpsServer("127.0.0.1", port)
        await server.start()
        READINESS.add("t-healthcheck", check)
        try:
            codes.append(await run_check())             # listening, not ready: 503
            state["ready"] = True
            codes.append(await run_check())
        finally:
            READINESS.remove("t-healthcheck", check)
            await server.stop()
        return codes

    not_listening, not_ready, ready = asyncio.run(scenario())
    assert not_listening != 0 and not_ready != 0 and ready == 0
