"""Held-out evaluation of a model, through the same scorer the worker uses.

``evaluate`` scores every text of a ``LabeledSet`` and reports each head on the rows that carry its label.
``heldout_test`` rebuilds the test slice a model was trained without, from its ``training_config.json`` (same
data files, checked by sha256, same split seed and fractions), so ``finpulse evaluate MODEL`` reports on data the
model never saw. A model whose slices were drawn before twins were kept together (``models.data.split``) is
scored on its slice less the twins of rows it was trained or selected on. ``add_intervals`` gives each figure
its bootstrap interval; ``compare_models`` sets two models side by side on the same rows (``evaluate --against``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import expected_calibration_error, negative_log_likelihood, scored_rows
from .data import (PARTS, SPLIT_SCHEME, SPLIT_SCHEME_BEFORE_TWINS, DataError, LabeledSet, fingerprint, load_data, split,
                   stratified_sample, without_twins_of)
from .explain import push_pairs, read_texts, strongest
from .labels import SENTIMENTS, TOPICS
from .metrics import NO_PREDICTION, bootstrap_intervals, head_report, paired_difference
from .scorer import BatchScorer, Probabilities

HEADS = {"topic": TOPICS, "sentiment": SENTIMENTS}


def labeled_predictions(probs: Probabilities, data: LabeledSet, head: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's true and predicted classes on the rows that carry its label. A row the scorer could not score
    is predicted ``NO_PREDICTION``: wrong, and no class's prediction (``models.metrics``)."""
    truth = getattr(data, head)
    rows = truth >= 0
    predicted = np.where(probs.failed(), NO_PREDICTION, getattr(probs, head).argmax(1))
    return truth[rows], predicted[rows]


def reports_from(probs: Probabilities, data: LabeledSet) -> dict[str, Any]:
    """One report per head with labeled rows (unscorable rows count as wrong)."""
    out: dict[str, Any] = {}
    failed = probs.failed()
    for head, labels in HEADS.items():
        rows = getattr(data, head) >= 0
        if not rows.any():
            continue
        report = head_report(*labeled_predictions(probs, data, head), labels)
        report["unscorable"] = int((failed & rows).sum())
        head_probs, scored_truth = scored_rows(probs, data, head)
        if len(scored_truth):  # how far the confidences can be trusted: see models.calibration
            report["mean_confidence"] = round(float(head_probs.max(1).mean()), 4)
            report["ece"] = round(expected_calibration_error(head_probs, scored_truth), 4)
            report["nll"] = round(negative_log_likelihood(head_probs, scored_truth), 4)
        out[head] = report
    return out


def add_intervals(reports: dict[str, Any], probs: Probabilities, data: LabeledSet) -> None:
    """Each head's 95% bootstrap intervals of accuracy and macro-F1 (``interval_95``): how far its figures could
    move on another sample of the same kind of text."""
    for head, report in reports.items():
        report["interval_95"] = bootstrap_intervals(*labeled_predictions(probs, data, head), len(HEADS[head]))


def rows_in_both(data: LabeledSet, other: LabeledSet) -> np.ndarray:
    """The positions of ``data``'s rows that ``other`` holds too (the same text and labels): where two models'
    held-out slices differ (another split, other data), the rows that both held out."""
    theirs = set(zip(other.texts, other.topic.tolist(), other.sentiment.tolist()))
    return np.array([i for i, row in enumerate(zip(data.texts, data.topic.tolist(), data.sentiment.tolist()))
                     if row in theirs], dtype=np.int64)


def compare_models(probs_a: Probabilities, probs_b: Probabilities, data: LabeledSet) -> dict[str, Any]:
    """Per head with labeled rows: model A against model B on the same rows (``metrics.paired_difference``)."""
    out = {}
    for head, labels in HEADS.items():
        if (getattr(data, head) >= 0).any():
            truth, predicted_a = labeled_predictions(probs_a, data, head)
            out[head] = paired_difference(truth, predicted_a, labeled_predictions(probs_b, data, head)[1], labels)
    return out


