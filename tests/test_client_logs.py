"""The Kafka clients' logging: a broker outage shows as a few lines and a summary, not one line per retry."""
from __future__ import annotations

import logging
import time

from stream.client_logs import RepeatLimiter, tame_kafka_client_logs


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_repeats_of_a_kind_are_counted_and_summarised_once_their_window_ends():
    logger = logging.getLogger("finpulse-test.repeats")
    logger.propagate = False
    kept, limiter = Kept(), RepeatLimiter(window_s=0.4)
    logger.addHandler(kept)
    logger.addFilter(limiter)
    for attempt in range(50):      # aiokafka's retry loop: the same failure, with another port or node each time
        logger.error("Unable connect to node with id %d: Connect call failed ('127.0.0.1', %d)", 111, 40000 + attempt)
        if attempt % 10 == 0:
            logger.error("Unable to update metadata from [111]")
    assert kept.messages == ["Unable connect to node with id 111: Connect call failed ('127.0.0.1', 40000)",
                             "Unable to update metadata from [111]"]
    deadline = time.monotonic() + 5
    while len(kept.messages) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    summaries = sorted(kept.messages[2:])
    assert len(summaries) == 2, kept.messages
    assert summaries[0].startswith("Unable connect to node with id 111: Connect call failed ('127.0.0.1', 40000) "
                                   "(49 more like it in the last ") and summaries[0].endswith(" s, not shown)")
    assert summaries[1].startswith("Unable to update metadata from [111] (4 more like it in the last ")

    time.sleep(0.5)                # a window with no repeats: the kind starts afresh, its next record shown
    logger.error("Unable to update metadata from [112]")
    assert kept.messages[-1] == "Unable to update metadata from [112]"
    assert limiter.flush() == 0


def test_every_client_logger_gets_the_limiter_and_keeps_warning_as_its_floor():
    limiter = tame_kafka_client_logs()
    for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher",
                 "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender", "kafka.admin.client"):
        assert limiter in logging.getLogger(name).filters, name
    assert logging.getLogger("aiokafka").getEffectiveLevel() >= logging.WARNING
    assert tame_kafka_client_logs() is limiter and logging.getLogger("aiokafka.conn").filters.count(limiter) == 1


def test_a_summary_quotes_the_first_message_as_it_was_logged():
    class Connection:
        state = "open"

        def __repr__(self):
            return f"<Connection ({self.state})>"

    logger = logging.getLogger("finpulse-test.first-message")
    logger.propagate = False
    kept, limiter = Kept(), RepeatLimiter(window_s=60)
    logger.addHandler(kept)
    logger.addFilter(limiter)
    connection = Connection()
    logger.error("%r: socket disconnected", connection)
    logger.error("%r: socket disconnected", connection)
    connection.state = "closed"
    assert limiter.flush() == 1
    assert kept.messages == ["<Connection (open)>: socket disconnected",
                             "<Connection (open)>: socket disconnected (1 more like it in the last 0 s, not shown)"]
