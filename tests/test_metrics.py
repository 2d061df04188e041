"""The metrics registry and its exposition, the readiness report, and the standalone ops server over real HTTP.
(The worker's and the dispatcher's own metrics are tested on real processes in test_stream_worker.py and
test_delivery.py.)"""
from __future__ import annotations

import asyncio
import math

import pytest

from stream.broker import free_port
from stream.config import ConfigError
from stream.metrics import REGISTRY, Counter, Gauge, Histogram, Registry, counter_family, gauge_family
from stream.ops import READINESS, OpsServer, Readiness
from tests.exposition import MalformedExposition, parse, probe, scrape


def test_a_registry_renders_what_the_strict_parser_reads_back_exactly():
    registry = Registry()
    consumed = registry.register(Counter("t_consumed_total", "Taken.\nSecond line \\ here.", ["topic", "reason"]))
    level = registry.register(Gauge("t_level", "A level."))
    latency = registry.register(Histogram("t_latency_seconds", "Latency.", ["endpoint"], buckets=(0.1, 1.0)))
    consumed.labels("finpulse.news", 'quote " and \\ backslash\nnewline').inc(3)
    consumed.labels("finpulse.news", "ok").inc()
    consumed.labels("finpulse.news", "ok").inc(2)
    level.set(-2.5)
    for seconds in (0.05, 0.1, 0.7, 4.0):
        latency.labels("desk").observe(seconds)
    registry.register(Counter("t_never_used_total", "Declared, no sample yet."))

    text = registry.render().decode()
    got = parse(text)
    assert got.types == {"t_consumed_total": "counter", "t_level": "gauge", "t_latency_seconds": "histogram",
                         "t_never_used_total": "counter"}
    assert got.value("t_consumed_total", topic="finpulse.news", reason='quote " and \\ backslash\nnewline') == 3
    assert got.value("t_consumed_total", topic="finpulse.news", reason="ok") == 3
    assert got.value("t_level") == -2.5
    # le buckets are cumulative; 0.1 falls in the 0.1 bucket (upper bounds are inclusive).
    assert [got.value("t_latency_seconds_bucket", endpoint="desk", le=le) for le in ("0.1", "1", "+Inf")] == [2, 3, 4]
    assert got.value("t_latency_seconds_count", endpoint="desk") == 4
    assert math.isclose(got.value("t_latency_seconds_sum", endpoint="desk"), 4.85)
    assert "# HELP t_consumed_total Taken.\\nSecond line \\\\ here.\n" in text


def test_families_of_one_name_from_several_collectors_are_exposed_as_one():
    registry = Registry()
    registry.add_collector(lambda: [gauge_family("t_lag_messages", "Lag.", ["topic"], {"finpulse.news": 4})])
    registry.add_collector(lambda: [gauge_family("t_lag_messages", "Lag.", ["topic"], {("finpulse.alerts",): 0}),
                                    counter_family("t_done_total", "Done.", ["topic", "reason"], {("a", "b"): 2})])
    got = parse(registry.render().decode())
    assert got.series("t_lag_messages") == {frozenset({("topic", "finpulse.news")}): 4,
                                            frozenset({("topic", "finpulse.alerts")}): 0}
    assert got.types["t_done_total"] == "counter" and got.value("t_done_total", topic="a", reason="b") == 2


@pytest.mark.parametrize("text", [
    "t_x 1\n",                                                        # no TYPE
    "# TYPE t_x counter\nt_x{a=\"1\"} 1\nt_x{a=\"1\"} 2\n",              # the same series twice
    "# TYPE t_x counter\nt_x{a=1} 1\n",                               # unquoted label value
    "# TYPE t_x counter\nt_x{a=\"\\q\"} 1\n",                          # bad escape
    "# TYPE t_x counter\nt_x one\n",                                  # not a number
    "# TYPE t_x counter\n# TYPE t_x gauge\n",                         # declared twice
    "# TYPE t_x counter\nt_x 1",                                      # no final newline
    "# TYPE t_h histogram\nt_h_bucket{le=\"1\"} 2\nt_h_bucket{le=\"+Inf\"} 1\nt_h_count 1\nt_h_sum 1\n",
    "# TYPE t_h histogram\nt_h_bucket{le=\"1\"} 1\nt_h_count 1\nt_h_sum 1\n",     # no +Inf bucket
])
def test_the_parser_refuses_malformed_expositions(text):
    with pytest.raises(MalformedExposition):
        parse(text)


def test_bad_metric_and_label_names_are_refused_at_definition():
    for name, labels in (("1bad", []), ("bad-name", []), ("ok", ["le"]), ("ok", ["__reserved"]), ("ok", ["a-b"])):
        with pytest.raises(ValueError):
            Counter(name, "x", labels)
    with pytest.raises(ValueError):
        Counter("t_two_labels", "x", ["a", "b"]).labels("only one")
    registry = Registry()
    registry.register(Counter("t_once", "x"))
    with pytest.raises(ValueError):
        registry.register(Gauge("t_once", "x"))


def test_readiness_names_what_is_not_ready_and_a_broken_check_is_not_ready():
    readiness = Readiness()
    assert readiness.report() == (False, {"status": "not ready", "checks": {},
                                          "reason": "starting: nothing has registered its readiness yet"})
    group = lambda: (False, "rebalancing")  # noqa: E731
    readiness.add("group", group)
    readiness.add("model", lambda: (True, "m-1 loaded"))
    readiness.add("broken", lambda: 1 / 0)
    ready, body = readiness.report()
    assert not ready and body["reason"] == "group: rebalancing; broken: the check failed: ZeroDivisionError: division by zero"
    assert body["checks"]["model"] == {"ok": True, "detail": "m-1 loaded"}
    readiness.remove("broken", lambda: None)          # not the registered check: stays
    assert "broken" in readiness.report()[1]["checks"]
    readiness.remove("broken", readiness._checks["broken"])
    readiness.remove("group", group)
    assert readiness.report() == (True, {"status": "ready", "checks": {"model": {"ok": True, "detail": "m-1 loaded"}}})


def test_the_ops_server_serves_metrics_and_probes_and_refuses_a_taken_port():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    probe_counter = REGISTRY.register(Counter("t_ops_server_probe_total", "A counter of this test."))
    probe_counter.inc(7)
    ready = {"now": False}

    def check():
        return ready["now"], "as the test says"

    async def scenario():
        server = OpsServer("127.0.0.1", port)
        await server.start()
        try:
            seen = {}
            loop = asyncio.get_running_loop()
            seen["metrics"] = await loop.run_in_executor(None, scrape, f"{base}/metrics")
            seen["healthz"] = await loop.run_in_executor(None, probe, f"{base}/healthz")
            READINESS.add("t-ops-server", check)
            seen["not ready"] = await loop.run_in_executor(None, probe, f"{base}/readyz")
            ready["now"] = True
            seen["ready"] = await loop.run_in_executor(None, probe, f"{base}/readyz")
            with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*metrics_port"):
                await OpsServer("127.0.0.1", port).start()
            return seen
        finally:
            READINESS.remove("t-ops-server", check)
            await server.stop()

    seen = asyncio.run(scenario())
    assert seen["metrics"].value("t_ops_server_probe_total") == 7
    assert seen["metrics"].types["process_cpu_seconds_total"] == "counter"
    assert seen["healthz"][0] == 200 and seen["healthz"][1]["status"] == "alive"
    status, body = seen["not ready"]
    assert status == 503 and "t-ops-server: as the test says" in body["reason"]
    status, body = seen["ready"]
    assert status == 200 and body["checks"]["t-ops-server"]["ok"] is True
