"""The batched inference engine the worker calls: texts in, one ``Prediction`` per text out, in order.

How it stays fast:
- texts are sorted by length and cut into batches, each padded only to its own longest text (to a multiple of 8);
- texts are tokenized by ``PieceTokenizer``: the tokenizer's own ids, from a cache of whitespace-separated pieces
  (3.5-4x less CPU than the native tokenizer on 2 cores, single-threaded: 1024 64-token headlines in ~20 ms
  instead of ~90 ms; 1024 tweet-length texts in ~8 ms instead of ~30 ms);
- a background thread tokenizes the next batches while the device runs the current one; on a GPU the
  token ids travel from pinned host memory with non-blocking copies, the forward runs under ``inference_mode``
  with bf16 autocast, and the probabilities come back through a pinned buffer while the next batch is launched;
- a batch that runs the GPU out of memory is split in halves (and later batches are made smaller);
- on a CPU the model runs in float32 (the same held-out scores as bf16 on a GPU), or with ``quantize="int8"``
  (dynamic quantization of the linear layers: about 1.3-1.5x faster, the same labels for about 96% of texts).

How it stays safe: a text that is not a string, is empty, or has nothing left after removing links gets a
``Prediction`` with ``error`` set; a batch that fails for any other reason is retried one text at a time, so one
bad text never fails its batch. Long texts are cut explicitly (``textprep.char_budget``) and then truncated to the
model's ``max_length`` tokens. ``score`` is serialised by a lock, so one scorer can be shared by threads.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .interface import Prediction, failed
from .labels import SENTIMENTS, TOPICS
from .modeling import FinPulseClassifier, TextEncoder, load_model
from .textprep import ENTITIES, LINK_PATTERN

log = logging.getLogger(__name__)
N_TOPICS = len(TOPICS)
BULLISH, BEARISH = SENTIMENTS.index("bullish"), SENTIMENTS.index("bearish")
DEFAULT_BATCH = {"cuda": 512, "cpu": 64}
# Threads tokenizing ahead of the device. One is enough. With the native tokenizer (which spreads each batch over
# every core) an H100 host scored 28k/26k/26k texts/s with 1/2/4 threads: ~22-25 ms of tokenizing per 1024 texts
# against ~10 ms of forward. ``PieceTokenizer`` is mostly Python (GIL-bound, so more threads do not help either)
# but needs ~20 ms per 1024 64-token texts on ONE core of a 2-core CPU box, leaving the other cores free (its
# effect on the H100 ratio is not measured yet: run `python -m tests.bench scorer`).
TOKENIZER_THREADS = 1


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    return chosen


@dataclass
class Probabilities:
    topic: np.ndarray       # (n, 20) float32; zeros where ``errors[i]`` is set
    sentiment: np.ndarray   # (n, 3) float32, in SENTIMENTS order
    errors: list[str | None]


@dataclass
class _Tokenized:
    rows: list[int]          # positions in the caller's list, in batch order
    ids: torch.Tensor
    mask: torch.Tensor
    errors: dict[int, str]   # rows that had nothing left to score


class BatchScorer:
    """``Scorer`` implementation over a FinPulse model directory (see ``models.interface``)."""

    def __init__(self, model: FinPulseClassifier, text_encoder: TextEncoder, model_version: str,
                 device: str | torch.device = "auto", batch_size: int | None = None, quantize: str | None = None,
                 tokenizer_threads: int = TOKENIZER_THREADS):
        self.device = pick_device(device)
        self.tokenizer_threads = tokenizer_threads
        self.model_version = model_version
        self.text_encoder = text_encoder
        # The same ids as ``text_encoder.ids`` for much less CPU (None: a tokenizer it does not know; the native path)
        self.piece_tokenizer = PieceTokenizer.for_encoder(text_encoder)
        self.batch_size = batch_size or DEFAULT_BATCH[self.device.type]
        self.on_gpu = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if quantize:
            if quantize != "int8" or self.on_gpu:
                raise ValueError("quantize='int8' is the only quantization, and only on the CPU")
            with warnings.catch_warnings():  # torch announces a future move of this API on every call
                warnings.simplefilter("ignore", UserWarning)
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.quantized = bool(quantize)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", batch_size: int | None = None,
                        quantize: str | None = None) -> "BatchScorer":
        loaded = load_model(path)
        log.info("loaded model %s from %s", loaded.version, path)
        return cls(loaded.model, loaded.text_encoder, loaded.version, device=device, batch_size=batch_size,
                   quantize=quantize)

    # -- public API --------------------------------------------------------------------------------------------

    def score(self, texts: Sequence[str]) -> list[Prediction]:
        probs = self.probabilities(texts)
        return predictions_from(probs)

    def probabilities(self, texts: Sequence[str]) -> Probabilities:
        with self._lock:
            return self._probabilities(texts)

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
        """Yield each chunk tokenized; with several chunks a background thread works ahead of the device."""
        def job(chunk):
            try:
                return self._tokenize(texts, chunk)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, which isolates the bad text
                return exc

        if len(chunks) <= 1:
            for chunk in chunks:
                yield chunk, job(chunk)
            return
        with ThreadPoolExecutor(max_workers=self.tokenizer_threads, thread_name_prefix="finpulse-tokenize") as pool:
            ahead: deque = deque()
            next_chunk = 0
            for chunk in chunks:
                while next_chunk < len(chunks) and len(ahead) < self.tokenizer_threads + 2:
                    ahead.append(pool.submit(job, chunks[next_chunk]))
                    next_chunk += 1
                yield chunk, ahead.popleft().result()

    def _tokenize(self, texts: Sequence[str], chunk: list[int]) -> _Tokenized:
        encode = self.piece_tokenizer.ids if self.piece_tokenizer is not None else self.text_encoder.ids
        id_lists = encode([texts[i] for i in chunk])
        specials = self.text_encoder.special_tokens
        rows, kept, errors = [], [], {}
        for row, ids in zip(chunk, id_lists):
            if len(ids) > specials:
                rows.append(row)
                kept.append(ids)
            else:
                errors[row] = "no text left after removing links and whitespace"
        if not rows:
            return _Tokenized([], torch.empty(0), torch.empty(0), errors)
        ids, mask = self.text_encoder.pad(kept)
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
        """Softmaxed (topic | sentiment) probabilities; halves the batch on GPU out-of-memory."""
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_gpu):
                topic_logits, sentiment_logits = self.model(ids, mask)
                return torch.cat([topic_logits.float().softmax(-1), sentiment_logits.float().softmax(-1)], dim=1)
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


class PieceTokenizer:
    """Token ids for texts, identical to ``TextEncoder.ids``, for a fraction of its CPU time.

    The native tokenizer spends ~150 us of CPU on a 400-character text (its normalizer and pre-tokenizer track
    character alignments as they go), while a stream repeats the same words all day. For the BERT-style
    tokenizers FinPulse uses (the clean-up of ``textprep.with_cleanup``, then ``BertNormalizer``,
    ``BertPreTokenizer`` and ``WordPiece``) every step after link removal is local to one whitespace-separated
    piece of a plain-ASCII text: entities, words and punctuation hold no whitespace. So links are removed from the
    whole text with the same pattern, and a text's ids are its pieces' ids, concatenated, cut to the truncation
    length and wrapped in the special tokens. The ids of a piece come from the same native tokenizer (the new
    pieces of a batch in one call) and are cached. Texts that are not plain ASCII, hold control characters other
    than tab and newlines, or hold an added token (``[SEP]``) go through ``TextEncoder.ids`` unchanged.

    ``for_encoder`` returns None for any other tokenizer, or when a self-check on sample texts finds a difference.
    """

    CACHE_LIMIT = 1 << 19  # pieces; the cache starts afresh when full (a few tens of MB at most)
    _CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
    _LINK = re.compile(LINK_PATTERN)
    PROBES = (
        "$AAPL shares rise after earnings beat https://t.co/abc123 &amp; more",
        "Oil &amp;&amp; gas: &lt;b&gt;up&lt;/b&gt; &quot;big&quot; rally's &#39;on&#39; &apos;x&apos; a&nbsp;b",
        "x&nbsp;http://t.co/y after www.example.com/a?b=c, HTTP://UPPER.case and(https://inside) end",
        "https://only.a/link", "&amp;amp; &amp;lt;", "CamelCase ALLCAPS don't U.S. 3.5% $12.50 @user #tag _x_ ~`|^",
        "tab\tnew\nline\r\nend  ", "a" * 150 + " " + "supercalifragilistic" * 3, "",
    )

    def __init__(self, encoder: TextEncoder, prefix: list[int], suffix: list[int], added_contents: list[str]):
        from tokenizers import Tokenizer
        self.encoder = encoder
        self.prefix, self.suffix = prefix, suffix
        self._added = re.compile("|".join(map(re.escape, added_contents))) if added_contents else None
        self._added_firsts = "".join({t[0] for t in added_contents})
        self._piece_tokenizer = Tokenizer.from_str(encoder.tokenizer.to_str())
        self._piece_tokenizer.no_truncation()
        self._piece_tokenizer.no_padding()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_encoder(cls, encoder: TextEncoder) -> "PieceTokenizer | None":
        spec = json.loads(encoder.tokenizer.to_str())
        normalizer = spec.get("normalizer") or {}
        steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
        cleanup = [({"Regex": LINK_PATTERN}, " ")] + [({"String": k}, v) for k, v in ENTITIES.items()]
        replaces = [(s.get("pattern"), s.get("content")) for s in steps[:-1] if s.get("type") == "Replace"]
        added_tokens = spec.get("added_tokens") or []
        if (replaces not in ([], cleanup) or len(replaces) != len(steps) - 1
                or steps[-1].get("type") != "BertNormalizer"
                or (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
                or spec["model"].get("type") != "WordPiece"
                or any(t.get("normalized") or not t["content"] or any(c.isspace() for c in t["content"])
                       for t in added_tokens)):
            return None
        tokenizer = encoder.tokenizer
        empty = tokenizer.encode("").ids
        with_specials = tokenizer.encode("probe").ids
        body = tokenizer.encode("probe", add_special_tokens=False).ids
        cut = next((i for i in range(len(with_specials)) if with_specials[i:i + len(body)] == body), None)
        if cut is None or with_specials[:cut] + with_specials[cut + len(body):] != empty:
            return None
        fast = cls(encoder, with_specials[:cut], with_specials[cut + len(body):], [t["content"] for t in added_tokens])
        probes = list(cls.PROBES)
        if fast.ids(probes) != encoder.ids(probes):
            log.warning("the cached-piece tokenizer disagrees with the tokenizer on sample texts: not using it")
            return None
        fast._cache = {}
        return fast

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.encoder.tokenizer
        truncation = tokenizer.truncation  # read each time: a caller may change it (the GPU benchmark does)
        if tokenizer.padding is not None or (truncation and truncation.get("direction", "right").lower() != "right"):
            return self.encoder.ids(texts)
        keep = truncation["max_length"] - len(self.prefix) - len(self.suffix) if truncation else None
        if keep is not None and keep < 0:
            return self.encoder.ids(texts)
        if len(self._cache) > self.CACHE_LIMIT:
            self._cache = {}  # a new dict: a thread still holding the old one keeps using it safely
        budget, cache, control, link = self.encoder.max_chars, self._cache, self._CONTROL, self._LINK
        added, firsts = self._added, self._added_firsts
        out: list = [None] * len(texts)
        slow, unknown = [], []

        def assemble(i: int, parts: list) -> None:
            flat = list(itertools.chain.from_iterable(parts))
            if keep is not None and len(flat) > keep:
                del flat[keep:]
            out[i] = self.prefix + flat + self.suffix

        for i, text in enumerate(texts):
            text = text[:budget]
            if (not text.isascii() or (not text.isprintable() and control.search(text))
                    or (added is not None and any(c in text for c in firsts) and added.search(text))):
                slow.append(i)
                continue
            if "http" in text or "www." in text:
                text = link.sub(" ", text)  # the tokenizer's first clean-up step, on the whole text
            pieces = text.split()
            parts = list(map(cache.get, pieces))
            if None in parts:
                unknown.append((i, pieces))
            else:
                assemble(i, parts)
        if unknown:
            new = list({p for _, pieces in unknown for p in pieces if p not in cache})
            encoded = self._piece_tokenizer.encode_batch_fast(new, add_special_tokens=False)
            cache.update(zip(new, (e.ids for e in encoded)))
            for i, pieces in unknown:
                assemble(i, [cache[p] for p in pieces])
        if slow:
            for i, ids in zip(slow, self.encoder.ids([texts[i] for i in slow])):
                out[i] = ids
        return out


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

