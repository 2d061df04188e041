"""The batched inference engine the worker calls: texts in, one ``Prediction`` per text out, in order.

How it stays fast:
- texts are sorted by length and cut into batches, each padded only to its own longest text (to a multiple of 8);
- the next batches are cleaned and tokenized while the device runs the current one: on a GPU by 4 worker
  processes with a cache of word-piece ids (``models.tokenizer_pool``: the host's CPU, not the GPU, limited the
  scorer; 0.22-0.38 of the raw forward rate tokenizing in a thread, 0.56-0.77 with the processes on an H100), on
  a CPU by one background thread (the native tokenizer spreads each batch over the cores the model also needs);
- on a GPU the token ids travel from pinned host memory with non-blocking copies, the forward runs under
  ``inference_mode`` with bf16 autocast, and the probabilities come back through a pinned buffer while the next
  batch is launched;
- a batch that runs the GPU out of memory is split in halves (and later batches are made smaller);
- on a CPU the model runs in the ``cpu_precision`` it is given (``models.precision``): float32 by default here;
  bf16 autocast, as on a GPU, about 3x faster on a CPU with AMX and float32's labels for 99.9% of texts (bf16 on
  a GPU gives the same held-out scores within a row or two: one news probe sentence of 400 came out differently
  for the H200's full model); or int8 (``models.quantization``: about 1.2x faster, float32's labels for 96-97% of
  texts, stamped on the version: ``<version>+int8``).

What it returns: each head's softmax at the temperature the model was calibrated to (``models.calibration``), so a
topic confidence of 0.9 is right about 9 times in 10 on text like the training data.

How it stays safe: a text that is not a string, is empty, or has nothing left after removing links gets a
``Prediction`` with ``error`` set; a batch that fails for any other reason is retried one text at a time, so one
bad text never fails its batch. Long texts are cut explicitly (``textprep.char_budget``) and then truncated to the
model's ``max_length`` tokens. ``score`` is serialised by a lock, so one scorer can be shared by threads.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .interface import INT8_SUFFIX, Prediction, failed, text_list
from .labels import SENTIMENTS, TOPICS
from .modeling import FinPulseClassifier, ModelError, TextEncoder, load_model
from .precision import BF16, FLOAT32, INT8, autocast, describe, effective
from .quantization import quantize_int8
from .tokenizer_pool import BrokenProcessPool, PendingIds, TokenizerPool, flat_ids

log = logging.getLogger(__name__)
N_TOPICS = len(TOPICS)
BULLISH, BEARISH = SENTIMENTS.index("bullish"), SENTIMENTS.index("bearish")
DEFAULT_BATCH = {"cuda": 512, "cpu": 64}
# Tokenizer processes on a GPU host: at most this many, and never all the cores (the scorer's own process needs
# two: one thread drives the GPU, one gathers and pads the ids). On a 16-core H100 host, batch 1024 x 64 tokens,
# end to end: 0 processes (native tokenizer in a thread) 29k seq/s; 4 processes 65k; 8 53k; 12 43k; more
# processes only compete with the scorer's own process for the CPU (4 of them tokenize ~100k texts/s).
MAX_TOKENIZER_PROCESSES = 4
NOTHING_LEFT = "no text left after removing links and whitespace"
# Batches tokenized ahead of the one on the device.
LOOKAHEAD = 3


def default_tokenizer_processes(device: torch.device) -> int:
    """Worker processes that tokenize for a scorer on ``device``: none on a CPU, where the model needs the cores."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_TOKENIZER_PROCESSES, (os.cpu_count() or 1) - 2))


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    return chosen


@dataclass
class Probabilities:
    topic: np.ndarray       # (n, 20) float32; zeros where ``errors[i]`` is set
    sentiment: np.ndarray   # (n, 3) float32, in SENTIMENTS order
    errors: list[str | None]

    def failed(self) -> np.ndarray:
        """True for the rows the scorer could not score."""
        return np.array([e is not None for e in self.errors], dtype=bool)

    def subset(self, rows: np.ndarray) -> "Probabilities":
        return Probabilities(self.topic[rows], self.sentiment[rows], [self.errors[i] for i in rows])


@dataclass
class _Tokenized:
    rows: list[int]          # positions in the caller's list, in batch order
    ids: torch.Tensor
    mask: torch.Tensor
    errors: dict[int, str]   # rows that had nothing left to score


