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
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.parquet as pq

from models.interface import Prediction

from .plan import MANIFEST, ReplayError

PREDICTION_COLUMNS = ["id", "topic", "topic_confidence", "sentiment", "sentiment_score", "model_version"]
_FIELDS = ("topic", "topic_confidence", "sentiment", "sentiment_score")
_LOOKUP_CHUNK = 500         # ids per query: well under SQLite's limit on bound parameters


def _finished_run(version: str, *candidates: Path | None) -> Path | None:
    """The first of ``candidates`` that is a finished run scored by ``version``."""
    for directory in candidates:
        try:
            if directory is not None and json.loads((directory / MANIFEST).read_text()).get("model_version") == version:
                return directory
        except (OSError, ValueError, AttributeError):
            continue
    return None


class ReusedScores:
    """Predictions by message id from a source run; ``predict`` fills the gaps with the model's own.

    The source's predictions go into an index on disk (SQLite, in a temporary directory removed when the replay
    ends), not into memory: a month of input is as easy to reuse as an hour. Lookups come from the scoring thread
    and the event loop, one at a time."""

    def __init__(self, source_run: str, model_version: str, index: sqlite3.Connection, workdir=None,
                 source_dir: Path | None = None):
        self.source_run = source_run
        self.source_dir = source_dir    # where its Parquet is, for a later run that reuses this one's
        self.model_version = model_version
        self._index = index
        self._workdir = workdir         # a TemporaryDirectory: removed with this object
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source_dir: Path, source_run: str, out_root: Path | None = None) -> "ReusedScores":
        """The predictions in a finished run's directory; ``source_run`` names it in errors and the manifest
        (the run id the manifest gives wins). ``out_root`` is where runs are found by id ([replay] out_dir)."""
        manifest_path = source_dir / MANIFEST
        if not manifest_path.exists():
            raise ReplayError(f"--scores-from {source_run}: no finished run in {source_dir} (no {MANIFEST}; "
                              "`finpulse runs` lists the runs)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ReplayError(f"--scores-from {source_run}: {manifest_path} is unreadable: {exc}") from None
        version = manifest.get("model_version") or ""
        origin = manifest.get("scores_from")
        if origin:
            # Its scores are another run's: reading them there keeps one source of truth per model version. Once
            # that run is deleted, this run's Parquet is where its scores are left.
            recorded = manifest.get("scores_from_dir")
            found = _finished_run(version, Path(recorded) if recorded else None,
                                  out_root / origin if out_root else None)
            if found is not None:
                where = origin if out_root and found.resolve() == (out_root / origin).resolve() else found
                raise ReplayError(f"--scores-from {source_run}: that run reused the scores of {origin}; use "
                                  f"--scores-from {where}")
        source_run = manifest.get("run_id") or source_run
        workdir = tempfile.TemporaryDirectory(prefix="finpulse-scores-from-")
        index = sqlite3.connect(Path(workdir.name) / "scores.sqlite", check_same_thread=False)
        index.execute("PRAGMA journal_mode = OFF")     # a scratch index: rebuilt by the next run if need be
        index.execute("PRAGMA synchronous = OFF")
        index.execute("CREATE TABLE scores (id TEXT PRIMARY KEY, topic TEXT, topic_confidence REAL, sentiment TEXT, "
                      "sentiment_score REAL) WITHOUT ROWID")
        for name in sorted(f for f in manifest.get("files", []) if f.startswith("scored/")):
            for batch in pq.ParquetFile(source_dir / name).iter_batches(batch_size=65_536, columns=PREDICTION_COLUMNS):
                columns = batch.to_pydict()
                if any(v != version for v in set(columns["model_version"])):
                    raise ReplayError(f"--scores-from {source_run}: {name} holds scores of another model than its "
                                      f"manifest's {version}")
                index.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                                  zip(columns["id"], *(columns[field] for field in _FIELDS)))
        index.commit()
        return cls(source_run, version, index, workdir, source_dir.resolve())

    def _lookup(self, ids: Sequence[str]) -> dict[str, Prediction]:
        found: dict[str, Prediction] = {}
        with self._lock:
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                chunk = list(ids[start:start + _LOOKUP_CHUNK])
                rows = self._index.execute(f"SELECT id, {', '.join(_FIELDS)} FROM scores WHERE id IN "
                                           f"({', '.join('?' * len(chunk))})", chunk)
                for message_id, *values in rows:
                    found[message_id] = Prediction(**dict(zip(_FIELDS, values)))
        return found

    def predict(self, items: Sequence, score: Callable[[list[str]], list[Prediction]]) -> list[Prediction]:
        """One prediction per item (``InputItem``: ``id``, ``text``), in order: the source's, else ``score``'s."""
        known = self._lookup([item.id for item in items])
        found: list[Prediction | None] = [known.get(item.id) for item in items]
        missing = [i for i, prediction in enumerate(found) if prediction is None]
        if missing:
            for i, prediction in zip(missing, score([items[i].text for i in missing])):
                found[i] = prediction
        return found  # type: ignore[return-value]

    def covered(self, items: Sequence) -> int:
        """How many of ``items`` the source run has a prediction for."""
        known = self._lookup([item.id for item in items])
        return sum(item.id in known for item in items)
