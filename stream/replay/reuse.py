"""Scores reused from an earlier run (``finpulse replay --scores-from RUN``): threshold trials without re-scoring.

A threshold change ([aggregate] / [detect]) changes no score, and scoring is what a replay spends its time on. A
run with ``--scores-from`` reads its inputs as any replay does (same selection, same order, same parsing), but
takes each message's prediction from the source run's ``scored`` Parquet, by message id, instead of asking the
model. Messages the source has no score for (its warm-up, which a replay never writes; a wider range; a message it
dead-lettered) are scored by the model version the source used, so the outputs are those a full replay with that
model would write. The source's model must therefore be at hand when anything is missing: it is looked up by
version under ``[models] models_dir`` (or given with ``--model``), or is the baseline / no-op scorer by name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.parquet as pq

from models.interface import Prediction

from .plan import MANIFEST, ReplayError

PREDICTION_COLUMNS = ["id", "topic", "topic_confidence", "sentiment", "sentiment_score", "model_version"]


class ReusedScores:
    """Predictions by message id from a source run; ``predict`` fills the gaps with the model's own."""

    def __init__(self, source_run: str, model_version: str, predictions: dict[str, Prediction]):
        self.source_run = source_run
        self.model_version = model_version
        self.predictions = predictions

    @classmethod
    def load(cls, source_dir: Path, source_run: str) -> "ReusedScores":
        """The predictions in a finished run's directory; ``source_run`` names it in errors and the manifest
        (the run id the manifest gives wins)."""
        manifest_path = source_dir / MANIFEST
        if not manifest_path.exists():
            raise ReplayError(f"--scores-from {source_run}: no finished run in {source_dir} (no {MANIFEST}; "
                              "`finpulse runs` lists the runs)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ReplayError(f"--scores-from {source_run}: {manifest_path} is unreadable: {exc}") from None
        if manifest.get("scores_from"):
            # Its scores are another run's: reading them there keeps one source of truth per model version.
            raise ReplayError(f"--scores-from {source_run}: that run reused the scores of "
                              f"{manifest['scores_from']}; use --scores-from {manifest['scores_from']}")
        version, source_run = manifest.get("model_version") or "", manifest.get("run_id") or source_run
        predictions: dict[str, Prediction] = {}
        for name in sorted(f for f in manifest.get("files", []) if f.startswith("scored/")):
            table = pq.read_table(source_dir / name, columns=PREDICTION_COLUMNS)
            columns = table.to_pydict()
            if any(v != version for v in set(columns["model_version"])):
                raise ReplayError(f"--scores-from {source_run}: {name} holds scores of another model than its "
                                  f"manifest's {version}")
            for i, message_id in enumerate(columns["id"]):
                predictions[message_id] = Prediction(
                    topic=columns["topic"][i], topic_confidence=columns["topic_confidence"][i],
                    sentiment=columns["sentiment"][i], sentiment_score=columns["sentiment_score"][i])
        return cls(source_run, version, predictions)

    def predict(self, items: Sequence, score: Callable[[list[str]], list[Prediction]]) -> list[Prediction]:
        """One prediction per item (``InputItem``: ``id``, ``text``), in order: the source's, else ``score``'s."""
        found: list[Prediction | None] = [self.predictions.get(item.id) for item in items]
        missing = [i for i, prediction in enumerate(found) if prediction is None]
        if missing:
            for i, prediction in zip(missing, score([items[i].text for i in missing])):
                found[i] = prediction
        return found  # type: ignore[return-value]

    def covered(self, items: Sequence) -> int:
        """How many of ``items`` the source run has a prediction for."""
        return sum(item.id in self.predictions for item in items)
