"""Tokenization in worker processes, so a GPU scorer is fed as fast as the device reads.

On a GPU host tokenizing is the scorer's bottleneck. Measured on an H100 host (16 cores): the native tokenizer
needs ~290 us of CPU per 64-token text (~3.5k texts/s per core), so even spread over every core (in one call, or
in 12 processes) it reached only ~35-42k texts/s, against ~100k/s for the model's forward pass. Two things fix it:
- ``PieceTokenizer``: the tokenizer's own ids for a fraction of the CPU, from a cache of whitespace-separated
  pieces (a stream repeats the same words all day);
- worker processes, each tokenizing its own slice of a batch: they scale with the cores, are not held back by
  the GIL, and leave the scorer's process (which drives the GPU) free.
Each process runs the scorer's own tokenizer (the same JSON, clean-up and truncation included), single-threaded.

The processes are spawned (never forked: the parent holds CUDA state and threads). As with any ``multiprocessing``
user, a script that scores on a GPU must start from an ``if __name__ == "__main__":`` guard: a spawned process
imports the parent's main module. Without the guard the processes fail to start and the scorer, after a warning,
tokenizes in its own process. The ``finpulse`` commands are guarded.

This module imports no torch: a spawned worker starts in well under a second.
"""
from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import re
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

import numpy as np

from .parent_watch import exit_with_parent
from .textprep import ENTITIES, LINK_PATTERN

log = logging.getLogger(__name__)
# Texts per task: small enough that every process gets work from one batch, large enough that the hand-off
# (pickling the texts there and the ids back, ~0.1 ms) stays small next to tokenizing them (~10-20 ms).
TEXTS_PER_TASK = 128

_tokenizer = None   # the worker process's tokenizer
_pieces = None      # ... and its PieceTokenizer, when the tokenizer is one it knows


def native_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts)]


def flat_ids(tokenizer, texts: Sequence[str], pieces: "PieceTokenizer | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(every text's ids one after the other, the number of ids per text), as int64 arrays."""
    return flatten(pieces.ids(texts) if pieces is not None else native_ids(tokenizer, texts))


def flatten(id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(the lists' ids one after the other, the length of each list), as int64 arrays: what ``pad_flat`` takes."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _start_worker(tokenizer_json: str, parent_pid: int) -> None:
    # One thread per process: the processes are the parallelism (the native thread pool would oversubscribe).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    exit_with_parent(parent_pid)
    from tokenizers import Tokenizer
    global _tokenizer, _pieces
    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _pieces = PieceTokenizer.for_tokenizer(_tokenizer)


def _encode(texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    truncation = _tokenizer.truncation
    if truncation is None or truncation["max_length"] != max_length:
        _tokenizer.enable_truncation(max_length)
    return flat_ids(_tokenizer, texts, _pieces)


class PieceTokenizer:
    """Token ids for texts, identical to the tokenizer's own, for a fraction of its CPU time.

    The native tokenizer spends ~150-290 us of CPU on a 400-character text (its normalizer and pre-tokenizer
    track character alignments as they go), while a stream repeats the same words all day. For the BERT-style
    tokenizers FinPulse uses (the clean-up of ``textprep.with_cleanup``, then ``BertNormalizer``,
    ``BertPreTokenizer`` and ``WordPiece``) every step after link removal is local to one whitespace-separated
    piece of a plain-ASCII text: entities, words and punctuation hold no whitespace. So links are removed from the
    whole text with the same pattern, and a text's ids are its pieces' ids, concatenated, cut to the truncation
    length and wrapped in the special tokens. The ids of a piece come from the same native tokenizer (the new
    pieces of a batch in one call) and are cached. Texts that are not plain ASCII, hold control characters other
    than tab and newlines, or hold an added token (``[SEP]``) go to the native tokenizer unchanged.

    ``for_tokenizer`` returns None for any other tokenizer, or when a self-check on sample texts finds a difference.
    Not thread-safe: one per process (the tokenizer processes each have their own).
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

    def __init__(self, tokenizer, prefix: list[int], suffix: list[int], added_contents: list[str]):
        from tokenizers import Tokenizer
        self.tokenizer = tokenizer
        self.prefix, self.suffix = prefix, suffix
        self._added = re.compile("|".join(map(re.escape, added_contents))) if added_contents else None
        self._added_firsts = "".join({t[0] for t in added_contents})
        self._piece_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._piece_tokenizer.no_truncation()
        self._piece_tokenizer.no_padding()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "PieceTokenizer | None":
        spec = json.loads(tokenizer.to_str())
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
        empty = tokenizer.encode("").ids
        with_specials = tokenizer.encode("probe").ids
        body = tokenizer.encode("probe", add_special_tokens=False).ids
        cut = next((i for i in range(len(with_specials)) if with_specials[i:i + len(body)] == body), None)
        if cut is None or with_specials[:cut] + with_specials[cut + len(body):] != empty:
            return None
        fast = cls(tokenizer, with_specials[:cut], with_specials[cut + len(body):],
                   [t["content"] for t in added_tokens])
        probes = list(cls.PROBES)
        if fast.ids(probes) != native_ids(tokenizer, probes):
            log.warning("the cached-piece tokenizer disagrees with the tokenizer on sample texts: not using it")
            return None
        fast._cache = {}
        return fast

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.tokenizer
        truncation = tokenizer.truncation  # read each time: a caller may change it (the GPU benchmark does)
        if tokenizer.padding is not None or (truncation and truncation.get("direction", "right").lower() != "right"):
            return native_ids(tokenizer, texts)
        keep = truncation["max_length"] - len(self.prefix) - len(self.suffix) if truncation else None
        if keep is not None and keep < 0:
            return native_ids(tokenizer, texts)
        if len(self._cache) > self.CACHE_LIMIT:
            self._cache = {}
        cache, control, link = self._cache, self._CONTROL, self._LINK
        added, firsts = self._added, self._added_firsts
        out: list = [None] * len(texts)
        slow, unknown = [], []

        def assemble(i: int, parts: list) -> None:
            flat = list(itertools.chain.from_iterable(parts))
            if keep is not None and len(flat) > keep:
                del flat[keep:]
            out[i] = self.prefix + flat + self.suffix

        for i, text in enumerate(texts):
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
            for i, ids in zip(slow, native_ids(tokenizer, [texts[i] for i in slow])):
                out[i] = ids
        return out


class PendingIds:
    """The ids of one batch, being tokenized by the pool; ``result()`` waits and joins the slices in order."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [future.result() for future in self.futures]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class TokenizerPool:
    """``processes`` worker processes running a copy of ``tokenizer`` (a ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer, processes: int):
        self.tokenizer = tokenizer
        self.processes = processes
        # spawn, not fork: the parent holds CUDA state and threads that a forked child must not inherit.
        self._executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(tokenizer.to_str(), os.getpid()))

    def submit(self, texts: Sequence[str]) -> PendingIds:
        """Start tokenizing ``texts`` (already cut to the character budget) in slices across the processes."""
        max_length = (self.tokenizer.truncation or {}).get("max_length", 1 << 30)
        per_task = max(1, min(TEXTS_PER_TASK, -(-len(texts) // self.processes)))
        return PendingIds([self._executor.submit(_encode, list(texts[k:k + per_task]), max_length)
                           for k in range(0, len(texts), per_task)])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["BrokenProcessPool", "PendingIds", "PieceTokenizer", "TokenizerPool", "flat_ids", "flatten", "native_ids"]
