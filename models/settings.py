"""The ``[models]`` settings section (``FINPULSE_MODELS__<KEY>`` in the environment): where training reads data
and writes models. Command-line flags override these."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSettings:
    # Directory with sentiment_train.csv and topic_train.csv ("": $FINPULSE_DATA_DIR, else ../shared/data/finance).
    data_dir: str = ""
    # Trained models (one directory per version); the worker loads the newest one from here.
    models_dir: str = "var/models"
    # Per-run training state (checkpoints, teachers), for --resume.
    runs_dir: str = "var/runs"
    # Keep a run's checkpoints once its model is saved (they only serve --resume; 215 MB a quick run, 1.2 GB
    # a full one with two teachers). Removed by default, all but a note naming the model.
    keep_run_state: bool = False
    # "" means the bundled all-MiniLM-L6-v2; any local directory or hub id of a BERT-family encoder works.
    base_model: str = ""
    device: str = "auto"
    # Training on a CPU (models.precision): "float32" (the same run again ends in the very same model, and so does
    # one interrupted and resumed on one thread; on more, now and then a few bits off); "bf16" autocast (1.5x faster with AMX, the same held-out scores, but now and then a
    # few bits off); "auto" = bf16 where the CPU has bfloat16 instructions.
    cpu_precision: str = "float32"


def models_root(settings) -> str:
    """Where trained models live, from ``[models] models_dir``: every loader of "the newest model" looks there."""
    return settings.section("models", ModelSettings).models_dir
