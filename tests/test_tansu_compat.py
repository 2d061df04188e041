"""stream.tansu_compat: tansu reports end offsets too low, which makes Faust's table recovery stop early; the shim
makes recovery read changelogs to their true end.

Run as a module (``python -m tests.test_tansu_compat BOOTSTRAP APP_ID MODE DATADIR``) this file is a minimal Faust
worker with one table: it prints ``RECOVERED <n>`` with the table's size once recovery is complete.
"""
from __future__ import annotations

import asyncio
import re
import sys
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream import tansu_compat
from stream.config import ConfigError, KafkaSettings
from stream.kafka_io import RecordSender, topic_sizes, true_ends
from stream.topics import ensure_topics
from tests.procs import ManagedProcess

PARTITIONS = 4
KEYS = 400
TABLE = "facts"


async def _produce_in_batches(kafka: KafkaSettings, topic: str, count: int, linger_ms: int = 50) -> None:
    """``count`` records round-robin over the partitions, sent at once so each partition gets few large batches
    (like a Faust changelog written once per key per micro-batch)."""
    async with RecordSender(kafka, linger_ms=linger_ms) as sender:
        for i in range(count):
            await sender.send(topic, f'"v{i}"'.encode(), key=f'"k{i}"'.encode(), partition=i % PARTITIONS)


async def _end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()


def test_tansu_end_offsets_are_too_low_but_the_fetch_high_watermark_is_right(broker):
    """The broker quirk itself. If a tansu upgrade fixes it, this fails: then the shim can go."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=PARTITIONS)
    topic = f"endoff-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, [topic])
    asyncio.run(_produce_in_batches(kafka, topic, 200))
    reported = asyncio.run(_end_offsets(broker.bootstrap_servers, topic))
    fetched = asyncio.run(true_ends(kafka, reported))
    assert all(fetched[tp] == 50 for tp in reported)               # 50 records per partition
    assert all(end < 50 for end in reported.values()), reported    # ListOffsets says less


def test_topic_sizes_count_every_record_where_end_offsets_fall_short(broker):
    """What `finpulse demo` counts its progress with: the true ends, not the low ones ListOffsets reports."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=PARTITIONS)
    batched, empty = f"sizes-{uuid.uuid4().hex[:8]}", f"sizes-empty-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, [batched, empty])
    asyncio.run(_produce_in_batches(kafka, batched, 200))
    assert sum(asyncio.run(_end_offsets(broker.bootstrap_servers, batched)).values()) < 200
    assert asyncio.run(topic_sizes(kafka, [batched, empty])) == {batched: 200, empty: 0}


def test_applied_only_for_tansu_or_when_forced(broker):
    tansu = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    assert tansu_compat.is_tansu(tansu)
    assert tansu_compat.wanted(tansu)                                 # "auto"
    assert not tansu_compat.wanted(KafkaSettings(bootstrap_servers=broker.bootstrap_servers, tansu_compat="off"))
    assert tansu_compat.wanted(KafkaSettings(bootstrap_servers="127.0.0.1:1", tansu_compat="on"))   # no broker asked
    with pytest.raises(ConfigError, match="tansu_compat"):
        tansu_compat.wanted(KafkaSettings(tansu_compat="maybe"))


@pytest.mark.slow
@pytest.mark.parametrize("mode, recovers_all", [("off", False), ("auto", True)])
def test_table_recovery_reads_the_whole_changelog_only_with_the_shim(broker, tmp_path, mode, recovers_all):
    """A table's changelog holds 400 keys written in large batches. A fresh worker recovers the table from it:
    without the shim recovery stops at the too-low end and most keys are lost; with it every key comes back."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=PARTITIONS)
    app_id = f"tc-{mode}-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-{TABLE}-changelog"
    ensure_topics(kafka, [changelog, f"{app_id}-source"])
    asyncio.run(_produce_in_batches(kafka, changelog, KEYS))
    cmd = [sys.executable, "-m", "tests.test_tansu_compat", broker.bootstrap_servers, app_id, mode, tmp_path / "data"]
    with ManagedProcess(cmd, tmp_path, f"recovery-{mode}").start() as worker:
        worker.wait_for("RECOVERED", timeout=120)
        recovered = int(re.search(r"RECOVERED (\d+)", worker.output()).group(1))
    if recovers_all:
        assert recovered == KEYS
        assert "corrected" in worker.output()       # the shim logged the ends it fixed
    else:
        assert recovered < KEYS / 2, "tansu no longer loses table state: is the shim still needed?"


def _recovery_worker(bootstrap: str, app_id: str, mode: str, datadir: str) -> None:
    import faust

    tansu_compat.apply_if_needed(KafkaSettings(bootstrap_servers=bootstrap, tansu_compat=mode))
    app = faust.App(app_id, broker=f"kafka://{bootstrap}", store="memory://", topic_partitions=PARTITIONS,
                    datadir=datadir, web_enabled=False, broker_session_timeout=6, broker_heartbeat_interval=1.5)
    table = app.Table(TABLE, default=None, partitions=PARTITIONS)
    source = app.topic(f"{app_id}-source", partitions=PARTITIONS)

    @app.agent(source)
    async def idle(stream):       # a table needs an agent on a co-partitioned topic to be assigned
        async for _ in stream:
            pass

    @app.task
    async def report():
        await app.tables.recovery.completed.wait()
        print(f"RECOVERED {len(table)}", flush=True)

    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    _recovery_worker(*sys.argv[1:5])
