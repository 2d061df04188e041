"""``finpulse worker``: run the FinPulse Faust app (scoring, then whatever the other packages install).

Before Faust starts: every FinPulse topic is created (co-partitioning needs the configured partition count), the
scorer is loaded once (a trained model, else the keyword baseline, see ``models.interface.load_scorer``) and, when
the broker is the embedded tansu, ``stream.tansu_compat`` is applied. SIGTERM and Ctrl-C stop the worker cleanly:
Faust finishes the batch in hand, commits what was processed, and leaves the consumer group. A stop that cannot
finish (the broker gone, so the batch in hand is never delivered) ends ``[worker] stop_timeout_s`` after the signal,
or at a second signal, without committing: exit code 70, and a restart scores that batch again.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

from models.interface import CPU_PRECISIONS, ModelError, Scorer, load_scorer
from models.settings import models_root

from . import tansu_compat
from .client_logs import tame_kafka_client_logs
from .config import ConfigError, Settings
from .kafka_security import describe
from .topics import TopicNames, ensure_topics

log = logging.getLogger(__name__)


def prepare_app(settings: Settings, scorer: Scorer | None = None, extensions: Sequence[str] | None = None):
    """Topics, scorer and broker compatibility, then the Faust app (``stream.app.create_app``; ``extensions``
    default to ``stream.app.EXTENSIONS``, the scorer to the one ``[worker]`` names)."""
    from .app import EXTENSIONS, create_app

    kafka, worker = settings.kafka, settings.worker
    tame_kafka_client_logs()
    names = TopicNames(kafka.topic_prefix)
    if worker.cpu_precision not in CPU_PRECISIONS:  # refused before anything touches Kafka
        raise ConfigError(f"[worker] cpu_precision = {worker.cpu_precision!r}: use one of "
                          f"{', '.join(CPU_PRECISIONS)}")
    from alerts.detect import DetectSettings, check_windows
    from .aggregate import AggregateSettings
    check_windows(settings.section("detect", DetectSettings),
                  (spec.size_s for spec in settings.section("aggregate", AggregateSettings).specs()))
    if scorer is None:
        try:
            scorer = load_scorer(worker.scorer, worker.model_dir or None, worker.device, models_root(settings),
                                 worker.tokenizer_processes, worker.cpu_precision)
        except (ValueError, FileNotFoundError, ModelError) as exc:   # int8 on "cuda", no GPU, no such model...
            raise ConfigError(str(exc)) from None
    ensure_topics(kafka, names.all(), names.compacted())
    if tansu_compat.apply_if_needed(kafka):
        log.info("broker is tansu: compatibility patch applied (see stream/tansu_compat.py)")
    return create_app(settings, scorer, EXTENSIONS if extensions is None else extensions)


def run_worker(settings: Settings, scorer: Scorer | None = None, extensions: Sequence[str] | None = None) -> int:
    """Run the worker until SIGTERM/Ctrl-C; returns the exit code. ``scorer``/``extensions`` as in ``prepare_app``
    (benchmarks run the scoring agent alone with ``extensions=()``)."""
    import faust

    worker = settings.worker
    app = prepare_app(settings, scorer, extensions)
    print(f"FinPulse worker {worker.app_id}: Kafka {settings.kafka.bootstrap_servers} ({describe(settings.kafka)}), "
          f"topics {settings.kafka.topic_prefix}.*; Ctrl-C or SIGTERM stops it", flush=True)
    faust_worker = bounded_stop_worker_class(faust.Worker)(app, loglevel=worker.log_level.upper(), quiet=True)
    faust_worker.stop_timeout_s = worker.stop_timeout_s
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def bounded_stop_worker_class(faust_worker_class: type) -> type:
    """Faust's ``Worker`` with a stop that ends (``[worker] stop_timeout_s``; see the module docstring). The timer is
    a thread, so it fires even while the event loop is stuck."""
    from .app import exit_without_commit

    class BoundedStopWorker(faust_worker_class):
        stop_timeout_s = 30.0

        def _schedule_shutdown(self, signal) -> None:
            if self._signal_stop_time:
                exit_without_commit(f"{signal.name} again while stopping")
            super()._schedule_shutdown(signal)
            log.info("stopping: the batch in hand goes to the broker first (at most %gs; %s again stops at once)",
                     self.stop_timeout_s, signal.name)
            overdue = threading.Timer(self.stop_timeout_s, exit_without_commit,
                                      [f"still stopping {self.stop_timeout_s:g}s after {signal.name} (is the broker "
                                       f"reachable?)"])
            overdue.daemon = True
            overdue.start()

    return BoundedStopWorker
