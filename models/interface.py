"""The contract between the classifier and the rest of FinPulse.

A ``Scorer`` turns a batch of texts into one ``Prediction`` per text, in order. It never raises for one bad text:
that item's prediction carries ``error`` and the caller dead-letters it. ``load_scorer`` picks the implementation
from settings: a trained model directory (newest first), the keyword baseline, or the no-op scorer used by
benchmarks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from . import precision

log = logging.getLogger(__name__)
# The choices of [worker] cpu_precision and the --cpu-precision flags (models.precision says what each does).
CPU_PRECISIONS = precision.CPU_PRECISIONS
# [worker] scorer settings under which the worker loads no model (so there is none to ask or to list as its own).
SCORERS_WITHOUT_A_MODEL = ("baseline", "noop")

# Appended to the model version on every record an int8 scorer stamps: its labels can differ from float32's.
INT8_SUFFIX = "+int8"


def base_version(model_version: str) -> str:
    """The trained model behind a version stamp: ``...+int8`` is the same model, scored in other arithmetic."""
    return model_version.removesuffix(INT8_SUFFIX)


class ModelError(RuntimeError):
    """A base model, saved model or device that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Prediction:
    """One text's scores. One that could not be scored has ``error`` set and placeholders elsewhere (no topic,
    neutral, 0.0): filter on ``ok`` before averaging scores."""
    topic: str
    topic_confidence: float
    sentiment: str            # bearish | neutral | bullish
    sentiment_score: float    # P(bullish) - P(bearish), in [-1, 1]
    error: str | None = None  # set when this one text could not be scored

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Scorer(Protocol):
    model_version: str

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        """Score a batch. Blocking and CPU/GPU-bound: the worker calls it from a thread, never the event loop."""
        ...


def text_list(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, taken by position: a pandas Series is indexed by its labels, which a sort or a filter
    leaves out of order or with gaps. One string is refused: scored as a sequence, each character is a text."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"score a list of texts, not one {type(texts).__name__} (its every character would be scored "
                        f"as a text): score([text])")
    return list(texts)


def failed(reason: str) -> Prediction:
    return Prediction(topic="", topic_confidence=0.0, sentiment="neutral", sentiment_score=0.0, error=reason)


def runs_on(scorer: Scorer) -> tuple[str, str]:
    """(device, precision) a scorer computes on, e.g. ("cpu", "bf16"); ("-", "-") for one that runs no model (the
    keyword baseline, the no-op scorer)."""
    return str(getattr(scorer, "device", "-")), getattr(scorer, "precision", "-")


def load_scorer(kind: str = "auto", model_dir: str | None = None, device: str = "auto",
                models_root: str | None = None, tokenizer_processes: int = -1, cpu_precision: str = "auto") -> Scorer:
    """``kind``: "auto" (a trained model if one is found, else the baseline), "model", "baseline" or "noop".
    Without ``model_dir`` the newest model under ``models_root`` (``[models] models_dir``) is used.
    ``tokenizer_processes``: processes that tokenize for a model scorer (-1: the scorer's default).
    ``cpu_precision``: how a model scorer computes on a CPU (``models.precision``): "auto" (bf16 where the CPU
    has bfloat16 instructions, else float32), "float32", "bf16" or "int8" (device "auto" means the CPU then)."""
    if kind == "noop":
        from .baseline import NoopScorer
        return NoopScorer()
    if kind == "baseline":
        from .baseline import KeywordBaselineScorer
        return KeywordBaselineScorer()
    if kind not in ("auto", "model"):
        raise ValueError(f"unknown scorer {kind!r}: use auto, model, baseline or noop")
    try:
        from .registry import find_model_dir
        from .scorer import BatchScorer
    except ImportError:  # the fine-tuned model's code is not installed in this build
        if kind == "model":
            raise
        find_model_dir = None
    roots = [models_root] if models_root else []
    path = find_model_dir(model_dir, *roots) if find_model_dir else None
    if path is None:
        from .registry import no_model_found
        if kind == "model" or model_dir:
            raise FileNotFoundError(no_model_found(*roots))
        from .baseline import KeywordBaselineScorer
        log.warning("%s. Scoring with the keyword baseline meanwhile (model_version %s)", no_model_found(*roots),
                    KeywordBaselineScorer.model_version)
        return KeywordBaselineScorer()
    cpu_precision = precision.resolve_cpu_precision(cpu_precision)
    if cpu_precision == precision.INT8 and device == "auto":
        device = "cpu"
    return BatchScorer.from_pretrained(path, device=device, cpu_precision=cpu_precision,
                                       tokenizer_processes=None if tokenizer_processes < 0 else tokenizer_processes)