def format_comparison(compared: dict[str, Any]) -> str:
    lines = []
    for head, metrics in compared.items():
        for metric, c in metrics.items():
            low, high = c["interval"]
            lines.append(f"  {head} {metric.replace('_f1', '-F1')}: {c['a']:.4f} vs {c['b']:.4f}, "
                         f"{c['difference']:+.4f} ({low:+.4f} to {high:+.4f}): {c['verdict']}")
    return "\n".join(lines)


def evaluate(scorer: BatchScorer, data: LabeledSet) -> dict[str, Any]:
    return reports_from(scorer.probabilities(data.texts), data)


def float32_comparison(probs: Probabilities, exact: Probabilities, reports: dict[str, Any],
                       exact_reports: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per head: how often a model run in a lower precision (``probs``) gives float32's label (``exact``) over
    every text both scored, and both models' accuracy and macro-F1 on the labeled rows."""
    both = ~(probs.failed() | exact.failed())
    out = {}
    for head in reports:
        same = getattr(probs, head).argmax(1) == getattr(exact, head).argmax(1)
        out[head] = {"same_label": round(float(same[both].mean()) if both.any() else 0.0, 4),
                     "accuracy": reports[head]["accuracy"], "float32_accuracy": exact_reports[head]["accuracy"],
                     "macro_f1": reports[head]["macro_f1"], "float32_macro_f1": exact_reports[head]["macro_f1"]}
    return out


def confident_mistakes(probs: Probabilities, data: LabeledSet, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Per head, up to ``limit`` wrongly predicted rows, the most confident first: where to look for label noise,
    wording the model has not met, or a class it over-predicts. Unscorable rows are listed with their error. Each
    names the ``file`` and ``line`` it was read from, where one is known, so that a wrong label can be mended there."""
    out: dict[str, list[dict[str, Any]]] = {}
    failed = probs.failed()
    for head, labels in HEADS.items():
        truth = getattr(data, head)
        if not (truth >= 0).any():
            continue
        probabilities = getattr(probs, head)
        predicted = probabilities.argmax(1)
        wrong = np.flatnonzero((truth >= 0) & ((predicted != truth) | failed))
        confidence = np.where(failed[wrong], np.inf, probabilities[wrong, predicted[wrong]])
        out[head] = [{**({"file": data.file[i], "line": int(data.line[i])} if data.line[i] else {}),
                      "text": data.texts[i], "label": labels[truth[i]],
                      "predicted": None if failed[i] else labels[predicted[i]],
                      "confidence": None if failed[i] else round(float(probabilities[i, predicted[i]]), 4),
                      **({"error": probs.errors[i]} if failed[i] else {})}
                     for i in wrong[np.argsort(-confidence, kind="stable")][:limit]]
    return out


def add_pushes(scorer, mistakes: dict[str, list[dict[str, Any]]]) -> None:
    """Give each listed mistake its ``words``: each word with its push toward what was predicted (``models.explain``;
    for the sentiment head the sentiment score's push, for the topic head the predicted topic's)."""
    for head, listed in mistakes.items():
        for mistake, reading in zip(listed, read_texts(scorer, [m["text"] for m in listed])):
            mistake["words"] = push_pairs(reading.words, head)


def format_mistakes(head: str, mistakes: list[dict[str, Any]], width: int = 100) -> str:
    lines = [f"{head}: " + ("no mistakes" if not mistakes else "the most confident mistake" if len(mistakes) == 1 else
                            f"the {len(mistakes)} most confident mistakes") + " (label -> predicted, confidence)"]
    for m in mistakes:
        text = " ".join(m["text"].split())
        text = text if len(text) <= width else text[:width - 1] + "…"
        verdict = f"{m['predicted']} {m['confidence']:.2f}" if m["predicted"] else f"unscorable: {m['error']}"
        lines.append(f"  {m['label']} -> {verdict}  | {text}")
        if m.get("file"):
            lines.append(f"      at {m['file']}:{m['line']}")
        if m.get("words") and m["predicted"]:
            lines.append(f"      pushed by: {strongest(m['words'])}")
    return "\n".join(lines)


def reports_by_source(probs: Probabilities, data: LabeledSet, specs: list[str]) -> dict[str, Any]:
    """The reports on each --data source's rows alone (``data.origin``: the position in ``specs``): a model trained
    on tweets and news is measured on its tweets as a tweets-only model is (each source is split on its own)."""
    by_source = {}
    for origin, spec in enumerate(specs):
        rows = np.flatnonzero(data.origin == origin)
        by_source[spec] = reports_from(probs.subset(rows), data.subset(rows))
    return by_source


def format_source_reports(spec: str, reports: dict[str, Any]) -> str:
    return f"  of which {spec}: " + ", ".join(f"{head} acc {r['accuracy']:.4f} F1 {r['macro_f1']:.4f} (n={r['n']})"
                                             for head, r in reports.items())


def selection_score(reports: dict[str, Any]) -> float:
    """Model selection: the mean macro-F1 over the heads that were evaluated."""
    scores = [reports[h]["macro_f1"] for h in HEADS if h in reports]
    return float(np.mean(scores)) if scores else 0.0


def heldout_test(model_dir: Path, data_dir: Path, which: str = "test", whole_slice: bool = False) -> LabeledSet:
    """The ``which`` slice (test or val) of the data the model in ``model_dir`` was trained on. For the test slice,
    the rows its model card's figures were measured on: the stratified sample of them a recipe with a
    ``report_limit`` scored (the quick recipe: 1,000), unless ``whole_slice``."""
    config_path = model_dir / "training_config.json"
    if not config_path.is_file():
        raise DataError(f"{model_dir} has no training_config.json: pass --data FILE to evaluate on your own data")
    config = json.loads(config_path.read_text())
    if config.get("refit_of"):
        raise DataError(f"{model_dir.name} was trained on every labeled row (a refit of {config['refit_of']}): no "
                        f"slice of its data was held out, and its held-out figures are {config['refit_of']}'s. "
                        "Pass --data with text it never saw (news-probe, or a labeled file of yours)")
    data_cfg = config["data"]
    specs = data_cfg["specs"]
    recorded = data_cfg.get("sha256", {})
    current = fingerprint(specs, data_dir)
    if recorded and recorded != current:
        changed = sorted(name for name in {**recorded, **current} if recorded.get(name) != current.get(name))
        raise DataError(f"{', '.join(changed)} of the training data ({', '.join(specs)}; the shared sets read from "
                        f"{data_dir}) differ from what {model_dir.name} was trained on (sha256): its held-out slice "
                        f"cannot be rebuilt; pass --data FILE instead")
    # A single source's slices were the same under every scheme before twins were kept together.
    scheme = data_cfg.get("split", SPLIT_SCHEME_BEFORE_TWINS if len(specs) == 1 else None)
    if scheme not in (SPLIT_SCHEME, SPLIT_SCHEME_BEFORE_TWINS):
        raise DataError(f"{model_dir.name} was trained on several sources before FinPulse split each source on its "
                        "own: its held-out slice cannot be rebuilt; pass --data FILE instead")
    data = load_data(specs, data_dir)
    parts = split(data, data_cfg["test_fraction"], data_cfg["val_fraction"], data_cfg["split_seed"],
                  twins_together=scheme == SPLIT_SCHEME)
    rows, note = parts[which], ""
    if scheme == SPLIT_SCHEME_BEFORE_TWINS:
        # Its training rows held twins of some of these: scoring them would score text the model trained on.
        rows = without_twins_of(data, rows, np.concatenate([parts[p] for p in PARTS[:PARTS.index(which)]]))
        note = (f"; {len(parts[which]) - len(rows)} of its {len(parts[which])} rows left out: twins of rows it was "
                "trained or selected on")
    recipe = config.get("recipe") or {}
    limit, seed = recipe.get("report_limit", 0), (recipe.get("fit") or {}).get("seed")
    if which == "test" and limit and len(rows) > limit and seed is not None and not whole_slice:
        # The rows the model card reports on, so that evaluating the model gives its card's figures.
        total = len(rows)
        rows = stratified_sample(data, rows, limit, seed)
        note += f"; the stratified sample of {len(rows)} of its {total} rows its model card reports (--whole-slice: all)"
    sliced = data.subset(rows)
    sliced.sources = [f"{which} slice of {', '.join(specs)} (seed {data_cfg['split_seed']}{note})"]
    return sliced
