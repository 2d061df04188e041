"""What an operator's tools ask a FinPulse process over HTTP: ``GET /metrics`` (Prometheus text format, from
``stream.metrics.REGISTRY``), ``GET /healthz`` (the process is alive: its event loop answers) and ``GET /readyz``
(200 when every readiness check passes; 503 with a JSON reason otherwise).

The worker serves them on Faust's own web server (``[worker] web_port``, ``install_views``); ``finpulse dispatch``
and ``finpulse ingest rss`` on a small server of their own (``OpsServer``, ``[alerts] metrics_port``,
``[ingest] metrics_port``). The parts of a process register what
readiness means for them in ``READINESS``: the worker its consumer group, broker and model (``install_worker``), a
dispatcher its group, its delivery state and the broker (``alerts.dispatch``). A part that stops removes its checks.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Callable

from aiohttp import web

from .config import ConfigError
from .metrics import CONTENT_TYPE, REGISTRY, gauge_family

log = logging.getLogger(__name__)

# A readiness check returns (ready, detail): the detail says what was seen, or why it is not ready.
Check = Callable[[], tuple[bool, str]]
LAG_HELP = ("Messages in an input topic not yet processed by this process: the partition's end (the high watermark of "
            "the last fetch, which is exact on tansu too) minus the committed offset (worker) or the position "
            "(dispatcher), summed over the partitions it owns.")


class Readiness:
    def __init__(self):
        self._checks: dict[str, Check] = {}
        self.started_at = time.time()

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def remove(self, name: str, check: Check) -> None:
        """Remove ``name`` if it is still ``check`` (a newer part of the same name may have replaced it)."""
        if self._checks.get(name) == check:
            del self._checks[name]

    def report(self) -> tuple[bool, dict]:
        """(ready, the JSON body): every check's result, and the reasons of those that fail."""
        checks, reasons = {}, []
        for name, check in list(self._checks.items()):
            try:
                ok, detail = check()
            except Exception as exc:  # noqa: BLE001 - a check that breaks says "not ready", never a 500
                ok, detail = False, f"the check failed: {type(exc).__name__}: {exc}"
            checks[name] = {"ok": ok, "detail": detail}
            if not ok:
                reasons.append(f"{name}: {detail}")
        if not checks:
            reasons.append("starting: nothing has registered its readiness yet")
        body = {"status": "not ready" if reasons else "ready", "checks": checks}
        if reasons:
            body["reason"] = "; ".join(reasons)
        return not reasons, body


READINESS = Readiness()


def metrics_response() -> web.Response:
    return web.Response(body=REGISTRY.render(), headers={"Content-Type": CONTENT_TYPE})


def healthz_response() -> web.Response:
    return web.json_response({"status": "alive", "uptime_s": round(time.time() - READINESS.started_at, 1)})


def readyz_response() -> web.Response:
    ready, body = READINESS.report()
    return web.json_response(body, status=200 if ready else 503, dumps=lambda v: json.dumps(v, sort_keys=True))


ROUTES = {"/metrics": metrics_response, "/healthz": healthz_response, "/readyz": readyz_response}


# ---------------------------------------------------------------- a server of its own (dispatch, ingest rss)

