"""Temperature scaling: the fit finds a known temperature, the scorer applies the saved one, and
``finpulse calibrate`` saves a calibrated copy under its own version without changing a label."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.calibration import (expected_calibration_error, fit_temperature, negative_log_likelihood, rescale)
from models.modeling import FinPulseClassifier, ModelError, load_model, save_model
from models.scorer import BatchScorer
from tests.models_fixtures import make_tiny_base, write_tiny_csv

TEXTS = ["$ACME shares soar to a record after strong results", "Fed holds rates", "CEO resigns",
         "Shares plunge after the company misses estimates", "Board declares a quarterly dividend"]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def overconfident_sample(true_temperature: float, n: int = 6000, classes: int = 3, seed: int = 0):
    """Logits whose labels are drawn at ``true_temperature``: a model that reports softmax(logits) is
    overconfident by exactly that factor."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    truth = softmax(logits / true_temperature)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return softmax(logits).astype(np.float32), labels


@pytest.mark.parametrize("true_temperature", [0.7, 1.0, 2.0])
def test_fit_recovers_the_temperature_the_labels_were_drawn_at(true_temperature):
    probs, labels = overconfident_sample(true_temperature)
    assert fit_temperature(probs, labels) == pytest.approx(true_temperature, rel=0.1)


def test_rescaling_keeps_every_label_and_lowers_the_error_of_an_overconfident_model():
    probs, labels = overconfident_sample(2.0)
    scaled = rescale(probs, fit_temperature(probs, labels))
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert np.allclose(scaled.sum(1), 1.0, atol=1e-5)
    assert expected_calibration_error(scaled, labels) < expected_calibration_error(probs, labels) / 3
    assert negative_log_likelihood(scaled, labels) < negative_log_likelihood(probs, labels)
    assert rescale(np.zeros((2, 3), np.float32), 2.0).sum() == 0  # unscorable rows stay empty


def test_expected_calibration_error_by_hand():
    # Two bins: 0.9 confident and right half the time (gap 0.4), 0.6 confident and always right (gap 0.4).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, np.array([0, 1, 0, 0])) == pytest.approx(0.4)
    assert fit_temperature(probs, np.array([0, 1, 0, 0])) == 1.0  # too few rows to fit: left alone


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return str(make_tiny_base(tmp_path_factory.mktemp("tiny-bert")))


def tiny_model(tiny_base: str, out: Path, temperature: dict[str, float] | None = None) -> Path:
    model = FinPulseClassifier.from_base(tiny_base, seed=5)
    torch.nn.init.normal_(model.topic_head.weight, std=0.5)
    torch.nn.init.normal_(model.sentiment_head.weight, std=0.5)
    if temperature:
        model.temperature = temperature
    save_model(model, tiny_base, out, base_model=tiny_base, recipe="test", max_length=48)
    return out


def test_the_scorer_applies_the_saved_temperatures_and_the_version_names_them(tiny_base, tmp_path):
    plain = load_model(tiny_model(tiny_base, tmp_path / "plain"))
    warm = load_model(tiny_model(tiny_base, tmp_path / "warm", {"topic": 1.5, "sentiment": 3.0}))
    assert warm.model.temperature == {"topic": 1.5, "sentiment": 3.0}
    assert warm.version != plain.version  # same weights, other outputs: another version
    p_plain = BatchScorer(plain.model, plain.text_encoder, "p", device="cpu").probabilities(TEXTS)
    p_warm = BatchScorer(warm.model, warm.text_encoder, "w", device="cpu").probabilities(TEXTS)
    assert np.allclose(p_warm.topic, rescale(p_plain.topic, 1.5), atol=1e-5)
    assert np.allclose(p_warm.sentiment, rescale(p_plain.sentiment, 3.0), atol=1e-5)
    assert not np.allclose(p_warm.sentiment, p_plain.sentiment, atol=1e-3)


def test_a_bad_temperature_in_config_is_refused_on_load(tiny_base, tmp_path):
    model_dir = tiny_model(tiny_base, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["temperature"] = {"sentiment": -1}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="temperature must map topic and sentiment to positive numbers"):
        load_model(model_dir)


def test_finpulse_calibrate_saves_a_calibrated_copy_under_a_new_version(tiny_base, tmp_path, capsys):
    from models.cli import main
    models_root = tmp_path / "models"
    original = tiny_model(tiny_base, models_root / "original")
    (original / "README.md").write_text("# v\n\n## Data\n\nrows\n\n## Limits\n\n- The sentiment score is P(bullish) - "
                                        "P(bearish) from this model's softmax; it is not a calibrated probability.\n")
    data_file = write_tiny_csv(tmp_path / "labeled.csv", repeat=4)
    assert main(["calibrate", str(original), "--data", str(data_file), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sentiment: T=" in printed and "calibrated copy saved" in printed

    [copy] = [p for p in models_root.iterdir() if p != original]
    config = json.loads((copy / "config.json").read_text())
    old = json.loads((original / "config.json").read_text())
    assert copy.name == config["model_version"] != old["model_version"]
    assert config["calibrated_from"] == old["model_version"]
    assert config["temperature"]["sentiment"] != 1.0
    assert (copy / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()
    card = (copy / "README.md").read_text()
    assert card.index("## Calibration") < card.index("## Data") and "not a calibrated probability" not in card
    metrics = json.loads((copy / "metrics.json").read_text())
    fitted = metrics["calibration"]["measured"]["sentiment"]
    assert fitted["temperature"] == config["temperature"]["sentiment"]
    assert fitted["nll"]["after"] <= fitted["nll"]["before"]

    before = BatchScorer.from_pretrained(original, device="cpu").probabilities(TEXTS)
    after = BatchScorer.from_pretrained(copy, device="cpu").probabilities(TEXTS)
    assert (before.sentiment.argmax(1) == after.sentiment.argmax(1)).all()
    assert not np.allclose(before.sentiment, after.sentiment, atol=1e-3)

    # The same calibration again is the same version: refused, nothing overwritten.
    assert main(["calibrate", str(original), "--data", str(data_file), "--device", "cpu"]) == 2
    assert "saved before" in capsys.readouterr().err

    # The copy again, on rows labeled with a sentiment only (fewer than before, so another fit): the topic head keeps
    # its temperature (it was reset to 1.0, silently, changing every topic confidence).
    sentiment_only = tmp_path / "sentiment-only.csv"
    rows = [[row[0], row[2]] for row in csv.reader(data_file.open(newline="")) if row[2]][:26]
    with sentiment_only.open("w", newline="") as out:
        csv.writer(out).writerows(rows)
    assert rows[0] == ["text", "sentiment"]
    assert main(["calibrate", str(copy), "--data", str(sentiment_only), "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    topic_t = config["temperature"]["topic"]
    assert topic_t != 1.0 and (f"topic: 0 labeled row(s) here, fewer than the 20 a fit needs: its temperature "
                               f"stays {topic_t:g}") in printed, printed
    [again] = [p for p in tmp_path.iterdir() if p.name.startswith("finpulse-")]
    assert json.loads((again / "config.json").read_text())["temperature"]["topic"] == topic_t
