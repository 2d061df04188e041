"""The trained model's own account of itself, for the Model view: its directory (found the way the worker finds
it), its model card (README.md) and its evaluation (metrics.json), with every confusion matrix in it as a frame.

metrics.json is read defensively: a head's report is any mapping with a square ``confusion_matrix`` (rows true,
columns predicted), labelled by its ``labels`` list or by the head's known label set; the held-out ``test``
section is preferred when there is one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from models.labels import SENTIMENTS, TOPICS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    path: Path
    readme: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    problem: str = ""          # why metrics.json could not be read, if it could not

    @property
    def version(self) -> str:
        return str(self.metrics.get("model_version") or self.path.name)


def find_model(model_dir: str | None, models_dir: str | None = None) -> Path | None:
    """The directory the worker would load, or None when no trained model is installed or found."""
    try:
        from models.registry import find_model_dir
    except ImportError:
        return None
    try:
        found = find_model_dir(model_dir or None, *([models_dir] if models_dir else []))
    except Exception as exc:  # a configured directory that is not a model: the view says no model, the log why
        log.warning("no usable model directory for the Model view: %s", exc)
        return None
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


def head_reports(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every per-head report (a mapping with a square ``confusion_matrix``), named by its path; when the held-out
    ``test`` section has reports, only those (named by head alone)."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if _is_square(node.get("confusion_matrix")):
            found[path or "model"] = node
            return
        for name, value in node.items():
            walk(value, f"{path}.{name}" if path else str(name))

    walk(metrics, "")
    test = {name[len("test."):]: report for name, report in found.items() if name.startswith("test.")}
    return test or found


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_table(reports: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per head: its scalar numbers (accuracy, macro_f1, n, …), a figure with a 95% interval followed by
    it ("accuracy 95%": "0.783-0.831")."""
    rows = []
    for head, report in reports.items():
        row: dict[str, Any] = {"head": head}
        for key, value in _numbers(report).items():
            row[key] = value
            interval = (report.get("interval_95") or {}).get(key)
            if isinstance(interval, list) and len(interval) == 2:
                row[f"{key} 95%"] = f"{interval[0]:.3f}-{interval[1]:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_table(reports: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = [{"head": head, "class": label, **_numbers(values)}
            for head, report in reports.items() if isinstance(report.get("per_class"), dict)
            for label, values in report["per_class"].items() if isinstance(values, dict)]
    return pd.DataFrame(rows)


def confusion_matrices(reports: dict[str, dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """head -> long frame (actual, predicted, count, share of the actual row)."""
    return {head: _long(report["confusion_matrix"],
                        _labels_for(head, len(report["confusion_matrix"]), report.get("labels")))
            for head, report in reports.items()}


def _labels_for(head: str, size: int, given: Any) -> list[str]:
    if isinstance(given, list) and len(given) == size:
        return [str(g) for g in given]
    if size == len(SENTIMENTS) and "topic" not in head:
        return list(SENTIMENTS)
    if size == len(TOPICS):
        return list(TOPICS)
    return [str(i) for i in range(size)]


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
