"""stream.confirmed_table: a batch's table writes are on the broker before the batch ends, so Faust never acks
(and a stopping worker never drops) writes still queued in its producer's buffer.

Run as a module (``python -m tests.test_confirmed_table BOOTSTRAP APP_ID MODE DATADIR``) this file is a minimal
Faust worker whose agent writes one table key per message, a micro-batch at a time, and after each batch prints
``WRITTEN <n> ON_BROKER <m>``: how many writes it made so far, and how many changelog records the broker holds.
MODE ``confirmed`` uses ``ConfirmedTable`` and waits for ``writes_delivered()``; ``queued`` is Faust's own table.
"""
from __future__ import annotations

import asyncio
import re
import sys
import uuid

import pytest

from stream.config import KafkaSettings
from stream.kafka_io import RecordSender, topic_sizes
from stream.topics import ensure_topics
from tests.procs import ManagedProcess

PARTITIONS = 4
WRITES = 20_000
TABLE = "facts"


async def _produce(kafka: KafkaSettings, topic: str) -> None:
    async with RecordSender(kafka, linger_ms=20) as sender:
        for i in range(WRITES):
            await sender.send(topic, f"value {i} ".ljust(200, ".").encode(), key=f"k{i}".encode())
        await sender.flush()


def _progress(output: str) -> list[tuple[int, int]]:
    return [(int(w), int(b)) for w, b in re.findall(r"WRITTEN (\d+) ON_BROKER (\d+)", output)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["queued", "confirmed"])
def test_a_batch_ends_only_once_the_broker_has_its_table_writes(broker, tmp_path, mode):
    """20,000 messages, one table write each. With Faust's table the batch ends while most of its changelog
    records still wait in the producer's buffer (Faust would ack it); with ``ConfirmedTable`` every write of every
    batch is on the broker when the batch ends, and a worker stopped right after stops cleanly with all of them."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=PARTITIONS)
    app_id = f"ct-{mode}-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-{TABLE}-changelog"
    ensure_topics(kafka, [changelog, f"{app_id}-source"])
    asyncio.run(_produce(kafka, f"{app_id}-source"))
    cmd = [sys.executable, "-m", "tests.test_confirmed_table", broker.bootstrap_servers, app_id, mode,
           tmp_path / "data"]
    worker = ManagedProcess(cmd, tmp_path, f"writer-{mode}").start()
    try:
        worker.wait_for(f"WRITTEN {WRITES} ", timeout=180)
        progress = _progress(worker.output())
        if mode == "queued":
            assert any(on_broker < written for written, on_broker in progress), \
                f"Faust's table no longer ends a batch before its writes are sent: is ConfirmedTable needed? {progress}"
            return
        assert progress and all(on_broker == written for written, on_broker in progress), progress
        assert worker.stop() == 0, worker.tail()
    finally:
        worker.stop()
    assert asyncio.run(topic_sizes(KafkaSettings(bootstrap_servers=broker.bootstrap_servers), [changelog])) == {changelog: WRITES}


def _writer_worker(bootstrap: str, app_id: str, mode: str, datadir: str) -> None:
    import faust

    from stream.confirmed_table import ConfirmedTable

    changelog = f"{app_id}-{TABLE}-changelog"
    app = faust.App(app_id, broker=f"kafka://{bootstrap}", store="memory://", topic_partitions=PARTITIONS,
                    datadir=datadir, web_enabled=False, broker_session_timeout=6, broker_heartbeat_interval=1.5,
                    Table=ConfirmedTable if mode == "confirmed" else faust.Table)
    table = app.Table(TABLE, default=None, key_type=bytes, partitions=PARTITIONS, use_partitioner=True)
    source = app.topic(f"{app_id}-source", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=PARTITIONS)
    written = 0

    @app.agent(source)
    async def write(stream):
        nonlocal written
        async for events in stream.take_events(WRITES, within=2.0):
            for event in events:
                table[event.key] = event.value.decode()
            written += len(events)
            if mode == "confirmed":
                await table.writes_delivered()
            on_broker = (await topic_sizes(KafkaSettings(bootstrap_servers=bootstrap), [changelog]))[changelog]
            print(f"WRITTEN {written} ON_BROKER {on_broker}", flush=True)

    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    _writer_worker(*sys.argv[1:5])
