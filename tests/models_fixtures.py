"""Tiny, hand-written data and a tiny randomly initialised BERT for the classifier's tests (CPU, seconds).

The tiny encoder uses the real all-MiniLM-L6-v2 tokenizer, so tokenization is the production path; only the
transformer is small. Nothing here reads the shared data set.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from models.data import MISSING, LabeledSet
from models.labels import SENTIMENTS, SENTIMENTS_BY_DATASET_ID, TOPICS

SENTIMENT_ROWS = [
    ("$ACME shares soar to a record after strong results", "bullish"),
    ("Stocks rally as profits jump and guidance is raised", "bullish"),
    ("$XYZ surges on upgrade, analysts see more gains", "bullish"),
    ("Shares plunge after the company misses estimates", "bearish"),
    ("$BAD tumbles as losses widen and the outlook is cut", "bearish"),
    ("Stock sinks on fraud probe and weak demand", "bearish"),
    ("Company schedules its annual meeting for May", "neutral"),
    ("$ABC to present at an industry conference next week", "neutral"),
    ("Firm files its quarterly report with the regulator", "neutral"),
]
TOPIC_ROWS = [
    ("Oil prices climb as OPEC cuts crude output https://t.co/abc123", "Energy | Oil"),
    ("Brent crude and WTI slip on rising inventories", "Energy | Oil"),
    ("Fed holds rates steady, Powell signals patience", "Fed | Central Banks"),
    ("ECB and the Fed weigh the next rate hike", "Fed | Central Banks"),
    ("Board declares a quarterly dividend of 50 cents", "Dividend"),
    ("Company raises its dividend and payout ratio", "Dividend"),
    ("CEO resigns; CFO named interim chief executive", "Personnel Change"),
    ("Bank appoints a new chairman and CFO", "Personnel Change"),
]

REPO = Path(__file__).resolve().parents[1]
# For the models CLI run as a subprocess: this checkout's packages, and no reach for the hub.
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def tiny_set() -> LabeledSet:
    texts = [t for t, _ in SENTIMENT_ROWS] + [t for t, _ in TOPIC_ROWS]
    sentiment = [SENTIMENTS.index(s) for _, s in SENTIMENT_ROWS] + [MISSING] * len(TOPIC_ROWS)
    topic = [MISSING] * len(SENTIMENT_ROWS) + [TOPICS.index(t) for _, t in TOPIC_ROWS]
    return LabeledSet(texts, np.array(topic), np.array(sentiment), ["tiny fixture"])


def write_tiny_csv(path: Path, repeat: int = 1) -> Path:
    """A user-format CSV (text, topic, sentiment as names) of the tiny set, ``repeat`` times: each copy numbered
    after its first word, so that no copy holds another whole (the split would keep such twins in one slice)."""
    import csv

    def numbered(text: str, copy: int) -> str:
        first, rest = text.split(" ", 1)
        return f"{first} ({copy}) {rest}" if copy else text
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "topic", "sentiment"])
        for copy in range(repeat):
            for text, label in SENTIMENT_ROWS:
                writer.writerow([numbered(text, copy), "", label])
            for text, label in TOPIC_ROWS:
                writer.writerow([numbered(text, copy), label, ""])
    return path


def make_tiny_base(out: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from models.modeling import default_base_model_dir
    config = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(default_base_model_dir())).save_pretrained(str(out))
    return out


def save_tiny_model(base: Path, out: Path) -> Path:
    """A FinPulse model directory over the tiny base, its heads drawn wide so that labels depend on the text."""
    import torch
    from models.modeling import FinPulseClassifier, save_model
    model = FinPulseClassifier.from_base(str(base), seed=5)
    torch.nn.init.normal_(model.topic_head.weight, std=0.5)
    torch.nn.init.normal_(model.sentiment_head.weight, std=0.5)
    save_model(model, str(base), out, base_model=str(base), recipe="test", max_length=48)
    return out


def make_model_copy(src: Path, dst: Path, created_at: str) -> Path:
    """A copy of the model directory ``src`` that says it was created at ``created_at``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["created_at"] = created_at
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def write_shared_layout(folder: Path) -> None:
    """The tiny fixture ten times over, written as the shared data directory's two text,label files."""
    rows = tiny_set()
    (folder / "sentiment_train.csv").write_text("text,label\n" + "".join(
        f'"{t} {i}",{SENTIMENTS_BY_DATASET_ID.index(SENTIMENTS[s])}\n'
        for i in range(10) for t, s in zip(rows.texts, rows.sentiment) if s >= 0))
    (folder / "topic_train.csv").write_text("text,label\n" + "".join(
        f'"{t} {i}",{k}\n' for i in range(10) for t, k in zip(rows.texts, rows.topic) if k >= 0))
