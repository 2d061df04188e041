"""stream.app.finishes_before_stop: a worker stopped while a timer run publishes waits for that run, then stops.

Run as a module (``python -m tests.test_stopping_timers BOOTSTRAP APP_ID MODE DATADIR``) this file is a minimal
Faust worker with one timer. Its first run prints ``RUN STARTED``, and once the worker is stopping it publishes one
record with ``stream.app.deliver`` inside ``finish_batch``, as the aggregation's tick does, and prints ``PUBLISHED``. It waits for the
producer to begin stopping first (5 s at most): the moment a run still publishing meets the stop. MODE ``guarded``
decorates the timer with ``finishes_before_stop``; ``plain`` is Faust's own timer.
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid

import pytest

from stream.config import KafkaSettings
from stream.kafka_io import topic_sizes
from stream.topics import ensure_topics
from tests.procs import ManagedProcess

PRODUCER_STOP_WAIT_S = 5.0


@pytest.mark.parametrize("mode", ["plain", "guarded"])
def test_a_stop_waits_for_the_timer_run_that_is_publishing(broker, tmp_path, mode):
    """SIGTERM lands while a timer run is about to publish. With Faust's timer the worker stops its producer and then
    cancels the run: its record is never delivered (the aggregation's tick, shielded by ``finish_batch``, went on
    sending to the stopped producer). With ``finishes_before_stop`` the record is delivered and the worker exits
    cleanly."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=1)
    app_id = f"timers-{mode}-{uuid.uuid4().hex[:8]}"
    out = f"{app_id}-out"
    ensure_topics(kafka, [out])
    cmd = [sys.executable, "-m", "tests.test_stopping_timers", broker.bootstrap_servers, app_id, mode, tmp_path]
    worker = ManagedProcess(cmd, tmp_path, f"timers-{mode}").start()
    try:
        worker.wait_for("RUN STARTED", timeout=90)
        code = worker.stop(timeout=20)
        delivered = asyncio.run(topic_sizes(kafka, [out]))[out]
        if mode == "plain":
            assert delivered == 0, \
                f"Faust's stop now waits for its timers: is finishes_before_stop needed?\n{worker.tail()}"
            return
        assert code == 0, worker.tail()
        assert "PUBLISHED" in worker.output() and delivered == 1, worker.tail()
    finally:
        worker.stop()


def _timer_worker(bootstrap: str, app_id: str, mode: str, datadir: str) -> None:
    import faust

    from stream.app import Outgoing, deliver, faust_send, finish_batch, finishes_before_stop

    app = faust.App(app_id, broker=f"kafka://{bootstrap}", store="memory://", datadir=datadir, web_enabled=False,
                    broker_session_timeout=6, broker_heartbeat_interval=1.5)
    send = faust_send(app)
    guard = finishes_before_stop(app) if mode == "guarded" else (lambda fun: fun)
    runs = {"n": 0}

    @app.timer(0.2)
    @guard
    async def publish_once_stopping() -> None:
        runs["n"] += 1
        if runs["n"] > 1:
            return
        print("RUN STARTED", flush=True)
        while not app.should_stop:
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + PRODUCER_STOP_WAIT_S
        while not app.producer.should_stop and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await finish_batch(deliver(send, [Outgoing(f"{app_id}-out", b"k", b"published while stopping", None)]))
        print("PUBLISHED", flush=True)

    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    _timer_worker(*sys.argv[1:5])
