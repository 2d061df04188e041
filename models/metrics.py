"""Classification metrics for one head: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

Plain numpy, so training (model selection) and ``finpulse evaluate`` (reports) compute the same numbers.
Macro-F1 averages over the classes that occur in the truth or the predictions (scikit-learn's default).
A prediction of ``NO_PREDICTION`` (a row the scorer could not score) is wrong, and a prediction of no class: it
lowers accuracy and its true class's recall, and no class's precision.
How far to trust a figure is a bootstrap over the rows: ``bootstrap_intervals`` for one model's figures,
``paired_difference`` for two models scored on the same rows.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

NO_PREDICTION = -1


def head_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n_classes = len(labels)
    scored = y_pred != NO_PREDICTION
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true[scored], y_pred[scored]), 1)
    true_positive = np.diag(confusion).astype(float)
    support = np.bincount(y_true, minlength=n_classes)
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
        **({"unscored_by_class": {label: int(n) for label, n in zip(labels, support - confusion.sum(axis=1)) if n}}
           if not scored.all() else {}),        # rows of each class that got no prediction, outside the matrix
    }


BOOTSTRAP_ROUNDS = 2000
_INDICES_AT_ONCE = 4_000_000    # resampled row indices held at once: memory stays flat on a file of any size


def resampled_scores(y_true: np.ndarray, predictions: Sequence[np.ndarray], n_classes: int,
                     rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Accuracy and macro-F1 of each model's ``predictions`` on ``rounds`` resamples of the rows (with replacement,
    seeded): ``head_report``'s figures (F1 = 2 TP / (support + predicted), over the classes present in the
    resample's truth or predictions), one per resample. Every model is scored on the same resamples, so two models
    are compared pair by pair: the rows both get right or both get wrong cancel out, and a real difference shows
    with far fewer rows than two separate intervals would need to part."""
    y_true = np.asarray(y_true, dtype=np.int64)
    predictions = [np.asarray(p, dtype=np.int64) for p in predictions]
    rows = len(y_true)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _INDICES_AT_ONCE // max(1, rows))
    chunks: list[list[dict[str, np.ndarray]]] = []
    for done in range(0, rounds, per_chunk):
        draws = rng.integers(0, max(1, rows), size=(min(per_chunk, rounds - done), rows))
        offset = np.arange(len(draws))[:, None] * n_classes + y_true[draws]
        # One column more than there are classes, for the rows without a prediction.
        chunks.append([_scores_of((offset * (n_classes + 1) + np.where(p == NO_PREDICTION, n_classes, p)[draws])
                                  .ravel(), len(draws), rows, n_classes) for p in predictions])
    return [{metric: np.concatenate([chunk[model][metric] for chunk in chunks]) for metric in ("accuracy", "macro_f1")}
            for model in range(len(predictions))]


def _scores_of(cells: np.ndarray, rounds: int, rows: int, n_classes: int) -> dict[str, np.ndarray]:
    """Each round's figures from its cells: (round, true class, predicted class or ``n_classes`` for none)."""
    confusion = np.bincount(cells, minlength=rounds * n_classes * (n_classes + 1)).reshape(
        rounds, n_classes, n_classes + 1)
    hits = np.diagonal(confusion[:, :, :n_classes], axis1=1, axis2=2)
    either = confusion.sum(axis=2) + confusion[:, :, :n_classes].sum(axis=1)     # support + predicted, per class
    f1 = np.divide(2 * hits, either, out=np.zeros(hits.shape), where=either > 0)
    present = either > 0
    return {"accuracy": hits.sum(axis=1) / max(1, rows),
            "macro_f1": (f1 * present).sum(axis=1) / np.maximum(1, present.sum(axis=1))}


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` share of ``values`` (a percentile bootstrap interval), rounded."""
    tail = (1 - level) / 2 * 100
    return [round(float(np.percentile(values, tail)), 4), round(float(np.percentile(values, 100 - tail)), 4)]


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, list[float]]:
    """95% intervals of accuracy and macro-F1 over resamples of these rows: how far the figures could move on
    another sample of the same kind of text (neither label noise nor training's randomness is in them)."""
    [scores] = resampled_scores(y_true, [y_pred], n_classes)
    return {metric: interval(values) for metric, values in scores.items()}


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                      labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model A minus model B on the same rows, per metric: both figures, the difference, its 95% paired bootstrap
    interval, the share of resamples in which A scores higher, and a verdict: a model is ahead only when the
    interval leaves 0 out."""
    a, b = resampled_scores(y_true, [pred_a, pred_b], len(labels))
    report_a, report_b = head_report(y_true, pred_a, labels), head_report(y_true, pred_b, labels)
    out = {}
    for metric in ("accuracy", "macro_f1"):
        low, high = interval(a[metric] - b[metric])
        out[metric] = {"a": round(report_a[metric], 4), "b": round(report_b[metric], 4),
                       "difference": round(report_a[metric] - report_b[metric], 4), "interval": [low, high],
                       "a_higher_share": round(float((a[metric] > b[metric]).mean()), 4),
                       "verdict": "A ahead" if low > 0 else "B ahead" if high < 0 else "no clear difference"}
    return out


def format_report(name: str, report: dict[str, Any]) -> str:
    """A human-readable block: headline numbers, per-class F1 and the confusion matrix."""
    labels = report["labels"]
    within = {metric: f" (95% {low:.3f}-{high:.3f})" for metric, (low, high) in report.get("interval_95", {}).items()}
    lines = [f"{name}: n={report['n']}  accuracy={report['accuracy']:.4f}{within.get('accuracy', '')}  "
             f"macro-F1={report['macro_f1']:.4f}{within.get('macro_f1', '')}"]
    if "ece" in report:
        lines[0] += (f"  mean confidence={report['mean_confidence']:.4f}  ECE={report['ece']:.4f}  "
                     f"NLL={report['nll']:.4f}")
    width = max(len(label) for label in labels)
    predicted = [sum(column) for column in zip(*report["confusion_matrix"])]
    for label, times_predicted in zip(labels, predicted):
        c = report["per_class"][label]
        if not c["support"] and not times_predicted:    # 0.000 read as a failure; macro-F1 leaves it out
            lines.append(f"  {label:<{width}}  -         (neither in these rows nor predicted)")
            continue
        lines.append(f"  {label:<{width}}  F1 {c['f1']:.3f}  P {c['precision']:.3f}  R {c['recall']:.3f}  n={c['support']}")
    lines.append("  confusion (rows true, columns predicted, in the order above):")
    cell = max(3, len(str(max(max(r) for r in report["confusion_matrix"]))))
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"  {label[:width]:<{width}} " + " ".join(f"{v:>{cell}d}" for v in row))
    unscored = report.get("unscored_by_class")
    if unscored:
        lines.append(f"  {sum(unscored.values())} row(s) could not be scored: counted wrong, outside the matrix ("
                     + ", ".join(f"{label} {n}" for label, n in unscored.items()) + ")")
    return "\n".join(lines)


def headline(reports: dict[str, Any] | None) -> dict[str, float]:
    """``{head}_accuracy`` and ``{head}_macro_f1`` of each head's report, rounded, as far as the reports have them
    (a metrics.json read back may lack some)."""
    return {f"{head}_{metric}": round(report[metric], 4) for head, report in (reports or {}).items()
            if isinstance(report, dict) for metric in ("accuracy", "macro_f1") if metric in report}
