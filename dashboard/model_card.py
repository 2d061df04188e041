"""The trained model's own account of itself, for the Model view: its directory (found the way the worker finds
it), its model card (README.md) and its evaluation (metrics.json), with every confusion matrix in it as a frame.

metrics.json is read defensively: any numeric leaf is a metric, and any ``confusion_matrix`` (a square list of
lists, under any head) is a matrix, labelled by a sibling ``labels`` list or by the head's known label set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from models.labels import SENTIMENTS, TOPICS


@dataclass(frozen=True)
class ModelCard:
    path: Path
    readme: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    problem: str = ""          # why metrics.json could not be read, if it could not

    @property
    def version(self) -> str:
        return str(self.metrics.get("model_version") or self.path.name)


def find_model(model_dir: str | None) -> Path | None:
    """The directory the worker would load, or None when no trained model is installed or found."""
    try:
        from models.registry import find_model_dir
    except ImportError:
        return None
    found = find_model_dir(model_dir or None)
    return Path(found) if found else None


def read_model_card(path: Path) -> ModelCard:
    readme_file, metrics_file = path / "README.md", path / "metrics.json"
    readme = readme_file.read_text(encoding="utf-8", errors="replace") if readme_file.is_file() else ""
    if not metrics_file.is_file():
        return ModelCard(path, readme, problem=f"{metrics_file} does not exist")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return ModelCard(path, readme, problem=f"{metrics_file} is not readable JSON: {exc}")
    if not isinstance(metrics, dict):
        return ModelCard(path, readme, problem=f"{metrics_file} is not a JSON object")
    return ModelCard(path, readme, metrics)


def metric_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Every numeric leaf outside confusion matrices, as (metric, value) with dotted paths."""
    rows: list[tuple[str, float]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if "confusion" not in str(name):
                    walk(value, f"{path}.{name}" if path else str(name))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            rows.append((path, float(node)))

    walk(metrics, "")
    return pd.DataFrame(rows, columns=["metric", "value"])


def _labels_for(head: str, size: int, given: Any) -> list[str]:
    if isinstance(given, list) and len(given) == size:
        return [str(g) for g in given]
    if size == len(SENTIMENTS) and "topic" not in head:
        return list(SENTIMENTS)
    if size == len(TOPICS):
        return list(TOPICS)
    return [str(i) for i in range(size)]


def confusion_matrices(metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """head name -> long frame (actual, predicted, count, share of the actual row)."""
    found: dict[str, pd.DataFrame] = {}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for name, value in node.items():
            if "confusion" in str(name) and _is_square(value):
                head = path or str(name).replace("confusion_matrix", "").strip("_") or "model"
                labels = _labels_for(head, len(value), node.get("labels"))
                found[head] = _long(value, labels)
            elif isinstance(value, dict):
                walk(value, f"{path}.{name}" if path else str(name))

    walk(metrics, "")
    return found


def _is_square(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0 and
            all(isinstance(row, list) and len(row) == len(value) for row in value))


def _long(matrix: list[list[Any]], labels: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(matrix, index=labels, columns=labels).apply(pd.to_numeric, errors="coerce").fillna(0)
    totals = frame.sum(axis=1).replace(0, 1)
    long = frame.stack().rename("count").reset_index()
    long.columns = ["actual", "predicted", "count"]
    long["share"] = long["count"] / long["actual"].map(totals)
    return long
