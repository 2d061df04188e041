"""Temperature scaling: make each head's softmax confidences mean what they say.

A fine-tuned classifier is overconfident: the full recipe's sentiment head gives its top class 0.95 on average and
is right 0.87 of the time on held-out tweets. Dividing a head's logits by one temperature T > 1, fitted on the
validation slice by minimising the negative log-likelihood (Guo et al., 2017), fixes most of that without changing
any label: argmax is unchanged, so accuracy and F1 stay exactly as they were. What changes is what users read off
the probabilities: the topic confidence, and the sentiment score P(bullish) - P(bearish) that trends and alerts
average.

The temperatures live in the model's ``config.json`` (``temperature``: one per head); the scorer applies them.
Training fits them on its validation slice; ``finpulse calibrate`` fits them for a model already trained (on its
validation slice, or on labeled text of the kind it will read) and saves a calibrated copy under a new version, so
every scored record still names exactly what produced it. The scorer's probabilities are all this module needs: ``log p`` equals the logits up to a per-row constant, which
softmax ignores, so ``softmax(log p / T)`` is the logits' softmax at temperature T.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .data import LabeledSet
from .modeling import CONFIG_FILE, NEUTRAL_TEMPERATURE, WEIGHTS_FILE, make_version, read_config, write_json
from .scorer import Probabilities

HEADS = tuple(NEUTRAL_TEMPERATURE)
# T is searched on a log grid, then refined around the best point; outside this range the fit is surely wrong
# (too few rows, or a head that predicts one class for everything).
T_RANGE = (0.25, 8.0)
ECE_BINS = 15
# Probabilities that underflowed to 0 in float32: their log is clipped here (far below any logit gap that matters).
LOG_FLOOR = -80.0
MIN_ROWS = 20


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities the same logits would give at ``temperature`` (rows of zeros stay zeros)."""
    if temperature == 1.0:
        return probs
    logits = np.maximum(np.log(np.maximum(probs, 1e-38)), LOG_FLOOR) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    scaled /= scaled.sum(axis=1, keepdims=True)
    return np.where(probs.sum(axis=1, keepdims=True) > 0, scaled, 0.0).astype(probs.dtype)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.maximum(np.log(np.maximum(picked, 1e-38)), LOG_FLOOR).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the rows in each bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in ``T_RANGE`` that minimises the negative log-likelihood of ``labels`` (1.0 with too few rows)."""
    if len(labels) < MIN_ROWS:
        return 1.0

    def loss(t: float) -> float:
        return negative_log_likelihood(rescale(probs, t), labels)

    grid = np.geomspace(*T_RANGE, 41)
    best = grid[int(np.argmin([loss(t) for t in grid]))]
    fine = np.geomspace(best / 1.1, best * 1.1, 41)
    return round(float(fine[int(np.argmin([loss(t) for t in fine]))]), 4)


def scored_rows(probs: Probabilities, data: LabeledSet, head: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's probabilities and labels on the rows that carry a label and were scored."""
    truth = getattr(data, head)
    rows = (truth >= 0) & ~probs.failed()
    return getattr(probs, head)[rows], truth[rows]


def fit_temperatures(probs: Probabilities, data: LabeledSet,
                     keep: dict[str, float] | None = None) -> dict[str, float]:
    """One temperature per head, fitted on ``data`` (the validation slice), from probabilities scored at T = 1. A
    head with fewer than ``MIN_ROWS`` labeled rows in ``data`` keeps its temperature in ``keep`` (1.0 without): a
    file labeled for one head says nothing of the other's."""
    fitted = {}
    for head in HEADS:
        head_probs, labels = scored_rows(probs, data, head)
        fitted[head] = fit_temperature(head_probs, labels) if len(labels) >= MIN_ROWS else (keep or {}).get(head, 1.0)
    return fitted


def calibrated(probs: Probabilities, temperatures: dict[str, float]) -> Probabilities:
    return Probabilities(rescale(probs.topic, temperatures["topic"]),
                         rescale(probs.sentiment, temperatures["sentiment"]), probs.errors)


def calibration_report(raw: Probabilities, data: LabeledSet, temperatures: dict[str, float]) -> dict[str, Any]:
    """Per head: the temperature and, on ``data``, confidence, accuracy, ECE and NLL before and after it."""
    out: dict[str, Any] = {}
    for head in HEADS:
        probs, labels = scored_rows(raw, data, head)
        if not len(labels):
            continue
        scaled = rescale(probs, temperatures[head])
        out[head] = {
            "temperature": temperatures[head], "n": int(len(labels)),
            "accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
            "mean_confidence": {"before": round(float(probs.max(1).mean()), 4),
                                "after": round(float(scaled.max(1).mean()), 4)},
            "ece": {"before": round(expected_calibration_error(probs, labels), 4),
                    "after": round(expected_calibration_error(scaled, labels), 4)},
            "nll": {"before": round(negative_log_likelihood(probs, labels), 4),
                    "after": round(negative_log_likelihood(scaled, labels), 4)},
        }
    return out


