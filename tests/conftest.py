"""Shared fixtures: one real tansu broker per test session, and isolated topic names per test."""
from __future__ import annotations

import os
import uuid

import pytest

from stream.broker import EmbeddedBroker
from stream.config import Settings
from stream.topics import TopicNames, ensure_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log_file) as b:
        yield b


@pytest.fixture
def fp_settings(broker, tmp_path) -> Settings:
    """Settings pointing at the session broker, with a topic prefix and app id of this test's own,
    and every FinPulse topic created up front (4 partitions)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    raw = {
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 4, "topic_prefix": prefix},
        "worker": {"app_id": f"{prefix}-worker", "data_dir": str(tmp_path / "worker"), "scorer": "baseline",
                   "max_wait_s": 0.2},
    }
    settings = Settings(raw=raw)
    names = TopicNames(prefix)
    ensure_topics(settings.kafka, names.all(), names.compacted())
    return settings


@pytest.fixture
def topics(fp_settings) -> TopicNames:
    return TopicNames(fp_settings.kafka.topic_prefix)


@pytest.fixture(scope="session")
def artifacts_dir():
    path = os.environ.get("FINPULSE_ARTIFACTS", "artifacts")
    os.makedirs(path, exist_ok=True)
    return path
