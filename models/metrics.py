"""Classification metrics for one head: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

Plain numpy, so training (model selection) and ``finpulse evaluate`` (reports) compute the same numbers.
Macro-F1 averages over the classes that occur in the truth or the predictions (scikit-learn's default).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def head_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n_classes = len(labels)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_positive = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(true_positive, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros(n_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(n_classes), where=denominator > 0)
    present = (support > 0) | (predicted > 0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(true_positive.sum() / max(1, len(y_true))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {label: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                              "f1": round(float(f1[i]), 4), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "labels": list(labels),
        "confusion_matrix": confusion.tolist(),  # rows: true label, columns: predicted label, in ``labels`` order
    }


def accuracy_standard_error(rows: int, accuracy: float = 0.7) -> float:
    """How far an accuracy measured on ``rows`` texts may sit from the model's true one (one standard error of a
    binomial proportion, at the accuracies these probes show): 0.05 at 80 rows, 0.03 at 200."""
    return (accuracy * (1 - accuracy) / max(1, rows)) ** 0.5


def format_report(name: str, report: dict[str, Any]) -> str:
    """A human-readable block: headline numbers, per-class F1 and the confusion matrix."""
    labels = report["labels"]
    lines = [f"{name}: n={report['n']}  accuracy={report['accuracy']:.4f}  macro-F1={report['macro_f1']:.4f}"]
    if "ece" in report:
        lines[0] += (f"  mean confidence={report['mean_confidence']:.4f}  ECE={report['ece']:.4f}  "
                     f"NLL={report['nll']:.4f}")
    width = max(len(label) for label in labels)
    for label in labels:
        c = report["per_class"][label]
        lines.append(f"  {label:<{width}}  F1 {c['f1']:.3f}  P {c['precision']:.3f}  R {c['recall']:.3f}  n={c['support']}")
    lines.append("  confusion (rows true, columns predicted, in the order above):")
    cell = max(3, len(str(max(max(r) for r in report["confusion_matrix"]))))
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"  {label[:width]:<{width}} " + " ".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)


def headline(reports: dict[str, Any] | None) -> dict[str, float]:
    """``{head}_accuracy`` and ``{head}_macro_f1`` of each head's report, rounded, as far as the reports have them
    (a metrics.json read back may lack some)."""
    return {f"{head}_{metric}": round(report[metric], 4) for head, report in (reports or {}).items()
            if isinstance(report, dict) for metric in ("accuracy", "macro_f1") if metric in report}