def format_calibration(report: dict[str, Any]) -> str:
    lines = []
    for head, r in report.items():
        lines.append(f"{head}: T={r['temperature']:.2f}  mean confidence {r['mean_confidence']['before']:.3f} -> "
                     f"{r['mean_confidence']['after']:.3f} (accuracy {r['accuracy']:.3f})  ECE "
                     f"{r['ece']['before']:.3f} -> {r['ece']['after']:.3f}  NLL {r['nll']['before']:.3f} -> "
                     f"{r['nll']['after']:.3f}  (n={r['n']})")
    return "\n".join(lines)


def calibration_section(calibration: dict[str, Any]) -> str:
    """The model card's account of its temperatures, fitted on one slice and checked on another."""
    rows = "\n".join(
        f"| {head} | {r['temperature']:.2f} | {r['accuracy']:.3f} | {r['mean_confidence']['before']:.3f} → "
        f"{r['mean_confidence']['after']:.3f} | {r['ece']['before']:.3f} → {r['ece']['after']:.3f} | "
        f"{r['nll']['before']:.3f} → {r['nll']['after']:.3f} |" for head, r in calibration["measured"].items())
    return f"""## Calibration

Each head's logits are divided by a temperature that minimises the negative log-likelihood (NLL) of the
{calibration['fitted_on']} (`temperature` in `config.json`; the scorer applies it). No label changes; on the
{calibration['measured_on']}, before → after (ECE: expected calibration error, {ECE_BINS} confidence bins):

| head | temperature | accuracy | mean confidence | ECE | NLL |
|---|---|---|---|---|---|
{rows}
"""


SCORE_LIMIT = ("- The sentiment score is P(bullish) - P(bearish) at the calibrated temperatures (see \"Calibration\"):\n"
               "  calibrated on held-out tweets; on other text `finpulse evaluate MODEL --data FILE` reports its ECE.")
UNCALIBRATED_LIMIT = ("- The sentiment score is P(bullish) - P(bearish) from this model's softmax; it is not a calibrated "
                      "probability.")
CARD_SECTION = re.compile(r"## Calibration\n.*?(?=^## |\Z)", re.S | re.M)


def save_calibrated(model_dir: Path, temperature: dict[str, float], calibration: dict[str, Any],
                    test_reports: dict[str, Any] | None, models_root: Path) -> tuple[Path, str]:
    """Copy ``model_dir`` with these temperatures under a new version (weights untouched); returns (dir, version).

    ``test_reports``: the held-out reports at the new temperatures, where the calibration was measured on the
    model's own test slice (they replace the old ones in metrics.json)."""
    config = read_config(model_dir)
    old_version, recipe = config["model_version"], config["recipe"]
    short_name = old_version.removeprefix("finpulse-").rsplit(f"-{recipe}-", 1)[0]
    when = dt.datetime.now(dt.timezone.utc)
    version = make_version(short_name, recipe, model_dir / WEIGHTS_FILE, when, temperature)
    if version == old_version or (models_root / version).exists():
        raise FileExistsError(f"{models_root / version} exists already: this calibration was saved before")
    tmp_dir = models_root / f".incomplete-{version}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.copytree(model_dir, tmp_dir)
    (tmp_dir / WEIGHTS_FILE).chmod(0o644)   # a model saved before its weights were made readable (0600) too
    config.update(model_version=version, created_at=when.isoformat(timespec="seconds"),
                  temperature=dict(temperature), calibrated_from=old_version)
    write_json(tmp_dir / CONFIG_FILE, config)
    metrics_file = tmp_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics.update(model_version=version, calibration=calibration)
    if test_reports:
        metrics["test"] = test_reports
    write_json(metrics_file, metrics)
    card_file = tmp_dir / "README.md"
    card = card_file.read_text() if card_file.is_file() else f"# {version}\n"
    card = CARD_SECTION.sub("", card.replace(old_version, version)).replace(UNCALIBRATED_LIMIT, SCORE_LIMIT)
    section = calibration_section(calibration) + f"\nCalibrated copy of `{old_version}` (same weights).\n\n"
    card = card.replace("## Data\n", section + "## Data\n", 1) if "## Data\n" in card else card + "\n" + section
    card_file.write_text(card)
    final_dir = models_root / version
    tmp_dir.rename(final_dir)
    return final_dir, version
