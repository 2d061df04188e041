"""``finpulse worker``: run the FinPulse Faust app (scoring, then whatever the other packages install).

Before Faust starts: every FinPulse topic is created (co-partitioning needs the configured partition count), the
scorer is loaded once (a trained model, else the keyword baseline, see ``models.interface.load_scorer``) and, when
the broker is the embedded tansu, ``stream.tansu_compat`` is applied. SIGTERM and Ctrl-C stop the worker cleanly:
Faust finishes the batch in hand, commits what was processed, and leaves the consumer group.
"""
from __future__ import annotations

import logging

from models.interface import load_scorer

from . import tansu_compat
from .config import Settings
from .topics import TopicNames, ensure_topics

log = logging.getLogger(__name__)


def prepare_app(settings: Settings):
    """Topics, scorer and broker compatibility, then the Faust app (``stream.app.create_app``)."""
    from .app import create_app

    kafka, worker = settings.kafka, settings.worker
    names = TopicNames(kafka.topic_prefix)
    ensure_topics(kafka, names.all(), names.compacted())
    scorer = load_scorer(worker.scorer, worker.model_dir or None, worker.device)
    if tansu_compat.apply_if_needed(kafka):
        log.info("broker is tansu: compatibility patch applied (see stream/tansu_compat.py)")
    return create_app(settings, scorer)


def run_worker(settings: Settings) -> int:
    import faust

    worker = settings.worker
    app = prepare_app(settings)
    print(f"FinPulse worker {worker.app_id}: Kafka {settings.kafka.bootstrap_servers}, topics "
          f"{settings.kafka.topic_prefix}.*; Ctrl-C or SIGTERM stops it", flush=True)
    faust_worker = faust.Worker(app, loglevel=worker.log_level.upper(), quiet=True)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