class BatchScorer:
    """``Scorer`` implementation over a FinPulse model directory (see ``models.interface``)."""

    def __init__(self, model: FinPulseClassifier, text_encoder: TextEncoder, model_version: str,
                 device: str | torch.device = "auto", batch_size: int | None = None, cpu_precision: str = FLOAT32,
                 tokenizer_processes: int | None = None):
        """``cpu_precision``: float32, bf16 or int8 on a CPU (``models.precision``; a GPU runs bf16 autocast).
        ``tokenizer_processes``: worker processes that tokenize (0: a thread of this process tokenizes); by
        default ``default_tokenizer_processes(device)``."""
        self.device = pick_device(device)
        self.tokenizer_processes = (default_tokenizer_processes(self.device) if tokenizer_processes is None
                                    else tokenizer_processes)
        self._tokenizer_pool: TokenizerPool | None = None
        self.model_version = model_version
        self.text_encoder = text_encoder
        self.batch_size = batch_size or DEFAULT_BATCH[self.device.type]
        self.on_gpu = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if cpu_precision not in (FLOAT32, BF16, INT8) or cpu_precision == INT8 and self.on_gpu:
            raise ValueError(f"cpu precision {cpu_precision!r}: use {FLOAT32}, {BF16} or {INT8} (int8 only on a CPU)")
        if cpu_precision == INT8:
            model = quantize_int8(model)
            self.model_version = model_version + INT8_SUFFIX
        self.cpu_precision = cpu_precision
        self.model = model
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", batch_size: int | None = None,
                        cpu_precision: str = FLOAT32, tokenizer_processes: int | None = None) -> "BatchScorer":
        loaded = load_model(path)
        scorer = cls(loaded.model, loaded.text_encoder, loaded.version, device=device, batch_size=batch_size,
                     cpu_precision=cpu_precision, tokenizer_processes=tokenizer_processes)
        log.info("loaded model %s from %s (on %s)", loaded.version, path, scorer.runs_as)
        return scorer

    @property
    def runs_as(self) -> str:
        return describe(self.device, self.cpu_precision)

    @property
    def precision(self) -> str:
        """What the model computes in here: bf16 (autocast, on a GPU or as asked on a CPU), float32 or int8."""
        return effective(self.device, self.cpu_precision)

    # -- public API --------------------------------------------------------------------------------------------

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        probs = self.probabilities(texts)
        return predictions_from(probs)

    def probabilities(self, texts: Sequence[str]) -> Probabilities:
        texts = text_list(texts)
        with self._lock:
            return self._probabilities(texts)

    def close(self) -> None:
        """Stop the tokenizer processes (if any); the scorer still works, tokenizing in this process."""
        with self._lock:
            self._close_pool()
            self.tokenizer_processes = 0

    # -- engine -----------------------------------------------------------------------------------------------

    def _probabilities(self, texts: Sequence[str]) -> Probabilities:
        n = len(texts)
        out = np.zeros((n, N_TOPICS + len(SENTIMENTS)), dtype=np.float32)
        errors: list[str | None] = [None] * n
        scorable = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                errors[i] = f"not a text ({type(text).__name__})"
            elif not text or text.isspace():
                errors[i] = "empty text"
            else:
                scorable.append(i)
        # Similar lengths in one batch keep padding small; character length is a cheap, good enough proxy.
        scorable.sort(key=lambda i: len(texts[i]))
        chunks = [scorable[k:k + self.batch_size] for k in range(0, len(scorable), self.batch_size)]
        pending = None
        for chunk, tokenized in self._tokenized_chunks(texts, chunks):
            if isinstance(tokenized, Exception):
                self._one_by_one(texts, chunk, out, errors, tokenized)
                continue
            for row, reason in tokenized.errors.items():
                errors[row] = reason
            if not tokenized.rows:
                continue
            try:
                launched = self._launch(tokenized)
            except Exception as exc:  # noqa: BLE001 - any failure: isolate the bad text(s) one by one
                self._one_by_one(texts, tokenized.rows, out, errors, exc)
                continue
            if pending is not None:
                self._collect(pending, out)
            pending = launched
        if pending is not None:
            self._collect(pending, out)
        return Probabilities(out[:, :N_TOPICS], out[:, N_TOPICS:], errors)

    def _tokenized_chunks(self, texts, chunks) -> Iterator[tuple[list[int], _Tokenized | Exception]]:
        """Yield each chunk tokenized, in order, while the next chunks are being tokenized: by the tokenizer
        processes when there are some (a helper thread gathers and pads their ids), else by the helper thread."""
        budget = self.text_encoder.max_chars
        pool = self._pool()

        def start(chunk) -> PendingIds | None:
            if pool is None or self._tokenizer_pool is not pool:   # none, or it failed during this call
                return None
            try:
                return pool.submit([texts[i][:budget] for i in chunk])
            except (BrokenProcessPool, RuntimeError) as exc:       # RuntimeError: shut down meanwhile
                self._pool_failed(exc)
                return None

        def finish(chunk, pending: PendingIds | None):
            try:
                if pending is not None:
                    try:
                        return self._assemble(chunk, *pending.result())
                    except BrokenProcessPool as exc:
                        self._pool_failed(exc)
                return self._tokenize(texts, chunk)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, which isolates the bad text
                return exc

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finpulse-tokenize") as helper:
            ahead: deque = deque()
            next_chunk = 0
            for chunk in chunks:
                while next_chunk < len(chunks) and len(ahead) < LOOKAHEAD:
                    upcoming = chunks[next_chunk]
                    ahead.append(helper.submit(finish, upcoming, start(upcoming)))
                    next_chunk += 1
                yield chunk, ahead.popleft().result()

    def _pool(self) -> TokenizerPool | None:
        if self._tokenizer_pool is None and self.tokenizer_processes > 0:
            try:
                self._tokenizer_pool = TokenizerPool(self.text_encoder.tokenizer, self.tokenizer_processes)
            except (OSError, RuntimeError) as exc:
                self._pool_failed(exc)
                return None
            weakref.finalize(self, self._tokenizer_pool.close)
        return self._tokenizer_pool

    def _pool_failed(self, exc: BaseException) -> None:
        if self.tokenizer_processes:
            log.warning("tokenizer processes unavailable (%s: %s): tokenizing in the scorer's process from now on",
                        type(exc).__name__, exc)
        self.tokenizer_processes = 0
        self._close_pool()

    def _close_pool(self) -> None:
        pool, self._tokenizer_pool = self._tokenizer_pool, None
        if pool is not None:
            pool.close()

    def _tokenize(self, texts: Sequence[str], chunk: list[int]) -> _Tokenized:
        cut = [texts[i][:self.text_encoder.max_chars] for i in chunk]
        return self._assemble(chunk, *flat_ids(self.text_encoder.tokenizer, cut))

    def _assemble(self, chunk: list[int], flat: np.ndarray, lengths: np.ndarray) -> _Tokenized:
        """Padded id and mask tensors (pinned on a GPU) for the chunk's texts that have something left to read."""
        readable = lengths > self.text_encoder.special_tokens
        keep = readable.tolist()
        errors = {row: NOTHING_LEFT for row, ok in zip(chunk, keep) if not ok}
        rows = [row for row, ok in zip(chunk, keep) if ok]
        if not rows:
            return _Tokenized([], torch.empty(0), torch.empty(0), errors)
        if errors:
            flat, lengths = flat[np.repeat(readable, lengths)], lengths[readable]
        ids, mask = self.text_encoder.pad_flat(flat, lengths)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.on_gpu:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return _Tokenized(rows, ids_t, mask_t, errors)

    def _launch(self, tokenized: _Tokenized):
        ids = tokenized.ids.to(self.device, non_blocking=True)
        mask = tokenized.mask.to(self.device, non_blocking=True)
        probs = self._forward(ids, mask)
        if not self.on_gpu:
            return tokenized.rows, probs, None
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host.copy_(probs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return tokenized.rows, host, done

    @staticmethod
    def _collect(launched, out: np.ndarray) -> None:
        rows, host, done = launched
        if done is not None:
            done.synchronize()
        out[rows] = host.numpy()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmaxed (topic | sentiment) probabilities at the model's calibrated temperatures; halves the batch on
        GPU out-of-memory."""
        temperature = self.model.temperature
        try:
            with torch.inference_mode(), autocast(self.device, self.cpu_precision):
                topic_logits, sentiment_logits = self.model(ids, mask)
                return torch.cat([(topic_logits.float() / temperature["topic"]).softmax(-1),
                                  (sentiment_logits.float() / temperature["sentiment"]).softmax(-1)], dim=1)
        except torch.OutOfMemoryError:
            if len(ids) == 1:
                raise
        # Split outside the except block: the live exception's traceback would keep the failed attempt's
        # activations allocated, and every smaller attempt would run out of memory too.
        torch.cuda.empty_cache()
        half = len(ids) // 2
        if self.batch_size > half:
            log.warning("out of GPU memory at a batch of %d: splitting, and using batches of %d from now on",
                        len(ids), half)
            self.batch_size = half
        return torch.cat([self._forward(ids[:half], mask[:half]), self._forward(ids[half:], mask[half:])])

    def _one_by_one(self, texts, rows: list[int], out: np.ndarray, errors: list, cause: Exception) -> None:
        log.warning("a batch of %d failed (%s: %s): scoring its texts one by one", len(rows), type(cause).__name__, cause)
        for row in rows:
            try:
                tokenized = self._tokenize(texts, [row])
                if tokenized.errors:
                    errors[row] = tokenized.errors[row]
                    continue
                self._collect(self._launch(tokenized), out)
            except Exception as exc:  # noqa: BLE001 - this one text cannot be scored: say so, keep the rest
                errors[row] = f"cannot score: {type(exc).__name__}: {str(exc)[:200]}"


def predictions_from(probs: Probabilities) -> list[Prediction]:
    """Turn probabilities into Predictions: argmax labels, topic confidence, P(bullish) - P(bearish)."""
    n = len(probs.errors)
    topic_index = probs.topic.argmax(1)
    topic_conf = probs.topic[np.arange(n), topic_index].tolist()
    sentiment_index = probs.sentiment.argmax(1).tolist()
    score = (probs.sentiment[:, BULLISH] - probs.sentiment[:, BEARISH]).clip(-1.0, 1.0).tolist()
    topic_index = topic_index.tolist()
    return [failed(err) if err else Prediction(TOPICS[t], c, SENTIMENTS[s], sc)
            for t, c, s, sc, err in zip(topic_index, topic_conf, sentiment_index, score, probs.errors)]