class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` for a process without Faust's web server."""

    def __init__(self, host: str, port: int, setting: str = "[alerts] metrics_port (--metrics-port)"):
        self.host, self.port = host, port
        self.setting = setting      # where the port comes from, for the message when it is taken
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for path, respond in ROUTES.items():
            app.router.add_get(path, _handler(respond))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"cannot serve metrics and probes on {self.host}:{self.port} ({exc.strerror or exc}): "
                              f"choose another {self.setting}, or 0 for none") from None
        log.info("metrics and probes on http://%s:%d (/metrics, /healthz, /readyz)", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _handler(respond: Callable[[], web.Response]):
    async def handle(request: web.Request) -> web.Response:
        return respond()
    return handle


# ---------------------------------------------------------------- inside the Faust worker

def install_views(app) -> None:
    """Serve the three paths on the Faust app's web server."""
    from faust import web as faust_web

    for path, respond in ROUTES.items():
        view = type(f"Ops{path.strip('/').title()}View", (faust_web.View,), {"get": _faust_get(respond)})
        app.page(path, name=f"finpulse-{path.strip('/')}")(view)


def _faust_get(respond: Callable[[], web.Response]):
    async def get(self, request):  # Faust's aiohttp driver passes aiohttp responses through
        return respond()
    return get


def install_worker(app, model_version: str, input_topics: set[str]) -> None:
    """The worker's readiness (consumer group joined and not rebalancing, broker reachable, model loaded) and its
    consumer lag over ``input_topics``; the three paths on Faust's web server when it is enabled."""
    READINESS.add("consumer_group", lambda: _faust_group_state(app))
    READINESS.add("broker", lambda: _faust_broker_state(app))
    READINESS.add("model", lambda: (True, f"{model_version} loaded"))
    REGISTRY.add_collector(lambda: [gauge_family("finpulse_consumer_lag_messages", LAG_HELP, ["topic"],
                                                 _faust_lag(app, input_topics))])
    if app.conf.web_enabled:
        install_views(app)


def _faust_group_state(app) -> tuple[bool, str]:
    if app.rebalancing_count == 0:
        return False, "has not joined the consumer group yet"
    if app.rebalancing:
        return False, "rebalancing: partitions are being reassigned and tables recovered"
    return True, f"joined; {len(app.consumer.assignment())} partitions assigned (changelogs included)"


def _faust_broker_state(app) -> tuple[bool, str]:
    # The group coordinator is the broker the consumer heartbeats to: aiokafka forgets it as soon as a heartbeat
    # or a request to it fails, and finds it again once the broker answers. A broker that went silent (a network
    # partition: nothing refused, nothing answered) fails no request until Faust's request timeout, 90 s, so the
    # check also asks how long requests have waited for an answer.
    consumer = getattr(app.consumer._thread, "_consumer", None)
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return False, "the Kafka consumer has not started yet"
    if coordinator.coordinator_id is None:
        return False, "the Kafka group coordinator is unknown: the broker does not answer"
    silence = broker_silence(consumer, app.conf.broker_session_timeout)
    if silence:
        return False, silence
    return True, f"group coordinator is broker {coordinator.coordinator_id}"


def broker_silence(consumer, session_timeout_s: float) -> str | None:
    """Why the broker counts as gone for ``consumer`` (an aiokafka consumer) though nothing failed yet: a request
    has waited longer than the session timeout for an answer. None while it answers."""
    silent_s = unanswered_for(consumer)
    if silent_s <= session_timeout_s:
        return None
    return (f"the broker has not answered for {silent_s:.0f} s (requests waiting; more than the "
            f"{session_timeout_s:g} s session timeout)")


def unanswered_for(consumer) -> float:
    """Seconds since the broker last answered on a connection of ``consumer`` (an aiokafka consumer) that has
    requests waiting; 0 when none waits. A healthy broker answers every heartbeat and every long-poll fetch within
    seconds. Reads aiokafka's connections (``_conns``, ``_requests``, ``_last_action``: the time of the last
    response); another aiokafka without them makes this 0, and the coordinator check above still holds."""
    connections = getattr(getattr(consumer, "_client", None), "_conns", None) or {}
    now = time.monotonic()
    waiting = [now - conn._last_action for conn in list(connections.values())
               if getattr(conn, "_requests", None) and hasattr(conn, "_last_action")]
    return max(waiting, default=0.0)


def _faust_lag(app, topics: set[str]) -> dict[tuple[str], int]:
    """Per topic: end minus committed offset, over this worker's partitions whose both figures are known (the end is
    known once a fetch returned, the committed offset once the partition was assigned)."""
    lag: dict[tuple[str], int] = defaultdict(int)
    consumer = app.consumer
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        try:
            end, committed = consumer.highwater(tp), consumer._committed_offset.get(tp)
        except Exception:  # noqa: BLE001 - revoked in the meantime: no figure for it
            continue
        if end is not None and committed is not None and committed >= 0:
            lag[(tp.topic,)] += max(0, end - committed)
    return lag


__all__ = ["READINESS", "ROUTES", "OpsServer", "Readiness", "install_views", "install_worker"]
